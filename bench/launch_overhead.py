"""Launch overhead: the same tiny job run by `paddle.distributed.launch` and by bi150-ray.

Both runners train the identical job: the demo's tiny LLaMA, the same PaddleNLP arguments (those
`PretrainJob`'s plan hands our ranks, from `plan.rank_args(0)`), the same rank count with sharding
stage1 over all ranks, the same number of steps, evaluation and intermediate checkpoints off, and
fresh output and data_cache directories for every run (no resume; the data_cache starts with the
job's dataset index files from an untimed warm-up run unless --cold-index-cache). Both run the same rank program
(`bi150_ray/train/rank.py`) and are measured from the same JSON-lines events it writes
(`BI150_RAY_EVENTS`), so the figures do not depend on who started the processes:

- launch: `python -m paddle.distributed.launch --nproc_per_node N --log_dir DIR .../rank.py ARGS.json`
  on this host, as the vendor recipe does;
- ours:   `PretrainJob(job).run()` on a simulated Ray cluster (bi150_ray.demo.simulated_cluster) of
  `--nodes` node(s) x ranks/nodes BI150. Each round runs in its own process on its own cluster,
  started and left idle for `--settle-s` before the round's first run and kept up for both runs,
  so the cluster is already up for ours and both runners see the same idle Ray daemons.

Per run it reports
- time-to-first-step: runner start (launch process spawned / PretrainJob constructed, the
  driver already connected to the cluster) to the first `step` event of rank 0;
- steady-state tokens/s: tokens between rank 0's step `--skip` and its last step divided by the
  time between those two events;
- where the time to the first step goes (our driver's phases are timed by wrapping cluster /
  driver functions for the duration of the run; nothing is changed), and the CPU the runner's own
  processes (launcher, or Ray daemons + actors + driver) and everything else on the machine used
  during the steady-state window.

Table columns: `first step s` time-to-first-step; `rank up s` / `ready s` when rank 0's process
wrote its `start` (interpreter up, before importing Paddle) and `ready` (model, data and trainer
built) events, seconds after the runner started; `tok/s` the steady-state figure above, `step med`
the median of the per-step figures in the same window (less sensitive to a burst of foreign
load); `nice` rank 0's niceness; `idx` how many 3 s sleeps ranks took waiting for rank 0's dataset
index files (0 unless --cold-index-cache); CPUs = average CPUs busy, as ranks/runner/other, in the steady
window and from the runner's start to the first step: the ranks / the rest of this benchmark's
process tree (launcher, or Ray daemons + actors + driver; the idle Ray daemons count in both) /
everything else on the machine (other people's jobs: noise).

Rounds alternate the runners and swap which one goes first every round (launch, ours | ours,
launch | ...). The headline figures are the medians over rounds of the per-round ratios
ours / launch. This is a benchmark, not a test: it asserts nothing about absolute times.

    python bench/launch_overhead.py [--rounds 3] [--steps 40] [--ranks 2] [--nodes 1]
    python bench/launch_overhead.py --worker-niceness 0    # experiment: rank actors at nice 0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/launch_overhead.py` from a checkout
    sys.path.insert(0, str(REPO))

from bi150_ray import config as config_mod  # noqa: E402
from bi150_ray import events as ev  # noqa: E402

RANK_FILE = REPO / "bi150_ray" / "train" / "rank.py"
HEARTBEAT_S = 2.0  # the same heartbeat period for both runners
# Both runners' ranks get these too: a Python stack in the rank log if a rank dies of a signal.
RANK_ENV = {"PYTHONFAULTHANDLER": "1"}
TARGET_TOKENS_RATIO = 0.98  # ours / launch, at least
TARGET_TTFS_RATIO = 1.25  # ours / launch, at most


# -- the machine ------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paddlepaddle": _version("paddlepaddle"),
        "paddlenlp": _version("paddlenlp"),
        "ray": _version("ray"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def format_machine(m: dict[str, Any]) -> str:
    return (
        f"{m['nproc']} CPU(s) available ({m['cpu_count']} online), {m['cpu_model']}, {m['mem_gb']} GB RAM, "
        f"Linux {m['kernel']}; python {m['python']}, paddlepaddle {m['paddlepaddle']} (CPU), "
        f"paddlenlp {m['paddlenlp']}, ray {m['ray']}; load average at start {m['loadavg_at_start']}"
    )


# -- CPU accounting ---------------------------------------------------------------------------
class CpuSampler:
    """Samples, once per `period_s`, the CPU seconds of this process and all its descendants and
    the machine's total busy CPU seconds, so a window's CPU can be split into ranks / the runner's
    own processes / everything else on the machine (other people's jobs)."""

    def __init__(self, period_s: float = 1.0) -> None:
        import psutil  # ships with ray[default]

        self._psutil = psutil
        self.period_s = period_s
        self.samples: list[tuple[float, float, dict[int, float]]] = []  # (t, machine busy, {pid: cpu})
        self.nice: dict[int, int] = {}  # last niceness seen per pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _snapshot(self) -> None:
        psutil = self._psutil
        me = psutil.Process()
        per_pid: dict[int, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                c = proc.cpu_times()
                per_pid[proc.pid] = c.user + c.system
                self.nice[proc.pid] = proc.nice()
        m = psutil.cpu_times()
        busy = m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0)
        self.samples.append((time.time(), busy, per_pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._snapshot()

    def __enter__(self) -> CpuSampler:
        self._snapshot()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._snapshot()

    def window(self, t_from: float, t_to: float, rank_pids: set[int]) -> dict[str, float] | None:
        """Average CPUs busy in [t_from, t_to] (taken between the samples inside the window)."""
        inside = [s for s in self.samples if t_from <= s[0] <= t_to]
        if len(inside) < 2:
            return None
        (ta, busy_a, a), (tb, busy_b, b) = inside[0], inside[-1]
        dt = tb - ta
        # A process born inside the window (a rank, an actor) counts from zero.
        ranks = sum(b[p] - a.get(p, 0.0) for p in b if p in rank_pids)
        runner = sum(b[p] - a.get(p, 0.0) for p in b if p not in rank_pids)
        return {
            "ranks_cpus": ranks / dt,
            "runner_cpus": runner / dt,  # launcher / Ray daemons, actors, driver, this process
            "other_cpus": max(busy_b - busy_a - ranks - runner, 0.0) / dt,  # not ours at all
        }


# -- the job ----------------------------------------------------------------------------------
def bench_config(root: str, steps: int, ranks: int, nodes: int) -> tuple[dict[str, Any], str]:
    """The demo job, made a pure training benchmark: N ranks, sharding stage1 over all of them."""
    from bi150_ray.demo import write_demo_config

    if ranks % nodes:
        raise SystemExit(f"--ranks {ranks} is not a multiple of --nodes {nodes}")
    path = write_demo_config(root, steps)
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg.update(do_eval=False, eval_steps=10**6, save_steps=10**6)
    if ranks > 1:
        cfg.update(sharding="stage1", sharding_parallel_degree=ranks)
    else:
        cfg.update(sharding="", sharding_parallel_degree=1)
    cfg["runtime"].update(nodes=nodes, devices_per_node=ranks // nodes, heartbeat_s=HEARTBEAT_S, gather=False)
    return cfg, path


def ours_job(cfg: dict[str, Any], config_path: str, run_dir: str, poll_s: float | None) -> config_mod.JobConfig:
    data = json.loads(json.dumps(cfg))
    data["runtime"].update(
        run_name="bench",
        storage_path=os.path.join(run_dir, "node{node}"),
        results_path=os.path.join(run_dir, "results"),
        # A relaunch would resume from a checkpoint and spoil the figures: fail instead.
        max_app_restarts=0,
        max_infra_restarts=0,
        max_hang_restarts=0,
        env=dict(RANK_ENV),
    )
    if poll_s is not None:
        data["runtime"]["poll_s"] = poll_s
    return config_mod.from_dict(data, source=config_path, base_dir=os.path.dirname(config_path))


def launch_rank_args(cfg: dict[str, Any], config_path: str, run_dir: str) -> dict[str, Any]:
    """Exactly what our rank 0's node receives, with the run's directories moved to `run_dir`."""
    from bi150_ray.plan import make_plan

    args = make_plan(ours_job(cfg, config_path, run_dir, None)).rank_args(0)
    args.update(
        output_dir=os.path.join(run_dir, "checkpoints"),
        logging_dir=os.path.join(run_dir, "visualdl"),
        data_cache=os.path.join(run_dir, "index-cache"),
        device="cpu",
    )
    return args


# -- one run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    round: int
    runner: str  # launch | ours
    t0: float
    t_exit: float
    events: list[dict[str, Any]]
    tokens_per_step: int
    skip: int
    marks: dict[str, float] = dataclasses.field(default_factory=dict)  # ours: driver phases
    cpu: dict[str, float] | None = None  # steady-state window
    cpu_startup: dict[str, float] | None = None  # runner start to rank 0's first step
    rank_nice: int | None = None  # niceness of rank 0's process
    index_waits: int = 0  # 3 s sleeps of non-zero local ranks waiting for the dataset index
    exit_note: str = ""  # a rank that failed only after every rank reported `done`

    def check_complete(self, ranks: int, max_steps: int) -> bool:
        """Every rank said `done` and rank 0 logged every step: the figures are whole."""
        done = {e["rank"] for e in self.events if e["kind"] == ev.DONE}
        steps = self.steps
        return done >= set(range(ranks)) and bool(steps) and steps[-1]["global_step"] == max_steps

    def rank0(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("rank") == 0 and e["kind"] == kind]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return sorted(self.rank0(ev.STEP), key=lambda e: e["global_step"])

    @property
    def ttfs(self) -> float:
        return self.steps[0]["t"] - self.t0

    def steady_window(self) -> tuple[dict[str, Any], dict[str, Any]]:
        steps = self.steps
        first = next((e for e in steps if e["global_step"] >= self.skip), steps[0])
        return first, steps[-1]

    @property
    def tokens_per_s(self) -> float:
        a, b = self.steady_window()
        return (b["global_step"] - a["global_step"]) * self.tokens_per_step / (b["t"] - a["t"])

    @property
    def median_step_tokens_per_s(self) -> float:
        """Median of the per-step interval figures in the steady window (robust to short bursts)."""
        a, b = self.steady_window()
        return statistics.median(e["tokens_per_second"] for e in self.steps
                                 if a["global_step"] < e["global_step"] <= b["global_step"])

    @property
    def phases(self) -> dict[str, float]:
        """Seconds from t0 to each milestone on the way to the first step."""
        out = {f"driver:{k}": v - self.t0 for k, v in self.marks.items() if k != "done"}
        for kind in (ev.START, ev.READY):
            found = self.rank0(kind)
            if found:
                out[f"rank0:{kind}"] = found[0]["t"] - self.t0
        out["rank0:first step"] = self.ttfs
        return dict(sorted(out.items(), key=lambda kv: kv[1]))

    def summary(self) -> dict[str, Any]:
        a, b = self.steady_window()
        return {
            "round": self.round,
            "runner": self.runner,
            "ttfs_s": self.ttfs,
            "tokens_per_s": self.tokens_per_s,
            "median_step_tokens_per_s": self.median_step_tokens_per_s,
            # Contention-normalised: tokens per CPU-second the ranks actually got in the window.
            "tokens_per_rank_cpu_s": self.tokens_per_s / self.cpu["ranks_cpus"] if self.cpu else None,
            "steady_steps": [a["global_step"], b["global_step"]],
            "steady_s": b["t"] - a["t"],
            "wall_s": self.t_exit - self.t0,
            "exit_after_done_s": self.t_exit - max(e["t"] for e in self.rank0(ev.DONE)) if self.rank0(ev.DONE) else None,
            "phases_s": self.phases,
            "cpu": self.cpu,
            "cpu_startup": self.cpu_startup,
            "rank_nice": self.rank_nice,
            "index_waits": self.index_waits,
            "exit_note": self.exit_note,
        }


INDEX_WAIT_LINE = "building indices on rank 0 ..."  # PaddleNLP prints it before each time.sleep(3)


def index_waits(worker_logs: list[str]) -> int:
    """How many 3 s sleeps ranks other than local rank 0 took waiting for the dataset index files
    (paddlenlp.data.causal_dataset: a non-zero local rank polls for them every 3 seconds)."""
    waits = 0
    for path in worker_logs:
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
            waits += sum(1 for line in fh if line.strip() == INDEX_WAIT_LINE)
    return waits


def seed_index_cache(seed_dir: str | None, cache_dir: str) -> None:
    """Put the job's prebuilt dataset index files into a run's (fresh) data_cache directory."""
    if seed_dir:
        shutil.copytree(seed_dir, cache_dir)


def read_events(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _cpu_windows(run: Run, sampler: CpuSampler) -> None:
    a, b = run.steady_window()
    pids = {e["pid"] for e in run.events if e["kind"] == ev.START}
    rank0 = [e["pid"] for e in run.rank0(ev.START)]
    if rank0:
        run.rank_nice = sampler.nice.get(rank0[0])
    run.cpu = sampler.window(a["t"], b["t"], pids)
    run.cpu_startup = sampler.window(run.t0, run.steps[0]["t"], pids)


def run_launch(rnd: int, cfg: dict, config_path: str, run_dir: str, ranks: int, skip: int, tokens_per_step: int,
               timeout_s: float, seed_dir: str | None = None) -> Run:
    os.makedirs(run_dir)
    seed_index_cache(seed_dir, os.path.join(run_dir, "index-cache"))
    args_path = os.path.join(run_dir, "args.json")
    with open(args_path, "w", encoding="utf-8") as fh:
        json.dump(launch_rank_args(cfg, config_path, run_dir), fh, indent=1)
    events_path = os.path.join(run_dir, "events.jsonl")  # launch gives every rank the same env: one file
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        ev.EVENTS_ENV: events_path,
        "BI150_RAY_HEARTBEAT_S": str(HEARTBEAT_S),
        **RANK_ENV,
    })
    # The file path, not `-m bi150_ray.train.rank`: with `-m` launch falls back to its legacy mode.
    argv = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(ranks),
            "--log_dir", os.path.join(run_dir, "log"), str(RANK_FILE), args_path]
    out_path = os.path.join(run_dir, "launch.out")
    with CpuSampler() as sampler, open(out_path, "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(argv, env=env, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"launch run {rnd} did not finish within {timeout_s:g}s; see {out_path}") from None
        t_exit = time.time()
    run = Run(rnd, "launch", t0, t_exit, read_events(events_path), tokens_per_step, skip)
    run.index_waits = index_waits([os.path.join(run_dir, "log", f"workerlog.{r}") for r in range(1, ranks)])
    if rc != 0:
        if not run.check_complete(ranks, int(cfg["max_steps"])):
            tail = Path(out_path).read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"launch run {rnd} exited with {rc}; see {run_dir}/log:\n" + "\n".join(tail))
        run.exit_note = f"launch exited {rc} after every rank reported done; see {run_dir}/log"
    _cpu_windows(run, sampler)
    return run


@contextlib.contextmanager
def driver_marks() -> Iterator[dict[str, float]]:
    """Time our driver's phases by wrapping (not changing) the functions it calls."""
    from bi150_ray import cluster
    from bi150_ray.driver import PretrainJob

    marks: dict[str, float] = {}

    def wrap(owner: Any, name: str, before: str | None, after: str | None) -> Any:
        original = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            if before:
                marks.setdefault(before, time.time())
            try:
                return original(*a, **k)
            finally:
                if after:
                    marks.setdefault(after, time.time())

        setattr(owner, name, wrapper)
        return original

    patched = [
        (cluster, "reserve_gang", wrap(cluster, "reserve_gang", None, "gang reserved")),
        (cluster, "spawn_workers", wrap(cluster, "spawn_workers", None, "actors requested")),
        # _start_ranks begins once the actors answered info/free_ports and wrote the args file
        # (and, where the driver ships a data plan, once that is installed: timed on its own).
        (PretrainJob, "_start_ranks", wrap(PretrainJob, "_start_ranks", "actors up, args written", "ranks spawned")),
        (PretrainJob, "_shutdown", wrap(PretrainJob, "_shutdown", "done", None)),
    ]
    if hasattr(PretrainJob, "_ship_data_plan"):
        patched.append((PretrainJob, "_ship_data_plan",
                        wrap(PretrainJob, "_ship_data_plan", "actors up, args written", "data plan shipped")))
    try:
        yield marks
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


class _WorkerNiceness:
    """Stands in for cluster.RankWorker: the same actor, started with Ray's worker niceness set
    through its runtime_env (what Ray's own job supervisor does for job drivers). Experiment only:
    --worker-niceness; the default measures the shipped code."""

    def __init__(self, actor_class: Any, niceness: int) -> None:
        self._actor_class = actor_class
        self._env = {"env_vars": {"RAY_worker_niceness": str(niceness)}}

    def options(self, **kw: Any) -> Any:
        kw.setdefault("runtime_env", self._env)
        return self._actor_class.options(**kw)


@contextlib.contextmanager
def worker_niceness(niceness: int | None) -> Iterator[None]:
    from bi150_ray import cluster

    if niceness is None:
        yield
        return
    original = cluster.RankWorker
    cluster.RankWorker = _WorkerNiceness(original, niceness)
    try:
        yield
    finally:
        cluster.RankWorker = original


def run_ours(rnd: int, cfg: dict, config_path: str, run_dir: str, skip: int, tokens_per_step: int,
             poll_s: float | None, niceness: int | None = None, seed_dir: str | None = None) -> Run:
    from bi150_ray.driver import PretrainJob
    from bi150_ray.errors import RunFailed
    from bi150_ray.plan import make_plan

    os.makedirs(run_dir)
    job = ours_job(cfg, config_path, run_dir, poll_s)
    plan = make_plan(job)
    for node in sorted({slot.node_index for slot in plan.slots}):
        seed_index_cache(seed_dir, plan.node_paths(node).index_cache)
    with CpuSampler() as sampler, driver_marks() as marks, worker_niceness(niceness):
        t0 = time.time()
        pj = PretrainJob(job)
        pj.quiet = True
        failure = None
        try:
            result = pj.run()
            if result.attempts != 1:
                raise RuntimeError(f"our run {rnd} needed {result.attempts} attempts; the figures would include a resume")
        except RunFailed as exc:
            failure = exc
        t_exit = time.time()
    events: list[dict[str, Any]] = []
    for slot in pj.plan.slots:  # one events file per rank, on its node's storage
        with contextlib.suppress(OSError):
            events += read_events(pj.plan.node_paths(slot.node_index).events_path(slot.rank))
    run = Run(rnd, "ours", t0, t_exit, events, tokens_per_step, skip, marks=dict(marks))
    run.index_waits = index_waits([plan.node_paths(slot.node_index).worker_log(slot.rank)
                                   for slot in plan.slots if slot.local_rank != 0])
    if failure is not None:
        if not run.check_complete(len(pj.plan.slots), pj.plan.max_steps):
            raise failure
        run.exit_note = f"driver reported a failure after every rank reported done: {str(failure).splitlines()[0]}"
    _cpu_windows(run, sampler)
    return run


# -- report -----------------------------------------------------------------------------------
def _fmt_cpu(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "n/a"
    return f"{cpu['ranks_cpus']:.2f}/{cpu['runner_cpus']:.2f}/{cpu['other_cpus']:.2f}"


def round_table(runs: list[dict[str, Any]]) -> str:
    """One round, from Run.summary() dicts."""
    head = (f"{'runner':<7} {'first step s':>12} {'rank up s':>9} {'ready s':>8} {'tok/s':>7} {'step med':>8} "
            f"{'steps':>6} {'wall s':>7} {'nice':>4} {'idx':>3}  {'CPUs steady':>14}  {'CPUs to step 1':>14}")
    lines = [head]
    for s in runs:
        p = s["phases_s"]
        steady = "{}-{}".format(*s["steady_steps"])
        lines.append(
            f"{s['runner']:<7} {s['ttfs_s']:>12.2f} {p.get('rank0:start', float('nan')):>9.2f} "
            f"{p.get('rank0:ready', float('nan')):>8.2f} {s['tokens_per_s']:>7.0f} {s['median_step_tokens_per_s']:>8.0f} "
            f"{steady:>6} {s['wall_s']:>7.1f} {s['rank_nice'] if s['rank_nice'] is not None else '?':>4} "
            f"{s.get('index_waits', 0):>3}  "
            f"{_fmt_cpu(s['cpu']):>14}  {_fmt_cpu(s.get('cpu_startup')):>14}"
        )
    for s in runs:
        if s["runner"] == "ours":
            steps = ", ".join(f"{k.split(':', 1)[1]} {v:.2f}" for k, v in s["phases_s"].items())
            lines.append(f"ours, seconds after PretrainJob(...): {steps}")
    lines += [f"note ({s['runner']}): {s['exit_note']}" for s in runs if s["exit_note"]]
    return "\n".join(lines)


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    by = {s["runner"]: s for s in runs}
    ours, launch = by["ours"], by["launch"]
    nan = float("nan")
    return {
        "tokens_ratio": ours["tokens_per_s"] / launch["tokens_per_s"],
        "step_median_ratio": ours["median_step_tokens_per_s"] / launch["median_step_tokens_per_s"],
        "per_cpu_ratio": (ours["tokens_per_rank_cpu_s"] or nan) / (launch["tokens_per_rank_cpu_s"] or nan),
        "ttfs_ratio": ours["ttfs_s"] / launch["ttfs_s"],
        # How much later our rank 0 process existed than launch's: the runner's own overhead.
        "rank_up_delta_s": ours["phases_s"].get("rank0:start", nan) - launch["phases_s"].get("rank0:start", nan),
    }


# -- driving the rounds -----------------------------------------------------------------------
def _add_job_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    ap.add_argument("--ranks", type=int, default=2, help="ranks per run, sharding stage1 over all (default 2)")
    ap.add_argument("--nodes", type=int, default=1,
                    help="simulated Ray nodes for ours (default 1: one host, like launch)")
    ap.add_argument("--skip", type=int, default=5, help="steady state starts at this step (default 5)")
    ap.add_argument("--poll-s", type=float, default=None, help="override runtime.poll_s for ours")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds per launch run")
    ap.add_argument("--worker-niceness", type=int, default=None,
                    help="experiment: start our rank actors with RAY_worker_niceness=N (Ray's default is 15, "
                         "which the rank processes inherit); default: the shipped code, unchanged")
    ap.add_argument("--cold-index-cache", action="store_true",
                    help="start every run with an EMPTY data_cache (PaddleNLP's 3 s index polling then adds "
                         "0-9 s to the time to the first step at random); default: seed it from a warm-up run")
    ap.add_argument("--seed-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settle-s", type=float, default=5.0, help="idle seconds after the cluster is up (default 5)")


def _job_argv(opts: argparse.Namespace) -> list[str]:
    argv = ["--steps", str(opts.steps), "--ranks", str(opts.ranks), "--nodes", str(opts.nodes),
            "--skip", str(opts.skip), "--run-timeout", str(opts.run_timeout), "--settle-s", str(opts.settle_s)]
    if opts.poll_s is not None:
        argv += ["--poll-s", str(opts.poll_s)]
    if opts.worker_niceness is not None:
        argv += ["--worker-niceness", str(opts.worker_niceness)]
    if opts.seed_dir:
        argv += ["--seed-dir", opts.seed_dir]
    if opts.cold_index_cache:
        argv += ["--cold-index-cache"]
    return argv


def round_worker(opts: argparse.Namespace) -> int:
    """One round in its own process, on its own simulated cluster (see main)."""
    from bi150_ray.demo import simulated_cluster
    from bi150_ray.plan import make_plan

    root = opts.root
    cfg, config_path = bench_config(root, opts.steps, opts.ranks, opts.nodes)
    tokens_per_step = make_plan(ours_job(cfg, config_path, os.path.join(root, "probe"), None)).tokens_per_step
    rnd = opts.round_worker
    order = ["launch", "ours"] if rnd % 2 else ["ours", "launch"]
    runs: list[dict[str, Any]] = []
    t_cluster = time.time()
    with simulated_cluster(opts.nodes, opts.ranks // opts.nodes):
        print(f"cluster up in {time.time() - t_cluster:.1f}s", flush=True)
        time.sleep(opts.settle_s)
        for runner in order:
            run_dir = os.path.join(root, "runs", f"r{rnd}.{opts.attempt}-{runner}")
            if runner == "launch":
                run = run_launch(rnd, cfg, config_path, run_dir, opts.ranks, opts.skip, tokens_per_step,
                                 opts.run_timeout, opts.seed_dir)
            else:
                run = run_ours(rnd, cfg, config_path, run_dir, opts.skip, tokens_per_step, opts.poll_s,
                               opts.worker_niceness, opts.seed_dir)
            runs.append(run.summary())
    with open(opts.out, "w", encoding="utf-8") as fh:
        json.dump(runs, fh, indent=1)
    return 0


def run_round(opts: argparse.Namespace, rnd: int, root: str) -> list[dict[str, Any]]:
    """A round in a child process, retried on a fresh cluster if it fails.

    Each round runs in its own process with its own simulated cluster, started (and left idle for
    --settle-s) before the round's first runner: the cluster is up for both runs of the round.
    Why a process per round: on a shared machine other people's jobs may `ray stop` every Ray
    process, and a Ray driver whose GCS is gone for 60 s terminates its whole process."""
    for attempt in range(1, opts.retries + 2):
        out = os.path.join(root, f"round{rnd}.{attempt}.json")
        log = os.path.join(root, f"round{rnd}.{attempt}.log")
        argv = [sys.executable, os.path.abspath(__file__), "--round-worker", str(rnd), "--attempt", str(attempt),
                "--root", root, "--out", out, *_job_argv(opts)]
        with open(log, "wb") as fh:
            try:
                rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=2 * opts.run_timeout + 600).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc == 0 and os.path.exists(out):
            with open(out, encoding="utf-8") as fh:
                return json.load(fh)
        tail = "\n".join("    " + line for line in Path(log).read_text(errors="replace").splitlines()[-12:])
        print(f"round {rnd} attempt {attempt} failed ({rc}); last lines of {log}:\n{tail}", flush=True)
    raise SystemExit(f"round {rnd} failed {opts.retries + 1} times; see {root}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="launch/ours pairs (default 3)")
    _add_job_flags(ap)
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a round that failed (default 2)")
    ap.add_argument("--root", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--round-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--attempt", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.steps <= opts.skip + 1:
        ap.error("--steps must exceed --skip + 1")
    if opts.ranks % opts.nodes:
        ap.error(f"--ranks {opts.ranks} is not a multiple of --nodes {opts.nodes}")
    if opts.round_worker is not None:
        return round_worker(opts)

    from bi150_ray.plan import make_plan

    machine = machine_info()
    print(f"machine: {format_machine(machine)}", flush=True)
    if opts.ranks > machine["nproc"]:
        print(f"note: {opts.ranks} ranks on {machine['nproc']} CPUs: ranks share cores", flush=True)

    root = os.path.abspath(opts.root) if opts.root else tempfile.mkdtemp(prefix="bi150-launch-overhead-")
    os.makedirs(root, exist_ok=True)
    cfg, config_path = bench_config(root, opts.steps, opts.ranks, opts.nodes)
    plan = make_plan(ours_job(cfg, config_path, os.path.join(root, "probe"), None))
    tokens_per_step = plan.tokens_per_step
    d = plan.degrees
    print(f"job: {opts.ranks} ranks (dp {d.dp} x sharding {d.sharding} {d.sharding_stage or ''}), {opts.steps} steps, "
          f"{tokens_per_step} tokens/step; ours on {opts.nodes} simulated node(s) x {opts.ranks // opts.nodes} BI150; "
          f"steady state = steps {opts.skip}..{opts.steps}; work dir {root}", flush=True)
    if opts.worker_niceness is not None:
        print(f"EXPERIMENT: our rank actors start with RAY_worker_niceness={opts.worker_niceness} "
              "(not the shipped code)", flush=True)

    if opts.cold_index_cache:
        # Warm the page cache once so the first run does not pay for reading Paddle from disk alone.
        subprocess.run([sys.executable, "-c", "import paddle, paddlenlp.transformers"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    else:
        # One untimed launch run of the same job: warms the page cache and builds the dataset index
        # files, which every timed run then finds in its fresh data_cache directory. Without them a
        # non-zero local rank polls for rank 0's files every 3 s, adding 0, 3, 6 or 9 s to the time
        # to the first step at random, whoever started the ranks (--cold-index-cache to see it).
        t_warm = time.time()
        run_launch(0, cfg, config_path, os.path.join(root, "warmup"), opts.ranks, opts.skip, tokens_per_step,
                   opts.run_timeout)
        opts.seed_dir = os.path.join(root, "warmup", "index-cache")
        print(f"warm-up run (untimed) done in {time.time() - t_warm:.0f}s; dataset index files: {opts.seed_dir}",
              flush=True)

    all_runs: list[list[dict[str, Any]]] = []
    for rnd in range(1, opts.rounds + 1):
        runs = run_round(opts, rnd, root)
        all_runs.append(runs)
        r = ratios(runs)
        print(f"\nround {rnd} ({' then '.join(s['runner'] for s in runs)}):")
        print(round_table(runs))
        print(f"ratio ours/launch: tokens/s {r['tokens_ratio']:.3f} (per-step median {r['step_median_ratio']:.3f}), "
              f"time-to-first-step {r['ttfs_ratio']:.3f}; our rank 0 up {r['rank_up_delta_s']:+.2f}s vs launch's",
              flush=True)

    per_round = [ratios(runs) for runs in all_runs]
    med_tok = statistics.median(r["tokens_ratio"] for r in per_round)
    med_step = statistics.median(r["step_median_ratio"] for r in per_round)
    med_ttfs = statistics.median(r["ttfs_ratio"] for r in per_round)
    med_eff = statistics.median(r["per_cpu_ratio"] for r in per_round)

    def med(runner: str, value: Any) -> float:
        return statistics.median(value(s) for runs in all_runs for s in runs if s["runner"] == runner)

    def phase(name: str) -> Any:
        return lambda s: s["phases_s"].get(name, float("nan"))

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    rows = [
        ("tokens/s (steady)", lambda s: s["tokens_per_s"], "8.0f", med_tok,
         f">= {TARGET_TOKENS_RATIO} {verdict(med_tok >= TARGET_TOKENS_RATIO)}"),
        ("  per-step median", lambda s: s["median_step_tokens_per_s"], "8.0f", med_step, ""),
        ("  per rank-CPU-second", lambda s: s["tokens_per_rank_cpu_s"] or float("nan"), "8.0f", med_eff,
         "tokens/s / CPUs the ranks got: the work, without the contention"),
        ("time to first step s", lambda s: s["ttfs_s"], "8.2f", med_ttfs,
         f"<= {TARGET_TTFS_RATIO} {verdict(med_ttfs <= TARGET_TTFS_RATIO)}"),
        ("  rank 0 process up s", phase("rank0:start"), "8.2f", None, "the runner's own share"),
        ("  rank 0 ready s", phase("rank0:ready"), "8.2f", None, "+ import paddle/paddlenlp, fleet, model, data"),
        ("ranks' CPUs, steady", lambda s: (s["cpu"] or {}).get("ranks_cpus", float("nan")), "8.2f", None,
         f"of {machine['nproc']}"),
        ("foreign CPUs, steady", lambda s: (s["cpu"] or {}).get("other_cpus", float("nan")), "8.2f", None,
         "busy with processes outside this benchmark (noise)"),
    ]
    print(f"\nsummary over {opts.rounds} round(s): medians; ratio = median of the per-round ratios ours/launch")
    print(f"  {'':<22}{'launch':>8}{'ours':>8}{'ratio':>8}  target / meaning")
    for label, value, fmt, ratio, note in rows:
        ratio_s = f"{ratio:>8.3f}" if ratio is not None else " " * 8
        print(f"  {label:<22}{med('launch', value):{fmt}}{med('ours', value):{fmt}}{ratio_s}  {note}")
    foreign = med("launch", rows[-1][1]), med("ours", rows[-1][1])
    if max(foreign) > 0.1 * machine["nproc"]:
        print(f"  NOTE: other work kept {max(foreign):.2f} of {machine['nproc']} CPUs busy during the runs: the ratios "
              "measure how much CPU each runner's ranks got as much as the runners themselves")
    print("  per-round ratios (tokens/s, first step): "
          + "; ".join(f"{r['tokens_ratio']:.3f}, {r['ttfs_ratio']:.3f}" for r in per_round))
    print(f"  machine: {format_machine(machine)}")

    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as fh:
            json.dump({
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "options": vars(opts),
                "machine": machine,
                "tokens_per_step": tokens_per_step,
                "runs": [s for runs in all_runs for s in runs],
                "per_round": per_round,
                "median_tokens_ratio": med_tok,
                "median_step_median_ratio": med_step,
                "median_per_rank_cpu_ratio": med_eff,
                "median_ttfs_ratio": med_ttfs,
            }, fh, indent=1)
        print(f"figures written to {opts.json}")
    if not opts.root and not opts.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
