"""`bi150-ray gather RUN`: picking a recorded checkpoint, finding its shards on the nodes' folders,
refusing incomplete or tampered ones with the file named. No Ray: the folders are on this machine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bi150_ray import cli
from bi150_ray.checkpoint import fromrun
from bi150_ray.checkpoint.gather import COMPLETE_MARKER, GatherError
from tests.unit import shard_factory as sf


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tp2 run on two nodes: tp rank 0's shard on node 0 (with config), tp rank 1's on node 1."""
    config = sf.tiny_config(2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=64)
    root = tmp_path_factory.mktemp("run")
    states, checkpoints = {}, []
    for step, seed in ((10, 1), (20, 2)):
        _, state = sf.build_model(config, seed=seed)
        states[step] = state
        full = root / f"full-{step}"
        sf.save_checkpoint(state, config, str(full), tp=2)
        folders, manifest = {}, {}
        for node, names in ((0, ["model_state.tp00.pdparams", "config.json"]), (1, ["model_state.tp01.pdparams"])):
            folder = root / f"node{node}" / "out" / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            for n in names:
                shutil.copy(full / n, folder / n)
            (folder / COMPLETE_MARKER).write_text("ok\n")
            folders[str(node)] = str(folder)
            manifest[str(node)] = {f: os.path.getsize(folder / f) for f in os.listdir(folder)}
        checkpoints.append({"global_step": step, "checkpoint": folders["0"], "attempt": 1, "nodes": [0, 1],
                            "manifest": manifest, "folders": folders})
    results = root / "results"
    results.mkdir()
    record = {"run_name": "r", "status": "succeeded", "config_source": "x.json", "degrees": {"tp": 2, "pp": 1},
              "attempts": [{"number": 1, "nodes": [{"node_index": 0, "node_id": "a", "ip": "127.0.0.1"},
                                                  {"node_index": 1, "node_id": "b", "ip": "127.0.0.1"}]}],
              "checkpoints": checkpoints}
    (results / "run_record.json").write_text(json.dumps(record))
    return results, states


def _merged(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged: dict[str, np.ndarray] = {}
    for f in sorted(set(index["weight_map"].values())):
        merged.update(load_file(str(out / f)))
    return merged


@pytest.mark.parametrize("step", [None, 10])
def test_gathers_the_recorded_step_from_both_nodes_exactly(run, tmp_path, step, capsys):
    results, states = run
    out = tmp_path / "model"
    argv = ["gather", str(results), "--out", str(out)] + (["--step", str(step)] if step else [])
    assert cli.main(argv) == 0
    want = step or 20  # default: the newest complete checkpoint in the record
    assert f"checkpoint-{want} -> {out}" in capsys.readouterr().out
    merged = _merged(out)
    assert sorted(merged) == sorted(states[want])
    for key, value in states[want].items():
        assert np.array_equal(merged[key], value), key
    manifest = json.loads((out / "bi150_manifest.json").read_text())
    assert manifest["global_step"] == want and manifest["tp"] == 2
    assert not any(p.name.startswith(("model.staging", "model.partial")) for p in tmp_path.iterdir())


def test_unknown_step_lists_the_complete_ones(run, tmp_path, capsys):
    results, _ = run
    assert cli.main(["gather", str(results / "run_record.json"), "--out", str(tmp_path / "m"), "--step", "15"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-15 is not a complete checkpoint" in err and "checkpoint-10, checkpoint-20" in err
    assert not (tmp_path / "m").exists()


def test_removed_or_changed_shard_is_named(run, tmp_path):
    results, _ = run
    rec = json.loads((results / "run_record.json").read_text())
    node1 = Path(rec["checkpoints"][0]["folders"]["1"])
    moved = tmp_path / "moved"
    shutil.move(node1 / "model_state.tp01.pdparams", moved)
    try:
        with pytest.raises(GatherError, match=r"model_state\.tp01\.pdparams is no longer in node 1's .*checkpoint-10"):
            fromrun.gather_run(str(results), str(tmp_path / "m"), step=10)
        with open(node1 / "model_state.tp01.pdparams", "wb") as fh:  # same name, other bytes
            fh.write(moved.read_bytes()[:100])
        with pytest.raises(GatherError, match=r"model_state\.tp01\.pdparams is 100 bytes, the record saw \d+"):
            fromrun.gather_run(str(results), str(tmp_path / "m"), step=10)
    finally:
        shutil.move(moved, node1 / "model_state.tp01.pdparams")
    assert not (tmp_path / "m").exists()


def test_record_pointing_outside_a_checkpoint_folder_is_refused(run, tmp_path):
    results, _ = run
    rec = json.loads((results / "run_record.json").read_text())
    rec["checkpoints"][0]["folders"]["1"] = str(tmp_path)
    bad = tmp_path / "run_record.json"
    bad.write_text(json.dumps(rec))
    with pytest.raises(GatherError, match="not a checkpoint-10 folder"):
        fromrun.gather_run(str(bad), str(tmp_path / "m"))


def test_run_without_checkpoints(tmp_path):
    (tmp_path / "run_record.json").write_text(json.dumps({"degrees": {"tp": 1, "pp": 1}, "checkpoints": []}))
    with pytest.raises(GatherError, match="no complete checkpoint"):
        fromrun.gather_run(str(tmp_path), str(tmp_path / "m"))


def test_verify_names_a_folder_that_is_not_there(tmp_path):
    from bi150_ray.checkpoint.gather import verify_gathered

    with pytest.raises(GatherError, match="not a directory"):
        verify_gathered(str(tmp_path / "nope"))
    with pytest.raises(GatherError, match="no completion marker"):
        verify_gathered(str(tmp_path))
