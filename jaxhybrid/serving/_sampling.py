"""Per-sequence sampling, inside jit, and the host-side check of its settings.

Temperature ``<= 0`` is greedy (argmax); otherwise top-k (``0`` = off), then top-p (``1.0`` =
off) on the tempered distribution, drawn with the key ``fold_in(key(seed), n)`` where ``n`` counts
the tokens that sequence has generated. A sequence's draws thus depend on its own seed only, not
on which other sequences share the batch.

Settings are checked on the host before any device work (:func:`check_sampling`): a finite
temperature, ``top_k`` an integer in ``[0, 2^31)``, ``top_p`` in ``(0, 1]`` and ``seed`` an
integer inside int32 (never converted, docs/semantics.md §15.6).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Float, Int
from jaxhybrid.serving._batches import int_arg, per_seq, real_arg

__all__ = ["SamplingParams", "check_sampling", "sample", "sampling_params"]

_I32 = jnp.int32
_F32_MAX = float(np.finfo(np.float32).max)


class SamplingParams(NamedTuple):
    """Per-sequence sampling settings (arrays of shape ``[n_seq]``)."""

    temperature: Float[Array, " seqs"]
    top_k: Int[Array, " seqs"]
    top_p: Float[Array, " seqs"]
    seed: Int[Array, " seqs"]


def check_sampling(
    temperature, top_k, top_p, seed, names: tuple[str, str, str, str] | None = None
) -> tuple[float, int, float, int]:
    """One sequence's sampling settings, checked (see the module docstring).

    Args:
        temperature, top_k, top_p, seed: the settings.
        names: their names in messages (default: the argument names).

    Returns:
        ``(temperature, top_k, top_p, seed)`` as Python numbers.

    Raises:
        jaxhybrid.InvalidTypeError: a setting of the wrong type (a float ``top_k`` or ``seed``, a
            bool or a string anywhere).
        jaxhybrid.InvalidArgumentError: a value out of range (NaN or infinite temperature,
            ``top_p`` outside ``(0, 1]``, negative ``top_k``, integers outside int32).
    """
    n_t, n_k, n_p, n_s = names or ("temperature", "top_k", "top_p", "seed")
    t = real_arg(temperature, n_t)
    if not abs(t) <= _F32_MAX:  # NaN fails too; sampling runs in float32
        raise jh.InvalidArgumentError(f"{n_t} = {t} is not a finite float32 (<= 0 is greedy)")
    k = int_arg(top_k, n_k, lo=0)
    p = real_arg(top_p, n_p)
    if not 0.0 < p <= 1.0:  # NaN fails too
        raise jh.InvalidArgumentError(f"{n_p} = {p} is outside (0, 1] (1 = off)")
    return t, k, p, int_arg(seed, n_s)


def sampling_params(n: int, *settings) -> SamplingParams:
    """Checked :class:`SamplingParams` (host arrays) for ``n`` sequences from ``settings =
    (temperature, top_k, top_p, seed)``, each a scalar (for all) or a per-sequence list
    (:func:`check_sampling` for each sequence).

    Raises:
        jaxhybrid.InvalidTypeError, jaxhybrid.InvalidArgumentError: see :func:`check_sampling`;
            also a list whose length is not ``n``.
    """
    names = ("temperature", "top_k", "top_p", "seed")
    # Each setting for all or per sequence; then each sequence's four checked together.
    given = [per_seq(x, n, w) for x, w in zip(settings, names, strict=True)]
    rows = [
        check_sampling(*(vals[i] for vals, _ in given), names=tuple(ns[i] for _, ns in given))
        for i in range(n)
    ]
    cols = list(zip(*rows, strict=True))
    return SamplingParams(
        np.asarray(cols[0], np.float32),
        np.asarray(cols[1], np.int32),
        np.asarray(cols[2], np.float32),
        np.asarray(cols[3], np.int32),
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
