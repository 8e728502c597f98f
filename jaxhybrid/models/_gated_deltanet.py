"""The Gated DeltaNet (GDN) mixer over a ubatch of several seq sets (Qwen3-Next, Qwen3.5).

The seq-set conventions are those of :mod:`jaxhybrid.models._mamba` (contiguous sets, padding
slots with ``seq_set == -1`` between or after sets that change no state); the causal conv over the
mixed q/k/v channels is :func:`jaxhybrid.models._mamba.causal_conv`, whose window is the layer's
recurrent ``r`` state.

Each value head keeps a state ``S[k_head_dim, v_head_dim]`` (the ``s`` state, float32). Per token,
with L2-normalised ``q`` and ``k`` (``q`` also scaled by ``k_head_dim ** -0.5``), a decay
``g <= 0`` (log space) and a write strength ``beta`` in ``(0, 1)``::

    S = exp(g) * S
    S = S + outer(k, beta * (v - S^T k))      # the delta rule: correct what S predicts for k
    y = S^T q

A query/key head serves ``v_heads / k_heads`` consecutive value heads (transformers'
``repeat_interleave``). :func:`gated_delta_rule` computes the recurrence one token at a time or in
the chunked parallel form of the Gated DeltaNet paper (Yang et al., 2024): inside a chunk the
delta-rule updates are condensed by a unit lower-triangular solve (the UT transform) into matmuls,
and only the chunk-entry states are scanned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Float, Int
from jaxhybrid.models._mamba import Linear, ParamInit, SetSpans, causal_conv, set_spans

__all__ = ["GDN_CHUNK_SIZE", "GDN_RECURRENT_MAX_TOKENS", "GatedDeltaNet", "gated_delta_rule"]

GDN_CHUNK_SIZE = 64
"""Chunk length of the chunked form (transformers' and the FLA kernels' default)."""

# ``method="auto"`` runs the one-step recurrence for ubatches of at most this many token slots
# (decode steps, a few drafted tokens when verifying) and the chunked form above (prompts), as
# the Mamba-2 mixer does (``SSD_RECURRENT_MAX_TOKENS``).
GDN_RECURRENT_MAX_TOKENS = 16

_METHODS = ("auto", "recurrent", "chunked")


def l2norm(x: Float[Array, "... d"], eps: float = 1e-6) -> Float[Array, "... d"]:
    """``x / sqrt(sum(x ** 2) + eps)`` over the last axis (the FLA kernels' form)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_delta_rule(
    q: Float[Array, "ubatch heads dk"],
    k: Float[Array, "ubatch heads dk"],
    v: Float[Array, "ubatch heads dv"],
    g: Float[Array, "ubatch heads"],
    beta: Float[Array, "ubatch heads"],
    s0: Float[Array, "sets heads dk dv"],
    spans: SetSpans,
    *,
    chunk_size: int = GDN_CHUNK_SIZE,
    method: str = "auto",
) -> tuple[
    Float[Array, "ubatch heads dv"],
    Float[Array, "sets heads dk dv"],
    Float[Array, "ubatch heads dk dv"],
]:
    """The gated delta rule per seq set, from ``s0`` at each set's start (module docstring).

    Args:
        q, k: queries and keys, already L2-normalised, ``q`` scaled, repeated to the value heads.
        v: values.
        g: log decay per token and head (``<= 0``).
        beta: write strength per token and head.
        s0: every set's initial state, float32.
        spans: from :func:`jaxhybrid.models._mamba.set_spans`.
        chunk_size: chunk length of the chunked form.
        method: ``"recurrent"`` (one token at a time, a scan over the ubatch), ``"chunked"`` (the
            chunked parallel form) or ``"auto"``: recurrent for ubatches of at most
            :data:`GDN_RECURRENT_MAX_TOKENS` slots, chunked above (a static choice).

    Returns:
        ``(y, s, s_tok)``: the outputs (garbage but finite in padding slots), every set's final
        state (``s0`` for empty sets) and the state after every token slot (a padding slot holds
        the state of the slot before it; for rollback snapshots, dropped by XLA when unused). All
        float32.
    """
    if method not in _METHODS:
        raise jh.InvalidArgumentError(
            f"method must be 'auto', 'recurrent' or 'chunked', got {method!r}"
        )
    if chunk_size < 1:
        raise jh.InvalidArgumentError(f"chunk_size must be positive, got {chunk_size}")
    if method == "auto":
        method = "recurrent" if q.shape[0] <= GDN_RECURRENT_MAX_TOKENS else "chunked"
    q, k, v, g, beta, s0 = (x.astype(jnp.float32) for x in (q, k, v, g, beta, s0))
    # Padding slots are identities: no decay, no write.
    valid = spans.valid
    g = jnp.where(valid[:, None], g, 0.0)
    beta = jnp.where(valid[:, None], beta, 0.0)
    if method == "recurrent":
        return _recurrent(q, k, v, g, beta, s0, spans)
    return _chunked(q, k, v, g, beta, s0, spans, chunk_size)


def _recurrent(q, k, v, g, beta, s0, spans):
    """:func:`gated_delta_rule` as one scan over the ubatch's token slots."""
    n_tokens = q.shape[0]
    t = jnp.arange(n_tokens, dtype=jnp.int32)
    start = spans.valid & (t == spans.first[spans.set_idx])

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t, start_t, valid_t, set_t = xs
        s = jnp.where(start_t, s0[set_t], s)
        s_dec = s * jnp.exp(g_t)[:, None, None]
        kv_mem = jnp.einsum("hkv,hk->hv", s_dec, k_t)
        delta = (v_t - kv_mem) * b_t[:, None]
        s_new = s_dec + k_t[:, :, None] * delta[:, None, :]
        s_new = jnp.where(valid_t, s_new, s)
        return s_new, (jnp.einsum("hkv,hk->hv", s_new, q_t), s_new)

    xs = (q, k, v, g, beta, start, spans.valid, spans.set_idx)
    _, (y, s_tok) = jax.lax.scan(step, jnp.zeros_like(s0[0]), xs)
    final = s_tok[jnp.clip(spans.last, 0, n_tokens - 1)]
    s = jnp.where((spans.count > 0)[:, None, None, None], final, s0)
    return y, s, s_tok


def _chunked(q, k, v, g, beta, s0, spans, chunk_size):
    """:func:`gated_delta_rule` in the chunked form.

    The ubatch is padded to whole chunks. Every slot belongs to a *run*: the set whose tokens
    last started at or before it (padding slots continue the run before them as identities).
    Tokens interact only within their run. A token's run starts inside its chunk (then the run
    enters from the set's ``s0``) or continues from the chunk before (then from the chunk-entry
    state), and its decays are counted from that entry. Within a chunk, the UT transform
    ``(I + L) [u, w] = [beta v, beta k exp(G)]`` (``L`` the strictly lower, same-run part of
    ``beta k k^T`` times the pairwise decays) gives the new values ``v_new = u - w S_entry`` that
    the delta rule writes; the chunk-entry states come from a scan over chunks.
    """
    n_tokens, n_heads, dk = q.shape
    dv = v.shape[-1]
    size = min(chunk_size, n_tokens)
    n_chunks = -(-n_tokens // size)
    pad = n_chunks * size - n_tokens
    t = jnp.arange(n_tokens, dtype=jnp.int32)

    start = spans.valid & (t == spans.first[spans.set_idx])
    run = jnp.cumsum(start.astype(jnp.int32))
    run_start = jax.lax.cummax(jnp.where(start, t, -1), axis=0)
    run_set = spans.set_idx[jnp.clip(run_start, 0, n_tokens - 1)]

    def chunked(x, mode="constant"):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode)
        return x.reshape((n_chunks, size, *x.shape[1:]))

    def heads_first(x):  # [C, Q, H, ...] -> [C, H, Q, ...]
        return jnp.moveaxis(x, 2, 1)

    run_c = chunked(run, "edge")  # padding after the ubatch continues the last run
    run_set_c = chunked(run_set, "edge")
    run_start_c = chunked(run_start, "edge")
    chunk_first = (jnp.arange(n_chunks, dtype=jnp.int32) * size)[:, None]
    cont = run_start_c < chunk_first  # [C, Q]: the token's run entered from the chunk before
    from_idx = jnp.where(cont, 0, run_start_c - chunk_first)

    qc, kc, vc = (heads_first(chunked(x)) for x in (q, k, v))  # [C, H, Q, d]
    gc, bc = (heads_first(chunked(x)) for x in (g, beta))  # [C, H, Q]
    cum = jnp.cumsum(gc, axis=-1)
    # Log decay from the run's entry: the whole chunk prefix when the run continues, else from
    # the token the run starts at (its own decay included).
    from_h = jnp.broadcast_to(from_idx[:, None, :], cum.shape)
    before = jnp.take_along_axis(cum - gc, from_h, axis=-1)
    base = cum - jnp.where(cont[:, None, :], 0.0, before)

    idx = jnp.arange(size)
    same = run_c[:, :, None] == run_c[:, None, :]  # [C, Q(l), Q(j)]
    incl = (same & (idx[None, :, None] >= idx[None, None, :]))[:, None]  # j <= l
    strict = (same & (idx[None, :, None] > idx[None, None, :]))[:, None]  # j < l
    diff = cum[..., :, None] - cum[..., None, :]  # [C, H, Q(l), Q(j)]
    decay = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)

    kb = kc * bc[..., None]
    lower = jnp.where(strict, jnp.einsum("chld,chjd->chlj", kb, kc) * decay, 0.0)
    system = lower + jnp.eye(size, dtype=jnp.float32)[None, None]
    rhs = jnp.concatenate([vc * bc[..., None], kb * jnp.exp(base)[..., None]], axis=-1)
    solved = jax.lax.linalg.triangular_solve(
        system, rhs, left_side=True, lower=True, unit_diagonal=True
    )
    u, w = solved[..., :dv], solved[..., dv:]  # [C, H, Q, dv], [C, H, Q, dk]

    # Reads of the set's s0 by tokens whose run starts inside their chunk (s0 gathered per
    # token; used only where the run does not continue from the chunk before).
    s0_tok = jnp.moveaxis(s0[run_set_c], 2, 1)  # [C, H, Q, dk, dv]
    qd = qc * jnp.exp(base)[..., None]
    w_s0 = jnp.sum(w[..., :, None] * s0_tok, axis=-2)
    q_s0 = jnp.sum(qd[..., :, None] * s0_tok, axis=-2)

    # The scan over chunks: the state entering each chunk and the chunk's new values.
    end_cont = cont[:, -1]
    end_init = s0[run_set_c[:, -1]]  # [C, H, dk, dv]
    end_decay = jnp.exp(base[..., -1])  # [C, H]
    k_end = kc * decay[..., -1, :][..., None]  # k_j decayed to the chunk's last slot

    def chunk_step(s, xs):
        u_c, w_c, ws0_c, cont_c, end_cont_c, end_init_c, end_decay_c, k_end_c = xs
        w_s = jnp.einsum("hqk,hkv->hqv", w_c, s)
        v_new = u_c - jnp.where(cont_c[None, :, None], w_s, ws0_c)
        s_in = jnp.where(end_cont_c, s, end_init_c)
        s_end = end_decay_c[:, None, None] * s_in + jnp.einsum("hqk,hqv->hkv", k_end_c, v_new)
        return s_end, (s, v_new)

    xs = (u, w, w_s0, cont, end_cont, end_init, end_decay, k_end)
    _, (s_entry, v_new) = jax.lax.scan(chunk_step, jnp.zeros_like(s0[0]), xs)

    attn = jnp.einsum("chld,chjd->chlj", qc, kc) * decay
    y = jnp.where(cont[:, None, :, None], jnp.einsum("chqk,chkv->chqv", qd, s_entry), q_s0)
    y = y + jnp.einsum("chlj,chjv->chlv", attn, v_new)
    y = jnp.moveaxis(y, 1, 2).reshape((n_chunks * size, n_heads, dv))[:n_tokens]

    def flat(x):  # [C, H, Q, ...] -> [T, H, ...]
        x = jnp.moveaxis(x, 1, 2)
        return x.reshape((n_chunks * size, *x.shape[2:]))[:n_tokens]

    # Final state of every set, at its last slot: the state its run entered that slot's chunk
    # with, decayed, plus the set's writes in that chunk decayed to the slot (a segment sum over
    # tokens, so that the per-token states below cost nothing unless they are used).
    n_sets = s0.shape[0]
    last = jnp.clip(spans.last, 0, n_tokens - 1)
    cum_t, base_t, v_new_t = flat(cum), flat(base), flat(v_new)
    set_last = last[spans.set_idx]
    in_last_chunk = spans.valid & (t // size == set_last // size)
    to_last = jnp.where(in_last_chunk[:, None], cum_t[set_last] - cum_t, 0.0)
    w_k = jnp.where(in_last_chunk[:, None], jnp.exp(to_last), 0.0)[..., None] * k
    writes = w_k[..., :, None] * v_new_t[..., None, :]  # [T, H, dk, dv]
    seg = jnp.where(in_last_chunk, spans.set_idx, n_sets)
    final_writes = jax.ops.segment_sum(writes, seg, n_sets + 1)[:n_sets]
    cont_t = cont.reshape(-1)[:n_tokens]
    init_last = jnp.where(cont_t[last][:, None, None, None], s_entry[last // size], s0)
    final = jnp.exp(base_t[last])[..., None, None] * init_last + final_writes
    s = jnp.where((spans.count > 0)[:, None, None, None], final, s0)

    # State after every slot (only when used): inside every chunk, all chunks at once from the
    # states entering them, S = exp(g) * S + outer(k, v_new) with the new values known; a run's
    # first slot starts from its set's s0 instead.
    def token_step(state, xs):
        g_q, k_q, v_q, start_q, set_q = xs  # slot q of every chunk
        state = jnp.where(start_q[:, None, None, None], s0[set_q], state)
        state = jnp.exp(g_q)[..., None, None] * state + k_q[..., :, None] * v_q[..., None, :]
        return state, state

    xs = (
        jnp.moveaxis(gc, 2, 0),  # [Q, C, H]
        jnp.moveaxis(kc, 2, 0),  # [Q, C, H, dk]
        jnp.moveaxis(v_new, 2, 0),  # [Q, C, H, dv]
        jnp.moveaxis(chunked(start), 1, 0),  # [Q, C]
        jnp.moveaxis(run_set_c, 1, 0),
    )
    _, s_tok = jax.lax.scan(token_step, s_entry, xs)  # [Q, C, H, dk, dv]
    s_tok = jnp.swapaxes(s_tok, 0, 1).reshape((n_chunks * size, n_heads, dk, dv))[:n_tokens]
    return y, s, s_tok


class HeadRMSNormGated(nnx.Module):
    """Per-head RMSNorm of the GDN output gated by ``silu(z)``: ``weight * norm(y) *
    silu(z)`` over each head's ``v_head_dim`` features (transformers' ``Qwen3NextRMSNormGated``,
    norm before the gate)."""

    def __init__(self, dim: int, eps: float, init: ParamInit):
        self.weight = init.constant(1.0, dim)
        self.eps = eps

    def __call__(
        self, y: Float[Array, "ubatch heads dv"], z: Float[Array, "ubatch heads dv"]
    ) -> Float[Array, "ubatch heads dv"]:
        dtype = z.dtype
        y32 = y.astype(jnp.float32)
        var = jnp.mean(y32 * y32, axis=-1, keepdims=True)
        normed = (y32 * jax.lax.rsqrt(var + self.eps)).astype(dtype)
        out = self.weight[...].astype(dtype)[None, None, :] * normed
        return (out.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(dtype)


class GatedDeltaNet(nnx.Module):
    """The Gated DeltaNet mixer: input projections, causal depthwise conv + SiLU over the mixed
    ``q``/``k``/``v`` channels, L2-normalised ``q``/``k``, ``g = -exp(A_log) * softplus(a +
    dt_bias)``, ``beta = sigmoid(b)``, the gated delta rule, the gated per-head RMSNorm, out_proj.

    Two projection layouts, as the checkpoints store them:

    - ``fused`` (Qwen3-Next): ``in_proj_qkvz`` and ``in_proj_ba``, grouped per key head: for each
      of the ``k_heads`` heads, ``[q, k, v (ratio heads), z (ratio heads)]`` and ``[b (ratio),
      a (ratio)]``, ``ratio = v_heads / k_heads``;
    - separate (Qwen3.5): ``in_proj_qkv`` (``[q, k, v]`` flat), ``in_proj_z``, ``in_proj_b``,
      ``in_proj_a``.

    Kernels are ``[in, out]``; the conv weight is ``[d_conv, conv_dim]`` (transformers'
    ``conv1d.weight[:, 0, :].T``), ``conv_dim = 2 * k_heads * dk + v_heads * dv``. Memory shapes:
    ``r_shape = (d_conv - 1, conv_dim)``, ``s_shape = (v_heads, dk, dv)`` (float32).

    Attributes:
        method: the :func:`gated_delta_rule` method (``"auto"``; tests may pin one).
    """

    def __init__(
        self,
        hidden_size: int,
        init: ParamInit,
        *,
        k_heads: int,
        v_heads: int,
        k_head_dim: int,
        v_head_dim: int,
        d_conv: int,
        norm_eps: float,
        fused: bool,
        chunk_size: int = GDN_CHUNK_SIZE,
    ):
        if v_heads % k_heads:
            raise jh.InvalidArgumentError(
                f"{v_heads} value heads do not split over {k_heads} key heads"
            )
        if d_conv < 2:
            raise jh.InvalidArgumentError(f"d_conv must be >= 2, got {d_conv}")
        h = hidden_size
        self.key_dim, self.value_dim = k_heads * k_head_dim, v_heads * v_head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        if fused:
            self.in_proj_qkvz = Linear(h, 2 * self.key_dim + 2 * self.value_dim, init)
            self.in_proj_ba = Linear(h, 2 * v_heads, init)
        else:
            self.in_proj_qkv = Linear(h, self.conv_dim, init)
            self.in_proj_z = Linear(h, self.value_dim, init)
            self.in_proj_b = Linear(h, v_heads, init)
            self.in_proj_a = Linear(h, v_heads, init)
        self.conv_weight = init.normal(d_conv, self.conv_dim)
        self.dt_bias = init.constant(1.0, v_heads)
        self.A_log = init.constant(np.log(np.arange(1, v_heads + 1, dtype=np.float32)), v_heads)
        self.norm = HeadRMSNormGated(v_head_dim, norm_eps, init)
        self.out_proj = Linear(self.value_dim, h, init)
        self.k_heads, self.v_heads = k_heads, v_heads
        self.k_head_dim, self.v_head_dim = k_head_dim, v_head_dim
        self.fused, self.chunk_size = fused, chunk_size
        self.method = "auto"

    def _project(self, x):
        """``(mixed_qkv [T, conv_dim], z [T, v_heads, dv], b [T, v_heads], a [T, v_heads])``."""
        n_tok = x.shape[0]
        nk, dk, dv = self.k_heads, self.k_head_dim, self.v_head_dim
        ratio = self.v_heads // nk
        if not self.fused:
            z = self.in_proj_z(x).reshape(n_tok, self.v_heads, dv)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        qkvz = self.in_proj_qkvz(x).reshape(n_tok, nk, 2 * dk + 2 * ratio * dv)
        q, k = qkvz[..., :dk], qkvz[..., dk : 2 * dk]
        v = qkvz[..., 2 * dk : 2 * dk + ratio * dv]
        z = qkvz[..., 2 * dk + ratio * dv :].reshape(n_tok, self.v_heads, dv)
        ba = self.in_proj_ba(x).reshape(n_tok, nk, 2 * ratio)
        b = ba[..., :ratio].reshape(n_tok, self.v_heads)
        a = ba[..., ratio:].reshape(n_tok, self.v_heads)
        mixed = jnp.concatenate(
            [q.reshape(n_tok, -1), k.reshape(n_tok, -1), v.reshape(n_tok, -1)], axis=-1
        )
        return mixed, z, b, a

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        seq_set: Int[Array, " ubatch"],
        conv0: Float[Array, "sets d_conv1 conv_dim"],
        s0: Float[Array, "sets v_heads dk dv"],
    ) -> tuple[
        Float[Array, "ubatch hidden"],
        Float[Array, "sets d_conv1 conv_dim"],
        Float[Array, "sets v_heads dk dv"],
        tuple[Float[Array, "ubatch d_conv1 conv_dim"], Float[Array, "ubatch v_heads dk dv"]],
    ]:
        """Mixes the ubatch and returns ``(out, conv, s, (conv_tok, s_tok))``: every set's final
        states and the states after every token slot (what rollback snapshots keep)."""
        n_tok = x.shape[0]
        nk, dk, dv, nv = self.k_heads, self.k_head_dim, self.v_head_dim, self.v_heads
        spans = set_spans(seq_set, conv0.shape[0])
        mixed, z, b, a = self._project(x)
        mixed, conv, conv_tok = causal_conv(
            mixed, conv0.astype(mixed.dtype), self.conv_weight[...], None, spans
        )
        mixed = jax.nn.silu(mixed).astype(jnp.float32)
        q = mixed[:, : self.key_dim].reshape(n_tok, nk, dk)
        k = mixed[:, self.key_dim : 2 * self.key_dim].reshape(n_tok, nk, dk)
        v = mixed[:, 2 * self.key_dim :].reshape(n_tok, nv, dv)
        q = l2norm(q) * (dk**-0.5)
        k = l2norm(k)
        q, k = (jnp.repeat(t, nv // nk, axis=1) for t in (q, k))
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        a_pos = jnp.exp(self.A_log[...].astype(jnp.float32))
        dt = jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)[None, :])
        g = -a_pos[None, :] * dt
        y, s, s_tok = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            s0.astype(jnp.float32),
            spans,
            chunk_size=self.chunk_size,
            method=self.method,
        )
        y = self.norm(y.astype(x.dtype), z)
        return self.out_proj(y.reshape(n_tok, self.value_dim)), conv, s, (conv_tok, s_tok)
