"""Prepare job, without Ray: shard planning, document reading, per-shard tokenizing and the merge.

The reference output is built the way PaddleNLP's ``create_pretraining_data.py --append_eos``
builds it (its own ``MMapIndexedDatasetBuilder`` and ``AutoTokenizer``), and read back with
PaddleNLP's own ``make_dataset``; bytes must be equal, not close.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from bi150_ray.data import prepare as prep
from bi150_ray.data.mmap_format import CorpusFormatError, MMapCorpus
from bi150_ray.demo_assets import SP_MODEL_FILE, build_corpus_text, train_tokenizer
from bi150_ray.hashing import sha256_file

TRICKY = [
    "Hello, world!",
    "   leading and trailing   ",
    "   ",  # strips to nothing: dropped, as PaddleNLP drops it
    "tabs\tand\nnew\n\nlines  with   runs of spaces",
    "unicode: café — “quoted” 中文 😀",
    "a" * 150 + " then b" + "b" * 100 + " and c" + "c" * 101,  # runs > 100 collapse to one char
    "text with the eos string </s> inside",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return build_corpus_text()[:600] + TRICKY


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(docs, out, vocab_size=1024)
    return out


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, key: t}, ensure_ascii=i % 2 == 0) + "\n")
            if i % 97 == 0:
                f.write("\n")  # blank lines are skipped
    return path


def run_inline(cfg: prep.PrepareConfig) -> tuple[list[prep.Shard], list[dict]]:
    """What ``prepare`` does, with the shard tasks run here one after another instead of in Ray."""
    cfg = prep._absolute(cfg)
    shards = prep.plan_shards(cfg)
    info = prep.tokenizer_info(cfg.tokenizer)
    dtype = prep.best_dtype(info["vocab_size"])
    settings = prep._settings(cfg, info, dtype)
    cfg.work_path.mkdir(parents=True, exist_ok=True)
    markers = [prep.tokenize_shard(s, cfg, settings, str(cfg.work_path)) for s in shards]
    for m in markers:
        if "error" in m:
            raise prep.PrepareError(m["error"])
    prep.merge_shards([cfg.work_path / s.name for s in shards], cfg.output_prefix, dtype)
    return shards, markers


def paddlenlp_reference(texts: list[str], tok_dir: Path, prefix: Path) -> None:
    """``create_pretraining_data.py --append_eos`` for LLaMA, with PaddleNLP's own builder."""
    from paddlenlp.data import indexed_dataset
    from paddlenlp.transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    dtype = np.uint16 if tok.vocab_size < 2**16 - 1 else np.int32
    builder = indexed_dataset.make_builder(str(prefix) + ".bin", "mmap", dtype)
    for text in texts:
        text = re.sub(r"(.)\1{100,}", r"\1", text)  # remove_repeated_chars, max_repeated_len=100
        ids = tok.convert_tokens_to_ids(tok.tokenize(text.strip()))
        if ids:
            builder.add_item([*ids, tok.eos_token_id])
            builder.end_document()
    builder.finalize(str(prefix) + ".idx")


def test_output_is_byte_identical_to_paddlenlp_and_independent_of_shard_size(
    tmp_path: Path, docs: list[str], tok_dir: Path
) -> None:
    pytest.importorskip("paddle")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", docs[:300])
    write_jsonl(inputs / "b.jsonl", docs[300:])
    before = {p.name: sha256_file(p) for p in inputs.iterdir()}

    paddlenlp_reference(docs, tok_dir, tmp_path / "ref")
    outputs = []
    for shard_bytes in (2_000, 50_000, 10**9):
        out = tmp_path / f"out{shard_bytes}"
        shards, markers = run_inline(
            prep.PrepareConfig(inputs=(str(inputs),), tokenizer=str(tok_dir), output_prefix=str(out), shard_bytes=shard_bytes)
        )
        outputs.append(out)
        if shard_bytes == 2_000:
            assert len(shards) > 50
        if shard_bytes == 10**9:
            assert len(shards) == 2
            assert sum(m["skipped_docs"] for m in markers) == 1  # the whitespace-only document
    for out in outputs:
        for ext in (".bin", ".idx"):
            assert Path(str(out) + ext).read_bytes() == Path(str(tmp_path / "ref") + ext).read_bytes(), (out, ext)
    assert {p.name: sha256_file(p) for p in inputs.iterdir()} == before  # inputs untouched

    from paddlenlp.data.indexed_dataset import make_dataset

    ds = make_dataset(str(outputs[0]), "mmap", skip_warmup=True)
    assert len(ds) == len(docs) - 1
    ours = MMapCorpus(outputs[0])
    assert ours.dtype == np.uint16
    for i in (0, 7, len(ds) - 1):
        assert np.array_equal(np.asarray(ds[i]), ours[i])
        assert ours[i][-1] == 2  # EOS appended per document
    assert 1 not in {int(ours[i][0]) for i in range(len(ours))}  # and no BOS


def test_sentencepiece_model_file_gives_the_same_ids_as_the_directory(tmp_path: Path, docs: list[str], tok_dir: Path) -> None:
    texts = [d for d in docs if "</s>" not in d]  # sentencepiece alone does not split special-token text
    write_jsonl(tmp_path / "a.jsonl", texts)
    run_inline(prep.PrepareConfig(inputs=(str(tmp_path / "a.jsonl"),), tokenizer=str(tok_dir / SP_MODEL_FILE),
                                  output_prefix=str(tmp_path / "sp"), shard_bytes=20_000))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / SP_MODEL_FILE))
    expect = [ids + [2] for ids in sp.encode([re.sub(r"(.)\1{100,}", r"\1", t).strip() for t in texts]) if ids]
    got = MMapCorpus(tmp_path / "sp")
    assert [list(map(int, got[i])) for i in range(len(got))] == expect


def test_no_eos_and_no_repeat_collapse_when_turned_off(tmp_path: Path, tok_dir: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["x" * 300])
    run_inline(prep.PrepareConfig(inputs=(str(tmp_path / "a.jsonl"),), tokenizer=str(tok_dir / SP_MODEL_FILE),
                                  output_prefix=str(tmp_path / "o"), append_eos=False, max_repeated_len=None))
    ids = MMapCorpus(tmp_path / "o")[0]
    assert ids[-1] != 2 and len(ids) > 20  # 300 x's kept, no EOS


@pytest.mark.parametrize("mode", ["line", "paragraph"])
def test_text_shards_cover_the_file_and_never_split_a_document(tmp_path: Path, mode: str) -> None:
    rng = np.random.RandomState(1)
    paras = ["\n".join(f"p{i} line {j} " + "w" * int(rng.randint(0, 40)) for j in range(rng.randint(1, 4)))
             for i in range(400)]
    path = tmp_path / "c.txt"
    path.write_text("\n\n\n".join(paras) + "\n", encoding="utf-8")
    expect = [line + "\n" for p in paras for line in p.split("\n")] if mode == "line" else [p + "\n" for p in paras]
    size = path.stat().st_size
    for shard_bytes in (1, 97, 1000, size):
        cfg = prep.PrepareConfig(inputs=(str(path),), tokenizer="unused", output_prefix=str(tmp_path / "o"),
                                 text_mode=mode, shard_bytes=shard_bytes)
        shards = prep.plan_shards(cfg)
        assert shards[0].start == 0 and shards[-1].end == size
        assert all(a.end == b.start for a, b in zip(shards, shards[1:], strict=False))
        got = [d for s in shards for d in prep.iter_documents(s, cfg)]
        assert got == expect, shard_bytes
    assert len(prep.plan_shards(cfg)) == 1


def test_parquet_shards_by_row_group(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " * (i % 5 + 1) for i in range(1000)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(1000)), "body": texts}), path, row_group_size=100)
    cfg = prep.PrepareConfig(inputs=(str(path),), tokenizer="x", output_prefix=str(tmp_path / "o"),
                             parquet_column="body", shard_bytes=1)
    shards = prep.plan_shards(cfg)
    assert len(shards) == 10 and shards[3].row_offset == 300
    assert [d for s in shards for d in prep.iter_documents(s, cfg)] == texts

    with pytest.raises(prep.PrepareError, match=r"d\.parquet: no column 'text' \(columns: \['id', 'body'\]\)"):
        prep.plan_shards(prep.PrepareConfig(inputs=(str(path),), tokenizer="x", output_prefix=str(tmp_path / "o")))
    with pytest.raises(prep.PrepareError, match="column 'id' has type int64"):
        prep.plan_shards(prep.PrepareConfig(inputs=(str(path),), tokenizer="x", output_prefix=str(tmp_path / "o"),
                                            parquet_column="id"))
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), nulls, row_group_size=2)
    cfg = prep.PrepareConfig(inputs=(str(nulls),), tokenizer="x", output_prefix=str(tmp_path / "o"), shard_bytes=1)
    with pytest.raises(prep.PrepareError, match=r"n\.parquet: row 2 has no 'text' value"):
        [d for s in prep.plan_shards(cfg) for d in prep.iter_documents(s, cfg)]


def _docs_of(path: Path, **kw: object) -> list[str]:
    cfg = prep.PrepareConfig(inputs=(str(path),), tokenizer="x", output_prefix=str(path.parent / "o"), shard_bytes=1, **kw)
    return [d for s in prep.plan_shards(cfg) for d in prep.iter_documents(s, cfg)]


def test_bad_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(prep.PrepareError, match=r"bad\.jsonl:4: not valid JSON"):
        _docs_of(path)
    path.write_text('{"text": "ok"}\n{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(prep.PrepareError, match=r"bad\.jsonl:2: no key 'text' \(found \['body'\]\); pass the text key"):
        _docs_of(path)
    with pytest.raises(prep.PrepareError, match=r"bad\.jsonl:1: no key 'body'"):
        _docs_of(path, json_key="body")
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(prep.PrepareError, match=r"bad\.jsonl:1: 'text' is int, expected a string"):
        _docs_of(path)
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(prep.PrepareError, match=r"bad\.jsonl:2: not valid UTF-8"):
        _docs_of(path)


def test_bad_inputs_and_outputs_are_refused_before_work(tmp_path: Path, tok_dir: Path) -> None:
    good = write_jsonl(tmp_path / "a.jsonl", ["x"])
    sp = str(tok_dir / SP_MODEL_FILE)

    def cfg(inputs: tuple[str, ...] = (str(good),), **kw: object) -> prep.PrepareConfig:
        return prep.PrepareConfig(inputs=inputs, tokenizer=kw.pop("tokenizer", sp),
                                  output_prefix=kw.pop("output_prefix", str(tmp_path / "out")), **kw)

    with pytest.raises(prep.PrepareError, match="missing.jsonl: no such file or directory"):
        prep.validate(cfg((str(tmp_path / "missing.jsonl"),)))
    with pytest.raises(prep.PrepareError, match=r"\*\.parquet: the pattern matches no files"):
        prep.validate(cfg((str(tmp_path / "*.parquet"),)))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(prep.PrepareError, match="notes.md: cannot tell the format"):
        prep.validate(cfg((str(tmp_path / "notes.md"),)))
    with pytest.raises(prep.PrepareError, match="nope: tokenizer not found"):
        prep.validate(cfg(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(prep.PrepareError, match="output directory does not exist"):
        prep.validate(cfg(output_prefix=str(tmp_path / "no" / "dir" / "out")))
    (tmp_path / "out.idx").write_bytes(b"")
    with pytest.raises(prep.PrepareError, match=r"out\.idx already exists; pass --overwrite"):
        prep.validate(cfg())
    assert prep.validate(cfg(overwrite=True)) == [(str(good), "jsonl")]
    (tmp_path / "in.bin").write_text("a")
    with pytest.raises(prep.PrepareError, match="in.bin is both an input and the output"):
        prep.validate(cfg((str(tmp_path / "in.bin"),), output_prefix=str(tmp_path / "in"), input_format="text",
                          overwrite=True))
    assert "no tokenizer_config.json; pass a PaddleNLP tokenizer directory" in prep.tokenizer_info(str(tmp_path))["error"]
    assert "a.jsonl: not a sentencepiece model" in prep.tokenizer_info(str(good))["error"]
    # A directory input skips our own output and work files, so a rerun into the same folder works.
    (tmp_path / "out.prepare").mkdir()
    (tmp_path / "out.prepare" / "shard-00000.txt").write_text("x")
    (tmp_path / "out.idx").unlink()
    (tmp_path / "in.bin").unlink()
    assert prep.validate(cfg((str(tmp_path),), input_format="auto")) == [(str(good), "jsonl")]


def test_marker_is_reused_only_for_the_same_shard_settings_and_intact_files(tmp_path: Path, tok_dir: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(200)])
    cfg = prep.PrepareConfig(inputs=(str(tmp_path / "a.jsonl"),), tokenizer=str(tok_dir / SP_MODEL_FILE),
                             output_prefix=str(tmp_path / "o"), shard_bytes=1000)
    shards, _ = run_inline(cfg)
    cfg = prep._absolute(cfg)
    info = prep.tokenizer_info(cfg.tokenizer)
    settings = prep._settings(cfg, info, np.dtype(np.uint16))
    work = cfg.work_path
    assert all(prep.read_marker(work, s, settings) for s in shards)
    other = prep._settings(prep.PrepareConfig(**{**cfg.__dict__, "append_eos": False}), info, np.dtype(np.uint16))
    assert prep.read_marker(work, shards[0], other) is None
    moved = prep.Shard(**{**shards[0].__dict__, "end": shards[0].end + 1})
    assert prep.read_marker(work, moved, settings) is None
    with open(work / f"{shards[1].name}.bin", "r+b") as f:
        f.truncate(2)
    assert prep.read_marker(work, shards[1], settings) is None


def test_merge_publishes_nothing_that_looks_complete_when_interrupted(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(100)])
    cfg = prep.PrepareConfig(inputs=(str(tmp_path / "a.jsonl"),), tokenizer=str(tok_dir / SP_MODEL_FILE),
                             output_prefix=str(tmp_path / "o"), shard_bytes=500)
    shards, _ = run_inline(cfg)
    good_bin = (tmp_path / "o.bin").read_bytes()
    work = tmp_path / "o.prepare"
    prefixes = [work / s.name for s in shards]

    real_replace = os.replace
    calls = []

    def crash_before_idx(src: str, dst: str) -> None:
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # the run is killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(prep.os, "replace", crash_before_idx)
    with pytest.raises(KeyboardInterrupt):
        prep.merge_shards(prefixes, str(tmp_path / "o"), np.dtype(np.uint16))
    monkeypatch.undo()
    assert (tmp_path / "o.bin").read_bytes() == good_bin and not (tmp_path / "o.idx").exists()
    with pytest.raises(CorpusFormatError):
        MMapCorpus(tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left

    # A damaged shard is refused before anything is written.
    with open(work / f"{shards[0].name}.bin", "r+b") as f:
        f.truncate(3)
    with pytest.raises(CorpusFormatError, match="shard-00000.bin"):
        prep.merge_shards(prefixes, str(tmp_path / "p"), np.dtype(np.uint16))
    assert not list(tmp_path.glob("p.*")) and not list(tmp_path.glob(".p.*"))


def test_int32_when_the_vocabulary_does_not_fit_uint16(tmp_path: Path) -> None:
    from bi150_ray.data.mmap_format import MMapWriter

    work = tmp_path / "w"
    work.mkdir()
    for i, docs in enumerate(([[70000, 5], [1]], [[2, 3, 4]])):
        with MMapWriter(work / f"shard-{i:05d}", np.int32) as w:
            for d in docs:
                w.add_document(d)
    n, tokens = prep.merge_shards([work / "shard-00000", work / "shard-00001"], str(tmp_path / "o"), np.dtype(np.int32))
    c = MMapCorpus(tmp_path / "o")
    assert (n, tokens, c.dtype) == (3, 6, np.int32)
    assert [list(map(int, c[i])) for i in range(3)] == [[70000, 5], [1], [2, 3, 4]]
    assert list(c.doc_idx) == [0, 1, 2, 3]
    assert prep.best_dtype(70000) == np.int32 and prep.best_dtype(32000) == np.uint16


def test_cli_flags_map_onto_the_config_and_unset_flags_keep_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from bi150_ray import cli

    seen: list[tuple[prep.PrepareConfig, str | None, int | None]] = []

    def fake_run(cfg: prep.PrepareConfig, address: str | None = None, num_cpus: int | None = None) -> prep.PrepareResult:
        seen.append((cfg, address, num_cpus))
        return prep.PrepareResult("p", 1, 2, "uint16", 1, 1, 0, 0.1)

    monkeypatch.setattr(prep, "run", fake_run)
    assert cli.main(["prepare", "a.jsonl", "b/", "--tokenizer", "t", "--output", "o"]) == 0
    cfg, address, cpus = seen[-1]
    assert cfg == prep.PrepareConfig(inputs=("a.jsonl", "b/"), tokenizer="t", output_prefix="o")
    assert (address, cpus) == (None, None)
    assert cli.main(["prepare", "a.txt", "--tokenizer", "t", "--output", "o", "--no-append-eos", "--max-repeated-len", "0",
                     "--shard-mb", "0.5", "--workers", "3", "--text-mode", "paragraph", "--json-key", "body",
                     "--address", "auto", "--overwrite", "--no-progress"]) == 0
    cfg, address, _ = seen[-1]
    assert (cfg.append_eos, cfg.max_repeated_len, cfg.shard_bytes, cfg.workers, cfg.text_mode, cfg.json_key) == (
        False, None, 1 << 19, 3, "paragraph", "body")
    assert (address, cfg.overwrite, cfg.progress) == ("auto", True, False)

    import jobs.prepare_data as job

    assert job.main(["x.jsonl", "--tokenizer", "t", "--output", "o"]) == 0
    assert seen[-1][1] == "auto"  # ray job submit: join the cluster at RAY_ADDRESS
