"""Batches the serving layer builds: inside jit (prompts, one token per sequence) and on the host
(padded prompt and stop-token arrays), and the host-side checks of their arguments.

The checks never convert (docs/semantics.md §15.6): a bool, a float (NaN included) or anything
else where an integer is due is a :class:`~jaxhybrid.InvalidTypeError`; an integer outside int32,
or outside what the argument allows, an :class:`~jaxhybrid.InvalidArgumentError` naming the
argument, its value and the limit. They run on the host before any device work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid import Batch
from jaxhybrid.array_typing import Array, Bool, Int

__all__ = [
    "as_prompts",
    "check_capacity",
    "check_prompts",
    "check_stop_tokens",
    "check_tokens",
    "int_arg",
    "int_list",
    "per_seq",
    "prompt_batch",
    "real_arg",
    "stop_array",
    "token_batch",
    "unpermute",
]

_I32 = jnp.int32


# -- host-side argument checks --------------------------------------------------------------------


def _unwrap(v):
    """A 0-d NumPy or JAX array as its scalar, so that its value can be checked."""
    if isinstance(v, np.ndarray | jax.Array) and v.shape == ():
        return np.asarray(v)[()]
    return v


# One integer argument, never converted (§15.6), in a range: the core's host-side check.
int_arg = jh.check_int


def real_arg(v, what: str) -> float:
    """One real-number argument (an int or a float, not a bool) as a Python float.

    Raises:
        jaxhybrid.InvalidTypeError: ``v`` is not a real number.
    """
    v = _unwrap(v)
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        raise jh.InvalidTypeError(f"{what} must be a real number, got {type(v).__name__} {v!r}")
    return float(v)


def _items(values, what: str) -> list:
    """The entries of a sequence argument (a list, tuple or 1-D array)."""
    if isinstance(values, np.ndarray | jax.Array):
        if values.ndim != 1:
            raise jh.InvalidArgumentError(f"{what} must be 1-D, got shape {values.shape}")
        return np.asarray(values).tolist()
    if isinstance(values, Sequence) and not isinstance(values, str | bytes):
        return list(values)
    raise jh.InvalidTypeError(
        f"{what} must be a sequence of integers, got {type(values).__name__} {values!r}"
    )


def int_list(values, what: str, lo: int | None = None, hi: int | None = None, limit: str = ""):
    """A sequence of integers (each checked by :func:`int_arg` as ``what[i]``) as a list."""
    return [int_arg(v, f"{what}[{i}]", lo, hi, limit) for i, v in enumerate(_items(values, what))]


def per_seq(x, n: int, what: str, check: Callable | None = None) -> tuple[list, list[str]]:
    """A setting given for all ``n`` prompts or one per prompt, each checked by
    ``check(value, name)`` when given.

    Returns:
        ``(values, names)``: ``n`` checked values and the name each was given under.
    """
    is_array = isinstance(x, np.ndarray | jax.Array) and x.shape != ()
    if is_array or (isinstance(x, Sequence) and not isinstance(x, str | bytes)):
        items = _items(x, what)
        if len(items) != n:
            raise jh.InvalidArgumentError(f"{len(items)} {what} for {n} prompts")
        names = [f"{what}[{i}]" for i in range(n)]
    else:
        items, names = [x] * n, [what] * n
    if check is not None:
        items = [check(v, name) for v, name in zip(items, names, strict=True)]
    return items, names


def check_tokens(tokens, n_vocab: int, what: str) -> list[int]:
    """Token ids inside the vocabulary ``[0, n_vocab)``, as a list."""
    return int_list(tokens, what, 0, n_vocab, f"the vocabulary, n_vocab={n_vocab}")


def check_prompts(prompts, n_vocab: int) -> list[list[int]]:
    """Several prompts of token ids (:func:`check_tokens`, named ``prompts[i][j]``), as lists."""
    return [
        check_tokens(p, n_vocab, f"prompts[{i}]") for i, p in enumerate(_items(prompts, "prompts"))
    ]


def check_capacity(n: int, what: str, cfg: jh.HybridConfig) -> None:
    """Refuses a size ``n`` (tokens of one sequence, or a capacity sized by them) that one
    sequence can never hold: more than the ``kv_size`` cells of its stream. With a sliding window
    cells are reused, and only int32 bounds a sequence."""
    if cfg.kv.swa_type == jh.SWAType.NONE and n > cfg.kv.kv_size:
        raise jh.InvalidArgumentError(
            f"{what} = {n} is more than the kv_size={cfg.kv.kv_size} cells one sequence can hold"
        )


def check_stop_tokens(stop_tokens, n: int | None, n_stop: int | None) -> list[list[int]]:
    """Stop tokens (integers inside int32), at most ``n_stop`` per sequence: one list for all
    ``n`` prompts or one list per prompt (``n`` None: one list, for one sequence)."""
    items = _items(stop_tokens, "stop_tokens")
    nested = any(isinstance(s, Sequence | np.ndarray | jax.Array) for s in items)
    if n is not None and nested:
        if len(items) != n:
            raise jh.InvalidArgumentError(f"{len(items)} stop_tokens for {n} prompts")
        per = [int_list(s, f"stop_tokens[{i}]") for i, s in enumerate(items)]
    else:
        per = [int_list(items, "stop_tokens")] * (n or 1)
    longest = max((len(s) for s in per), default=0)
    if n_stop is not None and longest > n_stop:
        raise jh.InvalidArgumentError(f"{longest} stop tokens, more than n_stop={n_stop}")
    return per


# -- batches --------------------------------------------------------------------------------------


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


def as_prompts(prompts: list[list[int]], n_prompt: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Checked prompts (:func:`check_prompts`) as a padded ``[n, width]`` int32 host array and
    their lengths."""
    lens = [len(p) for p in prompts]
    width = max([1, *lens]) if n_prompt is None else n_prompt
    if max(lens, default=0) > width:
        raise jh.InvalidArgumentError(
            f"a prompt has {max(lens)} tokens, more than n_prompt={width}"
        )
    arr = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    return arr, np.asarray(lens, np.int32)


def stop_array(per: list[list[int]], n_stop: int | None = None) -> np.ndarray:
    """Checked stop tokens (:func:`check_stop_tokens`) as ``[n_seq, width]``, padded with -1."""
    width = max([1, *(len(s) for s in per)]) if n_stop is None else n_stop
    arr = np.full((len(per), width), -1, np.int32)
    for i, s in enumerate(per):
        arr[i, : len(s)] = s
    return arr
