"""Turn a validated JobConfig into what the ranks will run, and refuse impossible jobs early.

Everything here happens on the driver before any actor starts: resolve the parallel degrees the
way PaddleNLP will, check them against the model, adapt the arguments to the device backend, and
decide where on each node the run writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from bi150_ray.config import ConfigError, JobConfig
from bi150_ray.topology import Degrees, RankSlot, TopologyError, layout, resolve_degrees, validate_model

# Model dimensions for hub names we cannot read offline (spec §3.3).
KNOWN_MODELS: dict[str, dict[str, int]] = {
    "__internal_testing__/sci-benchmark-llama-13b-init0501": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
    },
}
KNOWN_MODELS["__internal_testing__/sci-benchmark-llama-13b-5k"] = KNOWN_MODELS[
    "__internal_testing__/sci-benchmark-llama-13b-init0501"
]
KNOWN_MODELS["facebook/llama-13b"] = KNOWN_MODELS["__internal_testing__/sci-benchmark-llama-13b-init0501"]

# Switches that need an accelerator build of Paddle; the CPU backend turns them off.
_ACCELERATOR_ONLY = ("use_flash_attention", "use_fused_rms_norm", "use_fused_rope", "fp16", "bf16")


@dataclass
class RunPaths:
    """Where one node writes for this run (same layout on every node)."""

    run_dir: str

    @property
    def output_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    @property
    def log_dir(self) -> str:
        return os.path.join(self.run_dir, "logs")

    @property
    def index_cache(self) -> str:
        return os.path.join(self.run_dir, "index-cache")

    @property
    def args_path(self) -> str:
        return os.path.join(self.run_dir, "paddlenlp_args.json")

    def events_path(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"events.{rank}.jsonl")

    def worker_log(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"workerlog.{rank}")


@dataclass
class LaunchPlan:
    job: JobConfig
    degrees: Degrees
    slots: list[RankSlot]
    model_dims: dict[str, int] | None
    adjustments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return self.job.run_name

    def node_paths(self, node_index: int) -> RunPaths:
        root = self.job.runtime.storage_path.replace("{node}", str(node_index))
        return RunPaths(os.path.abspath(os.path.join(root, self.run_name)))

    @property
    def results_dir(self) -> str:
        rt = self.job.runtime
        root = rt.results_path or rt.storage_path.replace("{node}", "driver")
        return os.path.abspath(os.path.join(root, self.run_name))

    def rank_args(self, node_index: int, resume_step: int | None = None) -> dict[str, Any]:
        """The PaddleNLP JSON the ranks on one node receive (resuming from checkpoint-<resume_step>)."""
        job = self.job
        args = dict(job.paddlenlp)
        for key in ("model_name_or_path", "tokenizer_name_or_path", "input_dir", "data_cache"):
            if isinstance(args.get(key), str):
                args[key] = job.resolve_path(args[key])
        paths = self.node_paths(node_index)
        args["output_dir"] = paths.output_dir
        args.setdefault("logging_dir", os.path.join(paths.run_dir, "visualdl"))
        if not args.get("data_cache"):
            args["data_cache"] = paths.index_cache
        if job.runtime.shared_storage:
            args.setdefault("share_folder", True)
        if resume_step is not None:
            args["resume_from_checkpoint"] = os.path.join(paths.output_dir, f"checkpoint-{resume_step}")
        if job.runtime.backend == "cpu":
            args["device"] = "cpu"
            for key in _ACCELERATOR_ONLY:
                if args.get(key):
                    args[key] = False
        return args

    @property
    def max_steps(self) -> int:
        return int(self.job.paddlenlp["max_steps"])

    @property
    def tokens_per_step(self) -> int:
        a = self.job.paddlenlp
        return (
            int(a.get("per_device_train_batch_size", 8))
            * int(a.get("gradient_accumulation_steps", 1))
            * self.degrees.dataset_world_size
            * int(a.get("max_seq_length", 1024))
        )


_DIM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")


def read_model_dims(job: JobConfig) -> dict[str, int] | None:
    """Model dimensions from a local config.json, else from KNOWN_MODELS, else None."""
    name = job.paddlenlp["model_name_or_path"]
    cfg_file = os.path.join(job.resolve_path(name), "config.json")
    if not os.path.isfile(cfg_file):
        return KNOWN_MODELS.get(name)
    with open(cfg_file, encoding="utf-8") as fh:
        cfg = json.load(fh)
    dims = {k: int(cfg[k]) for k in _DIM_KEYS if cfg.get(k) is not None}
    dims.setdefault("num_key_value_heads", dims["num_attention_heads"])
    return dims


def make_plan(job: JobConfig) -> LaunchPlan:
    """Resolve and validate; raises ConfigError with the key to change."""
    rt = job.runtime
    where = job.source
    try:
        degrees = resolve_degrees(job.paddlenlp, rt.world_size)
    except TopologyError as exc:
        raise ConfigError(f"{where}: {exc} (world = {rt.nodes} nodes x {rt.devices_per_node} devices)") from None
    if rt.backend == "cpu" and (degrees.tp > 1 or degrees.pp > 1 or degrees.sep > 1):
        raise ConfigError(
            f"{where}: tensor/pipeline/sep parallelism (tp={degrees.tp}, pp={degrees.pp}, sep={degrees.sep}) "
            "cannot run on the cpu backend (Paddle's gloo has no calc-stream collectives); use corex or "
            "iluvatar_gpu, or set tensor_parallel_degree/pipeline_parallel_degree to 1."
        )
    dims = read_model_dims(job)
    warnings: list[str] = []
    if dims is not None:
        a = job.paddlenlp
        try:
            warnings += validate_model(
                degrees,
                num_attention_heads=dims["num_attention_heads"],
                num_key_value_heads=dims.get("num_key_value_heads"),
                num_hidden_layers=a.get("num_hidden_layers") or dims["num_hidden_layers"],
                intermediate_size=dims.get("intermediate_size"),
                vocab_size=dims.get("vocab_size"),
                fuse_attention_qkv=bool(a.get("fuse_attention_qkv")),
                virtual_pp_degree=int(a.get("virtual_pp_degree", 1) or 1),
                gradient_accumulation_steps=int(a.get("gradient_accumulation_steps", 1)),
            )
        except TopologyError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    else:
        warnings.append(
            f"model '{job.paddlenlp['model_name_or_path']}' is neither a local directory nor a known model: "
            "head/layer divisibility was not checked"
        )
    plan = LaunchPlan(job=job, degrees=degrees, slots=layout(rt.nodes, rt.devices_per_node), model_dims=dims)
    plan.warnings = warnings
    if rt.backend == "cpu":
        turned_off = [k for k in _ACCELERATOR_ONLY if job.paddlenlp.get(k)]
        if turned_off:
            plan.adjustments.append(f"cpu backend: turned off {', '.join(turned_off)} (fp32 on CPU)")
        if job.paddlenlp.get("device", "gpu") != "cpu":
            plan.adjustments.append("cpu backend: device set to 'cpu'")
    if job.paddlenlp.get("output_dir"):
        plan.adjustments.append(
            f"output_dir '{job.paddlenlp['output_dir']}' replaced by the run's storage ({plan.node_paths(0).output_dir})"
        )
    return plan
