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


def _cmd_plan(args: argparse.Namespace) -> int:
    """Degrees, groups, rank layout, memory per device and throughput, before anything runs."""
    import dataclasses

    from bi150_ray import config, estimate
    from bi150_ray.plan import make_plan
    from bi150_ray.topology import cross_node_pipeline_hops, describe_groups

    plan = make_plan(config.load(args.config, args.runtime, **_runtime_overrides(args)))
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
    """A checkpoint folder on this machine (or shared storage) -> one loadable model directory."""
    from bi150_ray.checkpoint.merge import merge_checkpoint

    out = merge_checkpoint(args.checkpoint, args.out, tp=args.tp, pp=args.pp)
    print(out)
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

    g = sub.add_parser("gather", help="merge a checkpoint-N (tp/pp shards) into one safetensors model dir")
    g.add_argument("checkpoint", help="a checkpoint-N folder (or output_dir) holding model_state*.pdparams")
    g.add_argument("--out", required=True)
    g.add_argument("--tp", type=int, help="expected tensor-parallel degree (default: from file names)")
    g.add_argument("--pp", type=int, help="expected pipeline-parallel degree (default: from file names)")
    g.set_defaults(func=_cmd_gather)

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
