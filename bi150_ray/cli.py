"""`bi150-ray` command line. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from bi150_ray import demo

    return demo.main(args.root, args.steps)


def _runtime_overrides(args: argparse.Namespace) -> dict:
    return {
        "nodes": args.nodes,
        "devices_per_node": args.devices_per_node,
        "backend": args.backend,
        "storage_path": args.storage,
        "run_name": args.run_name,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    from bi150_ray import config
    from bi150_ray.driver import PretrainJob

    job = config.load(args.config, args.runtime, **_runtime_overrides(args))
    result = PretrainJob(job).run()
    summary = {
        "status": result.status,
        "model_dir": result.model_dir,
        "run_record": result.run_record,
        "final_eval_loss": result.final_eval_loss,
        "last_step": result.last_step.get("global_step"),
        "train_loss": result.last_step.get("loss"),
    }
    # One machine-readable line, for tools that read `ray job logs`.
    print("BI150_RAY_RESULT " + json.dumps(summary))
    return 0


def _declares_backend(config_path: str, runtime_path: str | None) -> bool:
    """Whether the job names its backend (in its 'runtime' section or the --runtime file)."""
    for path, section in ((config_path, "runtime"), (runtime_path, None)):
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                continue  # config.load reports unreadable files with the file name
            if isinstance(data, dict) and "backend" in (data.get(section) or {} if section else data):
                return True
    return False


def _cmd_plan(args: argparse.Namespace) -> int:
    """Degrees, groups, rank layout, memory per device and throughput, before anything runs."""
    import dataclasses

    from bi150_ray import config, estimate
    from bi150_ray.plan import make_plan
    from bi150_ray.topology import cross_node_pipeline_hops, describe_groups

    overrides = _runtime_overrides(args)
    if overrides["backend"] is None and not _declares_backend(args.config, args.runtime):
        overrides["backend"] = "corex"  # a plan is for the BI150 cluster unless the config or --backend says otherwise
    plan = make_plan(config.load(args.config, args.runtime, **overrides))
    rt = plan.job.runtime
    registry = estimate.load_registry(args.device_registry)
    device = estimate.find_device(args.device or ("cpu" if rt.backend == "cpu" else "BI-V150"), registry)
    est = estimate.estimate(plan.rank_args(0), rt.nodes, rt.devices_per_node, device, assumed_mfu=args.mfu)
    groups = describe_groups(plan.degrees)
    hops = cross_node_pipeline_hops(plan.degrees, rt.devices_per_node)
    if args.json:
        print(json.dumps({"run_name": plan.run_name, "degrees": dataclasses.asdict(plan.degrees), "groups": groups,
                          "cross_node_pipeline_hops": [dataclasses.asdict(h) for h in hops],
                          "warnings": plan.warnings, "adjustments": plan.adjustments, "estimate": est}, indent=1, default=str))
        return 0
    d = plan.degrees
    print(f"world {d.world} = {rt.nodes} nodes x {rt.devices_per_node}: dp {d.dp} x pp {d.pp} x sharding {d.sharding} "
          f"({d.sharding_stage or 'off'}) x sep {d.sep} x tp {d.tp}")
    for name, lists in groups.items():
        if len(lists[0]) > 1:  # axes of degree 1 have only singleton groups
            print(f"  {name} groups: {lists if len(lists) <= 8 else lists[:8] + ['...']}")
    if hops:
        pipes = d.world // d.pp
        print(f"  pipeline hops crossing nodes: {len(hops) // pipes} of {d.pp - 1} in each of the {pipes} pipes")
    print(estimate.format_estimate(est))
    for w in plan.warnings:
        print(f"warning: {w}")
    return 0 if est["verdict"] != "does not fit" else 3


def _cmd_devices(args: argparse.Namespace) -> int:
    from bi150_ray import devices

    node = devices.detect(args.ixsmi, mode="csv" if args.csv else "table")
    if args.json:
        import dataclasses

        print(json.dumps(dataclasses.asdict(node), indent=1))
    else:
        print(devices.format_devices(node))
    return 0


def _cmd_node_resources(args: argparse.Namespace) -> int:
    from bi150_ray import devices

    node = devices.detect(args.ixsmi)
    print(json.dumps(devices.node_resources(node, args.resource_name)))
    return 0


def _cmd_gather(args: argparse.Namespace) -> int:
    """A run's checkpoint-N (from its nodes) or a checkpoint folder here -> one loadable model directory."""
    from bi150_ray.checkpoint import fromrun
    from bi150_ray.checkpoint.merge import merge_checkpoint

    if fromrun.is_run(args.checkpoint):
        manifest = fromrun.gather_run(args.checkpoint, args.out, step=args.step, address=args.address)
        print(f"checkpoint-{manifest['global_step']} -> {os.path.abspath(args.out)} "
              f"({len(manifest['files'])} files, sha256 verified)")
        return 0
    if args.step is not None or args.address:
        print(f"bi150-ray: error: --step/--address need a run (results dir or run_record.json), "
              f"and {args.checkpoint} is a checkpoint folder", file=sys.stderr)
        return 2
    out = merge_checkpoint(args.checkpoint, args.out, tp=args.tp, pp=args.pp)
    print(out)
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    """A gathered model dir -> Hugging Face LLaMA layout (transformers' LlamaForCausalLM)."""
    from bi150_ray.checkpoint.hf_export import export_hf

    print(export_hf(args.model, args.out))
    return 0


def _cmd_data_plan(args: argparse.Namespace) -> int:
    """The job's sample plan, built here exactly as PaddleNLP would (no cache written)."""
    from bi150_ray import config
    from bi150_ray.data import plan as data_plan
    from bi150_ray.plan import make_plan

    plan = make_plan(config.load(args.config, args.runtime, **_runtime_overrides(args)))
    rank_args = plan.rank_args(0)
    rt = plan.job.runtime
    prefixes, targets, plans = data_plan.build(rank_args, plan.degrees.dataset_world_size, rt.eval_iters, rt.test_iters)
    info = data_plan.summary(prefixes, targets, plans, plan.degrees.dataset_world_size,
                             int(rank_args.get("per_device_train_batch_size", 8)))
    info["corpus"] = [data_plan.corpus_fingerprint(p) for p in data_plan.corpus_prefixes(prefixes)]
    if args.dump_first:
        info["dumped"] = data_plan.dump_first(plans, prefixes, args.dump_first, args.out)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for c in info["corpus"]:
        print(f"corpus {c['prefix']}: {c['documents']:,} documents, {c['tokens']:,} tokens (idx sha256 {c['idx_sha256'][:12]})")
    print(f"dataset world size {plan.degrees.dataset_world_size}; targets train/valid/test = {targets}")
    for name, e in info["splits"].items():
        if e is None:
            print(f"  {name:5s}: empty")
            continue
        extra = f", {e['epochs']} epoch(s), cache {e['cache_hash']}" if "epochs" in e else ""
        print(f"  {name:5s}: {e['samples']:,} samples (target {e['target']:,}), {e['per_rank_per_pass']:,} per data rank{extra}")
    for path in info.get("dumped", []):
        print(f"wrote {path}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Raw jsonl/parquet/text -> one PaddleNLP .bin/.idx, tokenized by Ray tasks (resumable)."""
    import dataclasses

    from bi150_ray.data import prepare as prep

    given = {  # flags left out keep PrepareConfig's defaults
        "input_format": args.format, "json_key": args.json_key, "parquet_column": args.column,
        "text_mode": args.text_mode, "append_eos": args.append_eos, "workers": args.workers,
        "shard_bytes": int(args.shard_mb * (1 << 20)) if args.shard_mb else None, "work_dir": args.work_dir,
    }
    if args.max_repeated_len is not None:
        given["max_repeated_len"] = args.max_repeated_len or None  # 0: keep repeated characters
    cfg = prep.PrepareConfig(
        inputs=tuple(args.inputs), tokenizer=args.tokenizer, output_prefix=args.output,
        spread=args.spread, keep_work=args.keep_work, overwrite=args.overwrite, progress=not args.no_progress,
        **{k: v for k, v in given.items() if v is not None or k == "max_repeated_len"},
    )
    r = prep.run(cfg, address=args.address, num_cpus=args.num_cpus)
    print(f"wrote {r.prefix}.bin/.idx: {r.n_docs:,} documents, {r.n_tokens:,} tokens ({r.dtype}); "
          f"{r.shards} shards, {r.shards_tokenized} tokenized now on {r.nodes} node(s), {r.shards_reused} reused; "
          f"{r.seconds:.1f}s")
    print("BI150_PREPARE_RESULT " + json.dumps(dataclasses.asdict(r)))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    """Pre-flight of the live cluster against one job: go/no-go table, exit 1 on no-go."""
    from bi150_ray import cluster, config, doctor
    from bi150_ray.plan import make_plan

    plan = make_plan(config.load(args.config, args.runtime, **_runtime_overrides(args)))
    given = {"clock_tolerance_s": args.clock_tolerance, "collective_mb": args.mb, "min_bandwidth_mb_s": args.min_bandwidth,
             "ixsmi": args.ixsmi}  # unset flags keep DoctorOptions' defaults
    opts = doctor.DoctorOptions(collective=not args.no_collective, **{k: v for k, v in given.items() if v is not None})
    cluster.connect()
    report = doctor.run_doctor(plan, opts)
    rt = plan.job.runtime
    if args.json:
        print(report.to_json())
    else:
        print(doctor.format_report(report.results, f"bi150-ray doctor: job {plan.run_name} needs {rt.nodes} node(s) x "
                                   f"{rt.devices_per_node} {rt.resource_name}, backend {rt.backend} ({report.seconds:.1f}s)"))
    return 0 if report.verdict == doctor.GO else 1


def _record_path(path: str) -> str:
    return os.path.join(path, "run_record.json") if os.path.isdir(path) else path


def _cmd_status(args: argparse.Namespace) -> int:
    from bi150_ray import runrecord

    rec = runrecord.load(_record_path(args.run))
    print(f"run {rec['run_name']}: {rec['status']}  (config {rec['config_source']})")
    for a in rec.get("attempts", []):
        cause = a.get("cause", "").splitlines()[0] if a.get("cause") else ""
        print(f"  attempt {a['number']}: {a['outcome']} {cause}")
    if rec.get("steps"):
        s = rec["steps"][-1]
        print(f"  last step {s['global_step']}: loss {s['loss']:.4f}, {s.get('tokens_per_second', 0):.0f} tokens/s")
    for e in rec.get("evals", [])[-3:]:
        print(f"  eval at step {e['global_step']}: {e['eval_loss']:.4f}")
    print(f"  checkpoints: {[c['checkpoint'] for c in rec.get('checkpoints', [])][-3:]}")
    print(f"  model: {rec.get('model_dir')}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bi150_ray.report import write_report

    print(write_report(_record_path(args.run)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bi150-ray", description="PaddleNLP LLaMA pretraining on BI150 clusters via Ray")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole job on a simulated cluster on this machine")
    d.add_argument("--root", default="demo_out", help="where assets, node storage and results go")
    d.add_argument("--steps", type=int, default=60)
    d.set_defaults(func=_cmd_demo)

    for name, func, helptext in (
        ("run", _cmd_run, "run a job on the Ray cluster at RAY_ADDRESS"),
        ("plan", _cmd_plan, "resolve degrees and groups for a job without running it"),
        ("doctor", _cmd_doctor, "pre-flight: qualify the live cluster for a job (exit 1 on no-go)"),
    ):
        r = sub.add_parser(name, help=helptext)
        r.add_argument("config", help="PaddleNLP pretrain JSON, optionally with a 'runtime' section")
        r.add_argument("--nodes", type=int)
        r.add_argument("--devices-per-node", type=int)
        r.add_argument("--backend", choices=["cpu", "corex", "iluvatar_gpu"])
        r.add_argument("--storage", help="runtime.storage_path")
        r.add_argument("--run-name")
        r.add_argument("--runtime", help="a JSON file with the runtime section (keeps the PaddleNLP JSON unchanged)")
        if name == "plan":
            r.add_argument("--json", action="store_true")
            r.add_argument("--device", help="device registry entry (default: BI-V150, or cpu for the cpu backend)")
            r.add_argument("--device-registry", help="a JSON file extending bi150_ray/device_registry.json")
            r.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the time forecast")
        if name == "doctor":
            r.add_argument("--json", action="store_true")
            r.add_argument("--no-collective", action="store_true", help="skip the all-reduce and bandwidth test")
            r.add_argument("--mb", type=float, help="MB per send/recv between each pair of nodes (default 4)")
            r.add_argument("--min-bandwidth", type=float, help="MB/s below which a node pair is no-go (default: report only)")
            r.add_argument("--clock-tolerance", type=float, help="seconds a node's clock may differ from the head's (default 2)")
            r.add_argument("--ixsmi", help="ixsmi command on the nodes (default: ixsmi on PATH, or $BI150_IXSMI)")
        r.set_defaults(func=func)

    v = sub.add_parser("devices", help="BI150 devices on this node, from ixsmi")
    v.add_argument("--ixsmi", default="ixsmi")
    v.add_argument("--csv", action="store_true", help="use ixsmi's CSV query mode")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_devices)

    n = sub.add_parser("node-resources", help="the --resources JSON for `ray start` on this node")
    n.add_argument("--ixsmi", default="ixsmi")
    n.add_argument("--resource-name", default="BI150")
    n.set_defaults(func=_cmd_node_resources)


    dp = sub.add_parser("data", help="data commands").add_subparsers(dest="data_command", required=True)
    pl = dp.add_parser("plan", help="documents, tokens, epochs, samples per split and per rank, hashes")
    pl.add_argument("config")
    pl.add_argument("--runtime")
    pl.add_argument("--nodes", type=int)
    pl.add_argument("--devices-per-node", type=int)
    pl.add_argument("--backend", choices=["cpu", "corex", "iluvatar_gpu"])
    pl.add_argument("--storage")
    pl.add_argument("--run-name")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--dump-first", type=int, default=0, metavar="K", help="write the first K samples of each split")
    pl.add_argument("--out", default="data_plan_dump", help="folder for --dump-first")
    pl.set_defaults(func=_cmd_data_plan)

    pr = sub.add_parser("prepare", help="tokenize jsonl/parquet/text into one PaddleNLP .bin/.idx with Ray tasks")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or directories")
    pr.add_argument("--tokenizer", required=True, help="PaddleNLP tokenizer directory or sentencepiece .model")
    pr.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    pr.add_argument("--format", choices=["auto", "jsonl", "parquet", "text"], help="default: from the extension")
    pr.add_argument("--json-key", help="jsonl: the text key (default text)")
    pr.add_argument("--column", help="parquet: the text column (default text)")
    pr.add_argument("--text-mode", choices=["line", "paragraph"], help="text: a document per line (default) "
                    "or per blank-line separated paragraph")
    pr.add_argument("--no-append-eos", dest="append_eos", action="store_false", default=None)
    pr.add_argument("--max-repeated-len", type=int, help="collapse longer runs of one character (default 100; 0: off)")
    pr.add_argument("--shard-mb", type=float, help="input MiB per Ray task (default 64)")
    pr.add_argument("--workers", type=int, help="tokenizing tasks in flight (default: as many as Ray schedules)")
    pr.add_argument("--spread", action="store_true", help="run tasks on every node (paths must be on shared storage)")
    pr.add_argument("--work-dir", help="shard files and markers (default: PREFIX.prepare)")
    pr.add_argument("--keep-work", action="store_true")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    pr.add_argument("--address", help="Ray cluster to use (default: a private local Ray on 127.0.0.1)")
    pr.add_argument("--num-cpus", type=int, help="CPUs of the private local Ray (default: all)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_cmd_prepare)

    g = sub.add_parser("gather", help="merge a checkpoint-N (tp/pp shards) into one safetensors model dir")
    g.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="a run (results dir or run_record.json), or a checkpoint-N folder holding model_state*.pdparams")
    g.add_argument("--out", required=True)
    g.add_argument("--step", type=int, help="with a run: which checkpoint-N (default: the newest complete one)")
    g.add_argument("--address", help="with a run on node-local storage: the Ray cluster holding its nodes")
    g.add_argument("--tp", type=int, help="expected tensor-parallel degree (default: from file names)")
    g.add_argument("--pp", type=int, help="expected pipeline-parallel degree (default: from file names)")
    g.set_defaults(func=_cmd_gather)

    hf = sub.add_parser("export-hf", help="a gathered model dir -> Hugging Face LLaMA layout (transposed weights, HF config)")
    hf.add_argument("model", help="a directory written by `bi150-ray gather` (or a run's results/model)")
    hf.add_argument("--out", required=True)
    hf.set_defaults(func=_cmd_export_hf)

    for name, func in (("status", _cmd_status), ("report", _cmd_report)):
        s = sub.add_parser(name, help=f"{name} of a run (its results dir or run_record.json)")
        s.add_argument("run")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    from bi150_ray.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"bi150-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
