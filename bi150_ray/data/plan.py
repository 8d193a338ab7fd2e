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
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bi150_ray.data import samples
from bi150_ray.data.mmap_format import Corpus, CorpusFormatError, open_corpus
from bi150_ray.hashing import file_memo, sha256_file_cached

_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a corpus for out-of-vocabulary ids


class DataInputError(CorpusFormatError):
    """Bad data found while planning (token ids outside the vocabulary, a prefix given twice, a
    stale index cache, an empty corpus or split). One line naming the file; inputs are untouched."""


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
    """(prefixes, targets, (train, valid, test) plans) for a job's resolved PaddleNLP args.

    Everything that would otherwise fail (or silently misbehave) inside the ranks is checked
    here first, before any rank starts (``check_inputs``, ``check_index_cache``).
    """
    prefixes = discover_prefixes(args["input_dir"])
    if not prefixes:
        raise ValueError(f"{args['input_dir']}: no corpus (.bin/.idx or _ids.npy/_idx.npz) found in input_dir")
    targets = targets_for(args, dataset_world_size, eval_iters, test_iters)
    check_inputs(args, prefixes)
    plans = samples.build_plan(
        prefixes,
        args.get("split", "949,50,1"),
        targets,
        int(args.get("max_seq_length", 1024)),
        int(args.get("seed", 42)),
        cache=False,
    )
    check_index_cache(plans)
    return prefixes, targets, plans


def check_inputs(args: Mapping[str, Any], prefixes: list) -> None:
    """Refuse, naming the file: a prefix given twice, an empty corpus, a split that leaves a
    phase the job runs (do_train/do_eval/do_predict) without documents or a split with documents
    but no tokens (PaddleNLP's epoch loop never ends there), token ids outside the vocabulary."""
    input_dir = str(args["input_dir"])
    paths = corpus_prefixes(prefixes)
    seen: dict[str, str] = {}
    for p in paths:
        key = os.path.normpath(os.path.abspath(p))
        if key in seen:
            if len(input_dir.split()) > 1:
                raise DataInputError(
                    f"{p}: listed twice in the input_dir blend (as {seen[key]!r} and {p!r}); PaddleNLP would "
                    "blend it with itself as two datasets: give it once, with the summed weight"
                )
            raise DataInputError(
                f"{p}: both {p}.bin/.idx and {p}_ids.npy/_idx.npz are in {input_dir}; PaddleNLP lists the prefix "
                "twice and reads the _ids.npy pair both times: move one of the two formats out of the folder"
            )
        seen[key] = p
    split = str(args.get("split", "949,50,1"))
    phases = {"train": bool(args.get("do_train")), "valid": bool(args.get("do_eval")),
              "test": bool(args.get("do_predict"))}
    try:
        samples.check_data_split(split, phases["train"], phases["valid"], phases["test"])
    except ValueError:
        needed = [n for n, on in phases.items() if on]
        raise DataInputError(f"split {split!r}: gives weight 0 to a split the job needs ({', '.join(needed)})") from None
    vocab = model_vocab_size(args)
    for p in paths:
        corpus = open_corpus(p)
        index_file, token_file = corpus.files
        if len(corpus) == 0:
            raise DataInputError(f"{index_file}: empty corpus (0 documents)")
        if corpus.n_tokens == 0:
            raise DataInputError(f"{token_file}: empty corpus ({len(corpus)} documents, 0 tokens)")
        bounds = samples.split_ranges(split, len(corpus))
        for i, name in enumerate(samples.SPLIT_NAMES):
            lo, hi = bounds[i], bounds[i + 1]
            if hi <= lo and phases[name]:
                raise DataInputError(
                    f"{index_file}: split {split!r} leaves the {name} split with 0 of {len(corpus)} documents, "
                    f"but the job needs it ({'do_train' if name == 'train' else 'do_eval' if name == 'valid' else 'do_predict'}); "
                    "give it more weight or add documents"
                )
            if hi > lo and int(np.sum(corpus.sizes[lo:hi], dtype=np.int64)) == 0:
                raise DataInputError(
                    f"{index_file}: the {name} split (documents {lo}..{hi - 1}) holds 0 tokens; "
                    "PaddleNLP would loop forever building its samples"
                )
        if vocab is not None:
            check_token_ids(corpus, *vocab)


def fresh_vocab_size(config_vocab: int, tokenizer_vocab: int) -> int:
    """The vocabulary a model trained from scratch gets: run_pretrain grows config.vocab_size to
    the tokenizer's size rounded up to 128 (the rank program applies this; the data check too)."""
    return max(int(config_vocab), ((int(tokenizer_vocab) - 1) // 128 + 1) * 128)


def tokenizer_vocab_size(path: str) -> int | None:
    """``tokenizer.vocab_size`` of a sentencepiece-based (LLaMA) PaddleNLP tokenizer directory,
    read without importing PaddleNLP; None for other tokenizers."""
    for name in ("sentencepiece.bpe.model", "tokenizer.model"):  # LlamaTokenizer's resource names
        model = os.path.join(path, name)
        if os.path.isfile(model):
            import sentencepiece as spm

            try:
                return int(spm.SentencePieceProcessor(model_file=model).get_piece_size())
            except (OSError, RuntimeError):
                return None  # the rank will say what is wrong with it
    return None


def model_vocab_size(args: Mapping[str, Any]) -> tuple[int, str] | None:
    """(vocab_size the ranks will train with, where it came from): the model directory's
    config.json (else a known model name), grown as ``fresh_vocab_size`` when the job trains from
    scratch and the tokenizer's size can be read; None when no size is known (ids not checked)."""
    name = args.get("model_name_or_path")
    if not name:
        return None
    cfg = os.path.join(str(name), "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as fh:
            vocab = json.load(fh).get("vocab_size")
        found = (int(vocab), cfg) if vocab else None
    else:
        from bi150_ray.plan import KNOWN_MODELS

        vocab = KNOWN_MODELS.get(str(name), {}).get("vocab_size")
        found = (int(vocab), f"model {name}") if vocab else None
    if found is None or args.get("continue_training"):
        return found
    tokenizer = str(args.get("tokenizer_name_or_path") or name)
    tok_vocab = tokenizer_vocab_size(tokenizer) if os.path.isdir(tokenizer) else None
    grown = found[0] if tok_vocab is None else fresh_vocab_size(found[0], tok_vocab)
    if grown == found[0]:
        return found
    return grown, (f"{found[1]} ({found[0]}) grown to the tokenizer's {tok_vocab} rounded up to 128, "
                   "as the ranks do when continue_training is off")


def _token_range(tokens: np.ndarray) -> list[int]:
    lo, hi = None, None
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return [0, -1] if lo is None else [lo, hi]


def check_token_ids(corpus: Corpus, vocab_size: int, source: str) -> None:
    """Every token id in ``[0, vocab_size)``. The file's id range is a chunked min/max over the
    memory-mapped tokens, remembered per node and file version (``hashing.file_memo``: a relaunch
    or rerun does not read the corpus again); skipped when the dtype cannot hold an id outside the
    range. Only when the range is out does a second scan find the first bad token to name it."""
    dt = corpus.dtype
    if dt.kind == "u" and np.iinfo(dt).max < vocab_size:
        return
    tokens = corpus.tokens
    lo, hi = file_memo(corpus.files[1], f"token-id-range {dt.str}", lambda: _token_range(tokens))
    if hi < vocab_size and lo >= 0:
        return
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        if chunk.max() < vocab_size and (dt.kind == "u" or chunk.min() >= 0):
            continue
        at = start + int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
        seq = int(np.searchsorted(np.cumsum(corpus.sizes, dtype=np.int64), at, side="right"))
        raise DataInputError(
            f"{corpus.files[1]}: token id {tokens[at]} (token {at}, sequence {seq}) is outside the model's "
            f"vocabulary [0, {vocab_size}) from {source}: tokenize with the model's tokenizer or fix vocab_size"
        )


def _gpt_plans(plans) -> list[samples.GPTPlan]:
    out: list[samples.GPTPlan] = []
    for plan in plans:
        if isinstance(plan, samples.GPTPlan):
            out.append(plan)
        elif isinstance(plan, samples.BlendPlan):
            out.extend(plan.datasets)
    return out


def check_index_cache(plans) -> None:
    """Cache files beside the corpus (``<dir>/index-cache``, which PaddleNLP reads before
    ``data_cache`` and which we never write) must be the plan we just built.

    Checked when all four files are there (PaddleNLP's hit rule): the ``.dsc`` text, then each
    array's dtype and shape, then its content, compared in chunks against the fresh arrays (a
    read of the files, cheaper than the build). A corpus rewritten at the same path keeps the
    same md5 names, so only the content shows that the cache is stale.
    """
    for plan in _gpt_plans(plans):
        folder = os.path.join(os.path.dirname(plan.prefix), samples.INDEX_CACHE_DIRNAME)
        paths = samples.cache_paths(folder, plan.prefix, plan.name, plan.num_samples, plan.seq_length,
                                    plan.seed, plan.split)
        if not all(os.path.isfile(p) for p in paths.values()):
            continue
        stale = f"PaddleNLP would load it instead of the plan for {plan.prefix} ({plan.name} split); delete it"
        with open(paths["desc"], "rb") as fh:
            if fh.read() != plan.desc.encode("utf-8"):
                raise DataInputError(f"{paths['desc']}: describes another dataset than its md5 name says; {stale}")
        for key, want in (("doc", plan.doc_idx), ("sample", plan.sample_idx), ("shuffle", plan.shuffle_idx)):
            try:
                got = np.load(paths[key], mmap_mode="r", allow_pickle=False)
            except Exception as exc:
                raise DataInputError(f"{paths[key]}: unreadable ({type(exc).__name__}: {exc}); {stale}") from None
            if got.dtype != want.dtype or got.shape != want.shape:
                raise DataInputError(
                    f"{paths[key]}: stale index cache ({got.dtype} {got.shape}, the corpus gives {want.dtype} "
                    f"{want.shape}); {stale}"
                )
            flat_got, flat_want = got.reshape(-1), np.asarray(want).reshape(-1)
            for lo in range(0, flat_want.size, _SCAN_CHUNK):
                if not np.array_equal(flat_got[lo : lo + _SCAN_CHUNK], flat_want[lo : lo + _SCAN_CHUNK]):
                    raise DataInputError(f"{paths[key]}: stale index cache (content differs from the corpus); {stale}")


def cache_files(plans) -> dict[str, bytes]:
    """The index-cache files PaddleNLP looks for in ``data_cache``, as bytes: each single-prefix
    plan's four files and, for a blend, every child's four plus the blend's ``.dsc``,
    ``_index.npy`` and ``_sample_index.npy``."""
    out: dict[str, bytes] = {}

    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=True)
        return buf.getvalue()

    for plan in _gpt_plans(plans):
        # File names from samples.cache_paths: the one place PaddleNLP's cache naming lives.
        names = {k: os.path.basename(v) for k, v in samples.cache_paths(
            "", plan.prefix, plan.name, plan.num_samples, plan.seq_length, plan.seed, plan.split).items()}
        out[names["desc"]] = plan.desc.encode()
        for key, array in (("doc", plan.doc_idx), ("sample", plan.sample_idx), ("shuffle", plan.shuffle_idx)):
            out[names[key]] = npy(array)
    for plan in plans:
        if isinstance(plan, samples.BlendPlan):
            names = {k: os.path.basename(v) for k, v in samples.blend_cache_paths("", plan.desc).items()}
            out[names["desc"]] = plan.desc.encode()
            out[names["index"]] = npy(plan.dataset_index)
            out[names["sample_index"]] = npy(plan.dataset_sample_index)
    return out


def corpus_fingerprint(prefix: str) -> dict[str, Any]:
    """Identity of a corpus on a node: full sha256 of its index and token files (remembered per
    node and file version, ``hashing.sha256_file_cached``), sizes and counts. Either format
    (``.idx``/``.bin`` or ``_idx.npz``/``_ids.npy``)."""
    corpus = open_corpus(prefix)  # validates the format, names the file on error
    index_path, token_path = corpus.files
    return {"prefix": prefix, "format": type(corpus).__name__, "idx_sha256": sha256_file_cached(index_path),
            "bin_size": os.path.getsize(token_path), "bin_sha256": sha256_file_cached(token_path),
            "documents": len(corpus), "tokens": corpus.n_tokens}


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


def resume_keys(args: Mapping[str, Any], dataset_world_size: int) -> dict[str, Any]:
    """What the data position of a checkpoint depends on; kept with each confirmed checkpoint in
    the run record, so a later resume can be compared against it."""
    return {
        "per_device_train_batch_size": int(args.get("per_device_train_batch_size", 8)),
        "gradient_accumulation_steps": int(args.get("gradient_accumulation_steps", 1)),
        "dataset_world_size": int(dataset_world_size),
        "data_prefix": str(args["input_dir"]),
        "split": str(args.get("split", "949,50,1")),
        "seq_length": int(args.get("max_seq_length", 1024)),
        "seed": int(args.get("seed", 42)),
    }


def check_resume_data(
    checkpoint: str,
    trainer_state: Mapping[str, Any],
    recorded: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    allow: bool,
) -> tuple[int, list[str]]:
    """(consumed_samples the trainer restarts from, problems) for resuming from ``checkpoint``.

    Refuses (``DataInputError`` naming the checkpoint and the changed keys) a resume that would
    skip, repeat or re-deal training data, unless ``allow``. Two sources: the keys recorded with
    the checkpoint (``resume_keys``; catches global batch, data-parallel world, prefix, split,
    seq_length and seed changes) and, always, the checkpoint's own ``trainer_state.json``
    ``consumed_samples`` against ``global_step * B * G * R`` of the new arguments (catches a
    changed global batch even when the run record is gone).
    """
    step = int(trainer_state["global_step"])
    new = {**new, "global_step": step}
    problems: list[str] = []
    if recorded and all(k in recorded for k in samples._BATCH_KEYS):
        resumed, problems = samples.resume_problems(recorded, new)
    else:
        resumed = samples.consumed_samples(step, *(int(new[k]) for k in samples._BATCH_KEYS))
    read = trainer_state.get("consumed_samples")
    if read is not None and int(read) != resumed and not any(p.startswith("global batch") for p in problems):
        how = "skip" if resumed > int(read) else "repeat"
        keys = ", ".join(f"{k}={new[k]}" for k in samples._BATCH_KEYS)
        problems.append(
            f"trainer_state.json says {read} samples were read by step {step}, but with {keys} the trainer "
            f"would restart at {resumed}, so it would {how} {abs(resumed - int(read))} samples"
        )
    if problems and not allow:
        raise DataInputError(
            f"{checkpoint}: resuming would not continue the same data stream: {'; '.join(problems)}. "
            "Restore those keys, start a new run (another run name or results dir), or set "
            "allow_data_skew_on_resume: true in the runtime config to resume anyway"
        )
    return resumed, problems
