"""``RandomState.shuffle`` with NumPy's exact draws, in compiled code when it was built.

The sample plan must equal PaddleNLP's bit for bit, so doc_idx and shuffle_idx are permuted with
the same legacy MT19937 draws NumPy's ``RandomState.shuffle`` makes. That shuffle is most of the
plan build; ``_fisher_yates`` (built by ``setup.py`` when a C compiler is there) replays the draws
and prefetches the swap targets. Without it, NumPy's own shuffle is used: same result, slower.
"""

from __future__ import annotations

import numpy as np

try:
    from bi150_ray.data import _fisher_yates
except ImportError:  # no compiler where the package was installed
    _fisher_yates = None

__all__ = ["COMPILED", "shuffle"]

COMPILED = _fisher_yates is not None


def shuffle(rng: np.random.RandomState, array: np.ndarray, *, compiled: bool = True) -> None:
    """Shuffle ``array`` in place exactly as ``rng.shuffle(array)`` and advance ``rng`` the same."""
    state = rng.get_state()
    if (
        not compiled
        or _fisher_yates is None
        or state[0] != "MT19937"
        or array.ndim != 1
        or array.dtype.kind not in "iu"
        or array.itemsize not in (4, 8)
        or not array.flags.c_contiguous
        or not array.flags.writeable
    ):
        rng.shuffle(array)
        return
    name, key, pos, has_gauss, gauss = state
    key = np.array(key, dtype=np.uint32)  # a private copy, updated in place
    pos = _fisher_yates.shuffle(array, array.itemsize, key, int(pos))
    rng.set_state((name, key, pos, has_gauss, gauss))
