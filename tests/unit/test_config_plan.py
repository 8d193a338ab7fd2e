"""Config validation and launch planning: what users get before any actor starts."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from bi150_ray import config
from bi150_ray.config import ConfigError
from bi150_ray.plan import make_plan

REPO = Path(__file__).resolve().parents[2]
REF_CONFIG = REPO / "jobs/configs/pretrain-llama_13b-pp4tp2sd2_stage1.json"
REF_RUNTIME = REPO / "jobs/configs/bi150-4node.runtime.json"


def _write(tmp_path, data, name="job.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _tiny(tmp_path, **extra):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
        "num_attention_heads": 4, "vocab_size": 3072,
    }))
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"model_name_or_path": "model", "input_dir": "data", "max_steps": 10, **extra}


def test_reference_13b_config_is_accepted_unchanged_and_resolves_like_paddlenlp():
    before = hashlib.sha256(REF_CONFIG.read_bytes()).hexdigest()
    job = config.load(REF_CONFIG, str(REF_RUNTIME))
    plan = make_plan(job)
    d = plan.degrees
    assert (d.pp, d.sharding, d.dp, d.tp, d.sharding_stage) == (8, 8, 1, 1, "stage1")
    assert plan.tokens_per_step == 2 * 128 * 8 * 2048 == 4_194_304
    assert job.runtime.backend == "corex" and job.runtime.world_size == 64
    # Accelerator flags stay on for corex; nothing the user wrote is rewritten on disk.
    args = plan.rank_args(0)
    assert args["fp16"] is True and args["use_flash_attention"] is True
    assert hashlib.sha256(REF_CONFIG.read_bytes()).hexdigest() == before


def test_reference_config_on_too_few_devices_is_refused_naming_the_key():
    job = config.load(REF_CONFIG, nodes=1, devices_per_node=4, backend="corex")
    with pytest.raises(ConfigError, match="pipeline_parallel_degree"):
        make_plan(job)


def test_unknown_key_names_key_and_suggests(tmp_path):
    p = _write(tmp_path, _tiny(tmp_path, maxsteps=3))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "'maxsteps'" in str(e.value) and "max_steps" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, _tiny(tmp_path, learning_rate="fast"))
    with pytest.raises(ConfigError, match="'learning_rate' must be float"):
        config.load(p)


def test_fork_style_int_booleans_are_accepted(tmp_path):
    job = config.load(_write(tmp_path, _tiny(tmp_path, amp_master_grad=1, sequence_parallel=0)))
    assert job.paddlenlp["amp_master_grad"] == 1


def test_runtime_unknown_key_and_bad_values(tmp_path):
    base = _tiny(tmp_path)
    with pytest.raises(ConfigError, match="runtime.node_count"):
        config.load(_write(tmp_path, {**base, "runtime": {"node_count": 2}}))
    with pytest.raises(ConfigError, match="runtime.backend"):
        config.load(_write(tmp_path, {**base, "runtime": {"backend": "cuda"}}))
    with pytest.raises(ConfigError, match="runtime.nodes' must be int"):
        config.load(_write(tmp_path, {**base, "runtime": {"nodes": "4"}}))
    with pytest.raises(ConfigError, match="PADDLE_TRAINER_ID"):
        config.load(_write(tmp_path, {**base, "runtime": {"env": {"PADDLE_TRAINER_ID": "3"}}}))


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"max_steps": 3,\n "x": }')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(line 2"):
        config.load(p)


def test_tensor_parallel_on_cpu_is_refused(tmp_path):
    p = _write(tmp_path, _tiny(tmp_path, tensor_parallel_degree=2, runtime={"nodes": 1, "devices_per_node": 2}))
    with pytest.raises(ConfigError, match="cannot run on the cpu backend"):
        make_plan(config.load(p))


def test_heads_not_divisible_by_tp_is_refused(tmp_path):
    p = _write(tmp_path, _tiny(tmp_path, tensor_parallel_degree=3, runtime={"nodes": 1, "devices_per_node": 3, "backend": "corex"}))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        make_plan(config.load(p))


def test_sharding_degree_that_does_not_divide_world_is_refused(tmp_path):
    p = _write(tmp_path, _tiny(tmp_path, sharding="stage1", sharding_parallel_degree=3, runtime={"nodes": 2, "devices_per_node": 2}))
    with pytest.raises(ConfigError, match="sharding_parallel_degree"):
        make_plan(config.load(p))


def test_cpu_rank_args_turn_off_accelerator_switches_and_place_storage_per_node(tmp_path):
    cfg = _tiny(tmp_path, fp16=True, fp16_opt_level="O2", use_flash_attention=True, output_dir="./ck",
                sharding="stage1", sharding_parallel_degree=2)
    cfg["runtime"] = {"nodes": 2, "devices_per_node": 2, "storage_path": str(tmp_path / "n{node}"), "run_name": "r"}
    plan = make_plan(config.load(_write(tmp_path, cfg)))
    a0, a1 = plan.rank_args(0), plan.rank_args(1)
    assert a0["device"] == "cpu" and a0["fp16"] is False and a0["use_flash_attention"] is False
    assert a0["output_dir"] == str(tmp_path / "n0" / "r" / "checkpoints")
    assert a1["output_dir"] == str(tmp_path / "n1" / "r" / "checkpoints")
    assert a0["data_cache"] == str(tmp_path / "n0" / "r" / "index-cache")
    # Relative paths resolve against the config file's folder, not the working directory.
    assert a0["model_name_or_path"] == str(tmp_path / "model")
    assert (plan.degrees.dp, plan.degrees.sharding) == (2, 2)
    assert any("fp16" in a for a in plan.adjustments)


def test_run_name_is_stable_for_the_same_job_so_rerunning_resumes(tmp_path):
    cfg = _tiny(tmp_path)
    a = config.load(_write(tmp_path, cfg, "same.json"))
    b = config.load(_write(tmp_path, cfg, "same.json"))
    c = config.load(_write(tmp_path, {**cfg, "max_steps": 11}, "same.json"))
    assert a.run_name == b.run_name != c.run_name


def test_argument_snapshot_matches_installed_paddlenlp():
    """paddlenlp_args.json must be regenerated when PaddleNLP changes (see train/arguments.py)."""
    from bi150_ray.train.arguments import argument_table

    assert config.paddlenlp_argument_kinds() == argument_table()


def test_runtime_defaults_live_in_one_place():
    rt = config.RuntimeConfig()
    assert rt.world_size == 1 and rt.backend == "cpu" and os.sep not in rt.resource_name
