"""`bi150-ray doctor` on a real local multi-node Ray cluster: probes pinned to each node, the fake
`ixsmi` on PATH, real gloo ranks started through the job's env contract; a real no-go exits 1."""

import json
import os
import subprocess
import sys
import time

import pytest

from bi150_ray import cli, config, doctor
from bi150_ray.demo import demo_paddlenlp_args, demo_runtime
from bi150_ray.driver import PretrainJob
from bi150_ray.plan import make_plan

pytestmark = pytest.mark.integration

FAKE_BIN = os.path.join(os.path.dirname(__file__), "..", "fixtures", "bin")


@pytest.fixture(scope="module")
def cluster_with_ixsmi():
    """Two BI150 nodes (2 each) + head; PATH set first so every raylet and worker finds the fake ixsmi."""
    from bi150_ray.demo import simulated_cluster

    old = os.environ["PATH"]
    os.environ["PATH"] = os.path.abspath(FAKE_BIN) + os.pathsep + old
    try:
        with simulated_cluster(nodes=2, devices_per_node=2) as cluster:
            yield cluster
    finally:
        os.environ["PATH"] = old


def write_config(tmp_path, name: str, **runtime) -> str:
    """A demo-shaped job (the doctor needs no model or corpus on disk)."""
    cfg = demo_paddlenlp_args(str(tmp_path / "model"), str(tmp_path / "data"), max_steps=2)
    cfg["runtime"] = {**demo_runtime(str(tmp_path)), "run_name": name, "placement_timeout_s": 20.0, **runtime}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_doctor_is_go_on_a_healthy_cluster_with_a_real_collective(cluster_with_ixsmi, tmp_path, capsys):
    shared = tmp_path / "shared"
    cfg = write_config(tmp_path, "go", storage_path=str(shared), shared_storage=True, env={"NCCL_SOCKET_IFNAME": "lo"})
    t0 = time.time()
    code = cli.main(["doctor", cfg, "--json"])
    out = json.loads(capsys.readouterr().out)
    print(f"doctor with collective took {time.time() - t0:.1f}s")
    assert code == 0 and out["verdict"] == "go", json.dumps(out["checks"], indent=1)
    by = {}
    for c in out["checks"]:
        by.setdefault(c["check"], []).append(c)
    # one line per check per node: both BI150 nodes were probed (the head has no BI150)
    assert len(out["nodes"]) == 2 and len({n["node_id"] for n in out["nodes"]}) == 2
    for check in ("devices", "software versions", "driver versions", "interface", "subnet", "storage", "shared storage", "clock"):
        assert [c["status"] for c in by[check]] == ["go", "go"], check
    # the facts came from each node: ixsmi's 16 devices and its driver, lo's address, the shared marker
    assert all("16 healthy Iluvatar BI-V150" in c["detail"] for c in by["devices"])
    assert all("driver 4.1.0" in c["detail"] for c in by["driver versions"])
    assert all("127.0.0.0/8" in c["detail"] for c in by["subnet"])
    assert all(n["shared_missing"] == [] for n in out["nodes"])
    assert not [f for f in os.listdir(shared) if f.startswith(".bi150-doctor")]  # markers cleaned up
    # the collective: 4 gloo ranks, correct sum on each; MB/s from node 0 to node 1
    assert by["all-reduce"][0]["status"] == "go" and "4 ranks" in by["all-reduce"][0]["detail"]
    (pair,) = out["bandwidth"]
    assert (pair["src"], pair["dst"], pair["src_node"], pair["dst_node"]) == (0, 2, 0, 1)
    assert pair["intact"] and pair["mb_per_s"] > 0 and pair["bytes"] == 3 * 4 * 1024 * 1024


def test_doctor_cli_exits_nonzero_on_a_real_no_go(cluster_with_ixsmi, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    cfg = write_config(tmp_path, "nogo", nodes=3, storage_path=str(tmp_path / "a-file" / "runs"),
                       env={"NCCL_SOCKET_IFNAME": "nosuch0"})
    env = {**os.environ, "RAY_ADDRESS": cluster_with_ixsmi.address}
    proc = subprocess.run([sys.executable, "-m", "bi150_ray.cli", "doctor", cfg], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("NO-GO")
    fixes = [line for line in lines if line.startswith("fix ")]
    # the job wants 3 nodes, the cluster has 2; both nodes lack the interface and cannot write the path
    assert any(line.startswith("fix [nodes] cluster: add nodes") for line in fixes)
    assert sum(line.startswith("fix [interface] node") and "NCCL_SOCKET_IFNAME" in line for line in fixes) == 2
    assert sum(line.startswith("fix [storage] node") and "runtime.storage_path" in line for line in fixes) == 2
    assert any("no such interface" in line and "lo 127.0.0.1/8" in line for line in lines)
    assert any(line.startswith("all-reduce") and "SKIP" in line for line in lines)  # no ranks started on a no-go cluster


def test_job_start_preflight_stops_a_bad_job_before_any_rank_and_is_cheap_when_go(cluster_with_ixsmi, tmp_path):
    bad = config.load(write_config(tmp_path, "bad-if", env={"NCCL_SOCKET_IFNAME": "nosuch0"}))
    job = PretrainJob(bad)
    with pytest.raises(doctor.PreflightError) as e:
        job.run()
    assert "NO-GO" in str(e.value) and "no such interface" in str(e.value) and "runtime.preflight=false" in str(e.value)
    assert not os.path.exists(job.plan.node_paths(0).run_dir)  # nothing of the run was created, no rank started

    good = make_plan(config.load(write_config(tmp_path, "good", env={"NCCL_SOCKET_IFNAME": "lo"})))
    said = []
    t0 = time.time()
    report = doctor.preflight(good, said.append)
    seconds = time.time() - t0
    print(f"job-start pre-flight (cheap checks) took {seconds:.2f}s")
    assert report.verdict == "go" and said and said[0].startswith("pre-flight: go on 2 node(s)")
    assert report.collective is None  # the collective test is opt-in at job start
