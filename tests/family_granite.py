"""Tiny seeded Granite-4.0-H (``granitemoehybrid``) checkpoints written by transformers, and
transformers' own outputs on them.

:data:`HF_CONFIG` exercises the MoE path: attention first and fourth among Mamba-2 layers, GQA
with 2 query heads per KV head, whole-head RoPE, 4 experts top-2 plus the shared MLP, every μP
multiplier away from 1 (each a different value, so a swapped pair shows), 2 groups, a conv of
width 3 and an explicit ``mamba_d_head``, no biases, tied embeddings, chunks of 16.
:data:`HF_CONFIG_OTHER` takes the other branches: no positional encoding, no experts (shared MLP
alone), untied embeddings, one group, biases on the mixer.
"""

from __future__ import annotations

import os

import numpy as np
from family_bamba import randomize_

HF_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=24,
    shared_intermediate_size=40,
    num_hidden_layers=5,
    layer_types=["attention", "mamba", "mamba", "attention", "mamba"],
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=False,
    position_embedding_type="rope",
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    num_local_experts=4,
    num_experts_per_tok=2,
    embedding_multiplier=1.7,
    residual_multiplier=0.6,
    attention_multiplier=0.3,
    logits_scaling=1.8,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_n_groups=2,
    mamba_d_state=8,
    mamba_d_conv=3,
    mamba_expand=2,
    mamba_chunk_size=16,
    mamba_conv_bias=False,
    mamba_proj_bias=False,
    tie_word_embeddings=True,
)

HF_CONFIG_OTHER = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=24,
    shared_intermediate_size=48,
    num_hidden_layers=3,
    layer_types=["mamba", "attention", "mamba"],
    num_attention_heads=4,
    num_key_value_heads=4,
    attention_bias=True,
    position_embedding_type=None,
    num_local_experts=0,
    embedding_multiplier=0.8,
    residual_multiplier=1.2,
    attention_multiplier=0.2,
    logits_scaling=0.7,
    mamba_n_heads=8,
    mamba_n_groups=1,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=8,
    mamba_conv_bias=True,
    mamba_proj_bias=True,
    tie_word_embeddings=False,
)


def hf_config(**kwargs):
    from transformers import GraniteMoeHybridConfig

    base = dict(eos_token_id=None, pad_token_id=None, bos_token_id=None)
    base.update(kwargs)
    return GraniteMoeHybridConfig(**base)


def tiny_checkpoint(path, params: dict | None = None, *, seed: int = 0):
    """Builds ``GraniteMoeHybridForCausalLM`` (float32, seeded, randomized) and saves it in
    ``path``.

    Returns:
        ``path``.
    """
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    model = GraniteMoeHybridForCausalLM(hf_config(**(HF_CONFIG if params is None else params)))
    model = model.float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path


_MODELS: dict[str, object] = {}


def hf_model(path):
    """transformers' model of a checkpoint directory (cached per path), float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    key = os.fspath(path)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def hf_logits(path, ids) -> np.ndarray:
    """transformers' float32 logits ``[len(ids), vocab]`` for one prompt (no cache)."""
    import torch

    with torch.no_grad():
        out = hf_model(path)(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(path, ids, n_new: int) -> list[int]:
    """transformers' ``generate(do_sample=False)`` tokens after the prompt."""
    import torch

    with torch.no_grad():
        out = hf_model(path).generate(
            torch.tensor([list(ids)], dtype=torch.long),
            max_new_tokens=n_new,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()
