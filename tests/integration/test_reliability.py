"""Fault injection on a real local Ray cluster with real CPU ranks: the run survives and the
result is the same as if nothing had happened."""

import json
import os
import signal
import time

import numpy as np
import pytest

from bi150_ray import config
from bi150_ray.demo import write_demo_config
from bi150_ray.driver import PretrainJob
from tests.integration.faults import SignalAt, weights

pytestmark = pytest.mark.integration
STEPS = 30  # eval and checkpoint every 10 steps


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return write_demo_config(str(tmp_path_factory.mktemp("rel")), max_steps=STEPS)


def _job(cfg, run_name, **runtime):
    return PretrainJob(config.load(cfg, run_name=run_name, **runtime))


@pytest.fixture(scope="module")
def baseline(sim_cluster, cfg):
    t0 = time.time()
    result = _job(cfg, "baseline").run()
    print(f"baseline run took {time.time() - t0:.1f}s")
    return result


def test_sigkill_of_a_rank_resumes_to_bitwise_identical_weights(sim_cluster, cfg, baseline):
    job = _job(cfg, "sigkill")
    killer = SignalAt(job.plan.node_paths(1).events_path(2), min_step=15, signum=signal.SIGKILL)
    t0 = time.time()
    result = job.run()
    print(f"sigkill run took {time.time() - t0:.1f}s")
    assert killer.sent_to is not None
    rec = json.load(open(result.run_record))
    a1, a2 = rec["attempts"]
    assert a1["outcome"] == "infrastructure" and "rank 2 was killed by signal 9" in a1["cause"]
    assert a2["outcome"] == "succeeded" and a2["resumed_from"] == "checkpoint-10"
    ours, ref = weights(result.model_dir), weights(baseline.model_dir)
    assert ours.keys() == ref.keys()
    assert all(np.array_equal(ours[k], ref[k]) for k in ref), "resumed weights differ from the uninterrupted run"


def test_sigstop_hang_is_detected_stacks_dumped_and_run_completes(sim_cluster, cfg):
    job = _job(cfg, "sigstop", step_timeout_s=15.0, heartbeat_s=1.0)
    stopper = SignalAt(job.plan.node_paths(0).events_path(1), min_step=12, signum=signal.SIGSTOP)
    t0 = time.time()
    result = job.run()
    print(f"sigstop run took {time.time() - t0:.1f}s")
    assert stopper.sent_to is not None
    rec = json.load(open(result.run_record))
    a1, a2 = rec["attempts"]
    assert a1["outcome"] == "hang" and a2["outcome"] == "succeeded"
    # Detected within the timeout (plus a poll), not after Paddle's 30-minute collective timeout.
    assert a1["ended"] - a1["started"] < 240
    assert a1["hang"]["silent_ranks"] == [1] and 1 in a1["hang"]["ranks"]
    assert a1["hang"]["phases"]["1"] == "step"
    stacks = open(a1["hang"]["stack_dumps"][1]).read()
    assert "Thread" in stacks and ("paddle" in stacks or "bi150_ray" in stacks), stacks[:2000]
    assert a2["resumed_from"] == "checkpoint-10"


def test_death_while_checkpointing_resumes_from_the_previous_complete_checkpoint(sim_cluster, cfg):
    fault = "kill_before_save_confirm:rank=1:step=20:attempt=1"
    job = _job(cfg, "ckptkill", env={"BI150_RAY_FAULT": fault, "MY_API_TOKEN": "s3cret-value"})
    ck20 = os.path.join(job.plan.node_paths(0).output_dir, "checkpoint-20")
    result = job.run()
    rec = json.load(open(result.run_record))
    a1, a2 = rec["attempts"]
    assert a1["outcome"] == "infrastructure" and "rank 1 was killed" in a1["cause"]
    # checkpoint-20 was on disk (PaddleNLP's own get_last_checkpoint would have taken it) but was
    # never confirmed by every rank, so the relaunch went back to checkpoint-10.
    assert a2["resumed_from"] == "checkpoint-10"
    assert [(c["global_step"], c["attempt"]) for c in rec["checkpoints"]] == [(10, 1), (20, 2), (30, 2)]
    assert os.path.isfile(os.path.join(ck20, ".bi150_complete"))  # rewritten and confirmed in attempt 2
    assert rec["status"] == "succeeded"
    # A secret handed to the ranks is never written to the record or the logs.
    assert rec["environment"]["env"]["MY_API_TOKEN"] == "***"
    assert "s3cret-value" not in open(result.run_record).read()
    for r in (0, 1):
        assert "s3cret-value" not in open(job.plan.node_paths(0).worker_log(r)).read()


def test_repeating_application_error_stops_after_its_budget_with_the_ranks_message(sim_cluster, cfg, tmp_path):
    from bi150_ray.errors import RunFailed

    data = json.load(open(cfg))
    data["lr_scheduler_type"] = "bogus"  # passes our type check (a string); PaddleNLP rejects it in every rank
    data["runtime"].update({"run_name": "apperr", "max_app_restarts": 1})
    bad = tmp_path / "apperr.json"
    bad.write_text(json.dumps(data))
    job = PretrainJob(config.load(bad))
    with pytest.raises(RunFailed) as e:
        job.run()
    rec = json.load(open(os.path.join(job.plan.results_dir, "run_record.json")))
    assert [a["outcome"] for a in rec["attempts"]] == ["application", "application"]
    assert rec["status"] == "failed"
    msg = str(e.value)
    assert "exited with code 1" in msg and "last lines of" in msg
    assert "bogus" in msg  # the rank's own error text, not a generic one
