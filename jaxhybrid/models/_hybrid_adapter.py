"""Runs a protocol model (Jamba) on the hybrid memory.

:class:`HybridModelMemory` implements :class:`~jaxhybrid.models.ModelMemory` over the hybrid
memory bound to one placed ubatch: ``(HybridMemory, Placement, n_seqs)`` are the pytree's data and
the :class:`~jaxhybrid.HybridConfig` is static metadata, so it crosses ``jit`` and
``lax.while_loop`` boundaries like any pytree. :func:`jamba_step_fn` wraps
:func:`~jaxhybrid.models.forward` into the ``step_fn`` that :func:`jaxhybrid.decode` runs.

Attention cost follows the used cells (§2.7): by default the step runs the model in a
``lax.switch`` over power-of-two attention spans (:func:`jaxhybrid.kv.n_kv_spans`), choosing at run
time the smallest span covering every used cell (``Placement.n_kv``); each branch reads only the
leading ``span`` cells of K/V and builds its mask over them. One compilation holds every branch, so
the span changing between steps never retraces.

Layer numbering: the model's ``attn_layer`` / ``mamba_layer`` count its attention / Mamba layers;
:func:`jamba_hybrid_config` routes exactly those layers to the attention / recurrent part in the
same order, so both numberings agree with the parts' own layer indices.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Int, Scalar
from jaxhybrid.models._sharding import jamba_param_specs, rule_param_specs
from jaxhybrid.models.jamba import JambaConfig, forward

__all__ = [
    "FlaxHybridModel",
    "HybridModelMemory",
    "JambaModel",
    "hybrid_step_fn",
    "jamba_hybrid_config",
    "jamba_step_fn",
    "layer_memory_config",
]


class _MambaStates:
    """The Mamba-state half of :class:`~jaxhybrid.models.ModelMemory`, shared by both bindings
    below (they have ``mem``, ``place``, ``n_seqs`` and ``cfg``)."""

    def ssm_states(self, mamba_layer: int):
        layer = self.cfg.recurrent_layers[mamba_layer]
        return jh.read_states(self.mem, layer, self.place, self.cfg)

    def set_ssm_states(self, mamba_layer: int, conv, ssm, *, conv_tok=None, ssm_tok=None):
        layer = self.cfg.recurrent_layers[mamba_layer]
        mem = jh.write_states(
            self.mem,
            layer,
            self.place,
            conv,
            ssm,
            self.n_seqs,
            self.cfg,
            r_tok=conv_tok,
            s_tok=ssm_tok,
        )
        return dataclasses.replace(self, mem=mem)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridModelMemory(_MambaStates):
    """The hybrid memory bound to one placed ubatch (the :class:`ModelMemory` protocol).

    Attributes:
        mem: the hybrid memory, already holding the ubatch's placement (``apply``).
        place: the ubatch's placement.
        n_seqs: the ubatch's number of seq sets.
        cfg: the hybrid config (static pytree metadata).
    """

    mem: jh.HybridMemory
    place: jh.Placement
    n_seqs: Scalar
    cfg: jh.HybridConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def seq_set(self) -> Int[Array, " ubatch"]:
        return self.place.seq_set

    def kv(self, attn_layer: int, k, v):
        layer = self.cfg.attn_layers[attn_layer]
        mem = jh.write_kv(self.mem, layer, k, v, self.place, self.cfg)
        k_all, v_all = jh.read_kv(mem, layer, self.cfg)
        return k_all, v_all, self.place.mask, dataclasses.replace(self, mem=mem)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _SpanModelMemory(_MambaStates):
    """The hybrid memory bound to one placed ubatch, attending over ``n_kv`` leading cells.

    Runs inside one branch of the span switch. K/V are never written here: the ubatch's rows are
    inserted into a copy of the span and collected in ``k_rows`` / ``v_rows``, and the caller
    writes them into the cache after the switch. The K/V buffers are thus only read inside the
    branch, so XLA keeps updating them in place instead of copying the whole cache out of the
    conditional every step.

    Attributes:
        mem: the hybrid memory holding the ubatch's placement; its K/V are read only.
        place: the placement, ``mask`` over the span (:func:`jaxhybrid.kq_mask`).
        n_seqs: the ubatch's number of seq sets.
        k_rows, v_rows: the ubatch's K/V rows per attention layer (None until the layer ran).
        cfg: the hybrid config (static).
        n_kv: the span (static).
        per_token: return every token the span of its own stream, ``[ubatch, n_kv, ...]``
            (``place.mask`` then is ``[ubatch, n_kv]``), instead of all streams' spans on one
            axis (static).
    """

    mem: jh.HybridMemory
    place: jh.Placement
    n_seqs: Scalar
    k_rows: tuple
    v_rows: tuple
    cfg: jh.HybridConfig = dataclasses.field(metadata=dict(static=True))
    n_kv: int = dataclasses.field(metadata=dict(static=True))
    per_token: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def seq_set(self) -> Int[Array, " ubatch"]:
        return self.place.seq_set

    def kv(self, attn_layer: int, k, v):
        layer = self.cfg.attn_layers[attn_layer]
        k_all, v_all = jh.read_kv(self.mem, layer, self.cfg, self.n_kv)
        k, v = k.astype(k_all.dtype), v.astype(v_all.dtype)
        # Every placed cell lies below n_kv <= span (§2.7), so the rows land inside the span.
        slot = self.place.kv
        flat = slot.stream * self.n_kv + slot.cell
        row = jnp.where(self.place.valid & slot.ok, flat, k_all.shape[0])
        k_all = k_all.at[row].set(k, mode="drop")
        v_all = v_all.at[row].set(v, mode="drop")
        if self.per_token:
            stream = jnp.clip(slot.stream, 0, self.cfg.kv.n_stream - 1)
            k_all = k_all.reshape(-1, self.n_kv, *k_all.shape[1:])[stream]
            v_all = v_all.reshape(-1, self.n_kv, *v_all.shape[1:])[stream]

        def put(rows, x):
            return (*rows[:attn_layer], x, *rows[attn_layer + 1 :])

        bound = dataclasses.replace(self, k_rows=put(self.k_rows, k), v_rows=put(self.v_rows, v))
        return k_all, v_all, self.place.mask, bound


def jamba_hybrid_config(
    config: JambaConfig,
    *,
    kv_size: int,
    n_seq_max: int,
    unified: bool = True,
    dtype=None,
    n_snapshots: int = 0,
) -> jh.HybridConfig:
    """The hybrid memory layout of a Jamba model.

    Mamba layers are recurrent with ``r_shape = (d_conv - 1, d_inner)`` (conv state) and
    ``s_shape = (d_inner, d_state)`` (SSM state, always float32); attention layers keep
    ``num_key_value_heads`` heads of ``head_dim``.

    Args:
        config: the model config.
        kv_size: KV cells per stream (the whole context when ``unified``).
        n_seq_max: number of sequence ids.
        unified: one KV stream shared by all sequences, else one per sequence.
        dtype: K/V and conv-state dtype (default: the model's dtype).
        n_snapshots: rollback horizon of the Mamba states (see
            :class:`~jaxhybrid.RecurrentConfig`; 0 = off).
    """
    layout = JambaModel(config).memory_layout()
    if dtype is not None:
        layout["dtype"] = dtype
    return layer_memory_config(
        **layout, kv_size=kv_size, n_seq_max=n_seq_max, unified=unified, n_snapshots=n_snapshots
    )


def hybrid_step_fn(
    forward_fn: Callable,
    graphdef: Any,
    cfg: jh.HybridConfig,
    *,
    used_span: bool = True,
    min_span: int = 256,
) -> Callable:
    """The ``step_fn(params, ubatch, mem, placement) -> (logits, mem)`` of :func:`jaxhybrid.decode`
    for any model whose forward runs against :class:`~jaxhybrid.models.ModelMemory`.

    Args:
        forward_fn: ``forward_fn(model, tokens, pos, valid, mem) -> (logits, mem)`` (as
            :func:`jaxhybrid.models.forward`).
        graphdef: the model's ``nnx.split`` graph definition, then ``params`` is its state; or
            ``None``, then ``params`` is the model module itself (a pytree in Flax >= 0.12).
        cfg: the hybrid config the memory was built with.
        used_span: attend over the smallest span of :func:`jaxhybrid.kv.n_kv_spans` that covers
            the used cells (§2.7), chosen at run time; False attends over every cell. Both give
            the same logits.
        min_span: the smallest span (llama.cpp pads ``n_kv`` to 256).

    With one KV stream per sequence (``unified=False``) and a ubatch of at most ``n_stream``
    tokens (decoding), each token attends over its own stream's span only, as llama.cpp's
    non-unified cache does, instead of over every stream's span under a mask: ``n_stream`` times
    fewer scores, for a copy of the span's K/V per token that is no larger than the span itself.
    """
    spans = jh.kv.n_kv_spans(cfg.kv.kv_size, min_span) if used_span else ()
    n_attn = len(cfg.attn_layers)
    n_stream = cfg.kv.n_stream

    def step_fn(params, ub, mem: jh.HybridMemory, place: jh.Placement):
        model = params if graphdef is None else nnx.merge(graphdef, params)
        if not used_span:
            bound = HybridModelMemory(mem=mem, place=place, n_seqs=ub.n_seqs, cfg=cfg)
            logits, bound = forward_fn(model, ub.token, ub.pos, ub.valid, bound)
            return logits, bound.mem

        per_token = n_stream > 1 and ub.token.shape[0] <= n_stream

        def run(span: int, recr):
            # Only the recurrent part and the new K/V rows leave the branch (see
            # _SpanModelMemory); the K/V buffers are read from the enclosing scope.
            mask = jh.kq_mask(mem, ub, place, cfg, span, own_stream=per_token)
            bound = _SpanModelMemory(
                mem=mem._replace(recurrent=recr),
                place=place._replace(mask=mask),
                n_seqs=ub.n_seqs,
                k_rows=(None,) * n_attn,
                v_rows=(None,) * n_attn,
                cfg=cfg,
                n_kv=span,
                per_token=per_token,
            )
            logits, bound = forward_fn(model, ub.token, ub.pos, ub.valid, bound)
            return logits, bound.mem.recurrent, bound.k_rows, bound.v_rows

        logits, recr, k_rows, v_rows = jh.kv.switch_span(place.n_kv, spans, run, mem.recurrent)
        mem = mem._replace(recurrent=recr)
        for i, layer in enumerate(cfg.attn_layers):
            if k_rows[i] is not None:
                mem = jh.write_kv(mem, layer, k_rows[i], v_rows[i], place, cfg)
        return logits, mem

    return step_fn


def jamba_step_fn(
    graphdef: Any, cfg: jh.HybridConfig, *, used_span: bool = True, min_span: int = 256
) -> Callable:
    """:func:`hybrid_step_fn` for Jamba (:func:`jaxhybrid.models.forward`)."""
    return hybrid_step_fn(forward, graphdef, cfg, used_span=used_span, min_span=min_span)


def layer_memory_config(
    layer_kinds,
    *,
    n_kv_heads: int,
    head_dim: int,
    r_shape: tuple[int, ...],
    s_shape: tuple[int, ...],
    kv_size: int,
    n_seq_max: int,
    unified: bool = True,
    dtype=jnp.float32,
    n_snapshots: int = 0,
    head_dim_v: int | None = None,
) -> jh.HybridConfig:
    """A hybrid memory layout from the parts serving each model layer.

    Args:
        layer_kinds: a :class:`jaxhybrid.LayerKind` per model layer (``BOTH`` for a layer with
            attention and a recurrent mixer side by side, ``NONE`` for an MLP-only layer).
        n_kv_heads, head_dim: the attention layers' KV heads and K width (``head_dim_v``: V's
            width when it differs).
        r_shape, s_shape: one sequence's conv (``r``) and SSM (``s``, kept in float32) state per
            recurrent layer.
        kv_size, n_seq_max, unified, n_snapshots: as :meth:`jaxhybrid.HybridModel.memory_config`.
        dtype: K/V and conv-state dtype.
    """
    kinds = tuple(jh.LayerKind(k) for k in layer_kinds)
    kv = jh.KVConfig(
        kv_size=kv_size,
        n_seq_max=n_seq_max,
        n_kv_heads=n_kv_heads,
        head_dim_k=head_dim,
        head_dim_v=head_dim_v,
        dtype_k=dtype,
        dtype_v=dtype,
        unified=unified,
    )
    recr = jh.RecurrentConfig(
        n_seq_max=n_seq_max,
        r_shape=tuple(r_shape),
        s_shape=tuple(s_shape),
        dtype_r=dtype,
        dtype_s=jnp.float32,
        n_snapshots=n_snapshots,
    )
    return jh.HybridConfig.from_layers(
        [k.recurrent for k in kinds],
        kv,
        recr,
        filter_attn=lambda il: kinds[il].attention,
        filter_recr=lambda il: kinds[il].recurrent,
    )


@dataclasses.dataclass(frozen=True)
class FlaxHybridModel(abc.ABC):
    """Base of the Flax model families' plug-ins (:class:`jaxhybrid.HybridModel`).

    A family subclasses it as a frozen dataclass and provides its forward
    (``forward_fn = staticmethod(...)``, see :func:`hybrid_step_fn`), its memory layout
    (:meth:`memory_layout`), its RoPE (:attr:`rope_fn`, None by default) and its tensor-parallel
    rules (:attr:`sharding_rules`); the rest is shared. Hashable by value (config and graphdef),
    so it is a static argument of every jitted serving function.

    Attributes:
        config: the family's config (frozen, hashable; ``vocab_size`` is the vocabulary).
        graphdef: the model's ``nnx.split`` graph definition when ``params`` is its state; None
            when ``params`` is the model module itself (a pytree in Flax >= 0.12).
        used_span: attend over the used cells only (see :func:`hybrid_step_fn`).
        min_span: the smallest attention span.
    """

    config: Any
    graphdef: Any = None
    used_span: bool = True
    min_span: int = 256

    forward_fn: ClassVar[Callable]
    sharding_rules: ClassVar[dict[tuple[str, ...], int]] = {}

    @property
    def n_vocab(self) -> int:
        return self.config.vocab_size

    @property
    def per_token_states(self) -> bool:
        # Every family's mixers hand each token's states to ``set_ssm_states``.
        return True

    @property
    def rope_fn(self) -> Callable | None:
        return None

    @abc.abstractmethod
    def memory_layout(self) -> dict[str, Any]:
        """The family's arguments of :func:`layer_memory_config` other than the sizes
        (``layer_kinds``, ``n_kv_heads``, ``head_dim``, ``r_shape``, ``s_shape``, ``dtype``)."""

    def memory_config(
        self, *, kv_size: int, n_seq_max: int, unified: bool = True, n_snapshots: int = 0
    ) -> jh.HybridConfig:
        return layer_memory_config(
            **self.memory_layout(),
            kv_size=kv_size,
            n_seq_max=n_seq_max,
            unified=unified,
            n_snapshots=n_snapshots,
        )

    def step_fn(self, cfg: jh.HybridConfig) -> jh.StepFn:
        return hybrid_step_fn(
            type(self).forward_fn,
            self.graphdef,
            cfg,
            used_span=self.used_span,
            min_span=self.min_span,
        )

    def param_specs(self, params, mesh):
        return rule_param_specs(params, mesh, self.sharding_rules)


@dataclasses.dataclass(frozen=True)
class JambaModel(FlaxHybridModel):
    """Jamba as a :class:`jaxhybrid.HybridModel` plug-in for :mod:`jaxhybrid.serving`.

    Hashable by value (its config and graphdef), so it is a static argument of every jitted
    serving function: two plug-ins of equal configs share compilations.

    Attributes:
        config: the model config.
        graphdef: the model's ``nnx.split`` graph definition when ``params`` is its state; None
            when ``params`` is the :class:`~jaxhybrid.models.Jamba` module itself (a pytree in
            Flax >= 0.12).
        used_span: attend over the used cells only (see :func:`jamba_step_fn`).
        min_span: the smallest attention span.

    Examples:
        >>> from jaxhybrid.models import JambaConfig
        >>> model = JambaModel(JambaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        ...     attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=4))
        >>> cfg = model.memory_config(kv_size=32, n_seq_max=2)
        >>> cfg.attn_layers, cfg.recurrent_layers, model.n_vocab
        ((1,), (0,), 16)
    """

    forward_fn = staticmethod(forward)

    def memory_layout(self) -> dict[str, Any]:
        c = self.config
        return dict(
            layer_kinds=[
                jh.LayerKind.RECURRENT if t == "mamba" else jh.LayerKind.ATTENTION
                for t in c.layer_types
            ],
            n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            r_shape=(c.mamba_d_conv - 1, c.d_inner),
            s_shape=(c.d_inner, c.mamba_d_state),
            dtype=c.jnp_dtype,
        )

    def param_specs(self, params, mesh):
        return jamba_param_specs(params, mesh)
