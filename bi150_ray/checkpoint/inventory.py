"""Which files make a complete `checkpoint-N`, and which one a relaunch may resume from.

PaddleNLP (non-unified checkpoints) writes shard files on the ranks that own them and the small
metadata files (trainer_state.json, rng_state_<world>.pth, scheduler, config, tokenizer) on
global rank 0 only. Without a shared filesystem, a checkpoint is therefore spread across nodes
and only rank 0's node has the metadata every rank reads on resume. The runtime decides the
resume point (never each rank on its own, which would disagree across nodes), requires every
shard to be present and every rank to have confirmed the save, and copies the metadata files to
the other nodes before relaunching.
"""

from __future__ import annotations

import re

from bi150_ray.checkpoint.merge import shard_file_name
from bi150_ray.topology import Degrees

COMPLETE_MARKER = ".bi150_complete"  # written on every node once all ranks confirmed the save
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SHARD_PREFIXES = ("model_state", "optimizer", "master_weights")


def _suffix(parts: list[str]) -> str:
    return ("." + "_".join(parts)) if parts else ""


def expected_shards(degrees: Degrees) -> dict[str, int]:
    """Shard file name -> global rank that writes it (PaddleNLP's weight/optimizer name suffixes)."""
    out: dict[str, int] = {}
    for rank in range(degrees.world):
        c = degrees.coords(rank)
        model_parts, opt_parts = [], []
        if degrees.tp > 1:
            model_parts.append(f"tp{c['mp']:02d}")
        if degrees.pp > 1:
            model_parts.append(f"pp{c['pp']:02d}")
        opt_parts = list(model_parts)
        if degrees.sharding > 1:
            opt_parts.append(f"shard{c['sharding']:02d}")
        if c["dp"] == 0 and c["sharding"] == 0:
            out[shard_file_name(c["mp"], c["pp"], degrees.tp, degrees.pp)] = rank
        if c["dp"] == 0:
            out[f"optimizer{_suffix(opt_parts)}.pdopt"] = rank
    return out


def is_shard(name: str) -> bool:
    return name.startswith(SHARD_PREFIXES)


def newest_complete(
    inventories: dict[int, dict[str, dict[str, int]]],
    degrees: Degrees,
    node_of_rank: list[int],
) -> int | None:
    """Newest step whose checkpoint is complete across the nodes, or None.

    `inventories[node][checkpoint_name][file] = size` as seen on each node. Complete means: every
    expected shard is on the node of the rank that writes it (non-empty), rank 0's node has
    trainer_state.json, and the completion marker is on every node that holds part of it.
    """
    steps: set[int] = set()
    for inv in inventories.values():
        steps |= {int(m.group(1)) for name in inv if (m := CHECKPOINT_RE.match(name))}
    shards = expected_shards(degrees)
    for step in sorted(steps, reverse=True):
        name = f"checkpoint-{step}"
        if "trainer_state.json" not in inventories.get(node_of_rank[0], {}).get(name, {}):
            continue
        if not all(inventories.get(node_of_rank[r], {}).get(name, {}).get(f, 0) > 0 for f, r in shards.items()):
            continue
        holders = {node_of_rank[r] for r in shards.values()} | {node_of_rank[0]}
        if all(COMPLETE_MARKER in inventories[n].get(name, {}) for n in holders):
            return step
    return None
