"""What the job-start pre-flight (doctor's cheap checks) adds before the first rank starts.

On a fresh simulated cluster (2 BI150 nodes + head on 127.0.0.1) the first thing a job sends to
a node is its data-plan task on node 0, which waits for Ray to start a worker there. This
alternates fresh clusters with and without the pre-flight in front of that task, then repeats the
pre-flight on the warm cluster, and prints medians and the ratio.

    .venv/bin/python bench/preflight_cost.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from bi150_ray import config, doctor
    from bi150_ray.demo import demo_paddlenlp_args, demo_runtime, simulated_cluster
    from bi150_ray.plan import make_plan

    root = tempfile.mkdtemp(prefix="preflight-bench-")
    cfg = demo_paddlenlp_args(os.path.join(root, "model"), os.path.join(root, "data"), 2)
    cfg["runtime"] = demo_runtime(root)
    plan = make_plan(config.from_dict(cfg))

    def first_task_on_node0() -> None:
        n0 = doctor.candidate_nodes("BI150")[0]["NodeID"]
        f = ray.remote(num_cpus=0)(lambda: 1)
        ray.get(f.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n0, soft=False)).remote())

    times: dict[str, list[float]] = {"without": [], "with": [], "warm": []}
    for _ in range(args.rounds):
        for with_preflight in (False, True):
            with simulated_cluster(2, 2):
                time.sleep(5)  # let the nodes settle, as a job submitted after `ray up` would
                t0 = time.time()
                if with_preflight:
                    doctor.preflight(plan, lambda s: None)
                first_task_on_node0()
                times["with" if with_preflight else "without"].append(time.time() - t0)
                if with_preflight:
                    t1 = time.time()
                    doctor.preflight(plan, lambda s: None)
                    times["warm"].append(time.time() - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"first task on node 0, fresh cluster: without pre-flight {med['without']:.2f}s, "
          f"with {med['with']:.2f}s (ratio {med['with'] / med['without']:.2f}x, +{med['with'] - med['without']:.2f}s)")
    print(f"pre-flight on a warm cluster: {med['warm']:.2f}s   samples: {times}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
