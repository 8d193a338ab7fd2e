"""Degree resolution, coordinates, groups and placement, cross-checked against PaddleNLP and Paddle.

The cross-checks run the installed PaddleNLP ``TrainingArguments.__post_init__`` for a pretended
world size (``paddle.distributed.get_world_size`` patched, ``fleet.init`` replaced by a function
that records the ``hybrid_configs`` it would receive), then build Paddle's own
``CommunicateTopology`` from those configs exactly as ``fleet._init_hybrid_parallel_env`` does.
Nothing is launched; it all happens in one subprocess so Paddle's import-time side effects stay
out of the test process.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bi150_ray.topology import (
    AXES,
    PP_FIRST,
    TOPO_ORDERS,
    Degrees,
    PipelineHop,
    RankSlot,
    TopologyError,
    cross_node_pipeline_hops,
    describe_groups,
    layout,
    parse_sharding,
    resolve_degrees,
    validate_model,
)

# The parallel part of the FORK's llm/llama/pretrain-llama_13b-pp4tp2sd2_stage1.json
# (paddlenlp-pretrain-spec.md §4.2), plus the batch keys the pipeline checks look at.
REFERENCE_ARGS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 128,
    "tensor_parallel_degree": 1,
    "pipeline_parallel_degree": 8,
    "pipeline_parallel_config": "disable_partial_send_recv",
    "sharding_parallel_degree": -1,
    "virtual_pp_degree": 1,
    "sharding": "stage1",
    "sequence_parallel": 0,
}
# virtual_pp_degree and sequence_parallel are model arguments in run_pretrain.py, not TrainingArguments.
REFERENCE_TRAINING_ARGS = {
    k: v for k, v in REFERENCE_ARGS.items() if k not in ("virtual_pp_degree", "sequence_parallel")
}

# LLaMA-13B (spec §3.3).
LLAMA13B = {"num_attention_heads": 40, "num_key_value_heads": 40, "num_hidden_layers": 40}


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def test_reference_job_resolves_to_pp8_sharding8():
    d = resolve_degrees(REFERENCE_ARGS, 64)
    assert d == Degrees(tp=1, pp=8, sharding=8, sep=1, dp=1, sharding_stage="stage1", order=PP_FIRST)
    assert d.world == 64
    assert d.dataset_world_size == 8  # R = 8 in the spec's batch arithmetic
    assert d.use_hybrid_parallel


def test_reference_job_coordinates_are_8pp_plus_sd():
    d = resolve_degrees(REFERENCE_ARGS, 64)
    for rank in range(64):
        assert d.coords(rank) == {"dp": 0, "pp": rank // 8, "sharding": rank % 8, "sep": 0, "mp": 0}
        assert d.dataset_rank(rank) == rank % 8
    assert d.coords(17) == {"dp": 0, "pp": 2, "sharding": 1, "sep": 0, "mp": 0}


def test_reference_job_groups_and_cross_node_hops():
    d = resolve_degrees(REFERENCE_ARGS, 64)
    groups = describe_groups(d)
    assert groups["pipe"] == [[s + 8 * p for p in range(8)] for s in range(8)]
    assert groups["sharding"] == [list(range(8 * p, 8 * p + 8)) for p in range(8)]
    assert groups["data"] == [[r] for r in range(64)]
    assert groups["model"] == [[r] for r in range(64)]
    assert groups["sep"] == [[r] for r in range(64)]
    # Every sharding group sits on one node of 16 devices.
    assert all(len({r // 16 for r in g}) == 1 for g in groups["sharding"])
    # Ranks reading identical data: {s, s+8, ..., s+56}.
    for s in range(8):
        assert {r for r in range(64) if d.dataset_rank(r) == s} == set(range(s, 64, 8))

    hops = cross_node_pipeline_hops(d, 16)
    assert {(h.src_stage, h.dst_stage) for h in hops} == {(1, 2), (3, 4), (5, 6)}
    assert len(hops) == 3 * 8
    assert PipelineHop(src_rank=8, dst_rank=16, src_stage=1, dst_stage=2, src_node=0, dst_node=1) in hops
    # Interleaved pipelines also send from the last stage back to the first: one more crossing.
    vpp_hops = cross_node_pipeline_hops(d, 16, virtual_pp_degree=2)
    assert {(h.src_stage, h.dst_stage) for h in vpp_hops} == {(1, 2), (3, 4), (5, 6), (7, 0)}


def test_tp2_pp4_sd4_on_32():
    args = {
        "tensor_parallel_degree": 2,
        "pipeline_parallel_degree": 4,
        "sharding_parallel_degree": 4,
        "sharding": "stage1",
    }
    d = resolve_degrees(args, 32)
    assert (d.tp, d.pp, d.sharding, d.sep, d.dp) == (2, 4, 4, 1, 1)
    for rank in range(32):
        c = d.coords(rank)
        assert rank == (((c["dp"] * 4 + c["pp"]) * 4 + c["sharding"]) * 1 + c["sep"]) * 2 + c["mp"]
    assert d.dataset_world_size == 4
    # tp pairs are adjacent ranks and read the same data.
    assert describe_groups(d)["model"][:2] == [[0, 1], [2, 3]]
    assert d.dataset_rank(0) == d.dataset_rank(1) == 0


def test_data_parallel_only():
    d = resolve_degrees({}, 8)
    assert d == Degrees(dp=8)
    assert not d.use_hybrid_parallel
    assert d.dataset_world_size == 8
    assert [d.dataset_rank(r) for r in range(8)] == list(range(8))


def test_sharding_only_takes_the_whole_world():
    assert resolve_degrees({"sharding": "stage1"}, 8) == Degrees(sharding=8, sharding_stage="stage1")
    assert resolve_degrees({"sharding": "stage2"}, 8) == Degrees(sharding=8, sharding_stage="stage2")
    assert resolve_degrees({"sharding": True}, 4) == Degrees(sharding=4, sharding_stage="stage1")


def test_demo_case_4_ranks_sharding2_gives_dp2():
    d = resolve_degrees({"sharding_parallel_degree": 2, "sharding": "stage1"}, 4)
    assert d == Degrees(sharding=2, dp=2, sharding_stage="stage1")
    assert describe_groups(d)["sharding"] == [[0, 1], [2, 3]]
    assert describe_groups(d)["data"] == [[0, 2], [1, 3]]
    assert [d.dataset_rank(r) for r in range(4)] == [0, 1, 2, 3]


def test_single_process_ignores_every_degree(caplog):
    with caplog.at_level(logging.WARNING):
        d = resolve_degrees({"pipeline_parallel_degree": 8, "sharding": "stage1"}, 1)
    assert d == Degrees()
    assert "world size 1" in caplog.text


def test_sharding_degree_1_turns_sharding_off():
    d = resolve_degrees({"sharding": "stage1", "sharding_parallel_degree": 1}, 8)
    assert d == Degrees(dp=8)


def test_sharding_degree_without_sharding_option_is_kept_like_paddlenlp(caplog):
    with caplog.at_level(logging.WARNING):
        d = resolve_degrees({"sharding_parallel_degree": 4}, 8)
    assert (d.sharding, d.dp, d.sharding_stage) == (4, 2, "")
    assert "only when sharding is specified" in caplog.text


def test_deprecated_sharding_degree_alias():
    d = resolve_degrees({"sharding_degree": 4, "sharding": "stage1"}, 8)
    assert (d.sharding, d.dp) == (4, 2)


def test_context_parallel_uses_the_sep_axis():
    d = resolve_degrees({"context_parallel_degree": 2, "sharding": "stage1"}, 16)
    assert (d.sep, d.sharding, d.dp) == (2, 8, 1)


def test_sharding_first_order():
    d = resolve_degrees(
        {"hybrid_parallel_topo_order": "sharding_first", "pipeline_parallel_degree": 2, "sharding": "stage1"},
        8,
    )
    assert d.order == TOPO_ORDERS["sharding_first"] == ("dp", "sharding", "pp", "sep", "mp")
    assert (d.pp, d.sharding) == (2, 4)
    # pp is now the faster axis: rank = sharding * 2 + pp.
    assert describe_groups(d)["pipe"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert describe_groups(d)["sharding"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_offload_is_recorded():
    d = resolve_degrees({"sharding": "stage1 offload", "tensor_parallel_degree": 2}, 8)
    assert (d.tp, d.sharding, d.sharding_stage, d.sharding_offload) == (2, 4, "stage1", True)


def test_parse_sharding():
    assert parse_sharding("") == []
    assert parse_sharding("stage2 offload") == ["stage2", "offload"]
    assert parse_sharding(["stage3"]) == ["stage3"]
    assert parse_sharding(False) == []


@pytest.mark.parametrize(
    ("args", "world", "key"),
    [
        ({"tensor_parallel_degree": 3}, 64, "tensor_parallel_degree"),
        ({"pipeline_parallel_degree": 5}, 64, "pipeline_parallel_degree"),
        ({"tensor_parallel_degree": 2, "sep_parallel_degree": 3}, 8, "sep_parallel_degree"),
        ({"sharding": "stage1", "sharding_parallel_degree": 3}, 8, "sharding_parallel_degree"),
        (
            {"sharding": "stage1", "sharding_parallel_degree": 16, "pipeline_parallel_degree": 8},
            64,
            "sharding_parallel_degree",
        ),
        ({"pipeline_parallel_degree": 2, "sharding": "stage2"}, 8, "sharding"),
        ({"pipeline_parallel_degree": 2, "sharding": "stage3 offload"}, 8, "sharding"),
        ({"sharding": "offload"}, 8, "sharding"),
        ({"sharding": "stage1 stage2"}, 8, "sharding"),
        ({"sharding": "stage9"}, 8, "sharding"),
        ({"hybrid_parallel_topo_order": "mp_first"}, 8, "hybrid_parallel_topo_order"),
        ({"tensor_parallel_degree": 0}, 8, "tensor_parallel_degree"),
        ({"pipeline_parallel_degree": -4}, 8, "pipeline_parallel_degree"),
        ({"tensor_parallel_degree": "two"}, 8, "tensor_parallel_degree"),
        ({"sep_parallel_degree": 2, "context_parallel_degree": 2}, 8, "context_parallel_degree"),
        ({"expert_parallel_degree": 2, "sharding": "stage1"}, 8, "expert_parallel_degree"),
        ({"enable_auto_parallel": True}, 8, "enable_auto_parallel"),
    ],
)
def test_impossible_layouts_name_the_key(args, world, key):
    with pytest.raises(TopologyError, match=key):
        resolve_degrees(args, world)


def test_sep_not_dividing_is_refused_even_when_tp_pp_divides():
    # PaddleNLP only checks world % (tp * pp); 8 % 2 == 0 passes, then dp = 8 // (2 * 3) = 1
    # and fleet would get a 6-rank topology for 8 ranks.
    with pytest.raises(TopologyError, match="sep_parallel_degree"):
        resolve_degrees({"tensor_parallel_degree": 2, "sep_parallel_degree": 3}, 8)


def test_bad_world_size():
    with pytest.raises(TopologyError):
        resolve_degrees({}, 0)


def test_degrees_validate_themselves():
    with pytest.raises(TopologyError):
        Degrees(tp=0)
    with pytest.raises(TopologyError):
        Degrees(sharding_stage="stage4")
    with pytest.raises(TopologyError):
        Degrees(order=("dp", "pp", "mp"))
    d = Degrees(dp=2, pp=2)
    with pytest.raises(TopologyError):
        d.coords(4)
    assert d.rank_of(dp=1, pp=1, sharding=0, sep=0, mp=0) == 3


# --------------------------------------------------------------------------------------------
# Model validation
# --------------------------------------------------------------------------------------------


def test_llama13b_fits_the_reference_layout():
    d = resolve_degrees(REFERENCE_ARGS, 64)
    assert (
        validate_model(
            d, **LLAMA13B, intermediate_size=13824, vocab_size=32000, gradient_accumulation_steps=128
        )
        == []
    )


def test_heads_must_divide_by_tp():
    d = Degrees(tp=3, dp=1)
    with pytest.raises(TopologyError, match="num_attention_heads"):
        validate_model(d, **LLAMA13B)


def test_kv_heads_not_divisible_is_a_warning_unless_fused():
    d = Degrees(tp=4)
    warnings = validate_model(d, num_attention_heads=32, num_key_value_heads=2, num_hidden_layers=4)
    assert any("num_key_value_heads" in w for w in warnings)
    with pytest.raises(TopologyError, match="fuse_attention_qkv"):
        validate_model(
            d, num_attention_heads=32, num_key_value_heads=2, num_hidden_layers=4, fuse_attention_qkv=True
        )


def test_intermediate_size_and_vocab_with_tp():
    d = Degrees(tp=2)
    with pytest.raises(TopologyError, match="intermediate_size"):
        validate_model(
            d, num_attention_heads=8, num_key_value_heads=None, num_hidden_layers=2, intermediate_size=11
        )
    warnings = validate_model(
        d, num_attention_heads=8, num_key_value_heads=None, num_hidden_layers=2, vocab_size=32001
    )
    assert any("vocab_size" in w for w in warnings)


def test_pipeline_needs_a_layer_per_stage():
    d = Degrees(pp=8)
    # 4 decoders + embedding + norm + lm_head = 7 layer descs < 8 stages: SegmentLayers asserts.
    with pytest.raises(TopologyError, match="pipeline_parallel_degree"):
        validate_model(d, num_attention_heads=4, num_key_value_heads=None, num_hidden_layers=4)
    warnings = validate_model(d, num_attention_heads=4, num_key_value_heads=None, num_hidden_layers=6)
    assert any("uniform" in w for w in warnings)


def test_virtual_pipeline_rules():
    d = Degrees(pp=4, sharding=2)
    base = {"num_attention_heads": 8, "num_key_value_heads": None, "num_hidden_layers": 16}
    assert validate_model(d, **base, virtual_pp_degree=2, gradient_accumulation_steps=8) == []
    assert validate_model(d, **base, virtual_pp_degree=2, gradient_accumulation_steps=4) == []
    with pytest.raises(TopologyError, match="gradient_accumulation_steps"):
        validate_model(d, **base, virtual_pp_degree=2, gradient_accumulation_steps=6)
    with pytest.raises(TopologyError, match="virtual_pp_degree"):
        validate_model(d, **base, virtual_pp_degree=3, gradient_accumulation_steps=8)
    with pytest.raises(TopologyError, match="pipeline_parallel_degree"):
        validate_model(Degrees(pp=2), **base, virtual_pp_degree=2, gradient_accumulation_steps=8)


def test_plain_1f1b_has_no_accumulation_rule():
    # Paddle's 1F1B runs min(pp - stage - 1, acc) warm-up steps: fewer micro-batches than stages is legal.
    assert validate_model(Degrees(pp=8), **LLAMA13B, gradient_accumulation_steps=1) == []


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def test_layout_is_node_major():
    slots = layout(4, 16)
    assert len(slots) == 64
    assert [s.rank for s in slots] == list(range(64))
    assert slots[17] == RankSlot(rank=17, node_index=1, local_rank=1, local_size=16)
    assert slots[63] == RankSlot(rank=63, node_index=3, local_rank=15, local_size=16)
    with pytest.raises(TopologyError):
        layout(0, 16)


# --------------------------------------------------------------------------------------------
# Cross-check against the installed PaddleNLP and Paddle
# --------------------------------------------------------------------------------------------

# (world, TrainingArguments kwargs). Valid layouts and the invalid ones PaddleNLP itself rejects.
PADDLENLP_CASES: list[tuple[int, dict]] = [
    (64, REFERENCE_TRAINING_ARGS),
    (32, {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 4, "sharding_parallel_degree": 4, "sharding": "stage1"}),
    (8, {}),
    (8, {"sharding": "stage1"}),
    (8, {"sharding": "stage2"}),
    (4, {"sharding_parallel_degree": 2, "sharding": "stage1"}),
    (1, {"pipeline_parallel_degree": 8, "sharding": "stage1"}),
    (8, {"hybrid_parallel_topo_order": "sharding_first", "pipeline_parallel_degree": 2, "sharding": "stage1"}),
    (8, {"sharding": "stage1", "sharding_parallel_degree": 1}),
    (8, {"sharding_parallel_degree": 4}),
    (16, {"sep_parallel_degree": 2, "tensor_parallel_degree": 2, "sharding": "stage1"}),
    (16, {"context_parallel_degree": 2, "sharding": "stage1"}),
    (8, {"sharding_degree": 4, "sharding": "stage1"}),
    (8, {"sharding": "stage1 offload", "tensor_parallel_degree": 2}),
    (16, {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}),
    (24, {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 3, "sharding": "stage1", "sharding_parallel_degree": 2}),
    (16, {"hybrid_parallel_topo_order": "sharding_first", "tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "sharding": "stage1", "sharding_parallel_degree": 2}),
    # Rejected by PaddleNLP itself:
    (64, {"tensor_parallel_degree": 3}),
    (8, {"pipeline_parallel_degree": 2, "sharding": "stage2"}),
    (8, {"sharding": "offload"}),
    (8, {"sharding": "stage1 stage2"}),
    (8, {"sharding": "stage9"}),
    (8, {"sep_parallel_degree": 2, "context_parallel_degree": 2}),
    (8, {"hybrid_parallel_topo_order": "mp_first"}),
]  # fmt: skip

# Accepted by PaddleNLP, which floors the remainder; fleet would then get a topology that does
# not cover the world. We refuse these up front.
PADDLENLP_SILENTLY_WRONG: list[tuple[int, dict]] = [
    (8, {"sharding": "stage1", "sharding_parallel_degree": 3}),
    (8, {"tensor_parallel_degree": 2, "sep_parallel_degree": 3}),
]

# Extra shapes for CommunicateTopology alone: (order name, dp, pp, sharding, sep, mp).
TOPOLOGY_SHAPES = [
    ("pp_first", 2, 2, 2, 2, 2),
    ("sharding_first", 2, 2, 2, 2, 2),
    ("pp_first", 3, 1, 2, 1, 4),
    ("sharding_first", 1, 4, 3, 1, 2),
]

_PADDLE_PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    import paddle.distributed as dist
    from paddle.distributed import fleet
    from paddle.distributed.fleet.base.topology import CommunicateTopology
    from paddlenlp.trainer import TrainingArguments

    # fleet.py _init_hybrid_parallel_env: the group name of each PaddleNLP axis.
    NAMES = {"dp": "data", "pp": "pipe", "sharding": "sharding", "mp": "model", "sep": "sep"}
    KEYS = {"dp": "dp_degree", "pp": "pp_degree", "sharding": "sharding_degree", "mp": "mp_degree", "sep": "sep_degree"}

    def topo(order, degree):
        names = [NAMES[a] for a in order]
        t = CommunicateTopology(names, [degree[a] for a in order])
        world = t.world_size()
        return {
            "names": names,
            "coords": [list(t.get_coord(r)) for r in range(world)],
            "comm": {n: t.get_comm_list(n) for n in names},
        }

    spec = json.load(open(sys.argv[1]))
    world = {"n": 1}
    dist.get_world_size = lambda *a, **k: world["n"]
    captured = {}
    def fake_init(is_collective=False, strategy=None, **kwargs):
        captured["hc"] = dict(strategy.hybrid_configs)
        captured["order"] = list(strategy.hybrid_parallel_order)
    fleet.init = fake_init

    out = {"cases": [], "shapes": []}
    for n, kwargs in spec["cases"]:
        world["n"] = n
        captured.clear()
        try:
            a = TrainingArguments(output_dir=tempfile.mkdtemp(), local_rank=0, report_to="none", **kwargs)
        except Exception as e:
            out["cases"].append({"error": type(e).__name__ + ": " + str(e)})
            continue
        res = {
            "use_hybrid_parallel": a.use_hybrid_parallel,
            "data_parallel_degree": a.data_parallel_degree,
            "sharding": [s.value for s in a.sharding],
            "hybrid_configs": None,
        }
        if "hc" in captured:
            hc = captured["hc"]
            order = captured["order"]
            res["hybrid_configs"] = {a_: hc[KEYS[a_]] for a_ in KEYS}
            res["order"] = order
            res["topology"] = topo(order, {a_: max(hc[KEYS[a_]], 1) for a_ in KEYS})
        out["cases"].append(res)
    for order, degree in spec["shapes"]:
        out["shapes"].append(topo(order, degree))
    json.dump(out, open(sys.argv[2], "w"))
    """
)


@pytest.fixture(scope="module")
def paddle_probe(tmp_path_factory) -> dict:
    """Run PaddleNLP's resolution and Paddle's CommunicateTopology once for every case."""
    tmp = tmp_path_factory.mktemp("probe")
    shapes = []
    for order_name, dp, pp, sd, sep, mp in TOPOLOGY_SHAPES:
        shapes.append(
            [list(TOPO_ORDERS[order_name]), {"dp": dp, "pp": pp, "sharding": sd, "sep": sep, "mp": mp}]
        )
    spec = {"cases": PADDLENLP_CASES + PADDLENLP_SILENTLY_WRONG, "shapes": shapes}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "probe.py").write_text(_PADDLE_PROBE)
    proc = subprocess.run(
        [sys.executable, str(tmp / "probe.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def _check_against_topology(d: Degrees, topo: dict) -> None:
    names = topo["names"]
    assert names == [
        {"dp": "data", "pp": "pipe", "sharding": "sharding", "sep": "sep", "mp": "model"}[a] for a in d.order
    ]
    assert len(topo["coords"]) == d.world
    for rank, coord in enumerate(topo["coords"]):
        ours = d.coords(rank)
        assert coord == [ours[a] for a in d.order], rank
    groups = describe_groups(d)
    for name in names:
        assert groups[name] == topo["comm"][name], name


@pytest.mark.parametrize("index", range(len(PADDLENLP_CASES)))
def test_resolution_matches_paddlenlp(paddle_probe, index):
    world, kwargs = PADDLENLP_CASES[index]
    theirs = paddle_probe["cases"][index]
    if "error" in theirs:
        with pytest.raises(TopologyError):
            resolve_degrees(kwargs, world)
        return
    d = resolve_degrees(kwargs, world)
    assert d.use_hybrid_parallel == theirs["use_hybrid_parallel"]
    assert d.sharding_stage == next((s for s in theirs["sharding"] if s != "offload"), "")
    if not theirs["use_hybrid_parallel"]:
        assert theirs["hybrid_configs"] is None  # no fleet hybrid groups at all
        assert (d.tp, d.pp, d.sharding, d.sep) == (1, 1, 1, 1)
        assert d.dp == world
        if world > 1:
            assert theirs["data_parallel_degree"] == world
        return
    hc = theirs["hybrid_configs"]
    assert (d.dp, d.pp, d.sharding, d.sep, d.tp) == (hc["dp"], hc["pp"], hc["sharding"], hc["sep"], hc["mp"])
    assert list(d.order) == theirs["order"]
    assert d.dp == theirs["data_parallel_degree"]
    _check_against_topology(d, theirs["topology"])


@pytest.mark.parametrize("index", range(len(PADDLENLP_SILENTLY_WRONG)))
def test_layouts_paddlenlp_floors_are_refused(paddle_probe, index):
    world, kwargs = PADDLENLP_SILENTLY_WRONG[index]
    theirs = paddle_probe["cases"][len(PADDLENLP_CASES) + index]
    hc = theirs["hybrid_configs"]
    assert math.prod(max(v, 1) for v in hc.values()) != world  # fleet's topology would not cover the world
    with pytest.raises(TopologyError):
        resolve_degrees(kwargs, world)


@pytest.mark.parametrize("index", range(len(TOPOLOGY_SHAPES)))
def test_coordinates_and_groups_match_communicate_topology(paddle_probe, index):
    order_name, dp, pp, sd, sep, mp = TOPOLOGY_SHAPES[index]
    d = Degrees(tp=mp, pp=pp, sharding=sd, sep=sep, dp=dp, order=TOPO_ORDERS[order_name])
    _check_against_topology(d, paddle_probe["shapes"][index])
    # dataset_rank = sharding_degree * dp_rank + sharding_rank, and it is constant along tp/pp/sep.
    for group in describe_groups(d)["model"] + describe_groups(d)["pipe"] + describe_groups(d)["sep"]:
        assert len({d.dataset_rank(r) for r in group}) == 1
    assert sorted({d.dataset_rank(r) for r in range(d.world)}) == list(range(d.dataset_world_size))


def test_module_imports_only_the_standard_library():
    src = Path(__file__).resolve().parents[2] / "bi150_ray" / "topology.py"
    code = f"import sys; sys.path.insert(0, {str(src.parents[1])!r}); import bi150_ray.topology; " + (
        "bad = [m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp', 'ray', 'numpy')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_axes_constant():
    assert AXES == ("dp", "pp", "sharding", "sep", "mp")
