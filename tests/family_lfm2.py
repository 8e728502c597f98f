"""Tiny seeded LFM2 checkpoints written by transformers, and transformers' own outputs on them.

``HF_CONFIG`` exercises every code path of the family through the hybrid memory: short-conv and
attention layers interleaved with conv first and last (conv blocks before, between and after the
attention layers), GQA with 2 query heads per KV head, a non-default RoPE base, biases on the
conv and on its ``in_proj`` / ``out_proj`` (``conv_bias``), an untied LM head and the
``block_*`` feed-forward width rule (72 -> 48 -> x1.5 = 72 -> rounded up to 80). ``TIED_CONFIG``
is the published checkpoints' shape: tied embeddings, no conv bias, a wider conv window, a
``head_dim`` of its own and the feed-forward width taken as given.

The transformers helpers (``hf_logits``, ``hf_greedy``), the parameter randomisation, the
single-compilation runner and the checkpoint editor are Bamba's (:mod:`family_bamba`).
"""

from __future__ import annotations

import os

from family_bamba import (  # noqa: F401 - re-exported for the LFM2 tests
    HybridRunner,
    copy_checkpoint,
    fresh_logits,
    hf_greedy,
    hf_logits,
    hf_model,
    randomize_,
)

HF_CONFIG = dict(
    vocab_size=160,
    hidden_size=32,
    intermediate_size=72,
    num_hidden_layers=5,
    layer_types=["conv", "full_attention", "conv", "full_attention", "conv"],
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    conv_bias=True,
    conv_L_cache=3,
    norm_eps=1e-5,
    block_multiple_of=16,
    block_ffn_dim_multiplier=1.5,
    block_auto_adjust_ff_dim=True,
    tie_word_embeddings=False,
)

TIED_CONFIG = dict(
    vocab_size=160,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,
    full_attn_idxs=[2],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    conv_bias=False,
    conv_L_cache=4,
    norm_eps=1e-6,
    block_auto_adjust_ff_dim=False,
    tie_word_embeddings=True,
)


def hf_config(**kwargs):
    from transformers import Lfm2Config

    base = dict(eos_token_id=None, pad_token_id=None, bos_token_id=None)
    base.update(kwargs)
    return Lfm2Config(**base)


def tiny_checkpoint(path, params: dict | None = None, *, seed: int = 0):
    """Builds ``Lfm2ForCausalLM`` (float32, seeded, randomized) of ``params`` (default
    ``HF_CONFIG``) and saves it in ``path``.

    Returns:
        ``path``.
    """
    import torch
    from transformers import Lfm2ForCausalLM

    torch.manual_seed(seed)
    model = Lfm2ForCausalLM(hf_config(**(HF_CONFIG if params is None else params)))
    model = model.float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path
