"""The plan build's two sequential loops, in compiled code when it was built.

The sample plan must equal PaddleNLP's bit for bit, so doc_idx and shuffle_idx are permuted with
the same legacy MT19937 draws NumPy's ``RandomState.shuffle`` makes, and sample_idx is the walk of
PaddleNLP's C++ ``build_sample_idx``. The shuffle is most of the plan build. ``_kernels`` (built
by ``setup.py`` wherever a C compiler is) replays the draws with the swap targets prefetched, and
walks sample_idx. Without it: NumPy's own shuffle and the vectorised walk in ``samples`` (same
plan, slower).
"""

from __future__ import annotations

import numpy as np

try:
    from bi150_ray.data import _kernels
except ImportError:  # no compiler where the package was installed
    _kernels = None

__all__ = ["COMPILED", "sample_starts", "shuffle"]

COMPILED = _kernels is not None  # the one switch: tests set it False to run the NumPy-only build
# Reading and writing a RandomState's state costs ~0.3 ms; below this many items NumPy's own
# shuffle is faster than that round trip (measured: equal at ~16k int32).
COMPILED_MIN_ITEMS = 1 << 14


def shuffle(rng: np.random.RandomState, array: np.ndarray, *, compiled: bool = True) -> None:
    """Shuffle ``array`` in place exactly as ``rng.shuffle(array)`` and advance ``rng`` the same."""
    if (
        not compiled
        or not COMPILED
        or array.size < COMPILED_MIN_ITEMS
        or array.ndim != 1
        or array.dtype.kind not in "iu"
        or array.itemsize not in (4, 8)
        or not array.flags.c_contiguous
        or not array.flags.writeable
    ):
        rng.shuffle(array)
        return
    state = rng.get_state(legacy=False)  # also carries the cached gaussian, kept as it is
    if state["bit_generator"] != "MT19937":  # a RandomState built on another bit generator
        rng.shuffle(array)
        return
    key = np.array(state["state"]["key"], dtype=np.uint32)  # a private copy, updated in place
    state["state"]["pos"] = _kernels.shuffle(array, array.itemsize, key, int(state["state"]["pos"]))
    state["state"]["key"] = key
    rng.set_state(state)


def sample_starts(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, out: np.ndarray) -> int:
    """Rows 1.. of ``out`` (int32 ``[rows, 2]``) as PaddleNLP's ``build_sample_idx``; returns the
    number of tokens ``doc_idx`` holds. Needs the compiled module (check ``COMPILED``)."""
    if not COMPILED:
        raise RuntimeError("bi150_ray.data._kernels was not built")
    if out.dtype != np.int32 or out.ndim != 2 or out.shape[1] != 2 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous int32 array of shape [rows, 2]")
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    if doc_idx.dtype.kind not in "iu" or doc_idx.itemsize not in (4, 8) or doc_idx.dtype == np.uint64:
        doc_idx = doc_idx.astype(np.int64)
    doc_idx = np.ascontiguousarray(doc_idx)
    return _kernels.sample_starts(sizes, doc_idx, doc_idx.itemsize, int(seq_length), out)
