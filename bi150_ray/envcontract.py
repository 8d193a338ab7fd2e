"""The per-rank environment contract: what ``python -m paddle.distributed.launch`` gives a worker.

This module is the single source of truth for the environment of a rank process. Standard
library only. Read from the installed paddlepaddle 3.3.1:

- ``distributed/launch/controllers/collective.py`` ``_build_pod_with_args`` /
  ``_build_pod_with_master``: the PADDLE_* variables of every worker;
- ``controllers/controller.py`` ``add_container`` (PADDLE_LOG_DIR = abspath of --log_dir) and
  ``ControllerBase.__init__`` (``ctx.set_envs({"POD_NAME": pod.name})``, so every worker inherits
  POD_NAME, a random 6-letter name per node);
- ``context/device.py``: the device-selection key (``FLAGS_selected_gpus`` for a CUDA build,
  ``FLAGS_selected_<custom type>s`` plus ``PADDLE_DISTRI_BACKEND=xccl`` and
  ``PADDLE_XCCL_BACKEND=<custom type>`` for a custom device) whose value is the index of the
  device among the visible labels; no device at all means ``PADDLE_DISTRI_BACKEND=gloo``;
- ``context/args_envs.py`` ``fetch_envs``: the launcher moves ``http_proxy``/``https_proxy`` to
  ``*_original`` before copying its environment into the workers; importing Paddle in the launcher
  also leaves ``OMP_NUM_THREADS`` (default "1") in that environment (``paddle/base/__init__.py``).

Launch also adds ``PADDLE_BACKUP_ENV_PATH`` (``launch/utils/process_context.py``: a JSON dump of
the worker env in the log dir, used by ``getenv_or_backup`` only when PADDLE_TRAINER_ENDPOINTS
exceeds 48,000 characters) and, via its own Paddle import, ``CUSTOM_DEVICE_ROOT``. We set neither:
the first needs a file nobody reads at our sizes, the second is recomputed identically by the
rank's own ``import paddle``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from bi150_ray.topology import RankSlot

if TYPE_CHECKING:
    from bi150_ray.config import RuntimeConfig

BACKENDS: tuple[str, ...] = ("cpu", "corex", "iluvatar_gpu")

# The Paddle 3 custom-device type registered by PaddleCustomDevice backends/iluvatar_gpu
# (runtime/runtime.cc: DeviceType = "iluvatar_gpu").
ILUVATAR_DEVICE_TYPE = "iluvatar_gpu"

# device.py get_selected_device_key: GPU -> FLAGS_selected_gpus; custom device ->
# f"FLAGS_selected_{type}s". CPU gets no key at all.
SELECTED_DEVICE_KEY: dict[str, str | None] = {
    "cpu": None,
    "corex": "FLAGS_selected_gpus",
    "iluvatar_gpu": f"FLAGS_selected_{ILUVATAR_DEVICE_TYPE}s",
}

# The mask the device runtime honours. CoreX is CUDA-compatible, and the iluvatar_gpu plugin is
# built on the CoreX CUDA runtime (cudaGetDeviceCount/cudaSetDevice), so both use
# CUDA_VISIBLE_DEVICES. (Launch itself reads ILUVATAR_GPU_VISIBLE_DEVICES only to number the
# labels of a custom device; it never sets either variable.)
VISIBLE_DEVICES_VAR: dict[str, str | None] = {
    "cpu": None,
    "corex": "CUDA_VISIBLE_DEVICES",
    "iluvatar_gpu": "CUDA_VISIBLE_DEVICES",
}

# Set for every worker by collective.py (+ PADDLE_LOG_DIR by controller.py, POD_NAME by the
# controller's context).
COMMON_KEYS: tuple[str, ...] = (
    "PADDLE_MASTER",
    "PADDLE_GLOBAL_SIZE",
    "PADDLE_LOCAL_SIZE",
    "PADDLE_GLOBAL_RANK",
    "PADDLE_LOCAL_RANK",
    "PADDLE_NNODES",
    "PADDLE_CURRENT_ENDPOINT",
    "PADDLE_TRAINER_ID",
    "PADDLE_TRAINERS_NUM",
    "PADDLE_RANK_IN_NODE",
    "PADDLE_AUTO_CLUSTER",
    "PADDLE_TRAINER_ENDPOINTS",
    "PADDLE_LOG_DIR",
    "POD_NAME",
)
BACKEND_KEYS: tuple[str, ...] = (
    "PADDLE_DISTRI_BACKEND",
    "PADDLE_XCCL_BACKEND",
    "FLAGS_selected_gpus",
    f"FLAGS_selected_{ILUVATAR_DEVICE_TYPE}s",
    "CUDA_VISIBLE_DEVICES",
)

# What the vendor launchers (FORK llm/run.sh, run_dist.sh, run_eval.sh) unset before launching.
# In the installed Paddle 3.3.1 none of them switches to the legacy launcher any more
# (Context.is_legacy_mode only looks at --legacy and unknown CLI arguments), but they still steer
# it: PADDLE_TRAINER_ENDPOINTS / DISTRIBUTED_TRAINER_ENDPOINTS rewrite --master and --nnodes
# (launch/plugins collective_compatible), PADDLE_ELASTIC_TIMEOUT overrides --elastic_timeout,
# FLAGS_START_PORT and PADDLE_ELASTIC_JOB_ID drive the legacy and elastic launchers. A rank must
# not inherit them from the actor's environment. CUDA_VISIBLE_DEVICES is unset too; the contract
# sets it again explicitly when the node has a visible list.
_UNSET: tuple[str, ...] = (
    "PADDLE_ELASTIC_JOB_ID",
    "PADDLE_TRAINER_ENDPOINTS",
    "DISTRIBUTED_TRAINER_ENDPOINTS",
    "FLAGS_START_PORT",
    "PADDLE_ELASTIC_TIMEOUT",
    "CUDA_VISIBLE_DEVICES",
)

# Vendor variables of the BI150 recipe (run_node4.sh): read by IXCCL and the CoreX Paddle build.
KNOWN_VENDOR_VARIABLES: tuple[str, ...] = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "FLAGS_enable_ixdnn_attn")
VENDOR_PREFIXES: tuple[str, ...] = ("NCCL_", "IXCCL_", "FLAGS_")

_PROXY_VARIABLES = ("http_proxy", "https_proxy")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvContractError(ValueError):
    """An input that would give a rank a wrong or ambiguous environment."""


def validate_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise listing the valid ones."""
    if name not in BACKENDS:
        raise EnvContractError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def variables_to_unset() -> tuple[str, ...]:
    """Variables a rank must not inherit (the vendor launchers unset them)."""
    return _UNSET


def is_reserved(key: str) -> bool:
    """True for a variable the contract owns: user passthrough may not set it."""
    return key in COMMON_KEYS or key in BACKEND_KEYS or key in _UNSET or key.startswith("FLAGS_selected_")


@dataclass(frozen=True)
class RankEnvInput:
    """Everything that decides one rank's environment.

    ``endpoints`` lists every rank's ``ip:port`` in global-rank order. ``master`` is where rank 0
    hosts the TCPStore; None means ``endpoints[0]``, as launch does when given ``--ips``.
    ``device`` is this rank's device label on the node (what launch's ``--devices`` lists; a
    physical id unless ``visible_devices`` renumbers); None means ``str(local_rank)``, which is
    right for whole-node bundles. ``visible_devices`` is the node's visible list (comma-joined)
    or None when every device is visible. Both are ignored for the cpu backend.
    ``log_dir`` must be absolute: launch exports ``os.path.abspath(--log_dir)``, and the driver's
    working directory means nothing on another node.
    """

    slot: RankSlot
    world_size: int
    nnodes: int
    endpoints: tuple[str, ...]
    backend: str
    log_dir: str
    master: str | None = None
    device: str | None = None
    visible_devices: str | None = None
    pod_name: str | None = None
    passthrough: Mapping[str, str] = field(default_factory=dict)


def _check_endpoint(what: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnvContractError(f"{what} must look like ip:port, got {value!r}")


def _selected_index(inp: RankEnvInput) -> str:
    """The device's index among the node's visible labels (device.py ``labels.index(d)``)."""
    device = str(inp.slot.local_rank) if inp.device is None else str(inp.device).strip()
    if inp.visible_devices is None or inp.visible_devices.strip() in ("", "all"):
        if not device.isdigit():
            raise EnvContractError(f"device must be a device index, got {device!r}")
        return device
    labels = [label.strip() for label in inp.visible_devices.split(",")]
    if device not in labels:
        raise EnvContractError(
            f"device {device!r} of rank {inp.slot.rank} is not in visible_devices {inp.visible_devices!r}"
        )
    return str(labels.index(device))


def rank_env(inp: RankEnvInput) -> dict[str, str]:
    """The environment ``paddle.distributed.launch`` (collective mode) gives this rank, plus passthrough.

    One selected device per rank: launch writes the whole visible list only when a node runs a
    single replica; Paddle then uses the first entry, which is the same device.
    """
    backend = validate_backend(inp.backend)
    slot = inp.slot
    if inp.world_size < 1 or not 0 <= slot.rank < inp.world_size:
        raise EnvContractError(f"rank {slot.rank} is outside the world of {inp.world_size} ranks")
    if not 0 <= slot.local_rank < slot.local_size:
        raise EnvContractError(f"local rank {slot.local_rank} is outside the node's {slot.local_size} ranks")
    if not 1 <= inp.nnodes <= inp.world_size or not 0 <= slot.node_index < inp.nnodes:
        raise EnvContractError(
            f"node {slot.node_index} of {inp.nnodes} is inconsistent with {inp.world_size} ranks"
        )
    endpoints = tuple(inp.endpoints)
    if len(endpoints) != inp.world_size:
        raise EnvContractError(
            f"got {len(endpoints)} endpoints for {inp.world_size} ranks; need one per rank"
        )
    for i, endpoint in enumerate(endpoints):
        _check_endpoint(f"endpoint of rank {i}", endpoint)
    if len(set(endpoints)) != len(endpoints):
        raise EnvContractError("endpoints must be distinct (two ranks would bind the same ip:port)")
    master = endpoints[0] if inp.master is None else inp.master
    _check_endpoint("master", master)
    if not posixpath.isabs(inp.log_dir):
        raise EnvContractError(f"log_dir must be an absolute path on the rank's node, got {inp.log_dir!r}")

    env = {
        "PADDLE_MASTER": master,
        "PADDLE_GLOBAL_SIZE": str(inp.world_size),
        "PADDLE_LOCAL_SIZE": str(slot.local_size),
        "PADDLE_GLOBAL_RANK": str(slot.rank),
        "PADDLE_LOCAL_RANK": str(slot.local_rank),
        "PADDLE_NNODES": str(inp.nnodes),
        "PADDLE_CURRENT_ENDPOINT": endpoints[slot.rank],
        "PADDLE_TRAINER_ID": str(slot.rank),
        "PADDLE_TRAINERS_NUM": str(inp.world_size),
        "PADDLE_RANK_IN_NODE": str(slot.local_rank),
        # str(--auto_cluster_config), whose default is the int 0.
        "PADDLE_AUTO_CLUSTER": "0",
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_LOG_DIR": posixpath.normpath(inp.log_dir),
        "POD_NAME": inp.pod_name or f"node{slot.node_index}",
    }
    if backend == "cpu":
        env["PADDLE_DISTRI_BACKEND"] = "gloo"
    else:
        env[SELECTED_DEVICE_KEY[backend]] = _selected_index(inp)
        if backend == "iluvatar_gpu":
            env["PADDLE_DISTRI_BACKEND"] = "xccl"
            env["PADDLE_XCCL_BACKEND"] = ILUVATAR_DEVICE_TYPE
        visible_var = VISIBLE_DEVICES_VAR[backend]
        if inp.visible_devices is not None and visible_var is not None:
            env[visible_var] = inp.visible_devices

    for key, value in inp.passthrough.items():
        if not _ENV_NAME.match(key):
            raise EnvContractError(f"passthrough variable name {key!r} is not a valid environment name")
        if is_reserved(key):
            raise EnvContractError(
                f"passthrough may not set {key}: the environment contract owns it "
                "(set the runtime's backend/device/endpoint options instead)"
            )
        if not isinstance(value, str):
            raise EnvContractError(f"passthrough value of {key} must be a string, got {value!r}")
        env[key] = value
    return env


def job_rank_env(rt: RuntimeConfig, slot: RankSlot, endpoints: tuple[str, ...], master: str, log_dir: str) -> dict[str, str]:
    """One rank's contract inside a job's gang: what the driver and `bi150-ray doctor` both hand a rank."""
    return rank_env(RankEnvInput(slot=slot, world_size=rt.world_size, nnodes=rt.nodes, endpoints=endpoints,
                                 backend=rt.backend, log_dir=log_dir, master=master,
                                 pod_name=f"node{slot.node_index}", passthrough=rt.env))


def select_passthrough(environ: Mapping[str, str], extra: Iterable[str] = ()) -> dict[str, str]:
    """Pick vendor variables to forward from ``environ``: the known ones plus names/globs in ``extra``.

    ``extra`` takes exact names or shell patterns such as ``"NCCL_*"``; contract variables are
    never selected, even when a pattern matches them.
    """
    patterns = list(KNOWN_VENDOR_VARIABLES) + list(extra)
    return {
        key: value
        for key, value in environ.items()
        if not is_reserved(key) and any(fnmatchcase(key, pattern) for pattern in patterns)
    }


def worker_environ(
    base: Mapping[str, str], contract: Mapping[str, str], *, move_proxies: bool = True
) -> dict[str, str]:
    """The full environment of a rank process: ``base`` (the actor's) cleaned, then ``contract``.

    Drops :func:`variables_to_unset` and every contract-owned variable the contract does not set
    (a stale ``PADDLE_DISTRI_BACKEND=gloo`` would otherwise break a corex rank), moves
    ``http_proxy``/``https_proxy`` to ``*_original`` and defaults ``OMP_NUM_THREADS`` to "1" as
    the launcher does. A proxy listed in the contract's passthrough is kept.
    """
    env = {k: v for k, v in base.items() if not is_reserved(k)}
    if move_proxies:
        for key in _PROXY_VARIABLES:
            if key in env:
                env[f"{key}_original"] = env.pop(key)
    try:
        env["OMP_NUM_THREADS"] = str(int(env.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        env["OMP_NUM_THREADS"] = "1"
    env.update(contract)
    return env


def endpoints_like_launch(ips: Iterable[str], replicas: int, start_port: int) -> tuple[str, ...]:
    """Endpoints as launch's args mode builds them: ``ip:start_port+i`` for each ip, for i < replicas."""
    return tuple(f"{ip}:{start_port + i}" for ip in ips for i in range(replicas))


_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH")
# Whole words that start a secret name even with a suffix (PASSWORDFILE, CREDENTIALS, AUTHORIZATION).
_SECRET_STEMS = ("PASSW", "CREDENTIAL", "AUTHORIZ", "SECRET")
_NEVER_SECRET_PREFIXES = ("FLAGS_", "NCCL_", "IXCCL_", "PADDLE_")
_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@")


def _looks_secret(key: str) -> bool:
    upper = key.upper()
    if upper.startswith(_NEVER_SECRET_PREFIXES):
        return False
    words = [w for w in re.split(r"[^A-Z0-9]+", upper) if w]
    return any(
        w in (s, s + "S") or w.endswith(s) or w.startswith(_SECRET_STEMS)
        for w in words
        for s in _SECRET_WORDS
    )


def redact(env: Mapping[str, str]) -> dict[str, str]:
    """A copy safe to log or record: secret-looking values become "***".

    A key is secret when one of its ``_``-separated words is, or ends with, TOKEN, SECRET, PASSWORD,
    PASSWD, KEY, CREDENTIAL or AUTH (plural too: HF_TOKEN, AWS_ACCESS_KEYS, APIKEY, OAUTH), or
    starts with PASSW/CREDENTIAL/AUTHORIZ/SECRET; case-insensitive. FLAGS_/NCCL_/IXCCL_/PADDLE_
    variables are never secret (NCCL_IB_HCA, FLAGS_enable_ixdnn_attn); TOKENIZERS_PARALLELISM is not. Passwords inside URLs (``scheme://user:pass@host``) are masked in
    every value.
    """
    out = {}
    for key, value in env.items():
        if _looks_secret(key):
            out[key] = "***"
        else:
            out[key] = _URL_USERINFO.sub(r"\g<head>***@", value) if isinstance(value, str) else value
    return out
