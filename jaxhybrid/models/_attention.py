"""Grouped-query attention against the memory, shared by the families' attention layers.

The memory stores K/V and decides visibility (:meth:`~jaxhybrid.models.ModelMemory.kv`); this is
the math after it: scores of every query head against the cells it may see (query head ``h``
reads KV head ``h // (n_heads // n_kv_heads)``, transformers' ``repeat_kv``), a float32 softmax,
the weighted values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxhybrid.array_typing import Array, Bool, Float
from jaxhybrid.models._protocol import ModelMemory

__all__ = ["attend"]


def attend(
    q: Float[Array, "ubatch heads head_dim"],
    k: Float[Array, "ubatch kv_heads head_dim"],
    v: Float[Array, "ubatch kv_heads head_dim"],
    valid: Bool[Array, " ubatch"],
    mem: ModelMemory,
    attn_layer: int,
    scale: float,
) -> tuple[Float[Array, "ubatch heads_x_head_dim"], ModelMemory]:
    """Stores the ubatch's K/V of ``attn_layer`` in ``mem`` and attends every token slot to the
    cells it may see (its own K/V included); scores are scaled by ``scale``.

    Returns:
        ``(out, mem)``: the attention output ``[ubatch, heads * head_dim]`` in ``q``'s dtype
        (zero for padding slots, which see nothing) and the memory holding the K/V.
    """
    n_tok, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    q = q.reshape(n_tok, n_kv, n_heads // n_kv, head_dim)
    k_all, v_all, mask, mem = mem.kv(attn_layer, k, v)
    mask = mask & valid[:, None]
    # K/V shared by every token ("c...") or per token ("tc...", see ModelMemory.kv).
    kv = "tckd" if k_all.ndim == 4 else "ckd"
    scores = jnp.einsum(f"tkgd,{kv}->kgtc", q, k_all.astype(q.dtype)).astype(jnp.float32)
    scores = jnp.where(mask[None, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows that may see nothing (padding) read nothing instead of a uniform average.
    probs = jnp.where(jnp.any(mask, axis=-1)[None, None, :, None], probs, 0.0)
    out = jnp.einsum(f"kgtc,{kv}->tkgd", probs.astype(q.dtype), v_all.astype(q.dtype))
    return out.reshape(n_tok, n_heads * head_dim), mem
