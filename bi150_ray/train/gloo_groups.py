"""Give every gloo sub-group its own rendezvous store, so hybrid groups form on CPU.

Why: Paddle's ProcessGroupGloo rendezvouses on the *global* TCPStore without a per-group key
prefix (`ProcessGroupGloo(store, ...)` wraps the store in a plain `GlooStore`; there is no
PrefixStore). When fleet builds dp2 x sharding2, the disjoint groups [0,2] and [1,3] are formed at
the same moment and both publish the same gloo keys ("0", "1", ...); keys of earlier groups also
stay behind. A rank then reads another group's address and fails with
`gloo ... connect [127.0.0.1]:PORT: Connection refused`, or hangs. Data parallel alone or
sharding alone on the whole world never creates two same-sized sub-groups, which is why they
worked. Accelerator backends (NCCL/XCCL) are not affected and are left alone.

The fix: for every gloo group other than the global one, the member with in-group rank 0 starts a
fresh TCPStore on a free port and publishes `host:port` on the global store under a key that
includes the group id (group ids are assigned in the same order on every rank); the other members
read it and use that store. Nothing else about group creation changes.
"""

from __future__ import annotations

import os
import socket

_KEY = "/bi150-ray/gloo-group-store/{gid}"
_installed = False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def install() -> None:
    """Patch Paddle's group factory; call before fleet.init (i.e. before TrainingArguments)."""
    global _installed
    if _installed:
        return
    import paddle.distributed.collective as collective
    from paddle.base import core

    original = collective._new_process_group_impl
    host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").rsplit(":", 1)[0]
    timeout_s = int(int(os.environ.get("PADDLE_PG_TIMEOUT", "1800000")) / 1000)
    stores: dict[int, object] = {}  # keep per-group stores alive as long as the process

    def new_process_group_impl(backend, store, rank, world_size, group_name, pg_options, group_id=0, **kw):
        if backend != "gloo" or group_id == 0 or world_size < 2:
            return original(backend, store, rank, world_size, group_name, pg_options, group_id=group_id, **kw)
        key = _KEY.format(gid=group_id)
        if rank == 0:
            port = _free_port(host)
            store.set(key, f"{host}:{port}")
            group_store = core.TCPStore(host, port, True, world_size, timeout_s)
        else:
            store.wait(key)
            addr = store.get(key).decode()
            ghost, gport = addr.rsplit(":", 1)
            group_store = core.TCPStore(ghost, int(gport), False, world_size, timeout_s)
        stores[group_id] = group_store
        return original(
            backend, group_store, rank, world_size, group_name, pg_options, group_id=group_id, **kw
        )

    collective._new_process_group_impl = new_process_group_impl
    _installed = True
