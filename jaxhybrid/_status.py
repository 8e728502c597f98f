"""Memory statuses (spec §8) and the host-side exceptions built from status codes."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

__all__ = [
    "JaxHybridError",
    "select_tree",
    "MemoryStatus",
    "combine_status",
    "is_fail",
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
    """Base class of the exceptions raised by host-side helpers."""


def select_tree(ok, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf: how a failed operation returns its input
    unchanged (DESIGN.md difference 1) without a host round-trip."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
