"""Granite-4.0-H (IBM; transformers' ``granitemoehybrid``) in Flax NNX: Bamba-like Mamba-2 and
grouped-query attention layers, each followed by a top-k mixture of experts plus an always-on
shared MLP, with μP multipliers.

Modules hold parameters only; the inference memory goes through :func:`granite_hybrid_forward`
(the :class:`~jaxhybrid.models.ModelMemory` protocol). The attention, the Mamba-2 mixer and the
state plumbing are Bamba's (:mod:`jaxhybrid.models.bamba`).

The numbers match transformers' ``GraniteMoeHybridForCausalLM`` (5.24):

- the embedding output is multiplied by ``embedding_multiplier``; both residual branches of every
  layer by ``residual_multiplier`` (``x + f(norm(x)) * residual_multiplier``); the logits are
  divided by ``logits_scaling``;
- attention scores are scaled by ``attention_multiplier`` (not ``head_dim ** -0.5``); RoPE (NeoX
  layout, whole head) only when ``position_embedding_type == "rope"``, none for ``"nope"`` or
  null;
- the router takes the top ``num_experts_per_tok`` of its float32 logits and softmaxes those
  (top-k, then softmax: the chosen weights sum to 1); each expert is ``down(silu(g) * u)`` with
  ``g, u`` the two halves of one fused ``input_linear``; the shared MLP has the same form with
  ``shared_intermediate_size`` and is added to the experts' output. ``num_local_experts == 0``
  leaves the shared MLP alone.

Layer ``i`` is Mamba-2 or attention as ``layer_types[i]`` says (``"mamba"`` /
``"linear_attention"`` or ``"attention"`` / ``"full_attention"``; transformers' default is all
Mamba).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

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
from jaxhybrid.models._hybrid_adapter import FlaxHybridModel
from jaxhybrid.models._loader import Slot, checkpoint_dir, load_checkpoint
from jaxhybrid.models._mamba import Linear, ParamInit, RMSNorm
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models.bamba import (
    ATTENTION_RULES,
    HybridAttention,
    attention_slots,
    check_attention,
    check_forward_args,
    check_mamba2,
    check_real,
    config_kwargs,
    linear_slots,
    mamba2_memory_layout,
    mamba2_mixer,
    mixer_slots,
    rope_parameters,
    rope_theta,
    run_mixer,
    vector_slot,
)

__all__ = [
    "GraniteHybrid",
    "GraniteHybridConfig",
    "GraniteHybridLayer",
    "GraniteHybridModel",
    "GraniteMoE",
    "GraniteSharedMLP",
    "granite_hybrid_forward",
    "granite_hybrid_tensor_shapes",
    "init_granite_hybrid",
    "load_granite_hybrid",
]

_OWNER = "GraniteHybridConfig"
_INF = float("inf")
_COLUMN, _ROW = -1, -2

# transformers' layer type names (current and legacy) -> ours.
_LAYER_TYPES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}


@dataclasses.dataclass(frozen=True)
class GraniteHybridConfig:
    """Static Granite-4.0-H hyper-parameters (field names follow transformers'
    ``GraniteMoeHybridConfig``).

    Derived on construction: ``num_key_value_heads`` (``None`` -> ``num_attention_heads``),
    ``head_dim`` (``None`` -> ``hidden_size // num_attention_heads``), ``mamba_d_head``
    (``"auto"`` -> ``mamba_expand * hidden_size // mamba_n_heads``), ``layer_types`` (``None`` ->
    all Mamba; transformers' names mapped to ``"mamba"`` / ``"attention"``, as a tuple) and
    ``position_embedding_type`` (null -> ``"nope"``). ``rope_theta`` is read from transformers'
    ``rope_parameters`` by :meth:`from_hf`.

    Attributes:
        dtype: parameter and activation dtype, ``"float32"`` or ``"bfloat16"``. Norms, softmaxes
            and the SSD scan always run in float32.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_types: tuple[str, ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False
    position_embedding_type: str | None = None
    rope_theta: float = 10000.0
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    shared_intermediate_size: int = 1024
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, _INF)
    dtype: str = "float32"

    def __post_init__(self):
        check_int(_OWNER, "num_attention_heads", self.num_attention_heads, 1)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        check_attention(self, _OWNER)
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers"):
            check_int(_OWNER, name, getattr(self, name), 1)
        check_int(_OWNER, "shared_intermediate_size", self.shared_intermediate_size, 1)
        check_int(_OWNER, "num_local_experts", self.num_local_experts, 0)
        # A dense model (no experts; Granite-4.0-H-Micro's config says 0 of 0) routes nothing.
        least = 1 if self.num_local_experts > 0 else 0
        check_int(_OWNER, "num_experts_per_tok", self.num_experts_per_tok, least)
        if 0 < self.num_local_experts < self.num_experts_per_tok:
            raise jh.InvalidArgumentError(
                f"{_OWNER}: num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_local_experts ({self.num_local_experts})"
            )
        for name in ("mamba_n_heads", "mamba_expand"):
            check_int(_OWNER, name, getattr(self, name), 1)
        if isinstance(self.mamba_d_head, str) and self.mamba_d_head == "auto":
            object.__setattr__(
                self, "mamba_d_head", self.mamba_expand * self.hidden_size // self.mamba_n_heads
            )
        check_mamba2(self, _OWNER)
        for name in ("tie_word_embeddings", "attention_bias"):
            check_bool(_OWNER, name, getattr(self, name))
        check_number(_OWNER, "rms_norm_eps", self.rms_norm_eps, positive=True)
        check_number(_OWNER, "initializer_range", self.initializer_range, positive=False)
        check_number(_OWNER, "rope_theta", self.rope_theta, positive=True)
        for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier"):
            check_real(_OWNER, name, getattr(self, name))
        check_real(_OWNER, "logits_scaling", self.logits_scaling, nonzero=True)
        self._check_layer_types()
        pe = "nope" if self.position_embedding_type is None else self.position_embedding_type
        if pe not in ("rope", "nope"):
            raise jh.InvalidArgumentError(
                f"{_OWNER}.position_embedding_type must be 'rope', 'nope' or null, got {pe!r}"
            )
        object.__setattr__(self, "position_embedding_type", pe)
        if pe == "rope" and self.head_dim % 2:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.head_dim must be even for RoPE, got {self.head_dim}"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    def _check_layer_types(self) -> None:
        types = self.layer_types
        if types is None:
            types = ("mamba",) * self.num_hidden_layers
        if not isinstance(types, list | tuple):
            raise jh.InvalidTypeError(
                f"{_OWNER}.layer_types must be a list of layer types, got "
                f"{type(types).__name__} {types!r}"
            )
        if len(types) != self.num_hidden_layers:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.layer_types must name num_hidden_layers={self.num_hidden_layers} "
                f"layers, got {len(types)}"
            )
        out = []
        for i, t in enumerate(types):
            if not isinstance(t, str) or t not in _LAYER_TYPES:
                raise jh.InvalidArgumentError(
                    f"{_OWNER}.layer_types[{i}] must be one of {sorted(_LAYER_TYPES)}, got {t!r}"
                )
            out.append(_LAYER_TYPES[t])
        object.__setattr__(self, "layer_types", tuple(out))

    @classmethod
    def from_hf(
        cls, config: Mapping | str | os.PathLike, *, dtype: str = "float32"
    ) -> GraniteHybridConfig:
        """Reads a Hugging Face ``granitemoehybrid`` ``config.json`` (a dict, the file, or its
        directory).

        Keys absent from the file (or null) take transformers' defaults; the layer types come
        from ``layer_types`` or the older ``layers_block_type``. RoPE comes from
        ``rope_parameters`` (transformers 5) or the older ``rope_theta`` / ``rope_scaling`` keys
        and only the default RoPE type is supported; a ``partial_rotary_factor`` there is
        ignored, as transformers' Granite-4.0-H ignores it (it rotates whole heads). Every field
        is checked for its type and range; nothing is converted (a ``"false"`` string is not a
        bool, ``4.0`` is not an int).

        Raises:
            InvalidArgumentError: the file is missing, not a regular file, not JSON, not a JSON
                object; a field's value is out of range; ``hidden_act`` is not ``"silu"``; the
                RoPE is scaled (``rope_type`` other than ``"default"``).
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        name_of_dtype = dtype_name(dtype)
        config = read_config(config, "granitemoehybrid")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise jh.InvalidArgumentError(f"only hidden_act='silu' is supported, got {act!r}")
        kwargs = config_kwargs(cls, config, {"dtype", "rope_theta", "position_embedding_type"})
        if "layer_types" not in kwargs and config.get("layers_block_type") is not None:
            kwargs["layer_types"] = config["layers_block_type"]
        # null is a value here (no positional encoding), not "absent".
        kwargs["position_embedding_type"] = config.get("position_embedding_type")
        if kwargs["position_embedding_type"] == "rope":
            kwargs["rope_theta"] = rope_theta(config, rope_parameters(config, _OWNER))
        return cls(**kwargs, dtype=name_of_dtype)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def d_inner(self) -> int:
        """The mixer's inner width (``mamba_expand * hidden_size``)."""
        return self.mamba_expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        """Channels of the mixer's causal conv (``x``, ``B`` and ``C``)."""
        return self.d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_dim(self) -> int:
        """Output width of the mixer's ``in_proj`` (``z``, ``xBC``, ``dt``)."""
        return self.d_inner + self.conv_dim + self.mamba_n_heads

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


class GraniteSharedMLP(nnx.Module):
    """``output_linear(silu(g) * u)`` with ``[g, u] = input_linear(x)`` (one fused kernel
    ``[hidden, 2 * shared_intermediate_size]``, gate half first)."""

    def __init__(self, config: GraniteHybridConfig, init: ParamInit):
        h, s = config.hidden_size, config.shared_intermediate_size
        self.input_linear = Linear(h, 2 * s, init)
        self.output_linear = Linear(s, h, init)
        self.size = s

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        gu = self.input_linear(x)
        return self.output_linear(jax.nn.silu(gu[:, : self.size]) * gu[:, self.size :])


class GraniteMoE(nnx.Module):
    """Top-k mixture of SiLU-gated experts.

    The router keeps the top ``num_experts_per_tok`` of its float32 logits and softmaxes them
    (transformers' ``GraniteMoeHybridTopKRouter``). Every expert runs on every token (weighted by
    zero where not chosen): exact and simple, meant for small models.

    Parameters (transformers' checkpoint layout transposed to ``[in, out]``): ``router``
    ``[hidden, experts]``, ``input_linear`` ``[experts, hidden, 2 * ff]`` (gate half first),
    ``output_linear`` ``[experts, ff, hidden]``.
    """

    def __init__(self, config: GraniteHybridConfig, init: ParamInit):
        e, h, f = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.router = init.normal(h, e)
        self.input_linear = init.normal(e, h, 2 * f)
        self.output_linear = init.normal(e, f, h)
        self.top_k, self.size = config.num_experts_per_tok, f

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        logits = (x @ self.router[...]).astype(jnp.float32)
        top_logits, top_i = jax.lax.top_k(logits, self.top_k)
        top_w = jax.nn.softmax(top_logits, axis=-1).astype(x.dtype)
        n_experts = logits.shape[-1]
        weights = jnp.sum(
            jax.nn.one_hot(top_i, n_experts, dtype=x.dtype) * top_w[:, :, None], axis=1
        )
        gu = jnp.einsum("th,ehf->tef", x, self.input_linear[...])
        y = jax.nn.silu(gu[..., : self.size]) * gu[..., self.size :]
        out = jnp.einsum("tef,efh->teh", y, self.output_linear[...])
        return jnp.einsum("teh,te->th", out, weights)


class GraniteHybridLayer(nnx.Module):
    """Pre-norm residual block with μP residual scaling: (attention | Mamba-2), then the experts
    plus the shared MLP."""

    def __init__(self, config: GraniteHybridConfig, layer: int, init: ParamInit):
        c, eps = config, config.rms_norm_eps
        self.kind = c.layer_types[layer]
        if self.kind == "attention":
            self.self_attn = HybridAttention(
                c.hidden_size,
                init,
                n_heads=c.num_attention_heads,
                n_kv_heads=c.num_key_value_heads,
                head_dim=c.head_dim,
                bias=c.attention_bias,
                scale=c.attention_multiplier,
                rope_theta=c.rope_theta if c.position_embedding_type == "rope" else None,
            )
            self.index = c.attention_layers.index(layer)
        else:
            self.mamba = mamba2_mixer(c, init)
            self.index = c.mamba_layers.index(layer)
        self.block_sparse_moe = GraniteMoE(c, init) if c.num_local_experts > 0 else None
        self.shared_mlp = GraniteSharedMLP(c, init)
        self.input_layernorm = RMSNorm(c.hidden_size, eps, init)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps, init)
        self.residual_multiplier = c.residual_multiplier

    def __call__(self, x, pos, valid, seq_set, mem: ModelMemory):
        h = self.input_layernorm(x)
        if self.kind == "attention":
            h, mem = self.self_attn(h, pos, valid, mem, self.index)
        else:
            h, mem = run_mixer(self.mamba, h, seq_set, mem, self.index)
        x = x + h * self.residual_multiplier
        h = self.post_attention_layernorm(x)
        ff = self.shared_mlp(h)
        if self.block_sparse_moe is not None:
            ff = self.block_sparse_moe(h) + ff
        return x + ff * self.residual_multiplier, mem


class GraniteHybrid(nnx.Module):
    """The Granite-4.0-H causal LM: embedding, layers, final RMSNorm (``norm``), (tied or untied)
    LM head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_granite_hybrid`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: GraniteHybridConfig, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [GraniteHybridLayer(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, init)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, init)


def granite_hybrid_forward(
    model: GraniteHybrid,
    tokens: Int[Array, " ubatch"],
    pos: Int[Array, " ubatch"],
    valid: Bool[Array, " ubatch"],
    mem: ModelMemory,
) -> tuple[Float[Array, "ubatch vocab"], ModelMemory]:
    """Runs one ubatch bound in ``mem`` and returns float32 logits for every slot and the memory.

    ``pos`` holds the tokens' positions (RoPE; unused with ``position_embedding_type="nope"``).
    Padding slots (``valid`` False) change no memory state; their logits are meaningless.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxhybrid as jh
        >>> from jaxhybrid.models.granite_hybrid import (GraniteHybridConfig,
        ...     GraniteHybridModel, init_granite_hybrid)
        >>> from jaxhybrid.serving import prefill
        >>> cfg = GraniteHybridConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
        ...     shared_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...     num_key_value_heads=1, layer_types=["mamba", "attention"], num_local_experts=2,
        ...     num_experts_per_tok=1, mamba_n_heads=2, mamba_d_state=4, mamba_chunk_size=4)
        >>> plugin, params = GraniteHybridModel(cfg), init_granite_hybrid(cfg, seed=0)
        >>> mcfg = plugin.memory_config(kv_size=16, n_seq_max=1)
        >>> # jax.eval_shape traces the call without compiling it; call prefill to run it.
        >>> logits, mem, code = jax.eval_shape(lambda p, m: prefill(plugin, p, m,
        ...     jnp.array([[3, 5, 7]]), jnp.array([3]), jnp.array([0]), cfg=mcfg, n_ubatch=4),
        ...     params, jh.init_hybrid(mcfg))
        >>> logits.shape, logits.dtype
        ((1, 16), dtype('float32'))
    """
    check_forward_args(tokens, pos, valid)
    c = model.config
    seq_set = jnp.where(valid, mem.seq_set, -1)
    x = model.embed_tokens[...][tokens] * c.embedding_multiplier
    for layer in model.layers:
        x, mem = layer(x, pos, valid, seq_set, mem)
    x = model.norm(x)
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head.kernel[...]
    return (x @ head).astype(jnp.float32) / c.logits_scaling, mem


def init_granite_hybrid(config: GraniteHybridConfig, seed: int | None = 0) -> GraniteHybrid:
    """A randomly initialised model: normal(0, ``initializer_range``) weights (experts and router
    included), unit norms, ``D`` and ``dt_bias``, ``A_log = log(1..mamba_n_heads)``, zero
    biases, as transformers initialises Granite-4.0-H. ``seed=None`` gives abstract parameters
    (``jax.ShapeDtypeStruct``) for a loader."""
    return GraniteHybrid(config, seed=seed)


# --------------------------------------------------------------------------------------------
# Plug-in


@dataclasses.dataclass(frozen=True)
class GraniteHybridModel(FlaxHybridModel):
    """Granite-4.0-H as a :class:`jaxhybrid.HybridModel` plug-in for :mod:`jaxhybrid.serving`.

    Attention layers are :attr:`jaxhybrid.LayerKind.ATTENTION`, Mamba-2 layers
    :attr:`jaxhybrid.LayerKind.RECURRENT` (``r_shape = (d_conv - 1, conv_dim)``,
    ``s_shape = (n_heads, d_head, d_state)``). The K-shift RoPE is the whole-head NeoX RoPE, or
    None without positional encoding. Tensor parallelism splits attention heads, the embedding,
    the LM head and the experts (expert-parallel: each device runs its experts, then one
    all-reduce); the shared MLP (whose fused gate/up kernel does not split into matching halves)
    and the Mamba-2 mixer stay replicated. Hashable by value.

    Attributes:
        config: the model config.
        graphdef: the model's ``nnx.split`` graph definition when ``params`` is its state; None
            when ``params`` is the :class:`GraniteHybrid` module itself.
        used_span: attend over the used cells only (see
            :func:`jaxhybrid.models.hybrid_step_fn`).
        min_span: the smallest attention span.

    Examples:
        >>> from jaxhybrid.models.granite_hybrid import GraniteHybridConfig, GraniteHybridModel
        >>> model = GraniteHybridModel(GraniteHybridConfig(vocab_size=16, hidden_size=8,
        ...     intermediate_size=8, shared_intermediate_size=8, num_hidden_layers=3,
        ...     num_attention_heads=2, layer_types=["mamba", "attention", "mamba"],
        ...     mamba_n_heads=2, mamba_d_state=4))
        >>> cfg = model.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers, model.n_vocab, model.rope_fn
        ((1,), (0, 2), 16, None)
    """

    forward_fn = staticmethod(granite_hybrid_forward)
    sharding_rules: ClassVar[dict[tuple[str, ...], int]] = {
        **ATTENTION_RULES,
        ("block_sparse_moe", "input_linear"): 0,
        ("block_sparse_moe", "output_linear"): 0,
    }

    @property
    def rope_fn(self):
        c = self.config
        if c.position_embedding_type != "rope":
            return None
        return jh.kv.rope_shift_fn(theta=c.rope_theta, neox=True)

    def memory_layout(self) -> dict[str, Any]:
        return mamba2_memory_layout(self.config)


# --------------------------------------------------------------------------------------------
# Loader


def _slots(config: GraniteHybridConfig):
    """``(tensor name, Slot)`` of every tensor of a transformers checkpoint, in model order.

    The experts are stored as transformers writes them (and as IBM publishes them): fused
    ``block_sparse_moe.input_linear.weight [experts, 2 * ff, hidden]``,
    ``output_linear.weight [experts, hidden, ff]`` and ``router.layer.weight [experts, hidden]``.
    """
    c = config
    h, f, s, e = c.hidden_size, c.intermediate_size, c.shared_intermediate_size, c.num_local_experts
    yield "model.embed_tokens.weight", Slot(("embed_tokens",), (c.vocab_size, h), "copy")
    for i, kind in enumerate(c.layer_types):
        p, path = f"model.layers.{i}", ("layers", i)
        yield from vector_slot(
            f"{p}.input_layernorm.weight", (*path, "input_layernorm", "weight"), h
        )
        yield from vector_slot(
            f"{p}.post_attention_layernorm.weight",
            (*path, "post_attention_layernorm", "weight"),
            h,
        )
        if kind == "attention":
            yield from attention_slots(c, f"{p}.self_attn", (*path, "self_attn"))
        else:
            yield from mixer_slots(c, f"{p}.mamba", (*path, "mamba"))
        if e > 0:
            m, mp = f"{p}.block_sparse_moe", (*path, "block_sparse_moe")
            yield f"{m}.router.layer.weight", Slot((*mp, "router"), (e, h), "t")
            yield f"{m}.input_linear.weight", Slot((*mp, "input_linear"), (e, 2 * f, h), "t")
            yield f"{m}.output_linear.weight", Slot((*mp, "output_linear"), (e, h, f), "t")
        sm, sp = f"{p}.shared_mlp", (*path, "shared_mlp")
        yield from linear_slots(f"{sm}.input_linear", (*sp, "input_linear"), 2 * s, h, False)
        yield from linear_slots(f"{sm}.output_linear", (*sp, "output_linear"), h, s, False)
    yield from vector_slot("model.norm.weight", ("norm", "weight"), h)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", Slot(("lm_head", "kernel"), (c.vocab_size, h), "t")


def granite_hybrid_tensor_shapes(config: GraniteHybridConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config)}


def load_granite_hybrid(
    path: str | os.PathLike, dtype: str = "float32"
) -> tuple[GraniteHybridConfig, GraniteHybrid]:
    """Loads a Hugging Face Granite-4.0-H (``granitemoehybrid``) checkpoint directory.

    A tied checkpoint's ``lm_head.weight`` is ignored (the LM head is the embedding).

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`GraniteHybridConfig.from_hf`).
        InvalidArgumentError: a file is missing, unreadable or not a regular file; the config
            is invalid or unsupported, or describes more parameters than the files can hold; the
            checkpoint lacks a tensor, holds one the model does not have, or holds one of the
            wrong shape or of a non-float dtype (the message names every such tensor with its
            expected shape); or a tensor holds NaN or infinity.
    """
    path = checkpoint_dir(path)
    config = GraniteHybridConfig.from_hf(path, dtype=dtype)
    model = load_checkpoint(
        path,
        lambda: GraniteHybrid(config, seed=None),
        lambda: _slots(config),
        dtype=config.jnp_dtype,
        ignored={"lm_head.weight"} if config.tie_word_embeddings else (),
    )
    return config, model
