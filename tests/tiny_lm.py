"""Tiny random-init causal LMs of each supported family, for pipeline/checkpoint/CLI tests.

No real OPT/BLOOM weights exist offline; random init exercises the same code paths (masks, ALiBi,
rotary position embeddings, tied embeddings) in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, OPTConfig

FAMILIES = ("opt", "bloom", "llama")

# Every Linear inside the blocks, per block, in the families' true-sequential order.
BLOCK_LAYERS = {
    "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    "bloom": [
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ],
    "llama": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
}
BLOCK_PATH = {"opt": "model.decoder.layers", "bloom": "transformer.h", "llama": "model.layers"}


def config(family: str, vocab: int = 100) -> Any:
    if family == "opt":
        return OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=vocab,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        )
    if family == "bloom":
        return BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=vocab)
    if family == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    raise KeyError(family)


def tiny_model(family: str, vocab: int = 100, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, vocab)).eval()
    with torch.no_grad():  # wider than the 0.02 init, so quantization error is clearly visible
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(5.0)
    return model


def expected_layers(family: str, blocks: int = 2) -> list[str]:
    return [f"{BLOCK_PATH[family]}.{i}.{name}" for i in range(blocks) for name in BLOCK_LAYERS[family]]


def save_tiny(family: str, folder: Path, tokenizer: Any, seed: int = 0) -> Path:
    """A tiny model of ``family`` with vocabulary 512 (the stories260K tokenizer's), saved with it."""
    model = tiny_model(family, vocab=512, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
