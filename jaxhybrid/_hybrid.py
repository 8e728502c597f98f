"""Hybrid memory (spec §7, §8, §10): one interface over the attention KV cache and the
recurrent-state memory, the plan/apply protocol and a transactional decode driver.

Every model layer is routed to the attention part, the recurrent part, or neither (static, by
layer filters; §7.2). Both parts see the same sequences and the same ubatches: planning splits the
batch with the rule of §6.8 and dry-runs the placement in the recurrent part first and the
attention part second (§7.3); applying ubatch ``u`` places it in both parts and returns the
:class:`Placement` the model's layers read and write memory through.

Deliberate differences from llama.cpp (docs/semantics.md): failed operations return the memory they
were given (1), hybrid ``seq_rm`` is atomic (2), the unified split is non-sequential (5), and every
other sequence operation is all-or-nothing over both parts.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxhybrid import _kv_cache as kvc
from jaxhybrid import _recurrent as rec
from jaxhybrid._batch import (
    Batch,
    BatchCheck,
    BatchError,
    BatchErrorCode,
    SplitKind,
    UBatch,
    UBatchPlan,
    get_ubatch,
    split,
    validate,
)
from jaxhybrid._cells import i32_scalar, seq_ok
from jaxhybrid._config import KVConfig, RecurrentConfig
from jaxhybrid._status import InvalidArgumentError, JaxHybridError, MemoryStatus, combine_status
from jaxhybrid._status import select_tree as _select
from jaxhybrid.array_typing import Array, Bool, Float, Int, Scalar, ScalarBool

__all__ = [
    "DecodeCode",
    "DecodeError",
    "DecodeResult",
    "HybridConfig",
    "HybridMemory",
    "LayerKind",
    "Placement",
    "apply",
    "can_shift",
    "clear",
    "decode",
    "init_batch",
    "init_full",
    "init_hybrid",
    "init_update",
    "kq_mask",
    "raise_for_result",
    "read_kv",
    "read_states",
    "seq_add",
    "seq_cp",
    "seq_div",
    "seq_keep",
    "seq_pos_max",
    "seq_pos_min",
    "seq_pos_range",
    "seq_rm",
    "update",
    "write_kv",
    "write_states",
]

_I32 = jnp.int32


class LayerKind(enum.IntEnum):
    """Which memory parts serve a model layer (a bit set: ``BOTH = ATTENTION | RECURRENT``).

    ``BOTH`` is a layer that runs attention and a recurrent mixer side by side (Falcon-H1: llama.cpp
    sets both filters to true for it); it owns rows in the KV cache and states in the recurrent
    memory, and has an index in each part.
    """

    NONE = 0
    ATTENTION = 1
    RECURRENT = 2
    BOTH = 3

    @property
    def attention(self) -> bool:
        """The attention part serves the layer."""
        return bool(self & LayerKind.ATTENTION)

    @property
    def recurrent(self) -> bool:
        """The recurrent part serves the layer."""
        return bool(self & LayerKind.RECURRENT)


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Static description of a hybrid memory: the two parts and the layer routing (§7.2).

    Build it with :meth:`from_layers`, which derives the layer counts of both parts.

    Attributes:
        kv: the attention KV cache's config (``n_layers`` = attention layers).
        recurrent: the recurrent memory's config (``n_layers`` = recurrent layers).
        layer_kinds: the part serving each model layer.
    """

    kv: KVConfig
    recurrent: RecurrentConfig
    layer_kinds: tuple[LayerKind, ...]

    def __post_init__(self):
        kinds = tuple(LayerKind(k) for k in self.layer_kinds)
        object.__setattr__(self, "layer_kinds", kinds)
        if self.kv.n_seq_max != self.recurrent.n_seq_max:
            raise InvalidArgumentError(
                f"both parts must have the same n_seq_max, got kv={self.kv.n_seq_max} and "
                f"recurrent={self.recurrent.n_seq_max}"
            )
        n_attn = sum(k.attention for k in kinds)
        n_recr = sum(k.recurrent for k in kinds)
        if self.kv.n_layers != n_attn or self.recurrent.n_layers != n_recr:
            raise InvalidArgumentError(
                f"layer_kinds route {n_attn} attention and {n_recr} recurrent layers, but the "
                f"configs have kv.n_layers={self.kv.n_layers} and "
                f"recurrent.n_layers={self.recurrent.n_layers} (use HybridConfig.from_layers)"
            )

    @classmethod
    def from_layers(
        cls,
        layer_is_recurrent: Sequence[bool],
        kv: KVConfig,
        recurrent: RecurrentConfig,
        *,
        filter_attn: Callable[[int], bool] | None = None,
        filter_recr: Callable[[int], bool] | None = None,
    ) -> HybridConfig:
        """Routes layers with llama.cpp's default filters (§7.2) unless others are given.

        Args:
            layer_is_recurrent: the model's layer types, one bool per layer.
            kv: attention config; its ``n_layers`` is replaced by the routed count.
            recurrent: recurrent config; its ``n_layers`` is replaced likewise.
            filter_attn: layer index -> served by attention (default: not recurrent).
            filter_recr: layer index -> served by the recurrent part (default: recurrent).

        A layer both filters select is served by both parts (``LayerKind.BOTH``: attention and a
        recurrent mixer in parallel, as Falcon-H1); one neither selects has no memory
        (``LayerKind.NONE``: an MLP-only layer, as Nemotron-H's).

        Examples:
            >>> cfg = HybridConfig.from_layers(
            ...     [True, False, True, True], KVConfig(kv_size=16), RecurrentConfig()
            ... )
            >>> cfg.attn_layers, cfg.recurrent_layers
            ((1,), (0, 2, 3))
        """
        flags = [bool(x) for x in layer_is_recurrent]
        f_attn = filter_attn or (lambda il: not flags[il])
        f_recr = filter_recr or (lambda il: flags[il])
        kinds = [
            LayerKind(
                LayerKind.ATTENTION * bool(f_attn(il)) | LayerKind.RECURRENT * bool(f_recr(il))
            )
            for il in range(len(flags))
        ]
        n_attn = sum(k.attention for k in kinds)
        n_recr = sum(k.recurrent for k in kinds)
        return cls(
            kv=dataclasses.replace(kv, n_layers=n_attn),
            recurrent=dataclasses.replace(recurrent, n_layers=n_recr),
            layer_kinds=tuple(kinds),
        )

    @property
    def n_seq_max(self) -> int:
        return self.kv.n_seq_max

    @property
    def attn_layers(self) -> tuple[int, ...]:
        """Model layers served by the attention part, in order."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k.attention)

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Model layers served by the recurrent part, in order."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k.recurrent)

    def sub_index(self, layer: int) -> tuple[LayerKind, int]:
        """``(kind, index inside that part)`` of model layer ``layer`` (-1 for NONE; for BOTH, the
        index in the attention part: use :meth:`part_index` for either part)."""
        kind = self._kind(layer)
        if kind.attention:
            return kind, self.attn_layers.index(layer)
        if kind.recurrent:
            return kind, self.recurrent_layers.index(layer)
        return kind, -1

    def part_index(self, layer: int, part: LayerKind) -> int:
        """Index of model layer ``layer`` inside ``part`` (``ATTENTION`` or ``RECURRENT``).

        Raises:
            InvalidArgumentError: ``part`` does not serve the layer.
        """
        kind = self._kind(layer)
        if part not in (LayerKind.ATTENTION, LayerKind.RECURRENT) or not kind & part:
            raise InvalidArgumentError(
                f"model layer {layer} is served by {kind.name}, not {LayerKind(part).name}"
            )
        layers = self.attn_layers if part == LayerKind.ATTENTION else self.recurrent_layers
        return layers.index(layer)

    def _kind(self, layer: int) -> LayerKind:
        if not 0 <= layer < len(self.layer_kinds):
            raise InvalidArgumentError(f"layer {layer} out of range [0, {len(self.layer_kinds)})")
        return self.layer_kinds[layer]

    @property
    def split_kind(self) -> tuple[SplitKind, bool]:
        """The split of §6.8 for ``embd_all == False``: equal, sequential only with KV streams
        (docs/semantics.md difference 5)."""
        return SplitKind.EQUAL, not self.kv.unified


class HybridMemory(NamedTuple):
    """The attention part and the recurrent part (§7.1)."""

    kv: kvc.KVCache
    recurrent: rec.RecurrentMemory


def init_hybrid(cfg: HybridConfig) -> HybridMemory:
    """An empty hybrid memory (zero-filled buffers)."""
    return HybridMemory(kvc.init_kv_cache(cfg.kv), rec.init_recurrent(cfg.recurrent))


# --------------------------------------------------------------------------------------------
# Queries (§7.6)


def seq_pos_range(
    mem: HybridMemory, cfg: HybridConfig, *, snapshots: bool = True
) -> tuple[Array, Array]:
    """Per-sequence ``(pos_min, pos_max)``: min = max of the parts, max = min of the parts, and
    ``pos_max = -1`` when either part lacks the sequence (§7.6, Q11). With rollback snapshots the
    recurrent minimum is the oldest kept state (``snapshots=False``: its last position, as in
    llama.cpp)."""
    a_min, a_max = kvc.seq_pos_range(mem.kv, cfg.kv)
    r_min, r_max = rec.seq_pos_range(mem.recurrent, cfg.recurrent, snapshots=snapshots)
    missing = (a_max < 0) | (r_max < 0)
    return jnp.maximum(a_min, r_min), jnp.where(missing, -1, jnp.minimum(a_max, r_max))


def seq_pos_min(mem: HybridMemory, seq, cfg: HybridConfig) -> Scalar:
    """Smallest position of ``seq`` available in both parts (-1 if none)."""
    lo, _ = seq_pos_range(mem, cfg)
    s = i32_scalar(seq, "seq")
    return jnp.where(seq_ok(s, cfg.n_seq_max), lo[jnp.clip(s, 0, cfg.n_seq_max - 1)], -1)


def seq_pos_max(mem: HybridMemory, seq, cfg: HybridConfig) -> Scalar:
    """Largest position of ``seq`` available in both parts (-1 if none)."""
    _, hi = seq_pos_range(mem, cfg)
    s = i32_scalar(seq, "seq")
    return jnp.where(seq_ok(s, cfg.n_seq_max), hi[jnp.clip(s, 0, cfg.n_seq_max - 1)], -1)


def can_shift(cfg: HybridConfig) -> bool:
    """Whether ``seq_add`` / ``seq_div`` are supported: the attention part's answer (§7.6)."""
    return kvc.can_shift(cfg.kv)


# --------------------------------------------------------------------------------------------
# Sequence operations (§7.6)


def seq_rm(mem: HybridMemory, seq, p0, p1, cfg: HybridConfig) -> tuple[HybridMemory, ScalarBool]:
    """Removes positions ``[p0, p1)`` of ``seq`` (-1 = every sequence) from both parts,
    atomically; any other id outside ``[0, n_seq_max)`` is refused (difference 13).

    The recurrent part decides first; if it refuses (a partial removal that would need to rewind
    a state, §5.7.1) nothing changes at all (difference 2). A middle or leading range of
    a live sequence succeeds and trims only the attention part (the state cannot forget).
    """
    recr, ok_r = rec.seq_rm(mem.recurrent, seq, p0, p1, cfg.recurrent)
    kv, ok_a = kvc.seq_rm(mem.kv, seq, p0, p1, cfg.kv)
    return _keep_if(mem, HybridMemory(kv, recr), ok_r & ok_a, cfg)


def parts_agree(mem: HybridMemory, cfg: HybridConfig) -> ScalarBool:
    """Whether every sequence's two parts agree (§15.1): its recurrent state sits at its last
    attention position, or it has neither.

    Computed in the attention cells' layout and reduced to scalars, with the recurrent side
    entering only as the per-sequence state position broadcast over the cells: per-sequence
    vectors of the two parts never meet, so a sharded memory keeps every buffer's layout.
    """
    tail = mem.recurrent.cells.tail
    has_state = tail >= 0
    state_pos = jnp.where(has_state, mem.recurrent.cells.pos[jnp.maximum(tail, 0)], -1)
    cells = mem.kv.cells
    held = cells.seq & (cells.pos >= 0)[..., None]  # [streams, cells, seqs]
    pos = cells.pos[..., None]
    state = state_pos[None, None, :]
    beyond = jnp.any(held & (pos > state))  # a cell after the state, or cells and no state
    at_state = jnp.any(held & (pos == state), axis=(0, 1))  # [seqs]: implies has_state
    return ~beyond & (jnp.sum(at_state) == jnp.sum(has_state))


def _keep_if(
    old: HybridMemory, new: HybridMemory, ok: ScalarBool, cfg: HybridConfig
) -> tuple[HybridMemory, ScalarBool]:
    """``new`` when ``ok`` and, if the parts of ``old`` agreed, those of ``new`` agree (§15.1);
    otherwise ``old``, bit-identical, and False."""
    ok = ok & (parts_agree(new, cfg) | ~parts_agree(old, cfg))
    return _select(ok, new, old), ok


def _both(mem: HybridMemory, kv_op, recr_op, cfg: HybridConfig) -> tuple[HybridMemory, ScalarBool]:
    kv, ok_a = kv_op(mem.kv)
    recr, ok_r = recr_op(mem.recurrent)
    return _keep_if(mem, HybridMemory(kv, recr), ok_a & ok_r, cfg)


def seq_cp(
    mem: HybridMemory, src, dst, p0, p1, cfg: HybridConfig
) -> tuple[HybridMemory, ScalarBool]:
    """Copies (shares) ``src``'s positions ``[p0, p1)`` into ``dst`` in both parts (§7.6)."""
    return _both(
        mem,
        lambda m: kvc.seq_cp(m, src, dst, p0, p1, cfg.kv),
        lambda m: rec.seq_cp(m, src, dst, p0, p1, cfg.recurrent),
        cfg,
    )


def seq_keep(mem: HybridMemory, seq, cfg: HybridConfig) -> tuple[HybridMemory, ScalarBool]:
    """Drops every sequence but ``seq`` in both parts."""
    return _both(
        mem,
        lambda m: kvc.seq_keep(m, seq, cfg.kv),
        lambda m: rec.seq_keep(m, seq, cfg.recurrent),
        cfg,
    )


def seq_add(
    mem: HybridMemory, seq, p0, p1, delta, cfg: HybridConfig
) -> tuple[HybridMemory, ScalarBool]:
    """Shifts positions ``[p0, p1)`` of ``seq`` by ``delta`` in both parts; K is re-rotated by
    the next :func:`update` (§4.4, §5.7.4)."""
    return _both(
        mem,
        lambda m: kvc.seq_add(m, seq, p0, p1, delta, cfg.kv),
        lambda m: rec.seq_add(m, seq, p0, p1, delta, cfg.recurrent),
        cfg,
    )


def seq_div(
    mem: HybridMemory, seq, p0, p1, d, cfg: HybridConfig
) -> tuple[HybridMemory, ScalarBool]:
    """Integer-divides positions ``[p0, p1)`` of ``seq`` by ``d`` in both parts (§4.5)."""
    return _both(
        mem,
        lambda m: kvc.seq_div(m, seq, p0, p1, d, cfg.kv),
        lambda m: rec.seq_div(m, seq, p0, p1, d, cfg.recurrent),
        cfg,
    )


def clear(mem: HybridMemory, cfg: HybridConfig, *, data: bool | ScalarBool = True) -> HybridMemory:
    """Empties both parts (and zeroes their buffers when ``data``, static or traced)."""
    return HybridMemory(
        kvc.clear(mem.kv, cfg.kv, data=data), rec.clear(mem.recurrent, cfg.recurrent, data=data)
    )


# --------------------------------------------------------------------------------------------
# Plans (§7.3, §7.4)


def init_batch(
    mem: HybridMemory,
    batch: Batch,
    cfg: HybridConfig,
    *,
    n_ubatch: int,
    embd_all: bool = False,
    max_ubatches: int | None = None,
) -> tuple[UBatchPlan, Scalar]:
    """Splits a validated batch and dry-runs its placement in both parts (§7.3).

    ``embd_all`` -> seq split; otherwise the equal split, non-sequential when the KV cache is
    unified (difference 5). Placement is tried in the recurrent part first, then the
    attention part; the memory is never modified.

    Returns:
        ``(plan, status)``: SUCCESS, or FAILED_PREPARE when the batch cannot be split completely
        or either part has no room.
    """
    plan, status, _ = _init_batch(
        mem, batch, cfg, n_ubatch=n_ubatch, embd_all=embd_all, max_ubatches=max_ubatches
    )
    return plan, status


def _init_batch(
    mem: HybridMemory,
    batch: Batch,
    cfg: HybridConfig,
    *,
    n_ubatch: int,
    embd_all: bool = False,
    max_ubatches: int | None = None,
    record: bool = False,
) -> tuple[UBatchPlan, Scalar, kvc.KVSlot | None]:
    """:func:`init_batch`, also returning the KV slot of every ubatch when ``record`` (see
    :func:`jaxhybrid.kv.prepare_slots`)."""
    if embd_all:
        kind, sequential = SplitKind.SEQ, False
    else:
        kind, sequential = cfg.split_kind
    plan = split(
        batch,
        kind,
        n_ubatch=n_ubatch,
        n_seq_max=cfg.n_seq_max,
        sequential=sequential,
        max_ubatches=max_ubatches,
    )
    ok_r, _ = rec.prepare(mem.recurrent, batch, plan, cfg.recurrent, n_ubatch=n_ubatch)
    ok_a, _, slots = kvc.prepare_slots(
        mem.kv, batch, plan, cfg.kv, n_ubatch=n_ubatch, record=record
    )
    ok = plan.complete & ok_r & ok_a
    status = jnp.where(ok, MemoryStatus.SUCCESS, MemoryStatus.FAILED_PREPARE).astype(_I32)
    return plan, status, slots


def init_full(mem: HybridMemory, cfg: HybridConfig) -> Scalar:
    """Status of a worst-case context (§7.4): always SUCCESS.

    llama.cpp uses it to reserve worst-case compute graphs; with static shapes under ``jit``
    there is nothing to reserve, so only the combined status remains.
    """
    del mem, cfg
    return combine_status(MemoryStatus.SUCCESS, MemoryStatus.SUCCESS)


def init_update(mem: HybridMemory, cfg: HybridConfig) -> Scalar:
    """SUCCESS when the attention part has pending shifts to apply, else NO_UPDATE (§7.4); the
    recurrent part never needs an update (§5.8)."""
    attn = jnp.where(kvc.has_shift(mem.kv, cfg.kv), MemoryStatus.SUCCESS, MemoryStatus.NO_UPDATE)
    return combine_status(attn, MemoryStatus.NO_UPDATE)


def update(
    mem: HybridMemory, cfg: HybridConfig, rope_fn: Callable | None = None
) -> tuple[HybridMemory, Scalar]:
    """Applies pending K-shifts (attention only, §2.12) and returns ``(memory, status)`` where
    status is that of :func:`init_update`."""
    kv, attn = kvc.update(mem.kv, cfg.kv, rope_fn)
    return mem._replace(kv=kv), combine_status(attn, MemoryStatus.NO_UPDATE)


# --------------------------------------------------------------------------------------------
# Applying a plan: placement and the layer-level accessors


class Placement(NamedTuple):
    """What the layers of one ubatch need from memory.

    Attributes:
        kv: the KV cell (and stream) of every token.
        mask: ``[n_ubatch, n_stream * kv_size]`` visibility of every cell for every token (§3.3).
        recurrent: recurrent source/destination cell of every seq set.
        seq_set: seq set of every token (-1 for padding).
        valid: real tokens.
        n_kv: one past the highest used cell over all streams after placing this ubatch
            (§2.7): attention over the leading ``n_kv`` cells of each stream (see
            :func:`read_kv` / :func:`kq_mask` with a static span ``>= n_kv``, picked with
            :func:`jaxhybrid.kv.switch_span`) equals attention over all cells.
    """

    kv: kvc.KVSlot
    mask: Bool[Array, "ubatch kv"]
    recurrent: rec.RecurrentSlot
    seq_set: Int[Array, " ubatch"]
    valid: Bool[Array, " ubatch"]
    n_kv: Scalar | None = None


def apply(
    mem: HybridMemory,
    batch: Batch,
    plan: UBatchPlan,
    u,
    cfg: HybridConfig,
    *,
    n_ubatch: int,
) -> tuple[HybridMemory, UBatch, Placement]:
    """Places ubatch ``u`` of a successful plan in both parts (§7.5; llama.cpp's memory
    context ``apply()``).

    ``u`` may be traced, so a model can run the ubatches in ``lax.fori_loop`` / ``while_loop``
    with the memory as carry. Placement repeats the dry run of :func:`init_batch`, so it succeeds
    for every ubatch of a SUCCESS plan applied in order to the memory that was planned against.
    Each part places the ubatch with its own ``find_slot`` + ``apply_ubatch``
    (:func:`jaxhybrid.kv.apply_ubatch`, :func:`jaxhybrid.recurrent.apply_ubatch`); this function
    works on a plan, not on one part's slot, hence its own name.
    """
    ub = get_ubatch(batch, plan, u, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
    return _apply_ubatch(mem, ub, kvc.find_slot(mem.kv, ub, cfg.kv), cfg)


def _apply_ubatch(
    mem: HybridMemory, ub: UBatch, slot: kvc.KVSlot, cfg: HybridConfig
) -> tuple[HybridMemory, UBatch, Placement]:
    """:func:`apply` with the ubatch already taken from the plan and its KV slot found."""
    kv = kvc.apply_ubatch(mem.kv, ub, slot, cfg.kv)
    rslot = rec.find_slot(mem.recurrent, ub, cfg.recurrent)
    recr = rec.apply_ubatch(mem.recurrent, ub, rslot, cfg.recurrent)
    mask = kvc.kq_mask(kv, ub, slot, cfg.kv)
    place = Placement(
        kv=slot,
        mask=mask,
        recurrent=rslot,
        seq_set=ub.seq_set,
        valid=ub.valid,
        n_kv=kvc.used_span(kv, cfg.kv),
    )
    return HybridMemory(kv, recr), ub, place


def _sub(cfg: HybridConfig, layer: int, kind: LayerKind) -> int:
    return cfg.part_index(layer, kind)


def write_kv(
    mem: HybridMemory,
    layer: int,
    k: Float[Array, "ubatch heads head_dim_k"],
    v: Float[Array, "ubatch heads head_dim_v"],
    place: Placement,
    cfg: HybridConfig,
) -> HybridMemory:
    """Stores the ubatch's K/V rows of attention model layer ``layer`` in its placed cells."""
    il = _sub(cfg, layer, LayerKind.ATTENTION)
    return mem._replace(kv=kvc.write_kv(mem.kv, il, k, v, place.kv, cfg.kv))


def read_kv(
    mem: HybridMemory, layer: int, cfg: HybridConfig, n_kv: int | None = None
) -> tuple[Array, Array]:
    """K and V of attention model layer ``layer`` on a flat cell axis: every cell (pair with
    ``Placement.mask``), or the leading static ``n_kv`` cells of each stream (pair with
    :func:`kq_mask` of the same ``n_kv``; §2.7)."""
    return kvc.read_kv(mem.kv, _sub(cfg, layer, LayerKind.ATTENTION), cfg.kv, n_kv)


def kq_mask(
    mem: HybridMemory,
    ubatch: UBatch,
    place: Placement,
    cfg: HybridConfig,
    n_kv: int | None = None,
    *,
    own_stream: bool = False,
) -> Bool[Array, "ubatch kv"]:
    """The visibility mask of a placed ubatch over the leading static ``n_kv`` cells of each
    stream (§3.3; None = every cell, which is ``place.mask``); with ``own_stream``, over those of
    each token's own stream only (see :func:`jaxhybrid.kv.kq_mask`)."""
    return kvc.kq_mask(mem.kv, ubatch, place.kv, cfg.kv, n_kv, own_stream=own_stream)


def read_states(
    mem: HybridMemory, layer: int, place: Placement, cfg: HybridConfig
) -> tuple[Array, Array]:
    """Initial ``(r, s)`` state of every seq set for recurrent model layer ``layer``."""
    il = _sub(cfg, layer, LayerKind.RECURRENT)
    return rec.read_states(mem.recurrent, il, place.recurrent, cfg.recurrent)


def write_states(
    mem: HybridMemory,
    layer: int,
    place: Placement,
    r: Array,
    s: Array,
    n_seqs,
    cfg: HybridConfig,
    *,
    r_tok: Array | None = None,
    s_tok: Array | None = None,
) -> HybridMemory:
    """Stores the final ``(r, s)`` state of every seq set for recurrent model layer ``layer``;
    with rollback snapshots (``n_snapshots > 0``) also the per-token states ``r_tok`` / ``s_tok``
    they are taken from (see :func:`jaxhybrid.recurrent.write_states`)."""
    il = _sub(cfg, layer, LayerKind.RECURRENT)
    recr = rec.write_states(
        mem.recurrent, il, place.recurrent, r, s, n_seqs, cfg.recurrent, r_tok=r_tok, s_tok=s_tok
    )
    return mem._replace(recurrent=recr)


# --------------------------------------------------------------------------------------------
# The decode driver (§10)

StepFn = Callable[[Any, UBatch, HybridMemory, Placement], tuple[Any, HybridMemory]]


class DecodeCode(enum.IntEnum):
    """Result codes of decoding, as llama.cpp's ``llama_decode`` returns them (§10.3).

    ``DecodeResult.code`` and the serving layer's ``code`` fields hold one of these (as an int32
    scalar on device); compare with the members, e.g. ``int(code) == DecodeCode.NO_SLOT``.
    """

    OK = 0
    """The batch was decoded."""
    NO_SLOT = 1
    """No memory slot: not enough free KV cells or recurrent cells (memory unchanged)."""
    INVALID_BATCH = -1
    """The batch broke a validation rule (``DecodeResult.check`` says which; memory unchanged)."""
    ROLLBACK_REFUSED = -3
    """Speculative decoding could not remove rejected draft tokens (a rollback beyond the
    memory's ``n_snapshots`` horizon)."""


class DecodeResult(NamedTuple):
    """Outcome of :func:`decode`.

    Attributes:
        code: a :class:`DecodeCode` (§10.3): ``OK``, ``NO_SLOT`` or ``INVALID_BATCH``.
        status: the memory status of planning (SUCCESS or FAILED_PREPARE; SUCCESS when the batch
            was invalid and never planned).
        check: the batch validation result (details of an invalid batch).
        updated: pending K-shifts were applied before planning.
        n_outputs: number of output rows.
    """

    code: Scalar
    status: Scalar
    check: BatchCheck
    updated: ScalarBool
    n_outputs: Scalar


class _DecodeCarry(NamedTuple):
    """The carry of the ubatch loop of :func:`decode`."""

    u: Scalar  # the next ubatch
    mem: HybridMemory
    outputs: Any  # per batch token, zero until its ubatch ran


def _run_plan(step_fn, params, mem, batch, plan, slots, zeros, cfg, n_ubatch):
    """Applies and runs every ubatch of a successful plan in a ``lax.while_loop``, with the KV
    slots recorded by the dry run. Returns ``(memory, outputs in batch order)``."""
    n_batch = batch.capacity

    def body(c: _DecodeCarry) -> _DecodeCarry:
        ub = get_ubatch(batch, plan, c.u, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
        mem, ub, place = _apply_ubatch(c.mem, ub, jax.tree.map(lambda a: a[c.u], slots), cfg)
        step_out, mem = step_fn(params, ub, mem, place)
        rows = jnp.where(ub.output, ub.batch_idx, n_batch)
        outputs = jax.tree.map(
            lambda o, s: o.at[rows].set(s.astype(o.dtype), mode="drop"), c.outputs, step_out
        )
        return _DecodeCarry(c.u + 1, mem, outputs)

    init = _DecodeCarry(jnp.int32(0), mem, zeros)
    final = jax.lax.while_loop(lambda c: c.u < plan.n_ubatches, body, init)
    return final.mem, final.outputs


def decode(
    step_fn: StepFn,
    params,
    mem: HybridMemory,
    batch: Batch,
    cfg: HybridConfig,
    *,
    n_ubatch: int,
    n_vocab: int | None = None,
    embd_all: bool = False,
    rope_fn: Callable | None = None,
    max_ubatches: int | None = None,
) -> tuple[Any, HybridMemory, DecodeResult]:
    """Validates, plans and runs a whole batch; transactional (docs/semantics.md difference 1).

    ``step_fn(params, ubatch, memory, placement) -> (outputs, memory)`` is the model's pure
    per-ubatch step; its outputs are per token slot (leading axis ``n_ubatch``, any pytree).
    The steps of §10.1: pending K-shifts are applied (update), the batch is validated against
    what memory holds, planned (on FAILED_PREPARE the planning is retried once after an update,
    §10.1.6), and every ubatch is applied and run in a ``lax.while_loop``.

    Returns:
        ``(outputs, memory, result)``: outputs scattered back to batch order (leading axis
        ``n_batch``; rows of tokens without the output flag are zero), the new memory, and a
        :class:`DecodeResult`. On any failure the memory returned is the one given, bit for bit,
        and the outputs are zero.
    """
    n_batch = batch.capacity
    # Validation and planning read positions, sequences and heads only, which the K-shift
    # update (§2.12) leaves as they are (it re-rotates K and clears pending shifts), so they run
    # on the input memory and the update is applied inside the success branch below. The memory
    # then enters one cond whose failure branch returns it untouched, and XLA updates it in
    # place instead of copying every buffer each step.
    updated = init_update(mem, cfg) == MemoryStatus.SUCCESS
    # Validation compares sequences as llama.cpp does (a recurrent state holds its last position
    # only): rollback snapshots must not make coupled sequences look diverged (§6.2).
    lo, hi = seq_pos_range(mem, cfg, snapshots=False)
    # Coupled sequences must also share one recurrent cell (§6.2.7): a token listing two
    # sequences with different histories would make the secondary's state adopt the primary's
    # while its attention cells keep its own (§15.1).
    batch, check = validate(
        batch,
        lo,
        hi,
        n_seq_max=cfg.n_seq_max,
        n_vocab=n_vocab,
        output_all=embd_all,
        history=mem.recurrent.cells.tail,
    )
    # The dry run keeps the KV slot of every ubatch, so applying them does not search again.
    plan, status, slots = _init_batch(
        mem,
        batch,
        cfg,
        n_ubatch=n_ubatch,
        embd_all=embd_all,
        max_ubatches=max_ubatches,
        record=True,
    )
    valid_batch = check.code == BatchErrorCode.OK
    ok = valid_batch & (status == MemoryStatus.SUCCESS)

    ub0 = get_ubatch(batch, plan, 0, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
    place0 = jax.eval_shape(lambda m: apply(m, batch, plan, 0, cfg, n_ubatch=n_ubatch)[2], mem)
    out_shape = jax.eval_shape(lambda p, m, pl: step_fn(p, ub0, m, pl)[0], params, mem, place0)
    zeros = jax.tree.map(lambda s: jnp.zeros((n_batch, *s.shape[1:]), s.dtype), out_shape)

    def run(m):
        m, _ = update(m, cfg, rope_fn)
        return _run_plan(step_fn, params, m, batch, plan, slots, zeros, cfg, n_ubatch)

    new_mem, outputs = jax.lax.cond(ok, run, lambda m: (m, zeros), mem)
    code = jnp.where(
        valid_batch,
        jnp.where(ok, DecodeCode.OK, DecodeCode.NO_SLOT),
        DecodeCode.INVALID_BATCH,
    ).astype(_I32)
    result = DecodeResult(
        code=code,
        status=jnp.where(valid_batch, status, MemoryStatus.SUCCESS).astype(_I32),
        check=check,
        updated=updated & ok,
        n_outputs=jnp.where(ok, plan.n_outputs, 0),
    )
    return outputs, new_mem, result


class DecodeError(JaxHybridError):
    """Raised by :func:`raise_for_result` when a decode failed."""

    def __init__(self, result: DecodeResult):
        self.code = DecodeCode(int(result.code))
        if self.code == DecodeCode.INVALID_BATCH:
            msg = str(BatchError(result.check))
        else:
            msg = (
                "failed to find a memory slot for the batch (no free KV cells or recurrent "
                "cells; memory unchanged)"
            )
        super().__init__(f"decode failed with code {int(self.code)} ({self.code.name}): {msg}")


def raise_for_result(result: DecodeResult) -> None:
    """Raises :class:`DecodeError` if ``result`` reports a failure (host side)."""
    if int(result.code) != DecodeCode.OK:
        raise DecodeError(result)
