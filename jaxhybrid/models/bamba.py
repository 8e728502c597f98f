"""Bamba (IBM) in Flax NNX: Mamba-2 layers with a few grouped-query attention layers (partial RoPE),
each followed by a dense SiLU-gated MLP.

Modules hold parameters only; the inference memory goes through :func:`bamba_forward` (the
:class:`~jaxhybrid.models.ModelMemory` protocol). Layer ``i`` is attention when ``i`` is listed in
``attn_layer_indices``, else a Mamba-2 mixer; ``attn_layer`` / ``mamba_layer`` count those layers
in model order.

The numbers match transformers' ``BambaForCausalLM`` (5.24):

- attention scores are scaled by ``head_dim ** -0.5``; RoPE uses the NeoX (half-split) layout on
  the first ``int(head_dim * partial_rotary_factor)`` features of every head, with
  ``partial_rotary_factor`` 0.5 unless ``rope_parameters`` says otherwise (transformers hardcodes
  0.5 as the default); projections carry a bias when ``attention_bias``;
- the mixer is Mamba-2 with a gated RMSNorm applied after the gate (``norm(y * silu(z))``) over
  groups of ``d_inner / mamba_n_groups`` channels, time steps clamped to ``time_step_limit``;
- the MLP is ``down(silu(gate(x)) * up(x))`` (biases when ``mlp_bias``).

The attention, the mixer construction and the per-layer state plumbing are shared with
Granite-4.0-H (:mod:`jaxhybrid.models.granite_hybrid`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
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
from jaxhybrid.models._mamba import Linear, ParamInit, RMSNorm
from jaxhybrid.models._mamba2 import Mamba2Mixer
from jaxhybrid.models._protocol import ModelMemory

__all__ = [
    "Bamba",
    "BambaConfig",
    "BambaLayer",
    "BambaMLP",
    "BambaModel",
    "HybridAttention",
    "bamba_forward",
    "bamba_tensor_shapes",
    "init_bamba",
    "load_bamba",
]

_OWNER = "BambaConfig"
_INF = float("inf")
_COLUMN, _ROW = -1, -2


# --------------------------------------------------------------------------------------------
# Config checks shared with Granite-4.0-H


def json_float(value):
    """A float of ``config.json`` as transformers writes it: an infinite or NaN float is
    ``{"__float__": "Infinity"}`` (older versions wrote the bare ``Infinity`` that ``json`` reads
    as a float)."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        text = value["__float__"]
        if text in ("Infinity", "-Infinity", "NaN"):
            return float(text)
        raise jh.InvalidArgumentError(f"unknown encoded float {value!r} in config.json")
    return value


def check_real(owner: str, name: str, value, *, nonzero: bool = False) -> None:
    """A finite number of any sign (μP multipliers); ``nonzero`` refuses 0 (a divisor)."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise jh.InvalidTypeError(f"{owner}.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (nonzero and value == 0):
        what = "finite and nonzero" if nonzero else "finite"
        raise jh.InvalidArgumentError(f"{owner}.{name} must be {what}, got {value!r}")


def check_time_step_limit(owner: str, lim) -> tuple[float, float]:
    """``[min, max]`` with ``0 <= min <= max`` (``max`` may be infinite), as a float tuple."""
    if not isinstance(lim, list | tuple):
        raise jh.InvalidTypeError(
            f"{owner}.time_step_limit must be a list [min, max], got {type(lim).__name__}"
        )
    if len(lim) != 2:
        raise jh.InvalidArgumentError(
            f"{owner}.time_step_limit must hold two numbers [min, max], got {lim!r}"
        )
    lo, hi = (json_float(v) for v in lim)
    for name, v in (("time_step_limit[0]", lo), ("time_step_limit[1]", hi)):
        if isinstance(v, bool | np.bool_) or not isinstance(
            v, int | float | np.integer | np.floating
        ):
            raise jh.InvalidTypeError(f"{owner}.{name} must be a number, got {v!r}")
    if not (math.isfinite(lo) and lo >= 0.0 and not math.isnan(hi) and hi >= lo):
        raise jh.InvalidArgumentError(
            f"{owner}.time_step_limit must be [min, max] with 0 <= min <= max (max may be "
            f"infinite), got {lim!r}"
        )
    return float(lo), float(hi)


def check_mamba2(c, owner: str) -> None:
    """The Mamba-2 fields every Mamba-2 hybrid config shares (``mamba_*``, ``time_step_limit``).

    ``mamba_d_head`` ``"auto"`` must already be resolved."""
    for name in ("mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_chunk_size"):
        check_int(owner, name, getattr(c, name), 1)
    check_int(owner, "mamba_d_conv", c.mamba_d_conv, 2)
    for name in ("mamba_conv_bias", "mamba_proj_bias"):
        check_bool(owner, name, getattr(c, name))
    object.__setattr__(c, "time_step_limit", check_time_step_limit(owner, c.time_step_limit))
    d_inner = c.mamba_expand * c.hidden_size
    if c.mamba_d_head * c.mamba_n_heads != d_inner:
        raise jh.InvalidArgumentError(
            f"{owner}: mamba_n_heads ({c.mamba_n_heads}) * mamba_d_head ({c.mamba_d_head}) must "
            f"equal mamba_expand * hidden_size ({d_inner})"
        )
    if c.mamba_n_heads % c.mamba_n_groups:
        raise jh.InvalidArgumentError(
            f"{owner}: mamba_n_heads ({c.mamba_n_heads}) must be a multiple of mamba_n_groups "
            f"({c.mamba_n_groups})"
        )


def check_attention(c, owner: str) -> None:
    """``head_dim`` (``None`` -> ``hidden_size // num_attention_heads``) and the head counts."""
    check_int(owner, "hidden_size", c.hidden_size, 1)
    check_int(owner, "num_attention_heads", c.num_attention_heads, 1)
    if c.head_dim is None:
        object.__setattr__(c, "head_dim", c.hidden_size // c.num_attention_heads)
    check_int(owner, "head_dim", c.head_dim, 1)
    check_int(owner, "num_key_value_heads", c.num_key_value_heads, 1)
    if c.num_attention_heads % c.num_key_value_heads:
        raise jh.InvalidArgumentError(
            f"{owner}: num_attention_heads ({c.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({c.num_key_value_heads})"
        )


def rope_parameters(config: Mapping, owner: str) -> Mapping:
    """The RoPE parameters of a ``config.json``: ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling``, refusing any RoPE type but the default (unscaled) one."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise jh.InvalidTypeError(
            f"{owner}.rope_parameters must be a JSON object, got {type(params).__name__}"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise jh.InvalidArgumentError(
            f"{owner}: only the default RoPE is supported, got rope_type {rope_type!r}"
        )
    return params


def rope_theta(config: Mapping, params: Mapping) -> Any:
    """The RoPE base: ``rope_parameters.rope_theta``, else the top-level ``rope_theta``, else
    transformers' default 10000."""
    theta = params.get("rope_theta")
    if theta is None:
        theta = config.get("rope_theta")
    return 10000.0 if theta is None else theta


def config_kwargs(cls, config: Mapping, skip: set[str]) -> dict[str, Any]:
    """The dataclass fields of ``cls`` present (and not null) in ``config``, but ``skip``."""
    names = {f.name for f in dataclasses.fields(cls)} - skip
    return {k: config[k] for k in names if config.get(k) is not None}


# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class BambaConfig:
    """Static Bamba hyper-parameters (field names follow transformers' ``BambaConfig``).

    Layer ``i`` is attention when ``i in attn_layer_indices``, else Mamba-2; every layer ends
    with a dense MLP. Derived on construction: ``head_dim`` (``None`` ->
    ``hidden_size // num_attention_heads``), ``mamba_d_head`` (``"auto"`` ->
    ``mamba_expand * hidden_size // mamba_n_heads``); ``attn_layer_indices`` becomes a sorted
    tuple. ``rope_theta`` and ``partial_rotary_factor`` are read from transformers'
    ``rope_parameters`` by :meth:`from_hf`.

    Attributes:
        dtype: parameter and activation dtype, ``"float32"`` or ``"bfloat16"``. Norms, softmaxes
            and the SSD scan always run in float32.
    """

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    attn_layer_indices: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
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
        check_attention(self, _OWNER)
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers"):
            check_int(_OWNER, name, getattr(self, name), 1)
        for name in ("mamba_n_heads", "mamba_expand"):
            check_int(_OWNER, name, getattr(self, name), 1)
        if isinstance(self.mamba_d_head, str) and self.mamba_d_head == "auto":
            object.__setattr__(
                self, "mamba_d_head", self.mamba_expand * self.hidden_size // self.mamba_n_heads
            )
        check_mamba2(self, _OWNER)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
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
        idx = self.attn_layer_indices
        if not isinstance(idx, list | tuple):
            raise jh.InvalidTypeError(
                f"{_OWNER}.attn_layer_indices must be a list of layer indices, got "
                f"{type(idx).__name__} {idx!r}"
            )
        for i, v in enumerate(idx):
            check_int(_OWNER, f"attn_layer_indices[{i}]", v, 0)
            if v >= self.num_hidden_layers:
                raise jh.InvalidArgumentError(
                    f"{_OWNER}.attn_layer_indices[{i}] = {v} is not a layer of a model of "
                    f"num_hidden_layers={self.num_hidden_layers}"
                )
        object.__setattr__(self, "attn_layer_indices", tuple(sorted({int(v) for v in idx})))
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @classmethod
    def from_hf(cls, config: Mapping | str | os.PathLike, *, dtype: str = "float32") -> BambaConfig:
        """Reads a Hugging Face Bamba ``config.json`` (a dict, the file, or its directory).

        Keys absent from the file (or null) take transformers' defaults. RoPE comes from
        ``rope_parameters`` (transformers 5) or the older ``rope_theta`` / ``rope_scaling`` keys;
        ``partial_rotary_factor`` is the RoPE parameters' own or transformers' hardcoded 0.5 (a
        top-level ``partial_rotary_factor`` is ignored, as transformers ignores it; so is the
        older ``attn_rotary_emb``, which transformers does not read). Every field is checked
        for its type and range; nothing is converted (a ``"false"`` string is not a bool, ``4.0``
        is not an int).

        Raises:
            InvalidArgumentError: the file is missing, not a regular file, not JSON, not a JSON
                object; a field's value is out of range; ``hidden_act`` is not ``"silu"``; the
                RoPE is scaled (``rope_type`` other than ``"default"``).
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        name_of_dtype = dtype_name(dtype)
        config = read_config(config, "bamba")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise jh.InvalidArgumentError(f"only hidden_act='silu' is supported, got {act!r}")
        skip = {"dtype", "rope_theta", "partial_rotary_factor"}
        kwargs = config_kwargs(cls, config, skip)
        if config.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config.get("num_attention_heads", 32)
        params = rope_parameters(config, _OWNER)
        kwargs["rope_theta"] = rope_theta(config, params)
        # transformers overrides a top-level partial_rotary_factor with its hardcoded 0.5; only
        # the RoPE parameters' own value wins over that.
        partial = params.get("partial_rotary_factor")
        kwargs["partial_rotary_factor"] = 0.5 if partial is None else partial
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
    def n_rot(self) -> int:
        """RoPE-rotated features of every head (``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """``"attention"`` or ``"mamba"`` for every layer."""
        return tuple(
            "attention" if i in self.attn_layer_indices else "mamba"
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
# Modules shared with Granite-4.0-H


class HybridAttention(nnx.Module):
    """Grouped-query attention with optional (partial, NeoX-layout) RoPE; K/V live in the memory.

    Args:
        hidden_size: model width.
        init: parameter initialiser.
        n_heads, n_kv_heads, head_dim: query heads, KV heads and their width.
        bias: the four projections carry a bias.
        scale: multiplies the ``q . k`` scores (``head_dim ** -0.5`` for Bamba, Granite's
            ``attention_multiplier``).
        rope_theta: RoPE base, or ``None`` for no positional encoding.
        n_rot: RoPE-rotated leading features of every head (``None``: all).
    """

    def __init__(
        self,
        hidden_size: int,
        init: ParamInit,
        *,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        bias: bool,
        scale: float,
        rope_theta: float | None,
        n_rot: int | None = None,
    ):
        h, hd = hidden_size, head_dim
        self.q_proj = Linear(h, n_heads * hd, init, bias=bias)
        self.k_proj = Linear(h, n_kv_heads * hd, init, bias=bias)
        self.v_proj = Linear(h, n_kv_heads * hd, init, bias=bias)
        self.o_proj = Linear(n_heads * hd, h, init, bias=bias)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, hd
        self.scale = float(scale)
        self.theta = None if rope_theta is None else float(rope_theta)
        self.n_rot = n_rot

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
        q = self.q_proj(x).reshape(n_tok, nh, hd)
        k = self.k_proj(x).reshape(n_tok, nkv, hd)
        v = self.v_proj(x).reshape(n_tok, nkv, hd)
        if self.theta is not None:
            q = rope(q, pos, theta=self.theta, neox=True, n_rot=self.n_rot)
            k = rope(k, pos, theta=self.theta, neox=True, n_rot=self.n_rot)
        out, mem = attend(q, k, v, valid, mem, attn_layer, self.scale)
        return self.o_proj(out), mem


def mamba2_mixer(c, init: ParamInit) -> Mamba2Mixer:
    """The Mamba-2 mixer of a Bamba-like config (Bamba, Granite-4.0-H): gated RMSNorm after the
    gate over ``d_inner / mamba_n_groups`` channels, the same bias on ``in_proj`` and
    ``out_proj``."""
    d_inner = c.mamba_expand * c.hidden_size
    return Mamba2Mixer(
        c.hidden_size,
        init,
        n_heads=c.mamba_n_heads,
        head_dim=c.mamba_d_head,
        d_state=c.mamba_d_state,
        n_groups=c.mamba_n_groups,
        d_conv=c.mamba_d_conv,
        chunk_size=c.mamba_chunk_size,
        conv_bias=c.mamba_conv_bias,
        proj_bias=c.mamba_proj_bias,
        norm_eps=c.rms_norm_eps,
        gated_norm=True,
        norm_group_size=d_inner // c.mamba_n_groups,
        norm_before_gate=False,
        time_step_limit=c.time_step_limit,
    )


def run_mixer(
    mixer: Mamba2Mixer,
    x: Float[Array, "ubatch hidden"],
    seq_set: Int[Array, " ubatch"],
    mem: ModelMemory,
    mamba_layer: int,
) -> tuple[Float[Array, "ubatch hidden"], ModelMemory]:
    """Runs ``mixer`` from the states ``mem`` holds for ``mamba_layer`` and stores the new ones
    (and every token's, for rollback snapshots) in the memory's dtypes."""
    conv0, ssm0 = mem.ssm_states(mamba_layer)
    out, conv, ssm, (conv_tok, ssm_tok) = mixer(x, seq_set, conv0, ssm0)
    mem = mem.set_ssm_states(
        mamba_layer,
        conv.astype(conv0.dtype),
        ssm.astype(ssm0.dtype),
        conv_tok=conv_tok.astype(conv0.dtype),
        ssm_tok=ssm_tok.astype(ssm0.dtype),
    )
    return out, mem


def check_forward_args(tokens, pos, valid) -> None:
    if tokens.ndim != 1 or tokens.shape != pos.shape or tokens.shape != valid.shape:
        raise jh.InvalidArgumentError(
            f"tokens, pos and valid must be 1-D of one length, got {tokens.shape}, {pos.shape}, "
            f"{valid.shape}"
        )


# --------------------------------------------------------------------------------------------
# Bamba modules


class BambaMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``, with biases when ``mlp_bias``."""

    def __init__(self, config: BambaConfig, init: ParamInit):
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, f, init, bias=bias)
        self.up_proj = Linear(h, f, init, bias=bias)
        self.down_proj = Linear(f, h, init, bias=bias)

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class BambaLayer(nnx.Module):
    """Pre-norm residual block: (attention | Mamba-2) then the MLP."""

    def __init__(self, config: BambaConfig, layer: int, init: ParamInit):
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
                scale=c.head_dim**-0.5,
                rope_theta=c.rope_theta,
                n_rot=c.n_rot,
            )
            self.index = c.attention_layers.index(layer)
        else:
            self.mamba = mamba2_mixer(c, init)
            self.index = c.mamba_layers.index(layer)
        self.feed_forward = BambaMLP(c, init)
        self.input_layernorm = RMSNorm(c.hidden_size, eps, init)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, eps, init)

    def __call__(self, x, pos, valid, seq_set, mem: ModelMemory):
        h = self.input_layernorm(x)
        if self.kind == "attention":
            h, mem = self.self_attn(h, pos, valid, mem, self.index)
        else:
            h, mem = run_mixer(self.mamba, h, seq_set, mem, self.index)
        x = x + h
        return x + self.feed_forward(self.pre_ff_layernorm(x)), mem


class Bamba(nnx.Module):
    """The Bamba causal LM: embedding, layers, final RMSNorm, (tied or untied) LM head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_bamba`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: BambaConfig, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [BambaLayer(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, init)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, init)


def bamba_forward(
    model: Bamba,
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
        >>> from jaxhybrid.models.bamba import BambaConfig, BambaModel, init_bamba
        >>> from jaxhybrid.serving import prefill
        >>> cfg = BambaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...     attn_layer_indices=[1], mamba_n_heads=2, mamba_d_state=4, mamba_chunk_size=4)
        >>> plugin, params = BambaModel(cfg), init_bamba(cfg, seed=0)
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
    x = model.final_layernorm(x)
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head.kernel[...]
    return (x @ head).astype(jnp.float32), mem


def init_bamba(config: BambaConfig, seed: int | None = 0) -> Bamba:
    """A randomly initialised model: normal(0, ``initializer_range``) weights, unit norms, ``D``
    and ``dt_bias``, ``A_log = log(1..mamba_n_heads)``, zero biases, as transformers initialises
    Bamba. ``seed=None`` gives abstract parameters (``jax.ShapeDtypeStruct``) for a loader."""
    return Bamba(config, seed=seed)


# --------------------------------------------------------------------------------------------
# Plug-in

# Megatron-style tensor parallelism of attention (heads), MLP, embedding and LM head; the
# Mamba-2 mixer's parameters stay replicated.
ATTENTION_RULES: dict[tuple[str, ...], int] = {
    ("embed_tokens",): 0,
    ("lm_head", "kernel"): _COLUMN,
    ("self_attn", "q_proj", "kernel"): _COLUMN,
    ("self_attn", "q_proj", "bias"): 0,
    ("self_attn", "k_proj", "kernel"): _COLUMN,
    ("self_attn", "k_proj", "bias"): 0,
    ("self_attn", "v_proj", "kernel"): _COLUMN,
    ("self_attn", "v_proj", "bias"): 0,
    ("self_attn", "o_proj", "kernel"): _ROW,
}


def mamba2_memory_layout(c) -> dict[str, Any]:
    """The :func:`~jaxhybrid.models.layer_memory_config` layout of a config whose
    ``layer_types`` are ``"attention"`` / ``"mamba"`` and whose mixer is Mamba-2."""
    return dict(
        layer_kinds=[
            jh.LayerKind.ATTENTION if t == "attention" else jh.LayerKind.RECURRENT
            for t in c.layer_types
        ],
        n_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        r_shape=(c.mamba_d_conv - 1, c.conv_dim),
        s_shape=(c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state),
        dtype=c.jnp_dtype,
    )


@dataclasses.dataclass(frozen=True)
class BambaModel(FlaxHybridModel):
    """Bamba as a :class:`jaxhybrid.HybridModel` plug-in for :mod:`jaxhybrid.serving`.

    Attention layers are :attr:`jaxhybrid.LayerKind.ATTENTION` (``num_key_value_heads`` heads of
    ``head_dim``), Mamba-2 layers :attr:`jaxhybrid.LayerKind.RECURRENT` with
    ``r_shape = (d_conv - 1, conv_dim)`` and ``s_shape = (n_heads, d_head, d_state)``. The K-shift
    RoPE rotates the first ``n_rot`` features (partial RoPE). Hashable by value.

    Attributes:
        config: the model config.
        graphdef: the model's ``nnx.split`` graph definition when ``params`` is its state; None
            when ``params`` is the :class:`Bamba` module itself.
        used_span: attend over the used cells only (see
            :func:`jaxhybrid.models.hybrid_step_fn`).
        min_span: the smallest attention span.

    Examples:
        >>> from jaxhybrid.models.bamba import BambaConfig, BambaModel
        >>> model = BambaModel(BambaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        ...     attn_layer_indices=[1], mamba_n_heads=2, mamba_d_state=4))
        >>> cfg = model.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers, model.n_vocab
        ((1,), (0, 2), 16)
    """

    forward_fn = staticmethod(bamba_forward)
    sharding_rules: ClassVar[dict[tuple[str, ...], int]] = {
        **ATTENTION_RULES,
        ("feed_forward", "gate_proj", "kernel"): _COLUMN,
        ("feed_forward", "gate_proj", "bias"): 0,
        ("feed_forward", "up_proj", "kernel"): _COLUMN,
        ("feed_forward", "up_proj", "bias"): 0,
        ("feed_forward", "down_proj", "kernel"): _ROW,
    }

    @property
    def rope_fn(self):
        c = self.config
        return jh.kv.rope_shift_fn(theta=c.rope_theta, neox=True, n_rot=c.n_rot)

    def memory_layout(self) -> dict[str, Any]:
        return mamba2_memory_layout(self.config)


# --------------------------------------------------------------------------------------------
# Loader


def linear_slots(name: str, path: tuple, d_out: int, d_in: int, bias: bool):
    """``nn.Linear`` ``[out, in]`` weight (and bias) of a checkpoint."""
    yield f"{name}.weight", Slot((*path, "kernel"), (d_out, d_in), "t")
    if bias:
        yield f"{name}.bias", Slot((*path, "bias"), (d_out,), "copy")


def vector_slot(name: str, path: tuple, n: int):
    yield name, Slot(path, (n,), "copy")


def attention_slots(c, prefix: str, path: tuple):
    """The four projections of :class:`HybridAttention` under ``prefix`` (``...self_attn``)."""
    h, hd, b = c.hidden_size, c.head_dim, c.attention_bias
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    yield from linear_slots(f"{prefix}.q_proj", (*path, "q_proj"), nh * hd, h, b)
    yield from linear_slots(f"{prefix}.k_proj", (*path, "k_proj"), nkv * hd, h, b)
    yield from linear_slots(f"{prefix}.v_proj", (*path, "v_proj"), nkv * hd, h, b)
    yield from linear_slots(f"{prefix}.o_proj", (*path, "o_proj"), h, nh * hd, b)


def mixer_slots(c, prefix: str, path: tuple):
    """The tensors of a Mamba-2 mixer under ``prefix`` (``...mamba``), transformers' layout."""
    h, heads, d = c.hidden_size, c.mamba_n_heads, c.d_inner
    yield from linear_slots(
        f"{prefix}.in_proj", (*path, "in_proj"), c.in_proj_dim, h, c.mamba_proj_bias
    )
    yield (
        f"{prefix}.conv1d.weight",
        Slot((*path, "conv_weight"), (c.conv_dim, 1, c.mamba_d_conv), "conv"),
    )
    if c.mamba_conv_bias:
        yield from vector_slot(f"{prefix}.conv1d.bias", (*path, "conv_bias"), c.conv_dim)
    yield from vector_slot(f"{prefix}.dt_bias", (*path, "dt_bias"), heads)
    yield from vector_slot(f"{prefix}.A_log", (*path, "A_log"), heads)
    yield from vector_slot(f"{prefix}.D", (*path, "D"), heads)
    yield from vector_slot(f"{prefix}.norm.weight", (*path, "norm", "weight"), d)
    yield from linear_slots(f"{prefix}.out_proj", (*path, "out_proj"), h, d, c.mamba_proj_bias)


def _slots(config: BambaConfig):
    """``(tensor name, Slot)`` of every tensor of a transformers checkpoint, in model order."""
    c = config
    h, f = c.hidden_size, c.intermediate_size
    yield "model.embed_tokens.weight", Slot(("embed_tokens",), (c.vocab_size, h), "copy")
    for i, kind in enumerate(c.layer_types):
        p, path = f"model.layers.{i}", ("layers", i)
        yield from vector_slot(
            f"{p}.input_layernorm.weight", (*path, "input_layernorm", "weight"), h
        )
        yield from vector_slot(
            f"{p}.pre_ff_layernorm.weight", (*path, "pre_ff_layernorm", "weight"), h
        )
        if kind == "attention":
            yield from attention_slots(c, f"{p}.self_attn", (*path, "self_attn"))
        else:
            yield from mixer_slots(c, f"{p}.mamba", (*path, "mamba"))
        ff, fp = f"{p}.feed_forward", (*path, "feed_forward")
        yield from linear_slots(f"{ff}.gate_proj", (*fp, "gate_proj"), f, h, c.mlp_bias)
        yield from linear_slots(f"{ff}.up_proj", (*fp, "up_proj"), f, h, c.mlp_bias)
        yield from linear_slots(f"{ff}.down_proj", (*fp, "down_proj"), h, f, c.mlp_bias)
    yield from vector_slot("model.final_layernorm.weight", ("final_layernorm", "weight"), h)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", Slot(("lm_head", "kernel"), (c.vocab_size, h), "t")


def bamba_tensor_shapes(config: BambaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config)}


def load_bamba(path: str | os.PathLike, dtype: str = "float32") -> tuple[BambaConfig, Bamba]:
    """Loads a Hugging Face Bamba checkpoint directory.

    A tied checkpoint's ``lm_head.weight`` is ignored (the LM head is the embedding).

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`BambaConfig.from_hf`).
        InvalidArgumentError: a file is missing, unreadable or not a regular file; the config
            is invalid or unsupported, or describes more parameters than the files can hold; the
            checkpoint lacks a tensor, holds one the model does not have, or holds one of the
            wrong shape or of a non-float dtype (the message names every such tensor with its
            expected shape); or a tensor holds NaN or infinity.
    """
    path = checkpoint_dir(path)
    config = BambaConfig.from_hf(path, dtype=dtype)
    model = load_checkpoint(
        path,
        lambda: Bamba(config, seed=None),
        lambda: _slots(config),
        dtype=config.jnp_dtype,
        ignored={"lm_head.weight"} if config.tie_word_embeddings else (),
    )
    return config, model
