"""The driver's data plan: the index-cache files it ships are the ones PaddleNLP would build."""

import io
import os

import numpy as np
import pytest

from bi150_ray.data import plan as data_plan
from bi150_ray.data import samples
from bi150_ray.demo_assets import build_demo_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("assets"))


def _paddlenlps_cache_equals(ours: dict, prefixes, targets, seq_length: int, seed: int, cache) -> dict:
    """Let PaddleNLP build and cache the same datasets in ``cache``; our shipped files must carry
    its md5 names (so PaddleNLP finds them) and equal its files."""
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets

    build_train_valid_test_datasets(
        data_prefix=prefixes, data_impl="mmap", splits_string="949,50,1", train_val_test_num_samples=targets,
        seq_length=seq_length, seed=seed, skip_warmup=True, data_cache_path=str(cache),
    )
    theirs = {f: (cache / f).read_bytes() for f in os.listdir(cache)}
    assert set(ours) == set(theirs)
    for name, data in ours.items():
        if name.endswith(".dsc"):
            assert data == theirs[name], name
        else:
            a, b = np.load(io.BytesIO(data)), np.load(io.BytesIO(theirs[name]))
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    return theirs


def test_shipped_cache_files_equal_paddlenlps_own(assets, tmp_path):
    args = {"input_dir": str(assets.data_dir), "max_steps": 30, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4, "eval_steps": 10, "max_seq_length": 128, "seed": 42}
    prefixes, targets, plans = data_plan.build(args, dataset_world_size=2, eval_iters=4, test_iters=1)
    assert targets == [4 * 2 * 30, 4 * 2 * 4 * (30 // 10 + 1), 4 * 2 * 1]
    _paddlenlps_cache_equals(data_plan.cache_files(plans), prefixes, targets, 128, 42, tmp_path / "paddle-cache")


def test_empty_input_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no corpus"):
        data_plan.build({"input_dir": str(tmp_path), "max_steps": 1}, 1, 1, 1)


def test_dump_first_rows_are_the_splits_first_samples(assets, tmp_path):
    args = {"input_dir": str(assets.data_dir), "max_steps": 5, "per_device_train_batch_size": 2,
            "eval_steps": 5, "max_seq_length": 64}
    prefixes, _, plans = data_plan.build(args, 1, 1, 1)
    paths = data_plan.dump_first(plans, prefixes, 3, str(tmp_path / "dump"))
    train = np.load(paths[0])
    assert train.shape == (3, 65) and train.dtype == np.int64
    from bi150_ray.data.mmap_format import MMapCorpus

    assert np.array_equal(train[1], plans[0].sample(MMapCorpus(prefixes[0]), 1))


def test_old_format_folder_and_blend_string_of_both_formats(tmp_path):
    from bi150_ray.data.mmap_format import MMapWriter, open_corpus, write_npy_corpus

    rng = np.random.RandomState(0)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    write_npy_corpus(tmp_path / "old" / "c", [rng.randint(0, 900, size=rng.randint(1, 80)) for _ in range(300)])
    with MMapWriter(tmp_path / "new" / "c") as w:
        for _ in range(200):
            w.add_document(rng.randint(0, 900, size=rng.randint(1, 80)))
    base = {"max_steps": 5, "per_device_train_batch_size": 2, "eval_steps": 5, "max_seq_length": 32}
    prefixes, _, plans = data_plan.build({**base, "input_dir": str(tmp_path / "old")}, 1, 1, 1)
    assert prefixes == [str(tmp_path / "old" / "c")]
    assert data_plan.corpus_fingerprint(prefixes[0])["format"] == "NpyCorpus"
    assert data_plan.cache_files(plans)  # shipped like any single-prefix plan

    blend = f"2 {tmp_path / 'old' / 'c'} 1 {tmp_path / 'new' / 'c'}"
    prefixes, targets, plans = data_plan.build({**base, "input_dir": blend}, 1, 1, 1)
    assert data_plan.corpus_prefixes(prefixes) == [str(tmp_path / "old" / "c"), str(tmp_path / "new" / "c")]
    info = data_plan.summary(prefixes, targets, plans, 1, 2)
    assert info["prefixes"] == data_plan.corpus_prefixes(prefixes)
    train = np.load(data_plan.dump_first(plans, prefixes, 4, str(tmp_path / "dump"))[0])
    corpora = [open_corpus(p) for p in data_plan.corpus_prefixes(prefixes)]
    assert np.array_equal(train[3], plans[0].sample(corpora, 3)[1])


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file, raised by the plan build, inputs untouched
# --------------------------------------------------------------------------------------------


def _tree_hashes(root) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bad_case(tmp_path, lengths, *, vocab=1000, high=900, dtype=np.uint16, fmt="bin"):
    import json

    from bi150_ray.data.mmap_format import MMapWriter, write_npy_corpus

    rng = np.random.RandomState(1)
    data, model = tmp_path / "data", tmp_path / "model"
    data.mkdir(exist_ok=True)
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    docs = [rng.randint(0, high, size=int(n)).astype(dtype) for n in lengths]
    if fmt == "bin":
        with MMapWriter(data / "c", dtype) as w:
            for d in docs:
                w.add_document(d)
    else:
        write_npy_corpus(data / "c", docs, dtype)
    return {"input_dir": str(data), "model_name_or_path": str(model), "max_steps": 4, "eval_steps": 2,
            "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "max_seq_length": 16,
            "do_train": True, "do_eval": True, "split": "90,10,0"}


def _refused(args, root, message: str, file: str) -> str:
    before = _tree_hashes(root)
    with pytest.raises(data_plan.DataInputError, match=message) as err:
        data_plan.build(args, 1, 1, 1)
    text = str(err.value)
    assert text.startswith(file + ":") or text.startswith(file + " "), text
    assert "\n" not in text
    assert _tree_hashes(root) == before  # never modified, nothing added
    return text


@pytest.mark.parametrize("fmt", ["bin", "npy"])
def test_token_ids_outside_the_vocabulary(tmp_path, fmt):
    args = _bad_case(tmp_path, [30] * 50, vocab=1000, high=900, fmt=fmt)
    data_plan.build(args, 1, 1, 1)  # all ids < 1000: accepted
    args = _bad_case(tmp_path, [30] * 50, vocab=800, high=900, fmt=fmt)
    token_file = str(tmp_path / "data" / ("c.bin" if fmt == "bin" else "c_ids.npy"))
    text = _refused(args, tmp_path, r"outside the model's vocabulary \[0, 800\)", token_file)
    assert str(tmp_path / "model" / "config.json") in text


def test_negative_token_id_and_dtype_shortcut(tmp_path, monkeypatch):
    args = _bad_case(tmp_path, [20] * 40, vocab=1000, high=900, dtype=np.int32)
    tokens = np.memmap(tmp_path / "data" / "c.bin", dtype=np.int32, mode="r+")
    tokens[777] = -5  # sequence 38
    del tokens
    text = _refused(args, tmp_path, "token id -5", str(tmp_path / "data" / "c.bin"))
    assert "token 777, sequence 38" in text
    # uint16 tokens cannot exceed a 70000-entry vocabulary: the scan is skipped
    args = _bad_case(tmp_path, [20] * 40, vocab=70000, high=900)
    monkeypatch.setattr(data_plan, "_SCAN_CHUNK", 0)  # a scan would now fail (range step 0)
    data_plan.build(args, 1, 1, 1)


def test_prefix_listed_twice(tmp_path):
    args = _bad_case(tmp_path, [30] * 50)
    p = str(tmp_path / "data" / "c")
    alias = str(tmp_path / "data" / "." / "c")
    _refused({**args, "input_dir": f"1 {p} 2 {alias}"}, tmp_path, "listed twice in the input_dir blend", alias)
    # both formats in one folder: PaddleNLP's discovery lists the prefix twice
    from bi150_ray.data.mmap_format import write_npy_corpus

    write_npy_corpus(p, [np.arange(5)] * 10)
    _refused(args, tmp_path, "both .*bin/.idx and .*_ids.npy/_idx.npz", p)


def test_empty_corpus_and_empty_splits(tmp_path):
    _refused(_bad_case(tmp_path, []), tmp_path, "empty corpus \\(0 documents\\)", str(tmp_path / "data" / "c.idx"))
    _refused(_bad_case(tmp_path, [0] * 10), tmp_path, "0 tokens", str(tmp_path / "data" / "c.bin"))
    # 949,50,1 over 40 documents leaves test with 0 documents; fine unless the job predicts
    args = {**_bad_case(tmp_path, [30] * 40), "split": "949,50,1"}
    data_plan.build(args, 1, 1, 1)
    _refused({**args, "do_predict": True}, tmp_path, "test split with 0 of 40 documents", str(tmp_path / "data" / "c.idx"))
    # documents but no tokens in the valid split: PaddleNLP's epoch loop would never end
    (tmp_path / "npy").mkdir()
    args = _bad_case(tmp_path / "npy", [30] * 45 + [0] * 5, fmt="npy")
    npz = str(tmp_path / "npy" / "data" / "c_idx.npz")
    _refused(args, tmp_path, "valid split \\(documents 45..49\\) holds 0 tokens", npz)
    _refused({**args, "split": "1,0,0"}, tmp_path, "weight 0 to a split the job needs", "split")


def test_stale_index_cache_beside_the_corpus(tmp_path):
    from bi150_ray.data import samples

    args = _bad_case(tmp_path, [30] * 50)
    _, _, plans = data_plan.build(args, 1, 1, 1)
    cache = tmp_path / "data" / "index-cache"
    train = plans[0]
    paths = samples.save_cache(cache, train.prefix, train.name, train.num_samples, train.seq_length, train.seed,
                               train.split, train.doc_idx, train.sample_idx, train.shuffle_idx)
    data_plan.build(args, 1, 1, 1)  # the cache PaddleNLP would load is this plan: accepted
    good = {k: open(v, "rb").read() for k, v in paths.items()}

    shuffled = np.array(train.shuffle_idx)[::-1].copy()  # same shape and dtype, other content
    np.save(paths["shuffle"], shuffled)
    _refused(args, tmp_path, "content differs", paths["shuffle"])
    np.save(paths["shuffle"], np.array(train.shuffle_idx, dtype=np.int64))
    _refused(args, tmp_path, "stale index cache \\(int64", paths["shuffle"])
    open(paths["shuffle"], "wb").write(good["shuffle"])
    open(paths["desc"], "w").write("GPT Dataset\n\nsomething else\n")
    _refused(args, tmp_path, "describes another dataset", paths["desc"])
    open(paths["desc"], "wb").write(good["desc"])
    # the corpus rewritten at the same path (same md5 names): its old cache no longer matches
    _bad_case(tmp_path, [31] * 50)
    _refused(args, tmp_path, "stale index cache", paths["doc"].replace("_doc_idx", "_sample_idx"))


# --------------------------------------------------------------------------------------------
# Resume: refused when data would be skipped, repeated or re-dealt, unless opted in
# --------------------------------------------------------------------------------------------

_ARGS = {"input_dir": "/data/c", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
         "max_seq_length": 128, "seed": 7, "split": "949,50,1"}


def test_resume_with_the_same_data_stream_is_accepted():
    keys = data_plan.resume_keys(_ARGS, 4)
    assert keys["dataset_world_size"] == 4 and keys["data_prefix"] == "/data/c"
    state = {"global_step": 10, "consumed_samples": 10 * 2 * 4 * 4}
    assert data_plan.check_resume_data("/ckpt/checkpoint-10", state, keys, keys, allow=False) == (320, [])
    # no record entry (older run, deleted record): trainer_state.json alone agrees too
    assert data_plan.check_resume_data("/ckpt/checkpoint-10", state, None, keys, allow=False) == (320, [])


@pytest.mark.parametrize(
    ("change", "world", "message"),
    [
        ({"per_device_train_batch_size": 4}, 4, r"per_device_train_batch_size 2 -> 4.*skip 320 samples"),
        ({"gradient_accumulation_steps": 2}, 4, r"gradient_accumulation_steps 4 -> 2.*repeat 160 samples"),
        ({"gradient_accumulation_steps": 8}, 2, r"data-parallel world changed from 4 to 2"),  # same global batch
        ({"seed": 8}, 4, "seed changed from 7 to 8"),
        ({"input_dir": "/data/other"}, 4, "data_prefix changed"),
    ],
)
def test_resume_that_moves_the_data_is_refused_unless_allowed(change, world, message):
    prev = data_plan.resume_keys(_ARGS, 4)
    new = data_plan.resume_keys({**_ARGS, **change}, world)
    state = {"global_step": 10, "consumed_samples": 320}
    with pytest.raises(data_plan.DataInputError, match=message) as err:
        data_plan.check_resume_data("/ckpt/checkpoint-10", state, prev, new, allow=False)
    text = str(err.value)
    assert text.startswith("/ckpt/checkpoint-10: ") and "allow_data_skew_on_resume" in text and "\n" not in text
    resumed, problems = data_plan.check_resume_data("/ckpt/checkpoint-10", state, prev, new, allow=True)
    assert problems and resumed == 10 * new["per_device_train_batch_size"] * new["gradient_accumulation_steps"] * world


def test_resume_checked_from_trainer_state_when_the_record_has_no_keys():
    new = data_plan.resume_keys({**_ARGS, "per_device_train_batch_size": 1}, 4)
    state = {"global_step": 10, "consumed_samples": 320}  # what the checkpoint actually read
    with pytest.raises(data_plan.DataInputError, match=r"trainer_state.json says 320 .* repeat 160 samples"):
        data_plan.check_resume_data("/ckpt/checkpoint-10", state, None, new, allow=False)
    # a record entry from before this feature (no keys) falls back the same way
    with pytest.raises(data_plan.DataInputError, match="trainer_state.json says 320"):
        data_plan.check_resume_data("/ckpt/checkpoint-10", state, {}, new, allow=False)


def test_shipped_blend_cache_files_equal_paddlenlps_own(tmp_path):
    """A blend ships its children's index files and its own two arrays, so no rank builds either."""
    from bi150_ray.data.mmap_format import MMapWriter

    rng = np.random.RandomState(4)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        with MMapWriter(tmp_path / name / "c") as w:
            for _ in range(400):
                w.add_document(rng.randint(0, 900, size=rng.randint(1, 90)))
    blend = f"3 {tmp_path / 'a' / 'c'} 1 {tmp_path / 'b' / 'c'}"
    args = {"input_dir": blend, "max_steps": 20, "per_device_train_batch_size": 2, "eval_steps": 10,
            "max_seq_length": 32, "seed": 7}
    prefixes, targets, plans = data_plan.build(args, dataset_world_size=2, eval_iters=2, test_iters=1)
    theirs = _paddlenlps_cache_equals(data_plan.cache_files(plans), prefixes, targets, 32, 7, tmp_path / "paddle-cache")
    blends = sum(isinstance(p, samples.BlendPlan) for p in plans)  # train and valid; no test samples asked
    assert blends == 2 and sum(f.endswith("_sample_index.npy") for f in theirs) == blends


def test_vocabulary_check_uses_the_size_the_ranks_train_with(tmp_path):
    """Training from scratch, the rank grows config.json's vocab_size to the tokenizer's size
    rounded up to 128 (run_pretrain's rule, ``fresh_vocab_size``); ids in that gap are valid."""

    from bi150_ray.demo_assets import build_corpus_text, train_tokenizer

    train_tokenizer(build_corpus_text(), tmp_path / "model", vocab_size=500)  # 500 -> 512 in the rank
    assert data_plan.tokenizer_vocab_size(str(tmp_path / "model")) == 500
    assert data_plan.fresh_vocab_size(400, 500) == 512 and data_plan.fresh_vocab_size(640, 500) == 640

    args = _bad_case(tmp_path, [30] * 50, vocab=400, high=506)  # config 400, ids up to 505
    data_plan.build(args, 1, 1, 1)  # accepted: the model will have 512 rows
    # continue_training keeps config.json's size: the same ids are now out of range
    token_file = str(tmp_path / "data" / "c.bin")
    text = _refused({**args, "continue_training": True}, tmp_path, r"vocabulary \[0, 400\)", token_file)
    assert str(tmp_path / "model" / "config.json") in text
    args = _bad_case(tmp_path, [30] * 50, vocab=400, high=530)  # some ids >= 512
    _refused(args, tmp_path, r"vocabulary \[0, 512\) from .*config.json \(400\) grown to the tokenizer's 500", token_file)
    # a tokenizer elsewhere
    (tmp_path / "tok").mkdir()
    (tmp_path / "model" / "sentencepiece.bpe.model").rename(tmp_path / "tok" / "sentencepiece.bpe.model")
    _refused(args, tmp_path, r"vocabulary \[0, 400\)", token_file)  # no tokenizer beside the model now
    _refused({**args, "tokenizer_name_or_path": str(tmp_path / "tok")}, tmp_path, r"vocabulary \[0, 512\)", token_file)


def test_corpus_fingerprint_hashes_the_whole_token_file_once_per_version(tmp_path, monkeypatch):
    from bi150_ray import hashing

    monkeypatch.setenv("BI150_RAY_CACHE", str(tmp_path / "cache"))
    _bad_case(tmp_path, [30] * 50)
    prefix, token_file = str(tmp_path / "data" / "c"), tmp_path / "data" / "c.bin"
    first = data_plan.corpus_fingerprint(prefix)
    assert first["bin_sha256"] == hashing.sha256_file(token_file) and first["bin_size"] == 3000

    # A second job start on this node reads the remembered hashes, not the files.
    def no_reads(path, block=1 << 20):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(hashing, "sha256_file", no_reads)
    assert data_plan.corpus_fingerprint(prefix) == first
    monkeypatch.undo()
    monkeypatch.setenv("BI150_RAY_CACHE", str(tmp_path / "cache"))

    # One token changed in the middle, same size: a different corpus (the old ends-only hash missed this).
    data = bytearray(token_file.read_bytes())
    data[1500] ^= 1
    mtime = token_file.stat().st_mtime_ns
    token_file.write_bytes(bytes(data))
    if token_file.stat().st_mtime_ns == mtime:  # same clock tick as the first write: not a real-world case
        os.utime(token_file, ns=(mtime, mtime + 1_000_000))
    changed = data_plan.corpus_fingerprint(prefix)
    assert changed["bin_size"] == first["bin_size"] and changed["bin_sha256"] != first["bin_sha256"]
    assert changed["bin_sha256"] == hashing.sha256_file(token_file)


def test_token_id_range_is_read_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("BI150_RAY_CACHE", f"{tmp_path}-cache")  # outside the tree _refused checks
    args = _bad_case(tmp_path, [30] * 50, vocab=1000, high=900, dtype=np.int32)  # int32: no dtype shortcut
    data_plan.build(args, 1, 1, 1)

    def no_scan(tokens):
        raise AssertionError("the corpus was scanned again")

    monkeypatch.setattr(data_plan, "_token_range", no_scan)
    data_plan.build(args, 1, 1, 1)  # a relaunch or rerun: the remembered range answers
    monkeypatch.undo()
    monkeypatch.setenv("BI150_RAY_CACHE", f"{tmp_path}-cache")  # outside the tree _refused checks

    token_file = tmp_path / "data" / "c.bin"
    mtime = token_file.stat().st_mtime_ns
    tokens = np.memmap(token_file, dtype=np.int32, mode="r+")
    tokens[1234] = 5000  # sequence 41
    tokens.flush()
    del tokens
    if token_file.stat().st_mtime_ns == mtime:  # same clock tick as the first write: not a real-world case
        os.utime(token_file, ns=(mtime, mtime + 1_000_000))
    text = _refused(args, tmp_path, "token id 5000", str(token_file))
    assert "token 1234, sequence 41" in text
