"""A tiny seeded Nemotron-H checkpoint written by transformers, and transformers' outputs on it.

The config exercises every code path of the family: all four layer kinds (two of each stateful
kind, so the attention / Mamba layer numbering matters), GQA with ``head_dim`` different from
``hidden_size / num_attention_heads``, Mamba-2 with two groups (grouped B/C and the grouped gated
norm), a chunk size of 16, conv bias, MLP biases, and a MoE of 8 experts in 2 groups (one group
kept, top 2 of it) with a correction bias, renormalised and scaled weights, a latent projection
and a shared expert. ``time_step_min`` is high enough that the ``dt`` clamp is active.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

HF_CONFIG = dict(
    vocab_size=160,
    hidden_size=48,
    layers_block_type=[
        "linear_attention",
        "moe",
        "full_attention",
        "mlp",
        "linear_attention",
        "full_attention",
        "moe",
    ],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    mlp_bias=True,
    mamba_num_heads=8,
    mamba_head_dim=8,
    n_groups=2,
    ssm_state_size=8,
    conv_kernel=4,
    chunk_size=16,
    use_conv_bias=True,
    use_bias=False,
    time_step_min=0.01,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    moe_latent_size=24,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    eos_token_id=None,
    pad_token_id=None,
    bos_token_id=None,
)


def randomize_(model, seed: int) -> None:
    """Overwrites every parameter (and the router's correction-bias buffer) with seeded values of
    order-one effect, as ``jamba_utils.randomize_`` does for Jamba (which cannot be reused as is:
    Mamba-2's ``A_log`` is one value per head).

    transformers' own init makes most layers near-identities, which would hide mistakes; input
    projections get gain 0.5 and residual outputs 0.7 so that float32 comparisons measure the
    implementation, not the conditioning. ``dt_bias`` is drawn around ``-4`` (``softplus`` ~0.02)
    so that some steps fall under ``time_step_min`` and are clamped.
    """
    import torch

    outputs = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            fan_in = math.sqrt(p.shape[-1])
            if name.endswith("A_log"):
                base = torch.log(torch.arange(1, p.shape[-1] + 1, dtype=torch.float32))
                value = base + 0.3 * noise
            elif name.endswith("dt_bias"):
                value = -4.0 + 0.5 * noise
            elif (
                name.endswith("norm.weight")
                or name.endswith(".D")
                or name.endswith("norm_f.weight")
            ):
                value = 1.0 + 0.2 * noise
            elif name.endswith("conv1d.weight"):
                value = noise / fan_in
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif name.endswith(("embeddings.weight", "lm_head.weight")):
                value = noise / fan_in
            elif name.endswith(outputs):
                value = 0.7 * noise / fan_in
            else:  # input projections [.., out, in], stacked experts and the router
                value = 0.5 * noise / fan_in
            p.copy_(value.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def tiny_checkpoint(path, *, seed: int = 0, **overrides):
    """Builds ``NemotronHForCausalLM`` of :data:`HF_CONFIG` (with ``overrides``) in float32 with
    seeded random weights and saves it in ``path``; returns ``path``."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**{**HF_CONFIG, **overrides})).float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path


@functools.lru_cache(maxsize=4)
def hf_model(path):
    """transformers' model of the checkpoint in ``path`` (float32, eval, cached)."""
    import torch
    from transformers import NemotronHForCausalLM

    torch.set_num_threads(1)
    return NemotronHForCausalLM.from_pretrained(os.fspath(path), dtype=torch.float32).eval()


def hf_logits(path, ids) -> np.ndarray:
    """transformers' float32 logits ``[len(ids), vocab]`` for one prompt (no cache)."""
    import torch

    with torch.no_grad():
        out = hf_model(os.fspath(path))(torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(path, ids, n_new: int) -> list[int]:
    """transformers' ``generate(do_sample=False)`` tokens after the prompt ``ids``."""
    import torch

    with torch.no_grad():
        out = hf_model(os.fspath(path)).generate(
            torch.tensor([list(ids)]), max_new_tokens=n_new, do_sample=False
        )
    return out[0, len(ids) :].tolist()
