"""What the doctor asks on each node, as pinned zero-CPU Ray tasks: stdlib (plus devices.py) only.

Kept apart from doctor.py so the first task on a fresh node imports only this (no NumPy, no
checkpoint code): that import is part of every job's pre-flight.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import socket
import subprocess
import time
from typing import Any

IFNAME_VAR = "NCCL_SOCKET_IFNAME"
MARKER = ".bi150-doctor.{token}.{node}"


_DIST_NAMES = {"paddle": ("paddlepaddle", "paddlepaddle-gpu"), "paddlenlp": ("paddlenlp",), "ray": ("ray",)}


def dist_versions(top_levels: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of the distribution providing each import name, without importing it.

    The usual wheel names are asked first (milliseconds); only an unusual vendor wheel name costs
    the full scan of every installed distribution (~1 s).
    """
    from importlib import metadata

    out: dict[str, str | None] = {}
    scanned: dict[str, list[str]] | None = None
    for top in top_levels:
        out[top] = None
        for name in _DIST_NAMES.get(top, ()):
            try:
                out[top] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        if out[top] is None:
            scanned = metadata.packages_distributions() if scanned is None else scanned
            for name in scanned.get(top, []):
                try:
                    out[top] = metadata.version(name)
                    break
                except metadata.PackageNotFoundError:
                    continue
    return out


def interface_addresses() -> dict[str, list[str]]:
    """Every interface of this node with its IPv4 addresses as 'a.b.c.d/prefix'."""
    out: dict[str, list[str]] = {name: [] for _, name in socket.if_nameindex()}
    try:
        text = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5, check=True).stdout
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "inet":
                out.setdefault(parts[1].split("@")[0], []).append(parts[3])
        return out
    except (OSError, subprocess.SubprocessError):
        pass
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # primary address only, without iproute2
        for name in out:
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, req)[20:24])  # SIOCGIFNETMASK
                out[name].append(str(ipaddress.ip_interface(f"{addr}/{mask}")))
            except OSError:
                continue
    return out


def write_marker(root: str, token: str, node: int) -> str:
    """Create the storage root as the job would, write a marker, fsync, read it back."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, MARKER.format(token=token, node=node))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(token)
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, encoding="utf-8") as fh:
        if fh.read() != token:
            raise OSError(f"{path}: read back different content")
    return path


class NodeProbe:
    """Questions asked on one node (as pinned Ray tasks): its facts, its clock, its view of storage."""

    def facts(self, index: int, storage_root: str, ifname: str | None, ixsmi: str, token: str, keep_marker: bool) -> dict[str, Any]:
        from bi150_ray import devices

        out: dict[str, Any] = {"hostname": socket.gethostname()}
        versions: dict[str, str | None] = {"python": platform.python_version()}
        try:
            node = devices.detect(ixsmi)
            healthy = [d for d in node.devices if d.healthy]
            out["devices"] = {"count": node.count, "healthy": len(healthy), "memory_min_mib": node.memory_total_mib,
                              "name": healthy[0].name if healthy else "",
                              "problems": [f"device {d.index}: {', '.join(d.problems)}" for d in node.devices if d.problems]}
            versions.update({"driver": node.driver_version, "ix-ml": node.ixml_version, "cuda": node.cuda_version})
        except (devices.DeviceDetectionError, devices.IxsmiParseError) as exc:
            out["device_error"] = str(exc)
        versions.update(dist_versions(("paddle", "paddlenlp", "ray")))
        out["versions"] = versions
        if ifname:
            out["ifname"], out["ifname_source"] = ifname, "runtime.env"
        elif os.environ.get(IFNAME_VAR):
            out["ifname"], out["ifname_source"] = os.environ[IFNAME_VAR], "node env"
        out["interfaces"] = interface_addresses()
        out["storage_path"] = storage_root
        try:
            path = write_marker(storage_root, token, index)
            if not keep_marker:
                os.remove(path)
        except OSError as exc:
            out["storage_error"] = f"{type(exc).__name__}: {exc}"
        return out

    def now(self) -> float:
        return time.time()

    def shared_missing(self, storage_root: str, token: str, others: list[int], wait_s: float) -> list[int]:
        """Nodes whose marker this node cannot see (after waiting up to wait_s for caches)."""
        deadline = time.time() + wait_s
        while True:
            missing = []
            for j in others:
                path = os.path.join(storage_root, MARKER.format(token=token, node=j))
                try:
                    with open(path, encoding="utf-8") as fh:
                        if fh.read() != token:
                            missing.append(j)
                except OSError:
                    missing.append(j)
            if not missing or time.time() > deadline:
                return missing
            time.sleep(0.2)

    def remove(self, path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass


def probe_call(method: str, *args: Any) -> Any:
    """Runs as a Ray task on one node: a NodeProbe method (tasks reuse pooled workers; an actor
    per node would start a fresh process each time, ~2 s on a loaded machine)."""
    return getattr(NodeProbe(), method)(*args)
