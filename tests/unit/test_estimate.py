"""Planning estimates (bi150_ray/estimate.py) against the spec's numbers and against real Paddle.

Everything Paddle-side (tiny PaddleNLP models, AdamW state, the sharding optimizer's partition,
SegmentLayers, tensors autograd keeps) runs once in one subprocess, like test_topology.py, so
Paddle's import-time side effects stay out of pytest. No big model is ever built: the 13B numbers
are pure arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from bi150_ray.estimate import (
    GIB,
    MIB,
    ActivationShape,
    EstimateError,
    EstimateOptions,
    LlamaDims,
    estimate,
    find_device,
    flops_per_token,
    format_estimate,
    head_activation_bytes,
    layer_activation_bytes,
    load_registry,
    memory_per_device,
    mfu,
    paddlenlp_logged_tflops,
    param_counts,
    pipe_desc_tensors,
    pipeline_segments,
    sharding_partition,
    throughput_forecast,
)
from bi150_ray.plan import KNOWN_MODELS
from bi150_ray.topology import Degrees, TopologyError

LLAMA_13B = KNOWN_MODELS["__internal_testing__/sci-benchmark-llama-13b-init0501"]

# spec section 4.2, the FORK Iluvatar config (the keys the estimate reads).
REFERENCE_JOB = {
    "model_name_or_path": "__internal_testing__/sci-benchmark-llama-13b-init0501",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 128,
    "tensor_parallel_degree": 1,
    "pipeline_parallel_degree": 8,
    "sharding_parallel_degree": -1,
    "virtual_pp_degree": 1,
    "sharding": "stage1",
    "sequence_parallel": 0,
    "use_flash_attention": True,
    "use_fused_rms_norm": True,
    "use_fused_rope": True,
    "max_seq_length": 2048,
    "max_steps": 5000,
    "amp_master_grad": 1,
    "fp16": True,
    "fp16_opt_level": "O2",
    "recompute": True,
    "recompute_granularity": "full",
    "no_recompute_layers": [0, 4, 5, 9, 10, 14, 15, 19, 20, 24, 25, *range(29, 40)],
}

# Tiny configs for the real-model checks: MHA, GQA, MQA, tied embeddings.
TINY = [
    dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    dict(
        vocab_size=100,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=1,
    ),
    dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
]
# Activation probe: (dims, seq, micro-batch); fp32 eager path, the only one CPU Paddle runs.
ACT_DIMS = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
ACT_SEQ, ACT_MB = 32, 2
SEGMENT_CASES = [(40, 8), (40, 5), (7, 4), (6, 3), (3, 6), (10, 4)]

_PROBE = textwrap.dedent(
    """
    import json, sys, types
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM
    from paddlenlp.transformers.llama.modeling import (
        LlamaDecoderLayer, LlamaLMHead, LlamaPretrainingCriterion, LlamaRMSNorm)
    from paddlenlp.transformers.utils import caculate_llm_per_token_flops
    from paddle.distributed.fleet.utils import recompute
    from paddle.distributed.fleet.meta_parallel.parallel_layers.pp_layers import SegmentLayers
    from paddle.distributed.fleet.meta_optimizers.dygraph_optimizer.dygraph_sharding_optimizer import (
        DygraphShardingOptimizer)

    spec = json.load(open(sys.argv[1]))
    paddle.seed(0)
    out = {"models": [], "flops": {}, "segments": [], "act": {}}

    def acc_bytes(opt):
        return {k: [len(v), sum(t.numel().item() * t.element_size() for t in v.values()),
                    sorted({str(t.dtype) for t in v.values()})] for k, v in opt._accumulators.items()}

    for cfg in spec["tiny"]:
        m = LlamaForCausalLM.from_config(LlamaConfig(**cfg))
        out["models"].append({"numels": [p.numel().item() for p in m.parameters()],
                              "names": [n for n, _ in m.named_parameters()]})

    # fp32 AdamW after one real step on CPU.
    cfg = spec["tiny"][1]
    m = LlamaForCausalLM.from_config(LlamaConfig(**cfg))
    opt = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=m.parameters())
    ids = paddle.randint(0, cfg["vocab_size"], [2, 16])
    res = m(input_ids=ids, labels=ids)
    (res[0] if isinstance(res, tuple) else res.loss).backward()
    opt.step()
    out["adamw_fp32"] = {"acc": acc_bytes(opt), "master": len(getattr(opt, "_master_weights", {}) or {})}

    # fp16 params + multi_precision (O2): CPU has no fp16 adamw kernel, so create the state the
    # way the first step does (_create_accumulators) and count it.
    m16 = LlamaForCausalLM.from_config(LlamaConfig(**cfg), dtype="float16")
    params = m16.parameters()
    opt16 = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=params, multi_precision=True)
    opt16._create_accumulators(paddle.base.framework.default_main_program().global_block(), params)
    out["adamw_o2"] = {"acc": acc_bytes(opt16),
                       "master": sum(t.numel().item() * t.element_size() for t in opt16._master_weights.values()),
                       "param_dtypes": sorted({str(p.dtype) for p in params})}

    # Sharding stage1 (v1) partition: Paddle's own method on a stand-in object.
    out["partition"] = {}
    for sd in spec["sharding"]:
        fake = types.SimpleNamespace(_sharding_world_size=sd, _parameter_list=list(m.parameters()))
        mapping = DygraphShardingOptimizer._partition_parameters(fake)
        out["partition"][str(sd)] = [sum(p.numel().item() for p in mapping[r]) for r in range(sd)]

    # SegmentLayers over fake descs named like LlamaForCausalLMPipe's.
    def named(name):
        return type(name, (), {})
    for layers, pp in spec["segments"]:
        descs = [named("LlamaEmbeddingPipe")] + [named("LlamaDecoderLayerPipe") for _ in range(layers)]
        descs += [named("LlamaRMSNormPipe"), named("LlamaLMHeadPipe")]
        row = {"uniform": SegmentLayers(descs, pp, "uniform").do_segment()}
        if layers % pp == 0:
            row["layer"] = SegmentLayers(descs, pp, "layer:LlamaDecoderLayer").do_segment()
        out["segments"].append(row)

    # Bytes autograd keeps for one decoder layer (parameters excluded), per recompute granularity.
    s, b = spec["act_seq"], spec["act_mb"]
    def measure(gran):
        c = LlamaConfig(**spec["act_dims"], seq_length=s, recompute=gran is not None,
                        recompute_granularity=gran or "full", recompute_use_reentrant=True)
        layer = LlamaDecoderLayer(c, layerwise_recompute=True)
        layer.enable_recompute = layer.self_attn.enable_recompute = gran in ("full_attn", "core_attn")
        ptrs = {p.data_ptr() for p in layer.parameters()}
        saved = {}
        def pack(t):
            if t.data_ptr() not in ptrs:
                saved[t.data_ptr()] = t.numel().item() * t.element_size()
            return t
        x = paddle.randn([b, s, c.hidden_size]); x.stop_gradient = False
        pos = paddle.arange(s).expand([b, s])
        with paddle.autograd.saved_tensors_hooks(pack, lambda t: t):
            y = recompute(layer, x, pos, use_reentrant=True) if gran == "full" else layer(x, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        y.sum().backward()
        return sum(saved.values())
    for gran in (None, "full", "full_attn", "core_attn"):
        out["act"][str(gran)] = measure(gran)

    c = LlamaConfig(**spec["act_dims"], seq_length=s)
    norm, head, crit = LlamaRMSNorm(c), LlamaLMHead(c), LlamaPretrainingCriterion(c)
    ptrs = {p.data_ptr() for mod in (norm, head) for p in mod.parameters()}
    saved = {}
    def pack(t):
        if t.data_ptr() not in ptrs:
            saved[t.data_ptr()] = t.numel().item() * t.element_size()
        return t
    x = paddle.randn([b, s, c.hidden_size]); x.stop_gradient = False
    with paddle.autograd.saved_tensors_hooks(pack, lambda t: t):
        loss = crit(head(norm(x)), paddle.randint(0, c.vocab_size, [b, s]))
    loss.backward()
    out["head"] = sum(saved.values())

    d = spec["llama13b"]
    for key, kw in {"none": {}, "full": {"recompute": True, "recompute_granularity": "full"},
                    "full_attn": {"recompute": True, "recompute_granularity": "full_attn"},
                    "core_attn": {"recompute": True, "recompute_granularity": "core_attn"}}.items():
        out["flops"][key] = caculate_llm_per_token_flops(
            d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"], seq_length=2048, **kw)
    json.dump(out, open(sys.argv[2], "w"))
    """
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("estimate_probe")
    spec = {
        "tiny": TINY,
        "sharding": [2, 3, 4],
        "segments": SEGMENT_CASES,
        "act_dims": ACT_DIMS,
        "act_seq": ACT_SEQ,
        "act_mb": ACT_MB,
        "llama13b": LLAMA_13B,
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "probe.py").write_text(_PROBE)
    proc = subprocess.run(
        [sys.executable, str(tmp / "probe.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


# ---------------------------------------------------------------------------------------------
# parameters


def test_13b_parameter_count_is_exact():
    p = param_counts(LLAMA_13B)
    assert p.total == 13_015_864_320  # spec section 3.3
    assert p.embedding == p.lm_head == 163_840_000
    assert p.per_layer == 317_204_480
    assert p.total == 2 * 163_840_000 + 40 * 317_204_480 + 5120


@pytest.mark.parametrize("index", range(len(TINY)))
def test_parameter_counts_match_paddlenlp(probe, index):
    theirs = probe["models"][index]
    assert param_counts(TINY[index]).total == sum(theirs["numels"])
    # Same tensors in the same order as LlamaForCausalLM (the pipe descs flattened; tied: no lm_head).
    descs = pipe_desc_tensors(TINY[index])
    ours = [n for desc in descs for _, n in desc]
    if TINY[index].get("tie_word_embeddings"):
        ours = ours[:-1]
    assert ours == theirs["numels"]


def test_tied_embeddings_drop_the_lm_head():
    untied = param_counts(TINY[1] | {"tie_word_embeddings": False})
    tied = param_counts(TINY[1] | {"tie_word_embeddings": True})
    assert tied.lm_head == 0 and untied.total - tied.total == 96 * 64


# ---------------------------------------------------------------------------------------------
# optimizer state


def _unsharded(dims, args) -> int:
    est = memory_per_device(dims, Degrees(), args)
    st = est.stages[0]
    return st.master_weights + st.optimizer_moments


def test_fp32_adamw_state_matches_one_real_step(probe):
    acc = probe["adamw_fp32"]["acc"]
    numel = sum(probe["models"][1]["numels"])
    tensors = len(probe["models"][1]["numels"])
    assert acc["moment1"][1] == acc["moment2"][1] == 4 * numel  # fp32: 2 x params x 4 bytes
    assert acc["beta1_pow_acc"][1] == acc["beta2_pow_acc"][1] == 4 * tensors
    assert probe["adamw_fp32"]["master"] == 0
    actual = sum(v[1] for v in acc.values())
    assert _unsharded(TINY[1], {}) == actual


def test_o2_multi_precision_state_is_12_bytes_per_param(probe):
    o2 = probe["adamw_o2"]
    numel = sum(probe["models"][1]["numels"])
    assert o2["param_dtypes"] == ["paddle.float16"]
    assert o2["acc"]["moment1"][2] == o2["acc"]["moment2"][2] == ["paddle.float32"]
    assert o2["master"] == 4 * numel
    actual = sum(v[1] for v in o2["acc"].values()) + o2["master"]
    assert _unsharded(TINY[1], {"fp16": True, "fp16_opt_level": "O2"}) == actual


@pytest.mark.parametrize("sd", [2, 3, 4])
def test_sharding_partition_matches_paddles_greedy_split(probe, sd):
    numels = probe["models"][1]["numels"]
    assert sharding_partition(numels, sd) == probe["partition"][str(sd)]


def test_sharding_divides_optimizer_states():
    args = dict(REFERENCE_JOB)
    one = memory_per_device(LLAMA_13B, Degrees(pp=8), args)
    eight = memory_per_device(LLAMA_13B, Degrees(pp=8, sharding=8, sharding_stage="stage1"), args)
    for a, b in zip(one.stages, eight.stages, strict=True):
        # Greedy split: at least an even 1/8, at most 1/8 plus the largest tensor (gate/up/down, 12 B each).
        assert a.optimizer_moments / 8 <= b.optimizer_moments <= a.optimizer_moments / 8 + 12 * 5120 * 13824
        assert a.master_weights / 8 <= b.master_weights
        assert b.gradients == a.gradients and b.parameters == a.parameters  # stage1 shards only the optimizer
    stage2 = memory_per_device(
        TINY[1], Degrees(sharding=4, sharding_stage="stage2"), {"fp16": True, "fp16_opt_level": "O2"}
    )
    stage3 = memory_per_device(
        TINY[1], Degrees(sharding=4, sharding_stage="stage3"), {"fp16": True, "fp16_opt_level": "O2"}
    )
    full = memory_per_device(TINY[1], Degrees(), {"fp16": True, "fp16_opt_level": "O2"})
    assert stage2.stages[0].gradients == -(-full.stages[0].gradients // 4)
    assert stage3.stages[0].parameters == -(-full.stages[0].parameters // 4)


# ---------------------------------------------------------------------------------------------
# pipeline layout


def test_fork_split_and_stage_sums():
    assert pipeline_segments(40, 8) == [0, 5, 10, 15, 20, 25, 30, 36, 43]
    assert pipeline_segments(40, 8, "layer") == [0, 6, 11, 16, 21, 26, 31, 36, 43]
    est = memory_per_device(LLAMA_13B, Degrees(pp=8), {})
    assert sum(st.params_numel for st in est.stages) == 13_015_864_320
    assert [st.decoder_layers for st in est.stages][6] == tuple(range(29, 35))
    tied = LLAMA_13B | {"tie_word_embeddings": True}
    est = memory_per_device(tied, Degrees(pp=4), {})
    # Pipe SharedLayerDesc: the embedding weight lives on the first and on the last stage.
    assert sum(st.params_numel for st in est.stages) == param_counts(tied).total + 163_840_000
    assert memory_per_device(tied, Degrees(), {}).stages[0].params_numel == param_counts(tied).total


@pytest.mark.parametrize("index", range(len(SEGMENT_CASES)))
def test_segments_match_paddle_segment_layers(probe, index):
    layers, pp = SEGMENT_CASES[index]
    theirs = probe["segments"][index]
    assert pipeline_segments(layers, pp, "uniform") == theirs["uniform"]
    if "layer" in theirs:
        assert pipeline_segments(layers, pp, "layer") == theirs["layer"]
    if (layers, pp) != (40, 8):
        assert pipeline_segments(layers, pp) == theirs.get("layer", theirs["uniform"])


def test_tp_splits_weights_but_not_norms():
    tp1 = sum(n for desc in pipe_desc_tensors(LLAMA_13B, 1) for _, n in desc)
    tp2 = sum(n for desc in pipe_desc_tensors(LLAMA_13B, 2) for _, n in desc)
    norms = (2 * 40 + 1) * 5120
    assert tp2 == (tp1 - norms) // 2 + norms
    odd_vocab = LLAMA_13B | {"vocab_size": 32001}
    emb = pipe_desc_tensors(odd_vocab, 2)[0][0][1]
    assert emb == 32001 * 5120  # not split when tp does not divide the vocab


# ---------------------------------------------------------------------------------------------
# activations


@pytest.mark.parametrize("granularity", [None, "full", "full_attn", "core_attn"])
def test_layer_activations_match_tensors_autograd_keeps(probe, granularity):
    shape = ActivationShape(seq=ACT_SEQ, micro_batch=ACT_MB, act_bytes=4)
    ours = layer_activation_bytes(ACT_DIMS, shape, granularity)
    theirs = probe["act"][str(granularity)]
    # The test passes position_ids (int64, 8 s b bytes) through recompute; pretraining does not.
    extra = 8 * ACT_SEQ * ACT_MB if granularity in ("full", "full_attn") else 0
    assert ours + extra == theirs


def test_head_activations_match_tensors_autograd_keeps(probe):
    kept, _ = head_activation_bytes(ACT_DIMS, ActivationShape(seq=ACT_SEQ, micro_batch=ACT_MB, act_bytes=4))
    assert 0 <= probe["head"] - kept <= 16  # a few 0-d loss scalars


def test_flash_attention_drops_the_s_squared_term():
    eager = ActivationShape(seq=2048, micro_batch=2, act_bytes=2, fused_rms_norm=True, fused_rope=True)
    flash = ActivationShape(
        seq=2048, micro_batch=2, act_bytes=2, fused_rms_norm=True, fused_rope=True, flash_attention=True
    )
    s, b, h, f, a = 2048, 2, 5120, 13824, 40
    # Fused MHA + flash: 2 bytes x (6 sbh + 2 sbh + 3 sbf) + fp32 lse and norm terms.
    assert (
        layer_activation_bytes(LLAMA_13B, flash)
        == 2 * (8 * s * b * h + 3 * s * b * f) + 4 * a * s * b + 2 * 4 * s * b
    )
    # Eager keeps the fp32 softmax and its fp16 copy (6 a s^2 b) instead of the lse; with MHA its
    # q, k^T, v, out copies are the same size as flash's q, k, v, out.
    diff = layer_activation_bytes(LLAMA_13B, eager) - layer_activation_bytes(LLAMA_13B, flash)
    assert diff == 6 * a * s * s * b - 4 * a * s * b


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_match_spec_and_paddlenlp(probe):
    none = flops_per_token(LLAMA_13B, 2048)
    iluvatar = flops_per_token(
        LLAMA_13B, 2048, recompute=True, no_recompute_layers=REFERENCE_JOB["no_recompute_layers"]
    )
    full = flops_per_token(LLAMA_13B, 2048, recompute=True)
    # spec section 8: 82.15 / 94.32 / 109.20 GFLOP per token, 6N 78.1.
    assert round(none.hardware / 1e9, 2) == 82.15 and none.model == none.hardware
    assert iluvatar.recomputed_layers == 18 and round(iluvatar.hardware / 1e9, 2) == 94.32
    assert round(full.hardware / 1e9, 2) == 109.20
    assert round(none.six_n / 1e9, 1) == 78.1
    assert round(none.six_n_attention / 1e9, 2) == 83.13
    # PaddleNLP's own function: exact for every granularity; its logged figure ignores no_recompute_layers.
    assert none.hardware == pytest.approx(probe["flops"]["none"], rel=1e-12)
    assert full.hardware == pytest.approx(probe["flops"]["full"], rel=1e-12)
    assert iluvatar.paddlenlp_logged == pytest.approx(probe["flops"]["full"], rel=1e-12)
    for g in ("full_attn", "core_attn"):
        ours = flops_per_token(LLAMA_13B, 2048, recompute=True, recompute_granularity=g)
        assert ours.hardware == pytest.approx(probe["flops"][g], rel=1e-12)


def test_mfu_is_none_without_a_peak_and_logged_tflops_use_2_pow_40():
    assert mfu(1000.0, 82e9, None) is None
    assert mfu(1000.0, 82e9, 164e12) == pytest.approx(0.5)
    assert paddlenlp_logged_tflops(1e12 / 94.32e9 * 1000, 94.32e9) == pytest.approx(1000e12 / 2**40)


# ---------------------------------------------------------------------------------------------
# devices, throughput and the reference job


def test_registry_keeps_the_bi150_peak_unknown(tmp_path):
    reg = load_registry()
    bi = find_device("Iluvatar BI-V150", reg)  # ixsmi's spelling
    assert bi.memory_bytes == 32768 * MIB and bi.peak("fp16") is None and bi.source
    assert all(spec.source for spec in reg.values())
    assert find_device("cpu", reg).peak("fp32") is None
    assert find_device("bi150", reg, memory_mib=30000).memory_bytes == 30000 * MIB
    user = tmp_path / "mine.json"
    user.write_text(
        json.dumps({"devices": {"BI150": {"peak_tflops": {"fp16": 100}}, "X1": {"memory_mib": 1024}}})
    )
    reg = load_registry(user)
    bi = find_device("BI-V150", reg)
    assert bi.peak("fp16") == 100e12 and bi.peak("bf16") is None and bi.memory_bytes == 32768 * MIB
    assert "overridden" in bi.source and find_device("x1", reg).memory_bytes == GIB
    with pytest.raises(EstimateError, match="not in the registry"):
        find_device("H100", reg)
    user.write_text(json.dumps({"devices": {"BI-V150": {"peak_tflops": {"fp8": 1}}}}))
    with pytest.raises(EstimateError, match="fp8"):
        load_registry(user)


def test_reference_job_fits_with_the_iluvatar_recompute_set():
    """4 nodes x 16 BI-V150 (32768 MiB), pp8 x sharding8 stage1, fp16 O2 + master grad, b 2, s 2048.

    Per rank of the most loaded stage (stage 1: decoders 4-8, 1,586,022,400 params): fp16 params
    2.95 GiB, fp32 main_grad 5.91 GiB, master 0.82 GiB + moments 1.64 GiB (greedy 1/8), activations
    1.38 GiB per micro-batch (2 full + 3 recomputed layers) x 7 in flight = 9.63 GiB, buffers 0.35,
    recompute transient 0.63, fragmentation 2.19, reserve 2.00 -> ~26.1 GiB of 32 GiB: fits, ~18 %
    headroom. Stage 6 (6 layers, none recomputed, 2 in flight) is next at ~25.2 GiB: the FORK's
    no_recompute_layers balance the stages. Without recompute stage 1 would need ~39 GiB.
    """
    est = estimate(REFERENCE_JOB, 4, 16, find_device("BI-V150"))
    assert est["degrees"] | {} == {
        "tp": 1,
        "pp": 8,
        "sharding": 8,
        "sep": 1,
        "dp": 1,
        "sharding_stage": "stage1",
    }
    mem = est["memory"]
    assert est["verdict"] == "fits" and mem["peak_stage"] == 1
    assert 24 * GIB < mem["peak_bytes"] < 28 * GIB
    assert 0.10 < mem["headroom_fraction"] < 0.25
    stages = mem["stages"]
    assert [s["microbatches_in_flight"] for s in stages] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert [len(s["recomputed_layers"]) for s in stages] == [3, 3, 3, 3, 3, 3, 0, 0]
    s1 = stages[1]
    assert s1["params_numel"] == 5 * 317_204_480
    assert s1["parameters"] == 2 * s1["params_numel"] and s1["gradients"] == 4 * s1["params_numel"]
    assert 25 * GIB < stages[6]["total"] < mem["peak_bytes"]
    assert est["flops_per_token"]["recomputed_layers"] == 18
    tput = est["throughput"]
    assert (
        tput["tokens_per_s_per_device"] is None and tput["implied_mfu"] is None and tput["basis"] == "unknown"
    )
    assert tput["global_batch_tokens"] == 4_194_304
    # 40 % MFU: tokens/s/device = 0.4e12 / 82.146e9 = 4.87 per peak TFLOPS.
    assert tput["tokens_per_s_per_device_per_peak_tflops"] == pytest.approx(4.869, abs=1e-3)
    text = format_estimate(est)
    assert "FITS" in text and "unknown" in text and "82.15" in text

    no_rc = estimate(REFERENCE_JOB | {"recompute": False}, 4, 16, find_device("BI-V150"))
    assert no_rc["verdict"] == "does not fit"
    assert (
        estimate(REFERENCE_JOB | {"no_recompute_layers": []}, 4, 16, find_device("BI-V150"))["memory"][
            "peak_bytes"
        ]
        < (mem["peak_bytes"])
    )


def test_throughput_once_a_peak_is_configured():
    dev = find_device("BI-V150", memory_mib=32768)
    dev = type(dev)(dev.name, dev.memory_bytes, {"fp16": 100e12}, "test peak")
    tput = estimate(REFERENCE_JOB, 4, 16, dev, assumed_mfu=0.4)["throughput"]
    rate = 0.4 * 100e12 / flops_per_token(LLAMA_13B, 2048).model
    assert tput["tokens_per_s_per_device"] == pytest.approx(rate)
    assert tput["step_time_s"] == pytest.approx(4_194_304 / (rate * 64))
    assert tput["time_to_max_steps_s"] == pytest.approx(5000 * tput["step_time_s"])
    assert tput["implied_mfu"] == pytest.approx(0.4)
    measured = throughput_forecast(
        82e9, None, None, global_batch_tokens=1000, world_size=2, measured_tokens_per_s_per_device=50
    )
    assert measured.step_time_s == 10 and measured.implied_mfu is None and measured.basis == "measured"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: param_counts(TINY[0] | {"num_attention_heads": 5}), "divisible"),
        (lambda: param_counts(TINY[0] | {"num_key_value_heads": 3}), "divisible"),
        (lambda: param_counts(TINY[0] | {"hidden_size": 0}), "positive"),
        (lambda: param_counts({"hidden_size": 64}), "missing"),
        (lambda: pipe_desc_tensors(LLAMA_13B, tp=3), "tensor_parallel_degree"),
        (lambda: pipeline_segments(2, 6), "cannot fill"),
        (lambda: pipeline_segments(40, 8, [0, 10, 5, 43]), "do not split"),
        (lambda: pipeline_segments(40, 4, "fork"), "FORK"),
        (lambda: memory_per_device(LLAMA_13B, Degrees(), {"fp16": True, "bf16": True}), "both"),
        (lambda: memory_per_device(LLAMA_13B, Degrees(pp=4), {"virtual_pp_degree": 2}), "virtual_pp_degree"),
        (
            lambda: memory_per_device(
                LLAMA_13B, Degrees(), {"recompute": True, "recompute_granularity": "half"}
            ),
            "granularity",
        ),
        (lambda: memory_per_device(LLAMA_13B, Degrees(), {"no_recompute_layers": "0,1"}), "list"),
        (lambda: memory_per_device(LLAMA_13B, Degrees(), {"per_device_train_batch_size": 0}), "positive"),
        (lambda: memory_per_device(LLAMA_13B, Degrees(), {"optim": "adafactor"}), "AdamW"),
        (lambda: memory_per_device(LLAMA_13B, Degrees(), {}, device_memory_bytes=0), "positive"),
        (
            lambda: memory_per_device(LLAMA_13B, Degrees(), {}, options=EstimateOptions(fragmentation=1.5)),
            "fragmentation",
        ),
        (lambda: flops_per_token(LLAMA_13B, 0), "seq_len"),
        (lambda: throughput_forecast(82e9, 1e14, 1.5, global_batch_tokens=1, world_size=1), "MFU"),
        (lambda: mfu(10.0, 82e9, -1.0), "positive"),
        (
            lambda: estimate(
                REFERENCE_JOB | {"model_name_or_path": "nowhere/at-all"}, 4, 16, find_device("cpu")
            ),
            "known model",
        ),
        (lambda: estimate(REFERENCE_JOB, 0, 16, find_device("cpu")), "at least one node"),
    ],
)
def test_impossible_inputs_raise(call, match):
    with pytest.raises(EstimateError, match=match):
        call()


def test_layout_the_world_cannot_hold_raises():
    with pytest.raises(TopologyError):
        estimate(REFERENCE_JOB, 1, 12, find_device("BI-V150"))  # pp8 does not divide 12 ranks
    assert isinstance(LlamaDims.of(LLAMA_13B), LlamaDims)
