"""Merge a PaddleNLP (non-unified) checkpoint's tp/pp model shards into one loadable model directory.

A hybrid-parallel run saves `model_state.<suffix>.pdparams` per tensor/pipeline shard, where the suffix
is `tpXX`, `ppYY` or `tpXX_ppYY` (PaddleNLP `TrainingArguments.weight_name_suffix`). Pipeline shards
already hold single-model names (`PipelinePretrainedModel.state_dict` remaps `3.self_attn...` to
`llama.layers.2.self_attn...`), so pp merging is a union. Tensor shards are concatenated with
PaddleNLP's own `_get_tensor_parallel_mappings(config, is_split=False)`, exactly as upstream
`llm/tools/merge_tp_and_pp_params.py` does, so which tensors are split and along which axis always
matches the installed PaddleNLP.

The output is a sharded safetensors directory (`model-0000i-of-0000N.safetensors` +
`model.safetensors.index.json` + a `config.json` for the non-pipeline class) that
`LlamaForCausalLM.from_pretrained(dir)` loads. It is written under a temporary name with the same
checksum manifest and completion marker as `gather.py` and renamed at the end, so a failed merge
leaves nothing that looks finished.

Pipeline (merge_checkpoint): each shard file is memory-mapped and unpickled so that its arrays are
views of the mapping (`_load_shard`); tp splits that are plain concatenations stay as their parts
(`Concat`); the background writer writes axis-0 parts back to back and joins other axes into one
reused buffer, hashing each chunk while writing it. No merged tensor is built in fresh memory.

`.pdparams` files are pickles: only ever merge checkpoints from our own run storage, and do not
modify them during a merge (the arrays are mapped from the files).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import mmap
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from bi150_ray.checkpoint.gather import COMPLETE_MARKER, INDEX, MANIFEST, SIDE_FILES

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_IO_THREADS = 4  # parallel shard reads; file I/O, memcpy and sha256 release the GIL
# Pickle bookkeeping entry paddle.save adds to state dicts; not a tensor.
_STRUCTURED_KEY = "StructuredToParameterName@@"
_LAYER_RE = re.compile(r"^llama\.layers\.(\d+)\.(.+)$")
_SHARD_NAME_RE = re.compile(r"^model_state(?:\.(?P<suffix>[^.]+))?\.pdparams$")
_PART_RE = re.compile(r"^(tp|pp)(\d{2,})$")
_PP_ARCH_SUFFIX = "Pipe"
_SUPPORTED_ARCHS = ("LlamaForCausalLM", "LlamaForCausalLMPipe")
_FUSE_FLAGS = ("fuse_attention_qkv", "fuse_attention_ffn")


class MergeError(RuntimeError):
    """The checkpoint cannot be merged; the message names the file (and key) at fault."""


@dataclass(frozen=True)
class ShardSet:
    """The model shard files of one checkpoint folder, keyed by (tp_rank, pp_rank)."""

    ckpt_dir: str
    tp: int
    pp: int
    files: dict[tuple[int, int], str]

    def path(self, tp_rank: int, pp_rank: int) -> str:
        return os.path.join(self.ckpt_dir, self.files[(tp_rank, pp_rank)])


def shard_file_name(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """The name PaddleNLP gives shard (tp_rank, pp_rank): parts only for degrees > 1, ranks as %02d."""
    parts = []
    if tp > 1:
        parts.append(f"tp{tp_rank:0>2d}")
    if pp > 1:
        parts.append(f"pp{pp_rank:0>2d}")
    return "model_state.pdparams" if not parts else f"model_state.{'_'.join(parts)}.pdparams"


def _parse_shard_name(name: str) -> tuple[bool, bool, int, int] | None:
    """(has_tp, has_pp, tp_rank, pp_rank) for a model-state file name, None if it is not one."""
    m = _SHARD_NAME_RE.match(name)
    if m is None:
        return None
    suffix = m.group("suffix")
    if suffix is None:
        return False, False, 0, 0
    parts = suffix.split("_")
    ranks: dict[str, int] = {}
    for part in parts:
        p = _PART_RE.match(part)
        if p is None or p.group(1) in ranks:
            ranks = {}
            break
        ranks[p.group(1)] = int(p.group(2))
    if not ranks or list(ranks) not in (["tp"], ["pp"], ["tp", "pp"]):
        raise MergeError(
            f"{name}: unsupported model shard name (expected model_state[.tpXX][_ppYY].pdparams; "
            "sharded-stage1 `shardXX` and `moeXX` saves are not supported)"
        )
    return "tp" in ranks, "pp" in ranks, ranks.get("tp", 0), ranks.get("pp", 0)


def discover_shards(ckpt_dir: str, tp: int | None = None, pp: int | None = None) -> ShardSet:
    """Find the model shards and infer tp/pp from their names; explicit degrees (from the run) must agree.

    Inference alone cannot see a missing *last* rank, so pass the run's degrees when they are known
    (None or <= 0 means infer; upstream's merge script uses 0 for "no such axis").
    """
    if not os.path.isdir(ckpt_dir):
        raise MergeError(f"{ckpt_dir}: not a directory")
    names = sorted(os.listdir(ckpt_dir))
    for name in names:
        if name.startswith("model_state") and name.endswith(".index.json"):
            raise MergeError(f"{os.path.join(ckpt_dir, name)}: split .pdparams checkpoints are not supported")
    parsed: dict[str, tuple[bool, bool, int, int]] = {}
    for name in names:
        try:
            info = _parse_shard_name(name)
        except MergeError as exc:
            raise MergeError(f"{ckpt_dir}/{exc}") from None
        if info is not None:
            parsed[name] = info
    if not parsed:
        raise MergeError(f"{ckpt_dir}: no model_state*.pdparams files (is this a checkpoint folder?)")
    by_layout: dict[tuple[bool, bool], list[str]] = {}
    for name, (has_tp, has_pp, _, _) in parsed.items():
        by_layout.setdefault((has_tp, has_pp), []).append(name)
    if len(by_layout) > 1:
        firsts = ", ".join(v[0] for v in by_layout.values())
        raise MergeError(
            f"{ckpt_dir}: duplicate shards from different layouts: {firsts} "
            "(e.g. an in-place merge next to the tp/pp shards); keep one layout"
        )
    files: dict[tuple[int, int], str] = {}
    for name, (_, _, tp_rank, pp_rank) in parsed.items():
        if (tp_rank, pp_rank) in files:
            raise MergeError(
                f"{ckpt_dir}: duplicate shard: {files[(tp_rank, pp_rank)]} and {name} are both "
                f"tp{tp_rank:02d} pp{pp_rank:02d}"
            )
        files[(tp_rank, pp_rank)] = name
    (has_tp, has_pp), _ = next(iter(by_layout.items()))
    degrees = {
        "tp": tp if tp is not None and tp > 0 else max(t for t, _ in files) + 1,
        "pp": pp if pp is not None and pp > 0 else max(p for _, p in files) + 1,
    }
    shards = ShardSet(ckpt_dir=ckpt_dir, tp=degrees["tp"], pp=degrees["pp"], files=files)
    check_complete(shards, shards.tp, shards.pp)
    # PaddleNLP adds a tp/pp part to the name exactly when that degree is > 1.
    for axis, named in (("tp", has_tp), ("pp", has_pp)):
        if named != (degrees[axis] > 1):
            raise MergeError(
                f"{ckpt_dir}: files {sorted(files.values())} do not fit {axis}={degrees[axis]} "
                f"({axis}-suffixed names mean {axis} >= 2; a lone {axis}00 means {axis}01.. are missing)"
            )
    return shards


def check_complete(shards: ShardSet, tp: int, pp: int) -> None:
    """Raise MergeError naming every missing or unexpected file for a tp x pp layout."""
    expected = {(t, p): shard_file_name(t, p, tp, pp) for t in range(tp) for p in range(pp)}
    missing = [name for key, name in expected.items() if key not in shards.files]
    extra = [name for key, name in shards.files.items() if key not in expected]
    if missing or extra:
        want = []
        if tp > 1:
            want.append(f"tp00..tp{tp - 1:02d}")
        if pp > 1:
            want.append(f"pp00..pp{pp - 1:02d}")
        raise MergeError(
            f"{shards.ckpt_dir}: shard files do not match the layout, expected "
            f"{' x '.join(want) or 'model_state.pdparams'}; "
            f"missing {missing or 'none'}; unexpected {extra or 'none'}"
        )


class _ArrayStub:
    """Stands in for numpy's pickled ndarray; its BUILD step makes a view of the raw bytes instead of a copy."""

    array: np.ndarray

    def __setstate__(self, state: tuple) -> None:
        _version, shape, dtype, fortran_order, raw = state
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def _array_stub(*_args: Any) -> _ArrayStub:
    return _ArrayStub()


class _MappedFile:
    """File-like reads from an mmap: large reads (tensor data) are zero-copy memoryviews."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def read(self, n: int = -1) -> bytes | memoryview:
        end = len(self.view) if n < 0 else self.pos + n
        out = self.view[self.pos : end]
        self.pos += len(out)
        return out if len(out) >= 1 << 16 else out.tobytes()  # pickle wants bytes for opcodes

    def readline(self) -> bytes:
        end = bytes(self.view[self.pos : self.pos + (1 << 16)]).find(b"\n")
        return self.read(end + 1 if end >= 0 else -1)

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


# What paddle.save puts in a state-dict pickle. Nothing else is resolved, so a tampered shard cannot
# run code through the unpickler (pickle's own find_class would import any callable it names).
_PICKLE_GLOBALS = {
    ("numpy", "dtype"), ("numpy", "ndarray"), ("collections", "OrderedDict"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ShardUnpickler(pickle._Unpickler):  # the pure-Python one: it hands our memoryviews through
    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _array_stub
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a Paddle state dict holds only arrays")
        return super().find_class(module, name)


def _load_shard(path: str) -> dict[str, np.ndarray]:
    """Read one .pdparams (a pickle: our own run storage only) as numpy, failing with the file's name.

    Same result as paddle.load(path, return_numpy=True), but the arrays are views of the file
    mapped into memory: the data lives in the page cache (which a copy needs anyway) instead of in
    fresh process memory, whose first-touch faults cost more than the copy on VMs.
    """
    try:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        mapped.madvise(mmap.MADV_WILLNEED)  # start the read-ahead of the whole file now
        state = _ShardUnpickler(_MappedFile(memoryview(mapped)), encoding="latin1").load()
    except Exception as exc:  # truncated/corrupt pickles raise all sorts of types
        raise MergeError(
            f"{path}: cannot be read as a Paddle state dict ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or not state:
        raise MergeError(f"{path}: does not hold a non-empty state dict")
    state.pop(_STRUCTURED_KEY, None)
    for key, value in state.items():
        if isinstance(value, _ArrayStub):
            state[key] = value = value.array
        if not isinstance(value, np.ndarray):
            raise MergeError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    return state


def _llama_config(config: Any, tp: int):
    """A private LlamaConfig copy with the shards' tp degree: the mappings depend on it (vocab/kv splits)."""
    from paddlenlp.transformers import LlamaConfig

    if isinstance(config, Mapping):
        cfg = LlamaConfig.from_dict(dict(config))
        # PaddleNLP 3.0.0b4 drops these in LlamaConfig(**kw) (PretrainedConfig.__init__ resets them to
        # False), yet they decide the tensor names (qkv_proj, gate_up_fused_proj) and their tp split.
        for key in _FUSE_FLAGS:
            setattr(cfg, key, bool(config.get(key, False)))
    else:
        cfg = copy.deepcopy(config)
    archs = list(getattr(cfg, "architectures", None) or [])
    if getattr(cfg, "model_type", "llama") != "llama" or any(a not in _SUPPORTED_ARCHS for a in archs):
        raise MergeError(f"only LLaMA checkpoints can be merged (config has architectures {archs})")
    cfg.tensor_parallel_degree = tp
    cfg.tensor_parallel_rank = 0
    return cfg


def _merge_actions(cfg, keys: Iterable[str]) -> dict[str, Any]:
    """PaddleNLP's tp merge function per key present in this shard (suffix-resolved like upstream)."""
    from paddlenlp.transformers import LlamaForCausalLM

    mappings = LlamaForCausalLM._get_tensor_parallel_mappings(cfg, is_split=False)
    resolved = LlamaForCausalLM._resolve_prefix_keys(mappings.keys(), list(keys), ignore_error=True)
    return {real: mappings[base] for base, real in resolved.items()}


@dataclass(frozen=True)
class Concat:
    """A tp-split tensor kept as its parts: np.concatenate(parts, axis) without building it yet.

    Building merged tensors in fresh memory doubles the memory a merge touches, and on VMs where
    first-touch page faults are expensive that costs more than the copy itself. The writer instead
    writes axis-0 parts one after the other (the same bytes) and assembles other axes into one
    reused buffer just before writing them (`write_safetensors`).
    """

    parts: tuple[np.ndarray, ...]
    axis: int  # non-negative

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def materialize(self, out: np.ndarray | None = None) -> np.ndarray:
        return np.concatenate(self.parts, axis=self.axis, out=out)


def _concat_axis(action, ndim: int) -> int | None:
    """The axis if PaddleNLP's merge action is a plain np.concatenate, else None.

    LLaMA's plain split tensors map to `partial(merge_fn, is_column=...)`, which is
    `np.concatenate(parts, axis=-1 if is_column else 0)`; anything else (fused qkv/ffn) is run as is.
    """
    if isinstance(action, functools.partial) and not action.args and set(action.keywords) == {"is_column"}:
        return ndim - 1 if action.keywords["is_column"] else 0
    return None


def _merge_key(key: str, parts: list[np.ndarray], paths: list[str], action, lazy: bool = False) -> np.ndarray | Concat:
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if part.shape != parts[0].shape or part.dtype != parts[0].dtype:
            raise MergeError(
                f"{path}: {key} is {part.dtype}{list(part.shape)} but {os.path.basename(paths[0])} has "
                f"{parts[0].dtype}{list(parts[0].shape)}; tp shards must agree"
            )
    if action is not None:
        axis = _concat_axis(action, parts[0].ndim)
        if lazy and axis is not None:
            return Concat(tuple(np.ascontiguousarray(p) for p in parts), axis)
        return np.ascontiguousarray(action(parts))
    # Replicated tensors (norms, unsplit vocab/kv) are identical on every tp rank of a healthy run.
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if not np.array_equal(part, parts[0]):
            raise MergeError(f"{path}: replicated tensor {key} differs from {os.path.basename(paths[0])}")
    return parts[0]


def _load_stage(shards: ShardSet, pp_rank: int) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """All tp shards of one pp stage, read in parallel (file reads and copies release the GIL)."""
    paths = [shards.path(t, pp_rank) for t in range(shards.tp)]
    if len(paths) == 1:
        return paths, [_load_shard(paths[0])]
    with ThreadPoolExecutor(max_workers=min(len(paths), _IO_THREADS)) as pool:
        return paths, list(pool.map(_load_shard, paths))


def _expected_shape(key: str, cfg) -> tuple[int, ...] | None:
    """Full (unsplit) shape of a standard LLaMA tensor; catches a wrong config or a missing tp rank."""
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = cfg.num_key_value_heads or heads
    head_dim = h // heads
    m = _LAYER_RE.match(key)
    sub = m.group(2) if m else None
    table = {
        "self_attn.q_proj.weight": (h, heads * head_dim),
        "self_attn.k_proj.weight": (h, kv * head_dim),
        "self_attn.v_proj.weight": (h, kv * head_dim),
        "self_attn.qkv_proj.weight": (h, (heads + 2 * kv) * head_dim),
        "self_attn.o_proj.weight": (heads * head_dim, h),
        "mlp.gate_proj.weight": (h, inter),
        "mlp.up_proj.weight": (h, inter),
        "mlp.gate_up_fused_proj.weight": (h, 2 * inter),
        "mlp.down_proj.weight": (inter, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    if sub is not None:
        return table.get(sub)
    if key == "llama.embed_tokens.weight":
        return (vocab, h)
    if key == "llama.norm.weight":
        return (h,)
    if key == "lm_head.weight" and not cfg.tie_word_embeddings:
        return (h, vocab)
    return None


def _check_all_layers(seen: Mapping[str, str], cfg, shards: ShardSet) -> None:
    """Every decoder layer with the same tensors, plus embedding, final norm and lm_head."""
    n = cfg.num_hidden_layers
    subs: dict[int, set[str]] = {}
    for key in seen:
        m = _LAYER_RE.match(key)
        if m:
            subs.setdefault(int(m.group(1)), set()).add(m.group(2))
    where = f"{shards.ckpt_dir} ({', '.join(shards.files.values())})"
    missing_layers = [i for i in range(n) if i not in subs]
    if missing_layers:
        raise MergeError(
            f"{where}: missing decoder layers llama.layers.{missing_layers} (a pp stage is missing?)"
        )
    union = set().union(*subs.values()) if subs else set()
    for i in range(n):
        if subs[i] != union:
            raise MergeError(f"{where}: llama.layers.{i} lacks {sorted(union - subs[i])}")
    required = ["llama.embed_tokens.weight", "llama.norm.weight"]
    if not cfg.tie_word_embeddings:
        required.append("lm_head.weight")
    absent = [k for k in required if k not in seen]
    if absent:
        raise MergeError(f"{where}: missing {absent}")


def iter_merged(
    shards: ShardSet, config: Any, lazy: bool = False
) -> Iterator[tuple[str, np.ndarray | Concat]]:
    """Yield merged full tensors one pp stage at a time, so at most two stages are held in memory.

    With `lazy`, plain tp concatenations are yielded as `Concat` (parts not joined yet) for
    write_model_dir, which writes them without building the merged array.

    The next stage is read in the background while this one is merged and written. Completeness
    (all layers, embedding, norm, lm_head) is checked after the last stage, so a consumer must treat
    its output as unfinished until the generator is exhausted.
    """
    cfg = _llama_config(config, shards.tp)
    seen: dict[str, int] = {}  # key -> pp stage that gave it
    actions: dict[str, Any] | None = None
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        pending = prefetch.submit(_load_stage, shards, 0)
        for pp_rank in range(shards.pp):
            paths, states = pending.result()
            if pp_rank + 1 < shards.pp:
                pending = prefetch.submit(_load_stage, shards, pp_rank + 1)
            for path, state in zip(paths[1:], states[1:], strict=True):
                diff = set(states[0]) ^ set(state)
                if diff:
                    key = sorted(diff)[0]
                    holder, lacker = (paths[0], path) if key in states[0] else (path, paths[0])
                    raise MergeError(f"{lacker}: lacks {key} that {os.path.basename(holder)} has")
            actions = _merge_actions(cfg, states[0]) if shards.tp > 1 else {}
            for key in list(states[0]):
                m = _LAYER_RE.match(key)
                if m and int(m.group(1)) >= cfg.num_hidden_layers:
                    raise MergeError(
                        f"{paths[0]}: has {key} but config.num_hidden_layers is {cfg.num_hidden_layers}"
                    )
                parts = [state.pop(key) for state in states]
                value = _merge_key(key, parts, paths, actions.get(key), lazy)
                del parts
                if key in seen:
                    # Rare (a layer saved by two stages): merge it again from the first stage to compare.
                    _check_same_as_before(key, value, seen[key], shards, cfg, paths[0])
                    continue
                want = _expected_shape(key, cfg)
                if want is not None and tuple(value.shape) != want:
                    raise MergeError(
                        f"{paths[0]}: {key} merges to {list(value.shape)} but the "
                        f"config implies {list(want)} (wrong config, or tp shards missing?)"
                    )
                seen[key] = pp_rank
                yield key, value
            del states
    _check_all_layers({k: shards.files[(0, p)] for k, p in seen.items()}, cfg, shards)


def _check_same_as_before(key: str, value: np.ndarray | Concat, first_stage: int, shards: ShardSet, cfg, where: str) -> None:
    paths, states = _load_stage(shards, first_stage)
    actions = _merge_actions(cfg, [key]) if shards.tp > 1 else {}
    before = _merge_key(key, [s[key] for s in states], paths, actions.get(key))
    if isinstance(value, Concat):
        value = value.materialize()
    if before.shape != value.shape or before.dtype != value.dtype or not np.array_equal(before, value):
        raise MergeError(
            f"{where}: {key} is also in {os.path.basename(paths[0])} with different values (pp stages overlap)"
        )


def merge_state(
    ckpt_dir: str, config: Any, tp: int | None = None, pp: int | None = None
) -> dict[str, np.ndarray]:
    """The whole merged state dict (fine for tests and small models; see merge_checkpoint).

    Unsplit tensors are read-only views of the mapped shard files; copy one before modifying it.
    """
    shards = discover_shards(ckpt_dir, tp=tp, pp=pp)
    _check_config_tp(config, shards)
    return dict(iter_merged(shards, config))


def _check_config_tp(config: Any, shards: ShardSet) -> None:
    cfg_tp = (
        config.get("tensor_parallel_degree")
        if isinstance(config, Mapping)
        else getattr(config, "tensor_parallel_degree", None)
    )
    if cfg_tp is not None and cfg_tp > 1 and cfg_tp != shards.tp:
        raise MergeError(
            f"{shards.ckpt_dir}: config.json says tensor_parallel_degree={cfg_tp} but the shards are tp={shards.tp}"
        )


def single_model_config(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """config.json for the merged model: non-pipeline class, no tensor/pipeline/sequence parallelism.

    sequence_parallel must go too: PretrainedConfig asserts it only runs with tensor_parallel_degree > 1.
    """
    out = dict(config_dict)
    archs = list(out.get("architectures") or ["LlamaForCausalLM"])
    out["architectures"] = [a[: -len(_PP_ARCH_SUFFIX)] if a.endswith(_PP_ARCH_SUFFIX) else a for a in archs]
    out["tensor_parallel_degree"] = 1
    out["tensor_parallel_rank"] = 0
    out["pipeline_parallel_degree"] = 1
    out["sequence_parallel"] = False
    return out


def _to_safetensors(value: np.ndarray | Concat) -> np.ndarray | Concat:
    """paddle.load(return_numpy=True) gives bf16 as raw uint16; store it as BF16, bit for bit."""
    if isinstance(value, Concat):
        return Concat(tuple(_to_safetensors(p) for p in value.parts), value.axis)
    if value.dtype == np.uint16:
        import ml_dtypes

        value = value.view(ml_dtypes.bfloat16)
    if value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    return np.ascontiguousarray(value)


# safetensors dtype codes (https://github.com/huggingface/safetensors, format: 8-byte little-endian
# header length, JSON header with dtype/shape/data_offsets, then the tensors' bytes back to back).
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
    "uint8": "U8", "bool": "BOOL",
}


def _bytes_of(value: np.ndarray) -> memoryview:
    return memoryview(value.reshape(-1).view(np.uint8))


def _tensor_bytes(values: Iterable[np.ndarray | Concat]) -> Iterator[memoryview]:
    """Each tensor's bytes in file order; a Concat's come from its parts, not from a new array.

    Axis-0 parts are already the merged bytes back to back. Other axes are joined into one scratch
    buffer reused for every tensor (fresh memory is what costs, see Concat), so the consumer must
    be done with a chunk before asking for the next one.
    """
    scratch = np.empty(0, np.uint8)
    for value in values:
        if not isinstance(value, Concat):
            yield _bytes_of(value)
        elif value.axis == 0:
            yield from (_bytes_of(p) for p in value.parts)
        else:
            if scratch.nbytes < value.nbytes:
                scratch = np.empty(value.nbytes, np.uint8)
            out = scratch[: value.nbytes].view(value.dtype).reshape(value.shape)
            yield _bytes_of(value.materialize(out=out))


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray | Concat], metadata: Mapping[str, str]) -> str:
    """Write a safetensors file straight from the arrays' memory and return its sha256.

    safetensors.numpy.save_file first copies every tensor into a bytes object and cannot hash on
    the way; this writes the same format (loaded back by safetensors in the tests) without the copy,
    hashing each chunk in a second thread while it is written, so no read-back pass is needed.
    Tensors are laid out like the Rust writer: larger dtypes first, then by name.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        value = tensors[name]
        if value.dtype.name not in _ST_DTYPES:
            raise MergeError(f"tensor {name}: dtype {value.dtype} has no safetensors equivalent")
        header[name] = {"dtype": _ST_DTYPES[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keeps the tensor data 8-byte aligned
    sha = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=1) as hasher, open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little") + head)
        sha.update(len(head).to_bytes(8, "little") + head)
        for chunk in _tensor_bytes(tensors[name] for name in order):
            hashed = hasher.submit(sha.update, chunk)  # releases the GIL: runs beside the write
            fh.write(chunk)
            hashed.result()  # the chunk may live in _tensor_bytes' scratch buffer
    return sha.hexdigest()


def _replace_dir(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def write_model_dir(
    state: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    config_dict: Mapping[str, Any],
    out_dir: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, bytes] | None = None,
    provenance: Mapping[str, Any] | None = None,
    finalize_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    st_format: str = "np",
) -> str:
    """Write a from_pretrained-loadable sharded safetensors dir, each shard as soon as it fills.

    `finalize_config` turns `config_dict` into the config.json written (default: the PaddleNLP
    single-model config); `st_format` is the safetensors "format" metadata (transformers wants "pt").

    `state` may be a dict or a (name, array) stream such as iter_merged(); if the stream raises, the
    temporary directory is removed and `out_dir` is not created. The manifest and completion marker
    follow gather.py, so gather.verify_gathered() checks a merged directory too.
    """
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # One shard is written (and hashed) in the background while the next one is merged.
    writer = ThreadPoolExecutor(max_workers=1)
    try:
        items = state.items() if isinstance(state, Mapping) else state
        part_of: dict[str, int] = {}
        buf: dict[str, np.ndarray | Concat] = {}
        buf_bytes = 0
        total = 0
        parts = 0
        digests: dict[int, str] = {}
        inflight: tuple[int, Future] | None = None

        def drain() -> None:
            nonlocal inflight
            if inflight is not None:
                digests[inflight[0]] = inflight[1].result()
                inflight = None

        def flush() -> None:
            nonlocal buf, buf_bytes, parts, inflight
            drain()  # at most one shard in flight bounds memory to two shards
            parts += 1
            path = os.path.join(tmp, f"part-{parts:05d}.safetensors")
            inflight = (parts, writer.submit(write_safetensors, path, buf, {"format": st_format}))
            for name in buf:
                part_of[name] = parts
            buf, buf_bytes = {}, 0

        for name, value in items:
            if name in part_of or name in buf:
                raise MergeError(f"tensor {name} given twice")
            value = _to_safetensors(value)
            if buf and buf_bytes + value.nbytes > max_shard_bytes:
                flush()
            buf[name] = value
            buf_bytes += value.nbytes
            total += value.nbytes
        if buf:
            flush()
        drain()
        if not part_of:
            raise MergeError("no tensors to write")

        files = {i: f"model-{i:05d}-of-{parts:05d}.safetensors" for i in range(1, parts + 1)}
        for i, final in files.items():
            os.replace(os.path.join(tmp, f"part-{i:05d}.safetensors"), os.path.join(tmp, final))
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: files[part_of[n]] for n in sorted(part_of)},
        }
        small = dict(extra_files or {})
        small[INDEX] = json.dumps(index, indent=2).encode()
        small["config.json"] = json.dumps((finalize_config or single_model_config)(config_dict), indent=2, sort_keys=True).encode()
        for name, data in small.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
        sha = {files[i]: d for i, d in digests.items()} | {n: hashlib.sha256(d).hexdigest() for n, d in small.items()}
        entries = []
        for name in sorted(sha):
            entries.append({"file": name, "size": os.path.getsize(os.path.join(tmp, name)), "sha256": sha[name]})
        manifest = {"created": time.time(), "files": entries, **(provenance or {})}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as fh:
            fh.write("ok\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        writer.shutdown(wait=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        writer.shutdown(wait=True)
    return out_dir


def merge_checkpoint(
    ckpt_dir: str,
    out_dir: str,
    tp: int | None = None,
    pp: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Checkpoint folder -> loadable model dir, streaming stage by stage.

    Memory: the shards' pages of ~2 stages + 2 output shards (mapped files, so page cache the kernel
    can reclaim) plus one buffer the size of the largest column-split tensor.

    Tokenizer and generation files next to the shards are copied so the output stands alone.
    """
    config_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(config_path):
        raise MergeError(f"{config_path}: missing (only global rank 0's node has it without shared storage)")
    with open(config_path, encoding="utf-8") as fh:
        config_dict = json.load(fh)
    shards = discover_shards(ckpt_dir, tp=tp, pp=pp)
    _check_config_tp(config_dict, shards)
    extra = {}
    for name in SIDE_FILES:
        path = os.path.join(ckpt_dir, name)
        if name != "config.json" and os.path.isfile(path):
            with open(path, "rb") as fh:
                extra[name] = fh.read()
    provenance = {
        "source": os.path.abspath(ckpt_dir),
        "merged_from": sorted(os.path.basename(p) for p in shards.files.values()),
        "tp": shards.tp,
        "pp": shards.pp,
        **(provenance or {}),
    }
    log.info("merging %d shards (tp=%d, pp=%d) from %s", len(shards.files), shards.tp, shards.pp, ckpt_dir)
    return write_model_dir(
        iter_merged(shards, config_dict, lazy=True), config_dict, out_dir, max_shard_bytes, extra, provenance
    )
