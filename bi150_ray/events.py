"""Structured events that rank processes write and the driver reads.

Ranks append one JSON object per line to their own events file. The driver never scrapes
PaddleNLP's text logs: those stay intact in the rank log files for people and old parsers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

EVENTS_ENV = "BI150_RAY_EVENTS"

# Event kinds, in the order a healthy rank emits them.
START = "start"  # process is up, before Paddle initialises collectives
READY = "ready"  # model, data and trainer built; the first step is next
STEP = "step"  # one PaddleNLP log record (loss, learning_rate, interval_* ...)
EVAL = "eval"  # one evaluation (eval_loss, ...)
SAVE = "save"  # a checkpoint-N folder finished on this rank
HEARTBEAT = "heartbeat"
DONE = "done"  # training finished and final model saved
ERROR = "error"  # the rank program raised; carries the message and traceback


class EventWriter:
    """Append-only JSON-lines writer, safe to call from the trainer and a heartbeat thread."""

    def __init__(self, path: str | None, rank: int) -> None:
        self.path = path
        self.rank = rank
        self._lock = threading.Lock()
        self._fh = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def emit(self, kind: str, **fields: Any) -> None:
        if self._fh is None:
            return
        record = {"t": time.time(), "rank": self.rank, "kind": kind, **fields}
        line = json.dumps(record, default=_jsonable)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


@dataclass
class EventTail:
    """Reads new complete lines of an events file since the last call (a half-written line waits)."""

    path: str
    offset: int = 0
    _partial: str = field(default="", repr=False)

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
        except FileNotFoundError:
            return []
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                out.append(json.loads(line))
        return out
