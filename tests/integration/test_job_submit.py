"""`ray job submit` against a real head started with `ray start --head` on 127.0.0.1."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bi150_ray.demo import write_demo_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "disabled",
        # Keep Ray on loopback: otherwise it rewrites 127.0.0.1 to the machine's IP (see demo.py).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Submitted entrypoints run `python` from the head's PATH: make it this venv's.
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    gcs, dash = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's unix sockets cap path length
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=3", '--resources={"BI150": 2}', f"--temp-dir={temp}", "--disable-usage-stats",
           # Every port explicit and free: Ray's fixed defaults (e.g. the agent's 52365) collide
           # with any other Ray instance on the machine, and the job API then has "no agent".
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        # Stop only this head (its processes carry its temp dir in their command lines); `ray stop`
        # would kill every Ray cluster on the machine.
        subprocess.run(["pkill", "-TERM", "-f", str(temp)], capture_output=True)
        deadline = time.time() + 20
        while subprocess.run(["pgrep", "-f", str(temp)], capture_output=True).returncode == 0 and time.time() < deadline:
            time.sleep(0.5)
        subprocess.run(["pkill", "-KILL", "-f", str(temp)], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_driver_and_reports_through_the_job_api(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg_path = write_demo_config(str(tmp_path / "job"), max_steps=20)
    # One head node with 2 BI150: sharding stage1 over both ranks.
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["runtime"].update({"nodes": 1, "devices_per_node": 2, "run_name": "submitted"})
    Path(cfg_path).write_text(json.dumps(cfg))

    t0 = time.time()
    for _ in range(60):  # the head's job agent needs a few seconds after `ray start`
        out = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--no-wait",
             "--working-dir", str(REPO), "--", "python", "jobs/pretrain.py", "--config", cfg_path],
            env=ray_head["env"], capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(1)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = re.search(r"Job '([^']+)' submitted successfully", out.stdout + out.stderr).group(1)

    client = JobSubmissionClient(ray_head["address"])
    status = None
    while time.time() - t0 < 420:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            break
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    print(f"ray job submit run took {time.time() - t0:.1f}s")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    summary = json.loads(re.search(r"^BI150_RAY_RESULT (.*)$", logs, re.M).group(1))
    assert summary["status"] == "succeeded" and summary["last_step"] == 20
    assert summary["final_eval_loss"] < 8.0
    assert os.path.isfile(os.path.join(summary["model_dir"], "model.safetensors.index.json"))
    assert "degrees: dp 1 x sharding 2 (stage1)" in logs  # the driver's own words, via the job API


def test_ray_job_stop_ends_every_rank_process_within_seconds(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    cfg_path = write_demo_config(str(tmp_path / "stopjob"), max_steps=400)
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["runtime"].update({"nodes": 1, "devices_per_node": 2, "run_name": "stopped"})
    Path(cfg_path).write_text(json.dumps(cfg))
    client = JobSubmissionClient(ray_head["address"])
    for _ in range(60):  # the head's job agent needs a few seconds after `ray start`
        try:
            job_id = client.submit_job(
                entrypoint=f"python jobs/pretrain.py --config {cfg_path}", runtime_env={"working_dir": str(REPO)}
            )
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            time.sleep(1)
    events = Path(cfg["runtime"]["storage_path"].replace("{node}", "0")) / "stopped" / "logs" / "events.1.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (events.exists() and '"kind": "step"' in events.read_text()):
        time.sleep(1)
    assert '"kind": "step"' in events.read_text(), client.get_job_logs(job_id)[-3000:]

    def rank_processes() -> list[str]:
        out = subprocess.run(["pgrep", "-af", "bi150_ray.train.rank"], capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if "stopped/paddlenlp_args.json" in line]

    assert len(rank_processes()) == 2
    t0 = time.time()
    client.stop_job(job_id)
    while rank_processes() and time.time() - t0 < 30:
        time.sleep(0.5)
    print(f"ranks gone {time.time() - t0:.1f}s after ray job stop")
    assert rank_processes() == [], "rank processes survived `ray job stop`"
