"""Merging tp/pp checkpoint shards: exact round trips from a real tiny LLaMA, and loud, named failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bi150_ray.checkpoint import merge
from bi150_ray.checkpoint.gather import COMPLETE_MARKER, INDEX, verify_gathered
from bi150_ray.checkpoint.merge import MergeError, discover_shards, merge_checkpoint, merge_state
from tests.unit import shard_factory as sf

REPO = Path(__file__).resolve().parents[2]
# The reference job's fixed split over 43 pipeline items (embedding + 40 decoders + norm + lm_head).
REFERENCE_SEG = [0, 5, 10, 15, 20, 25, 30, 36, 43]
MICRO = dict(
    hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, vocab_size=64
)


@pytest.fixture(scope="module")
def tiny4():
    config = sf.tiny_config(4)
    model, state = sf.build_model(config, seed=1)
    return config, model, state


@pytest.fixture(scope="module")
def tp2pp2_dir(tiny4, tmp_path_factory) -> Path:
    config, _, state = tiny4
    d = tmp_path_factory.mktemp("tp2pp2") / "checkpoint-10"
    sf.save_checkpoint(state, config, str(d), tp=2, pp=2)
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoint-10"
    shutil.copytree(src, dst)
    return dst


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _assert_same(merged: dict, state: dict) -> None:
    assert sorted(merged) == sorted(state)
    for key, value in state.items():
        assert merged[key].dtype == value.dtype, key
        assert np.array_equal(merged[key], value), key


def _logits(model, vocab_size: int) -> np.ndarray:
    import paddle

    ids = np.random.default_rng(7).integers(3, vocab_size, size=(2, 16)).astype("int64")
    with paddle.no_grad():
        out = model(paddle.to_tensor(ids))
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    return out.numpy()


# --- layouts ----------------------------------------------------------------------------------------


def test_pipe_segmentation_matches_reference_layout():
    """Paddle's SegmentLayers gives the spec's stages; the 8-layer pp8 case gets one decoder per stage."""
    cfg40 = sf.tiny_config(40, **MICRO)
    bounds = sf.pipe_bounds(cfg40, 8, REFERENCE_SEG)
    assert bounds == REFERENCE_SEG
    assert sf.stage_of("llama.embed_tokens.weight", bounds, 40) == 0
    assert sf.stage_of("llama.layers.3.mlp.up_proj.weight", bounds, 40) == 0
    assert sf.stage_of("llama.layers.4.mlp.up_proj.weight", bounds, 40) == 1
    assert sf.stage_of("llama.layers.35.mlp.up_proj.weight", bounds, 40) == 7
    assert sf.stage_of("lm_head.weight", bounds, 40) == 7
    assert sf.pipe_bounds(sf.tiny_config(8), 8) == [0, 2, 3, 4, 5, 6, 7, 8, 11]


@pytest.mark.parametrize(
    "layers,tp,pp,seg,overrides",
    [
        (4, 2, 1, None, {}),
        (4, 1, 2, None, {}),
        (4, 2, 2, None, {}),
        (8, 1, 8, None, {}),
        (40, 1, 8, REFERENCE_SEG, MICRO),
        # GQA kv heads and a vocab not divisible by tp: PaddleNLP leaves k/v, embedding, lm_head unsplit.
        (4, 4, 1, None, dict(num_key_value_heads=2, vocab_size=250)),
        # Fused qkv / gate_up projections change names and use PaddleNLP's "naive 2-fuse" tp split.
        (4, 2, 2, None, dict(fuse_attention_qkv=True, fuse_attention_ffn=True)),
    ],
    ids=["tp2", "pp2", "tp2xpp2", "pp8", "pp8-reference-40L", "tp4-gqa-oddvocab", "tp2xpp2-fused"],
)
def test_merge_round_trip_is_exact(tmp_path, layers, tp, pp, seg, overrides):
    config = sf.tiny_config(layers, **overrides)
    _, state = sf.build_model(config, seed=layers + tp + pp)
    names = sf.save_checkpoint(state, config, str(tmp_path), tp=tp, pp=pp, seg_method=seg)
    assert len(names) == tp * pp
    shards = discover_shards(str(tmp_path), tp=tp, pp=pp)
    assert (shards.tp, shards.pp) == (tp, pp)
    _assert_same(merge_state(str(tmp_path), _config(tmp_path)), state)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-qkv-ffn"])
def test_merged_dir_loads_with_identical_logits(tiny4, tp2pp2_dir, tmp_path, fused):
    from paddlenlp.transformers import LlamaForCausalLM

    config, model, state = tiny4
    ckpt = tp2pp2_dir
    if fused:
        config = sf.tiny_config(4, fuse_attention_qkv=True, fuse_attention_ffn=True)
        model, state = sf.build_model(config, seed=5)
        assert "llama.layers.0.self_attn.qkv_proj.weight" in state
        ckpt = tmp_path / "ckpt"
        sf.save_checkpoint(state, config, str(ckpt), tp=2, pp=2)
    out = tmp_path / "merged"
    merge_checkpoint(str(ckpt), str(out), tp=2, pp=2, max_shard_bytes=200_000)

    verify_gathered(str(out))
    index = json.loads((out / INDEX).read_text())
    assert sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["tensor_parallel_degree"], cfg["tensor_parallel_rank"], cfg["pipeline_parallel_degree"]) == (
        1,
        0,
        1,
    )

    # With fused weights PaddleNLP builds an unfused model (its config drops the fuse flags) and
    # splits qkv/gate_up while loading; the logits must still match exactly.
    loaded = LlamaForCausalLM.from_pretrained(str(out), dtype="float32")
    loaded.eval()
    diff = np.abs(_logits(loaded, config.vocab_size) - _logits(model, config.vocab_size))
    assert float(diff.max()) == 0.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_keep_their_bits(tiny4, tmp_path, dtype):
    """fp16 (the reference job) and bf16 (paddle.load returns it as raw uint16) reach the model bit-exact."""
    import paddle
    from paddlenlp.transformers import LlamaForCausalLM

    config, _, state = tiny4
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    sf.save_checkpoint(state, config, str(ckpt), tp=1, pp=2, dtype=dtype)
    expected = {k: paddle.to_tensor(v).astype(dtype).numpy() for k, v in state.items()}
    merge_checkpoint(str(ckpt), str(out), pp=2)
    loaded = LlamaForCausalLM.from_pretrained(str(out), dtype=dtype)
    got = {k: v.numpy() for k, v in loaded.state_dict().items()}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].tobytes() == value.tobytes(), key


def test_pipe_state_dict_uses_single_model_names():
    """PipelinePretrainedModel.state_dict really yields LlamaForCausalLM's names (single stage, CPU)."""
    script = textwrap.dedent(
        """
        import paddle.distributed.parallel as parallel
        from paddle.distributed import fleet
        from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM
        from paddlenlp.transformers.llama.modeling_pp import LlamaForCausalLMPipe
        parallel.ParallelEnv._device_id = 0  # CPU builds never set it; PipelineLayer reads it
        s = fleet.DistributedStrategy()
        s.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": 1}
        fleet.init(is_collective=True, strategy=s)
        c = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                        vocab_size=64)
        pipe = sorted(LlamaForCausalLMPipe(c).state_dict())
        single = sorted(LlamaForCausalLM(c).state_dict())
        assert pipe == single, (pipe, single)
        print("SAME", len(pipe))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-3000:]


# --- failures ---------------------------------------------------------------------------------------


def test_missing_shard_is_named(tp2pp2_dir, tmp_path):
    d = _copy(tp2pp2_dir, tmp_path)
    (d / "model_state.tp00_pp01.pdparams").unlink()
    with pytest.raises(MergeError, match=r"model_state\.tp00_pp01\.pdparams"):
        discover_shards(str(d))


def test_missing_last_rank_needs_run_degrees_or_fails_on_layers(tiny4, tmp_path):
    config, _, state = tiny4
    sf.save_checkpoint(state, config, str(tmp_path), tp=1, pp=4)
    (tmp_path / "model_state.pp03.pdparams").unlink()
    with pytest.raises(MergeError, match=r"pp00\.\.pp03"):
        discover_shards(str(tmp_path), pp=4)
    # Without the run's degrees the names look like pp3; the layer check still refuses.
    with pytest.raises(MergeError, match=r"missing"):
        merge_state(str(tmp_path), _config(tmp_path))


def test_lone_tp00_is_incomplete(tiny4, tmp_path):
    config, _, state = tiny4
    sf.save_checkpoint(state, config, str(tmp_path), tp=2, pp=1)
    (tmp_path / "model_state.tp01.pdparams").unlink()
    with pytest.raises(MergeError, match=r"model_state\.tp00\.pdparams.*do not fit tp=1"):
        discover_shards(str(tmp_path))


def test_run_degrees_and_config_must_match(tp2pp2_dir):
    with pytest.raises(MergeError, match=r"tp00\.\.tp03 x pp00\.\.pp01; missing .*model_state\.tp03_pp01"):
        discover_shards(str(tp2pp2_dir), tp=4, pp=2)
    with pytest.raises(MergeError, match=r"unexpected \['model_state\.tp00_pp01"):
        discover_shards(str(tp2pp2_dir), tp=2, pp=1)
    cfg = _config(tp2pp2_dir) | {"tensor_parallel_degree": 4}
    with pytest.raises(MergeError, match=r"tensor_parallel_degree=4"):
        merge_state(str(tp2pp2_dir), cfg)


def test_two_layouts_in_one_folder_are_refused(tiny4, tmp_path):
    config, _, state = tiny4
    sf.save_checkpoint(state, config, str(tmp_path), tp=2, pp=1)
    shutil.copy(tmp_path / "model_state.tp00.pdparams", tmp_path / "model_state.pdparams")
    with pytest.raises(MergeError, match=r"model_state\.pdparams.*model_state\.tp00\.pdparams"):
        discover_shards(str(tmp_path))


def test_same_rank_twice_and_unknown_names_are_refused(tp2pp2_dir, tmp_path):
    d = _copy(tp2pp2_dir, tmp_path)
    shutil.copy(d / "model_state.tp01_pp01.pdparams", d / "model_state.tp001_pp01.pdparams")
    with pytest.raises(MergeError, match=r"duplicate shard.*tp001_pp01"):
        discover_shards(str(d))
    (d / "model_state.tp001_pp01.pdparams").rename(d / "model_state.tp01_pp01_shard00.pdparams")
    with pytest.raises(MergeError, match=r"shard00"):
        discover_shards(str(d))


def _resave(path: Path, edit) -> None:
    import paddle

    state = paddle.load(str(path), return_numpy=True)
    edit(state)
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(path))


def test_layer_in_two_pp_stages(tiny4, tmp_path):
    config, _, state = tiny4
    sf.save_checkpoint(state, config, str(tmp_path), tp=1, pp=2)
    key = "llama.layers.0.self_attn.q_proj.weight"  # lives on stage 0
    _resave(tmp_path / "model_state.pp01.pdparams", lambda s: s.__setitem__(key, state[key]))
    _assert_same(merge_state(str(tmp_path), _config(tmp_path)), state)  # identical copy: fine

    _resave(tmp_path / "model_state.pp01.pdparams", lambda s: s.__setitem__(key, state[key] + 1))
    with pytest.raises(MergeError, match=rf"model_state\.pp01\.pdparams: {key}.*model_state\.pp00\.pdparams"):
        merge_state(str(tmp_path), _config(tmp_path))


def test_tp_shapes_must_agree(tp2pp2_dir, tmp_path):
    d = _copy(tp2pp2_dir, tmp_path)
    key = "llama.layers.3.mlp.up_proj.weight"
    _resave(d / "model_state.tp01_pp01.pdparams", lambda s: s.__setitem__(key, s[key][:, :-1].copy()))
    with pytest.raises(MergeError, match=rf"model_state\.tp01_pp01\.pdparams: {key}"):
        merge_state(str(d), _config(d))


def test_tp_rank_missing_a_key(tp2pp2_dir, tmp_path):
    d = _copy(tp2pp2_dir, tmp_path)
    key = "llama.norm.weight"
    _resave(d / "model_state.tp01_pp01.pdparams", lambda s: s.pop(key))
    with pytest.raises(MergeError, match=rf"model_state\.tp01_pp01\.pdparams: lacks {key}"):
        merge_state(str(d), _config(d))


def test_replicated_tensor_differing_across_tp(tp2pp2_dir, tmp_path):
    d = _copy(tp2pp2_dir, tmp_path)
    key = "llama.layers.0.input_layernorm.weight"
    _resave(d / "model_state.tp01_pp00.pdparams", lambda s: s.__setitem__(key, s[key] * 2))
    with pytest.raises(MergeError, match=rf"model_state\.tp01_pp00\.pdparams: replicated tensor {key}"):
        merge_state(str(d), _config(d))


def test_truncated_shard_leaves_nothing_finished(tp2pp2_dir, tmp_path):
    d = _copy(tp2pp2_dir, tmp_path)
    victim = d / "model_state.tp01_pp01.pdparams"  # the last one read: earlier output is already on disk
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=r"model_state\.tp01_pp01\.pdparams"):
        merge_checkpoint(str(d), str(out), max_shard_bytes=50_000)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("merged")]


def test_layer_count_beyond_config(tp2pp2_dir):
    cfg = _config(tp2pp2_dir) | {"num_hidden_layers": 3}
    with pytest.raises(MergeError, match=r"pp01\.pdparams: has llama\.layers\.3\..*num_hidden_layers is 3"):
        merge_state(str(tp2pp2_dir), cfg)


# --- writer -----------------------------------------------------------------------------------------


def test_writer_shards_and_replaces_atomically(tmp_path):
    state = {f"w{i}": np.full((10, 10), i, dtype="float32") for i in range(5)}  # 400 bytes each
    out = tmp_path / "model"
    merge.write_model_dir(state, {"architectures": ["LlamaForCausalLMPipe"]}, str(out), max_shard_bytes=800)
    index = json.loads((out / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    verify_gathered(str(out))

    merge.write_model_dir({"w": np.zeros(3, dtype="float32")}, {}, str(out))
    assert json.loads((out / INDEX).read_text())["weight_map"] == {"w": "model-00001-of-00001.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_writer_cleans_up_when_the_stream_fails(tmp_path):
    def stream():
        yield "a", np.zeros(1000, dtype="float32")
        yield "b", np.zeros(1000, dtype="float32")
        raise MergeError("boom")

    out = tmp_path / "model"
    with pytest.raises(MergeError, match="boom"):
        merge.write_model_dir(stream(), {}, str(out), max_shard_bytes=1000)
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(out / COMPLETE_MARKER)


def test_safetensors_writer_is_read_back_by_the_library_and_hashed_right(tmp_path):
    """merge.write_safetensors (no-copy, hash-while-writing) against safetensors' own reader."""
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from bi150_ray.hashing import sha256_file

    tensors = {
        "w": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
        "h": np.arange(7, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "f": np.linspace(0, 1, 4, dtype=np.float16),
        "i": np.array(42, dtype=np.int64),
        "z": np.zeros((0, 4), np.float32),
        "t": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)).T,  # a non-contiguous view
    }
    path = str(tmp_path / "x.safetensors")
    tensors = {k: merge._to_safetensors(v) for k, v in tensors.items()}
    digest = merge.write_safetensors(path, tensors, {"format": "np"})
    assert digest == sha256_file(path)
    back = load_file(path)
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key].view(np.uint8), value.view(np.uint8)), key
    with safe_open(path, "np") as fh:
        assert fh.metadata() == {"format": "np"}
