"""Recurrent-state memory (spec §5): randomized operation sequences compared with the pure-Python
reference in ``ref_recurrent.py``, copy-on-write and state-data tests, llama.cpp's return values,
transactional failures, and the contract (jit == no-jit, no retrace, stable structure)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ref_recurrent as ref

from jaxhybrid import _recurrent as rec
from jaxhybrid._batch import get_ubatch, make_batch, split_equal, validate
from jaxhybrid._config import RecurrentConfig

N_VOCAB = 100
MOD = 251.0  # the toy recurrence stays on small integers: exact in float32 and bfloat16


# --------------------------------------------------------------------------------------------
# A toy recurrent layer: r is a convolution window of the last tokens, s an order-sensitive hash.


def _toy_layer(ub, layer: int, r0, s0):
    """Runs every seq set of ``ub`` through the toy recurrence from ``(r0, s0)``."""
    n_ub = ub.valid.shape[0]
    shape_s = s0.shape
    r = r0.astype(jnp.float32)
    s = s0.astype(jnp.float32).reshape(n_ub, -1)
    mult = 2.0 + layer + jnp.arange(s.shape[1], dtype=jnp.float32)
    coef = 1.0 + jnp.arange(s.shape[1], dtype=jnp.float32)
    n_tok = jnp.maximum(ub.n_seq_tokens, 1)

    def step(t, carry):
        r, s = carry
        k = t // n_tok
        tok = ub.token[t].astype(jnp.float32)
        p = ub.pos[t].astype(jnp.float32)
        rk = jnp.concatenate([r[k, 1:], jnp.reshape(tok + layer, (1,))])
        sk = jnp.mod(s[k] * mult + tok * coef + p, MOD)
        v = ub.valid[t]
        return r.at[k].set(jnp.where(v, rk, r[k])), s.at[k].set(jnp.where(v, sk, s[k]))

    r, s = jax.lax.fori_loop(0, n_ub, step, (r, s))
    return r, s.reshape(shape_s)


def _toy_ref(state, layer: int, tokens, positions):
    r, s = state
    for tok, p in zip(tokens, positions, strict=True):
        r = (*r[1:], float(tok + layer))
        s = tuple(float((s[i] * (2 + layer + i) + tok * (i + 1) + p) % MOD) for i in range(len(s)))
    return r, s


# --------------------------------------------------------------------------------------------
# The JAX side of a bucket: every operation jitted once for fixed shapes.


@dataclasses.dataclass(frozen=True)
class Bucket:
    name: str
    n_seq_max: int
    n_layers: int
    n_ubatch: int
    n_batch: int
    sequential: bool
    s_shape: tuple[int, ...] = (3,)
    dtype_s: object = jnp.float32

    @property
    def cfg(self) -> RecurrentConfig:
        return RecurrentConfig(
            n_seq_max=self.n_seq_max,
            n_layers=self.n_layers,
            r_shape=(2,),
            s_shape=self.s_shape,
            dtype_s=self.dtype_s,
        )


BUCKETS = [
    Bucket("seq3-sequential", n_seq_max=3, n_layers=2, n_ubatch=4, n_batch=6, sequential=True),
    Bucket(
        "seq4-coupled-bf16",
        n_seq_max=4,
        n_layers=1,
        n_ubatch=3,
        n_batch=6,
        sequential=False,
        s_shape=(2, 2),
        dtype_s=jnp.bfloat16,
    ),
    Bucket("seq1", n_seq_max=1, n_layers=1, n_ubatch=2, n_batch=4, sequential=True),
]


def _find_and_apply(mem, ub, cfg):
    """find_slot, then apply_ubatch: ``(placed memory, slot)``."""
    slot = rec.find_slot(mem, ub, cfg)
    return rec.apply_ubatch(mem, ub, slot, cfg), slot


@functools.cache
def _decode_fn(cfg: RecurrentConfig, n_ubatch: int, sequential: bool):
    """validate -> equal split -> prepare -> (find_slot, toy layers) per ubatch; transactional."""

    def decode(mem, batch):
        pmin, pmax = rec.seq_pos_range(mem, cfg)
        batch, check = validate(batch, pmin, pmax, n_seq_max=cfg.n_seq_max)
        plan = split_equal(batch, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max, sequential=sequential)
        prep_ok, failed = rec.prepare(mem, batch, plan, cfg, n_ubatch=n_ubatch)
        go = check.ok & plan.complete & prep_ok

        def body(u, carry):
            m, all_ok = carry
            ub = get_ubatch(batch, plan, u, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
            m, slot = _find_and_apply(m, ub, cfg)
            for layer in range(cfg.n_layers):
                r0, s0 = rec.read_states(m, layer, slot, cfg)
                r1, s1 = _toy_layer(ub, layer, r0, s0)
                m = rec.write_states(m, layer, slot, r1, s1, ub.n_seqs, cfg)
            return m, all_ok & slot.ok

        n = jnp.where(go, plan.n_ubatches, 0)
        mem, all_ok = jax.lax.fori_loop(0, n, body, (mem, jnp.bool_(True)))
        return mem, (check.code, plan.complete, prep_ok, failed, all_ok), (batch, plan)

    return decode


class JaxSide:
    def __init__(self, bucket: Bucket):
        cfg = bucket.cfg
        self.cfg = cfg
        self.decode = jax.jit(_decode_fn(cfg, bucket.n_ubatch, bucket.sequential))
        self.seq_rm = jax.jit(functools.partial(rec.seq_rm, cfg=cfg))
        self.seq_cp = jax.jit(functools.partial(rec.seq_cp, cfg=cfg))
        self.seq_keep = jax.jit(functools.partial(rec.seq_keep, cfg=cfg))
        self.seq_add = jax.jit(functools.partial(rec.seq_add, cfg=cfg))
        self.seq_div = jax.jit(functools.partial(rec.seq_div, cfg=cfg))
        self.clear = jax.jit(lambda m, data: rec.clear(m, cfg, data=data))
        self.pos_range = jax.jit(functools.partial(rec.seq_pos_range, cfg=cfg))


_SIDES: dict[str, JaxSide] = {}


def _side(bucket: Bucket) -> JaxSide:
    if bucket.name not in _SIDES:
        _SIDES[bucket.name] = JaxSide(bucket)
    return _SIDES[bucket.name]


# --------------------------------------------------------------------------------------------
# Observables


def _observe_jax(mem: rec.RecurrentMemory, cfg: RecurrentConfig):
    """(pos_min, pos_max, sharing groups, per-sequence state data) of the JAX memory."""
    host = jax.device_get(mem)
    cells = host.cells
    seq = np.asarray(cells.seq)
    # Invariants: a sequence is in exactly its tail cell; a cell is non-empty iff pos >= 0.
    for s in range(cfg.n_seq_max):
        holders = np.flatnonzero(seq[:, s]).tolist()
        t = int(cells.tail[s])
        assert holders == ([t] if t >= 0 else []), (s, t, holders)
    np.testing.assert_array_equal(seq.any(axis=1), np.asarray(cells.pos) >= 0)
    groups = {frozenset(np.flatnonzero(row).tolist()) for row in seq if row.any()}
    data = {}
    for s in range(cfg.n_seq_max):
        t = int(cells.tail[s])
        if t >= 0:
            r = np.asarray(host.r[:, t], np.float32).reshape(cfg.n_layers, -1)
            st = np.asarray(host.s[:, t], np.float32).reshape(cfg.n_layers, -1)
            data[s] = [(tuple(r[lay].tolist()), tuple(st[lay].tolist())) for lay in range(len(r))]
    pmin, pmax = jax.device_get(rec.seq_pos_range(mem, cfg))
    return np.asarray(pmin).tolist(), np.asarray(pmax).tolist(), groups, data


def _observe_ref(model: ref.RefRecurrent):
    model.check_invariants()
    rng = [model.pos_range(s) for s in range(model.n_seq_max)]
    data = {
        s: [tuple(map(tuple, x)) for x in model.seq_data(s)]
        for s in range(model.n_seq_max)
        if model.tail[s] >= 0
    }
    return [a for a, _ in rng], [b for _, b in rng], model.groups(), data


def _assert_same(mem, model, cfg, where: str):
    got = _observe_jax(mem, cfg)
    want = _observe_ref(model)
    for name, g, w in zip(("pos_min", "pos_max", "groups", "data"), got, want, strict=True):
        assert g == w, f"{where}: {name} differs: jax={g} ref={w}"


def _assert_bit_identical(a, b, where: str):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=where)


# --------------------------------------------------------------------------------------------
# Random operations


def _random_seq(rng, n_seq_max: int) -> int:
    if rng.random() < 0.85:
        return int(rng.integers(0, n_seq_max))
    return int(rng.choice([-2, -1, n_seq_max, n_seq_max + 1]))


def _random_range(rng, last: int) -> tuple[int, int]:
    p0 = int(rng.choice([-1, 0, 1, last, last + 1, int(rng.integers(0, last + 3))]))
    p1 = int(rng.choice([-1, last, last + 1, int(rng.integers(0, last + 3)), 2**31 - 1]))
    return p0, p1


def _random_batch(rng, model: ref.RefRecurrent, bucket: Bucket):
    """A mostly valid batch continuing the reference memory, as (make_batch kwargs, n tokens)."""
    n_seq_max = bucket.n_seq_max
    pmax = [model.pos_range(s)[1] for s in range(n_seq_max)]
    pmin = [model.pos_range(s)[0] for s in range(n_seq_max)]
    streams = []  # (seq ids, n tokens)
    free = list(range(n_seq_max))
    rng.shuffle(free)
    if not bucket.sequential and n_seq_max >= 2 and rng.random() < 0.4:
        # A shared prompt: two sequences with equal memory ranges fed by multi-sequence tokens.
        pairs = [
            (a, b)
            for a in range(n_seq_max)
            for b in range(n_seq_max)
            if a != b and pmax[a] == pmax[b] and pmin[a] == pmin[b]
        ]
        if pairs:
            a, b = pairs[int(rng.integers(0, len(pairs)))]
            streams.append(([a, b], int(rng.integers(1, 3))))
            free = [q for q in free if q not in (a, b)]
    for q in free[: int(rng.integers(0 if streams else 1, min(3, len(free)) + 1))]:
        streams.append(([q], int(rng.integers(1, 4))))
    toks = []  # (ids, position) in an interleaved order keeping each stream's order
    nxt = [pmax[ids[0]] + 1 if pmax[ids[0]] >= 0 else int(rng.integers(0, 3)) for ids, _ in streams]
    left = [n for _, n in streams]
    while any(left):
        i = int(rng.choice([j for j, n in enumerate(left) if n]))
        toks.append((streams[i][0], nxt[i]))
        nxt[i] += 1
        left[i] -= 1
    toks = toks[: bucket.n_batch]
    pos = [p for _, p in toks]
    if rng.random() < 0.1:  # break a position: validation rejects, nothing changes
        pos[int(rng.integers(0, len(pos)))] += int(rng.choice([-1, 1, 2]))
    auto = rng.random() < 0.2
    return dict(
        tokens=[int(t) for t in rng.integers(0, N_VOCAB, size=len(toks))],
        pos=None if auto else pos,
        seq_ids=[ids for ids, _ in toks],
        n_batch=bucket.n_batch,
        n_seq_id_max=2,
    )


def _ref_ubatches(batch, plan):
    """The plan's ubatches as lists of reference seq sets (from the JAX split: the split itself
    is the batch layer's, tested in test_batch.py)."""
    b = jax.device_get(batch)
    p = jax.device_get(plan)
    out = []
    for u in range(int(p.n_ubatches)):
        idx = p.order[p.start[u] : p.start[u] + p.n_tokens[u]].tolist()
        n_tok = int(p.n_seq_tokens[u])
        sets = []
        for k in range(int(p.n_seqs[u])):
            chunk = idx[k * n_tok : (k + 1) * n_tok]
            first = chunk[0]
            ids = b.seq_id[first, : b.n_seq_id[first]].tolist()
            sets.append(
                ref.SeqSet(
                    ids=ids,
                    tokens=[int(b.token[i]) for i in chunk],
                    pos=[int(b.pos[i]) for i in chunk],
                )
            )
        out.append(sets)
    return out


def _run_decode(side: JaxSide, mem, model: ref.RefRecurrent, kwargs, where: str):
    batch = make_batch(**kwargs)
    new, (code, complete, prep_ok, failed, all_ok), (vbatch, plan) = side.decode(mem, batch)
    if int(code) != 0 or not bool(complete):
        _assert_bit_identical(new, mem, where)
        return new, "rejected"
    ubatches = _ref_ubatches(vbatch, plan)
    want_ok, want_failed = model.prepare(ubatches)
    assert (bool(prep_ok), int(failed)) == (want_ok, want_failed), where
    if not want_ok:
        _assert_bit_identical(new, mem, where)
        return new, "failed"
    assert bool(all_ok), where
    for sets in ubatches:
        ok, cells = model.find_slot(sets)
        assert ok, where
        for st, c in zip(sets, cells, strict=True):
            model.cells[c].data = [
                _toy_ref(model.cells[c].data[lay], lay, st.tokens, st.pos)
                for lay in range(model.n_layers)
            ]
    return new, "ok"


def _random_run(bucket: Bucket, seed: int, n_ops: int, stats: dict) -> None:
    rng = np.random.default_rng(seed)
    side = _side(bucket)
    cfg = side.cfg
    mem = rec.init_recurrent(cfg)
    r_size = int(np.prod(cfg.r_shape))
    model = ref.RefRecurrent(cfg.n_seq_max, cfg.n_layers, r_size, int(np.prod(cfg.s_shape)))
    i32 = np.int32
    for step in range(n_ops):
        where = f"{bucket.name} seed={seed} step={step}"
        x = rng.random()
        if x < 0.45:
            mem, what = _run_decode(side, mem, model, _random_batch(rng, model, bucket), where)
            op, ok = f"decode:{what}", None
        else:
            seq = _random_seq(rng, cfg.n_seq_max)
            shared = [q for g in model.groups() if len(g) > 1 for q in sorted(g)]
            if shared and rng.random() < 0.5:  # aim at copy-on-write and split-off paths
                seq = int(rng.choice(shared))
            last = max(model.pos_range(seq)[1], 0) if 0 <= seq < cfg.n_seq_max else 3
            p0, p1 = _random_range(rng, last)
            if x < 0.62:
                op = "seq_rm"
                new, ok = side.seq_rm(mem, i32(seq), i32(p0), i32(p1))
                # -1 is the only "every sequence" id; the reference (llama.cpp) takes any
                # negative id for it, jaxhybrid refuses the others (difference 13).
                want = seq >= -1 and model.seq_rm(seq, p0, p1)
            elif x < 0.75:
                op = "seq_cp"
                dst = _random_seq(rng, cfg.n_seq_max)
                new, ok = side.seq_cp(mem, i32(seq), i32(dst), i32(p0), i32(p1))
                want = model.seq_cp(seq, dst)
            elif x < 0.86:
                op = "seq_add"
                delta = int(rng.integers(-last - 2, 4))
                new, ok = side.seq_add(mem, i32(seq), i32(p0), i32(p1), i32(delta))
                want = model.seq_add(seq, p0, p1, delta)
            elif x < 0.93:
                op = "seq_div"
                d = int(rng.choice([-1, 0, 1, 2, 3]))
                new, ok = side.seq_div(mem, i32(seq), i32(p0), i32(p1), i32(d))
                want = model.seq_div(seq, p0, p1, d)
            elif x < 0.97:
                op = "seq_keep"
                new, ok = side.seq_keep(mem, i32(seq))
                want = model.seq_keep(seq)
            else:
                op = "clear"
                data = bool(rng.random() < 0.5)
                new, ok, want = side.clear(mem, jnp.asarray(data)), True, True
                model.clear(data)
            assert bool(ok) == want, f"{where}: {op} returned {bool(ok)}, reference {want}"
            if not want:
                _assert_bit_identical(new, mem, where)
            mem = new
        stats[op] = stats.get(op, 0) + 1
        _assert_same(mem, model, cfg, f"{where} after {op}")


N_RUNS = 160
N_OPS = 24
CHUNKS = 2


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("bucket", BUCKETS, ids=lambda b: b.name)
def test_random_operation_sequences_match_reference(bucket, chunk):
    # Given random sequences of placements, seq ops (valid and invalid arguments) and clears
    # When each runs on the JAX memory and on the pure-Python reference
    # Then positions, sharing, state data, return values and failures agree after every step
    stats: dict[str, int] = {}
    per_chunk = N_RUNS // CHUNKS
    for i in range(per_chunk):
        _random_run(bucket, seed=1000 * chunk + i, n_ops=N_OPS, stats=stats)
    # The generator reaches every kind of operation and outcome.
    assert stats.get("decode:ok", 0) > per_chunk
    assert stats.get("decode:rejected", 0) > 0
    for op in ("seq_rm", "seq_cp", "seq_add", "seq_div", "seq_keep"):
        assert stats.get(op, 0) > 0, stats


# --------------------------------------------------------------------------------------------
# Hand-written scenarios

CFG2 = RecurrentConfig(n_seq_max=2, n_layers=2, r_shape=(2,), s_shape=(3,))
CFG3 = RecurrentConfig(n_seq_max=3, n_layers=2, r_shape=(2,), s_shape=(3,))
N_UB = 4
N_BATCH = 8


def _decode(mem, cfg, tokens, pos, seq_ids, *, sequential=True, n_ubatch=N_UB):
    """One transactional decode with the toy layers (one compile per config)."""
    batch = make_batch(tokens, pos=pos, seq_ids=seq_ids, n_batch=N_BATCH, n_seq_id_max=2)
    fn = _jit_decode(cfg, n_ubatch, sequential)
    new, (code, complete, prep_ok, _, all_ok), _ = fn(mem, batch)
    assert int(code) == 0 and bool(complete) and bool(prep_ok) and bool(all_ok)
    return new


@functools.cache
def _jit_decode(cfg, n_ubatch, sequential):
    return jax.jit(_decode_fn(cfg, n_ubatch, sequential))


def _state(mem, seq):
    t = int(mem.cells.tail[seq])
    assert t >= 0
    return np.asarray(mem.r[:, t]), np.asarray(mem.s[:, t])


@functools.cache
def _jit_place(cfg, n_ubatch):
    def place(mem, batch):
        plan = split_equal(batch, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max, sequential=False)
        ub = get_ubatch(batch, plan, 0, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)
        return _find_and_apply(mem, ub, cfg), ub

    return jax.jit(place)


def _place(mem, cfg, tokens, pos, seq_ids, n_ubatch=N_UB):
    """find_slot for the first ubatch of a non-sequential equal split (no validation)."""
    batch = make_batch(tokens, pos=pos, seq_ids=seq_ids, n_batch=N_BATCH, n_seq_id_max=2)
    return _jit_place(cfg, n_ubatch)(mem, batch)


def test_new_sequences_read_zeros_even_over_stale_data():
    # Given a memory whose buffers hold a finished sequence's data but whose cells were cleared
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [5, 6], [0, 1], [0, 0])
    zeroed = rec.clear(mem, CFG2, data=True)
    assert not np.any(np.asarray(zeroed.r)) and not np.any(np.asarray(zeroed.s))
    mem = rec.clear(mem, CFG2, data=False)
    assert np.any(np.asarray(mem.r) != 0)
    chex.assert_trees_all_equal(mem.cells, zeroed.cells)
    # When a new sequence is placed
    (mem, slot), _ = _place(mem, CFG2, [7], [0], [1])
    # Then it reads zero states and writes to a cell
    r0, s0 = rec.read_states(mem, 1, slot, CFG2)
    assert bool(slot.ok) and int(slot.src[0]) == -1 and int(slot.dst[0]) >= 0
    np.testing.assert_array_equal(np.asarray(r0), 0)
    np.testing.assert_array_equal(np.asarray(s0), 0)


def test_copy_on_write_leaves_the_source_bit_identical():
    # Given sequence 0 with a state, copied to sequence 1 (shared, no data copied)
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [5, 6, 7], [0, 1, 2], [0, 0, 0])
    r_a, s_a = _state(mem, 0)
    mem, ok = rec.seq_cp(mem, 0, 1, -1, -1, CFG2)
    assert bool(ok) and int(mem.cells.tail[0]) == int(mem.cells.tail[1])
    shared = int(mem.cells.tail[0])
    # When sequence 1 is advanced by one token
    (placed, slot), ub = _place(mem, CFG2, [9], [3], [1])
    # Then it moves to a fresh cell and reads the shared state
    assert int(slot.src[0]) == shared and int(slot.dst[0]) != shared
    new = placed
    for layer in range(CFG2.n_layers):
        r0, s0 = rec.read_states(placed, layer, slot, CFG2)
        np.testing.assert_array_equal(np.asarray(r0[0]), r_a[layer])
        np.testing.assert_array_equal(np.asarray(s0[0]), s_a[layer])
        r1, s1 = _toy_layer(ub, layer, r0, s0)
        new = rec.write_states(new, layer, slot, r1, s1, ub.n_seqs, CFG2)
    # And sequence 0's state is bit-identical, sequence 1's is the advanced shared state
    r_a2, s_a2 = _state(new, 0)
    np.testing.assert_array_equal(r_a2, r_a)
    np.testing.assert_array_equal(s_a2, s_a)
    r_b, s_b = _state(new, 1)
    for layer in range(CFG2.n_layers):
        want = _toy_ref((tuple(r_a[layer].tolist()), tuple(s_a[layer].tolist())), layer, [9], [3])
        assert (tuple(r_b[layer].tolist()), tuple(s_b[layer].tolist())) == want
    assert int(rec.seq_pos_max(new, 0, CFG2)) == 2 and int(rec.seq_pos_max(new, 1, CFG2)) == 3


def test_last_sharer_keeps_the_cell_when_both_advance_in_one_ubatch():
    # Given 0 and 1 sharing a state
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [5], [0], [0])
    mem, _ = rec.seq_cp(mem, 0, 1, -1, -1, CFG2)
    shared = int(mem.cells.tail[0])
    # When both advance in one ubatch
    (mem, slot), _ = _place(mem, CFG2, [1, 2], [1, 1], [0, 1])
    # Then the first set copies on write, the second keeps the cell; both read the shared state
    assert np.asarray(slot.src[:2]).tolist() == [shared, shared]
    assert int(slot.dst[0]) != shared and int(slot.dst[1]) == shared


def test_state_data_follows_each_sequence_through_placements():
    # Given three sequences decoded interleaved over several batches (one or more ubatches each)
    cfg = CFG3
    rng = np.random.default_rng(7)
    mem = rec.init_recurrent(cfg)
    history = {0: [], 1: [], 2: []}
    for _ in range(6):
        seqs = [int(q) for q in rng.choice(3, size=int(rng.integers(1, 4)), replace=False)]
        toks, pos, ids = [], [], []
        for q in seqs:
            for _ in range(int(rng.integers(1, 3))):
                t = int(rng.integers(0, N_VOCAB))
                p = len(history[q])
                history[q].append((t, p))
                toks.append(t)
                pos.append(p)
                ids.append(q)
        mem = _decode(mem, cfg, toks, pos, ids)
    # When each sequence's state is computed directly from its own tokens
    # Then the memory holds exactly that state for every sequence and layer
    for q, hist in history.items():
        if not hist:
            continue
        r, s = _state(mem, q)
        for layer in range(cfg.n_layers):
            want = _toy_ref(
                ((0.0, 0.0), (0.0,) * 3), layer, [t for t, _ in hist], [p for _, p in hist]
            )
            got = (tuple(r[layer].tolist()), tuple(s[layer].reshape(-1).tolist()))
            assert got == want, (q, layer)
        assert int(rec.seq_pos_max(mem, q, cfg)) == len(hist) - 1


def test_secondary_ids_merge_into_the_primary_cell():
    # Given sequence 1 with a state of its own and an empty sequence 0
    cfg = CFG3
    mem = _decode(rec.init_recurrent(cfg), cfg, [4, 5], [0, 1], [1, 1])
    # When a token of sequences [0, 1] is placed (§5.4.3, §5.4.7)
    (mem, slot), _ = _place(mem, cfg, [7], [2], [[0, 1]])
    # Then 1 leaves its old cell, both share 0's new cell (zero state, position 2)
    assert bool(slot.ok) and int(slot.src[0]) == -1
    assert int(mem.cells.tail[0]) == int(mem.cells.tail[1]) == int(slot.dst[0])
    assert np.asarray(mem.cells.seq).sum() == 2
    assert rec.seq_pos_range(mem, cfg)[1].tolist() == [2, 2, -1]


@pytest.mark.parametrize(
    "seq, p0, p1, ok, pos_max_after",
    [
        (0, 1, -1, False, 5),  # partial removal holding the last position: cannot rewind
        (0, 3, 6, False, 5),
        (0, 0, -1, True, -1),  # whole state
        (0, -1, 6, True, -1),
        (0, 6, -1, True, 5),  # after the end: no-op
        (0, 0, 5, True, 5),  # old range not holding the last position: true, no change
        (0, 2, 2, True, 5),
        (1, 3, 4, True, 5),  # a sequence without state
        (2, 0, -1, False, 5),  # seq >= size
        (-1, 0, 5, False, 5),  # seq < 0: all or nothing
        (-1, 3, 3, True, 5),
        (-1, -1, -1, True, -1),
        (-2, 0, 2**31 - 1, False, 5),  # only -1 means every sequence (difference 13)
    ],
)
def test_seq_rm_return_values(seq, p0, p1, ok, pos_max_after):
    # Given sequence 0 at position 5
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [1] * 6, list(range(6)), [0] * 6)
    # When removing a range
    new, got = rec.seq_rm(mem, seq, p0, p1, CFG2)
    # Then llama.cpp's return value (§5.7.1); a refusal leaves the memory bit-identical
    assert bool(got) == ok
    assert int(rec.seq_pos_max(new, 0, CFG2)) == pos_max_after
    if not ok:
        _assert_bit_identical(new, mem, "refused seq_rm")


def test_seq_add_splits_a_shared_state_and_clears_below_zero():
    # Given 0 and 1 sharing a state at position 2
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [3, 4, 5], [0, 1, 2], [0, 0, 0])
    mem, _ = rec.seq_cp(mem, 0, 1, -1, -1, CFG2)
    r_a, s_a = _state(mem, 0)
    # When 1 is shifted by +10 (difference 10)
    new, ok = rec.seq_add(mem, 1, 0, -1, 10, CFG2)
    # Then only 1 moves, into its own cell with a copy of the data
    assert bool(ok)
    assert rec.seq_pos_range(new, CFG2)[1].tolist() == [2, 12]
    assert int(new.cells.tail[0]) != int(new.cells.tail[1])
    for got, want in zip(_state(new, 1), (r_a, s_a), strict=True):
        np.testing.assert_array_equal(got, want)
    # When 0 is shifted below 0 (difference 11), its state is cleared
    new, ok = rec.seq_add(new, 0, 0, -1, -3, CFG2)
    assert bool(ok) and rec.seq_pos_range(new, CFG2)[1].tolist() == [-1, 12]
    # When seq_div divides 1's position
    new, ok = rec.seq_div(new, 1, 0, -1, 4, CFG2)
    assert bool(ok) and int(rec.seq_pos_max(new, 1, CFG2)) == 3


def test_split_off_without_a_free_cell_fails_cleanly():
    # Given an artificial memory with no free cell and seq 0 in a shared cell (unreachable through
    # the public operations, which always leave a free cell when a state is shared)
    mem = rec.init_recurrent(CFG2)
    cells = rec.RecurrentCells(
        pos=jnp.array([4, 7], jnp.int32),
        seq=jnp.array([[True, True], [False, True]]),
        tail=jnp.array([0, 0], jnp.int32),
        head=jnp.int32(0),
    )
    mem = mem._replace(cells=cells, r=mem.r + 1.0)
    # When seq 0 is shifted
    new, ok = rec.seq_add(mem, 0, 0, -1, 1, CFG2)
    # Then it fails and nothing changes
    assert not bool(ok)
    _assert_bit_identical(new, mem, "failed split-off")


def test_out_of_range_ids_fail_without_change():
    # Given a memory holding sequence 0
    # When an operation names a sequence outside [0, n_seq_max) or divides by d < 1
    # Then it returns False and the memory is bit-identical (difference 13)
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [1, 2], [0, 1], [0, 0])
    for name, args in [
        ("seq_cp", (0, 2, 0, -1)),
        ("seq_cp", (-1, 1, 0, -1)),
        ("seq_keep", (2,)),
        ("seq_add", (5, 0, -1, 1)),
        ("seq_div", (-1, 0, -1, 2)),
        ("seq_div", (0, 0, -1, 0)),
    ]:
        new, ok = getattr(rec, name)(mem, *args, CFG2)
        assert not bool(ok), name
        _assert_bit_identical(new, mem, name)
    assert int(rec.seq_pos_max(mem, 7, CFG2)) == -1


def test_find_slot_and_prepare_fail_cleanly_on_a_seq_id_out_of_range():
    # Given a batch (not validated) whose second ubatch names sequence 5 of a 2-sequence memory
    mem = _decode(rec.init_recurrent(CFG2), CFG2, [1], [0], [0])
    batch = make_batch([1, 2, 3], pos=[1, 2, 0], seq_ids=[0, 0, 5])

    @jax.jit
    def run(mem, batch):
        plan = split_equal(batch, n_ubatch=N_UB, n_seq_max=8, sequential=True)
        ok, failed = rec.prepare(mem, batch, plan, CFG2, n_ubatch=N_UB)
        ub = get_ubatch(batch, plan, 1, n_ubatch=N_UB, n_seq_max=CFG2.n_seq_max)
        return plan.n_ubatches, ok, failed, _find_and_apply(mem, ub, CFG2)

    # When preparing, and placing that ubatch
    n_ubatches, ok, failed, (new, slot) = run(mem, batch)
    assert int(n_ubatches) == 2
    # Then both fail, naming ubatch 1, and the memory is unchanged
    assert (bool(ok), int(failed)) == (False, 1)
    assert not bool(slot.ok) and np.all(np.asarray(slot.dst) == -1)
    _assert_bit_identical(new, mem, "failed find_slot")


def test_overlapping_seq_sets_are_refused():
    # Given a (malformed) ubatch whose two seq sets share sequence 1
    mem = rec.init_recurrent(CFG2)
    batch = make_batch([1, 2], pos=[0, 0], seq_ids=[[0, 1], [1]])
    plan = split_equal(batch, n_ubatch=N_UB, n_seq_max=2, sequential=False)
    ub = get_ubatch(batch, plan, 0, n_ubatch=N_UB, n_seq_max=2)
    ub = ub._replace(n_seqs=jnp.int32(2), n_seq_tokens=jnp.int32(1), n_tokens=jnp.int32(2))
    ub = ub._replace(
        seq_id=ub.seq_id.at[1].set(jnp.array([1, -1])),
        seq=ub.seq.at[1].set(jnp.array([False, True])),
        valid=jnp.arange(N_UB) < 2,
    )
    # When placing it, Then it fails without change
    new, slot = jax.jit(functools.partial(_find_and_apply, cfg=CFG2))(mem, ub)
    assert not bool(slot.ok)
    _assert_bit_identical(new, mem, "overlap")


def test_write_states_drops_unused_entries_and_casts():
    # Given a ubatch of two seq sets placed in a memory with a float16 r buffer
    # When only the first set's states are written to layer 1 (traced layer index)
    # Then only its cell of layer 1 changes, values are cast, and bad layers/shapes raise
    cfg = RecurrentConfig(n_seq_max=2, n_layers=2, r_shape=(2,), s_shape=(3,), dtype_r=jnp.float16)
    (mem, slot), _ = _place(rec.init_recurrent(cfg), cfg, [1, 2], [0, 0], [0, 1])
    r = jnp.ones((N_UB, 2), jnp.float32)
    s = jnp.full((N_UB, 3), 2.0, jnp.float32)
    # Only the first set is written although the slot has two.
    new = rec.write_states(mem, jnp.int32(1), slot, r, s, 1, cfg)
    assert new.r.dtype == jnp.float16
    written = np.asarray(new.s[1]).sum(axis=-1)
    assert written.tolist() == [6.0 if c == int(slot.dst[0]) else 0.0 for c in range(2)]
    np.testing.assert_array_equal(np.asarray(new.r[0]), 0)
    with pytest.raises(ValueError, match="layer"):
        rec.write_states(mem, 2, slot, r, s, 1, cfg)
    with pytest.raises(ValueError, match="shape"):
        rec.write_states(mem, 0, slot, r[:2], s, 1, cfg)


def test_config_mismatch_is_a_value_error():
    # Given a memory built for another config, Then an operation raises at trace time
    mem = rec.init_recurrent(CFG2)
    with pytest.raises(ValueError, match=r"field r must be"):
        rec.seq_rm(mem, 0, 0, -1, dataclasses.replace(CFG2, r_shape=(3,)))


# --------------------------------------------------------------------------------------------
# Contract: jit == no-jit, no retrace, stable structure


def _contract_ops(cfg):
    b = make_batch([1, 2, 3, 4], pos=[0, 1, 0, 1], seq_ids=[0, 0, 1, 1])
    plan = split_equal(b, n_ubatch=N_UB, n_seq_max=cfg.n_seq_max, sequential=True)
    ub = get_ubatch(b, plan, 0, n_ubatch=N_UB, n_seq_max=cfg.n_seq_max)
    i = jnp.int32
    return {
        "find_slot": (lambda m, ub: _find_and_apply(m, ub, cfg), (ub,)),
        "seq_rm": (lambda m, *a: rec.seq_rm(m, *a, cfg), (i(0), i(0), i(-1))),
        "seq_cp": (lambda m, *a: rec.seq_cp(m, *a, cfg), (i(0), i(1), i(0), i(-1))),
        "seq_keep": (lambda m, *a: rec.seq_keep(m, *a, cfg), (i(1),)),
        "seq_add": (lambda m, *a: rec.seq_add(m, *a, cfg), (i(0), i(0), i(-1), i(2))),
        "seq_div": (lambda m, *a: rec.seq_div(m, *a, cfg), (i(0), i(0), i(-1), i(2))),
        "clear": (lambda m, d: (rec.clear(m, cfg, data=d), jnp.bool_(True)), (jnp.bool_(False),)),
    }


def _busy_memory(cfg):
    mem = _decode(rec.init_recurrent(cfg), cfg, [1, 2, 3], [0, 1, 0], [0, 0, 1])
    mem, _ = rec.seq_cp(mem, 0, 2, 0, -1, cfg)
    return mem


@pytest.mark.parametrize("name", list(_contract_ops(CFG3)))
def test_jit_equals_no_jit_and_structure_is_stable(name):
    # Given a memory with shared and private states
    mem = _busy_memory(CFG3)
    fn, args = _contract_ops(CFG3)[name]
    # When the op runs eagerly and jitted
    with jax.disable_jit():
        eager = fn(mem, *args)
    jitted = jax.jit(fn)(mem, *args)
    # Then results agree exactly and the memory keeps its structure, shapes and dtypes
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
    chex.assert_trees_all_equal_shapes_and_dtypes(jitted[0], mem)


def test_state_io_and_prepare_jit_equals_no_jit():
    mem = _busy_memory(CFG3)
    b = make_batch([5, 6, 7], pos=[2, 1, 0], seq_ids=[0, 1, 2])
    plan = split_equal(b, n_ubatch=N_UB, n_seq_max=3, sequential=True)
    ub = get_ubatch(b, plan, 0, n_ubatch=N_UB, n_seq_max=3)

    def run(mem, layer):
        ok, failed = rec.prepare(mem, b, plan, CFG3, n_ubatch=N_UB)
        mem, slot = _find_and_apply(mem, ub, CFG3)
        r0, s0 = rec.read_states(mem, layer, slot, CFG3)
        mem = rec.write_states(mem, layer, slot, r0 + 1.0, s0 - 1.0, ub.n_seqs, CFG3)
        return mem, ok, failed, r0, s0

    with jax.disable_jit():
        eager = run(mem, jnp.int32(1))
    jitted = jax.jit(run)(mem, jnp.int32(1))
    static = jax.jit(run, static_argnums=1)(mem, 1)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
    jax.tree.map(np.testing.assert_array_equal, eager, static)
    chex.assert_trees_all_equal_shapes_and_dtypes(jitted[0], mem)


def test_no_retrace_for_new_values():
    # Given jitted seq ops and a traced-layer state write
    traces = []

    @jax.jit
    def ops(mem, seq, p0, p1, delta):
        traces.append(1)
        mem, _ = rec.seq_add(mem, seq, p0, p1, delta, CFG3)
        mem, _ = rec.seq_cp(mem, seq, p0, p0, p1, CFG3)
        mem, _ = rec.seq_rm(mem, seq, p0, p1, CFG3)
        return rec.seq_keep(mem, seq, CFG3)

    mem = _busy_memory(CFG3)
    i = np.int32
    # When called with several different values of the same shapes
    for args in [(0, 0, -1, 1), (1, 2, 5, -1), (2, 1, 0, 3), (-1, 4, 4, 0)]:
        mem, _ = ops(mem, *(i(a) for a in args))
    # Then it was traced once
    assert len(traces) == 1


def test_donated_memory_round_trips():
    # Given a decode step that donates the memory
    step = jax.jit(_decode_fn(CFG3, N_UB, True), donate_argnums=0)
    mem = rec.init_recurrent(CFG3)
    for p in range(3):
        b = make_batch([p + 1, p + 2], pos=[p, p], seq_ids=[0, 1])
        mem, (code, *_), _ = step(mem, b)
        assert int(code) == 0
    # Then the memory keeps its structure and the positions advanced
    chex.assert_trees_all_equal_shapes_and_dtypes(mem, rec.init_recurrent(CFG3))
    assert rec.seq_pos_range(mem, CFG3)[1].tolist() == [2, 2, -1]
