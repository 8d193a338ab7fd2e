"""The job's data plan, built once: which samples exist, in what order, and which rank reads what.

The single source for the data side of a job: prefixes as run_pretrain discovers them, sample
targets as run_pretrain computes them, index arrays bit-identical to PaddleNLP's
(`samples.build_plan`), and the cache files PaddleNLP looks for. The driver builds the plan once
(on the node that holds the data) and writes the same index-cache files into every node's cache
folder, each node checking the content hashes, so no rank rebuilds or polls for index files and
no shared filesystem is needed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bi150_ray.data import samples
from bi150_ray.data.mmap_format import open_corpus


def discover_prefixes(input_dir: str) -> list:
    """run_pretrain's get_train_data_file: a blend list, or the .idx/_idx.npz files in a folder."""
    if len(input_dir.split()) > 1:
        return input_dir.split()
    files = [
        os.path.join(input_dir, f)
        for f in os.listdir(input_dir)
        if os.path.isfile(os.path.join(input_dir, f)) and ("_idx.npz" in str(f) or ".idx" in str(f))
    ]
    files = [x.replace("_idx.npz", "").replace(".idx", "") for x in files]
    if len(files) > 1:
        out: list = []
        for x in files:
            out += [1.0, x]
        return out
    return files


def corpus_prefixes(prefixes: list) -> list[str]:
    """The corpus paths of a data_prefix list: ``[p]``, or every second entry of a blend
    (``w1 p1 w2 p2``; blend entries are strings too when they come from the input_dir text)."""
    if len(prefixes) == 1:
        return [str(prefixes[0])]
    return [str(p).strip() for p in prefixes[1::2]]


def targets_for(args: Mapping[str, Any], dataset_world_size: int, eval_iters: int, test_iters: int) -> list[int]:
    return samples.target_samples(
        int(args.get("per_device_train_batch_size", 8)),
        int(args.get("per_device_eval_batch_size", 8)),
        dataset_world_size,
        int(args["max_steps"]),
        int(args.get("gradient_accumulation_steps", 1)),
        args.get("eval_steps"),
        eval_iters,
        test_iters,
        logging_steps=int(args.get("logging_steps", 500)),
    )


def build(args: Mapping[str, Any], dataset_world_size: int, eval_iters: int, test_iters: int):
    """(prefixes, targets, (train, valid, test) plans) for a job's resolved PaddleNLP args."""
    prefixes = discover_prefixes(args["input_dir"])
    if not prefixes:
        raise ValueError(f"{args['input_dir']}: no corpus (.bin/.idx or _ids.npy/_idx.npz) found in input_dir")
    targets = targets_for(args, dataset_world_size, eval_iters, test_iters)
    plans = samples.build_plan(
        prefixes,
        args.get("split", "949,50,1"),
        targets,
        int(args.get("max_seq_length", 1024)),
        int(args.get("seed", 42)),
        cache=False,
    )
    return prefixes, targets, plans


def cache_files(plans) -> dict[str, bytes]:
    """The index-cache files PaddleNLP looks for, as bytes (single-prefix plans only)."""
    out: dict[str, bytes] = {}
    for plan in plans:
        if plan is None or not isinstance(plan, samples.GPTPlan):
            continue
        # File names from samples.cache_paths: the one place PaddleNLP's cache naming lives.
        names = {k: os.path.basename(v) for k, v in samples.cache_paths(
            "", plan.prefix, plan.name, plan.num_samples, plan.seq_length, plan.seed, plan.split).items()}
        out[names["desc"]] = plan.desc.encode()
        for key, array in (("doc", plan.doc_idx), ("sample", plan.sample_idx), ("shuffle", plan.shuffle_idx)):
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=True)
            out[names[key]] = buf.getvalue()
    return out


def corpus_fingerprint(prefix: str) -> dict[str, Any]:
    """Cheap identity of a corpus on a node: index-file hash, token-file size and the hash of
    its ends. Either format (``.idx``/``.bin`` or ``_idx.npz``/``_ids.npy``)."""
    corpus = open_corpus(prefix)  # validates the format, names the file on error
    index_path, token_path = corpus.files
    with open(index_path, "rb") as fh:
        idx_hash = hashlib.sha256(fh.read()).hexdigest()
    size = os.path.getsize(token_path)
    h = hashlib.sha256()
    with open(token_path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return {"prefix": prefix, "format": type(corpus).__name__, "idx_sha256": idx_hash, "bin_size": size,
            "bin_ends_sha256": h.hexdigest(), "documents": len(corpus), "tokens": corpus.n_tokens}


def summary(prefixes: list, targets: list[int], plans, dataset_world_size: int, batch: int) -> dict[str, Any]:
    """What `bi150-ray data plan` prints: documents, tokens, epochs, samples, per-rank share."""
    out: dict[str, Any] = {"prefixes": corpus_prefixes(prefixes), "targets": targets, "splits": {}}
    for name, plan in zip(samples.SPLIT_NAMES, plans, strict=True):
        if plan is None:
            out["splits"][name] = None
            continue
        entry: dict[str, Any] = {"samples": len(plan), "target": targets[samples.SPLIT_NAMES.index(name)],
                                 "per_rank_per_pass": len(plan) // max(dataset_world_size, 1),
                                 "micro_batch": batch}
        if isinstance(plan, samples.GPTPlan):
            entry.update({"epochs": plan.num_epochs, "separate_last_epoch": plan.separate_last_epoch,
                          "cache_hash": samples.cache_hash(plan.desc),
                          "shuffle_sha256": hashlib.sha256(np.ascontiguousarray(plan.shuffle_idx).tobytes()).hexdigest()})
        out["splits"][name] = entry
    return out


def dump_first(plans, prefixes: list, k: int, out_dir: str) -> list[str]:
    """Write the first k samples of each split as DIR/{train,valid,test}.npy (int64, k x (L+1))."""
    os.makedirs(out_dir, exist_ok=True)
    corpora = [open_corpus(p) for p in corpus_prefixes(prefixes)]
    written = []
    for name, plan in zip(samples.SPLIT_NAMES, plans, strict=True):
        if plan is None:
            continue
        n = min(k, len(plan))
        if isinstance(plan, samples.GPTPlan):
            rows = [plan.sample(corpora[0], i) for i in range(n)]
        else:
            rows = [plan.sample(corpora, i)[1] for i in range(n)]
        path = os.path.join(out_dir, f"{name}.npy")
        np.save(path, np.stack(rows).astype(np.int64))
        written.append(path)
    return written
