"""The run record: one JSON file per run that says what ran, where, and what happened.

Written by the driver as the run goes (atomically, so a reader never sees half a file) and read
back by `bi150-ray status`. Environment values are redacted before they are recorded.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Attempt:
    number: int
    started: float
    ended: float | None = None
    outcome: str = "running"  # running | succeeded | application | infrastructure | hang | interrupted
    cause: str = ""
    nodes: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    hang: dict[str, Any] | None = None  # hung ranks, their phase and step, stack dump files


@dataclass
class RunRecord:
    path: str
    run_name: str
    config_source: str
    config_hash: str
    created: float = field(default_factory=time.time)
    status: str = "running"  # running | succeeded | failed | interrupted
    degrees: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    model_dir: str | None = None
    _last_write: float = 0.0

    @classmethod
    def open(cls, path: str, **fresh: Any) -> RunRecord:
        """Continue the record of an earlier run of the same job, or start a new one."""
        if not os.path.isfile(path):
            return cls(path=path, **fresh)
        old = load(path)
        old["attempts"] = [Attempt(**a) for a in old.get("attempts", [])]
        old.update({k: v for k, v in fresh.items() if k in ("config_source", "environment")})
        old["status"] = "running"
        return cls(path=path, **old)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_last_write")
        d.pop("path")
        return d

    def save(self, min_interval_s: float = 0.0) -> None:
        """Write atomically; with min_interval_s, skip if written more recently than that."""
        now = time.time()
        if min_interval_s and now - self._last_write < min_interval_s:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1, default=str)
        os.replace(tmp, self.path)
        self._last_write = now


def host_fingerprint() -> dict[str, Any]:
    import ray

    return {"ray": ray.__version__, "python": platform.python_version(), "driver_host": platform.node()}


def load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
