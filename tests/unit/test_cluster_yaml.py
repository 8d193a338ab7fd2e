"""cluster.yaml, checked offline: Ray's own bootstrap (what `ray up` runs before any SSH), the shape of
the commands, and the commands' shell run the way the launcher runs it (Ray's own wrapping functions,
`bash --login -c -i ...`) against fake `ip`, `ray`, `python3` and `ixsmi`.

Not covered here (needs real hosts): SSH, rsync, `pip install` on a node, a real `ray start`, and
whether Ray on CoreX nodes behaves as on this CPU machine.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
FAKE_IXSMI_DIR = ROOT / "tests" / "fixtures" / "bin"  # `ixsmi` printing the seed's real BI150 table
BI150_RAY = Path(sys.executable).parent / "bi150-ray"  # the real CLI of this venv
SUBNET = "10.31.10.0/24"  # what the fake `ip` outputs below are written for
HEAD_IP = "10.31.10.12"
SEED_RESOURCES = {"BI150": 16, "accelerator_type:BI-V150": 1}
PIP_INSTALL = re.compile(r"^\s*(\S*python3?\S* -m )?pip3? install\b")

# `ip -o -4 addr show` of a node whose training address sits on bond0. ib0's 10.31.100.104 shares the
# text prefix "10.31.10" (a string match would pick it); bond0 also has a secondary address.
IP_BOND0 = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eno1    inet 192.168.7.21/24 brd 192.168.7.255 scope global eno1\\       valid_lft forever preferred_lft forever
3: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever preferred_lft forever
5: ib0    inet 10.31.100.104/24 brd 10.31.100.255 scope global ib0\\       valid_lft forever preferred_lft forever
6: bond0    inet 10.31.10.104/24 brd 10.31.10.255 scope global bond0\\       valid_lft forever preferred_lft forever
6: bond0    inet 10.31.10.200/24 brd 10.31.10.255 scope global secondary bond0\\       valid_lft forever preferred_lft forever
"""
IP_NO_MATCH = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eno1    inet 192.168.7.21/24 brd 192.168.7.255 scope global eno1\\       valid_lft forever preferred_lft forever
5: ib0    inet 10.31.100.104/24 brd 10.31.100.255 scope global ib0\\       valid_lft forever preferred_lft forever
"""
IP_TWO_MATCHES = IP_BOND0 + (
    "7: ens5f0    inet 10.31.10.9/24 brd 10.31.10.255 scope global ens5f0\\       valid_lft forever preferred_lft forever\n"
)


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def bootstrap(config: dict) -> dict:
    """The prepare + validate (+ no-op local provider bootstrap) that `ray up` runs; no SSH, no network."""
    from ray.autoscaler.sdk import bootstrap_config

    return bootstrap_config(copy.deepcopy(config), no_config_cache=True)


def start_command(commands: list[str]) -> str:
    (cmd,) = [c for c in commands if "ray start" in c]
    return cmd


def node_env_snippet(cfg: dict) -> str:
    (snippet,) = [c for c in cfg["head_start_ray_commands"] if "NCCL_SOCKET_IFNAME" in c]
    return snippet


def snippet_setting(cfg: dict, name: str) -> str:
    """A value the node-environment snippet sets (as the operator filled it in)."""
    match = re.search(rf"^{name}=(\S+)", node_env_snippet(cfg), re.M)
    assert match, name
    return match.group(1)


def pin_subnet(cmd: str) -> str:
    """The command with BI150_TRAIN_SUBNET set to SUBNET, so the bash tests hold after the operator edits it."""
    return re.sub(r"^BI150_TRAIN_SUBNET=\S+", f"BI150_TRAIN_SUBNET={SUBNET}", cmd, flags=re.M)


# --- Ray's own validation ----------------------------------------------------------------------


def test_ray_bootstrap_accepts_it(cfg: dict) -> None:
    prepared = bootstrap(cfg)
    assert prepared["head_node_type"] == "local.cluster.node"
    node_type = prepared["available_node_types"]["local.cluster.node"]
    assert (node_type["min_workers"], node_type["max_workers"], prepared["max_workers"]) == (3, 3, 3)
    assert node_type["resources"] == {}  # local provider: resources come only from `ray start --resources`
    # Our commands survive the default merge unchanged (on-prem defaults would otherwise start Ray bare).
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert prepared[key] == cfg[key], key


@pytest.mark.parametrize(
    "path, typo",
    [
        (("worker_start_ray_commands",), "worker_start_ray_command"),
        (("file_mounts",), "file_mount"),
        (("auth", "ssh_private_key"), "ssh_privat_key"),
    ],
)
def test_ray_bootstrap_rejects_a_typo(cfg: dict, path: tuple[str, ...], typo: str) -> None:
    import jsonschema

    bad = copy.deepcopy(cfg)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    parent[typo] = parent.pop(path[-1])
    with pytest.raises(
        jsonschema.ValidationError, match=rf"Additional properties are not allowed \('{typo}'"
    ):
        bootstrap(bad)


# --- shape ---------------------------------------------------------------------------------------


def test_one_head_and_three_workers_on_the_training_subnet(cfg: dict) -> None:
    provider = cfg["provider"]
    ips = [provider["head_ip"], *provider["worker_ips"]]
    assert len(ips) == 4 and len(set(ips)) == 4, ips
    subnet = ipaddress.ip_network(snippet_setting(cfg, "BI150_TRAIN_SUBNET"))
    assert all(ipaddress.ip_address(ip) in subnet for ip in ips), (ips, subnet)
    assert cfg["min_workers"] == cfg["max_workers"] == len(provider["worker_ips"]) == 3
    assert "REPLACE" in CLUSTER_YAML.read_text(encoding="utf-8")


def test_start_commands_take_the_bi150_count_from_ixsmi(cfg: dict) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = cfg[key]
        assert commands[0] == "ray stop", key
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("node-resources" in c for c in starts), key
        for cmd in starts:
            assert cmd.startswith("set -euo pipefail\n"), key
            # A failing $(...) inside `ray start`'s arguments would not stop the shell, even under set -e.
            assert re.search(r'^resources="\$\(bi150-ray node-resources\)"$', cmd, re.M), key
            assert '--resources="$resources"' in cmd and "--num-gpus=0" in cmd, key
            assert '--node-ip-address="$BI150_NODE_IP"' in cmd, key


def test_dashboard_only_on_the_head_loopback(cfg: dict) -> None:
    head = start_command(cfg["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    # Without it the head never starts the workers.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "0.0.0.0" not in CLUSTER_YAML.read_text(encoding="utf-8")
    assert '--address="$RAY_HEAD_IP:6379"' in start_command(cfg["worker_start_ray_commands"])


def test_token_auth_is_on(cfg: dict) -> None:
    assert "export RAY_AUTH_MODE=token" in node_env_snippet(cfg)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmd = start_command(cfg[key])
        assert cmd.index("source ~/.bi150-ray/node.env") < cmd.index("ray start"), key
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text(encoding="utf-8")


def test_setup_keeps_the_vendor_paddle(cfg: dict) -> None:
    setup = cfg["setup_commands"]
    assert "[cpu" not in "\n".join(setup)
    installs = [line for cmd in setup for line in cmd.splitlines() if PIP_INSTALL.match(line)]
    assert installs == ["python3 -m pip install -e ~/bi150-ray"], installs  # no extra, no paddle
    guard = next(i for i, c in enumerate(setup) if "import paddle; print(" in c)
    install = next(i for i, c in enumerate(setup) if "pip install" in c)
    assert guard < install
    for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands"):
        assert "pip" not in "\n".join(cfg.get(key, [])), key


def test_file_mounts_exist_relative_to_the_repo_root(cfg: dict) -> None:
    for remote, local in cfg["file_mounts"].items():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"{remote}: {local} (ray up runs from the repository root)"
    assert (ROOT / "jobs/configs/bi150-4node.runtime.json").exists()


def test_subnet_and_snippet_in_one_place(cfg: dict) -> None:
    subnet = snippet_setting(cfg, "BI150_TRAIN_SUBNET")
    assert CLUSTER_YAML.read_text(encoding="utf-8").count(subnet) == 1
    worker = [c for c in cfg["worker_start_ray_commands"] if "NCCL_SOCKET_IFNAME" in c]
    assert worker == [node_env_snippet(cfg)]  # the YAML alias: one snippet for every node


# --- the node-environment snippet under bash ----------------------------------------------------


def fake_bin(tmp_path: Path, ip_output: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "ip.out").write_text(ip_output, encoding="utf-8")
    ip = bin_dir / "ip"
    ip.write_text(
        "#!/bin/bash\n"
        '[ "$*" = "-o -4 addr show" ] || { echo "fake ip: unexpected arguments: $*" >&2; exit 64; }\n'
        f"exec /bin/cat {tmp_path / 'ip.out'}\n",
        encoding="utf-8",
    )
    ip.chmod(0o755)
    return bin_dir


def run_snippet(cfg: dict, tmp_path: Path, ip_output: str) -> tuple[subprocess.CompletedProcess, Path]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": f"{fake_bin(tmp_path, ip_output)}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    proc = subprocess.run(
        ["bash", "-c", pin_subnet(node_env_snippet(cfg))], env=env, capture_output=True, text=True, timeout=60
    )
    return proc, home / ".bi150-ray" / "node.env"


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value
    return out


def test_snippet_picks_the_interface_holding_the_subnet(cfg: dict, tmp_path: Path) -> None:
    proc, env_file = run_snippet(cfg, tmp_path, IP_BOND0)
    assert proc.returncode == 0, proc.stderr
    assert read_env_file(env_file) == {
        "RAY_AUTH_MODE": "token",
        "BI150_NODE_IP": "10.31.10.104",
        "NCCL_SOCKET_IFNAME": "bond0",
        "NCCL_IB_HCA": snippet_setting(cfg, "NCCL_IB_HCA"),
        "FLAGS_enable_ixdnn_attn": "true",
    }
    assert "training interface bond0, address 10.31.10.104" in proc.stdout


def test_snippet_fails_clearly_when_no_interface_matches(cfg: dict, tmp_path: Path) -> None:
    proc, env_file = run_snippet(cfg, tmp_path, IP_BOND0)
    assert env_file.exists()
    proc, env_file = run_snippet(cfg, tmp_path, IP_NO_MATCH)
    assert proc.returncode != 0
    assert (
        f"no interface on {os.uname().nodename} has an IPv4 address in the training subnet {SUBNET}"
        in proc.stderr
    )
    assert "ib0=10.31.100.104" in proc.stderr and "fix BI150_TRAIN_SUBNET in cluster.yaml" in proc.stderr
    assert not env_file.exists()  # the previous run's file is gone: nothing stale to source


def test_snippet_refuses_two_interfaces_on_the_subnet(cfg: dict, tmp_path: Path) -> None:
    proc, env_file = run_snippet(cfg, tmp_path, IP_TWO_MATCHES)
    assert proc.returncode != 0
    assert f"both bond0 and ens5f0 hold an address in {SUBNET}" in proc.stderr
    assert not env_file.exists()


# --- the start commands as the launcher runs them -----------------------------------------------


def launcher_shell(cmd: str, env_vars: dict | None = None) -> str:
    """The remote command line SSHCommandRunner.run builds (login shells on, Ray's default)."""
    from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive

    if env_vars:
        cmd = _with_environment_variables(cmd, env_vars)
    return " ".join(_with_interactive(cmd))  # ssh joins its arguments; the remote shell runs them with -c


@pytest.fixture
def node(tmp_path: Path) -> dict:
    """A fake node: HOME whose ~/.bashrc puts fake ip/ray/python3 and the real bi150-ray on PATH."""
    if not BI150_RAY.exists():
        pytest.skip(f"{BI150_RAY} is not installed")
    bin_dir = fake_bin(tmp_path, IP_BOND0)
    (bin_dir / "bi150-ray").symlink_to(BI150_RAY)
    ray = bin_dir / "ray"
    ray.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "keys = ('RAY_AUTH_MODE', 'NCCL_SOCKET_IFNAME', 'NCCL_IB_HCA', 'FLAGS_enable_ixdnn_attn', 'RAY_HEAD_IP',\n"
        "        'RAY_enable_autoscaler_v2')\n"
        "with open(os.path.expanduser('~/ray-calls.jsonl'), 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in keys}}) + '\\n')\n",
        encoding="utf-8",
    )
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = -m ]; then echo "$*" >> ~/pip-calls.log; exit 0; fi\n'
        'if [ -n "${FAKE_NO_PADDLE:-}" ]; then echo "ModuleNotFoundError: No module named \'paddle\'" >&2; exit 1; fi\n'
        "echo 2.5.2+corex\n",
        encoding="utf-8",
    )
    ray.chmod(0o755)
    python3.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {"home": home, "bin": bin_dir}


def run_as_launcher(
    node: dict, commands: list[str], env_vars: dict | None = None, ixsmi: bool = True, **extra_env: str
) -> subprocess.CompletedProcess:
    """Run a command list like NodeUpdater: one remote shell per command, stop at the first failure."""
    path = f"{node['bin']}:{FAKE_IXSMI_DIR}" if ixsmi else str(node["bin"])
    (node["home"] / ".bashrc").write_text(f'export PATH="{path}:$PATH"\n', encoding="utf-8")
    env = {"HOME": str(node["home"]), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **extra_env}
    proc = None
    for cmd in commands:
        proc = subprocess.run(
            ["bash", "-c", launcher_shell(cmd, env_vars)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # `bash -i` must not grab the test's terminal
        )
        if proc.returncode != 0:
            break
    assert proc is not None
    return proc


def ray_calls(node: dict) -> list[dict]:
    log = node["home"] / "ray-calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def head_commands(cfg: dict) -> list[str]:
    from ray.autoscaler._private.util import with_envs

    # commands.get_or_create_head_node (autoscaler v2, the default for `ray up` since Ray 2.50)
    return with_envs(
        [pin_subnet(c) for c in cfg["head_start_ray_commands"]],
        {
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": HEAD_IP,
            "RAY_NODE_TYPE_NAME": "local.cluster.node",
        },
    )


def worker_commands(cfg: dict) -> list[str]:
    from ray.autoscaler._private.util import with_envs

    # v2 instance_manager/ray_installer.py
    return with_envs(
        [pin_subnet(c) for c in cfg["worker_start_ray_commands"]],
        {
            "RAY_HEAD_IP": HEAD_IP,
            "RAY_CLOUD_INSTANCE_ID": "10.31.10.104",
            "RAY_NODE_TYPE_NAME": "local.cluster.node",
            "RAY_CLOUD_INSTANCE_TYPE_NAME": "local.cluster.node",
        },
    )


def test_head_starts_with_the_ixsmi_count_token_auth_and_vendor_env(cfg: dict, node: dict) -> None:
    proc = run_as_launcher(node, head_commands(cfg), {"RAY_USAGE_STATS_ENABLED": 0})
    assert proc.returncode == 0, proc.stderr
    stop, start = ray_calls(node)
    assert stop["argv"] == ["stop"]
    argv = start["argv"]
    assert argv[:2] == ["start", "--head"]
    assert "--dashboard-host=127.0.0.1" in argv and "--node-ip-address=10.31.10.104" in argv
    (resources,) = [a for a in argv if a.startswith("--resources=")]
    assert json.loads(resources.partition("=")[2]) == SEED_RESOURCES
    assert start["env"] == {
        "RAY_AUTH_MODE": "token",
        "NCCL_SOCKET_IFNAME": "bond0",
        "NCCL_IB_HCA": snippet_setting(cfg, "NCCL_IB_HCA"),
        "FLAGS_enable_ixdnn_attn": "true",
        "RAY_HEAD_IP": None,
        # Not the launcher's 1: autoscaler v2 on the local provider never starts the last worker.
        "RAY_enable_autoscaler_v2": "0",
    }


def test_worker_joins_the_head_with_the_ixsmi_count(cfg: dict, node: dict) -> None:
    proc = run_as_launcher(node, worker_commands(cfg))
    assert proc.returncode == 0, proc.stderr
    start = ray_calls(node)[-1]
    assert start["argv"][:2] == ["start", f"--address={HEAD_IP}:6379"]
    (resources,) = [a for a in start["argv"] if a.startswith("--resources=")]
    assert json.loads(resources.partition("=")[2]) == SEED_RESOURCES
    assert start["env"]["RAY_AUTH_MODE"] == "token" and start["env"]["NCCL_SOCKET_IFNAME"] == "bond0"


@pytest.mark.parametrize(
    "which, ixsmi, extra_env, says",
    [
        ("head", False, {}, "ixsmi"),
        ("worker", False, {}, "ixsmi"),
        ("worker", True, {"FAKE_IXSMI_EXIT": "9"}, "Driver/library version mismatch"),
    ],
)
def test_node_does_not_start_when_ixsmi_fails(
    cfg: dict, node: dict, which: str, ixsmi: bool, extra_env: dict, says: str
) -> None:
    commands = head_commands(cfg) if which == "head" else worker_commands(cfg)
    proc = run_as_launcher(node, commands, ixsmi=ixsmi, **extra_env)
    assert proc.returncode != 0
    assert "bi150-ray: error:" in proc.stderr and says in proc.stderr
    assert [c["argv"] for c in ray_calls(node)] == [["stop"]]  # `ray start` never ran


def test_setup_installs_the_project_only_when_the_vendor_paddle_imports(cfg: dict, node: dict) -> None:
    (node["home"] / ".ray").mkdir()
    (node["home"] / ".ray" / "auth_token").write_text("t" * 32)
    proc = run_as_launcher(node, cfg["setup_commands"])
    assert proc.returncode == 0, proc.stderr
    assert (node["home"] / "pip-calls.log").read_text().split() == [
        "-m",
        "pip",
        "install",
        "-e",
        str(node["home"] / "bi150-ray"),
    ]
    assert (node["home"] / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600

    (node["home"] / "pip-calls.log").unlink()
    proc = run_as_launcher(node, cfg["setup_commands"], FAKE_NO_PADDLE="1")
    assert proc.returncode != 0
    assert "'python3 -c \"import paddle\"' fails on" in proc.stderr and "Nothing was installed" in proc.stderr
    assert not (node["home"] / "pip-calls.log").exists()
