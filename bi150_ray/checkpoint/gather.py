"""Collect the final model from the node that saved it into one loadable directory.

For data-parallel x sharding runs the whole model is saved by global rank 0 (PaddleNLP's
`save_model`) on that rank's node. Without a shared filesystem that file sits on one node's disk,
so a Ray task on that node reads it, converts the pickle-based `.pdparams` into safetensors there
(pickles are only ever read from the run's own storage), and ships the bytes to the driver. The
driver writes the directory under a temporary name with a checksum manifest and a completion
marker, then renames it: a gather that dies leaves nothing that looks finished.

Tensor/pipeline shard merging and multi-node shard collection belong to the checkpoint issue.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

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


def export_model_dir(model_dir: str) -> dict[str, bytes]:
    """Runs on the node holding `model_dir`: weights as safetensors bytes plus side files."""
    import numpy as np
    import paddle
    from safetensors.numpy import save

    weights_path = os.path.join(model_dir, "model_state.pdparams")
    if not os.path.isfile(weights_path):
        raise GatherError(f"{weights_path}: missing; the final model was not saved (did training finish?)")
    state = paddle.load(weights_path, return_numpy=True)
    if not state:
        raise GatherError(f"{weights_path}: holds no tensors")
    tensors = {name: np.ascontiguousarray(value) for name, value in state.items()}
    files = {WEIGHTS: save(tensors, metadata={"format": "np"})}
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: WEIGHTS for name in sorted(tensors)}}
    files[INDEX] = json.dumps(index, indent=2).encode()
    for name in SIDE_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                files[name] = fh.read()
    if "config.json" not in files:
        raise GatherError(f"{model_dir}: no config.json next to the weights")
    return files


def write_gathered(files: dict[str, bytes], out_dir: str, provenance: dict[str, Any]) -> str:
    """Write files + manifest under a temporary name, then rename into place atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    entries = []
    for name in sorted(files):
        data = files[name]
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(data)
        entries.append({"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"created": time.time(), "files": entries, **provenance}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as fh:
        fh.write("ok\n")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def verify_gathered(out_dir: str) -> dict[str, Any]:
    """Re-hash every file against the manifest; raises GatherError naming the first bad file."""
    if not os.path.isfile(os.path.join(out_dir, COMPLETE_MARKER)):
        raise GatherError(f"{out_dir}: no completion marker; the gather did not finish")
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as fh:
        manifest = json.load(fh)
    for entry in manifest["files"]:
        path = os.path.join(out_dir, entry["file"])
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise GatherError(f"{path}: sha256 does not match the manifest")
    return manifest
