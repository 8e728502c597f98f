"""Memory statuses (spec §8), the base of the host-side exceptions built from status codes, and
:func:`select_tree`, how a failed operation hands back its input."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

__all__ = [
    "InvalidArgumentError",
    "InvalidTypeError",
    "JaxHybridError",
    "MemoryStatus",
    "combine_status",
    "is_fail",
    "select_tree",
]


class MemoryStatus(enum.IntEnum):
    """Outcome of planning or updating memory (``llama_memory_status``, §8.1)."""

    SUCCESS = 0
    NO_UPDATE = 1
    FAILED_PREPARE = 2
    FAILED_COMPUTE = 3


def is_fail(status):
    """Whether ``status`` is one of the two FAILED values (works on ints and traced arrays)."""
    return (status == MemoryStatus.FAILED_PREPARE) | (status == MemoryStatus.FAILED_COMPUTE)


def combine_status(s0, s1):
    """Combines two statuses as ``llama_memory_status_combine`` does (§8.2).

    A failure of ``s0`` wins, then a failure of ``s1``; otherwise SUCCESS if either is SUCCESS,
    else NO_UPDATE. Works on Python ints and on traced int32 scalars.

    Examples:
        >>> int(combine_status(MemoryStatus.NO_UPDATE, MemoryStatus.SUCCESS))
        0
    """
    s0 = jnp.asarray(s0, jnp.int32)
    s1 = jnp.asarray(s1, jnp.int32)
    ok = jnp.where(
        (s0 == MemoryStatus.SUCCESS) | (s1 == MemoryStatus.SUCCESS),
        jnp.int32(MemoryStatus.SUCCESS),
        jnp.int32(MemoryStatus.NO_UPDATE),
    )
    return jnp.where(is_fail(s0), s0, jnp.where(is_fail(s1), s1, ok))


class JaxHybridError(RuntimeError):
    """Base class of every exception jaxhybrid raises from a host-side helper (an invalid batch, a
    failed decode, a state that cannot be restored).

    It derives from ``RuntimeError`` so that code catching that keeps working; subclasses may
    also derive from a more precise builtin (``BatchError`` is a ``ValueError``). Each message
    names what was wrong.
    """


class InvalidArgumentError(JaxHybridError, ValueError):
    """An argument a function cannot take, refused before any device work: a config, shape,
    size or value that does not fit (the message names the argument, the value and the limit).
    A ``ValueError`` too."""


class InvalidTypeError(JaxHybridError, TypeError):
    """An argument of the wrong type, refused before any device work (never converted). A
    ``TypeError`` too."""


def select_tree(ok, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf: how a failed operation returns its input
    unchanged (docs/semantics.md difference 1) without a host round-trip.

    ``ok`` is a (traced) boolean scalar; ``new`` and ``old`` have the same tree structure, shapes
    and dtypes.

    Examples:
        >>> int(select_tree(jnp.bool_(False), {"a": jnp.int32(1)}, {"a": jnp.int32(2)})["a"])
        2
    """
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
