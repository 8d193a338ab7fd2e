"""The driver's data plan: the index-cache files it ships are the ones PaddleNLP would build."""

import io
import os

import numpy as np
import pytest

from bi150_ray.data import plan as data_plan
from bi150_ray.demo_assets import build_demo_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("assets"))


def test_shipped_cache_files_equal_paddlenlps_own(assets, tmp_path):
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets

    args = {"input_dir": str(assets.data_dir), "max_steps": 30, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4, "eval_steps": 10, "max_seq_length": 128, "seed": 42}
    prefixes, targets, plans = data_plan.build(args, dataset_world_size=2, eval_iters=4, test_iters=1)
    assert targets == [4 * 2 * 30, 4 * 2 * 4 * (30 // 10 + 1), 4 * 2 * 1]
    ours = data_plan.cache_files(plans)

    cache = tmp_path / "paddle-cache"
    build_train_valid_test_datasets(
        data_prefix=prefixes, data_impl="mmap", splits_string="949,50,1", train_val_test_num_samples=targets,
        seq_length=128, seed=42, skip_warmup=True, data_cache_path=str(cache),
    )
    theirs = {f: (cache / f).read_bytes() for f in os.listdir(cache)}
    assert set(ours) == set(theirs)  # same md5 names: PaddleNLP will find ours
    for name, data in ours.items():
        if name.endswith(".dsc"):
            assert data == theirs[name]
        else:
            a, b = np.load(io.BytesIO(data)), np.load(io.BytesIO(theirs[name]))
            assert a.dtype == b.dtype and np.array_equal(a, b), name


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
