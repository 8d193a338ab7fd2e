"""run_pretrain's argument dataclasses, plus the fork's `initializer_range`.

Module-level (not built inside a function) because PaddleNLP pickles TrainingArguments into
every checkpoint's `training_args.bin`. Imported only inside rank processes: it imports PaddleNLP.
"""

from dataclasses import dataclass, field

from paddlenlp.trainer import TrainingArguments
from paddlenlp.transformers.configuration_utils import llmmetaclass


@dataclass
@llmmetaclass
class PreTrainingArguments(TrainingArguments):
    min_learning_rate: float = field(default=1e-5, metadata={"help": "Minimum learning rate decayed to."})
    decay_steps: float = field(default=None, metadata={"help": "Steps after which min_learning_rate holds."})
    enable_linear_fused_grad_add: bool = field(default=False, metadata={"help": "Unused on CPU."})
    autotuner_benchmark: bool = field(default=False, metadata={"help": "Upstream benchmark switch."})
    unified_checkpoint: bool = field(default=False, metadata={"help": "Unified checkpoint format."})
    unified_checkpoint_config: str = field(default="", metadata={"help": "Unified checkpoint options."})


@dataclass
class DataArguments:
    input_dir: str = field(default=None, metadata={"help": "Directory or blend list of mmap prefixes."})
    split: str = field(default="949,50,1", metadata={"help": "Train/valid/test split."})
    max_seq_length: int = field(default=1024, metadata={"help": "Sequence length."})
    share_folder: bool = field(default=False, metadata={"help": "Data and output dirs are shared."})
    data_impl: str = field(default="mmap", metadata={"help": "mmap or lazy."})
    skip_warmup: bool = field(default=True, metadata={"help": "Skip mmap warm-up."})
    data_cache: str = field(default=None, metadata={"help": "Index cache directory."})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="__internal_testing__/tiny-random-llama", metadata={"help": ""})
    tokenizer_name_or_path: str = field(default=None, metadata={"help": ""})
    use_fast_layer_norm: bool = field(default=False, metadata={"help": ""})
    hidden_dropout_prob: float = field(default=0.1, metadata={"help": ""})
    attention_probs_dropout_prob: float = field(default=0.1, metadata={"help": ""})
    fuse_attention_qkv: bool = field(default=None, metadata={"help": ""})
    fuse_attention_ffn: bool = field(default=None, metadata={"help": ""})
    continue_training: bool = field(default=False, metadata={"help": ""})
    num_hidden_layers: int = field(default=None, metadata={"help": ""})
    initializer_range: float = field(default=None, metadata={"help": "Fork addition: overrides config."})


def argument_table() -> dict[str, str]:
    """Every key a pretrain JSON may carry, with a coarse kind, for validation off the rank."""
    import dataclasses
    import typing

    def kind(tp) -> str:
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin is typing.Union and len(args) == 1:
            return kind(args[0])
        if origin is typing.Union:
            return "any"
        if origin in (list, tuple) or tp in (list, tuple):
            return "list"
        if origin is dict or tp is dict:
            return "dict"
        if tp is bool:
            return "bool"
        if tp is int:
            return "int"
        if tp is float:
            return "float"
        if tp is str or (isinstance(tp, type) and issubclass(tp, str)):
            return "str"
        return "any"

    table: dict[str, str] = {}
    for cls in (ModelArguments, DataArguments, PreTrainingArguments):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                table[f.name] = kind(hints.get(f.name, f.type))
    return dict(sorted(table.items()))
