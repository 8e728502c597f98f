"""Per-sequence sampling, inside jit.

Temperature ``<= 0`` is greedy (argmax); otherwise top-k (``0`` = off), then top-p (``1.0`` =
off) on the tempered distribution, drawn with the key ``fold_in(key(seed), n)`` where ``n`` counts
the tokens that sequence has generated. A sequence's draws thus depend on its own seed only, not
on which other sequences share the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhybrid.array_typing import Array, Float, Int

__all__ = ["SamplingParams", "sample", "sampling_params"]

_I32 = jnp.int32


class SamplingParams(NamedTuple):
    """Per-sequence sampling settings (arrays of shape ``[n_seq]``)."""

    temperature: Float[Array, " seqs"]
    top_k: Int[Array, " seqs"]
    top_p: Float[Array, " seqs"]
    seed: Int[Array, " seqs"]


def sampling_params(n: int, temperature, top_k, top_p, seed) -> SamplingParams:
    """:class:`SamplingParams` for ``n`` sequences from scalars (for all) or per-sequence lists."""

    def arr(x, dtype):
        return jnp.asarray(np.broadcast_to(np.asarray(x, dtype), (n,)).copy())

    return SamplingParams(
        arr(temperature, np.float32),
        arr(top_k, np.int32),
        arr(top_p, np.float32),
        arr(seed, np.int32),
    )


def sample(
    logits: Float[Array, "seqs vocab"], sp: SamplingParams, count: Int[Array, " seqs"]
) -> Int[Array, " seqs"]:
    """One token per row (see the module docstring); ``count`` = tokens generated so far."""
    n_vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(_I32)
    temp = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    x = logits / temp[:, None]
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, n_vocab), n_vocab)
    ranks = jnp.arange(n_vocab, dtype=_I32)
    desc = jnp.where(ranks[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < sp.top_p[:, None]) | (ranks[None, :] == 0)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)
    x = jnp.where(x >= cutoff[:, None], x, -jnp.inf)

    def draw(seed, n, row):
        key = jax.random.fold_in(jax.random.key(seed), n)
        return jax.random.categorical(key, row).astype(_I32)

    drawn = jax.vmap(draw)(sp.seed, count, x)
    return jnp.where(sp.temperature > 0, drawn, greedy)
