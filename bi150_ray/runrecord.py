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
    outcome: str = "running"  # running | succeeded | application | infrastructure | hang | interrupted | error
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
    data_plan: dict[str, Any] = field(default_factory=dict)  # index-cache file hashes, corpus fingerprints
    peak_memory: dict[str, dict[str, int]] = field(default_factory=dict)  # rank -> peak bytes the backend reported
    _last_write: float = 0.0

    @classmethod
    def open(cls, path: str, allowed_roots: tuple[str, ...] = (), **fresh: Any) -> RunRecord:
        """Continue the record of an earlier run of the same job, or start a new one.

        Paths read back from an old record are checked against `allowed_roots` (the run's
        storage): a record edited to point elsewhere is refused, never followed.
        """
        if not os.path.isfile(path):
            return cls(path=path, **fresh)
        old = load(path)
        for c in old.get("checkpoints", []):
            check_inside(c.get("checkpoint", ""), allowed_roots, f"{path}: checkpoint path")
            for node, folder in c.get("folders", {}).items():
                check_inside(folder, allowed_roots, f"{path}: checkpoint folder of node {node}")
        if old.get("model_dir"):
            check_inside(old["model_dir"], allowed_roots, f"{path}: model_dir")
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


class RecordPathError(ValueError):
    """A path in a run record points outside the run's storage."""


def check_inside(path: str, roots: tuple[str, ...], what: str) -> str:
    """Resolve `path` (symlinks and '..' included) and require it under one of `roots`."""
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base + os.sep):
            return real
    raise RecordPathError(f"{what} '{path}' is outside the run's storage ({', '.join(roots)}); refusing to use it")


def load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
