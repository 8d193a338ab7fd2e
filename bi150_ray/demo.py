"""`make demo`: the whole job on a simulated cluster on this machine.

Several Ray nodes in one process tree (each advertising BI150 resources, all on 127.0.0.1), CPU
ranks over gloo, a tiny LLaMA trained with data parallel x sharding stage1 across two nodes whose
"local disks" are separate directories, evaluation, checkpoints, the gathered model, a load-back
check and a generated sample. Assets (tokenizer, corpus) are built locally; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bi150_ray import config as config_mod
from bi150_ray.demo_assets import build_demo_assets


def demo_paddlenlp_args(model_dir: str, data_dir: str, max_steps: int = 60) -> dict[str, Any]:
    """The embedded default job: a PaddleNLP pretrain JSON for the tiny model."""
    return {
        "model_name_or_path": model_dir,
        "tokenizer_name_or_path": model_dir,
        "input_dir": data_dir,
        "output_dir": "./checkpoints",
        "split": "949,50,1",
        "max_seq_length": 128,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "sharding": "stage1",
        "sharding_parallel_degree": 2,
        "tensor_parallel_degree": 1,
        "pipeline_parallel_degree": 1,
        "learning_rate": 0.003,
        "min_learning_rate": 0.0003,
        "warmup_steps": 6,
        "lr_scheduler_type": "cosine",
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "max_steps": max_steps,
        "logging_steps": 1,
        "eval_steps": max(max_steps // 3, 1),
        "save_steps": max(max_steps // 3, 1),
        "save_total_limit": 2,
        "seed": 42,
        "do_train": True,
        "do_eval": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "device": "cpu",
    }


def demo_runtime(root: str, nodes: int = 2, devices_per_node: int = 2) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "devices_per_node": devices_per_node,
        "backend": "cpu",
        "storage_path": os.path.join(root, "nodes", "node{node}"),  # one "local disk" per node
        "shared_storage": False,
        "results_path": os.path.join(root, "results"),
        "run_name": "demo",
        "eval_iters": 4,
        "placement_timeout_s": 60.0,
        "heartbeat_s": 2.0,
        "startup_timeout_s": 300.0,
        "step_timeout_s": 300.0,
    }


def pin_ray_to_loopback() -> None:
    """Keep a one-machine Ray cluster on 127.0.0.1.

    Ray rewrites a bootstrap address of 127.0.0.1 to the machine's primary IP before connecting
    (services.resolve_ip_for_localhost), while the nodes we start listen on 127.0.0.1 only, so
    `ray.init(address="127.0.0.1:PORT")` would hang. Ray's own switch for "no multi-host cluster"
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes it keep the loopback address; child processes
    inherit it through the environment.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _free_agent_ports() -> dict[str, int]:
    """Explicit free ports for a node's agents: Ray's fixed defaults (the dashboard agent's
    52365, ...) collide with any other Ray instance on the same machine."""
    import socket

    ports = []
    socks = []
    for _ in range(4):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    keys = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port")
    return dict(zip(keys, ports, strict=True))


@contextmanager
def loopback_cluster(head_cpus: int):
    """A Ray head on 127.0.0.1 with free agent ports, connected to; shut down on exit."""
    pin_ray_to_loopback()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                        **_free_agent_ports()},
    )
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextmanager
def simulated_cluster(nodes: int, devices_per_node: int, cpus_per_node: int | None = None):
    """A head (no BI150: it runs the driver) plus `nodes` worker nodes with BI150, on 127.0.0.1."""
    import ray

    cpus = cpus_per_node or devices_per_node
    with loopback_cluster(head_cpus=1) as cluster:
        for i in range(nodes):
            cluster.add_node(
                num_cpus=cpus,
                resources={"BI150": devices_per_node},
                node_ip_address="127.0.0.1",
                labels={"bi150-ray/simulated-node": str(i)},
                **_free_agent_ports(),
            )
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster


@dataclass
class DemoOutcome:
    result: Any
    config_path: str
    max_logit_diff: float
    sample: str
    seconds: float


def write_demo_config(root: str, max_steps: int = 60) -> str:
    assets = build_demo_assets(os.path.join(root, "assets"))
    cfg = demo_paddlenlp_args(str(assets.model_dir), str(assets.data_dir), max_steps)
    cfg["runtime"] = demo_runtime(root)
    path = os.path.join(root, "demo.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=1)
    return path


def run_demo(root: str = "demo_out", max_steps: int = 60) -> DemoOutcome:
    from bi150_ray.checkpoint.verify import compare_to_checkpoint, generate_sample
    from bi150_ray.driver import PretrainJob

    t0 = time.time()
    root = os.path.abspath(root)
    Path(root).mkdir(parents=True, exist_ok=True)
    config_path = write_demo_config(root, max_steps)
    job = config_mod.load(config_path)
    with simulated_cluster(job.runtime.nodes, job.runtime.devices_per_node):
        result = PretrainJob(job).run()
    final_ckpt = max(result.checkpoints, key=lambda c: int(c.rsplit("-", 1)[1]))
    diff = compare_to_checkpoint(result.model_dir, final_ckpt)
    sample = generate_sample(result.model_dir, "The for statement")
    return DemoOutcome(result, config_path, diff, sample, time.time() - t0)


def main(root: str = "demo_out", max_steps: int = 60) -> int:
    out = run_demo(root, max_steps)
    r = out.result
    first_eval, last_eval = r.evals[0]["eval_loss"], r.evals[-1]["eval_loss"]
    print()
    print(f"demo finished in {out.seconds:.0f}s ({r.attempts} attempt(s))")
    print(f"  train loss     {r.last_step.get('loss', float('nan')):.4f} at step {r.last_step.get('global_step')}")
    print(f"  eval loss      {first_eval:.4f} (step {r.evals[0]['global_step']}) -> {last_eval:.4f} (step {r.evals[-1]['global_step']})")
    print(f"  load-back      max |logits(gathered) - logits(final checkpoint)| = {out.max_logit_diff:g}")
    print(f"  sample         {out.sample!r}")
    print(f"  model          {r.model_dir}")
    print(f"  report         {os.path.join(r.results_dir, 'report.md')}")
    print(f"  run record     {r.run_record}")
    print(f"  rank logs      {', '.join(r.log_dirs)}")
    print(f"  config         {out.config_path}  (PaddleNLP JSON + runtime section)")
    return 0
