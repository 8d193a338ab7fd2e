"""ixsmi parsing and detection, against real BI150 output (tests/fixtures/ixsmi_seed.txt)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from bi150_ray.devices import (
    CSV_ARGS,
    DeviceDetectionError,
    IxsmiParseError,
    NodeDevices,
    accelerator_type,
    detect,
    format_devices,
    node_resources,
    parse_ixsmi_csv,
    parse_ixsmi_table,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SEED_TABLE = FIXTURES / "ixsmi_seed.txt"
SEED_CSV = FIXTURES / "ixsmi_seed.csv"
FAKE_BIN = FIXTURES / "bin"
SEED_SOURCE = Path("/work/shared/seed/000_e97d8c0e597da387.txt")

# Bus ids exactly as the real node printed them, device 0..15.
SEED_BUS_IDS = [
    "00000000:13:00.0", "00000000:16:00.0", "00000000:1C:00.0", "00000000:1F:00.0",
    "00000000:27:00.0", "00000000:2A:00.0", "00000000:34:00.0", "00000000:37:00.0",
    "00000000:3D:00.0", "00000000:40:00.0", "00000000:48:00.0", "00000000:4B:00.0",
    "00000000:54:00.0", "00000000:57:00.0", "00000000:64:00.0", "00000000:67:00.0",
]  # fmt: skip
# (power W, cap W) per device; the odd devices report it, the even ones print N/A.
SEED_POWER = {1: 93, 3: 94, 5: 98, 7: 95, 9: 95, 11: 94, 13: 93, 15: 94}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("BI150_IXSMI", "FAKE_IXSMI_EXIT", "FAKE_IXSMI_FILE", "FAKE_IXSMI_SLEEP"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def seed_text() -> str:
    return SEED_TABLE.read_text(encoding="utf-8")


@pytest.fixture
def fake_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def seed_lines() -> list[str]:
    return SEED_TABLE.read_text(encoding="utf-8").splitlines(keepends=True)


def line_of(lines: list[str], startswith: str) -> int:
    """0-based index of the first line starting with `startswith`."""
    return next(i for i, line in enumerate(lines) if line.startswith(startswith))


def stats_line(lines: list[str], index: int) -> int:
    """0-based index of the second table line (Fan Temp Perf ...) of device `index`."""
    return line_of(lines, f"| {index:<5}Iluvatar") + 1


# --- fixtures themselves ---------------------------------------------------------------------


@pytest.mark.skipif(not SEED_SOURCE.exists(), reason="seed file not available outside the build machine")
def test_fixture_is_byte_for_byte_from_the_seed() -> None:
    fixture = SEED_TABLE.read_bytes()
    assert fixture.startswith(b"Timestamp    Fri Dec 20 11:14:29 2024\n")
    assert fixture.endswith(b"|  No running processes found" + b" " * 49 + b"|\n" + b"+" + b"-" * 77 + b"+\n")
    assert fixture in SEED_SOURCE.read_bytes()


def test_fake_ixsmi_is_executable() -> None:
    assert os.access(FAKE_BIN / "ixsmi", os.X_OK)


# --- table parsing ---------------------------------------------------------------------------


def test_seed_table_devices(seed_text: str) -> None:
    node = parse_ixsmi_table(seed_text)
    assert node.count == 16
    assert [d.index for d in node.devices] == list(range(16))
    assert [d.bus_id for d in node.devices] == SEED_BUS_IDS
    assert node.devices[0].bus_id == "00000000:13:00.0"
    assert node.devices[15].bus_id == "00000000:67:00.0"
    assert {d.name for d in node.devices} == {"Iluvatar BI-V150"}
    assert {d.memory_total_mib for d in node.devices} == {32768}
    assert {d.memory_used_mib for d in node.devices} == {116}
    assert {d.util_percent for d in node.devices} == {0}
    assert [d.temperature_c for d in node.devices[:4]] == [32, 30, 31, 31]
    assert all(d.healthy and d.problems == () for d in node.devices)
    assert node.healthy_count == 16
    assert node.memory_total_mib == 32768


def test_seed_table_versions(seed_text: str) -> None:
    node = parse_ixsmi_table(seed_text)
    assert (node.driver_version, node.ixml_version, node.cuda_version) == ("4.1.0", "4.1.0", "10.2")


def test_seed_table_power_na_and_values(seed_text: str) -> None:
    node = parse_ixsmi_table(seed_text)
    d0, d1 = node.devices[0], node.devices[1]
    assert d0.power_w is None and d0.power_cap_w is None
    assert d0.healthy  # N/A power is normal on BI150, not a fault
    assert d1.power_w == 93 and d1.power_cap_w == 350
    for d in node.devices:
        if d.index in SEED_POWER:
            assert (d.power_w, d.power_cap_w) == (SEED_POWER[d.index], 350)
        else:
            assert (d.power_w, d.power_cap_w) == (None, None)


def test_node_resources_seed(seed_text: str) -> None:
    node = parse_ixsmi_table(seed_text)
    assert node_resources(node) == {"BI150": 16, "accelerator_type:BI-V150": 1}
    assert node_resources(node, healthy_only=False) == {"BI150": 16, "accelerator_type:BI-V150": 1}
    assert node_resources(node, resource_name="GPU_BI") == {"GPU_BI": 16, "accelerator_type:BI-V150": 1}


def test_tolerates_crlf_and_indentation(seed_text: str) -> None:
    text = "\r\n".join("   " + line + "   " for line in seed_text.splitlines())
    node = parse_ixsmi_table(text)
    assert node.count == 16 and [d.bus_id for d in node.devices] == SEED_BUS_IDS


NEWER_DRIVER_TABLE = """\
+--------------------------------------------------------------------------------+
|  IX-ML: 4.4.0            Driver Version: 4.4.0          CUDA Version: N/A      |
|----------------------------------+----------------------+----------------------|
| GPU  Name                        | Bus-Id               | Clock-SM  Clock-Mem  |
| Fan  Temp  Perf    Pwr:Usage/Cap |      Memory-Usage    | GPU-Util  Compute M. |
|==================================+======================+======================|
| 0    Iluvatar BI-V150 OAM        | 00000000:35:00.0     | 500MHz    1600MHz    |
| N/A  N/A   P0       N/A / N/A    | N/A / 32768MiB       | N/A       Default    |
+----------------------------------+----------------------+----------------------+
| 1    Iluvatar BI-V150 OAM        | 00000000:38:00.0     | 500MHz    1600MHz    |
| N/A  36C   P0     40W/350W       | 68MiB / 32GiB        | 7%        Default    |
+----------------------------------+----------------------+----------------------+

+--------------------------------------------------------------------------------+
| Processes:                                                          GPU Memory |
|  GPU        PID      Process name                                   Usage(MiB) |
|================================================================================|
|    1      12345      python                                             64MiB  |
+--------------------------------------------------------------------------------+
"""


def test_tolerates_newer_layout_na_fields_and_spaced_names() -> None:
    # Layout of driver 4.4.0 (wider first column), no Timestamp line, N/A almost everywhere.
    node = parse_ixsmi_table(NEWER_DRIVER_TABLE)
    assert (node.driver_version, node.ixml_version, node.cuda_version) == ("4.4.0", "4.4.0", None)
    d0, d1 = node.devices
    assert d0.name == "Iluvatar BI-V150 OAM"
    assert (d0.temperature_c, d0.memory_used_mib, d0.util_percent, d0.power_w) == (None, None, None, None)
    assert d0.memory_total_mib == 32768 and d0.healthy
    assert (d1.temperature_c, d1.power_w, d1.power_cap_w, d1.memory_used_mib, d1.memory_total_mib) == (
        36, 40, 350, 68, 32768,
    )  # fmt: skip
    assert d1.util_percent == 7
    assert node_resources(node) == {"BI150": 2, "accelerator_type:BI-V150-OAM": 1}


def test_accelerator_type() -> None:
    assert accelerator_type("Iluvatar BI-V150") == "BI-V150"
    assert accelerator_type("Iluvatar BI-V150S") == "BI-V150S"
    assert accelerator_type("Iluvatar BI-V150 OAM") == "BI-V150-OAM"
    assert " " not in accelerator_type("Some Other (Card)")


# --- health ----------------------------------------------------------------------------------


def test_zero_memory_device_is_unhealthy_and_not_counted() -> None:
    lines = seed_lines()
    i = stats_line(lines, 3)
    lines[i] = lines[i].replace("116MiB / 32768MiB", "116MiB / 0MiB    ")
    node = parse_ixsmi_table("".join(lines))
    bad = node.devices[3]
    assert not bad.healthy and bad.memory_total_mib == 0
    assert any("0MiB" in p for p in bad.problems)
    assert node.healthy_count == 15
    assert node.memory_total_mib == 32768  # the broken card does not shrink the plan
    assert node_resources(node) == {"BI150": 15, "accelerator_type:BI-V150": 1}
    assert node_resources(node, healthy_only=False)["BI150"] == 16


def test_perf_err_device_is_unhealthy_and_not_counted() -> None:
    lines = seed_lines()
    i = stats_line(lines, 5)
    lines[i] = lines[i].replace("0%   31C   P0  ", "ERR! 31C   ERR!")
    node = parse_ixsmi_table("".join(lines))
    bad = node.devices[5]
    assert not bad.healthy
    assert "Perf shows ERR!" in bad.problems and "Fan shows ERR!" in bad.problems
    assert bad.temperature_c == 31
    assert [d.index for d in node.devices if not d.healthy] == [5]
    assert node_resources(node) == {"BI150": 15, "accelerator_type:BI-V150": 1}


def test_err_power_and_na_memory_total_are_problems() -> None:
    lines = seed_lines()
    i = stats_line(lines, 1)
    lines[i] = lines[i].replace("93W / 350W", "ERR! / 350W").replace("/ 32768MiB", "/ N/A     ")
    bad = parse_ixsmi_table("".join(lines)).devices[1]
    assert not bad.healthy
    assert "power usage shows ERR!" in bad.problems
    assert any("memory total unreadable" in p for p in bad.problems)


def test_single_unhealthy_device_node_has_no_resources() -> None:
    lines = seed_lines()
    end = stats_line(lines, 0) + 2  # header + device 0 + its separator
    lines[end - 2] = lines[end - 2].replace("/ 32768MiB", "/ 0MiB    ")
    node = parse_ixsmi_table("".join(lines[:end]))
    assert node.count == 1 and node.healthy_count == 0 and node.memory_total_mib == 0
    with pytest.raises(DeviceDetectionError, match="no healthy device"):
        node_resources(node)
    assert node_resources(node, healthy_only=False) == {"BI150": 1, "accelerator_type:BI-V150": 1}


# --- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello world\n", "Segmentation fault\n", "No supported GPUs found\n"])
def test_garbage_has_no_header(text: str) -> None:
    with pytest.raises(IxsmiParseError, match="no ixsmi header"):
        parse_ixsmi_table(text)


def test_header_without_devices() -> None:
    lines = seed_lines()
    header_only = "".join(lines[: line_of(lines, "|====") + 1])
    with pytest.raises(IxsmiParseError, match="no device rows"):
        parse_ixsmi_table(header_only)


def test_truncated_device_line_names_the_line() -> None:
    lines = seed_lines()
    i = line_of(lines, "| 7    Iluvatar")
    lines[i] = "| 7    Iluvatar BI-V150         | 00000000:37:00.0\n"
    with pytest.raises(
        IxsmiParseError, match=rf"^line {i + 1} .*00000000:37:00\.0.*3 '\|'-separated columns"
    ):
        parse_ixsmi_table("".join(lines))


def test_garbled_memory_names_the_line() -> None:
    lines = seed_lines()
    i = stats_line(lines, 9)
    lines[i] = lines[i].replace("116MiB / 32768MiB", "116MiB   32768MiB")
    with pytest.raises(IxsmiParseError, match=rf"^line {i + 1} .*memory"):
        parse_ixsmi_table("".join(lines))


def test_garbled_index_names_the_line() -> None:
    lines = seed_lines()
    i = line_of(lines, "| 4    Iluvatar")
    lines[i] = lines[i].replace("| 4    Iluvatar", "| x    Iluvatar")
    with pytest.raises(IxsmiParseError, match=rf"^line {i + 1} .*<index> <name>"):
        parse_ixsmi_table("".join(lines))


def test_unreadable_temperature_names_the_line() -> None:
    lines = seed_lines()
    i = stats_line(lines, 2)
    lines[i] = lines[i].replace(" 31C ", " hot ")
    with pytest.raises(IxsmiParseError, match=rf"^line {i + 1} .*temperature"):
        parse_ixsmi_table("".join(lines))


def test_missing_second_line_is_an_error() -> None:
    lines = seed_lines()
    del lines[stats_line(lines, 15)]
    with pytest.raises(IxsmiParseError, match="without its second line"):
        parse_ixsmi_table("".join(lines))


def test_missing_middle_line_is_an_error() -> None:
    lines = seed_lines()
    i = stats_line(lines, 6)
    del lines[i]
    with pytest.raises(IxsmiParseError, match=r"^line \d+ "):
        parse_ixsmi_table("".join(lines))


def test_duplicate_index_is_an_error() -> None:
    lines = seed_lines()
    i = line_of(lines, "| 12   Iluvatar")
    lines[i] = lines[i].replace("| 12   Iluvatar", "| 11   Iluvatar")
    with pytest.raises(IxsmiParseError, match="index 11 appears twice"):
        parse_ixsmi_table("".join(lines))


# --- CSV -------------------------------------------------------------------------------------


def test_csv_matches_table(seed_text: str) -> None:
    table = parse_ixsmi_table(seed_text).devices
    rows = parse_ixsmi_csv(SEED_CSV.read_text(encoding="utf-8"))
    assert len(rows) == 16

    def shared(d):
        return (d.index, d.name, d.bus_id, d.memory_used_mib, d.memory_total_mib, d.healthy)

    assert [shared(d) for d in rows] == [shared(d) for d in table]
    assert all(d.temperature_c is None and d.power_w is None for d in rows)


def test_csv_tolerates_units_header_and_na() -> None:
    text = (
        "index, name, pci.bus_id, memory.used [MiB], memory.total [MiB]\n"
        "0, Iluvatar BI-V150, 00000000:13:00.0, 116 MiB, 32768 MiB\n"
        "1, Iluvatar BI-V150, 00000000:16:00.0, [N/A], 0 MiB\n"
    )
    d0, d1 = parse_ixsmi_csv(text)
    assert (d0.memory_used_mib, d0.memory_total_mib, d0.healthy) == (116, 32768, True)
    assert d1.memory_used_mib is None and not d1.healthy


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no device rows"),
        ("0, Iluvatar BI-V150, 00000000:13:00.0, 116\n", r"^line 1 .*expected 5"),
        ("0, Iluvatar BI-V150, 00000000:13:00.0, 116, 32768\nx, a, b, 1, 2\n", r"^line 2 .*not a number"),
        ("0, Iluvatar BI-V150, 00000000:13:00.0, 116, lots\n", r"^line 1 .*memory total"),
    ],
)
def test_csv_malformed(text: str, match: str) -> None:
    with pytest.raises(IxsmiParseError, match=match):
        parse_ixsmi_csv(text)


# --- detect() through the fake binary --------------------------------------------------------


def test_detect_table_through_fake(fake_on_path: None) -> None:
    node = detect()
    assert isinstance(node, NodeDevices)
    assert node.count == 16 and node.driver_version == "4.1.0"
    assert [d.bus_id for d in node.devices] == SEED_BUS_IDS
    assert node_resources(node) == {"BI150": 16, "accelerator_type:BI-V150": 1}


def test_detect_csv_through_fake(fake_on_path: None) -> None:
    node = detect(mode="csv")
    assert node.count == 16 and node.driver_version is None
    assert [d.bus_id for d in node.devices] == SEED_BUS_IDS
    assert CSV_ARGS == (
        "--query-gpu=index,name,pci.bus_id,memory.used,memory.total",
        "--format=csv,noheader,nounits",
    )


def test_detect_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: the override alone must work
    monkeypatch.setenv("BI150_IXSMI", str(FAKE_BIN / "ixsmi"))
    assert detect().count == 16


def test_detect_env_override_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BI150_IXSMI", str(tmp_path / "nope" / "ixsmi"))
    with pytest.raises(DeviceDetectionError, match=r"\$BI150_IXSMI.*not found or not executable"):
        detect()


def test_detect_missing_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceDetectionError) as err:
        detect()
    msg = str(err.value)
    assert "not found on PATH" in msg
    assert socket.gethostname() in msg
    assert "install the Iluvatar CoreX driver/SDK" in msg and "BI150_IXSMI" in msg
    assert "start Ray without the BI150 resource" in msg


def test_detect_failing_binary(fake_on_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_IXSMI_EXIT", "3")
    with pytest.raises(DeviceDetectionError) as err:
        detect()
    msg = str(err.value)
    assert "exited with code 3" in msg
    assert "Driver/library version mismatch" in msg  # the tool's stderr is passed on
    assert "kernel driver" in msg


def test_detect_garbage_output(fake_on_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("warning: something odd\n\x00\x01 not a table\n", encoding="utf-8")
    monkeypatch.setenv("FAKE_IXSMI_FILE", str(garbage))
    with pytest.raises(DeviceDetectionError, match="could not parse") as err:
        detect()
    assert isinstance(err.value.__cause__, IxsmiParseError)
    assert "something odd" in str(err.value)  # the operator sees what ixsmi said


def test_detect_broken_row_names_the_line(
    fake_on_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lines = seed_lines()
    i = stats_line(lines, 8)
    lines[i] = "| 0%   32C   P0    N/A / N/A    | 116MiB / 32768MiB\n"
    broken = tmp_path / "broken.txt"
    broken.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setenv("FAKE_IXSMI_FILE", str(broken))
    with pytest.raises(DeviceDetectionError, match=rf"line {i + 1} "):
        detect()


def test_detect_no_devices_hint(fake_on_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("No supported GPUs found\n", encoding="utf-8")
    monkeypatch.setenv("FAKE_IXSMI_FILE", str(empty))
    with pytest.raises(DeviceDetectionError, match="/dev/iluvatar"):
        detect()


def test_detect_empty_output_is_an_error(
    fake_on_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    monkeypatch.setenv("FAKE_IXSMI_FILE", str(empty))
    for mode in ("table", "csv"):
        with pytest.raises(DeviceDetectionError, match="could not parse"):
            detect(mode=mode)


def test_detect_timeout(fake_on_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_IXSMI_SLEEP", "30")
    start = time.monotonic()
    with pytest.raises(DeviceDetectionError, match=r"did not finish within 0\.5s"):
        detect(timeout_s=0.5)
    assert time.monotonic() - start < 10


def test_detect_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        detect(mode="xml")


# --- human output ----------------------------------------------------------------------------


def test_format_devices() -> None:
    lines = seed_lines()
    i = stats_line(lines, 5)
    lines[i] = lines[i].replace("0%   31C   P0  ", "0%   31C   ERR!")
    out = format_devices(parse_ixsmi_table("".join(lines)))
    rows = out.splitlines()
    assert "driver 4.1.0" in rows[0] and "devices 16" in rows[0] and "healthy 15" in rows[0]
    assert rows[1].split() == ["IDX", "NAME", "BUS-ID", "MEMORY", "(MiB)", "TEMP", "POWER", "HEALTH"]
    assert len(rows) == 2 + 16
    assert "00000000:67:00.0" in rows[-1] and "116 / 32768" in rows[-1]
    assert "93W / 350W" in rows[3] and "N/A / N/A" in rows[2]
    assert "UNHEALTHY: Perf shows ERR!" in rows[2 + 5]
