"""Separate "hosts" on this one machine, for running `ray up` against them over real SSH.

Each host is what the cluster launcher needs a machine to be, and nothing is faked about Ray,
SSH or rsync:

- its own network namespace, joined to the others and to the root namespace by a bridge, with one
  address on a private subnet (the root namespace, where `ray up` runs, holds the bridge address).
  The namespaces have no route anywhere else, so all traffic stays on the bridge and loopback;
- its own PID, mount and UTS namespaces, whose first process is `sshd`. `ray stop` (which Ray's
  start commands run) kills every Ray process it can see, so a host must only see its own; and
  killing that first process ends everything that ever ran on the host;
- a private /tmp (Ray's /tmp/ray session dirs), a private home for the SSH user root (the synced
  ~/bi150-ray, ~/.ray/auth_token, ~/.bi150-ray/node.env), its own /etc/hosts and hostname (Paddle's
  gloo finds its address by resolving the hostname);
- its own Python: a venv of the project venv's interpreter whose site-packages chain to the project
  venv's through a .pth file (Paddle, PaddleNLP and Ray come from there, as a vendor Python would
  provide them), so the launcher's `pip install -e ~/bi150-ray` installs into the host's venv and
  never touches the project's; pip has no index there, as on an air-gapped node;
- the fake `ixsmi` of tests/fixtures/bin on the PATH of SSH sessions (set in the host's ~/.bashrc,
  which the launcher sources).

Everything is undone by `close()`: host processes, network namespaces, veths, the bridge, the
host directories. Mounts live only in the hosts' mount namespaces and vanish with them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_IXSMI_DIR = REPO / "tests" / "fixtures" / "bin"
PROJECT_BIN = Path(sys.executable).parent
PREFIX = "b150t"  # every namespace and link this module creates starts with it (interface names <= 15 chars)
BRIDGE = f"{PREFIX}-br"


@dataclass
class Host:
    """One host: its directory on the real filesystem holds what it sees as /tmp, /root, ..."""

    index: int  # 1-based
    ip: str
    dir: Path
    proc: subprocess.Popen | None = None
    init_pid: int | None = None  # sshd, PID 1 of the host's PID namespace
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.dir / "sshd.log"

    @property
    def name(self) -> str:
        return f"bi150-h{self.index}"

    @property
    def netns(self) -> str:
        return f"{PREFIX}-h{self.index}"

    @property
    def veth(self) -> str:
        return f"{PREFIX}-v{self.index}"

    @property
    def tmp(self) -> Path:
        """What the host sees as /tmp."""
        return self.dir / "tmp"

    @property
    def home(self) -> Path:
        """What the host sees as /root."""
        return self.dir / "home"

    @property
    def venv(self) -> Path:
        return self.dir / "venv"

    def seen(self, path: str) -> Path:
        """The real path of a file the host sees at `path` (under /tmp or ~)."""
        p = Path(path)
        for inside, outside in ((Path("/tmp"), self.tmp), (Path("/root"), self.home)):
            if p == inside or inside in p.parents:
                return outside / p.relative_to(inside)
        return p

    def processes(self) -> list[str]:
        """Command lines of the processes running on this host (in its PID namespace)."""
        if self.init_pid is None:
            return []
        try:
            ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            return []
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    out.append(cmd.strip())
            except OSError:
                continue
        return out


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _kept_paths() -> list[Path]:
    """Top folders under /tmp or /root that the hosts must still see: the repo (fake ixsmi), the
    project venv (the hosts' venvs chain to it) and the interpreter the venvs are made from."""
    interpreter = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    keep: set[Path] = set()
    for path in (REPO, Path(sys.prefix).resolve(), interpreter):
        for private in (Path("/tmp"), Path("/root")):
            if private in path.parents:
                keep.add(private / path.relative_to(private).parts[0])
    return sorted(keep)


def private_mounts(covers: dict[str, Path]) -> str:
    """Shell lines that cover each folder of `covers` (e.g. /tmp) with a private one, keeping the
    kept paths beneath it visible at the same place (bound in first; --rbind carries them along)."""
    lines = []
    for covered, private in covers.items():
        for k in _kept_paths():
            if Path(covered) in k.parents:
                inside = private / k.relative_to(covered)
                inside.mkdir(parents=True, exist_ok=True)
                lines.append(f"mount --bind {k} {inside}")
        lines.append(f"mount --rbind {private} {covered}")
    return "\n".join(lines) + "\n"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class NetnsHosts:
    """`count` hosts at SUBNET.11, .12, ...; the runner (root namespace) is SUBNET.1."""

    def __init__(self, base: Path, count: int = 4, subnet: str = "10.77.0") -> None:
        self.base = base
        self.subnet = subnet
        self.runner_ip = f"{subnet}.1"
        self.hosts = [Host(i, f"{subnet}.{10 + i}", base / f"h{i}") for i in range(1, count + 1)]
        self.key = base / "id_ed25519"  # the client key every host accepts for root
        self.errors: list[str] = []

    def __enter__(self) -> NetnsHosts:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._remove_leftovers()
        self.base.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bi150-netns-test", "-f", str(self.key))
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{self.runner_ip}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._prepare(host)
            self._network(host)
            self._launch(host)
        for host in self.hosts:
            self._wait_for_sshd(host)

    def _remove_leftovers(self) -> None:
        """Namespaces and links of a run that was killed before its cleanup (names are ours)."""
        for host in self.hosts:
            _run("ip", "netns", "del", host.netns, check=False)
            _run("ip", "link", "del", host.veth, check=False)
        _run("ip", "link", "del", BRIDGE, check=False)

    def _prepare(self, host: Host) -> None:
        for d in (host.tmp, host.home / ".config" / "pip"):
            d.mkdir(parents=True, exist_ok=True)
        host.tmp.chmod(0o1777)
        # The host's Python: the project venv's base interpreter, chained to the project venv.
        base_python = getattr(sys, "_base_executable", sys.executable)
        _run(base_python, "-m", "venv", "--without-pip", str(host.venv))
        purelib = Path(sysconfig.get_paths(vars={"base": str(host.venv), "platbase": str(host.venv)})["purelib"])
        project_purelib = sysconfig.get_paths()["purelib"]
        # Sorted after the host's own __editable__ .pth, so the host's install of bi150-ray wins.
        (purelib / "zz_bi150_netns_chain.pth").write_text(f"import site; site.addsitedir({project_purelib!r})\n")
        # `ray` run by the host's interpreter, so Ray's workers (sys.executable) are the host's Python.
        ray_script = (PROJECT_BIN / "ray").read_text().split("\n", 1)[1]
        (host.venv / "bin" / "ray").write_text(f"#!{host.venv}/bin/python\n{ray_script}")
        (host.venv / "bin" / "ray").chmod(0o755)
        # Output from ~/.bashrc would corrupt rsync's stream: it prints nothing.
        (host.home / ".bashrc").write_text(
            "# Written by tests/integration/netns_hosts.py: this host's Python first, then the fake ixsmi.\n"
            f'export PATH="{host.venv}/bin:{FAKE_IXSMI_DIR}:$PATH"\n'
            "export RAY_USAGE_STATS_ENABLED=0  # no route out of the namespaces\n"
            "export RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=0.05  # four nodes share this machine's memory\n"
        )
        # As Debian's default ~/.profile: login shells (`bash -lic ...`) read ~/.bashrc too.
        (host.home / ".profile").write_text('[ -n "$BASH_VERSION" ] && [ -f ~/.bashrc ] && . ~/.bashrc\n')
        # No package index on the hosts: build with the setuptools the venv already has.
        (host.home / ".config" / "pip" / "pip.conf").write_text(
            "[global]\nno-index = true\ndisable-pip-version-check = true\n[install]\nno-build-isolation = false\n"
        )
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.ip} {h.name}\n" for h in self.hosts)
        (host.dir / "hosts").write_text(hosts_file)
        host_key = host.dir / "ssh_host_ed25519_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        (host.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (host.dir / "sshd_config").write_text(
            f"ListenAddress {host.ip}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {host.dir / 'authorized_keys'}\n"
            "PidFile none\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nStrictModes no\n"
            "MaxStartups 50\nMaxSessions 50\nLogLevel INFO\n"
        )
        # Runs as the first process of the host's new mount/PID/UTS namespaces.
        (host.dir / "start.sh").write_text(
            "set -e\n"
            f"hostname {host.name}\n"
            f"mount --bind {host.dir / 'hosts'} /etc/hosts\n"
            # The repo, its venv and their interpreter stay visible where they are, even when they live
            # under /tmp (a CI clone) or /root (pyenv).
            + private_mounts({"/tmp": host.tmp, "/root": host.home})
            + f"exec /usr/sbin/sshd -D -e -f {host.dir / 'sshd_config'}\n"
        )

    def _network(self, host: Host) -> None:
        ns = host.netns
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", f"{host.veth}p")
        _run("ip", "link", "set", f"{host.veth}p", "netns", ns)
        _run("ip", "-n", ns, "link", "set", f"{host.veth}p", "name", "eth0")
        _run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "set", host.veth, "master", BRIDGE, "up")

    def _launch(self, host: Host) -> None:
        with open(host.log, "ab") as log:
            host.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--pid", "--fork",
                 "--kill-child", "--mount-proc", "--propagation", "private", "sh", str(host.dir / "start.sh")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.time() + 10
        while time.time() < deadline and host.init_pid is None:
            kids = _children(host.proc.pid)
            host.init_pid = kids[0] if kids else None
            if host.proc.poll() is not None:
                break
            time.sleep(0.05)
        if host.init_pid is None:
            raise RuntimeError(f"{host.name}: the namespace did not start; {host.log}: {host.log.read_text()[-2000:]}")

    def _wait_for_sshd(self, host: Host, timeout_s: float = 20.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if host.proc is not None and host.proc.poll() is not None:
                break
            try:
                with socket.create_connection((host.ip, 22), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{host.name}: sshd is not listening on {host.ip}:22; {host.log}: {host.log.read_text()[-2000:]}")

    # -- use -----------------------------------------------------------------------------------
    def ssh(self, host: Host, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `command` on the host as the launcher does (a login shell that sources ~/.bashrc)."""
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", f"root@{host.ip}", f"bash --login -c {shlex.quote('source ~/.bashrc; ' + command)}"],
            capture_output=True, text=True, timeout=timeout,
        )

    # -- teardown ------------------------------------------------------------------------------
    def close(self, remove_files: bool = True) -> None:
        """Idempotent; every step is tried even if an earlier one fails (errors kept in self.errors)."""
        for host in self.hosts:
            # SIGKILL to a PID namespace's first process kills every process in the namespace.
            if host.init_pid is not None:
                try:
                    os.kill(host.init_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if host.proc is not None and host.proc.poll() is None:
                host.proc.kill()
        for host in self.hosts:
            if host.proc is not None:
                try:
                    host.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.errors.append(f"{host.name}: unshare (pid {host.proc.pid}) did not exit")
            deadline = time.time() + 20
            while host.processes() and time.time() < deadline:
                time.sleep(0.2)
            if host.processes():
                self.errors.append(f"{host.name}: processes still running: {host.processes()[:5]}")
            host.init_pid = None
            for cmd in (("ip", "netns", "del", host.netns), ("ip", "link", "del", host.veth)):
                out = _run(*cmd, check=False)
                if out.returncode != 0 and "Cannot find" not in out.stderr and "No such" not in out.stderr:
                    self.errors.append(f"{shlex.join(cmd)}: {out.stderr.strip()}")
        out = _run("ip", "link", "del", BRIDGE, check=False)
        if out.returncode != 0 and "Cannot find" not in out.stderr:
            self.errors.append(f"ip link del {BRIDGE}: {out.stderr.strip()}")
        if remove_files:
            shutil.rmtree(self.base, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Anything of ours still present on the machine (expected: nothing after close())."""
        found = []
        netns = _run("ip", "netns", "list", check=False).stdout
        found += [line.split()[0] for line in netns.splitlines() if line.startswith(PREFIX)]
        links = _run("ip", "-o", "link", "show", check=False).stdout
        found += [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
                  if line.split(":")[1].strip().startswith(PREFIX)]
        return found
