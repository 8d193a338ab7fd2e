from bi150_ray.events import EventTail, EventWriter


def test_tail_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "ev.jsonl"
    w = EventWriter(str(path), rank=3)
    tail = EventTail(str(path))
    assert tail.read_new() == []
    w.emit("step", global_step=1, loss=2.5)
    with open(path, "a") as fh:
        fh.write('{"kind": "half')  # a line still being written
    got = tail.read_new()
    assert [(e["kind"], e["rank"], e["global_step"]) for e in got] == [("step", 3, 1)]
    with open(path, "a") as fh:
        fh.write('way", "rank": 3}\n')
    assert tail.read_new()[0]["kind"] == "halfway"
    assert tail.read_new() == []
