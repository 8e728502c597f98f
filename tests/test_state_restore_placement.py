"""A restored sequence lands in exactly the cells the device placement would choose (spec §9.3.3,
§9.5).

``state_read`` plans a per-sequence restore on host copies of the cell metadata (so a blob that
does not fit changes nothing) instead of running the device placement. This randomized test
checks that the two agree, and the variant chosen is the strict one: **exact cells**, not only
the observable state.

Random memories come from one seeded walk per KV layout (unified and one stream per sequence):
random batches decoded with :func:`jaxhybrid.decode` of the test model, interleaved with
``seq_rm`` (whole and partial), ``seq_cp``, ``seq_keep`` and ``seq_add`` (+ ``update``). One
sequence of such a memory is saved with ``state_write`` and restored with ``state_read`` into
another one (or a fresh one) under a random destination id. The expected result is built on the
device path, the way llama.cpp restores (§9.3.3, §9.5): ``seq_rm(dest, -1, -1)`` on each part,
then ``kv.find_slot`` + ``kv.apply_ubatch`` on a ubatch of the saved positions (in record order)
for ``dest``, and ``recurrent.find_slot`` + ``recurrent.apply_ubatch`` on a one-token ubatch at
the saved state's position. Then:

- both paths succeed, or both fail (no room);
- the KV cells are identical (positions, sequences, pending shifts, heads), and K/V are the
  destination's buffers with the saved rows written at the device's cells;
- the recurrent cells are identical (positions, sequences, tails), and the states are the
  destination's with the saved state written at the device's cell.

The host planner takes the first free cells in circular order from the head, as ``find_slot``
does. It lacks the restart heuristics (§2.4.3, §5.4.1: ``head > used + 2 * n`` restarts at 0),
but they never fire: no operation leaves a free cell below a head, so ``head <= used``.

Left out on purpose:

- The recurrent ``head`` hint. The host sets it past the restored cell, ``find_slot`` sets it to
  that cell (llama.cpp's ``head = min``). The cell is taken, so the next free-cell search finds
  the same cell from either head; that is what is compared.
- Sliding-window caches. ``find_slot`` may recycle SWA-masked cells of other sequences (and purge
  them); the host planner uses empty cells only, so the two can differ there.
- A sequence that holds one position in two cells (a negative ``seq_add`` or a ``seq_div`` makes
  one, as in llama.cpp). ``state_write`` saves it but ``state_read`` refuses the record ("holds
  position p in two cells") where the device path would place it: a known gap.
"""

from __future__ import annotations

import collections
import functools

import hybrid_model as hm
import jax
import numpy as np
import pytest

import jaxhybrid as jh

# The configuration and decoder of tests/test_hybrid.py (hm.decoder is cached per config, so a
# session running both compiles the decode once per layout)
N_SEQ = 4
KV_SIZE = 48
N_BATCH = 12
N_UBATCH = 4
N_WALK = 72  # random operations per layout
SNAPSHOT_EVERY = 6  # memories kept from the walk (plus a fresh one)
N_CASES = 36  # restores checked per layout


def _config(unified: bool) -> jh.HybridConfig:
    return jh.HybridConfig.from_layers(
        hm.layer_kinds(),
        hm.kv_config(KV_SIZE, N_SEQ, unified, hm.ModelSpec()),
        hm.recurrent_config(N_SEQ),
    )


# --------------------------------------------------------------------------------------------
# Random memories through the public API


@functools.cache
def _ops(cfg: jh.HybridConfig):
    """The operations of the walk, jitted once per config (values are traced)."""

    def add(mem, seq, p0, delta):
        # seq_add from p0 on, then the K-shift (a record stores K as rotated for its positions)
        mem, _ = jh.seq_add(mem, seq, p0, -1, delta, cfg)
        mem, _ = jh.update(mem, cfg, hm.ROPE_FN)
        return mem

    return dict(
        decode=hm.decoder(cfg, N_UBATCH, donate=False),
        rm=jax.jit(functools.partial(jh.seq_rm, cfg=cfg)),
        cp=jax.jit(functools.partial(jh.seq_cp, cfg=cfg)),
        keep=jax.jit(functools.partial(jh.seq_keep, cfg=cfg)),
        add=jax.jit(add),
        ranges=jax.jit(functools.partial(jh.seq_pos_range, cfg=cfg)),
    )


def _random_step(mem, cfg, params, rng: np.random.Generator):
    """One random operation; a refused one (no room, a range the state cannot forget) leaves the
    memory as it was, which is fine for the walk."""
    ops = _ops(cfg)
    s = int(rng.integers(N_SEQ))
    hi = int(np.asarray(ops["ranges"](mem)[1])[s])
    kind = rng.choice(["decode"] * 6 + ["rm", "rm", "cp", "keep", "add"])
    p0 = int(rng.integers(0, hi + 1)) if hi >= 0 else 0
    if kind == "decode":
        n = int(rng.integers(1, N_BATCH + 1))
        busy = rng.choice(N_SEQ, size=int(rng.integers(1, N_SEQ + 1)), replace=False)
        seqs = [int(rng.choice(busy)) for _ in range(n)]
        tokens = [int(t) for t in rng.integers(0, hm.VOCAB, n)]
        batch = jh.make_batch(tokens, seq_ids=seqs, n_batch=N_BATCH, output_all=True)
        _, mem, _ = ops["decode"](params, mem, batch)
    elif kind == "rm" and 0 <= p0 < hi and rng.random() < 0.5:  # a leading or middle range
        mem, _ = ops["rm"](mem, s, p0, int(rng.integers(p0 + 1, hi + 1)))
    elif kind == "rm":
        mem, _ = ops["rm"](mem, s, -1, -1)
    elif kind == "cp":
        mem, _ = ops["cp"](mem, s, int(rng.integers(N_SEQ)), -1, -1)
    elif kind == "keep" and rng.random() < 0.3:
        mem, _ = ops["keep"](mem, s)
    elif kind == "add" and hi >= 0:
        mem = ops["add"](mem, s, p0, int(rng.choice([-2, 1, 2, 3])))
    return mem


@functools.cache
def _memories(unified: bool) -> tuple[jh.HybridConfig, list[jh.HybridMemory]]:
    """A fresh memory and snapshots of one seeded random walk."""
    cfg = _config(unified)
    params = hm.init_params(0)
    rng = np.random.default_rng(20240 + unified)
    mem = jh.init_hybrid(cfg)
    pool = [mem]
    for i in range(1, N_WALK + 1):
        mem = _random_step(mem, cfg, params, rng)
        if i % SNAPSHOT_EVERY == 0:
            pool.append(mem)
    return cfg, pool


# --------------------------------------------------------------------------------------------
# The device path


_UB = dict(n_ubatch=KV_SIZE, n_seq_max=N_SEQ)


@functools.cache
def _kv_place(cfg: jh.KVConfig):
    """``seq_rm(dest)``, then ``kv.find_slot`` + ``kv.apply_ubatch`` of a one-ubatch batch."""

    def place(cache, dest, batch):
        cache, _ = jh.kv.seq_rm(cache, dest, -1, -1, cfg)
        # One sequence: every split gives the same single ubatch; the simple one compiles fastest
        ub = jh.get_ubatch(batch, jh.split_simple(batch, n_ubatch=KV_SIZE), 0, **_UB)
        slot = jh.kv.find_slot(cache, ub, cfg)
        return cache, slot, jh.kv.apply_ubatch(cache, ub, slot, cfg)

    return jax.jit(place)


@functools.cache
def _recurrent_place(cfg: jh.RecurrentConfig):
    def place(mem, dest, batch):
        mem, _ = jh.recurrent.seq_rm(mem, dest, -1, -1, cfg)
        ub = jh.get_ubatch(
            batch, jh.split_simple(batch, n_ubatch=1), 0, n_ubatch=1, n_seq_max=N_SEQ
        )
        slot = jh.recurrent.find_slot(mem, ub, cfg)
        return mem, slot, jh.recurrent.apply_ubatch(mem, ub, slot, cfg)

    return jax.jit(place)


_Expected = collections.namedtuple("_Expected", "ok kv_cells k v recurrent_cells r s")


def _saved_kv_cells(src: jh.HybridMemory, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream, cell) of ``seq``'s KV cells in the order its record lists them (§9.2)."""
    pos, seqs = jax.device_get((src.kv.cells.pos, src.kv.cells.seq))
    return np.nonzero((pos >= 0) & seqs[:, :, seq])


def _device_restore(src, seq: int, dst, dest: int, cfg: jh.HybridConfig) -> _Expected:
    """What a restore of ``src``'s ``seq`` into ``dst``'s ``dest`` gives on the device path."""
    st, c = _saved_kv_cells(src, seq)
    n = len(c)
    positions = np.asarray(src.kv.cells.pos)[st, c]
    batch = jh.make_batch([0] * n, pos=positions, seq_ids=[dest] * n, n_batch=KV_SIZE)
    removed, slot, kv = _kv_place(cfg.kv)(dst.kv, dest, batch)
    if n == 0:  # (an empty batch is no ubatch: only the removal)
        kv = removed
    ok = n == 0 or bool(slot.ok)
    k, v = np.array(kv.k), np.array(kv.v)
    to_st, to_c = (np.asarray(x)[:n] for x in (slot.stream, slot.cell))
    k[:, to_st, to_c] = np.asarray(src.kv.k)[:, st, c]
    v[:, to_st, to_c] = np.asarray(src.kv.v)[:, st, c]

    tail = int(np.asarray(src.recurrent.cells.tail)[seq])
    last = int(np.asarray(src.recurrent.cells.pos)[tail]) if tail >= 0 else 0
    batch = jh.make_batch([0], pos=[last], seq_ids=[dest], n_batch=1)
    recr, slot, placed = _recurrent_place(cfg.recurrent)(dst.recurrent, dest, batch)
    r, s = np.array(recr.r), np.array(recr.s)
    if tail >= 0:
        ok &= bool(slot.ok)
        recr = placed
        cell = int(slot.dst[0])
        r[:, cell] = np.asarray(src.recurrent.r)[:, tail]
        s[:, cell] = np.asarray(src.recurrent.s)[:, tail]
    return _Expected(ok, jax.device_get(kv.cells), k, v, jax.device_get(recr.cells), r, s)


# --------------------------------------------------------------------------------------------
# The property


def _holds_a_position_twice(mem: jh.HybridMemory, seq: int) -> bool:
    st, c = _saved_kv_cells(mem, seq)
    held = np.asarray(mem.kv.cells.pos)[st, c]
    return len(np.unique(held)) < len(held)


def _next_free(cells, head: int) -> int:
    """The cell a free-cell search from ``head`` finds first (circular order, §5.4.4)."""
    used = np.any(np.asarray(cells.seq), axis=1)
    order = (np.arange(len(used)) + head) % len(used)
    free = order[~used[order]]
    return int(free[0]) if len(free) else -1


def _assert_same_restore(got: jh.HybridMemory, want: _Expected, what: str) -> None:
    for name in ("pos", "seq", "shift", "head"):
        np.testing.assert_array_equal(
            np.asarray(getattr(got.kv.cells, name)), getattr(want.kv_cells, name), f"{what} {name}"
        )
    np.testing.assert_array_equal(np.asarray(got.kv.k), want.k, f"{what}: K rows")
    np.testing.assert_array_equal(np.asarray(got.kv.v), want.v, f"{what}: V rows")
    got_r = got.recurrent.cells
    for name in ("pos", "seq", "tail"):
        np.testing.assert_array_equal(
            np.asarray(getattr(got_r, name)), getattr(want.recurrent_cells, name), f"{what} {name}"
        )
    assert _next_free(got_r, int(got_r.head)) == _next_free(
        want.recurrent_cells, int(want.recurrent_cells.head)
    ), f"{what}: the next free recurrent cell differs"
    np.testing.assert_array_equal(np.asarray(got.recurrent.r), want.r, f"{what}: r state")
    np.testing.assert_array_equal(np.asarray(got.recurrent.s), want.s, f"{what}: s state")


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-seq-streams"])
def test_restored_sequence_lands_where_the_device_placement_puts_it(unified):
    # Given random memories built by decoding random batches and running sequence operations
    cfg, pool = _memories(unified)
    rng = np.random.default_rng(7 + unified)
    seen = collections.Counter()
    for case in range(N_CASES):
        src = pool[int(rng.integers(1, len(pool)))]
        dst = pool[int(rng.integers(len(pool)))]
        seq, dest = int(rng.integers(N_SEQ)), int(rng.integers(N_SEQ))
        what = f"case {case}: seq {seq} -> dest {dest}"
        # When one sequence is saved and restored under another id into another memory
        blob = jh.state_write(src, cfg, seq)
        got, status = jh.state_read(dst, cfg, blob, dest)
        if _holds_a_position_twice(src, seq):
            # Not compared: state_read refuses such a record, which the device path would place
            # (a known gap, see the docstring)
            seen["skipped: a position held twice"] += 1
            continue
        # Then it succeeds or fails as the device placement does
        want = _device_restore(src, seq, dst, dest, cfg)
        assert status.ok == want.ok, (what, status.message)
        if not status.ok:
            assert got is dst, what
            seen["no room on both paths"] += 1
            continue
        # ... and the cells, rows and states are exactly those of the device path
        _assert_same_restore(got, want, what)
        seen["restored" if len(_saved_kv_cells(src, seq)[0]) else "restored (empty)"] += 1
    # The walk reached the interesting cases (a change of seeds or sizes must keep them)
    assert seen["restored"] >= N_CASES // 2, seen
