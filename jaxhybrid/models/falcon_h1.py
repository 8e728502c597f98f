"""Falcon-H1 (TII) in Flax NNX: every decoder layer runs grouped-query attention with RoPE and a
Mamba-2 mixer side by side on the same normed input, adds both to the residual, then a SiLU-gated
MLP.

Modules hold parameters only; the inference memory goes through :func:`falcon_h1_forward` (the
:class:`~jaxhybrid.models.ModelMemory` protocol). Every layer is a
:attr:`jaxhybrid.LayerKind.BOTH` layer: its attention is ``attn_layer`` ``i`` and its mixer
``mamba_layer`` ``i`` for model layer ``i``.

The numbers match transformers' ``FalconH1ForCausalLM`` (5.24), μP multipliers included:

- the embedding output is scaled by ``embedding_multiplier``, the logits by
  ``lm_head_multiplier`` (after the LM head, tied or not);
- attention reads the normed input times ``attention_in_multiplier``, its keys are scaled by
  ``key_multiplier`` before RoPE (NeoX half-split layout over the whole head), its output by
  ``attention_out_multiplier``; scores are scaled by ``head_dim ** -0.5``;
- the mixer reads the normed input times ``ssm_in_multiplier``; its ``in_proj`` output is scaled
  channel-wise by the μP vector built from ``ssm_multipliers`` (one factor for each of the ``z``,
  ``x``, ``B``, ``C`` and ``dt`` blocks); its output by ``ssm_out_multiplier``. ``in_proj`` has a
  bias when ``mamba_proj_bias``, ``out_proj`` when ``projectors_bias``. With ``mamba_rms_norm`` the
  gate goes through a grouped (``mamba_n_groups``) gated RMSNorm (``mamba_norm_before_gate``),
  else the scan output is multiplied by ``silu(z)``;
- the MLP is ``down(up(x) * silu(gate(x) * m0)) * m1`` for ``mlp_multipliers = (m0, m1)``.

The μP vector is derived from the config, as transformers does: transformers keeps it as a
non-persistent buffer, so ``save_pretrained`` does not write it; a checkpoint that holds
``model.layers.{i}.mamba.mup_vector`` anyway has it ignored by both.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Float, Int
from jaxhybrid.kv import rope
from jaxhybrid.models._config_checks import (
    DTYPES,
    check_bool,
    check_int,
    check_number,
    dtype_name,
    read_config,
)
from jaxhybrid.models._hybrid_adapter import FlaxHybridModel
from jaxhybrid.models._loader import (
    Slot,
    checkpoint_dir,
    checkpoint_tensor_names,
    load_checkpoint,
)
from jaxhybrid.models._mamba import Linear, ParamInit, RMSNorm
from jaxhybrid.models._mamba2 import Mamba2Mixer
from jaxhybrid.models._protocol import ModelMemory

__all__ = [
    "FalconH1",
    "FalconH1Attention",
    "FalconH1Config",
    "FalconH1Layer",
    "FalconH1MLP",
    "FalconH1Model",
    "falcon_h1_forward",
    "falcon_h1_tensor_shapes",
    "init_falcon_h1",
    "load_falcon_h1",
    "mup_vector",
]

_OWNER = "FalconH1Config"
_INF = float("inf")


def _check_int(name: str, value, minimum: int) -> None:
    check_int(_OWNER, name, value, minimum)


def _check_bool(name: str, value) -> None:
    check_bool(_OWNER, name, value)


def _check_real(name: str, value) -> None:
    """A finite number of any sign (μP multipliers)."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise jh.InvalidTypeError(f"{_OWNER}.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise jh.InvalidArgumentError(f"{_OWNER}.{name} must be finite, got {value!r}")


def _check_reals(name: str, value, n: int) -> tuple[float, ...]:
    """A list or tuple of ``n`` finite numbers, returned as a tuple (hashable)."""
    if not isinstance(value, list | tuple):
        raise jh.InvalidTypeError(
            f"{_OWNER}.{name} must be a list of {n} numbers, got {type(value).__name__} {value!r}"
        )
    if len(value) != n:
        raise jh.InvalidArgumentError(
            f"{_OWNER}.{name} must hold {n} numbers, got {len(value)}: {value!r}"
        )
    for i, v in enumerate(value):
        _check_real(f"{name}[{i}]", v)
    return tuple(value)


def _json_float(value):
    """transformers writes an infinite float of ``config.json`` as ``{"__float__": "Infinity"}``
    (older versions as the bare ``Infinity`` that ``json`` reads as a float)."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        text = value["__float__"]
        if text in ("Infinity", "-Infinity", "NaN"):
            return float(text)
        raise jh.InvalidArgumentError(f"unknown encoded float {value!r} in config.json")
    return value


@dataclasses.dataclass(frozen=True)
class FalconH1Config:
    """Static Falcon-H1 hyper-parameters (field names follow transformers' ``FalconH1Config``).

    Every layer holds attention, a Mamba-2 mixer and a dense MLP. Derived on construction:
    ``head_dim`` (``None`` -> ``hidden_size // num_attention_heads``), ``mamba_d_ssm`` (``None`` ->
    ``mamba_expand * hidden_size``: the mixer's inner width) and ``mamba_d_head`` (``"auto"`` ->
    ``mamba_d_ssm // mamba_n_heads``). ``rope_theta`` is read from transformers'
    ``rope_parameters`` by :meth:`from_hf`; only the default (unscaled) RoPE exists here.

    Attributes:
        time_step_limit: ``(min, max)`` clamp of the mixer's time steps, applied to every
            ubatch. (transformers applies it in its chunked prefill path only, not in its
            single-token decode path; with the default ``(0, inf)`` both are the identity.)
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
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False
    projectors_bias: bool = False
    rope_theta: float = 10000.0
    mamba_d_ssm: int | None = 1024
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: tuple[float, float] = (0.0, _INF)
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    mlp_multipliers: tuple[float, ...] = (1.0, 1.0)
    dtype: str = "float32"

    def __post_init__(self):
        # The sizes the derived fields come from are checked first.
        for name in ("hidden_size", "num_attention_heads", "mamba_n_heads", "mamba_expand"):
            _check_int(name, getattr(self, name), 1)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.mamba_d_ssm is None:
            object.__setattr__(self, "mamba_d_ssm", self.mamba_expand * self.hidden_size)
        _check_int("mamba_d_ssm", self.mamba_d_ssm, 1)
        if isinstance(self.mamba_d_head, str) and self.mamba_d_head == "auto":
            object.__setattr__(self, "mamba_d_head", self.mamba_d_ssm // self.mamba_n_heads)
        for name in (
            "vocab_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_key_value_heads",
            "head_dim",
            "mamba_d_head",
            "mamba_n_groups",
            "mamba_d_state",
            "mamba_chunk_size",
        ):
            _check_int(name, getattr(self, name), 1)
        _check_int("mamba_d_conv", self.mamba_d_conv, 2)
        for name in (
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "projectors_bias",
            "mamba_conv_bias",
            "mamba_proj_bias",
            "mamba_norm_before_gate",
            "mamba_rms_norm",
        ):
            _check_bool(name, getattr(self, name))
        check_number(_OWNER, "rms_norm_eps", self.rms_norm_eps, positive=True)
        check_number(_OWNER, "initializer_range", self.initializer_range, positive=False)
        check_number(_OWNER, "rope_theta", self.rope_theta, positive=True)
        for name in (
            "embedding_multiplier",
            "lm_head_multiplier",
            "attention_in_multiplier",
            "attention_out_multiplier",
            "key_multiplier",
            "ssm_in_multiplier",
            "ssm_out_multiplier",
        ):
            _check_real(name, getattr(self, name))
        object.__setattr__(
            self, "ssm_multipliers", _check_reals("ssm_multipliers", self.ssm_multipliers, 5)
        )
        object.__setattr__(
            self, "mlp_multipliers", _check_reals("mlp_multipliers", self.mlp_multipliers, 2)
        )
        self._check_time_step_limit()
        if self.head_dim % 2:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.head_dim must be even for RoPE, got {self.head_dim}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise jh.InvalidArgumentError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mamba_d_head * self.mamba_n_heads != self.mamba_d_ssm:
            raise jh.InvalidArgumentError(
                f"mamba_n_heads ({self.mamba_n_heads}) * mamba_d_head ({self.mamba_d_head}) must "
                f"equal the mixer width mamba_d_ssm ({self.mamba_d_ssm})"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise jh.InvalidArgumentError(
                f"mamba_n_heads ({self.mamba_n_heads}) must be a multiple of mamba_n_groups "
                f"({self.mamba_n_groups})"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    def _check_time_step_limit(self) -> None:
        lim = self.time_step_limit
        if not isinstance(lim, list | tuple):
            raise jh.InvalidTypeError(
                f"{_OWNER}.time_step_limit must be a list [min, max], got {type(lim).__name__}"
            )
        if len(lim) != 2:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.time_step_limit must hold two numbers [min, max], got {lim!r}"
            )
        lo, hi = (_json_float(v) for v in lim)
        for name, v in (("time_step_limit[0]", lo), ("time_step_limit[1]", hi)):
            if isinstance(v, bool | np.bool_) or not isinstance(
                v, int | float | np.integer | np.floating
            ):
                raise jh.InvalidTypeError(f"{_OWNER}.{name} must be a number, got {v!r}")
        if not (math.isfinite(lo) and lo >= 0.0 and not math.isnan(hi) and hi >= lo):
            raise jh.InvalidArgumentError(
                f"{_OWNER}.time_step_limit must be [min, max] with 0 <= min <= max (max may be "
                f"infinite), got {lim!r}"
            )
        object.__setattr__(self, "time_step_limit", (float(lo), float(hi)))

    @classmethod
    def from_hf(
        cls, config: Mapping | str | os.PathLike, *, dtype: str = "float32"
    ) -> FalconH1Config:
        """Reads a Hugging Face Falcon-H1 ``config.json`` (a dict, the file, or its directory).

        Keys absent from the file (or null) take transformers' defaults, except a null
        ``mamba_d_ssm``, which means ``mamba_expand * hidden_size`` as in transformers. RoPE
        comes from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` /
        ``rope_scaling`` keys; only the default RoPE type is supported. Every field is checked
        for its type and range; nothing is converted (a ``"false"`` string is not a bool,
        ``4.0`` is not an int).

        Raises:
            InvalidArgumentError: the file is missing, not a regular file, not JSON, not a JSON
                object; a field's value is out of range; ``hidden_act`` is not ``"silu"``; the
                RoPE is scaled (``rope_type`` other than ``"default"``) or partial
                (``partial_rotary_factor`` other than 1: transformers' Falcon-H1 ignores it and
                rotates the whole head, so such a config is refused as ambiguous).
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        name_of_dtype = dtype_name(dtype)
        config = read_config(config, "falcon_h1")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise jh.InvalidArgumentError(f"only hidden_act='silu' is supported, got {act!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "rope_theta"}
        kwargs: dict[str, Any] = {k: config[k] for k in names if config.get(k) is not None}
        if config.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = config.get("num_attention_heads", 32)
        if "mamba_d_ssm" in config and config["mamba_d_ssm"] is None:
            # An explicit null means mamba_expand * hidden_size (absent: transformers' 1024).
            kwargs["mamba_d_ssm"] = None
        kwargs["rope_theta"] = _rope_theta(config)
        return cls(**kwargs, dtype=name_of_dtype)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def d_ssm(self) -> int:
        """The mixer's inner width (``mamba_n_heads * mamba_d_head``)."""
        return self.mamba_d_ssm

    @property
    def conv_dim(self) -> int:
        """Channels of the mixer's causal conv (``x``, ``B`` and ``C``)."""
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_dim(self) -> int:
        """Output width of the mixer's ``in_proj`` (``z``, ``xBC``, ``dt``)."""
        return self.mamba_d_ssm + self.conv_dim + self.mamba_n_heads

    @property
    def layer_types(self) -> tuple[str, ...]:
        """``"hybrid"`` for every layer (transformers' ``layers_block_type``)."""
        return ("hybrid",) * self.num_hidden_layers


def _rope_theta(config: Mapping) -> float:
    """The RoPE base of a Falcon-H1 ``config.json``, refusing what transformers' Falcon-H1 would
    not compute as a plain, whole-head RoPE."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise jh.InvalidTypeError(
            f"{_OWNER}.rope_parameters must be a JSON object, got {type(params).__name__}"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise jh.InvalidArgumentError(
            f"only the default RoPE is supported, got rope_type {rope_type!r}"
        )
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise jh.InvalidArgumentError(
            f"partial_rotary_factor={partial!r} is not supported: transformers' Falcon-H1 "
            "ignores it and rotates the whole head, so the intended RoPE is ambiguous"
        )
    theta = params.get("rope_theta")
    if theta is None:
        theta = config.get("rope_theta")
    return 10000.0 if theta is None else theta


def mup_vector(config: FalconH1Config) -> np.ndarray:
    """The μP scale of every ``in_proj`` output channel (transformers' ``compute_mup_vector``):
    ``ssm_multipliers`` ``[z, x, B, C, dt]`` over the blocks of widths ``[d_ssm, d_ssm, G * N,
    G * N, n_heads]``; float32, shape ``[in_proj_dim]``."""
    d, gn = config.mamba_d_ssm, config.mamba_n_groups * config.mamba_d_state
    widths = (d, d, gn, gn, config.mamba_n_heads)
    return np.concatenate(
        [
            np.full(w, np.float32(m), np.float32)
            for w, m in zip(widths, config.ssm_multipliers, strict=True)
        ]
    )


# --------------------------------------------------------------------------------------------
# Modules


class FalconH1Attention(nnx.Module):
    """Grouped-query attention with RoPE and the key multiplier; K/V live in the memory."""

    def __init__(self, config: FalconH1Config, init: ParamInit):
        h, hd = config.hidden_size, config.head_dim
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = Linear(h, nh * hd, init, bias=bias)
        self.k_proj = Linear(h, nkv * hd, init, bias=bias)
        self.v_proj = Linear(h, nkv * hd, init, bias=bias)
        self.o_proj = Linear(nh * hd, h, init, bias=bias)
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.key_multiplier = config.key_multiplier
        self.theta = config.rope_theta

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
        group = nh // nkv
        q = self.q_proj(x).reshape(n_tok, nh, hd)
        k = self.k_proj(x).reshape(n_tok, nkv, hd) * self.key_multiplier
        v = self.v_proj(x).reshape(n_tok, nkv, hd)
        q = rope(q, pos, theta=self.theta, neox=True)
        k = rope(k, pos, theta=self.theta, neox=True)
        q = q.reshape(n_tok, nkv, group, hd)
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
        return self.o_proj(out.reshape(n_tok, nh * hd)), mem


class FalconH1MLP(nnx.Module):
    """``down(up(x) * silu(gate(x) * m0)) * m1`` with ``(m0, m1) = mlp_multipliers``."""

    def __init__(self, config: FalconH1Config, init: ParamInit):
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, f, init, bias=bias)
        self.up_proj = Linear(h, f, init, bias=bias)
        self.down_proj = Linear(f, h, init, bias=bias)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        y = self.up_proj(x) * jax.nn.silu(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(y) * self.down_multiplier


def _mixer(config: FalconH1Config, init: ParamInit) -> Mamba2Mixer:
    c = config
    mixer = Mamba2Mixer(
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
        gated_norm=c.mamba_rms_norm,
        norm_group_size=c.mamba_d_ssm // c.mamba_n_groups,
        norm_before_gate=c.mamba_norm_before_gate,
        time_step_limit=c.time_step_limit,
    )
    if c.projectors_bias != c.mamba_proj_bias:
        # transformers: in_proj's bias follows mamba_proj_bias, out_proj's projectors_bias.
        mixer.out_proj = Linear(c.mamba_d_ssm, c.hidden_size, init, bias=c.projectors_bias)
    return mixer


class FalconH1Layer(nnx.Module):
    """Pre-norm residual block: (Mamba-2 mixer + attention, in parallel) then the MLP.

    ``x + ssm_out * mamba(norm(x) * ssm_in) + attn_out * attn(norm(x) * attn_in)``, then
    ``x + mlp(pre_ff_norm(x))``.
    """

    def __init__(self, config: FalconH1Config, layer: int, init: ParamInit):
        eps = config.rms_norm_eps
        self.index = layer
        self.mamba = _mixer(config, init)
        self.self_attn = FalconH1Attention(config, init)
        self.feed_forward = FalconH1MLP(config, init)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, init)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps, init)
        self.ssm_in_multiplier = config.ssm_in_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.attention_in_multiplier = config.attention_in_multiplier
        self.attention_out_multiplier = config.attention_out_multiplier

    def __call__(self, x, pos, valid, seq_set, in_scale, mem: ModelMemory):
        h = self.input_layernorm(x)
        conv0, ssm0 = mem.ssm_states(self.index)
        m, conv, ssm, (conv_tok, ssm_tok) = self.mamba(
            h * self.ssm_in_multiplier, seq_set, conv0, ssm0, in_scale=in_scale
        )
        mem = mem.set_ssm_states(
            self.index,
            conv.astype(conv0.dtype),
            ssm.astype(ssm0.dtype),
            conv_tok=conv_tok.astype(conv0.dtype),
            ssm_tok=ssm_tok.astype(ssm0.dtype),
        )
        a, mem = self.self_attn(h * self.attention_in_multiplier, pos, valid, mem, self.index)
        x = x + (m * self.ssm_out_multiplier + a * self.attention_out_multiplier)
        return x + self.feed_forward(self.pre_ff_layernorm(x)), mem


class FalconH1(nnx.Module):
    """The Falcon-H1 causal LM: embedding, hybrid layers, final RMSNorm, (tied or untied) LM head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_falcon_h1`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: FalconH1Config, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [FalconH1Layer(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, init)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, init)


def falcon_h1_forward(
    model: FalconH1,
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
        >>> from jaxhybrid.models.falcon_h1 import FalconH1Config, FalconH1Model, init_falcon_h1
        >>> from jaxhybrid.serving import prefill
        >>> cfg = FalconH1Config(vocab_size=16, hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...     mamba_d_ssm=8, mamba_n_heads=2, mamba_d_state=4, mamba_chunk_size=4)
        >>> plugin, params = FalconH1Model(cfg), init_falcon_h1(cfg, seed=0)
        >>> mcfg = plugin.memory_config(kv_size=16, n_seq_max=1)
        >>> # jax.eval_shape traces the call without compiling it; call prefill to run it.
        >>> logits, mem, code = jax.eval_shape(lambda p, m: prefill(plugin, p, m,
        ...     jnp.array([[3, 5, 7]]), jnp.array([3]), jnp.array([0]), cfg=mcfg, n_ubatch=4),
        ...     params, jh.init_hybrid(mcfg))
        >>> logits.shape, logits.dtype
        ((1, 16), dtype('float32'))
    """
    if tokens.ndim != 1 or tokens.shape != pos.shape or tokens.shape != valid.shape:
        raise jh.InvalidArgumentError(
            f"tokens, pos and valid must be 1-D of one length, got {tokens.shape}, {pos.shape}, "
            f"{valid.shape}"
        )
    c = model.config
    seq_set = jnp.where(valid, mem.seq_set, -1)
    in_scale = None
    if any(m != 1.0 for m in c.ssm_multipliers):
        in_scale = jnp.asarray(mup_vector(c))
    x = model.embed_tokens[...][tokens] * c.embedding_multiplier
    for layer in model.layers:
        x, mem = layer(x, pos, valid, seq_set, in_scale, mem)
    x = model.final_layernorm(x)
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head.kernel[...]
    logits = (x @ head) * c.lm_head_multiplier
    return logits.astype(jnp.float32), mem


def init_falcon_h1(config: FalconH1Config, seed: int | None = 0) -> FalconH1:
    """A randomly initialised model: normal(0, ``initializer_range``) weights, unit norms,
    ``D`` and ``dt_bias``, ``A_log = log(1..n_heads)``, zero biases, as transformers initialises
    Falcon-H1. ``seed=None`` gives abstract parameters (``jax.ShapeDtypeStruct``) for a loader.
    """
    return FalconH1(config, seed=seed)


# --------------------------------------------------------------------------------------------
# Plug-in

_COLUMN, _ROW = -1, -2


@dataclasses.dataclass(frozen=True)
class FalconH1Model(FlaxHybridModel):
    """Falcon-H1 as a :class:`jaxhybrid.HybridModel` plug-in for :mod:`jaxhybrid.serving`.

    Every layer is :attr:`jaxhybrid.LayerKind.BOTH`: it owns K/V rows in the attention part and
    a conv + SSM state in the recurrent part. Hashable by value (config and graphdef).

    Attributes:
        config: the model config.
        graphdef: the model's ``nnx.split`` graph definition when ``params`` is its state; None
            when ``params`` is the :class:`FalconH1` module itself.
        used_span: attend over the used cells only (see
            :func:`jaxhybrid.models.hybrid_step_fn`).
        min_span: the smallest attention span.

    Examples:
        >>> from jaxhybrid.models.falcon_h1 import FalconH1Config, FalconH1Model
        >>> model = FalconH1Model(FalconH1Config(vocab_size=16, hidden_size=8,
        ...     intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...     num_key_value_heads=1, mamba_d_ssm=8, mamba_n_heads=2, mamba_d_state=4))
        >>> cfg = model.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers, model.n_vocab
        ((0, 1), (0, 1), 16)
    """

    forward_fn = staticmethod(falcon_h1_forward)
    # Megatron-style tensor parallelism of attention, MLP, embedding and LM head; the Mamba-2
    # mixer's parameters stay replicated.
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
        ("feed_forward", "gate_proj", "kernel"): _COLUMN,
        ("feed_forward", "gate_proj", "bias"): 0,
        ("feed_forward", "up_proj", "kernel"): _COLUMN,
        ("feed_forward", "up_proj", "bias"): 0,
        ("feed_forward", "down_proj", "kernel"): _ROW,
    }

    @property
    def rope_fn(self):
        return jh.kv.rope_shift_fn(theta=self.config.rope_theta, neox=True)

    def memory_layout(self) -> dict[str, Any]:
        c = self.config
        return dict(
            layer_kinds=[jh.LayerKind.BOTH] * c.num_hidden_layers,
            n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            r_shape=(c.mamba_d_conv - 1, c.conv_dim),
            s_shape=(c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state),
            dtype=c.jnp_dtype,
        )


# --------------------------------------------------------------------------------------------
# Loader


def _slots(config: FalconH1Config):
    """``(tensor name, Slot)`` of every tensor of a transformers checkpoint, in model order."""
    c = config
    h, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    d, heads = c.mamba_d_ssm, c.mamba_n_heads
    yield "model.embed_tokens.weight", Slot(("embed_tokens",), (c.vocab_size, h), "copy")

    def lin(name, path, d_out, d_in, bias):
        yield f"{name}.weight", Slot((*path, "kernel"), (d_out, d_in), "t")
        if bias:
            yield f"{name}.bias", Slot((*path, "bias"), (d_out,), "copy")

    def vec(name, path, n):
        yield name, Slot(path, (n,), "copy")

    for i in range(c.num_hidden_layers):
        p, path = f"model.layers.{i}", ("layers", i)
        yield from vec(f"{p}.input_layernorm.weight", (*path, "input_layernorm", "weight"), h)
        yield from vec(f"{p}.pre_ff_layernorm.weight", (*path, "pre_ff_layernorm", "weight"), h)
        a, ap = f"{p}.self_attn", (*path, "self_attn")
        yield from lin(f"{a}.q_proj", (*ap, "q_proj"), nh * hd, h, c.attention_bias)
        yield from lin(f"{a}.k_proj", (*ap, "k_proj"), nkv * hd, h, c.attention_bias)
        yield from lin(f"{a}.v_proj", (*ap, "v_proj"), nkv * hd, h, c.attention_bias)
        yield from lin(f"{a}.o_proj", (*ap, "o_proj"), h, nh * hd, c.attention_bias)
        m, mp = f"{p}.mamba", (*path, "mamba")
        yield from lin(f"{m}.in_proj", (*mp, "in_proj"), c.in_proj_dim, h, c.mamba_proj_bias)
        yield (
            f"{m}.conv1d.weight",
            Slot((*mp, "conv_weight"), (c.conv_dim, 1, c.mamba_d_conv), "conv"),
        )
        if c.mamba_conv_bias:
            yield from vec(f"{m}.conv1d.bias", (*mp, "conv_bias"), c.conv_dim)
        yield from vec(f"{m}.dt_bias", (*mp, "dt_bias"), heads)
        yield from vec(f"{m}.A_log", (*mp, "A_log"), heads)
        yield from vec(f"{m}.D", (*mp, "D"), heads)
        if c.mamba_rms_norm:
            yield from vec(f"{m}.norm.weight", (*mp, "norm", "weight"), d)
        yield from lin(f"{m}.out_proj", (*mp, "out_proj"), h, d, c.projectors_bias)
        ff, fp = f"{p}.feed_forward", (*path, "feed_forward")
        yield from lin(f"{ff}.gate_proj", (*fp, "gate_proj"), f, h, c.mlp_bias)
        yield from lin(f"{ff}.up_proj", (*fp, "up_proj"), f, h, c.mlp_bias)
        yield from lin(f"{ff}.down_proj", (*fp, "down_proj"), h, f, c.mlp_bias)
    yield from vec("model.final_layernorm.weight", ("final_layernorm", "weight"), h)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", Slot(("lm_head", "kernel"), (c.vocab_size, h), "t")


_MUP_NAME = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,8})\.mamba\.mup_vector")


def falcon_h1_tensor_shapes(config: FalconH1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config)}


def load_falcon_h1(
    path: str | os.PathLike, dtype: str = "float32"
) -> tuple[FalconH1Config, FalconH1]:
    """Loads a Hugging Face Falcon-H1 checkpoint directory.

    The μP vector is not read: it is derived from the config (transformers keeps it as a
    non-persistent buffer), and a ``mamba.mup_vector`` tensor in the checkpoint is ignored, as
    transformers ignores it. A tied checkpoint's ``lm_head.weight`` is ignored too.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`FalconH1Config.from_hf`).
        InvalidArgumentError: a file is missing, unreadable or not a regular file; the config
            is invalid or unsupported, or describes more parameters than the files can hold; the
            checkpoint lacks a tensor, holds one the model does not have, or holds one of the
            wrong shape or of a non-float dtype (the message names every such tensor with its
            expected shape); or a tensor holds NaN or infinity.
    """
    path = checkpoint_dir(path)
    config = FalconH1Config.from_hf(path, dtype=dtype)
    # The μP buffers the files hold, of layers the config has (not one name per configured layer:
    # a config of a billion layers is refused by load_checkpoint before anything of its size).
    ignored = set()
    for name in checkpoint_tensor_names(path):
        found = _MUP_NAME.fullmatch(name)
        if found and int(found.group(1)) < config.num_hidden_layers:
            ignored.add(name)
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    model = load_checkpoint(
        path,
        lambda: FalconH1(config, seed=None),
        lambda: _slots(config),
        dtype=config.jnp_dtype,
        ignored=ignored,
    )
    return config, model
