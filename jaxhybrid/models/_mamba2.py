"""The Mamba-2 (SSD) mixer over a ubatch of several seq sets.

Used by Bamba, Granite-4.0-H (transformers' ``granitemoehybrid``), Nemotron-H and Falcon-H1. The
seq-set conventions are those of :mod:`jaxhybrid.models._mamba` (contiguous sets, padding slots with
``seq_set == -1`` between or after sets that change no state); the causal conv is
:func:`jaxhybrid.models._mamba.causal_conv`, run over the concatenated ``x``, ``B`` and ``C``
channels.

Mamba-2's state is per head: ``h[H, P, N]`` with one scalar decay ``exp(dt * A)`` per head and
token, and ``B``/``C`` shared by the heads of a group (head ``h`` reads group
``h // (n_heads // n_groups)``, transformers' ``repeat_interleave``). :func:`ssd` computes the
recurrence either one step at a time (:func:`jaxhybrid.models._mamba.selective_scan` on the heads
flattened into channels) or in SSD's chunked form, where each chunk's outputs are masked matmuls
and only the chunk states are scanned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Float, Int
from jaxhybrid.models._mamba import (
    Linear,
    ParamInit,
    SetSpans,
    causal_conv,
    selective_scan,
    set_spans,
)

__all__ = ["SSD_RECURRENT_MAX_TOKENS", "GatedRMSNorm", "Mamba2Mixer", "ssd"]

# ``method="auto"`` runs the recurrent form for ubatches of at most this many token slots and the
# chunked form above. The recurrent form materialises the full state of every token slot
# ([T, H, P, N] decays, injections and states) and runs a T-step scan (sequential on CPU); the
# chunked form's cost is matmuls over [chunk, chunk] blocks plus per-chunk states, whatever the
# layout. Decode ubatches (one token per set; a few drafted tokens per set when verifying) are
# small and gain nothing from the chunked form, whose [chunk, chunk] blocks are then nearly all
# masked; prompts are long, where the recurrent form's per-token states cost memory and time.
# Measured on CPU (H=16, P=64, N=64, chunk 128; outputs and final states only): one set of T
# tokens, chunked/recurrent = 1.0x at T=8, 0.7x at T=16, 0.3x at T=64, 0.5x at T=256; T sets of
# one token each: about equal up to T=128. With every slot's state kept (``ssm_tok`` used) both
# forms cost T*H*P*N and the chunked one is 1.0-1.6x the recurrent one on CPU.
SSD_RECURRENT_MAX_TOKENS = 16

_METHODS = ("auto", "recurrent", "chunked")


def ssd(
    x: Float[Array, "ubatch heads head_dim"],
    dt: Float[Array, "ubatch heads"],
    a: Float[Array, " heads"],
    b: Float[Array, "ubatch groups d_state"],
    c: Float[Array, "ubatch groups d_state"],
    ssm0: Float[Array, "sets heads head_dim d_state"],
    spans: SetSpans,
    *,
    chunk_size: int,
    method: str = "auto",
) -> tuple[
    Float[Array, "ubatch heads head_dim"],
    Float[Array, "sets heads head_dim d_state"],
    Float[Array, "ubatch heads head_dim d_state"],
]:
    """The SSD recurrence ``h[t] = exp(dt[t] * a) * h[t - 1] + dt[t] * outer(x[t], B[t])``,
    ``y[t] = h[t] @ C[t]``, per seq set from ``ssm0`` at each set's start (no ``D`` skip).

    Args:
        x: the heads' inputs (after the conv and its activation), float32.
        dt: time steps after softplus and clamping, float32.
        a: per-head ``A`` (negative), float32.
        b, c: per-group ``B`` and ``C``; head ``h`` reads group ``h // (heads // groups)``.
        ssm0: every set's initial state, float32.
        spans: from :func:`jaxhybrid.models._mamba.set_spans`.
        chunk_size: chunk length of the chunked form.
        method: ``"recurrent"`` (the one-step recurrence scanned over the ubatch), ``"chunked"``
            (SSD's chunked form) or ``"auto"``: recurrent for ubatches of at most
            :data:`SSD_RECURRENT_MAX_TOKENS` slots, chunked above (a static choice).

    Returns:
        ``(y, ssm, ssm_tok)``: the outputs (garbage but finite in padding slots), every set's
        final state (``ssm0`` for empty sets) and the state after every token slot (a padding
        slot holds the state of the slot before it; for rollback snapshots, dropped by XLA when
        unused).
    """
    if method not in _METHODS:
        raise jh.InvalidArgumentError(
            f"method must be 'auto', 'recurrent' or 'chunked', got {method!r}"
        )
    if chunk_size < 1:
        raise jh.InvalidArgumentError(f"chunk_size must be positive, got {chunk_size}")
    n_heads, n_groups = x.shape[1], b.shape[1]
    if n_heads % n_groups:
        raise jh.InvalidArgumentError(f"{n_heads} heads do not split into {n_groups} groups")
    if method == "auto":
        method = "recurrent" if x.shape[0] <= SSD_RECURRENT_MAX_TOKENS else "chunked"
    x, dt, a, b, c, ssm0 = (v.astype(jnp.float32) for v in (x, dt, a, b, c, ssm0))
    if method == "recurrent":
        return _ssd_recurrent(x, dt, a, b, c, ssm0, spans)
    return _ssd_chunked(x, dt, a, b, c, ssm0, spans, chunk_size)


def _ssd_recurrent(x, dt, a, b, c, ssm0, spans):
    """:func:`ssd` as one scan of the per-channel recurrence (heads x head_dim channels)."""
    n_tokens, n_heads, head_dim = x.shape
    n_groups, d_state = b.shape[1:]
    per_group = n_heads // n_groups
    b_h = jnp.repeat(b, per_group, axis=1)
    c_h = jnp.repeat(c, per_group, axis=1)
    decay = jnp.exp(dt * a[None, :])[:, :, None, None]
    decay = jnp.broadcast_to(decay, (n_tokens, n_heads, head_dim, d_state))
    inject = (dt[:, :, None] * x)[:, :, :, None] * b_h[:, :, None, :]
    flat = (n_heads * head_dim, d_state)
    h, ssm = selective_scan(
        decay.reshape((n_tokens, *flat)),
        inject.reshape((n_tokens, *flat)),
        ssm0.reshape((ssm0.shape[0], *flat)),
        spans,
    )
    h = h.reshape((n_tokens, n_heads, head_dim, d_state))
    y = jnp.einsum("thpn,thn->thp", h, c_h)
    return y, ssm.reshape(ssm0.shape), h


def _linear_scan(decay, inject, h0):
    """``h[i] = decay[i] * h[i - 1] + inject[i]`` along axis 0 from ``h[-1] = h0`` (any trailing
    shape), by :func:`jaxhybrid.models._mamba.selective_scan` on one set spanning the axis."""
    n, shape = decay.shape[0], decay.shape[1:]
    flat = (n, int(np.prod(shape[:-1])), shape[-1])
    one_set = SetSpans(
        valid=jnp.ones((n,), bool),
        set_idx=jnp.zeros((n,), jnp.int32),
        offset=jnp.arange(n, dtype=jnp.int32),
        first=jnp.zeros((1,), jnp.int32),
        last=jnp.full((1,), n - 1, jnp.int32),
        count=jnp.full((1,), n, jnp.int32),
    )
    h, _ = selective_scan(
        decay.reshape(flat), inject.reshape(flat), h0.reshape((1, *flat[1:])), one_set
    )
    return h.reshape(decay.shape)


def _ssd_chunked(x, dt, a, b, c, ssm0, spans, chunk_size):
    """:func:`ssd` in SSD's chunked form.

    The ubatch is padded to whole chunks. Every slot belongs to a *run*: the set whose tokens
    last started at or before it (padding slots continue the run before them, as identities with
    ``dt = 0``). Inside a chunk, the contribution of slot ``s`` to slot ``l`` of the same run is
    ``exp(sum(dt * a over (s, l])) * dt[s] * outer(x[s], B[s])``: a masked decay matrix
    ``L[l, s]`` times matmuls. A slot also sees the state its run starts from inside the chunk:
    the state entering the chunk when the run began before it, else the set's ``ssm0``, decayed
    from that start. The states entering the chunks come from a scan over chunks, which resets
    in a chunk where a new run reaches the chunk's end.
    """
    n_tokens, n_heads, head_dim = x.shape
    n_groups, d_state = b.shape[1:]
    per_group = n_heads // n_groups
    n_sets = ssm0.shape[0]
    q = min(chunk_size, n_tokens)
    n_chunks = -(-n_tokens // q)
    pad = n_chunks * q - n_tokens
    t = jnp.arange(n_tokens, dtype=jnp.int32)

    valid = spans.valid
    start = valid & (t == spans.first[spans.set_idx])
    run = jnp.cumsum(start.astype(jnp.int32))
    # Slot where the run of every slot started (-1 before the first set) and the run's set.
    run_start = jax.lax.cummax(jnp.where(start, t, -1), axis=0)
    run_set = spans.set_idx[jnp.clip(run_start, 0, n_tokens - 1)]

    ld = jnp.where(valid[:, None], dt * a[None, :], 0.0)  # log decay per slot and head
    xdt = jnp.where(valid[:, None, None], dt[:, :, None] * x, 0.0)

    def chunked(v, mode="constant"):
        v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1), mode=mode)
        return v.reshape((n_chunks, q, *v.shape[1:]))

    # Padding after the ubatch continues the last run.
    run_c = chunked(run, "edge")
    ld_c = chunked(ld)  # [C, Q, H]
    xdt_c = chunked(xdt).reshape((n_chunks, q, n_groups, per_group, head_dim))
    b_c, c_c = chunked(b), chunked(c)  # [C, Q, G, N]

    # seg[c, h, l, s] = sum of ld over slots (s, l] of the chunk (0 where s >= l), summed from s
    # rather than as a difference of cumulative sums, which would lose precision in long chunks.
    lower = jnp.arange(q)[:, None] > jnp.arange(q)[None, :]
    ld_h = jnp.moveaxis(ld_c, 2, 1)  # [C, H, Q]
    seg = jnp.cumsum(jnp.where(lower[None, None], ld_h[:, :, :, None], 0.0), axis=2)
    same_run = run_c[:, :, None] == run_c[:, None, :]
    causal = same_run & ~lower.T[None]  # s <= l, same run
    decay_ls = jnp.where(causal[:, None], jnp.exp(seg), 0.0)  # [C, H, Q(l), Q(s)]
    decay_ls = decay_ls.reshape((n_chunks, n_groups, per_group, q, q))

    # Within-chunk index of the slot each slot's state starts from (0 when its run continues from
    # the chunk before), and the decay from there: exp(sum of ld over [start, l]).
    chunk_first = (jnp.arange(n_chunks * q, dtype=jnp.int32) // q * q).reshape((n_chunks, q))
    run_start_c = chunked(run_start, "edge")
    continues = run_start_c < chunk_first  # [C, Q]
    from_idx = jnp.where(continues, 0, run_start_c - chunk_first)
    seg_from = jnp.take_along_axis(seg, from_idx[:, None, :, None], axis=3)[..., 0]  # [C, H, Q]
    ld_from = jnp.take_along_axis(ld_h, from_idx[:, None, :], axis=2)
    decay_from = jnp.exp(seg_from + ld_from)  # [C, H, Q]
    run_set_c = chunked(run_set, "edge")

    # The state entering every chunk: scan of (chunk decay, chunk state) over chunks.
    to_end = jnp.where(causal[:, -1][:, None, :], jnp.exp(seg[:, :, -1, :]), 0.0)  # [C, H, Q]
    to_end = to_end.reshape((n_chunks, n_groups, per_group, q))
    states = jnp.einsum("cgks,csgkp,csgn->cgkpn", to_end, xdt_c, b_c)
    states = states.reshape((n_chunks, n_heads, head_dim, d_state))
    end_continues = continues[:, -1]
    end_decay = decay_from[:, :, -1]  # [C, H]
    end_init = ssm0[run_set_c[:, -1]] * end_decay[:, :, None, None]
    chunk_decay = jnp.where(end_continues[:, None], end_decay, 0.0)
    chunk_inject = states + jnp.where(end_continues[:, None, None, None], 0.0, end_init)
    chunk_decay = jnp.broadcast_to(chunk_decay[:, :, None, None], chunk_inject.shape)
    chunk_out = _linear_scan(chunk_decay, chunk_inject, jnp.zeros_like(chunk_inject[0]))
    chunk_in = jnp.concatenate([jnp.zeros_like(chunk_out[:1]), chunk_out[:-1]], axis=0)

    # Outputs: the intra-chunk part plus the part of the state each slot's run starts from.
    cb = jnp.einsum("clgn,csgn->cgls", c_c, b_c)
    y_diag = jnp.einsum("cgkls,csgkp->clgkp", decay_ls * cb[:, :, None], xdt_c)
    y_diag = y_diag.reshape((n_chunks * q, n_heads, head_dim))[:n_tokens]
    chunk_in_g = chunk_in.reshape((n_chunks, n_groups, per_group, head_dim, d_state))
    y_cont = jnp.einsum("clgn,cgkpn->clgkp", c_c, chunk_in_g)
    y_cont = y_cont.reshape((n_chunks * q, n_heads, head_dim))[:n_tokens]
    ssm0_g = ssm0.reshape((n_sets, n_groups, per_group, head_dim, d_state))
    y_reset = jnp.einsum("tgn,tgkpn->tgkp", c, ssm0_g[run_set])
    y_reset = y_reset.reshape((n_tokens, n_heads, head_dim))

    def flat_t(v):
        return v.reshape((n_chunks * q, *v.shape[2:]))[:n_tokens]

    continues_t = flat_t(continues)
    decay_from_t = flat_t(jnp.moveaxis(decay_from, 1, 2))  # [T, H]
    y = decay_from_t[:, :, None] * jnp.where(continues_t[:, None, None], y_cont, y_reset)
    y = y + y_diag

    # State after every slot (only when used): the recurrence inside every chunk, all chunks at
    # once from the states entering them; a set's first slot takes its ssm0 instead.
    start_c = chunked(start)
    decay_c = jnp.exp(ld_c)[:, :, :, None, None]  # [C, Q, H, 1, 1]
    inject_c = xdt_c[..., None] * b_c[:, :, :, None, None, :]
    inject_c = inject_c.reshape((n_chunks, q, n_heads, head_dim, d_state))
    start5 = start_c[:, :, None, None, None]
    inject_c = jnp.where(start5, decay_c * ssm0[run_set_c] + inject_c, inject_c)
    decay_c = jnp.broadcast_to(jnp.where(start5, 0.0, decay_c), inject_c.shape)
    ssm_tok = _linear_scan(jnp.swapaxes(decay_c, 0, 1), jnp.swapaxes(inject_c, 0, 1), chunk_in)
    ssm_tok = jnp.swapaxes(ssm_tok, 0, 1).reshape((n_chunks * q, *ssm0.shape[1:]))[:n_tokens]

    # Final state of every set, at its last slot: the start state decayed, plus each token of the
    # set in the last slot's chunk, decayed to that slot (a segment sum over tokens).
    last = jnp.clip(spans.last, 0, n_tokens - 1)
    set_last = last[spans.set_idx]  # last slot of every slot's set
    in_last_chunk = valid & (t // q == set_last // q)
    seg_flat = jnp.moveaxis(seg, 1, 2).reshape((n_chunks * q, n_heads, q))  # [slot l, H, s]
    to_last = jnp.exp(seg_flat[set_last, :, t % q])  # [T, H]
    w = jnp.where(in_last_chunk[:, None], to_last, 0.0)
    contrib = (w[:, :, None] * xdt)[:, :, :, None] * jnp.repeat(b, per_group, axis=1)[:, :, None]
    seg_id = jnp.where(in_last_chunk, spans.set_idx, n_sets)
    final_intra = jax.ops.segment_sum(contrib, seg_id, n_sets + 1)[:n_sets]
    init_last = jnp.where(
        continues_t[last][:, None, None, None], chunk_in[last // q], ssm0[run_set[last]]
    )
    final = decay_from_t[last][:, :, None, None] * init_last + final_intra
    ssm = jnp.where((spans.count > 0)[:, None, None, None], final, ssm0)
    return y, ssm, ssm_tok


class GatedRMSNorm(nnx.Module):
    """Mamba-2's gated RMSNorm, in float32: ``norm(y * silu(z)) * weight`` or, with
    ``norm_before_gate``, ``norm(y) * weight * silu(z)``; normalised over groups of
    ``group_size`` channels (all channels when None)."""

    def __init__(
        self,
        dim: int,
        eps: float,
        init: ParamInit,
        *,
        group_size: int | None = None,
        norm_before_gate: bool = False,
    ):
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size:
            raise jh.InvalidArgumentError(f"norm group size {group_size} does not divide {dim}")
        self.weight = init.constant(1.0, dim)
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

    def __call__(
        self, y: Float[Array, "ubatch dim"], gate: Float[Array, "ubatch dim"]
    ) -> Float[Array, "ubatch dim"]:
        """Returns the gated, normalised ``y`` in float32."""
        y = y.astype(jnp.float32)
        g = jax.nn.silu(gate.astype(jnp.float32))
        if not self.norm_before_gate:
            y = y * g
        grouped = y.reshape((*y.shape[:-1], -1, self.group_size))
        var = jnp.mean(grouped * grouped, axis=-1, keepdims=True)
        y = (grouped * jax.lax.rsqrt(var + self.eps)).reshape(y.shape)
        w = self.weight[...].astype(jnp.float32)
        y = w.reshape((1,) * (y.ndim - 1) + w.shape) * y
        if self.norm_before_gate:
            y = y * g
        return y


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 mixer: in_proj -> (gate ``z``, ``xBC``, ``dt``), causal depthwise conv + SiLU
    over ``xBC``, ``dt = clip(softplus(dt + dt_bias), *time_step_limit)``, the SSD scan with
    ``A = -exp(A_log)`` per head and the per-head ``D`` skip, the gated RMSNorm (or
    ``y * silu(z)`` without it, as Falcon-H1 without ``mamba_rms_norm``), out_proj.

    Parameters follow transformers' names; kernels are ``[in, out]`` and the conv weight is
    ``[d_conv, conv_dim]`` (transformers' ``conv1d.weight[:, 0, :].T``). Memory shapes:
    ``r_shape = (d_conv - 1, conv_dim)``, ``s_shape = (n_heads, head_dim, d_state)``.

    Attributes:
        ssd_method: the :func:`ssd` method (``"auto"``; tests may pin one).
    """

    def __init__(
        self,
        hidden_size: int,
        init: ParamInit,
        *,
        n_heads: int,
        head_dim: int,
        d_state: int,
        n_groups: int,
        d_conv: int,
        chunk_size: int,
        conv_bias: bool = True,
        proj_bias: bool = False,
        norm_eps: float = 1e-6,
        gated_norm: bool = True,
        norm_group_size: int | None = None,
        norm_before_gate: bool = False,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
    ):
        if n_heads % n_groups:
            raise jh.InvalidArgumentError(f"{n_heads} heads do not split into {n_groups} groups")
        if d_conv < 1:
            raise jh.InvalidArgumentError(f"d_conv must be positive, got {d_conv}")
        d_inner = n_heads * head_dim
        conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = Linear(hidden_size, d_inner + conv_dim + n_heads, init, bias=proj_bias)
        self.conv_weight = init.normal(d_conv, conv_dim)
        self.conv_bias = init.constant(0.0, conv_dim) if conv_bias else None
        self.dt_bias = init.constant(1.0, n_heads)
        self.A_log = init.constant(np.log(np.arange(1, n_heads + 1, dtype=np.float32)), n_heads)
        self.D = init.constant(1.0, n_heads)
        self.norm = (
            GatedRMSNorm(
                d_inner,
                norm_eps,
                init,
                group_size=norm_group_size,
                norm_before_gate=norm_before_gate,
            )
            if gated_norm
            else None
        )
        self.out_proj = Linear(d_inner, hidden_size, init, bias=proj_bias)
        self.n_heads, self.head_dim, self.d_state = n_heads, head_dim, d_state
        self.n_groups = n_groups
        self.d_inner, self.conv_dim, self.chunk_size = d_inner, conv_dim, chunk_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.ssd_method = "auto"

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        seq_set: Int[Array, " ubatch"],
        conv0: Float[Array, "sets d_conv1 conv_dim"],
        ssm0: Float[Array, "sets heads head_dim d_state"],
        *,
        in_scale: Float[Array, " proj"] | None = None,
    ) -> tuple[
        Float[Array, "ubatch hidden"],
        Float[Array, "sets d_conv1 conv_dim"],
        Float[Array, "sets heads head_dim d_state"],
        tuple[
            Float[Array, "ubatch d_conv1 conv_dim"],
            Float[Array, "ubatch heads head_dim d_state"],
        ],
    ]:
        """Mixes the ubatch and returns ``(out, conv, ssm, (conv_tok, ssm_tok))``: every set's
        final states and the states after every token slot (what rollback snapshots keep).

        Args:
            in_scale: multiplied into in_proj's output (Falcon-H1's ``mup_vector``), shape
                ``[2 * d_inner + 2 * n_groups * d_state + n_heads]``.
        """
        n_tokens = x.shape[0]
        h, p, n, g = self.n_heads, self.head_dim, self.d_state, self.n_groups
        spans = set_spans(seq_set, conv0.shape[0])
        proj = self.in_proj(x)
        if in_scale is not None:
            scale = in_scale[None, :].astype(jnp.float32)
            proj = (proj.astype(jnp.float32) * scale).astype(proj.dtype)
        z = proj[:, : self.d_inner]
        xbc = proj[:, self.d_inner : self.d_inner + self.conv_dim]
        dt = proj[:, self.d_inner + self.conv_dim :]
        bias = None if self.conv_bias is None else self.conv_bias[...]
        xbc, conv, conv_tok = causal_conv(
            xbc, conv0.astype(xbc.dtype), self.conv_weight[...], bias, spans
        )
        xbc = jax.nn.silu(xbc)
        xs = xbc[:, : self.d_inner].astype(jnp.float32).reshape((n_tokens, h, p))
        b = xbc[:, self.d_inner : self.d_inner + g * n].astype(jnp.float32).reshape((-1, g, n))
        c = xbc[:, self.d_inner + g * n :].astype(jnp.float32).reshape((-1, g, n))

        dt = jax.nn.softplus(
            dt.astype(jnp.float32) + self.dt_bias[...][None, :].astype(jnp.float32)
        )
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi < float("inf"):
            dt = jnp.clip(dt, lo, hi)
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, ssm, ssm_tok = ssd(
            xs,
            dt,
            a,
            b,
            c,
            ssm0.astype(jnp.float32),
            spans,
            chunk_size=self.chunk_size,
            method=self.ssd_method,
        )
        y = y + self.D[...].astype(jnp.float32)[None, :, None] * xs
        y = y.reshape((n_tokens, self.d_inner))
        gate = z.astype(jnp.float32)
        y = y * jax.nn.silu(gate) if self.norm is None else self.norm(y, gate)
        return self.out_proj(y.astype(x.dtype)), conv, ssm, (conv_tok, ssm_tok)
