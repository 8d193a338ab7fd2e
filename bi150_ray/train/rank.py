"""The program every rank runs: PaddleNLP's Trainer with `llm/run_pretrain.py` semantics.

It is started once per rank, as its own OS process, either by our worker actor or by
`python -m paddle.distributed.launch -m bi150_ray.train.rank ARGS.json` (the benchmark
baseline). It reads the `paddle.distributed.launch` environment contract, never imports Ray,
and reports progress as JSON-lines events (see `bi150_ray.events`) next to PaddleNLP's own log
lines, which go to stdout unchanged.

Usage: python -m bi150_ray.train.rank ARGS.json [--eval-iters N] [--test-iters N]
ARGS.json is a PaddleNLP pretrain JSON (the fork's keys and upstream's are both accepted).
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import math
import os
import signal
import sys
import threading
import time
import traceback

from bi150_ray import events as ev
from bi150_ray.data.plan import discover_prefixes, fresh_vocab_size
from bi150_ray.data.samples import target_samples
from bi150_ray.train.phases import Phase

# Same switch upstream run_pretrain.py sets for sharding stage1 overlap.
os.environ.setdefault("USE_CASUAL_MASK", "True")

HEARTBEAT_ENV = "BI150_RAY_HEARTBEAT_S"
# Test-only fault injection: "kill_before_save_confirm:rank=R:step=S:attempt=A" makes rank R
# SIGKILL itself after PaddleNLP wrote checkpoint-S but before reporting the save -- from the
# runtime's point of view, dying while the checkpoint is being written.
FAULT_ENV = "BI150_RAY_FAULT"


def memory_stats() -> dict[str, int | str]:
    """Memory as the backend reports it, for the step events (the run record and the report).

    On an accelerator (CoreX Paddle exposes the BI150 through the CUDA device API) the device
    allocator's current and peak bytes; on CPU there is no device memory, so only this process's
    resident set (current, from /proc, and peak, from getrusage) is reported.
    """
    import resource

    import paddle

    stats: dict[str, int | str] = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/statm") as fh:
            stats["host_rss_bytes"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        stats["device_memory_allocated_bytes"] = int(paddle.device.cuda.memory_allocated())
        stats["device_max_memory_allocated_bytes"] = int(paddle.device.cuda.max_memory_allocated())
    else:
        stats["device_memory_allocated_bytes"] = "not reported by the cpu backend"
    return stats


def _fault(kind: str, step: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith(kind + ":"):
        return False
    want = dict(part.split("=", 1) for part in spec.split(":")[1:])
    return (
        int(want.get("rank", -1)) == int(os.environ.get("PADDLE_TRAINER_ID", "0"))
        and int(want.get("step", -1)) == step
        and int(want.get("attempt", 1)) == int(os.environ.get("BI150_RAY_ATTEMPT", "1"))
    )


class EventCallback:
    """Turns Trainer callbacks into structured events and tracks the phase for the heartbeat."""

    def __init__(self, writer: ev.EventWriter, seq_length: int, world_size: int) -> None:
        self.writer = writer
        self.seq_length = seq_length
        self.world_size = world_size
        self.phase = Phase.STARTUP
        self.global_step = 0
        self.ready_info: dict = {}

    # PaddleNLP calls every on_* hook; only the ones below matter to us.
    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.global_step = state.global_step
        self.phase = Phase.STEP
        self.writer.emit(ev.READY, global_step=state.global_step, max_steps=state.max_steps, **self.ready_info)

    def on_step_end(self, args, state, control, **kwargs):
        self.global_step = state.global_step
        if control.should_evaluate:
            self.phase = Phase.EVAL
        elif control.should_save:
            self.phase = Phase.CHECKPOINT

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs and "interval_samples_per_second" in logs:
            tokens_per_s = logs["interval_samples_per_second"] * self.seq_length
            logs["tokens_per_second"] = tokens_per_s
            logs["tokens_per_second_per_device"] = tokens_per_s / max(self.world_size, 1)
            logs["global_step"] = state.global_step
            logs.update(memory_stats())
            self.writer.emit(ev.STEP, **logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.writer.emit(ev.EVAL, **{**(metrics or {}), "global_step": state.global_step})
        self.phase = Phase.CHECKPOINT if control.should_save else Phase.STEP

    def on_save(self, args, state, control, **kwargs):
        if _fault("kill_before_save_confirm", state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.writer.emit(ev.SAVE, global_step=state.global_step, checkpoint=folder)
        self.phase = Phase.STEP


def _start_heartbeat(writer: ev.EventWriter, cb: EventCallback, period_s: float) -> None:
    def beat() -> None:
        while True:
            time.sleep(period_s)
            writer.emit(ev.HEARTBEAT, phase=cb.phase.value, global_step=cb.global_step)

    threading.Thread(target=beat, name="bi150-heartbeat", daemon=True).start()


def run(args_path: str, eval_iters: int, test_iters: int, writer: ev.EventWriter, auto_resume: bool = True) -> dict:
    import paddle
    from paddlenlp.data import Stack
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets, check_data_split
    from paddlenlp.trainer import PdArgumentParser, Trainer, get_last_checkpoint, set_seed, speed_metrics
    from paddlenlp.transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForCausalLMPipe,
        AutoTokenizer,
        CosineAnnealingWithWarmupDecay,
        LinearAnnealingWithWarmupDecay,
    )
    from paddlenlp.transformers.configuration_utils import LlmMetaConfig
    from paddlenlp.utils.batch_sampler import DistributedBatchSampler
    from paddlenlp.utils.log import logger

    from bi150_ray.train.arguments import DataArguments, ModelArguments, PreTrainingArguments

    parser = PdArgumentParser((ModelArguments, DataArguments, PreTrainingArguments))
    model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(args_path))

    if training_args.no_recompute_layers is not None:
        training_args.no_recompute_layers.sort()
    if model_args.tokenizer_name_or_path is None:
        model_args.tokenizer_name_or_path = model_args.model_name_or_path
    if data_args.data_cache is not None:
        os.makedirs(data_args.data_cache, exist_ok=True)

    paddle.set_device(training_args.device)
    set_seed(seed=training_args.seed)
    training_args.eval_iters = eval_iters
    training_args.test_iters = test_iters
    training_args.print_config(model_args, "Model")
    training_args.print_config(data_args, "Data")

    last_checkpoint = None
    if (
        os.path.isdir(training_args.output_dir)
        and training_args.do_train
        and not training_args.overwrite_output_dir
    ):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    LlmMetaConfig.set_llm_config(config, training_args)
    config.use_fast_layer_norm = model_args.use_fast_layer_norm
    config.seq_length = data_args.max_seq_length
    if not model_args.continue_training:
        config.max_position_embeddings = max(config.max_position_embeddings, data_args.max_seq_length)
        config.vocab_size = fresh_vocab_size(config.vocab_size, tokenizer.vocab_size)
    if model_args.num_hidden_layers is not None:
        config.num_hidden_layers = model_args.num_hidden_layers
    if model_args.initializer_range is not None:
        config.initializer_range = model_args.initializer_range
    if model_args.fuse_attention_qkv is not None:
        config.fuse_attention_qkv = model_args.fuse_attention_qkv
    if model_args.fuse_attention_ffn is not None:
        config.fuse_attention_ffn = model_args.fuse_attention_ffn

    dtype = "float32"
    if training_args.fp16_opt_level == "O2":
        if training_args.fp16:
            dtype = "float16"
        if training_args.bf16:
            dtype = "bfloat16"
    model_class = (
        AutoModelForCausalLMPipe if training_args.pipeline_parallel_degree > 1 else AutoModelForCausalLM
    )
    if model_args.continue_training:
        model = model_class.from_pretrained(model_args.model_name_or_path, config=config, dtype=dtype)
    else:
        model = model_class.from_config(config, dtype=dtype)
    if training_args.recompute:
        model.recompute_enable()

    if training_args.decay_steps is None:
        training_args.decay_steps = training_args.max_steps
    warmup = (
        training_args.warmup_steps
        if training_args.warmup_steps > 0
        else training_args.warmup_ratio * training_args.max_steps
    )
    scheduler_cls = {"cosine": CosineAnnealingWithWarmupDecay, "linear": LinearAnnealingWithWarmupDecay}.get(
        training_args.lr_scheduler_type.value
    )
    lr_scheduler = None
    if scheduler_cls is not None:
        lr_scheduler = scheduler_cls(
            max_lr=training_args.learning_rate,
            min_lr=training_args.min_learning_rate,
            warmup_step=warmup,
            decay_step=training_args.decay_steps,
            last_epoch=0,
        )

    check_data_split(data_args.split, training_args.do_train, training_args.do_eval, training_args.do_predict)
    num_samples = target_samples(
        training_args.per_device_train_batch_size,
        training_args.per_device_eval_batch_size,
        training_args.dataset_world_size,
        training_args.max_steps,
        training_args.gradient_accumulation_steps,
        training_args.eval_steps,
        eval_iters,
        test_iters,
        logging_steps=training_args.logging_steps,
    )
    # The driver normally put this plan's index files into data_cache already (data/plan.py), so
    # PaddleNLP finds them instead of building and polling behind world barriers.
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_prefix=discover_prefixes(data_args.input_dir),
        data_impl=data_args.data_impl,
        splits_string=data_args.split,
        train_val_test_num_samples=num_samples,
        seq_length=data_args.max_seq_length,
        seed=training_args.seed,
        skip_warmup=data_args.skip_warmup,
        share_folder=data_args.share_folder,
        data_cache_path=data_args.data_cache,
        need_data=training_args.should_load_dataset,
    )

    stack = Stack()

    def collate(data):
        tokens_ = stack([x["text"] for x in data])
        labels = copy.deepcopy(tokens_)[:, 1:]
        return {"input_ids": tokens_[:, :-1], "labels": labels}

    class PretrainingTrainer(Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.is_pretraining = True

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            # The eval iterator persists across evaluations, as in run_pretrain.
            eval_dataloader = getattr(self, "eval_dataloader", None)
            if eval_dataloader is None:
                eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
                self.eval_dataloader = eval_dataloader = self.get_eval_dataloader(eval_dataset)()
            start = time.time()
            output = self.evaluation_loop(
                eval_dataloader,
                description="Evaluation",
                prediction_loss_only=True if self.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                max_eval_iters=self.args.eval_iters,
            )
            total_batch_size = self.args.eval_batch_size * self.args.world_size
            output.metrics.update(
                speed_metrics(
                    metric_key_prefix,
                    start,
                    num_samples=output.num_samples,
                    num_steps=math.ceil(output.num_samples / total_batch_size),
                )
            )
            self.log(output.metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, output.metrics
            )
            return output.metrics

        def _get_eval_sampler(self, eval_dataset):
            return DistributedBatchSampler(
                eval_dataset,
                batch_size=self.args.per_device_eval_batch_size,
                shuffle=False,
                num_replicas=self.args.dataset_world_size,
                rank=self.args.dataset_rank,
                drop_last=self.args.dataloader_drop_last,
            )

        def _get_train_sampler(self):
            return DistributedBatchSampler(
                self.train_dataset,
                batch_size=self.args.per_device_train_batch_size,
                shuffle=False,
                num_replicas=self.args.dataset_world_size,
                rank=self.args.dataset_rank,
                drop_last=self.args.dataloader_drop_last,
            )

    callback = EventCallback(writer, data_args.max_seq_length, training_args.world_size)
    _start_heartbeat(writer, callback, float(os.environ.get(HEARTBEAT_ENV, "10")))
    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        data_collator=collate,
        train_dataset=train_ds if training_args.do_train else None,
        eval_dataset=valid_ds if training_args.do_eval else None,
        optimizers=(None, lr_scheduler),
        tokenizer=tokenizer,
        callbacks=[callback],
    )
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    import paddlenlp

    callback.ready_info = {"resumed_from": checkpoint, "paddle": paddle.__version__, "paddlenlp": paddlenlp.__version__}
    result: dict = {"resumed_from": checkpoint}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        callback.phase = Phase.CHECKPOINT
        metrics = train_result.metrics
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        result["train_metrics"] = metrics
        total_tokens = num_samples[0] * data_args.max_seq_length
        tps = total_tokens / metrics["train_runtime"]
        print(f"Effective Tokens per second: {tps:.2f}")
        print(f"ips: {tps:.2f} tokens/s")
    if training_args.do_predict:
        test_ret = trainer.predict(test_ds)
        trainer.log_metrics("test", test_ret.metrics)
        result["test_metrics"] = test_ret.metrics
    logger.info("bi150-ray rank program finished")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("args_json")
    parser.add_argument("--eval-iters", type=int, default=1, help="batches per evaluation (fork: 1)")
    parser.add_argument("--test-iters", type=int, default=1, help="batches for predict (fork: 1)")
    parser.add_argument(
        "--no-auto-resume",
        action="store_true",
        help="do not pick the newest checkpoint-N in output_dir (bi150-ray chooses the resume point itself)",
    )
    opts = parser.parse_args(argv)

    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    writer = ev.EventWriter(os.environ.get(ev.EVENTS_ENV), rank)
    # `kill -USR1 <pid>` dumps every thread's stack into the rank log (hang diagnosis).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    writer.emit(ev.START, pid=os.getpid(), argv=sys.argv)
    try:
        if os.environ.get("PADDLE_DISTRI_BACKEND") == "gloo":
            from bi150_ray.train import gloo_groups

            gloo_groups.install()
        result = run(opts.args_json, opts.eval_iters, opts.test_iters, writer, auto_resume=not opts.no_auto_resume)
    except BaseException as exc:  # noqa: BLE001 - report every failure, then re-raise
        writer.emit(ev.ERROR, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    writer.emit(ev.DONE, **{k: v for k, v in result.items() if v is not None})
    writer.close()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
