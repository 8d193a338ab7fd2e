"""`ray up cluster.yaml` on four hosts, then the tiny pretraining job with `ray job submit`, then `ray down`.

The hosts are network namespaces on this machine (tests/integration/netns_hosts.py): each has its own
address on a bridge, an sshd, a private /tmp and home, its own Python and the fake `ixsmi`. The
launcher, SSH, rsync, the setup commands, `ray start` with token auth, the autoscaler on the head
starting the workers, the job API reached the way docs/CLUSTER.md says (an SSH port-forward of the
head's loopback-only dashboard) and the ranks' gloo traffic between hosts are all real. The
cluster.yaml used is the repository's, with only its REPLACE items changed.
"""

from __future__ import annotations

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
import yaml

from bi150_ray.demo import write_demo_config
from tests.integration.netns_hosts import Host, NetnsHosts, private_mounts

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLUSTER_YAML = REPO / "cluster.yaml"
SUBNET = "10.77.0"  # private; nothing else on this machine uses it
SEED_BI150 = 16  # devices in the seed's ixsmi output (tests/fixtures/ixsmi_seed.txt)
RUN = "netns"
STEPS = 6


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, bind mounts and sshd"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` is unavailable here ({exc})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return f"--- {path} ---\n{path.read_text(errors='replace')[-n:]}\n"
    except OSError:
        return f"--- {path}: missing ---\n"


class Launcher:
    """Runs the `ray` cluster-launcher CLI as a user would, from the repository root.

    HOME is a temporary one holding the cluster's token (~/.ray/auth_token, shipped by file_mounts),
    and the launcher gets a private /tmp for its state (/tmp/ray/cluster-bi150.state, SSH control
    sockets), so nothing of this run is left on the machine.
    """

    def __init__(self, root: Path, config: Path) -> None:
        self.root, self.config = root, config
        self.home, self.tmp = root / "home", root / "tmp"
        for d in (self.home, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        self.env = env

    def argv(self, *args: str) -> list[str]:
        script = "set -e\n" + private_mounts({"/tmp": self.tmp}) + 'exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(BIN / "ray"), *args]

    def run(self, *args: str, timeout: float = 120, log: Path | None = None) -> subprocess.CompletedProcess:
        if log is None:
            return subprocess.run(self.argv(*args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        with open(log, "w") as fh:
            out = subprocess.run(self.argv(*args), cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                 text=True, timeout=timeout)
        out.stdout = log.read_text(errors="replace")
        return out

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A Ray client command (`ray job ...`, `ray list ...`) from the repository root."""
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def cluster_copy(hosts: NetnsHosts, dest: Path) -> Path:
    """The repository's cluster.yaml with only its REPLACE items pointed at the hosts."""
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    cfg = yaml.safe_load(text)
    head, *workers = hosts.hosts
    cfg["provider"]["head_ip"] = head.ip
    cfg["provider"]["worker_ips"] = [w.ip for w in workers]
    cfg["auth"]["ssh_user"] = "root"
    cfg["auth"]["ssh_private_key"] = str(hosts.key)
    old = re.search(r"^\s*BI150_TRAIN_SUBNET=(\S+)", text, re.M).group(1)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        replaced = [c.replace(f"BI150_TRAIN_SUBNET={old}", f"BI150_TRAIN_SUBNET={SUBNET}.0/24") for c in cfg[key]]
        assert replaced != cfg[key], f"no BI150_TRAIN_SUBNET in {key}"
        cfg[key] = replaced
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


@pytest.fixture
def netns_hosts():
    reason = _why_skip()
    if reason:
        pytest.skip(reason)
    missing = [p for p in ("/usr/sbin/sshd", shutil.which("rsync"), shutil.which("ssh")) if not p or not os.path.exists(p)]
    assert not missing, "sshd, ssh and rsync are needed: apt-get install openssh-server rsync (.ci/run does)"
    # Not under /tmp or /root: the hosts see their own there, and everything else is shared (like a
    # shared data mount), which is where the job's config, tokenizer and corpus go.
    base = Path(tempfile.mkdtemp(prefix="bi150-netns-", dir="/var/tmp"))
    hosts = NetnsHosts(base / "hosts", count=4, subnet=SUBNET)
    try:
        with hosts:
            yield hosts, base
    finally:
        shutil.rmtree(base, ignore_errors=True)
        assert not hosts.errors, hosts.errors
        assert not hosts.leftovers(), f"left behind: {hosts.leftovers()}"


def _session_logs(host: Host) -> Path:
    """The host's Ray log dir (session_latest links to a path as the host sees it)."""
    link = host.tmp / "ray" / "session_latest"
    try:
        return host.seen(os.readlink(link)) / "logs"
    except OSError:
        return link / "logs"


def _diagnostics(hosts: NetnsHosts, launcher: Launcher) -> str:
    out = _tail(launcher.root / "ray_up.log", 6000)
    for name in ("monitor.log", "monitor.out", "monitor.err"):
        out += _tail(_session_logs(hosts.hosts[0]) / name)
    for host in hosts.hosts:
        out += _tail(_session_logs(host) / "raylet.out", 1500)
        out += f"--- {host.name} processes ---\n" + "\n".join(p[:160] for p in host.processes()) + "\n"
    return out


def _alive_nodes(launcher: Launcher, address: str) -> list[dict]:
    out = launcher.client("list", "nodes", "--address", address, "--format", "json", "--detail", timeout=60)
    if out.returncode != 0:
        return []
    return [n for n in json.loads(out.stdout) if n.get("state") == "ALIVE"]


def _submit(launcher: Launcher, address: str, config: str) -> str:
    for _ in range(60):  # the head's job agent needs a few seconds after `ray start`
        out = launcher.client("job", "submit", "--address", address, "--no-wait", "--working-dir", ".", "--",
                              "python", "jobs/pretrain.py", "--config", config)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return re.search(r"Job '([^']+)' submitted successfully", out.stdout + out.stderr).group(1)


def test_ray_up_four_hosts_runs_the_job_with_ranks_on_every_host(netns_hosts):
    hosts, base = netns_hosts
    head, *workers = hosts.hosts
    t0 = time.time()
    config = cluster_copy(hosts, base / "cluster.yaml")
    launcher = Launcher(base / "runner", config)
    token = launcher.client("get-auth-token", "--generate")
    assert token.returncode == 0, token.stderr
    (launcher.home / ".ray" / "auth_token").chmod(0o600)

    # The job: the tiny model, one rank per host (dp 2 x sharding 2 over 4 hosts), node-local storage
    # (/tmp/... is each host's own), config and data on the shared path.
    cfg_path = write_demo_config(str(base / "shared" / "job"), max_steps=STEPS)
    job = json.loads(Path(cfg_path).read_text())
    job.update(eval_steps=STEPS, save_steps=STEPS)
    job["runtime"].update(nodes=4, devices_per_node=1, storage_path="/tmp/bi150-job/node", shared_storage=False,
                          results_path="/tmp/bi150-job/results", run_name=RUN)
    Path(cfg_path).write_text(json.dumps(job, indent=1))

    forward = None
    try:
        up = launcher.run("up", "-y", "--no-config-cache", str(config), timeout=900, log=launcher.root / "ray_up.log")
        t_up = time.time() - t0
        assert up.returncode == 0, _diagnostics(hosts, launcher)

        # The job API only listens on the head's loopback; reach it through `ray dashboard` (an SSH
        # port-forward), as docs/CLUSTER.md says.
        with pytest.raises(OSError):
            socket.create_connection((head.ip, 8265), timeout=3).close()
        port = _free_port()
        forward = subprocess.Popen(launcher.argv("dashboard", "--port", str(port), str(config)), cwd=REPO,
                                   env=launcher.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        address = f"http://127.0.0.1:{port}"

        # All four nodes, each advertising the seed's 16 BI150 (workers are started by the head's autoscaler).
        nodes: list[dict] = []
        deadline = time.time() + 600
        while time.time() < deadline:
            nodes = _alive_nodes(launcher, address)
            if len(nodes) == 4:
                break
            assert forward.poll() is None, "the dashboard port-forward exited"
            time.sleep(5)
        t_nodes = time.time() - t0
        assert sorted(n["node_ip"] for n in nodes) == [h.ip for h in hosts.hosts], _diagnostics(hosts, launcher)
        for n in nodes:
            assert n["resources_total"].get("BI150") == SEED_BI150, n
            assert n["resources_total"].get("accelerator_type:BI-V150") == 1, n
        # `ray status` is the autoscaler's view, which trails node registration by a report or two.
        want = f"0.0/{4 * SEED_BI150}.0 BI150"
        deadline = time.time() + 120
        while True:
            status = launcher.run("exec", str(config), "source ~/.bi150-ray/node.env && ray status")
            assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
            if want in status.stdout or time.time() > deadline:
                break
            time.sleep(5)
        assert want in status.stdout, status.stdout[-3000:]

        # Each host installed the synced copy of the project into its own Python.
        for host in hosts.hosts:
            env_file = (host.home / ".bi150-ray" / "node.env").read_text()
            assert f"BI150_NODE_IP={host.ip}" in env_file and "NCCL_SOCKET_IFNAME=eth0" in env_file, env_file
            where = hosts.ssh(host, "python3 -c 'import bi150_ray; print(bi150_ray.__file__)'")
            assert where.stdout.strip() == "/root/bi150-ray/bi150_ray/__init__.py", where.stdout + where.stderr

        job_id = _submit(launcher, address, cfg_path)
        state = ""
        deadline = time.time() + 600
        while time.time() < deadline:
            out = launcher.client("job", "status", "--address", address, job_id)
            said = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out.stdout + out.stderr)
            state = said.group(1) if said else ""
            if state:
                break
            time.sleep(5)
        t_job = time.time() - t0
        logs = launcher.client("job", "logs", "--address", address, job_id).stdout
        assert state == "succeeded", logs[-5000:]

        summary = json.loads(re.search(r"^BI150_RAY_RESULT (.*)$", logs, re.M).group(1))
        assert summary["status"] == "succeeded" and summary["last_step"] == STEPS, summary
        assert "degrees: dp 2 x sharding 2 (stage1)" in logs
        # The run record (on the head's disk) names every host; each host's own disk has its rank's log.
        record = json.loads(head.seen(summary["run_record"]).read_text())
        placed = record["attempts"][-1]["nodes"]
        assert sorted(n["ip"] for n in placed) == [h.ip for h in hosts.hosts], placed
        assert sorted(n["hostname"] for n in placed) == [h.name for h in hosts.hosts], placed
        ranks_seen = {}
        for host in hosts.hosts:
            events = sorted((host.tmp / "bi150-job" / "node" / RUN / "logs").glob("events.*.jsonl"))
            assert len(events) == 1, f"{host.name}: {events}"
            steps = [json.loads(line) for line in events[0].read_text().splitlines() if '"kind": "step"' in line]
            assert steps and max(e.get("global_step", 0) for e in steps) == STEPS, f"{host.name}: {events[0]}"
            ranks_seen[host.name] = events[0].name
        assert len(set(ranks_seen.values())) == 4, ranks_seen
        assert head.seen(summary["model_dir"]).joinpath("model.safetensors.index.json").is_file()

        down = launcher.run("down", "-y", str(config), timeout=300)
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        deadline = time.time() + 30
        while any("raylet" in p for p in head.processes()) and time.time() < deadline:
            time.sleep(1)
        assert not any("raylet" in p for p in head.processes()), head.processes()
        t_down = time.time() - t0
        # `ray down` never reaches the workers (their raylets would exit about a minute after losing
        # the head): stop them the way docs/CLUSTER.md says, and nothing of Ray is left on any host.
        stops = [subprocess.Popen(["ssh", "-i", str(hosts.key), "-o", "StrictHostKeyChecking=no", "-o",
                                   "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{w.ip}",
                                   'bash -lic "ray stop"'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL, start_new_session=True) for w in workers]
        for stop in stops:
            said = stop.communicate(timeout=120)[0]
            assert stop.returncode == 0, said[-3000:]
        for host in hosts.hosts:
            assert not [p for p in host.processes() if "raylet" in p or "gcs_server" in p], host.processes()
        print(f"\nray up returned {t_up:.0f}s, 4 nodes up {t_nodes:.0f}s, job done {t_job:.0f}s, ray down {t_down:.0f}s, "
              f"workers stopped {time.time() - t0:.0f}s (all from the start of the test)")
    finally:
        if forward is not None and forward.poll() is None:
            os.killpg(forward.pid, 9)
            forward.wait(10)

    # The launcher's installs went into the hosts' Python, never into this venv.
    mine = subprocess.run([sys.executable, "-c", "import bi150_ray; print(bi150_ray.__file__)"], capture_output=True,
                          text=True, cwd="/")
    assert mine.stdout.strip() == str(REPO / "bi150_ray" / "__init__.py"), mine.stdout + mine.stderr
