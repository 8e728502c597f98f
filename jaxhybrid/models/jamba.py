"""Jamba (AI21) in Flax NNX: Mamba-1 layers interleaved with grouped-query attention layers, each
followed by a dense SiLU-gated MLP or a top-k mixture of experts.

Modules hold parameters only. The inference memory is passed to :func:`forward` and returned by
it (Flax's ``examples/gemma`` pattern), through the :class:`~jaxhybrid.models.ModelMemory`
protocol. The numbers match transformers' ``JambaForCausalLM``: attention has no positional
encoding at all (Jamba relies on its Mamba layers for order), the router takes the top-k of a
float32 softmax and does not renormalise the chosen weights, and the Mamba mixer normalises dt, B
and C with their own RMSNorms.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Float, Int
from jaxhybrid.models._config_checks import (
    DTYPES,
    check_bool,
    check_int,
    check_number,
    dtype_name,
    read_config,
)
from jaxhybrid.models._mamba import Linear, MambaMixer, ParamInit, RMSNorm
from jaxhybrid.models._protocol import ModelMemory

__all__ = [
    "Jamba",
    "JambaAttention",
    "JambaConfig",
    "JambaLayer",
    "JambaMLP",
    "JambaMoE",
    "forward",
    "init_jamba",
]

_DTYPES = DTYPES


def _check_int(name: str, value, minimum: int) -> None:
    check_int("JambaConfig", name, value, minimum)


def _check_bool(name: str, value) -> None:
    check_bool("JambaConfig", name, value)


def _check_number(name: str, value, *, positive: bool) -> None:
    check_number("JambaConfig", name, value, positive=positive)


_dtype_name = dtype_name


@dataclasses.dataclass(frozen=True)
class JambaConfig:
    """Static Jamba hyper-parameters (field names follow transformers' ``JambaConfig``).

    Layer ``i`` is attention when ``i % attn_layer_period == attn_layer_offset`` (else Mamba) and
    a mixture of experts when ``num_experts > 1`` and
    ``i % expert_layer_period == expert_layer_offset`` (else a dense MLP).

    Attributes:
        dtype: parameter and activation dtype, ``"float32"`` or ``"bfloat16"``. Norms, softmaxes
            and the selective scan always run in float32.
    """

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    num_experts: int = 16
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        # The sizes the derived fields come from are checked first.
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_attention_heads", self.num_attention_heads, 1)
        if isinstance(self.mamba_dt_rank, str) and self.mamba_dt_rank == "auto":
            # transformers: ceil(hidden_size / 16) (in integers: exact for any size).
            object.__setattr__(self, "mamba_dt_rank", -(-self.hidden_size // 16))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "attn_layer_period",
            "expert_layer_period",
            "num_experts",
            "num_experts_per_tok",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "mamba_dt_rank",
        ):
            _check_int(name, getattr(self, name), 1)
        _check_int("mamba_d_conv", self.mamba_d_conv, 2)
        _check_int("attn_layer_offset", self.attn_layer_offset, 0)
        _check_int("expert_layer_offset", self.expert_layer_offset, 0)
        for name in ("mamba_conv_bias", "mamba_proj_bias", "tie_word_embeddings"):
            _check_bool(name, getattr(self, name))
        _check_number("rms_norm_eps", self.rms_norm_eps, positive=True)
        _check_number("initializer_range", self.initializer_range, positive=False)
        if self.attn_layer_offset >= self.attn_layer_period:
            raise jh.InvalidArgumentError(
                f"attn_layer_offset ({self.attn_layer_offset}) must be < attn_layer_period "
                f"({self.attn_layer_period})"
            )
        if self.expert_layer_offset >= self.expert_layer_period:
            raise jh.InvalidArgumentError(
                f"expert_layer_offset ({self.expert_layer_offset}) must be < expert_layer_period "
                f"({self.expert_layer_period})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise jh.InvalidArgumentError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts > 1 and self.num_experts_per_tok > self.num_experts:
            raise jh.InvalidArgumentError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts "
                f"({self.num_experts})"
            )
        if not isinstance(self.dtype, str) or self.dtype not in _DTYPES:
            raise jh.InvalidArgumentError(
                f"JambaConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )

    @classmethod
    def from_hf(cls, config: Mapping | str | os.PathLike, *, dtype: str = "float32") -> JambaConfig:
        """Reads a Hugging Face Jamba ``config.json`` (a dict, the file, or its directory).

        Keys absent from the file (or null) take transformers' defaults. Only
        ``hidden_act == "silu"`` is supported. Every field is checked for its type and range;
        nothing is converted (a ``"false"`` string is not a bool, ``4.0`` is not an int).

        Raises:
            InvalidArgumentError: the file is missing, not a regular file, not JSON, not a JSON
                object, or a field's value is out of range.
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        dtype_name = _dtype_name(dtype)
        config = read_config(config, "jamba")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise jh.InvalidArgumentError(f"only hidden_act='silu' is supported, got {act!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kwargs = {k: config[k] for k in names if config.get(k) is not None}
        if "num_experts" not in kwargs and config.get("num_local_experts") is not None:
            kwargs["num_experts"] = config["num_local_experts"]
        if config.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config.get("num_attention_heads", 32)
        return cls(**kwargs, dtype=dtype_name)

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def layer_types(self) -> tuple[str, ...]:
        """``"attention"`` or ``"mamba"`` for every layer."""
        return tuple(
            "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            for i in range(self.num_hidden_layers)
        )

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Whether every layer's feed-forward is a mixture of experts."""
        return tuple(
            self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
            for i in range(self.num_hidden_layers)
        )

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Model layer index of every attention layer (position = ``attn_layer`` index)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "attention")

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        """Model layer index of every Mamba layer (position = ``mamba_layer`` index)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "mamba")


# --------------------------------------------------------------------------------------------
# Modules


class JambaAttention(nnx.Module):
    """Grouped-query attention without positional encoding; K/V live in the memory."""

    def __init__(self, config: JambaConfig, init: ParamInit):
        h, hd = config.hidden_size, config.head_dim
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = Linear(h, nh * hd, init)
        self.k_proj = Linear(h, nkv * hd, init)
        self.v_proj = Linear(h, nkv * hd, init)
        self.o_proj = Linear(nh * hd, h, init)
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        valid: Bool[Array, " ubatch"],
        mem: ModelMemory,
        attn_layer: int,
    ) -> tuple[Float[Array, "ubatch hidden"], ModelMemory]:
        n_tok = x.shape[0]
        nkv, hd = self.n_kv_heads, self.head_dim
        group = self.n_heads // nkv
        q = self.q_proj(x).reshape(n_tok, nkv, group, hd)
        k = self.k_proj(x).reshape(n_tok, nkv, hd)
        v = self.v_proj(x).reshape(n_tok, nkv, hd)
        k_all, v_all, mask, mem = mem.kv(attn_layer, k, v)
        mask = mask & valid[:, None]
        # K/V shared by every token ("c...") or per token ("tc...", see ModelMemory.kv).
        kv = "tckd" if k_all.ndim == 4 else "ckd"
        # Query head h = kv_head * group + g reads KV head kv_head (transformers' repeat_kv).
        scores = jnp.einsum(f"tkgd,{kv}->kgtc", q, k_all.astype(q.dtype)).astype(jnp.float32)
        scores = scores * (hd**-0.5)
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        # Rows that may see nothing (padding) read nothing instead of a uniform average.
        probs = jnp.where(jnp.any(mask, axis=-1)[None, None, :, None], probs, 0.0)
        out = jnp.einsum(f"kgtc,{kv}->tkgd", probs.astype(x.dtype), v_all.astype(x.dtype))
        return self.o_proj(out.reshape(n_tok, self.n_heads * hd)), mem


class JambaMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: JambaConfig, init: ParamInit):
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, f, init)
        self.up_proj = Linear(h, f, init)
        self.down_proj = Linear(f, h, init)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class JambaMoE(nnx.Module):
    """Top-k mixture of SiLU-gated experts.

    The router takes the top ``num_experts_per_tok`` of a float32 softmax over all experts and
    uses those probabilities as they are (no renormalisation), as transformers' Jamba does. Every
    expert runs on every token (weighted by zero where not chosen): exact and simple, meant for
    small models.
    """

    def __init__(self, config: JambaConfig, init: ParamInit):
        e, h, f = config.num_experts, config.hidden_size, config.intermediate_size
        self.router = init.normal(h, e)
        self.gate_proj = init.normal(e, h, f)
        self.up_proj = init.normal(e, h, f)
        self.down_proj = init.normal(e, f, h)
        self.top_k = config.num_experts_per_tok

    def __call__(self, x):
        logits = x @ self.router[...]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.top_k)
        n_experts = probs.shape[-1]
        weights = jnp.sum(
            jax.nn.one_hot(top_i, n_experts, dtype=jnp.float32) * top_w[:, :, None], axis=1
        ).astype(x.dtype)
        gate = jnp.einsum("th,ehf->tef", x, self.gate_proj[...])
        up = jnp.einsum("th,ehf->tef", x, self.up_proj[...])
        out = jnp.einsum("tef,efh->teh", jax.nn.silu(gate) * up, self.down_proj[...])
        return jnp.einsum("teh,te->th", out, weights)


class JambaLayer(nnx.Module):
    """Pre-norm residual block: (attention | Mamba) then (MLP | MoE)."""

    def __init__(self, config: JambaConfig, layer: int, init: ParamInit):
        eps = config.rms_norm_eps
        self.kind = config.layer_types[layer]
        if self.kind == "attention":
            self.self_attn = JambaAttention(config, init)
            self.index = config.attention_layers.index(layer)
        else:
            self.mamba = MambaMixer(config, init)
            self.index = config.mamba_layers.index(layer)
        moe = config.moe_layers[layer]
        self.feed_forward = JambaMoE(config, init) if moe else JambaMLP(config, init)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, init)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps, init)

    def __call__(self, x, valid, seq_set, mem: ModelMemory):
        h = self.input_layernorm(x)
        if self.kind == "attention":
            h, mem = self.self_attn(h, valid, mem, self.index)
        else:
            conv0, ssm0 = mem.ssm_states(self.index)
            h, conv, ssm, (conv_tok, ssm_tok) = self.mamba(h, seq_set, conv0, ssm0)
            mem = mem.set_ssm_states(
                self.index,
                conv.astype(conv0.dtype),
                ssm.astype(ssm0.dtype),
                conv_tok=conv_tok.astype(conv0.dtype),
                ssm_tok=ssm_tok.astype(ssm0.dtype),
            )
        x = x + h
        return x + self.feed_forward(self.pre_ff_layernorm(x)), mem


class Jamba(nnx.Module):
    """The Jamba causal LM: embedding, layers, final RMSNorm, (tied or untied) LM head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_jamba`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: JambaConfig, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [JambaLayer(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, init)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, init)


def forward(
    model: Jamba,
    tokens: Int[Array, " ubatch"],
    pos: Int[Array, " ubatch"],
    valid: Bool[Array, " ubatch"],
    mem: ModelMemory,
) -> tuple[Float[Array, "ubatch vocab"], ModelMemory]:
    """Runs one ubatch bound in ``mem`` and returns float32 logits for every slot and the memory.

    ``pos`` is accepted for uniformity with positional models and is unused: Jamba's attention has
    no positional encoding, and visibility comes from ``mem.kv``'s mask. Padding slots
    (``valid`` False) change no memory state; their logits are meaningless.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxhybrid.models import DenseMemory, JambaConfig, forward
        >>> from jaxhybrid.models import init_dense_memory, init_jamba
        >>> cfg = JambaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
        ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...                   attn_layer_period=2, attn_layer_offset=1, num_experts=1,
        ...                   mamba_d_state=4)
        >>> model = init_jamba(cfg, seed=0)
        >>> mem = init_dense_memory(cfg, n_seq_max=2, n_ctx=8, n_ubatch=4)
        >>> # Two tokens of sequence 0, one of sequence 1, one padding slot.
        >>> tokens = jnp.array([3, 5, 7, 0])
        >>> seq_id, pos = jnp.array([0, 0, 1, -1]), jnp.array([0, 1, 0, 0])
        >>> mem = jax.jit(DenseMemory.bind)(mem, seq_id, pos)
        >>> logits, mem = jax.jit(forward)(model, tokens, mem.tok_pos, mem.valid, mem)
        >>> logits.shape
        (4, 16)
    """
    if tokens.ndim != 1 or tokens.shape != pos.shape or tokens.shape != valid.shape:
        raise jh.InvalidArgumentError(
            f"tokens, pos and valid must be 1-D of one length, got {tokens.shape}, {pos.shape}, "
            f"{valid.shape}"
        )
    del pos
    seq_set = jnp.where(valid, mem.seq_set, -1)
    x = model.embed_tokens[...][tokens]
    for layer in model.layers:
        x, mem = layer(x, valid, seq_set, mem)
    x = model.final_layernorm(x)
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head.kernel[...]
    logits = x @ head
    return logits.astype(jnp.float32), mem


def init_jamba(config: JambaConfig, seed: int = 0) -> Jamba:
    """A randomly initialised model (normal(0, ``initializer_range``) weights, unit norms and
    ``D``, ``A_log = log(1..d_state)``, zero biases), as transformers initialises Jamba."""
    return Jamba(config, seed=seed)
