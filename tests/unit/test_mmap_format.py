"""MMIDIDX .bin/.idx: our writer/reader, byte compatibility with PaddleNLP, corruption handling."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from bi150_ray.data import mmap_format
from bi150_ray.data.mmap_format import (
    DTYPE_CODES,
    HEADER_SIZE,
    CorpusFormatError,
    MMapCorpus,
    MMapWriter,
    NpyCorpus,
    best_dtype,
    dtype_code,
    open_corpus,
    write_npy_corpus,
)


def _docs(dtype: np.dtype, n: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    lengths = rng.randint(0, 50, size=n)
    lengths[:2] = [1, 0]  # a one-token and an empty sequence are legal
    if dtype.kind == "f":
        return [(rng.standard_normal(k) * 1e3).astype(dtype) for k in lengths]
    info = np.iinfo(dtype)
    docs = [rng.randint(info.min, info.max, size=k, dtype=dtype) for k in lengths]
    return [*docs, np.array([info.min, info.max], dtype=dtype)]  # the extremes survive too


def _write(prefix: Path, docs: list[np.ndarray], dtype: np.dtype) -> None:
    with MMapWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()
    }


def _paddle_tokens(ds, i: int) -> np.ndarray:
    # PaddleNLP 3.x get() returns (tokens, loss_mask); 2.7 returned tokens only.
    out = ds.get(i)
    return out[0] if isinstance(out, tuple) else out


def test_round_trip(tmp_path: Path) -> None:
    docs = _docs(np.dtype(np.uint16))
    _write(tmp_path / "c", docs, np.dtype(np.uint16))
    c = MMapCorpus(tmp_path / "c")
    assert len(c) == c.n_docs == len(docs)
    assert c.dtype == np.uint16
    np.testing.assert_array_equal(c.sizes, [len(d) for d in docs])
    np.testing.assert_array_equal(c.doc_idx, np.arange(len(docs) + 1))
    np.testing.assert_array_equal(
        c.pointers, np.concatenate([[0], np.cumsum([2 * len(d) for d in docs])[:-1]])
    )
    assert c.n_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(c.get(i), d)
        np.testing.assert_array_equal(c[i], d)
        assert not c.get(i).flags.writeable
    big = int(np.argmax(c.sizes))
    np.testing.assert_array_equal(c.get(big, offset=3, length=5), docs[big][3:8])
    np.testing.assert_array_equal(c.get(big, offset=4), docs[big][4:])
    np.testing.assert_array_equal(c.get(-1), docs[-1])
    with pytest.raises(IndexError):
        c.get(len(docs))
    with pytest.raises(IndexError):
        c.get(big, offset=int(c.sizes[big]), length=1)
    # header as the spec lays it out
    raw = (tmp_path / "c.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<QBQQ", raw, 9) == (1, 8, len(docs), len(docs) + 1)
    assert HEADER_SIZE == 34


def test_pickles_as_prefix(tmp_path: Path) -> None:
    docs = _docs(np.dtype(np.int32))
    _write(tmp_path / "c", docs, np.dtype(np.int32))
    c = pickle.loads(pickle.dumps(MMapCorpus(tmp_path / "c")))
    np.testing.assert_array_equal(c.get(5), docs[5])


def test_index_is_written_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs(np.dtype(np.uint16), n=11)
    _write(tmp_path / "ref", docs, np.dtype(np.uint16))
    monkeypatch.setattr(mmap_format, "_CHUNK", 3)
    _write(tmp_path / "chunked", docs, np.dtype(np.uint16))
    assert (tmp_path / "chunked.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    MMapCorpus(tmp_path / "chunked")  # chunked validation agrees too


def test_dtype_table_and_best_dtype() -> None:
    pytest.importorskip("paddle")
    from paddlenlp.data import indexed_dataset

    assert {k: np.dtype(v) for k, v in indexed_dataset.dtypes.items()} == DTYPE_CODES
    assert [dtype_code(np.dtype(v)) for v in DTYPE_CODES.values()] == list(DTYPE_CODES)
    with pytest.raises(ValueError):
        dtype_code(np.float16)
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65534) == np.uint16
    assert best_dtype(65535) == np.int32
    assert best_dtype(128256) == np.int32


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_every_dtype_round_trips_and_paddlenlp_reads_it(tmp_path: Path, code: int) -> None:
    dtype = DTYPE_CODES[code]
    docs = _docs(dtype, seed=code)
    _write(tmp_path / "c", docs, dtype)
    assert (tmp_path / "c.idx").read_bytes()[17] == code
    ours = MMapCorpus(tmp_path / "c")
    assert ours.dtype == dtype
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours.get(i), d)

    pytest.importorskip("paddle")
    from paddlenlp.data.indexed_dataset import make_dataset

    theirs = make_dataset(str(tmp_path / "c"), "mmap", skip_warmup=True)
    assert type(theirs).__name__ == "MMapIndexedDataset"
    assert np.dtype(theirs._index.dtype) == dtype
    np.testing.assert_array_equal(theirs.sizes, ours.sizes)
    np.testing.assert_array_equal(theirs.doc_idx, ours.doc_idx)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(_paddle_tokens(theirs, i), d)
        np.testing.assert_array_equal(theirs[i], d)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_we_read_paddlenlp_builder_output(tmp_path: Path, dtype: type) -> None:
    pytest.importorskip("paddle")
    from paddlenlp.data.indexed_dataset import MMapIndexedDatasetBuilder

    docs = _docs(np.dtype(dtype))
    docs = [d for d in docs if len(d)]  # the PaddleNLP builder cannot average over empty items
    # Two sentences per document, as create_pretraining_data --split_sentences produces.
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "p.bin"), dtype=dtype)
    for a, b in zip(docs[::2], docs[1::2], strict=False):
        builder.add_item(a)
        builder.add_item(b)
        builder.end_document()
    builder.finalize(str(tmp_path / "p.idx"))
    before = _snapshot(tmp_path)

    c = MMapCorpus(tmp_path / "p")
    n_pairs = len(docs) // 2
    assert len(c) == 2 * n_pairs and c.n_docs == n_pairs
    np.testing.assert_array_equal(c.doc_idx, np.arange(0, 2 * n_pairs + 1, 2))
    for j in range(n_pairs):
        a, b = c.document(j)
        np.testing.assert_array_equal(a, docs[2 * j])
        np.testing.assert_array_equal(b, docs[2 * j + 1])
    assert _snapshot(tmp_path) == before

    # And what PaddleNLP wrote for one-sequence documents is byte-identical to ours.
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "q.bin"), dtype=dtype)
    for d in docs:
        builder.add_item(d)
        builder.end_document()
    builder.finalize(str(tmp_path / "q.idx"))
    _write(tmp_path / "r", docs, np.dtype(dtype))
    assert (tmp_path / "q.bin").read_bytes() == (tmp_path / "r.bin").read_bytes()
    assert (tmp_path / "q.idx").read_bytes() == (tmp_path / "r.idx").read_bytes()


def test_writer_leaves_nothing_on_error_and_keeps_old_corpus(tmp_path: Path) -> None:
    old = _docs(np.dtype(np.uint16), n=5)
    _write(tmp_path / "c", old, np.dtype(np.uint16))
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with MMapWriter(tmp_path / "c", np.uint16) as w:
            w.add_document([1, 2, 3])
            names = [p.name for p in tmp_path.iterdir()]
            partial = [n for n in names if n not in before]
            # run_pretrain would take any name containing ".idx" as a dataset
            assert partial and all(n.startswith(".") and ".idx" not in n for n in partial)
            raise RuntimeError("boom")
    assert _snapshot(tmp_path) == before

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(ValueError, match="do not fit"):
        with MMapWriter(fresh / "c", np.uint16) as w:
            w.add_document([1, 70000])
    assert list(fresh.iterdir()) == []


def test_writer_rejects_bad_documents(tmp_path: Path) -> None:
    w = MMapWriter(tmp_path / "c", np.uint16)
    with pytest.raises(ValueError, match="1-D"):
        w.add_document([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="do not fit"):
        w.add_document([-1])
    with pytest.raises(TypeError):
        w.add_document([1.5])
    w.add_document(np.array([3, 4], dtype=np.int64))
    w.close()
    np.testing.assert_array_equal(MMapCorpus(tmp_path / "c").get(0), [3, 4])
    with pytest.raises(RuntimeError):
        w.add_document([1])


def _idx_patch(offset: int, data: bytes):
    def patch(idx: bytearray, bin_: bytearray, n: int) -> None:
        idx[offset : offset + len(data)] = data

    return patch


def _sizes_off(i: int) -> int:
    return HEADER_SIZE + 4 * i


def _pointer_off(n: int, i: int) -> int:
    return HEADER_SIZE + 4 * n + 8 * i


def _doc_idx_off(n: int, i: int) -> int:
    return HEADER_SIZE + 12 * n + 8 * i


CORRUPTIONS = {
    "bad_magic": ("idx", "bad magic", lambda idx, b, n: idx.__setitem__(slice(0, 9), b"TNTIDX\x00\x00\x00")),
    "version": ("idx", "version 2", lambda idx, b, n: idx.__setitem__(slice(9, 17), struct.pack("<Q", 2))),
    "dtype_code_0": ("idx", "unknown dtype code 0", lambda idx, b, n: idx.__setitem__(17, 0)),
    "dtype_code_11": ("idx", "unknown dtype code 11", lambda idx, b, n: idx.__setitem__(17, 11)),
    "header_cut": ("idx", "truncated", lambda idx, b, n: idx.__delitem__(slice(20, None))),
    "idx_cut": ("idx", "truncated", lambda idx, b, n: idx.__delitem__(slice(-8, None))),
    "idx_trailing": ("idx", "trailing", lambda idx, b, n: idx.extend(b"\x00" * 8)),
    "len_too_big": (
        "idx",
        "truncated",
        lambda idx, b, n: idx.__setitem__(slice(18, 26), struct.pack("<Q", n + 1)),
    ),
    "bin_short": ("bin", "disagrees", lambda idx, b, n: b.__delitem__(slice(-2, None))),
    "bin_long": ("bin", "disagrees", lambda idx, b, n: b.extend(b"\x00\x00")),
    "bin_odd": ("bin", "not a multiple", lambda idx, b, n: b.extend(b"\x00")),
    "negative_size": (
        "idx",
        "negative",
        lambda idx, b, n: idx.__setitem__(slice(_sizes_off(3), _sizes_off(4)), struct.pack("<i", -1)),
    ),
    "size_swap": (  # sizes still sum to the .bin length, but pointers no longer match them
        "idx",
        "pointer of sequence",
        lambda idx, b, n: idx.__setitem__(
            slice(_sizes_off(2), _sizes_off(4)),
            idx[_sizes_off(3) : _sizes_off(4)] + idx[_sizes_off(2) : _sizes_off(3)],
        ),
    ),
    "pointer": (
        "idx",
        "pointer of sequence 5",
        lambda idx, b, n: idx.__setitem__(
            slice(_pointer_off(n, 5), _pointer_off(n, 6)), struct.pack("<q", 2)
        ),
    ),
    "doc_idx_start": (
        "idx",
        "doc_idx",
        lambda idx, b, n: idx.__setitem__(
            slice(_doc_idx_off(n, 0), _doc_idx_off(n, 1)), struct.pack("<q", 1)
        ),
    ),
    "doc_idx_end": (
        "idx",
        "doc_idx",
        lambda idx, b, n: idx.__setitem__(
            slice(_doc_idx_off(n, n), _doc_idx_off(n, n + 1)), struct.pack("<q", n - 1)
        ),
    ),
    "doc_idx_order": (
        "idx",
        "non-decreasing",
        lambda idx, b, n: idx.__setitem__(
            slice(_doc_idx_off(n, 1), _doc_idx_off(n, 2)), struct.pack("<q", n)
        ),
    ),
}


@pytest.fixture(scope="module")
def good_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    d = tmp_path_factory.mktemp("good")
    docs = [np.arange(3 + i, dtype=np.uint16) for i in range(10)]  # distinct non-zero sizes
    _write(d / "c", docs, np.dtype(np.uint16))
    return d / "c", len(docs)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_reported_with_file_name(
    good_corpus: tuple[Path, int], tmp_path: Path, case: str
) -> None:
    which, message, corrupt = CORRUPTIONS[case]
    src, n = good_corpus
    idx = bytearray(Path(f"{src}.idx").read_bytes())
    bin_ = bytearray(Path(f"{src}.bin").read_bytes())
    corrupt(idx, bin_, n)
    prefix = tmp_path / case
    Path(f"{prefix}.idx").write_bytes(bytes(idx))
    Path(f"{prefix}.bin").write_bytes(bytes(bin_))
    before = _snapshot(tmp_path)

    with pytest.raises(CorpusFormatError, match=message) as err:
        MMapCorpus(prefix)
    assert str(err.value).startswith(f"{prefix}.{which}:")
    assert isinstance(err.value, ValueError)
    assert _snapshot(tmp_path) == before


def test_missing_file_and_skipped_pointer_scan(good_corpus: tuple[Path, int], tmp_path: Path) -> None:
    src, n = good_corpus
    shutil.copy(f"{src}.idx", tmp_path / "c.idx")
    with pytest.raises(CorpusFormatError, match="missing") as err:
        MMapCorpus(tmp_path / "c")
    assert str(tmp_path / "c.bin") in str(err.value)

    idx = bytearray(Path(f"{src}.idx").read_bytes())
    CORRUPTIONS["pointer"][2](idx, bytearray(), n)
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    shutil.copy(f"{src}.bin", tmp_path / "c.bin")
    assert len(MMapCorpus(tmp_path / "c", verify_pointers=False)) == n


def test_reading_never_modifies_inputs(good_corpus: tuple[Path, int]) -> None:
    src, n = good_corpus
    before = _snapshot(src.parent)
    c = MMapCorpus(src)
    total = sum(int(c.get(i).sum()) for i in range(n))
    with pytest.raises(ValueError):  # views are read-only
        c.get(0)[0] = 7
    del c
    assert total > 0
    assert _snapshot(src.parent) == before
    assert not any(name.startswith(".") for name in os.listdir(src.parent))


# --------------------------------------------------------------------------------------------
# The older _ids.npy + _idx.npz format, and which format wins
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_old_format_reads_like_paddlenlps_compatible_dataset(tmp_path: Path, dtype: type) -> None:
    from paddlenlp.data.indexed_dataset import CompatibleIndexedDataset, make_dataset

    docs = _docs(np.dtype(dtype), n=30, seed=3)
    prefix = str(tmp_path / "old")
    write_npy_corpus(prefix, docs, dtype)
    ours = open_corpus(prefix)
    theirs = CompatibleIndexedDataset(prefix)
    assert isinstance(ours, NpyCorpus)
    assert isinstance(make_dataset(prefix, "mmap"), CompatibleIndexedDataset)
    assert ours.sizes.dtype == theirs.sizes.dtype == np.int32
    np.testing.assert_array_equal(ours.sizes, theirs.sizes)
    np.testing.assert_array_equal(ours.doc_idx, theirs.doc_idx)
    assert ours.n_tokens == sum(len(d) for d in docs) and ours.dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        got = ours.get(i)
        assert got.dtype == theirs.get(i)[0].dtype
        np.testing.assert_array_equal(got, theirs.get(i)[0])
        np.testing.assert_array_equal(got, d)
        if len(d) > 2:
            np.testing.assert_array_equal(ours.get(i, 1, len(d) - 2), theirs.get(i, offset=1, length=len(d) - 2)[0])
    assert pickle.loads(pickle.dumps(ours)).n_tokens == ours.n_tokens
    with pytest.raises(ValueError):  # read-only views of the memory map
        ours.get(2)[0] = 1


def test_old_format_wins_when_both_exist_as_in_paddlenlp(tmp_path: Path) -> None:
    from paddlenlp.data.indexed_dataset import make_dataset

    prefix = str(tmp_path / "both")
    _write(Path(prefix), [np.array([1, 2, 3], np.uint16)], np.dtype(np.uint16))
    write_npy_corpus(prefix, [[7, 8], [9]])
    assert type(make_dataset(prefix, "mmap")).__name__ == "CompatibleIndexedDataset"
    c = open_corpus(prefix)
    assert isinstance(c, NpyCorpus) and len(c) == 2
    os.remove(prefix + "_idx.npz")  # half an old pair: PaddleNLP falls back to .bin/.idx, so do we
    assert isinstance(open_corpus(prefix), MMapCorpus)
    os.remove(prefix + ".idx")
    os.remove(prefix + ".bin")
    with pytest.raises(CorpusFormatError, match="_idx.npz: missing"):
        open_corpus(prefix)
    os.remove(prefix + "_ids.npy")
    with pytest.raises(CorpusFormatError, match="no corpus"):
        open_corpus(prefix)


def _old_patch(kind: str):
    def patch(d: Path) -> None:
        ids, npz = d / "c_ids.npy", d / "c_idx.npz"
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        if kind == "ids_cut":
            ids.write_bytes(ids.read_bytes()[:-3])
        elif kind == "ids_not_npy":
            ids.write_bytes(b"garbage" * 20)
        elif kind == "ids_float":
            np.save(ids, np.load(ids).astype(np.float32))
        elif kind == "ids_2d":
            np.save(ids, np.load(ids).reshape(1, -1))
        elif kind == "npz_not_zip":
            npz.write_bytes(b"PK\x03\x04 not really")
        elif kind == "lens_int64":
            np.savez(npz, **{**arrays, "lens": arrays["lens"].astype(np.int64)})
        elif kind == "no_docs":
            np.savez(npz, lens=arrays["lens"])
        elif kind == "lens_sum":
            lens = arrays["lens"].copy()
            lens[0] += 1
            np.savez(npz, **{**arrays, "lens": lens})
        elif kind == "docs_end":
            np.savez(npz, **{**arrays, "docs": arrays["docs"][:-1]})

    return patch


OLD_CORRUPTIONS = {
    "ids_cut": ("_ids.npy", "truncated"),
    "ids_not_npy": ("_ids.npy", "not a NumPy .npy"),
    "ids_float": ("_ids.npy", "not an integer type"),
    "ids_2d": ("_ids.npy", "expected 1-D"),
    "npz_not_zip": ("_idx.npz", "not a readable .npz"),
    "lens_int64": ("_idx.npz", "int32"),
    "no_docs": ("_idx.npz", "lacks"),
    "lens_sum": ("_ids.npy", "sum to"),
    "docs_end": ("_idx.npz", "docs must run from 0"),
}


@pytest.mark.parametrize("case", sorted(OLD_CORRUPTIONS))
def test_old_format_corruption_is_reported_with_file_name(tmp_path: Path, case: str) -> None:
    suffix, message = OLD_CORRUPTIONS[case]
    write_npy_corpus(tmp_path / "c", [np.arange(3 + i) for i in range(6)])
    _old_patch(case)(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(CorpusFormatError, match=message) as err:
        open_corpus(tmp_path / "c")
    assert str(err.value).startswith(f"{tmp_path / 'c'}{suffix}:"), str(err.value)
    assert "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before
