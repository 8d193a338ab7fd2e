"""Gather+merge throughput against `cp -r` of the same bytes on the same disk.

Builds a multi-GB tp2 x pp2 LLaMA checkpoint the way PaddleNLP saves it (PaddleNLP's own split
mappings, Paddle's pipeline segmentation; tests/unit/shard_factory.py), then alternates
`cp -r CKPT DST` and `merge_checkpoint(CKPT, OUT)` (tp/pp merge into sharded safetensors with
manifest), and prints GB/s of each and the ratio (target: merge >= 0.5x cp).

    .venv/bin/python bench/gather.py --hidden 2048 --layers 8 --rounds 2

With --root, a checkpoint already built there by an earlier run (same sizes) is reused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def _cpu_s() -> float:
    """CPU seconds of this process, all threads: the merge's work, whatever else shares the machine."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--root", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    a = p.parse_args()

    from bi150_ray.checkpoint.merge import merge_checkpoint
    from tests.unit import shard_factory as sf

    root = a.root or tempfile.mkdtemp(prefix="bench-gather-")
    ckpt = os.path.join(root, "checkpoint-1")
    cfg = sf.tiny_config(
        num_layers=a.layers, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 64 * 64,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=a.vocab,
    )
    t0 = time.time()
    if os.path.isfile(os.path.join(ckpt, "config.json")) and a.root:
        print(f"reusing {ckpt} (delete it to rebuild)")
    else:
        model, state = sf.build_model(cfg)
        del model
        sf.save_checkpoint(state, cfg, ckpt, tp=2, pp=2)
        del state
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    print(f"checkpoint: tp2 x pp2, {size / 1e9:.2f} GB in {len(os.listdir(ckpt))} files, built in {time.time() - t0:.0f}s")
    cold = _drop_caches()
    print(f"page cache dropped before each run: {cold}")

    cp_s, merge_s, merge_cpu = [], [], []
    for r in range(a.rounds):
        for what in ("cp", "merge"):
            dst = os.path.join(root, f"{what}-{r}")
            _drop_caches()
            t = time.perf_counter()
            if what == "cp":
                subprocess.run(["cp", "-r", ckpt, dst], check=True)
                subprocess.run(["sync"], check=True)
                cp_s.append(time.perf_counter() - t)
            else:
                cpu0 = _cpu_s()
                merge_checkpoint(ckpt, dst, tp=2, pp=2)
                subprocess.run(["sync"], check=True)
                merge_s.append(time.perf_counter() - t)
                merge_cpu.append(_cpu_s() - cpu0)
                print(f"        merge CPU time (all threads) {merge_cpu[-1]:.2f}s", flush=True)
            print(f"round {r} {what:5s} {time.perf_counter() - t:7.2f}s  {size / 1e9 / (time.perf_counter() - t):.3f} GB/s", flush=True)
            shutil.rmtree(dst)
    cp_m, merge_m = statistics.median(cp_s), statistics.median(merge_s)
    print(f"median cp {size / 1e9 / cp_m:.3f} GB/s, merge {size / 1e9 / merge_m:.3f} GB/s, "
          f"ratio merge/cp = {cp_m / merge_m:.2f} (target >= 0.5); "
          f"merge CPU {statistics.median(merge_cpu) / (size / 1e9):.2f} s/GB; load average {os.getloadavg()[0]:.1f}")
    if not a.root:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
