"""Rotary position embeddings (RoPE) and the K-shift helper used by the KV cache update (§2.12).

RoPE rotates pairs of a head's features by ``pos * theta ** (-2 i / head_dim)``. Rotations by the
same frequencies compose additively, so a K row stored at position ``p`` is moved to ``p + d`` by
rotating it once more by ``d``: this is how pending cell shifts are applied lazily.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxhybrid._status import InvalidArgumentError
from jaxhybrid.array_typing import Array, Float, Shaped

__all__ = ["RopeShift", "rope", "rope_shift_fn"]


def rope(
    x: Float[Array, "*lead heads head_dim"],
    pos: Shaped[Array, "*lead"],
    *,
    theta: float = 10000.0,
    neox: bool = False,
    n_rot: int | None = None,
) -> Float[Array, "*lead heads head_dim"]:
    """Rotates ``x`` to positions ``pos``.

    Args:
        x: ``[..., heads, head_dim]`` features (``head_dim`` even).
        pos: ``[...]`` positions (or position deltas), integer or float.
        theta: frequency base.
        neox: pair feature ``i`` with ``i + n_rot / 2`` (GPT-NeoX layout) instead of the
            interleaved pairs ``(2i, 2i + 1)`` (GPT-J / llama layout).
        n_rot: rotate only the first ``n_rot`` features (partial rotary embedding, frequencies
            ``theta ** (-2 i / n_rot)``); the others pass unchanged. Default: all of them.

    Returns:
        The rotated features, same shape and dtype as ``x`` (computed in float32).

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 1, 4))
        >>> twice = rope(rope(x, jnp.array([3])), jnp.array([2]))
        >>> bool(jnp.allclose(twice, rope(x, jnp.array([5]))))
        True
    """
    n_rot = x.shape[-1] if n_rot is None else n_rot
    if not 0 < n_rot <= x.shape[-1] or n_rot % 2:
        raise InvalidArgumentError(
            f"rope needs an even n_rot in (0, head_dim={x.shape[-1]}], got {n_rot}"
        )
    if n_rot < x.shape[-1]:
        rotated = rope(x[..., :n_rot], pos, theta=theta, neox=neox)
        return jnp.concatenate([rotated, x[..., n_rot:]], axis=-1)
    d = n_rot
    if pos.shape != x.shape[:-2]:
        raise InvalidArgumentError(f"pos must have shape {x.shape[:-2]}, got {pos.shape}")
    half = d // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    angle = pos.astype(jnp.float32)[..., None, None] * inv_freq.reshape((1,) * pos.ndim + (1, half))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    if neox:
        a, b = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    else:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(xf.shape)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeShift:
    """``rope_fn(k, delta_pos) -> k`` for the K-shift of :func:`jaxhybrid.kv.update`: rotates
    cached K rows by a position delta with the model's RoPE parameters (see :func:`rope`).

    A frozen dataclass, so equal parameters give equal (and equally hashed) functions: a plug-in's
    ``rope_fn`` is a static argument of jitted serving functions and must not retrace them.
    """

    theta: float = 10000.0
    neox: bool = False
    n_rot: int | None = None

    def __call__(self, k, delta_pos):
        return rope(k, delta_pos, theta=self.theta, neox=self.neox, n_rot=self.n_rot)


def rope_shift_fn(
    *, theta: float = 10000.0, neox: bool = False, n_rot: int | None = None
) -> RopeShift:
    """A ``rope_fn(k, delta_pos) -> k`` for :func:`jaxhybrid._kv_cache.update`.

    Args:
        theta: the model's RoPE frequency base.
        neox: the model uses the NeoX (half-split) layout.
        n_rot: the rotated features of a partial rotary embedding (default: the whole head).
    """
    return RopeShift(theta=theta, neox=neox, n_rot=n_rot)
