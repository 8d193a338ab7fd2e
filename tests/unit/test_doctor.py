"""The doctor's judging on synthetic per-node facts: each broken fact is one no-go line naming the
node and the fix; a healthy cluster is go."""

import json
import os

import pytest

from bi150_ray import doctor, nodeprobe
from bi150_ray.doctor import GO, NO_GO, SKIP, CheckResult, DoctorOptions, NodeFacts, Requirements, evaluate

REQ = Requirements(nodes=2, devices_per_node=16, backend="corex", memory_needed_mib=27_000, ifname="eth0")
VERSIONS = {"python": "3.10.12", "paddle": "2.5.2+corex.4.1.0", "paddlenlp": "2.7.2", "ray": "2.60.0",
            "driver": "4.1.0", "ix-ml": "4.1.0", "cuda": "10.2"}


def node(i: int, **kw) -> NodeFacts:
    base = dict(index=i, node_id=f"{i:02d}" * 28, ip=f"10.31.10.{10 + i}", ray_devices=16.0,
                devices={"count": 16, "healthy": 16, "memory_min_mib": 32768, "name": "Iluvatar BI-V150", "problems": []},
                versions=dict(VERSIONS), ifname="eth0", ifname_source="node env",
                interfaces={"lo": ["127.0.0.1/8"], "eth0": [f"10.31.10.{10 + i}/24"]},
                storage_path="/data1/bi150-ray/runs", clock_offset_s=0.01, clock_rtt_s=0.002)
    base.update(kw)
    return NodeFacts(**base)


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == NO_GO]


def only_failure(results: list[CheckResult]) -> CheckResult:
    bad = failures(results)
    assert len(bad) == 1, doctor.format_report(results)
    return bad[0]


def test_healthy_cluster_is_go_with_one_line_per_check_per_node():
    facts = [node(i) for i in range(4)]
    results = evaluate(facts, Requirements(**{**REQ.__dict__, "nodes": 4}))
    assert doctor.verdict(results) == GO
    for check in ("devices", "device memory", "driver versions", "software versions", "interface", "subnet", "storage", "clock"):
        assert sorted(r.node for r in results if r.check == check) == sorted(f.label for f in facts), check
    text = doctor.format_report(results)
    assert text.splitlines()[-1].startswith("GO:") and "fix" not in text


def test_software_version_mismatch_names_the_node_and_the_version_to_install():
    facts = [node(0), node(1), node(2, versions={**VERSIONS, "paddle": "2.6.0"})]
    bad = only_failure(evaluate(facts, Requirements(**{**REQ.__dict__, "nodes": 3})))
    assert bad.check == "software versions" and bad.node == facts[2].label
    assert "paddle 2.6.0" in bad.detail and "2.5.2+corex.4.1.0" in bad.detail
    assert "install paddle 2.5.2+corex.4.1.0 on this node" in bad.fix


def test_missing_paddle_on_one_node_is_a_mismatch():
    facts = [node(0), node(1, versions={**VERSIONS, "paddlenlp": None})]
    bad = only_failure(evaluate(facts, REQ))
    assert bad.node == facts[1].label and "paddlenlp missing" in bad.detail


def test_driver_version_mismatch():
    facts = [node(0), node(1), node(2, versions={**VERSIONS, "driver": "3.4.0"})]
    bad = only_failure(evaluate(facts, Requirements(**{**REQ.__dict__, "nodes": 3})))
    assert bad.check == "driver versions" and bad.node == facts[2].label and "driver 3.4.0" in bad.detail
    assert "CoreX driver" in bad.fix


def test_node_in_the_wrong_subnet():
    facts = [node(0), node(1), node(2, interfaces={"lo": ["127.0.0.1/8"], "eth0": ["10.31.11.12/24"]})]
    bad = only_failure(evaluate(facts, Requirements(**{**REQ.__dict__, "nodes": 3})))
    assert bad.check == "subnet" and bad.node == facts[2].label
    assert "10.31.11.0/24" in bad.detail and "not in 10.31.10.0/24" in bad.detail and "0,1" in bad.detail
    assert "10.31.10.0/24" in bad.fix and "NCCL_SOCKET_IFNAME" in bad.fix


def test_text_prefix_is_not_a_subnet():
    # 10.31.100.x shares the text prefix "10.31.10" but not the /24 network.
    facts = [node(0), node(1, interfaces={"eth0": ["10.31.100.11/24"]})]
    assert [r.check for r in failures(evaluate(facts, REQ))] == ["subnet"]


def test_missing_interface():
    facts = [node(0), node(1, interfaces={"lo": ["127.0.0.1/8"], "ens5": ["10.31.10.11/24"]})]
    bad = only_failure(evaluate(facts, REQ))
    assert bad.check == "interface" and bad.node == facts[1].label
    assert "NCCL_SOCKET_IFNAME=eth0" in bad.detail and "no such interface" in bad.detail and "ens5 10.31.10.11/24" in bad.detail
    assert "NCCL_SOCKET_IFNAME" in bad.fix


def test_interface_without_an_address():
    facts = [node(0), node(1, interfaces={"eth0": []})]
    bad = only_failure(evaluate(facts, REQ))
    assert bad.check == "interface" and "no IPv4 address" in bad.detail


def test_interface_matching_follows_nccl_rules():
    names = ["lo", "eth0", "eth1", "ib0", "docker0"]
    assert doctor.match_interfaces("eth", names) == ["eth0", "eth1"]
    assert doctor.match_interfaces("=eth1", names) == ["eth1"]
    assert doctor.match_interfaces("ib0,eth1", names) == ["eth1", "ib0"]
    assert doctor.match_interfaces("^docker,lo", names) == ["eth0", "eth1", "ib0"]


def test_unset_interface_is_skipped_not_failed():
    facts = [node(i, ifname=None, ifname_source=None) for i in range(2)]
    results = evaluate(facts, Requirements(**{**REQ.__dict__, "ifname": None}))
    assert doctor.verdict(results) == GO
    assert {r.status for r in results if r.check == "interface"} == {SKIP}


def test_unwritable_storage():
    facts = [node(0), node(1, storage_error="PermissionError: [Errno 13] Permission denied: '/data1/bi150-ray/runs'")]
    bad = only_failure(evaluate(facts, REQ))
    assert bad.check == "storage" and bad.node == facts[1].label and "not writable" in bad.detail
    assert "runtime.storage_path" in bad.fix


def test_shared_storage_that_is_not_shared():
    req = Requirements(**{**REQ.__dict__, "shared_storage": True})
    facts = [node(0, shared_missing=[1]), node(1, shared_missing=[0])]
    bad = failures(evaluate(facts, req))
    assert [(r.check, r.node) for r in bad] == [("shared storage", facts[0].label), ("shared storage", facts[1].label)]
    assert "node(s) 1 are not visible" in bad[0].detail and "shared_storage" in bad[0].fix
    ok = evaluate([node(0, shared_missing=[]), node(1, shared_missing=[])], req)
    assert doctor.verdict(ok) == GO


def test_clock_skew_beyond_tolerance_but_not_within_round_trip():
    facts = [node(0), node(1, clock_offset_s=-7.5, clock_rtt_s=0.004)]
    bad = only_failure(evaluate(facts, REQ, DoctorOptions(clock_tolerance_s=2.0)))
    assert bad.check == "clock" and bad.node == facts[1].label and "-7.500 s" in bad.detail and "chrony" in bad.fix
    # an offset the round trip could explain is not held against the node
    assert doctor.verdict(evaluate([node(0), node(1, clock_offset_s=2.3, clock_rtt_s=1.0)], REQ)) == GO


def test_too_few_devices_on_a_node_and_in_the_cluster():
    unhealthy = {"count": 16, "healthy": 14, "memory_min_mib": 32768, "name": "Iluvatar BI-V150",
                 "problems": ["device 3: memory total reads 0MiB", "device 9: Fan shows ERR!"]}
    facts = [node(0), node(1, devices=unhealthy, ray_devices=14.0)]
    bad = failures(evaluate(facts, REQ))
    assert [(r.check, r.node) for r in bad] == [("nodes", "cluster"), ("devices", facts[1].label)]
    assert "1 of 2 node(s) can host 16 BI150; the job needs 2" in bad[0].detail
    assert "14 healthy of 16" in bad[1].detail and "device 3" in bad[1].fix and "devices_per_node to 14" in bad[1].fix
    # at job start the gang reservation judges the count (it waits for capacity); the node is still no-go
    bad = failures(evaluate(facts, REQ, DoctorOptions(judge_node_count=False)))
    assert [r.check for r in bad] == ["devices"]


def test_ray_advertising_more_than_ixsmi_sees():
    facts = [node(0), node(1, ray_devices=16.0, devices={**node(0).devices, "healthy": 15})]
    bad = failures(evaluate(facts, Requirements(**{**REQ.__dict__, "devices_per_node": 8})))
    assert [r.check for r in bad] == ["devices"] and "Ray advertises 16 BI150 but ixsmi sees only 15" in bad[0].detail
    assert "node-resources" in bad[0].fix


def test_device_memory_below_the_plan():
    facts = [node(0), node(1)]
    bad = failures(evaluate(facts, Requirements(**{**REQ.__dict__, "memory_needed_mib": 40_000})))
    assert {r.check for r in bad} == {"device memory"} and len(bad) == 2 and "40000 MiB" in bad[0].detail


def test_missing_ixsmi_fails_a_device_backend_but_not_cpu():
    err = "ixsmi not found on PATH on node n1: install the Iluvatar CoreX driver/SDK ..."
    facts = [node(0), node(1, devices=None, device_error=err, versions={k: v for k, v in VERSIONS.items() if k in doctor.SOFTWARE_KEYS})]
    bad = failures(evaluate(facts, REQ))
    assert ("devices", facts[1].label) in [(r.check, r.node) for r in bad] and err in next(r.fix for r in bad if r.check == "devices")
    cpu = [node(i, devices=None, device_error=err, versions={k: VERSIONS[k] for k in doctor.SOFTWARE_KEYS},
                ray_devices=2.0) for i in range(2)]
    results = evaluate(cpu, Requirements(nodes=2, devices_per_node=2, backend="cpu"))
    assert doctor.verdict(results) == GO and {r.status for r in results if r.check == "devices"} == {SKIP}


def test_collective_results_are_judged():
    labels = {0: "node0 a", 1: "node1 b"}
    ok = {"ranks": {0: {"all_reduce_ok": True}, 1: {"all_reduce_ok": True}},
          "pairs": [{"src": 0, "dst": 1, "src_node": 0, "dst_node": 1, "mb_per_s": 950.0, "bytes": 12_582_912, "intact": True}]}
    res = doctor.check_collective(ok, labels)
    assert [r.status for r in res] == [GO, GO] and "950 MB/s" in res[1].detail and res[1].node == "node0 a -> node1"
    slow = doctor.check_collective(ok, labels, DoctorOptions(min_bandwidth_mb_s=5000))
    assert slow[1].status == NO_GO and "NCCL_SOCKET_IFNAME" in slow[1].fix
    wrong = doctor.check_collective({**ok, "ranks": {0: {"all_reduce_ok": True}, 1: {"all_reduce_ok": False}}}, labels)
    assert wrong[0].status == NO_GO and "ranks [1]" in wrong[0].detail
    died = doctor.check_collective({"error": "collective test: rank 1 exited with code 1", "fix": "read the log"}, labels)
    assert died == [CheckResult("all-reduce", "cluster", NO_GO, "collective test: rank 1 exited with code 1", "read the log")]


def test_report_has_one_fix_line_per_failed_check():
    facts = [node(0, storage_error="OSError: read-only file system"), node(1, clock_offset_s=30.0)]
    text = doctor.format_report(evaluate(facts, REQ))
    fixes = [line for line in text.splitlines() if line.startswith("fix ")]
    assert fixes == [f"fix [storage] {facts[0].label}: create /data1/bi150-ray/runs writable by the Ray user on this node, "
                     "or set runtime.storage_path",
                     f"fix [clock] {facts[1].label}: synchronise the clocks (chrony/ntpd on every node; `chronyc tracking` shows the offset)"]
    assert text.splitlines()[-1].startswith("NO-GO: 2 check(s) failed")


def test_local_probe_pieces(tmp_path):
    # the storage marker round-trips; a path below a regular file is refused (as root too)
    path = nodeprobe.write_marker(str(tmp_path / "runs"), "tok", 3)
    assert open(path).read() == "tok" and os.path.basename(path) == ".bi150-doctor.tok.3"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        nodeprobe.write_marker(str(tmp_path / "file" / "runs"), "tok", 0)
    addrs = nodeprobe.interface_addresses()
    assert "127.0.0.1/8" in addrs["lo"]
    facts = nodeprobe.NodeProbe().facts(0, str(tmp_path / "p"), "lo", str(tmp_path / "no-ixsmi"), "t", False)
    assert "not found" in facts["device_error"] and facts["versions"]["ray"] and facts["ifname_source"] == "runtime.env"
    assert not os.listdir(tmp_path / "p")  # the marker was removed
    json.dumps(facts)  # crosses Ray as plain data
