"""Collect the final model from the node that saved it into one loadable directory.

PaddleNLP saves model shards (`model_state[.tpXX][_ppYY].pdparams`) on the ranks that own them,
so without a shared filesystem they sit on several nodes' disks. File actors on those nodes stream
them into a staging folder under the run's results (pickle-based `.pdparams` are only ever read
from the run's own storage), then `merge.merge_checkpoint` merges tp/pp shards with PaddleNLP's
own mappings into sharded safetensors. Output is written under a temporary name with a checksum
manifest and a completion marker, then renamed: a gather that dies leaves nothing that looks
finished.
"""

from __future__ import annotations

import json
import os
from typing import Any

from bi150_ray.hashing import sha256_file

COMPLETE_MARKER = ".bi150_complete"
MANIFEST = "bi150_manifest.json"
WEIGHTS = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"
# Files copied next to the weights so `from_pretrained(DIR)` and the tokenizer load from DIR alone.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "tokenizer.json",
    "added_tokens.json",
)


class GatherError(RuntimeError):
    pass


CHUNK = 256 << 20  # bytes per Ray transfer when copying a file off a node


def _is_model_shard(name: str) -> bool:
    return name.startswith("model_state") and name.endswith(".pdparams")


def list_sources(sources: dict[int, tuple[Any, str]]) -> dict[int, dict[str, int]]:
    """{node: {file: bytes}} of each node's folder; through its file actor, or here when the actor is None."""
    import ray

    remote = {n: a.list_files.remote(path) for n, (a, path) in sources.items() if a is not None}
    got = dict(zip(remote, ray.get(list(remote.values())), strict=True)) if remote else {}
    out: dict[int, dict[str, int]] = {}
    for node, (actor, folder) in sources.items():
        if actor is not None:
            out[node] = got[node]
        elif os.path.isdir(folder):
            out[node] = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                         if os.path.isfile(os.path.join(folder, f))}
        else:
            out[node] = {}
    return out


def stage_from_nodes(
    sources: dict[int, tuple[Any, str]],
    rank0_node: int,
    staging: str,
    listings: dict[int, dict[str, int]] | None = None,
) -> list[str]:
    """Bring one model folder's pieces from the nodes into `staging` on this machine.

    `sources[node] = (file actor on that node or None, folder path there)`. Model shards are taken
    from whichever node has them; the small metadata files (config, tokenizer) from rank 0's node.
    A folder readable here (actor None: shared storage, or a simulated node on this machine) is
    linked, not copied; a remote one moves in CHUNK-sized pieces so a multi-GB shard never sits
    whole in the object store.
    """
    import ray

    os.makedirs(staging, exist_ok=True)
    listings = listings if listings is not None else list_sources(sources)
    plan: dict[str, tuple[int, int]] = {}
    for node, files in listings.items():
        for name, size in files.items():
            if _is_model_shard(name):
                plan.setdefault(name, (node, size))
    for name in SIDE_FILES:
        if name in listings.get(rank0_node, {}):
            plan[name] = (rank0_node, listings[rank0_node][name])
    if not any(_is_model_shard(n) for n in plan):
        where = ", ".join(f"node {n}: {sources[n][1]}" for n in sources)
        raise GatherError(f"no model_state*.pdparams found ({where}); did training save a model?")
    for name, (node, size) in sorted(plan.items()):
        actor, folder = sources[node]
        if actor is None:
            os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(staging, name))
            continue
        with open(os.path.join(staging, name), "wb") as out:
            for offset in range(0, max(size, 1), CHUNK):
                out.write(ray.get(actor.read_chunk.remote(os.path.join(folder, name), offset, CHUNK)))
    return sorted(plan)


def gather_model(
    sources: dict[int, tuple[Any, str]],
    rank0_node: int,
    out_dir: str,
    tp: int,
    pp: int,
    provenance: dict[str, Any],
    listings: dict[int, dict[str, int]] | None = None,
) -> str:
    """Stage a model folder off its nodes, merge tp/pp shards into `out_dir`, drop the staging.

    The one path for the driver's end-of-run gather and `bi150-ray gather RUN`, shared storage or not.
    """
    import shutil

    from bi150_ray.checkpoint.merge import merge_checkpoint

    out_dir = os.path.abspath(out_dir)
    staging = f"{out_dir}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stage_from_nodes(sources, rank0_node, staging, listings)
        return merge_checkpoint(staging, out_dir, tp, pp, provenance=provenance)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_gathered(out_dir: str) -> dict[str, Any]:
    """Re-hash every file against the manifest; raises GatherError naming the first bad file."""
    if not os.path.isdir(out_dir):
        raise GatherError(f"{out_dir}: not a directory; pass a folder written by `bi150-ray gather`")
    if not os.path.isfile(os.path.join(out_dir, COMPLETE_MARKER)):
        raise GatherError(f"{out_dir}: no completion marker; the gather did not finish")
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as fh:
        manifest = json.load(fh)
    from concurrent.futures import ThreadPoolExecutor

    paths = [os.path.join(out_dir, entry["file"]) for entry in manifest["files"]]
    with ThreadPoolExecutor(max_workers=4) as pool:  # sha256 releases the GIL: files hash side by side
        found = list(pool.map(sha256_file, paths))
    for path, entry, digest in zip(paths, manifest["files"], found, strict=True):
        if digest != entry["sha256"]:
            raise GatherError(f"{path}: sha256 does not match the manifest")
    return manifest
