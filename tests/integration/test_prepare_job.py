"""Prepare job on a real local Ray (127.0.0.1): worker-count independence, resume, errors, entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bi150_ray.data import prepare as prep
from bi150_ray.data.mmap_format import MMapCorpus
from bi150_ray.demo_assets import SP_MODEL_FILE, build_corpus_text, train_tokenizer
from bi150_ray.hashing import sha256_file

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_address():
    with prep.local_ray(num_cpus=2) as address:
        yield address


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input folder of two jsonl files, PaddleNLP tokenizer dir), built offline."""
    root = tmp_path_factory.mktemp("prep")
    docs = build_corpus_text()
    tok = root / "tok"
    train_tokenizer(docs[:800], tok, vocab_size=1024)
    inputs = root / "in"
    inputs.mkdir()
    for name, part in (("a.jsonl", docs[:1200]), ("b.jsonl", docs[1200:])):
        with open(inputs / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    return inputs, tok


def _cfg(inputs: Path, tok: Path | str, out: Path, **kw: object) -> prep.PrepareConfig:
    return prep.PrepareConfig(inputs=(str(inputs),), tokenizer=str(tok), output_prefix=str(out), progress=False, **kw)


def test_output_does_not_depend_on_worker_count_and_paddlenlp_reads_it(ray_address, corpus, tmp_path) -> None:
    inputs, tok = corpus
    before = {p.name: sha256_file(p) for p in inputs.iterdir()}
    r1 = prep.prepare(_cfg(inputs, tok, tmp_path / "w1", shard_bytes=100_000, workers=1))
    r2 = prep.prepare(_cfg(inputs, tok, tmp_path / "w2", shard_bytes=100_000, workers=2))
    assert r1.shards == r2.shards >= 5 and r2.shards_tokenized == r2.shards
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert not (tmp_path / "w1.prepare").exists()  # work dir removed after a good merge
    assert {p.name: sha256_file(p) for p in inputs.iterdir()} == before

    from paddlenlp.data.indexed_dataset import make_dataset

    ds = make_dataset(str(tmp_path / "w2"), "mmap", skip_warmup=True)
    assert len(ds) == r2.n_docs and int(ds.sizes.sum()) == r2.n_tokens
    ours = MMapCorpus(tmp_path / "w2")
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert np.array_equal(np.asarray(ds[i]), ours[i]) and ours[i][-1] == 2


def test_tasks_run_at_nice_0_on_the_drivers_node(ray_address, corpus, tmp_path) -> None:
    import ray

    inputs, tok = corpus

    def where() -> tuple[int, str]:
        return os.nice(0), ray.get_runtime_context().get_node_id()

    opts = prep.task_options(_cfg(inputs, tok, tmp_path / "o"))
    assert ray.get(ray.remote(where).options(**opts).remote()) == (0, ray.get_runtime_context().get_node_id())
    assert ray.get(ray.remote(lambda: os.nice(0)).options(num_cpus=1).remote()) == 15  # Ray's default


def test_rerun_redoes_only_unfinished_shards(ray_address, corpus, tmp_path) -> None:
    inputs, tok = corpus
    sp = tok / SP_MODEL_FILE
    full = prep.prepare(_cfg(inputs, sp, tmp_path / "o", shard_bytes=30_000, keep_work=True))
    assert full.shards_tokenized == full.shards >= 10
    first = {ext: (tmp_path / f"o{ext}").read_bytes() for ext in (".bin", ".idx")}
    work = tmp_path / "o.prepare"

    # An interrupted run: two shards never finished (no marker), one left a torn .bin, no output.
    for ext in (".bin", ".idx"):
        (tmp_path / f"o{ext}").unlink()
    (work / "shard-00003.done").unlink()
    (work / "shard-00007.done").unlink()
    with open(work / "shard-00005.bin", "r+b") as f:
        f.truncate(10)
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.bin")
            if p.name not in ("shard-00003.bin", "shard-00005.bin", "shard-00007.bin")}

    again = prep.prepare(_cfg(inputs, sp, tmp_path / "o", shard_bytes=30_000, keep_work=True))
    assert (again.shards_tokenized, again.shards_reused) == (3, full.shards - 3)
    assert {n: (work / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not rewritten
    assert {ext: (tmp_path / f"o{ext}").read_bytes() for ext in (".bin", ".idx")} == first

    # Other settings invalidate every marker.
    noeos = prep.prepare(_cfg(inputs, sp, tmp_path / "o", shard_bytes=30_000, append_eos=False, overwrite=True))
    assert noeos.shards_tokenized == noeos.shards and noeos.n_tokens == full.n_tokens - full.n_docs


def test_killed_driver_leaves_no_output_and_the_rerun_keeps_its_finished_shards(ray_address, corpus, tmp_path) -> None:
    """SIGKILL the job's driver mid-run (a real interruption), then run again."""
    import time

    inputs, tok = corpus
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        for _ in range(4):
            for p in sorted(inputs.iterdir()):
                f.write(p.read_bytes())
    out, work = tmp_path / "k", tmp_path / "k.prepare"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "prepare_data.py"), str(big), "--tokenizer", str(tok),
         "--output", str(out), "--shard-mb", "0.05", "--workers", "1", "--no-progress"],
        env={**_env(), "RAY_ADDRESS": ray_address}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(work.glob("*.done"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be interrupted"
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = {p.name for p in work.glob("*.done")}
    assert not Path(f"{out}.bin").exists() and not Path(f"{out}.idx").exists()

    r = prep.prepare(_cfg(big, tok, out, shard_bytes=int(0.05 * (1 << 20))))
    assert r.shards_reused >= len(finished) >= 3 and r.shards_tokenized == r.shards - r.shards_reused
    assert r.n_docs == 4 * sum(1 for p in inputs.iterdir() for _ in open(p, encoding="utf-8"))
    corpus_out = MMapCorpus(out)
    assert corpus_out.n_tokens == r.n_tokens and corpus_out[len(corpus_out) - 1][-1] == 2


def test_bad_input_in_a_task_is_one_clear_error_and_writes_no_output(ray_address, corpus, tmp_path) -> None:
    _, tok = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(500)) + '{"text": oops}\n')
    with pytest.raises(prep.PrepareError, match=r"bad\.jsonl:501: not valid JSON"):
        prep.prepare(_cfg(bad, tok / SP_MODEL_FILE, tmp_path / "o", shard_bytes=1000))
    assert not list(tmp_path.glob("o.bin")) and not list(tmp_path.glob("o.idx"))

    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(prep.PrepareError, match="empty corpus"):
        prep.prepare(_cfg(empty, tok / SP_MODEL_FILE, tmp_path / "e"))
    assert not list(tmp_path.glob("e.*"))


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def test_job_entry_point_joins_the_running_cluster(ray_address, corpus, tmp_path) -> None:
    """What `ray job submit -- python jobs/prepare_data.py ...` runs: RAY_ADDRESS set, --address auto."""
    inputs, tok = corpus
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "prepare_data.py"), str(inputs), "--tokenizer", str(tok / SP_MODEL_FILE),
         "--output", str(tmp_path / "job"), "--shard-mb", "0.05", "--no-progress"],
        env={**_env(), "RAY_ADDRESS": ray_address}, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Connecting to existing Ray cluster at address: {ray_address}" in proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BI150_PREPARE_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    assert result["n_docs"] == MMapCorpus(tmp_path / "job").n_docs > 2000


def test_cli_local_ray_and_user_errors(corpus, tmp_path) -> None:
    inputs, tok = corpus
    cmd = [str(BIN / "bi150-ray"), "prepare", str(inputs / "a.jsonl"), "--tokenizer", str(tok / SP_MODEL_FILE),
           "--output", str(tmp_path / "cli"), "--num-cpus", "1", "--no-progress"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote " in proc.stdout and MMapCorpus(tmp_path / "cli").n_docs == 1200
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip() == f"bi150-ray: error: {tmp_path / 'cli'}.bin already exists; pass --overwrite to replace it"
