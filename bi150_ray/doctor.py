"""Pre-flight: qualify the live cluster for one job before it spends a day of devices.

`bi150-ray doctor CONFIG` (and, in its cheap form, every job start) gathers facts on every node
that advertises the job's Ray resource — one small probe actor pinned to each node — and judges
them against the job's plan:

- devices: healthy BI150 count from `ixsmi` (devices.py) against `devices_per_node`, Ray's
  advertised count against ixsmi's, and smallest device memory against the plan's peak estimate;
- driver/IX-ML/CUDA versions (ixsmi) and Python/Paddle/PaddleNLP/Ray versions equal across nodes;
- the interface named by NCCL_SOCKET_IFNAME (the job's runtime.env, else the node's environment)
  exists, has an IPv4 address, and that address is in a subnet the other nodes share;
- the storage path is writable, and with shared storage a file written on one node is seen on all;
- clocks within a tolerance of the head's (offset from the ping with the shortest round trip);
- a collective test: ranks started exactly as the job starts them (cluster.RankWorker, the
  envcontract), an all-reduce of a known tensor, and MB/s between every pair of nodes.

The judging is pure (`evaluate`) so it is unit-tested on synthetic facts; gathering needs Ray.
Ray is imported inside the functions that use it (layering: see the design notes).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import secrets
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bi150_ray.errors import RunFailed
from bi150_ray.nodeprobe import (
    IFNAME_VAR,
    MARKER,
    probe_call,
)

GO, NO_GO, SKIP = "go", "no-go", "skip"
SOFTWARE_KEYS = ("python", "paddle", "paddlenlp", "ray")
DRIVER_KEYS = ("driver", "ix-ml", "cuda")


class PreflightError(RunFailed):
    """The pre-flight at job start found a no-go; the message lists each failed check and its fix."""


@dataclass(frozen=True)
class DoctorOptions:
    """Knobs of one doctor run; defaults live here and nowhere else."""

    clock_tolerance_s: float = 2.0
    collective: bool = True  # start ranks and run all-reduce + pairwise send/recv
    collective_mb: float = 4.0  # per send/recv between two nodes
    collective_reps: int = 3
    collective_timeout_s: float = 180.0
    min_bandwidth_mb_s: float = 0.0  # 0: report MB/s without judging it
    ixsmi: str = "ixsmi"
    probe_timeout_s: float = 60.0
    shared_wait_s: float = 3.0  # how long a node waits to see the others' files (NFS attribute caches)
    # At job start the gang reservation owns "enough nodes": it waits placement_timeout_s for
    # capacity to join and then says what is missing. The standalone doctor judges it now.
    judge_node_count: bool = True


@dataclass(frozen=True)
class Requirements:
    """What the job needs from each node, taken from its plan."""

    nodes: int
    devices_per_node: int
    resource_name: str = "BI150"
    backend: str = "cpu"
    memory_needed_mib: int | None = None  # peak per device from estimate.py; None = not estimated
    shared_storage: bool = False
    ifname: str | None = None  # NCCL_SOCKET_IFNAME from runtime.env; None = each node's own


@dataclass
class NodeFacts:
    """What one node reported about itself (plus the head's clock measurement of it)."""

    index: int
    node_id: str
    ip: str
    hostname: str = ""
    ray_devices: float = 0.0  # the Ray resource the node advertises
    devices: dict[str, Any] | None = None  # count, healthy, memory_min_mib, name, problems
    device_error: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    ifname: str | None = None
    ifname_source: str | None = None  # "runtime.env" or "node env"
    interfaces: dict[str, list[str]] = field(default_factory=dict)  # name -> ["10.0.0.5/24", ...]
    storage_path: str = ""
    storage_error: str | None = None
    shared_missing: list[int] | None = None  # nodes whose marker this node could not see
    clock_offset_s: float | None = None  # node clock - head clock
    clock_rtt_s: float | None = None

    @property
    def label(self) -> str:
        return f"node{self.index} {self.ip} ({self.node_id[:8]})"


@dataclass(frozen=True)
class CheckResult:
    check: str
    node: str  # a NodeFacts.label, or "cluster"
    status: str  # go | no-go | skip
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------------
# judging (pure)


def _majority(values: dict[int, Any]) -> Any:
    """The most common value; ties go to the value of the lowest node index."""
    counts = Counter(values.values())
    best = max(counts.values())
    return next(v for _, v in sorted(values.items()) if counts[v] == best)


def _check_devices(f: NodeFacts, req: Requirements) -> list[CheckResult]:
    res = req.resource_name
    if f.devices is None:
        if req.backend == "cpu":
            return [CheckResult("devices", f.label, SKIP, f"ixsmi unavailable; the cpu backend uses no device ({(f.device_error or '').splitlines()[0][:120]})")]
        return [CheckResult("devices", f.label, NO_GO, f"ixsmi failed: {(f.device_error or 'unknown').splitlines()[0][:200]}",
                            f.device_error or "run `bi150-ray devices` on the node and fix what it says")]
    d = f.devices
    healthy, need = int(d["healthy"]), req.devices_per_node
    out = []
    if healthy < need:
        bad = "; ".join(d.get("problems", [])) or "none unhealthy"
        out.append(CheckResult("devices", f.label, NO_GO, f"ixsmi sees {healthy} healthy of {d['count']}; the job needs {need} per node",
                               f"fix or reset the unhealthy devices ({bad}), or lower runtime.devices_per_node to {healthy}"))
    elif f.ray_devices > healthy:
        out.append(CheckResult("devices", f.label, NO_GO, f"Ray advertises {f.ray_devices:g} {res} but ixsmi sees only {healthy} healthy",
                               f"restart Ray on this node with --resources=\"$(bi150-ray node-resources)\" so it advertises {healthy}"))
    elif f.ray_devices < need:
        out.append(CheckResult("devices", f.label, NO_GO, f"Ray advertises {f.ray_devices:g} {res}; the job needs {need} per node",
                               f"restart Ray on this node with --resources=\"$(bi150-ray node-resources)\" (ixsmi sees {healthy})"))
    else:
        out.append(CheckResult("devices", f.label, GO, f"{healthy} healthy {d.get('name', '')} (Ray advertises {f.ray_devices:g}); job uses {need}".replace("  ", " ")))
    if req.backend == "cpu":
        out.append(CheckResult("device memory", f.label, SKIP, "cpu backend: device memory is not used"))
    elif req.memory_needed_mib is None:
        out.append(CheckResult("device memory", f.label, SKIP, "no memory estimate for this model (see `bi150-ray plan`)"))
    elif int(d["memory_min_mib"]) < req.memory_needed_mib:
        out.append(CheckResult("device memory", f.label, NO_GO,
                               f"smallest device has {d['memory_min_mib']} MiB; the plan's peak is {req.memory_needed_mib} MiB",
                               "lower per_device_train_batch_size, raise sharding/pipeline degree or turn on recompute "
                               "(`bi150-ray plan` shows the memory per stage)"))
    else:
        out.append(CheckResult("device memory", f.label, GO, f"{d['memory_min_mib']} MiB per device >= plan peak {req.memory_needed_mib} MiB"))
    return out


def _check_equal(facts: list[NodeFacts], keys: tuple[str, ...], check: str, how: str) -> list[CheckResult]:
    """Each key must have one value across nodes; the minority nodes are no-go."""
    out: dict[int, list[tuple[str, str | None, str]]] = {f.index: [] for f in facts}
    known = {k for f in facts for k in keys if f.versions.get(k) is not None}
    if not known:
        return [CheckResult(check, f.label, SKIP, "no node reports these versions") for f in facts]
    for key in keys:
        if key not in known:
            continue
        values = {f.index: f.versions.get(key) for f in facts}
        want = _majority({i: v for i, v in values.items() if v is not None})
        for i, v in values.items():
            if v != want:
                out[i].append((key, v, want))
    results = []
    for f in facts:
        wrong = out[f.index]
        if not wrong:
            same = ", ".join(f"{k} {f.versions.get(k)}" for k in keys if k in known)
            results.append(CheckResult(check, f.label, GO, same))
            continue
        others = sorted(g.index for g in facts if g.index != f.index and all(g.versions.get(k) == w for k, _, w in wrong))
        detail = "; ".join(f"{k} {v or 'missing'} (node{'s' if len(others) != 1 else ''} {','.join(map(str, others)) or '-'}: {w})"
                           for k, v, w in wrong)
        fix = "; ".join(f"install {k} {w} on this node{how}" for k, _, w in wrong)
        results.append(CheckResult(check, f.label, NO_GO, detail, fix))
    return results


def match_interfaces(spec: str, names: list[str]) -> list[str]:
    """Interfaces NCCL/IXCCL would consider for NCCL_SOCKET_IFNAME: comma-separated prefixes,
    '=' for exact names, '^' to exclude."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    parts = [p.strip() for p in spec.split(",") if p.strip()]

    def hit(name: str) -> bool:
        return any(name == p if exact else name.startswith(p) for p in parts)

    return [n for n in names if hit(n) != exclude]


def _node_networks(f: NodeFacts) -> tuple[list[str], set[ipaddress.IPv4Network]]:
    matched = match_interfaces(f.ifname or "", sorted(f.interfaces))
    nets = {ipaddress.ip_interface(a).network for n in matched for a in f.interfaces[n]
            if isinstance(ipaddress.ip_interface(a), ipaddress.IPv4Interface)}
    return matched, nets


def _check_network(facts: list[NodeFacts]) -> list[CheckResult]:
    results: list[CheckResult] = []
    nets_of: dict[int, set[ipaddress.IPv4Network]] = {}
    for f in facts:
        if not f.ifname:
            results.append(CheckResult("interface", f.label, SKIP, f"{IFNAME_VAR} is not set (runtime.env or node env): "
                                       "the collective library picks an interface itself"))
            continue
        matched, nets = _node_networks(f)
        have = ", ".join(f"{n} {' '.join(a) or '(no IPv4)'}" for n, a in sorted(f.interfaces.items()))
        where = f"{IFNAME_VAR}={f.ifname} (from {f.ifname_source})"
        if not matched:
            results.append(CheckResult("interface", f.label, NO_GO, f"{where}: no such interface; this node has {have}",
                                       f"set {IFNAME_VAR} to this node's training interface (cluster.yaml's BI150_TRAIN_SUBNET "
                                       "writes it to ~/.bi150-ray/node.env; runtime.env overrides it for every node)"))
        elif not nets:
            results.append(CheckResult("interface", f.label, NO_GO, f"{where}: {', '.join(matched)} has no IPv4 address",
                                       f"bring {matched[0]} up with its training-network address, or point {IFNAME_VAR} at the interface that has it"))
        else:
            nets_of[f.index] = nets
            found = ", ".join(f"{n} {' '.join(f.interfaces[n])}" for n in matched)
            results.append(CheckResult("interface", f.label, GO, f"{where}: {found}"))
    if len(nets_of) < 1:
        return results
    counts = Counter(n for nets in nets_of.values() for n in nets)
    common = [n for n, c in counts.items() if c == len(nets_of)]
    if common:
        for i in nets_of:
            f = next(x for x in facts if x.index == i)
            results.append(CheckResult("subnet", f.label, GO, f"in {common[0]}, shared by all {len(nets_of)} node(s)"))
        return results
    best = max(counts.values())
    ref = next(n for i in sorted(nets_of) for n in sorted(nets_of[i], key=str) if counts[n] == best)
    for i in sorted(nets_of):
        f = next(x for x in facts if x.index == i)
        peers = sorted(j for j in nets_of if ref in nets_of[j] and j != i)
        if ref in nets_of[i]:
            results.append(CheckResult("subnet", f.label, GO, f"in {ref} with node(s) {','.join(map(str, peers))}"))
        else:
            mine = ", ".join(sorted(str(n) for n in nets_of[i]))
            results.append(CheckResult("subnet", f.label, NO_GO, f"{f.ifname} is in {mine}, not in {ref} which node(s) "
                                       f"{','.join(map(str, peers))} share",
                                       f"give this node's training interface an address in {ref}, or set {IFNAME_VAR} to the "
                                       f"interface that has one"))
    return results


def _check_storage(facts: list[NodeFacts], req: Requirements) -> list[CheckResult]:
    out = []
    for f in facts:
        if f.storage_error:
            out.append(CheckResult("storage", f.label, NO_GO, f"{f.storage_path} is not writable: {f.storage_error}",
                                   f"create {f.storage_path} writable by the Ray user on this node, or set runtime.storage_path"))
        else:
            out.append(CheckResult("storage", f.label, GO, f"{f.storage_path} writable"))
    if not req.shared_storage:
        return out
    for f in facts:
        if f.storage_error or f.shared_missing is None:
            out.append(CheckResult("shared storage", f.label, SKIP, "storage not writable here" if f.storage_error else "not probed"))
        elif f.shared_missing:
            out.append(CheckResult("shared storage", f.label, NO_GO,
                                   f"files written in {f.storage_path} by node(s) {','.join(map(str, f.shared_missing))} are not visible here",
                                   f"mount the same shared filesystem at {f.storage_path} on every node, or set runtime.shared_storage "
                                   "to false (then each node keeps its own shards)"))
        else:
            out.append(CheckResult("shared storage", f.label, GO, f"sees the files of all {len(facts)} node(s)"))
    return out


def _check_clock(facts: list[NodeFacts], tolerance_s: float) -> list[CheckResult]:
    out = []
    for f in facts:
        if f.clock_offset_s is None:
            out.append(CheckResult("clock", f.label, SKIP, "not measured"))
            continue
        slack = (f.clock_rtt_s or 0.0) / 2
        text = f"{f.clock_offset_s:+.3f} s from the head (round trip {1000 * (f.clock_rtt_s or 0):.1f} ms)"
        if abs(f.clock_offset_s) - slack > tolerance_s:
            out.append(CheckResult("clock", f.label, NO_GO, f"{text}; tolerance {tolerance_s:g} s",
                                   "synchronise the clocks (chrony/ntpd on every node; `chronyc tracking` shows the offset)"))
        else:
            out.append(CheckResult("clock", f.label, GO, text))
    return out


def evaluate(facts: list[NodeFacts], req: Requirements, opts: DoctorOptions = DoctorOptions()) -> list[CheckResult]:
    """Every check on gathered facts: one result per check per node, plus cluster-wide ones."""
    out: list[CheckResult] = []
    able = [f for f in facts if f.ray_devices >= req.devices_per_node
            and (f.devices is None and req.backend == "cpu" or f.devices is not None and f.devices["healthy"] >= req.devices_per_node)]
    enough = f"{len(able)} of {len(facts)} node(s) can host {req.devices_per_node} {req.resource_name}; the job needs {req.nodes}"
    if not opts.judge_node_count:
        out.append(CheckResult("nodes", "cluster", SKIP, f"{enough} (the gang reservation waits for capacity)"))
    elif len(able) < req.nodes:
        out.append(CheckResult("nodes", "cluster", NO_GO, enough,
                               f"add nodes (ray start --resources=\"$(bi150-ray node-resources)\" on each), or lower runtime.nodes to "
                               f"{len(able)} or runtime.devices_per_node"))
    else:
        out.append(CheckResult("nodes", "cluster", GO, enough))
    for f in facts:
        out += _check_devices(f, req)
    with_devices = [f for f in facts if f.devices is not None]
    if with_devices:
        out += _check_equal(with_devices, DRIVER_KEYS, "driver versions", " (same CoreX driver/SDK as the others)")
    out += _check_equal(facts, SOFTWARE_KEYS, "software versions", " (the job runs the same code on every node)")
    out += _check_network(facts)
    out += _check_storage(facts, req)
    out += _check_clock(facts, opts.clock_tolerance_s)
    return out


def check_collective(result: dict[str, Any], labels: dict[int, str], opts: DoctorOptions = DoctorOptions()) -> list[CheckResult]:
    """Judge the collective test: every rank reported a correct all-reduce; MB/s per node pair."""
    if result.get("error"):
        return [CheckResult("all-reduce", "cluster", NO_GO, result["error"].splitlines()[0][:300],
                            result.get("fix", "read the rank logs named above; every rank must reach the others' endpoints"))]
    out = []
    ranks = result["ranks"]
    bad = [r for r, e in sorted(ranks.items()) if not e.get("all_reduce_ok")]
    world = len(ranks)
    if bad:
        out.append(CheckResult("all-reduce", "cluster", NO_GO, f"ranks {bad} of {world} got a wrong sum",
                               "a rank's device or the collective library computes wrong results: run the doctor again, then "
                               "exclude the node of those ranks"))
    else:
        out.append(CheckResult("all-reduce", "cluster", GO, f"{world} ranks, sum of a known tensor correct on every rank "
                               f"({result.get('seconds', 0):.1f} s including start)"))
    for p in result.get("pairs", []):
        pair = f"{labels.get(p['src_node'], p['src_node'])} -> node{p['dst_node']}"
        mbs = p["mb_per_s"]
        if not p.get("intact", True):
            out.append(CheckResult("bandwidth", pair, NO_GO, f"{mbs:.0f} MB/s but the data arrived corrupted",
                                   "check the NICs and cables between these nodes"))
        elif opts.min_bandwidth_mb_s and mbs < opts.min_bandwidth_mb_s:
            out.append(CheckResult("bandwidth", pair, NO_GO, f"{mbs:.0f} MB/s < required {opts.min_bandwidth_mb_s:g} MB/s",
                                   f"check that {IFNAME_VAR}/NCCL_IB_HCA name the fast network between these nodes"))
        else:
            out.append(CheckResult("bandwidth", pair, GO, f"{mbs:.0f} MB/s ({p['bytes'] / 1e6:.0f} MB send/recv)"))
    return out


def verdict(results: list[CheckResult]) -> str:
    return NO_GO if any(r.status == NO_GO for r in results) else GO


def format_report(results: list[CheckResult], header: str = "") -> str:
    """The go/no-go table (one line per check per node), then one fix line per failed check."""
    rows = [("CHECK", "NODE", "RESULT", "DETAIL")] + [(r.check, r.node, r.status.upper(), r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [header] if header else []
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    failed = [r for r in results if r.status == NO_GO]
    for r in failed:
        lines.append(f"fix [{r.check}] {r.node}: {r.fix}")
    counts = Counter(r.status for r in results)
    if failed:
        lines.append(f"NO-GO: {len(failed)} check(s) failed, {counts[GO]} passed, {counts[SKIP]} skipped")
    else:
        lines.append(f"GO: {counts[GO]} check(s) passed, {counts[SKIP]} skipped")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# gathering across the cluster (needs Ray)


def requirements_of(plan) -> Requirements:
    """Requirements from a LaunchPlan; the memory estimate only for device backends."""
    rt = plan.job.runtime
    memory = None
    if rt.backend != "cpu":
        from bi150_ray import estimate

        try:
            est = estimate.estimate(plan.rank_args(0), rt.nodes, rt.devices_per_node, estimate.find_device("BI-V150"))
            memory = int(est["memory"]["peak_bytes"] // (1024 * 1024))
        except (estimate.EstimateError, KeyError, OSError, ValueError):
            memory = None
    return Requirements(nodes=rt.nodes, devices_per_node=rt.devices_per_node, resource_name=rt.resource_name,
                        backend=rt.backend, memory_needed_mib=memory, shared_storage=rt.shared_storage,
                        ifname=rt.env.get(IFNAME_VAR))


def candidate_nodes(resource: str) -> list[dict[str, Any]]:
    """Alive nodes advertising the job's resource, in the order the driver numbers nodes."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource, 0) > 0]
    return sorted(alive, key=lambda n: (socket.inet_aton(n["NodeManagerAddress"]), n["NodeID"]))


def _measure_clock(call: Callable[..., Any], pings: int = 5) -> tuple[float, float]:
    import ray

    best = None
    for _ in range(pings):
        t0 = time.time()
        remote = ray.get(call("now"))
        t1 = time.time()
        if best is None or t1 - t0 < best[1]:
            best = (remote - (t0 + t1) / 2, t1 - t0)
    return best


def gather_facts(plan, opts: DoctorOptions, token: str) -> list[NodeFacts]:
    """Probe every candidate node in parallel, one pinned zero-CPU task per node and question."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    rt = plan.job.runtime
    nodes = candidate_nodes(rt.resource_name)
    facts = [NodeFacts(index=i, node_id=n["NodeID"], ip=n["NodeManagerAddress"], hostname=n.get("NodeManagerHostname", ""),
                       ray_devices=float(n["Resources"].get(rt.resource_name, 0))) for i, n in enumerate(nodes)]
    task = ray.remote(num_cpus=0, max_retries=0)(probe_call)

    def on(i: int) -> Callable[..., Any]:
        pinned = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=facts[i].node_id, soft=False))
        return lambda method, *args: pinned.remote(method, *args)

    calls = [on(f.index) for f in facts]
    roots = [os.path.dirname(plan.node_paths(f.index).run_dir) for f in facts]
    refs = [calls[f.index]("facts", f.index, roots[f.index], rt.env.get(IFNAME_VAR), opts.ixsmi, token, rt.shared_storage)
            for f in facts]
    answers = ray.get(refs, timeout=opts.probe_timeout_s)
    for f, a in zip(facts, answers, strict=True):
        for k, v in a.items():
            setattr(f, k, v)
    for f in facts:
        f.clock_offset_s, f.clock_rtt_s = _measure_clock(calls[f.index])
    if rt.shared_storage:
        ok = [f.index for f in facts if not f.storage_error]
        missing = ray.get([calls[i]("shared_missing", roots[i], token, [j for j in ok if j != i], opts.shared_wait_s) for i in ok],
                          timeout=opts.probe_timeout_s + opts.shared_wait_s)
        for i, m in zip(ok, missing, strict=True):
            facts[i].shared_missing = m
        ray.get([calls[i]("remove", os.path.join(roots[i], MARKER.format(token=token, node=i))) for i in ok])
    return facts


def run_collective(plan, opts: DoctorOptions, token: str) -> dict[str, Any]:
    """Start one rank per slot exactly as the driver does and run the collective probe program."""
    import ray

    from bi150_ray import cluster
    from bi150_ray import events as ev
    from bi150_ray.envcontract import job_rank_env
    from bi150_ray.errors import GangError

    rt = plan.job.runtime
    t0 = time.time()
    try:
        pg = cluster.reserve_gang(rt.nodes, rt.devices_per_node, rt.resource_name, rt.cpus_per_rank,
                                  min(rt.placement_timeout_s, opts.probe_timeout_s))
    except GangError as exc:
        return {"error": str(exc), "fix": "the cluster cannot host the job's gang: see the nodes/devices checks"}
    workers: list = []
    log_dir = os.path.join(tempfile.gettempdir(), "bi150-ray-doctor", token)
    try:
        gang = cluster.launch_gang(pg, [s.node_index for s in plan.slots], rt.resource_name, rt.cpus_per_rank,
                                   opts.probe_timeout_s)
        workers, endpoints, master = gang.workers, gang.endpoints, gang.master
        argv = ["{python}", "-u", "-m", "bi150_ray.train.collective_probe", "--mb", str(opts.collective_mb),
                "--reps", str(opts.collective_reps)]
        starts = []
        for slot, w in zip(plan.slots, workers, strict=True):
            contract = job_rank_env(rt, slot, endpoints, master, log_dir)
            events_path = os.path.join(log_dir, f"events.{slot.rank}.jsonl")
            contract[ev.EVENTS_ENV] = events_path
            starts.append(w.start.remote(argv, contract, os.path.join(log_dir, f"workerlog.{slot.rank}"), events_path, log_dir))
        ray.get(starts)
        ranks: dict[int, dict[str, Any]] = {}
        codes: list[int | None] = [None] * len(workers)
        deadline = time.time() + opts.collective_timeout_s
        while any(c is None for c in codes) and time.time() < deadline:
            polls = ray.get([w.poll.remote() for w in workers], timeout=60)
            for r, poll in enumerate(polls):
                codes[r] = poll["returncode"]
                for e in poll["events"]:
                    if e["kind"] == "done":
                        ranks[r] = e
                    elif e["kind"] == "error":
                        ranks.setdefault(-1 - r, e)
            time.sleep(0.2)
        failed = [r for r, c in enumerate(codes) if c != 0]
        if failed:
            r = failed[0]
            why = f"did not finish within {opts.collective_timeout_s:g} s" if codes[r] is None else f"exited with code {codes[r]}"
            err = ranks.get(-1 - r, {}).get("error", "")
            tail = ray.get(workers[r].log_tail.remote(15))
            where = f"{endpoints[r].rsplit(':', 1)[0]}:{os.path.join(log_dir, f'workerlog.{r}')}"
            return {"error": f"collective test: rank {r} {why}{': ' + err if err else ''} (log {where})\n{tail}",
                    "fix": f"read {where}; ranks must reach each other's endpoints ({', '.join(endpoints[:4])}...) "
                           f"and the collective library must initialise on every node"}
        node_of = {s.rank: s.node_index for s in plan.slots}
        pairs = [p | {"src_node": node_of[p["src"]], "dst_node": node_of[p["dst"]]} for e in ranks.values() for p in e.get("pairs", [])]
        return {"ranks": {r: e for r, e in ranks.items() if r >= 0}, "pairs": sorted(pairs, key=lambda p: (p["src"], p["dst"])),
                "seconds": time.time() - t0, "node_ids": [gang.nodes[b].node_id for b in gang.bundle_of_node]}
    finally:
        cluster.release(workers, pg)


@dataclass
class DoctorReport:
    requirements: Requirements
    facts: list[NodeFacts]
    results: list[CheckResult]
    collective: dict[str, Any] | None
    seconds: float

    @property
    def verdict(self) -> str:
        return verdict(self.results)

    def to_json(self) -> str:
        return json.dumps({"verdict": self.verdict, "seconds": round(self.seconds, 3),
                           "requirements": dataclasses.asdict(self.requirements),
                           "checks": [dataclasses.asdict(r) for r in self.results],
                           "nodes": [dataclasses.asdict(f) | {"label": f.label} for f in self.facts],
                           "bandwidth": (self.collective or {}).get("pairs", [])}, indent=1, default=str)


def run_doctor(plan, opts: DoctorOptions = DoctorOptions()) -> DoctorReport:
    """Gather, judge, and (unless disabled or already no-go on hosting) run the collective test."""
    t0 = time.time()
    token = secrets.token_hex(6)
    req = requirements_of(plan)
    facts = gather_facts(plan, opts, token)
    results = evaluate(facts, req, opts)
    collective = None
    hosting = {"nodes", "devices", "storage"}
    if opts.collective:
        if any(r.status == NO_GO and r.check in hosting for r in results):
            results.append(CheckResult("all-reduce", "cluster", SKIP, "not run: the checks above must pass first"))
        else:
            collective = run_collective(plan, opts, token)
            by_node_id = {f.node_id: f.label for f in facts}
            labels = {i: by_node_id.get(nid, f"node{i}") for i, nid in enumerate(collective.get("node_ids", []))}
            results += check_collective(collective, labels, opts)
    else:
        results.append(CheckResult("all-reduce", "cluster", SKIP, "collective test not requested"))
    return DoctorReport(req, facts, results, collective, time.time() - t0)


def preflight(plan, say: Callable[[str], None], collective: bool = False) -> DoctorReport:
    """The job-start gate: raise PreflightError on no-go, else one line of what was checked."""
    report = run_doctor(plan, DoctorOptions(collective=collective, judge_node_count=False))
    failed = [r for r in report.results if r.status == NO_GO]
    if failed:
        raise PreflightError(
            f"pre-flight for run {plan.run_name}: NO-GO\n" + format_report(failed)
            + "\n(`bi150-ray doctor CONFIG` shows every check; runtime.preflight=false skips this gate)"
        )
    counts = Counter(r.status for r in report.results)
    say(f"pre-flight: go on {len(report.facts)} node(s), {counts[GO]} checks passed, {counts[SKIP]} skipped "
        f"({report.seconds:.1f}s{'' if collective else '; collective test off, see runtime.preflight_collective'})")
    return report
