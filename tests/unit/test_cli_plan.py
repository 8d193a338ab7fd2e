"""`bi150-ray plan CONFIG --nodes N --devices-per-node D`, exactly as the README types it."""

import json
import subprocess
import sys

REFERENCE = "jobs/configs/pretrain-llama_13b-pp4tp2sd2_stage1.json"


def _plan(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bi150_ray.cli", "plan", REFERENCE, "--nodes", "4",
                           "--devices-per-node", "16", *extra], capture_output=True, text=True, timeout=120)


def test_plan_of_the_reference_job_targets_bi150_without_naming_a_backend():
    out = _plan("--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    d = plan["degrees"]
    assert (d["pp"], d["sharding"], d["tp"], d["dp"]) == (8, 8, 1, 1)
    assert plan["estimate"]["device"]["name"] == "BI-V150"


def test_plan_on_the_cpu_backend_refuses_pipeline_parallelism_with_the_reason():
    out = _plan("--backend", "cpu")
    assert out.returncode != 0 and "cannot run on the cpu backend" in out.stderr
