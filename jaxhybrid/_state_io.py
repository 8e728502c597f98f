"""State save and restore (spec §9): whole memories and single sequences, as validated bytes.

A blob is our header, then the records of §9.2 (attention) and §9.4 (recurrent) in that order
(§9.6), then a CRC-32 of everything before it::

    b"JHMS"  u32 version  u32 kind (1 kv, 2 recurrent, 3 hybrid)  u32 flags  i32 seq_id
    u32 n    n bytes of JSON: the static shape description of the memory (layer counts, heads,
             head dims, state shapes, dtypes, unified or not, layer routing)
    records  (integers little-endian, as §9.1)
    u32 crc32 of all bytes above

A per-sequence record holds that sequence's cells only and is restored into any destination
sequence id (§9.3, §9.5). With :attr:`StateFlags.PARTIAL_ONLY` a hybrid blob holds only the
recurrent record (llama.cpp's ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``): a cheap checkpoint of the
part that cannot be recomputed from the attention cache. With :attr:`StateFlags.SNAPSHOTS` the
recurrent record is followed by the cells' rollback snapshots (``u32 H``, ``i32 snap[H]`` per
cell, then the ``H`` snapshot rows of every layer's ``r`` and ``s`` as ``type, row_bytes,
rows``), so a restored sequence can still be rewound; without it restored cells start with none.

Serialization runs on the host. Writing copies the selected cells' rows to the host once (one
gather on device, one device-to-host copy). Reading parses and validates the whole blob and plans
every placement *before* touching the memory; only then are the rows copied to the device (one
host-to-device copy per buffer) and scattered into a new memory. So a bad blob, whatever is wrong
with it (truncated, extended, corrupted, another configuration, counts over capacity), returns the
memory it was given, unchanged, with a status naming the problem (docs/semantics.md difference 1).
llama.cpp instead clears the destination sequence, or everything, on a failed restore (§9.3.6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import math
import os
import stat
import struct
import uuid
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhybrid._batch import _int_array
from jaxhybrid._config import KVConfig, RecurrentConfig
from jaxhybrid._hybrid import HybridConfig, HybridMemory
from jaxhybrid._kv_cache import KVCache, KVCells
from jaxhybrid._kv_cache import seq_rm as kv_seq_rm
from jaxhybrid._recurrent import RecurrentCells, RecurrentMemory
from jaxhybrid._recurrent import _check_memory as check_recurrent
from jaxhybrid._status import InvalidArgumentError, InvalidTypeError, JaxHybridError

__all__ = [
    "FORMAT_VERSION",
    "StateError",
    "StateFlags",
    "StateStatus",
    "load_state",
    "load_state_file",
    "save_state_file",
    "state_read",
    "state_write",
]

MAGIC = b"JHMS"
FILE_MAGIC = b"JHSF"
FORMAT_VERSION = 1
_MAX_DESC_BYTES = 1 << 16
_KIND_KV, _KIND_RECURRENT, _KIND_HYBRID = 1, 2, 3
_KIND_NAMES = {_KIND_KV: "KV cache", _KIND_RECURRENT: "recurrent memory", _KIND_HYBRID: "hybrid"}
# ggml type ids of the storage dtypes (§9.2 writes a type per layer).
_TYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(jnp.bfloat16): 30}


class StateFlags(enum.IntFlag):
    """What a state record holds (§9.6)."""

    NONE = 0
    PARTIAL_ONLY = 1  # hybrid: only the recurrent part
    SNAPSHOTS = 4  # also the rollback snapshots of the recurrent states (n_snapshots > 0)


class StateStatus(NamedTuple):
    """Outcome of :func:`state_read`.

    Attributes:
        ok: the blob was restored.
        message: what was wrong with the blob ("" when ``ok``).
    """

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok


class StateError(JaxHybridError):
    """A state blob or file that cannot be restored into the memory given."""


class _Bad(StateError):
    """Raised inside the reader; :func:`state_read` turns it into a failed :class:`StateStatus`
    (its message says what is wrong with the blob)."""


Memory = KVCache | RecurrentMemory | HybridMemory
Config = KVConfig | RecurrentConfig | HybridConfig


# --------------------------------------------------------------------------------------------
# Byte I/O (§9.1)


class _Writer:
    def __init__(self):
        self.parts: list = []

    def u32(self, x: int) -> None:
        self.parts.append(struct.pack("<I", x))

    def i32(self, x: int) -> None:
        self.parts.append(struct.pack("<i", x))

    def u64(self, x: int) -> None:
        self.parts.append(struct.pack("<Q", x))

    def raw(self, buf: bytes | np.ndarray) -> None:
        if isinstance(buf, np.ndarray):  # as raw bytes (bfloat16 has no buffer format)
            buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        self.parts.append(buf)

    def ints(self, values: np.ndarray) -> None:
        self.raw(np.asarray(values, "<i4"))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.off = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.off

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            raise _Bad(
                f"blob ends inside {what}: needs {n} bytes at offset {self.off}, has {self.left}"
            )
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def _unpack(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self._unpack("<I", what)

    def i32(self, what: str) -> int:
        return self._unpack("<i", what)

    def u64(self, what: str) -> int:
        return self._unpack("<Q", what)

    def ints(self, n: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * n, what), "<i4").astype(np.int32)


# --------------------------------------------------------------------------------------------
# The configuration description in the header


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _kv_desc(cfg: KVConfig) -> dict:
    return dict(
        n_layers=cfg.n_layers,
        n_kv_heads=cfg.n_kv_heads,
        head_dim_k=cfg.head_dim_k,
        head_dim_v=cfg.head_dim_v,
        dtype_k=_dtype_name(cfg.dtype_k),
        dtype_v=_dtype_name(cfg.dtype_v),
        unified=cfg.unified,
        n_stream=cfg.n_stream,
        kv_size=cfg.kv_size,
        n_seq_max=cfg.n_seq_max,
    )


def _recurrent_desc(cfg: RecurrentConfig) -> dict:
    return dict(
        n_layers=cfg.n_layers,
        r_shape=list(cfg.r_shape),
        s_shape=list(cfg.s_shape),
        dtype_r=_dtype_name(cfg.dtype_r),
        dtype_s=_dtype_name(cfg.dtype_s),
        n_seq_max=cfg.n_seq_max,
    )


def _desc(cfg: Config) -> dict:
    if isinstance(cfg, KVConfig):
        return dict(kv=_kv_desc(cfg))
    if isinstance(cfg, RecurrentConfig):
        return dict(recurrent=_recurrent_desc(cfg))
    return dict(
        layer_kinds=[int(k) for k in cfg.layer_kinds],
        kv=_kv_desc(cfg.kv),
        recurrent=_recurrent_desc(cfg.recurrent),
    )


# Capacities may differ between the saving and the restoring memory: restore checks counts and
# sequence ids against the capacity it has (§9.3.4-5). Everything else must be equal.
_SOFT_FIELDS = {"kv.kv_size", "kv.n_seq_max", "recurrent.n_seq_max"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compare_desc(blob_desc, mine: dict, partial: bool) -> None:
    if not isinstance(blob_desc, dict):
        raise _Bad("the configuration description is not a JSON object")
    try:
        theirs, ours = _flatten(blob_desc), _flatten(mine)
    except RecursionError:
        raise _Bad("the configuration description is nested too deeply") from None
    for key, value in ours.items():
        if key in _SOFT_FIELDS or (partial and key.startswith(("kv.", "layer_kinds"))):
            continue
        if key not in theirs:
            raise _Bad(f"configuration mismatch: field {key!r} is missing from the blob")
        if theirs[key] != value:
            raise _Bad(
                f"configuration mismatch: field {key!r} is {theirs[key]!r} in the blob, "
                f"{value!r} in this memory"
            )


# --------------------------------------------------------------------------------------------
# Dispatch on the memory type


def _check_kv(cache: KVCache, cfg: KVConfig) -> None:
    """Every array of ``cache`` has the shape and dtype ``cfg`` gives it (a config that does not
    describe the memory would write a blob that lies about it)."""
    st, c = cfg.n_stream, cfg.kv_size
    i32 = np.dtype(np.int32)
    expected = {
        "cells.pos": (cache.cells.pos, (st, c), i32),
        "cells.seq": (cache.cells.seq, (st, c, cfg.n_seq_max), np.dtype(np.bool_)),
        "cells.shift": (cache.cells.shift, (st, c), i32),
        "cells.head": (cache.cells.head, (st,), i32),
        "k": (cache.k, (cfg.n_layers, st, c, cfg.n_kv_heads, cfg.head_dim_k), cfg.dtype_k),
        "v": (cache.v, (cfg.n_layers, st, c, cfg.n_kv_heads, cfg.head_dim_v), cfg.dtype_v),
    }
    for name, (a, shape, dtype) in expected.items():
        if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
            raise InvalidArgumentError(
                f"KV cache field {name} must be {np.dtype(dtype)}{list(shape)} for this config, "
                f"got {np.dtype(a.dtype)}{list(a.shape)}"
            )


def _kind(mem: Memory, cfg: Config) -> int:
    """The record kind of ``mem``, after checking that ``cfg`` describes it."""
    for kind, mem_t, cfg_t in (
        (_KIND_KV, KVCache, KVConfig),
        (_KIND_RECURRENT, RecurrentMemory, RecurrentConfig),
        (_KIND_HYBRID, HybridMemory, HybridConfig),
    ):
        if isinstance(mem, mem_t):
            if not isinstance(cfg, cfg_t):
                raise InvalidTypeError(
                    f"a {mem_t.__name__} needs a {cfg_t.__name__}, got {type(cfg)}"
                )
            kv, recr = _parts(mem, cfg, StateFlags.NONE)
            if kv is not None:
                _check_kv(*kv)
            if recr is not None:
                check_recurrent(*recr)
            return kind
    raise InvalidTypeError(f"expected a KVCache, RecurrentMemory or HybridMemory, got {type(mem)}")


def _parts(mem: Memory, cfg: Config, flags: StateFlags):
    """The (kv, kv_cfg) and (recr, recr_cfg) parts a record holds (None when absent)."""
    if isinstance(mem, KVCache):
        return (mem, cfg), None
    if isinstance(mem, RecurrentMemory):
        return None, (mem, cfg)
    kv = None if flags & StateFlags.PARTIAL_ONLY else (mem.kv, cfg.kv)
    return kv, (mem.recurrent, cfg.recurrent)


def _check_seq(seq_id: int, n_seq_max: int) -> int:
    if isinstance(seq_id, bool | np.bool_) or not isinstance(seq_id, int | np.integer):
        raise InvalidTypeError(f"seq_id must be an int, got {seq_id!r}")
    if not -1 <= seq_id < n_seq_max:
        raise InvalidArgumentError(f"seq_id must be -1 (all) or in [0, {n_seq_max}), got {seq_id}")
    return int(seq_id)


def _check_flags(flags) -> StateFlags:
    """``flags`` as :class:`StateFlags`: an int (or StateFlags) with known bits only."""
    if isinstance(flags, bool | np.bool_) or not isinstance(flags, int | np.integer):
        raise InvalidTypeError(f"flags must be StateFlags or an int, got {flags!r}")
    known = int(StateFlags.PARTIAL_ONLY | StateFlags.SNAPSHOTS)
    if flags < 0 or int(flags) & ~known:
        raise InvalidArgumentError(
            f"flags {int(flags)} has bits other than PARTIAL_ONLY (1) and SNAPSHOTS (4)"
        )
    return StateFlags(int(flags))


def _n_seq_max(cfg: Config) -> int:
    return cfg.n_seq_max


def _bucket(n: int) -> int:
    """Row counts are padded to powers of two so restores of many sizes share compilations."""
    return max(8, 1 << max(0, n - 1).bit_length())


# --------------------------------------------------------------------------------------------
# Writing


@functools.partial(jax.jit, static_argnums=(3,))
def _gather_rows(buf, stream, cell, n_lead: int):
    """Rows ``buf[:, stream, cell]`` (KV, ``n_lead=2``) or ``buf[:, cell]`` (recurrent)."""
    if n_lead == 2:
        return buf[:, stream, cell]
    return buf[:, cell]


def _fetch_rows(bufs: Sequence[jax.Array], stream: np.ndarray, cell: np.ndarray, n_lead: int):
    """The selected rows of every buffer, gathered on device and copied to the host once."""
    n = len(cell)
    pad = _bucket(n) - n
    st = jnp.asarray(np.concatenate([stream, np.zeros(pad, np.int32)]))
    ce = jnp.asarray(np.concatenate([cell, np.zeros(pad, np.int32)]))
    rows = jax.device_get([_gather_rows(b, st, ce, n_lead) for b in bufs])
    return [r[:, :n] for r in rows]


def _write_layers(w: _Writer, rows: np.ndarray, dtype) -> None:
    """Per layer: ``i32 type, u64 row_bytes, rows`` (§9.2, §9.4)."""
    row_bytes = int(np.prod(rows.shape[2:], dtype=np.int64)) * np.dtype(dtype).itemsize
    for layer in rows:
        w.i32(_TYPE_IDS[np.dtype(dtype)])
        w.u64(row_bytes)
        w.raw(layer)


def _write_meta(w: _Writer, pos: np.ndarray, ids: list[np.ndarray]) -> None:
    """``i32 pos, u32 n_seq_id, i32 seq_id[n_seq_id]`` per cell (§9.2, §9.4)."""
    for p, cell_ids in zip(pos.tolist(), ids, strict=True):
        w.i32(p)
        w.u32(len(cell_ids))
        w.ints(cell_ids)


def _write_kv(w: _Writer, cache: KVCache, cfg: KVConfig, seq_id: int) -> None:
    pos, seqs, shift = jax.device_get((cache.cells.pos, cache.cells.seq, cache.cells.shift))
    sel = pos >= 0
    if seq_id >= 0:
        sel &= seqs[:, :, seq_id]
    if np.any(shift[sel] != 0):
        raise InvalidArgumentError(
            "the KV cache has pending K-shifts (§2.12): apply them with update() before saving, "
            "the record stores K as rotated for the cells' positions"
        )
    streams, cells = np.nonzero(sel)
    streams, cells = streams.astype(np.int32), cells.astype(np.int32)
    k_rows, v_rows = _fetch_rows((cache.k, cache.v), streams, cells, n_lead=2)
    w.u32(cfg.n_stream)
    for s in range(cfg.n_stream):
        mine = streams == s
        n = int(np.sum(mine))
        w.u32(n)
        if n == 0:
            continue
        c = cells[mine]
        if seq_id >= 0:
            ids = [np.array([seq_id], np.int32)] * n
        else:
            ids = [np.nonzero(row)[0].astype(np.int32) for row in seqs[s, c]]
        _write_meta(w, pos[s, c], ids)
        w.u32(0)  # v_trans: V is stored row by row
        w.u32(cfg.n_layers)
        _write_layers(w, k_rows[:, mine], cfg.dtype_k)
        _write_layers(w, v_rows[:, mine], cfg.dtype_v)


def _write_recurrent(
    w: _Writer, mem: RecurrentMemory, cfg: RecurrentConfig, seq_id: int, snapshots: bool
) -> None:
    pos, seqs, tail = jax.device_get((mem.cells.pos, mem.cells.seq, mem.cells.tail))
    if seq_id >= 0:
        cells = np.array([tail[seq_id]] if tail[seq_id] >= 0 else [], np.int32)
        ids = [np.zeros((0,), np.int32)] * len(cells)  # §9.4: per-seq writes n_seq_id = 0
    else:
        cells = np.nonzero(np.any(seqs, axis=1))[0].astype(np.int32)
        ids = [np.nonzero(seqs[c])[0].astype(np.int32) for c in cells]
    r_rows, s_rows = _fetch_rows((mem.r, mem.s), cells, cells, n_lead=1)
    w.u32(len(cells))
    if len(cells) == 0:
        return
    _write_meta(w, pos[cells], ids)
    w.u32(0)  # s_trans
    w.u32(cfg.n_layers)
    _write_layers(w, r_rows, cfg.dtype_r)
    _write_layers(w, s_rows, cfg.dtype_s)
    if snapshots:
        snap = jax.device_get(mem.cells.snap)[cells]
        snap_r, snap_s = _fetch_rows((mem.snap_r, mem.snap_s), cells, cells, n_lead=1)
        w.u32(cfg.n_snapshots)
        w.ints(snap.reshape(-1))
        _write_layers(w, snap_r, cfg.dtype_r)
        _write_layers(w, snap_s, cfg.dtype_s)


def state_write(
    mem: Memory, cfg: Config, seq_id: int = -1, *, flags: StateFlags | int = StateFlags.NONE
) -> bytes:
    """Serializes the whole memory (``seq_id=-1``) or one sequence (§9.2, §9.4, §9.6).

    Args:
        mem: a :class:`~jaxhybrid.kv.KVCache`, :class:`~jaxhybrid.recurrent.RecurrentMemory` or
            :class:`~jaxhybrid.HybridMemory` (not traced: this runs on the host).
        cfg: its config.
        seq_id: -1 for everything, else the sequence to save.
        flags: :attr:`StateFlags.PARTIAL_ONLY` saves only the recurrent part of a hybrid memory
            (ignored by the other memories, as in llama.cpp); :attr:`StateFlags.SNAPSHOTS` also
            saves the rollback snapshots of the recurrent states.

    Returns:
        The blob, to give to :func:`state_read` with the same ``flags``.

    Raises:
        InvalidTypeError: ``seq_id`` or ``flags`` not an integer, or a memory / config of the
            wrong type.
        InvalidArgumentError: ``seq_id`` out of range, unknown ``flags`` bits, a config that does
            not describe the memory (an array of another shape or dtype), or the KV cache has
            pending K-shifts (run :func:`~jaxhybrid.update` first).

    Examples:
        >>> import jaxhybrid as jh
        >>> cfg = jh.KVConfig(kv_size=8, n_seq_max=2, head_dim_k=4)
        >>> blob = jh.state_write(jh.kv.init_kv_cache(cfg), cfg)
        >>> blob[:4]
        b'JHMS'
    """
    kind = _kind(mem, cfg)
    flags = _check_flags(flags)
    seq_id = _check_seq(seq_id, _n_seq_max(cfg))
    kv, recr = _parts(mem, cfg, flags)
    if flags & StateFlags.SNAPSHOTS and recr is not None and not recr[1].n_snapshots:
        raise InvalidArgumentError("flags has SNAPSHOTS but this memory keeps none (n_snapshots=0)")
    desc = json.dumps(_desc(cfg), sort_keys=True).encode()
    w = _Writer()
    w.raw(MAGIC)
    w.u32(FORMAT_VERSION)
    w.u32(kind)
    w.u32(int(flags))
    w.i32(seq_id)
    w.u32(len(desc))
    w.raw(desc)
    if kv is not None:
        _write_kv(w, *kv, seq_id)
    if recr is not None:
        _write_recurrent(w, *recr, seq_id, bool(flags & StateFlags.SNAPSHOTS))
    body = w.getvalue()
    return body + struct.pack("<I", zlib.crc32(body))


# --------------------------------------------------------------------------------------------
# Reading: parse and validate everything first


@dataclasses.dataclass
class _Cells:
    """Parsed cells of one record (or one KV stream): positions, seq ids, data rows."""

    pos: np.ndarray  # [n] int32
    ids: list[np.ndarray]  # per cell
    rows: list[list[np.ndarray]]  # per buffer, per layer: [n, *row_shape] (views of the blob)
    snap: np.ndarray | None = None  # [n, n_snapshots] snapshot positions (recurrent, if saved)


def _read_meta(
    r: _Reader, n: int, *, per_seq: bool, n_ids_per_seq: int, n_seq_max: int, what: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    pos = np.empty((n,), np.int32)
    ids = []
    for i in range(n):
        p = r.i32(f"{what} cell {i} position")
        if p < 0:
            raise _Bad(f"{what} cell {i} has position {p} (must be >= 0)")
        m = r.u32(f"{what} cell {i} sequence count")
        if per_seq:
            if m != n_ids_per_seq:
                raise _Bad(
                    f"{what} cell {i} lists {m} sequences; a per-sequence record has "
                    f"{n_ids_per_seq} (§9.3.3, §9.5)"
                )
        elif not 1 <= m <= n_seq_max:
            raise _Bad(f"{what} cell {i} lists {m} sequences (must be 1..{n_seq_max})")
        cell_ids = r.ints(m, f"{what} cell {i} sequence ids")
        if not per_seq:
            if np.any((cell_ids < 0) | (cell_ids >= n_seq_max)):
                raise _Bad(
                    f"{what} cell {i} has sequence id {cell_ids.tolist()} outside [0, {n_seq_max})"
                )
            if len(np.unique(cell_ids)) != m:
                raise _Bad(f"{what} cell {i} lists a sequence twice: {cell_ids.tolist()}")
        pos[i] = p
        ids.append(cell_ids)
    return pos, ids


def _read_layers(
    r: _Reader, n_layers: int, n: int, shape: tuple[int, ...], dtype, what: str
) -> list[np.ndarray]:
    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    layers = []
    for layer in range(n_layers):
        t = r.i32(f"{what} layer {layer} type")
        if t != _TYPE_IDS[dtype]:
            raise _Bad(
                f"{what} layer {layer} has type {t}, this memory stores {dtype.name} "
                f"(type {_TYPE_IDS[dtype]})"
            )
        size = r.u64(f"{what} layer {layer} row size")
        if size != row_bytes:
            raise _Bad(f"{what} layer {layer} rows are {size} bytes, this memory's {row_bytes}")
        buf = r.take(n * row_bytes, f"{what} layer {layer} rows")
        layers.append(np.frombuffer(buf, dtype).reshape((n, *shape)))
    return layers


def _read_data_header(r: _Reader, n_layers: int, trans: str, what: str) -> None:
    if r.u32(f"{what} {trans}") != 0:
        raise _Bad(f"{what} has {trans} != 0; only untransposed rows are supported")
    m = r.u32(f"{what} layer count")
    if m != n_layers:
        raise _Bad(f"{what} has {m} layers, this memory {n_layers}")


def _parse_kv(r: _Reader, cfg: KVConfig, per_seq: bool) -> list[_Cells | None]:
    """The record of §9.2: one entry per stream (None when the stream has no cells)."""
    n_stream = r.u32("KV stream count")
    if n_stream != cfg.n_stream:
        raise _Bad(f"KV record has {n_stream} streams, this cache {cfg.n_stream} (§9.3.1)")
    out: list[_Cells | None] = []
    for s in range(n_stream):
        what = f"KV stream {s}"
        n = r.u32(f"{what} cell count")
        if n > cfg.kv_size:
            raise _Bad(f"{what} holds {n} cells, this cache has {cfg.kv_size} per stream")
        if n == 0:
            out.append(None)
            continue
        pos, ids = _read_meta(
            r, n, per_seq=per_seq, n_ids_per_seq=1, n_seq_max=cfg.n_seq_max, what=what
        )
        if per_seq:
            saved = np.unique(np.concatenate(ids))
            if len(saved) != 1:
                raise _Bad(f"{what}: a per-sequence record names sequences {saved.tolist()}")
            ids = [np.zeros((1,), np.int32)] * n  # the stored id is replaced by the destination
        elif not cfg.unified and any(np.any(i != s) for i in ids):
            raise _Bad(f"{what} holds a cell of another sequence (one stream per sequence, §2.1)")
        # A sequence may hold one position in several cells: seq_div and a partial seq_add
        # make that, as in llama.cpp, and such a memory's own blob must restore (§9.3).
        _read_data_header(r, cfg.n_layers, "v_trans", what)
        k = _read_layers(r, cfg.n_layers, n, (cfg.n_kv_heads, cfg.head_dim_k), cfg.dtype_k, what)
        v = _read_layers(r, cfg.n_layers, n, (cfg.n_kv_heads, cfg.head_dim_v), cfg.dtype_v, what)
        out.append(_Cells(pos, ids, [k, v]))
    if per_seq and sum(c is not None for c in out) > 1:
        raise _Bad("a per-sequence KV record has cells in more than one stream")
    return out


def _parse_recurrent(
    r: _Reader, cfg: RecurrentConfig, per_seq: bool, snapshots: bool
) -> _Cells | None:
    """The record of §9.4 (None when it has no cells)."""
    what = "recurrent record"
    n = r.u32(f"{what} cell count")
    cap = 1 if per_seq else cfg.rs_size
    if n > cap:
        raise _Bad(f"{what} holds {n} cells, at most {cap} fit (§9.5)")
    if n == 0:
        return None
    pos, ids = _read_meta(
        r, n, per_seq=per_seq, n_ids_per_seq=0, n_seq_max=cfg.n_seq_max, what=what
    )
    if not per_seq:
        all_ids = np.concatenate(ids)
        uniq, counts = np.unique(all_ids, return_counts=True)
        if np.any(counts > 1):
            raise _Bad(
                f"{what}: sequence {uniq[np.argmax(counts > 1)]} has two cells (duplicate tail)"
            )
    _read_data_header(r, cfg.n_layers, "s_trans", what)
    rr = _read_layers(r, cfg.n_layers, n, cfg.r_shape, cfg.dtype_r, what + " r")
    ss = _read_layers(r, cfg.n_layers, n, cfg.s_shape, cfg.dtype_s, what + " s")
    if not snapshots:
        return _Cells(pos, ids, [rr, ss])
    h = r.u32("snapshot count")
    if h != cfg.n_snapshots:
        raise _Bad(f"the blob keeps {h} snapshots per cell, this memory {cfg.n_snapshots}")
    snap = r.ints(n * h, "snapshot positions").reshape(n, h)
    # Each kept snapshot is one of the h positions before its cell's, in slot q % h (§5.10).
    slot = np.arange(h)[None, :]
    kept = snap >= 0
    bad = kept & ((snap >= pos[:, None]) | (snap < pos[:, None] - h) | (snap % h != slot))
    if np.any(bad | (snap < -1)):
        raise _Bad(f"{what}: snapshot positions {snap.tolist()} do not fit cell positions")
    shape_r, shape_s = (h, *cfg.r_shape), (h, *cfg.s_shape)
    sr = _read_layers(r, cfg.n_layers, n, shape_r, cfg.dtype_r, what + " snapshots r")
    sss = _read_layers(r, cfg.n_layers, n, shape_s, cfg.dtype_s, what + " snapshots s")
    return _Cells(pos, ids, [rr, ss, sr, sss], snap)


def _parse_header(r: _Reader, kind: int, cfg: Config, seq_id: int, flags: StateFlags) -> None:
    if bytes(r.take(4, "magic")) != MAGIC:
        raise _Bad("not a jaxhybrid state blob (bad magic)")
    version = r.u32("format version")
    if version != FORMAT_VERSION:
        raise _Bad(f"format version {version}, this jaxhybrid reads version {FORMAT_VERSION}")
    their_kind = r.u32("memory kind")
    if their_kind != kind:
        name = _KIND_NAMES.get(their_kind, f"unknown kind {their_kind}")
        raise _Bad(f"the blob holds a {name} record, this memory is a {_KIND_NAMES[kind]}")
    their_flags = r.u32("flags")
    if their_flags != int(flags):
        raise _Bad(f"the blob was written with flags={their_flags}, read with flags={int(flags)}")
    saved_seq = r.i32("saved sequence id")
    if saved_seq < -1:
        raise _Bad(f"saved sequence id {saved_seq} is invalid")
    if (saved_seq == -1) != (seq_id == -1):
        if saved_seq == -1:
            raise _Bad("the blob holds the whole memory; read it with seq_id=-1")
        raise _Bad(f"the blob holds one sequence ({saved_seq}); read it with a seq_id >= 0")
    n = r.u32("description length")
    if n > _MAX_DESC_BYTES:
        raise _Bad(f"description of {n} bytes (at most {_MAX_DESC_BYTES})")
    raw = bytes(r.take(n, "description"))
    try:
        desc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Bad(f"the configuration description is not valid JSON ({e})") from None
    _compare_desc(desc, _desc(cfg), partial=bool(flags & StateFlags.PARTIAL_ONLY))


# --------------------------------------------------------------------------------------------
# Reading: plan the placement on host copies of the metadata, then apply


@functools.partial(jax.jit, static_argnums=(4, 5))
def _scatter_rows(buf, stream, cell, rows, n_lead: int, clear: bool):
    """``buf`` (zeroed when ``clear``) with ``rows`` written at the cells; padding (index past the
    end) is dropped."""
    if clear:
        buf = jnp.zeros_like(buf)
    if n_lead == 2:
        return buf.at[:, stream, cell].set(rows, mode="drop")
    return buf.at[:, cell].set(rows, mode="drop")


def _store(bufs, stream: np.ndarray, cell: np.ndarray, segments, n_lead: int, clear: bool):
    """Each buffer with its rows scattered in at ``(stream, cell)``.

    ``segments[i]`` lists the parsed row blocks of buffer ``i`` (per block, per layer: views of
    the blob), in the order of ``cell``. They are packed into one padded host array per buffer,
    the only host copy, and copied to the device once.
    """
    n = len(cell)
    size = _bucket(n)
    end = bufs[0].shape[n_lead]
    st = jnp.asarray(np.concatenate([stream, np.zeros(size - n, np.int32)]))
    ce = jnp.asarray(np.concatenate([cell, np.full(size - n, end, np.int32)]))
    out = []
    for buf, blocks in zip(bufs, segments, strict=True):
        packed = np.zeros((buf.shape[0], size, *buf.shape[n_lead + 1 :]), buf.dtype)
        off = 0
        for layers in blocks:
            for layer, rows in enumerate(layers):
                packed[layer, off : off + len(rows)] = rows
            off += len(layers[0]) if layers else 0
        new = _scatter_rows(buf, st, ce, jnp.asarray(packed), n_lead, clear)
        out.append(_like(new, buf))
    return out


def _like(new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` placed as ``old`` is (a restore keeps the memory's sharding)."""
    if getattr(old, "sharding", None) is not None and new.sharding != old.sharding:
        return jax.device_put(new, old.sharding)
    return new


def _free_cells(used: np.ndarray, head: int, n: int) -> np.ndarray | None:
    """The first ``n`` free cells in circular order from ``head`` (as placement scans, §2.4),
    or None when fewer are free."""
    size = len(used)
    order = (np.arange(size) + head) % size
    free = order[~used[order]]
    return free[:n].astype(np.int32) if len(free) >= n else None


class _KVPlan(NamedTuple):
    """A planned KV restore: host copies of the new cell metadata, and the parsed row blocks
    with the ``(stream, cell)`` each goes to."""

    pos: np.ndarray  # [streams, cells]
    seq: np.ndarray  # [streams, cells, seqs]
    shift: np.ndarray  # [streams, cells]
    head: np.ndarray  # [streams]
    streams: list[np.ndarray]  # per block
    cells: list[np.ndarray]  # per block
    rows: list[list[list[np.ndarray]]]  # per block: the K and V rows, per layer
    clear: bool  # the K/V buffers start from zeros (whole restore)


def _plan_kv_whole(cfg: KVConfig, rec: list[_Cells | None]) -> _KVPlan:
    """§9.3.4: clear, then cells ``[0, n)`` of each stream receive the stored cells."""
    st, size = cfg.n_stream, cfg.kv_size
    plan = _KVPlan(
        pos=np.full((st, size), -1, np.int32),
        seq=np.zeros((st, size, cfg.n_seq_max), np.bool_),
        shift=np.zeros((st, size), np.int32),
        head=np.zeros((st,), np.int32),
        streams=[],
        cells=[],
        rows=[],
        clear=True,
    )
    for s, c in enumerate(rec):
        if c is None:
            continue
        n = len(c.pos)
        plan.pos[s, :n] = c.pos
        for i, ids in enumerate(c.ids):
            plan.seq[s, i, ids] = True
        plan.streams.append(np.full(n, s, np.int32))
        plan.cells.append(np.arange(n, dtype=np.int32))
        plan.rows.append(c.rows)
    return plan


def _plan_kv_seq(cache: KVCache, cfg: KVConfig, rec: list[_Cells | None], seq_id: int) -> _KVPlan:
    """§9.3.3: the destination's cells are dropped, then the stored cells go to free cells of its
    stream. Done on host copies of the metadata, so nothing changes if they do not fit (raises
    :class:`_Bad`)."""
    cur = jax.device_get(cache.cells)  # by name, as for the recurrent cells
    pos, seqs, shift, head = (np.array(x) for x in (cur.pos, cur.seq, cur.shift, cur.head))
    seqs[:, :, seq_id] = False
    freed = (pos >= 0) & ~np.any(seqs, axis=-1)
    pos[freed] = -1
    shift[freed] = 0
    for s in range(cfg.n_stream):
        if np.any(freed[s]):
            head[s] = min(head[s], int(np.argmax(freed[s])))
    plan = _KVPlan(pos, seqs, shift, head, streams=[], cells=[], rows=[], clear=False)
    c = next((c for c in rec if c is not None), None)
    if c is None:
        return plan
    s = 0 if cfg.unified else seq_id
    n = len(c.pos)
    free = _free_cells(pos[s] >= 0, int(head[s]), n)
    if free is None:
        n_free = int(np.sum(pos[s] < 0))
        raise _Bad(
            f"sequence needs {n} cells, stream {s} has {n_free} free after removing "
            f"sequence {seq_id}"
        )
    pos[s, free] = c.pos
    seqs[s, free, seq_id] = True
    shift[s, free] = 0
    head[s] = free[-1] + 1
    plan.streams.append(np.full(n, s, np.int32))
    plan.cells.append(free)
    plan.rows.append(c.rows)
    return plan


def _plan_kv(cache: KVCache, cfg: KVConfig, rec: list[_Cells | None], seq_id: int) -> _KVPlan:
    """Plans a parsed KV record (§9.3) on host copies; raises :class:`_Bad` if it cannot fit."""
    return _plan_kv_whole(cfg, rec) if seq_id == -1 else _plan_kv_seq(cache, cfg, rec, seq_id)


def _restore_kv(cache: KVCache, plan: _KVPlan) -> KVCache:
    """Applies a planned KV restore."""
    new_cells = KVCells(
        pos=_like(jnp.asarray(plan.pos), cache.cells.pos),
        seq=_like(jnp.asarray(plan.seq), cache.cells.seq),
        shift=_like(jnp.asarray(plan.shift), cache.cells.shift),
        head=_like(jnp.asarray(plan.head, jnp.int32), cache.cells.head),
    )
    if not plan.rows:
        if plan.clear:
            k, v = (jnp.zeros_like(b) for b in (cache.k, cache.v))
        else:
            k, v = cache.k, cache.v
        return KVCache(new_cells, _like(k, cache.k), _like(v, cache.v))
    segments = [[r[i] for r in plan.rows] for i in range(2)]
    streams, cells = np.concatenate(plan.streams), np.concatenate(plan.cells)
    k, v = _store((cache.k, cache.v), streams, cells, segments, 2, plan.clear)
    return KVCache(new_cells, k, v)


class _RecurrentPlan(NamedTuple):
    """A planned recurrent restore: host copies of the new cell metadata and the cells the
    parsed rows go to (in record order)."""

    pos: np.ndarray  # [rs]
    seq: np.ndarray  # [rs, seqs]
    tail: np.ndarray  # [seqs]
    head: int
    snap: np.ndarray  # [rs, n_snapshots]
    cells: np.ndarray  # [n]
    clear: bool  # the state buffers start from zeros (whole restore)


def _plan_recurrent_whole(cfg: RecurrentConfig, rec: _Cells | None) -> _RecurrentPlan:
    """§9.5 whole: clear, then cells ``[0, n)`` receive the stored cells, head 0."""
    rs = cfg.rs_size
    plan = _RecurrentPlan(
        pos=np.full((rs,), -1, np.int32),
        seq=np.zeros((rs, cfg.n_seq_max), np.bool_),
        tail=np.full((cfg.n_seq_max,), -1, np.int32),
        head=0,
        snap=np.full((rs, cfg.n_snapshots), -1, np.int32),
        cells=np.zeros((0,), np.int32),
        clear=True,
    )
    if rec is None:
        return plan
    n = len(rec.pos)
    plan.pos[:n] = rec.pos
    for i, ids in enumerate(rec.ids):
        plan.seq[i, ids] = True
        plan.tail[ids] = i
    if rec.snap is not None:
        plan.snap[:n] = rec.snap
    return plan._replace(cells=np.arange(n, dtype=np.int32))


def _plan_recurrent_seq(
    mem: RecurrentMemory, cfg: RecurrentConfig, rec: _Cells | None, seq_id: int
) -> _RecurrentPlan:
    """§9.5 per sequence: the destination leaves its cell, then the stored state goes to the
    first free cell from the head."""
    cur = jax.device_get(mem.cells)  # by name: the cells may carry more fields (snapshots)
    pos, seqs, tail = (np.array(x) for x in (cur.pos, cur.seq, cur.tail))
    head = int(cur.head)
    snap = np.full((cfg.rs_size, 0), -1, np.int32) if cur.snap is None else np.array(cur.snap)
    old = int(tail[seq_id])
    if old >= 0:
        seqs[old, seq_id] = False
        tail[seq_id] = -1
        if not np.any(seqs[old]):
            pos[old] = -1
            snap[old] = -1
            head = min(head, old)
    cells = np.zeros((0,), np.int32)
    if rec is not None:
        free = _free_cells(np.any(seqs, axis=1), head, 1)
        if free is None:  # cannot happen: a sequence holds at most one of rs >= n_seq cells
            raise _Bad("no free recurrent cell for the sequence")
        cells = free
        pos[free] = rec.pos
        seqs[free, seq_id] = True
        snap[free] = -1 if rec.snap is None else rec.snap
        tail[seq_id] = free[0]
        head = (int(free[0]) + 1) % cfg.rs_size
    return _RecurrentPlan(pos, seqs, tail, head, snap, cells, clear=False)


def _plan_recurrent(
    mem: RecurrentMemory, cfg: RecurrentConfig, rec: _Cells | None, seq_id: int
) -> _RecurrentPlan:
    """Plans a parsed recurrent record (§9.5) on host copies."""
    if seq_id == -1:
        return _plan_recurrent_whole(cfg, rec)
    return _plan_recurrent_seq(mem, cfg, rec, seq_id)


def _restore_recurrent(mem: RecurrentMemory, rec: _Cells | None, plan: _RecurrentPlan):
    """Applies a planned recurrent restore."""
    cur = mem.cells
    new_cells = RecurrentCells(
        pos=_like(jnp.asarray(plan.pos), cur.pos),
        seq=_like(jnp.asarray(plan.seq), cur.seq),
        tail=_like(jnp.asarray(plan.tail), cur.tail),
        head=_like(jnp.asarray(plan.head, jnp.int32), cur.head),
        snap=None if cur.snap is None else _like(jnp.asarray(plan.snap), cur.snap),
    )
    bufs = [b for b in (mem.r, mem.s, mem.snap_r, mem.snap_s) if b is not None]
    # Snapshot rows come with the blob (SNAPSHOTS) or are left as they are: without positions
    # in ``snap`` they are never read.
    n_rows = 0 if rec is None else len(rec.rows)
    out = list(bufs)
    if n_rows:
        rows = [[x] for x in rec.rows]
        out[:n_rows] = _store(bufs[:n_rows], plan.cells, plan.cells, rows, 1, plan.clear)
    if plan.clear:
        out[n_rows:] = [_like(jnp.zeros_like(b), b) for b in bufs[n_rows:]]
    names = ("r", "s", "snap_r", "snap_s")[: len(out)]
    return mem._replace(cells=new_cells, **dict(zip(names, out, strict=True)))


def _read(mem: Memory, cfg: Config, data, seq_id: int, flags: StateFlags) -> Memory:
    kind = _kind(mem, cfg)
    flags = _check_flags(flags)
    try:
        view = memoryview(data).cast("B")
    except TypeError as e:
        raise _Bad(f"data must be bytes-like, got {type(data).__name__}") from e
    if isinstance(seq_id, bool | np.bool_) or not isinstance(seq_id, int | np.integer):
        raise InvalidTypeError(f"seq_id must be an int, got {seq_id!r}")  # §15.6: raised
    if not -1 <= seq_id < _n_seq_max(cfg):
        raise _Bad(f"seq_id must be -1 (all) or in [0, {_n_seq_max(cfg)}), got {seq_id}")
    if len(view) < 4:
        raise _Bad(f"blob of {len(view)} bytes is too short")
    (crc,) = struct.unpack("<I", view[-4:])
    if zlib.crc32(view[:-4]) != crc:
        raise _Bad("checksum mismatch: the blob is truncated, extended or corrupted")
    r = _Reader(view[:-4])
    _parse_header(r, kind, cfg, seq_id, flags)
    kv, recr = _parts(mem, cfg, flags)
    per_seq = seq_id >= 0
    kv_rec = _parse_kv(r, kv[1], per_seq) if kv is not None else None
    snapshots = bool(flags & StateFlags.SNAPSHOTS)
    if snapshots and recr is not None and not recr[1].n_snapshots:
        raise _Bad("flags has SNAPSHOTS but this memory keeps none (n_snapshots=0)")
    recr_rec = _parse_recurrent(r, recr[1], per_seq, snapshots) if recr is not None else None
    if r.left:
        raise _Bad(f"{r.left} unexpected bytes after the records")
    # Everything is parsed and checked; placement may still fail (no room), and a hybrid's two
    # parts must agree afterwards, so both are planned on host copies before any device work.
    kv_plan = _plan_kv(*kv, kv_rec, seq_id) if kv is not None else None
    recr_plan = _plan_recurrent(*recr, recr_rec, seq_id) if recr is not None else None
    trims: dict[int, int] = {}
    if isinstance(mem, HybridMemory):
        trims = _check_agreement(mem, cfg, kv_plan, recr_plan, seq_id)
    new_kv = _restore_kv(kv[0], kv_plan) if kv is not None else None
    new_recr = _restore_recurrent(recr[0], recr_rec, recr_plan) if recr is not None else None
    if isinstance(mem, KVCache):
        return new_kv
    if isinstance(mem, RecurrentMemory):
        return new_recr
    new_kv = mem.kv if new_kv is None else new_kv
    for s, p in trims.items():  # PARTIAL_ONLY: attention positions after each restored state
        new_kv, _ = kv_seq_rm(new_kv, s, p + 1, -1, cfg.kv)
    return HybridMemory(new_kv, new_recr)


def _check_agreement(
    mem: HybridMemory,
    cfg: HybridConfig,
    kv_plan: _KVPlan | None,
    recr_plan: _RecurrentPlan,
    seq_id: int,
) -> dict[int, int]:
    """Refuses a hybrid restore that would leave a sequence whose parts disagree (§15.1).

    With both records, each restored sequence's last attention position must be its state's.
    With ``PARTIAL_ONLY`` (``kv_plan`` None) the attention part stays, so a restored state at
    ``P`` needs the sequence to hold position ``P`` there, and its positions after ``P`` are
    removed as :func:`~jaxhybrid.restore_checkpoint` does (difference 19); a sequence restored
    without a state must hold no attention cells. Returns those trims, ``{seq: P}``.
    """
    if kv_plan is None:
        cur = jax.device_get(mem.kv.cells)
        kv_pos, kv_seq = np.asarray(cur.pos), np.asarray(cur.seq)
    else:
        kv_pos, kv_seq = kv_plan.pos, kv_plan.seq
    trims = {}
    for s in range(cfg.n_seq_max) if seq_id == -1 else (seq_id,):
        held = kv_pos[kv_seq[..., s]]
        t = int(recr_plan.tail[s])
        state = int(recr_plan.pos[t]) if t >= 0 else -1
        last = int(held.max()) if held.size else -1
        if kv_plan is not None and last != state:
            raise _Bad(
                f"sequence {s}: the attention record ends at position {last} but the recurrent "
                f"state is at {state}; the two parts must agree (§15.1)"
            )
        if kv_plan is None and state >= 0 and not np.any(held == state):
            raise _Bad(
                f"sequence {s}: the saved state is at position {state}, which the attention "
                f"part does not hold (it holds {held.size} cells, last {last}; §15.1)"
            )
        if kv_plan is None and state < 0 and held.size:
            raise _Bad(
                f"sequence {s}: the blob holds no state for it, but the attention part holds "
                f"{held.size} cells (§15.1)"
            )
        if kv_plan is None and state >= 0 and last > state:
            trims[s] = state
    return trims


def state_read(
    mem: Memory,
    cfg: Config,
    data: bytes | bytearray | memoryview,
    seq_id: int = -1,
    *,
    flags: StateFlags | int = StateFlags.NONE,
) -> tuple[Memory, StateStatus]:
    """Restores a blob of :func:`state_write` (§9.3, §9.5).

    With ``seq_id=-1`` the blob must hold a whole memory, which replaces everything. With
    ``seq_id >= 0`` it must hold one sequence (saved under any id): the destination's cells are
    replaced by the stored ones, placed in free cells of its stream.

    Transactional: on any failure the memory given is returned unchanged together with a status
    saying what is wrong; nothing raises for bad blob contents (see :func:`load_state`). A hybrid
    restore is refused when it would leave a sequence whose two parts disagree (§15.1; with
    ``PARTIAL_ONLY`` the sequence's attention positions after the restored state are removed,
    difference 19). Arguments of the wrong type (``seq_id``, ``flags``, a memory or config that do
    not match) raise ``InvalidTypeError`` / ``InvalidArgumentError`` instead.

    Args:
        mem: the memory to restore into (its type and config must match the blob's).
        cfg: its config.
        data: the blob.
        seq_id: -1 for a whole-memory blob, else the destination sequence id.
        flags: the flags the blob was written with.

    Returns:
        ``(memory, status)``.

    Examples:
        >>> import jaxhybrid as jh
        >>> cfg = jh.RecurrentConfig(n_seq_max=2, n_layers=1, r_shape=(2,), s_shape=(2,))
        >>> mem = jh.recurrent.init_recurrent(cfg)
        >>> mem, status = jh.state_read(mem, cfg, b"garbage")
        >>> status.ok, status.message
        (False, 'checksum mismatch: the blob is truncated, extended or corrupted')
    """
    try:
        return _read(mem, cfg, data, seq_id, flags), StateStatus(True, "")
    except _Bad as e:
        return mem, StateStatus(False, str(e))


def load_state(
    mem: Memory,
    cfg: Config,
    data: bytes | bytearray | memoryview,
    seq_id: int = -1,
    *,
    flags: StateFlags | int = StateFlags.NONE,
) -> Memory:
    """:func:`state_read` that raises :class:`StateError` naming the problem instead of returning
    a status."""
    new, status = state_read(mem, cfg, data, seq_id, flags=flags)
    if not status.ok:
        raise StateError(f"cannot restore state: {status.message}")
    return new


# --------------------------------------------------------------------------------------------
# Files (§9.7: magic, version, the caller's token list, then the memory record)


def _max_record_bytes(
    n_cells: int, n_seq: int, n_layers: int, row_bytes: Sequence[int], n_snapshots: int = 0
) -> int:
    """The largest record of §9.2 / §9.4 over ``n_cells`` cells, each held by all ``n_seq``
    sequences: ``i32 pos, u32 n, i32 ids[n]`` per cell, ``u32 trans, u32 n_layers``, then per
    buffer and layer ``i32 type, u64 row_bytes`` and the rows; with snapshots also ``u32 H``,
    ``i32 snap[H]`` per cell and ``H`` rows per cell of every buffer and layer."""
    out = n_cells * (8 + 4 * n_seq) + 8 + sum(n_layers * (12 + n_cells * r) for r in row_bytes)
    if n_snapshots:
        out += 4 + 4 * n_cells * n_snapshots
        out += sum(n_layers * (12 + n_cells * n_snapshots * r) for r in row_bytes)
    return out


def _max_file_bytes(cfg: Config, n_tokens: int) -> int:
    """The largest state file of a memory of ``cfg`` holding ``n_tokens`` tokens: the file
    header and the tokens, then the largest blob (whole memory, every cell held by every
    sequence, snapshots and the longest description the reader accepts)."""
    kv = cfg if isinstance(cfg, KVConfig) else getattr(cfg, "kv", None)
    recr = cfg if isinstance(cfg, RecurrentConfig) else getattr(cfg, "recurrent", None)
    blob = 4 + 5 * 4 + _MAX_DESC_BYTES + 4  # magic, version..desc length, desc, crc
    if kv is not None:
        heads = kv.n_kv_heads
        rows = (
            heads * kv.head_dim_k * np.dtype(kv.dtype_k).itemsize,
            heads * kv.head_dim_v * np.dtype(kv.dtype_v).itemsize,
        )
        per_stream = 4 + _max_record_bytes(kv.kv_size, kv.n_seq_max, kv.n_layers, rows)
        blob += 4 + kv.n_stream * per_stream
    if recr is not None:
        rows = (
            math.prod(recr.r_shape) * np.dtype(recr.dtype_r).itemsize,
            math.prod(recr.s_shape) * np.dtype(recr.dtype_s).itemsize,
        )
        blob += 4 + _max_record_bytes(
            recr.rs_size, recr.n_seq_max, recr.n_layers, rows, recr.n_snapshots
        )
    return 12 + 4 * n_tokens + blob


def _file_path(path, what: str) -> str:
    try:
        return os.fspath(path)
    except TypeError:
        raise InvalidTypeError(
            f"{what} must be a str or os.PathLike, got {type(path).__name__}"
        ) from None


def _file_args(mem: Memory, cfg: Config, seq_id, flags) -> tuple[int, StateFlags]:
    """The memory, ``seq_id`` and ``flags`` of a state file call, checked before any I/O."""
    _kind(mem, cfg)
    return _check_seq(seq_id, _n_seq_max(cfg)), _check_flags(flags)


def save_state_file(
    path: str | os.PathLike,
    mem: Memory,
    cfg: Config,
    seq_id: int = -1,
    *,
    tokens: Sequence[int] | np.ndarray = (),
    flags: StateFlags | int = StateFlags.NONE,
) -> int:
    """Writes ``tokens`` (the caller's token history, kept beside the state as llama.cpp's
    session files do) and the state blob to ``path``, atomically. Returns the bytes written.

    The file is written under a new temporary name in the same folder, then renamed over
    ``path``: a failure leaves ``path`` as it was and removes the temporary file (§15.5).
    ``path`` must be a regular file or not exist yet. A symbolic link is refused rather than
    replaced (the rename would replace the link itself, not its target; give the target's path
    instead), and so are devices, FIFOs and folders.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``tokens`` holds something other than
            integers (never converted, §15.6).
        InvalidArgumentError: ``path`` is a link or not a regular file, ``tokens`` is not 1-D or
            holds a value outside int32, or a bad ``seq_id`` / ``flags`` (see
            :func:`state_write`).
        StateError: the file cannot be written (the message has the system's reason).
    """
    dst = _file_path(path, "path")
    seq_id, flags = _file_args(mem, cfg, seq_id, flags)
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise StateError(f"cannot write {dst!r}: {e.strerror}") from e
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise InvalidArgumentError(
            f"{dst!r} is a symbolic link; save_state_file replaces files and would replace the "
            "link, not its target: give the target's path"
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"{dst!r} is not a regular file (a folder, device or FIFO)")
    if isinstance(tokens, str | bytes):
        raise InvalidTypeError(
            f"tokens must be a sequence of integers, got {type(tokens).__name__}"
        )
    ndim = np.ndim(tokens) if isinstance(tokens, np.ndarray | jax.Array) else None
    if ndim is None:
        ndim = np.asarray(tokens, dtype=object).ndim
    if ndim != 1:
        raise InvalidArgumentError(f"tokens must be 1-D, got {ndim} dimensions")
    toks = _int_array(tokens, "tokens")
    blob = state_write(mem, cfg, seq_id, flags=flags)
    head = FILE_MAGIC + struct.pack("<II", FORMAT_VERSION, len(toks))
    # A fresh name, created exclusively (never through an existing file or link).
    tmp = f"{dst}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise StateError(f"cannot write {dst!r}: {e.strerror}") from e
    try:
        with open(fd, "wb") as f:
            f.write(head)
            f.write(toks.astype("<i4").tobytes())
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the first error is the one to report
            os.remove(tmp)
        if isinstance(e, OSError):
            raise StateError(f"cannot write {dst!r}: {e.strerror or e}") from e
        raise
    return len(head) + 4 * len(toks) + len(blob)


def load_state_file(
    path: str | os.PathLike,
    mem: Memory,
    cfg: Config,
    seq_id: int = -1,
    *,
    flags: StateFlags | int = StateFlags.NONE,
) -> tuple[Memory, np.ndarray]:
    """Reads a file of :func:`save_state_file`: returns ``(memory, tokens)``.

    Only a regular file is read (a FIFO or a device is refused without waiting on it), and only
    if its size fits what a memory of ``cfg`` can produce with the token count its header
    announces; nothing larger is read into memory.

    Raises:
        InvalidTypeError: ``path``, ``mem``, ``cfg``, ``seq_id`` or ``flags`` has the wrong
            type.
        InvalidArgumentError: ``seq_id`` out of range, or unknown ``flags`` bits.
        StateError: the file cannot be read, is not a regular file, is larger than any state
            file of this memory, is not a state file, or its state cannot be restored (the
            memory given is untouched).
    """
    src = _file_path(path, "path")
    seq_id, flags = _file_args(mem, cfg, seq_id, flags)
    try:
        # Checked before opening: opening a FIFO waits for a writer.
        if not stat.S_ISREG(os.stat(src).st_mode):
            raise StateError(f"{src!r} is not a regular file")
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise StateError(f"cannot read {src!r}: {e.strerror}") from e
    with open(fd, "rb") as f:
        try:
            size = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check above
                raise StateError(f"{src!r} is not a regular file")
            head = f.read(12)
            if len(head) < 12 or head[:4] != FILE_MAGIC:
                raise StateError(f"{src!r} is not a jaxhybrid state file")
            version, n_tokens = struct.unpack_from("<II", head, 4)
            if version != FORMAT_VERSION:
                raise StateError(f"{src!r} has format version {version}, expected {FORMAT_VERSION}")
            limit = _max_file_bytes(cfg, n_tokens)
            if size > limit:
                raise StateError(
                    f"{src!r} has {size} bytes; a state file of this memory with {n_tokens} "
                    f"tokens has at most {limit} bytes"
                )
            data = head + f.read(size - 12)
        except OSError as e:
            raise StateError(f"cannot read {src!r}: {e.strerror}") from e
    if 12 + 4 * n_tokens > len(data):
        raise StateError(f"{src!r} is truncated: it announces {n_tokens} tokens")
    tokens = np.frombuffer(data, "<i4", n_tokens, 12).astype(np.int32)
    blob = memoryview(data)[12 + 4 * n_tokens :]
    try:
        return load_state(mem, cfg, blob, seq_id, flags=flags), tokens
    except StateError as e:
        raise StateError(f"{src!r}: {e}") from None
