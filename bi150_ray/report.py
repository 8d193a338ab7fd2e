"""Run report: a Markdown page with loss/eval curves and throughput, made from the run record.

`bi150-ray report RUN` regenerates it; the driver writes it at the end of every run.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from bi150_ray import runrecord


def restarts(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attempt after the first (a restart after a failure, or a rerun of the job): when it
    started, how the one before ended, and the step it resumed from.

    The curves mark these, so a loss bump or a throughput gap reads as the restart it was.
    """
    attempts = rec.get("attempts", [])
    out = []
    for prev, cur in itertools.pairwise(attempts):
        step = int(cur["resumed_from"].rsplit("-", 1)[1]) if cur.get("resumed_from") else 0
        out.append({"attempt": cur["number"], "started": cur["started"], "resume_step": step,
                    "after": prev.get("outcome", "")})
    return out


def _plot(rec: dict[str, Any], marks: list[dict[str, Any]], path: str) -> bool:
    steps, evals = rec.get("steps", []), rec.get("evals", [])
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.6))
    ax1.plot([s["global_step"] for s in steps], [s["loss"] for s in steps], ".", ms=2, label="train loss")
    if evals:
        ax1.plot([e["global_step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax2.plot([s["global_step"] for s in steps], [s.get("tokens_per_second", 0) for s in steps], ".", ms=2)
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s (all ranks)")
    t0 = rec.get("created", steps[0].get("t", 0.0))
    ax3.plot([(s.get("t", t0) - t0) / 60 for s in steps], [s.get("tokens_per_second", 0) for s in steps], ".", ms=2)
    ax3.set_xlabel("minutes since the run was created")
    ax3.set_ylabel("tokens/s (all ranks)")
    for i, m in enumerate(marks):
        label = "relaunch" if i == 0 else None
        for ax in (ax1, ax2):
            ax.axvline(m["resume_step"], color="red", linestyle="--", linewidth=1, label=label if ax is ax1 else None)
        ax3.axvline((m["started"] - t0) / 60, color="red", linestyle="--", linewidth=1)
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_report(record_path: str) -> str:
    rec = runrecord.load(record_path)
    out_dir = os.path.dirname(record_path)
    steps, evals = rec.get("steps", []), rec.get("evals", [])
    marks = restarts(rec)
    has_plot = _plot(rec, marks, os.path.join(out_dir, "curves.png"))
    train = rec.get("final", {}).get("train_metrics", {})
    lines = [
        f"# Run {rec['run_name']}",
        "",
        f"- status: **{rec['status']}**; config: `{rec['config_source']}` (sha256 {rec['config_hash'][:12]})",
        f"- degrees: {rec.get('degrees')}",
        f"- environment: {rec.get('environment')}",
        f"- gathered model: `{rec.get('model_dir')}`",
        f"- attempts: {len(rec.get('attempts', []))}",
        "",
    ]
    if steps:
        first, last = steps[0], steps[-1]
        lines += [
            f"- train loss: {first['loss']:.4f} at step {first['global_step']} -> {last['loss']:.4f} at step {last['global_step']}",
        ]
    if evals:
        lines += ["- eval loss: " + ", ".join(f"{e['eval_loss']:.4f} (step {e['global_step']})" for e in evals)]
    if train:
        lines += [f"- train metrics: {train}"]
    if steps:
        tps = sorted(s.get("tokens_per_second", 0) for s in steps)
        last = steps[-1]
        lines += [f"- throughput: median {tps[len(tps) // 2]:.0f} tokens/s over all ranks; "
                  f"model FLOPs/token {last.get('model_flops_per_token', 'unknown')}; MFU {last.get('mfu', 'unknown')}"]
    peaks = rec.get("peak_memory", {})
    if peaks:
        dev = [p["device_max_memory_allocated_bytes"] for p in peaks.values() if "device_max_memory_allocated_bytes" in p]
        host = [p["host_peak_rss_bytes"] for p in peaks.values() if "host_peak_rss_bytes" in p]
        lines += [f"- peak device memory per rank: {_gib(max(dev)) + ' (highest rank)' if dev else 'not reported by this backend'}"
                  + (f"; peak host RSS per rank: {_gib(max(host))} (highest rank)" if host else "")]
    lines += ["", "## Attempts", ""]
    for a in rec.get("attempts", []):
        lines.append(f"- #{a['number']}: {a['outcome']} {('— ' + a['cause'].splitlines()[0]) if a.get('cause') else ''}"
                     + (f" (resumed from {a['resumed_from']})" if a.get("resumed_from") else ""))
    if marks:
        lines += ["", f"{len(marks)} relaunch(es), marked as red dashed lines on the curves: "
                  + "; ".join(f"attempt {m['attempt']} after {m['after']}, from step {m['resume_step']}" for m in marks)]
    if has_plot:
        lines += ["", "## Curves", "", "![curves](curves.png)"]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
