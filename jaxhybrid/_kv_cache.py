"""The attention KV cache (spec §1-§4) as an immutable pytree and pure, jittable functions.

Cells live per stream (one stream when unified, else one per sequence, §2.1): a cell is empty
(``pos == -1``) or holds a position, the set of sequences that reference it and a pending RoPE
shift. K/V buffers hold one row per cell for every attention layer served.

Every function returns a cache of the same structure, shapes and dtypes as its input. Sequence
operations return ``(cache, ok)``; when ``ok`` is False the input cache is returned unchanged
(out-of-range arguments, a partial-range copy across streams, no free cell to split a shared cell
off, docs/semantics.md differences 6-13).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxhybrid._batch import Batch, UBatch, UBatchPlan, get_ubatch
from jaxhybrid._cells import add_overflows, drop_empty, i32_scalar, lower_head, norm_range, seq_ok
from jaxhybrid._config import KVConfig, SWAType
from jaxhybrid._status import InvalidArgumentError, MemoryStatus
from jaxhybrid._status import select_tree as _select
from jaxhybrid.array_typing import Array, Bool, Float, Int, Scalar, ScalarBool

__all__ = [
    "KVCache",
    "KVCells",
    "KVSlot",
    "additive_mask",
    "apply_ubatch",
    "can_shift",
    "clear",
    "find_slot",
    "has_shift",
    "init_kv_cache",
    "is_masked_swa",
    "kq_mask",
    "n_kv_spans",
    "prepare",
    "read_kv",
    "seq_add",
    "seq_cp",
    "seq_div",
    "seq_keep",
    "seq_pos_max",
    "seq_pos_min",
    "seq_pos_range",
    "seq_rm",
    "span_index",
    "switch_span",
    "update",
    "used_span",
    "write_kv",
]

_I32 = jnp.int32
_POS_INF = jnp.iinfo(jnp.int32).max  # a masked-out minimum


# --------------------------------------------------------------------------------------------
# Records


class KVCells(NamedTuple):
    """Cell metadata of every stream (§1.1, §2.1).

    Attributes:
        pos: position of each cell, -1 = empty.
        seq: which sequences reference each cell.
        shift: pending position delta not yet applied to the stored K (0 in empty cells).
        head: per-stream search hint (§2.2).
    """

    pos: Int[Array, "streams cells"]
    seq: Bool[Array, "streams cells seqs"]
    shift: Int[Array, "streams cells"]
    head: Int[Array, " streams"]


class KVCache(NamedTuple):
    """Cells plus K/V rows of every attention layer served (zero-filled at init, §2.1)."""

    cells: KVCells
    k: Float[Array, "layers streams cells heads head_dim_k"]
    v: Float[Array, "layers streams cells heads head_dim_v"]


def init_kv_cache(cfg: KVConfig) -> KVCache:
    """An empty cache for ``cfg``.

    Examples:
        >>> cache = init_kv_cache(KVConfig(kv_size=8, n_seq_max=2, head_dim_k=4))
        >>> cache.cells.pos.shape, cache.k.shape
        ((1, 8), (1, 1, 8, 1, 4))
    """
    st, c = cfg.n_stream, cfg.kv_size
    cells = KVCells(
        pos=jnp.full((st, c), -1, _I32),
        seq=jnp.zeros((st, c, cfg.n_seq_max), jnp.bool_),
        shift=jnp.zeros((st, c), _I32),
        head=jnp.zeros((st,), _I32),
    )
    k = jnp.zeros((cfg.n_layers, st, c, cfg.n_kv_heads, cfg.head_dim_k), cfg.dtype_k)
    v = jnp.zeros((cfg.n_layers, st, c, cfg.n_kv_heads, cfg.head_dim_v), cfg.dtype_v)
    return KVCache(cells, k, v)


class KVSlot(NamedTuple):
    """Where the tokens of one ubatch go (§2.3).

    Attributes:
        stream: stream of each token (0 for padding).
        cell: cell index inside that stream (0 for padding; padding is never written).
        ok: a cell was found for every token.
        valid: the token slots holding real tokens (the ubatch's ``valid``): only these are
            placed and written.
    """

    stream: Int[Array, " ubatch"]
    cell: Int[Array, " ubatch"]
    ok: ScalarBool
    valid: Bool[Array, " ubatch"]


# --------------------------------------------------------------------------------------------
# Helpers


def _check_cache(cache: KVCache, cfg: KVConfig) -> None:
    st, c, s = cfg.n_stream, cfg.kv_size, cfg.n_seq_max
    if cache.cells.pos.shape != (st, c) or cache.cells.seq.shape != (st, c, s):
        raise InvalidArgumentError(
            f"cache cells have shapes {cache.cells.pos.shape} / {cache.cells.seq.shape}, "
            f"expected {(st, c)} / {(st, c, s)} for {cfg}"
        )


def _stream_of_seq(cfg: KVConfig) -> Int[Array, " seqs"]:
    """Stream of each sequence id (§2.1: unified -> 0, else seq s -> stream s)."""
    if cfg.unified:
        return jnp.zeros((cfg.n_seq_max,), _I32)
    return jnp.arange(cfg.n_seq_max, dtype=_I32)


# --------------------------------------------------------------------------------------------
# Queries


def is_masked_swa(swa_type: SWAType, n_swa: int, p0, p1):
    """Whether key position ``p0`` is outside query position ``p1``'s window (§3.1); vectorised."""
    swa_type = SWAType(swa_type)
    if swa_type == SWAType.NONE:
        return jnp.zeros(jnp.broadcast_shapes(jnp.shape(p0), jnp.shape(p1)), jnp.bool_)
    if swa_type == SWAType.STANDARD:
        return p1 - p0 >= n_swa
    if swa_type == SWAType.CHUNKED:
        return p0 < (p1 // n_swa) * n_swa
    h = n_swa // 2
    return (p1 - p0 < -h) | (p1 - p0 > h)


def _pos_range_span(span: int, cells: KVCells, cfg: KVConfig):
    # Plain reductions over the leading ``span`` cells (no gather): every sequence lives in
    # stream 0 when unified, else sequence s lives in stream s (§2.1).
    if cfg.unified:
        member = cells.seq[0, :span]  # [cells, seqs]
        pos = cells.pos[0, :span][:, None]
    else:
        member = jnp.diagonal(cells.seq[:, :span], axis1=0, axis2=2)  # [cells, seqs]: seq[s,c,s]
        pos = cells.pos[:, :span].T
    has = jnp.any(member, axis=0)
    pmin = jnp.min(jnp.where(member, pos, _POS_INF), axis=0)
    pmax = jnp.max(jnp.where(member, pos, -1), axis=0)
    return jnp.where(has, pmin, -1).astype(_I32), pmax.astype(_I32)


def _pos_range(cells: KVCells, cfg: KVConfig):
    """Masked min/max position per sequence in the sequence's own stream (§1.3, §12.2).

    Cells at or past the used span are empty (§2.7), so the reduction runs over the smallest
    span of :func:`n_kv_spans` holding every used cell: its cost follows the used cells, not the
    capacity (only small per-sequence results leave the switch).
    """
    spans = n_kv_spans(cfg.kv_size)
    n_kv = _used_span(cells.pos)
    return switch_span(n_kv, spans, lambda span, c: _pos_range_span(span, c, cfg), cells)


def seq_pos_range(cache: KVCache, cfg: KVConfig) -> tuple[Int[Array, " seqs"], Int[Array, " seqs"]]:
    """``(seq_pos_min, seq_pos_max)`` of every sequence (-1 where absent), for batch validation."""
    _check_cache(cache, cfg)
    return _pos_range(cache.cells, cfg)


def seq_pos_min(cache: KVCache, seq, cfg: KVConfig) -> Scalar:
    """Smallest position held by ``seq`` (§4.6), -1 if absent or ``seq`` is out of range."""
    seq = i32_scalar(seq, "seq")
    pmin, _ = seq_pos_range(cache, cfg)
    return jnp.where(seq_ok(seq, cfg.n_seq_max), pmin[jnp.clip(seq, 0, cfg.n_seq_max - 1)], -1)


def seq_pos_max(cache: KVCache, seq, cfg: KVConfig) -> Scalar:
    """Largest position held by ``seq`` (§4.6), -1 if absent or ``seq`` is out of range."""
    seq = i32_scalar(seq, "seq")
    _, pmax = seq_pos_range(cache, cfg)
    return jnp.where(seq_ok(seq, cfg.n_seq_max), pmax[jnp.clip(seq, 0, cfg.n_seq_max - 1)], -1)


def has_shift(cache: KVCache, cfg: KVConfig) -> ScalarBool:
    """Whether any cell has a pending K shift (§2.11)."""
    _check_cache(cache, cfg)
    return jnp.any(cache.cells.shift != 0)


def can_shift(cfg: KVConfig) -> bool:
    """The plain KV cache can always re-rotate K (§2.13)."""
    del cfg
    return True


# --------------------------------------------------------------------------------------------
# Placement (§2.4-§2.6)


def _find_slot(cells: KVCells, ubatch: UBatch, cfg: KVConfig) -> KVSlot:
    n_ub = ubatch.valid.shape[0]
    st_n, n_seq = cfg.n_stream, cfg.n_seq_max
    t = jnp.arange(n_ub, dtype=_I32)
    valid = ubatch.valid
    n_tok = ubatch.n_tokens.astype(_I32)

    if st_n == 1:
        group_size = n_tok
        tok_stream = jnp.zeros((n_ub,), _I32)
        tok_idx = t
        groups_ok = jnp.bool_(True)
    else:
        # §2.4.1: groups of T tokens, one per distinct sequence in ascending id order. Stricter
        # than llama.cpp (which checks only a group's first token): every token of group k must
        # belong to exactly the k-th sequence, so a stream only ever holds its own sequence.
        present = jnp.any(ubatch.seq & valid[:, None], axis=0)
        n_unq = jnp.sum(present).astype(_I32)
        group_size = n_tok // jnp.maximum(n_unq, 1)
        rank = jnp.cumsum(present) - 1
        unq = (
            jnp.zeros((n_seq,), _I32)
            .at[jnp.where(present, rank, n_seq)]
            .set(jnp.arange(n_seq, dtype=_I32), mode="drop")
        )
        k = t // jnp.maximum(group_size, 1)
        expected = unq[jnp.clip(k, 0, n_seq - 1)]
        single = jnp.sum(ubatch.seq, axis=1) == 1
        tok_ok = ~valid | (single & ubatch.seq[t, expected] & (k < n_unq))
        groups_ok = (n_tok == group_size * n_unq) & jnp.all(tok_ok)
        tok_stream = jnp.where(valid, expected, 0)
        tok_idx = t - k * group_size

    empty = cells.pos < 0
    usable = empty
    if cfg.swa_type != SWAType.NONE:
        # §2.4.5: a single-sequence cell masked for that sequence's next token is reusable.
        _, pmax = _pos_range(cells, cfg)
        n_in = jnp.sum(cells.seq, axis=-1)
        only = jnp.argmax(cells.seq, axis=-1)
        nxt = pmax[only] + 1
        usable = usable | ((n_in == 1) & is_masked_swa(cfg.swa_type, cfg.n_swa, cells.pos, nxt))
    counts = _block_counts(usable)
    if cfg.swa_type == SWAType.NONE:
        used = cfg.kv_size - counts.total  # usable == empty: no second pass over the cells
    else:
        used = jnp.sum(~empty, axis=1).astype(_I32)
    head = jnp.where(cells.head > used + 2 * group_size, 0, cells.head)  # §2.4.3 restart
    # §12.4: the first T usable cells in circular order from head, in O(cells) (no sort): the
    # r-th usable cell from head is the ((usable cells below head) + r)-th usable cell overall,
    # modulo their number. It is found in two levels (a running count over the whole cell axis
    # is slow on CPU): per-block counts, then a count inside the block; only for the (stream,
    # rank) of each token.
    idx = jnp.clip(tok_idx, 0, n_ub - 1)
    cell = _nth_usable(counts, head, tok_stream, idx)
    cell = jnp.where(valid, cell, 0)
    fits = jnp.all(~valid | (tok_idx < counts.total[tok_stream]))
    return KVSlot(stream=tok_stream, cell=cell, ok=groups_ok & fits, valid=valid)


_BLOCK = 128


class _BlockCounts(NamedTuple):
    """Usable cells of every stream, counted per block of ``_BLOCK`` cells."""

    blocks: Bool[Array, "streams blocks B"]
    per_block: Int[Array, "streams blocks"]
    upto: Int[Array, "streams blocks"]  # usable cells in blocks [0, b]
    total: Int[Array, " streams"]


def _block_counts(usable: Bool[Array, "streams cells"]) -> _BlockCounts:
    st_n, size = usable.shape
    blocks = jnp.pad(usable, ((0, 0), (0, -size % _BLOCK))).reshape(st_n, -1, _BLOCK)
    per_block = jnp.sum(blocks, axis=2, dtype=_I32)
    upto = jnp.cumsum(per_block, axis=1, dtype=_I32)
    return _BlockCounts(blocks, per_block, upto, upto[:, -1])


def _prefix_count(rows: Bool[Array, "n B"]) -> Int[Array, "n B"]:
    """Inclusive running count along the last axis in log2(B) shifted adds (XLA's cumsum is a
    quadratic reduce-window on CPU)."""
    x = rows.astype(_I32)
    shift = 1
    while shift < x.shape[-1]:
        x = x + jnp.pad(x[:, :-shift], ((0, 0), (shift, 0)))
        shift *= 2
    return x


def _nth_usable(
    counts: _BlockCounts, head: Int[Array, " streams"], stream: Int[Array, " n"], rank
) -> Int[Array, " n"]:
    """The cell of the ``rank``-th usable cell of ``stream`` in circular order from that stream's
    ``head``, for every entry (wrapping around when fewer are usable; 0 when none is)."""
    blocks, per_block, upto, total = counts
    n_blocks = per_block.shape[1]
    # Usable cells below head: the blocks before head's, and the part of head's block below it.
    hb = jnp.clip(head // _BLOCK, 0, n_blocks - 1)
    before = jnp.take_along_axis(upto - per_block, hb[:, None], axis=1)[:, 0]
    part = jnp.take_along_axis(blocks, hb[:, None, None], axis=1)[:, 0]
    below = before + jnp.sum(
        part & (jnp.arange(_BLOCK)[None, :] < (head - hb * _BLOCK)[:, None]), axis=1, dtype=_I32
    )
    target = jnp.mod(below[stream] + rank, jnp.maximum(total[stream], 1))
    # The first block whose running count passes the target, then the offset inside it
    # (running counts are non-decreasing, so "first index past" is a count of those not past).
    blk = jnp.sum(upto[stream] <= target[:, None], axis=1, dtype=_I32)
    blk = jnp.minimum(blk, n_blocks - 1)
    within = target - (upto[stream, blk] - per_block[stream, blk])
    inside = _prefix_count(blocks[stream, blk])
    offset = jnp.sum(inside <= within[:, None], axis=1, dtype=_I32)
    # A stream without usable cells has no answer; 0 keeps the index in range.
    return jnp.where(total[stream] > 0, blk * _BLOCK + offset, 0)


def find_slot(cache: KVCache, ubatch: UBatch, cfg: KVConfig) -> KVSlot:
    """Finds cells for every token of ``ubatch`` without changing the cache (§2.4, non-contiguous).

    With several streams the ubatch must consist of equal groups of tokens of one sequence each,
    in ascending sequence order (what ``split_equal(sequential=True)`` produces), else
    ``ok`` is False.
    """
    _check_cache(cache, cfg)
    return _find_slot(cache.cells, ubatch, cfg)


def _apply_ubatch(cells: KVCells, ubatch: UBatch, slot: KVSlot, cfg: KVConfig) -> KVCells:
    st_n = cfg.n_stream
    v = ubatch.valid & slot.ok
    s_t, c_t = slot.stream, slot.cell
    old_pos = cells.pos[s_t, c_t]
    old_seq = cells.seq[s_t, c_t]
    overwrote = v & (old_pos >= 0)
    # §2.6.1: the largest overwritten position of each (single) sequence.
    max_rm = jnp.max(
        jnp.where(overwrote[:, None] & old_seq, old_pos[:, None], -1), axis=0, initial=-1
    )
    si = jnp.where(v, s_t, st_n)
    cells = cells._replace(
        pos=cells.pos.at[si, c_t].set(ubatch.pos.astype(_I32), mode="drop"),
        seq=cells.seq.at[si, c_t].set(ubatch.seq, mode="drop"),
        shift=cells.shift.at[si, c_t].set(0, mode="drop"),
    )
    if cfg.swa_type != SWAType.NONE:
        # §2.6.2 purge: overwriting one SWA cell of q drops every older position of q too.
        # Without SWA only empty cells are usable (§2.4.5), nothing is overwritten, and the
        # purge is skipped statically.
        pmin, _ = _pos_range(cells, cfg)
        lim = jnp.where((max_rm >= 0) & (pmin <= max_rm), max_rm, -1)
        in_stream = _stream_of_seq(cfg)[None, :] == jnp.arange(st_n)[:, None]  # [streams, seqs]
        drop = cells.seq & in_stream[:, None, :] & (cells.pos[:, :, None] <= lim[None, None, :])
        cells, _ = drop_empty(cells._replace(seq=cells.seq & ~drop))
    # §2.6.3: head = cell of each group's last token + 1 (one group per stream).
    t = jnp.arange(ubatch.valid.shape[0], dtype=_I32)
    mine = v[None, :] & (s_t[None, :] == jnp.arange(st_n)[:, None])  # [streams, ubatch]
    last = jnp.max(jnp.where(mine, t[None, :], -1), axis=1)
    head = jnp.where(last >= 0, c_t[jnp.maximum(last, 0)] + 1, cells.head).astype(_I32)
    return cells._replace(head=head)


def apply_ubatch(cache: KVCache, ubatch: UBatch, slot: KVSlot, cfg: KVConfig) -> KVCache:
    """Places ``ubatch`` into the cells of ``slot`` (§2.6); metadata only, no-op if not ``ok``.

    Overwritten SWA cells purge the older positions of their sequence (§2.6.2) and each touched
    stream's head moves past the last cell used.
    """
    _check_cache(cache, cfg)
    return cache._replace(cells=_apply_ubatch(cache.cells, ubatch, slot, cfg))


def prepare(
    cache: KVCache, batch: Batch, plan: UBatchPlan, cfg: KVConfig, *, n_ubatch: int
) -> tuple[ScalarBool, Scalar]:
    """Dry run of all ubatches of ``plan`` (§2.5): ``(ok, first failing ubatch or -1)``.

    The cache is not modified; placement is deterministic, so applying the ubatches afterwards
    with :func:`find_slot` + :func:`apply_ubatch` reproduces the dry run. ``plan.complete`` is
    not checked here.
    """
    ok, failed, _ = prepare_slots(cache, batch, plan, cfg, n_ubatch=n_ubatch, record=False)
    return ok, failed


class _DryRun(NamedTuple):
    """Carry of the dry run: the next ubatch, the cells so far and the slots found."""

    u: Scalar
    cells: KVCells
    ok: ScalarBool
    failed: Scalar  # first ubatch without a slot, -1 while none
    slots: KVSlot  # stacked over ubatches (a zero-length axis unless recorded)


def prepare_slots(
    cache: KVCache,
    batch: Batch,
    plan: UBatchPlan,
    cfg: KVConfig,
    *,
    n_ubatch: int,
    record: bool = True,
) -> tuple[ScalarBool, Scalar, KVSlot | None]:
    """:func:`prepare` that also returns the slot of every ubatch it placed, stacked on a leading
    axis of ``plan``'s ubatch capacity (None unless ``record``).

    Applying ubatch ``u`` of a successful dry run with :func:`apply_ubatch` and slot ``u`` gives
    what :func:`find_slot` + :func:`apply_ubatch` give (placement is deterministic), without
    searching the cells again.
    """
    _check_cache(cache, cfg)
    n_rec = plan.start.shape[0] if record else 0
    slots = KVSlot(
        stream=jnp.zeros((n_rec, n_ubatch), _I32),
        cell=jnp.zeros((n_rec, n_ubatch), _I32),
        ok=jnp.zeros((n_rec,), jnp.bool_),
        valid=jnp.zeros((n_rec, n_ubatch), jnp.bool_),
    )

    def cond(c: _DryRun):
        return c.ok & (c.u < plan.n_ubatches)

    def body(c: _DryRun) -> _DryRun:
        ub = get_ubatch(batch, plan, c.u, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
        slot = _find_slot(c.cells, ub, cfg)
        slots = c.slots
        if record:
            slots = jax.tree.map(lambda all_, one: all_.at[c.u].set(one), slots, slot)
        return _DryRun(
            u=c.u + 1,
            cells=_apply_ubatch(c.cells, ub, slot, cfg),
            ok=slot.ok,
            failed=jnp.where(slot.ok, -1, c.u).astype(_I32),
            slots=slots,
        )

    init = _DryRun(i32_scalar(0), cache.cells, jnp.bool_(True), i32_scalar(-1), slots)
    out = jax.lax.while_loop(cond, body, init)
    return out.ok, out.failed, out.slots if record else None


# --------------------------------------------------------------------------------------------
# K/V rows and masks (§2.8, §3)


def write_kv(
    cache: KVCache,
    layer,
    k: Float[Array, "ubatch heads head_dim_k"],
    v: Float[Array, "ubatch heads head_dim_v"],
    slot: KVSlot,
    cfg: KVConfig,
) -> KVCache:
    """Scatters a ubatch's K/V rows of one layer (static or traced index) into its cells.

    Only the real tokens of a slot that is ``ok`` are written (``slot.valid & slot.ok``).
    """
    _check_cache(cache, cfg)
    n_layers, st_n, _, heads, dk = cache.k.shape
    dv = cache.v.shape[-1]
    n_ub = slot.cell.shape[0]
    if k.shape != (n_ub, heads, dk) or v.shape != (n_ub, heads, dv):
        raise InvalidArgumentError(
            f"k/v must be {(n_ub, heads, dk)} / {(n_ub, heads, dv)}, got {k.shape} / {v.shape}"
        )
    del n_layers
    si = jnp.where(slot.valid & slot.ok, slot.stream, st_n)
    layer = i32_scalar(layer, "layer")
    return cache._replace(
        k=cache.k.at[layer, si, slot.cell].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[layer, si, slot.cell].set(v.astype(cache.v.dtype), mode="drop"),
    )


def used_span(cache: KVCache, cfg: KVConfig) -> Scalar:
    """``n_kv`` before padding (§2.7): one past the highest non-empty cell over every stream.

    Cells at index ``>= used_span`` are empty in every stream, so attention over the leading
    ``used_span`` cells of each stream sees exactly what attention over all cells sees.
    Placement fills cells from the head (§2.4.6) and the head is lowered to freed cells (§4.1)
    or restarted at 0 (§2.4.3), so used cells stay near the front of the cache.
    """
    _check_cache(cache, cfg)
    return _used_span(cache.cells.pos)


def _used_span(pos: Int[Array, "streams cells"]) -> Scalar:
    idx = jnp.arange(1, pos.shape[1] + 1, dtype=_I32)
    return jnp.max(jnp.where(pos >= 0, idx[None, :], 0)).astype(_I32)


def n_kv_spans(kv_size: int, min_span: int = 256) -> tuple[int, ...]:
    """The static attention spans a decode step may pick from (§2.7 with power-of-two buckets).

    llama.cpp pads ``n_kv`` to a multiple of 256 and builds a graph per value; with static
    shapes we compile one branch per span ``min_span * 2**i`` below ``kv_size``, plus
    ``kv_size`` itself, so the cost of a step follows the used cells within a factor of two and
    a run compiles ``O(log(kv_size / min_span))`` branches once.

    Examples:
        >>> n_kv_spans(4096)
        (256, 512, 1024, 2048, 4096)
        >>> n_kv_spans(300), n_kv_spans(100)
        ((256, 300), (100,))
    """
    if not isinstance(kv_size, int) or kv_size < 1:
        raise InvalidArgumentError(f"kv_size must be an int >= 1, got {kv_size!r}")
    if not isinstance(min_span, int) or min_span < 1:
        raise InvalidArgumentError(f"min_span must be an int >= 1, got {min_span!r}")
    spans = []
    span = min_span
    while span < kv_size:
        spans.append(span)
        span *= 2
    return (*spans, kv_size)


def span_index(n_kv, spans: tuple[int, ...]) -> Scalar:
    """Index of the smallest span in ``spans`` (ascending) that covers ``n_kv`` cells."""
    below = jnp.asarray(spans[:-1], _I32) < jnp.asarray(n_kv, _I32)
    return jnp.sum(below, dtype=_I32)


def switch_span(n_kv, spans: tuple[int, ...], fn: Callable[..., Any], *operands):
    """``fn(span, *operands)`` for the smallest static ``span`` of ``spans`` covering ``n_kv``.

    One ``lax.switch`` branch per span, traced once each; only the chosen branch runs. Every
    branch must return the same structure, shapes and dtypes (the model's outputs and memory).
    """
    if len(spans) == 1:
        return fn(spans[0], *operands)
    branches = [functools.partial(fn, span) for span in spans]
    return jax.lax.switch(span_index(n_kv, spans), branches, *operands)


def _span(cfg_size: int, n_kv: int | None) -> int:
    if n_kv is None:
        return cfg_size
    if not isinstance(n_kv, int) or not 1 <= n_kv <= cfg_size:
        raise InvalidArgumentError(
            f"n_kv must be a static int in [1, {cfg_size}] or None, got {n_kv!r}"
        )
    return n_kv


def read_kv(cache: KVCache, layer, cfg: KVConfig, n_kv: int | None = None) -> tuple[Array, Array]:
    """K and V of one layer, the leading ``n_kv`` cells of every stream on one axis:
    ``[streams * n_kv, heads, d]`` (``n_kv`` static; None = every cell, §2.8)."""
    _check_cache(cache, cfg)
    _, st_n, _, heads, _ = cache.k.shape
    span = _span(cfg.kv_size, n_kv)
    k = cache.k[layer, :, :span]
    v = cache.v[layer, :, :span]
    return k.reshape(st_n * span, heads, -1), v.reshape(st_n * span, heads, -1)


def kq_mask(
    cache: KVCache,
    ubatch: UBatch,
    slot: KVSlot,
    cfg: KVConfig,
    n_kv: int | None = None,
    *,
    own_stream: bool = False,
) -> Bool[Array, "ubatch kv"]:
    """Which cells each token of the placed ubatch attends to (§3.3), flat over streams like
    :func:`read_kv` with the same static ``n_kv`` (None = every cell).

    With ``own_stream`` the mask covers only the leading ``n_kv`` cells of each token's own
    stream, ``[ubatch, n_kv]``: the mask of attention per stream (llama.cpp's non-unified
    cache), where token ``t`` reads ``read_kv(...)`` reshaped ``[n_stream, n_kv, ...]`` at its own
    stream ``slot.stream[t]`` (a token never sees another stream, §3.6).

    Call after :func:`apply_ubatch`: a token sees itself and earlier tokens of its ubatch.
    """
    _check_cache(cache, cfg)
    st_n = cfg.n_stream
    span = _span(cfg.kv_size, n_kv)
    primary = jnp.clip(ubatch.seq_id[:, 0], 0, cfg.n_seq_max - 1)
    p1 = ubatch.pos.astype(_I32)[:, None]
    if own_stream:
        stream = jnp.clip(slot.stream, 0, st_n - 1)
        p0 = cache.cells.pos[stream, :span]
        # §3.3.2: the token's first seq id only.
        has_seq = cache.cells.seq[stream[:, None], jnp.arange(span)[None, :], primary[:, None]]
        same_stream = True
    else:
        pos = cache.cells.pos[:, :span].reshape(st_n * span)
        seq = cache.cells.seq[:, :span].reshape(st_n * span, cfg.n_seq_max)
        cell_stream = jnp.repeat(jnp.arange(st_n, dtype=_I32), span)
        p0 = pos[None, :]
        has_seq = jnp.take(seq, primary, axis=1).T
        same_stream = cell_stream[None, :] == slot.stream[:, None]  # §3.6
    vis = (
        (ubatch.valid & slot.ok)[:, None]
        & same_stream
        & (p0 >= 0)  # §3.3.1
        & has_seq
        & ~is_masked_swa(cfg.swa_type, cfg.n_swa, p0, p1)  # §3.3.5
    )
    if cfg.causal:
        vis = vis & (p0 <= p1)  # §3.3.3
    return vis


def additive_mask(mask: Bool[Array, "..."], dtype=jnp.float32) -> Float[Array, "..."]:
    """0 where visible, -inf elsewhere."""
    return jnp.where(mask, jnp.zeros((), dtype), jnp.full((), -jnp.inf, dtype))


# --------------------------------------------------------------------------------------------
# Sequence operations (§4)


def seq_rm(cache: KVCache, seq, p0, p1, cfg: KVConfig) -> tuple[KVCache, ScalarBool]:
    """Removes positions ``[p0, p1)`` of ``seq`` (-1 = every sequence, every stream) (§4.1)."""
    _check_cache(cache, cfg)
    seq = i32_scalar(seq, "seq")
    ok = (seq == -1) | seq_ok(seq, cfg.n_seq_max)
    lo, hi = norm_range(p0, p1)
    cells = cache.cells
    in_range = (cells.pos >= lo) & (cells.pos < hi) & (cells.pos >= 0)
    sc = jnp.clip(seq, 0, cfg.n_seq_max - 1)
    one = jnp.arange(cfg.n_seq_max) == sc
    in_st = jnp.arange(cfg.n_stream) == _stream_of_seq(cfg)[sc]
    rm_one = (in_range & in_st[:, None])[:, :, None] & one[None, None, :]
    rm = jnp.where(seq == -1, in_range[:, :, None], rm_one)
    new, freed = drop_empty(cells._replace(seq=cells.seq & ~rm))
    new = new._replace(head=lower_head(cells.head, freed))
    return cache._replace(cells=_select(ok, new, cells)), ok


def seq_keep(cache: KVCache, seq, cfg: KVConfig) -> tuple[KVCache, ScalarBool]:
    """Keeps only ``seq``, in every stream (§4.3 with difference 7)."""
    _check_cache(cache, cfg)
    seq = i32_scalar(seq, "seq")
    ok = seq_ok(seq, cfg.n_seq_max)
    cells = cache.cells
    one = jnp.arange(cfg.n_seq_max) == jnp.clip(seq, 0, cfg.n_seq_max - 1)
    new, freed = drop_empty(cells._replace(seq=cells.seq & one[None, None, :]))
    new = new._replace(head=lower_head(cells.head, freed))
    return cache._replace(cells=_select(ok, new, cells)), ok


def seq_cp(cache: KVCache, src, dst, p0, p1, cfg: KVConfig) -> tuple[KVCache, ScalarBool]:
    """Copies positions ``[p0, p1)`` of ``src`` into ``dst``, replacing what ``dst`` held (§4.2).

    In one stream only metadata changes (the cells become shared). Across streams only a range
    covering every position of ``src`` is accepted (else ``ok`` is False); the destination stream
    is then rebuilt from the source stream, K/V rows included, at once (differences 8, 12).
    """
    _check_cache(cache, cfg)
    src, dst = i32_scalar(src, "src"), i32_scalar(dst, "dst")
    n_seq = cfg.n_seq_max
    ok = seq_ok(src, cfg.n_seq_max) & seq_ok(dst, cfg.n_seq_max)
    lo, hi = norm_range(p0, p1)
    sc, dc = jnp.clip(src, 0, n_seq - 1), jnp.clip(dst, 0, n_seq - 1)
    st_of = _stream_of_seq(cfg)
    ss, ds = st_of[sc], st_of[dc]
    cells = cache.cells
    one_d = jnp.arange(n_seq) == dc
    streams = jnp.arange(cfg.n_stream)
    noop = src == dst

    # Same stream: replace dst (difference 6), then share src's cells in range with dst.
    seq1 = cells.seq & ~((streams == ds)[:, None, None] & one_d[None, None, :])
    same, freed = drop_empty(cells._replace(seq=seq1))
    share = (
        seq1[:, :, sc]
        & (streams == ss)[:, None]
        & (same.pos >= lo)
        & (same.pos < hi)
        & (same.pos >= 0)
    )
    same = same._replace(
        seq=same.seq | (share[:, :, None] & one_d[None, None, :]),
        head=lower_head(cells.head, freed),
    )
    new = same
    k, v = cache.k, cache.v
    if cfg.n_stream > 1:
        cross = ss != ds
        pmin, pmax = _pos_range(cells, cfg)
        whole = (pmax[sc] < 0) | ((lo <= pmin[sc]) & (hi > pmax[sc]))
        ok = ok & (~cross | whole | noop)
        has = cells.seq[ss, :, sc]
        dst_cells = KVCells(
            pos=cells.pos.at[ds].set(jnp.where(has, cells.pos[ss], -1)),
            seq=cells.seq.at[ds].set(has[:, None] & one_d[None, :]),
            shift=cells.shift.at[ds].set(jnp.where(has, cells.shift[ss], 0)),
            head=cells.head.at[ds].set(cells.head[ss]),
        )
        new = _select(cross, dst_cells, same)
        di = jnp.where(ok & cross & ~noop, ds, cfg.n_stream)
        k = k.at[:, di].set(k[:, ss], mode="drop")
        v = v.at[:, di].set(v[:, ss], mode="drop")
    new = _select(ok & ~noop, new, cells)
    return KVCache(new, k, v), ok


class _Moved(NamedTuple):
    cache: KVCache
    ok: ScalarBool
    freed: Bool[Array, " cells"]


def _move(cache: KVCache, seq, lo, hi, new_pos_fn, cfg: KVConfig, *, fail, delta=0) -> _Moved:
    """Moves the cells of ``seq`` with ``pos in [lo, hi)`` to ``new_pos_fn(pos)`` (§4.4, §4.5).

    ``delta`` (seq_add's) refuses the move when a selected position would pass ``2^31 - 2``
    (§15.2) instead of wrapping into the negative range and dropping the cell.

    Only ``seq`` moves (difference 10): a cell shared with other sequences keeps them and ``seq`` is
    split off into the lowest free cell of its stream, K/V rows of every layer copied. Cells whose
    new position is negative lose ``seq`` (and are freed when it was their only one).
    """
    size, n_seq = cfg.kv_size, cfg.n_seq_max
    sc = jnp.clip(seq, 0, n_seq - 1)
    st = _stream_of_seq(cfg)[sc]
    cells = cache.cells
    one = jnp.arange(n_seq) == sc
    pos, seqs, shift = cells.pos[st], cells.seq[st], cells.shift[st]
    sel = seqs[:, sc] & (pos >= lo) & (pos < hi) & (pos >= 0)
    new_pos = new_pos_fn(pos)
    moved = sel & (new_pos != pos)
    neg = moved & (new_pos < 0)
    others = jnp.any(seqs & ~one[None, :], axis=1)
    shared = moved & ~neg & others
    solo = moved & ~neg & ~others
    free = pos < 0
    ok = ~fail & (jnp.sum(shared) <= jnp.sum(free)) & ~jnp.any(sel & add_overflows(pos, delta))
    free_cells = jnp.argsort(~free, stable=True).astype(_I32)  # free cells first, ascending
    rank = jnp.cumsum(shared) - 1
    dest = jnp.where(shared & ok, free_cells[jnp.clip(rank, 0, size - 1)], size)
    seqs1 = seqs & ~((neg | shared)[:, None] & one[None, :])
    new_shift = shift + (new_pos - pos)
    pos1 = jnp.where(solo, new_pos, pos).at[dest].set(new_pos, mode="drop")
    shift1 = jnp.where(solo, new_shift, shift).at[dest].set(new_shift, mode="drop")
    seqs1 = seqs1.at[dest].set(jnp.broadcast_to(one, (size, n_seq)), mode="drop")
    now_empty = ~jnp.any(seqs1, axis=1)
    freed = now_empty & (pos >= 0)
    new = cells._replace(
        pos=cells.pos.at[st].set(jnp.where(now_empty, -1, pos1)),
        seq=cells.seq.at[st].set(seqs1),
        shift=cells.shift.at[st].set(jnp.where(now_empty, 0, shift1)),
    )
    cells_out = _select(ok, new, cells)
    src = jnp.arange(size, dtype=_I32)
    k = cache.k.at[:, st, dest].set(cache.k[:, st, src], mode="drop")
    v = cache.v.at[:, st, dest].set(cache.v[:, st, src], mode="drop")
    return _Moved(KVCache(cells_out, k, v), ok, freed & ok)


def seq_add(cache: KVCache, seq, p0, p1, delta, cfg: KVConfig) -> tuple[KVCache, ScalarBool]:
    """Adds ``delta`` to positions ``[p0, p1)`` of ``seq`` and records the pending K shift (§4.4).

    Cells moved below 0 lose ``seq``; the head becomes the first freed cell, else 0. Cells shared
    with other sequences are split off first (difference 10); without a free cell for that ``ok`` is
    False and nothing changes.
    """
    _check_cache(cache, cfg)
    seq, delta = i32_scalar(seq, "seq"), i32_scalar(delta, "delta")
    lo, hi = norm_range(p0, p1)
    bad = ~seq_ok(seq, cfg.n_seq_max)
    noop = (delta == 0) | (lo == hi)
    res = _move(cache, seq, lo, hi, lambda p: p + delta, cfg, fail=bad | noop, delta=delta)
    st = _stream_of_seq(cfg)[jnp.clip(seq, 0, cfg.n_seq_max - 1)]
    first = jnp.where(jnp.any(res.freed), jnp.argmax(res.freed), 0).astype(_I32)
    cells = res.cache.cells
    head = cells.head.at[jnp.where(res.ok, st, cfg.n_stream)].set(first, mode="drop")
    return res.cache._replace(cells=cells._replace(head=head)), ~bad & (res.ok | noop)


def seq_div(cache: KVCache, seq, p0, p1, d, cfg: KVConfig) -> tuple[KVCache, ScalarBool]:
    """Divides positions ``[p0, p1)`` of ``seq`` by ``d`` (integer) (§4.5).

    The pending shift accumulates ``new - old`` (Q1 fix). Shared cells are split off as in
    :func:`seq_add`. ``d < 1`` or an out-of-range ``seq`` gives ``ok == False``.
    """
    _check_cache(cache, cfg)
    seq, d = i32_scalar(seq, "seq"), i32_scalar(d, "d")
    lo, hi = norm_range(p0, p1)
    bad = ~seq_ok(seq, cfg.n_seq_max) | (d < 1)
    noop = (d == 1) | (lo == hi)
    res = _move(cache, seq, lo, hi, lambda p: p // jnp.maximum(d, 1), cfg, fail=bad | noop)
    return res.cache, ~bad & (res.ok | noop)


def clear(cache: KVCache, cfg: KVConfig, *, data: bool | ScalarBool = True) -> KVCache:
    """Empties every stream (§4.7); with ``data`` also zeroes the K/V buffers (a static bool, or
    a traced one at the cost of a pass over the buffers)."""
    _check_cache(cache, cfg)
    cells = cache.cells
    cells = KVCells(
        pos=jnp.full_like(cells.pos, -1),
        seq=jnp.zeros_like(cells.seq),
        shift=jnp.zeros_like(cells.shift),
        head=jnp.zeros_like(cells.head),
    )
    if isinstance(data, bool):  # static: fresh zeros, no pass over the old buffers
        if data:
            return KVCache(cells, jnp.zeros_like(cache.k), jnp.zeros_like(cache.v))
        return cache._replace(cells=cells)
    data = jnp.asarray(data, jnp.bool_)
    k = jnp.where(data, jnp.zeros((), cache.k.dtype), cache.k)
    v = jnp.where(data, jnp.zeros((), cache.v.dtype), cache.v)
    return KVCache(cells, k, v)


# --------------------------------------------------------------------------------------------
# K-shift (§2.12)


def update(
    cache: KVCache,
    cfg: KVConfig,
    rope_fn: Callable[[Array, Array], Array] | None = None,
) -> tuple[KVCache, Scalar]:
    """Applies pending shifts: re-rotates stored K of every layer, then resets shifts (§2.12).

    Args:
        cache: the cache.
        cfg: its config.
        rope_fn: ``rope_fn(k[..., heads, head_dim], delta_pos[...]) -> k`` rotating K rows by a
            position delta (see :func:`jaxhybrid._rope.rope_shift_fn`), or None for a model
            without RoPE (shifts are just cleared). V is never touched.

    Returns:
        ``(cache, status)``: SUCCESS when shifts were pending and have been applied, else
        NO_UPDATE and the cache unchanged (§2.11; the work is skipped then).
    """
    pending = has_shift(cache, cfg)
    status = jnp.where(pending, MemoryStatus.SUCCESS, MemoryStatus.NO_UPDATE).astype(_I32)
    return jax.lax.cond(pending, lambda c: _update(c, cfg, rope_fn), lambda c: c, cache), status


def _update(cache: KVCache, cfg: KVConfig, rope_fn) -> KVCache:
    cells = cache.cells
    k = cache.k
    if rope_fn is not None and cfg.n_layers > 0:
        delta = jnp.broadcast_to(cells.shift[None], k.shape[:3])
        rotated = rope_fn(k.astype(jnp.float32), delta).astype(k.dtype)
        k = jnp.where((delta != 0)[..., None, None], rotated, k)
    return KVCache(cells._replace(shift=jnp.zeros_like(cells.shift)), k, cache.v)
