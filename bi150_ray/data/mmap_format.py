"""Megatron/PaddleNLP ``MMIDIDX`` v1 corpus: ``<prefix>.bin`` (tokens) + ``<prefix>.idx`` (index),
and the older ``<prefix>_ids.npy`` + ``<prefix>_idx.npz`` one (``NpyCorpus``), opened with
PaddleNLP's precedence by ``open_corpus``.

Byte-compatible with ``paddlenlp.data.indexed_dataset.MMapIndexedDataset`` so PaddleNLP's
``run_pretrain`` can read what we write and we can read what its ``create_pretraining_data``
writes. NumPy only: this module must import on a Ray driver that has no Paddle.

``.idx`` layout (little-endian): 9-byte magic, u64 version (1), u8 dtype code, u64 ``len``
(sequences), u64 ``doc_count`` (= documents + 1), then ``int32 sizes[len]``,
``int64 pointers[len]`` (byte offsets into ``.bin``) and ``int64 doc_idx[doc_count]``.
"""

from __future__ import annotations

import os
import secrets
import struct
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "CorpusFormatError",
    "MMapCorpus",
    "MMapWriter",
    "NpyCorpus",
    "best_dtype",
    "dtype_code",
    "open_corpus",
    "write_npy_corpus",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic(9) + version(8) + dtype code(1) + len(8) + doc_count(8); arrays start unaligned at 34.
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size

# PaddleNLP's table (paddlenlp/data/indexed_dataset.py `dtypes`). Code 7 is float32 here;
# original Megatron used 7 for float64, so files from old Megatron builds are not interchangeable.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
    9: np.dtype(np.uint32),
    10: np.dtype(np.uint64),
}

_CHUNK = 1 << 22  # elements per chunk when streaming or validating large index arrays


class CorpusFormatError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, corrupt or inconsistent; the message names the file."""


def dtype_code(dtype: npt.DTypeLike) -> int:
    """The ``.idx`` code for ``dtype`` (ValueError if the format cannot store it)."""
    dt = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if candidate == dt:
            return code
    raise ValueError(
        f"dtype {dt} has no MMIDIDX code; supported: {sorted(str(d) for d in DTYPE_CODES.values())}"
    )


def best_dtype(vocab_size: int) -> np.dtype:
    """Token dtype PaddleNLP's ``create_pretraining_data`` picks: uint16 below 2**16 - 1, else int32.

    (``indexed_dataset.__best_fitting_dtype`` uses 65500 instead, but nothing in the
    pretraining path calls it; the writer script's ``vocab_size < 2**16 - 1`` is what decides.)
    """
    return np.dtype(np.uint16) if vocab_size < 2**16 - 1 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = os.fspath(prefix)
    return Path(p + ".bin"), Path(p + ".idx")


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, _CHUNK):
        yield start, min(start + _CHUNK, n)


class MMapWriter:
    """Streams documents into ``<prefix>.bin``/``.idx``; the pair appears only on a clean close.

    Tokens go straight to a temporary file beside the target, so the corpus is never held in
    RAM (only 4 bytes of size per document). Temporary names are hidden and contain neither
    ``.idx`` nor ``_idx.npz``: PaddleNLP's ``get_train_data_file`` treats any file whose name
    merely *contains* those as a dataset. On an exception inside ``with`` (or ``abort()``)
    the temporaries are deleted and any previous corpus at ``prefix`` is left untouched.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: npt.DTypeLike = np.uint16) -> None:
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.bin_path, self.idx_path = _paths(prefix)
        self._dir = self.bin_path.parent
        if not self._dir.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {self._dir}")
        fd, self._tmp_bin = self._create_temp("bin-partial")
        self._bin = os.fdopen(fd, "wb")
        self._sizes = array("i")
        self._n_tokens = 0
        self._closed = False

    def __enter__(self) -> MMapWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def n_docs(self) -> int:
        return len(self._sizes)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def add_document(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Append one document as one sequence (the LLaMA recipe: no sentence splitting)."""
        if self._closed:
            raise RuntimeError("MMapWriter is closed")
        arr = np.asarray(token_ids)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size >= 2**31:
            raise ValueError(f"document of {arr.size} tokens does not fit the int32 size field")
        if arr.size and self.dtype.kind in "iu":
            if arr.dtype.kind not in "iub":
                raise TypeError(f"token ids must be integers for dtype {self.dtype}, got {arr.dtype}")
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token ids [{lo}, {hi}] do not fit {self.dtype}")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype.newbyteorder("<")).tobytes())
        self._sizes.append(arr.size)
        self._n_tokens += arr.size

    def close(self) -> None:
        """Write the index and move both files into place (``.bin`` first, then ``.idx``)."""
        if self._closed:
            return
        tmp_idx: Path | None = None
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            tmp_idx = self._write_index()
            # A stale .idx must never describe the new .bin: drop it before the .bin swap, so a
            # crash between the two renames leaves a .bin without .idx (which nobody loads).
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, self.idx_path)
            tmp_idx = None
        except BaseException:
            self._cleanup(tmp_idx)
            raise
        finally:
            self._closed = True

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._closed:
            self._closed = True
            self._cleanup(None)

    def _cleanup(self, tmp_idx: Path | None) -> None:
        if not self._bin.closed:
            self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        if tmp_idx is not None:
            tmp_idx.unlink(missing_ok=True)

    def _write_index(self) -> Path:
        fd, tmp = self._create_temp("index-partial")
        n = len(self._sizes)
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if n else np.zeros(0, np.int32)
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, n, n + 1))
            f.write(sizes.astype("<i4", copy=False).tobytes())
            offset = 0  # byte offset of the next sequence in .bin
            for lo, hi in _chunks(n):
                nbytes = sizes[lo:hi].astype(np.int64) * self.dtype.itemsize
                pointers = np.empty(hi - lo, dtype="<i8")
                pointers[0] = offset
                np.cumsum(nbytes[:-1], out=pointers[1:])
                pointers[1:] += offset
                offset += int(nbytes.sum())
                f.write(pointers.tobytes())
            for lo, hi in _chunks(n + 1):  # one sequence per document: doc_idx = 0..n
                f.write(np.arange(lo, hi, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create_temp(self, kind: str) -> tuple[int, Path]:
        # Not mkstemp: its 0600 mode would survive the rename; 0666 lets the umask decide, as
        # for any file a user writes, so other node users (Ray workers) can read the corpus.
        base = self.bin_path.name[: -len(".bin")]
        while True:
            path = self._dir / f".{base}.{secrets.token_hex(6)}.{kind}"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
            except FileExistsError:
                continue


class _Reader:
    """What both corpus readers share: PaddleNLP's sequence/document access over ``sizes``,
    ``doc_idx`` and a per-format ``_view`` of the token memory map."""

    prefix: str
    sizes: np.ndarray
    doc_idx: np.ndarray
    _verify: bool

    def __init__(self, prefix: str | os.PathLike[str], *, verify_pointers: bool = True) -> None:
        raise NotImplementedError

    def _view(self, i: int, offset: int, length: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def n_docs(self) -> int:
        return len(self.doc_idx) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` as a read-only view (no copy).

        Same arguments as PaddleNLP's ``get``, but returns only the tokens (its UP version
        returns a ``(tokens, loss_mask)`` tuple).
        """
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for corpus of {n}")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"slice [{offset}, {offset}+{length}) out of range for sequence {i} of {size} tokens"
            )
        return self._view(i, offset, length)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document(self, j: int) -> list[np.ndarray]:
        """Sequences of document ``j`` (one per document for LLaMA data)."""
        lo, hi = int(self.doc_idx[j]), int(self.doc_idx[j + 1])
        return [self.get(i) for i in range(lo, hi)]

    def __getstate__(self) -> dict[str, object]:
        return {"prefix": self.prefix, "verify": self._verify}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["prefix"], verify_pointers=bool(state["verify"]))  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r}, dtype={self.dtype}, sequences={len(self)}, docs={self.n_docs})"


class MMapCorpus(_Reader):
    """Zero-copy reader: ``sizes``/``pointers``/``doc_idx`` and token slices are read-only views
    into memory maps, so many Ray workers on a node share one page cache copy.

    Checks everything PaddleNLP would trip over later (or silently misread) and raises one
    ``CorpusFormatError`` naming the file. ``verify_pointers=False`` skips the O(len) pointer scan.
    Pickles as its prefix, so it can be shipped to Ray workers and re-mapped there.
    """

    def __init__(self, prefix: str | os.PathLike[str], *, verify_pointers: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        self._verify = verify_pointers
        self.bin_path, self.idx_path = _paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise CorpusFormatError(f"{path}: missing (a corpus needs both {self.prefix}.bin and .idx)")
        self._open()

    def _open(self) -> None:
        idx, binp = self.idx_path, self.bin_path
        idx_len = idx.stat().st_size
        if idx_len < HEADER_SIZE:
            raise CorpusFormatError(f"{idx}: truncated index ({idx_len} bytes, header needs {HEADER_SIZE})")
        with open(idx, "rb") as f:
            magic, version, code, n, doc_count = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise CorpusFormatError(f"{idx}: bad magic {magic!r}, expected {MAGIC!r} (not an MMIDIDX index)")
        if version != VERSION:
            raise CorpusFormatError(f"{idx}: unsupported index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise CorpusFormatError(
                f"{idx}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
            )
        self.dtype = DTYPE_CODES[code]
        expected = HEADER_SIZE + 12 * n + 8 * doc_count
        if idx_len < expected:
            raise CorpusFormatError(
                f"{idx}: truncated index ({idx_len} bytes; header promises {n} sequences and "
                f"{doc_count} doc_idx entries = {expected} bytes)"
            )
        if idx_len > expected:
            raise CorpusFormatError(f"{idx}: {idx_len - expected} unexpected trailing bytes after doc_idx")
        if doc_count < 1:
            raise CorpusFormatError(f"{idx}: doc_idx is empty (it must hold at least [0])")

        self._idx_map = np.memmap(idx, dtype=np.uint8, mode="r")
        self.sizes = np.frombuffer(self._idx_map, dtype="<i4", count=n, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(self._idx_map, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
        self.doc_idx = np.frombuffer(self._idx_map, dtype="<i8", count=doc_count, offset=HEADER_SIZE + 12 * n)

        bin_len = binp.stat().st_size
        # np.memmap refuses empty files; an empty corpus is still a valid corpus.
        self._bin_map = np.memmap(binp, dtype=np.uint8, mode="r") if bin_len else np.zeros(0, np.uint8)
        self._check(bin_len)

    def _check(self, bin_len: int) -> None:
        idx, binp = self.idx_path, self.bin_path
        n = len(self.sizes)
        if self.doc_idx[0] != 0 or self.doc_idx[-1] != n:
            raise CorpusFormatError(
                f"{idx}: doc_idx must run from 0 to len={n}, got {int(self.doc_idx[0])}..{int(self.doc_idx[-1])}"
            )
        if len(self.doc_idx) > 1 and np.any(np.diff(self.doc_idx) < 0):
            raise CorpusFormatError(f"{idx}: doc_idx is not non-decreasing")
        itemsize = self.dtype.itemsize
        if bin_len % itemsize:
            raise CorpusFormatError(
                f"{binp}: length {bin_len} is not a multiple of the {self.dtype} item size"
            )
        if n and int(self.sizes.min()) < 0:
            raise CorpusFormatError(f"{idx}: negative sequence size at {int(np.argmin(self.sizes))}")
        total = int(self.sizes.sum(dtype=np.int64)) * itemsize
        if total != bin_len:
            raise CorpusFormatError(
                f"{binp}: length {bin_len} bytes disagrees with {idx} (sizes sum to {total} bytes of {self.dtype})"
            )
        if self._verify and n:
            offset = 0
            for lo, hi in _chunks(n):
                expect = np.empty(hi - lo, dtype=np.int64)
                expect[0] = offset
                nbytes = self.sizes[lo:hi].astype(np.int64) * itemsize
                np.cumsum(nbytes[:-1], out=expect[1:])
                expect[1:] += offset
                bad = np.flatnonzero(self.pointers[lo:hi] != expect)
                if bad.size:
                    i = lo + int(bad[0])
                    raise CorpusFormatError(
                        f"{idx}: pointer of sequence {i} is {int(self.pointers[i])}, expected "
                        f"{int(expect[bad[0]])} from the sizes before it"
                    )
                offset += int(nbytes.sum())

    @property
    def files(self) -> tuple[Path, Path]:
        """(index file, token file)."""
        return self.idx_path, self.bin_path

    @property
    def tokens(self) -> np.ndarray:
        """All token ids, memory-mapped (read-only)."""
        return np.frombuffer(self._bin_map, dtype=self.dtype.newbyteorder("<"))

    @property
    def n_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def _view(self, i: int, offset: int, length: int) -> np.ndarray:
        start = int(self.pointers[i]) + offset * self.dtype.itemsize  # .idx pointers are in bytes
        return np.frombuffer(self._bin_map, dtype=self.dtype.newbyteorder("<"), count=length, offset=start)


class NpyCorpus(_Reader):
    """The older corpus: ``<prefix>_ids.npy`` (all token ids, one 1-D array) and
    ``<prefix>_idx.npz`` (``lens`` tokens per sequence, ``docs`` the doc index; ``sents`` is
    written by the old tool but never read). PaddleNLP's ``CompatibleIndexedDataset``.

    Same interface as ``MMapCorpus``: the token array stays memory-mapped (read-only views);
    only ``lens`` (4 bytes a sequence) and its cumulative sum are in RAM, as in PaddleNLP.
    ``lens`` must be int32: PaddleNLP's index build asserts it, so anything else would fail
    later inside every rank.
    """

    def __init__(self, prefix: str | os.PathLike[str], *, verify_pointers: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        self._verify = verify_pointers  # kept for pickling symmetry; pointers are derived here
        self.ids_path, self.npz_path = Path(self.prefix + "_ids.npy"), Path(self.prefix + "_idx.npz")
        for path in (self.npz_path, self.ids_path):
            if not path.is_file():
                raise CorpusFormatError(
                    f"{path}: missing (an old-format corpus needs both {self.prefix}_ids.npy and _idx.npz)"
                )
        self._open()

    @property
    def files(self) -> tuple[Path, Path]:
        """(index file, token file)."""
        return self.npz_path, self.ids_path

    def _open(self) -> None:
        ids_path, npz = self.ids_path, self.npz_path
        try:
            ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "mmap length" in str(exc) or "cannot mmap an empty" in str(exc):
                try:  # an empty array cannot be mapped; anything else that fails to map is cut short
                    ids = np.load(ids_path, allow_pickle=False)
                except Exception:
                    raise CorpusFormatError(f"{ids_path}: truncated .npy (shorter than its header says)") from None
            else:
                raise CorpusFormatError(f"{ids_path}: not a NumPy .npy token array ({exc})") from None
        except (OSError, EOFError) as exc:
            raise CorpusFormatError(f"{ids_path}: not a NumPy .npy token array ({exc})") from None
        if ids.ndim != 1:
            raise CorpusFormatError(f"{ids_path}: token array has shape {ids.shape}, expected 1-D")
        if ids.dtype.kind not in "iu":
            raise CorpusFormatError(f"{ids_path}: token dtype {ids.dtype} is not an integer type")
        try:
            with np.load(npz, allow_pickle=False) as z:
                missing = [k for k in ("lens", "docs") if k not in z.files]
                if missing:
                    raise CorpusFormatError(f"{npz}: lacks {missing} (has {sorted(z.files)})")
                lens, docs = z["lens"], z["docs"]
        except CorpusFormatError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError: all "corrupt"
            raise CorpusFormatError(f"{npz}: not a readable .npz index ({type(exc).__name__}: {exc})") from None
        if lens.ndim != 1 or lens.dtype != np.int32:
            raise CorpusFormatError(
                f"{npz}: 'lens' must be a 1-D int32 array (PaddleNLP asserts int32), got {lens.dtype} {lens.shape}"
            )
        if docs.ndim != 1 or docs.dtype.kind not in "iu" or docs.size < 1:
            raise CorpusFormatError(f"{npz}: 'docs' must be a non-empty 1-D integer array, got {docs.dtype} {docs.shape}")
        n = len(lens)
        if int(docs[0]) != 0 or int(docs[-1]) != n:
            raise CorpusFormatError(f"{npz}: docs must run from 0 to len(lens)={n}, got {int(docs[0])}..{int(docs[-1])}")
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            raise CorpusFormatError(f"{npz}: docs is not non-decreasing")
        if n and int(lens.min()) < 0:
            raise CorpusFormatError(f"{npz}: negative sequence length at {int(np.argmin(lens))}")
        self.sizes = lens
        self.doc_idx = docs.astype(np.int64, copy=False)
        self.pointers = np.zeros(n + 1, dtype=np.int64)  # in tokens, as PaddleNLP derives them
        np.cumsum(lens, out=self.pointers[1:])
        total = int(self.pointers[-1])
        if total != len(ids):
            raise CorpusFormatError(
                f"{ids_path}: holds {len(ids)} tokens but {npz} 'lens' sum to {total}"
            )
        self._ids = ids
        self.dtype = ids.dtype

    @property
    def n_tokens(self) -> int:
        return int(self.pointers[-1])

    @property
    def tokens(self) -> np.ndarray:
        """All token ids, memory-mapped."""
        return self._ids

    def _view(self, i: int, offset: int, length: int) -> np.ndarray:
        start = int(self.pointers[i]) + offset  # pointers in tokens, as PaddleNLP derives them
        return self._ids[start : start + length]


Corpus = MMapCorpus | NpyCorpus


def open_corpus(prefix: str | os.PathLike[str], *, verify_pointers: bool = True) -> Corpus:
    """The corpus at ``prefix`` with PaddleNLP's precedence (``indexed_dataset.make_dataset``):
    the old ``_ids.npy`` + ``_idx.npz`` pair wins whenever both are files, even next to a
    ``.bin``/``.idx`` pair; otherwise ``.bin``/``.idx``. Errors name the missing file."""
    p = os.fspath(prefix)
    old = [Path(p + "_ids.npy"), Path(p + "_idx.npz")]
    new = [Path(p + ".bin"), Path(p + ".idx")]
    if all(f.is_file() for f in old):
        return NpyCorpus(p, verify_pointers=verify_pointers)
    if any(f.exists() for f in new) or not any(f.exists() for f in old):
        if not any(f.exists() for f in new):
            raise CorpusFormatError(
                f"{p}: no corpus (expected {p}.bin + {p}.idx, or {p}_ids.npy + {p}_idx.npz)"
            )
        return MMapCorpus(p, verify_pointers=verify_pointers)
    return NpyCorpus(p, verify_pointers=verify_pointers)  # names whichever old file is missing


def write_npy_corpus(
    prefix: str | os.PathLike[str], documents: Sequence[Sequence[int] | np.ndarray], dtype: npt.DTypeLike = np.uint16
) -> None:
    """Write the older format as its tool did (``np.save`` ids, ``np.savez`` lens/sents/docs,
    one sequence per document). For tests and conversions; it holds the corpus in RAM."""
    p = os.fspath(prefix)
    arrays = [np.asarray(d, dtype=dtype).reshape(-1) for d in documents]
    lens = np.array([len(a) for a in arrays], dtype=np.int32)
    sents = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=sents[1:])
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    np.save(p + "_ids.npy", ids.astype(dtype, copy=False))
    np.savez(p + "_idx.npz", lens=lens, sents=sents, docs=np.arange(len(lens) + 1, dtype=np.int64))
