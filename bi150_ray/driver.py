"""The driver: one run of a pretraining job, read top to bottom.

    plan -> connect -> (reserve gang -> start ranks -> supervise)* -> gather -> record

`PretrainJob(config).run()` is the Python API; `jobs/pretrain.py` (for `ray job submit`) and
`bi150-ray run` call it. The driver talks to people (progress bar, clear errors); the ranks talk
to the driver through JSON-lines events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bi150_ray import config as config_mod
from bi150_ray import events as ev
from bi150_ray.checkpoint import gather, inventory
from bi150_ray.config import JobConfig
from bi150_ray.envcontract import job_rank_env, redact
from bi150_ray.errors import DataPlanError, RunFailed
from bi150_ray.plan import LaunchPlan, make_plan
from bi150_ray.runrecord import Attempt, RunRecord, host_fingerprint
from bi150_ray.train.phases import Phase

RANK_MODULE = "bi150_ray.train.rank"


@dataclass
class JobResult:
    run_name: str
    status: str
    train_metrics: dict[str, Any]
    last_step: dict[str, Any]
    evals: list[dict[str, Any]]
    checkpoints: list[str]
    model_dir: str | None
    run_record: str
    results_dir: str
    log_dirs: list[str]
    attempts: int

    @property
    def final_eval_loss(self) -> float | None:
        return self.evals[-1]["eval_loss"] if self.evals else None


@dataclass
class _Failure:
    kind: str  # application | infrastructure | hang
    message: str


@dataclass
class _RankState:
    returncode: int | None = None
    phase: Phase = Phase.STARTUP
    global_step: int = 0
    last_progress: float = field(default_factory=time.time)  # last change of step (or phase event)
    last_seen: float = field(default_factory=time.time)  # last event of any kind, heartbeats included
    error: str | None = None
    traceback: str | None = None


class PretrainJob:
    """A pretraining job on the Ray cluster this process is connected to (or RAY_ADDRESS)."""

    def __init__(self, job: JobConfig | str | os.PathLike[str], **runtime_overrides: Any) -> None:
        if isinstance(job, JobConfig):
            self.job = job
            if runtime_overrides:
                self.job = dataclasses.replace(
                    job, runtime=dataclasses.replace(job.runtime, **runtime_overrides)
                )
        else:
            self.job = config_mod.load(job, **runtime_overrides)
        self.plan: LaunchPlan = make_plan(self.job)  # refuses impossible jobs before touching Ray
        self.quiet = False
        self._node_workers: dict[int, Any] = {}  # node index -> one RankWorker on it (this attempt)
        self._confirmed: dict[int, set[int]] = {}  # step -> ranks that reported the save done
        self._attempt_number = 0
        self._flops_per_token, self._peak_flops = self._mfu_basis()
        self._metrics: dict[str, Any] = {}

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> JobResult:
        from bi150_ray import cluster

        plan, rt = self.plan, self.job.runtime
        self._say(self._describe_plan())
        cluster.connect()
        if rt.preflight:  # stop a bad cluster before any rank starts (PreflightError lists each fix)
            from bi150_ray import doctor

            doctor.preflight(plan, self._say, collective=rt.preflight_collective)

        roots = tuple(sorted({plan.results_dir} | {plan.node_paths(s.node_index).run_dir for s in plan.slots}))
        record = RunRecord.open(
            os.path.join(plan.results_dir, "run_record.json"),
            allowed_roots=roots,
            run_name=plan.run_name,
            config_source=self.job.source,
            config_hash=self.job.config_hash(),
            degrees=dataclasses.asdict(plan.degrees),
            environment={**host_fingerprint(), "backend": rt.backend, "env": redact(rt.env)},
        )
        budgets = {"application": rt.max_app_restarts, "infrastructure": rt.max_infra_restarts, "hang": rt.max_hang_restarts}
        final_events: dict[int, dict[str, Any]] = {}
        try:
            while True:
                attempt = Attempt(number=len(record.attempts) + 1, started=time.time())
                record.attempts.append(attempt)
                self._attempt_number = attempt.number
                failure = self._run_attempt(record, attempt, final_events)
                attempt.ended = time.time()
                if failure is None:
                    attempt.outcome = "succeeded"
                    break
                attempt.outcome, attempt.cause = failure.kind, failure.message
                record.save()
                if budgets[failure.kind] <= 0:
                    record.status = "failed"
                    record.save()
                    raise RunFailed(
                        f"run {plan.run_name} failed ({failure.kind}): {failure.message}\n"
                        f"last complete checkpoint: {self._last_checkpoint(record) or 'none'}; "
                        f"logs: {plan.node_paths(0).log_dir} on each node; record: {record.path}"
                    )
                budgets[failure.kind] -= 1
                self._say(f"{failure.kind} failure: {failure.message.splitlines()[0]}; relaunching from the last checkpoint")
        except RunFailed:
            raise
        except Exception as exc:  # refused before/while launching (data plan, resume check, gang) or a driver bug
            record.status = "failed"
            last = record.attempts[-1]
            last.outcome, last.cause, last.ended = "error", f"{type(exc).__name__}: {exc}", time.time()
            record.save()
            raise
        except KeyboardInterrupt:
            record.status = "interrupted"
            record.attempts[-1].outcome = "interrupted"
            record.attempts[-1].ended = time.time()
            record.save()
            raise

        model_dir = self._gather(record) if rt.gather else None
        record.status = "succeeded"
        record.model_dir = model_dir
        done = final_events.get(0, {})
        record.final = {"train_metrics": done.get("train_metrics", {}), "last_step": record.steps[-1] if record.steps else {}}
        record.save()
        result = JobResult(
            run_name=plan.run_name,
            status=record.status,
            train_metrics=done.get("train_metrics", {}),
            last_step=record.steps[-1] if record.steps else {},
            evals=list(record.evals),
            checkpoints=[c["checkpoint"] for c in record.checkpoints],
            model_dir=model_dir,
            run_record=record.path,
            results_dir=plan.results_dir,
            log_dirs=sorted({plan.node_paths(s.node_index).log_dir for s in plan.slots}),
            attempts=len(record.attempts),
        )
        from bi150_ray.report import write_report

        report = write_report(record.path)
        self._say(f"model: {model_dir}\nreport: {report}\nrun record: {record.path}")
        return result

    # -- one attempt: reserve, start, supervise, release ------------------------------------
    def _run_attempt(self, record: RunRecord, attempt: Attempt, final_events: dict[int, dict]) -> _Failure | None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from bi150_ray import cluster

        plan, rt = self.plan, self.job.runtime
        self._say(f"attempt {attempt.number}: reserving {rt.nodes} node(s) x {rt.devices_per_node} {rt.resource_name}")
        pg = cluster.reserve_gang(rt.nodes, rt.devices_per_node, rt.resource_name, rt.cpus_per_rank, rt.placement_timeout_s)
        workers: list = []
        try:
            gang = cluster.launch_gang(pg, [s.node_index for s in plan.slots], rt.resource_name, rt.cpus_per_rank,
                                       rt.placement_timeout_s)
            workers, nodes, bundle_of_node = gang.workers, gang.nodes, gang.bundle_of_node
            attempt.nodes = [dataclasses.asdict(nodes[b]) | {"node_index": i} for i, b in enumerate(bundle_of_node)]

            first_on_node: dict[int, int] = {}
            for slot in plan.slots:
                first_on_node.setdefault(slot.node_index, slot.rank)
            self._node_workers = {node: workers[rank] for node, rank in first_on_node.items()}
            self._confirmed = {}
            resume_step = self._resume_point()
            attempt.resumed_from = f"checkpoint-{resume_step}" if resume_step is not None else None
            if resume_step is not None and resume_step >= plan.max_steps:
                # PaddleNLP would train one extra step when resumed at max_steps; the job is done.
                self._say(f"checkpoint-{resume_step} already reaches max_steps: nothing to train")
                attempt.cause = "already complete"
                return None
            if resume_step is not None:  # refuse a resume that would skip or repeat data (unless opted in)
                self._check_resume_data(record, resume_step)
            ray.get([
                w.write_file.remote(plan.node_paths(node).args_path, json.dumps(plan.rank_args(node, resume_step), indent=1))
                for node, w in self._node_workers.items()
            ])
            record.data_plan = self._ship_data_plan(nodes[bundle_of_node[0]].node_id) or record.data_plan
            self._start_ranks(workers, gang.endpoints, gang.master)
            record.save()
            return self._supervise(workers, record, attempt, final_events)
        except (RayActorError, GetTimeoutError) as exc:
            return _Failure("infrastructure", f"{type(exc).__name__}: {exc}")
        finally:
            cluster.release(workers, pg)

    def _start_ranks(self, workers: list, endpoints: tuple[str, ...], master: str) -> None:
        import ray

        plan, rt = self.plan, self.job.runtime
        starts = []
        for slot, worker in zip(plan.slots, workers, strict=True):
            paths = plan.node_paths(slot.node_index)
            contract = job_rank_env(rt, slot, endpoints, master, paths.log_dir)
            contract[ev.EVENTS_ENV] = paths.events_path(slot.rank)
            contract["BI150_RAY_HEARTBEAT_S"] = str(rt.heartbeat_s)
            contract["BI150_RAY_ATTEMPT"] = str(self._attempt_number)
            argv = ["{python}", "-u", "-m", RANK_MODULE, paths.args_path, "--no-auto-resume",
                    "--eval-iters", str(rt.eval_iters), "--test-iters", str(rt.test_iters)]
            starts.append(worker.start.remote(argv, contract, paths.worker_log(slot.rank), paths.events_path(slot.rank), paths.run_dir))
        ray.get(starts)

    def _supervise(self, workers: list, record: RunRecord, attempt: Attempt, final_events: dict[int, dict]) -> _Failure | None:
        import ray

        rt = self.job.runtime
        states = [_RankState() for _ in workers]
        bar = self._progress_bar(record)
        try:
            while True:
                polls = ray.get([w.poll.remote() for w in workers], timeout=60)
                now = time.time()
                for rank, (state, poll) in enumerate(zip(states, polls, strict=True)):
                    for event in poll["events"]:
                        self._on_event(rank, state, event, record, attempt, final_events, bar, now)
                    state.returncode = poll["returncode"]
                # A rank that reported `done` has saved everything; a crash in native teardown after
                # that (seen: SIGABRT at exit, under launch too) must not re-run a finished job.
                for r in range(len(states)):
                    if states[r].returncode not in (None, 0) and r in final_events:
                        self._say(f"rank {r} exited with {states[r].returncode} after reporting done; counted as finished")
                        states[r].returncode = 0
                failed = [r for r, s in enumerate(states) if s.returncode not in (None, 0)]
                if failed:
                    return self._rank_failure(workers, states, failed)
                if all(s.returncode == 0 for s in states):
                    return None
                hung = [r for r, s in enumerate(states) if s.returncode is None and now - s.last_progress > self._timeout(s.phase)]
                if hung:
                    return self._hang(workers, states, hung, attempt)
                record.save(min_interval_s=5.0)
                time.sleep(rt.poll_s)
        finally:
            if bar is not None:
                bar.close()

    def _on_event(self, rank: int, state: _RankState, event: dict, record: RunRecord, attempt: Attempt,
                  final_events: dict[int, dict], bar, now: float) -> None:
        kind = event["kind"]
        state.last_seen = now
        step = event.get("global_step", state.global_step)
        if step != state.global_step or kind in (ev.READY, ev.EVAL, ev.SAVE, ev.DONE):
            state.last_progress = now
        state.global_step = step
        if kind == ev.READY:
            state.phase = Phase.STEP
            if rank == 0:
                record.environment.update({k: event[k] for k in ("paddle", "paddlenlp") if k in event})
        elif kind == ev.HEARTBEAT:
            state.phase = Phase(event.get("phase", state.phase.value))
        elif kind == ev.STEP:
            self._observe_memory(rank, event, record)
        if kind == ev.STEP and rank == 0:
            self._observe_step(event)
            record.steps.append({k: v for k, v in event.items() if k not in ("kind", "rank")})
            if bar is not None and not bar.disable:
                bar.n = step
                bar.set_postfix(loss=f"{event.get('loss', float('nan')):.4f}", tok_s=f"{event.get('tokens_per_second', 0):.0f}", refresh=False)
                bar.refresh()
            elif step % max(1, self.plan.max_steps // 20) == 0:  # logs, not a terminal: one line per 5%
                self._say(f"step {step}/{self.plan.max_steps} loss {event.get('loss', float('nan')):.4f} "
                          f"{event.get('tokens_per_second', 0):.0f} tokens/s")
        elif kind == ev.EVAL and rank == 0:
            record.evals.append({k: v for k, v in event.items() if k not in ("kind", "rank")})
            self._set_metric("bi150_ray_eval_loss", event.get("eval_loss"))
            self._say(f"step {step}: eval_loss {event.get('eval_loss'):.4f}")
        elif kind == ev.SAVE:
            self._confirm_save(rank, step, record, attempt)
        elif kind == ev.ERROR:
            state.error = event.get("error")
            state.traceback = event.get("traceback")
        elif kind == ev.DONE:
            final_events[rank] = event

    # -- checkpoints: the runtime, not each rank, decides what is complete and where to resume --
    def _node_of_rank(self) -> list[int]:
        return [s.node_index for s in self.plan.slots]

    def _confirm_save(self, rank: int, step: int, record: RunRecord, attempt: Attempt) -> None:
        """Mark checkpoint-<step> complete on its nodes once every rank has reported it saved."""
        import ray

        confirmed = self._confirmed.setdefault(step, set())
        confirmed.add(rank)
        if len(confirmed) < len(self.plan.slots):
            return
        node_of_rank = self._node_of_rank()
        holders = {node_of_rank[r] for r in inventory.expected_shards(self.plan.degrees).values()} | {node_of_rank[0]}
        ray.get([
            self._node_workers[n].write_bytes.remote(
                os.path.join(self.plan.node_paths(n).output_dir, f"checkpoint-{step}", inventory.COMPLETE_MARKER), b"ok\n"
            )
            for n in sorted(holders)
        ])
        folder = os.path.join(self.plan.node_paths(0).output_dir, f"checkpoint-{step}")
        name = f"checkpoint-{step}"
        listings = ray.get([
            self._node_workers[n].list_files.remote(os.path.join(self.plan.node_paths(n).output_dir, name)) for n in sorted(holders)
        ])
        manifest = {str(n): files for n, files in zip(sorted(holders), listings, strict=True)}  # node -> {file: bytes}
        record.checkpoints.append({"global_step": step, "checkpoint": folder, "attempt": attempt.number,
                                   "nodes": sorted(holders), "manifest": manifest,
                                   # node -> its checkpoint folder: where `bi150-ray gather RUN --step N` looks
                                   "folders": {str(n): os.path.join(self.plan.node_paths(n).output_dir, name) for n in sorted(holders)}})
        record.checkpoints[-1]["data"] = self._resume_keys()  # what its data position depends on

    def _ship_data_plan(self, node0_id: str) -> dict[str, Any] | None:
        """Build the sample plan once on node 0 and install its index files on every node."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from bi150_ray.data import plan as data_plan

        rt, plan = self.job.runtime, self.plan

        def build_on_node(args: dict, world: int, eval_iters: int, test_iters: int):
            prefixes, _, plans = data_plan.build(args, world, eval_iters, test_iters)
            corpus = [data_plan.corpus_fingerprint(p) for p in data_plan.corpus_prefixes(prefixes)]
            return data_plan.cache_files(plans), corpus

        task = ray.remote(num_cpus=0)(build_on_node).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node0_id, soft=False)
        )
        t0 = time.time()
        try:
            files, corpus = ray.get(task.remote(plan.rank_args(0), plan.degrees.dataset_world_size, rt.eval_iters, rt.test_iters))
        except ray.exceptions.RayTaskError as exc:  # bad data is the user's to fix: say what, not how it broke
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            raise DataPlanError(f"data plan for {self.job.source}: {cause}") from None
        files_ref = ray.put(files)
        # Shared storage: every node sees node 0's cache folder (share_folder), so one install serves all.
        targets = {n: w for n, w in self._node_workers.items() if not rt.shared_storage or n == min(self._node_workers)}
        written = ray.get([
            w.install_index_cache.remote(plan.rank_args(n)["data_cache"], files_ref, corpus)
            for n, w in targets.items()
        ])
        self._say(f"data plan: {len(files)} index files built once in {time.time() - t0:.1f}s, "
                  f"installed on {len(written)} node(s) ({sum(written)} written, rest already identical)")
        import hashlib

        return {"files": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(files.items())}, "corpus": corpus}

    def _resume_point(self) -> int | None:
        """Newest complete checkpoint across the nodes; copies rank 0's metadata files to the others."""
        import ray

        plan, workers = self.plan, self._node_workers
        nodes = sorted(workers)
        found = ray.get([workers[n].inventory.remote(plan.node_paths(n).output_dir) for n in nodes])
        inventories = dict(zip(nodes, found, strict=True))
        node_of_rank = self._node_of_rank()
        step = inventory.newest_complete(inventories, plan.degrees, node_of_rank)
        if step is None:
            return None
        name, src = f"checkpoint-{step}", node_of_rank[0]
        meta = [f for f in inventories[src][name] if not inventory.is_shard(f)]
        copies = []
        for n in nodes:
            for f in meta:
                if n != src and f not in inventories[n].get(name, {}):
                    data = workers[src].read_bytes.remote(os.path.join(plan.node_paths(src).output_dir, name, f))
                    copies.append(workers[n].write_bytes.remote(os.path.join(plan.node_paths(n).output_dir, name, f), data))
        ray.get(copies)
        self._say(f"resuming from {name} (complete on every node; {len(copies)} metadata file copies)")
        return step

    def _resume_keys(self) -> dict[str, Any]:
        from bi150_ray.data import plan as data_plan

        return data_plan.resume_keys(self.plan.rank_args(0), self.plan.degrees.dataset_world_size)

    def _check_resume_data(self, record: RunRecord, step: int) -> None:
        """Compare checkpoint-<step>'s data position (its trainer_state.json and the keys the run
        record kept with it) with this job's arguments; refused unless allow_data_skew_on_resume."""
        import ray

        from bi150_ray.data import plan as data_plan

        node = self._node_of_rank()[0]
        folder = os.path.join(self.plan.node_paths(node).output_dir, f"checkpoint-{step}")
        state = json.loads(ray.get(self._node_workers[node].read_bytes.remote(os.path.join(folder, "trainer_state.json"))))
        recorded = next((c.get("data") for c in reversed(record.checkpoints) if c.get("global_step") == step), None)
        allow = self.job.runtime.allow_data_skew_on_resume
        _, problems = data_plan.check_resume_data(folder, state, recorded, self._resume_keys(), allow=allow)
        if problems:
            self._say(f"warning: resuming from {folder} anyway (allow_data_skew_on_resume): {'; '.join(problems)}")

    def _rank_failure(self, workers: list, states: list[_RankState], failed: list[int]) -> _Failure:
        """A rank that exited non-zero is an application failure; one killed by a signal from
        outside (OOM killer, operator, a dying node) is infrastructure."""
        import ray

        killed = [r for r in failed if (states[r].returncode or 0) < 0 and not states[r].error]
        if killed:  # the root cause: its peers then fail in collectives and report errors of their own
            r = killed[0]
            where = self.plan.node_paths(self.plan.slots[r].node_index).worker_log(r)
            return _Failure("infrastructure", f"rank {r} was killed by signal {-states[r].returncode} (see {where})")
        first = next((r for r in failed if states[r].error), failed[0])
        state = states[first]
        where = self.plan.node_paths(self.plan.slots[first].node_index).worker_log(first)
        tail = ray.get(workers[first].log_tail.remote(30))
        msg = f"rank {first} exited with code {state.returncode}" + (f": {state.error}" if state.error else "")
        return _Failure("application", f"{msg}\n--- last lines of {where} ---\n{tail}")

    def _hang(self, workers: list, states: list[_RankState], hung: list[int], attempt: Attempt) -> _Failure:
        """Dump every rank's Python stacks into the run's logs, then report which ranks stalled."""
        import ray

        dumps = []
        for slot, worker in zip(self.plan.slots, workers, strict=True):
            path = os.path.join(self.plan.node_paths(slot.node_index).log_dir, f"stacks.{slot.rank}.attempt{attempt.number}.txt")
            dumps.append(worker.dump_stacks.remote(path))
        files = ray.get(dumps, timeout=120)
        # Any running rank without even a heartbeat is the likely culprit, whether or not its own
        # step timer has run out yet (the ranks blocked on it usually trip first).
        silent = [r for r, st in enumerate(states)
                  if st.returncode is None and time.time() - st.last_seen > 3 * self.job.runtime.heartbeat_s]
        hung = sorted(set(hung) | set(silent))
        attempt.hang = {
            "ranks": hung,
            "silent_ranks": silent,  # no heartbeat either: the process itself is stuck or frozen
            "phases": {r: states[r].phase.value for r in hung},
            "last_step": {r: states[r].global_step for r in hung},
            "stack_dumps": files,
        }
        detail = ", ".join(f"rank {r} in {states[r].phase.value} at step {states[r].global_step}" for r in hung)
        culprit = silent[0] if silent else hung[0]
        lead = f"ranks {silent} stopped heartbeating; " if silent else ""
        return _Failure("hang", f"{lead}no progress within the phase timeout: {detail}; stacks in {files[culprit]}")

    def _timeout(self, phase: Phase) -> float:
        rt = self.job.runtime
        return {
            Phase.STARTUP: rt.startup_timeout_s,
            Phase.STEP: rt.step_timeout_s,
            Phase.EVAL: rt.eval_timeout_s,
            Phase.CHECKPOINT: rt.checkpoint_timeout_s,
        }[phase]

    # -- end of run -------------------------------------------------------------------------
    def _gather(self, record: RunRecord) -> str:
        """The final model (PaddleNLP's save_model in output_dir), from wherever its shards are,
        merged into one loadable directory."""
        import ray

        from bi150_ray import cluster

        plan = self.plan
        out_dir = os.path.join(plan.results_dir, "model")
        provenance = {
            "global_step": max((c["global_step"] for c in record.checkpoints), default=None),
            "degrees": dataclasses.asdict(plan.degrees),
            "run_name": plan.run_name,
        }
        rank0_node = plan.slots[0].node_index
        if self.job.runtime.shared_storage:
            provenance["source"] = plan.node_paths(rank0_node).output_dir
            sources = {rank0_node: (None, plan.node_paths(rank0_node).output_dir)}
            return gather.gather_model(sources, rank0_node, out_dir, plan.degrees.tp, plan.degrees.pp, provenance)
        nodes = record.attempts[-1].nodes
        actors = cluster.file_actors([n["node_id"] for n in nodes])
        try:
            sources = {n["node_index"]: (a, plan.node_paths(n["node_index"]).output_dir) for n, a in zip(nodes, actors, strict=True)}
            provenance["source"] = {n["node_index"]: f"{n['ip']}:{plan.node_paths(n['node_index']).output_dir}" for n in nodes}
            return gather.gather_model(sources, rank0_node, out_dir, plan.degrees.tp, plan.degrees.pp, provenance)
        finally:
            for a in actors:
                ray.kill(a)

    @staticmethod
    def _last_checkpoint(record: RunRecord) -> str | None:
        return record.checkpoints[-1]["checkpoint"] if record.checkpoints else None

    # -- observing the run ---------------------------------------------------------------------
    def _mfu_basis(self) -> tuple[float | None, float | None]:
        """Model FLOPs per token and the device's peak for the backend in use (None = unknown)."""
        from bi150_ray import estimate

        rt = self.job.runtime
        try:
            args = self.plan.rank_args(0)
            dims = estimate.model_dims_for(args)
            flops = estimate.flops_per_token(dims, int(args.get("max_seq_length", 1024))).model
            device = estimate.find_device("cpu" if rt.backend == "cpu" else "BI-V150", estimate.load_registry())
            return flops, device.peak(estimate.precision_of(args).compute_dtype)
        except (estimate.EstimateError, KeyError, OSError, ValueError):
            return None, None

    def _observe_step(self, event: dict) -> None:
        """Add model FLOPs/token and MFU to a step record, and export Ray metrics for the dashboard."""
        from bi150_ray import estimate

        per_device = event.get("tokens_per_second_per_device")
        event["model_flops_per_token"] = self._flops_per_token
        value = estimate.mfu(per_device, self._flops_per_token, self._peak_flops) if per_device and self._flops_per_token else None
        event["mfu"] = value if value is not None else "unknown"
        self._set_metric("bi150_ray_global_step", event.get("global_step"))
        self._set_metric("bi150_ray_loss", event.get("loss"))
        self._set_metric("bi150_ray_tokens_per_second", event.get("tokens_per_second"))
        self._set_metric("bi150_ray_mfu", value)

    def _observe_memory(self, rank: int, event: dict, record: RunRecord) -> None:
        """Keep each rank's peak memory (device where the backend reports it, host RSS always)."""
        peak = record.peak_memory.setdefault(str(rank), {})
        for key in ("device_max_memory_allocated_bytes", "host_peak_rss_bytes"):
            if isinstance(event.get(key), int):
                peak[key] = max(peak.get(key, 0), event[key])
        if rank == 0:
            self._set_metric("bi150_ray_device_memory_allocated_bytes", event.get("device_memory_allocated_bytes"))
            self._set_metric("bi150_ray_host_rss_bytes", event.get("host_rss_bytes"))

    def _set_metric(self, name: str, value: Any) -> None:
        if not isinstance(value, (int, float)):
            return
        try:
            from ray.util.metrics import Gauge

            if name not in self._metrics:
                self._metrics[name] = Gauge(name, description=f"bi150-ray {name}", tag_keys=("run",))
            self._metrics[name].set(float(value), tags={"run": self.plan.run_name})
        except Exception:  # noqa: BLE001 - metrics are best effort; the run record is the source of truth
            pass

    # -- talking to people -------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"[bi150-ray] {text}", file=sys.stderr, flush=True)

    def _describe_plan(self) -> str:
        p, rt = self.plan, self.job.runtime
        d = p.degrees
        lines = [
            f"run {p.run_name}: {rt.nodes} node(s) x {rt.devices_per_node} {rt.resource_name} = {rt.world_size} ranks, backend {rt.backend}",
            f"degrees: dp {d.dp} x sharding {d.sharding} ({d.sharding_stage or 'off'}) x pp {d.pp} x tp {d.tp} x sep {d.sep};"
            f" {p.tokens_per_step} tokens/step, {p.max_steps} steps",
            f"node storage: {p.node_paths(0).run_dir}{' (shared)' if rt.shared_storage else ' (node-local)'}; results: {p.results_dir}",
        ]
        lines += [f"note: {a}" for a in p.adjustments] + [f"warning: {w}" for w in p.warnings]
        return "\n".join(lines)

    def _progress_bar(self, record: RunRecord):
        if self.quiet:
            return None
        from tqdm import tqdm

        return tqdm(total=self.plan.max_steps, desc=self.plan.run_name, unit="step", file=sys.stderr,
                    mininterval=1.0, dynamic_ncols=True, disable=not sys.stderr.isatty())
