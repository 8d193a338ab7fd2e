"""Losing a whole node mid-run: the gang is reserved again on the replacement and the run
completes from its last complete checkpoint."""

import json
import threading
import time

import pytest

from bi150_ray import config
from bi150_ray.demo import simulated_cluster, write_demo_config
from bi150_ray.driver import PretrainJob
from tests.integration.faults import rank_pid_when

pytestmark = pytest.mark.integration


def test_node_removed_mid_run_is_replaced_and_the_run_completes(tmp_path):
    cfg = write_demo_config(str(tmp_path / "nl"), max_steps=30)
    with simulated_cluster(nodes=2, devices_per_node=2) as cluster:
        job = PretrainJob(config.load(cfg, run_name="nodeloss", placement_timeout_s=120.0))
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = job.run()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        # The driver runs in a thread: Ray starts nodes only from the main thread (signal handlers).
        t0 = time.time()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        assert rank_pid_when(job.plan.node_paths(1).events_path(2), min_step=15) is not None
        rec = json.load(open(job.plan.results_dir + "/run_record.json"))
        victim_id = rec["attempts"][0]["nodes"][1]["node_id"]
        victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
        cluster.remove_node(victim)
        cluster.add_node(num_cpus=2, resources={"BI150": 2}, node_ip_address="127.0.0.1")
        worker.join(timeout=600)
        print(f"node-loss run took {time.time() - t0:.1f}s")
    assert "error" not in outcome, outcome.get("error")
    rec = json.load(open(outcome["result"].run_record))
    a1, a2 = rec["attempts"]
    assert a1["outcome"] == "infrastructure" and "died" in a1["cause"].lower()
    assert a2["outcome"] == "succeeded" and a2["resumed_from"] == "checkpoint-10"
    old = {n["node_id"] for n in a1["nodes"]}
    new = {n["node_id"] for n in a2["nodes"]}
    assert len(new - old) == 1  # the lost node was replaced
    assert rec["steps"][-1]["global_step"] == 30
