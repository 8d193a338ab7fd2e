"""Fault injection from outside the rank processes, as an operator or the kernel would do it."""

import json
import os
import signal
import threading
import time


def rank_pid_when(events_path: str, min_step: int, timeout_s: float = 300) -> int | None:
    """Wait until a rank's events show global_step >= min_step; return its pid."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        pid, step = None, -1
        try:
            with open(events_path) as fh:
                for line in fh:
                    if not line.endswith("\n"):
                        break
                    e = json.loads(line)
                    if e["kind"] == "start":
                        pid = e["pid"]
                    step = max(step, e.get("global_step", -1))
        except FileNotFoundError:
            pass
        if pid and step >= min_step:
            return pid
        time.sleep(0.2)
    return None


class SignalAt(threading.Thread):
    """Send `signum` to the rank writing `events_path` once it reaches `min_step` (once)."""

    def __init__(self, events_path: str, min_step: int, signum: int) -> None:
        super().__init__(daemon=True)
        self.events_path, self.min_step, self.signum = events_path, min_step, signum
        self.sent_to: int | None = None
        self.start()

    def run(self) -> None:
        pid = rank_pid_when(self.events_path, self.min_step)
        if pid:
            os.kill(pid, self.signum)
            self.sent_to = pid


def weights(model_dir: str) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


__all__ = ["SignalAt", "rank_pid_when", "signal", "weights"]
