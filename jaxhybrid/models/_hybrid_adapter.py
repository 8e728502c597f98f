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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxhybrid import _hybrid as hy
from jaxhybrid import _kv_cache as kvc
from jaxhybrid._config import KVConfig, RecurrentConfig
from jaxhybrid._typing import Array, Int, Scalar
from jaxhybrid.models.jamba import JambaConfig, forward

__all__ = ["HybridModelMemory", "jamba_hybrid_config", "jamba_step_fn"]


class _MambaStates:
    """The Mamba-state half of :class:`~jaxhybrid.models.ModelMemory`, shared by both bindings
    below (they have ``mem``, ``place``, ``n_seqs`` and ``cfg``)."""

    def ssm_states(self, mamba_layer: int):
        layer = self.cfg.recurrent_layers[mamba_layer]
        return hy.read_states(self.mem, self.cfg, layer, self.place)

    def set_ssm_states(self, mamba_layer: int, conv, ssm, *, conv_tok=None, ssm_tok=None):
        layer = self.cfg.recurrent_layers[mamba_layer]
        mem = hy.write_states(
            self.mem,
            self.cfg,
            layer,
            self.place,
            conv,
            ssm,
            self.n_seqs,
            r_tok=conv_tok,
            s_tok=ssm_tok,
        )
        return dataclasses.replace(self, mem=mem)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridModelMemory(_MambaStates):
    """The hybrid memory bound to one placed ubatch (the :class:`ModelMemory` protocol).

    Attributes:
        mem: the hybrid memory, already holding the ubatch's placement (``apply_ubatch``).
        place: the ubatch's placement.
        n_seqs: the ubatch's number of seq sets.
        cfg: the hybrid config (static pytree metadata).
    """

    mem: hy.HybridMemory
    place: hy.Placement
    n_seqs: Scalar
    cfg: hy.HybridConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def seq_set(self) -> Int[Array, " ubatch"]:
        return self.place.seq_set

    def kv(self, attn_layer: int, k, v):
        layer = self.cfg.attn_layers[attn_layer]
        mem = hy.write_kv(self.mem, self.cfg, layer, k, v, self.place)
        k_all, v_all = hy.read_kv(mem, self.cfg, layer)
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

    mem: hy.HybridMemory
    place: hy.Placement
    n_seqs: Scalar
    k_rows: tuple
    v_rows: tuple
    cfg: hy.HybridConfig = dataclasses.field(metadata=dict(static=True))
    n_kv: int = dataclasses.field(metadata=dict(static=True))
    per_token: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def seq_set(self) -> Int[Array, " ubatch"]:
        return self.place.seq_set

    def kv(self, attn_layer: int, k, v):
        layer = self.cfg.attn_layers[attn_layer]
        k_all, v_all = hy.read_kv(self.mem, self.cfg, layer, self.n_kv)
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
) -> hy.HybridConfig:
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
    dtype = config.jnp_dtype if dtype is None else dtype
    kv = KVConfig(
        kv_size=kv_size,
        n_seq_max=n_seq_max,
        n_kv_heads=config.num_key_value_heads,
        head_dim_k=config.head_dim,
        dtype_k=dtype,
        dtype_v=dtype,
        unified=unified,
    )
    recr = RecurrentConfig(
        n_seq_max=n_seq_max,
        r_shape=(config.mamba_d_conv - 1, config.d_inner),
        s_shape=(config.d_inner, config.mamba_d_state),
        dtype_r=dtype,
        dtype_s=jnp.float32,
        n_snapshots=n_snapshots,
    )
    return hy.HybridConfig.from_layers([t == "mamba" for t in config.layer_types], kv, recr)


def jamba_step_fn(
    graphdef: Any, cfg: hy.HybridConfig, *, used_span: bool = True, min_span: int = 256
) -> Callable:
    """The ``step_fn(params, ubatch, mem, placement) -> (logits, mem)`` of :func:`jaxhybrid.decode`
    for Jamba.

    Args:
        graphdef: the model's ``nnx.split`` graph definition, then ``params`` is its state; or
            ``None``, then ``params`` is the :class:`~jaxhybrid.models.Jamba` module itself (a
            pytree in Flax >= 0.12).
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
    spans = kvc.n_kv_spans(cfg.kv.kv_size, min_span) if used_span else ()
    n_attn = len(cfg.attn_layers)
    n_stream = cfg.kv.n_stream

    def step_fn(params, ub, mem: hy.HybridMemory, place: hy.Placement):
        model = params if graphdef is None else nnx.merge(graphdef, params)
        if not used_span:
            bound = HybridModelMemory(mem=mem, place=place, n_seqs=ub.n_seqs, cfg=cfg)
            logits, bound = forward(model, ub.token, ub.pos, ub.valid, bound)
            return logits, bound.mem

        per_token = n_stream > 1 and ub.token.shape[0] <= n_stream

        def run(span: int, recr):
            # Only the recurrent part and the new K/V rows leave the branch (see
            # _SpanModelMemory); the K/V buffers are read from the enclosing scope.
            mask = hy.kq_mask(mem, cfg, ub, place, span, own_stream=per_token)
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
            logits, bound = forward(model, ub.token, ub.pos, ub.valid, bound)
            return logits, bound.mem.recurrent, bound.k_rows, bound.v_rows

        logits, recr, k_rows, v_rows = kvc.switch_span(place.n_kv, spans, run, mem.recurrent)
        mem = mem._replace(recurrent=recr)
        for i, layer in enumerate(cfg.attn_layers):
            if k_rows[i] is not None:
                mem = hy.write_kv(mem, cfg, layer, k_rows[i], v_rows[i], place)
        return logits, mem

    return step_fn
