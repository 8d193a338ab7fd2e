"""The per-rank environment: pinned for the reference job and a CPU job, and checked against the
real ``python -m paddle.distributed.launch`` of the installed Paddle on this machine."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bi150_ray.envcontract import (
    BACKENDS,
    EnvContractError,
    RankEnvInput,
    endpoints_like_launch,
    rank_env,
    redact,
    select_passthrough,
    validate_backend,
    variables_to_unset,
    worker_environ,
)
from bi150_ray.topology import RankSlot, layout

# --------------------------------------------------------------------------------------------
# (a) The reference job: 4 nodes x 16 BI150, CoreX Paddle, args-mode endpoints from port 6070
# --------------------------------------------------------------------------------------------

REF_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
REF_PORT = 6070
REF_LOG_DIR = "/data/bi150-ray/run-0001/log"
REF_VISIBLE = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"
# The vendor variables of run_node4.sh.
REF_VENDOR = {"NCCL_SOCKET_IFNAME": "bond0", "NCCL_IB_HCA": "mlx5_0", "FLAGS_enable_ixdnn_attn": "true"}
# 10.0.0.1:6070 ... 10.0.0.1:6085, 10.0.0.2:6070, ..., 10.0.0.4:6085 (launch: ip-major, then port).
REF_ENDPOINTS = ",".join(f"{ip}:{REF_PORT + i}" for ip in REF_IPS for i in range(16))


def _reference_inputs() -> list[RankEnvInput]:
    endpoints = endpoints_like_launch(REF_IPS, 16, REF_PORT)
    return [
        RankEnvInput(
            slot=slot,
            world_size=64,
            nnodes=4,
            endpoints=endpoints,
            backend="corex",
            log_dir=REF_LOG_DIR,
            visible_devices=REF_VISIBLE,
            passthrough=REF_VENDOR,
        )
        for slot in layout(4, 16)
    ]


def test_reference_endpoints_string():
    assert REF_ENDPOINTS.startswith("10.0.0.1:6070,10.0.0.1:6071,")
    assert ",10.0.0.1:6085,10.0.0.2:6070," in REF_ENDPOINTS
    assert REF_ENDPOINTS.endswith(",10.0.0.4:6084,10.0.0.4:6085")
    assert len(REF_ENDPOINTS.split(",")) == 64


def test_reference_rank0_literally():
    assert rank_env(_reference_inputs()[0]) == {
        "PADDLE_MASTER": "10.0.0.1:6070",
        "PADDLE_GLOBAL_SIZE": "64",
        "PADDLE_LOCAL_SIZE": "16",
        "PADDLE_GLOBAL_RANK": "0",
        "PADDLE_LOCAL_RANK": "0",
        "PADDLE_NNODES": "4",
        "PADDLE_CURRENT_ENDPOINT": "10.0.0.1:6070",
        "PADDLE_TRAINER_ID": "0",
        "PADDLE_TRAINERS_NUM": "64",
        "PADDLE_RANK_IN_NODE": "0",
        "PADDLE_AUTO_CLUSTER": "0",
        "PADDLE_TRAINER_ENDPOINTS": REF_ENDPOINTS,
        "PADDLE_LOG_DIR": "/data/bi150-ray/run-0001/log",
        "POD_NAME": "node0",
        "FLAGS_selected_gpus": "0",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "NCCL_SOCKET_IFNAME": "bond0",
        "NCCL_IB_HCA": "mlx5_0",
        "FLAGS_enable_ixdnn_attn": "true",
    }


def test_reference_rank17_literally():
    # Node 1 (10.0.0.2), second device; pipeline stage 2, sharding rank 1.
    assert rank_env(_reference_inputs()[17]) == {
        "PADDLE_MASTER": "10.0.0.1:6070",
        "PADDLE_GLOBAL_SIZE": "64",
        "PADDLE_LOCAL_SIZE": "16",
        "PADDLE_GLOBAL_RANK": "17",
        "PADDLE_LOCAL_RANK": "1",
        "PADDLE_NNODES": "4",
        "PADDLE_CURRENT_ENDPOINT": "10.0.0.2:6071",
        "PADDLE_TRAINER_ID": "17",
        "PADDLE_TRAINERS_NUM": "64",
        "PADDLE_RANK_IN_NODE": "1",
        "PADDLE_AUTO_CLUSTER": "0",
        "PADDLE_TRAINER_ENDPOINTS": REF_ENDPOINTS,
        "PADDLE_LOG_DIR": "/data/bi150-ray/run-0001/log",
        "POD_NAME": "node1",
        "FLAGS_selected_gpus": "1",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        "NCCL_SOCKET_IFNAME": "bond0",
        "NCCL_IB_HCA": "mlx5_0",
        "FLAGS_enable_ixdnn_attn": "true",
    }


def test_reference_every_rank_full_environment():
    """All 64 environments, each computed from first principles and compared as whole dicts."""
    envs = [rank_env(inp) for inp in _reference_inputs()]
    for rank, env in enumerate(envs):
        node, local = divmod(rank, 16)
        expected = {
            "PADDLE_MASTER": "10.0.0.1:6070",  # args mode: master = first endpoint
            "PADDLE_GLOBAL_SIZE": "64",
            "PADDLE_LOCAL_SIZE": "16",
            "PADDLE_GLOBAL_RANK": str(rank),
            "PADDLE_LOCAL_RANK": str(local),
            "PADDLE_NNODES": "4",
            "PADDLE_CURRENT_ENDPOINT": f"10.0.0.{node + 1}:{6070 + local}",
            "PADDLE_TRAINER_ID": str(rank),
            "PADDLE_TRAINERS_NUM": "64",
            "PADDLE_RANK_IN_NODE": str(local),
            "PADDLE_AUTO_CLUSTER": "0",
            "PADDLE_TRAINER_ENDPOINTS": REF_ENDPOINTS,
            "PADDLE_LOG_DIR": REF_LOG_DIR,
            "POD_NAME": f"node{node}",
            "FLAGS_selected_gpus": str(local),  # index into CUDA_VISIBLE_DEVICES
            "CUDA_VISIBLE_DEVICES": REF_VISIBLE,
            **REF_VENDOR,
        }
        assert env == expected, rank
        # No CPU or custom-device variables leak into a CoreX rank.
        assert "PADDLE_DISTRI_BACKEND" not in env and "PADDLE_XCCL_BACKEND" not in env
    assert len({e["PADDLE_CURRENT_ENDPOINT"] for e in envs}) == 64


def test_reference_without_visible_list_inherits_like_launch():
    # The vendor scripts unset CUDA_VISIBLE_DEVICES: labels are 0..15 and nothing is exported.
    inp = _reference_inputs()[5]
    env = rank_env(dataclasses.replace(inp, visible_devices=None))
    assert env["FLAGS_selected_gpus"] == "5"
    assert "CUDA_VISIBLE_DEVICES" not in env


# --------------------------------------------------------------------------------------------
# (b) A 2-node CPU job, 2 ranks per node, all on 127.0.0.1
# --------------------------------------------------------------------------------------------

CPU_ENDPOINTS = ("127.0.0.1:36100", "127.0.0.1:36101", "127.0.0.1:36102", "127.0.0.1:36103")
CPU_ENDPOINTS_STR = "127.0.0.1:36100,127.0.0.1:36101,127.0.0.1:36102,127.0.0.1:36103"


def _cpu_envs() -> list[dict[str, str]]:
    return [
        rank_env(
            RankEnvInput(
                slot=slot,
                world_size=4,
                nnodes=2,
                endpoints=CPU_ENDPOINTS,
                backend="cpu",
                log_dir="/tmp/bi150-ray/demo/log",
            )
        )
        for slot in layout(2, 2)
    ]


def test_cpu_two_nodes_full_environment():
    common = {
        "PADDLE_MASTER": "127.0.0.1:36100",
        "PADDLE_GLOBAL_SIZE": "4",
        "PADDLE_LOCAL_SIZE": "2",
        "PADDLE_NNODES": "2",
        "PADDLE_TRAINERS_NUM": "4",
        "PADDLE_AUTO_CLUSTER": "0",
        "PADDLE_TRAINER_ENDPOINTS": CPU_ENDPOINTS_STR,
        "PADDLE_LOG_DIR": "/tmp/bi150-ray/demo/log",
        "PADDLE_DISTRI_BACKEND": "gloo",
    }
    assert _cpu_envs() == [
        {
            **common,
            "PADDLE_GLOBAL_RANK": "0",
            "PADDLE_LOCAL_RANK": "0",
            "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:36100",
            "PADDLE_TRAINER_ID": "0",
            "PADDLE_RANK_IN_NODE": "0",
            "POD_NAME": "node0",
        },
        {
            **common,
            "PADDLE_GLOBAL_RANK": "1",
            "PADDLE_LOCAL_RANK": "1",
            "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:36101",
            "PADDLE_TRAINER_ID": "1",
            "PADDLE_RANK_IN_NODE": "1",
            "POD_NAME": "node0",
        },
        {
            **common,
            "PADDLE_GLOBAL_RANK": "2",
            "PADDLE_LOCAL_RANK": "0",
            "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:36102",
            "PADDLE_TRAINER_ID": "2",
            "PADDLE_RANK_IN_NODE": "0",
            "POD_NAME": "node1",
        },
        {
            **common,
            "PADDLE_GLOBAL_RANK": "3",
            "PADDLE_LOCAL_RANK": "1",
            "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:36103",
            "PADDLE_TRAINER_ID": "3",
            "PADDLE_RANK_IN_NODE": "1",
            "POD_NAME": "node1",
        },
    ]


def test_cpu_has_no_device_selection():
    for env in _cpu_envs():
        assert not any(k.startswith("FLAGS_selected_") for k in env)
        assert "CUDA_VISIBLE_DEVICES" not in env


# --------------------------------------------------------------------------------------------
# Other backends and inputs
# --------------------------------------------------------------------------------------------


def _one(backend: str = "corex", **over) -> RankEnvInput:
    base = {
        "slot": RankSlot(rank=1, node_index=0, local_rank=1, local_size=2),
        "world_size": 2,
        "nnodes": 1,
        "endpoints": ("10.1.1.1:7000", "10.1.1.1:7001"),
        "backend": backend,
        "log_dir": "/logs",
    }
    base.update(over)
    return RankEnvInput(**base)


def test_iluvatar_gpu_custom_device():
    env = rank_env(_one("iluvatar_gpu", visible_devices="0,1"))
    assert env["FLAGS_selected_iluvatar_gpus"] == "1"
    assert env["PADDLE_DISTRI_BACKEND"] == "xccl"
    assert env["PADDLE_XCCL_BACKEND"] == "iluvatar_gpu"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "FLAGS_selected_gpus" not in env


def test_selected_index_is_relative_to_the_visible_list():
    env = rank_env(_one(visible_devices="4,5,6,7", device="6"))
    assert env["FLAGS_selected_gpus"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    with pytest.raises(EnvContractError, match="visible_devices"):
        rank_env(_one(visible_devices="4,5", device="6"))


def test_explicit_master_and_pod_name():
    env = rank_env(_one(master="10.1.1.1:6999", pod_name="abcdef"))
    assert env["PADDLE_MASTER"] == "10.1.1.1:6999"
    assert env["POD_NAME"] == "abcdef"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"log_dir": "log"}, "absolute"),
        ({"endpoints": ("10.1.1.1:7000",)}, "endpoints"),
        ({"endpoints": ("10.1.1.1:7000", "10.1.1.1:7000")}, "distinct"),
        ({"endpoints": ("10.1.1.1:7000", "10.1.1.1")}, "ip:port"),
        ({"master": "10.1.1.1:0"}, "master"),
        ({"world_size": 1, "endpoints": ("10.1.1.1:7000",)}, "outside"),
        ({"slot": RankSlot(rank=1, node_index=0, local_rank=2, local_size=2)}, "local rank"),
        ({"slot": RankSlot(rank=1, node_index=1, local_rank=1, local_size=2)}, "node"),
    ],
)
def test_bad_inputs(over, match):
    with pytest.raises(EnvContractError, match=match):
        rank_env(_one(**over))


def test_backends():
    assert BACKENDS == ("cpu", "corex", "iluvatar_gpu")
    assert validate_backend("corex") == "corex"
    with pytest.raises(EnvContractError, match="cpu, corex, iluvatar_gpu"):
        validate_backend("cuda")
    with pytest.raises(EnvContractError, match="valid backends"):
        rank_env(_one("gpu"))


@pytest.mark.parametrize(
    "key",
    ["PADDLE_MASTER", "PADDLE_TRAINER_ID", "FLAGS_selected_gpus", "FLAGS_selected_xpus", "CUDA_VISIBLE_DEVICES",
     "PADDLE_DISTRI_BACKEND", "PADDLE_ELASTIC_JOB_ID", "POD_NAME"],
)  # fmt: skip
def test_passthrough_never_overrides_the_contract(key):
    with pytest.raises(EnvContractError, match=key):
        rank_env(_one(passthrough={key: "x"}))


def test_passthrough_adds_vendor_and_user_variables():
    env = rank_env(_one(passthrough={"NCCL_DEBUG": "INFO", "IXCCL_FOO": "1", "PADDLE_PG_TIMEOUT": "600000"}))
    assert env["NCCL_DEBUG"] == "INFO" and env["IXCCL_FOO"] == "1" and env["PADDLE_PG_TIMEOUT"] == "600000"
    with pytest.raises(EnvContractError, match="valid environment name"):
        rank_env(_one(passthrough={"BAD-NAME": "1"}))


def test_select_passthrough():
    environ = {
        "NCCL_SOCKET_IFNAME": "ib0",
        "NCCL_IB_HCA": "mlx5_0",
        "FLAGS_enable_ixdnn_attn": "true",
        "NCCL_DEBUG": "INFO",
        "IXCCL_ALGO": "ring",
        "FLAGS_selected_gpus": "3",
        "HOME": "/root",
    }
    assert select_passthrough(environ) == {
        "NCCL_SOCKET_IFNAME": "ib0",
        "NCCL_IB_HCA": "mlx5_0",
        "FLAGS_enable_ixdnn_attn": "true",
    }
    picked = select_passthrough(environ, ["NCCL_*", "IXCCL_*", "FLAGS_*"])
    assert "FLAGS_selected_gpus" not in picked and "HOME" not in picked
    assert picked["NCCL_DEBUG"] == "INFO" and picked["IXCCL_ALGO"] == "ring"


def test_variables_to_unset():
    assert set(variables_to_unset()) >= {
        "PADDLE_ELASTIC_JOB_ID",
        "PADDLE_TRAINER_ENDPOINTS",
        "DISTRIBUTED_TRAINER_ENDPOINTS",
        "FLAGS_START_PORT",
        "PADDLE_ELASTIC_TIMEOUT",
        "CUDA_VISIBLE_DEVICES",
    }


def test_worker_environ_cleans_the_inherited_environment():
    base = {
        "PATH": "/usr/bin",
        "PADDLE_DISTRI_BACKEND": "gloo",  # stale: would turn a CoreX rank into a CPU rank
        "FLAGS_selected_gpus": "7",
        "PADDLE_ELASTIC_JOB_ID": "old",
        "FLAGS_START_PORT": "6170",
        "CUDA_VISIBLE_DEVICES": "3",
        "http_proxy": "http://proxy:3128",
        "HTTPS_PROXY": "http://proxy:3128",
        "OMP_NUM_THREADS": "4",
    }
    contract = rank_env(_one(visible_devices="0,1"))
    env = worker_environ(base, contract)
    assert env == {
        "PATH": "/usr/bin",
        "http_proxy_original": "http://proxy:3128",
        "HTTPS_PROXY": "http://proxy:3128",  # launch only moves the lower-case ones
        "OMP_NUM_THREADS": "4",
        **contract,
    }
    assert worker_environ({}, contract)["OMP_NUM_THREADS"] == "1"
    # A proxy the user passes through explicitly survives.
    kept = worker_environ(base, rank_env(_one(passthrough={"http_proxy": "http://p:1"})))
    assert kept["http_proxy"] == "http://p:1"


def test_redact():
    env = {
        "HF_TOKEN": "hf_abc",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_ACCESS_KEY_ID": "AKIA",
        "DB_PASSWORD": "pw",
        "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
        "RAY_AUTH_MODE": "token",
        "github_token": "ghp",
        "MY_APIKEY": "k",
        "NCCL_IB_HCA": "mlx5_0",
        "NCCL_IB_PKEY": "0",
        "FLAGS_enable_ixdnn_attn": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PADDLE_MASTER": "10.0.0.1:6070",
        "PATH": "/usr/bin",
        "http_proxy": "http://user:hunter2@proxy:3128",
    }
    assert redact(env) == {
        "HF_TOKEN": "***",
        "AWS_SECRET_ACCESS_KEY": "***",
        "AWS_ACCESS_KEY_ID": "***",
        "DB_PASSWORD": "***",
        "GOOGLE_APPLICATION_CREDENTIALS": "***",
        "RAY_AUTH_MODE": "***",
        "github_token": "***",
        "MY_APIKEY": "***",
        "NCCL_IB_HCA": "mlx5_0",
        "NCCL_IB_PKEY": "0",
        "FLAGS_enable_ixdnn_attn": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PADDLE_MASTER": "10.0.0.1:6070",
        "PATH": "/usr/bin",
        "http_proxy": "http://user:***@proxy:3128",
    }
    assert env["HF_TOKEN"] == "hf_abc"  # the input is untouched


def test_module_imports_only_the_standard_library():
    root = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); import bi150_ray.envcontract; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp', 'ray', 'numpy')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# (c) Agreement with the real launcher: 1 node x 2 CPU ranks
# --------------------------------------------------------------------------------------------

_DUMP_ENV = textwrap.dedent(
    """
    import json, os, sys
    rank = os.environ["PADDLE_TRAINER_ID"]
    with open(os.path.join(sys.argv[1], f"env.{rank}.json"), "w") as f:
        json.dump(dict(os.environ), f)
    """
)
# Added by launch but deliberately not by us (see the envcontract module docstring), and the
# per-launch random pod name.
_LAUNCH_ONLY = {"PADDLE_BACKUP_ENV_PATH", "CUSTOM_DEVICE_ROOT"}


def _free_port_pair() -> int:
    """A port p such that p and p+1 are both free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 1 >= 65536:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _launcher_env() -> dict[str, str]:
    """This process's environment without anything that would steer the launcher."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PADDLE_", "FLAGS_", "POD_", "DISTRIBUTED_", "CUDA_", "XPU", "ILUVATAR"))
        # CUSTOM_DEVICE_ROOT is set by `import paddle`: present only if an earlier test imported it.
        and k not in ("http_proxy", "https_proxy", "CUSTOM_DEVICE_ROOT")
    }
    env["http_proxy"] = "http://user:pw@proxy.invalid:3128"  # launch moves it to http_proxy_original
    env["BI150_RAY_MARKER"] = "kept"
    return env


def _start_launch(cwd: Path, extra_args: list[str], base: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir(parents=True)
    (cwd / "dump_env.py").write_text(_DUMP_ENV)
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", "tmp"]
    cmd += extra_args + ["dump_env.py", str(cwd)]
    return subprocess.Popen(
        cmd, cwd=cwd, env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, cwd: Path) -> list[dict[str, str]]:
    out, _ = proc.communicate(timeout=50)
    assert proc.returncode == 0, out[-4000:]
    return [json.loads((cwd / f"env.{r}.json").read_text()) for r in range(2)]


def test_rank_env_agrees_with_real_launch(tmp_path):
    """Both pod-building modes of the installed launcher, run side by side (well under 60 s)."""
    base = _launcher_env()
    port = _free_port_pair()
    args_dir, master_dir = tmp_path / "args_mode", tmp_path / "master_mode"
    procs = [
        _start_launch(args_dir, ["--ips", "127.0.0.1", "--start_port", str(port)], base),
        _start_launch(master_dir, [], base),
    ]
    args_envs = _finish(procs[0], args_dir)
    master_envs = _finish(procs[1], master_dir)

    for mode_dir, launched, master in (
        (args_dir, args_envs, None),  # args mode: master = first endpoint
        (master_dir, master_envs, master_envs[0]["PADDLE_MASTER"]),  # master mode: node's own port
    ):
        pod = launched[0]["POD_NAME"]
        assert len(pod) == 6 and pod.isalpha() and launched[1]["POD_NAME"] == pod
        # Normalise what launch picks itself (ports, in master mode) by feeding it back in.
        endpoints = tuple(launched[0]["PADDLE_TRAINER_ENDPOINTS"].split(","))
        if mode_dir is args_dir:
            assert endpoints == endpoints_like_launch(["127.0.0.1"], 2, port)
        for rank, theirs in enumerate(launched):
            ours = rank_env(
                RankEnvInput(
                    slot=layout(1, 2)[rank],
                    world_size=2,
                    nnodes=1,
                    endpoints=endpoints,
                    backend="cpu",
                    log_dir=str(mode_dir / "tmp"),
                    master=master,
                    pod_name=pod,
                )
            )
            their_paddle = {
                k: v for k, v in theirs.items() if k.startswith("PADDLE_") and k not in _LAUNCH_ONLY
            }
            our_paddle = {k: v for k, v in ours.items() if k.startswith("PADDLE_")}
            assert our_paddle == their_paddle, (mode_dir.name, rank)
            assert not any(k.startswith("FLAGS_selected_") for k in theirs)
            # The whole worker environment, not just PADDLE_*: inherited variables, the proxy move
            # and OMP_NUM_THREADS included.
            assert worker_environ(base, ours) == {k: v for k, v in theirs.items() if k not in _LAUNCH_ONLY}
            assert theirs["BI150_RAY_MARKER"] == "kept" and "http_proxy" not in theirs
