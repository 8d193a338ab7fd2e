import json

import pytest

from bi150_ray.runrecord import RecordPathError, RunRecord


def test_record_paths_outside_the_run_storage_are_refused(tmp_path):
    root = tmp_path / "runs" / "r"
    root.mkdir(parents=True)
    path = root / "run_record.json"
    rec = RunRecord(path=str(path), run_name="r", config_source="c.json", config_hash="h")
    rec.checkpoints.append({"global_step": 10, "checkpoint": str(root / "checkpoints" / "checkpoint-10")})
    rec.save()
    again = RunRecord.open(str(path), allowed_roots=(str(root),), run_name="r", config_source="c.json", config_hash="h")
    assert again.checkpoints[0]["global_step"] == 10

    data = json.loads(path.read_text())
    data["checkpoints"].append({"global_step": 20, "checkpoint": str(root / ".." / ".." / ".." / "etc")})
    path.write_text(json.dumps(data))
    with pytest.raises(RecordPathError, match="outside the run's storage"):
        RunRecord.open(str(path), allowed_roots=(str(root),), run_name="r", config_source="c.json", config_hash="h")


def test_per_node_checkpoint_folders_outside_the_run_storage_are_refused(tmp_path):
    root = tmp_path / "runs" / "r"
    root.mkdir(parents=True)
    path = root / "run_record.json"
    rec = RunRecord(path=str(path), run_name="r", config_source="c.json", config_hash="h")
    ck = str(root / "checkpoints" / "checkpoint-10")
    rec.checkpoints.append({"global_step": 10, "checkpoint": ck, "folders": {"0": ck, "1": "/etc/checkpoint-10"}})
    rec.save()
    with pytest.raises(RecordPathError, match="checkpoint folder of node 1"):
        RunRecord.open(str(path), allowed_roots=(str(root),), run_name="r", config_source="c.json", config_hash="h")
