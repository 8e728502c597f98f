"""Batches the serving layer builds: inside jit (prompts, one token per sequence) and on the host
(padded prompt and stop-token arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid import Batch
from jaxhybrid.array_typing import Array, Bool, Int

__all__ = ["as_prompts", "prompt_batch", "stop_array", "token_batch", "unpermute"]

_I32 = jnp.int32


def _compact(active: Bool[Array, " n"]) -> Int[Array, " n"]:
    """A permutation putting the active slots first, in order."""
    return jnp.argsort(~active, stable=True).astype(_I32)


def _batch(tokens, seq_ids, active, output) -> tuple[Batch, Int[Array, " n"]]:
    """A batch of the ``active`` slots (compacted to the front), automatic positions."""
    perm = _compact(active)
    act = active[perm]
    batch = Batch(
        token=jnp.where(act, tokens[perm], 0).astype(_I32),
        embd=None,
        pos=jnp.zeros(act.shape, _I32),
        seq_id=jnp.where(act, seq_ids[perm], -1).astype(_I32)[:, None],
        n_seq_id=act.astype(_I32),
        output=act & output[perm],
        auto_pos=jnp.asarray(True),
        n_tokens=jnp.sum(act, dtype=_I32),
    )
    return batch, perm


def token_batch(tokens, seq_ids, active) -> tuple[Batch, Int[Array, " n"]]:
    """One token per active sequence, automatic positions, every token outputs.

    Returns:
        ``(batch, perm)``: batch slot ``i`` holds the token of row ``perm[i]``.
    """
    return _batch(tokens, seq_ids, active, active)


def prompt_batch(prompts, lengths, seq_ids, output_all: bool) -> tuple[Batch, Int[Array, " n"]]:
    """Every prompt token (``prompts [n_seq, P]``, ``lengths [n_seq]``), automatic positions,
    outputs on each prompt's last token (or on all with ``output_all``)."""
    n_seq, p = prompts.shape
    j = jnp.arange(p, dtype=_I32)[None, :]
    valid = (j < lengths[:, None]).reshape(-1)
    last = (j == lengths[:, None] - 1).reshape(-1)
    seq = jnp.broadcast_to(seq_ids[:, None], (n_seq, p)).reshape(-1)
    return _batch(prompts.reshape(-1), seq, valid, valid if output_all else last)


def unpermute(out, perm):
    """Rows of ``out`` back in the order before :func:`token_batch` / :func:`prompt_batch`."""
    return jnp.zeros_like(out).at[perm].set(out)


def as_prompts(prompts: Sequence[Sequence[int]], n_prompt: int | None):
    """Prompts as a padded ``[n, width]`` int32 array and their lengths."""
    lens = [len(p) for p in prompts]
    width = max([1, *lens]) if n_prompt is None else n_prompt
    if max(lens, default=0) > width:
        raise jh.InvalidArgumentError(
            f"a prompt has {max(lens)} tokens, more than n_prompt={width}"
        )
    arr = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    return jnp.asarray(arr), jnp.asarray(np.asarray(lens, np.int32))


def stop_array(stop_tokens, n_seq: int, n_stop: int | None = None) -> np.ndarray:
    """``stop_tokens`` (one sequence of ids for all, or one per sequence) as ``[n_seq, width]``,
    padded with -1."""
    if len(stop_tokens) and not np.isscalar(stop_tokens[0]):
        per = [list(s) for s in stop_tokens]
        if len(per) != n_seq:
            raise jh.InvalidArgumentError(
                f"stop_tokens has {len(per)} entries for {n_seq} sequences"
            )
    else:
        per = [list(stop_tokens)] * n_seq
    width = max([1, *(len(s) for s in per)]) if n_stop is None else n_stop
    arr = np.full((n_seq, width), -1, np.int32)
    for i, s in enumerate(per):
        arr[i, : len(s)] = s
    return arr
