"""PaddleNLP's GPT sample plan, rebuilt bit-identically with NumPy alone.

PaddleNLP builds ``doc_idx``/``sample_idx``/``shuffle_idx`` for every split inside every rank,
between world barriers, with a C++ helper (``fast_dataindex``). Here one process (a Ray actor)
builds the same arrays once, without Paddle, and writes them where PaddleNLP looks for its index
cache, so PaddleNLP ranks started afterwards load them instead of rebuilding (and the reverse).

Ground truth is the installed code, not the spec: paddlenlp 3.0.0b4
``paddlenlp/data/causal_dataset.py`` and ``blendable_dataset.py`` and fast_dataindex 0.1.2
``build_sample_idx``/``build_blending_indices``. Differences from the FORK (v2.7.1) it matches:
blend children get ``ceil(n * w * 1.005) + 20`` samples (not ``+ 0``), the blended size is the raw
split target (not the sum of the children's), and the blend's dataset index is int16 (not uint8).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from bi150_ray.data import kernels
from bi150_ray.data.mmap_format import Corpus, open_corpus

__all__ = [
    "BLEND_EXTRA_SAMPLES",
    "BLEND_SAMPLE_FACTOR",
    "INDEX_CACHE_DIRNAME",
    "BlendPlan",
    "GPTPlan",
    "blend_cache_paths",
    "blend_description",
    "blend_indices",
    "blend_targets",
    "blend_weights",
    "build_indices",
    "build_plan",
    "build_sample_idx",
    "build_split",
    "cache_description",
    "cache_hash",
    "cache_paths",
    "cache_search_dirs",
    "check_data_split",
    "check_resume",
    "consumed_samples",
    "epochs_needed",
    "eval_consumed_samples",
    "find_cache",
    "get_sample",
    "load_blend_cache",
    "load_cache",
    "rank_batches",
    "resume_problems",
    "save_blend_cache",
    "save_cache",
    "split_ranges",
    "target_samples",
]

INDEX_CACHE_DIRNAME = "index-cache"  # PaddleNLP first looks in <dirname(prefix)>/index-cache
BLEND_SAMPLE_FACTOR = 1.005  # get_datasets_weights_and_num_samples: 0.5% head-room per child
BLEND_EXTRA_SAMPLES = 20  # ... plus 20 samples per child (paddlenlp 3.x; the 2.7 FORK adds 0)
SPLIT_NAMES = ("train", "valid", "test")

_DOC_CHUNK = 1 << 18  # doc_idx entries per pass of build_sample_idx (reused, cache-sized buffers)
_BLEND_BLOCK = 256  # steps per block in blend_indices
_THREAD_MIN = 1 << 20  # doc_idx + samples from which sample_idx and shuffle_idx are built in parallel


# ---------------------------------------------------------------------------------------------
# Targets and splits
# ---------------------------------------------------------------------------------------------


def _parse_splits(splits_string: str) -> list[float]:
    if splits_string.find(",") != -1:
        splits = [float(s) for s in splits_string.split(",")]
    elif splits_string.find("/") != -1:
        splits = [float(s) for s in splits_string.split("/")]
    else:
        splits = [float(splits_string)]
    splits = (splits + [0.0, 0.0])[:3]
    if not sum(splits) > 0.0:
        raise ValueError(f"split {splits_string!r}: the weights must sum to more than 0")
    return splits


def split_ranges(splits_string: str, n_docs: int) -> list[int]:
    """Boundaries ``[b0, b1, b2, b3]`` of the train/valid/test document ranges.

    Same arithmetic as ``get_train_valid_test_split_`` (Python ``round`` is banker's rounding,
    and the rounding excess is taken off every boundary after the first), so the ranges match
    PaddleNLP's even where a naive cumulative split would differ by one document.
    """
    splits = _parse_splits(splits_string)
    total = sum(splits)
    splits = [s / total for s in splits]
    index = [0]
    for i, s in enumerate(splits):
        index.append(index[i] + int(round(s * float(n_docs))))
    diff = index[-1] - n_docs
    for i in range(1, len(index)):
        index[i] -= diff
    return index


def check_data_split(splits_string: str, do_train: bool, do_eval: bool, do_predict: bool) -> None:
    """Raise like ``check_data_split`` when a requested phase has a zero split weight."""
    splits = _parse_splits(splits_string)
    if (do_train and splits[0] == 0) or (do_eval and splits[1] == 0) or (do_predict and splits[2] == 0):
        raise ValueError(
            "If do_train/do_eval/do_predict is True, the corresponding dataset split should not be 0!"
        )


def target_samples(
    per_device_train_batch_size: int,
    per_device_eval_batch_size: int,
    dataset_world_size: int,
    max_steps: int,
    gradient_accumulation_steps: int,
    eval_steps: int | None,
    eval_iters: int,
    test_iters: int,
    *,
    logging_steps: int = 500,
) -> list[int]:
    """``[train, valid, test]`` sample targets exactly as run_pretrain's ``create_pretrained_dataset``.

    ``eval_steps`` None or 0 falls back to ``logging_steps`` as ``TrainingArguments.__post_init__``
    does. ``eval_iters``/``test_iters`` are hard-coded in run_pretrain's ``main()``: 1/1 in the
    2.7 FORK, 10/100 upstream; pass the ones of the script being reproduced.
    """
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0 for pretraining on an offline corpus, got {max_steps}")
    if not eval_steps:
        if logging_steps <= 0:
            raise ValueError("eval_steps is unset and logging_steps is not positive: no evaluation interval")
        eval_steps = logging_steps
    r = dataset_world_size
    return [
        per_device_train_batch_size * r * max_steps * gradient_accumulation_steps,
        per_device_eval_batch_size * r * eval_iters * (max_steps // eval_steps + 1),
        per_device_eval_batch_size * r * test_iters,
    ]


# ---------------------------------------------------------------------------------------------
# Index mappings (one GPTDataset)
# ---------------------------------------------------------------------------------------------


def epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """``_num_epochs`` in closed form: the least ``e >= 1`` with ``(e*T - 1) // L >= n``."""
    if tokens_per_epoch <= 0:
        # PaddleNLP's loop would spin forever here.
        raise ValueError("the documents of this split hold no tokens; no sample can be built")
    need = num_samples * seq_length + 1  # (e*T - 1) // L >= n  <=>  e*T >= n*L + 1
    return max(1, -(-need // tokens_per_epoch))


def _epoch_layout(tokens_per_epoch: int, seq_length: int, num_samples: int) -> tuple[int, bool, int]:
    """(num_epochs, separate_last_epoch, samples of the first num_epochs-1 epochs)."""
    num_epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
    if num_epochs == 1:
        return 1, False, 0
    from_prev = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last = num_samples - from_prev
    per_epoch = (tokens_per_epoch - 1) // seq_length
    # The 80% rule of _build_index_mappings; int() truncation included.
    return num_epochs, last < int(0.80 * per_epoch), from_prev


def _shuffled_tiles(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate: bool, dtype: type
) -> np.ndarray:
    """``_build_doc_idx`` (PaddleNLP's is int32): same RNG draws, same permutation.

    PaddleNLP tiles through ``np.mgrid`` (two int64 grids) and shuffles int32. RandomState's
    shuffle draws the same swaps whatever the item size, and without the compiled kernels its
    8-byte path is the fast one, so the NumPy-only build shuffles int64 and narrows afterwards.
    """
    n = len(documents)
    doc_idx = np.tile(documents.astype(dtype), num_epochs)
    if separate and num_epochs > 1:
        kernels.shuffle(rng, doc_idx[: (num_epochs - 1) * n])
        kernels.shuffle(rng, doc_idx[(num_epochs - 1) * n :])
    else:
        kernels.shuffle(rng, doc_idx)
    return doc_idx


def build_sample_idx(
    sizes: npt.ArrayLike,
    doc_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    *,
    compiled: bool = True,
) -> np.ndarray:
    """``fast_dataindex.helpers.build_sample_idx``: int32 ``[S + 1, 2]`` rows of (position in
    doc_idx, token offset) where each sample starts. The compiled walk when it was built (and
    ``compiled``), else vectorised NumPy.

    The C++ walk consumes ``seq_length + 1`` tokens per sample with one token of overlap, so
    sample k starts at flat token position ``k * seq_length`` of the shuffled document stream,
    and its row names the document holding that token (never an empty one) and the offset in
    it. Row 0 is always (0, 0). ``doc_idx`` must hold ``num_epochs * tokens_per_epoch`` tokens,
    as every doc_idx PaddleNLP builds does.
    """
    sizes = np.require(sizes, requirements=["A", "C"])
    doc_idx = np.asarray(doc_idx)
    if len(doc_idx) and (int(doc_idx.min()) < 0 or int(doc_idx.max()) >= len(sizes)):
        raise ValueError(f"doc_idx must index sizes, [0, {len(sizes)})")
    out = _empty_sample_idx(num_epochs * tokens_per_epoch, seq_length)
    if compiled and kernels.COMPILED:
        end = kernels.sample_starts(sizes, doc_idx, seq_length, out)
    else:
        end = _fill_rows(sizes, doc_idx, seq_length, out, 0, len(doc_idx), 0, forward=True)
    _check_tokens(end, num_epochs * tokens_per_epoch)
    return out


def _empty_sample_idx(total_tokens: int, seq_length: int) -> np.ndarray:
    out = np.empty(((total_tokens - 1) // seq_length + 1, 2), dtype=np.int32)
    out[0] = 0
    return out


def _check_tokens(got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"doc_idx holds {got} tokens, but num_epochs * tokens_per_epoch is {expected}")


def _fill_rows(
    sizes: np.ndarray,
    doc_idx: np.ndarray,
    seq_length: int,
    out: np.ndarray,
    lo: int,
    hi: int,
    edge: int,
    *,
    forward: bool,
) -> int:
    """Fill the rows of ``out`` whose sample starts in ``doc_idx[lo:hi]``.

    Forward, ``edge`` is the flat token position where ``doc_idx[lo]`` starts and the result is
    where ``doc_idx[hi]`` starts; backward, the reverse. Backward lets a second thread fill the
    tail knowing only the total token count. Chunks are cache-sized and their buffers reused:
    fresh multi-megabyte temporaries cost more in page faults than the arithmetic.
    """
    L = int(seq_length)
    rows = out.shape[0]  # sample starts 0..rows-1; row 0 is fixed at (0, 0)
    chunk = max(1, min(_DOC_CHUNK, hi - lo))
    lens = np.empty(chunk, dtype=sizes.dtype)
    ends = np.empty(chunk, dtype=np.int64)
    starts = range(lo, hi, chunk) if forward else reversed(range(lo, hi, chunk))
    for c_lo in starts:
        m = min(chunk, hi - c_lo)
        ln, en = lens[:m], ends[:m]
        np.take(sizes, doc_idx[c_lo : c_lo + m], out=ln, mode="clip")  # "raise" would copy via a temporary
        np.cumsum(ln, dtype=np.int64, out=en)  # token ends, relative to the chunk start
        n_tokens = int(en[-1])
        base = edge if forward else edge - n_tokens
        edge = base + n_tokens if forward else base
        k_first = max(1, -(-base // L))
        k_last = min(rows, -(-(base + n_tokens) // L))  # starts before this chunk's end
        if k_last <= k_first:
            continue
        pos = np.arange(k_first, k_last, dtype=np.int64)
        pos *= L
        pos -= base
        # side="right" passes over empty documents, as the C++ walk does.
        doc = np.searchsorted(en, pos, side="right")
        pos -= en[doc]
        pos += ln[doc]  # offset inside the document
        doc += c_lo
        out[k_first:k_last, 0] = doc
        out[k_first:k_last, 1] = pos
    return edge


def _shuffled_range(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """``_build_shuffle_idx``: uint32 (int64 from 2**32 - 2 samples on), same permutation.

    Without the compiled kernels, shuffled as int64 for RandomState's faster 8-byte path, then
    narrowed.
    """
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    idx = np.arange(total_size, dtype=dtype if kernels.COMPILED else np.int64)
    kernels.shuffle(rng, idx[:num_samples])
    if num_samples != total_size:
        kernels.shuffle(rng, idx[num_samples:])
    return idx.astype(dtype, copy=False)


def _documents(documents: npt.ArrayLike | range, n_sizes: int) -> np.ndarray:
    if isinstance(documents, range):
        documents = np.arange(documents.start, documents.stop, documents.step, dtype=np.int64)
    docs = np.asarray(documents)
    if docs.ndim != 1 or docs.size == 0:
        raise ValueError("documents must be a non-empty 1-D array of sequence ids")
    if docs.dtype.kind not in "iu":
        raise TypeError(f"documents must be integers, got {docs.dtype}")
    if int(docs.min()) < 0 or int(docs.max()) >= n_sizes:
        raise ValueError(f"documents must lie in [0, {n_sizes})")
    return docs


def build_indices(
    sizes: npt.ArrayLike, documents: npt.ArrayLike | range, seq_length: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` equal to PaddleNLP's ``_build_index_mappings``.

    Same epoch count, same separate-last-epoch decision, same RNG (one ``RandomState(seed)``:
    doc_idx shuffle(s) first, then shuffle_idx shuffle(s)), same dtypes.
    """
    plan = _build(sizes, documents, seq_length, num_samples, seed)
    return plan[0], plan[1], plan[2]


def _build(
    sizes: npt.ArrayLike, documents: npt.ArrayLike | range, seq_length: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    # .idx arrays start at byte 34: gathers from an aligned copy are faster (4 bytes per document).
    sizes = np.require(sizes, requirements=["A", "C"])
    docs = _documents(documents, len(sizes))
    tokens_per_epoch = int(np.sum(sizes[docs], dtype=np.int64))
    num_epochs, separate, from_prev = _epoch_layout(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    total_tokens = num_epochs * tokens_per_epoch
    total = (total_tokens - 1) // seq_length
    first = total if not separate else from_prev
    sample_idx = _empty_sample_idx(total_tokens, seq_length)
    if kernels.COMPILED:
        # After the doc_idx shuffles, sample_idx needs only doc_idx and shuffle_idx only the RNG
        # state: the walk runs on a worker while the shuffle runs here (both release the GIL).
        doc_idx = _shuffled_tiles(docs, num_epochs, rng, separate, np.int32)
        if len(doc_idx) + total < _THREAD_MIN:  # a thread costs more than it saves
            _check_tokens(kernels.sample_starts(sizes, doc_idx, seq_length, sample_idx), total_tokens)
            shuffle_idx = _shuffled_range(first, total, rng)
        else:
            with ThreadPoolExecutor(max_workers=1) as pool:
                walked = pool.submit(kernels.sample_starts, sizes, doc_idx, seq_length, sample_idx)
                shuffle_idx = _shuffled_range(first, total, rng)
                _check_tokens(walked.result(), total_tokens)
        return doc_idx, sample_idx, shuffle_idx, num_epochs, separate

    # NumPy only: the same three arrays, slower.
    doc_idx64 = _shuffled_tiles(docs, num_epochs, rng, separate, np.int64)
    doc_idx = np.empty(len(doc_idx64), dtype=np.int32)

    def front(hi: int) -> int:
        end = _fill_rows(sizes, doc_idx64, seq_length, sample_idx, 0, hi, 0, forward=True)
        doc_idx[:hi] = doc_idx64[:hi]
        return end

    if len(doc_idx64) + total < _THREAD_MIN:
        _check_tokens(front(len(doc_idx64)), total_tokens)
        shuffle_idx = _shuffled_range(first, total, rng)
    else:
        # shuffle_idx needs only the RNG state and the sample count; sample_idx is filled from the
        # front by a worker and from the back (which starts at the known total) here.
        # RandomState.shuffle and the NumPy kernels drop the GIL, so the two run side by side.
        half = len(doc_idx64) // 2
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(front, half)
            shuffle_idx = _shuffled_range(first, total, rng)
            middle = _fill_rows(
                sizes, doc_idx64, seq_length, sample_idx, half, len(doc_idx64), total_tokens, forward=False
            )
            doc_idx[half:] = doc_idx64[half:]
            _check_tokens(future.result(), middle)
    return doc_idx, sample_idx, shuffle_idx, num_epochs, separate


# ---------------------------------------------------------------------------------------------
# Index cache (shared with PaddleNLP both ways)
# ---------------------------------------------------------------------------------------------


def cache_description(
    prefix: str, name: str, num_samples: int, seq_length: int, seed: int, split: str
) -> str:
    """The ``.dsc`` text; its md5 names the cache files. ``prefix`` is hashed verbatim, so the
    same corpus under another path string is a different cache."""
    return (
        "GPT Dataset\n\n"
        f"Data prefix {prefix}\n"
        f"Dataset name {name}\n"
        f"Number of samples {num_samples}\n"
        f"Sequence length {seq_length}\n"
        f"Random seed {seed}\n"
        f"Split {split}\n"
    )


def cache_hash(desc: str) -> str:
    return hashlib.md5(desc.encode("utf-8")).hexdigest()


def cache_paths(
    cache_dir: str | os.PathLike[str],
    prefix: str,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    split: str,
) -> dict[str, str]:
    """Paths PaddleNLP uses in ``cache_dir``, under its own keys: desc, doc, sample, shuffle."""
    h = cache_hash(cache_description(prefix, name, num_samples, seq_length, seed, split))
    d = os.fspath(cache_dir)
    return {
        "desc": os.path.join(d, h + ".dsc"),
        "doc": os.path.join(d, h + "_doc_idx.npy"),
        "sample": os.path.join(d, h + "_sample_idx.npy"),
        "shuffle": os.path.join(d, h + "_shuffle_idx.npy"),
    }


def cache_search_dirs(prefix: str, data_cache_path: str | os.PathLike[str] | None = None) -> list[str]:
    """PaddleNLP's lookup order: ``<dirname(prefix)>/index-cache``, then ``data_cache_path``."""
    dirs = [os.path.join(os.path.dirname(prefix), INDEX_CACHE_DIRNAME)]
    if data_cache_path is not None:
        dirs.append(os.fspath(data_cache_path))
    return dirs


def find_cache(
    prefix: str,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    split: str,
    data_cache_path: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, str], bool]:
    """(paths, found): the first search dir holding all four files, else the paths in the last
    dir searched, which is where PaddleNLP would build them."""
    paths: dict[str, str] = {}
    for d in cache_search_dirs(prefix, data_cache_path):
        paths = cache_paths(d, prefix, name, num_samples, seq_length, seed, split)
        if all(os.path.isfile(p) for p in paths.values()):
            return paths, True
    return paths, False


def _atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write through a hidden temporary beside ``path``, then rename: PaddleNLP ranks poll for
    these files and load them as soon as they exist. Created 0666 so the umask decides, as for
    the files PaddleNLP writes itself."""
    d, name = os.path.split(path)
    while True:
        tmp = os.path.join(d, f".{name}.{secrets.token_hex(6)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_npy(path: str, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=True))


def save_cache(
    cache_dir: str | os.PathLike[str],
    prefix: str,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    split: str,
    doc_idx: np.ndarray,
    sample_idx: np.ndarray,
    shuffle_idx: np.ndarray,
) -> dict[str, str]:
    """Write the four files as PaddleNLP does (``np.save``), each atomically, shuffle_idx last
    because that is the one PaddleNLP's waiting ranks test-load."""
    paths = cache_paths(cache_dir, prefix, name, num_samples, seq_length, seed, split)
    os.makedirs(cache_dir, exist_ok=True)
    desc = cache_description(prefix, name, num_samples, seq_length, seed, split)
    _atomic_write(paths["desc"], lambda f: f.write(desc.encode("utf-8")))
    _save_npy(paths["doc"], doc_idx)
    _save_npy(paths["sample"], sample_idx)
    _save_npy(paths["shuffle"], shuffle_idx)
    return paths


def load_cache(
    cache_dir: str | os.PathLike[str],
    prefix: str,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    split: str,
    *,
    mmap: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(doc_idx, sample_idx, shuffle_idx) from ``cache_dir``, memory-mapped like PaddleNLP
    loads them; None unless all four files exist (PaddleNLP's own cache-hit rule)."""
    paths = cache_paths(cache_dir, prefix, name, num_samples, seq_length, seed, split)
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    mode = "r" if mmap else None
    doc, sample, shuffle = (
        np.load(paths[k], allow_pickle=True, mmap_mode=mode) for k in ("doc", "sample", "shuffle")
    )
    return doc, sample, shuffle


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


@dataclass
class GPTPlan:
    """One ``GPTDataset``: its three mappings and what named them."""

    name: str
    prefix: str
    split: str
    num_samples: int
    seq_length: int
    seed: int
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    num_epochs: int
    separate_last_epoch: bool

    @property
    def desc(self) -> str:
        return cache_description(
            self.prefix, self.name, self.num_samples, self.seq_length, self.seed, self.split
        )

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def sample(self, corpus: Corpus, i: int) -> np.ndarray:
        return get_sample(corpus, self.doc_idx, self.sample_idx, self.shuffle_idx, i)


@dataclass
class BlendPlan:
    """One ``BlendableDataset``: which child and which of its samples each position reads."""

    datasets: list[GPTPlan]
    weights: np.ndarray  # normalised as BlendableDataset stores them
    size: int
    dataset_index: np.ndarray
    dataset_sample_index: np.ndarray

    @property
    def desc(self) -> str:
        return blend_description([d.desc for d in self.datasets], self.weights, self.size)

    def __len__(self) -> int:
        return self.size

    def sample(self, corpora: Sequence[Corpus], i: int) -> tuple[int, np.ndarray]:
        """(dataset_idx, tokens) as ``BlendableDataset[i]`` gives ``dataset_idx`` and ``text``."""
        d = int(self.dataset_index[i])
        return d, self.datasets[d].sample(corpora[d], int(self.dataset_sample_index[i]))


def build_split(
    sizes: npt.ArrayLike,
    prefix: str,
    name: str,
    documents: npt.ArrayLike | range,
    splits_string: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    *,
    data_cache_path: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> GPTPlan:
    """One split's plan, reusing or writing PaddleNLP's cache files when ``cache`` is set
    (looked up and written in the same places PaddleNLP uses)."""
    sizes = np.asarray(sizes)
    docs = _documents(documents, len(sizes))
    if cache:
        paths, found = find_cache(prefix, name, num_samples, seq_length, seed, splits_string, data_cache_path)
        if found:
            arrays = tuple(
                np.load(paths[k], allow_pickle=True, mmap_mode="r") for k in ("doc", "sample", "shuffle")
            )
            tpe = int(np.sum(sizes[docs], dtype=np.int64))
            num_epochs, separate, _ = _epoch_layout(tpe, seq_length, num_samples)
            return GPTPlan(
                name, prefix, splits_string, num_samples, seq_length, seed, *arrays, num_epochs, separate
            )
    doc_idx, sample_idx, shuffle_idx, num_epochs, separate = _build(
        sizes, docs, seq_length, num_samples, seed
    )
    if cache:
        save_cache(
            os.path.dirname(paths["desc"]),
            prefix,
            name,
            num_samples,
            seq_length,
            seed,
            splits_string,
            doc_idx,
            sample_idx,
            shuffle_idx,
        )
    return GPTPlan(
        name,
        prefix,
        splits_string,
        num_samples,
        seq_length,
        seed,
        doc_idx,
        sample_idx,
        shuffle_idx,
        num_epochs,
        separate,
    )


def _single_prefix_plans(
    prefix: str,
    splits_string: str,
    targets: Sequence[int],
    seq_length: int,
    seed: int,
    data_cache_path: str | os.PathLike[str] | None,
    cache: bool,
) -> list[GPTPlan | None]:
    sizes = open_corpus(prefix, verify_pointers=False).sizes  # either format, PaddleNLP's precedence
    bounds = split_ranges(splits_string, len(sizes))
    plans: list[GPTPlan | None] = []
    for i, name in enumerate(SPLIT_NAMES):
        if bounds[i + 1] <= bounds[i]:
            plans.append(None)  # GPTDataset builds nothing for an empty split; the caller gets None
            continue
        plans.append(
            build_split(
                sizes,
                prefix,
                name,
                range(bounds[i], bounds[i + 1]),
                splits_string,
                int(targets[i]),
                seq_length,
                seed,
                data_cache_path=data_cache_path,
                cache=cache,
            )
        )
    return plans


def build_plan(
    data_prefix: Sequence[str | float],
    splits_string: str,
    train_val_test_num_samples: Sequence[int],
    seq_length: int,
    seed: int,
    *,
    data_cache_path: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> tuple[GPTPlan | BlendPlan | None, GPTPlan | BlendPlan | None, GPTPlan | BlendPlan | None]:
    """``build_train_valid_test_datasets`` without Paddle: same arguments, same plans.

    ``data_prefix`` is ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` (blending), as
    run_pretrain's ``get_train_data_file`` produces it. Each prefix is read in either format
    (``open_corpus``: ``_ids.npy``/``_idx.npz`` before ``.bin``/``.idx``, as PaddleNLP does). With ``cache`` the index files are looked up and written where PaddleNLP would.
    """
    if len(data_prefix) == 1:
        plans = _single_prefix_plans(
            str(data_prefix[0]),
            splits_string,
            train_val_test_num_samples,
            seq_length,
            seed,
            data_cache_path,
            cache,
        )
        return plans[0], plans[1], plans[2]

    prefixes, weights, child_targets = blend_targets(data_prefix, train_val_test_num_samples)
    per_prefix = [
        _single_prefix_plans(p, splits_string, t, seq_length, seed, data_cache_path, cache)
        for p, t in zip(prefixes, child_targets, strict=True)
    ]
    blends: list[BlendPlan | None] = []
    for i in range(3):
        children = [plans[i] for plans in per_prefix if plans[i] is not None]
        if not children:
            blends.append(None)
            continue
        if len(children) != len(weights):
            raise ValueError(
                f"split {SPLIT_NAMES[i]} is empty for some prefixes but not others; PaddleNLP's "
                "BlendableDataset fails on this (one weight per prefix, fewer datasets)"
            )
        blends.append(_blend(children, weights, int(train_val_test_num_samples[i]), data_cache_path, cache))
    return blends[0], blends[1], blends[2]


# ---------------------------------------------------------------------------------------------
# Blending
# ---------------------------------------------------------------------------------------------


def blend_targets(
    data_prefix: Sequence[str | float], train_val_test_num_samples: Sequence[int]
) -> tuple[list[str], list[float], list[list[int]]]:
    """``get_datasets_weights_and_num_samples`` of the installed PaddleNLP:
    (prefixes, normalised weights, per-prefix ``ceil(n * w * 1.005) + 20`` targets)."""
    if len(data_prefix) % 2:
        raise ValueError("a blend is given as weight, prefix, weight, prefix, ...")
    n = len(data_prefix) // 2
    weights = [float(data_prefix[2 * i]) for i in range(n)]
    prefixes = [str(data_prefix[2 * i + 1]).strip() for i in range(n)]
    weight_sum = 0.0
    for w in weights:
        weight_sum += w
    if not weight_sum > 0.0:
        raise ValueError("blend weights must sum to more than 0")
    weights = [w / weight_sum for w in weights]
    targets = [
        [
            int(math.ceil(val * w * BLEND_SAMPLE_FACTOR)) + BLEND_EXTRA_SAMPLES
            for val in train_val_test_num_samples
        ]
        for w in weights
    ]
    return prefixes, weights, targets


def blend_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as ``BlendableDataset`` normalises them again (float64 array / np.sum)."""
    w = np.array(weights, dtype=np.float64)
    total = np.sum(w)
    if not total > 0.0:
        raise ValueError("blend weights must sum to more than 0")
    w /= total
    return w


def blend_description(child_descs: Sequence[str], weights: np.ndarray, size: int) -> str:
    """``BlendableDataset.desc``: the children's GPT descs, then NumPy's own repr of the weights."""
    desc = "Blendable dataset\n\nDatasets:\n"
    for d in child_descs:
        desc += d + "\n\n"
    desc += f"Weights: {weights}\n"
    desc += f"Size: {size}\n"
    return desc


def blend_cache_paths(cache_dir: str | os.PathLike[str], desc: str) -> dict[str, str]:
    h = cache_hash(desc)
    d = os.fspath(cache_dir)
    return {
        "desc": os.path.join(d, h + ".dsc"),
        "index": os.path.join(d, h + "_index.npy"),
        "sample_index": os.path.join(d, h + "_sample_index.npy"),
    }


def save_blend_cache(
    cache_dir: str | os.PathLike[str], desc: str, dataset_index: np.ndarray, dataset_sample_index: np.ndarray
) -> dict[str, str]:
    paths = blend_cache_paths(cache_dir, desc)
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write(paths["desc"], lambda f: f.write(desc.encode("utf-8")))
    _save_npy(paths["sample_index"], dataset_sample_index)
    _save_npy(paths["index"], dataset_index)  # the one PaddleNLP's waiting ranks test-load
    return paths


def load_blend_cache(
    cache_dir: str | os.PathLike[str], desc: str, *, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray] | None:
    """(dataset_index, dataset_sample_index), or None; PaddleNLP's hit rule ignores the .dsc."""
    paths = blend_cache_paths(cache_dir, desc)
    if not (os.path.isfile(paths["index"]) and os.path.isfile(paths["sample_index"])):
        return None
    mode = "r" if mmap else None
    return (
        np.load(paths["index"], allow_pickle=True, mmap_mode=mode),
        np.load(paths["sample_index"], allow_pickle=True, mmap_mode=mode),
    )


def _blend(
    children: list[GPTPlan],
    weights: Sequence[float],
    size: int,
    data_cache_path: str | os.PathLike[str] | None,
    cache: bool,
) -> BlendPlan:
    w = blend_weights(weights)
    desc = blend_description([c.desc for c in children], w, size)
    # BlendableDataset caches only with --data_cache, and only there (no index-cache lookup).
    loaded = load_blend_cache(data_cache_path, desc) if cache and data_cache_path else None
    if loaded is None:
        index, sample_index = blend_indices(w, size)
        if cache and data_cache_path:
            save_blend_cache(data_cache_path, desc, index, sample_index)
    else:
        index, sample_index = loaded
    plan = BlendPlan(children, w, size, index, sample_index)
    if size:
        # BlendableDataset reads its last sample as a size check; check every child instead.
        used = np.bincount(np.asarray(index, dtype=np.int64), minlength=len(children))
        for c, n in zip(children, used.tolist(), strict=True):
            if n > len(c):
                raise ValueError(f"blend needs {n} samples of {c.prefix} ({c.name}) but it has {len(c)}")
    return plan


def _start_counts(weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Guessed counts (D, B) at each block start: floor(w*s), the shortfall to s handed out by
    largest remainder. Only a guess; blend_indices verifies every block against its predecessor."""
    real = starts[:, None].astype(np.float64) * weights
    counts = np.floor(real).astype(np.int64)
    short = starts - counts.sum(axis=1)
    order = np.argsort(counts - real, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(weights.size), order.shape), axis=1)
    counts += rank < short[:, None]
    return np.ascontiguousarray(counts.T)


def _run_blocks(
    weights: np.ndarray, starts: np.ndarray, counts: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the greedy for ``steps`` steps in every block at once, from the given start counts.

    Per step and block: error_d = w_d * max(s, 1) - count_d in float64 exactly as the C++ does
    it (one product, one difference), first maximum wins, its count is recorded then bumped.
    """
    n_sets, n_blocks = counts.shape
    counts = counts.copy()
    flat = counts.reshape(-1)
    cols = np.arange(n_blocks, dtype=np.int64)
    pos = starts.astype(np.float64)
    first = bool(n_blocks) and starts[0] == 0
    dec = np.empty((steps, n_blocks), dtype=np.int64)
    taken = np.empty((steps, n_blocks), dtype=np.int64)
    x = np.empty(n_blocks)
    best = np.empty(n_blocks)
    err = np.empty(n_blocks)
    better = np.empty(n_blocks, dtype=bool)
    for i in range(steps):
        np.add(pos, i, out=x)
        if first and i == 0:
            x[0] = 1.0  # max(s, 1): step 0 uses 1.0, like step 1
        np.multiply(x, weights[0], out=best)
        best -= counts[0]
        d = dec[i]
        d.fill(0)
        for k in range(1, n_sets):
            np.multiply(x, weights[k], out=err)
            err -= counts[k]
            np.greater(err, best, out=better)
            d[better] = k
            np.maximum(best, err, out=best)
        where = d * n_blocks
        where += cols
        taken[i] = flat[where]
        flat[where] += 1
    return dec, taken, counts


def blend_indices(
    weights: npt.ArrayLike, size: int, *, index_dtype: npt.DTypeLike = np.int16
) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index, dataset_sample_index)`` equal to ``helpers.build_blending_indices``.

    The greedy (each position goes to the dataset furthest behind its share, ties to the lowest)
    is sequential, so it runs in blocks of 256 steps vectorised across blocks, each block from a
    guessed start; a block whose guessed start differs from its predecessor's actual end is
    rerun from that end, until every start is the previous block's end. The first block starts
    exact, so the fixed point is the sequential result; the greedy forgets its start within a
    few steps, so in practice one rerun pass over a few blocks suffices.
    ``index_dtype`` is int16 as PaddleNLP allocates for fast_dataindex > 0.1.1 (uint8 before).
    """
    w = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("blend_indices needs at least one weight")
    if w.size > np.iinfo(index_dtype).max:
        raise ValueError(f"{w.size} datasets do not fit a {np.dtype(index_dtype)} dataset index")
    if size <= 0:
        return np.zeros(0, dtype=index_dtype), np.zeros(0, dtype=np.int64)
    steps = _BLEND_BLOCK
    n_blocks = -(-size // steps)
    starts = np.arange(n_blocks, dtype=np.int64) * steps
    start_counts = _start_counts(w, starts)
    start_counts[:, 0] = 0
    dec = np.empty((steps, n_blocks), dtype=np.int64)
    taken = np.empty((steps, n_blocks), dtype=np.int64)
    ends = np.empty_like(start_counts)
    todo = np.arange(n_blocks)
    while todo.size:
        d, t, e = _run_blocks(w, starts[todo], start_counts[:, todo], steps)
        dec[:, todo] = d
        taken[:, todo] = t
        ends[:, todo] = e
        stale = np.flatnonzero((start_counts[:, 1:] != ends[:, :-1]).any(axis=0)) + 1
        start_counts[:, stale] = ends[:, stale - 1]
        todo = stale
    return (dec.T.reshape(-1)[:size].astype(index_dtype), np.ascontiguousarray(taken.T.reshape(-1)[:size]))


# ---------------------------------------------------------------------------------------------
# Reading samples
# ---------------------------------------------------------------------------------------------


def get_sample(
    corpus: Corpus, doc_idx: np.ndarray, sample_idx: np.ndarray, shuffle_idx: np.ndarray, i: int
) -> np.ndarray:
    """Tokens of sample ``i``: ``GPTDataset.__getitem__(i)["text"]`` (int64, seq_length + 1).

    The sample runs from row ``shuffle_idx[i]`` of sample_idx to the next row, both ends
    inclusive; the pieces are copied straight into the int64 result (PaddleNLP concatenates,
    then copies again to int64). A ``.lsm`` loss mask, which PaddleNLP would add as "mask",
    is not read.
    """
    j = int(shuffle_idx[i])
    doc_f, off_f, doc_l, off_l = sample_idx[j : j + 2].reshape(-1).tolist()
    if doc_f == doc_l:
        return corpus.get(int(doc_idx[doc_f]), off_f, off_l - off_f + 1).astype(np.int64)
    docs = doc_idx[doc_f : doc_l + 1].tolist()
    pieces = [corpus.get(docs[0], off_f)]
    pieces.extend(corpus.get(d) for d in docs[1:-1])
    pieces.append(corpus.get(docs[-1], 0, off_l + 1))
    out = np.empty(sum(len(p) for p in pieces), dtype=np.int64)
    pos = 0
    for p in pieces:
        out[pos : pos + len(p)] = p
        pos += len(p)
    return out


# ---------------------------------------------------------------------------------------------
# Which rank reads what, and resuming
# ---------------------------------------------------------------------------------------------


def consumed_samples(
    global_step: int,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    dataset_world_size: int,
) -> int:
    """Where the trainer restarts the train sampler on resume: ``step * B * G * R``."""
    return global_step * per_device_train_batch_size * gradient_accumulation_steps * dataset_world_size


def eval_consumed_samples(
    global_step: int,
    eval_steps: int,
    eval_iters: int,
    per_device_eval_batch_size: int,
    dataset_world_size: int,
) -> int:
    """Where ``evaluate()`` restarts the eval sampler, so each evaluation reads fresh samples."""
    return (global_step // eval_steps) * eval_iters * per_device_eval_batch_size * dataset_world_size


def rank_batches(
    dataset_rank: int,
    dataset_world_size: int,
    batch_size: int,
    step: int,
    *,
    gradient_accumulation_steps: int = 1,
    consumed: int = 0,
    dataset_len: int | None = None,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Global sample indices data rank ``dataset_rank`` reads in optimizer step ``step``: one
    int64 array per micro-batch (with G=1, micro-batch number ``step``), counted from where the
    sampler started (``consumed``).

    This is PaddleNLP's ``DistributedBatchSampler(shuffle=False)``: from ``consumed`` on it cuts
    blocks of ``B * R`` indices and rank r takes ``[r*B, (r+1)*B)`` of each. With ``dataset_len``
    it also stops where the sampler does, at ``(len // R) * R``, and, unless ``drop_last``,
    hands the short last block to every rank whole, as the sampler does. Steps past the end
    give fewer (or no) micro-batches.
    """
    if not 0 <= dataset_rank < dataset_world_size:
        raise ValueError(f"dataset_rank {dataset_rank} is outside [0, {dataset_world_size})")
    if batch_size <= 0 or gradient_accumulation_steps <= 0:
        raise ValueError("batch_size and gradient_accumulation_steps must be positive")
    if consumed % dataset_world_size:
        raise ValueError(
            f"consumed samples {consumed} are not divisible by the {dataset_world_size} data ranks"
        )
    block = batch_size * dataset_world_size
    end = None if dataset_len is None else int(dataset_len / dataset_world_size) * dataset_world_size
    out = []
    for k in range(step * gradient_accumulation_steps, (step + 1) * gradient_accumulation_steps):
        lo = consumed + k * block
        if end is None or lo + block <= end:
            first = lo + dataset_rank * batch_size
            out.append(np.arange(first, first + batch_size, dtype=np.int64))
        elif lo < end and not drop_last:
            out.append(np.arange(lo, end, dtype=np.int64))  # the sampler's short tail, to every rank
    return out


_BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "dataset_world_size")
_PLAN_KEYS = ("data_prefix", "split", "seq_length", "seed", "train_num_epochs", "train_separate_last_epoch")


def resume_problems(prev: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[int, list[str]]:
    """(``consumed_samples`` the trainer will restart from, what would go wrong with the data).

    The trainer recomputes ``consumed = global_step * B * G * R`` from the *new* arguments, so a
    changed global batch moves the start away from what was actually read; a changed data-parallel
    world re-deals every later micro-batch and changes the eval/test targets. ``prev`` and ``new``
    hold the ``_BATCH_KEYS`` (``global_step`` in either); when both hold plan keys (prefixes,
    split, seq_length, seed, the train split's epoch count and separate-last-epoch flag) those
    must match too, since any of them changes the sample order.
    """
    for key in _BATCH_KEYS:
        for which, d in (("previous", prev), ("new", new)):
            if key not in d:
                raise ValueError(f"{which} run record lacks {key!r}")
    step = int(new.get("global_step", prev.get("global_step", 0)))
    gb_prev = math.prod(int(prev[k]) for k in _BATCH_KEYS)
    gb_new = math.prod(int(new[k]) for k in _BATCH_KEYS)
    resumed = consumed_samples(step, *(int(new[k]) for k in _BATCH_KEYS))
    actual = consumed_samples(step, *(int(prev[k]) for k in _BATCH_KEYS))
    problems = []
    if resumed != actual:  # a changed global batch, unless nothing was read yet
        how = "skip" if resumed > actual else "repeat"
        changed = ", ".join(f"{k} {prev[k]} -> {new[k]}" for k in _BATCH_KEYS if int(prev[k]) != int(new[k]))
        problems.append(
            f"global batch changed from {gb_prev} to {gb_new} samples ({changed}): at step {step} the run has read "
            f"{actual} samples but would restart at {resumed}, so it would {how} {abs(resumed - actual)} samples"
        )
    if int(prev["dataset_world_size"]) != int(new["dataset_world_size"]):
        problems.append(
            f"data-parallel world changed from {prev['dataset_world_size']} to {new['dataset_world_size']} "
            "ranks: every later micro-batch is dealt to different ranks and the valid/test targets change"
        )
    for key in _PLAN_KEYS:
        if key in prev and key in new and prev[key] != new[key]:
            problems.append(
                f"{key} changed from {prev[key]!r} to {new[key]!r}: the sample plan and its order differ"
            )
    return resumed, problems


def check_resume(prev: Mapping[str, Any], new: Mapping[str, Any], *, allow_change: bool = False) -> int:
    """Refuse a resume that would silently skip, repeat or reorder training data (see
    ``resume_problems``); return the ``consumed_samples`` the trainer will restart from.
    ``allow_change`` only skips the raising."""
    resumed, problems = resume_problems(prev, new)
    if problems and not allow_change:
        raise ValueError(
            "resume would not continue the same data stream: "
            + "; ".join(problems)
            + " (pass allow_change=True to resume anyway)"
        )
    return resumed
