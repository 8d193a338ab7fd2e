"""Plan a PaddleNLP LLaMA pretraining job before allocating anything: memory, FLOPs, time.

Standard library only (no Paddle import), so the driver can say "fits / does not fit" and forecast
step time for a layout before any rank starts. What each term mirrors (read from the installed
paddlepaddle 3.3.1 / paddlenlp 3.0.0b4 unless noted; formulas in ``docs/PLANNING.md``):

- parameter shapes: ``paddlenlp/transformers/llama/modeling.py`` (q/k/v/o with KV heads, SwiGLU,
  RMSNorm, untied or tied lm_head), tensor-parallel splits as in ``LlamaAttention``/``LlamaLMHead``;
- pipeline layout: ``modeling_pp.py`` descs (embedding, decoders, norm, lm_head) and Paddle's
  ``SegmentLayers``; the FORK's hard-coded 13B split for pp8 (spec section 4.3);
- optimizer state: AdamW with ``multi_precision`` (fp32 master + moments, two 1-element beta pows
  per tensor), ``MixPrecisionLayer`` fp32 ``main_grad`` under ``amp_master_grad``, and
  ``DygraphShardingOptimizer._partition_parameters`` (greedy by numel) for sharding stage1;
- activations: the tensors Paddle's autograd keeps for one ``LlamaDecoderLayer`` (counted with
  ``paddle.autograd.saved_tensors_hooks`` on CPU for the unfused path, and from the fused ops'
  saved inputs for flash attention / fused RMSNorm / fused RoPE), under Paddle's 1F1B schedule;
- FLOPs: ``paddlenlp/transformers/utils.py`` ``caculate_llm_per_token_flops`` (hardware and model
  FLOPs) and the 6N rule.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bi150_ray.topology import Degrees, resolve_degrees

MIB = 1024**2
GIB = 1024**3
TERA = 1e12
# PaddleNLP divides by 2**40, not 10**12, in `*_hardware_tflops_per_device` (trainer_utils.speed_metrics).
PADDLENLP_TFLOPS_DIVISOR = 2**40

REGISTRY_PATH = Path(__file__).with_name("device_registry.json")
REGISTRY_ENV = "BI150_RAY_DEVICE_REGISTRY"
DTYPES = ("fp16", "bf16", "fp32")

# FORK (sci/benchmark_iluvatar) LlamaForCausalLMPipe: seg_method hard-coded for 13B on pp8 over its
# 43 descs (embedding + 40 decoders + norm + lm_head); spec sections 4.3 and "What a Ray runtime must reproduce".
FORK_13B_PP8_SEGMENTS: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 30, 36, 43)


class EstimateError(ValueError):
    """Inputs the estimate cannot model or that PaddleNLP itself would reject."""


# ---------------------------------------------------------------------------------------------
# device registry


@dataclass(frozen=True)
class DeviceSpec:
    """What the planner needs to know about one device model.

    ``peak_flops`` is dense FLOP/s per dtype ("fp16", "bf16", "fp32"); a dtype missing or None means
    unknown, and the whole mapping is None when nothing is known. Unknown stays unknown: MFU and
    throughput forecasts then report None instead of silently assuming some other chip's peak.
    """

    name: str
    memory_bytes: int | None
    peak_flops: Mapping[str, float | None] | None = None
    source: str = ""
    aliases: tuple[str, ...] = ()

    def peak(self, dtype: str) -> float | None:
        """Peak FLOP/s for a training dtype, or None when unknown."""
        if self.peak_flops is None:
            return None
        return self.peak_flops.get(dtype)


def _norm_name(name: str) -> str:
    """'Iluvatar BI-V150' / 'bi-v150' / 'BI_V150' all map to the same key."""
    words = name.strip().lower().split()
    if len(words) > 1 and words[0] in ("iluvatar", "nvidia"):
        words = words[1:]
    return "".join(ch for ch in "".join(words) if ch.isalnum())


def _entry_to_spec(name: str, entry: Mapping[str, Any], where: str) -> DeviceSpec:
    if not isinstance(entry, Mapping):
        raise EstimateError(f"{where}: device {name!r} must be a JSON object")
    mem = entry.get("memory_mib")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int | float) or mem <= 0):
        raise EstimateError(
            f"{where}: device {name!r}: memory_mib must be a positive number or null, got {mem!r}"
        )
    peaks_raw = entry.get("peak_tflops")
    peaks: dict[str, float | None] | None = None
    if peaks_raw is not None:
        if not isinstance(peaks_raw, Mapping):
            raise EstimateError(
                f'{where}: device {name!r}: peak_tflops must be an object such as {{"fp16": 100}}'
            )
        peaks = {}
        for dtype, value in peaks_raw.items():
            if dtype not in DTYPES:
                raise EstimateError(
                    f"{where}: device {name!r}: unknown dtype {dtype!r} in peak_tflops; use {DTYPES}"
                )
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise EstimateError(
                    f"{where}: device {name!r}: peak_tflops.{dtype} must be a positive number or null, got {value!r}"
                )
            peaks[dtype] = None if value is None else float(value) * TERA
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise EstimateError(f"{where}: device {name!r}: aliases must be a list of strings")
    return DeviceSpec(
        name=name,
        memory_bytes=None if mem is None else int(mem * MIB),
        peak_flops=peaks,
        source=str(entry.get("source", "")),
        aliases=tuple(aliases),
    )


def _read_registry_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise EstimateError(f"cannot read device registry {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise EstimateError(f"device registry {path} is not valid JSON: {exc}") from None
    devices = data.get("devices") if isinstance(data, Mapping) else None
    if not isinstance(devices, Mapping):
        raise EstimateError(f"device registry {path} must be an object with a 'devices' object")
    return {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in devices.items()}


def load_registry(extra_path: str | os.PathLike[str] | None = None) -> dict[str, DeviceSpec]:
    """The shipped registry, extended/overridden by a user JSON of the same layout.

    The user file is ``extra_path``, else the file named by ``$BI150_RAY_DEVICE_REGISTRY`` if set.
    An entry that names a shipped device (or one of its aliases) is merged field by field and
    ``peak_tflops`` dtype by dtype, so ``{"devices": {"BI-V150": {"peak_tflops": {"fp16": X}}}}``
    sets one number and keeps the rest. Overridden entries get the user file noted in ``source``.
    """
    entries = _read_registry_file(REGISTRY_PATH)
    user_path = extra_path if extra_path is not None else os.environ.get(REGISTRY_ENV) or None
    if user_path is not None:
        keys = {_norm_name(k): k for k in entries}
        for k, entry in entries.items():
            for alias in entry.get("aliases", []):
                keys.setdefault(_norm_name(alias), k)
        for name, user in _read_registry_file(user_path).items():
            if not isinstance(user, Mapping):
                raise EstimateError(f"{user_path}: device {name!r} must be a JSON object")
            target = keys.get(_norm_name(name))
            if target is None:
                merged = dict(user)
                merged.setdefault("source", f"user registry {user_path}")
                entries[name] = merged
                keys[_norm_name(name)] = name
                continue
            merged = dict(entries[target])
            for key, value in user.items():
                if (
                    key == "peak_tflops"
                    and isinstance(value, Mapping)
                    and isinstance(merged.get(key), Mapping)
                ):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            if "source" not in user:
                changed = ", ".join(sorted(user))
                merged["source"] = f"{merged.get('source', '')} [{changed} overridden by {user_path}]".strip()
            entries[target] = merged
    return {name: _entry_to_spec(name, entry, str(REGISTRY_PATH)) for name, entry in entries.items()}


def find_device(
    name: str, registry: Mapping[str, DeviceSpec] | None = None, *, memory_mib: int | None = None
) -> DeviceSpec:
    """Look a device up by name or alias (ixsmi's 'Iluvatar BI-V150' works).

    ``memory_mib`` (e.g. ``NodeDevices.memory_total_mib`` from ixsmi) replaces the registry's
    memory: what the driver reports on this cluster beats a table.
    """
    registry = load_registry() if registry is None else registry
    wanted = _norm_name(name)
    for spec in registry.values():
        if wanted in {_norm_name(spec.name), *(_norm_name(a) for a in spec.aliases)}:
            if memory_mib is not None:
                if memory_mib <= 0:
                    raise EstimateError(f"memory_mib must be positive, got {memory_mib}")
                return DeviceSpec(
                    spec.name,
                    memory_mib * MIB,
                    spec.peak_flops,
                    f"{spec.source} [memory {memory_mib} MiB as detected]",
                    spec.aliases,
                )
            return spec
    raise EstimateError(
        f"device {name!r} is not in the registry ({', '.join(sorted(registry))}); add it to a user registry "
        f"JSON (see docs/PLANNING.md) and pass it with load_registry(extra_path) or ${REGISTRY_ENV}"
    )


# ---------------------------------------------------------------------------------------------
# model shape and parameters


@dataclass(frozen=True)
class LlamaDims:
    """The config fields that size a LLaMA model (names as in PaddleNLP's LlamaConfig)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EstimateError(f"{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise EstimateError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise EstimateError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def of(cls, dims: LlamaDims | Mapping[str, Any]) -> LlamaDims:
        """Accept a LlamaDims or a config-like mapping (``num_key_value_heads`` defaults to the heads)."""
        if isinstance(dims, LlamaDims):
            return dims
        try:
            heads = int(dims["num_attention_heads"])
            kv = dims.get("num_key_value_heads")
            return cls(
                hidden_size=int(dims["hidden_size"]),
                intermediate_size=int(dims["intermediate_size"]),
                num_hidden_layers=int(dims["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=heads if kv is None else int(kv),
                vocab_size=int(dims["vocab_size"]),
                tie_word_embeddings=bool(dims.get("tie_word_embeddings", False)),
            )
        except KeyError as exc:
            raise EstimateError(f"model dims are missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise EstimateError(f"model dims are not integers: {exc}") from None


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of LlamaForCausalLM (no biases anywhere in PaddleNLP's LLaMA)."""

    embedding: int
    q_proj: int
    k_proj: int
    v_proj: int
    o_proj: int
    gate_proj: int
    up_proj: int
    down_proj: int
    input_layernorm: int
    post_attention_layernorm: int
    per_layer: int
    layers: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding
    total: int


def param_counts(dims: LlamaDims | Mapping[str, Any]) -> ParamCounts:
    """Parameter counts per tensor kind, per layer and in total (13B: 13,015,864,320)."""
    d = LlamaDims.of(dims)
    h, f = d.hidden_size, d.intermediate_size
    q, kv, o = h * h, h * d.kv_dim, h * h
    gate = up = down = h * f
    per_layer = q + 2 * kv + o + gate + up + down + 2 * h
    emb = d.vocab_size * h
    lm_head = 0 if d.tie_word_embeddings else h * d.vocab_size
    layers = d.num_hidden_layers * per_layer
    return ParamCounts(
        embedding=emb,
        q_proj=q,
        k_proj=kv,
        v_proj=kv,
        o_proj=o,
        gate_proj=gate,
        up_proj=up,
        down_proj=down,
        input_layernorm=h,
        post_attention_layernorm=h,
        per_layer=per_layer,
        layers=layers,
        final_norm=h,
        lm_head=lm_head,
        total=emb + layers + h + lm_head,
    )


def _check_tp(d: LlamaDims, tp: int) -> None:
    if tp > 1:
        if d.num_attention_heads % tp:
            raise EstimateError(
                f"num_attention_heads={d.num_attention_heads} is not divisible by tensor_parallel_degree={tp}"
            )
        if d.intermediate_size % tp:
            raise EstimateError(
                f"intermediate_size={d.intermediate_size} is not divisible by tensor_parallel_degree={tp}"
            )


def pipe_desc_tensors(dims: LlamaDims | Mapping[str, Any], tp: int = 1) -> list[list[tuple[str, int]]]:
    """Parameter tensors (name, numel on one tp rank) of each LlamaForCausalLMPipe desc, in order.

    Descs: embedding, decoder 0..L-1, final norm, lm_head (43 for 13B). With tied embeddings the
    lm_head desc is a SharedLayerDesc holding the embedding weight itself. K/V are replicated when
    tp does not divide the KV heads; embedding/lm_head are split only when tp divides the vocab.
    """
    d = LlamaDims.of(dims)
    _check_tp(d, tp)
    h, f, v = d.hidden_size, d.intermediate_size, d.vocab_size
    v_local = v // tp if tp > 1 and v % tp == 0 else v
    kv_local = d.kv_dim // tp if d.num_key_value_heads % tp == 0 else d.kv_dim
    emb = [("embed_tokens.weight", v_local * h)]
    out = [emb]
    for i in range(d.num_hidden_layers):
        p = f"layers.{i}."
        out.append(
            [
                (p + "self_attn.q_proj.weight", h * (h // tp)),
                (p + "self_attn.k_proj.weight", h * kv_local),
                (p + "self_attn.v_proj.weight", h * kv_local),
                (p + "self_attn.o_proj.weight", (h // tp) * h),
                (p + "mlp.gate_proj.weight", h * (f // tp)),
                (p + "mlp.up_proj.weight", h * (f // tp)),
                (p + "mlp.down_proj.weight", (f // tp) * h),
                (p + "input_layernorm.weight", h),
                (p + "post_attention_layernorm.weight", h),
            ]
        )
    out.append([("norm.weight", h)])
    out.append(list(emb) if d.tie_word_embeddings else [("lm_head.weight", h * v_local)])
    return out


def pipeline_segments(num_hidden_layers: int, pp: int, seg_method: str | Sequence[int] = "auto") -> list[int]:
    """Stage boundaries over the L + 3 pipe descs (stage i owns descs [b[i], b[i+1])).

    "auto": the FORK's hard-coded split for 43 descs on pp8 (what the reference job runs), else
    PaddleNLP 3.0's "layer:LlamaDecoderLayer" when pp divides L, else Paddle's "uniform".
    "fork", "layer" and "uniform" force one method; a list is used as given (Paddle's rules).
    """
    n = num_hidden_layers + 3
    if pp < 1:
        raise EstimateError(f"pipeline degree must be >= 1, got {pp}")
    if n < pp:
        raise EstimateError(f"{n} pipeline layers cannot fill pipeline_parallel_degree={pp}")
    if not isinstance(seg_method, str):
        seg = [int(x) for x in seg_method]
        if len(seg) == pp:
            seg.append(n)
        if (
            len(seg) != pp + 1
            or seg[0] != 0
            or seg[-1] != n
            or any(b <= a for a, b in zip(seg, seg[1:], strict=False))
        ):
            raise EstimateError(
                f"segments {list(seg_method)} do not split {n} pipe layers into {pp} non-empty stages"
            )
        return seg
    method = seg_method
    if method == "auto":
        if n == FORK_13B_PP8_SEGMENTS[-1] and pp == len(FORK_13B_PP8_SEGMENTS) - 1:
            return list(FORK_13B_PP8_SEGMENTS)
        method = "layer" if num_hidden_layers % pp == 0 else "uniform"
    if method == "fork":
        if n != FORK_13B_PP8_SEGMENTS[-1] or pp != len(FORK_13B_PP8_SEGMENTS) - 1:
            raise EstimateError(
                "the FORK split exists only for 40 decoder layers on pipeline_parallel_degree=8"
            )
        return list(FORK_13B_PP8_SEGMENTS)
    if method == "layer":
        # SegmentLayers "layer:" weights the decoder descs (1..L) and cuts after every L/pp of them.
        if num_hidden_layers % pp:
            raise EstimateError(
                f"layer segmentation needs pp ({pp}) to divide num_hidden_layers ({num_hidden_layers})"
            )
        per = num_hidden_layers // pp
        return [0] + [1 + per * k for k in range(1, pp)] + [n]
    if method == "uniform":
        # SegmentLayers.uniform: floor(n/pp) each, the last (n % pp) parts one larger.
        size, extra = divmod(n, pp)
        seg = [0]
        for i in range(1, pp):
            seg.append(min(seg[-1] + size + (1 if i > pp - extra else 0), n))
        return seg + [n]
    raise EstimateError(
        f"unknown seg_method {seg_method!r}; use 'auto', 'fork', 'layer', 'uniform' or a list"
    )


def sharding_partition(numels: Sequence[int], sharding: int) -> list[int]:
    """Elements each sharding rank owns under DygraphShardingOptimizer (v1) stage1.

    ``_partition_parameters``: sort by numel descending (stable; FLAGS_sharding_sort_parameters=1)
    and give each tensor to the currently least-loaded rank (lowest index on ties).
    """
    if sharding < 1:
        raise EstimateError(f"sharding degree must be >= 1, got {sharding}")
    sizes = [0] * sharding
    for numel in sorted(numels, reverse=True):
        rank = sizes.index(min(sizes))
        sizes[rank] += numel
    return sizes


def _sharding_owned_tensors(numels: Sequence[int], sharding: int) -> list[int]:
    counts = [0] * sharding
    sizes = [0] * sharding
    for numel in sorted(numels, reverse=True):
        rank = sizes.index(min(sizes))
        sizes[rank] += numel
        counts[rank] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# precision and training arguments


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state, as PaddleNLP's trainer sets them up."""

    name: str  # "fp16-O2", "bf16-O1", "fp32", ...
    compute_dtype: str  # dtype whose peak applies: fp16 / bf16 / fp32
    param_bytes: int
    grad_bytes: int
    master_bytes: int  # fp32 master weight per param (O2 multi_precision), else 0
    moment_bytes: int  # AdamW moment1 + moment2 per param (fp32 in every mode)
    act_bytes: int  # activation element size


def precision_of(args: Mapping[str, Any]) -> Precision:
    """fp16/bf16 + O2: 16-bit params, fp32 master + moments, grads fp32 with amp_master_grad else 16-bit.

    O1 keeps fp32 params/grads and autocasts activations; otherwise everything is fp32.
    """
    fp16, bf16 = bool(args.get("fp16")), bool(args.get("bf16"))
    if fp16 and bf16:
        raise EstimateError("fp16 and bf16 cannot both be true")
    optim = str(args.get("optim", "adamw"))
    if optim not in ("adamw", "adamw_custom"):
        raise EstimateError(f"optim={optim!r}: only AdamW optimizer state is modelled")
    if not (fp16 or bf16):
        return Precision("fp32", "fp32", 4, 4, 0, 8, 4)
    half = "fp16" if fp16 else "bf16"
    level = str(args.get("fp16_opt_level", "O1"))
    if level == "O2":
        grad = 4 if args.get("amp_master_grad") else 2
        return Precision(f"{half}-O2{'+master_grad' if grad == 4 else ''}", half, 2, grad, 4, 8, 2)
    if level == "O1":
        return Precision(f"{half}-O1", half, 4, 4, 0, 8, 2)
    raise EstimateError(f"fp16_opt_level={level!r}: use 'O1' or 'O2'")


# Per tensor AdamW also keeps beta1_pow_acc and beta2_pow_acc, 1-element fp32 each.
BETA_POW_BYTES_PER_TENSOR = 8


def _flag(args: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = args.get(key, default)
    return bool(default if value is None else value)


def _no_recompute(args: Mapping[str, Any], num_layers: int) -> frozenset[int]:
    raw = args.get("no_recompute_layers") or []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise EstimateError(f"no_recompute_layers must be a list of layer indices, got {raw!r}")
    out = set()
    for x in raw:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise EstimateError(f"no_recompute_layers: {x!r} is not a layer index")
        if x < num_layers:
            out.add(x)
    return frozenset(out)


def _granularity(args: Mapping[str, Any]) -> str | None:
    """None when recompute is off, else 'full' / 'full_attn' / 'core_attn'."""
    if not _flag(args, "recompute"):
        return None
    g = args.get("recompute_granularity") or "full"
    if g not in ("full", "full_attn", "core_attn"):
        raise EstimateError(f"recompute_granularity={g!r}: use 'full', 'full_attn' or 'core_attn'")
    return g


# ---------------------------------------------------------------------------------------------
# activations


@dataclass(frozen=True)
class ActivationShape:
    """What sizes one micro-batch's activations on one rank."""

    seq: int  # tokens per sequence on this rank (max_seq_length / sep)
    micro_batch: int
    tp: int = 1
    act_bytes: int = 2
    sequence_parallel: bool = False
    flash_attention: bool = False
    fused_rms_norm: bool = False
    fused_rope: bool = False


def activation_terms(dims: LlamaDims | Mapping[str, Any], shape: ActivationShape) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward, per micro-batch, by tensor (no recompute).

    e = activation element size, s = seq, b = micro-batch, h = hidden, f = ffn, a = heads,
    k = KV width (kv_heads x head_dim), t = tp. Items inside the tensor-parallel region are / t;
    the norm items are / t only with sequence parallelism.
    """
    d = LlamaDims.of(dims)
    s, b, t, e = shape.seq, shape.micro_batch, shape.tp, shape.act_bytes
    h, f, a, hd = d.hidden_size, d.intermediate_size, d.num_attention_heads, d.head_dim
    # K/V are replicated when tp does not divide the KV heads.
    kv = d.kv_dim if d.num_key_value_heads % t else d.kv_dim // t
    sbh = s * b * h
    sp = t if shape.sequence_parallel else 1
    terms: dict[str, int] = {}
    # Two RMSNorms. Fused op keeps x and the fp32 inverse rms (s*b). LlamaRMSNorm unfused keeps x,
    # an fp32 copy of x (pow) when x is 16-bit, x*rsqrt (cast back) and rsqrt (fp32, s*b).
    if shape.fused_rms_norm:
        norm = e * sbh // sp + 4 * s * b // sp
    else:
        norm = (2 * e + (4 if e != 4 else 0)) * sbh // sp + 4 * s * b // sp
    terms["rms_norm x2"] = 2 * norm
    # Norm outputs are the inputs of q/k/v and gate/up matmuls (full size: SP all-gathers them).
    terms["norm outputs (matmul inputs) x2"] = 2 * e * sbh
    if not shape.fused_rope:
        # Unfused RoPE keeps q, rotate_half(q), k, rotate_half(k) and the gathered cos/sin.
        terms["rope (unfused)"] = e * (2 * sbh // t + 2 * s * b * kv) + 2 * e * s * b * hd
    if shape.flash_attention:
        # flash_attn keeps q, k, v (KV width), out and the fp32 log-sum-exp (a*s*b); out is also the o_proj input.
        terms["flash attention q,k,v,out,lse"] = e * (2 * sbh // t + 2 * s * b * kv) + 4 * a * s * b // t
    else:
        # Paddle's eager path keeps scaled q, k^T and v after repeat_kv (full heads), the fp32
        # softmax (4 a s^2 b) and its 16-bit cast for the matmul (2 a s^2 b), and the transposed output.
        probs = (4 + (e if e != 4 else 0)) * a * s * s * b // t
        terms["attention q,k,v,out (eager)"] = 4 * e * sbh // t
        terms["attention softmax (s^2)"] = probs
    # SwiGLU: gate and up outputs (swiglu inputs) and its output (down_proj input).
    terms["swiglu gate,up,out"] = 3 * e * s * b * f // t
    return terms


def layer_activation_bytes(
    dims: LlamaDims | Mapping[str, Any], shape: ActivationShape, granularity: str | None = None
) -> int:
    """Bytes one decoder layer keeps per micro-batch under a recompute granularity (None = none).

    full: only the layer input (e*s*b*h); full_attn: drop attention internals, keep the input norm
    and the MLP; core_attn: drop the attention core (flash: the lse; eager: k^T/v copies and s^2).
    """
    d = LlamaDims.of(dims)
    terms = activation_terms(d, shape)
    total = sum(terms.values())
    if granularity is None:
        return total
    s, b, t, e = shape.seq, shape.micro_batch, shape.tp, shape.act_bytes
    sbh = s * b * d.hidden_size
    if granularity == "full":
        return e * sbh // (t if shape.sequence_parallel else 1)
    if granularity == "full_attn":
        # The recompute input is the input norm's output, already counted among the norm outputs.
        return total - sum(v for k, v in terms.items() if "attention" in k or "rope" in k)
    if granularity == "core_attn":
        if shape.flash_attention:
            return total - 4 * d.num_attention_heads * s * b // t
        # The recompute keeps its inputs q, k, v (after repeat_kv: full heads), the same sizes as
        # the transposed copies the eager path would keep, so only the s^2 softmax goes.
        return total - terms["attention softmax (s^2)"]
    raise EstimateError(f"unknown recompute granularity {granularity!r}")


def head_activation_bytes(dims: LlamaDims | Mapping[str, Any], shape: ActivationShape) -> tuple[int, int]:
    """(kept, transient) bytes of final norm + lm_head + loss for one micro-batch.

    Kept: the norm, its output (lm_head input), the fp32 softmax of the cross entropy
    (PaddleNLP casts logits to float32 before the loss) and the labels/loss mask. Transient: the 16-bit logits and their
    fp32 copy, alive while the loss is formed and again as gradients in its backward.
    """
    d = LlamaDims.of(dims)
    s, b, t, e = shape.seq, shape.micro_batch, shape.tp, shape.act_bytes
    sbh = s * b * d.hidden_size
    v_local = d.vocab_size // t if t > 1 and d.vocab_size % t == 0 else d.vocab_size
    sp = t if shape.sequence_parallel else 1
    norm = (
        (e * sbh + 4 * s * b) // sp
        if shape.fused_rms_norm
        else ((2 * e + (4 if e != 4 else 0)) * sbh + 4 * s * b) // sp
    )
    # + loss bookkeeping: int64 labels and two fp32 (s, b) masks of the masked mean.
    kept = norm + e * sbh + 4 * s * b * v_local + 16 * s * b
    transient = (e + (4 if e != 4 else 0)) * s * b * v_local
    return kept, transient


# ---------------------------------------------------------------------------------------------
# memory per device


@dataclass(frozen=True)
class EstimateOptions:
    """Knobs that are assumptions, not PaddleNLP arguments (defaults explained in docs/PLANNING.md)."""

    # Device memory the allocator never gets: runtime context, kernels, collective-library buffers,
    # library workspaces. Not measured on BI150; 2 GiB is a conservative round number.
    reserve_bytes: int = 2 * GIB
    # Caching-allocator fragmentation, as a fraction of the modelled tensors.
    fragmentation: float = 0.10
    seg_method: str | tuple[int, ...] = "auto"


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes on the most loaded rank of one pipeline stage."""

    stage: int
    descs: tuple[int, int]  # [first, end) pipe descs
    decoder_layers: tuple[int, ...]
    recomputed_layers: tuple[int, ...]
    params_numel: int  # parameters held by one rank of this stage (after tp, before sharding stage3)
    parameters: int
    gradients: int
    master_weights: int
    optimizer_moments: int
    activations_per_microbatch: int
    microbatches_in_flight: int
    activations: int
    pipeline_buffers: int
    transient: int
    modelled: int
    fragmentation: int
    reserve: int
    total: int


@dataclass(frozen=True)
class MemoryEstimate:
    precision: str
    stages: tuple[StageMemory, ...]
    peak_stage: int
    peak_bytes: int
    device_memory_bytes: int | None
    verdict: str  # "fits", "does not fit" or "unknown" (device memory unknown)
    headroom_bytes: int | None
    headroom_fraction: float | None
    assumptions: tuple[str, ...] = field(default_factory=tuple)


def _pos_int(args: Mapping[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EstimateError(f"{key} must be a positive integer, got {value!r}")
    return value


def memory_per_device(
    dims: LlamaDims | Mapping[str, Any],
    degrees: Degrees,
    args: Mapping[str, Any],
    *,
    device_memory_bytes: int | None = None,
    options: EstimateOptions | None = None,
) -> MemoryEstimate:
    """Per-stage memory of one rank, the maximum over stages, and a verdict against the device.

    Parameters/gradients/optimizer state follow the precision and sharding stage; activations are
    per micro-batch x the micro-batches 1F1B keeps in flight on that stage (stage i: min(pp - i,
    gradient_accumulation_steps)); plus pipeline buffers, the largest transient, allocator
    fragmentation and a fixed reserve (``EstimateOptions``).
    """
    d = LlamaDims.of(dims)
    opts = options or EstimateOptions()
    if not 0 <= opts.fragmentation < 1:
        raise EstimateError(f"fragmentation must be in [0, 1), got {opts.fragmentation}")
    if opts.reserve_bytes < 0:
        raise EstimateError(f"reserve_bytes must be >= 0, got {opts.reserve_bytes}")
    if device_memory_bytes is not None and device_memory_bytes <= 0:
        raise EstimateError(f"device memory must be positive, got {device_memory_bytes}")
    vpp = _pos_int(args, "virtual_pp_degree", 1)
    if vpp > 1:
        raise EstimateError("virtual_pp_degree > 1 (interleaved 1F1B) is not modelled; estimate with 1")
    for key in ("offload_optim", "offload_recompute_inputs"):
        if _flag(args, key):
            raise EstimateError(
                f"{key}: host offloading is not modelled; estimate without it (an upper bound)"
            )
    if degrees.sharding_offload:
        raise EstimateError("sharding 'offload' is not modelled; estimate without it (an upper bound)")
    prec = precision_of(args)
    tp, pp, sd, sep = degrees.tp, degrees.pp, degrees.sharding, degrees.sep
    seq = _pos_int(args, "max_seq_length", 1024)
    if seq % sep:
        raise EstimateError(f"max_seq_length={seq} is not divisible by the sep/context degree {sep}")
    mb = _pos_int(args, "per_device_train_batch_size", 8)
    acc = _pos_int(args, "gradient_accumulation_steps", 1)
    granularity = _granularity(args)
    no_rc = _no_recompute(args, d.num_hidden_layers)
    shape = ActivationShape(
        seq=seq // sep,
        micro_batch=mb,
        tp=tp,
        act_bytes=prec.act_bytes,
        sequence_parallel=_flag(args, "sequence_parallel") and tp > 1,
        flash_attention=_flag(args, "use_flash_attention"),
        fused_rms_norm=_flag(args, "use_fused_rms_norm"),
        fused_rope=_flag(args, "use_fused_rope"),
    )
    stage_kind = degrees.sharding_stage if sd > 1 else ""
    split_param = "split_param" in str(args.get("sharding_parallel_config") or "")

    descs = pipe_desc_tensors(d, tp)
    seg = pipeline_segments(d.num_hidden_layers, pp, opts.seg_method)
    full_layer = layer_activation_bytes(d, shape, None)
    rc_layer = layer_activation_bytes(d, shape, granularity) if granularity else full_layer
    head_kept, head_transient = head_activation_bytes(d, shape)
    sbh_bytes = prec.act_bytes * shape.seq * mb * d.hidden_size // (tp if shape.sequence_parallel else 1)

    stages = []
    for i in range(pp):
        lo, hi = seg[i], seg[i + 1]
        tensors = [numel for k in range(lo, hi) for _, numel in descs[k]]
        if pp == 1 and d.tie_word_embeddings:
            tensors = tensors[:-1]  # one model: the tied lm_head is the embedding weight itself
        numel = sum(tensors)
        layers = tuple(k - 1 for k in range(lo, hi) if 1 <= k <= d.num_hidden_layers)
        recomputed = tuple(x for x in layers if granularity and x not in no_rc)
        is_last = hi == len(descs)

        # Optimizer state on the most loaded sharding rank.
        if stage_kind == "stage1" and not split_param:
            owned = sharding_partition(tensors, sd)
            counts = _sharding_owned_tensors(tensors, sd)
            rank = owned.index(max(owned))
            opt_numel, opt_tensors = owned[rank], counts[rank]
        elif stage_kind:
            opt_numel, opt_tensors = math.ceil(numel / sd), math.ceil(len(tensors) / sd)
        else:
            opt_numel, opt_tensors = numel, len(tensors)
        master = prec.master_bytes * opt_numel
        moments = prec.moment_bytes * opt_numel + BETA_POW_BYTES_PER_TENSOR * opt_tensors
        grads = prec.grad_bytes * (math.ceil(numel / sd) if stage_kind in ("stage2", "stage3") else numel)
        params = prec.param_bytes * (math.ceil(numel / sd) if stage_kind == "stage3" else numel)

        per_mb = sum(rc_layer if x in recomputed else full_layer for x in layers)
        if is_last:
            per_mb += head_kept
        in_flight = min(pp - i, acc)
        acts = per_mb * in_flight
        # 1F1B keeps each in-flight micro-batch's stage output for its backward (not on the last
        # stage, whose output is the loss), plus one receive buffer each way for p2p.
        buffers = 0
        if not is_last:
            buffers += in_flight * sbh_bytes + sbh_bytes
        if i > 0:
            buffers += sbh_bytes
        transient = max(full_layer if recomputed else 0, head_transient if is_last else 0)
        modelled = params + grads + master + moments + acts + buffers + transient
        frag = int(modelled * opts.fragmentation)
        stages.append(
            StageMemory(
                stage=i,
                descs=(lo, hi),
                decoder_layers=layers,
                recomputed_layers=recomputed,
                params_numel=numel,
                parameters=params,
                gradients=grads,
                master_weights=master,
                optimizer_moments=moments,
                activations_per_microbatch=per_mb,
                microbatches_in_flight=in_flight,
                activations=acts,
                pipeline_buffers=buffers,
                transient=transient,
                modelled=modelled,
                fragmentation=frag,
                reserve=opts.reserve_bytes,
                total=modelled + frag + opts.reserve_bytes,
            )
        )
    peak = max(stages, key=lambda st: st.total)
    if device_memory_bytes is None:
        verdict, headroom, frac = "unknown", None, None
    else:
        headroom = device_memory_bytes - peak.total
        frac = headroom / device_memory_bytes
        verdict = "fits" if headroom >= 0 else "does not fit"
    assumptions = (
        f"precision {prec.name}: params {prec.param_bytes} B, grads {prec.grad_bytes} B, master {prec.master_bytes} B, "
        f"AdamW moments {prec.moment_bytes} B per element; activations {prec.act_bytes} B",
        f"sharding {stage_kind or 'off'} x{sd}: "
        + (
            "optimizer state by DygraphShardingOptimizer's greedy split (most loaded rank)"
            if stage_kind == "stage1" and not split_param
            else "even split"
            if stage_kind
            else "nothing sharded"
        ),
        f"pipeline segments {seg}; 1F1B keeps min(pp - stage, {acc}) micro-batches in flight",
        f"recompute {granularity or 'off'}"
        + (f", {len(no_rc)} layers excluded by no_recompute_layers" if granularity and no_rc else ""),
        f"attention {'flash' if shape.flash_attention else 'eager (s^2 softmax kept)'}, "
        f"RMSNorm {'fused' if shape.fused_rms_norm else 'unfused'}, RoPE {'fused' if shape.fused_rope else 'unfused'}",
        f"reserve {opts.reserve_bytes / GIB:.2f} GiB and fragmentation {opts.fragmentation:.0%} are assumptions, not measurements",
    )
    return MemoryEstimate(
        precision=prec.name,
        stages=tuple(stages),
        peak_stage=peak.stage,
        peak_bytes=peak.total,
        device_memory_bytes=device_memory_bytes,
        verdict=verdict,
        headroom_bytes=headroom,
        headroom_fraction=frac,
        assumptions=assumptions,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per trained token, under the conventions people compare against.

    hardware: PaddleNLP's formula with the recompute that actually happens (no_recompute_layers
    honoured); paddlenlp_logged: what PaddleNLP's ``get_hardware_flops`` uses, which ignores
    no_recompute_layers; model: PaddleNLP's ``get_model_flops`` (no recompute) - the numerator
    of MFU here; six_n: 6 x parameters; six_n_attention: 6N + 12 L h s (PaLM/Megatron).
    """

    seq_len: int
    recomputed_layers: int
    hardware: float
    paddlenlp_logged: float
    model: float
    six_n: float
    six_n_attention: float


def _layer_flops(d: LlamaDims, s: int) -> tuple[int, int, int]:
    """Per-sequence forward matmul terms of one layer, as in caculate_llm_per_token_flops (no GQA term)."""
    h, f = d.hidden_size, d.intermediate_size
    qkvo = 4 * s * h * h
    core = 2 * s * s * h
    ffn = 3 * s * h * f + s * f
    return qkvo, core, ffn


def _paddlenlp_flops(d: LlamaDims, s: int, recomputed: int, granularity: str | None) -> float:
    qkvo, core, ffn = _layer_flops(d, s)
    per_layer = qkvo + core + ffn
    rc = {None: 0, "full": per_layer, "full_attn": qkvo + core, "core_attn": core}[granularity]
    logits = s * d.hidden_size * d.vocab_size
    return 2 * (d.num_hidden_layers * 3 * per_layer + recomputed * rc + 3 * logits) / s


def flops_per_token(
    dims: LlamaDims | Mapping[str, Any],
    seq_len: int,
    recompute: bool = False,
    recompute_granularity: str = "full",
    no_recompute_layers: Sequence[int] | None = None,
) -> FlopsPerToken:
    """FLOPs per token (13B, s=2048: 82.15 G model, 94.32 G with the Iluvatar recompute set, 109.20 G full)."""
    d = LlamaDims.of(dims)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise EstimateError(f"seq_len must be a positive integer, got {seq_len!r}")
    gran = _granularity({"recompute": recompute, "recompute_granularity": recompute_granularity})
    skip = _no_recompute({"no_recompute_layers": list(no_recompute_layers or [])}, d.num_hidden_layers)
    recomputed = d.num_hidden_layers - len(skip) if gran else 0
    n = param_counts(d).total
    return FlopsPerToken(
        seq_len=seq_len,
        recomputed_layers=recomputed,
        hardware=_paddlenlp_flops(d, seq_len, recomputed, gran),
        paddlenlp_logged=_paddlenlp_flops(d, seq_len, d.num_hidden_layers if gran else 0, gran),
        model=_paddlenlp_flops(d, seq_len, 0, None),
        six_n=6.0 * n,
        six_n_attention=6.0 * n + 12.0 * d.num_hidden_layers * d.hidden_size * seq_len,
    )


# ---------------------------------------------------------------------------------------------
# throughput


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation; None when the device peak is unknown (never a guessed peak)."""
    if peak is None:
        return None
    if peak <= 0 or flops_per_token <= 0 or tokens_per_s_per_device < 0:
        raise EstimateError("mfu needs a positive peak and FLOPs per token and a non-negative rate")
    return tokens_per_s_per_device * flops_per_token / peak


def paddlenlp_logged_tflops(tokens_per_s_per_device: float, hardware_flops_per_token: float) -> float:
    """What PaddleNLP prints as ``interval_hardware_tflops_per_device`` (divides by 2**40, not 1e12)."""
    return tokens_per_s_per_device * hardware_flops_per_token / PADDLENLP_TFLOPS_DIVISOR


@dataclass(frozen=True)
class ThroughputForecast:
    peak_flops: float | None
    assumed_mfu: float | None
    model_flops_per_token: float
    hardware_flops_per_token: float
    # tokens/s/device per 1 TFLOPS (1e12) of peak at the assumed MFU: usable while the peak is unknown.
    tokens_per_s_per_device_per_peak_tflops: float | None
    tokens_per_s_per_device: float | None
    global_batch_tokens: int
    world_size: int
    step_time_s: float | None
    max_steps: int | None
    time_to_max_steps_s: float | None
    basis: str  # "peak x MFU", "measured" or "unknown"
    paddlenlp_logged_tflops: float | None
    implied_mfu: float | None


def throughput_forecast(
    model_flops_per_token: float,
    peak_flops: float | None,
    assumed_mfu: float | None,
    *,
    global_batch_tokens: int,
    world_size: int,
    max_steps: int | None = None,
    hardware_flops_per_token: float | None = None,
    measured_tokens_per_s_per_device: float | None = None,
) -> ThroughputForecast:
    """tokens/s/device = MFU x peak / model FLOPs per token (or a measured rate), then step time =
    global batch tokens / (tokens/s/device x world) and time to max_steps. Unknown peak -> None."""
    if model_flops_per_token <= 0:
        raise EstimateError("model FLOPs per token must be positive")
    if global_batch_tokens < 1 or world_size < 1:
        raise EstimateError("global batch tokens and world size must be positive")
    if assumed_mfu is not None and not 0 < assumed_mfu <= 1:
        raise EstimateError(f"assumed MFU must be in (0, 1], got {assumed_mfu}")
    if peak_flops is not None and peak_flops <= 0:
        raise EstimateError(f"peak FLOP/s must be positive, got {peak_flops}")
    if measured_tokens_per_s_per_device is not None and measured_tokens_per_s_per_device <= 0:
        raise EstimateError("a measured tokens/s/device must be positive")
    hw = model_flops_per_token if hardware_flops_per_token is None else hardware_flops_per_token
    per_tflops = None if assumed_mfu is None else assumed_mfu * TERA / model_flops_per_token
    if measured_tokens_per_s_per_device is not None:
        rate, basis = measured_tokens_per_s_per_device, "measured"
    elif peak_flops is not None and assumed_mfu is not None:
        rate, basis = assumed_mfu * peak_flops / model_flops_per_token, "peak x MFU"
    else:
        rate, basis = None, "unknown"
    step = None if rate is None else global_batch_tokens / (rate * world_size)
    steps = None if max_steps is None or max_steps < 1 else max_steps
    return ThroughputForecast(
        peak_flops=peak_flops,
        assumed_mfu=assumed_mfu,
        model_flops_per_token=model_flops_per_token,
        hardware_flops_per_token=hw,
        tokens_per_s_per_device_per_peak_tflops=per_tflops,
        tokens_per_s_per_device=rate,
        global_batch_tokens=global_batch_tokens,
        world_size=world_size,
        step_time_s=step,
        max_steps=steps,
        time_to_max_steps_s=None if step is None or steps is None else step * steps,
        basis=basis,
        paddlenlp_logged_tflops=None if rate is None else paddlenlp_logged_tflops(rate, hw),
        implied_mfu=None if rate is None else mfu(rate, model_flops_per_token, peak_flops),
    )


# ---------------------------------------------------------------------------------------------
# whole job


def model_dims_for(job_args: Mapping[str, Any]) -> LlamaDims:
    """Dims from a local ``<model_name_or_path>/config.json`` or the known hub names (plan.KNOWN_MODELS)."""
    from bi150_ray.plan import KNOWN_MODELS  # lazy: plan may import this module

    name = job_args.get("model_name_or_path")
    if not isinstance(name, str) or not name:
        raise EstimateError("model_name_or_path is not set; pass dims= explicitly")
    cfg_file = os.path.join(name, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as fh:
            cfg = json.load(fh)
    elif name in KNOWN_MODELS:
        cfg = dict(KNOWN_MODELS[name])
    else:
        raise EstimateError(
            f"model {name!r} is neither a local directory nor a known model; pass dims= explicitly"
        )
    if job_args.get("num_hidden_layers"):
        cfg["num_hidden_layers"] = job_args["num_hidden_layers"]
    return LlamaDims.of(cfg)


def estimate(
    job_args: Mapping[str, Any],
    nodes: int,
    devices_per_node: int,
    device: DeviceSpec,
    *,
    dims: LlamaDims | Mapping[str, Any] | None = None,
    assumed_mfu: float | None = 0.40,
    measured_tokens_per_s_per_device: float | None = None,
    options: EstimateOptions | None = None,
) -> dict[str, Any]:
    """Everything for one job on one cluster shape, as a JSON-ready dict (see format_estimate)."""
    if nodes < 1 or devices_per_node < 1:
        raise EstimateError(
            f"need at least one node and one device per node, got {nodes} x {devices_per_node}"
        )
    world = nodes * devices_per_node
    degrees = resolve_degrees(job_args, world)
    d = model_dims_for(job_args) if dims is None else LlamaDims.of(dims)
    mem = memory_per_device(d, degrees, job_args, device_memory_bytes=device.memory_bytes, options=options)
    prec = precision_of(job_args)
    seq = _pos_int(job_args, "max_seq_length", 1024)
    gran = _granularity(job_args)
    flops = flops_per_token(
        d,
        seq,
        recompute=gran is not None,
        recompute_granularity=gran or "full",
        no_recompute_layers=sorted(_no_recompute(job_args, d.num_hidden_layers)),
    )
    batch_tokens = (
        _pos_int(job_args, "per_device_train_batch_size", 8)
        * _pos_int(job_args, "gradient_accumulation_steps", 1)
        * degrees.dataset_world_size
        * seq
    )
    max_steps = job_args.get("max_steps")
    tput = throughput_forecast(
        flops.model,
        device.peak(prec.compute_dtype),
        assumed_mfu,
        global_batch_tokens=batch_tokens,
        world_size=world,
        max_steps=int(max_steps) if isinstance(max_steps, int) and max_steps > 0 else None,
        hardware_flops_per_token=flops.hardware,
        measured_tokens_per_s_per_device=measured_tokens_per_s_per_device,
    )
    return {
        "device": asdict(device) | {"peak_flops": dict(device.peak_flops) if device.peak_flops else None},
        "cluster": {"nodes": nodes, "devices_per_node": devices_per_node, "world_size": world},
        "degrees": {
            "tp": degrees.tp,
            "pp": degrees.pp,
            "sharding": degrees.sharding,
            "sep": degrees.sep,
            "dp": degrees.dp,
            "sharding_stage": degrees.sharding_stage,
        },
        "model": asdict(d) | {"params": asdict(param_counts(d))},
        "memory": asdict(mem),
        "flops_per_token": asdict(flops),
        "throughput": asdict(tput),
        "verdict": mem.verdict,
    }


def _gib(x: int | float | None) -> str:
    return "unknown" if x is None else f"{x / GIB:.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.2f} days"


def format_estimate(est: Mapping[str, Any]) -> str:
    """Human-readable table of an ``estimate()`` result."""
    dev, deg, mem, fl, tp = (
        est["device"],
        est["degrees"],
        est["memory"],
        est["flops_per_token"],
        est["throughput"],
    )
    p = est["model"]["params"]
    lines = [
        f"device {dev['name']}: {_gib(dev['memory_bytes'])} GiB, peak "
        + (
            ", ".join(
                f"{k} {v / TERA:g} TFLOPS" if v else f"{k} unknown" for k, v in dev["peak_flops"].items()
            )
            if dev["peak_flops"]
            else "unknown"
        ),
        f"cluster {est['cluster']['nodes']} x {est['cluster']['devices_per_node']} = {est['cluster']['world_size']} ranks; "
        f"tp {deg['tp']} pp {deg['pp']} sharding {deg['sharding']} ({deg['sharding_stage'] or 'off'}) sep {deg['sep']} dp {deg['dp']}",
        f"model {p['total']:,} parameters ({p['per_layer']:,} per layer x {p['layers'] // max(p['per_layer'], 1)}); "
        f"precision {mem['precision']}",
        "",
        "memory per device (GiB), most loaded rank of each pipeline stage:",
        f"{'stage':>5} {'layers':>8} {'rc':>3} {'params':>7} {'grads':>7} {'master':>7} {'adam':>7} "
        f"{'act/mb':>7} {'x mb':>4} {'acts':>7} {'buf':>6} {'trans':>6} {'frag':>6} {'rsv':>5} {'total':>7}",
    ]
    for st in mem["stages"]:
        layers = st["decoder_layers"]
        span = f"{layers[0]}-{layers[-1]}" if layers else "-"
        lines.append(
            f"{st['stage']:>5} {span:>8} {len(st['recomputed_layers']):>3} {_gib(st['parameters']):>7} "
            f"{_gib(st['gradients']):>7} {_gib(st['master_weights']):>7} {_gib(st['optimizer_moments']):>7} "
            f"{_gib(st['activations_per_microbatch']):>7} {st['microbatches_in_flight']:>4} {_gib(st['activations']):>7} "
            f"{_gib(st['pipeline_buffers']):>6} {_gib(st['transient']):>6} {_gib(st['fragmentation']):>6} "
            f"{_gib(st['reserve']):>5} {_gib(st['total']):>7}"
        )
    head = mem["headroom_bytes"]
    lines.append(
        f"peak: stage {mem['peak_stage']} {_gib(mem['peak_bytes'])} GiB of {_gib(mem['device_memory_bytes'])} GiB -> "
        f"{mem['verdict'].upper()}"
        + ("" if head is None else f" (headroom {_gib(head)} GiB, {mem['headroom_fraction']:.0%})")
    )
    lines += [
        "",
        f"FLOPs per token (seq {fl['seq_len']}): model {fl['model'] / 1e9:.2f} G, hardware {fl['hardware'] / 1e9:.2f} G "
        f"({fl['recomputed_layers']} layers recomputed), PaddleNLP-logged {fl['paddlenlp_logged'] / 1e9:.2f} G, "
        f"6N {fl['six_n'] / 1e9:.2f} G, 6N+attention {fl['six_n_attention'] / 1e9:.2f} G",
        f"global batch {tp['global_batch_tokens']:,} tokens per step",
    ]
    if tp["tokens_per_s_per_device"] is None:
        per = tp["tokens_per_s_per_device_per_peak_tflops"]
        lines.append(
            "throughput: unknown (device peak not configured)"
            + (
                f"; at {tp['assumed_mfu']:.0%} MFU, tokens/s/device = {per:.2f} x peak TFLOPS"
                if per is not None
                else ""
            )
        )
    else:
        lines.append(
            f"throughput ({tp['basis']}): {tp['tokens_per_s_per_device']:,.1f} tokens/s/device, "
            f"step {_duration(tp['step_time_s'])}, {tp['max_steps'] or '?'} steps in {_duration(tp['time_to_max_steps_s'])}"
            + (f", MFU {tp['implied_mfu']:.1%}" if tp["implied_mfu"] is not None else "")
            + f", PaddleNLP would log {tp['paddlenlp_logged_tflops']:.1f} 'TFLOPS' (2^40)"
        )
    lines += ["", "assumptions:"] + [f"  - {a}" for a in mem["assumptions"]]
    return "\n".join(lines)
