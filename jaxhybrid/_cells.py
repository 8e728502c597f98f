"""Cell helpers shared by the attention KV cache and the recurrent memory (spec §1, §4, §5).

Both parts keep cell metadata as a record with ``pos`` (-1 = empty cell), ``seq`` (the sequences
referencing each cell, last axis) and a ``head`` search hint, optionally with per-cell fields to
reset when a cell empties (the KV ``shift``, the recurrent ``snap`` rows). The helpers here work on
either layout: the KV cache's ``[streams, cells]`` and the recurrent memory's ``[rs]``.
"""

from __future__ import annotations

from typing import TypeVar

import jax.numpy as jnp
import numpy as np

from jaxhybrid._status import InvalidArgumentError, InvalidTypeError
from jaxhybrid.array_typing import Array, Bool, Scalar, ScalarBool

__all__ = [
    "I32",
    "POS_INF",
    "add_overflows",
    "check_int",
    "drop_empty",
    "i32_scalar",
    "lower_head",
    "norm_range",
    "seq_ok",
]

I32 = jnp.int32
POS_INF = int(np.iinfo(np.int32).max)  # an open range end (p1 < 0) normalises to this (§4)
INT32_MIN = int(np.iinfo(np.int32).min)

_Cells = TypeVar("_Cells")


def check_int(
    v, what: str = "value", lo: int | None = None, hi: int | None = None, limit: str = ""
) -> int:
    """One integer argument on the host, as a Python int, never converted (§15.6).

    Args:
        v: the value: a Python or NumPy integer, or a 0-d integer array.
        what: its name in messages.
        lo, hi: the range it must lie in, ``[lo, hi)`` (None: int32's bound).
        limit: where the range comes from, added to the message (e.g. ``"n_seq_max=4"``).

    Raises:
        InvalidTypeError: ``v`` is not an integer (a bool, a float, NaN, a string, None).
        InvalidArgumentError: ``v`` is outside int32 or outside ``[lo, hi)``.

    Examples:
        >>> check_int(3, "seq", lo=0, hi=4)
        3
    """
    if getattr(v, "shape", None) == () and hasattr(v, "dtype"):
        v = np.asarray(v)[()]  # a 0-d array: its value can be checked
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
        raise InvalidTypeError(f"{what} must be an integer, got {type(v).__name__} {v!r}")
    v = int(v)
    if not INT32_MIN <= v <= POS_INF:
        raise InvalidArgumentError(f"{what} = {v} is outside int32 [{INT32_MIN}, {POS_INF}]")
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        span = f"[{lo}, {hi})" if hi is not None else f"[{lo}, {POS_INF}]"
        why = f" ({limit})" if limit else ""
        raise InvalidArgumentError(f"{what} = {v} is outside {span}{why}")
    return v


def i32_scalar(x, what: str = "value") -> Scalar:
    """``x`` as an int32 scalar: a Python or NumPy integer inside int32, or an integer (traced or
    concrete) scalar array. Nothing is converted silently: a bool, a float or a non-integer array
    is an :class:`InvalidTypeError`, an integer outside int32 or a non-scalar an
    :class:`InvalidArgumentError` (§15.6); messages name the argument ``what``."""
    if isinstance(x, np.ndarray) and x.shape == ():
        x = x[()]  # a NumPy scalar: its value can be checked
    if not hasattr(x, "dtype") or isinstance(x, np.generic):  # a host value: check it
        return jnp.asarray(check_int(x, what), I32)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise InvalidTypeError(
            f"{what} must be an integer scalar, got {type(x).__name__} of dtype {x.dtype}"
        )
    x = jnp.asarray(x)
    if x.shape != ():
        raise InvalidArgumentError(f"{what} must be a scalar, got shape {x.shape}")
    return x.astype(I32)


def norm_range(p0, p1) -> tuple[Scalar, Scalar]:
    """§4: ``p0 < 0 -> 0``, ``p1 < 0 -> +inf``; ranges are half-open."""
    p0, p1 = i32_scalar(p0, "p0"), i32_scalar(p1, "p1")
    return jnp.maximum(p0, 0), jnp.where(p1 < 0, POS_INF, p1)


def add_overflows(pos: Array, delta: Scalar) -> Bool[Array, "..."]:
    """Where ``pos + delta`` would leave the stored position range ``[0, 2^31 - 1)`` upwards
    (§15.2), computed without overflowing int32 itself. Results below 0 are the operations' own
    rule (the position is dropped), not an overflow."""
    return (delta > 0) & (pos > POS_INF - 1 - jnp.maximum(delta, 0))


def seq_ok(seq: Scalar, n_seq_max: int) -> ScalarBool:
    """Whether ``seq`` names one sequence, ``[0, n_seq_max)`` (-1 = "all" is the caller's case)."""
    return (seq >= 0) & (seq < n_seq_max)


def lower_head(head: Array, freed: Bool[Array, "... cells"]) -> Array:
    """The head hint lowered to the first freed cell when that is below it (§4.1, §5.7.1); the
    cell axis is the last one (one head per stream for the KV cache, one scalar head for the
    recurrent memory)."""
    first = jnp.argmax(freed, axis=-1).astype(I32)
    return jnp.where(jnp.any(freed, axis=-1) & (first < head), first, head)


def drop_empty(cells: _Cells) -> tuple[_Cells, Bool[Array, "..."]]:
    """Cells left without sequences become empty (§1.4.4): ``pos = -1``, and when the record has
    them ``shift = 0`` and no snapshots (``snap`` rows -1).

    Returns:
        ``(cells, freed)``: the cells, and which cells held a position and are empty now.
    """
    held = jnp.any(cells.seq, axis=-1)
    changes = {"pos": jnp.where(held, cells.pos, -1)}
    if "shift" in cells._fields:
        changes["shift"] = jnp.where(held, cells.shift, 0)
    if getattr(cells, "snap", None) is not None:
        changes["snap"] = jnp.where(held[..., None], cells.snap, -1)
    return cells._replace(**changes), ~held & (cells.pos >= 0)
