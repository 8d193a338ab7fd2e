"""Demo assets: offline tokenizer/config/corpus that PaddleNLP itself accepts."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bi150_ray.data.mmap_format import MMapCorpus
from bi150_ray.demo_assets import (
    CORPUS_PREFIX,
    DemoAssets,
    build_corpus_text,
    build_demo_assets,
    tokenize_to_mmap,
)

REPO = Path(__file__).resolve().parents[2]
EOS, BOS, UNK = 2, 1, 0
TRICKY = [
    "Hello, world!",
    "   leading and trailing   ",
    "tabs\tand\nnew\n\nlines  with   runs of spaces",
    "digits 1234567890 and 3.14159e-10",
    "unicode: café — “quoted” ‘single’ … ß 中文 😀",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def no_network() -> Iterator[None]:
    """Any socket connect fails, so a hub download attempt shows up as an error."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def tokenizer(assets: DemoAssets, no_network: None):
    pytest.importorskip("paddle")
    from paddlenlp.transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.model_dir))


def test_corpus_text_is_deterministic_and_big_enough() -> None:
    docs = build_corpus_text()
    assert docs == build_corpus_text()
    assert 1000 <= len(docs) <= 10000
    assert all(d == d.strip() and d for d in docs)


def test_layout_and_counts(assets: DemoAssets) -> None:
    assert sorted(p.name for p in assets.model_dir.iterdir()) == [
        "config.json",
        "sentencepiece.bpe.model",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ]
    # run_pretrain's get_train_data_file: every file whose name contains ".idx"/"_idx.npz" is a prefix
    found = [
        str(assets.data_dir / p.name.replace("_idx.npz", "").replace(".idx", ""))
        for p in assets.data_dir.iterdir()
        if p.is_file() and ("_idx.npz" in p.name or ".idx" in p.name)
    ]
    assert found == [str(assets.prefix)]
    assert assets.prefix == assets.data_dir / CORPUS_PREFIX
    c = MMapCorpus(assets.prefix)
    assert (assets.n_docs, assets.n_tokens) == (c.n_docs, c.n_tokens)
    assert assets.n_docs == len(build_corpus_text())  # no document tokenized to nothing
    stamp = json.loads((assets.model_dir.parent / "demo_assets.json").read_text())
    assert stamp["build_seconds"] < 20


def test_corpus_tokens(assets: DemoAssets) -> None:
    c = MMapCorpus(assets.prefix)
    assert c.dtype == np.uint16  # PaddleNLP's choice for vocab < 65535
    np.testing.assert_array_equal(c.doc_idx, np.arange(len(c) + 1))
    ends = np.array([c.get(i)[-1] for i in range(len(c))])
    assert (ends == EOS).all()
    tokens = np.frombuffer(assets.prefix.with_suffix(".bin").read_bytes(), dtype=np.uint16)
    assert tokens.max() < assets.vocab_size
    assert (tokens == EOS).sum() == len(c)  # EOS only at document ends
    assert not (tokens == BOS).any()  # no BOS: tokenize + convert_tokens_to_ids, not encode
    assert not (tokens == UNK).any()  # byte fallback covers every character


def test_tokenizer_loads_offline_and_round_trips(assets: DemoAssets, tokenizer) -> None:
    from paddlenlp.transformers import LlamaTokenizer

    assert type(tokenizer).__name__ == "LlamaTokenizer"
    direct = LlamaTokenizer.from_pretrained(str(assets.model_dir))
    for tok in (tokenizer, direct):
        assert tok.vocab_size == len(tok) == assets.vocab_size
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
        assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    for text in TRICKY + build_corpus_text()[::97]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == BOS and EOS not in ids  # LLaMA: add_bos_token, no add_eos_token
        assert tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text


def test_fast_path_matches_paddlenlp_tokenizer(assets: DemoAssets, tokenizer) -> None:
    c = MMapCorpus(assets.prefix)
    docs = build_corpus_text()
    for i in range(0, len(docs), 3):
        expected = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(docs[i])) + [EOS]
        assert c.get(i).tolist() == expected, f"document {i} differs"


def test_special_token_text_and_empty_docs_follow_paddlenlp(
    assets: DemoAssets, tokenizer, tmp_path: Path
) -> None:
    docs = [*TRICKY, "ends with </s> and <s> inside", "   ", "", "<unk>"]
    n_docs, n_tokens = tokenize_to_mmap(docs, assets.model_dir, tmp_path / "t")
    c = MMapCorpus(tmp_path / "t")
    # create_pretraining_data strips, drops documents with no tokens, appends EOS
    expected = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(d.strip())) for d in docs]
    expected = [e + [EOS] for e in expected if e]
    assert (n_docs, n_tokens) == (len(expected), sum(map(len, expected)))
    assert [c.get(i).tolist() for i in range(len(c))] == expected
    assert expected[len(TRICKY)].count(EOS) == 2  # "</s>" in text is the EOS id, as in PaddleNLP


def test_config_builds_llama_with_tokenizer_vocab(assets: DemoAssets, tokenizer, no_network: None) -> None:
    import paddle
    from paddlenlp.transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(assets.model_dir))
    assert type(AutoConfig.from_pretrained(str(assets.model_dir))) is LlamaConfig
    assert config.vocab_size == len(tokenizer) == assets.vocab_size
    assert assets.vocab_size % 64 == 0  # every power-of-two tp degree shards the vocab
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.num_hidden_layers % 4 == 0 and config.num_attention_heads % 4 == 0
    assert not config.tie_word_embeddings

    paddle.seed(0)
    model = LlamaForCausalLM.from_config(config)
    assert model.llama.embed_tokens.weight.shape == [assets.vocab_size, config.hidden_size]
    assert model.lm_head.weight.shape == [config.hidden_size, assets.vocab_size]
    text = np.asarray(MMapCorpus(assets.prefix).get(0)[:17], dtype=np.int64)[None]
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor(text[:, :-1]), labels=paddle.to_tensor(text[:, 1:]))
    loss = float(out[0] if isinstance(out, tuple) else out.loss)
    assert abs(loss - math.log(assets.vocab_size)) < 1.0  # freshly initialised: ~uniform


def test_paddlenlp_causal_dataset_accepts_corpus(assets: DemoAssets, tmp_path: Path) -> None:
    pytest.importorskip("paddle")
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets

    before = sorted(os.listdir(assets.data_dir))
    seq = 128
    train, valid, test = build_train_valid_test_datasets(
        [str(assets.prefix)],
        "mmap",
        "949,50,1",
        [64, 16, 8],
        seq,
        42,
        True,  # skip_warmup
        data_cache_path=str(tmp_path / "cache"),  # else it writes <data_dir>/index-cache
    )
    for ds in (train, valid, test):
        assert ds is not None and len(ds) > 0
        item = ds[0]["text"]
        assert item.shape == (seq + 1,) and item.dtype == np.int64
        assert 0 <= item.min() and item.max() < assets.vocab_size
    assert len(train) >= 64
    assert sorted(os.listdir(assets.data_dir)) == before
    assert len(list((tmp_path / "cache").glob("*_shuffle_idx.npy"))) == 3

    # The first unshuffled sample is the corpus itself, packed across documents.
    c = MMapCorpus(assets.prefix)
    j = int(np.flatnonzero(np.asarray(train.shuffle_idx) == 0)[0])
    stream = np.concatenate([c.get(int(d)) for d in train.doc_idx[:200]])
    np.testing.assert_array_equal(train[j]["text"], stream[: seq + 1])


def test_reuse_rebuild_and_determinism(tmp_path: Path, assets: DemoAssets) -> None:
    root = tmp_path / "a"
    first = build_demo_assets(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert build_demo_assets(root) == first
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # reused, not rewritten

    # Same bytes as the module fixture's build (another directory, earlier in this process).
    for rel in ("model/sentencepiece.bpe.model", "data/demo_corpus.bin", "data/demo_corpus.idx"):
        assert (root / rel).read_bytes() == (assets.model_dir.parent / rel).read_bytes()

    # A damaged file, a stale index cache and a stray dataset all force a clean rebuild.
    bin_path = root / "data" / "demo_corpus.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    (root / "data" / "index-cache").mkdir()
    (root / "data" / "index-cache" / "stale_doc_idx.npy").write_bytes(b"x")
    (root / "data" / "other.idx").write_bytes(b"")
    assert build_demo_assets(root) == first
    assert sorted(os.listdir(root / "data")) == ["demo_corpus.bin", "demo_corpus.idx"]
    MMapCorpus(root / "data" / CORPUS_PREFIX)
    assert not [p for p in root.iterdir() if p.name.startswith(".build-")]

    small = build_demo_assets(root, preset="small")
    assert json.loads((small.model_dir / "config.json").read_text())["hidden_size"] == 128


def test_fresh_process_builds_identical_bytes_without_paddle(tmp_path: Path, assets: DemoAssets) -> None:
    code = (
        "import sys; from bi150_ray.demo_assets import build_demo_assets; "
        f"build_demo_assets({str(tmp_path)!r}); "
        "assert 'paddle' not in sys.modules and 'paddlenlp' not in sys.modules, 'paddle imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)
    ours = json.loads((tmp_path / "demo_assets.json").read_text())["files"]
    theirs = json.loads((assets.model_dir.parent / "demo_assets.json").read_text())["files"]
    assert ours == theirs
