"""Qwen3-Next and Qwen3.5 (dense and MoE) in Flax NNX: Gated DeltaNet layers with a gated
full-attention layer every few layers (three GDN layers for each attention layer in the released
models), each followed by a SiLU-gated MLP or a mixture of experts with a gated shared expert.

One family serves five ``model_type`` values of ``config.json``:

- ``qwen3_next`` (``Qwen3NextForCausalLM``): GDN input projections fused per key head
  (``in_proj_qkvz``, ``in_proj_ba``); layer ``i`` is MoE unless listed in ``mlp_only_layers`` or
  when ``(i + 1) % decoder_sparse_step != 0`` (or ``num_experts == 0``);
- ``qwen3_5_text`` (``Qwen3_5ForCausalLM``): separate GDN projections (``in_proj_qkv``,
  ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), a dense MLP in every layer;
- ``qwen3_5_moe_text`` (``Qwen3_5MoeForCausalLM``): separate projections, MoE in every layer,
  top-k weights always renormalised;
- ``qwen3_5`` / ``qwen3_5_moe`` (the ``...ForConditionalGeneration`` checkpoints): their
  ``text_config`` is the language model above, under ``model.language_model.``; the vision tower
  (``model.visual.*``) is not loaded, with a warning.

The numbers match transformers 5.24:

- RMSNorms are zero-centred, ``norm(x) * (1 + weight)`` in float32, except the GDN output norm
  (``weight * norm(y) * silu(z)`` per value head);
- attention: ``q_proj`` yields the queries and an output gate per head (``[query, gate]`` halves
  of each head's ``2 * head_dim`` features), per-head ``q_norm`` / ``k_norm`` before RoPE, RoPE in
  the NeoX layout on the first ``int(head_dim * partial_rotary_factor)`` features (Qwen3.5's
  multimodal RoPE is the plain RoPE for text: its three position streams are equal), scores
  scaled by ``head_dim ** -0.5``, the output multiplied by ``sigmoid(gate)``;
- the router takes a float32 softmax over all experts, keeps the top ``num_experts_per_tok``,
  renormalises them when ``norm_topk_prob``; the shared expert is scaled by
  ``sigmoid(shared_expert_gate(x))``.

Modules hold parameters only; the memory goes through :func:`qwen3_next_forward` (the
:class:`~jaxhybrid.models.ModelMemory` protocol).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Float, Int
from jaxhybrid.kv import rope
from jaxhybrid.models._attention import attend
from jaxhybrid.models._config_checks import (
    DTYPES,
    check_bool,
    check_int,
    check_number,
    dtype_name,
    read_config,
)
from jaxhybrid.models._gated_deltanet import GatedDeltaNet
from jaxhybrid.models._hybrid_adapter import FlaxHybridModel
from jaxhybrid.models._loader import Slot, checkpoint_dir, checkpoint_tensor_names, load_checkpoint
from jaxhybrid.models._mamba import Linear, ParamInit
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models.bamba import (
    check_attention,
    config_kwargs,
    linear_slots,
    rope_parameters,
    rope_theta,
    vector_slot,
)

__all__ = [
    "MODEL_TYPES",
    "Qwen3Next",
    "Qwen3NextAttention",
    "Qwen3NextConfig",
    "Qwen3NextLayer",
    "Qwen3NextMLP",
    "Qwen3NextModel",
    "Qwen3NextMoE",
    "init_qwen3_next",
    "load_qwen3_next",
    "qwen3_next_forward",
    "qwen3_next_tensor_shapes",
]

_OWNER = "Qwen3NextConfig"
_COLUMN, _ROW = -1, -2
LINEAR, FULL = "linear_attention", "full_attention"

# config.json model_type -> the variant it is (the conditional-generation types hold the text
# model's config under "text_config").
MODEL_TYPES: dict[str, str] = {
    "qwen3_next": "qwen3_next",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_5_moe": "qwen3_5_moe",
}
_VARIANTS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


@dataclasses.dataclass(frozen=True)
class Qwen3NextConfig:
    """Static Qwen3-Next / Qwen3.5 hyper-parameters (field names follow transformers'
    ``Qwen3NextConfig`` and ``Qwen3_5TextConfig``; ``variant`` says which model, see the module
    docstring).

    ``layer_types`` names every layer ``"linear_attention"`` (GDN) or ``"full_attention"``;
    ``None`` gives transformers' default: attention every ``full_attention_interval`` (4) layers.
    ``rope_theta`` and ``partial_rotary_factor`` come from ``rope_parameters`` in
    :meth:`from_hf`.

    Attributes:
        dtype: parameter and activation dtype, ``"float32"`` or ``"bfloat16"``. Norms, softmaxes,
            the router and the delta rule always run in float32.
    """

    variant: str = "qwen3_next"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = 256
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: tuple[str, ...] | None = None
    full_attention_interval: int = 4
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        if self.variant not in _VARIANTS:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.variant must be one of {list(_VARIANTS)}, got {self.variant!r}"
            )
        check_attention(self, _OWNER)
        for name in (
            "vocab_size",
            "num_hidden_layers",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "full_attention_interval",
            "decoder_sparse_step",
        ):
            check_int(_OWNER, name, getattr(self, name), 1)
        check_int(_OWNER, "linear_conv_kernel_dim", self.linear_conv_kernel_dim, 2)
        for name in ("intermediate_size", "moe_intermediate_size", "num_experts"):
            check_int(_OWNER, name, getattr(self, name), 0)
        check_int(
            _OWNER, "shared_expert_intermediate_size", self.shared_expert_intermediate_size, 0
        )
        check_int(_OWNER, "num_experts_per_tok", self.num_experts_per_tok, 1)
        for name in ("tie_word_embeddings", "attention_bias", "norm_topk_prob"):
            check_bool(_OWNER, name, getattr(self, name))
        check_number(_OWNER, "rms_norm_eps", self.rms_norm_eps, positive=True)
        check_number(_OWNER, "initializer_range", self.initializer_range, positive=False)
        check_number(_OWNER, "rope_theta", self.rope_theta, positive=True)
        check_number(_OWNER, "partial_rotary_factor", self.partial_rotary_factor, positive=True)
        n_rot = int(self.head_dim * self.partial_rotary_factor)
        if self.partial_rotary_factor > 1 or n_rot < 2 or n_rot % 2:
            raise jh.InvalidArgumentError(
                f"{_OWNER}: partial_rotary_factor ({self.partial_rotary_factor}) * head_dim "
                f"({self.head_dim}) must give an even number of rotated features in "
                f"[2, head_dim], got {n_rot}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise jh.InvalidArgumentError(
                f"{_OWNER}: linear_num_value_heads ({self.linear_num_value_heads}) must be a "
                f"multiple of linear_num_key_heads ({self.linear_num_key_heads})"
            )
        object.__setattr__(self, "layer_types", self._layer_types())
        object.__setattr__(self, "mlp_only_layers", self._mlp_only_layers())
        if any(self.moe_layers):
            if self.num_experts_per_tok > self.num_experts:
                raise jh.InvalidArgumentError(
                    f"{_OWNER}: num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                    f"num_experts ({self.num_experts})"
                )
            for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                check_int(_OWNER, name, getattr(self, name), 1)
        if not all(self.moe_layers):
            check_int(_OWNER, "intermediate_size", self.intermediate_size, 1)
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    def _layer_types(self) -> tuple[str, ...]:
        types = self.layer_types
        if types is None:
            every = self.full_attention_interval
            return tuple(LINEAR if (i + 1) % every else FULL for i in range(self.num_hidden_layers))
        if not isinstance(types, list | tuple):
            raise jh.InvalidTypeError(
                f"{_OWNER}.layer_types must be a list of layer type names, got "
                f"{type(types).__name__} {types!r}"
            )
        if len(types) != self.num_hidden_layers:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.layer_types names {len(types)} layers, but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for i, t in enumerate(types):
            if t not in (LINEAR, FULL):
                raise jh.InvalidArgumentError(
                    f"{_OWNER}.layer_types[{i}] is {t!r}; must be {LINEAR!r} or {FULL!r}"
                )
        return tuple(types)

    def _mlp_only_layers(self) -> tuple[int, ...]:
        idx = self.mlp_only_layers
        if not isinstance(idx, list | tuple):
            raise jh.InvalidTypeError(
                f"{_OWNER}.mlp_only_layers must be a list of layer indices, got "
                f"{type(idx).__name__} {idx!r}"
            )
        for i, v in enumerate(idx):
            check_int(_OWNER, f"mlp_only_layers[{i}]", v, 0)
        return tuple(sorted({int(v) for v in idx}))

    @classmethod
    def from_hf(
        cls, config: Mapping | str | os.PathLike, *, dtype: str = "float32"
    ) -> Qwen3NextConfig:
        """Reads a Hugging Face ``config.json`` (a dict, the file, or its directory) of model
        type ``qwen3_next``, ``qwen3_5_text``, ``qwen3_5_moe_text``, ``qwen3_5`` or
        ``qwen3_5_moe`` (the last two: its ``text_config``; ``tie_word_embeddings`` is the outer
        config's, as transformers' conditional-generation model ties by it).

        Keys absent from the file (or null) take transformers' defaults. RoPE comes from
        ``rope_parameters`` (its ``mrope_section`` / ``mrope_interleaved`` change nothing for
        text); ``partial_rotary_factor`` defaults to 0.25. Every field is checked for its type
        and range; nothing is converted.

        Raises:
            InvalidArgumentError: the file is missing or not a JSON object; the model type is
                none of the above; ``hidden_act`` is not ``"silu"``; the RoPE is scaled; a
                field's value is out of range.
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        name_of_dtype = dtype_name(dtype)
        config = read_config(config, tuple(MODEL_TYPES))
        model_type = config["model_type"]
        variant = MODEL_TYPES[model_type]
        outer = config
        if model_type in ("qwen3_5", "qwen3_5_moe"):
            text = config.get("text_config")
            if not isinstance(text, Mapping):
                raise jh.InvalidArgumentError(
                    f"a {model_type!r} config must hold the language model's config as a JSON "
                    f"object under 'text_config', got {type(text).__name__}"
                )
            config = text
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise jh.InvalidArgumentError(f"only hidden_act='silu' is supported, got {act!r}")
        skip = {"dtype", "variant", "rope_theta", "partial_rotary_factor", "tie_word_embeddings"}
        kwargs = config_kwargs(cls, config, skip)
        if config.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config.get("num_attention_heads", 16)
        tie = outer.get("tie_word_embeddings")
        if tie is not None:
            kwargs["tie_word_embeddings"] = tie
        params = rope_parameters(config, _OWNER)
        kwargs["rope_theta"] = rope_theta(config, params)
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        kwargs["partial_rotary_factor"] = 0.25 if partial is None else partial
        if variant == "qwen3_5":  # no experts
            kwargs["num_experts"] = 0
        if variant == "qwen3_5_moe":  # experts everywhere, always renormalised
            kwargs.update(decoder_sparse_step=1, mlp_only_layers=(), norm_topk_prob=True)
            kwargs.setdefault("intermediate_size", 0)
            kwargs.setdefault("num_experts", 256)
            kwargs.setdefault("num_experts_per_tok", 8)
        return cls(variant=variant, **kwargs, dtype=name_of_dtype)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def n_rot(self) -> int:
        """RoPE-rotated leading features of every attention head."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def fused_projections(self) -> bool:
        """GDN input projections fused per key head (Qwen3-Next) or separate (Qwen3.5)."""
        return self.variant == "qwen3_next"

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN conv: ``q``, ``k`` and ``v``."""
        key_dim = self.linear_num_key_heads * self.linear_key_head_dim
        return 2 * key_dim + self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Whether each layer's feed-forward is the mixture of experts."""
        return tuple(
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        )

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Model layer index of every attention layer (position = ``attn_layer`` index)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Model layer index of every GDN layer (position = recurrent layer index)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)


# --------------------------------------------------------------------------------------------
# Modules


class ZeroCenteredRMSNorm(nnx.Module):
    """``norm(x) * (1 + weight)`` in float32, cast to the input dtype (transformers'
    ``Qwen3NextRMSNorm``; the weight is stored zero-centred)."""

    def __init__(self, dim: int, eps: float, init: ParamInit):
        self.weight = init.constant(0.0, dim)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        w = 1.0 + self.weight[...].astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(var + self.eps) * w.reshape((1,) * (x.ndim - 1) + w.shape)
        return y.astype(x.dtype)


class Qwen3NextAttention(nnx.Module):
    """Gated grouped-query attention with per-head q/k norms and partial RoPE; K/V live in the
    memory."""

    def __init__(self, config: Qwen3NextConfig, init: ParamInit):
        c, h, hd = config, config.hidden_size, config.head_dim
        nh, nkv, b = c.num_attention_heads, c.num_key_value_heads, c.attention_bias
        self.q_proj = Linear(h, 2 * nh * hd, init, bias=b)
        self.k_proj = Linear(h, nkv * hd, init, bias=b)
        self.v_proj = Linear(h, nkv * hd, init, bias=b)
        self.o_proj = Linear(nh * hd, h, init, bias=b)
        self.q_norm = ZeroCenteredRMSNorm(hd, c.rms_norm_eps, init)
        self.k_norm = ZeroCenteredRMSNorm(hd, c.rms_norm_eps, init)
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.theta, self.n_rot = float(c.rope_theta), c.n_rot

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        pos: Int[Array, " ubatch"],
        valid: Bool[Array, " ubatch"],
        mem: ModelMemory,
        attn_layer: int,
    ) -> tuple[Float[Array, "ubatch hidden"], ModelMemory]:
        n_tok = x.shape[0]
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qg = self.q_proj(x).reshape(n_tok, nh, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:].reshape(n_tok, nh * hd)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).reshape(n_tok, nkv, hd))
        v = self.v_proj(x).reshape(n_tok, nkv, hd)
        q = rope(q, pos, theta=self.theta, neox=True, n_rot=self.n_rot)
        k = rope(k, pos, theta=self.theta, neox=True, n_rot=self.n_rot)
        out, mem = attend(q, k, v, valid, mem, attn_layer, hd**-0.5)
        out = out * jax.nn.sigmoid(gate)
        return self.o_proj(out), mem


class Qwen3NextMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, size: int, init: ParamInit):
        self.gate_proj = Linear(hidden_size, size, init)
        self.up_proj = Linear(hidden_size, size, init)
        self.down_proj = Linear(size, hidden_size, init)

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3NextMoE(nnx.Module):
    """Top-k mixture of SiLU-gated experts plus a shared expert scaled by a sigmoid gate.

    Every expert runs on every token (weighted by zero where not chosen): exact and simple, meant
    for small models. Parameters: ``gate`` ``[hidden, experts]``, stacked experts
    ``gate_proj`` / ``up_proj`` ``[experts, hidden, ff]``, ``down_proj`` ``[experts, ff, hidden]``.
    """

    def __init__(self, config: Qwen3NextConfig, init: ParamInit):
        c, h = config, config.hidden_size
        e, f = c.num_experts, c.moe_intermediate_size
        self.gate = init.normal(h, e)
        self.gate_proj = init.normal(e, h, f)
        self.up_proj = init.normal(e, h, f)
        self.down_proj = init.normal(e, f, h)
        self.shared_expert = Qwen3NextMLP(h, c.shared_expert_intermediate_size, init)
        self.shared_expert_gate = Linear(h, 1, init)
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        logits = x @ self.gate[...]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        n_experts = probs.shape[-1]
        weights = jnp.sum(
            jax.nn.one_hot(top_i, n_experts, dtype=jnp.float32) * top_w[:, :, None], axis=1
        ).astype(x.dtype)
        gate = jnp.einsum("th,ehf->tef", x, self.gate_proj[...])
        up = jnp.einsum("th,ehf->tef", x, self.up_proj[...])
        out = jnp.einsum("tef,efh->teh", jax.nn.silu(gate) * up, self.down_proj[...])
        routed = jnp.einsum("teh,te->th", out, weights)
        shared = jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared


class Qwen3NextLayer(nnx.Module):
    """Pre-norm residual block: (GDN | gated attention), then (MLP | MoE)."""

    def __init__(self, config: Qwen3NextConfig, layer: int, init: ParamInit):
        c, h, eps = config, config.hidden_size, config.rms_norm_eps
        self.kind = c.layer_types[layer]
        if self.kind == LINEAR:
            self.linear_attn = GatedDeltaNet(
                h,
                init,
                k_heads=c.linear_num_key_heads,
                v_heads=c.linear_num_value_heads,
                k_head_dim=c.linear_key_head_dim,
                v_head_dim=c.linear_value_head_dim,
                d_conv=c.linear_conv_kernel_dim,
                norm_eps=eps,
                fused=c.fused_projections,
            )
            self.index = c.linear_layers.index(layer)
        else:
            self.self_attn = Qwen3NextAttention(c, init)
            self.index = c.attention_layers.index(layer)
        moe = c.moe_layers[layer]
        self.mlp = Qwen3NextMoE(c, init) if moe else Qwen3NextMLP(h, c.intermediate_size, init)
        self.input_layernorm = ZeroCenteredRMSNorm(h, eps, init)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(h, eps, init)

    def __call__(self, x, pos, valid, seq_set, mem: ModelMemory):
        h = self.input_layernorm(x)
        if self.kind == LINEAR:
            conv0, s0 = mem.ssm_states(self.index)
            h, conv, s, (conv_tok, s_tok) = self.linear_attn(h, seq_set, conv0, s0)
            mem = mem.set_ssm_states(
                self.index,
                conv.astype(conv0.dtype),
                s.astype(s0.dtype),
                conv_tok=conv_tok.astype(conv0.dtype),
                ssm_tok=s_tok.astype(s0.dtype),
            )
        else:
            h, mem = self.self_attn(h, pos, valid, mem, self.index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), mem


class Qwen3Next(nnx.Module):
    """The Qwen3-Next / Qwen3.5 causal LM: embedding, layers, final norm, (tied or untied) LM
    head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_qwen3_next`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: Qwen3NextConfig, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [Qwen3NextLayer(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps, init)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, init)
        )


def qwen3_next_forward(
    model: Qwen3Next,
    tokens: Int[Array, " ubatch"],
    pos: Int[Array, " ubatch"],
    valid: Bool[Array, " ubatch"],
    mem: ModelMemory,
) -> tuple[Float[Array, "ubatch vocab"], ModelMemory]:
    """Runs one ubatch bound in ``mem``; returns float32 logits for every slot and the memory.

    Padding slots (``valid`` False) change no memory state; their logits are meaningless.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxhybrid.models.qwen3_next import Qwen3NextConfig, init_qwen3_next
        >>> cfg = Qwen3NextConfig(variant="qwen3_5", vocab_size=16, hidden_size=8,
        ...     intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...     num_key_value_heads=1, head_dim=8, linear_key_head_dim=4,
        ...     linear_value_head_dim=4, linear_num_key_heads=1, linear_num_value_heads=2,
        ...     full_attention_interval=2, num_experts=0)
        >>> cfg.layer_types
        ('linear_attention', 'full_attention')
    """
    if tokens.ndim != 1 or tokens.shape != pos.shape or tokens.shape != valid.shape:
        raise jh.InvalidArgumentError(
            f"tokens, pos and valid must be 1-D of one length, got {tokens.shape}, {pos.shape}, "
            f"{valid.shape}"
        )
    seq_set = jnp.where(valid, mem.seq_set, -1)
    embed = model.embed_tokens[...]
    x = embed[tokens]
    for layer in model.layers:
        x, mem = layer(x, pos, valid, seq_set, mem)
    x = model.norm(x)
    logits = x @ embed.T if model.lm_head is None else model.lm_head(x)
    return logits.astype(jnp.float32), mem


def init_qwen3_next(config: Qwen3NextConfig, seed: int | None = 0) -> Qwen3Next:
    """A randomly initialised model: normal(0, ``initializer_range``) weights, zero-centred norms
    at 0 (scale 1), GDN output norms at 1, ``dt_bias = 1``, ``A_log = log(1..v_heads)``;
    ``seed=None`` gives abstract parameters for a loader."""
    return Qwen3Next(config, seed=seed)


# --------------------------------------------------------------------------------------------
# Plug-in


@dataclasses.dataclass(frozen=True)
class Qwen3NextModel(FlaxHybridModel):
    """Qwen3-Next / Qwen3.5 as a :class:`jaxhybrid.HybridModel` plug-in for
    :mod:`jaxhybrid.serving`.

    GDN layers are :attr:`jaxhybrid.LayerKind.RECURRENT` with the conv window as ``r``
    (``(linear_conv_kernel_dim - 1, conv_dim)``) and the delta-rule state as ``s``
    (``(linear_num_value_heads, linear_key_head_dim, linear_value_head_dim)``, float32);
    attention layers keep ``num_key_value_heads`` heads of ``head_dim``. The K-shift RoPE
    rotates the first ``n_rot`` features. Tensor-parallel rules split attention heads, MLP and
    expert features, embedding and LM head; GDN parameters are replicated.

    Examples:
        >>> from jaxhybrid.models.qwen3_next import Qwen3NextConfig, Qwen3NextModel
        >>> plugin = Qwen3NextModel(Qwen3NextConfig(vocab_size=16, hidden_size=8,
        ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        ...     linear_key_head_dim=4, linear_value_head_dim=4, linear_num_key_heads=1,
        ...     linear_num_value_heads=2, num_experts=4, num_experts_per_tok=2,
        ...     moe_intermediate_size=8, shared_expert_intermediate_size=8))
        >>> cfg = plugin.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers
        ((3,), (0, 1, 2))
    """

    forward_fn = staticmethod(qwen3_next_forward)
    sharding_rules: ClassVar[dict[tuple[str, ...], int]] = {
        ("embed_tokens",): 0,
        ("lm_head", "kernel"): _COLUMN,
        ("self_attn", "q_proj", "kernel"): _COLUMN,
        ("self_attn", "q_proj", "bias"): 0,
        ("self_attn", "k_proj", "kernel"): _COLUMN,
        ("self_attn", "k_proj", "bias"): 0,
        ("self_attn", "v_proj", "kernel"): _COLUMN,
        ("self_attn", "v_proj", "bias"): 0,
        ("self_attn", "o_proj", "kernel"): _ROW,
        ("mlp", "gate_proj", "kernel"): _COLUMN,
        ("mlp", "up_proj", "kernel"): _COLUMN,
        ("mlp", "down_proj", "kernel"): _ROW,
        ("mlp", "gate_proj"): _COLUMN,
        ("mlp", "up_proj"): _COLUMN,
        ("mlp", "down_proj"): _ROW,
        ("shared_expert", "gate_proj", "kernel"): _COLUMN,
        ("shared_expert", "up_proj", "kernel"): _COLUMN,
        ("shared_expert", "down_proj", "kernel"): _ROW,
    }

    @property
    def rope_fn(self):
        c = self.config
        return jh.kv.rope_shift_fn(theta=c.rope_theta, neox=True, n_rot=c.n_rot)

    def memory_layout(self) -> dict[str, Any]:
        c = self.config
        return dict(
            layer_kinds=[
                jh.LayerKind.ATTENTION if t == FULL else jh.LayerKind.RECURRENT
                for t in c.layer_types
            ],
            n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            r_shape=(c.linear_conv_kernel_dim - 1, c.conv_dim),
            s_shape=(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
            dtype=c.jnp_dtype,
        )


# --------------------------------------------------------------------------------------------
# Loader


def _slots(config: Qwen3NextConfig, prefix: str) -> Iterator[tuple[str, Slot]]:
    """``(tensor name, Slot)`` of every tensor of a transformers checkpoint; the language model
    lies under ``prefix`` (``model`` or ``model.language_model``)."""
    c = config
    h = c.hidden_size
    yield f"{prefix}.embed_tokens.weight", Slot(("embed_tokens",), (c.vocab_size, h), "copy")
    for i, kind in enumerate(c.layer_types):
        p, path = f"{prefix}.layers.{i}", ("layers", i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield from vector_slot(f"{p}.{norm}.weight", (*path, norm, "weight"), h)
        if kind == LINEAR:
            m, mp = f"{p}.linear_attn", (*path, "linear_attn")
            nv = c.linear_num_value_heads
            key_dim = c.linear_num_key_heads * c.linear_key_head_dim
            value_dim = nv * c.linear_value_head_dim
            if c.fused_projections:
                qkvz = 2 * key_dim + 2 * value_dim
                yield from linear_slots(f"{m}.in_proj_qkvz", (*mp, "in_proj_qkvz"), qkvz, h, False)
                yield from linear_slots(f"{m}.in_proj_ba", (*mp, "in_proj_ba"), 2 * nv, h, False)
            else:
                yield from linear_slots(
                    f"{m}.in_proj_qkv", (*mp, "in_proj_qkv"), c.conv_dim, h, False
                )
                yield from linear_slots(f"{m}.in_proj_z", (*mp, "in_proj_z"), value_dim, h, False)
                yield from linear_slots(f"{m}.in_proj_b", (*mp, "in_proj_b"), nv, h, False)
                yield from linear_slots(f"{m}.in_proj_a", (*mp, "in_proj_a"), nv, h, False)
            yield (
                f"{m}.conv1d.weight",
                Slot((*mp, "conv_weight"), (c.conv_dim, 1, c.linear_conv_kernel_dim), "conv"),
            )
            yield from vector_slot(f"{m}.dt_bias", (*mp, "dt_bias"), nv)
            yield from vector_slot(f"{m}.A_log", (*mp, "A_log"), nv)
            yield from vector_slot(
                f"{m}.norm.weight", (*mp, "norm", "weight"), c.linear_value_head_dim
            )
            yield from linear_slots(f"{m}.out_proj", (*mp, "out_proj"), h, value_dim, False)
        else:
            a, ap = f"{p}.self_attn", (*path, "self_attn")
            hd, nh, nkv, b = (
                c.head_dim,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.attention_bias,
            )
            yield from linear_slots(f"{a}.q_proj", (*ap, "q_proj"), 2 * nh * hd, h, b)
            yield from linear_slots(f"{a}.k_proj", (*ap, "k_proj"), nkv * hd, h, b)
            yield from linear_slots(f"{a}.v_proj", (*ap, "v_proj"), nkv * hd, h, b)
            yield from linear_slots(f"{a}.o_proj", (*ap, "o_proj"), h, nh * hd, b)
            yield from vector_slot(f"{a}.q_norm.weight", (*ap, "q_norm", "weight"), hd)
            yield from vector_slot(f"{a}.k_norm.weight", (*ap, "k_norm", "weight"), hd)
        f, fp = f"{p}.mlp", (*path, "mlp")
        if c.moe_layers[i]:
            e, ff = c.num_experts, c.moe_intermediate_size
            yield f"{f}.gate.weight", Slot((*fp, "gate"), (e, h), "t")
            for j in range(e):
                x = f"{f}.experts.{j}"
                yield f"{x}.gate_proj.weight", Slot((*fp, "gate_proj"), (ff, h), "t", j)
                yield f"{x}.up_proj.weight", Slot((*fp, "up_proj"), (ff, h), "t", j)
                yield f"{x}.down_proj.weight", Slot((*fp, "down_proj"), (h, ff), "t", j)
            s, sp = f"{f}.shared_expert", (*fp, "shared_expert")
            fs = c.shared_expert_intermediate_size
            yield from linear_slots(f"{s}.gate_proj", (*sp, "gate_proj"), fs, h, False)
            yield from linear_slots(f"{s}.up_proj", (*sp, "up_proj"), fs, h, False)
            yield from linear_slots(f"{s}.down_proj", (*sp, "down_proj"), h, fs, False)
            yield from linear_slots(
                f"{f}.shared_expert_gate", (*fp, "shared_expert_gate"), 1, h, False
            )
        else:
            ff = c.intermediate_size
            yield from linear_slots(f"{f}.gate_proj", (*fp, "gate_proj"), ff, h, False)
            yield from linear_slots(f"{f}.up_proj", (*fp, "up_proj"), ff, h, False)
            yield from linear_slots(f"{f}.down_proj", (*fp, "down_proj"), h, ff, False)
    yield from vector_slot(f"{prefix}.norm.weight", ("norm", "weight"), h)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", Slot(("lm_head", "kernel"), (c.vocab_size, h), "t")


def qwen3_next_tensor_shapes(
    config: Qwen3NextConfig, prefix: str = "model"
) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config, prefix)}


def load_qwen3_next(
    path: str | os.PathLike, dtype: str = "float32"
) -> tuple[Qwen3NextConfig, Qwen3Next]:
    """Loads a Hugging Face Qwen3-Next or Qwen3.5 (dense or MoE) checkpoint directory.

    Tensor names are those ``save_pretrained`` writes: under ``model.`` (the causal-LM classes)
    or ``model.language_model.`` (the conditional-generation classes, whose vision tower
    ``model.visual.*`` is skipped with a :class:`UserWarning`), one tensor per expert
    (``mlp.experts.{j}.gate_proj.weight``), ``nn.Linear`` weights ``[out, in]``, conv weights
    ``[conv_dim, 1, kernel]``. Multi-token-prediction tensors (``mtp.*``) and a tied
    checkpoint's ``lm_head.weight`` are ignored.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`Qwen3NextConfig.from_hf`).
        InvalidArgumentError: a file is missing or unreadable; the config is invalid or
            describes more parameters than the files hold; the checkpoint lacks a tensor, holds
            one the model does not have, one of the wrong shape or a non-float dtype (the message
            names every such tensor with its expected shape); or a tensor holds NaN or infinity.
    """
    path = checkpoint_dir(path)
    config = Qwen3NextConfig.from_hf(path, dtype=dtype)
    names = checkpoint_tensor_names(path)
    prefix = (
        "model.language_model"
        if any(n.startswith("model.language_model.") for n in names)
        else "model"
    )
    vision = {n for n in names if n.startswith("model.visual.")}
    if vision:
        warnings.warn(
            f"{path}: the vision tower ({len(vision)} tensors under model.visual.) is not "
            "loaded; jaxhybrid serves the language model only (text in, text out)",
            UserWarning,
            stacklevel=2,
        )
    ignored = vision | {n for n in names if n.split(".")[0] == "mtp"}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    model = load_checkpoint(
        path,
        lambda: Qwen3Next(config, seed=None),
        lambda: _slots(config, prefix),
        dtype=config.jnp_dtype,
        ignored=ignored,
    )
    return config, model
