"""Hybrid-parallel topology: degree resolution, rank coordinates, groups and rank placement.

Ground floor: standard library only, so the driver can plan (and refuse) a job before any rank
starts, without importing Paddle. Everything here mirrors the installed sources:

- degree resolution: ``paddlenlp/trainer/training_args.py`` ``TrainingArguments.__post_init__``
  (paddlenlp 3.0.0b4);
- coordinates and groups: ``paddle/distributed/fleet/base/topology.py`` ``CommunicateTopology``
  and ``fleet.py`` ``_init_hybrid_parallel_env`` (paddlepaddle 3.3.1);
- pipeline constraints: ``paddle/distributed/fleet/model.py``, ``meta_parallel/pipeline_parallel.py``,
  ``meta_parallel/parallel_layers/pp_layers.py`` and ``paddlenlp/transformers/llama/modeling_pp.py``.

Differences between those installed versions and the FORK described in
``paddlenlp-pretrain-spec.md`` are noted where they matter.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger(__name__)

# The five axes PaddleNLP hands to fleet, by PaddleNLP's short names, and the group names fleet
# gives them (fleet.py: dp->"data", pp->"pipe", sharding->"sharding", sep->"sep", mp->"model").
AXES: tuple[str, ...] = ("dp", "pp", "sharding", "sep", "mp")
GROUP_NAMES: dict[str, str] = {
    "dp": "data",
    "pp": "pipe",
    "sharding": "sharding",
    "sep": "sep",
    "mp": "model",
}

# training_args.py: hybrid_parallel_topo_order None -> "pp_first". Both orders keep "sep" because
# Paddle 3.3.1's HybridCommunicateGroup has get_sep_parallel_world_size (the 4-axis fallback is
# only for Paddle < 2.6). Paddle 3.3.1's own DistributedStrategy default order has a sixth axis
# "cp" ('dp','pp','sharding','sep','cp','mp'), but PaddleNLP always passes its own 5-axis order,
# so the topology fleet builds for PaddleNLP has exactly these five axes.
TOPO_ORDERS: dict[str, tuple[str, ...]] = {
    "pp_first": ("dp", "pp", "sharding", "sep", "mp"),
    "sharding_first": ("dp", "sharding", "pp", "sep", "mp"),
}
PP_FIRST = TOPO_ORDERS["pp_first"]

SHARDING_STAGES = ("stage1", "stage2", "stage3")
_SHARDING_OPTIONS = (*SHARDING_STAGES, "offload")  # trainer_utils.ShardingOption values


class TopologyError(ValueError):
    """A parallel layout that PaddleNLP or Paddle would reject (or silently get wrong)."""


@dataclass(frozen=True)
class Degrees:
    """Resolved parallel degrees, all >= 1, as fleet sees them.

    ``sep`` is the degree of fleet's "sep" axis: PaddleNLP puts ``sep_parallel_degree`` there, or
    ``context_parallel_degree`` when sep is 1 (training_args.py, paddlenlp 3.0.0b4).
    ``sharding_stage`` is "" when PaddleNLP ends up with no sharding option (single process, pure
    data parallel, or a sharding degree of 1).
    """

    tp: int = 1
    pp: int = 1
    sharding: int = 1
    sep: int = 1
    dp: int = 1
    sharding_stage: str = ""
    order: tuple[str, ...] = PP_FIRST
    sharding_offload: bool = False

    def __post_init__(self) -> None:
        for axis in ("tp", "pp", "sharding", "sep", "dp"):
            value = getattr(self, axis)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TopologyError(f"Degrees.{axis} must be an integer >= 1, got {value!r}")
        if self.sharding_stage not in ("", *SHARDING_STAGES):
            raise TopologyError(
                f"Degrees.sharding_stage must be one of '', {', '.join(SHARDING_STAGES)}; got {self.sharding_stage!r}"
            )
        if tuple(sorted(self.order)) != tuple(sorted(AXES)):
            raise TopologyError(f"Degrees.order must be a permutation of {AXES}, got {self.order!r}")
        object.__setattr__(self, "order", tuple(self.order))

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.sharding * self.sep * self.tp

    def degree(self, axis: str) -> int:
        """Degree of one axis by its PaddleNLP short name (dp, pp, sharding, sep, mp)."""
        return {"dp": self.dp, "pp": self.pp, "sharding": self.sharding, "sep": self.sep, "mp": self.tp}[axis]

    @property
    def dims(self) -> tuple[int, ...]:
        """Axis sizes in topology order, as passed to CommunicateTopology."""
        return tuple(self.degree(axis) for axis in self.order)

    @property
    def use_hybrid_parallel(self) -> bool:
        """PaddleNLP's ``use_hybrid_parallel``: fleet hybrid groups exist iff any non-dp axis > 1."""
        return self.sharding > 1 or self.tp > 1 or self.pp > 1 or self.sep > 1

    @property
    def dataset_world_size(self) -> int:
        """Number of distinct data streams: sharding x dp (training_args.py ``dataset_world_size``).

        Without hybrid parallelism PaddleNLP returns the world size, which equals dp here.
        """
        return self.sharding * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank``: row-major over ``order``, the last axis fastest.

        CommunicateTopology enumerates ``itertools.product(*ranges)`` and numbers the tuples in
        that order, which is exactly this mixed-radix decomposition.
        """
        if not 0 <= rank < self.world:
            raise TopologyError(f"rank {rank} is outside the world of {self.world} ranks")
        out: dict[str, int] = {}
        rest = rank
        for axis in reversed(self.order):
            size = self.degree(axis)
            out[axis] = rest % size
            rest //= size
        return {axis: out[axis] for axis in AXES}

    def rank_of(self, **coords: int) -> int:
        """Inverse of :meth:`coords`; every axis must be given."""
        if set(coords) != set(AXES):
            raise TopologyError(f"rank_of needs exactly the axes {AXES}, got {sorted(coords)}")
        rank = 0
        for axis in self.order:
            size = self.degree(axis)
            if not 0 <= coords[axis] < size:
                raise TopologyError(f"coordinate {axis}={coords[axis]} is outside 0..{size - 1}")
            rank = rank * size + coords[axis]
        return rank

    def dataset_rank(self, rank: int) -> int:
        """Which data stream ``rank`` reads: sharding_degree * dp_rank + sharding_rank.

        training_args.py ``dataset_rank``; without hybrid parallelism it is the global rank,
        which is the dp coordinate here. All tp/pp/sep ranks of one (dp, sharding) read the same data.
        """
        c = self.coords(rank)
        return self.sharding * c["dp"] + c["sharding"]


def _int_arg(args: Mapping[str, Any], key: str, default: int = -1) -> int:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool):
        raise TopologyError(f"{key} must be an integer (-1 for automatic), got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TopologyError(f"{key} must be an integer (-1 for automatic), got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise TopologyError(f"{key} must be an integer (-1 for automatic), got {value!r}")
    if number < -1:
        raise TopologyError(f"{key}={number} is invalid: use -1 (automatic/off) or a positive integer")
    return number


def parse_sharding(value: Any) -> list[str]:
    """PaddleNLP's parsing of ``--sharding``: a bool, or space-separated ShardingOption values.

    Returns the options in the order given. Raises on unknown options, on "offload" alone, and on
    more than one stage (training_args.py ``__post_init__``).
    """
    if value is None:
        return []
    if isinstance(value, bool):
        return ["stage1"] if value else []
    if isinstance(value, str):
        options = value.split()
    elif isinstance(value, Sequence):
        options = [str(v) for v in value]
    else:
        raise TopologyError(f"sharding must be a string such as 'stage1' or 'stage2 offload', got {value!r}")
    for option in options:
        if option not in _SHARDING_OPTIONS:
            raise TopologyError(
                f"sharding: unknown option {option!r}; use one of {', '.join(_SHARDING_OPTIONS)} "
                "(for example 'stage1', or 'stage2 offload')"
            )
    if options == ["offload"]:
        raise TopologyError(
            "sharding: 'offload' can't work on its own; add it to a stage, for example 'stage2 offload'"
        )
    if len(options) > int("offload" in options) + 1:
        raise TopologyError(
            f"sharding: too many options in {value!r}; give one stage, optionally plus 'offload'"
        )
    return options


def resolve_degrees(args: Mapping[str, Any], world_size: int) -> Degrees:
    """Resolve the parallel degrees of a PaddleNLP training config for ``world_size`` ranks.

    Mirrors ``TrainingArguments.__post_init__`` (paddlenlp 3.0.0b4): -1 means "not set";
    ``sharding_parallel_degree=-1`` with a sharding option takes what tp/sep/cp/pp leave;
    dp is the remainder; a single process, or a job with no axis > 1, turns sharding off.
    Layouts PaddleNLP would accept but fleet would then fail on (a remainder that does not
    divide) are refused here too, with the key to change.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise TopologyError(f"world size must be a positive integer, got {world_size!r}")
    if args.get("enable_auto_parallel"):
        raise TopologyError(
            "enable_auto_parallel: the auto-parallel (static) path is not supported by this runtime; "
            "set enable_auto_parallel to false"
        )

    order_name = args.get("hybrid_parallel_topo_order") or "pp_first"
    if order_name not in TOPO_ORDERS:
        raise TopologyError(
            f"hybrid_parallel_topo_order={order_name!r} is invalid; use 'pp_first' (the default) or 'sharding_first'"
        )
    order = TOPO_ORDERS[order_name]

    tp_raw = _int_arg(args, "tensor_parallel_degree")
    pp_raw = _int_arg(args, "pipeline_parallel_degree")
    sd_raw = _int_arg(args, "sharding_parallel_degree")
    sep_raw = _int_arg(args, "sep_parallel_degree")
    cp_raw = _int_arg(args, "context_parallel_degree")
    ep_raw = _int_arg(args, "expert_parallel_degree")
    etp_raw = _int_arg(args, "expert_tensor_parallel_degree")
    legacy_sd = _int_arg(args, "sharding_degree")  # deprecated alias
    for key, value in (("tensor_parallel_degree", tp_raw), ("pipeline_parallel_degree", pp_raw)):
        if value == 0:
            # PaddleNLP computes world % (tp * pp) with the raw values: 0 is a ZeroDivisionError.
            raise TopologyError(f"{key}=0 is invalid: use -1 (off) or a positive integer")

    if world_size == 1:
        # "disable sharding when we have only single gpu": sharding and every degree reset.
        if any(v > 1 for v in (tp_raw, pp_raw, sd_raw, legacy_sd, sep_raw, cp_raw)):
            _log.warning("world size 1: PaddleNLP ignores every parallel degree and runs a single process")
        return Degrees(order=order)

    sharding = parse_sharding(args.get("sharding", ""))
    if legacy_sd > 0:
        sd_raw = max(legacy_sd, sd_raw)
    if not sharding and sd_raw > 0:
        _log.warning("sharding_parallel_degree is useful only when sharding is specified")

    tp, pp, sep, cp = (max(v, 1) for v in (tp_raw, pp_raw, sep_raw, cp_raw))
    if max(etp_raw, 1) > 1:
        raise TopologyError(
            "expert_tensor_parallel_degree: PaddleNLP only supports 1; remove it or set it to -1"
        )
    if max(ep_raw, 1) > 1:
        raise TopologyError(
            "expert_parallel_degree: expert parallelism (MoE) is not supported by this runtime; set it to -1"
        )
    if world_size % (tp * pp) != 0:
        raise TopologyError(
            f"tensor_parallel_degree ({tp}) x pipeline_parallel_degree ({pp}) = {tp * pp} does not divide "
            f"the world size {world_size}; choose degrees whose product divides {world_size}, "
            "or change the number of nodes/devices"
        )
    if sep > 1 and cp > 1:
        raise TopologyError(
            "sep_parallel_degree and context_parallel_degree cannot both be > 1; set one of them to -1"
        )
    model_ranks = tp * sep * cp * pp
    if world_size % model_ranks != 0:
        raise TopologyError(
            f"tensor_parallel_degree ({tp}) x pipeline_parallel_degree ({pp}) x sep_parallel_degree ({sep}) x "
            f"context_parallel_degree ({cp}) = {model_ranks} does not divide the world size {world_size}; "
            "change sep_parallel_degree/context_parallel_degree or the other degrees"
        )

    if sd_raw == -1 and sharding:
        sd_raw = world_size // model_ranks
    sd = max(sd_raw, 1)
    if sd == 1 and sharding:
        _log.warning("sharding_parallel_degree=1 means no sharding; PaddleNLP turns sharding off")
        sharding = []
    if (world_size // model_ranks) % sd != 0:
        raise TopologyError(
            f"sharding_parallel_degree={sd} does not divide the {world_size // model_ranks} ranks left by "
            f"tp x pp x sep ({model_ranks}) in a world of {world_size}; use -1 (all of them) or a divisor of "
            f"{world_size // model_ranks}"
        )
    dp = world_size // (sd * model_ranks)

    hybrid = sd > 1 or tp > 1 or pp > 1 or sep > 1 or cp > 1
    if not hybrid:
        # PaddleNLP resets every degree to -1 and drops sharding: plain data parallel.
        return Degrees(dp=world_size, order=order)

    if pp > 1 and ("stage2" in sharding or "stage3" in sharding):
        raise TopologyError(
            "sharding: pipeline parallel is not compatible with sharding stage2 or stage3; "
            "use sharding 'stage1' or set pipeline_parallel_degree to -1"
        )
    offload = "offload" in sharding
    if offload:
        _log.warning(
            "sharding 'offload' is accepted but not supported by PaddleNLP (it warns and ignores it)"
        )
    stage = next((s for s in sharding if s in SHARDING_STAGES), "")
    return Degrees(
        tp=tp,
        pp=pp,
        sharding=sd,
        sep=sep if sep > 1 else cp,
        dp=dp,
        sharding_stage=stage,
        order=order,
        sharding_offload=offload,
    )


def validate_model(
    degrees: Degrees,
    num_attention_heads: int,
    num_key_value_heads: int | None,
    num_hidden_layers: int,
    *,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    fuse_attention_qkv: bool = False,
    virtual_pp_degree: int = 1,
    gradient_accumulation_steps: int = 1,
) -> list[str]:
    """Refuse a LLaMA shape the layout cannot split; return warnings for legal-but-notable cases.

    Only rules found in the installed sources are enforced:

    - tp: ``num_attention_heads % tp`` (LlamaAttention asserts), ``intermediate_size % tp``
      (Column/RowParallelLinear assert). ``num_key_value_heads % tp != 0`` is legal in paddlenlp
      3.0.0b4 (K/V are replicated) unless ``fuse_attention_qkv``; a vocab that tp does not divide
      leaves embedding and lm_head unsplit.
    - pp: the pipe model has ``num_hidden_layers + 3`` layer descs (embedding, decoders, norm,
      lm_head) and SegmentLayers asserts ``descs >= pp``. When ``layers % pp != 0`` LlamaForCausalLMPipe
      falls back to "uniform" segmentation over all descs (a warning, not an error).
      With plain 1F1B (virtual_pp_degree 1) Paddle puts no bound on accumulate steps vs pp
      (startup steps are min(pp - stage - 1, acc)), so none is enforced.
    - virtual pp > 1: layers % (pp * vpp) == 0 (layer-based segmentation), pp > 2, and
      accumulate steps >= 2 * pp (interleave) or == pp (F-then-B; fleet/model.py picks the schedule).
    """
    if num_attention_heads < 1 or num_hidden_layers < 1:
        raise TopologyError("num_attention_heads and num_hidden_layers must be >= 1")
    kv_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
    warnings: list[str] = []
    tp, pp = degrees.tp, degrees.pp

    if tp > 1:
        if num_attention_heads % tp != 0:
            raise TopologyError(
                f"num_attention_heads={num_attention_heads} is not divisible by tensor_parallel_degree={tp}; "
                "choose a tensor_parallel_degree that divides the number of heads"
            )
        if kv_heads % tp != 0:
            if fuse_attention_qkv:
                raise TopologyError(
                    f"num_key_value_heads={kv_heads} is not divisible by tensor_parallel_degree={tp} and "
                    "fuse_attention_qkv is true; set fuse_attention_qkv to false or pick a tp that divides the KV heads"
                )
            warnings.append(
                f"num_key_value_heads={kv_heads} is not divisible by tensor_parallel_degree={tp}: "
                "PaddleNLP replicates the K/V projections on every tp rank"
            )
        if intermediate_size is not None and intermediate_size % tp != 0:
            raise TopologyError(
                f"intermediate_size={intermediate_size} is not divisible by tensor_parallel_degree={tp}; "
                "choose a tensor_parallel_degree that divides it"
            )
        if vocab_size is not None and vocab_size % tp != 0:
            warnings.append(
                f"vocab_size={vocab_size} is not divisible by tensor_parallel_degree={tp}: "
                "embedding and lm_head are not split across tp ranks"
            )

    if pp > 1:
        descs = num_hidden_layers + 3
        if descs < pp:
            raise TopologyError(
                f"num_hidden_layers={num_hidden_layers} gives {descs} pipeline layers (embedding, decoders, norm, "
                f"lm_head), fewer than pipeline_parallel_degree={pp}; lower pipeline_parallel_degree to at most {descs}"
            )
        if num_hidden_layers % pp != 0:
            warnings.append(
                f"num_hidden_layers={num_hidden_layers} is not divisible by pipeline_parallel_degree={pp}: "
                "PaddleNLP segments the pipeline 'uniform'ly over all layers instead of by decoder layer"
            )
    if virtual_pp_degree > 1:
        if pp <= 2:
            raise TopologyError(
                f"virtual_pp_degree={virtual_pp_degree} needs pipeline_parallel_degree > 2 (got {pp}); "
                "set virtual_pp_degree to 1 or raise pipeline_parallel_degree"
            )
        if num_hidden_layers % (pp * virtual_pp_degree) != 0:
            raise TopologyError(
                f"num_hidden_layers={num_hidden_layers} must be divisible by pipeline_parallel_degree x "
                f"virtual_pp_degree = {pp * virtual_pp_degree}; change virtual_pp_degree"
            )
        acc = gradient_accumulation_steps
        if not (acc >= 2 * pp or acc == pp):
            raise TopologyError(
                f"gradient_accumulation_steps={acc} with virtual_pp_degree={virtual_pp_degree} and "
                f"pipeline_parallel_degree={pp}: Paddle needs at least {2 * pp} (interleave) or exactly {pp} "
                "(F-then-B); change gradient_accumulation_steps"
            )
    return warnings


@dataclass(frozen=True)
class RankSlot:
    """Where one rank runs: node-major, so rank = node_index * local_size + local_rank."""

    rank: int
    node_index: int
    local_rank: int
    local_size: int


def layout(nodes: int, devices_per_node: int) -> list[RankSlot]:
    """Node-major placement, as ``paddle.distributed.launch`` numbers ranks (rank_offset + i).

    Keeping 16n..16n+15 on node n is what keeps sharding groups on one node and only 3 of the 7
    pipeline boundaries of the reference job (pp8 x sharding8) on the network.
    """
    if nodes < 1 or devices_per_node < 1:
        raise TopologyError(
            f"need at least one node and one device per node, got {nodes} x {devices_per_node}"
        )
    return [
        RankSlot(
            rank=node * devices_per_node + local,
            node_index=node,
            local_rank=local,
            local_size=devices_per_node,
        )
        for node in range(nodes)
        for local in range(devices_per_node)
    ]


def describe_groups(degrees: Degrees) -> dict[str, list[list[int]]]:
    """Rank lists of every communication group, keyed by fleet's group name.

    Same lists, in the same order, as ``CommunicateTopology.get_comm_list(name)``: iterate the
    other axes row-major in topology order and vary the named axis. HybridCommunicateGroup builds
    one ``new_group`` per list (``_set_comm_group``).
    """
    out: dict[str, list[list[int]]] = {}
    for axis in degrees.order:
        others = [a for a in degrees.order if a != axis]
        groups = []
        for fixed in itertools.product(*(range(degrees.degree(a)) for a in others)):
            coords = dict(zip(others, fixed, strict=True))
            groups.append([degrees.rank_of(**coords, **{axis: i}) for i in range(degrees.degree(axis))])
        out[GROUP_NAMES[axis]] = groups
    return {GROUP_NAMES[a]: out[GROUP_NAMES[a]] for a in AXES}


@dataclass(frozen=True)
class PipelineHop:
    """One point-to-point link between adjacent pipeline stages that crosses nodes."""

    src_rank: int
    dst_rank: int
    src_stage: int
    dst_stage: int
    src_node: int
    dst_node: int


def cross_node_pipeline_hops(
    degrees: Degrees, devices_per_node: int, *, virtual_pp_degree: int = 1
) -> list[PipelineHop]:
    """Stage-to-stage links of every pipe group whose two ranks sit on different nodes.

    With 1F1B only stage s -> s+1 talk; with virtual pp > 1 the last stage also feeds the first
    (the next model chunk), so that wrap-around link is included.
    """
    if devices_per_node < 1:
        raise TopologyError(f"devices_per_node must be >= 1, got {devices_per_node}")
    hops = []
    for group in describe_groups(degrees)["pipe"]:
        links = list(zip(range(len(group) - 1), range(1, len(group)), strict=True))
        if virtual_pp_degree > 1 and len(group) > 1:
            links.append((len(group) - 1, 0))
        for a, b in links:
            src, dst = group[a], group[b]
            src_node, dst_node = src // devices_per_node, dst // devices_per_node
            if src_node != dst_node:
                hops.append(PipelineHop(src, dst, a, b, src_node, dst_node))
    return hops
