"""Nemotron-H (NVIDIA) in Flax NNX: a stack of single-mixer blocks, each a Mamba-2 mixer, a
grouped-query attention, a squared-ReLU MLP or a mixture of squared-ReLU experts.

Every block is ``x + mixer(norm(x))`` with one RMSNorm; the layer kinds come from the config's
``layers_block_type`` (transformers 5's list of ``"linear_attention"`` / ``"full_attention"`` /
``"mlp"`` / ``"moe"``) or the older ``hybrid_override_pattern`` string (``M`` / ``*`` / ``-`` /
``E``). Mamba-2 layers keep recurrent state, attention layers keep K/V; MLP and MoE layers keep
nothing (:attr:`jaxhybrid.LayerKind.NONE`).

The numbers match transformers' ``NemotronHForCausalLM``:

- attention has no positional encoding (no RoPE: order comes from the Mamba layers), scores are
  scaled by ``head_dim ** -0.5`` and the projections have no bias (transformers ignores
  ``attention_bias``);
- the Mamba-2 mixer normalises ``y * silu(z)`` with an RMSNorm over ``n_groups`` groups of
  ``d_inner / n_groups`` channels, and clamps ``dt`` below at ``time_step_min`` (transformers
  uses ``(time_step_min, inf)``, not ``time_step_limit``);
- MLPs and experts are ``down(relu(up(x)) ** 2)`` (no gate);
- the MoE router takes a float32 sigmoid of the router logits, adds ``e_score_correction_bias``
  for the choice only, keeps the ``topk_group`` best of ``n_group`` expert groups (a group scores
  the sum of its two best biased scores), takes the top ``num_experts_per_tok`` experts there,
  weights them by their unbiased scores (renormalised to sum 1 when ``norm_topk_prob``, plus
  ``1e-20``) times ``routed_scaling_factor``; experts run on the optional latent projection
  ``fc1_latent_proj`` / ``fc2_latent_proj``, and one shared MLP always runs on the block input;
- the LM head is never tied to the embeddings (transformers' ``NemotronHForCausalLM`` ties
  nothing, whatever ``tie_word_embeddings`` says).

Modules hold parameters only; the memory is passed to :func:`nemotron_h_forward` through the
:class:`~jaxhybrid.models.ModelMemory` protocol and returned by it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
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
from jaxhybrid.models._loader import (
    Slot,
    checkpoint_dir,
    checkpoint_tensor_names,
    load_checkpoint,
)
from jaxhybrid.models._mamba import Linear, ParamInit
from jaxhybrid.models._mamba2 import Mamba2Mixer
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models.jamba import JambaAttention

__all__ = [
    "NemotronH",
    "NemotronHAttention",
    "NemotronHBlock",
    "NemotronHConfig",
    "NemotronHMLP",
    "NemotronHMoE",
    "NemotronHModel",
    "NemotronHRMSNorm",
    "init_nemotron_h",
    "load_nemotron_h",
    "nemotron_h_forward",
]

_OWNER = "NemotronHConfig"

# Layer kinds: transformers 5's names, the legacy names it remaps, and the pattern characters.
MAMBA, ATTENTION, MLP, MOE = "linear_attention", "full_attention", "mlp", "moe"
_PATTERN = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}
_NAMES = {MAMBA: MAMBA, ATTENTION: ATTENTION, MLP: MLP, MOE: MOE}
_LEGACY = {"mamba": MAMBA, "attention": ATTENTION}

# transformers' defaults (NemotronHConfig).
_DEFAULT_LAYERS = (MAMBA, MOE, ATTENTION, MLP)

# Config keys transformers reads under older names; the older name wins when both are present
# (transformers pops it from the kwargs after the field was set).
_LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}


def _layer_types(value) -> tuple[str, ...]:
    """``layers_block_type`` as a tuple of transformers' names (from a list of names, legacy
    names included, or from a ``hybrid_override_pattern`` string)."""
    if isinstance(value, str):
        bad = sorted({ch for ch in value if ch not in _PATTERN})
        if bad:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.layers_block_type: pattern {value!r} holds {bad}; each character must "
                "be one of 'M' (Mamba-2), '*' (attention), '-' (MLP) or 'E' (MoE)"
            )
        return tuple(_PATTERN[ch] for ch in value)
    if not isinstance(value, list | tuple):
        raise jh.InvalidTypeError(
            f"{_OWNER}.layers_block_type must be a list of layer type names or a pattern string, "
            f"got {type(value).__name__} {value!r}"
        )
    out = []
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise jh.InvalidTypeError(
                f"{_OWNER}.layers_block_type[{i}] must be a str, got {type(name).__name__} {name!r}"
            )
        name = _LEGACY.get(name, name)
        if name not in _NAMES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.layers_block_type[{i}] is {name!r}; must be one of "
                f"{sorted(_NAMES)} (or the legacy 'mamba' / 'attention')"
            )
        out.append(name)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class NemotronHConfig:
    """Static Nemotron-H hyper-parameters (field names follow transformers' ``NemotronHConfig``).

    ``layers_block_type`` gives every layer's kind: ``"linear_attention"`` (Mamba-2),
    ``"full_attention"``, ``"mlp"`` or ``"moe"``; a ``hybrid_override_pattern`` string such as
    ``"M-M*-E"`` is accepted in its place and converted. The Mamba-2 inner width is
    ``mamba_num_heads * mamba_head_dim`` (transformers ignores ``expand``).

    Attributes:
        dtype: parameter and activation dtype, ``"float32"`` or ``"bfloat16"``. Norms, softmaxes,
            the router and the SSD scan always run in float32.
    """

    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: tuple[str, ...] | str = _DEFAULT_LAYERS
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 21504
    mlp_bias: bool = False
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_min: float = 0.001
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "layers_block_type", _layer_types(self.layers_block_type))
        if not self.layers_block_type:
            raise jh.InvalidArgumentError(f"{_OWNER}.layers_block_type must name >= 1 layer")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "mamba_num_heads",
            "mamba_head_dim",
            "ssm_state_size",
            "n_groups",
            "chunk_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "n_group",
            "topk_group",
        ):
            check_int(_OWNER, name, getattr(self, name), 1)
        check_int(_OWNER, "conv_kernel", self.conv_kernel, 2)
        if self.moe_latent_size is not None:
            check_int(_OWNER, "moe_latent_size", self.moe_latent_size, 1)
        for name in ("mlp_bias", "use_conv_bias", "use_bias", "norm_topk_prob"):
            check_bool(_OWNER, name, getattr(self, name))
        check_number(_OWNER, "time_step_min", self.time_step_min, positive=False)
        check_number(_OWNER, "routed_scaling_factor", self.routed_scaling_factor, positive=False)
        check_number(_OWNER, "layer_norm_epsilon", self.layer_norm_epsilon, positive=True)
        check_number(_OWNER, "initializer_range", self.initializer_range, positive=False)
        if self.num_attention_heads % self.num_key_value_heads:
            raise jh.InvalidArgumentError(
                f"{_OWNER}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mamba_num_heads % self.n_groups:
            raise jh.InvalidArgumentError(
                f"{_OWNER}: mamba_num_heads ({self.mamba_num_heads}) must be a multiple of "
                f"n_groups ({self.n_groups})"
            )
        if MOE in self.layers_block_type:
            e, g = self.n_routed_experts, self.n_group
            if e % g or e // g < 2:
                raise jh.InvalidArgumentError(
                    f"{_OWNER}: n_routed_experts ({e}) must split into n_group ({g}) groups of "
                    "at least 2 experts (a group scores the sum of its two best experts)"
                )
            if self.topk_group > g:
                raise jh.InvalidArgumentError(
                    f"{_OWNER}: topk_group ({self.topk_group}) must be <= n_group ({g})"
                )
            if self.num_experts_per_tok > self.topk_group * (e // g):
                raise jh.InvalidArgumentError(
                    f"{_OWNER}: num_experts_per_tok ({self.num_experts_per_tok}) must be <= the "
                    f"experts of the topk_group ({self.topk_group}) kept groups "
                    f"({self.topk_group * (e // g)})"
                )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise jh.InvalidArgumentError(
                f"{_OWNER}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @classmethod
    def from_hf(
        cls, config: Mapping | str | os.PathLike, dtype: str = "float32"
    ) -> NemotronHConfig:
        """Reads a Hugging Face Nemotron-H ``config.json`` (a dict, the file, or its directory).

        The layer kinds come from ``layers_block_type`` (or ``layer_types``), else from
        ``hybrid_override_pattern``, else transformers' default; ``num_hidden_layers`` is ignored,
        as transformers does. The older key names (``mamba_n_groups``, ``mamba_d_conv``,
        ``mamba_dt_min``, ``mamba_conv_bias``, ``mamba_chunk_size``) are read as transformers
        reads them. Keys absent from the file (or null) take transformers' defaults; a null
        ``num_key_value_heads`` means ``num_attention_heads``. Fields transformers' model does not
        read (``expand``, ``time_step_limit``, ``attention_bias``, ``mamba_proj_bias``,
        ``n_shared_experts``, ``residual_in_fp32``, ``tie_word_embeddings``, the MTP layers) are
        ignored. Every field is checked for its type and range; nothing is converted.

        Raises:
            InvalidArgumentError: the file is missing or not a JSON object; ``mlp_hidden_act`` is
                not ``"relu2"`` or ``mamba_hidden_act`` not ``"silu"``; ``sliding_window`` is set;
                or a field's value is out of range.
            InvalidTypeError: a field, ``config`` or ``dtype`` has the wrong type.
        """
        name = dtype_name(dtype)
        config = read_config(config, "nemotron_h")
        for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            got = config.get(key, want)
            if got != want:
                raise jh.InvalidArgumentError(f"only {key}={want!r} is supported, got {got!r}")
        if config.get("sliding_window") is not None:
            raise jh.InvalidArgumentError(
                f"sliding-window attention is not supported (sliding_window="
                f"{config['sliding_window']!r}); only full causal attention is"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "layers_block_type"}
        kwargs: dict[str, Any] = {k: config[k] for k in names if config.get(k) is not None}
        for old, new in _LEGACY_KEYS.items():
            if config.get(old) is not None:
                kwargs[new] = config[old]
        if "moe_latent_size" in config:
            kwargs["moe_latent_size"] = config["moe_latent_size"]
        if "num_key_value_heads" in config and config["num_key_value_heads"] is None:
            kwargs["num_key_value_heads"] = config.get("num_attention_heads", 32)
        for key in ("layers_block_type", "layer_types", "hybrid_override_pattern"):
            if config.get(key) is not None:
                kwargs["layers_block_type"] = config[key]
                break
        return cls(**kwargs, dtype=name)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        """The layer kinds as a pattern string (``M`` / ``*`` / ``-`` / ``E``)."""
        inverse = {v: k for k, v in _PATTERN.items()}
        return "".join(inverse[t] for t in self.layers_block_type)

    @property
    def d_inner(self) -> int:
        """Mamba-2 inner width, ``mamba_num_heads * mamba_head_dim``."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the Mamba-2 conv: ``x``, ``B`` and ``C``."""
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Model layer index of every attention layer (position = ``attn_layer`` index)."""
        return tuple(i for i, t in enumerate(self.layers_block_type) if t == ATTENTION)

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        """Model layer index of every Mamba-2 layer (position = ``mamba_layer`` index)."""
        return tuple(i for i, t in enumerate(self.layers_block_type) if t == MAMBA)


# --------------------------------------------------------------------------------------------
# Modules


class NemotronHRMSNorm(nnx.Module):
    """RMSNorm in float32, scaled by the weight in float32, then cast to the input dtype
    (transformers' ``NemotronHRMSNorm``)."""

    def __init__(self, dim: int, eps: float, init: ParamInit):
        self.weight = init.constant(1.0, dim)
        self.eps = eps

    def __call__(self, x: Float[Array, "ubatch dim"]) -> Float[Array, "ubatch dim"]:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (self.weight[...].astype(jnp.float32)[None, :] * y).astype(x.dtype)


class NemotronHAttention(JambaAttention):
    """Grouped-query attention without positional encoding and without biases, scaled by
    ``head_dim ** -0.5``; K/V live in the memory. (The same math as Jamba's attention.)"""


def _relu2(x):
    return jnp.square(jax.nn.relu(x))


class NemotronHMLP(nnx.Module):
    """``down(relu(up(x)) ** 2)``, biases when ``mlp_bias``."""

    def __init__(self, config: NemotronHConfig, init: ParamInit, intermediate_size: int):
        h, b = config.hidden_size, config.mlp_bias
        self.up_proj = Linear(h, intermediate_size, init, bias=b)
        self.down_proj = Linear(intermediate_size, h, init, bias=b)

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        return self.down_proj(_relu2(self.up_proj(x)))


class NemotronHRouter(nnx.Module):
    """The group-limited sigmoid top-k router (see the module docstring).

    ``weight`` is ``[hidden, experts]``; ``e_score_correction_bias`` ``[experts]`` shifts the
    choice, not the weights.
    """

    def __init__(self, config: NemotronHConfig, init: ParamInit):
        e = config.n_routed_experts
        self.weight = init.normal(config.hidden_size, e)
        self.e_score_correction_bias = init.constant(0.0, e)
        self.top_k, self.n_group, self.topk_group = (
            config.num_experts_per_tok,
            config.n_group,
            config.topk_group,
        )
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = float(config.routed_scaling_factor)

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch experts"]:
        """Returns every expert's weight per token (zero where not chosen), float32."""
        w = self.weight[...].astype(jnp.float32)
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ w)
        n_tok, n_exp = scores.shape
        choice = scores + self.e_score_correction_bias[...].astype(jnp.float32)[None, :]
        grouped = choice.reshape(n_tok, self.n_group, n_exp // self.n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
        _, group_idx = jax.lax.top_k(group_scores, self.topk_group)
        keep_group = jnp.any(
            jax.nn.one_hot(group_idx, self.n_group, dtype=jnp.bool_), axis=1
        )  # [T, G]
        keep = jnp.repeat(keep_group, n_exp // self.n_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf)
        _, top_idx = jax.lax.top_k(choice, self.top_k)
        top_w = jnp.take_along_axis(scores, top_idx, axis=1)
        if self.norm_topk_prob:
            top_w = top_w / (jnp.sum(top_w, axis=-1, keepdims=True) + 1e-20)
        top_w = top_w * self.scale
        return jnp.sum(jax.nn.one_hot(top_idx, n_exp, dtype=jnp.float32) * top_w[..., None], 1)


class NemotronHExperts(nnx.Module):
    """The routed experts, stacked: ``up_proj [experts, in, ff]``, ``down_proj
    [experts, ff, in]`` (``in`` = ``moe_latent_size`` or ``hidden_size``)."""

    def __init__(self, config: NemotronHConfig, init: ParamInit):
        e, f = config.n_routed_experts, config.moe_intermediate_size
        d = config.moe_latent_size or config.hidden_size
        self.up_proj = init.normal(e, d, f)
        self.down_proj = init.normal(e, f, d)

    def __call__(
        self, x: Float[Array, "ubatch d"], weights: Float[Array, "ubatch experts"]
    ) -> Float[Array, "ubatch d"]:
        # Every expert runs on every token, weighted by zero where not chosen: exact and simple,
        # meant for small models.
        up = jnp.einsum("td,edf->tef", x, self.up_proj[...])
        out = jnp.einsum("tef,efd->ted", _relu2(up), self.down_proj[...])
        y = jnp.einsum("ted,te->td", out.astype(jnp.float32), weights)
        return y.astype(x.dtype)


class NemotronHMoE(nnx.Module):
    """Routed experts (on the optional latent projection) plus one shared MLP."""

    def __init__(self, config: NemotronHConfig, init: ParamInit):
        self.gate = NemotronHRouter(config, init)
        self.experts = NemotronHExperts(config, init)
        self.shared_experts = NemotronHMLP(config, init, config.moe_shared_expert_intermediate_size)
        h, lat, b = config.hidden_size, config.moe_latent_size, config.mlp_bias
        if lat is None:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        else:
            self.fc1_latent_proj = Linear(h, lat, init, bias=b)
            self.fc2_latent_proj = Linear(lat, h, init, bias=b)

    def __call__(self, x: Float[Array, "ubatch hidden"]) -> Float[Array, "ubatch hidden"]:
        weights = self.gate(x)
        h = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)
        h = self.experts(h, weights)
        if self.fc2_latent_proj is not None:
            h = self.fc2_latent_proj(h)
        return h + self.shared_experts(x)


class NemotronHBlock(nnx.Module):
    """``x + mixer(norm(x))``; the mixer is Mamba-2, attention, MLP or MoE."""

    def __init__(self, config: NemotronHConfig, layer: int, init: ParamInit):
        self.kind = config.layers_block_type[layer]
        self.norm = NemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon, init)
        self.index = -1
        if self.kind == MAMBA:
            self.mixer = Mamba2Mixer(
                config.hidden_size,
                init,
                n_heads=config.mamba_num_heads,
                head_dim=config.mamba_head_dim,
                d_state=config.ssm_state_size,
                n_groups=config.n_groups,
                d_conv=config.conv_kernel,
                chunk_size=config.chunk_size,
                conv_bias=config.use_conv_bias,
                proj_bias=config.use_bias,
                norm_eps=config.layer_norm_epsilon,
                gated_norm=True,
                norm_group_size=config.d_inner // config.n_groups,
                norm_before_gate=False,
                time_step_limit=(float(config.time_step_min), float("inf")),
            )
            self.index = config.mamba_layers.index(layer)
        elif self.kind == ATTENTION:
            self.mixer = NemotronHAttention(config, init)
            self.index = config.attention_layers.index(layer)
        elif self.kind == MLP:
            self.mixer = NemotronHMLP(config, init, config.intermediate_size)
        else:
            self.mixer = NemotronHMoE(config, init)

    def __call__(self, x, valid, seq_set, mem: ModelMemory):
        h = self.norm(x)
        if self.kind == MAMBA:
            conv0, ssm0 = mem.ssm_states(self.index)
            h, conv, ssm, (conv_tok, ssm_tok) = self.mixer(h, seq_set, conv0, ssm0)
            mem = mem.set_ssm_states(
                self.index,
                conv.astype(conv0.dtype),
                ssm.astype(ssm0.dtype),
                conv_tok=conv_tok.astype(conv0.dtype),
                ssm_tok=ssm_tok.astype(ssm0.dtype),
            )
        elif self.kind == ATTENTION:
            h, mem = self.mixer(h, valid, mem, self.index)
        else:
            h = self.mixer(h)
        return x + h, mem


class NemotronH(nnx.Module):
    """The Nemotron-H causal LM: embedding, blocks, final RMSNorm (``norm_f``), LM head.

    Args:
        config: the hyper-parameters.
        seed: seed of the random initialisation (see :func:`init_nemotron_h`), or ``None`` for
            abstract parameters (``jax.ShapeDtypeStruct``) that a loader fills in.
    """

    def __init__(self, config: NemotronHConfig, *, seed: int | None = 0):
        init = ParamInit(seed, config.jnp_dtype, config.initializer_range)
        self.config = config
        self.embeddings = init.normal(config.vocab_size, config.hidden_size)
        self.layers = nnx.List(
            [NemotronHBlock(config, i, init) for i in range(config.num_hidden_layers)]
        )
        self.norm_f = NemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon, init)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, init)


def nemotron_h_forward(
    model: NemotronH,
    tokens: Int[Array, " ubatch"],
    pos: Int[Array, " ubatch"],
    valid: Bool[Array, " ubatch"],
    mem: ModelMemory,
) -> tuple[Float[Array, "ubatch vocab"], ModelMemory]:
    """Runs one ubatch bound in ``mem``; returns float32 logits for every slot and the memory.

    ``pos`` is accepted for uniformity with positional models and is unused: Nemotron-H's
    attention has no positional encoding, and visibility comes from ``mem.kv``'s mask. Padding
    slots (``valid`` False) change no memory state; their logits are meaningless.

    Examples:
        Through the serving layer (the usual way; compiling takes a few seconds):

        >>> import jaxhybrid as jh
        >>> from jaxhybrid.models.nemotron_h import NemotronHConfig, NemotronHModel
        >>> from jaxhybrid.models.nemotron_h import init_nemotron_h
        >>> from jaxhybrid.serving import generate
        >>> cfg = NemotronHConfig(vocab_size=16, hidden_size=8, layers_block_type="M*-",
        ...     num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=8,
        ...     mamba_num_heads=2, mamba_head_dim=4, ssm_state_size=4, n_groups=1,
        ...     chunk_size=4)
        >>> plugin, model = NemotronHModel(cfg), init_nemotron_h(cfg, seed=0)
        >>> mcfg = plugin.memory_config(kv_size=16, n_seq_max=1)
        >>> out = generate(plugin, model, jh.init_hybrid(mcfg), [[1, 2, 3]], cfg=mcfg,
        ...                n_ubatch=4, max_new_tokens=2)  # doctest: +SKIP
        >>> out.tokens.shape  # doctest: +SKIP
        (1, 2)
    """
    if tokens.ndim != 1 or tokens.shape != pos.shape or tokens.shape != valid.shape:
        raise jh.InvalidArgumentError(
            f"tokens, pos and valid must be 1-D of one length, got {tokens.shape}, {pos.shape}, "
            f"{valid.shape}"
        )
    del pos
    seq_set = jnp.where(valid, mem.seq_set, -1)
    x = model.embeddings[...][tokens]
    for layer in model.layers:
        x, mem = layer(x, valid, seq_set, mem)
    logits = model.lm_head(model.norm_f(x))
    return logits.astype(jnp.float32), mem


def init_nemotron_h(config: NemotronHConfig, seed: int | None = 0) -> NemotronH:
    """A randomly initialised model: normal(0, ``initializer_range``) weights, unit norms and
    ``D``, ``A_log = log(1..mamba_num_heads)``, ``dt_bias = 1``, zero biases; ``seed=None``
    gives abstract parameters for a loader."""
    return NemotronH(config, seed=seed)


# --------------------------------------------------------------------------------------------
# Serving plug-in

_COLUMN, _ROW = -1, -2


@dataclasses.dataclass(frozen=True)
class NemotronHModel(FlaxHybridModel):
    """Nemotron-H as a :class:`jaxhybrid.HybridModel` plug-in for :mod:`jaxhybrid.serving`.

    Mamba-2 layers are recurrent (conv state ``(conv_kernel - 1, conv_dim)``, SSM state
    ``(mamba_num_heads, mamba_head_dim, ssm_state_size)`` in float32), attention layers keep
    ``num_key_value_heads`` heads of ``head_dim``, MLP and MoE layers keep nothing. No RoPE, so
    ``rope_fn`` is None (a K-shift moves no feature).

    Tensor-parallel rules: attention q/k/v and MLP / expert ``up_proj`` split by output
    features, ``o_proj`` / ``down_proj`` by input features, the embedding and LM head by the
    vocabulary; Mamba-2 parameters, norms, the router and the latent projections are replicated.

    Examples:
        >>> from jaxhybrid.models.nemotron_h import NemotronHConfig
        >>> plugin = NemotronHModel(NemotronHConfig(layers_block_type="M-*E", vocab_size=16))
        >>> cfg = plugin.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers
        ((2,), (0,))
    """

    forward_fn = staticmethod(nemotron_h_forward)
    sharding_rules: ClassVar[dict[tuple[str, ...], int]] = {
        ("embeddings",): 0,
        ("lm_head", "kernel"): _COLUMN,
        ("mixer", "q_proj", "kernel"): _COLUMN,
        ("mixer", "k_proj", "kernel"): _COLUMN,
        ("mixer", "v_proj", "kernel"): _COLUMN,
        ("mixer", "o_proj", "kernel"): _ROW,
        ("mixer", "up_proj", "kernel"): _COLUMN,
        ("mixer", "up_proj", "bias"): 0,
        ("mixer", "down_proj", "kernel"): _ROW,
        ("shared_experts", "up_proj", "kernel"): _COLUMN,
        ("shared_experts", "up_proj", "bias"): 0,
        ("shared_experts", "down_proj", "kernel"): _ROW,
        # Stacked experts: up [experts, in, ff], down [experts, ff, in].
        ("experts", "up_proj"): _COLUMN,
        ("experts", "down_proj"): _ROW,
    }

    @property
    def rope_fn(self):
        return None  # Nemotron-H's attention has no positional encoding.

    def memory_layout(self) -> dict[str, Any]:
        c = self.config
        kinds = {
            MAMBA: jh.LayerKind.RECURRENT,
            ATTENTION: jh.LayerKind.ATTENTION,
            MLP: jh.LayerKind.NONE,
            MOE: jh.LayerKind.NONE,
        }
        return dict(
            layer_kinds=[kinds[t] for t in c.layers_block_type],
            n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            r_shape=(c.conv_kernel - 1, c.conv_dim),
            s_shape=(c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size),
            dtype=c.jnp_dtype,
        )


# --------------------------------------------------------------------------------------------
# Loading


def _slots(config: NemotronHConfig, prefix: str, stacked: set[int]) -> Iterator[tuple[str, Slot]]:
    """Every checkpoint tensor with its slot (shapes in checkpoint layout). ``prefix`` is
    ``"backbone"`` (what ``save_pretrained`` writes) or ``"model"``; MoE layers in ``stacked``
    hold their experts as 3-D tensors, the others one tensor per expert."""
    c = config
    h = c.hidden_size

    def lin(name, path, d_out, d_in, bias):
        yield f"{name}.weight", Slot((*path, "kernel"), (d_out, d_in), "t")
        if bias:
            yield f"{name}.bias", Slot((*path, "bias"), (d_out,), "copy")

    yield f"{prefix}.embeddings.weight", Slot(("embeddings",), (c.vocab_size, h), "copy")
    for i, kind in enumerate(c.layers_block_type):
        p, path = f"{prefix}.layers.{i}", ("layers", i)
        yield f"{p}.norm.weight", Slot((*path, "norm", "weight"), (h,), "copy")
        m, mp = f"{p}.mixer", (*path, "mixer")
        if kind == MAMBA:
            d, cd, nh = c.d_inner, c.conv_dim, c.mamba_num_heads
            yield from lin(f"{m}.in_proj", (*mp, "in_proj"), d + cd + nh, h, c.use_bias)
            yield f"{m}.conv1d.weight", Slot((*mp, "conv_weight"), (cd, 1, c.conv_kernel), "conv")
            if c.use_conv_bias:
                yield f"{m}.conv1d.bias", Slot((*mp, "conv_bias"), (cd,), "copy")
            for name in ("dt_bias", "A_log", "D"):
                yield f"{m}.{name}", Slot((*mp, name), (nh,), "copy")
            yield f"{m}.norm.weight", Slot((*mp, "norm", "weight"), (d,), "copy")
            yield from lin(f"{m}.out_proj", (*mp, "out_proj"), h, d, c.use_bias)
        elif kind == ATTENTION:
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            yield from lin(f"{m}.q_proj", (*mp, "q_proj"), q, h, False)
            yield from lin(f"{m}.k_proj", (*mp, "k_proj"), kv, h, False)
            yield from lin(f"{m}.v_proj", (*mp, "v_proj"), kv, h, False)
            yield from lin(f"{m}.o_proj", (*mp, "o_proj"), h, q, False)
        elif kind == MLP:
            f = c.intermediate_size
            yield from lin(f"{m}.up_proj", (*mp, "up_proj"), f, h, c.mlp_bias)
            yield from lin(f"{m}.down_proj", (*mp, "down_proj"), h, f, c.mlp_bias)
        else:
            e, f = c.n_routed_experts, c.moe_intermediate_size
            d = c.moe_latent_size or h
            g = (*mp, "gate")
            yield f"{m}.gate.weight", Slot((*g, "weight"), (e, h), "t")
            yield (
                f"{m}.gate.e_score_correction_bias",
                Slot((*g, "e_score_correction_bias"), (e,), "copy"),
            )
            x = (*mp, "experts")
            if i in stacked:
                yield f"{m}.experts.up_proj", Slot((*x, "up_proj"), (e, f, d), "t")
                yield f"{m}.experts.down_proj", Slot((*x, "down_proj"), (e, d, f), "t")
            else:
                for j in range(e):
                    yield f"{m}.experts.{j}.up_proj.weight", Slot((*x, "up_proj"), (f, d), "t", j)
                    yield (
                        f"{m}.experts.{j}.down_proj.weight",
                        Slot((*x, "down_proj"), (d, f), "t", j),
                    )
            fs = c.moe_shared_expert_intermediate_size
            s = (*mp, "shared_experts")
            yield from lin(f"{m}.shared_experts.up_proj", (*s, "up_proj"), fs, h, c.mlp_bias)
            yield from lin(f"{m}.shared_experts.down_proj", (*s, "down_proj"), h, fs, c.mlp_bias)
            if c.moe_latent_size is not None:
                lat = c.moe_latent_size
                yield from lin(f"{m}.fc1_latent_proj", (*mp, "fc1_latent_proj"), lat, h, c.mlp_bias)
                yield from lin(f"{m}.fc2_latent_proj", (*mp, "fc2_latent_proj"), h, lat, c.mlp_bias)
    yield f"{prefix}.norm_f.weight", Slot(("norm_f", "weight"), (h,), "copy")
    yield "lm_head.weight", Slot(("lm_head", "kernel"), (c.vocab_size, h), "t")


def load_nemotron_h(
    path: str | os.PathLike, dtype: str = "float32"
) -> tuple[NemotronHConfig, NemotronH]:
    """Loads a Hugging Face Nemotron-H checkpoint directory.

    Tensor names are those ``NemotronHForCausalLM.save_pretrained`` writes and the published
    NVIDIA checkpoints hold: under ``backbone.`` (or ``model.``), one tensor per expert
    (``mixer.experts.{e}.up_proj.weight``; transformers' stacked ``mixer.experts.up_proj`` is
    accepted too), ``nn.Linear`` weights ``[out, in]``, conv weights ``[conv_dim, 1, kernel]``.
    Multi-token-prediction tensors (``mtp.*``) are ignored, as transformers ignores them.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; every tensor is cast to it (the router too).

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`NemotronHConfig.from_hf`).
        InvalidArgumentError: a file is missing or unreadable; the config is invalid or
            describes more parameters than the files hold; the checkpoint lacks a tensor, holds
            one the model does not have, or one of the wrong shape or a non-float dtype (the
            message names every such tensor with its expected shape); or a tensor holds NaN or
            infinity.
    """
    path = checkpoint_dir(path)
    config = NemotronHConfig.from_hf(path, dtype=dtype)
    names = checkpoint_tensor_names(path)
    prefix = "model" if "model.embeddings.weight" in names else "backbone"
    stacked = {
        i
        for i, kind in enumerate(config.layers_block_type)
        if kind == MOE and f"{prefix}.layers.{i}.mixer.experts.up_proj" in names
    }
    ignored = {n for n in names if "mtp" in n.split(".")[:2]}
    model = load_checkpoint(
        path,
        lambda: NemotronH(config, seed=None),
        lambda: _slots(config, prefix, stacked),
        dtype=config.jnp_dtype,
        ignored=ignored,
    )
    return config, model
