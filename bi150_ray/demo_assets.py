"""Offline assets for ``make demo``: a LLaMA tokenizer, a tiny LLaMA config and an mmap corpus.

Everything is built on the spot from text that ships with CPython (``pydoc_data``), so the
demo needs no model hub and no network. The layout mirrors what PaddleNLP's ``run_pretrain``
expects::

    <root>/model/   sentencepiece.bpe.model, tokenizer_config.json, special_tokens_map.json,
                    config.json   -> --model_name_or_path (tokenizer and config together)
    <root>/data/    demo_corpus.bin, demo_corpus.idx   -> --input_dir (exactly one prefix)
    <root>/demo_assets.json        stamp: parameters + file hashes, for cheap reuse

Paddle/PaddleNLP are imported only where a function needs them (the fallback tokenizer path).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bi150_ray.data.mmap_format import MMapCorpus, MMapWriter, best_dtype
from bi150_ray.hashing import sha256_file

if TYPE_CHECKING:
    import sentencepiece as spm

__all__ = [
    "CORPUS_PREFIX",
    "DEFAULT_VOCAB_SIZE",
    "MODEL_PRESETS",
    "SPECIAL_TOKENS",
    "SP_MODEL_FILE",
    "DemoAssets",
    "build_corpus_text",
    "build_demo_assets",
    "tokenize_to_mmap",
    "train_tokenizer",
    "write_model_config",
]

# Name PaddleNLP's LlamaTokenizer looks for (`resource_files_names["vocab_file"]`).
SP_MODEL_FILE = "sentencepiece.bpe.model"
CORPUS_PREFIX = "demo_corpus"
STAMP_FILE = "demo_assets.json"
# Bump when the recipe changes so existing asset directories are rebuilt.
RECIPE_VERSION = 1

# A multiple of 64 so every power-of-two tensor-parallel degree divides it: PaddleNLP shards the
# embedding/LM head only when vocab_size % tp == 0 and otherwise silently keeps them whole.
DEFAULT_VOCAB_SIZE = 3072
# LLaMA convention; pad reuses <unk> (id 0) as in LLaMA configs (pad_token_id=0).
SPECIAL_TOKENS = {"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2)}
# sentencepiece's own reservoir sampling is not reproducible across processes, so larger
# corpora are subsampled deterministically here instead.
MAX_TRAINING_LINES = 200_000

MODEL_PRESETS: dict[str, dict[str, int]] = {
    # 4 layers / 4 heads so the demo can exercise pp up to 4 and tp up to 4.
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4},
}


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo's inputs are; ``model_dir`` is run_pretrain's model_name_or_path."""

    model_dir: Path
    data_dir: Path
    prefix: Path  # data_dir / CORPUS_PREFIX, without .bin/.idx
    vocab_size: int
    n_docs: int
    n_tokens: int


def build_corpus_text() -> list[str]:
    """Paragraphs of CPython's help topics: offline, a few thousand documents, fixed order.

    Whole topics would give only ~80 documents (too few for a 949/50/1 split to leave a test
    set); paragraphs give ~2,600. Documents are stripped, as ``create_pretraining_data`` strips
    each document before tokenizing.
    """
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            if paragraph:
                docs.append(paragraph)
    return docs


def _training_lines(docs: Iterable[str]) -> list[str]:
    # One line per sentencepiece "sentence": the trainer must never see "\n", which then encodes
    # through byte fallback as <0x0A>, exactly like LLaMA's own tokenizer.
    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    if len(lines) > MAX_TRAINING_LINES:
        keep = np.random.RandomState(0).choice(len(lines), MAX_TRAINING_LINES, replace=False)
        lines = [lines[i] for i in np.sort(keep)]
    return lines


def train_tokenizer(
    docs: Iterable[str], out_dir: str | os.PathLike[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> Path:
    """Train a LLaMA-style sentencepiece BPE and save it as a PaddleNLP ``LlamaTokenizer`` dir.

    Trainer settings follow LLaMA's tokenizer (BPE, byte fallback, split digits, identity
    normalisation, whitespace kept) so decode(encode(text)) == text and nothing maps to <unk>.
    Deterministic for a given input and sentencepiece version. Returns the model file path.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines(docs)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=SPECIAL_TOKENS["unk"][1],
        bos_id=SPECIAL_TOKENS["bos"][1],
        eos_id=SPECIAL_TOKENS["eos"][1],
        pad_id=-1,
        unk_piece=SPECIAL_TOKENS["unk"][0],
        bos_piece=SPECIAL_TOKENS["bos"][0],
        eos_piece=SPECIAL_TOKENS["eos"][0],
        input_sentence_size=0,  # use every line given (already capped above)
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    model_path = out / SP_MODEL_FILE
    model_path.write_bytes(model.getvalue())

    special = {
        "bos_token": SPECIAL_TOKENS["bos"][0],
        "eos_token": SPECIAL_TOKENS["eos"][0],
        "unk_token": SPECIAL_TOKENS["unk"][0],
        "pad_token": SPECIAL_TOKENS["unk"][0],
    }
    # `tokenizer_class` is what AutoTokenizer reads first; without it it falls back to
    # config.json's model_type. The other keys are what LlamaTokenizer.save_pretrained writes.
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "sp_model_kwargs": None,
        "decode_with_prefix_space": False,
        "added_tokens_decoder": {},
        "padding_side": "left",
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special)
    return model_path


def write_model_config(out_dir: str | os.PathLike[str], vocab_size: int, preset: str = "tiny") -> Path:
    """Write a ``LlamaConfig`` ``config.json`` whose vocab matches the tokenizer exactly.

    No Megatron-style vocab padding: PaddleNLP sizes the embedding from ``vocab_size`` as is,
    so the tokenizer's vocab is chosen divisible instead (see DEFAULT_VOCAB_SIZE).
    """
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
    dims = MODEL_PRESETS[preset]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        **dims,
        "num_key_value_heads": dims["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "seq_length": 128,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "rope_theta": 10000.0,
        "bos_token_id": SPECIAL_TOKENS["bos"][1],
        "eos_token_id": SPECIAL_TOKENS["eos"][1],
        "pad_token_id": SPECIAL_TOKENS["unk"][1],
        "tie_word_embeddings": False,
    }
    path = Path(out_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, config)
    return path


def _has_special_text(text: str) -> bool:
    return any(tok in text for tok, _ in SPECIAL_TOKENS.values())


def _paddlenlp_ids(tokenizer_dir: Path) -> Callable[[str], list[int]]:
    from paddlenlp.transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    return lambda text: tok.convert_tokens_to_ids(tok.tokenize(text))


def _encode_docs(
    docs: Iterable[str], sp: spm.SentencePieceProcessor, tokenizer_dir: Path, batch: int = 1024
) -> Iterator[list[int]]:
    """Token ids of each stripped document, as ``create_pretraining_data`` computes them.

    PaddleNLP calls ``tokenize`` + ``convert_tokens_to_ids`` (no BOS); for our tokenizer that is
    exactly ``sp.encode`` unless the text contains a special-token string such as ``</s>``,
    which PaddleNLP splits out as one id. Those rare documents go through PaddleNLP itself.
    """
    slow = None
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal slow
        fast = sp.encode([t for t in pending if not _has_special_text(t)])
        it = iter(fast)
        for text in pending:
            if _has_special_text(text):
                slow = slow or _paddlenlp_ids(tokenizer_dir)
                yield slow(text)
            else:
                yield next(it)
        pending.clear()

    for doc in docs:
        pending.append(doc.strip())
        if len(pending) >= batch:
            yield from flush()
    yield from flush()


def tokenize_to_mmap(
    docs: Iterable[str], tokenizer_dir: str | os.PathLike[str], prefix: str | os.PathLike[str]
) -> tuple[int, int]:
    """Write ``<prefix>.bin/.idx`` the way ``create_pretraining_data --append_eos`` does for LLaMA.

    One sequence per document, EOS appended, no BOS; documents that tokenize to nothing are
    skipped (PaddleNLP drops them too). Returns ``(n_docs, n_tokens)`` actually written.
    """
    import sentencepiece as spm

    tokenizer_dir = Path(tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / SP_MODEL_FILE))
    eos = sp.eos_id()
    with MMapWriter(prefix, best_dtype(sp.get_piece_size())) as writer:
        for ids in _encode_docs(docs, sp, tokenizer_dir):
            if ids:
                writer.add_document([*ids, eos])
        return writer.n_docs, writer.n_tokens


def _piece_size(model_file: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)




def _text_hash(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _reusable(root: Path, params: dict[str, object]) -> DemoAssets | None:
    """The existing assets if the stamp matches ``params`` and every file still has its hash."""
    try:
        stamp = json.loads((root / STAMP_FILE).read_text(encoding="utf-8"))
        if stamp.get("params") != params:
            return None
        for rel, digest in stamp["files"].items():
            if sha256_file(root / rel) != digest:
                return None
        data_dir = root / "data"
        # run_pretrain takes every *.idx in input_dir as a dataset: there must be only ours.
        if sorted(p.name for p in data_dir.iterdir() if p.is_file()) != [
            f"{CORPUS_PREFIX}.bin",
            f"{CORPUS_PREFIX}.idx",
        ]:
            return None
        return DemoAssets(
            model_dir=root / "model",
            data_dir=data_dir,
            prefix=data_dir / CORPUS_PREFIX,
            vocab_size=int(stamp["vocab_size"]),
            n_docs=int(stamp["n_docs"]),
            n_tokens=int(stamp["n_tokens"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_demo_assets(
    root: str | os.PathLike[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    preset: str = "tiny",
    force: bool = False,
) -> DemoAssets:
    """Build (or reuse) the demo's model dir and corpus under ``root``.

    ``root/model`` and ``root/data`` belong to this function: a rebuild replaces them whole,
    which also drops ``data/index-cache`` -- PaddleNLP keys that cache on the prefix path and
    sample counts only, so a cache left over from an older corpus would be silently reused.
    Safe to call from several processes at once (a lock file serialises them).
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    docs = build_corpus_text()
    params: dict[str, object] = {
        "recipe": RECIPE_VERSION,
        "vocab_size": vocab_size,
        "preset": preset,
        "corpus_sha256": _text_hash(docs),
    }
    with open(root / ".demo_assets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and (assets := _reusable(root, params)) is not None:
            return assets

        t0 = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            model_dir, data_dir = build / "model", build / "data"
            data_dir.mkdir()
            sp_model = train_tokenizer(docs, model_dir, vocab_size)
            actual_vocab = _piece_size(sp_model)
            if actual_vocab != vocab_size:
                raise RuntimeError(f"sentencepiece produced {actual_vocab} pieces, asked for {vocab_size}")
            write_model_config(model_dir, vocab_size, preset)
            n_docs, n_tokens = tokenize_to_mmap(docs, model_dir, data_dir / CORPUS_PREFIX)
            MMapCorpus(data_dir / CORPUS_PREFIX)  # validate before publishing

            (root / STAMP_FILE).unlink(missing_ok=True)
            for name in ("model", "data"):
                if (root / name).exists():
                    shutil.rmtree(root / name)
                os.replace(build / name, root / name)
        finally:
            shutil.rmtree(build, ignore_errors=True)

        files = sorted(p for d in ("model", "data") for p in (root / d).iterdir() if p.is_file())
        stamp = {
            "params": params,
            "vocab_size": vocab_size,
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "files": {str(p.relative_to(root)): sha256_file(p) for p in files},
        }
        _write_json(root / STAMP_FILE, stamp)  # written last: its presence means "complete"
        return DemoAssets(
            model_dir=root / "model",
            data_dir=root / "data",
            prefix=root / "data" / CORPUS_PREFIX,
            vocab_size=vocab_size,
            n_docs=n_docs,
            n_tokens=n_tokens,
        )
