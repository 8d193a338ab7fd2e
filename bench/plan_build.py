"""Sample-plan build: bi150_ray.data.samples.build_plan against PaddleNLP's own builder.

Generates a corpus (random document lengths, uint16 tokens, `MMapWriter`) in a temporary
directory, then per round builds the train/valid/test plans twice with the same arguments:

- paddle: `paddlenlp.data.causal_dataset.build_train_valid_test_datasets(..., data_cache_path=D1)`
  in this process (world size 1: no barriers; it builds, writes its index cache, loads it back);
- ours:   `build_plan(..., data_cache_path=D2)`, which also writes PaddleNLP's cache files.

D1 and D2 are fresh every round and the corpus directory holds no `index-cache`, so neither side
reuses anything. Rounds alternate the two and swap which goes first. Every round checks the three
arrays of every split are equal (values and dtypes). The headline is the median over rounds of
paddle wall / ours wall; the process-CPU ratio is shown too (ours runs two threads after the
doc_idx shuffle, so its CPU exceeds its wall time). The machine may be shared: the load average
is printed with the figures.

Then sample reads: `get_sample` against `GPTDataset.__getitem__` on the same train plan, the same
random indices, alternating, reads/s of each (and the first reads checked equal).

The default targets follow the FORK Iluvatar job's shape (spec 4.3: B=2, R=8, G=128, seq 2048,
eval batch 256, eval_iters 1, eval every max_steps) with fewer steps.

    python bench/plan_build.py [--docs 220000] [--max-steps 500] [--seq-length 2048] [--rounds 5] [--numpy-only]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bi150_ray.data import kernels  # noqa: E402
from bi150_ray.data.mmap_format import MMapCorpus, MMapWriter  # noqa: E402
from bi150_ray.data.samples import GPTPlan, build_plan, get_sample, target_samples  # noqa: E402

ARRAYS = ("doc_idx", "sample_idx", "shuffle_idx")


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """PaddleNLP prints from Python and from C++ (cout): silence fd 1 for both sides alike."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def make_corpus(prefix: Path, n_docs: int, seed: int) -> tuple[int, int]:
    """Log-normal document lengths (median ~180 tokens, long tail, capped), uint16 tokens."""
    rng = np.random.RandomState(seed)
    lengths = np.minimum(rng.lognormal(5.2, 0.9, size=n_docs).astype(np.int64) + 1, 16_000)
    tokens = rng.randint(0, 32_000, size=int(lengths.sum()), dtype=np.uint16)
    with MMapWriter(prefix, np.uint16) as w:
        pos = 0
        for n in lengths.tolist():
            w.add_document(tokens[pos : pos + n])
            pos += n
    return n_docs, int(lengths.sum())


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def same_plans(theirs: tuple, ours: tuple) -> bool:
    for t, o in zip(theirs, ours, strict=True):
        if (t is None) != (o is None):
            return False
        if t is None:
            continue
        for k in ARRAYS:
            a, b = getattr(t, k), getattr(o, k)
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                return False
    return True


def bench_builds(
    build_paddle: Callable[..., tuple], prefix: str, targets: list[int], args: argparse.Namespace, root: Path
) -> tuple[bool, tuple, tuple]:
    """Alternating rounds of both builders on fresh cache dirs; prints per-round and median figures."""

    def paddle(cache: Path) -> tuple:
        with silenced():
            return build_paddle(
                [prefix],
                "mmap",
                args.split,
                targets,
                args.seq_length,
                args.seed,
                True,
                data_cache_path=str(cache),
            )

    def ours(cache: Path) -> tuple:
        return build_plan([prefix], args.split, targets, args.seq_length, args.seed, data_cache_path=cache)

    rows = []
    last: dict[str, tuple] = {}
    for r in range(args.rounds):
        order = [("paddle", paddle), ("ours", ours)]
        if r % 2:
            order.reverse()
        res = {}
        for name, fn in order:
            cache = root / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            res[name] = timed(lambda fn=fn, cache=cache: fn(cache))
        (theirs, pw, pc), (mine, ow, oc) = res["paddle"], res["ours"]
        equal = same_plans(theirs, mine)
        rows.append((pw, ow, pc, oc, equal))
        print(
            f"  round {r + 1}: paddle {pw:.3f}s (cpu {pc:.3f}s)  ours {ow:.3f}s (cpu {oc:.3f}s)  "
            f"ratio {pw / ow:.2f}x  equal={equal}  load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        last = {"paddle": theirs, "ours": mine}
    all_equal = all(row[4] for row in rows)
    print(
        f"  median paddle {statistics.median(r[0] for r in rows):.3f}s, ours {statistics.median(r[1] for r in rows):.3f}s; "
        f"speed ratio (median of per-round paddle/ours) {statistics.median(r[0] / r[1] for r in rows):.2f}x wall, "
        f"{statistics.median(r[2] / r[3] for r in rows):.2f}x process CPU; outputs equal in every round: {all_equal}"
    )
    return all_equal, last["paddle"], last["ours"]


def bench_reads(prefix: str, theirs: GPTPlan, ours: GPTPlan, args: argparse.Namespace) -> bool:
    corpus = MMapCorpus(prefix, verify_pointers=False)
    idx = np.random.RandomState(args.seed).randint(0, len(theirs), size=args.reads).tolist()
    d, s, sh = ours.doc_idx, ours.sample_idx, ours.shuffle_idx
    equal = all(np.array_equal(theirs[i]["text"], get_sample(corpus, d, s, sh, i)) for i in idx[:2000])

    def read_paddle() -> None:
        for i in idx:
            theirs[i]["text"]

    def read_ours() -> None:
        for i in idx:
            get_sample(corpus, d, s, sh, i)

    rates: dict[str, list[float]] = {"paddle": [], "ours": []}
    for r in range(args.read_rounds):
        order = [("paddle", read_paddle), ("ours", read_ours)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            _, wall, _ = timed(fn)
            rates[name].append(len(idx) / wall)
    p, o = statistics.median(rates["paddle"]), statistics.median(rates["ours"])
    print(
        f"sample reads ({len(idx)} random train indices x {args.read_rounds} rounds, median): "
        f"GPTDataset.__getitem__ {p:,.0f}/s, get_sample {o:,.0f}/s, ratio {o / p:.2f}x; first 2000 equal: {equal}"
    )
    return equal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=220_000)
    ap.add_argument(
        "--max-steps",
        default="20,500",
        help="comma list; each gives the targets of one benchmark (20: ~1.5 epochs of the default corpus, "
        "500: ~37 epochs)",
    )
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--split", default="949,50,1")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reads", type=int, default=20_000, help="sample reads per side per round")
    ap.add_argument("--read-rounds", type=int, default=3)
    ap.add_argument(
        "--workdir", default=None, help="parent of the temporary directory (default: system temp)"
    )
    ap.add_argument(
        "--numpy-only",
        action="store_true",
        help="build our plans without the compiled kernels (what a node without a C compiler runs)",
    )
    args = ap.parse_args()
    if args.numpy_only:
        kernels.COMPILED = False

    with silenced():
        from paddlenlp.data.causal_dataset import build_train_valid_test_datasets

    root = Path(tempfile.mkdtemp(prefix="plan-build-", dir=args.workdir))
    try:
        data = root / "data"
        data.mkdir()
        prefix = str(data / "corpus")
        t0 = time.perf_counter()
        n_docs, n_tokens = make_corpus(Path(prefix), args.docs, args.seed)
        print(
            f"corpus: {n_docs} documents, {n_tokens} tokens (uint16), written in {time.perf_counter() - t0:.1f}s"
        )
        print(
            f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
            f"load average at start {os.getloadavg()[0]:.2f}; our plan kernels: "
            + ("compiled (bi150_ray.data._kernels)" if kernels.COMPILED else "NumPy only (--numpy-only or extension not built)")
        )
        ok = True
        plans: tuple = ()
        for max_steps in (int(x) for x in args.max_steps.split(",")):
            # FORK job shape: B=2, eval batch 256, R=8, G=128, eval every max_steps, eval_iters = test_iters = 1.
            targets = target_samples(2, 256, 8, max_steps, 128, max_steps, 1, 1)
            epochs = build_plan([prefix], args.split, targets, args.seq_length, args.seed, cache=False)[
                0
            ].num_epochs
            print(
                f"plan build, max_steps {max_steps}: targets [train, valid, test] = {targets}, seq_length "
                f"{args.seq_length}, split {args.split!r}, seed {args.seed}; train split needs {epochs} epochs"
            )
            equal, theirs, ours = bench_builds(build_train_valid_test_datasets, prefix, targets, args, root)
            ok &= equal
            plans = (theirs[0], ours[0])
        ok &= bench_reads(prefix, plans[0], plans[1], args)
        return 0 if ok else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
