"""The run report: relaunches marked on the curves, throughput over time, peak memory."""

import json

import numpy as np

from bi150_ray.report import restarts, write_report


def _record(tmp_path, attempts):
    steps = [{"global_step": s, "loss": 8.0 - s / 10, "tokens_per_second": 1000.0 + s, "t": 1000.0 + 2 * s,
              "model_flops_per_token": 1.2e6, "mfu": "unknown"} for s in range(1, 31)]
    rec = {
        "run_name": "r", "status": "succeeded", "config_source": "c.json", "config_hash": "0" * 64,
        "created": 1000.0, "degrees": {"dp": 2}, "environment": {}, "model_dir": "/m",
        "attempts": attempts, "steps": steps, "evals": [{"global_step": 20, "eval_loss": 6.5}],
        "peak_memory": {"0": {"host_peak_rss_bytes": 3 * 2**30}, "1": {"host_peak_rss_bytes": 2**30}},
    }
    path = tmp_path / "run_record.json"
    path.write_text(json.dumps(rec))
    return str(path)


def _red_pixels(png: str) -> int:
    import matplotlib.pyplot as plt

    img = plt.imread(png)[..., :3]
    return int(np.sum((img[..., 0] > 0.9) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)))


def test_relaunch_is_marked_on_the_curves_and_named_in_the_report(tmp_path):
    attempts = [
        {"number": 1, "started": 1000.0, "outcome": "infrastructure", "cause": "rank 3 killed by SIGKILL\nmore"},
        {"number": 2, "started": 1030.0, "outcome": "succeeded", "cause": "", "resumed_from": "checkpoint-10"},
    ]
    report = open(write_report(_record(tmp_path, attempts))).read()
    assert "1 relaunch(es)" in report and "attempt 2 after infrastructure, from step 10" in report
    assert "(resumed from checkpoint-10)" in report
    assert "peak host RSS per rank: 3.00 GiB" in report and "peak device memory per rank: not reported" in report
    assert "median 1016 tokens/s" in report
    with_restart = _red_pixels(str(tmp_path / "curves.png"))

    single = tmp_path / "single"
    single.mkdir()
    write_report(_record(single, attempts[:1]))
    assert _red_pixels(str(single / "curves.png")) == 0 < with_restart  # the red lines are the relaunch


def test_restarts_lists_every_attempt_after_the_first():
    rec = {"attempts": [
        {"number": 1, "started": 1.0, "outcome": "hang"},
        {"number": 2, "started": 2.0, "outcome": "application", "resumed_from": "checkpoint-20"},
        {"number": 3, "started": 3.0, "outcome": "succeeded", "resumed_from": None},
    ]}
    assert [(m["attempt"], m["after"], m["resume_step"]) for m in restarts(rec)] == [(2, "hang", 20), (3, "application", 0)]
