"""Ray side: reserve the gang of nodes, and one worker actor per rank that owns its process.

Whole-node bundles (one per node, STRICT_SPREAD) mean the job owns every device of each node it
uses, so a rank's local index is its device index: no Ray per-device IDs are needed for a custom
resource. Each actor spawns its rank as a fresh OS process (Paddle reads its store address once
per process), writes the rank's output to a log file that outlives the run, and hands new
structured events to the driver when polled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bi150_ray.envcontract import worker_environ
from bi150_ray.errors import GangError
from bi150_ray.events import EventTail

# Ray starts worker processes at nice 15 (RAY_worker_niceness); ranks and prepare tasks would run
# behind everything else on a busy node (see _die_with_parent and docs/DESIGN-NOTES.md).
NICE_0 = {"env_vars": {"RAY_worker_niceness": "0"}}


def connect(address: str | None = None) -> None:
    """Join the cluster at `address`, else RAY_ADDRESS (what `ray job submit` sets), unless connected."""
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    hostname: str


def _describe_cluster(resource: str, per_node: int, cpus_per_node: float) -> str:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    big_enough = [
        n
        for n in alive
        if n["Resources"].get(resource, 0) >= per_node and n["Resources"].get("CPU", 0) >= cpus_per_node
    ]
    detail = ", ".join(
        f"{n['NodeManagerAddress']}: {int(n['Resources'].get(resource, 0))} {resource}/{n['Resources'].get('CPU', 0):g} CPU"
        for n in alive
    )
    return f"cluster has {len(big_enough)} nodes with {per_node} {resource} and {cpus_per_node:g} CPU free ({detail})"


def reserve_gang(nodes: int, per_node: int, resource: str, cpus_per_rank: float, timeout_s: float) -> PlacementGroup:
    """One bundle per node, each on a distinct node, or a GangError within timeout_s."""
    cpus = per_node * cpus_per_rank
    bundle = {resource: float(per_node), "CPU": float(cpus)} if per_node else {"CPU": float(cpus)}
    pg = placement_group([dict(bundle) for _ in range(nodes)], strategy="STRICT_SPREAD")
    if not pg.wait(timeout_seconds=timeout_s):
        state = _describe_cluster(resource, per_node, cpus)
        remove_placement_group(pg)
        raise GangError(
            f"could not reserve the gang within {timeout_s:g}s: need {nodes} nodes x {per_node} {resource} "
            f"(+{cpus:g} CPU each), {state}. Add nodes, lower runtime.nodes/devices_per_node, or raise "
            "runtime.placement_timeout_s."
        )
    return pg


def bundle_nodes(pg: PlacementGroup) -> list[NodeInfo]:
    """Node of each bundle, by bundle index."""
    table = placement_group_table(pg)
    by_id = {n["NodeID"]: n for n in ray.nodes()}
    out = []
    for index in sorted(table["bundles_to_node_id"]):
        node = by_id[table["bundles_to_node_id"][index]]
        out.append(NodeInfo(node["NodeID"], node["NodeManagerAddress"], node.get("NodeManagerHostname", "")))
    return out


def node_order(nodes: list[NodeInfo]) -> list[int]:
    """Bundle indices sorted by a stable node key, so rank order does not depend on Ray's choice."""
    return sorted(range(len(nodes)), key=lambda i: (socket.inet_aton(nodes[i].ip), nodes[i].node_id))


def _die_with_parent() -> None:
    """Runs in the rank process before exec: SIGKILL it when the actor process dies.

    So a killed actor, a stopped job (`ray job stop`) or a lost raylet never leaves a rank
    running and holding devices, whatever Ray does with its own children.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    # Ray starts worker processes at nice 15 (RAY_worker_niceness); a rank inherits it and loses
    # CPU to anything else on the node (measured by bench/launch_overhead.py). spawn_workers asks
    # Ray for nice-0 actors; this covers a worker that was started niced anyway (root only).
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class RankWorker:
    """Owns one rank process. Methods run on the actor; stop() may run while poll() does."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.tail: EventTail | None = None
        self.log_path = ""

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "python": sys.executable,
        }

    def free_ports(self, count: int) -> list[int]:
        """Ports free on this node right now (bound and released; a small race, as launch has)."""
        socks, ports = [], []
        ip = ray.util.get_node_ip_address()
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((ip, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
        for s in socks:
            s.close()
        return ports

    def write_file(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)

    def start(self, argv: list[str], contract: dict[str, str], log_path: str, events_path: str, cwd: str) -> int:
        """Spawn the rank: this node's environment, cleaned as launch does, plus the contract."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        for path in (events_path,):
            if os.path.exists(path):  # a previous attempt's events stay in the rank log, not here
                os.replace(path, f"{path}.{int(time.time())}.prev")
        self.log_path = log_path
        log = open(log_path, "ab")
        log.write(f"\n===== bi150-ray: starting rank at {time.ctime()} =====\n".encode())
        log.flush()
        argv = [sys.executable if a == "{python}" else a for a in argv]
        env = worker_environ(os.environ, contract)
        self.proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.tail = EventTail(events_path)
        return self.proc.pid

    def poll(self) -> dict[str, Any]:
        events = self.tail.read_new() if self.tail else []
        code = self.proc.poll() if self.proc else None
        if code is not None and self.tail:
            events += self.tail.read_new()
        return {"returncode": code, "events": events}

    def send_signal(self, signum: int) -> bool:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            return True
        return False

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the rank's process group, then SIGKILL after grace_s."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped (hung) rank must run to die
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=grace_s)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def dump_stacks(self, out_path: str) -> str:
        """Python stacks of the rank into out_path: py-spy (works on a stopped process too), then
        faulthandler (SIGUSR1) into the rank log if the process can still run signal handlers."""
        if not self.proc or self.proc.poll() is not None:
            return "process not running"
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        pyspy = pyspy if os.path.exists(pyspy) else "py-spy"
        try:
            out = subprocess.run([pyspy, "dump", "--nonblocking", "--pid", str(self.proc.pid)], capture_output=True, text=True, timeout=30)
            text = out.stdout + out.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"py-spy failed: {exc}"
        with open(out_path, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        return out_path

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def inventory(self, output_dir: str) -> dict[str, dict[str, int]]:
        """checkpoint-N folders under output_dir on this node: {name: {file: size}}."""
        out: dict[str, dict[str, int]] = {}
        if not os.path.isdir(output_dir):
            return out
        for name in os.listdir(output_dir):
            folder = os.path.join(output_dir, name)
            if name.startswith("checkpoint-") and os.path.isdir(folder):
                out[name] = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                             if os.path.isfile(os.path.join(folder, f))}
        return out

    def write_bytes(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def list_files(self, folder: str) -> dict[str, int]:
        if not os.path.isdir(folder):
            return {}
        return {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))}

    def read_chunk(self, path: str, offset: int, size: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def install_index_cache(self, cache_dir: str, files: dict[str, bytes], corpus: list[dict[str, Any]]) -> int:
        """Write the job's index-cache files here after checking this node holds the same corpus."""
        import hashlib

        from bi150_ray.data.plan import corpus_fingerprint

        for expected in corpus:
            mine = corpus_fingerprint(expected["prefix"])
            if mine != expected:
                differ = ", ".join(f"{k} {mine.get(k)} here vs {expected.get(k)}" for k in expected if mine.get(k) != expected.get(k))
                raise RuntimeError(
                    f"node {socket.gethostname()}: corpus {expected['prefix']} differs from the one the data plan was "
                    f"built from ({differ}); copy the same corpus to every node"
                )
        os.makedirs(cache_dir, exist_ok=True)
        written = 0
        for name, data in files.items():
            path = os.path.join(cache_dir, name)
            if os.path.isfile(path) and os.path.getsize(path) == len(data):
                with open(path, "rb") as fh:
                    if hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest():
                        continue
            self.write_bytes(path, data)
            with open(path, "rb") as fh:  # verify what landed on this node's disk
                if hashlib.sha256(fh.read()).digest() != hashlib.sha256(data).digest():
                    raise RuntimeError(f"{path}: content hash differs after writing")
            written += 1
        return written

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()


def spawn_workers(pg: PlacementGroup, bundle_index_per_rank: list[int], resource: str, cpus_per_rank: float) -> list:
    """One RankWorker per rank, inside its node's bundle."""
    workers = []
    for bundle in bundle_index_per_rank:
        strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)
        workers.append(
            RankWorker.options(
                num_cpus=cpus_per_rank,
                resources={resource: 1},
                scheduling_strategy=strategy,
                runtime_env=NICE_0,
            ).remote()
        )
    return workers


@dataclass
class Gang:
    """A reserved gang with one started RankWorker per rank and the addresses the ranks meet at."""

    pg: PlacementGroup
    nodes: list[NodeInfo]  # bundle order
    bundle_of_node: list[int]  # node index -> bundle index
    workers: list  # rank -> RankWorker
    endpoints: tuple[str, ...]  # rank -> ip:port (PADDLE_TRAINER_ENDPOINTS)
    master: str  # rank 0's ip:port for the TCPStore


def launch_gang(pg: PlacementGroup, node_index_per_rank: list[int], resource: str, cpus_per_rank: float,
                timeout_s: float) -> Gang:
    """Order the gang's nodes, start a worker per rank in its node's bundle and pick free ports.

    The driver and `bi150-ray doctor` both start ranks through this, so the collective test sees
    exactly the layout and addresses a job gets. On failure the workers started so far are killed.
    """
    nodes = bundle_nodes(pg)
    bundle_of_node = node_order(nodes)
    workers = spawn_workers(pg, [bundle_of_node[n] for n in node_index_per_rank], resource, cpus_per_rank)
    try:
        infos = ray.get([w.info.remote() for w in workers], timeout=timeout_s)
        ports = ray.get([w.free_ports.remote(2 if i == 0 else 1) for i, w in enumerate(workers)], timeout=timeout_s)
    except BaseException:
        release(workers, None)
        raise
    endpoints = tuple(f"{infos[i]['ip']}:{ports[i][0]}" for i in range(len(workers)))
    return Gang(pg, nodes, bundle_of_node, workers, endpoints, master=f"{infos[0]['ip']}:{ports[0][1]}")


def release(workers: list, pg: PlacementGroup | None) -> None:
    """Stop every rank process, kill the worker actors and give the gang's resources back."""
    try:
        ray.get([w.stop.remote() for w in workers], timeout=30)
    except Exception:  # noqa: BLE001 - a dead actor has no process left to stop
        pass
    for w in workers:
        ray.kill(w)
    if pg is not None:
        remove_placement_group(pg)


def file_actors(node_ids: list[str]) -> list:
    """One zero-resource RankWorker pinned to each node, for reading and writing files there."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return [
        RankWorker.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n, soft=False)).remote()
        for n in node_ids
    ]
