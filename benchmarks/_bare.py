"""A bare JAX decode loop of the same Jamba model: a fixed per-sequence cache, no cells, no
plans, no validation.

Sequence ``s`` owns row ``s`` of every buffer; the K/V of position ``p`` live at index ``p`` and
the conv/SSM states are one per sequence. Every step decodes exactly one token per sequence, so
there is nothing to plan or place. Attention runs over the leading power-of-two span of the
positions in use (the same ``lax.switch`` over :func:`jaxhybrid.kv.n_kv_spans` as the hybrid
memory); a decode token attends over its own sequence's row only, and the K/V rows and states are
written after the switch, as the hybrid adapter does with one KV stream per sequence; the two
therefore differ only in memory management.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxhybrid import kv as jkv
from jaxhybrid.models import forward


class BareState(NamedTuple):
    """Per-sequence buffers: ``k``/``v`` ``[attn_layers, seqs, n_ctx, kv_heads, head_dim]``,
    ``conv`` ``[mamba_layers, seqs, d_conv - 1, d_inner]``, ``ssm`` ``[mamba_layers, seqs,
    d_inner, d_state]`` and ``length [seqs]`` (positions held)."""

    k: jax.Array
    v: jax.Array
    conv: jax.Array
    ssm: jax.Array
    length: jax.Array


def init_bare(config, *, n_seq: int, n_ctx: int) -> BareState:
    """Zeroed buffers for a :class:`~jaxhybrid.models.JambaConfig`."""
    dt = config.jnp_dtype
    n_attn, n_mamba = len(config.attention_layers), len(config.mamba_layers)
    kv = (n_attn, n_seq, n_ctx, config.num_key_value_heads, config.head_dim)
    return BareState(
        k=jnp.zeros(kv, dt),
        v=jnp.zeros(kv, dt),
        conv=jnp.zeros((n_mamba, n_seq, config.mamba_d_conv - 1, config.d_inner), dt),
        ssm=jnp.zeros((n_mamba, n_seq, config.d_inner, config.mamba_d_state), jnp.float32),
        length=jnp.zeros((n_seq,), jnp.int32),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Bound:
    """The bare state bound to one ubatch (token ``t``: sequence ``tok_seq[t]``, position
    ``tok_pos[t]``; seq set ``s`` = sequence ``s``), attending over ``span`` positions."""

    state: BareState
    tok_seq: jax.Array
    tok_pos: jax.Array
    rows: tuple
    span: int = dataclasses.field(metadata=dict(static=True))

    @property
    def seq_set(self):
        return self.tok_seq

    def kv(self, attn_layer: int, k, v):
        n_seq = self.state.k.shape[1]
        k_all = self.state.k[attn_layer, :, : self.span].at[self.tok_seq, self.tok_pos].set(k)
        v_all = self.state.v[attn_layer, :, : self.span].at[self.tok_seq, self.tok_pos].set(v)
        rows = {**self.rows, ("kv", attn_layer): (k, v)}
        bound = dataclasses.replace(self, rows=rows)
        pos = jnp.arange(self.span, dtype=jnp.int32)
        if k.shape[0] <= n_seq:
            # Decoding: every token reads its own sequence's row (per-token K/V, see
            # ModelMemory.kv), as the hybrid memory does with one stream per sequence.
            mask = pos[None, :] <= self.tok_pos[:, None]
            return k_all[self.tok_seq], v_all[self.tok_seq], mask, bound
        # A prompt ubatch: every sequence's rows on one axis, masked to the token's own.
        cell_seq = jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), self.span)
        cell_pos = jnp.tile(pos, n_seq)
        mask = (cell_seq[None, :] == self.tok_seq[:, None]) & (
            cell_pos[None, :] <= self.tok_pos[:, None]
        )
        shape = (n_seq * self.span, *k.shape[1:])
        return k_all.reshape(shape), v_all.reshape(shape), mask, bound

    def ssm_states(self, mamba_layer: int):
        return self.state.conv[mamba_layer], self.state.ssm[mamba_layer]

    def set_ssm_states(self, mamba_layer: int, conv, ssm, *, conv_tok=None, ssm_tok=None):
        del conv_tok, ssm_tok  # no rollback snapshots here
        rows = {**self.rows, ("ssm", mamba_layer): (conv, ssm)}
        return dataclasses.replace(self, rows=rows)


def bare_step(model, state: BareState, tokens, tok_seq, tok_pos, spans):
    """Runs one ubatch and returns ``(logits, state)`` (lengths not advanced)."""
    n_kv = jnp.max(tok_pos) + 1

    def run(span, state):
        bound = _Bound(state, tok_seq, tok_pos, {}, span)
        valid = jnp.ones(tokens.shape, jnp.bool_)
        logits, bound = forward(model, tokens, tok_pos, valid, bound)
        return logits, bound.rows

    logits, rows = jkv.switch_span(n_kv, spans, run, state)
    k, v, conv, ssm = state.k, state.v, state.conv, state.ssm
    for (kind, i), (a, b) in sorted(rows.items()):
        if kind == "kv":
            k = k.at[i, tok_seq, tok_pos].set(a.astype(k.dtype))
            v = v.at[i, tok_seq, tok_pos].set(b.astype(v.dtype))
        else:
            conv = conv.at[i].set(a.astype(conv.dtype))
            ssm = ssm.at[i].set(b.astype(ssm.dtype))
    return logits, state._replace(k=k, v=v, conv=conv, ssm=ssm)


MAX_NEW = 128


@functools.partial(jax.jit, static_argnames="min_span", donate_argnames="state")
def bare_prefill(model, state: BareState, prompts, *, min_span: int = 256):
    """Runs ``prompts [seqs, P]`` (all of one length) in one ubatch; returns the greedy next token
    of every sequence and the state."""
    n_seq, p = prompts.shape
    spans = jkv.n_kv_spans(state.k.shape[2], min_span)
    seq = jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), p)
    pos = jnp.tile(jnp.arange(p, dtype=jnp.int32), n_seq)
    logits, state = bare_step(model, state, prompts.reshape(-1), seq, pos, spans)
    tok = jnp.argmax(logits.reshape(n_seq, p, -1)[:, -1], axis=-1).astype(jnp.int32)
    return tok, state._replace(length=state.length + p)


@functools.partial(jax.jit, static_argnames="min_span", donate_argnames="state")
def bare_decode(model, state: BareState, tok, n_steps, *, min_span: int = 256):
    """``n_steps`` (run-time, at most ``MAX_NEW``) greedy steps of one token per sequence from
    ``tok [seqs]``; returns ``[seqs, MAX_NEW]`` tokens (the first ``n_steps`` are set) and the
    state."""
    n_seq = tok.shape[0]
    spans = jkv.n_kv_spans(state.k.shape[2], min_span)
    seqs = jnp.arange(n_seq, dtype=jnp.int32)

    def body(i, carry):
        tok, state, out = carry
        logits, state = bare_step(model, state, tok, seqs, state.length, spans)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, state._replace(length=state.length + 1), out.at[:, i].set(tok)

    out = jnp.zeros((n_seq, MAX_NEW), jnp.int32)
    _, state, out = jax.lax.fori_loop(0, n_steps, body, (tok, state, out))
    return out, state
