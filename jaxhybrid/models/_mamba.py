"""The Jamba Mamba-1 mixer over a ubatch of several seq sets.

Every token slot ``t`` of the ubatch belongs to seq set ``seq_set[t]`` (-1 for padding); the valid
tokens of a set are contiguous and in order (see :mod:`jaxhybrid.models._protocol`). The causal
conv reads a set's own earlier inputs, reaching into the set's conv state for the first
``d_conv - 1`` tokens; the selective scan is one scan over the whole ubatch whose recurrence resets
at the first token of every set, where the set's initial SSM state enters. Padding slots are
identity elements of the scan and never enter a conv window, so they change no state.

The scan is sequential (``lax.scan``) on CPU and a ``jax.lax.associative_scan`` elsewhere: on CPU
the parallel form's log-depth tree of strided slices costs far more than it saves (3.3x slower for
a decode ubatch of 8 single-token sets, 3.8x for a 512-token prompt; ``benchmarks/``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Float, Int

__all__ = [
    "Linear",
    "MambaMixer",
    "ParamInit",
    "RMSNorm",
    "SetSpans",
    "causal_conv",
    "selective_scan",
    "set_spans",
]


class SetSpans(NamedTuple):
    """Where each seq set of a ubatch lies.

    Attributes:
        valid: token slot holds a real token of a set.
        set_idx: ``seq_set`` clipped to ``[0, S)`` (safe as a gather index; check ``valid``).
        offset: index of the token inside its set (0 for the set's first token).
        first: first slot of every set (``T`` when the set is empty).
        last: last slot of every set (-1 when the set is empty).
        count: tokens per set.
    """

    valid: Bool[Array, " ubatch"]
    set_idx: Int[Array, " ubatch"]
    offset: Int[Array, " ubatch"]
    first: Int[Array, " sets"]
    last: Int[Array, " sets"]
    count: Int[Array, " sets"]


def set_spans(seq_set: Int[Array, " ubatch"], n_sets: int) -> SetSpans:
    """Computes :class:`SetSpans` from ``seq_set`` (token slot -> set, -1 padding)."""
    n_tokens = seq_set.shape[0]
    t = jnp.arange(n_tokens, dtype=jnp.int32)
    valid = (seq_set >= 0) & (seq_set < n_sets)
    # Padding goes to an extra segment that is cut off afterwards.
    seg = jnp.where(valid, seq_set, n_sets)
    first = jax.ops.segment_min(jnp.where(valid, t, n_tokens), seg, n_sets + 1)[:n_sets]
    last = jax.ops.segment_max(jnp.where(valid, t, -1), seg, n_sets + 1)[:n_sets]
    count = jax.ops.segment_sum(valid.astype(jnp.int32), seg, n_sets + 1)[:n_sets]
    first = jnp.where(count > 0, first, n_tokens).astype(jnp.int32)
    last = jnp.where(count > 0, last, -1).astype(jnp.int32)
    set_idx = jnp.clip(seq_set, 0, n_sets - 1)
    offset = jnp.where(valid, t - first[set_idx], 0)
    return SetSpans(valid, set_idx, offset, first, last, count.astype(jnp.int32))


def causal_conv(
    x: Float[Array, "ubatch d_inner"],
    conv0: Float[Array, "sets d_conv1 d_inner"],
    weight: Float[Array, "d_conv d_inner"],
    bias: Float[Array, " d_inner"] | None,
    spans: SetSpans,
) -> tuple[
    Float[Array, "ubatch d_inner"],
    Float[Array, "sets d_conv1 d_inner"],
    Float[Array, "ubatch d_conv1 d_inner"],
]:
    """Depthwise causal conv of each set's inputs continuing its conv state.

    Returns:
        ``(y, conv, conv_tok)``: the conv output (before activation; garbage but finite in
        padding slots), every set's new state, the last ``d_conv - 1`` inputs of the set (oldest
        first, taken from ``conv0`` where the set holds fewer tokens than that), and the same
        state after every token slot (for rollback snapshots; unused values are dropped by XLA).
    """
    d_conv = weight.shape[0]
    n_tokens = x.shape[0]
    t = jnp.arange(n_tokens, dtype=jnp.int32)
    y = jnp.zeros(x.shape, jnp.float32)
    for k in range(d_conv):
        lag = d_conv - 1 - k
        from_x = x[jnp.clip(t - lag, 0, n_tokens - 1)]
        from_state = conv0[spans.set_idx, jnp.clip(k + spans.offset, 0, d_conv - 2)]
        tap = jnp.where((spans.offset >= lag)[:, None], from_x, from_state)
        y = y + weight[k][None, :].astype(jnp.float32) * tap.astype(jnp.float32)
    if bias is not None:
        y = y + bias[None, :].astype(jnp.float32)

    # After the token at offset o, row k holds the input at offset o - lag (lag = d_conv - 2 - k),
    # or row k + o + 1 of the set's initial state when that offset is before the set.
    tok_rows = []
    for k in range(d_conv - 1):
        lag = d_conv - 2 - k
        from_x = x[jnp.clip(t - lag, 0, n_tokens - 1)].astype(conv0.dtype)
        from_state = conv0[spans.set_idx, jnp.clip(k + spans.offset + 1, 0, d_conv - 2)]
        tok_rows.append(jnp.where((spans.offset >= lag)[:, None], from_x, from_state))
    conv_tok = (
        jnp.stack(tok_rows, axis=1) if tok_rows else jnp.zeros((n_tokens, 0, x.shape[1]), x.dtype)
    )

    rows = []
    for k in range(d_conv - 1):
        lag = d_conv - 2 - k
        from_x = x[jnp.clip(spans.last - lag, 0, n_tokens - 1)]
        from_state = conv0[jnp.arange(conv0.shape[0]), jnp.clip(spans.count + k, 0, d_conv - 2)]
        rows.append(jnp.where((lag < spans.count)[:, None], from_x.astype(conv0.dtype), from_state))
    conv = jnp.stack(rows, axis=1) if rows else conv0
    return y.astype(x.dtype), conv, conv_tok


def selective_scan(
    decay: Float[Array, "ubatch d_inner d_state"],
    inject: Float[Array, "ubatch d_inner d_state"],
    ssm0: Float[Array, "sets d_inner d_state"],
    spans: SetSpans,
    *,
    method: str = "auto",
) -> tuple[Float[Array, "ubatch d_inner d_state"], Float[Array, "sets d_inner d_state"]]:
    """``h[t] = decay[t] * h[t - 1] + inject[t]`` per set, from ``ssm0`` at each set's start.

    Args:
        method: ``"sequential"`` (``lax.scan``, the recurrence in order), ``"parallel"``
            (``lax.associative_scan``, log depth, rounds differently) or ``"auto"``: sequential
            when lowered for CPU, parallel for other platforms.

    Returns:
        ``(h, ssm)``: the state after every token slot and every set's final state (``ssm0`` for
        empty sets).
    """
    if method not in ("auto", "sequential", "parallel"):
        raise jh.InvalidArgumentError(
            f"method must be 'auto', 'sequential' or 'parallel', got {method!r}"
        )
    t = jnp.arange(decay.shape[0], dtype=jnp.int32)
    start = spans.valid & (t == spans.first[spans.set_idx])
    h0 = ssm0[spans.set_idx]
    start3 = start[:, None, None]
    valid3 = spans.valid[:, None, None]
    # A set's first token absorbs its initial state and cuts the link to the slot before it;
    # padding slots are the identity (decay 1, inject 0).
    b = jnp.where(start3, decay * h0 + inject, inject)
    a = jnp.where(start3, 0.0, decay)
    a = jnp.where(valid3, a, 1.0)
    b = jnp.where(valid3, b, 0.0)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    def parallel(a, b):
        return jax.lax.associative_scan(combine, (a, b), axis=0)[1]

    def sequential(a, b):
        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        return jax.lax.scan(step, jnp.zeros_like(b[0]), (a, b))[1]

    if method == "auto":
        h = jax.lax.platform_dependent(a, b, cpu=sequential, default=parallel)
    else:
        h = (sequential if method == "sequential" else parallel)(a, b)
    final = h[jnp.clip(spans.last, 0, decay.shape[0] - 1)]
    ssm = jnp.where((spans.count > 0)[:, None, None], final, ssm0)
    return h, ssm


class ParamInit:
    """Initial parameter values for the modules' constructors.

    With a seed, values are drawn with NumPy and moved to the device as they are (building a model
    this way compiles nothing). Without one (``seed=None``), every value is an abstract
    ``jax.ShapeDtypeStruct`` so that a loader can build the structure of a large model for free
    and fill it in.
    """

    def __init__(self, seed: int | None, dtype, std: float):
        self.rng = None if seed is None else np.random.default_rng(seed)
        self.dtype, self.std = jnp.dtype(dtype), std

    def _param(self, make, shape) -> nnx.Param:
        if self.rng is None:
            return nnx.Param(jax.ShapeDtypeStruct(tuple(shape), self.dtype))
        return nnx.Param(jnp.asarray(np.asarray(make(), np.float32).astype(self.dtype)))

    def normal(self, *shape: int) -> nnx.Param:
        return self._param(lambda: self.rng.standard_normal(shape) * self.std, shape)

    def constant(self, value, *shape: int) -> nnx.Param:
        return self._param(lambda: np.broadcast_to(np.asarray(value, np.float32), shape), shape)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 and scaled in the input dtype (transformers' JambaRMSNorm)."""

    def __init__(self, dim: int, eps: float, init: ParamInit):
        self.weight = init.constant(1.0, dim)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        w = self.weight[...]
        return w.reshape((1,) * (x.ndim - 1) + w.shape) * y


class Linear(nnx.Module):
    """``x @ kernel (+ bias)`` with ``kernel`` stored ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int, init: ParamInit, *, bias: bool = False):
        self.kernel = init.normal(d_in, d_out)
        self.bias = init.constant(0.0, d_out) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...][None, :]
        return y


class MambaMixer(nnx.Module):
    """Jamba's Mamba-1 mixer: in_proj, causal depthwise conv + SiLU, x_proj -> (dt, B, C) with
    RMSNorms on each, dt_proj + softplus, selective scan with ``A = -exp(A_log)`` and the ``D``
    skip, gated by ``silu(z)``, out_proj.

    Parameters follow transformers' names; kernels are ``[in, out]`` and the conv weight is
    ``[d_conv, d_inner]``.
    """

    def __init__(self, config, init: ParamInit):
        h, d_in, n = config.hidden_size, config.d_inner, config.mamba_d_state
        r, k, bias = config.mamba_dt_rank, config.mamba_d_conv, config.mamba_proj_bias
        self.in_proj = Linear(h, 2 * d_in, init, bias=bias)
        self.conv_weight = init.normal(k, d_in)
        self.conv_bias = init.constant(0.0, d_in) if config.mamba_conv_bias else None
        self.x_proj = Linear(d_in, r + 2 * n, init)
        self.dt_proj = Linear(r, d_in, init, bias=True)
        self.A_log = init.constant(np.log(np.arange(1, n + 1, dtype=np.float32))[None, :], d_in, n)
        self.D = init.constant(1.0, d_in)
        self.out_proj = Linear(d_in, h, init, bias=bias)
        eps = config.rms_norm_eps
        self.dt_layernorm = RMSNorm(r, eps, init)
        self.b_layernorm = RMSNorm(n, eps, init)
        self.c_layernorm = RMSNorm(n, eps, init)
        self.d_inner, self.d_state, self.dt_rank = d_in, n, r

    def __call__(
        self,
        x: Float[Array, "ubatch hidden"],
        seq_set: Int[Array, " ubatch"],
        conv0: Float[Array, "sets d_conv1 d_inner"],
        ssm0: Float[Array, "sets d_inner d_state"],
    ) -> tuple[
        Float[Array, "ubatch hidden"],
        Float[Array, "sets d_conv1 d_inner"],
        Float[Array, "sets d_inner d_state"],
        tuple[Float[Array, "ubatch d_conv1 d_inner"], Float[Array, "ubatch d_inner d_state"]],
    ]:
        """Mixes the ubatch and returns ``(out, conv, ssm, (conv_tok, ssm_tok))``: every set's
        final states and the states after every token slot (what rollback snapshots keep)."""
        spans = set_spans(seq_set, conv0.shape[0])
        xz = self.in_proj(x)
        xs, z = xz[:, : self.d_inner], xz[:, self.d_inner :]
        bias = None if self.conv_bias is None else self.conv_bias[...]
        xc, conv, conv_tok = causal_conv(
            xs, conv0.astype(xs.dtype), self.conv_weight[...], bias, spans
        )
        xc = jax.nn.silu(xc)

        dbc = self.x_proj(xc)
        r, n = self.dt_rank, self.d_state
        dt = self.dt_layernorm(dbc[:, :r])
        b = self.b_layernorm(dbc[:, r : r + n]).astype(jnp.float32)
        c = self.c_layernorm(dbc[:, r + n :]).astype(jnp.float32)
        dt = dt @ self.dt_proj.kernel[...]
        dt = jax.nn.softplus(
            dt.astype(jnp.float32) + self.dt_proj.bias[...][None, :].astype(jnp.float32)
        )

        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        xc32 = xc.astype(jnp.float32)
        decay = jnp.exp(dt[:, :, None] * a[None, :, :])
        inject = (dt[:, :, None] * b[:, None, :]) * xc32[:, :, None]
        h, ssm = selective_scan(decay, inject, ssm0.astype(jnp.float32), spans)

        y = jnp.einsum("tdn,tn->td", h, c)
        y = y + xc32 * self.D[...][None, :].astype(jnp.float32)
        y = y * jax.nn.silu(z.astype(jnp.float32))
        return self.out_proj(y.astype(x.dtype)), conv, ssm, (conv_tok, h)
