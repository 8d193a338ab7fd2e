"""Which checkpoint a relaunch may resume from, across nodes without shared storage."""

from bi150_ray.checkpoint.inventory import COMPLETE_MARKER, expected_shards, newest_complete
from bi150_ray.topology import Degrees

DP2_SD2 = Degrees(dp=2, sharding=2, sharding_stage="stage1")
NODE_OF_RANK = [0, 0, 1, 1]  # 2 nodes x 2 ranks, node-major


def _ckpt(marker=True, **drop):
    files = {"trainer_state.json": 300, "model_state.pdparams": 10, "optimizer.shard00.pdopt": 10,
             "optimizer.shard01.pdopt": 10, "rng_state_4.pth": 5}
    if marker:
        files[COMPLETE_MARKER] = 3
    for name in drop:
        files.pop(name.replace("__", "."), None)
    return files


def test_expected_shards_follow_paddlenlp_names_and_owners():
    assert expected_shards(DP2_SD2) == {"model_state.pdparams": 0, "optimizer.shard00.pdopt": 0, "optimizer.shard01.pdopt": 1}
    ref = expected_shards(Degrees(pp=8, sharding=8, sharding_stage="stage1"))
    assert len([f for f in ref if f.startswith("model_state")]) == 8 and len(ref) == 8 + 64
    assert ref["model_state.pp03.pdparams"] == 24 and ref["optimizer.pp07_shard05.pdopt"] == 61


def test_newest_complete_skips_unconfirmed_and_incomplete_checkpoints():
    inv = {0: {"checkpoint-10": _ckpt(), "checkpoint-20": _ckpt(marker=False), "checkpoint-30": _ckpt(optimizer__shard01__pdopt=1)},
           1: {}}
    # 30 lacks a shard, 20 was never confirmed by every rank: resume from 10.
    assert newest_complete(inv, DP2_SD2, NODE_OF_RANK) == 10
    inv[0]["checkpoint-30"] = _ckpt()
    assert newest_complete(inv, DP2_SD2, NODE_OF_RANK) == 30


def test_no_checkpoint_means_start_fresh():
    assert newest_complete({0: {}, 1: {}}, DP2_SD2, NODE_OF_RANK) is None
