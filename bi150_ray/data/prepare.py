"""Tokenize raw text into one PaddleNLP ``.bin``/``.idx`` corpus with parallel Ray tasks.

What PaddleNLP's ``llm/tools/preprocess/create_pretraining_data.py`` does for the LLaMA recipe
(``--append_eos``, no sentence splitting), but split into shards that Ray tasks tokenize in
parallel, resumable, and with one clear error for bad input:

* each document: collapse runs of more than ``max_repeated_len`` identical characters to one
  (PaddleNLP's ``remove_repeated_chars``), strip, ``tokenize`` + ``convert_tokens_to_ids``
  (no BOS), append EOS; documents that tokenize to nothing are dropped;
* inputs are sorted by path (PaddleNLP sorts its file list) and cut into shards (byte ranges
  that end at a line -- or paragraph -- boundary for text files, row-group ranges for parquet);
* a Ray task (``num_cpus=1``) writes each shard's ``shard-NNNNN.bin/.idx`` in a work directory
  beside the output, then a ``.done`` marker; a rerun skips every shard whose marker matches the
  same inputs and settings;
* the driver concatenates the shards in order (stream copy of ``.bin`` bytes, concatenated sizes)
  and renames the result into place, ``.bin`` first and ``.idx`` last, so an interrupted run never
  leaves a pair that looks complete.

The output depends only on the inputs and settings -- not on worker count or shard size.

Input formats:

* ``jsonl`` (``.jsonl``/``.json``): one JSON object per line, text under ``json_key``; blank
  lines are skipped (PaddleNLP would fail on them).
* ``parquet``: one document per row of the string column ``parquet_column``.
* ``text`` (``.txt``): ``text_mode="line"`` (default) makes every non-blank line a document;
  ``text_mode="paragraph"`` makes every run of non-blank lines a document (documents separated
  by one or more blank lines, newlines inside a document kept).

Tokenizer: a local PaddleNLP tokenizer directory (``AutoTokenizer.from_pretrained(dir)``,
exactly what ``create_pretraining_data`` calls) or a sentencepiece ``.model`` file (encoded
with sentencepiece directly; its EOS id is appended; special-token strings in the text are not
split out as PaddleNLP would).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bi150_ray.data.mmap_format import MAGIC, VERSION, MMapCorpus, MMapWriter, best_dtype, dtype_code
from bi150_ray.hashing import sha256_file

__all__ = [
    "PrepareConfig",
    "PrepareError",
    "PrepareResult",
    "Shard",
    "local_ray",
    "plan_shards",
    "prepare",
    "run",
    "task_options",
    "tokenize_shard",
    "validate",
]

Format = Literal["auto", "jsonl", "parquet", "text"]
EXTENSIONS: dict[str, str] = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}
MARKER_VERSION = 1
# Tokenizer files above this size (model weights in a model dir) are fingerprinted by size and
# mtime instead of content, so pointing at a full checkpoint dir does not hash gigabytes.
_HASH_LIMIT = 64 << 20
_COPY_CHUNK = 8 << 20
_INDEX_CHUNK = 1 << 22


class PrepareError(ValueError):
    """Input, tokenizer or output problem for ``prepare``; the message names the file and the fix."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything ``prepare`` needs; defaults follow the LLaMA recipe of ``create_pretraining_data``."""

    inputs: tuple[str, ...]  # files, globs or directories (searched recursively for known extensions)
    tokenizer: str  # PaddleNLP tokenizer directory or sentencepiece .model file
    output_prefix: str  # writes <prefix>.bin and <prefix>.idx
    input_format: Format = "auto"  # auto: from the extension (.jsonl/.json, .parquet, .txt)
    json_key: str = "text"
    parquet_column: str = "text"
    text_mode: Literal["line", "paragraph"] = "line"
    append_eos: bool = True
    max_repeated_len: int | None = 100  # PaddleNLP's default; None keeps text as is
    shard_bytes: int = 64 << 20  # target input bytes per shard (parquet: uncompressed row groups)
    workers: int | None = None  # tokenizing tasks in flight; None: as many as Ray will schedule
    spread: bool = False  # let tasks run on any node (paths must then be on storage every node sees)
    work_dir: str | None = None  # default: <output_prefix>.prepare beside the output
    keep_work: bool = False  # keep the shard files after the merge
    overwrite: bool = False  # replace an existing <prefix>.bin/.idx
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            object.__setattr__(self, "inputs", (self.inputs,))
        else:
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.inputs:
            raise PrepareError("no inputs given: pass one or more files, globs or directories")
        if self.shard_bytes < 1:
            raise PrepareError(f"shard_bytes must be positive, got {self.shard_bytes}")
        if self.workers is not None and self.workers < 1:
            raise PrepareError(f"workers must be at least 1, got {self.workers}")
        if self.input_format not in ("auto", "jsonl", "parquet", "text"):
            raise PrepareError(f"unknown input format {self.input_format!r}; use jsonl, parquet or text")
        if self.text_mode not in ("line", "paragraph"):
            raise PrepareError(f"unknown text mode {self.text_mode!r}; use line or paragraph")

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_prefix + ".prepare")


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``[start, end)`` bytes of a text/jsonl file or row groups of a parquet file.

    ``size``/``mtime_ns`` identify the file version, so a marker from an edited file is not reused.
    """

    index: int
    path: str
    fmt: str
    start: int
    end: int
    size: int
    mtime_ns: int
    row_offset: int = 0  # parquet: global row number of the first row (for error messages)

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass
class PrepareResult:
    """What was written, and how much of it this run tokenized (the rest came from markers)."""

    prefix: str
    n_docs: int
    n_tokens: int
    dtype: str
    shards: int
    shards_tokenized: int
    shards_reused: int
    seconds: float
    skipped_docs: int = 0
    nodes: int = 0  # Ray nodes whose tasks tokenized this run's shards
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Inputs and shards (driver side)


def expand_inputs(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """Absolute ``(path, format)`` of every input file, sorted by path, duplicates dropped."""
    found: set[str] = set()
    out_files = {os.path.abspath(cfg.output_prefix + ext) for ext in (".bin", ".idx")}
    work = os.path.abspath(cfg.work_path)
    for spec in cfg.inputs:
        p = Path(spec).expanduser()
        if p.is_dir():  # our own output and work files are not inputs, even in the same folder
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) != work]
                for f in files:
                    path = os.path.abspath(os.path.join(root, f))
                    if f.startswith(".") or path in out_files:
                        continue
                    if cfg.input_format != "auto" or Path(f).suffix in EXTENSIONS:
                        found.add(path)
        elif p.is_file():
            found.add(os.path.abspath(p))
        elif glob.has_magic(spec):
            matches = [m for m in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(m)]
            if not matches:
                raise PrepareError(f"{spec}: the pattern matches no files")
            found.update(os.path.abspath(m) for m in matches)
        else:
            raise PrepareError(f"{spec}: no such file or directory")
    if not found:
        raise PrepareError(f"no input files with a known extension {sorted(EXTENSIONS)} under {list(cfg.inputs)}")
    result = []
    for path in sorted(found):
        if path in out_files:
            raise PrepareError(f"{path} is both an input and the output; choose another output prefix")
        if cfg.input_format != "auto":
            result.append((path, cfg.input_format))
        elif Path(path).suffix in EXTENSIONS:
            result.append((path, EXTENSIONS[Path(path).suffix]))
        else:
            raise PrepareError(
                f"{path}: cannot tell the format from the extension; name it .jsonl, .parquet or .txt "
                "or pass the format explicitly (--format)"
            )
    return result


def _next_line_start(fh: Any, pos: int) -> int:
    """First line start at or after ``pos``."""
    if pos <= 0:
        return 0
    fh.seek(pos - 1)
    return pos - 1 + len(fh.readline())


def _next_paragraph_start(fh: Any, pos: int) -> int:
    """Position just after the first blank line at or after the line start ``pos``."""
    fh.seek(pos)
    while line := fh.readline():
        pos += len(line)
        if not line.strip():
            return pos
    return pos


def _text_boundaries(path: str, size: int, shard_bytes: int, paragraphs: bool) -> list[int]:
    cuts = [0]
    with open(path, "rb") as fh:
        target = shard_bytes
        while target < size:
            cut = _next_line_start(fh, target)
            if paragraphs and cut < size:
                cut = _next_paragraph_start(fh, cut)
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            target = max(cut, target) + shard_bytes
    cuts.append(size)
    return cuts


def _parquet_file(path: str, column: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise PrepareError(f"{path}: not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    if column not in schema.names:
        raise PrepareError(
            f"{path}: no column {column!r} (columns: {schema.names}); pass the text column with --column"
        )
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise PrepareError(f"{path}: column {column!r} has type {typ}, expected a string column")
    return pf


def plan_shards(cfg: PrepareConfig, files: Sequence[tuple[str, str]] | None = None) -> list[Shard]:
    """Cut the inputs into shards, deterministically from the files and ``shard_bytes`` alone."""
    shards: list[Shard] = []
    for path, fmt in files if files is not None else expand_inputs(cfg):
        st = os.stat(path)
        if fmt == "parquet":
            pf = _parquet_file(path, cfg.parquet_column)
            meta = pf.metadata
            group_start, acc, rows, first_row = 0, 0, 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                rows += meta.row_group(g).num_rows
                if acc >= cfg.shard_bytes or g == meta.num_row_groups - 1:
                    shards.append(Shard(len(shards), path, fmt, group_start, g + 1, st.st_size, st.st_mtime_ns, first_row))
                    group_start, acc, first_row = g + 1, 0, rows
            continue
        if st.st_size == 0:
            continue
        cuts = _text_boundaries(path, st.st_size, cfg.shard_bytes, fmt == "text" and cfg.text_mode == "paragraph")
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            shards.append(Shard(len(shards), path, fmt, lo, hi, st.st_size, st.st_mtime_ns))
    return shards


# ---------------------------------------------------------------------------------------------
# Tokenizer (worker side; one per worker process)

_ENCODERS: dict[str, _Encoder] = {}


class _Encoder:
    """Token ids of one stripped document, as ``create_pretraining_data`` computes them."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
                raise PrepareError(
                    f"{path}: no tokenizer_config.json; pass a PaddleNLP tokenizer directory "
                    "(save_pretrained output) or a sentencepiece .model file"
                )
            from paddlenlp.transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as exc:  # PaddleNLP raises many types for a broken directory
                raise PrepareError(f"{path}: PaddleNLP could not load this tokenizer ({exc})") from exc
            self._tok = tok
            self.kind = "paddlenlp"
            self.eos_id: int | None = tok.eos_token_id
            # PaddleNLP decides the dtype on vocab_size alone; added tokens can lie above it.
            self.vocab_size = max(int(tok.vocab_size), len(tok))
        else:
            import sentencepiece as spm

            try:
                # One thread: a task holds one CPU (batch encode would otherwise use every core).
                sp = spm.SentencePieceProcessor(model_file=path, num_threads=1)
            except (OSError, RuntimeError) as exc:
                raise PrepareError(f"{path}: not a sentencepiece model ({exc})") from exc
            self._sp = sp
            self.kind = "sentencepiece"
            self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
            self.vocab_size = sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self._sp.encode(texts)
        tok = self._tok
        return [tok.convert_tokens_to_ids(tok.tokenize(t)) for t in texts]


def _encoder(path: str) -> _Encoder:
    """The cached tokenizer of this worker process; reloaded if its files changed since."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    key = path + repr([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    enc = _ENCODERS.get(key)
    if enc is None:
        enc = _ENCODERS[key] = _Encoder(path)
    return enc


def tokenizer_info(path: str) -> dict[str, Any]:
    """Vocabulary size, EOS id and kind of the tokenizer at ``path`` (loads and caches it).

    Run as a Ray task it also warms a worker; a load failure comes back as ``{"error": ...}``.
    """
    try:
        enc = _encoder(path)
    except PrepareError as exc:
        return {"error": str(exc)}
    return {"vocab_size": enc.vocab_size, "eos_id": enc.eos_id, "kind": enc.kind}


def probe_node(tokenizer: str, paths: Sequence[str]) -> dict[str, Any]:
    """``tokenizer_info`` on the node this runs on, which paths it cannot see, and which node it is."""
    import ray

    info = tokenizer_info(tokenizer)
    info["missing"] = [p for p in paths if not os.path.exists(p)]
    info["node"] = f"{ray.util.get_node_ip_address()} ({_ray_node_id()[:8]})"
    return info


def tokenizer_fingerprint(path: str) -> dict[str, str]:
    """Content hashes of the tokenizer's files, so a marker made with another tokenizer is redone."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    out = {}
    for f in files:
        st = f.stat()
        rel = str(f.relative_to(p)) if p.is_dir() else f.name
        out[rel] = sha256_file(f) if st.st_size <= _HASH_LIMIT else f"size={st.st_size},mtime_ns={st.st_mtime_ns}"
    return out


# ---------------------------------------------------------------------------------------------
# Reading documents


def _line_number(path: str, offset: int) -> int:
    n = 1
    with open(path, "rb") as fh:
        left = offset
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _decode(raw: bytes, shard: Shard, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrepareError(
            f"{shard.path}:{_line_number(shard.path, offset)}: not valid UTF-8 ({exc.reason} at column {exc.start + 1})"
        ) from None


def _lines(shard: Shard) -> Iterator[tuple[int, bytes]]:
    with open(shard.path, "rb") as fh:
        fh.seek(shard.start)
        pos = shard.start
        while pos < shard.end:
            raw = fh.readline()
            if not raw:
                break
            yield pos, raw
            pos += len(raw)


def _jsonl_docs(shard: Shard, key: str) -> Iterator[str]:
    for pos, raw in _lines(shard):
        if not raw.strip():
            continue
        line = _decode(raw, shard, pos)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrepareError(
                f"{shard.path}:{_line_number(shard.path, pos)}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise PrepareError(
                f"{shard.path}:{_line_number(shard.path, pos)}: no key {key!r} (found {keys}); "
                "pass the text key with --json-key"
            )
        text = obj[key]
        if not isinstance(text, str):
            raise PrepareError(
                f"{shard.path}:{_line_number(shard.path, pos)}: {key!r} is {type(text).__name__}, expected a string"
            )
        yield text


def _text_docs(shard: Shard, paragraphs: bool) -> Iterator[str]:
    para: list[str] = []
    for pos, raw in _lines(shard):
        if not raw.strip():
            if para:
                yield "".join(para)
                para = []
            continue
        line = _decode(raw, shard, pos)
        if paragraphs:
            para.append(line)
        else:
            yield line
    if para:
        yield "".join(para)


def _parquet_docs(shard: Shard, column: str) -> Iterator[str]:
    pf = _parquet_file(shard.path, column)
    row = shard.row_offset
    for batch in pf.iter_batches(batch_size=4096, row_groups=range(shard.start, shard.end), columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise PrepareError(f"{shard.path}: row {row} has no {column!r} value (null)")
            row += 1
            yield text


def iter_documents(shard: Shard, cfg: PrepareConfig) -> Iterator[str]:
    """The raw texts of ``shard``, in file order (PrepareError names file and line on bad input)."""
    if shard.fmt == "jsonl":
        return _jsonl_docs(shard, cfg.json_key)
    if shard.fmt == "parquet":
        return _parquet_docs(shard, cfg.parquet_column)
    return _text_docs(shard, cfg.text_mode == "paragraph")


# ---------------------------------------------------------------------------------------------
# One shard


def _settings(cfg: PrepareConfig, info: dict[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """Everything besides the input bytes that changes a shard's output."""
    return {
        "marker_version": MARKER_VERSION,
        "tokenizer": tokenizer_fingerprint(cfg.tokenizer),
        "tokenizer_kind": info["kind"],
        "eos_id": info["eos_id"],
        "dtype": str(dtype),
        "append_eos": cfg.append_eos,
        "max_repeated_len": cfg.max_repeated_len,
        "json_key": cfg.json_key,
        "parquet_column": cfg.parquet_column,
        "text_mode": cfg.text_mode,
    }


def _marker_path(work: Path, shard: Shard) -> Path:
    return work / f"{shard.name}.done"


def read_marker(work: Path, shard: Shard, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's marker if it records this exact shard and settings and its files are intact."""
    try:
        marker = json.loads(_marker_path(work, shard).read_text(encoding="utf-8"))
        if marker.get("shard") != asdict(shard) or marker.get("settings") != settings:
            return None
        bin_path, idx_path = work / f"{shard.name}.bin", work / f"{shard.name}.idx"
        if bin_path.stat().st_size != marker["bin_bytes"] or not idx_path.is_file():
            return None
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def tokenize_shard(shard: Shard, cfg: PrepareConfig, settings: dict[str, Any], work: str) -> dict[str, Any]:
    """Tokenize one shard into ``work/shard-NNNNN.bin/.idx`` and write its ``.done`` marker last.

    Returns the marker, or ``{"error": message}`` for bad input (a message, not an exception,
    so the driver can raise one clean PrepareError instead of a Ray traceback).
    """
    work_dir = Path(work)
    cpu0 = time.process_time()
    try:
        enc = _encoder(cfg.tokenizer)
        eos = enc.eos_id
        repeat = re.compile(r"(.)\1{" + str(cfg.max_repeated_len) + ",}") if cfg.max_repeated_len else None
        dtype = np.dtype(settings["dtype"])
        skipped = 0
        batch: list[str] = []
        with MMapWriter(work_dir / shard.name, dtype) as writer:

            def flush() -> None:
                nonlocal skipped
                for ids in enc.encode(batch):
                    if not ids:
                        skipped += 1
                        continue
                    if cfg.append_eos:
                        ids = [*ids, eos]
                    writer.add_document(ids)
                batch.clear()

            for text in iter_documents(shard, cfg):
                if repeat is not None:
                    text = repeat.sub(r"\1", text)
                batch.append(text.strip())
                if len(batch) >= 512:
                    flush()
            flush()
            n_docs, n_tokens = writer.n_docs, writer.n_tokens
    except PrepareError as exc:
        return {"error": str(exc)}
    marker = {
        "shard": asdict(shard),
        "settings": settings,
        "n_docs": n_docs,
        "n_tokens": n_tokens,
        "skipped_docs": skipped,
        "bin_bytes": (work_dir / f"{shard.name}.bin").stat().st_size,
        "cpu_seconds": time.process_time() - cpu0,  # this process's CPU for the shard (benchmarks)
        "node_id": _ray_node_id(),  # which Ray node tokenized it (--spread)
    }
    path = _marker_path(work_dir, shard)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    tmp.write_text(json.dumps(marker), encoding="utf-8")
    os.replace(tmp, path)
    return marker


# ---------------------------------------------------------------------------------------------
# Merge


def merge_shards(shard_prefixes: Sequence[Path], output_prefix: str, dtype: np.dtype) -> tuple[int, int]:
    """Concatenate shard corpora in order into ``output_prefix``; renamed into place only when whole.

    ``.bin`` is a byte copy; the ``.idx`` is rebuilt from the concatenated sizes (pointers re-based,
    ``doc_idx = 0..N``), exactly what PaddleNLP's builder writes for one sequence per document.
    """
    corpora = [MMapCorpus(p, verify_pointers=False) for p in shard_prefixes]
    for c in corpora:
        if c.dtype != dtype:
            raise PrepareError(f"{c.idx_path}: dtype {c.dtype}, expected {dtype}; delete the work directory and rerun")
    n = sum(len(c) for c in corpora)
    out_bin, out_idx = Path(output_prefix + ".bin"), Path(output_prefix + ".idx")
    base = out_bin.name[: -len(".bin")]
    tag = secrets.token_hex(6)
    tmp_bin = out_bin.with_name(f".{base}.{tag}.bin-partial")
    tmp_idx = out_bin.with_name(f".{base}.{tag}.index-partial")
    try:
        total = 0
        with open(tmp_bin, "wb") as dst:
            for c in corpora:
                with open(c.bin_path, "rb") as src:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
            total = dst.tell()
        with open(tmp_idx, "wb") as f:
            f.write(struct.pack("<9sQBQQ", MAGIC, VERSION, dtype_code(dtype), n, n + 1))
            for c in corpora:
                f.write(np.ascontiguousarray(c.sizes, dtype="<i4").tobytes())
            offset = 0
            for c in corpora:
                for lo in range(0, len(c), _INDEX_CHUNK):
                    nbytes = c.sizes[lo : lo + _INDEX_CHUNK].astype(np.int64) * dtype.itemsize
                    pointers = np.empty(len(nbytes), dtype="<i8")
                    pointers[0] = 0
                    np.cumsum(nbytes[:-1], out=pointers[1:])
                    pointers += offset
                    offset += int(nbytes.sum())
                    f.write(pointers.tobytes())
            for lo in range(0, n + 1, _INDEX_CHUNK):
                f.write(np.arange(lo, min(lo + _INDEX_CHUNK, n + 1), dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        if offset != total:
            raise PrepareError(f"merged {total} bytes but the shard sizes add up to {offset}; rerun")
        out_idx.unlink(missing_ok=True)  # a stale .idx must never describe the new .bin
        os.replace(tmp_bin, out_bin)
        os.replace(tmp_idx, out_idx)
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return n, offset // dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Driver


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[str]:
    """A one-node Ray on 127.0.0.1 with free agent ports (see ``bi150_ray.demo``), for the CLI.

    Yields its address, so other processes (``jobs/prepare_data.py`` in tests) can join it.
    """
    import ray

    from bi150_ray.demo import loopback_cluster

    with loopback_cluster(head_cpus=num_cpus or os.cpu_count() or 1) as cluster:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster.address


def _check_tokenizer_path(path: str) -> None:
    if not os.path.exists(path):
        raise PrepareError(f"{path}: tokenizer not found; pass a PaddleNLP tokenizer directory or a .model file")


def _check_output(cfg: PrepareConfig) -> None:
    out_dir = Path(cfg.output_prefix).parent
    if not out_dir.is_dir():
        raise PrepareError(f"{out_dir}: output directory does not exist; create it first")
    if Path(cfg.output_prefix).name in ("", ".", ".."):
        raise PrepareError(f"{cfg.output_prefix!r}: output prefix needs a file name, e.g. data/corpus")
    if not cfg.overwrite:
        for ext in (".bin", ".idx"):
            if os.path.exists(cfg.output_prefix + ext):
                raise PrepareError(f"{cfg.output_prefix + ext} already exists; pass --overwrite to replace it")


def _absolute(cfg: PrepareConfig) -> PrepareConfig:
    # Ray workers do not share the driver's working directory.
    return replace(
        cfg,
        tokenizer=os.path.abspath(os.path.expanduser(cfg.tokenizer)),
        output_prefix=os.path.abspath(os.path.expanduser(cfg.output_prefix)),
        work_dir=os.path.abspath(os.path.expanduser(cfg.work_dir)) if cfg.work_dir else None,
    )


def validate(cfg: PrepareConfig) -> list[tuple[str, str]]:
    """The cheap checks (inputs exist, tokenizer path, output free), before any Ray is started."""
    cfg = _absolute(cfg)
    _check_tokenizer_path(cfg.tokenizer)
    _check_output(cfg)
    return expand_inputs(cfg)


def run(cfg: PrepareConfig, address: str | None = None, num_cpus: int | None = None) -> PrepareResult:
    """``prepare`` on the Ray cluster at ``address``, or on a private local one when it is None."""
    import ray

    validate(cfg)
    if ray.is_initialized():
        return prepare(cfg)
    if address is None:
        with local_ray(num_cpus):
            return prepare(cfg)
    ray.init(address=address, log_to_driver=False)
    try:
        return prepare(cfg)
    finally:
        ray.shutdown()


def task_options(cfg: PrepareConfig) -> dict[str, Any]:
    """Ray options of the probe and shard tasks (the same, so the probe's warm worker is reused).

    Nice 0: Ray starts workers at nice 15, which on a busy node gives a task a fraction of the CPU
    a shell-started ``create_pretraining_data`` gets (the same trap as ranks; DESIGN-NOTES).
    Without ``spread`` the tasks stay on the driver's node, where the input paths were checked.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from bi150_ray.cluster import NICE_0

    options: dict[str, Any] = {
        "num_cpus": 1,
        "max_retries": 0,
        "runtime_env": NICE_0,
    }
    if not cfg.spread:
        node = ray.get_runtime_context().get_node_id()
        cpus = next((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
        if cpus < 1:  # the tasks would wait forever
            raise PrepareError(
                "the Ray node running this driver has no CPUs for tokenizing tasks; pass --spread "
                "(inputs, tokenizer and output on storage every node sees) or run the driver on a worker node"
            )
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return options


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Tokenize ``cfg.inputs`` into ``cfg.output_prefix``.bin/.idx on the connected Ray cluster."""
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg = _absolute(cfg)
    _check_tokenizer_path(cfg.tokenizer)
    _check_output(cfg)
    shards = plan_shards(cfg)
    if not shards:
        raise PrepareError(f"empty corpus: every input file is empty ({list(cfg.inputs)})")
    if not ray.is_initialized():
        raise RuntimeError("prepare() needs a Ray connection (ray.init or local_ray())")

    options = task_options(cfg)
    probe = ray.remote(probe_node)
    task = ray.remote(tokenize_shard).options(**options)

    seen = [cfg.tokenizer, *cfg.inputs, os.path.dirname(cfg.output_prefix)]
    if cfg.spread:
        # Every node that may run a shard: it must see the same files and load the same tokenizer.
        # Also warms one worker per node, so shards start everywhere at once instead of all going
        # to the one warm worker while the others are still starting.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) >= 1]
        pinned = [NodeAffinitySchedulingStrategy(node_id=n, soft=False) for n in nodes]
        refs = [probe.options(**options, scheduling_strategy=p).remote(cfg.tokenizer, seen) for p in pinned]
    else:
        refs = [probe.options(**options).remote(cfg.tokenizer, seen)]
    infos = ray.get(refs)
    for i in infos:
        where = f"node {i['node']}: " if cfg.spread else ""
        if "error" in i:
            raise PrepareError(where + i["error"])
        if i["missing"]:
            raise PrepareError(f"{where}{i['missing'][0]} does not exist there; --spread needs the inputs, tokenizer "
                               "and output folder on storage every node sees (same paths)")
    if len({(i["vocab_size"], i["eos_id"], i["kind"]) for i in infos}) > 1:
        sizes = ", ".join(f"{i['node']}: vocab {i['vocab_size']}, eos {i['eos_id']}" for i in infos)
        raise PrepareError(f"{cfg.tokenizer}: the tokenizer differs between nodes ({sizes}); give every node the same files")
    info = infos[0]
    if cfg.append_eos and info["eos_id"] is None:
        raise PrepareError(f"{cfg.tokenizer}: the tokenizer has no EOS token; set one or pass --no-append-eos")
    dtype = best_dtype(info["vocab_size"])
    settings = _settings(cfg, info, dtype)

    work = cfg.work_path
    work.mkdir(parents=True, exist_ok=True)
    markers: dict[int, dict[str, Any]] = {}
    todo = []
    for s in shards:
        m = read_marker(work, s, settings)
        if m is not None:
            markers[s.index] = m
        else:
            todo.append(s)
    reused = len(markers)
    tokenized = {s.index for s in todo}

    bar = tqdm(total=len(shards), initial=reused, unit="shard", desc="tokenize", disable=not cfg.progress)
    cfg_ref = ray.put(cfg)
    limit = cfg.workers or len(todo) or 1
    pending: dict[Any, Shard] = {}
    queue = list(todo)
    errors: list[str] = []
    task_cpu = 0.0
    try:
        while queue or pending:
            while queue and len(pending) < limit and not errors:
                s = queue.pop(0)
                pending[task.remote(s, cfg_ref, settings, str(work))] = s
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                shard = pending.pop(ref)
                result = ray.get(ref)
                if "error" in result:
                    errors.append(result["error"])
                    continue
                markers[shard.index] = result
                task_cpu += result["cpu_seconds"]
                bar.update(1)
                bar.set_postfix(tokens=f"{sum(m['n_tokens'] for m in markers.values()):,}")
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
    if errors:
        raise PrepareError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more bad shards)")

    n_docs = sum(m["n_docs"] for m in markers.values())
    if n_docs == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise PrepareError(f"empty corpus: no document in {list(cfg.inputs)} has any tokens")
    if not cfg.overwrite:
        _check_output(cfg)  # someone may have written it meanwhile
    n, n_tokens = merge_shards([work / s.name for s in shards], cfg.output_prefix, dtype)
    MMapCorpus(cfg.output_prefix)  # full check of what we publish
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(
        prefix=cfg.output_prefix,
        n_docs=n,
        n_tokens=n_tokens,
        dtype=str(dtype),
        shards=len(shards),
        shards_tokenized=len(todo),
        shards_reused=reused,
        seconds=time.perf_counter() - t0,
        skipped_docs=sum(m.get("skipped_docs", 0) for m in markers.values()),
        nodes=len({m.get("node_id") for i, m in markers.items() if i in tokenized}),
        extra={"task_cpu_seconds": round(task_cpu, 3)},
    )
