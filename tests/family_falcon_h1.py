"""A tiny seeded Falcon-H1 checkpoint written by transformers, and transformers' own outputs on it.

The config exercises every code path of the family at once where the options are independent:
GQA (2 query heads per KV head) with an explicit ``head_dim`` wider than ``hidden / heads`` and
biases, RoPE with a non-default base, a mixer width (``mamba_d_ssm``) other than
``expand * hidden``, 2 groups, the grouped gated RMSNorm applied after the gate
(``mamba_norm_before_gate=False``), an ``in_proj`` bias without an ``out_proj`` bias, MLP biases,
and every μP multiplier away from 1 (each a different value, so a swapped pair shows).
:data:`HF_CONFIG_OTHER` takes the other branch of each option (tied embeddings, no norm in the
mixer, ``out_proj`` bias without ``in_proj`` bias, no conv bias, MHA).
"""

from __future__ import annotations

import os

import numpy as np

HF_CONFIG = dict(
    vocab_size=160,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    attention_bias=True,
    mlp_bias=True,
    rope_theta=5000.0,
    mamba_d_ssm=48,
    mamba_n_heads=6,
    mamba_n_groups=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_chunk_size=16,
    mamba_conv_bias=True,
    mamba_proj_bias=True,
    projectors_bias=False,
    mamba_rms_norm=True,
    mamba_norm_before_gate=False,
    tie_word_embeddings=False,
    embedding_multiplier=1.6,
    lm_head_multiplier=0.8,
    attention_in_multiplier=0.9,
    attention_out_multiplier=1.2,
    key_multiplier=0.7,
    ssm_in_multiplier=1.1,
    ssm_out_multiplier=0.85,
    ssm_multipliers=[0.6, 1.3, 0.9, 1.2, 0.75],
    mlp_multipliers=[1.25, 0.8],
)

HF_CONFIG_OTHER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    mamba_expand=2,
    mamba_d_ssm=None,
    mamba_n_heads=8,
    mamba_n_groups=1,
    mamba_d_state=8,
    mamba_d_conv=3,
    mamba_chunk_size=8,
    mamba_conv_bias=False,
    mamba_proj_bias=False,
    projectors_bias=True,
    mamba_rms_norm=False,
    tie_word_embeddings=True,
    embedding_multiplier=0.75,
    lm_head_multiplier=1.3,
    key_multiplier=1.15,
    ssm_multipliers=[1.1, 0.8, 1.25, 0.7, 1.4],
    mlp_multipliers=[0.9, 1.1],
)


def hf_config(**kwargs):
    from transformers import FalconH1Config

    base = dict(eos_token_id=None, pad_token_id=None, bos_token_id=None)
    base.update(kwargs)
    return FalconH1Config(**base)


def randomize_(model, seed: int) -> None:
    """Overwrites every parameter with seeded values of order-one effect.

    transformers' own init makes most layers near-identities, which would hide mistakes. As
    ``jamba_utils.randomize_``: input projections get gain 0.5 and residual outputs 0.7, so that
    float32 comparisons measure the implementation rather than a chaotic network's conditioning.
    Mamba-2's per-head ``dt_bias`` is drawn around -2 (time steps ~0.1) and ``A_log`` around
    ``log(1..n_heads)``.
    """
    import math

    import torch

    outputs = ("o_proj.weight", "out_proj.weight", "down_proj.weight")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            fan_in = math.sqrt(p.shape[-1])
            if name.endswith("A_log"):
                base = torch.log(torch.arange(1, p.shape[0] + 1, dtype=torch.float32))
                value = base + 0.3 * noise
            elif name.endswith("dt_bias"):
                value = -2.0 + 0.5 * noise
            elif name.endswith("norm.weight") or name.endswith(".D"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("conv1d.weight"):
                value = noise / fan_in
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                value = noise / fan_in
            elif name.endswith(outputs):
                value = 0.7 * noise / fan_in
            else:  # input projections [out, in]
                value = 0.5 * noise / fan_in
            p.copy_(value.to(p.dtype))


def tiny_checkpoint(path, params: dict | None = None, *, seed: int = 0):
    """Builds ``FalconH1ForCausalLM`` (float32, seeded, randomized) and saves it in ``path``.

    Returns:
        ``path``.
    """
    import torch
    from transformers import FalconH1ForCausalLM

    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(hf_config(**(HF_CONFIG if params is None else params)))
    model = model.float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path


_MODELS: dict[str, object] = {}


def hf_model(path):
    """transformers' model of a checkpoint directory (cached per path), float32, eval mode."""
    import torch
    from transformers import FalconH1ForCausalLM

    key = os.fspath(path)
    if key not in _MODELS:
        model = FalconH1ForCausalLM.from_pretrained(key, dtype=torch.float32)
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
