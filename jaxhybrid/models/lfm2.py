"""LFM2 (Liquid AI) in Flax NNX: short gated-convolution blocks with a few grouped-query attention
layers, every layer followed by a dense SwiGLU feed-forward.

Modules hold parameters only; the inference memory goes through :func:`lfm2_forward` (the
:class:`~jaxhybrid.models.ModelMemory` protocol). Layer ``i`` is ``"full_attention"`` or
``"conv"`` (``Lfm2Config.layer_types``); ``attn_layer`` / ``conv_layer`` count those layers in
model order.

The numbers match transformers' ``Lfm2ForCausalLM`` (5.24):

- every layer is ``x + op(operator_norm(x))`` then ``x + feed_forward(ffn_norm(x))``, and the
  last hidden state goes through ``embedding_norm`` (the final norm, despite its name);
- attention: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` without bias, a per-head RMSNorm
  on queries and keys (``q_layernorm`` / ``k_layernorm``) before RoPE, NeoX-layout RoPE over the
  whole head, scores scaled by ``head_dim ** -0.5``;
- short conv: ``in_proj`` gives ``(B, C, x)`` thirds, ``y = C * conv(B * x)`` with a depthwise
  causal conv of width ``conv_L_cache`` and no activation, then ``out_proj`` (``conv_bias`` puts a
  bias on the conv and on both projections);
- the feed-forward is ``w2(silu(w1 x) * w3 x)`` of width :attr:`Lfm2Config.ff_dim`.

In the hybrid memory a conv block is a recurrent layer whose whole state is the conv window: ``r``
holds the last ``conv_L_cache - 1`` values of ``B * x`` and ``s`` is empty (``s_shape = (0,)``).
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
from jaxhybrid.models._hybrid_adapter import FlaxHybridModel
from jaxhybrid.models._loader import Slot, checkpoint_dir, load_checkpoint
from jaxhybrid.models._mamba import Linear, ParamInit, RMSNorm, causal_conv, set_spans
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models.bamba import (
    check_attention,
    check_forward_args,
    config_kwargs,
    linear_slots,
    rope_parameters,
    rope_theta,
    vector_slot,
)

__all__ = [
    "Lfm2",
    "Lfm2Attention",
    "Lfm2Config",
    "Lfm2Layer",
    "Lfm2MLP",
    "Lfm2Model",
    "Lfm2ShortConv",
    "init_lfm2",
    "lfm2_forward",
    "lfm2_tensor_shapes",
    "load_lfm2",
]

_OWNER = "Lfm2Config"
_COLUMN, _ROW = -1, -2
_LAYER_TYPES = ("conv", "full_attention")
_DEFAULT_THETA = 1000000.0  # transformers' Lfm2Config.default_theta


# --------------------------------------------------------------------------------------------
# Config


def _check_layer_types(value, n_layers: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise jh.InvalidTypeError(
            f"{_OWNER}.layer_types must be a list of layer types, got {type(value).__name__} "
            f"{value!r}"
        )
    if len(value) != n_layers:
        raise jh.InvalidArgumentError(
            f"{_OWNER}.layer_types must name num_hidden_layers={n_layers} layers, got {len(value)}"
        )
    for i, t in enumerate(value):
        if not isinstance(t, str):
            raise jh.InvalidTypeError(f"{_OWNER}.layer_types[{i}] must be a str, got {t!r}")
        if t not in _LAYER_TYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.layer_types[{i}] must be one of {list(_LAYER_TYPES)}, got {t!r}"
            )
    return tuple(value)


def _check_full_attn_idxs(value, n_layers: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise jh.InvalidTypeError(
            f"{_OWNER}.full_attn_idxs must be a list of layer indices, got "
            f"{type(value).__name__} {value!r}"
        )
    for i, v in enumerate(value):
        check_int(_OWNER, f"full_attn_idxs[{i}]", v, 0)
        if v >= n_layers:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.full_attn_idxs[{i}] = {v} is not a layer of a model of "
                f"num_hidden_layers={n_layers}"
            )
    return tuple("full_attention" if i in value else "conv" for i in range(n_layers))


@dataclasses.dataclass(frozen=True)
class Lfm2Config:
    """Static LFM2 hyper-parameters (field names follow transformers' ``Lfm2Config``).

    Layer ``i`` is ``layer_types[i]``: ``"full_attention"`` or ``"conv"``. Without
    ``layer_types``, the layers listed in ``full_attn_idxs`` are attention and the others conv;
    without either, every layer is attention (transformers' default). When ``layer_types`` is
    given, ``full_attn_idxs`` is ignored, as transformers ignores it. After construction both
    are tuples that agree, and ``head_dim`` (``None`` -> ``hidden_size // num_attention_heads``)
    is resolved. The feed-forward width is :attr:`ff_dim`, derived from ``intermediate_size`` by
    the ``block_*`` rule.

    Attributes:
        dtype: parameter and activation dtype, ``"float32"`` or ``"bfloat16"``. Norms and
            softmaxes always run in float32.
    """

    vocab_size: int = 65536
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    layer_types: tuple[str, ...] | None = None
    full_attn_idxs: tuple[int, ...] | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    rope_theta: float = _DEFAULT_THETA
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    block_auto_adjust_ff_dim: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        check_attention(self, _OWNER)
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers", "block_multiple_of"):
            check_int(_OWNER, name, getattr(self, name), 1)
        # A width-1 conv would keep no state; no LFM2 checkpoint has one.
        check_int(_OWNER, "conv_L_cache", self.conv_L_cache, 2)
        for name in ("tie_word_embeddings", "conv_bias", "block_auto_adjust_ff_dim"):
            check_bool(_OWNER, name, getattr(self, name))
        check_number(_OWNER, "norm_eps", self.norm_eps, positive=True)
        check_number(_OWNER, "initializer_range", self.initializer_range, positive=False)
        check_number(_OWNER, "rope_theta", self.rope_theta, positive=True)
        if self.block_ffn_dim_multiplier is not None:
            check_number(
                _OWNER, "block_ffn_dim_multiplier", self.block_ffn_dim_multiplier, positive=True
            )
        n = self.num_hidden_layers
        if self.layer_types is not None:
            types = _check_layer_types(self.layer_types, n)
        elif self.full_attn_idxs is not None:
            types = _check_full_attn_idxs(self.full_attn_idxs, n)
        else:
            types = ("full_attention",) * n
        object.__setattr__(self, "layer_types", types)
        object.__setattr__(
            self,
            "full_attn_idxs",
            tuple(i for i, t in enumerate(types) if t == "full_attention"),
        )
        if self.ff_dim < 1:
            raise jh.InvalidArgumentError(
                f"{_OWNER}: the feed-forward width derived from intermediate_size "
                f"({self.intermediate_size}) and block_ffn_dim_multiplier "
                f"({self.block_ffn_dim_multiplier}) is {self.ff_dim}, it must be >= 1"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @classmethod
    def from_hf(cls, config: Mapping | str | os.PathLike, *, dtype: str = "float32") -> Lfm2Config:
        """Reads a Hugging Face LFM2 ``config.json`` (a dict, the file, or its directory).

        Keys absent from the file (or null) take transformers' defaults, but a null
        ``block_ffn_dim_multiplier`` turns the multiplier and the rounding off (transformers'
        ``Lfm2MLP`` reads it so; its 5.x config class refuses the null). The legacy keys
        ``tie_embedding`` and ``block_ff_dim`` win over ``tie_word_embeddings`` and
        ``intermediate_size``, as in transformers. RoPE comes from ``rope_parameters``
        (transformers 5) or the older top-level ``rope_theta`` / ``rope_scaling``; the base
        defaults to LFM2's 1e6. Keys transformers does not read (``block_dim``, ``conv_dim``,
        ...) are ignored. Every field is checked for its type and range; nothing is converted
        (a ``"false"`` string is not a bool, ``4.0`` is not an int).

        Raises:
            InvalidArgumentError: the file is missing, not a regular file, not JSON, not a JSON
                object, or of another ``model_type``; a field's value is out of range; the RoPE
                is scaled (``rope_type`` other than ``"default"``).
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        name_of_dtype = dtype_name(dtype)
        config = read_config(config, "lfm2")
        kwargs = config_kwargs(cls, config, {"dtype", "rope_theta"})
        if config.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config.get("num_attention_heads", 32)
        if config.get("tie_embedding") is not None:
            kwargs["tie_word_embeddings"] = config["tie_embedding"]
        if config.get("block_ff_dim") is not None:
            kwargs["intermediate_size"] = config["block_ff_dim"]
        # An explicit null multiplier turns the multiplier and the rounding off.
        if "block_ffn_dim_multiplier" in config:
            kwargs["block_ffn_dim_multiplier"] = config["block_ffn_dim_multiplier"]
        params = rope_parameters(config, _OWNER)
        given = params.get("rope_theta") is not None or config.get("rope_theta") is not None
        kwargs["rope_theta"] = rope_theta(config, params) if given else _DEFAULT_THETA
        return cls(**kwargs, dtype=name_of_dtype)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def ff_dim(self) -> int:
        """The feed-forward width: with ``block_auto_adjust_ff_dim``, ``int(2 * intermediate_size
        / 3)``, times ``block_ffn_dim_multiplier`` (truncated) and rounded up to a multiple of
        ``block_multiple_of`` unless the multiplier is None; else ``intermediate_size``."""
        ff = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            ff = int(2 * ff / 3)
            if self.block_ffn_dim_multiplier is not None:
                ff = int(self.block_ffn_dim_multiplier * ff)
                m = self.block_multiple_of
                ff = m * ((ff + m - 1) // m)
        return ff

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Model layer index of every attention layer (position = ``attn_layer`` index)."""
        return self.full_attn_idxs

    @property
    def conv_layers(self) -> tuple[int, ...]:
        """Model layer index of every conv layer (position = ``conv_layer`` index)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "conv")


# --------------------------------------------------------------------------------------------
# Modules


class Lfm2MLP(nnx.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases."""

    def __init__(self, config: Lfm2Config, init: ParamInit):
        h, f = config.hidden_size, config.ff_dim
        self.w1 = Linear(h, f, init)
        self.w3 = Linear(h, f, init)
        self.w2 = Linear(f, h, init)

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Lfm2Attention(nnx.Module):
    """Grouped-query attention with per-head RMSNorms on queries and keys before a full
    NeoX-layout RoPE; K/V live in the memory."""

    def __init__(self, config: Lfm2Config, init: ParamInit):
        c = config
        h, hd = c.hidden_size, c.head_dim
        nh, nkv = c.num_attention_heads, c.num_key_value_heads
        self.q_proj = Linear(h, nh * hd, init)
        self.k_proj = Linear(h, nkv * hd, init)
        self.v_proj = Linear(h, nkv * hd, init)
        self.out_proj = Linear(nh * hd, h, init)
        self.q_layernorm = RMSNorm(hd, c.norm_eps, init)
        self.k_layernorm = RMSNorm(hd, c.norm_eps, init)
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.theta = float(c.rope_theta)

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        pos: Int[Array, " ubatch"],
        valid: Bool[Array, " ubatch"],
        mem: ModelMemory,
        attn_layer: int,
    ) -> tuple[Float[Array, "ubatch hidden"], ModelMemory]:
        """Attends every token slot to the cells ``mem`` lets it see (its own K/V included)."""
        n_tok = x.shape[0]
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_layernorm(self.q_proj(x).reshape(n_tok, nh, hd))
        k = self.k_layernorm(self.k_proj(x).reshape(n_tok, nkv, hd))
        v = self.v_proj(x).reshape(n_tok, nkv, hd)
        # The K-shift (Lfm2Model.rope_fn) rotates cached keys further: the norm comes before the
        # rotation, so a shifted key equals one computed at its new position.
        q = rope(q, pos, theta=self.theta, neox=True)
        k = rope(k, pos, theta=self.theta, neox=True)
        out, mem = attend(q, k, v, valid, mem, attn_layer, hd**-0.5)
        return self.out_proj(out), mem


class Lfm2ShortConv(nnx.Module):
    """The gated short convolution: ``out_proj(C * conv(B * x))`` with ``(B, C, x)`` the thirds
    of ``in_proj``, a depthwise causal conv of width ``conv_L_cache`` and no activation.

    Parameters follow transformers' names; kernels are ``[in, out]`` and the conv weight is
    ``[conv_L_cache, hidden]``.
    """

    def __init__(self, config: Lfm2Config, init: ParamInit):
        h, bias = config.hidden_size, config.conv_bias
        self.in_proj = Linear(h, 3 * h, init, bias=bias)
        self.conv_weight = init.normal(config.conv_L_cache, h)
        self.conv_bias = init.constant(0.0, h) if bias else None
        self.out_proj = Linear(h, h, init, bias=bias)
        self.hidden_size = h

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        seq_set: Int[Array, " ubatch"],
        conv0: Float[Array, "sets d_conv1 hidden"],
    ) -> tuple[
        Float[Array, "ubatch hidden"],
        Float[Array, "sets d_conv1 hidden"],
        Float[Array, "ubatch d_conv1 hidden"],
    ]:
        """Mixes the ubatch and returns ``(out, conv, conv_tok)``: every set's final conv state
        and the state after every token slot (what rollback snapshots keep)."""
        spans = set_spans(seq_set, conv0.shape[0])
        h = self.hidden_size
        bcx = self.in_proj(x)
        b, c, xs = bcx[:, :h], bcx[:, h : 2 * h], bcx[:, 2 * h :]
        bias = None if self.conv_bias is None else self.conv_bias[...]
        y, conv, conv_tok = causal_conv(
            b * xs, conv0.astype(x.dtype), self.conv_weight[...], bias, spans
        )
        return self.out_proj(c * y), conv, conv_tok


def run_short_conv(
    block: Lfm2ShortConv,
    x: Float[Array, "ubatch hidden"],
    seq_set: Int[Array, " ubatch"],
    mem: ModelMemory,
    conv_layer: int,
) -> tuple[Float[Array, "ubatch hidden"], ModelMemory]:
    """Runs ``block`` from the conv state ``mem`` holds for ``conv_layer`` and stores the new one
    (and every token's, for rollback snapshots). The layer's ``s`` state is empty (``[sets, 0]``)
    and goes back as it came, with an empty per-token state."""
    conv0, ssm0 = mem.ssm_states(conv_layer)
    out, conv, conv_tok = block(x, seq_set, conv0)
    mem = mem.set_ssm_states(
        conv_layer,
        conv.astype(conv0.dtype),
        ssm0,
        conv_tok=conv_tok.astype(conv0.dtype),
        ssm_tok=jnp.zeros((x.shape[0], *ssm0.shape[1:]), ssm0.dtype),
    )
    return out, mem


class Lfm2Layer(nnx.Module):
    """Pre-norm residual block: (attention | short conv) then the feed-forward."""

    def __init__(self, config: Lfm2Config, layer: int, init: ParamInit):
        c = config
        self.kind = c.layer_types[layer]
        if self.kind == "full_attention":
            self.self_attn = Lfm2Attention(c, init)
            self.index = c.attention_layers.index(layer)
        else:
            self.conv = Lfm2ShortConv(c, init)
            self.index = c.conv_layers.index(layer)
        self.feed_forward = Lfm2MLP(c, init)
        self.operator_norm = RMSNorm(c.hidden_size, c.norm_eps, init)
        self.ffn_norm = RMSNorm(c.hidden_size, c.norm_eps, init)

    def __call__(self, x, pos, valid, seq_set, mem: ModelMemory):
        h = self.operator_norm(x)
        if self.kind == "full_attention":
            h, mem = self.self_attn(h, pos, valid, mem, self.index)
        else:
            h, mem = run_short_conv(self.conv, h, seq_set, mem, self.index)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), mem


class Lfm2(nnx.Module):
    """The LFM2 causal LM: embedding, layers, ``embedding_norm`` (the final RMSNorm), (tied or
    untied) LM head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_lfm2`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: Lfm2Config, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [Lfm2Layer(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.embedding_norm = RMSNorm(config.hidden_size, config.norm_eps, init)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, init)


def lfm2_forward(
    model: Lfm2,
    tokens: Int[Array, " ubatch"],
    pos: Int[Array, " ubatch"],
    valid: Bool[Array, " ubatch"],
    mem: ModelMemory,
) -> tuple[Float[Array, "ubatch vocab"], ModelMemory]:
    """Runs one ubatch bound in ``mem`` and returns float32 logits for every slot and the memory.

    ``pos`` holds the tokens' positions (RoPE). Padding slots (``valid`` False) change no memory
    state; their logits are meaningless.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxhybrid as jh
        >>> from jaxhybrid.models.lfm2 import Lfm2Config, Lfm2Model, init_lfm2
        >>> from jaxhybrid.serving import prefill
        >>> cfg = Lfm2Config(vocab_size=16, hidden_size=8, intermediate_size=12,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...     layer_types=["conv", "full_attention"], block_multiple_of=4)
        >>> plugin, params = Lfm2Model(cfg), init_lfm2(cfg, seed=0)
        >>> mcfg = plugin.memory_config(kv_size=16, n_seq_max=1)
        >>> # jax.eval_shape traces the call without compiling it; call prefill to run it.
        >>> logits, mem, code = jax.eval_shape(lambda p, m: prefill(plugin, p, m,
        ...     jnp.array([[3, 5, 7]]), jnp.array([3]), jnp.array([0]), cfg=mcfg, n_ubatch=4),
        ...     params, jh.init_hybrid(mcfg))
        >>> logits.shape, logits.dtype
        ((1, 16), dtype('float32'))
    """
    check_forward_args(tokens, pos, valid)
    seq_set = jnp.where(valid, mem.seq_set, -1)
    x = model.embed_tokens[...][tokens]
    for layer in model.layers:
        x, mem = layer(x, pos, valid, seq_set, mem)
    x = model.embedding_norm(x)
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head.kernel[...]
    return (x @ head).astype(jnp.float32), mem


def init_lfm2(config: Lfm2Config, seed: int | None = 0) -> Lfm2:
    """A randomly initialised model: normal(0, ``initializer_range``) weights (conv weights
    included), unit norms, zero biases. ``seed=None`` gives abstract parameters
    (``jax.ShapeDtypeStruct``) for a loader."""
    return Lfm2(config, seed=seed)


# --------------------------------------------------------------------------------------------
# Plug-in


@dataclasses.dataclass(frozen=True)
class Lfm2Model(FlaxHybridModel):
    """LFM2 as a :class:`jaxhybrid.HybridModel` plug-in for :mod:`jaxhybrid.serving`.

    Attention layers are :attr:`jaxhybrid.LayerKind.ATTENTION` (``num_key_value_heads`` heads of
    ``head_dim``); conv layers are :attr:`jaxhybrid.LayerKind.RECURRENT` with the conv window as
    their whole state: ``r_shape = (conv_L_cache - 1, hidden_size)`` and an empty
    ``s_shape = (0,)``. The K-shift RoPE rotates the whole head (NeoX layout). Hashable by value.

    Tensor parallelism (:attr:`sharding_rules`) splits the attention heads, the feed-forward
    width, the embedding's vocabulary and the LM head over the model axis; the conv blocks stay
    replicated (their ``in_proj`` output is three ``hidden_size`` thirds that a column split
    would cut across).

    Attributes:
        config: the model config.
        graphdef: the model's ``nnx.split`` graph definition when ``params`` is its state; None
            when ``params`` is the :class:`Lfm2` module itself.
        used_span: attend over the used cells only (see
            :func:`jaxhybrid.models.hybrid_step_fn`).
        min_span: the smallest attention span.

    Examples:
        >>> from jaxhybrid.models.lfm2 import Lfm2Config, Lfm2Model
        >>> model = Lfm2Model(Lfm2Config(vocab_size=16, hidden_size=8, intermediate_size=12,
        ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        ...     full_attn_idxs=[1], block_multiple_of=4))
        >>> cfg = model.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers, cfg.recurrent.r_shape, cfg.recurrent.s_shape
        ((1,), (0, 2), (2, 8), (0,))
    """

    forward_fn = staticmethod(lfm2_forward)
    sharding_rules: ClassVar[dict[tuple[str, ...], int]] = {
        ("embed_tokens",): 0,
        ("lm_head", "kernel"): _COLUMN,
        ("self_attn", "q_proj", "kernel"): _COLUMN,
        ("self_attn", "k_proj", "kernel"): _COLUMN,
        ("self_attn", "v_proj", "kernel"): _COLUMN,
        ("self_attn", "out_proj", "kernel"): _ROW,
        ("feed_forward", "w1", "kernel"): _COLUMN,
        ("feed_forward", "w3", "kernel"): _COLUMN,
        ("feed_forward", "w2", "kernel"): _ROW,
    }

    @property
    def rope_fn(self):
        return jh.kv.rope_shift_fn(theta=self.config.rope_theta, neox=True)

    def memory_layout(self) -> dict[str, Any]:
        c = self.config
        return dict(
            layer_kinds=[
                jh.LayerKind.ATTENTION if t == "full_attention" else jh.LayerKind.RECURRENT
                for t in c.layer_types
            ],
            n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            r_shape=(c.conv_L_cache - 1, c.hidden_size),
            s_shape=(0,),
            dtype=c.jnp_dtype,
        )


# --------------------------------------------------------------------------------------------
# Loader


def _slots(config: Lfm2Config):
    """``(tensor name, Slot)`` of every tensor of a transformers checkpoint, in model order."""
    c = config
    h, f, hd = c.hidden_size, c.ff_dim, c.head_dim
    nh, nkv, b = c.num_attention_heads, c.num_key_value_heads, c.conv_bias
    yield "model.embed_tokens.weight", Slot(("embed_tokens",), (c.vocab_size, h), "copy")
    for i, kind in enumerate(c.layer_types):
        p, path = f"model.layers.{i}", ("layers", i)
        for norm in ("operator_norm", "ffn_norm"):
            yield from vector_slot(f"{p}.{norm}.weight", (*path, norm, "weight"), h)
        if kind == "full_attention":
            a, ap = f"{p}.self_attn", (*path, "self_attn")
            yield from linear_slots(f"{a}.q_proj", (*ap, "q_proj"), nh * hd, h, False)
            yield from linear_slots(f"{a}.k_proj", (*ap, "k_proj"), nkv * hd, h, False)
            yield from linear_slots(f"{a}.v_proj", (*ap, "v_proj"), nkv * hd, h, False)
            yield from linear_slots(f"{a}.out_proj", (*ap, "out_proj"), h, nh * hd, False)
            for norm in ("q_layernorm", "k_layernorm"):
                yield from vector_slot(f"{a}.{norm}.weight", (*ap, norm, "weight"), hd)
        else:
            m, mp = f"{p}.conv", (*path, "conv")
            yield from linear_slots(f"{m}.in_proj", (*mp, "in_proj"), 3 * h, h, b)
            yield f"{m}.conv.weight", Slot((*mp, "conv_weight"), (h, 1, c.conv_L_cache), "conv")
            if b:
                yield from vector_slot(f"{m}.conv.bias", (*mp, "conv_bias"), h)
            yield from linear_slots(f"{m}.out_proj", (*mp, "out_proj"), h, h, b)
        ff, fp = f"{p}.feed_forward", (*path, "feed_forward")
        yield from linear_slots(f"{ff}.w1", (*fp, "w1"), f, h, False)
        yield from linear_slots(f"{ff}.w3", (*fp, "w3"), f, h, False)
        yield from linear_slots(f"{ff}.w2", (*fp, "w2"), h, f, False)
    yield from vector_slot("model.embedding_norm.weight", ("embedding_norm", "weight"), h)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", Slot(("lm_head", "kernel"), (c.vocab_size, h), "t")


def lfm2_tensor_shapes(config: Lfm2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config)}


def load_lfm2(path: str | os.PathLike, dtype: str = "float32") -> tuple[Lfm2Config, Lfm2]:
    """Loads a Hugging Face LFM2 checkpoint directory.

    A tied checkpoint's ``lm_head.weight`` is ignored (the LM head is the embedding).

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`Lfm2Config.from_hf`).
        InvalidArgumentError: a file is missing, unreadable or not a regular file; the config
            is invalid or unsupported, or describes more parameters than the files can hold; the
            checkpoint lacks a tensor, holds one the model does not have, or holds one of the
            wrong shape or of a non-float dtype (the message names every such tensor with its
            expected shape); or a tensor holds NaN or infinity.
    """
    path = checkpoint_dir(path)
    config = Lfm2Config.from_hf(path, dtype=dtype)
    return config, load_checkpoint(
        path,
        lambda: Lfm2(config, seed=None),
        lambda: _slots(config),
        dtype=config.jnp_dtype,
        ignored={"lm_head.weight"} if config.tie_word_embeddings else (),
    )
