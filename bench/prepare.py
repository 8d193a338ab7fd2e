"""Prepare throughput: tokens/s of `prepare` with 1 and 2 Ray workers vs a single-process loop.

The baseline is what `create_pretraining_data.py --workers 1` does per document, minus its
multiprocessing pool: read a jsonl line, `json.loads`, collapse repeated characters, strip,
tokenize with the same tokenizer (in batches of 512, as a shard task does; sentencepiece on one
thread, as in a task), append EOS, write with `MMapWriter`. The tokenizer is loaded
before the clock starts. Ray runs go through `prepare()` end to end (shard planning, tasks, merge,
final check) on a local one-node Ray of `--cpus` CPUs started in this process; a warm-up run first
loads the tokenizer in each worker, so neither side pays for importing Paddle. All three write
byte-identical output (checked).

Corpus: CPython's help-topic paragraphs (as the demo uses), repeated with a numbered prefix
until `--tokens` tokens, written as jsonl. Tokenizer: the demo's LLaMA-style sentencepiece,
trained locally, used either as a PaddleNLP tokenizer directory (`--kind paddlenlp`, the real
recipe: `tokenize` + `convert_tokens_to_ids`) or as a bare `.model` file (`--kind sentencepiece`).

Rounds rotate the order of the three runs. Reported: tokens/s per run, ratios to the baseline
per round, medians, and the 1-minute load average around each run (other people's jobs). Also
tokens per CPU-second of tokenizing (the loop's process time; the sum of the shard tasks' process
times) and "CPUs busy" = those CPU-seconds / wall time: on an oversubscribed machine wall-clock
ratios mostly measure the neighbours, while CPUs busy shows whether the two workers did run
side by side.
This is a benchmark, not a test: it asserts nothing about absolute times.

    python bench/prepare.py [--tokens 3000000] [--rounds 3] [--kind paddlenlp|sentencepiece|both]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bi150_ray.data import prepare as prep
from bi150_ray.data.mmap_format import MMapWriter, best_dtype
from bi150_ray.demo_assets import SP_MODEL_FILE, build_corpus_text, train_tokenizer


def make_corpus(root: Path, tokens: int, tok_dir: Path) -> tuple[Path, int]:
    """jsonl of about ``tokens`` tokens; returns (path, documents)."""
    import sentencepiece as spm

    docs = build_corpus_text()
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / SP_MODEL_FILE))
    per_pass = sum(len(ids) + 1 for ids in sp.encode(docs))
    passes = max(1, round(tokens / per_pass))
    path = root / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in range(passes):
            for d in docs:
                f.write(json.dumps({"text": f"{r}. {d}"}) + "\n")
    return path, passes * len(docs)


def baseline(corpus: Path, tokenizer: str, out: str) -> tuple[int, float, float]:
    """Single-process loop; returns (tokens, wall seconds, CPU seconds), tokenizer load excluded."""
    enc = prep._encoder(tokenizer)
    eos = enc.eos_id
    repeat = re.compile(r"(.)\1{100,}")
    t0, c0 = time.perf_counter(), time.process_time()
    with MMapWriter(out, best_dtype(enc.vocab_size)) as w, open(corpus, encoding="utf-8") as f:
        batch: list[str] = []
        for line in f:
            batch.append(repeat.sub(r"\1", json.loads(line)["text"]).strip())
            if len(batch) == 512:
                for ids in enc.encode(batch):
                    if ids:
                        w.add_document([*ids, eos])
                batch.clear()
        for ids in enc.encode(batch):
            if ids:
                w.add_document([*ids, eos])
        n = w.n_tokens
    return n, time.perf_counter() - t0, time.process_time() - c0


def ray_run(corpus: Path, tokenizer: str, out: str, workers: int, shard_bytes: int) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds the shard tasks used)."""
    t0 = time.perf_counter()
    r = prep.prepare(prep.PrepareConfig(inputs=(str(corpus),), tokenizer=tokenizer, output_prefix=out,
                                        workers=workers, shard_bytes=shard_bytes, progress=False))
    return r.n_tokens, time.perf_counter() - t0, r.extra["task_cpu_seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kind", choices=["paddlenlp", "sentencepiece", "both"], default="both")
    ap.add_argument("--shard-mb", type=float, default=1.0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--root", help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tok"
    train_tokenizer(build_corpus_text(), tok_dir)
    corpus, n_docs = make_corpus(root, args.tokens, tok_dir)
    shard_bytes = int(args.shard_mb * (1 << 20))
    kinds = ["paddlenlp", "sentencepiece"] if args.kind == "both" else [args.kind]
    print(f"corpus {corpus.stat().st_size / 1e6:.1f} MB, {n_docs:,} documents; shards of {args.shard_mb} MiB; "
          f"{os.cpu_count()} CPUs on this machine, local Ray with {args.cpus}; load avg {os.getloadavg()[0]:.2f}")
    summary = {}
    try:
        with prep.local_ray(num_cpus=args.cpus):
            for kind in kinds:
                tokenizer = str(tok_dir if kind == "paddlenlp" else tok_dir / SP_MODEL_FILE)
                warm = root / "warm.jsonl"
                warm.write_text("".join(json.dumps({"text": f"w {i}"}) + "\n" for i in range(400)))
                prep.prepare(prep.PrepareConfig(inputs=(str(warm),), tokenizer=tokenizer, shard_bytes=1000,
                                                output_prefix=str(root / "warm"), workers=2, overwrite=True, progress=False))
                prep._encoder(tokenizer)
                runs = {
                    "loop": lambda out, t=tokenizer: baseline(corpus, t, out),
                    "ray1": lambda out, t=tokenizer: ray_run(corpus, t, out, 1, shard_bytes),
                    "ray2": lambda out, t=tokenizer: ray_run(corpus, t, out, 2, shard_bytes),
                }
                order = list(runs)
                ratios: dict[str, list[float]] = {"ray1": [], "ray2": []}
                rates: dict[str, list[float]] = {k: [] for k in runs}
                per_cpu: dict[str, list[float]] = {k: [] for k in runs}
                busy: dict[str, list[float]] = {k: [] for k in runs}
                print(f"\n[{kind}]")
                for rnd in range(args.rounds):
                    rate = {}
                    outputs = {}
                    for name in order[rnd % 3:] + order[: rnd % 3]:
                        out = str(root / f"{kind}-{name}-{rnd}")
                        load0 = os.getloadavg()[0]
                        n, secs, cpu = runs[name](out)
                        rate[name] = n / secs
                        rates[name].append(rate[name])
                        per_cpu[name].append(n / cpu)
                        busy[name].append(cpu / secs)
                        outputs[name] = out
                        print(f"  round {rnd} {name:4s}: {n:,} tokens in {secs:6.2f} s = {rate[name]:>10,.0f} tok/s;"
                              f" {n / cpu:>9,.0f} tok per tokenizing CPU-s, {cpu / secs:.2f} CPUs busy"
                              f"  (load {load0:.2f} -> {os.getloadavg()[0]:.2f})")
                    for ext in (".bin", ".idx"):
                        blobs = {Path(o + ext).read_bytes() for o in outputs.values()}
                        assert len(blobs) == 1, f"outputs differ ({ext})"
                    for o in outputs.values():
                        for ext in (".bin", ".idx"):
                            os.unlink(o + ext)
                    for name in ratios:
                        ratios[name].append(rate[name] / rate["loop"])
                    print(f"  round {rnd} ratios to loop: ray1 {ratios['ray1'][-1]:.2f}x  ray2 {ratios['ray2'][-1]:.2f}x")
                med = {k: statistics.median(v) for k, v in rates.items()}
                summary[kind] = {
                    "tok_s_median": {k: round(v) for k, v in med.items()},
                    "ratio_median": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
                    "tok_per_cpu_s_median": {k: round(statistics.median(v)) for k, v in per_cpu.items()},
                    "cpus_busy_median": {k: round(statistics.median(v), 2) for k, v in busy.items()},
                    "ray2_over_ray1": round(statistics.median(
                        [a / b for a, b in zip(rates["ray2"], rates["ray1"], strict=True)]), 3),
                }
                print(f"  medians: {json.dumps(summary[kind])}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print("\nBENCH_PREPARE " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
