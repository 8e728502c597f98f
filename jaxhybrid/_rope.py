"""Rotary position embeddings (RoPE) and the K-shift helper used by the KV cache update (§2.12).

RoPE rotates pairs of a head's features by ``pos * theta ** (-2 i / head_dim)``. Rotations by the
same frequencies compose additively, so a K row stored at position ``p`` is moved to ``p + d`` by
rotating it once more by ``d``: this is how pending cell shifts are applied lazily.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jaxhybrid._status import InvalidArgumentError
from jaxhybrid.array_typing import Array, Float, Shaped

__all__ = ["rope", "rope_shift_fn"]


def rope(
    x: Float[Array, "*lead heads head_dim"],
    pos: Shaped[Array, "*lead"],
    *,
    theta: float = 10000.0,
    neox: bool = False,
) -> Float[Array, "*lead heads head_dim"]:
    """Rotates ``x`` to positions ``pos``.

    Args:
        x: ``[..., heads, head_dim]`` features (``head_dim`` even).
        pos: ``[...]`` positions (or position deltas), integer or float.
        theta: frequency base.
        neox: pair feature ``i`` with ``i + head_dim / 2`` (GPT-NeoX layout) instead of the
            interleaved pairs ``(2i, 2i + 1)`` (GPT-J / llama layout).

    Returns:
        The rotated features, same shape and dtype as ``x`` (computed in float32).

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 1, 4))
        >>> twice = rope(rope(x, jnp.array([3])), jnp.array([2]))
        >>> bool(jnp.allclose(twice, rope(x, jnp.array([5]))))
        True
    """
    d = x.shape[-1]
    if d % 2:
        raise InvalidArgumentError(f"rope needs an even head_dim, got {d}")
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


def rope_shift_fn(*, theta: float = 10000.0, neox: bool = False) -> Callable[[Array, Array], Array]:
    """A ``rope_fn(k, delta_pos) -> k`` for :func:`jaxhybrid._kv_cache.update`.

    Args:
        theta: the model's RoPE frequency base.
        neox: the model uses the NeoX (half-split) layout.
    """

    def rope_fn(k, delta_pos):
        return rope(k, delta_pos, theta=theta, neox=neox)

    return rope_fn
