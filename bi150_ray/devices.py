"""BI150 device detection from `ixsmi`, Iluvatar's nvidia-smi look-alike.

Ground floor: stdlib only, no Ray and no Paddle, so `ray start` wrappers and the doctor can call it on
any node (including a head without accelerators) in milliseconds.

The plain `ixsmi` table is the primary source: it is the format the vendor documents and the one we
have real output for (tests/fixtures/ixsmi_seed.txt, driver 4.1.0). The nvidia-smi style CSV query is
only used when asked for, because we have not verified it on a BI150 node.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass

__all__ = [
    "CSV_ARGS",
    "ENV_IXSMI",
    "Device",
    "DeviceDetectionError",
    "IxsmiParseError",
    "NodeDevices",
    "accelerator_type",
    "detect",
    "format_devices",
    "node_resources",
    "parse_ixsmi_csv",
    "parse_ixsmi_table",
]

ENV_IXSMI = "BI150_IXSMI"
CSV_FIELDS = ("index", "name", "pci.bus_id", "memory.used", "memory.total")
CSV_ARGS = ("--query-gpu=" + ",".join(CSV_FIELDS), "--format=csv,noheader,nounits")

_NA = {"N/A", "[N/A]", "NA", "-"}
_BUS_ID_RE = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_NUMBER_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Za-z%]*)$")
_DEVICE_LINE_RE = re.compile(r"^(\d+)\s+(\S.*)$")
_STATS_LINE_RE = re.compile(
    r"^(?P<fan>\S+)\s+(?P<temp>\S+)\s+(?P<perf>\S+)\s+(?P<pwr>\S+)\s*/\s*(?P<cap>\S+)$"
)
_MEMORY_RE = re.compile(r"^(?P<used>\S+)\s*/\s*(?P<total>\S+)$")

_MIB_UNITS = {"": 1, "MIB": 1, "MB": 1, "GIB": 1024, "GB": 1024}
_TEMP_UNITS = {"": 1, "C": 1}
_POWER_UNITS = {"": 1, "W": 1}
_PERCENT_UNITS = {"": 1, "%": 1}

_NO_DEVICE_MARKERS = ("No supported GPUs found", "No devices were found", "No devices found")


class IxsmiParseError(ValueError):
    """The text is not ixsmi output we understand."""


class DeviceDetectionError(RuntimeError):
    """Detection failed on this node; the message says what happened and what to do."""


@dataclass(frozen=True)
class Device:
    """One device as ixsmi lists it; `problems` explains why it should not get work."""

    index: int
    name: str
    bus_id: str
    memory_used_mib: int | None
    memory_total_mib: int
    temperature_c: int | None = None
    power_w: float | None = None
    power_cap_w: float | None = None
    util_percent: int | None = None
    problems: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """Derived from `problems` so the two can never disagree."""
        return not self.problems


@dataclass(frozen=True)
class NodeDevices:
    """Everything one `ixsmi` call says about a node. Versions are None when ixsmi does not say."""

    driver_version: str | None
    ixml_version: str | None
    cuda_version: str | None
    devices: tuple[Device, ...]

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def healthy_count(self) -> int:
        return sum(1 for d in self.devices if d.healthy)

    @property
    def memory_total_mib(self) -> int:
        """Smallest healthy device: the planner must fit on every card it gets (0 if none is healthy)."""
        return min((d.memory_total_mib for d in self.devices if d.healthy), default=0)


# ---------------------------------------------------------------------------------------------
# parsing


def _is_err(raw: str) -> bool:
    return raw.upper().startswith("ERR")


def _measure(raw: str, units: dict[str, int], what: str, where: str) -> tuple[float | None, str | None]:
    """(value, problem): N/A is a missing value, ERR! is a health problem, anything else unknown is a parse error."""
    raw = raw.strip()
    if _is_err(raw):
        return None, f"{what} shows {raw}"
    if raw.upper() in _NA:
        return None, None
    m = _NUMBER_RE.match(raw)
    if not m or m.group(2).upper() not in units:
        raise IxsmiParseError(f"{where}: cannot read {what} from {raw!r}")
    return float(m.group(1)) * units[m.group(2).upper()], None


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def _memory_problems(total: int | None, total_raw: str) -> list[str]:
    if total is None:
        return [f"memory total unreadable ({total_raw.strip()})"] if not _is_err(total_raw) else []
    if total <= 0:
        return [f"memory total reads {total}MiB"]
    return []


def _bus_problems(bus_id: str) -> list[str]:
    return [] if _BUS_ID_RE.match(bus_id) else [f"bus id unreadable ({bus_id})"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _parse_device(first: tuple[int, str], second: tuple[int, str]) -> Device:
    (n1, line1), (n2, line2) = first, second
    where1 = f"line {n1} ({line1.strip()!r})"
    where2 = f"line {n2} ({line2.strip()!r})"

    cells1, cells2 = _cells(line1), _cells(line2)
    if len(cells1) != 3:
        raise IxsmiParseError(
            f"{where1}: expected 3 '|'-separated columns (GPU Name | Bus-Id | Clocks), got {len(cells1)}"
        )
    if len(cells2) != 3:
        raise IxsmiParseError(
            f"{where2}: expected 3 '|'-separated columns (Fan Temp Perf Pwr | Memory-Usage | GPU-Util), got {len(cells2)}"
        )

    m = _DEVICE_LINE_RE.match(cells1[0])
    if not m:
        raise IxsmiParseError(f"{where1}: expected '<index> <name>' in the first column, got {cells1[0]!r}")
    index, name = int(m.group(1)), m.group(2).strip()
    bus_id = cells1[1]
    if not bus_id:
        raise IxsmiParseError(f"{where1}: empty Bus-Id column")

    stats = _STATS_LINE_RE.match(cells2[0])
    if not stats:
        raise IxsmiParseError(
            f"{where2}: expected 'Fan Temp Perf Usage / Cap' in the first column, got {cells2[0]!r}"
        )
    memory = _MEMORY_RE.match(cells2[1])
    if not memory:
        raise IxsmiParseError(f"{where2}: expected '<used> / <total>' memory, got {cells2[1]!r}")
    util_fields = cells2[2].split()
    if not util_fields:
        raise IxsmiParseError(f"{where2}: empty GPU-Util column")

    problems: list[str] = _bus_problems(bus_id)
    for what in ("fan", "perf"):
        if _is_err(stats.group(what)):
            problems.append(f"{what.capitalize()} shows {stats.group(what)}")
    temp, p = _measure(stats.group("temp"), _TEMP_UNITS, "temperature", where2)
    problems += [p] if p else []
    power, p = _measure(stats.group("pwr"), _POWER_UNITS, "power usage", where2)
    problems += [p] if p else []
    cap, p = _measure(stats.group("cap"), _POWER_UNITS, "power cap", where2)
    problems += [p] if p else []
    used, p = _measure(memory.group("used"), _MIB_UNITS, "memory used", where2)
    problems += [p] if p else []
    total, p = _measure(memory.group("total"), _MIB_UNITS, "memory total", where2)
    problems += [p] if p else []
    total_mib = _as_int(total)
    problems += _memory_problems(total_mib, memory.group("total"))
    util, p = _measure(util_fields[0], _PERCENT_UNITS, "GPU-Util", where2)
    problems += [p] if p else []

    return Device(
        index=index,
        name=name,
        bus_id=bus_id,
        memory_used_mib=_as_int(used),
        memory_total_mib=total_mib or 0,
        temperature_c=_as_int(temp),
        power_w=power,
        power_cap_w=cap,
        util_percent=_as_int(util),
        problems=tuple(problems),
    )


def _version(line: str, label: str) -> str | None:
    m = re.search(re.escape(label) + r":\s*(\S+)", line)
    if not m or m.group(1).strip("|").upper() in _NA:
        return None
    return m.group(1).strip("|")


def _check_unique(devices: list[Device]) -> None:
    seen: set[int] = set()
    for d in devices:
        if d.index in seen:
            raise IxsmiParseError(f"device index {d.index} appears twice in the ixsmi output")
        seen.add(d.index)


def parse_ixsmi_table(text: str) -> NodeDevices:
    """Parse plain `ixsmi` output (two table lines per device); strict, so a format change fails loudly."""
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if "Driver Version:" in line), None)
    if header_at is None:
        raise IxsmiParseError(
            "no ixsmi header found (expected a line like "
            "'|  IX-ML: 4.1.0  Driver Version: 4.1.0  CUDA Version: 10.2  |')"
        )
    header = lines[header_at]
    table_at = next((i for i in range(header_at + 1, len(lines)) if lines[i].strip().startswith("|=")), None)
    if table_at is None:
        raise IxsmiParseError(f"no '|====...' line after the ixsmi header on line {header_at + 1}")

    rows: list[tuple[int, str]] = []
    for i in range(table_at + 1, len(lines)):
        stripped = lines[i].strip()
        if not stripped or "Processes:" in stripped:
            break
        if stripped.startswith("+"):
            continue
        if not stripped.startswith("|"):
            raise IxsmiParseError(f"line {i + 1} ({stripped!r}): unexpected text inside the device table")
        rows.append((i + 1, lines[i]))

    if not rows:
        raise IxsmiParseError(f"ixsmi header found on line {header_at + 1} but no device rows follow it")
    if len(rows) % 2:
        n, line = rows[-1]
        raise IxsmiParseError(f"line {n} ({line.strip()!r}): device row without its second line")

    devices = [_parse_device(rows[k], rows[k + 1]) for k in range(0, len(rows), 2)]
    _check_unique(devices)
    return NodeDevices(
        driver_version=_version(header, "Driver Version"),
        ixml_version=_version(header, "IX-ML"),
        cuda_version=_version(header, "CUDA Version"),
        devices=tuple(devices),
    )


def parse_ixsmi_csv(text: str) -> list[Device]:
    """Parse `ixsmi` + CSV_ARGS output; tolerates units and a header line in case ixsmi ignores the flags."""
    devices: list[Device] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in next(csv.reader([line], skipinitialspace=True))]
        if not devices and fields and fields[0].lower() == "index":
            continue
        where = f"line {lineno} ({line.strip()!r})"
        if len(fields) != len(CSV_FIELDS):
            raise IxsmiParseError(
                f"{where}: expected {len(CSV_FIELDS)} comma-separated fields ({', '.join(CSV_FIELDS)}), got {len(fields)}"
            )
        index_raw, name, bus_id, used_raw, total_raw = fields
        if not index_raw.isdigit():
            raise IxsmiParseError(f"{where}: device index {index_raw!r} is not a number")
        problems = _bus_problems(bus_id)
        used, p = _measure(used_raw, _MIB_UNITS, "memory used", where)
        problems += [p] if p else []
        total, p = _measure(total_raw, _MIB_UNITS, "memory total", where)
        problems += [p] if p else []
        total_mib = _as_int(total)
        problems += _memory_problems(total_mib, total_raw)
        devices.append(
            Device(
                index=int(index_raw),
                name=name,
                bus_id=bus_id,
                memory_used_mib=_as_int(used),
                memory_total_mib=total_mib or 0,
                problems=tuple(problems),
            )
        )
    if not devices:
        raise IxsmiParseError("ixsmi CSV output has no device rows")
    _check_unique(devices)
    return devices


# ---------------------------------------------------------------------------------------------
# running ixsmi

_NO_BI150_HINT = "if this node has no BI150, start Ray without the BI150 resource"


def _resolve(ixsmi: str, host: str) -> str:
    override = os.environ.get(ENV_IXSMI)
    cmd = override or ixsmi
    if os.sep in cmd or (os.altsep and os.altsep in cmd):
        if os.path.isfile(cmd) and os.access(cmd, os.X_OK):
            return cmd
        origin = f" (from ${ENV_IXSMI})" if override else ""
        raise DeviceDetectionError(
            f"{cmd}{origin} not found or not executable on node {host}: point {ENV_IXSMI} at the ixsmi of the "
            f"Iluvatar CoreX driver/SDK (>= 4.1.0; usually /usr/local/corex/bin/ixsmi) or unset it; {_NO_BI150_HINT}"
        )
    found = shutil.which(cmd)
    if not found:
        raise DeviceDetectionError(
            f"{cmd} not found on PATH on node {host}: install the Iluvatar CoreX driver/SDK (>= 4.1.0) or put "
            f"ixsmi on PATH (usually /usr/local/corex/bin), or set {ENV_IXSMI} to its full path; {_NO_BI150_HINT}"
        )
    return found


def _no_device_hint(*outputs: str) -> str:
    if any(marker in out for out in outputs for marker in _NO_DEVICE_MARKERS):
        return (
            " ixsmi sees no device: check `lspci | grep -i iluvatar` and that the CoreX kernel driver is loaded; "
            "inside a container, the /dev/iluvatar* device files must be mounted (--privileged or --device)."
        )
    return ""


def _tail(text: str, limit: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _run(argv: list[str], timeout_s: float, host: str) -> str:
    exe = argv[0]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # so a timeout can kill everything ixsmi started
        )
    except OSError as e:
        raise DeviceDetectionError(
            f"cannot run {exe} on node {host}: {e}; check that it is the ixsmi of the Iluvatar CoreX driver/SDK "
            f"and that it runs by hand; {_NO_BI150_HINT}"
        ) from e
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:  # a process stuck in the driver may not die; do not hang with it
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        raise DeviceDetectionError(
            f"{exe} did not finish within {timeout_s:g}s on node {host}: the driver may be hung; run ixsmi by hand, "
            "check `dmesg` for Iluvatar errors and reload the driver or reboot the node (raise timeout_s if the "
            "node is only slow)"
        ) from None
    if proc.returncode != 0:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with code {proc.returncode}"
        )
        said = _tail(err) or _tail(out) or "(no output)"
        raise DeviceDetectionError(
            f"{exe} {how} on node {host}: {said}. Check that the CoreX kernel driver is loaded and matches the "
            f"SDK version (ixsmi must work by hand); {_NO_BI150_HINT}.{_no_device_hint(out, err)}"
        )
    return out


def detect(ixsmi: str = "ixsmi", timeout_s: float = 20, mode: str = "table") -> NodeDevices:
    """Run ixsmi on this node and parse it; raises DeviceDetectionError rather than report 0 devices.

    $BI150_IXSMI, when set, overrides `ixsmi` (operators fix a node without touching code).
    """
    if mode not in ("table", "csv"):
        raise ValueError(f"mode must be 'table' or 'csv', not {mode!r}")
    host = socket.gethostname()
    exe = _resolve(ixsmi, host)
    argv = [exe] if mode == "table" else [exe, *CSV_ARGS]
    out = _run(argv, timeout_s, host)
    try:
        if mode == "table":
            return parse_ixsmi_table(out)
        return NodeDevices(None, None, None, tuple(parse_ixsmi_csv(out)))
    except IxsmiParseError as e:
        fallback = " or try mode='table'" if mode == "csv" else ""
        raise DeviceDetectionError(
            f"could not parse the output of `{' '.join(argv)}` on node {host}: {e}. We parse the ixsmi format of "
            f"CoreX driver 4.1.0; run ixsmi by hand and compare{fallback}.{_no_device_hint(out)}\n"
            f"--- ixsmi output ---\n{_tail(out, 2000) or '(empty)'}"
        ) from e


# ---------------------------------------------------------------------------------------------
# presenting


def accelerator_type(name: str) -> str:
    """'Iluvatar BI-V150' -> 'BI-V150': Ray resource names cannot hold spaces, and the vendor is implied."""
    words = name.split()
    if len(words) > 1 and words[0].lower() == "iluvatar":
        words = words[1:]
    return re.sub(r"[^A-Za-z0-9._-]", "-", "-".join(words)) or "unknown"


def node_resources(
    node: NodeDevices, resource_name: str = "BI150", healthy_only: bool = True
) -> dict[str, int]:
    """Resources for `ray start --resources`; accelerator_type:<type> lets tasks pin a card model the Ray way."""
    devices = [d for d in node.devices if d.healthy or not healthy_only]
    if not devices:
        problems = "; ".join(f"device {d.index}: {', '.join(d.problems)}" for d in node.devices)
        raise DeviceDetectionError(
            f"no healthy device among {node.count} on this node ({problems}): fix or reset the devices, "
            f"or {_NO_BI150_HINT}"
        )
    types = sorted({accelerator_type(d.name) for d in devices})
    if len(types) > 1:
        raise DeviceDetectionError(
            f"mixed device models on one node ({', '.join(types)}): the planner assumes one model per node; "
            "split them across nodes or hide some with the driver's visibility settings"
        )
    return {resource_name: len(devices), f"accelerator_type:{types[0]}": 1}


def _fmt(value: float | None, unit: str) -> str:
    return "N/A" if value is None else f"{value:g}{unit}"


def format_devices(node: NodeDevices) -> str:
    """A table for humans running `bi150-ray devices` on a node."""
    headers = ("IDX", "NAME", "BUS-ID", "MEMORY (MiB)", "TEMP", "POWER", "HEALTH")
    rows = [
        (
            str(d.index),
            d.name,
            d.bus_id,
            f"{'N/A' if d.memory_used_mib is None else d.memory_used_mib} / {d.memory_total_mib}",
            _fmt(d.temperature_c, "C"),
            f"{_fmt(d.power_w, 'W')} / {_fmt(d.power_cap_w, 'W')}",
            "ok" if d.healthy else "UNHEALTHY: " + "; ".join(d.problems),
        )
        for d in node.devices
    ]
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]
    lines = [
        f"driver {node.driver_version or 'N/A'}  IX-ML {node.ixml_version or 'N/A'}  "
        f"CUDA {node.cuda_version or 'N/A'}  devices {node.count}  healthy {node.healthy_count}  "
        f"min memory {node.memory_total_mib} MiB",
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
