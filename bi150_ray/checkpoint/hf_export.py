"""Export a gathered model to the Hugging Face LLaMA layout (`transformers.LlamaForCausalLM`).

Names and which tensors are transposed come from PaddleNLP's own HF<->Paddle table
(`LlamaForCausalLM._get_name_mappings`, the one PaddleNLP uses to load HF checkpoints): Paddle's
Linear weights are [in, out], torch's are [out, in], so every Linear weight (and lm_head) is
transposed; embeddings and norms are not. config.json carries HF `LlamaConfig` fields. The output
has the same checksum manifest and completion marker as a gathered directory and is written under
a temporary name first.

Only the plain LLaMA layout is exported: fused qkv/ffn weights, ALiBi and RoPE scaling are refused
with a clear error rather than exported wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from bi150_ray.checkpoint.gather import INDEX, GatherError, verify_gathered
from bi150_ray.checkpoint.merge import DEFAULT_MAX_SHARD_BYTES, MergeError, write_model_dir

# PaddleNLP tokenizer file -> HF name. LlamaTokenizer reads the same SentencePiece model.
_TOKENIZER_FILES = {"sentencepiece.bpe.model": "tokenizer.model", "special_tokens_map.json": "special_tokens_map.json"}


def hf_config(paddle_config: Mapping[str, Any], torch_dtype: str) -> dict[str, Any]:
    """HF LlamaConfig fields from a PaddleNLP LLaMA config.json; refuses what HF LLaMA cannot express."""
    c = dict(paddle_config)
    if c.get("fuse_attention_qkv") or c.get("fuse_attention_ffn"):
        raise MergeError("HF export: fused qkv/ffn weights are not supported (train with fuse_attention_qkv/ffn false)")
    if c.get("alibi"):
        raise MergeError("HF export: ALiBi LLaMA has no Hugging Face LlamaForCausalLM equivalent")
    if c.get("rope_scaling_type") or c.get("use_long_sequence_strategies"):
        raise MergeError(f"HF export: RoPE scaling ({c.get('rope_scaling_type') or c.get('long_sequence_strategy_name')}) is not supported")
    heads = c["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c["hidden_size"] // heads,
        "vocab_size": c["vocab_size"],
        "max_position_embeddings": c.get("max_position_embeddings", 2048),
        "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": c.get("rope_theta", 10000.0),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": c.get("initializer_range", 0.02),
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "bos_token_id": c.get("bos_token_id", 1),
        "eos_token_id": c.get("eos_token_id", 2),
        "pad_token_id": c.get("pad_token_id", 0),
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def name_map(paddle_config: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """Paddle name -> (HF name, transpose?), from PaddleNLP's own mapping table."""
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict({**paddle_config, "architectures": ["LlamaForCausalLM"]})
    return {m.target_name: (m.source_name, m.should_transpose()) for m in LlamaForCausalLM._get_name_mappings(cfg)}


def _tensors(model_dir: str, mapping: dict[str, tuple[str, bool]]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    with open(os.path.join(model_dir, INDEX), encoding="utf-8") as fh:
        weight_map: dict[str, str] = json.load(fh)["weight_map"]
    unmapped = sorted(k for k in weight_map if k not in mapping)
    if unmapped:
        raise MergeError(f"{model_dir}: no Hugging Face name for {unmapped[:5]} (not a plain LlamaForCausalLM)")
    by_file: dict[str, list[str]] = {}
    for key, f in weight_map.items():
        by_file.setdefault(f, []).append(key)
    for f, keys in sorted(by_file.items()):
        with safe_open(os.path.join(model_dir, f), framework="np") as st:
            for key in sorted(keys):
                hf_name, transpose = mapping[key]
                value = st.get_tensor(key)
                yield hf_name, np.ascontiguousarray(value.T) if transpose else value


def export_hf(model_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """A gathered model dir (verified against its manifest first) -> an HF LLaMA dir at `out_dir`."""
    manifest = verify_gathered(model_dir)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    with open(os.path.join(model_dir, INDEX), encoding="utf-8") as fh:
        first_file = sorted(set(json.load(fh)["weight_map"].values()))[0]
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, first_file), framework="np") as st:
        dtype = st.get_tensor(next(iter(st.keys()))).dtype.name
    torch_dtype = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(dtype)
    if torch_dtype is None:
        raise GatherError(f"{model_dir}: weights are {dtype}; HF export handles float32/float16/bfloat16")
    hf = hf_config(config, torch_dtype)
    extra: dict[str, bytes] = {}
    for src, dst in _TOKENIZER_FILES.items():
        path = os.path.join(model_dir, src)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                extra[dst] = fh.read()
    if "tokenizer.model" in extra:
        extra["tokenizer_config.json"] = json.dumps({"tokenizer_class": "LlamaTokenizer"}, indent=2).encode()
    provenance = {"exported_from": os.path.abspath(model_dir), "layout": "huggingface-llama",
                  **{k: manifest[k] for k in ("global_step", "degrees", "run_name") if k in manifest}}
    return write_model_dir(_tensors(model_dir, name_map(config)), hf, out_dir, max_shard_bytes, extra, provenance,
                           finalize_config=lambda c: dict(c), st_format="pt")
