"""The doctor's collective test: a tiny rank program started exactly as training ranks are.

Same environment contract, same RankWorker actors, same events file; only the program differs.
Every rank all-reduces a known tensor (rank r contributes r+1 everywhere, so every element of the
sum must be world*(world+1)/2), then the first rank of each node exchanges a few MB with the
first rank of every other node, one pair at a time, and the receiver reports MB/s. On CPU this is
gloo; on BI150 it is the CoreX/XCCL backend the job uses.

    python -m bi150_ray.train.collective_probe --mb 4 --reps 3
"""

from __future__ import annotations

import argparse
import os
import time
import traceback


def _first_rank_of_each_node() -> list[int]:
    """Global rank of local rank 0 on each node, from the contract (uniform ranks per node)."""
    world = int(os.environ["PADDLE_GLOBAL_SIZE"])
    per_node = int(os.environ["PADDLE_LOCAL_SIZE"])
    return list(range(0, world, per_node))


def run(mb: float, reps: int, events) -> None:
    import paddle
    import paddle.distributed as dist

    xccl = os.environ.get("PADDLE_XCCL_BACKEND")
    if os.environ.get("PADDLE_DISTRI_BACKEND") == "gloo":
        paddle.set_device("cpu")
    elif xccl:  # custom device (iluvatar_gpu): the contract's selected index (not verified on a BI150)
        paddle.set_device(f"{xccl}:{os.environ.get(f'FLAGS_selected_{xccl}s', '0')}")
    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    events.emit("start", world=world)

    numel = 1024
    x = paddle.full([numel], float(rank + 1), dtype="float32")
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    got = x.numpy()
    all_reduce_ok = bool((got == expected).all())
    events.emit("all_reduce", ok=all_reduce_ok, expected=expected, got_min=float(got.min()), got_max=float(got.max()))

    heads = _first_rank_of_each_node()
    n = max(1, int(mb * 1024 * 1024 / 4))
    pairs = []
    for i, a in enumerate(heads):
        for b in heads[i + 1:]:
            buf = paddle.full([n], float(a), dtype="float32") if rank == a else paddle.zeros([n], dtype="float32")
            dist.barrier()
            if rank in (a, b):
                warm = paddle.zeros([16], dtype="float32")
                if rank == a:
                    dist.send(warm, dst=b)
                else:
                    dist.recv(warm, src=a)
                t0 = time.perf_counter()
                for _ in range(reps):
                    if rank == a:
                        dist.send(buf, dst=b)
                    else:
                        dist.recv(buf, src=a)
                seconds = time.perf_counter() - t0
                if rank == b:
                    intact = bool((buf.numpy() == float(a)).all())
                    pairs.append({"src": a, "dst": b, "bytes": n * 4 * reps, "seconds": seconds,
                                  "mb_per_s": n * 4 * reps / seconds / 1e6, "intact": intact})
    dist.barrier()
    events.emit("done", pairs=pairs, all_reduce_ok=all_reduce_ok)


def main(argv: list[str] | None = None) -> int:
    from bi150_ray.events import EVENTS_ENV, EventWriter

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, default=4.0, help="MB per send/recv between each pair of nodes")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    events = EventWriter(os.environ.get(EVENTS_ENV), int(os.environ.get("PADDLE_GLOBAL_RANK", "0")))
    try:
        run(args.mb, args.reps, events)
    except BaseException as exc:  # report, then fail the process so the doctor sees both
        events.emit("error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    finally:
        events.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
