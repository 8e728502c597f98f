"""Tiny seeded Qwen3-Next / Qwen3.5 checkpoints written by transformers (one per variant), and
transformers' own outputs on them.

The configs exercise every code path of the family: GDN and gated attention layers (attention
second and last, so GDN layers come before, between and after), GQA in the attention (2 query
heads per KV head) and in the GDN (2 value heads per key head), partial RoPE with a non-default
base and factor, the fused per-key-head projections of Qwen3-Next and the separate ones of
Qwen3.5, MoE layers with a gated shared expert (with and without top-k renormalisation) beside a
dense MLP layer (``mlp_only_layers``), tied and untied embeddings.
"""

from __future__ import annotations

import math
import os

import family_bamba

LAYER_TYPES = [
    "linear_attention",
    "full_attention",
    "linear_attention",
    "linear_attention",
    "full_attention",
]
_COMMON = dict(
    vocab_size=160,
    hidden_size=32,
    num_hidden_layers=5,
    layer_types=LAYER_TYPES,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    rms_norm_eps=1e-6,
    eos_token_id=None,
    pad_token_id=None,
    bos_token_id=None,
)
_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)

# variant -> (transformers config class, model class, config kwargs)
VARIANTS = {
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            _COMMON,
            **_MOE,
            intermediate_size=48,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_5": (
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        dict(_COMMON, intermediate_size=48, tie_word_embeddings=True),
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(_COMMON, **_MOE, tie_word_embeddings=False),
    ),
}
VOCAB = _COMMON["vocab_size"]


def randomize_(model, seed: int) -> None:
    """:func:`family_bamba.randomize_`, then the zero-centred norms (scale ``1 + weight``) drawn
    around 0 instead of 1."""
    import torch

    family_bamba.randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    zero_centred = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "model.norm.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(zero_centred) or name.endswith("language_model.norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate_up_proj"):  # fused experts, fan-in on the last axis
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def tiny_checkpoint(path, variant: str = "qwen3_next", *, seed: int = 0, **overrides):
    """Builds the variant's causal LM (float32, seeded, randomized; config fields ``overrides``
    replaced) and saves it in ``path``."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = VARIANTS[variant]
    kwargs = {**kwargs, **overrides}
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model = model.float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path


def tiny_conditional_checkpoint(path, variant: str = "qwen3_5", *, seed: int = 0):
    """A ``Qwen3_5ForConditionalGeneration`` (or the MoE one; vision tower included) whose
    language model is the variant's config, saved in ``path``."""
    import torch
    import transformers

    text = dict(VARIANTS[variant][2])
    tie = text.pop("tie_word_embeddings")
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32)
    prefix = "Qwen3_5Moe" if variant == "qwen3_5_moe" else "Qwen3_5"
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision, tie_word_embeddings=tie
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path


hf_model = family_bamba.hf_model
hf_logits = family_bamba.hf_logits
hf_greedy = family_bamba.hf_greedy
HybridRunner = family_bamba.HybridRunner
copy_checkpoint = family_bamba.copy_checkpoint
