"""The whole job on a real local Ray cluster: real gloo collectives, real PaddleNLP training."""

import json
import math
import os
import time

import pytest

from bi150_ray import config
from bi150_ray.checkpoint.gather import COMPLETE_MARKER, verify_gathered
from bi150_ray.demo import write_demo_config
from bi150_ray.driver import PretrainJob
from bi150_ray.errors import DataPlanError, GangError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return write_demo_config(str(root), max_steps=60)


def test_demo_job_trains_evaluates_checkpoints_and_gathers(sim_cluster, demo_cfg):
    from bi150_ray.checkpoint.verify import compare_to_checkpoint

    t0 = time.time()
    job = config.load(demo_cfg)
    result = PretrainJob(job).run()
    print(f"demo job took {time.time() - t0:.1f}s")
    assert result.status == "succeeded" and result.attempts == 1

    # Training really happened: 60 logged steps, loss falls; eval ran every 20 steps and fell
    # clearly below where it started (an untrained model sits near ln(vocab) = 8.03).
    rec = json.load(open(result.run_record))
    steps = [s["global_step"] for s in rec["steps"]]
    assert steps == list(range(1, 61))
    assert rec["steps"][-1]["loss"] < rec["steps"][0]["loss"] - 1.0
    # Model FLOPs/token from the model's dims; MFU is "unknown" because no CPU peak is configured.
    assert rec["steps"][-1]["model_flops_per_token"] > 0 and rec["steps"][-1]["mfu"] == "unknown"
    evals = [e["eval_loss"] for e in result.evals]
    assert [e["global_step"] for e in result.evals] == [20, 40, 60]
    assert evals[-1] < evals[0] - 0.2 and evals[-1] < math.log(3072) - 1.5

    # dp2 x sharding2 across the two nodes; each node wrote to its own "local disk".
    assert rec["degrees"]["dp"] == 2 and rec["degrees"]["sharding"] == 2
    nodes = rec["attempts"][0]["nodes"]
    assert len({n["node_id"] for n in nodes}) == 2
    storage = job.runtime.storage_path
    for node, ranks in ((0, (0, 1)), (1, (2, 3))):
        logs = os.path.join(storage.replace("{node}", str(node)), "demo", "logs")
        for r in ranks:
            text = open(os.path.join(logs, f"workerlog.{r}")).read()
            assert "bi150-ray rank program finished" in text
            if r == ranks[0]:  # PaddleNLP logs on each node's local rank 0: its own lines, intact
                assert "loss: " in text and "global_step: " in text and "interval_samples_per_second" in text
            assert os.path.getsize(os.path.join(logs, f"events.{r}.jsonl")) > 0
    ckpt_node0 = os.path.join(storage.replace("{node}", "0"), "demo", "checkpoints")
    assert {"checkpoint-40", "checkpoint-60"} <= set(os.listdir(ckpt_node0))
    # Ranks 0,1 (dp 0) hold the model and both sharding-stage1 optimizer shards; the runtime
    # marked the checkpoint complete only after all four ranks reported the save.
    ck60 = set(os.listdir(os.path.join(ckpt_node0, "checkpoint-60")))
    assert {"model_state.pdparams", "optimizer.shard00.pdopt", "optimizer.shard01.pdopt", ".bi150_complete"} <= ck60
    assert [c["global_step"] for c in rec["checkpoints"]] == [20, 40, 60]
    manifest60 = rec["checkpoints"][-1]["manifest"]["0"]  # node 0's files of checkpoint-60, with sizes
    assert manifest60["model_state.pdparams"] > 0 and "optimizer.shard01.pdopt" in manifest60

    # One gathered model: complete, checksummed, loads, and equals the final checkpoint exactly.
    assert os.path.isfile(os.path.join(result.model_dir, COMPLETE_MARKER))
    manifest = verify_gathered(result.model_dir)
    assert manifest["global_step"] == 60
    assert not any(f["file"].endswith((".pdparams", ".pkl", ".bin")) for f in manifest["files"])
    assert compare_to_checkpoint(result.model_dir, os.path.join(ckpt_node0, "checkpoint-60")) == 0.0
    # The report: curves as a PNG, the model's location; VisualDL logs as PaddleNLP writes them.
    report = open(os.path.join(result.results_dir, "report.md")).read()
    assert "![curves](curves.png)" in report and result.model_dir in report and "eval loss" in report
    assert os.path.getsize(os.path.join(result.results_dir, "curves.png")) > 10_000
    vdl = os.path.join(storage.replace("{node}", "0"), "demo", "visualdl")
    assert any(f.startswith("vdlrecords") for f in os.listdir(vdl))
    # Memory as the backend reports it: CPU has no device allocator, so host RSS for every rank.
    assert sorted(rec["peak_memory"]) == ["0", "1", "2", "3"]
    assert all(p["host_peak_rss_bytes"] > 100 * 2**20 for p in rec["peak_memory"].values())
    assert "peak host RSS per rank" in report and "not reported by this backend" in report
    # The Ray dashboard's Prometheus endpoint shows the same figures as the run record.
    exported = _scrape_ray_metrics({"ray_bi150_ray_global_step", "ray_bi150_ray_loss", "ray_bi150_ray_host_rss_bytes"})
    assert exported["ray_bi150_ray_global_step"] == 60
    assert exported["ray_bi150_ray_loss"] == pytest.approx(rec["steps"][-1]["loss"])


def _scrape_ray_metrics(names: set[str], timeout_s: float = 60.0) -> dict[str, float]:
    """Read our gauges from every node's metrics export port (Ray reports every ~10 s)."""
    import urllib.request

    import ray

    found: dict[str, float] = {}
    deadline = time.time() + timeout_s
    while time.time() < deadline and set(found) != names:
        for node in ray.nodes():
            url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
            try:
                body = urllib.request.urlopen(url, timeout=10).read().decode()
            except OSError:  # a node's exporter not (yet) answering: ask again until the deadline
                continue
            for line in body.splitlines():
                name = line.split("{", 1)[0]
                if name in names and 'run="demo"' in line:
                    found[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(2)
    assert set(found) == names, f"Ray metrics missing after {timeout_s}s: {sorted(names - set(found))}"
    return found


def test_cli_gathers_an_earlier_checkpoint_of_the_run_through_ray(sim_cluster, demo_cfg, tmp_path):
    """`bi150-ray gather RUN --step 40 --address`: node-local checkpoint fetched via Ray, equal to the shard."""
    import subprocess
    import sys

    import numpy as np
    import paddle
    from safetensors.numpy import load_file

    from bi150_ray import cli
    from bi150_ray.checkpoint import fromrun
    from bi150_ray.checkpoint.gather import GatherError
    from bi150_ray.plan import make_plan

    job = config.load(demo_cfg)
    results = make_plan(job).results_dir
    out = tmp_path / "model-40"
    proc = subprocess.run(
        [sys.executable, "-m", "bi150_ray.cli", "gather", results, "--out", str(out), "--step", "40",
         "--address", sim_cluster.address],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint-40 -> {out}" in proc.stdout
    manifest = verify_gathered(str(out))
    assert manifest["global_step"] == 40 and manifest["degrees"]["sharding"] == 2
    original = paddle.load(
        os.path.join(job.runtime.storage_path.replace("{node}", "0"), "demo", "checkpoints", "checkpoint-40", "model_state.pdparams"),
        return_numpy=True,
    )
    original.pop("StructuredToParameterName@@", None)
    merged: dict = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            merged.update(load_file(str(out / f)))
    assert sorted(merged) == sorted(original)
    assert all(np.array_equal(merged[k], original[k]) for k in original)
    final = load_file(os.path.join(results, "model", "model-00001-of-00001.safetensors"))
    assert not np.array_equal(final["llama.norm.weight"], merged["llama.norm.weight"])  # really step 40, not 60
    # checkpoint-20 was confirmed, then removed by save_total_limit=2; 7 never existed.
    with pytest.raises(GatherError, match=r"checkpoint-20 cannot be gathered through Ray.*no longer in node 0"):
        fromrun.gather_run(results, str(tmp_path / "m20"), step=20, address=sim_cluster.address)
    assert cli.main(["gather", results, "--out", str(tmp_path / "m7"), "--step", "7"]) == 2
    assert not (tmp_path / "m20").exists() and not (tmp_path / "m7").exists()


def test_rerunning_the_same_job_resumes_from_its_last_checkpoint(sim_cluster, demo_cfg):
    job = config.load(demo_cfg)
    result = PretrainJob(job).run()
    rec = json.load(open(result.run_record))
    assert len(rec["attempts"]) == 2  # one record per run, continued
    assert rec["attempts"][1]["resumed_from"] == "checkpoint-60"
    # Nothing was left to train: it did not start over, and no step beyond max_steps ran.
    assert [s["global_step"] for s in rec["steps"]] == list(range(1, 61))


def test_resume_with_a_changed_global_batch_is_refused_naming_keys_and_checkpoint(sim_cluster, demo_cfg):
    from bi150_ray.data.plan import DataInputError

    data = json.load(open(demo_cfg))
    data["per_device_train_batch_size"] = 2 * data["per_device_train_batch_size"]  # same run_name "demo"
    data["max_steps"] = 80  # checkpoint-60 is not the end, so the resume reaches the data check
    changed = os.path.join(os.path.dirname(demo_cfg), "demo-bigger-batch.json")
    with open(changed, "w") as fh:
        json.dump(data, fh)
    job = PretrainJob(config.load(changed))
    with pytest.raises(DataInputError) as e:
        job.run()
    msg = str(e.value)
    assert msg.startswith(os.path.join(job.plan.node_paths(0).output_dir, "checkpoint-60") + ": "), msg
    # 4 data ranks (2 nodes x 2 devices, sharding 2): read 60 x 4 x 4 = 960, would restart at 60 x 8 x 4
    assert "per_device_train_batch_size 4 -> 8" in msg and "skip 960 samples" in msg
    assert "allow_data_skew_on_resume" in msg
    rec = json.load(open(os.path.join(job.plan.results_dir, "run_record.json")))
    assert rec["checkpoints"][-1]["data"]["per_device_train_batch_size"] == 4  # kept with the checkpoint
    assert [s["global_step"] for s in rec["steps"]] == list(range(1, 61))  # nothing trained


def test_blend_job_ranks_load_the_shipped_index_files_and_build_nothing(sim_cluster, demo_cfg, tmp_path):
    """A two-corpus blend on storage both nodes share: the driver builds the children's plans and
    the blend's own arrays once and installs them once in the shared cache folder; every rank's
    PaddleNLP then finds all of them (no rank builds or polls), and trains on the blend. (The
    per-node install is the main e2e test's.)"""
    import shutil

    data = json.load(open(demo_cfg))
    first = [f[: -len(".idx")] for f in os.listdir(data["input_dir"]) if f.endswith(".idx")][0]
    copy = tmp_path / "copy"
    copy.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(os.path.join(data["input_dir"], first + ext), copy / ("other" + ext))
    data["input_dir"] = f"3 {os.path.join(data['input_dir'], first)} 1 {copy / 'other'}"
    data.update(max_steps=6, eval_steps=6, save_steps=6)
    data["runtime"].update(run_name="blend", storage_path=str(tmp_path / "shared"), shared_storage=True)
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(data))
    job = PretrainJob(config.load(path))
    result = job.run()
    assert result.status == "succeeded"
    rec = json.load(open(result.run_record))
    shipped = rec["data_plan"]["files"]
    assert sum(n.endswith("_sample_index.npy") for n in shipped) == 3  # the blend of each split
    assert sum(n.endswith("_shuffle_idx.npy") for n in shipped) == 6  # each child, each split
    cache = job.plan.rank_args(0)["data_cache"]
    assert cache == job.plan.rank_args(3)["data_cache"] and cache.startswith(str(tmp_path / "shared"))
    assert set(os.listdir(cache)) == set(shipped)  # installed once, nothing built beside it
    logs = os.path.join(str(tmp_path / "shared"), "blend", "logs")
    for r in range(4):
        text = open(os.path.join(logs, f"workerlog.{r}")).read()
        assert text.count("searching for blendable dataset, cache_hit=True") == 3, r
        assert "cache_hit=False" not in text and "build_indices=True" not in text, r
        assert text.count("searching for causual dataset, build_indices=False") == 6, r
    assert [s["global_step"] for s in rec["steps"]] == list(range(1, 7))


def test_gang_that_does_not_fit_fails_fast_saying_what_is_missing(sim_cluster, demo_cfg):
    job = config.load(demo_cfg, nodes=3, placement_timeout_s=3.0, run_name="too-big")
    t0 = time.time()
    with pytest.raises(GangError) as e:
        PretrainJob(job).run()
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert "need 3 nodes x 2 BI150" in msg and "cluster has 2 nodes with 2 BI150" in msg


def test_missing_corpus_is_refused_before_any_rank_starts(sim_cluster, demo_cfg, tmp_path):
    data = json.load(open(demo_cfg))
    data["input_dir"] = str(tmp_path / "empty")  # exists but holds no corpus
    os.makedirs(data["input_dir"])
    data["runtime"]["run_name"] = "broken"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    job = PretrainJob(config.load(bad))
    with pytest.raises(DataPlanError) as e:
        job.run()
    assert "empty: no corpus" in str(e.value) and str(bad) in str(e.value)
    assert not os.path.exists(job.plan.node_paths(0).worker_log(0))  # no rank was started
    rec = json.load(open(os.path.join(job.plan.results_dir, "run_record.json")))
    assert rec["status"] == "failed" and rec["attempts"][-1]["outcome"] == "error"
    assert "DataPlanError" in rec["attempts"][-1]["cause"]
