"""Runs a protocol model (Jamba) on the hybrid memory.

:class:`HybridModelMemory` implements :class:`~jaxhybrid.models.ModelMemory` over the hybrid
memory bound to one placed ubatch: ``(HybridMemory, Placement, n_seqs)`` are the pytree's data and
the :class:`~jaxhybrid.HybridConfig` is static metadata, so it crosses ``jit`` and
``lax.while_loop`` boundaries like any pytree. :func:`jamba_step_fn` wraps
:func:`~jaxhybrid.models.forward` into the ``step_fn`` that :func:`jaxhybrid.decode` runs.

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
from jaxhybrid._config import KVConfig, RecurrentConfig
from jaxhybrid._typing import Array, Int, Scalar
from jaxhybrid.models.jamba import JambaConfig, forward

__all__ = ["HybridModelMemory", "jamba_hybrid_config", "jamba_step_fn"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridModelMemory:
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

    def ssm_states(self, mamba_layer: int):
        layer = self.cfg.recr_layers[mamba_layer]
        return hy.read_states(self.mem, self.cfg, layer, self.place)

    def set_ssm_states(self, mamba_layer: int, conv, ssm) -> HybridModelMemory:
        layer = self.cfg.recr_layers[mamba_layer]
        mem = hy.write_states(self.mem, self.cfg, layer, self.place, conv, ssm, self.n_seqs)
        return dataclasses.replace(self, mem=mem)


def jamba_hybrid_config(
    config: JambaConfig,
    *,
    kv_size: int,
    n_seq_max: int,
    unified: bool = True,
    dtype=None,
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
    )
    return hy.HybridConfig.from_layers([t == "mamba" for t in config.layer_types], kv, recr)


def jamba_step_fn(graphdef: Any, cfg: hy.HybridConfig) -> Callable:
    """The ``step_fn(params, ubatch, mem, placement) -> (logits, mem)`` of :func:`jaxhybrid.decode`
    for Jamba.

    Args:
        graphdef: the model's ``nnx.split`` graph definition, then ``params`` is its state; or
            ``None``, then ``params`` is the :class:`~jaxhybrid.models.Jamba` module itself (a
            pytree in Flax >= 0.12).
        cfg: the hybrid config the memory was built with.
    """

    def step_fn(params, ub, mem: hy.HybridMemory, place: hy.Placement):
        model = params if graphdef is None else nnx.merge(graphdef, params)
        bound = HybridModelMemory(mem=mem, place=place, n_seqs=ub.n_seqs, cfg=cfg)
        logits, bound = forward(model, ub.token, ub.pos, ub.valid, bound)
        return logits, bound.mem

    return step_fn
