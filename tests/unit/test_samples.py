"""Sample plan: bit-identical to the installed PaddleNLP (causal_dataset, blendable_dataset,
fast_dataindex), caches shared both ways, and the rank/resume arithmetic of its sampler.

The reference runs in-process in a single non-distributed process (world size 1, so no
barriers; ``PADDLE_RANK_IN_NODE`` 0, so it builds instead of waiting for another rank), always
with a fresh ``data_cache_path`` and never next to an existing ``index-cache`` directory.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bi150_ray.data import kernels, samples
from bi150_ray.data.mmap_format import MMapCorpus, MMapWriter, open_corpus, write_npy_corpus
from bi150_ray.data.samples import (
    BlendPlan,
    GPTPlan,
    blend_indices,
    blend_targets,
    build_indices,
    build_plan,
    build_sample_idx,
    cache_description,
    cache_paths,
    check_data_split,
    check_resume,
    consumed_samples,
    epochs_needed,
    eval_consumed_samples,
    get_sample,
    load_cache,
    rank_batches,
    save_cache,
    split_ranges,
    target_samples,
)

ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


@pytest.fixture(scope="module")
def pd() -> Iterator[SimpleNamespace]:
    """The installed PaddleNLP data modules, set up to build in this process."""
    pytest.importorskip("paddle")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ID", "PADDLE_RANK_IN_NODE"):
            mp.delenv(var, raising=False)
        from paddlenlp.data import blendable_dataset, causal_dataset
        from paddlenlp.utils.batch_sampler import DistributedBatchSampler

        # Read once at import: a non-zero value would make PaddleNLP wait for another rank.
        mp.setattr(causal_dataset, "local_rank", 0)
        mp.setattr(blendable_dataset, "local_rank", 0)
        yield SimpleNamespace(cd=causal_dataset, sampler=DistributedBatchSampler)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _corpus(path: Path, lengths: np.ndarray, seed: int = 0) -> str:
    rng = np.random.RandomState(seed)
    path.mkdir(parents=True, exist_ok=True)
    prefix = str(path / "corpus")
    with MMapWriter(prefix, np.uint16) as w:
        for n in lengths:
            w.add_document(rng.randint(0, 32000, size=int(n)).astype(np.uint16))
    return prefix


def _assert_same(ours: tuple[np.ndarray, ...], theirs: tuple[np.ndarray, ...]) -> None:
    for name, a, b in zip(ARRAYS, ours, theirs, strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert np.array_equal(a, b), name


def _assert_same_blend(o, t, n: int, corpora, rng, probes: int) -> None:
    """Our BlendPlan equals PaddleNLP's BlendableDataset: indices, dtypes, per-dataset plans, samples."""
    assert isinstance(o, BlendPlan) and len(o) == len(t) == n
    assert o.dataset_index.dtype == t.dataset_index.dtype == np.int16
    assert np.array_equal(o.dataset_index, t.dataset_index)
    assert o.dataset_sample_index.dtype == t.dataset_sample_index.dtype == np.int64
    assert np.array_equal(o.dataset_sample_index, t.dataset_sample_index)
    assert o.desc == t.desc
    for oc, tc in zip(o.datasets, t.datasets, strict=True):
        _assert_same(tuple(getattr(oc, k) for k in ARRAYS), tuple(getattr(tc, k) for k in ARRAYS))
    for i in sorted({0, n - 1, *rng.randint(0, n, size=probes).tolist()}):
        d, tokens = o.sample(corpora, i)
        item = t[i]
        assert d == item["dataset_idx"] and np.array_equal(tokens, item["text"]), i


def _paddle_indices(pd, tmp: Path, sizes, documents, seq_length, num_samples, seed, split="949,50,1"):
    cache = tmp / "paddle-cache"
    prefix = str(tmp / "nowhere" / "corpus")  # its index-cache never exists
    out = _quiet(
        pd.cd._build_index_mappings,
        "train",
        prefix,
        documents,
        sizes,
        split,
        num_samples,
        seq_length,
        seed,
        False,
        data_cache_path=str(cache),
    )
    return tuple(np.load(p, allow_pickle=True) for p in out[:3]), out, prefix, cache


# --------------------------------------------------------------------------------------------
# Splits and targets
# --------------------------------------------------------------------------------------------

SPLIT_STRINGS = ["949,50,1", "1/1/1", "100", "0.5,0.5", "1,0,0", "98,2", "3,3,3,3", "7,2,1", "1,1", "0,1,0"]


@pytest.mark.parametrize("split", SPLIT_STRINGS)
def test_split_ranges_match_paddlenlp(pd, split: str) -> None:
    for n in [0, 1, 2, 3, 5, 10, 17, 100, 999, 1000, 1001, 123457]:
        assert split_ranges(split, n) == pd.cd.get_train_valid_test_split_(split, n), n
    for flags in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        try:
            pd.cd.check_data_split(split, *flags)
        except ValueError:
            with pytest.raises(ValueError):
                check_data_split(split, *flags)
        else:
            check_data_split(split, *flags)


def test_target_samples() -> None:
    # The FORK Iluvatar job (spec 4.3): B=2, R=8, 5000 steps, G=128, eval 256 x 1 every 5000 steps.
    assert target_samples(2, 256, 8, 5000, 128, 5000, 1, 1) == [10_240_000, 4096, 2048]
    # eval_steps unset falls back to logging_steps (500): 5000 // 500 + 1 = 11 evaluations.
    assert target_samples(2, 2, 8, 5000, 128, None, 10, 100) == [10_240_000, 2 * 8 * 10 * 11, 2 * 8 * 100]
    assert target_samples(1, 1, 1, 10, 1, 0, 1, 1, logging_steps=3) == [10, 4, 1]
    with pytest.raises(ValueError):
        target_samples(1, 1, 1, -1, 1, 10, 1, 1)
    with pytest.raises(ValueError):
        target_samples(1, 1, 1, 10, 1, None, 1, 1, logging_steps=0)


# --------------------------------------------------------------------------------------------
# Index mappings
# --------------------------------------------------------------------------------------------


def _sizes(kind: str, n: int, rng: np.random.RandomState) -> np.ndarray:
    if kind == "tiny":  # 1-3 tokens
        return rng.randint(1, 4, size=n).astype(np.int32)
    if kind == "empty":  # with empty sequences, which the walk must step over
        return rng.choice([0, 0, 1, 5, 40], size=n).astype(np.int32)
    if kind == "long":  # mostly longer than seq_length
        return rng.randint(50, 400, size=n).astype(np.int32)
    return rng.randint(1, 120, size=n).astype(np.int32)


@pytest.fixture(params=["compiled", "numpy"])
def builder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each plan test twice: with the C kernels (the dev install builds them) and NumPy-only, the
    build a node without a C compiler runs."""
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "COMPILED", False)
    else:
        assert kernels.COMPILED, "bi150_ray.data._kernels was not built: reinstall with a C compiler present"
    return request.param


# (sizes kind, n docs, documents [lo, hi), seq_length, num_samples, seed, expected separate_last_epoch)
CASES = [
    ("mixed", 100, (0, 100), 10, 5, 1, False),  # one epoch
    ("mixed", 100, (0, 100), 64, 1000, 2, None),  # many epochs
    ("tiny", 300, (0, 300), 8, 200, 3, None),
    ("tiny", 50, (10, 40), 1, 100, 4, None),  # seq_length 1
    ("empty", 200, (0, 200), 16, 300, 5, None),
    ("empty", 200, (150, 200), 7, 77, 6, None),
    ("long", 40, (0, 40), 32, 900, 7, None),
    ("mixed", 60, (0, 60), 1000, 30, 8, None),  # seq_length larger than every document
    ("mixed", 60, (20, 21), 5, 40, 9, None),  # a single document
    ("mixed", 100, (0, 100), 12, 0, 10, False),  # zero samples asked
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-L{c[3]}-n{c[4]}" for c in CASES])
def test_build_indices_match_paddlenlp(pd, builder, tmp_path: Path, case) -> None:
    kind, n, (lo, hi), seq_length, num_samples, seed, _ = case
    sizes = _sizes(kind, n, np.random.RandomState(seed))
    sizes[lo] = max(int(sizes[lo]), 2)  # at least 2 tokens in the split
    documents = np.arange(lo, hi, dtype=np.int32)
    theirs, out, prefix, cache = _paddle_indices(
        pd, tmp_path, sizes, documents, seq_length, num_samples, seed
    )
    _assert_same(build_indices(sizes, documents, seq_length, num_samples, seed), theirs)
    _assert_same(build_indices(sizes, range(lo, hi), seq_length, num_samples, seed), theirs)
    tpe = int(sizes[lo:hi].sum())
    assert (
        epochs_needed(tpe, seq_length, num_samples)
        == out[5]
        == pd.cd._num_epochs(tpe, seq_length, num_samples)
    )
    # the cache names and .dsc text PaddleNLP used
    paths = cache_paths(cache, prefix, "train", num_samples, seq_length, seed, "949,50,1")
    assert [paths["doc"], paths["sample"], paths["shuffle"]] == list(out[:3])
    assert (
        Path(paths["desc"]).read_text()
        == out[3]
        == cache_description(prefix, "train", num_samples, seq_length, seed, "949,50,1")
    )


def test_both_separate_last_epoch_branches_match(pd, builder, tmp_path: Path) -> None:
    # tokens_per_epoch 1000, seq_length 10: 99 samples per epoch, 199 in the first two of 3 epochs;
    # the last epoch separates below int(0.8 * 99) = 79 samples: 11 and 78 do, 79 and 81 do not.
    sizes = np.full(100, 10, dtype=np.int32)
    docs = np.arange(100, dtype=np.int32)
    for num_samples, separate in [(210, True), (277, True), (278, False), (280, False)]:
        assert samples._epoch_layout(1000, 10, num_samples)[:2] == (3, separate)
        theirs, *_ = _paddle_indices(pd, tmp_path / str(num_samples), sizes, docs, 10, num_samples, 11)
        _assert_same(build_indices(sizes, docs, 10, num_samples, 11), theirs)
        if separate:  # the last epoch's documents were shuffled on their own
            assert sorted(theirs[0][200:].tolist()) == list(range(100))


@pytest.mark.parametrize("separate", [True, False])
def test_threaded_build_matches(pd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, separate: bool) -> None:
    """The NumPy-only build's two-thread tail (front/back halves of sample_idx) on the same cases."""
    monkeypatch.setattr(kernels, "COMPILED", False)
    monkeypatch.setattr(samples, "_THREAD_MIN", 0)
    monkeypatch.setattr(samples, "_DOC_CHUNK", 7)  # many chunks, both directions
    rng = np.random.RandomState(3)
    sizes = rng.randint(0, 30, size=500).astype(np.int32)
    docs = np.arange(500, dtype=np.int32)
    tpe, seq_length = int(sizes.sum()), 9
    per_epoch = (tpe - 1) // seq_length
    num_samples = 3 * per_epoch + (5 if separate else per_epoch - 2)
    assert samples._epoch_layout(tpe, seq_length, num_samples)[1] is separate
    theirs, *_ = _paddle_indices(pd, tmp_path, sizes, docs, seq_length, num_samples, 123)
    _assert_same(build_indices(sizes, docs, seq_length, num_samples, 123), theirs)


def test_build_sample_idx_matches_the_cxx_helper(pd, builder) -> None:
    helpers = pytest.importorskip("fast_dataindex.helpers")
    rng = np.random.RandomState(0)
    for trial in range(40):
        sizes = rng.randint(0 if trial % 3 else 1, rng.choice([3, 50, 900]), size=rng.randint(1, 300)).astype(
            np.int32
        )
        sizes[0] += 2
        epochs = int(rng.randint(1, 5))
        doc_idx = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        seq_length = int(rng.choice([2, 3, 16, 64, 100, 2048]))
        tpe = int(sizes.sum())
        theirs = _quiet(helpers.build_sample_idx, sizes, doc_idx, seq_length, epochs, tpe)
        ours = build_sample_idx(sizes, doc_idx, seq_length, epochs, tpe)
        assert ours.dtype == theirs.dtype == np.int32
        assert np.array_equal(ours, theirs), trial
    with pytest.raises(ValueError, match="tokens"):
        build_sample_idx(np.array([5, 5], np.int32), np.array([0], np.int32), 2, 1, 10)


def test_bad_inputs() -> None:
    sizes = np.array([3, 0, 4], dtype=np.int32)
    with pytest.raises(ValueError, match="no tokens"):
        build_indices(sizes, [1], 2, 3, 0)  # PaddleNLP would loop forever
    with pytest.raises(ValueError):
        build_indices(sizes, [3], 2, 3, 0)
    with pytest.raises(ValueError):
        build_indices(sizes, [], 2, 3, 0)
    with pytest.raises(ValueError):
        build_indices(sizes, [0], 0, 3, 0)


# --------------------------------------------------------------------------------------------
# Whole plans against build_train_valid_test_datasets, reading samples, caches
# --------------------------------------------------------------------------------------------


def _paddle_datasets(pd, data_prefix, split, targets, seq_length, seed, cache: Path):
    return _quiet(
        pd.cd.build_train_valid_test_datasets,
        data_prefix,
        "mmap",
        split,
        targets,
        seq_length,
        seed,
        True,
        data_cache_path=str(cache),
    )


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize(
    ("split", "targets", "seq_length", "seed"),
    [("949,50,1", [500, 40, 20], 64, 1234), ("8,1,1", [60, 30, 10], 300, 7), ("1,1,0", [5000, 3, 0], 16, 42)],
)
def test_plan_and_samples_match_paddlenlp(pd, builder, tmp_path: Path, split, targets, seq_length, seed) -> None:
    rng = np.random.RandomState(seed)
    lengths = np.concatenate([rng.randint(1, 4, size=100), rng.randint(1, 500, size=400)])
    rng.shuffle(lengths)
    prefix = _corpus(tmp_path / "data", lengths, seed)
    theirs = _paddle_datasets(pd, [prefix], split, targets, seq_length, seed, tmp_path / "theirs")
    ours = build_plan([prefix], split, targets, seq_length, seed, data_cache_path=tmp_path / "ours")
    corpus = MMapCorpus(prefix)
    for t, o in zip(theirs, ours, strict=True):
        assert (t is None) == (o is None)
        if t is None:
            continue
        assert isinstance(o, GPTPlan)
        _assert_same(tuple(getattr(o, k) for k in ARRAYS), tuple(getattr(t, k) for k in ARRAYS))
        assert o.desc == t.desc and len(o) == len(t)
        for i in sorted({0, len(t) - 1, *rng.randint(0, len(t), size=60).tolist()}):
            got = get_sample(corpus, o.doc_idx, o.sample_idx, o.shuffle_idx, i)
            want = t[i]["text"]
            assert got.dtype == want.dtype == np.int64 and len(got) == seq_length + 1
            assert np.array_equal(got, want), i
    # same cache file names, .dsc text and .npy bytes
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")


def test_blend_matches_paddlenlp(pd, tmp_path: Path) -> None:
    rng = np.random.RandomState(5)
    a = _corpus(tmp_path / "a", rng.randint(1, 300, size=300), 1)
    b = _corpus(tmp_path / "b", rng.randint(1, 40, size=200), 2)
    data_prefix = ["0.3", a, "0.7", " " + b + " "]  # PaddleNLP strips blend prefixes
    targets, seq_length, seed = [700, 50, 13], 32, 9
    theirs = _paddle_datasets(pd, data_prefix, "90,7,3", targets, seq_length, seed, tmp_path / "theirs")
    ours = build_plan(data_prefix, "90,7,3", targets, seq_length, seed, data_cache_path=tmp_path / "ours")
    corpora = [MMapCorpus(a), MMapCorpus(b)]
    for t, o, n in zip(theirs, ours, targets, strict=True):
        _assert_same_blend(o, t, n, corpora, rng, probes=40)
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    # and we load PaddleNLP's blend cache (memory-mapped, as it does) instead of rebuilding
    again = build_plan(data_prefix, "90,7,3", targets, seq_length, seed, data_cache_path=tmp_path / "theirs")
    for t, o in zip(theirs, again, strict=True):
        assert isinstance(o.dataset_index, np.memmap) and isinstance(o.datasets[0].doc_idx, np.memmap)
        assert np.array_equal(o.dataset_index, t.dataset_index)
        assert np.array_equal(o.dataset_sample_index, t.dataset_sample_index)
    # the per-dataset targets of the installed version: ceil(n * w * 1.005) + 20
    assert blend_targets(data_prefix, targets) == pd.cd.get_datasets_weights_and_num_samples(
        data_prefix, targets
    )
    assert blend_targets(data_prefix, targets)[2][1] == [int(np.ceil(v * 0.7 * 1.005)) + 20 for v in targets]


def _old_corpus(path: Path, lengths: np.ndarray, seed: int = 0) -> str:
    rng = np.random.RandomState(seed)
    path.mkdir(parents=True, exist_ok=True)
    prefix = str(path / "corpus")
    write_npy_corpus(prefix, [rng.randint(0, 32000, size=int(n)) for n in lengths], np.uint16)
    return prefix


def test_old_format_plan_and_blend_of_both_formats_match_paddlenlp(pd, tmp_path: Path) -> None:
    """A blend of an old ``_ids.npy``/``_idx.npz`` corpus with a ``.bin``/``.idx`` one, and a
    prefix holding both formats (the old one must win), against build_train_valid_test_datasets."""
    rng = np.random.RandomState(11)
    old = _old_corpus(tmp_path / "old", rng.randint(1, 200, size=250), 3)
    new = _corpus(tmp_path / "new", rng.randint(1, 60, size=300), 4)
    both = _old_corpus(tmp_path / "both", rng.randint(1, 90, size=120), 5)
    _corpus(tmp_path / "both", rng.randint(1, 90, size=77), 6)  # same prefix, .bin/.idx: must lose
    data_prefix = ["2", old, "1", new, "0.5", both]
    targets, seq_length, seed = [600, 40, 9], 48, 17
    theirs = _paddle_datasets(pd, data_prefix, "90,7,3", targets, seq_length, seed, tmp_path / "theirs")
    ours = build_plan(data_prefix, "90,7,3", targets, seq_length, seed, data_cache_path=tmp_path / "ours")
    corpora = [open_corpus(old), open_corpus(new), open_corpus(both)]
    assert [type(c).__name__ for c in corpora] == ["NpyCorpus", "MMapCorpus", "NpyCorpus"]
    for t, o, n in zip(theirs, ours, targets, strict=True):
        _assert_same_blend(o, t, n, corpora, rng, probes=60)
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")

    # a single old-format prefix, several epochs
    single = _paddle_datasets(pd, [old], "8,1,1", [3000, 50, 20], 64, 5, tmp_path / "theirs1")
    mine = build_plan([old], "8,1,1", [3000, 50, 20], 64, 5, data_cache_path=tmp_path / "ours1")
    assert mine[0].num_epochs > 1
    for t, o in zip(single, mine, strict=True):
        _assert_same(tuple(getattr(o, k) for k in ARRAYS), tuple(getattr(t, k) for k in ARRAYS))
        for i in (0, len(t) // 2, len(t) - 1):
            assert np.array_equal(o.sample(corpora[0], i), t[i]["text"])


def test_caches_are_shared_both_ways(pd, tmp_path: Path) -> None:
    """Each side reads the other's files. A doctored shuffle_idx proves the file was read."""
    prefix = _corpus(tmp_path / "data", np.random.RandomState(0).randint(1, 200, size=200))
    key = (prefix, "train", 300, 20, 3, "949,50,1")
    plan = build_plan([prefix], "949,50,1", [300, 10, 5], 20, 3, cache=False)[0]
    assert sorted(p.name for p in Path(prefix).parent.iterdir()) == [
        "corpus.bin",
        "corpus.idx",
    ]  # wrote nothing
    marked = plan.shuffle_idx[::-1].copy()

    # ours -> PaddleNLP: written into <dirname(prefix)>/index-cache, the first place it looks
    index_cache = Path(prefix).parent / "index-cache"
    save_cache(index_cache, *key, plan.doc_idx, plan.sample_idx, marked)
    theirs = _paddle_datasets(pd, [prefix], "949,50,1", [300, 10, 5], 20, 3, tmp_path / "unused")[0]
    assert np.array_equal(theirs.shuffle_idx, marked) and theirs.shuffle_idx.dtype == marked.dtype
    assert not Path(cache_paths(tmp_path / "unused", *key)["doc"]).exists()  # it built nothing for train
    for p in index_cache.iterdir():
        p.unlink()
    index_cache.rmdir()

    # PaddleNLP -> ours: it builds into data_cache_path; we find and load its files
    _paddle_datasets(pd, [prefix], "949,50,1", [300, 10, 5], 20, 3, tmp_path / "theirs")
    shuffle_path = cache_paths(tmp_path / "theirs", *key)["shuffle"]
    np.save(shuffle_path, np.load(shuffle_path)[::-1].copy(), allow_pickle=True)
    again = build_plan([prefix], "949,50,1", [300, 10, 5], 20, 3, data_cache_path=tmp_path / "theirs")[0]
    assert np.array_equal(again.shuffle_idx, marked)
    loaded = load_cache(tmp_path / "theirs", *key)
    assert loaded is not None and np.array_equal(loaded[2], marked)
    assert load_cache(tmp_path / "nothing-here", *key) is None
    # writing leaves no temporaries behind
    assert not [p for p in (tmp_path / "theirs").iterdir() if p.name.startswith(".")]


def test_blend_indices_match_the_cxx_helper(pd) -> None:
    helpers = pytest.importorskip("fast_dataindex.helpers")
    rng = np.random.RandomState(0)
    weights = [
        [1.0],
        [0.5, 0.5],
        [0.2, 0.8],
        [1 / 3] * 3,
        [1e-7, 1.0],
        rng.rand(4),
        rng.rand(9),
        rng.rand(40),
        [3, 3, 3, 1],
    ]
    for w in weights:
        w = samples.blend_weights(w)
        for size in [0, 1, 2, 3, 255, 256, 257, 5000, 70001]:
            theirs = (np.zeros(size, np.int16), np.zeros(size, np.int64))
            helpers.build_blending_indices(theirs[0], theirs[1], w, len(w), size, False)
            ours = blend_indices(w, size)
            assert ours[0].dtype == np.int16 and ours[1].dtype == np.int64
            assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1]), (w, size)
    assert blend_indices([0.5, 0.5], 4, index_dtype=np.uint8)[0].dtype == np.uint8


# --------------------------------------------------------------------------------------------
# Which rank reads what; resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world", "batch", "consumed", "length", "drop_last"),
    [
        (1, 4, 0, 37, False),
        (4, 2, 0, 50, False),
        (4, 2, 8, 50, True),
        (3, 5, 30, 100, False),
        (8, 2, 16, 35, False),
    ],
)
def test_rank_batches_follow_the_sampler(pd, world, batch, consumed, length, drop_last) -> None:
    dataset = list(range(length))
    for rank in range(world):
        sampler = pd.sampler(
            dataset,
            batch,
            num_replicas=world,
            rank=rank,
            shuffle=False,
            drop_last=drop_last,
            consumed_samples=consumed,
        )
        expected = list(sampler)
        for k in range(len(expected) + 2):
            got = rank_batches(
                rank, world, batch, k, consumed=consumed, dataset_len=length, drop_last=drop_last
            )
            assert [g.tolist() for g in got] == expected[k : k + 1], (rank, k)
        # G micro-batches per optimizer step
        got = rank_batches(
            rank,
            world,
            batch,
            1,
            gradient_accumulation_steps=2,
            consumed=consumed,
            dataset_len=length,
            drop_last=drop_last,
        )
        assert [g.tolist() for g in got] == expected[2:4]
    # without a length: the plain block formula
    assert rank_batches(3, 8, 2, 5).pop().tolist() == [5 * 16 + 6, 5 * 16 + 7]
    with pytest.raises(ValueError):
        rank_batches(8, 8, 2, 0)
    with pytest.raises(ValueError):
        rank_batches(0, 8, 2, 0, consumed=4)


def test_consumed_samples_and_resume_checks() -> None:
    assert consumed_samples(100, 2, 128, 8) == 204_800
    assert eval_consumed_samples(5000, 5000, 1, 256, 8) == 2048
    prev = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 128,
        "dataset_world_size": 8,
        "global_step": 100,
        "seq_length": 2048,
        "seed": 42,
    }
    assert check_resume(prev, dict(prev)) == 204_800
    # twice the global batch: would skip 100 * 2048 samples
    with pytest.raises(ValueError, match=r"skip 204800 samples"):
        check_resume(prev, {**prev, "gradient_accumulation_steps": 256})
    with pytest.raises(ValueError, match=r"repeat 102400 samples"):
        check_resume(prev, {**prev, "per_device_train_batch_size": 1})
    # same global batch, other data-parallel world
    with pytest.raises(ValueError, match="data-parallel world changed from 8 to 4"):
        check_resume(prev, {**prev, "dataset_world_size": 4, "gradient_accumulation_steps": 256})
    with pytest.raises(ValueError, match="seed changed"):
        check_resume(prev, {**prev, "seed": 1})
    assert check_resume(prev, {**prev, "per_device_train_batch_size": 1}, allow_change=True) == 102_400
    assert (
        check_resume(
            {**prev, "global_step": 0}, {**prev, "global_step": 0, "gradient_accumulation_steps": 64}
        )
        == 0
    )
    with pytest.raises(ValueError, match="lacks"):
        check_resume({"global_step": 1}, prev)
