"""Build checkpoint folders the way PaddleNLP's trainer saves them, from a real tiny LlamaForCausalLM.

Tensor shards use PaddleNLP's own split mappings (`_get_tensor_parallel_mappings(is_split=True)`);
pipeline stages use Paddle's own `SegmentLayers` over the same layer list LlamaForCausalLMPipe builds
(embedding, decoders, norm, lm_head); file names follow `TrainingArguments.weight_name_suffix`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import numpy as np


def tiny_config(num_layers: int = 4, **overrides):
    from paddlenlp.transformers import LlamaConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
        seq_length=64,
        num_hidden_layers=num_layers,
    )
    kw.update(overrides)
    # PaddleNLP 3.0.0b4 quirk: PretrainedConfig.__init__ resets fuse_attention_qkv/ffn to False after
    # LlamaConfig sets them, so (like run_pretrain) they must be assigned after construction.
    fused = {k: kw.pop(k) for k in ("fuse_attention_qkv", "fuse_attention_ffn") if k in kw}
    config = LlamaConfig(**kw)
    for key, value in fused.items():
        setattr(config, key, value)
    return config


def build_model(config, seed: int = 0):
    """A float32 model whose every tensor (norms too) is random, so a misplaced tensor cannot pass."""
    import paddle
    from paddlenlp.transformers import LlamaForCausalLM

    paddle.set_device("cpu")
    model = LlamaForCausalLM.from_config(config, dtype="float32")
    rng = np.random.default_rng(seed)
    state = {
        k: (rng.standard_normal(v.shape) * 0.05).astype("float32") for k, v in model.state_dict().items()
    }
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    model.eval()
    return model, state


def pipe_bounds(config, pp: int, seg_method: str | Sequence[int] | None = None) -> list[int]:
    """Stage boundaries over pipeline items, computed by Paddle's SegmentLayers like LlamaForCausalLMPipe."""
    from paddle.distributed.fleet.meta_parallel import LayerDesc
    from paddle.distributed.fleet.meta_parallel.parallel_layers.pp_layers import SegmentLayers
    from paddlenlp.transformers.llama.modeling_pp import (
        LlamaDecoderLayerPipe,
        LlamaEmbeddingPipe,
        LlamaLMHeadPipe,
        LlamaRMSNormPipe,
    )

    n = config.num_hidden_layers
    descs = [LayerDesc(LlamaEmbeddingPipe, config=config)]
    descs += [LayerDesc(LlamaDecoderLayerPipe, config=config) for _ in range(n)]
    descs += [LayerDesc(LlamaRMSNormPipe, config=config), LayerDesc(LlamaLMHeadPipe, config=config)]
    if seg_method is None:  # LlamaForCausalLMPipe.__init__'s choice
        seg_method = "layer:LlamaDecoderLayer" if n % pp == 0 else "uniform"
    method = list(seg_method) if not isinstance(seg_method, str) else seg_method
    return SegmentLayers(descs, num_parts=pp, method=method).do_segment()


def pipe_item(key: str, num_layers: int) -> int:
    """Index of the pipeline item that owns a single-model key (the pipe's add_sequential_layer order)."""
    if key.startswith("llama.embed_tokens."):
        return 0
    if key.startswith("llama.layers."):
        return 1 + int(key.split(".")[2])
    if key.startswith("llama.norm."):
        return num_layers + 1
    if key.startswith("lm_head."):
        return num_layers + 2
    raise ValueError(key)


def stage_of(key: str, bounds: Sequence[int], num_layers: int) -> int:
    item = pipe_item(key, num_layers)
    for stage in range(len(bounds) - 1):
        if bounds[stage] <= item < bounds[stage + 1]:
            return stage
    raise ValueError(key)


def shard_name(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """TrainingArguments.weight_name_suffix + PaddleNLP's _add_variant."""
    from paddlenlp.transformers.model_utils import _add_variant

    parts = []
    if tp > 1:
        parts.append(f"tp{tp_rank:0>2d}")
    if pp > 1:
        parts.append(f"pp{pp_rank:0>2d}")
    return _add_variant("model_state.pdparams", "_".join(parts) or None)


def tp_split(state: dict[str, np.ndarray], config, tp: int, rank: int) -> dict[str, np.ndarray]:
    """One tp rank's tensors, cut by PaddleNLP's own split mappings."""
    from paddlenlp.transformers import LlamaForCausalLM

    if tp == 1:
        return dict(state)
    cfg = copy.deepcopy(config)
    cfg.tensor_parallel_degree = tp
    cfg.tensor_parallel_rank = rank
    actions = LlamaForCausalLM.get_tensor_parallel_convert_actions(cfg, list(state), is_split=True)
    return {k: (np.ascontiguousarray(actions[k](v)) if k in actions else v) for k, v in state.items()}


def save_checkpoint(
    state: dict[str, np.ndarray],
    config,
    out_dir: str,
    tp: int = 1,
    pp: int = 1,
    seg_method: str | Sequence[int] | None = None,
    dtype: str = "float32",
) -> list[str]:
    """Write model_state.<suffix>.pdparams per (tp, pp) rank plus config.json; returns the file names."""
    import paddle

    os.makedirs(out_dir, exist_ok=True)
    n = config.num_hidden_layers
    bounds = pipe_bounds(config, pp, seg_method) if pp > 1 else [0, n + 3]
    names = []
    for t in range(tp):
        rank_state = tp_split(state, config, tp, t)
        for p in range(pp):
            subset = {
                k: paddle.to_tensor(v).astype(dtype)
                for k, v in rank_state.items()
                if stage_of(k, bounds, n) == p
            }
            name = shard_name(t, p, tp, pp)
            paddle.save(subset, os.path.join(out_dir, name))
            names.append(name)
    cfg = copy.deepcopy(config)
    cfg.tensor_parallel_degree = tp
    cfg.dtype = dtype
    cfg.architectures = ["LlamaForCausalLMPipe" if pp > 1 else "LlamaForCausalLM"]
    cfg.save_pretrained(out_dir)
    return names
