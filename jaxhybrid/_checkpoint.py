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
from jaxhybrid._hybrid import HybridConfig, HybridMemory, parts_agree
from jaxhybrid._status import select_tree
from jaxhybrid.array_typing import Array, Scalar, ScalarBool

__all__ = ["Checkpoint", "checkpoint", "restore_checkpoint"]


class Checkpoint(NamedTuple):
    """A sequence's recurrent state after position ``pos``.

    Attributes:
        pos: the position (-1: empty checkpoint, the sequence had no state).
        r: ``[n_recurrent_layers, *r_shape]``.
        s: ``[n_recurrent_layers, *s_shape]``.
        cell: the attention cell (``stream * kv_size + index``) holding ``pos`` for the sequence
            when the checkpoint was taken: restoring needs that cell to hold it still, which
            ties the checkpoint to its history (-1 when there was none).
    """

    pos: Scalar
    r: Array
    s: Array
    cell: Scalar


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
    pos = jnp.where(has, cells.pos[tc], -1)
    return Checkpoint(
        pos=pos,
        r=jnp.where(has, mem.recurrent.r[:, tc], 0).astype(mem.recurrent.r.dtype),
        s=jnp.where(has, mem.recurrent.s[:, tc], 0).astype(mem.recurrent.s.dtype),
        cell=jnp.where(has, _cell_holding(mem, seq, pos, cfg), -1),
    )


def _cell_holding(mem: HybridMemory, seq: Scalar, pos: Scalar, cfg: HybridConfig) -> Scalar:
    """The first attention cell (flat index over streams) where ``seq`` holds ``pos``, or -1."""
    cells = mem.kv.cells
    sc = jnp.clip(seq, 0, cfg.n_seq_max - 1)
    held = (cells.seq[..., sc] & (cells.pos == pos)).reshape(-1)
    return jnp.where(jnp.any(held), jnp.argmax(held), -1).astype(jnp.int32)


def restore_checkpoint(
    mem: HybridMemory, seq, ckpt: Checkpoint, cfg: HybridConfig
) -> tuple[HybridMemory, ScalarBool]:
    """Rewinds ``seq`` to ``ckpt``: attention positions ``> ckpt.pos`` are removed and the
    recurrent state becomes the checkpoint's.

    The checkpoint must come from this sequence's history: the attention cells up to
    ``ckpt.pos`` are kept, so they must be the ones the state was computed with. Checked:

    - its arrays have this memory's shapes and dtypes (else ``InvalidArgumentError`` at trace
      time: nothing is broadcast or cast);
    - ``seq`` still holds ``ckpt.pos`` in the attention cell the checkpoint was taken beside
      (``ckpt.cell``). A checkpoint of another sequence fails unless the two share that cell
      (a fork in a unified cache shares its history's cells); one taken before a fork into
      another stream (``unified=False``) fails for the fork: take it after forking. After a
      leading removal or a context shift moved that position, it fails too;
    - the result keeps both parts in agreement (§15.1).

    It also fails, changing nothing, for an invalid ``seq``, an empty checkpoint, or no free
    recurrent cell to split a shared state into.

    Returns:
        ``(mem, ok)``.
    """
    seq = i32_scalar(seq, "seq")
    pos = i32_scalar(ckpt.pos, "ckpt.pos")
    cell = i32_scalar(ckpt.cell, "ckpt.cell")
    same_cell = (cell >= 0) & (_cell_holding(mem, seq, pos, cfg) == cell)
    kv, ok_a = kvc.seq_rm(mem.kv, seq, pos + 1, -1, cfg.kv)
    recr, ok_r = rec.put_state(mem.recurrent, seq, pos, ckpt.r, ckpt.s, cfg.recurrent)
    new = HybridMemory(kv, recr)
    holds = parts_agree(new, cfg) | ~parts_agree(mem, cfg)
    ok = (pos >= 0) & ok_a & ok_r & seq_ok(seq, cfg.n_seq_max) & holds & same_cell
    return select_tree(ok, new, mem), ok
