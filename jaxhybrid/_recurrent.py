"""Recurrent-state memory (spec §5): per-sequence state cells with sharing and copy-on-write.

A recurrent layer keeps no history, only the state after the last absorbed token. The memory has
``rs_size = max(1, n_seq_max)`` cells; a cell holds one state (an ``r`` convolution window and an
``s`` SSM state per layer), the last position absorbed into it and the set of sequences sharing it
(after ``seq_cp``). ``tail[s]`` is the cell holding sequence ``s`` (-1: no state).

Placement is the same two steps as in the KV cache: :func:`find_slot` returns a
:class:`RecurrentSlot` without changing anything: for each seq set of the ubatch the cell to read
its initial state from (``src``, -1 = zero state) and the cell its final state goes to (``dst``);
:func:`apply_ubatch` then records it in the metadata. Layers move data only through
:func:`read_states` and :func:`write_states`, so copy-on-write needs no eager copy (``src`` = the
shared cell, ``dst`` = a fresh one), and llama.cpp's contiguous packing (§5.4.6) is not needed:
cell indices differ from llama.cpp's, everything observable (positions, sharing, return values,
failures) is the same.

Every operation is pure and jittable, takes traced int32 scalars for ids and positions, and returns
a memory of identical structure, shapes and dtypes. An operation that fails returns ``ok=False``
and its input unchanged, bit for bit (docs/semantics.md, differences 1 and 13).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhybrid._batch import Batch, UBatch, UBatchPlan, get_ubatch
from jaxhybrid._cells import (
    POS_INF,
    add_overflows,
    drop_empty,
    i32_scalar,
    lower_head,
    norm_range,
    seq_ok,
)
from jaxhybrid._config import RecurrentConfig
from jaxhybrid._status import InvalidArgumentError
from jaxhybrid._status import select_tree as _select
from jaxhybrid.array_typing import Array, Bool, Int, Scalar, ScalarBool, Shaped

__all__ = [
    "RecurrentCells",
    "RecurrentMemory",
    "RecurrentSlot",
    "apply_ubatch",
    "can_shift",
    "clear",
    "find_slot",
    "init_recurrent",
    "init_recurrent_cells",
    "prepare",
    "put_state",
    "read_states",
    "seq_add",
    "seq_cp",
    "seq_div",
    "seq_keep",
    "seq_pos_max",
    "seq_pos_min",
    "seq_pos_range",
    "seq_rm",
    "write_states",
]

_I32 = jnp.int32


# --------------------------------------------------------------------------------------------
# Records


class RecurrentCells(NamedTuple):
    """Metadata of the recurrent cells (§5.2).

    Attributes:
        pos: last position absorbed into each cell's state, -1 for an empty cell.
        seq: ``[rs_size, n_seq_max]`` sequences sharing each cell's state (empty cell: none).
        tail: the cell holding each sequence's state, -1 when the sequence has none.
        head: where the circular search for free cells starts (§5.4.4).
        snap: with ``n_snapshots = H > 0``, ``[rs_size, H]``: the position whose state each
            snapshot slot of each cell holds (-1 = none). A state after position ``q`` lives in
            slot ``q % H``; a cell's valid snapshots are positions before its ``pos`` within the
            last ``H``. None when snapshots are off.
    """

    pos: Int[Array, " rs"]
    seq: Bool[Array, "rs seqs"]
    tail: Int[Array, " seqs"]
    head: Scalar
    snap: Int[Array, "rs snapshots"] | None = None


def init_recurrent_cells(cfg: RecurrentConfig) -> RecurrentCells:
    """Empty cell metadata for ``cfg``."""
    rs, h = cfg.rs_size, cfg.n_snapshots
    return RecurrentCells(
        pos=jnp.full((rs,), -1, _I32),
        seq=jnp.zeros((rs, cfg.n_seq_max), jnp.bool_),
        tail=jnp.full((cfg.n_seq_max,), -1, _I32),
        head=jnp.zeros((), _I32),
        snap=jnp.full((rs, h), -1, _I32) if h else None,
    )


class RecurrentMemory(NamedTuple):
    """Recurrent-state memory: cell metadata and the ``r`` / ``s`` states of every layer (§5.3).

    The state buffers are ``[n_layers, rs_size, *shape]``; the live state of cell ``c`` in layer
    ``l`` is ``r[l, c]``. Extra state planes (e.g. rollback snapshots, §5.10) can be added as
    further fields without changing these.

    Attributes:
        cells: the cell metadata.
        r: ``[n_layers, rs_size, *r_shape]`` convolution / token-shift states (``dtype_r``).
        s: ``[n_layers, rs_size, *s_shape]`` SSM / WKV / delta-net states (``dtype_s``).
        snap_r: with ``n_snapshots = H > 0``, ``[n_layers, rs_size, H, *r_shape]``: the rollback
            snapshots of ``r`` (slot meanings in ``cells.snap``); None when snapshots are off.
        snap_s: the same for ``s``.
    """

    cells: RecurrentCells
    r: Shaped[Array, "layers rs *r_shape"]
    s: Shaped[Array, "layers rs *s_shape"]
    snap_r: Shaped[Array, "layers rs snapshots *r_shape"] | None = None
    snap_s: Shaped[Array, "layers rs snapshots *s_shape"] | None = None


def init_recurrent(cfg: RecurrentConfig) -> RecurrentMemory:
    """An empty recurrent memory with zero-filled states.

    Examples:
        >>> from jaxhybrid._config import RecurrentConfig
        >>> mem = init_recurrent(RecurrentConfig(n_seq_max=2, n_layers=3, r_shape=(3, 8)))
        >>> mem.r.shape, mem.cells.pos.tolist()
        ((3, 2, 3, 8), [-1, -1])
    """
    rs, h = cfg.rs_size, cfg.n_snapshots
    return RecurrentMemory(
        cells=init_recurrent_cells(cfg),
        r=jnp.zeros((cfg.n_layers, rs, *cfg.r_shape), cfg.dtype_r),
        s=jnp.zeros((cfg.n_layers, rs, *cfg.s_shape), cfg.dtype_s),
        snap_r=jnp.zeros((cfg.n_layers, rs, h, *cfg.r_shape), cfg.dtype_r) if h else None,
        snap_s=jnp.zeros((cfg.n_layers, rs, h, *cfg.s_shape), cfg.dtype_s) if h else None,
    )


class RecurrentSlot(NamedTuple):
    """Placement of one ubatch (what llama.cpp's ``s_copy`` input carries, §5.6).

    Entry ``k`` describes seq set ``k`` (tokens ``[k * n_seq_tokens, (k+1) * n_seq_tokens)``);
    entries ``k >= n_seqs`` are unused (-1). Both arrays are all -1 when ``ok`` is False.

    Attributes:
        src: cell to read the set's initial state from, -1 for a zero state (new sequence).
        dst: cell the set's final state is written to.
        ok: placement succeeded.
        snap_from: with snapshots, ``[min(n_ubatch, n_seq_max), H]``: where each snapshot slot
            of each set's ``dst`` cell gets its state: a token index of the ubatch (the state
            after that token), -1 the live state of ``src`` (the set's previous state), -2 the
            same slot of ``src`` (kept), -3 nothing. None when snapshots are off.
    """

    src: Int[Array, " ubatch"]
    dst: Int[Array, " ubatch"]
    ok: ScalarBool
    snap_from: Int[Array, "sets snapshots"] | None = None


# --------------------------------------------------------------------------------------------
# Helpers


def _check_memory(mem: RecurrentMemory, cfg: RecurrentConfig) -> None:
    """Trace-time check that ``mem`` was built for ``cfg``."""
    rs, n = cfg.rs_size, cfg.n_seq_max
    expected = {
        "cells.pos": ((rs,), np.dtype(np.int32)),
        "cells.seq": ((rs, n), np.dtype(np.bool_)),
        "cells.tail": ((n,), np.dtype(np.int32)),
        "cells.head": ((), np.dtype(np.int32)),
        "r": ((cfg.n_layers, rs, *cfg.r_shape), cfg.dtype_r),
        "s": ((cfg.n_layers, rs, *cfg.s_shape), cfg.dtype_s),
    }
    found = {
        "cells.pos": mem.cells.pos,
        "cells.seq": mem.cells.seq,
        "cells.tail": mem.cells.tail,
        "cells.head": mem.cells.head,
        "r": mem.r,
        "s": mem.s,
    }
    h = cfg.n_snapshots
    snaps = {"cells.snap": mem.cells.snap, "snap_r": mem.snap_r, "snap_s": mem.snap_s}
    if h:
        expected["cells.snap"] = ((rs, h), np.dtype(np.int32))
        expected["snap_r"] = ((cfg.n_layers, rs, h, *cfg.r_shape), cfg.dtype_r)
        expected["snap_s"] = ((cfg.n_layers, rs, h, *cfg.s_shape), cfg.dtype_s)
        found.update(snaps)
        missing = [name for name, a in snaps.items() if a is None]
        if missing:
            raise InvalidArgumentError(
                f"config has n_snapshots={h} but the memory has no {missing}"
            )
    elif any(a is not None for a in snaps.values()):
        raise InvalidArgumentError("the memory holds snapshots but its config has n_snapshots=0")
    for name, (shape, dtype) in expected.items():
        a = found[name]
        if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
            raise InvalidArgumentError(
                f"recurrent memory field {name} must be {dtype}{list(shape)} for this config, "
                f"got {np.dtype(a.dtype)}{list(a.shape)}"
            )


def _free_order(cells: RecurrentCells, head: Scalar) -> tuple[Int[Array, " rs"], Scalar]:
    """Cells sorted so that the empty ones come first in circular order from ``head``
    (llama.cpp's repeated ``next_empty`` scan, §5.4.4), and the number of empty cells."""
    rs = cells.pos.shape[0]
    empty = ~jnp.any(cells.seq, axis=1)
    order = (jnp.arange(rs, dtype=_I32) - head) % rs
    key = jnp.where(empty, order, rs + order)
    return jnp.argsort(key).astype(_I32), jnp.sum(empty).astype(_I32)


# --------------------------------------------------------------------------------------------
# Placement (§5.4, §5.5)


class _Sets(NamedTuple):
    """The seq sets of an equal-split ubatch: set ``k`` is its tokens
    ``[k * n_seq_tokens, (k+1) * n_seq_tokens)``; entries ``k >= n_seqs`` are unused."""

    used: Bool[Array, " ubatch"]  # k < n_seqs
    members: Bool[Array, "ubatch seqs"]  # every seq id of set k's first token
    prim: Bool[Array, "ubatch seqs"]  # its primary (first) id only
    primary: Int[Array, " ubatch"]
    last: Int[Array, " ubatch"]  # index of set k's last token
    bad_id: ScalarBool  # some id of a set is not a cell index (§5.4.2)
    overlap: ScalarBool  # two sets share a sequence


def _sets(ubatch: UBatch, cfg: RecurrentConfig) -> _Sets:
    rs, n_seq = cfg.rs_size, cfg.n_seq_max
    n_ub = ubatch.valid.shape[0]
    if ubatch.seq.shape[1] != n_seq:
        raise InvalidArgumentError(
            f"ubatch.seq has {ubatch.seq.shape[1]} sequence columns, the memory {n_seq}"
        )
    n_tok = ubatch.n_seq_tokens.astype(_I32)
    k = jnp.arange(n_ub, dtype=_I32)
    used = k < ubatch.n_seqs.astype(_I32)
    first = jnp.clip(k * n_tok, 0, n_ub - 1)
    # §5.4.2: every seq id of a set's first token must be a cell index. Column 0 is the primary
    # id; -1 marks an unused column after it.
    ids = ubatch.seq_id[first]
    col = jnp.arange(ids.shape[1])[None, :]
    present = used[:, None] & ((col == 0) | (ids != -1))
    primary = jnp.clip(ids[:, 0], 0, n_seq - 1)
    members = ubatch.seq[first] & used[:, None]
    return _Sets(
        used=used,
        members=members,
        prim=members & (jnp.arange(n_seq)[None, :] == primary[:, None]),
        primary=primary,
        last=jnp.clip(k * n_tok + n_tok - 1, 0, n_ub - 1),
        bad_id=jnp.any(present & ((ids < 0) | (ids >= rs))),
        # Sets of an equal split are disjoint; llama.cpp asserts on anything else.
        overlap=jnp.any(jnp.sum(members.astype(_I32), axis=0) > 1),
    )


def _leave_secondary(cells: RecurrentCells, sets: _Sets) -> RecurrentCells:
    """§5.4.3: secondary ids leave the cell they hold (it may become free); they are merged
    into their primary's cell when the ubatch is applied (§5.4.7)."""
    secondary = jnp.any(sets.members & ~sets.prim, axis=0)
    new, _ = drop_empty(
        cells._replace(
            seq=cells.seq & ~secondary[None, :], tail=jnp.where(secondary, -1, cells.tail)
        )
    )
    return new


def _find_slot(cells: RecurrentCells, ubatch: UBatch, cfg: RecurrentConfig) -> RecurrentSlot:
    """:func:`find_slot` on the metadata only (shared with :func:`prepare`)."""
    rs = cfg.rs_size
    n_ub = ubatch.valid.shape[0]
    sets = _sets(ubatch, cfg)
    # §5.4.1: restart heuristic for the free-cell search.
    used = jnp.sum(jnp.any(cells.seq, axis=1)).astype(_I32)
    head = jnp.where(cells.head > used + 2 * ubatch.n_seqs.astype(_I32), 0, cells.head)
    cells1 = _leave_secondary(cells, sets)

    # §5.4.5: a primary keeps its tail cell if it is the only sequence left in it. Earlier sets
    # whose primary shared that cell have moved out (they found it shared), so set k keeps it iff
    # every member is the primary of a set <= k.
    tail_p = cells1.tail[sets.primary]
    has_tail = sets.used & (tail_p >= 0)
    cell_members = cells1.seq[jnp.clip(tail_p, 0, rs - 1)]
    seen = jnp.cumsum(sets.prim.astype(_I32), axis=0) > 0
    keep = has_tail & jnp.all(~cell_members | seen, axis=1)
    need = sets.used & ~keep
    # The sets needing a cell take the free cells in circular order from head (§5.4.4-5); a
    # shared tail is copied on write: the set reads the shared cell and writes the new one.
    free_cells, n_free = _free_order(cells1, head)
    rank = jnp.cumsum(need.astype(_I32)) - 1
    no_cell = jnp.sum(need.astype(_I32)) > n_free
    cell = jnp.where(keep, tail_p, free_cells[jnp.clip(rank, 0, rs - 1)])
    cell = jnp.where(sets.used, cell, -1)
    src = jnp.where(has_tail, tail_p, -1)

    ok = ~sets.bad_id & ~sets.overlap & ~no_cell
    snap_from = None
    if cfg.n_snapshots:
        _, snap_from = _snapshot_rows(cells1, ubatch, src, cell, sets.used, cfg)
        snap_from = jnp.where(ok, snap_from, -3)
    minus1 = jnp.full((n_ub,), -1, _I32)
    return RecurrentSlot(
        src=jnp.where(ok, src, minus1).astype(_I32),
        dst=jnp.where(ok, cell, minus1).astype(_I32),
        ok=ok,
        snap_from=snap_from,
    )


def _apply_ubatch(
    cells: RecurrentCells, ubatch: UBatch, slot: RecurrentSlot, cfg: RecurrentConfig
) -> RecurrentCells:
    """:func:`apply_ubatch` on the metadata only (shared with :func:`prepare`)."""
    rs = cfg.rs_size
    sets = _sets(ubatch, cfg)
    cells1 = _leave_secondary(cells, sets)
    # §5.4.7: each set's cell gets the last position of the set and exactly the first token's ids;
    # those ids leave any other cell and point their tail at it.
    cell = slot.dst
    any_member = jnp.any(sets.members, axis=0)
    cell_drop = jnp.where(sets.used & (cell >= 0), cell, rs)
    seq2 = (cells1.seq & ~any_member[None, :]).at[cell_drop].set(sets.members, mode="drop")
    pos2 = cells1.pos.at[cell_drop].set(ubatch.pos[sets.last].astype(_I32), mode="drop")
    set_of_seq = jnp.argmax(sets.members, axis=0)
    tail2 = jnp.where(any_member, cell[set_of_seq], cells1.tail)
    head2 = jnp.min(jnp.where(sets.used, cell, rs)).astype(_I32)
    new, _ = drop_empty(cells1._replace(pos=pos2, seq=seq2, tail=tail2, head=head2))
    if cfg.n_snapshots:
        row, _ = _snapshot_rows(cells1, ubatch, slot.src, cell, sets.used, cfg)
        n_sets = row.shape[0]
        dst = jnp.where(sets.used[:n_sets], cell[:n_sets], rs)
        new = new._replace(snap=new.snap.at[dst].set(row, mode="drop"))
    return _select(slot.ok & (ubatch.n_seqs > 0), new, cells)


def _snapshot_rows(
    old: RecurrentCells,
    ubatch: UBatch,
    src: Int[Array, " ubatch"],
    cell: Int[Array, " ubatch"],
    set_ok: Bool[Array, " ubatch"],
    cfg: RecurrentConfig,
) -> tuple[Int[Array, "sets snapshots"], Int[Array, "sets snapshots"]]:
    """Snapshot slots of every set's destination cell after the ubatch (§5.10, our form).

    A set ending at position ``P`` keeps the states after the positions in ``[P - H, P)`` that
    exist: those its source cell kept, the source's live state (position ``prev``) and the states
    after each of its tokens but the last (whose state is the live one). Any ``H`` consecutive
    positions fall in distinct slots ``q % H``, so these never collide.

    Returns:
        Per set, the positions its destination cell's snapshot slots hold (``cells.snap`` rows,
        -1 = none) and where each slot's state comes from (``RecurrentSlot.snap_from``).
    """
    h, rs = cfg.n_snapshots, cfg.rs_size
    n_ub = ubatch.valid.shape[0]
    n_sets = min(n_ub, cfg.n_seq_max)  # an equal split has at most one set per sequence
    n_tok = ubatch.n_seq_tokens.astype(_I32)
    k = jnp.arange(n_sets, dtype=_I32)
    j = jnp.arange(n_ub, dtype=_I32)
    ok_k = set_ok[:n_sets]
    src_k = src[:n_sets]
    last_pos = ubatch.pos[jnp.clip(k * n_tok + n_tok - 1, 0, n_ub - 1)].astype(_I32)
    lo = last_pos - h

    # Kept: the source's snapshots still inside the window.
    sc = jnp.clip(src_k, 0, rs - 1)
    has_src = src_k >= 0
    base = jnp.where(has_src[:, None], old.snap[sc], -1)
    keep = (base >= lo[:, None]) & (base < last_pos[:, None])
    row = jnp.where(keep, base, -1)
    frm = jnp.where(keep, -2, -3)
    rows = jnp.arange(n_sets)[:, None]

    # The source's live state, at its position.
    prev = jnp.where(has_src, old.pos[sc], -1)
    use = has_src & (prev >= 0) & (prev >= lo) & (prev < last_pos)
    slot = jnp.where(use, prev % h, h)[:, None]
    row = row.at[rows, slot].set(prev[:, None], mode="drop")
    frm = frm.at[rows, slot].set(-1, mode="drop")

    # Every token of the set but its last.
    t = k[:, None] * n_tok + j[None, :]
    tc = jnp.clip(t, 0, n_ub - 1)
    q = ubatch.pos[tc].astype(_I32)
    use = (j[None, :] < n_tok - 1) & ubatch.valid[tc] & (q >= lo[:, None]) & (q >= 0)
    slot = jnp.where(use, q % h, h)
    row = row.at[rows, slot].set(q, mode="drop")
    frm = frm.at[rows, slot].set(t, mode="drop")
    return jnp.where(ok_k[:, None], row, -1), jnp.where(ok_k[:, None], frm, -3)


def find_slot(mem: RecurrentMemory, ubatch: UBatch, cfg: RecurrentConfig) -> RecurrentSlot:
    """Finds the cells of one ubatch of an equal (or seq) split without changing the memory (§5.4).

    Each seq set keeps its sequence's cell when no other sequence shares it; otherwise it moves to
    a free cell, starting from the shared state (copy-on-write) or from zeros (new sequence). The
    secondary seq ids of a set's tokens join the primary's cell. :func:`apply_ubatch` then records
    the placement in the metadata, and the layers use :func:`read_states` /
    :func:`write_states` with the slot.

    Args:
        mem: the memory.
        ubatch: a ubatch with ``cfg.n_seq_max`` sequence columns.
        cfg: the memory's config.

    Returns:
        The slot; ``slot.ok`` is False for a seq id outside ``[0, rs_size)``, overlapping seq sets,
        or no free cell.

    Examples:
        >>> from jaxhybrid._batch import make_batch, split_equal, get_ubatch
        >>> cfg = RecurrentConfig(n_seq_max=2, n_layers=1, r_shape=(2,), s_shape=(2,))
        >>> b = make_batch([1, 2, 3], pos=[0, 1, 2], n_batch=4)
        >>> plan = split_equal(b, n_ubatch=4, n_seq_max=2, sequential=True)
        >>> ub = get_ubatch(b, plan, 0, n_ubatch=4, n_seq_max=2)
        >>> mem = init_recurrent(cfg)
        >>> slot = find_slot(mem, ub, cfg)
        >>> mem = apply_ubatch(mem, ub, slot, cfg)
        >>> bool(slot.ok), slot.src[0].item(), seq_pos_max(mem, 0, cfg).item()
        (True, -1, 2)
    """
    _check_memory(mem, cfg)
    return _find_slot(mem.cells, ubatch, cfg)


def apply_ubatch(
    mem: RecurrentMemory, ubatch: UBatch, slot: RecurrentSlot, cfg: RecurrentConfig
) -> RecurrentMemory:
    """Records the placement ``slot`` of ``ubatch`` (from :func:`find_slot` on this memory) in
    the cell metadata (§5.4.7); no state data moves. A slot that is not ``ok`` changes nothing.
    """
    _check_memory(mem, cfg)
    return mem._replace(cells=_apply_ubatch(mem.cells, ubatch, slot, cfg))


class _DryRun(NamedTuple):
    """Carry of the dry run: the next ubatch, the cells so far, whether all fit so far."""

    u: Scalar
    cells: RecurrentCells
    ok: ScalarBool


def prepare(
    mem: RecurrentMemory,
    batch: Batch,
    plan: UBatchPlan,
    cfg: RecurrentConfig,
    *,
    n_ubatch: int,
) -> tuple[ScalarBool, Scalar]:
    """Dry run of :func:`find_slot` + :func:`apply_ubatch` over every ubatch of ``plan`` (§5.5);
    the memory is untouched.

    Whether the plan covers the whole batch (``plan.complete``) is the caller's check.

    Returns:
        ``(ok, failed_ubatch)``: whether every placement succeeds, and the index of the first
        ubatch that cannot be placed (-1 when ``ok``).
    """
    _check_memory(mem, cfg)

    def cond(c: _DryRun):
        return c.ok & (c.u < plan.n_ubatches)

    def body(c: _DryRun) -> _DryRun:
        ub = get_ubatch(batch, plan, c.u, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
        slot = _find_slot(c.cells, ub, cfg)
        cells = _apply_ubatch(c.cells, ub, slot, cfg)
        return _DryRun(jnp.where(slot.ok, c.u + 1, c.u), cells, slot.ok)

    out = jax.lax.while_loop(cond, body, _DryRun(jnp.int32(0), mem.cells, jnp.bool_(True)))
    return out.ok, jnp.where(out.ok, -1, out.u).astype(_I32)


# --------------------------------------------------------------------------------------------
# State gather / scatter (§5.6)


def _layer_plane(buf: Array, layer, n_layers: int) -> Array:
    if isinstance(layer, int | np.integer):
        if not 0 <= layer < n_layers:
            raise InvalidArgumentError(f"layer must be in [0, {n_layers}), got {layer}")
        return buf[layer]
    return jax.lax.dynamic_index_in_dim(buf, jnp.asarray(layer, _I32), 0, keepdims=False)


def read_states(
    mem: RecurrentMemory, layer, slot: RecurrentSlot, cfg: RecurrentConfig
) -> tuple[Array, Array]:
    """Initial ``r`` / ``s`` state of every seq set of a ubatch in one layer.

    Args:
        mem: the memory (as returned by :func:`apply_ubatch`).
        layer: index of the recurrent layer, a static int or a traced int32 scalar.
        slot: the ubatch's placement.
        cfg: the memory's config.

    Returns:
        ``(r0, s0)`` of shapes ``[n_ubatch, *r_shape]`` and ``[n_ubatch, *s_shape]``; zeros for
        sets starting a new sequence (``src == -1``) and for unused entries.
    """
    _check_memory(mem, cfg)
    n_layers, rs = cfg.n_layers, cfg.rs_size
    src = slot.src
    idx = jnp.clip(src, 0, rs - 1)

    def gather(buf):
        rows = _layer_plane(buf, layer, n_layers)[idx]
        keep = (src >= 0).reshape(src.shape + (1,) * (rows.ndim - 1))
        return jnp.where(keep, rows, jnp.zeros((), rows.dtype))

    return gather(mem.r), gather(mem.s)


def write_states(
    mem: RecurrentMemory,
    layer,
    slot: RecurrentSlot,
    r: Array,
    s: Array,
    n_seqs,
    cfg: RecurrentConfig,
    *,
    r_tok: Array | None = None,
    s_tok: Array | None = None,
) -> RecurrentMemory:
    """Writes the final ``r`` / ``s`` state of every seq set of a ubatch in one layer.

    Args:
        mem: the memory (as returned by :func:`apply_ubatch`).
        layer: index of the recurrent layer, a static int or a traced int32 scalar.
        slot: the ubatch's placement.
        r: ``[n_ubatch, *r_shape]`` final convolution states, one per seq set.
        s: ``[n_ubatch, *s_shape]`` final SSM states.
        n_seqs: the ubatch's number of seq sets; entries ``>= n_seqs`` are dropped.
        cfg: the memory's config.
        r_tok: ``[n_ubatch, *r_shape]``, the state after every token of the ubatch (in ubatch
            order); required when the memory keeps snapshots (``n_snapshots > 0``), which are
            taken from it, ignored otherwise.
        s_tok: ``[n_ubatch, *s_shape]``, the same for ``s``.

    Returns:
        The memory with the states stored in the slot's destination cells (cast to the buffer
        dtypes) and, with snapshots, each destination's snapshot slots filled as
        ``slot.snap_from`` says. Nothing is written when ``slot.ok`` is False.
    """
    _check_memory(mem, cfg)
    n_layers, rs = cfg.n_layers, cfg.rs_size
    n_ub = slot.dst.shape[0]
    for name, x, buf in (("r", r, mem.r), ("s", s, mem.s)):
        if tuple(x.shape) != (n_ub, *buf.shape[2:]):
            raise InvalidArgumentError(
                f"{name} must have shape {[n_ub, *buf.shape[2:]]}, got {x.shape}"
            )
    if isinstance(layer, int | np.integer) and not 0 <= layer < n_layers:
        raise InvalidArgumentError(f"layer must be in [0, {n_layers}), got {layer}")
    k = jnp.arange(n_ub, dtype=_I32)
    write = slot.ok & (k < jnp.asarray(n_seqs, _I32)) & (slot.dst >= 0)
    dst = jnp.where(write, slot.dst, rs)
    layer = jnp.asarray(layer, _I32)
    snaps = {}
    if mem.snap_r is not None:
        if r_tok is None or s_tok is None or slot.snap_from is None:
            raise InvalidArgumentError(
                "this memory keeps rollback snapshots (n_snapshots > 0): pass the per-token "
                "states r_tok / s_tok, and a slot from find_slot on this memory"
            )
        for name, x, buf in (("r_tok", r_tok, mem.r), ("s_tok", s_tok, mem.s)):
            if tuple(x.shape) != (n_ub, *buf.shape[2:]):
                raise InvalidArgumentError(
                    f"{name} must have shape {[n_ub, *buf.shape[2:]]}, got {x.shape}"
                )
        # Before the live states are overwritten: a slot may take the source's live state.
        snaps = dict(
            snap_r=_write_snapshots(mem.snap_r, mem.r, r_tok, layer, slot, dst),
            snap_s=_write_snapshots(mem.snap_s, mem.s, s_tok, layer, slot, dst),
        )
    return mem._replace(
        r=mem.r.at[layer, dst].set(r.astype(mem.r.dtype), mode="drop"),
        s=mem.s.at[layer, dst].set(s.astype(mem.s.dtype), mode="drop"),
        **snaps,
    )


def _write_snapshots(snap, live, tok, layer, slot: RecurrentSlot, dst) -> Array:
    """``snap`` with each set's destination slots filled from ``slot.snap_from`` in one layer."""
    frm = slot.snap_from
    n_sets, rs, n_ub = frm.shape[0], live.shape[1], tok.shape[0]
    src = jnp.clip(slot.src[:n_sets], 0, rs - 1)
    ring = snap[layer][src]  # [sets, H, *shape]
    prev = live[layer][src][:, None]
    from_tok = tok[jnp.clip(frm, 0, n_ub - 1)].astype(snap.dtype)
    f = frm.reshape(frm.shape + (1,) * (snap.ndim - 3))
    zero = jnp.zeros((), snap.dtype)
    val = jnp.where(f >= 0, from_tok, jnp.where(f == -1, prev, jnp.where(f == -2, ring, zero)))
    return snap.at[layer, dst[:n_sets]].set(val, mode="drop")


# --------------------------------------------------------------------------------------------
# Sequence operations (§5.7)


class _OwnCell(NamedTuple):
    """A sequence moved into a cell of its own (see :func:`_own_cell`)."""

    cells: RecurrentCells  # the sequence's membership and tail moved to ``to``, nothing else
    to: Scalar  # its tail cell, or the first free cell when it had to move
    ok: ScalarBool  # False when it had to move and no cell is free


def _own_cell(
    cells: RecurrentCells, seq: Scalar, move: ScalarBool, cfg: RecurrentConfig
) -> _OwnCell:
    """Gives sequence ``seq`` (in range) a cell of its own: when ``move`` it is split off its
    tail cell into the first free cell in circular order from the head (sequences sharing the old
    cell keep it), else it stays in its tail cell. No data moves; the caller copies the state."""
    rs, n_seq = cfg.rs_size, cfg.n_seq_max
    col = jnp.arange(n_seq) == seq
    free_cells, n_free = _free_order(cells, cells.head)
    to = jnp.where(move, free_cells[0], jnp.clip(cells.tail[seq], 0, rs - 1))
    at_to = jnp.arange(rs) == to
    new = cells._replace(
        seq=(cells.seq & ~col[None, :]) | (at_to[:, None] & col[None, :]),
        tail=jnp.where(col, to, cells.tail),
    )
    return _OwnCell(new, to, ~move | (n_free > 0))


def _shared(cells: RecurrentCells, seq: Scalar, cfg: RecurrentConfig) -> ScalarBool:
    """Whether ``seq``'s tail cell holds other sequences too."""
    tc = jnp.clip(cells.tail[seq], 0, cfg.rs_size - 1)
    return jnp.sum(cells.seq[tc].astype(_I32)) > 1


def seq_rm(
    mem: RecurrentMemory, seq, p0, p1, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """Removes the positions ``[p0, p1)`` of ``seq`` (-1 = every sequence) (§5.7.1).

    A state cannot be rewound, so only these succeed: removing the whole state (a range holding
    the last position and starting at 0), a range not holding the last position (true, no change:
    the state keeps what it absorbed, which context shift relies on), and for ``seq == -1`` an
    empty range or ``[0, +inf)`` (every cell cleared). Any other id outside ``[0, n_seq_max)``
    (difference 13) and a range holding the last position but starting after 0 return False and
    leave the memory bit-identical.

    With snapshots (``n_snapshots > 0``) a range holding the last position and starting at
    ``p0 > 0`` also succeeds when the state after ``p0 - 1`` is among the snapshots (a rewind of
    at most ``n_snapshots`` tokens): the state becomes exactly that one (§5.9-5.10). A state
    shared with other sequences is split off into a free cell first; they keep theirs.

    Examples:
        >>> cfg = RecurrentConfig(n_seq_max=1, n_layers=0)
        >>> mem, ok = seq_rm(init_recurrent(cfg), 0, 0, -1, cfg)
        >>> bool(ok)
        True
    """
    _check_memory(mem, cfg)
    seq = i32_scalar(seq, "seq")
    p0, p1 = norm_range(p0, p1)
    cells = mem.cells
    every = seq == -1
    one, ok_one, rewind = _rm_one(cells, seq, p0, p1, cfg)
    all_cells, ok_all = _rm_every(cells, p0, p1)
    ok = jnp.where(every, ok_all, ok_one)
    new = _select(every, all_cells, one)
    if not cfg.n_snapshots:
        return mem._replace(cells=_select(ok, new, cells)), ok
    roll = ~every & seq_ok(seq, cfg.n_seq_max) & rewind
    mem_roll, ok_roll = _rewind(mem, jnp.clip(seq, 0, cfg.n_seq_max - 1), p0 - 1, roll, cfg)
    ok = ok | ok_roll
    new = _select(ok_roll, mem_roll.cells, new)
    return mem_roll._replace(cells=_select(ok, new, cells)), ok


def _rm_one(
    cells: RecurrentCells, seq: Scalar, p0: Scalar, p1: Scalar, cfg: RecurrentConfig
) -> tuple[RecurrentCells, ScalarBool, ScalarBool]:
    """:func:`seq_rm` of one sequence: ``(cells, ok, a rewind is needed)``."""
    rs, n_seq = cfg.rs_size, cfg.n_seq_max
    sc = jnp.clip(seq, 0, n_seq - 1)
    col = jnp.arange(n_seq) == sc
    tail = cells.tail[sc]
    last = cells.pos[jnp.clip(tail, 0, rs - 1)]
    holds_last = (tail >= 0) & (p0 <= last) & (last < p1)
    rewind = holds_last & (p0 > 0)
    new, freed = drop_empty(
        cells._replace(
            seq=jnp.where(holds_last, cells.seq & ~col[None, :], cells.seq),
            tail=jnp.where(holds_last & col, -1, cells.tail),
        )
    )
    new = new._replace(head=lower_head(cells.head, freed))
    return new, seq_ok(seq, n_seq) & ~rewind, rewind


def _rm_every(cells: RecurrentCells, p0: Scalar, p1: Scalar) -> tuple[RecurrentCells, ScalarBool]:
    """:func:`seq_rm` of every sequence, all or nothing: ``(cells, ok)``."""
    empty_range = p0 == p1
    everything = (p0 == 0) & (p1 == POS_INF)
    clear_all = ~empty_range & everything
    new, freed = drop_empty(
        cells._replace(
            seq=jnp.where(clear_all, jnp.zeros_like(cells.seq), cells.seq),
            tail=jnp.where(clear_all, -1, cells.tail),
        )
    )
    return new._replace(head=lower_head(cells.head, freed)), empty_range | everything


def _rewind(
    mem: RecurrentMemory, seq: Scalar, q: Scalar, want: ScalarBool, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """When ``want``: makes ``seq``'s state the snapshot after position ``q`` (if kept).

    Returns the memory (data written only on success) and whether the rewind happened.
    """
    cells = mem.cells
    rs = cfg.rs_size
    tc = jnp.clip(cells.tail[seq], 0, rs - 1)
    row = cells.snap[tc]
    at = (row == q) & (q >= 0)
    j = jnp.argmax(at)
    # The rewound state lives in its own cell: the tail cell, or a free one when shared.
    shared = _shared(cells, seq, cfg)
    own = _own_cell(cells, seq, shared, cfg)
    ok = want & jnp.any(at) & own.ok
    at_to = jnp.arange(rs) == own.to
    new = own.cells._replace(
        pos=jnp.where(at_to, q, cells.pos),
        snap=jnp.where(at_to[:, None], jnp.where(row >= q, -1, row)[None, :], cells.snap),
    )
    w = jnp.where(ok, own.to, rs)  # data: the live state from the snapshot, the ring with it
    wf = jnp.where(ok & shared, own.to, rs)
    return (
        RecurrentMemory(
            cells=_select(ok, new, cells),
            r=mem.r.at[:, w].set(mem.snap_r[:, tc, j], mode="drop"),
            s=mem.s.at[:, w].set(mem.snap_s[:, tc, j], mode="drop"),
            snap_r=mem.snap_r.at[:, wf].set(mem.snap_r[:, tc], mode="drop"),
            snap_s=mem.snap_s.at[:, wf].set(mem.snap_s[:, tc], mode="drop"),
        ),
        ok,
    )


def seq_cp(
    mem: RecurrentMemory, src, dst, p0, p1, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """Makes ``dst`` share ``src``'s state (§5.7.2); the range is ignored.

    ``dst``'s previous state is dropped first. No data is copied: the first later write by either
    sequence copies the state on write (:func:`find_slot`, :func:`seq_add`). ``src == dst`` is a
    no-op; an id outside ``[0, n_seq_max)`` returns False and changes nothing.
    """
    _check_memory(mem, cfg)
    del p0, p1
    src, dst = i32_scalar(src, "src"), i32_scalar(dst, "dst")
    cells = mem.cells
    n_seq = cfg.n_seq_max
    ok = seq_ok(src, n_seq) & seq_ok(dst, n_seq)
    act = ok & (src != dst)
    sc, dc = jnp.clip(src, 0, n_seq - 1), jnp.clip(dst, 0, n_seq - 1)
    dcol = jnp.arange(n_seq) == dc
    t_src = cells.tail[sc]
    joins = jnp.arange(cfg.rs_size) == t_src  # all False when src has no state
    seq = (cells.seq & ~dcol[None, :]) | (joins[:, None] & dcol[None, :])
    new, _ = drop_empty(cells._replace(seq=seq, tail=jnp.where(dcol, t_src, cells.tail)))
    return mem._replace(cells=_select(act, new, cells)), ok


def seq_keep(mem: RecurrentMemory, seq, cfg: RecurrentConfig) -> tuple[RecurrentMemory, ScalarBool]:
    """Drops every sequence but ``seq`` (§5.7.3); its cell then holds only ``seq``.

    An id outside ``[0, n_seq_max)`` returns False and changes nothing.
    """
    _check_memory(mem, cfg)
    seq = i32_scalar(seq, "seq")
    cells = mem.cells
    n_seq = cfg.n_seq_max
    ok = seq_ok(seq, n_seq)
    col = jnp.arange(n_seq) == jnp.clip(seq, 0, n_seq - 1)
    holds = cells.seq[:, jnp.clip(seq, 0, n_seq - 1)]
    new, _ = drop_empty(
        cells._replace(
            seq=holds[:, None] & col[None, :],
            tail=jnp.where(col, cells.tail, -1),
            head=lower_head(cells.head, ~holds),
        )
    )
    return mem._replace(cells=_select(ok, new, cells)), ok


def _move_position(
    mem: RecurrentMemory, seq: Scalar, hit: ScalarBool, new_pos: Scalar, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """Sets the position of ``seq``'s state to ``new_pos`` when ``hit``, for seq_add/seq_div.

    Only ``seq`` moves (difference 10): a shared state is first split off into a free cell
    with a copy of its data in every layer (False and no change without a free cell). A position
    below 0 clears ``seq``'s state (difference 11). The moved state keeps no snapshots: they are
    keyed by position, so a shift restarts the rollback horizon.
    """
    cells = mem.cells
    rs, n_seq = cfg.rs_size, cfg.n_seq_max
    sc = jnp.clip(seq, 0, n_seq - 1)
    col = jnp.arange(n_seq) == sc
    drop = hit & (new_pos < 0)
    split = hit & ~drop & _shared(cells, sc, cfg)
    own = _own_cell(cells, sc, split, cfg)
    moved = (jnp.arange(rs) == own.to) & hit & ~drop  # the cell now holding the moved state
    snap = None if cells.snap is None else jnp.where(moved[:, None], -1, cells.snap)
    new, _ = drop_empty(
        cells._replace(
            pos=jnp.where(moved, new_pos, cells.pos),
            seq=jnp.where(drop, cells.seq & ~col[None, :], own.cells.seq),
            tail=jnp.where(drop & col, -1, own.cells.tail),
            snap=snap,
        )
    )
    new = new._replace(head=lower_head(cells.head, jnp.any(cells.seq, axis=1) & (new.pos < 0)))

    # The split-off cell gets a copy of the shared state (the only eager data copy here).
    tc = jnp.clip(cells.tail[sc], 0, rs - 1)
    to = jnp.where(split & own.ok, own.to, rs)
    r = mem.r.at[:, to].set(mem.r[:, tc], mode="drop")
    s = mem.s.at[:, to].set(mem.s[:, tc], mode="drop")
    return mem._replace(cells=_select(own.ok & hit, new, cells), r=r, s=s), own.ok


def _selected(cells: RecurrentCells, seq: Scalar, p0: Scalar, p1: Scalar, cfg: RecurrentConfig):
    """(``seq`` has a state whose position is in ``[p0, p1)``, that position)."""
    t = cells.tail[jnp.clip(seq, 0, cfg.n_seq_max - 1)]
    pos = cells.pos[jnp.clip(t, 0, cfg.rs_size - 1)]
    return (t >= 0) & (p0 <= pos) & (pos < p1), pos


def seq_add(
    mem: RecurrentMemory, seq, p0, p1, delta, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """Adds ``delta`` to the position of ``seq``'s state if it lies in ``[p0, p1)`` (§5.7.4).

    Positions only; the state data is unchanged. Only ``seq`` moves: a state shared with other
    sequences is split off first (with a data copy), and a state moved below position 0 is
    cleared (differences 10, 11).

    Returns:
        ``(mem, ok)``; False (memory unchanged) for an id outside ``[0, n_seq_max)`` or when a
        shared state must be split off and no cell is free.
    """
    _check_memory(mem, cfg)
    seq, delta = i32_scalar(seq, "seq"), i32_scalar(delta, "delta")
    p0, p1 = norm_range(p0, p1)
    valid = seq_ok(seq, cfg.n_seq_max)
    sel, pos = _selected(mem.cells, seq, p0, p1, cfg)
    hit = valid & sel & (delta != 0) & (p0 != p1)
    over = hit & add_overflows(pos, delta)  # §15.2: refused, not wrapped
    new, ok = _move_position(mem, seq, hit & ~over, pos + delta, cfg)
    return new, valid & ok & ~over


def seq_div(
    mem: RecurrentMemory, seq, p0, p1, d, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """Divides the position of ``seq``'s state by ``d`` if it lies in ``[p0, p1)`` (§5.7.5).

    As :func:`seq_add`: positions only, a shared state is split off first (only when the position
    actually changes). ``d < 1`` and ids outside ``[0, n_seq_max)`` return False, no change.
    """
    _check_memory(mem, cfg)
    seq, d = i32_scalar(seq, "seq"), i32_scalar(d, "d")
    p0, p1 = norm_range(p0, p1)
    valid = seq_ok(seq, cfg.n_seq_max) & (d >= 1)
    sel, pos = _selected(mem.cells, seq, p0, p1, cfg)
    new_pos = pos // jnp.maximum(d, 1)  # pos >= 0, d >= 1: floor == C++ truncation
    hit = valid & sel & (d != 1) & (p0 != p1) & (new_pos != pos)
    new, ok = _move_position(mem, seq, hit, new_pos, cfg)
    return new, valid & ok


def can_shift(cfg: RecurrentConfig) -> bool:
    """Positions of recurrent states can always be shifted (:func:`seq_add`, :func:`seq_div`)."""
    del cfg
    return True


def seq_pos_range(
    mem: RecurrentMemory, cfg: RecurrentConfig, *, snapshots: bool = True
) -> tuple[Int[Array, " seqs"], Int[Array, " seqs"]]:
    """Smallest and largest position held by every sequence, -1 where none (§5.7.6).

    A sequence has at most one state, so both are its last absorbed position; with snapshots
    the smallest is the oldest position whose state is kept (``seq_rm(seq, p0, -1)`` succeeds
    for every ``p0 > pos_min``), unless ``snapshots`` is False (llama.cpp's definition, which
    batch validation uses, §6.2).
    """
    _check_memory(mem, cfg)
    cells = mem.cells
    pos = cells.pos
    if cells.snap is not None and snapshots:
        oldest = jnp.min(jnp.where(cells.snap >= 0, cells.snap, POS_INF), axis=1)
        pos = jnp.where(pos >= 0, jnp.minimum(pos, oldest), pos)
    has = jnp.any(cells.seq, axis=0)
    lo = jnp.min(jnp.where(cells.seq, pos[:, None], POS_INF), axis=0)
    pos = cells.pos[:, None]
    hi = jnp.max(jnp.where(cells.seq, pos, -1), axis=0)
    return jnp.where(has, lo, -1).astype(_I32), jnp.where(has, hi, -1).astype(_I32)


def _one_seq(values: Int[Array, " seqs"], seq, cfg: RecurrentConfig) -> Scalar:
    seq = i32_scalar(seq, "seq")
    return jnp.where(seq_ok(seq, cfg.n_seq_max), values[jnp.clip(seq, 0, cfg.n_seq_max - 1)], -1)


def seq_pos_min(mem: RecurrentMemory, seq, cfg: RecurrentConfig) -> Scalar:
    """Smallest position of ``seq`` in memory, -1 if none or out of range (§5.7.6)."""
    return _one_seq(seq_pos_range(mem, cfg)[0], seq, cfg)


def seq_pos_max(mem: RecurrentMemory, seq, cfg: RecurrentConfig) -> Scalar:
    """Largest position of ``seq`` in memory, -1 if none or out of range (§5.7.6)."""
    return _one_seq(seq_pos_range(mem, cfg)[1], seq, cfg)


def clear(
    mem: RecurrentMemory, cfg: RecurrentConfig, *, data: bool | ScalarBool = True
) -> RecurrentMemory:
    """Empties every cell (§5.7.8); with ``data`` the state buffers are zeroed as well (a static
    bool, or a traced one at the cost of a pass over the buffers)."""
    _check_memory(mem, cfg)
    cells = mem.cells
    empty = RecurrentCells(
        pos=jnp.full_like(cells.pos, -1),
        seq=jnp.zeros_like(cells.seq),
        tail=jnp.full_like(cells.tail, -1),
        head=jnp.zeros_like(cells.head),
        snap=None if cells.snap is None else jnp.full_like(cells.snap, -1),
    )
    if isinstance(data, bool) and not data:
        return mem._replace(cells=empty)
    buffers = {k: v for k, v in mem._asdict().items() if k != "cells" and v is not None}
    if isinstance(data, bool):  # static: fresh zeros, no pass over the old buffers
        return mem._replace(cells=empty, **{k: jnp.zeros_like(v) for k, v in buffers.items()})
    data = jnp.asarray(data, jnp.bool_)
    zeroed = {k: jnp.where(data, jnp.zeros((), v.dtype), v) for k, v in buffers.items()}
    return mem._replace(cells=empty, **zeroed)


def put_state(
    mem: RecurrentMemory, seq, pos, r: Array, s: Array, cfg: RecurrentConfig
) -> tuple[RecurrentMemory, ScalarBool]:
    """Makes ``(r, s)`` the state of ``seq`` after position ``pos`` (restoring a checkpoint).

    ``seq``'s state goes into its own cell: its tail cell when no other sequence shares it, else
    (or when it has none) a free cell; sharing sequences keep theirs. The cell's snapshots are
    cleared (they described another history).

    Args:
        mem: the memory.
        seq: the sequence (traced int32 scalar).
        pos: the position the state was taken after (>= 0).
        r, s: ``[n_layers, *r_shape]`` / ``[n_layers, *s_shape]`` states, e.g. a checkpoint's.
        cfg: the memory's config.

    Returns:
        ``(mem, ok)``; False (memory unchanged) for an id out of range, ``pos < 0`` or no free cell.

    Raises:
        InvalidArgumentError: ``r`` or ``s`` of another shape or dtype than this memory's.
    """
    _check_memory(mem, cfg)
    seq, pos = i32_scalar(seq, "seq"), i32_scalar(pos, "pos")
    for name, got, buf in (("r", r, mem.r), ("s", s, mem.s)):
        want = (buf.shape[0], *buf.shape[2:])  # one row per layer
        if tuple(jnp.shape(got)) != want or jnp.result_type(got) != buf.dtype:
            raise InvalidArgumentError(
                f"state {name} is {jnp.result_type(got)}{list(jnp.shape(got))}, this memory's "
                f"{buf.dtype}{list(want)} (nothing is broadcast or cast)"
            )
    cells = mem.cells
    rs = cfg.rs_size
    sc = jnp.clip(seq, 0, cfg.n_seq_max - 1)
    tc = jnp.clip(cells.tail[sc], 0, rs - 1)
    alone = (cells.tail[sc] >= 0) & (jnp.sum(cells.seq[tc].astype(_I32)) == 1)
    own = _own_cell(cells, sc, ~alone, cfg)
    ok = seq_ok(seq, cfg.n_seq_max) & (pos >= 0) & own.ok
    at_to = jnp.arange(rs) == own.to
    snap = None if cells.snap is None else jnp.where(at_to[:, None], -1, cells.snap)
    new, _ = drop_empty(own.cells._replace(pos=jnp.where(at_to, pos, cells.pos), snap=snap))
    w = jnp.where(ok, own.to, rs)
    return (
        mem._replace(
            cells=_select(ok, new, cells),
            r=mem.r.at[:, w].set(r.astype(mem.r.dtype), mode="drop"),
            s=mem.s.at[:, w].set(s.astype(mem.s.dtype), mode="drop"),
        ),
        ok,
    )
