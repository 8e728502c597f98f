"""Explicit checkpoints of a hybrid sequence's recurrent state, on device (issue 10).

Snapshots (``RecurrentConfig.n_snapshots``) rewind a sequence by up to ``H`` tokens. For edits
further back, e.g. a chat turn whose tail changes after a long history, take a
:class:`Checkpoint` at the position you may return to (a copy of the sequence's recurrent state,
one state per layer) and later :func:`restore_checkpoint`: the attention part drops the positions
after the checkpoint and the recurrent state becomes the saved one. Both are pure and jittable,
so they run inside a decode loop with no host round trip; llama.cpp's equivalent is the server's
host-side ``--ctx-checkpoints`` with ``PARTIAL_ONLY`` state blobs (§9.6, §14.1-2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxhybrid import _kv_cache as kvc
from jaxhybrid import _recurrent as rec
from jaxhybrid._cells import i32_scalar, seq_ok
from jaxhybrid._hybrid import HybridConfig, HybridMemory
from jaxhybrid._status import select_tree
from jaxhybrid.array_typing import Array, Scalar, ScalarBool

__all__ = ["Checkpoint", "checkpoint", "restore_checkpoint"]


class Checkpoint(NamedTuple):
    """A sequence's recurrent state after position ``pos``.

    Attributes:
        pos: the position (-1: empty checkpoint, the sequence had no state).
        r: ``[n_recurrent_layers, *r_shape]``.
        s: ``[n_recurrent_layers, *s_shape]``.
    """

    pos: Scalar
    r: Array
    s: Array


def checkpoint(mem: HybridMemory, seq, cfg: HybridConfig) -> Checkpoint:
    """The recurrent state of ``seq`` now (an empty checkpoint if it has none or is invalid).

    Examples:
        >>> import jaxhybrid as jh
        >>> recr = jh.RecurrentConfig(r_shape=(2,), s_shape=(2,))
        >>> cfg = jh.HybridConfig.from_layers([True, False], jh.KVConfig(kv_size=8), recr)
        >>> int(jh.checkpoint(jh.init_hybrid(cfg), 0, cfg).pos)
        -1
    """
    cells = mem.recurrent.cells
    seq = i32_scalar(seq, "seq")
    valid = seq_ok(seq, cfg.n_seq_max)
    t = cells.tail[jnp.clip(seq, 0, cfg.n_seq_max - 1)]
    tc = jnp.clip(t, 0, cfg.recurrent.rs_size - 1)
    has = valid & (t >= 0)
    return Checkpoint(
        pos=jnp.where(has, cells.pos[tc], -1),
        r=jnp.where(has, mem.recurrent.r[:, tc], 0).astype(mem.recurrent.r.dtype),
        s=jnp.where(has, mem.recurrent.s[:, tc], 0).astype(mem.recurrent.s.dtype),
    )


def restore_checkpoint(
    mem: HybridMemory, seq, ckpt: Checkpoint, cfg: HybridConfig
) -> tuple[HybridMemory, ScalarBool]:
    """Rewinds ``seq`` to ``ckpt``: attention positions ``> ckpt.pos`` are removed and the
    recurrent state becomes the checkpoint's.

    The checkpoint must come from this sequence's own history (or one it was forked from); this
    is not checked. Fails, changing nothing, for an invalid ``seq``, an empty checkpoint, a
    checkpoint position the attention part no longer reaches (``> seq_pos_max`` of its KV cells),
    or no free recurrent cell to split a shared state into.

    Returns:
        ``(mem, ok)``.
    """
    seq = i32_scalar(seq, "seq")
    kv_max = kvc.seq_pos_max(mem.kv, seq, cfg.kv)
    reach = (ckpt.pos >= 0) & (ckpt.pos <= kv_max)
    kv, ok_a = kvc.seq_rm(mem.kv, seq, ckpt.pos + 1, -1, cfg.kv)
    recr, ok_r = rec.put_state(mem.recurrent, seq, ckpt.pos, ckpt.r, ckpt.s, cfg.recurrent)
    ok = reach & ok_a & ok_r
    return select_tree(ok, HybridMemory(kv, recr), mem), ok
