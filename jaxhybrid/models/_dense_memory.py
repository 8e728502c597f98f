"""A plain reference memory for the model protocol: one fixed-capacity cache per sequence.

:class:`DenseMemory` keeps, per sequence id, K/V for ``n_ctx`` positions (the K/V of position
``p`` lives in cell ``p``) and one conv and SSM state per Mamba layer. It is obviously correct
rather than economical, and serves tests and small demos; the hybrid memory implements the same
:class:`~jaxhybrid.models.ModelMemory` protocol with shared cells, copy-on-write and the llama.cpp
sequence operations.

Binding a ubatch (:meth:`DenseMemory.bind`) records every slot's sequence and position and forms
the seq sets: each maximal run of consecutive slots of one sequence is a set. A sequence may form
at most one set per ubatch (two runs of one sequence would both start from the same state).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Float, Int

__all__ = ["DenseMemory", "init_dense_memory"]


class DenseMemory(NamedTuple):
    """Per-sequence caches plus the bound ubatch.

    Attributes:
        k: keys ``[attn_layers, seqs, n_ctx, kv_heads, head_dim]``.
        v: values, same shape.
        cell_pos: position held by each cell ``[seqs, n_ctx]`` (-1 empty).
        conv: conv states ``[mamba_layers, seqs, d_conv - 1, d_inner]`` (oldest input first).
        ssm: SSM states ``[mamba_layers, seqs, d_inner, d_state]``, float32.
        tok_seq: sequence of every slot of the bound ubatch (-1 padding).
        tok_pos: position of every slot of the bound ubatch (0 in padding).
        seq_set: seq set of every slot (-1 padding).
        set_seq: sequence of every seq set (-1 for unused sets); ``n_ubatch`` sets.
    """

    k: Float[Array, "attn_layers seqs ctx kv_heads head_dim"]
    v: Float[Array, "attn_layers seqs ctx kv_heads head_dim"]
    cell_pos: Int[Array, "seqs ctx"]
    conv: Float[Array, "mamba_layers seqs d_conv1 d_inner"]
    ssm: Float[Array, "mamba_layers seqs d_inner d_state"]
    tok_seq: Int[Array, " ubatch"]
    tok_pos: Int[Array, " ubatch"]
    seq_set: Int[Array, " ubatch"]
    set_seq: Int[Array, " sets"]

    @property
    def valid(self) -> Bool[Array, " ubatch"]:
        """Slots of the bound ubatch that hold a token."""
        return self.tok_seq >= 0

    @property
    def n_seq_max(self) -> int:
        return self.cell_pos.shape[0]

    def bind(self, seq_id: Int[Array, " ubatch"], pos: Int[Array, " ubatch"]) -> DenseMemory:
        """Binds the next ubatch: slot ``t`` holds position ``pos[t]`` of ``seq_id[t]`` (-1 for
        padding). Positions ``>= n_ctx`` and ids ``>= n_seq_max`` are dropped (not checked)."""
        n_ubatch = self.tok_seq.shape[0]
        if seq_id.shape != (n_ubatch,) or pos.shape != (n_ubatch,):
            raise jh.InvalidArgumentError(
                f"seq_id and pos must have shape ({n_ubatch},), got {seq_id.shape}, {pos.shape}"
            )
        seq_id = jnp.asarray(seq_id, jnp.int32)
        valid = seq_id >= 0
        pos = jnp.where(valid, jnp.asarray(pos, jnp.int32), 0)
        prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), seq_id[:-1]])
        start = valid & (seq_id != prev)
        seq_set = jnp.where(valid, jnp.cumsum(start.astype(jnp.int32)) - 1, -1)
        set_seq = jnp.full((n_ubatch,), -1, jnp.int32)
        set_seq = set_seq.at[jnp.where(start, seq_set, n_ubatch)].set(seq_id, mode="drop")
        row = jnp.where(valid, seq_id, self.n_seq_max)
        cell_pos = self.cell_pos.at[row, pos].set(pos, mode="drop")
        return self._replace(
            cell_pos=cell_pos,
            tok_seq=jnp.where(valid, seq_id, -1),
            tok_pos=pos,
            seq_set=seq_set.astype(jnp.int32),
            set_seq=set_seq,
        )

    def clear(self, seq: int) -> DenseMemory:
        """Forgets sequence ``seq`` (its cells and its recurrent states)."""
        return self._replace(
            cell_pos=self.cell_pos.at[seq].set(-1),
            conv=self.conv.at[:, seq].set(0),
            ssm=self.ssm.at[:, seq].set(0),
        )

    # ModelMemory protocol -------------------------------------------------------------------

    def kv(self, attn_layer: int, k, v):
        """Writes the bound ubatch's K/V and returns every sequence's cells with the mask."""
        row = jnp.where(self.valid, self.tok_seq, self.n_seq_max)
        new_k = self.k.at[attn_layer, row, self.tok_pos].set(k.astype(self.k.dtype), mode="drop")
        new_v = self.v.at[attn_layer, row, self.tok_pos].set(v.astype(self.v.dtype), mode="drop")
        n_seq, n_ctx = self.cell_pos.shape
        cell_seq = jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), n_ctx)
        cell_pos = self.cell_pos.reshape(n_seq * n_ctx)
        mask = (
            self.valid[:, None]
            & (self.tok_seq[:, None] == cell_seq[None, :])
            & (cell_pos[None, :] >= 0)
            & (cell_pos[None, :] <= self.tok_pos[:, None])
        )
        shape = (n_seq * n_ctx, *self.k.shape[3:])
        mem = self._replace(k=new_k, v=new_v)
        return new_k[attn_layer].reshape(shape), new_v[attn_layer].reshape(shape), mask, mem

    def ssm_states(self, mamba_layer: int):
        """Initial conv/SSM state of every seq set (zeros for unused sets)."""
        used = self.set_seq >= 0
        idx = jnp.clip(self.set_seq, 0, self.n_seq_max - 1)
        conv = jnp.where(used[:, None, None], self.conv[mamba_layer][idx], 0)
        ssm = jnp.where(used[:, None, None], self.ssm[mamba_layer][idx], 0)
        return conv, ssm

    def set_ssm_states(
        self, mamba_layer: int, conv, ssm, *, conv_tok=None, ssm_tok=None
    ) -> DenseMemory:
        """Stores every used set's final state into its sequence (no rollback snapshots here:
        the per-token states are ignored)."""
        del conv_tok, ssm_tok
        row = jnp.where(self.set_seq >= 0, self.set_seq, self.n_seq_max)
        return self._replace(
            conv=self.conv.at[mamba_layer, row].set(conv.astype(self.conv.dtype), mode="drop"),
            ssm=self.ssm.at[mamba_layer, row].set(ssm.astype(self.ssm.dtype), mode="drop"),
        )


def init_dense_memory(
    config, *, n_seq_max: int, n_ctx: int, n_ubatch: int, dtype=None
) -> DenseMemory:
    """An empty :class:`DenseMemory` for a :class:`~jaxhybrid.models.JambaConfig`.

    Args:
        config: the model config (layer kinds and widths).
        n_seq_max: number of sequence ids.
        n_ctx: positions kept per sequence.
        n_ubatch: token slots of every ubatch bound to it (also the number of seq sets).
        dtype: K/V and conv-state dtype (default: the model's); SSM states are float32.
    """
    for name, value in (("n_seq_max", n_seq_max), ("n_ctx", n_ctx), ("n_ubatch", n_ubatch)):
        if not isinstance(value, int) or value < 1:
            raise jh.InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    dtype = config.jnp_dtype if dtype is None else dtype
    n_attn, n_mamba = len(config.attention_layers), len(config.mamba_layers)
    kv_shape = (n_attn, n_seq_max, n_ctx, config.num_key_value_heads, config.head_dim)
    d_inner, d_conv1 = config.d_inner, config.mamba_d_conv - 1

    # Built with NumPy: creating a memory compiles nothing.
    def full(shape, value, dt):
        return jnp.asarray(np.full(shape, value, dtype=jnp.dtype(dt)))

    return DenseMemory(
        k=full(kv_shape, 0, dtype),
        v=full(kv_shape, 0, dtype),
        cell_pos=full((n_seq_max, n_ctx), -1, jnp.int32),
        conv=full((n_mamba, n_seq_max, d_conv1, d_inner), 0, dtype),
        ssm=full((n_mamba, n_seq_max, d_inner, config.mamba_d_state), 0, jnp.float32),
        tok_seq=full((n_ubatch,), -1, jnp.int32),
        tok_pos=full((n_ubatch,), 0, jnp.int32),
        seq_set=full((n_ubatch,), -1, jnp.int32),
        set_seq=full((n_ubatch,), -1, jnp.int32),
    )
