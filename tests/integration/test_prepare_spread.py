"""`prepare --spread` on a real multi-node Ray cluster (three Ray nodes on 127.0.0.1): the shard
tasks run on both worker nodes and the output is byte-identical to a one-node run. The driver's
node has no CPUs, as a `ray up` head often has none to spare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bi150_ray.data import prepare as prep
from bi150_ray.demo import _free_agent_ports, loopback_cluster
from bi150_ray.demo_assets import build_corpus_text, train_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_workers():
    import ray

    with loopback_cluster(head_cpus=0) as cluster:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", **_free_agent_ports())
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster


def test_spread_tokenizes_on_both_nodes_with_the_same_output(two_workers, tmp_path: Path) -> None:
    import ray

    docs = build_corpus_text()
    tok = tmp_path / "tok"
    train_tokenizer(docs[:800], tok, vocab_size=1024)
    inputs = tmp_path / "in"
    inputs.mkdir()
    with open(inputs / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)

    def cfg(out: str, **kw: object) -> prep.PrepareConfig:
        return prep.PrepareConfig(inputs=(str(inputs),), tokenizer=str(tok), output_prefix=str(tmp_path / out),
                                  progress=False, shard_bytes=60_000, **kw)

    # Without --spread the tasks would wait forever for a CPU on the driver's node: refused at once.
    with pytest.raises(prep.PrepareError, match="no CPUs for tokenizing tasks; pass --spread"):
        prep.prepare(cfg("local"))

    spread = prep.prepare(cfg("spread", spread=True, workers=2))
    assert spread.shards >= 6 and spread.shards_tokenized == spread.shards
    assert spread.nodes == 2  # both worker nodes tokenized shards
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1}
    assert len(workers) == 2

    one = prep.prepare(cfg("one", spread=True, workers=1))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"spread{ext}").read_bytes() == (tmp_path / f"one{ext}").read_bytes()
    assert one.n_docs == spread.n_docs > 1000
