"""Prove a gathered model is the checkpoint it came from: same logits on a fixed batch.

Imports Paddle inside the functions: callers on the head only pay for it when they verify.
"""

from __future__ import annotations

import os


def _logits(model, vocab_size: int, seq_len: int, seed: int):
    import numpy as np
    import paddle

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(2, seq_len)).astype("int64")
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor(ids))
    logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    return logits.numpy()


def compare_to_checkpoint(model_dir: str, checkpoint_dir: str, seq_len: int = 32, seed: int = 0) -> float:
    """Max |logits| difference between `from_pretrained(model_dir)` and the checkpoint's weights."""
    import numpy as np
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.set_device("cpu")
    gathered = LlamaForCausalLM.from_pretrained(model_dir, dtype="float32")
    config = LlamaConfig.from_pretrained(checkpoint_dir)
    original = LlamaForCausalLM.from_config(config, dtype="float32")
    state = paddle.load(os.path.join(checkpoint_dir, "model_state.pdparams"))
    missing, unexpected = original.set_state_dict(state)
    if missing or unexpected:
        raise ValueError(f"{checkpoint_dir}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    a = _logits(gathered, config.vocab_size, seq_len, seed)
    b = _logits(original, config.vocab_size, seq_len, seed)
    return float(np.max(np.abs(a - b)))


def generate_sample(model_dir: str, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by the gathered model, decoded with its own tokenizer."""
    import paddle
    from paddlenlp.transformers import AutoTokenizer, LlamaForCausalLM

    paddle.set_device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype="float32")
    model.eval()
    enc = tokenizer(prompt, return_tensors="pd", add_special_tokens=False)
    with paddle.no_grad():
        # PaddleNLP 3.0.0b4's LLaMA generate() fails without an explicit attention_mask.
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            decode_strategy="greedy_search",
            use_cache=True,
        )
    new_ids = out[0] if isinstance(out, (tuple, list)) else out
    return prompt + tokenizer.decode(new_ids[0].numpy().tolist(), skip_special_tokens=True)
