"""Job configuration: a PaddleNLP pretrain JSON, unchanged, plus an optional `runtime` section.

The PaddleNLP part is validated here, off the ranks, against a snapshot of the argument
dataclasses the rank program parses (`paddlenlp_args.json`, kept equal to the installed
PaddleNLP by a unit test), so a typo fails in a second on the head instead of after 64 processes
have started. Everything about *where and how* to run lives in `RuntimeConfig`; defaults live in
the dataclass and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bi150_ray.envcontract import BACKENDS, is_reserved

RUNTIME_KEY = "runtime"


class ConfigError(ValueError):
    """One clear message naming the file and key, and what to do."""


@dataclass
class RuntimeConfig:
    """Where and how the job runs. Every field can be set in the config's `runtime` section."""

    nodes: int = 1
    devices_per_node: int = 1
    backend: str = "cpu"  # cpu (gloo) | corex (CoreX CUDA-compatible Paddle) | iluvatar_gpu (custom device)
    resource_name: str = "BI150"  # the Ray custom resource each node advertises
    # Where ranks write checkpoints, logs and index caches. On node-local storage every node uses
    # the same path on its own disk; "{node}" in the path is replaced by the node index (used to
    # simulate separate disks on one machine).
    storage_path: str = "./bi150_runs"
    shared_storage: bool = False
    # Where the driver writes the run record, report and gathered model (defaults to storage_path
    # with "{node}" replaced by "driver").
    results_path: str | None = None
    run_name: str | None = None  # default: config name + hash, so re-running the same job resumes it
    cpus_per_rank: float = 1.0
    placement_timeout_s: float = 120.0
    eval_iters: int = 1  # batches per evaluation; the BI150 fork of run_pretrain uses 1
    test_iters: int = 1
    env: dict[str, str] = field(default_factory=dict)  # vendor/user variables for every rank
    gather: bool = True  # gather the final model into one directory at the end
    heartbeat_s: float = 5.0
    poll_s: float = 0.5
    # Hang timeouts per phase (seconds without a heartbeat-visible change of step).
    startup_timeout_s: float = 900.0
    step_timeout_s: float = 1800.0
    eval_timeout_s: float = 1800.0
    checkpoint_timeout_s: float = 1800.0
    max_app_restarts: int = 0  # relaunches after a rank exits non-zero
    max_infra_restarts: int = 3  # relaunches after an actor or node dies
    max_hang_restarts: int = 1
    # Resume even when the global batch, data-parallel world, prefixes, split, seq_length or seed
    # changed since the checkpoint, so data would be skipped, repeated or re-dealt (data/plan.py).
    allow_data_skew_on_resume: bool = False
    # Pre-flight at job start (bi150_ray/doctor.py): devices, versions, interface, storage, clocks
    # on every node, ~0.2 s once Ray's workers are up. The collective test (all-reduce + MB/s per
    # node pair) starts every rank once more (10-30 s on the CPU demo), so it is opt-in here;
    # `bi150-ray doctor` runs it by default.
    preflight: bool = True
    preflight_collective: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass
class JobConfig:
    """A validated job: the PaddleNLP arguments as the user wrote them, and the runtime."""

    paddlenlp: dict[str, Any]
    runtime: RuntimeConfig
    source: str = "<dict>"
    base_dir: str = "."  # relative data/model paths resolve against the config file's folder

    def config_hash(self) -> str:
        blob = json.dumps({"paddlenlp": self.paddlenlp, "runtime": dataclasses.asdict(self.runtime)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def run_name(self) -> str:
        if self.runtime.run_name:
            return self.runtime.run_name
        stem = Path(self.source).stem if self.source != "<dict>" else "job"
        blob = json.dumps(self.paddlenlp, sort_keys=True) + f"|{self.runtime.nodes}x{self.runtime.devices_per_node}"
        return f"{stem}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def resolve_path(self, value: str) -> str:
        """A relative path that exists next to the config file is taken from there."""
        if not value or os.path.isabs(value) or len(value.split()) > 1:
            return value
        candidate = os.path.normpath(os.path.join(self.base_dir, value))
        return candidate if os.path.exists(candidate) else value


def paddlenlp_argument_kinds() -> dict[str, str]:
    """Keys the rank program accepts, with a coarse type kind each (see train/arguments.py)."""
    text = resources.files("bi150_ray").joinpath("paddlenlp_args.json").read_text()
    return json.loads(text)


_KIND_CHECKS = {
    # PaddleNLP's JSON parser hands values straight to the dataclass: 0/1 work as booleans.
    "bool": lambda v: isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}


def _check_paddlenlp(args: dict[str, Any], where: str) -> None:
    kinds = paddlenlp_argument_kinds()
    for key, value in args.items():
        if key not in kinds:
            close = [k for k in kinds if k.replace("_", "") == key.replace("_", "").lower()]
            hint = f" Did you mean '{close[0]}'?" if close else " Remove it or check the spelling."
            raise ConfigError(f"{where}: unknown key '{key}': not a PaddleNLP pretrain argument.{hint}")
        kind = kinds[key]
        if value is not None and not _KIND_CHECKS[kind](value):
            raise ConfigError(
                f"{where}: key '{key}' must be {kind}, got {type(value).__name__} {value!r}."
            )


def _runtime_from_dict(data: dict[str, Any], where: str) -> RuntimeConfig:
    known = {f.name: f for f in dataclasses.fields(RuntimeConfig)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key 'runtime.{key}'. Known keys: {', '.join(sorted(known))}."
            )
        default = known[key].default
        expected = type(default) if default is not dataclasses.MISSING and default is not None else None
        if key == "env":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{where}: 'runtime.env' must be an object of string values.")
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif expected is not None and (not isinstance(value, expected) or isinstance(value, bool) != (expected is bool)):
            raise ConfigError(
                f"{where}: 'runtime.{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}."
            )
    runtime = RuntimeConfig(**data)
    _check_runtime(runtime, where)
    return runtime


def _check_runtime(rt: RuntimeConfig, where: str) -> None:
    if rt.backend not in BACKENDS:
        raise ConfigError(f"{where}: 'runtime.backend' is '{rt.backend}'; use one of {', '.join(BACKENDS)}.")
    for key in ("nodes", "devices_per_node"):
        if getattr(rt, key) < 1:
            raise ConfigError(f"{where}: 'runtime.{key}' must be at least 1.")
    for key in rt.env:
        if is_reserved(key):
            raise ConfigError(
                f"{where}: 'runtime.env.{key}' is set by bi150-ray for every rank (the launch contract); remove it."
            )
    if rt.shared_storage and "{node}" in rt.storage_path:
        raise ConfigError(f"{where}: 'runtime.storage_path' has '{{node}}' but shared_storage is true; pick one.")


def from_dict(data: dict[str, Any], source: str = "<dict>", base_dir: str = ".", **runtime_overrides: Any) -> JobConfig:
    """Validate a config already parsed from JSON; runtime_overrides win over the file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object.")
    paddlenlp = {k: v for k, v in data.items() if k != RUNTIME_KEY}
    runtime_section = data.get(RUNTIME_KEY, {})
    if not isinstance(runtime_section, dict):
        raise ConfigError(f"{source}: 'runtime' must be an object.")
    runtime_section = {**runtime_section, **{k: v for k, v in runtime_overrides.items() if v is not None}}
    _check_paddlenlp(paddlenlp, source)
    runtime = _runtime_from_dict(runtime_section, source)
    for required in ("model_name_or_path", "input_dir"):
        if not paddlenlp.get(required):
            raise ConfigError(f"{source}: key '{required}' is required for pretraining.")
    if not paddlenlp.get("max_steps") or paddlenlp["max_steps"] <= 0:
        raise ConfigError(f"{source}: key 'max_steps' must be a positive number of steps.")
    return JobConfig(paddlenlp=paddlenlp, runtime=runtime, source=source, base_dir=base_dir)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None


def load(path: str | os.PathLike[str], runtime_path: str | None = None, **runtime_overrides: Any) -> JobConfig:
    """Read a config file (and optionally a separate runtime JSON). Files are only read.

    Precedence: keyword overrides > runtime file > the config's own `runtime` section > defaults.
    A separate runtime file lets a vendor PaddleNLP JSON stay byte-for-byte unchanged.
    """
    path = str(path)
    data = _read_json(path)
    if runtime_path:
        extra = _read_json(runtime_path)
        if not isinstance(extra, dict):
            raise ConfigError(f"{runtime_path}: the runtime file must be a JSON object.")
        if isinstance(data, dict):
            data = {**data, RUNTIME_KEY: {**data.get(RUNTIME_KEY, {}), **extra}}
    return from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)), **runtime_overrides)
