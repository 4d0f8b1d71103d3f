"""A synthetic Llama checkpoint of any size, written shard by shard without ever holding it whole.

Real architecture (transformers' ``LlamaConfig``), random weights (std 0.02, norms at 1), in
bf16 safetensors shards with the Hugging Face index: what a 7-70B checkpoint looks like to cdq,
at a size a test or a benchmark can afford. Used by tests/test_big_models.py and
scripts/bench_big.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cdq_cli.store.shards import ShardWriter


def write_synthetic_llama(
    folder: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2**30,
    seed: int = 0,
    context: int = 2048,
) -> int:
    """Write the checkpoint into ``folder``; return its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, max_shard_bytes)
    count = 0
    for name, meta in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape)
        else:
            tensor = torch.randn(meta.shape, generator=gen).mul_(0.02)
        writer.write({name: tensor.to(dtype)})
        count += meta.numel()
    writer.close()
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return count
