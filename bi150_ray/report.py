"""Run report: a Markdown page with loss/eval curves and throughput, made from the run record.

`bi150-ray report RUN` regenerates it; the driver writes it at the end of every run.
"""

from __future__ import annotations

import os
from typing import Any

from bi150_ray import runrecord


def _plot(steps: list[dict[str, Any]], evals: list[dict[str, Any]], path: str) -> bool:
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot([s["global_step"] for s in steps], [s["loss"] for s in steps], label="train loss")
    if evals:
        ax1.plot([e["global_step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot([s["global_step"] for s in steps], [s.get("tokens_per_second", 0) for s in steps])
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s (all ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(record_path: str) -> str:
    rec = runrecord.load(record_path)
    out_dir = os.path.dirname(record_path)
    steps, evals = rec.get("steps", []), rec.get("evals", [])
    has_plot = _plot(steps, evals, os.path.join(out_dir, "curves.png"))
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
    lines += ["", "## Attempts", ""]
    for a in rec.get("attempts", []):
        lines.append(f"- #{a['number']}: {a['outcome']} {('— ' + a['cause'].splitlines()[0]) if a.get('cause') else ''}")
    if has_plot:
        lines += ["", "## Curves", "", "![curves](curves.png)"]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
