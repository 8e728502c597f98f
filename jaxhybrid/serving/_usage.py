"""What a hybrid memory holds, per sequence and in total, read on the host."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

import jaxhybrid as jh

__all__ = ["MemoryUsage", "memory_usage"]


class MemoryUsage(NamedTuple):
    """What a hybrid memory holds, read on the host (see :func:`memory_usage`).

    Attributes:
        kv_cells_per_seq: ``[n_seq_max]`` KV cells holding each sequence (shared cells count for
            every sequence that holds them).
        kv_cells_used: non-empty KV cells (all streams).
        kv_cells_shared: KV cells held by more than one sequence (after ``seq_cp``).
        kv_cells_total: ``n_stream * kv_size``.
        recurrent_cells_used: recurrent cells holding a state.
        recurrent_cells_total: recurrent cells (``rs_size``).
        recurrent_cell_of_seq: ``[n_seq_max]`` the recurrent cell of each sequence (-1: none).
        pos_min, pos_max: ``[n_seq_max]`` each sequence's hybrid range (§7.6: what both parts
            hold; a recurrent state holds only its last position, so both are that; -1: none).
        kv_bytes, recurrent_bytes: bytes of the K/V buffers and of the recurrent state buffers (r, s
            and any rollback snapshots).
        kv_bytes_used, recurrent_bytes_used: the part of those bytes in used cells.
        meta_bytes: bytes of the cell metadata of both parts.
        kv_pos: ``[n_stream, kv_size]`` position of every KV cell (-1: empty).
        kv_seq: ``[n_stream, kv_size, n_seq_max]`` which sequences every KV cell holds.
        recurrent_pos: ``[rs_size]`` position of every recurrent cell (-1: empty).
        recurrent_seq: ``[rs_size, n_seq_max]`` which sequences share every recurrent cell.
    """

    kv_cells_per_seq: np.ndarray
    kv_cells_used: int
    kv_cells_shared: int
    kv_cells_total: int
    recurrent_cells_used: int
    recurrent_cells_total: int
    recurrent_cell_of_seq: np.ndarray
    pos_min: np.ndarray
    pos_max: np.ndarray
    kv_bytes: int
    recurrent_bytes: int
    kv_bytes_used: int
    recurrent_bytes_used: int
    meta_bytes: int
    kv_pos: np.ndarray
    kv_seq: np.ndarray
    recurrent_pos: np.ndarray
    recurrent_seq: np.ndarray


_pos_range = jax.jit(jh.seq_pos_range, static_argnames="cfg")


def _nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_usage(mem: jh.HybridMemory, cfg: jh.HybridConfig) -> MemoryUsage:
    """Cells and bytes a hybrid memory uses, per sequence and in total (host side; copies only
    the cell metadata to the host).

    Examples:
        >>> import jaxhybrid as jh
        >>> cfg = jh.HybridConfig.from_layers(
        ...     [True, False],
        ...     jh.KVConfig(kv_size=8, n_seq_max=2, head_dim_k=4),
        ...     jh.RecurrentConfig(n_seq_max=2, r_shape=(2, 4), s_shape=(4, 2)),
        ... )
        >>> use = memory_usage(jh.init_hybrid(cfg), cfg)
        >>> use.kv_cells_used, use.kv_cells_total, use.kv_bytes
        (0, 8, 256)
    """
    kv_cells, rs_cells = jax.device_get((mem.kv.cells, mem.recurrent.cells))
    lo, hi = (np.asarray(x) for x in jax.device_get(_pos_range(mem, cfg=cfg)))
    kv_used = kv_cells.pos >= 0
    rs_used = rs_cells.pos >= 0
    n_kv_used, n_rs_used = int(kv_used.sum()), int(rs_used.sum())
    # Every buffer but the cell metadata: K/V, r/s states and any extra state planes.
    kv_bytes = _nbytes(mem.kv) - _nbytes(mem.kv.cells)
    recurrent_bytes = _nbytes(mem.recurrent) - _nbytes(mem.recurrent.cells)
    n_kv, n_rs = kv_cells.pos.size, rs_cells.pos.size
    return MemoryUsage(
        kv_cells_per_seq=(kv_cells.seq & kv_used[..., None]).sum(axis=(0, 1)),
        kv_cells_used=n_kv_used,
        kv_cells_shared=int((kv_cells.seq.sum(axis=-1) > 1).sum()),
        kv_cells_total=n_kv,
        recurrent_cells_used=n_rs_used,
        recurrent_cells_total=n_rs,
        recurrent_cell_of_seq=np.asarray(rs_cells.tail),
        pos_min=lo,
        pos_max=hi,
        kv_bytes=kv_bytes,
        recurrent_bytes=recurrent_bytes,
        kv_bytes_used=kv_bytes * n_kv_used // n_kv,
        recurrent_bytes_used=recurrent_bytes * n_rs_used // n_rs,
        meta_bytes=_nbytes((kv_cells, rs_cells)),
        kv_pos=np.asarray(kv_cells.pos),
        kv_seq=np.asarray(kv_cells.seq),
        recurrent_pos=np.asarray(rs_cells.pos),
        recurrent_seq=np.asarray(rs_cells.seq),
    )
