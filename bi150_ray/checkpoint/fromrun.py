"""`bi150-ray gather RUN`: one recorded `checkpoint-N` of a finished (or failed) run -> one model dir.

The run record says which checkpoints the runtime confirmed (every rank reported the save), on
which nodes their files are, in which folder, and with what sizes. This module picks the step,
reaches those folders (through a file actor on each node when storage is node-local, directly when
they are readable here: shared storage, or simulated nodes on this machine), checks the model
shards are all there for the run's tp/pp degrees with the sizes the record saw, and hands them to
`gather.gather_model`, the same staging + merge path as the driver's end-of-run gather.

Pickle-based `.pdparams` are only read from folders the run record names as its own checkpoint
folders, and only when their sizes match what the runtime recorded at save time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bi150_ray import runrecord
from bi150_ray.checkpoint.gather import COMPLETE_MARKER, SIDE_FILES, GatherError, gather_model, list_sources
from bi150_ray.checkpoint.merge import shard_file_name


@dataclass(frozen=True)
class RecordedCheckpoint:
    """One confirmed checkpoint as the run record describes it."""

    step: int
    attempt: int
    folders: dict[int, str]  # node index -> checkpoint folder on that node
    manifest: dict[int, dict[str, int]]  # node index -> {file: bytes} at confirmation time


def record_path(run: str) -> str:
    """A run's results dir or its run_record.json -> the record's path (as `bi150-ray status` takes it)."""
    path = os.path.join(run, "run_record.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise GatherError(f"{run}: no run_record.json there; pass a run's results dir or its run_record.json")
    return path


def is_run(path: str) -> bool:
    """True for a results dir holding run_record.json, or a run_record.json itself."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "run_record.json"))) or (
        os.path.isfile(path) and os.path.basename(path).endswith(".json")
    )


def recorded_checkpoints(rec: dict[str, Any], where: str) -> dict[int, RecordedCheckpoint]:
    """step -> checkpoint, for every checkpoint the runtime confirmed complete."""
    out: dict[int, RecordedCheckpoint] = {}
    for c in rec.get("checkpoints", []):
        step = int(c["global_step"])
        if "folders" not in c:
            raise GatherError(
                f"{where}: checkpoint-{step} has no per-node folders (record from an older bi150-ray); "
                "gather its checkpoint folder directly: bi150-ray gather CHECKPOINT_DIR --out DIR"
            )
        folders = {int(n): p for n, p in c["folders"].items()}
        for node, folder in folders.items():
            if os.path.basename(os.path.normpath(folder)) != f"checkpoint-{step}":
                raise GatherError(f"{where}: checkpoint-{step} folder of node {node} is '{folder}', not a checkpoint-{step} folder")
        manifest = {int(n): dict(files) for n, files in c.get("manifest", {}).items()}
        out[step] = RecordedCheckpoint(step, int(c.get("attempt", len(rec.get("attempts", [])))), folders, manifest)
    return out


def pick(checkpoints: dict[int, RecordedCheckpoint], step: int | None, where: str) -> RecordedCheckpoint:
    complete = sorted(checkpoints)
    if not complete:
        raise GatherError(f"{where}: the run has no complete checkpoint (none was confirmed by every rank)")
    if step is None:
        return checkpoints[complete[-1]]
    if step not in checkpoints:
        raise GatherError(
            f"{where}: checkpoint-{step} is not a complete checkpoint of this run; "
            f"complete ones: {', '.join(f'checkpoint-{s}' for s in complete)}"
        )
    return checkpoints[step]


def check_present(
    ckpt: RecordedCheckpoint, listings: dict[int, dict[str, int]], tp: int, pp: int, rank0_node: int, how: str
) -> None:
    """Every model shard for tp x pp, config.json and the completion markers, with the recorded sizes."""
    wanted = {shard_file_name(t, p, tp, pp) for t in range(tp) for p in range(pp)}
    holder = {f: n for n in sorted(ckpt.manifest, reverse=True) for f in ckpt.manifest[n]}
    problems = []
    for name in sorted(wanted | {"config.json"}):
        node = rank0_node if name == "config.json" else holder.get(name)
        if node is None:
            problems.append(f"{name} was never saved (the record's manifest lacks it for tp={tp}, pp={pp})")
            continue
        want, got = ckpt.manifest[node][name], listings.get(node, {}).get(name)
        if got is None:
            problems.append(f"{name} is no longer in node {node}'s {ckpt.folders[node]} (removed by save_total_limit?)")
        elif got != want:
            problems.append(f"node {node}'s {ckpt.folders[node]}/{name} is {got} bytes, the record saw {want}")
    for node in ckpt.folders:
        if COMPLETE_MARKER not in listings.get(node, {}) and not problems:
            problems.append(f"node {node}'s {ckpt.folders[node]} has no {COMPLETE_MARKER}")
    if problems:
        raise GatherError(f"checkpoint-{ckpt.step} cannot be gathered {how}: " + "; ".join(problems))


def _ray_sources(rec: dict[str, Any], ckpt: RecordedCheckpoint, address: str, where: str):
    """A file actor on each node that holds part of the checkpoint (the nodes of the attempt that saved it)."""
    import ray

    from bi150_ray import cluster

    cluster.connect(address)
    attempts = rec.get("attempts", [])
    nodes = {n["node_index"]: n for n in attempts[ckpt.attempt - 1]["nodes"]} if 0 < ckpt.attempt <= len(attempts) else {}
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    ids = []
    for node in sorted(ckpt.folders):
        info = nodes.get(node)
        if info is None or info["node_id"] not in alive:
            ip = info["ip"] if info else "?"
            raise GatherError(
                f"{where}: node {node} ({ip}, Ray node {info['node_id'][:12] if info else '?'}) that holds "
                f"{ckpt.folders[node]} is not in the Ray cluster at {address}; start it again (same disk) or "
                "gather a checkpoint saved by the nodes that are up"
            )
        ids.append(info["node_id"])
    actors = cluster.file_actors(ids)
    return {n: (a, ckpt.folders[n]) for n, a in zip(sorted(ckpt.folders), actors, strict=True)}, actors


def gather_run(run: str, out_dir: str, step: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Gather checkpoint-`step` (default: the newest complete) of a run into `out_dir`; returns its manifest.

    Without `address` the run's checkpoint folders must be readable on this machine; with it, the
    files are fetched through Ray from the nodes that saved them.
    """
    from bi150_ray.checkpoint.gather import verify_gathered

    path = record_path(run)
    rec = runrecord.load(path)
    ckpt = pick(recorded_checkpoints(rec, path), step, path)
    degrees = rec.get("degrees", {})
    tp, pp = int(degrees.get("tp", 1)), int(degrees.get("pp", 1))
    rank0_node = 0  # node-major layout: global rank 0 is on node 0
    if rank0_node not in ckpt.folders:
        raise GatherError(f"{path}: checkpoint-{ckpt.step} lists no folder on node 0, which holds config.json")
    provenance: dict[str, Any] = {
        "global_step": ckpt.step,
        "degrees": degrees,
        "run_name": rec.get("run_name"),
        "run_record": os.path.abspath(path),
        "source": {n: f for n, f in sorted(ckpt.folders.items())},
    }
    actors: list = []
    try:
        if address:
            sources, actors = _ray_sources(rec, ckpt, address, path)
            how = f"through Ray at {address}"
        else:
            sources = {n: (None, f) for n, f in ckpt.folders.items()}
            how = "from this machine (node-local storage on other machines needs --address of the run's Ray cluster)"
        listings = list_sources(sources)
        check_present(ckpt, listings, tp, pp, rank0_node, how)
        # Only the files the record vouches for are staged: model shards and rank 0's side files.
        keep = {n: {f: s for f, s in files.items() if f in ckpt.manifest.get(n, {}) and (f.startswith("model_state") or f in SIDE_FILES)}
                for n, files in listings.items()}
        gather_model(sources, rank0_node, out_dir, tp, pp, provenance, listings=keep)
    finally:
        if actors:
            import ray

            for a in actors:
                ray.kill(a)
    return verify_gathered(os.path.abspath(out_dir))
