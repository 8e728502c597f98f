"""Tests of the attention KV cache (spec §1-§4): reference-model agreement on random operation
sequences, attention through the cache, K-shift, failures and the jit contract."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ref_kv import RefKV, Token

from jaxhybrid import _kv_cache as kvc
from jaxhybrid._batch import get_ubatch, make_batch, split_equal, split_simple, validate
from jaxhybrid._config import KVConfig, SWAType
from jaxhybrid._rope import rope, rope_shift_fn

# --------------------------------------------------------------------------------------------
# Shared helpers


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A static shape bucket: everything jitted compiles once per bucket."""

    name: str
    cfg: KVConfig
    n_ubatch: int = 4
    n_batch: int = 8
    split: str = "simple"  # simple | equal | equal_seq


def _ref_for(cfg: KVConfig) -> RefKV:
    return RefKV(cfg.kv_size, cfg.n_seq_max, cfg.unified, int(cfg.swa_type), cfg.n_swa, cfg.causal)


def _plan(batch, cfg: KVConfig, n_ubatch: int, split: str):
    if split == "simple":
        return split_simple(batch, n_ubatch=n_ubatch)
    return split_equal(
        batch, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max, sequential=split == "equal_seq"
    )


@functools.cache
def _fns(b: Bucket):
    """Jitted operations of one bucket (compiled once, reused by every random sequence)."""
    cfg = b.cfg
    n_seq = cfg.n_seq_max

    @jax.jit
    def plan_fn(cache, batch):
        pmin, pmax = kvc.seq_pos_range(cache, cfg)
        batch, check = validate(batch, pmin, pmax, n_seq_max=n_seq)
        plan = _plan(batch, cfg, b.n_ubatch, b.split)
        ok, failed = kvc.prepare(cache, batch, plan, cfg, n_ubatch=b.n_ubatch)
        ok2, failed2, slots = kvc.prepare_slots(cache, batch, plan, cfg, n_ubatch=b.n_ubatch)
        return batch, check.code, plan, ok, failed, (ok2 == ok) & (failed2 == failed), slots

    @jax.jit
    def ubatch_fn(batch, plan, u):
        return get_ubatch(batch, plan, u, n_ubatch=b.n_ubatch, n_seq_max=n_seq)

    @jax.jit
    def place_fn(cache, ub, uid0):
        slot = kvc.find_slot(cache, ub, cfg)
        new = kvc.apply_ubatch(cache, ub, slot, cfg)
        uid = (uid0 + jnp.arange(b.n_ubatch)).astype(jnp.float32)
        k = jnp.broadcast_to(uid[:, None, None], (b.n_ubatch, cfg.n_kv_heads, cfg.head_dim_k))
        v = jnp.broadcast_to(uid[:, None, None], (b.n_ubatch, cfg.n_kv_heads, cfg.head_dim_v))
        new = kvc.write_kv(new, 0, k, v, slot, cfg)
        return new, slot, kvc.kq_mask(new, ub, slot, cfg)

    return dict(
        plan=plan_fn,
        ubatch=ubatch_fn,
        place=place_fn,
        range=jax.jit(lambda c: kvc.seq_pos_range(c, cfg)),
        pos_min=jax.jit(lambda c, s: kvc.seq_pos_min(c, s, cfg)),
        pos_max=jax.jit(lambda c, s: kvc.seq_pos_max(c, s, cfg)),
        rm=jax.jit(lambda c, s, p0, p1: kvc.seq_rm(c, s, p0, p1, cfg)),
        cp=jax.jit(lambda c, s, d, p0, p1: kvc.seq_cp(c, s, d, p0, p1, cfg)),
        keep=jax.jit(lambda c, s: kvc.seq_keep(c, s, cfg)),
        add=jax.jit(lambda c, s, p0, p1, d: kvc.seq_add(c, s, p0, p1, d, cfg)),
        div=jax.jit(lambda c, s, p0, p1, d: kvc.seq_div(c, s, p0, p1, d, cfg)),
        clear=jax.jit(lambda c: kvc.clear(c, cfg, data=True)),
        update=jax.jit(lambda c: kvc.update(c, cfg, None)[0]),
        has_shift=jax.jit(lambda c: kvc.has_shift(c, cfg)),
    )


def _tokens(ub) -> list[Token]:
    """The real tokens of a ubatch, as the reference model sees them."""
    n = int(ub.n_tokens)
    pos, seq_id = np.asarray(ub.pos), np.asarray(ub.seq_id)
    return [Token(int(pos[t]), [int(s) for s in seq_id[t] if s >= 0]) for t in range(n)]


def _assert_same(cache, ref: RefKV, fns, what: str):
    """Every observable of the JAX cache equals the reference model's."""
    cfg_seq = ref.n_seq_max
    pos = np.asarray(cache.cells.pos)
    seq = np.asarray(cache.cells.seq)
    np.testing.assert_array_equal(pos, np.array(ref.pos), err_msg=f"pos after {what}")
    ref_seq = np.array(
        [[[s in cell for s in range(cfg_seq)] for cell in row] for row in ref.seqs], bool
    )
    np.testing.assert_array_equal(seq, ref_seq, err_msg=f"seq sets after {what}")
    np.testing.assert_array_equal(np.asarray(cache.cells.shift), np.array(ref.shift), what)
    np.testing.assert_array_equal(np.asarray(cache.cells.head), np.array(ref.head), what)
    data = np.asarray(cache.k[0, :, :, 0, 0])
    full = pos >= 0
    np.testing.assert_array_equal(data[full], np.array(ref.data)[full], f"K rows after {what}")
    pmin, pmax = fns["range"](cache)
    np.testing.assert_array_equal(np.asarray(pmin), [ref.seq_pos_min(s) for s in range(cfg_seq)])
    np.testing.assert_array_equal(np.asarray(pmax), [ref.seq_pos_max(s) for s in range(cfg_seq)])


def _random_batch(rng, ref: RefKV, b: Bucket):
    """A valid batch: a few sequences (coupled pairs sometimes) continuing what memory holds."""
    cfg = b.cfg
    free = list(rng.permutation(cfg.n_seq_max))
    n_groups = int(rng.integers(1, min(cfg.n_seq_max, 3) + 1))
    budget = b.n_batch
    groups = []
    coupled_ok = cfg.unified and b.split != "equal_seq"
    while free and len(groups) < n_groups and budget > 0:
        s0 = int(free.pop())
        seqs = [s0]
        if coupled_ok and free and rng.random() < 0.3:
            s1 = int(free[-1])
            same_min = ref.seq_pos_min(s0) == ref.seq_pos_min(s1)
            if same_min and ref.seq_pos_max(s0) == ref.seq_pos_max(s1):
                seqs.append(int(free.pop()))
        cnt = int(rng.integers(1, min(budget, 5) + 1))
        budget -= cnt
        groups.append([seqs, ref.seq_pos_max(s0) + 1, cnt])
    labels = [g for g, (_, _, cnt) in enumerate(groups) for _ in range(cnt)]
    rng.shuffle(labels)
    pos, seq_ids = [], []
    for g in labels:
        seqs, start, _ = groups[g]
        pos.append(start)
        groups[g][1] = start + 1
        seq_ids.append(seqs)
    return make_batch(
        [0] * len(labels), pos=pos, seq_ids=seq_ids, n_batch=b.n_batch, n_seq_id_max=2
    )


class _Runner:
    """Runs one random operation on both models and compares."""

    def __init__(self, b: Bucket, rng):
        self.b, self.rng, self.fns = b, rng, _fns(b)
        self.cache = kvc.init_kv_cache(b.cfg)
        self.ref = _ref_for(b.cfg)
        self.uid = 1
        self.stats = dict(ubatches=0, fails=0, refused=0)

    def decode(self):
        fns, rng, ref = self.fns, self.rng, self.ref
        batch = _random_batch(rng, ref, self.b)
        batch, code, plan, ok, failed, same, slots = fns["plan"](self.cache, batch)
        if int(code) != 0:
            return
        assert bool(same)  # prepare_slots' dry run is prepare's
        assert bool(plan.complete)
        ubs = [fns["ubatch"](batch, plan, u) for u in range(int(plan.n_ubatches))]
        toks = [_tokens(ub) for ub in ubs]
        ref_ok, ref_failed = ref.prepare(toks)
        # Then the dry run agrees with the reference (ok and the failing ubatch)
        assert (bool(ok), int(failed)) == (ref_ok, ref_failed)
        start_cache, start_ref = self.cache, ref.copy()
        for u, (ub, tk) in enumerate(zip(ubs, toks, strict=True)):
            new, slot, mask = fns["place"](self.cache, ub, self.uid)
            if bool(ok):
                # The slot the dry run recorded is the one the search finds when applying
                valid = np.asarray(ub.valid)
                for name in ("stream", "cell"):
                    np.testing.assert_array_equal(
                        np.asarray(getattr(slots, name))[u][valid],
                        np.asarray(getattr(slot, name))[valid],
                    )
                assert bool(slots.ok[u]) and bool(slot.ok)
            ref_slot = ref.find_slot(tk)
            if ref_slot is None:
                # A ubatch that does not fit: ok=False, nothing changes; roll back the batch.
                assert not bool(slot.ok)
                chex.assert_trees_all_equal(new, self.cache)
                self.cache, self.ref = start_cache, start_ref
                self.stats["fails"] += 1
                return
            assert bool(slot.ok)
            n = len(tk)
            got = list(
                zip(
                    np.asarray(slot.stream)[:n].tolist(),
                    np.asarray(slot.cell)[:n].tolist(),
                    strict=True,
                )
            )
            assert got == [tuple(x) for x in ref_slot]
            for t, tok in enumerate(tk):
                tok.uid = self.uid + t
            ref.apply_ubatch(tk, ref_slot)
            self.uid += self.b.n_ubatch
            self.cache = new
            _assert_same(new, ref, fns, "apply_ubatch")
            m = np.asarray(mask)
            np.testing.assert_array_equal(m[:n], np.array(ref.mask(tk, ref_slot), bool))
            assert not m[n:].any()
            self.stats["ubatches"] += 1

    def seq_op(self):
        rng, ref, fns, cfg = self.rng, self.ref, self.fns, self.b.cfg

        def seq():
            return int(rng.integers(-2, cfg.n_seq_max + 1))

        def p():
            return -1 if rng.random() < 0.3 else int(rng.integers(-2, 16))

        kind = rng.choice(
            ["rm", "cp", "keep", "add", "div", "clear", "update"],
            p=[0.3, 0.2, 0.06, 0.2, 0.12, 0.04, 0.08],
        )
        if kind == "rm":
            args = (seq(), p(), p())
            ref_ok = ref.seq_rm(*args)
        elif kind == "cp":
            args = (seq(), seq(), p(), p())
            ref_ok = ref.seq_cp(*args)
        elif kind == "keep":
            args = (seq(),)
            ref_ok = ref.seq_keep(*args)
        elif kind == "add":
            args = (seq(), p(), p(), int(rng.integers(-6, 7)))
            ref_ok = ref.seq_add(*args)
        elif kind == "div":
            args = (seq(), p(), p(), int(rng.integers(0, 4)))
            ref_ok = ref.seq_div(*args)
        else:
            args = ()
            ref_ok = True
            if kind == "clear":
                ref.clear()
            else:
                assert bool(fns["has_shift"](self.cache)) == any(any(r) for r in ref.shift)
                ref.update()
        out = fns[kind](self.cache, *[np.int32(a) for a in args])
        new, ok = (out, True) if kind in ("clear", "update") else out
        chex.assert_trees_all_equal_shapes_and_dtypes(new, self.cache)
        assert bool(ok) == ref_ok, (kind, args)
        if not ref_ok:
            # Then a refused operation returns the input cache bit-identical
            chex.assert_trees_all_equal(new, self.cache)
            self.stats["refused"] += 1
        self.cache = new
        _assert_same(new, ref, fns, f"{kind}{args}")

    def check_pos_queries(self):
        for s in range(-1, self.b.cfg.n_seq_max + 1):
            assert int(self.fns["pos_min"](self.cache, np.int32(s))) == self.ref.seq_pos_min(s)
            assert int(self.fns["pos_max"](self.cache, np.int32(s))) == self.ref.seq_pos_max(s)


_SMALL = dict(n_layers=1, n_kv_heads=1, head_dim_k=2)
BUCKETS = [
    Bucket("unified-none", KVConfig(kv_size=16, n_seq_max=3, **_SMALL)),
    Bucket(
        "unified-standard",
        KVConfig(kv_size=12, n_seq_max=3, swa_type=SWAType.STANDARD, n_swa=4, **_SMALL),
        split="equal",
    ),
    Bucket(
        "unified-chunked",
        KVConfig(kv_size=10, n_seq_max=2, swa_type=SWAType.CHUNKED, n_swa=4, **_SMALL),
    ),
    Bucket(
        "unified-symmetric-noncausal",
        KVConfig(
            kv_size=12, n_seq_max=3, swa_type=SWAType.SYMMETRIC, n_swa=5, causal=False, **_SMALL
        ),
        split="equal",
    ),
    Bucket(
        "streams-none",
        KVConfig(kv_size=8, n_seq_max=3, unified=False, **_SMALL),
        split="equal_seq",
    ),
    Bucket(
        "streams-standard",
        KVConfig(
            kv_size=6, n_seq_max=2, unified=False, swa_type=SWAType.STANDARD, n_swa=3, **_SMALL
        ),
        split="equal_seq",
    ),
]
N_SEQUENCES = 45
N_OPS = 14


@pytest.mark.parametrize("bucket", BUCKETS, ids=lambda b: b.name)
def test_random_sequences_match_reference(bucket):
    # Given seeded random operation sequences (batches placed ubatch by ubatch, seq ops with
    # valid and invalid arguments, clears, updates) on the JAX cache and the reference model
    rng = np.random.default_rng(zlib.crc32(bucket.name.encode()))
    totals = dict(ubatches=0, fails=0, refused=0)
    for _ in range(N_SEQUENCES):
        run = _Runner(bucket, rng)
        for _ in range(N_OPS):
            # When the next operation runs on both
            if rng.random() < 0.5:
                run.decode()
            else:
                run.seq_op()
            # Then (inside decode/seq_op) cells, seq sets, shifts, heads, K rows, pos ranges,
            # slots, masks and return values agree exactly
        run.check_pos_queries()
        for k in totals:
            totals[k] += run.stats[k]
    # And the sequences exercised placement, placement failures and refusals
    assert totals["ubatches"] > 50, totals
    assert totals["refused"] > 5, totals


def _ubatch_of(tokens, seqs, n_ubatch, cfg):
    """A single ubatch (simple split) from explicit positions and seq ids."""
    batch = make_batch([0] * len(tokens), pos=tokens, seq_ids=seqs, n_batch=n_ubatch)
    plan = split_simple(batch, n_ubatch=n_ubatch)
    return get_ubatch(batch, plan, 0, n_ubatch=n_ubatch, n_seq_max=cfg.n_seq_max)


@pytest.mark.parametrize(("head", "expected"), [(10, [0, 1]), (4, [4, 5])])
def test_find_slot_restart_heuristic(head, expected):
    # Given an empty stream whose head hint is far past the used cells (or not)
    cfg = KVConfig(kv_size=16, **_SMALL)
    cache = kvc.init_kv_cache(cfg)
    cache = cache._replace(cells=cache.cells._replace(head=jnp.array([head], jnp.int32)))
    ref = _ref_for(cfg)
    ref.head = [head]
    ub = _ubatch_of([0, 1], [0, 0], 2, cfg)
    # When a 2-token ubatch is placed
    slot = kvc.find_slot(cache, ub, cfg)
    # Then the search restarts at 0 iff head > used + 2 * n_tokens (§2.4.3), like the reference
    assert np.asarray(slot.cell).tolist() == expected
    assert [c for _, c in ref.find_slot(_tokens(ub))] == expected


@pytest.mark.parametrize("size", [5, 128, 300, 1024])
def test_nth_usable_cell_in_circular_order_over_several_blocks(size):
    # Given streams of random usable cells over several 128-cell blocks (with padding), random
    # heads (also inside blocks and past the last usable cell) and random ranks
    rng = np.random.default_rng(size)
    n_st, n = 3, 40
    usable = rng.random((n_st, size)) < rng.uniform(0.02, 0.9, (n_st, 1))
    usable[1] = False  # one stream with nothing usable
    head = rng.integers(0, size, n_st)
    stream = rng.integers(0, n_st, n)
    rank = rng.integers(0, 3 * size, n)
    # When the rank-th usable cell from head is looked up per entry
    counts = kvc._block_counts(jnp.asarray(usable))
    got = jax.jit(kvc._nth_usable)(
        counts, jnp.asarray(head, jnp.int32), jnp.asarray(stream, jnp.int32), jnp.asarray(rank)
    )
    # Then it is the cell a walk from head in circular order finds (wrapping around when fewer
    # are usable), and the totals are the usable counts
    np.testing.assert_array_equal(np.asarray(counts.total), usable.sum(axis=1))
    for i, (s, r) in enumerate(zip(stream, rank, strict=True)):
        order = [c for c in np.r_[head[s] : size, 0 : head[s]] if usable[s, c]]
        assert int(got[i]) == (order[r % len(order)] if order else 0), (s, r)


# --------------------------------------------------------------------------------------------
# Attention through the cache


def _direct_attention(q, k, v, mask):
    """Plain masked attention; q [T, Hq, D], k/v [N, Hkv, D], mask [T, N]."""
    group = q.shape[1] // k.shape[1]
    k = jnp.repeat(k, group, axis=1)
    v = jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("thd,nhd->thn", q, k) / np.sqrt(q.shape[-1])
    scores = scores + kvc.additive_mask(mask, jnp.float32)[:, None, :]
    return jnp.einsum("thn,nhd->thd", jax.nn.softmax(scores, axis=-1), v)


_direct_attention_jit = jax.jit(_direct_attention)


@functools.partial(jax.jit, static_argnames="cfg")
def _attn_step(cache, batch, plan, u, q_all, k_all, v_all, *, cfg):
    ub = get_ubatch(batch, plan, u, n_ubatch=4, n_seq_max=cfg.n_seq_max)
    slot = kvc.find_slot(cache, ub, cfg)
    cache = kvc.apply_ubatch(cache, ub, slot, cfg)
    bidx = jnp.maximum(ub.batch_idx, 0)
    cache = kvc.write_kv(cache, 0, k_all[bidx], v_all[bidx], slot, cfg)
    k, v = kvc.read_kv(cache, 0, cfg)
    return (
        cache,
        ub,
        slot.ok,
        _direct_attention(q_all[bidx], k, v, kvc.kq_mask(cache, ub, slot, cfg)),
    )


ATTN_CASES = [
    ("causal-unified-multiseq", dict(), "simple"),
    ("standard-swa", dict(swa_type=SWAType.STANDARD, n_swa=3), "simple"),
    ("chunked-swa", dict(swa_type=SWAType.CHUNKED, n_swa=4), "equal"),
    ("symmetric-noncausal", dict(swa_type=SWAType.SYMMETRIC, n_swa=4, causal=False), "equal"),
    ("per-seq-streams", dict(unified=False), "equal_seq"),
]


@pytest.mark.parametrize(("name", "extra", "split"), ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_attention_through_cache_equals_direct(name, extra, split):
    # Given three interleaved sequences (GQA: 4 query heads over 2 KV heads) split into
    # ubatches of 4 and placed one after the other, K rotated with RoPE at each position
    cfg = KVConfig(kv_size=24, n_seq_max=3, n_layers=1, n_kv_heads=2, head_dim_k=8, **extra)
    n_ub, hq, d = 4, 4, 8
    rng = np.random.default_rng(7)
    seqs = rng.permutation([0] * 6 + [1] * 5 + [2] * 4).tolist()
    counters = [0, 0, 0]
    pos = []
    for s in seqs:
        pos.append(counters[s])
        counters[s] += 1
    n = len(seqs)
    q_raw = jnp.asarray(rng.normal(size=(n, hq, d)), jnp.float32)
    k_raw = jnp.asarray(rng.normal(size=(n, 2, d)), jnp.float32)
    v_all = jnp.asarray(rng.normal(size=(n, 2, d)), jnp.float32)
    pos_a = jnp.asarray(pos, jnp.int32)
    q_all = rope(q_raw, pos_a)
    k_all = rope(k_raw, pos_a)
    batch = make_batch([0] * n, pos=pos, seq_ids=seqs, n_batch=16)
    plan = _plan(batch, cfg, n_ub, split)
    cache = kvc.init_kv_cache(cfg)
    ok, _ = kvc.prepare(cache, batch, plan, cfg, n_ubatch=n_ub)
    assert bool(ok)
    seen = np.zeros(n, bool)
    n_checked = 0
    for u in range(int(plan.n_ubatches)):
        # When each ubatch is placed, its K/V written and attention read back through the mask
        cache, ub, ok, got = _attn_step(cache, batch, plan, u, q_all, k_all, v_all, cfg=cfg)
        assert bool(ok)
        # Then it equals attention over the tokens themselves with the §3 rules
        idx = np.asarray(ub.batch_idx)[: int(ub.n_tokens)]
        seen[idx] = True
        p, s_arr = np.asarray(pos), np.asarray(seqs)
        vis = seen[None, :] & (s_arr[None, :] == s_arr[idx][:, None])
        if cfg.causal:
            vis &= p[None, :] <= p[idx][:, None]
        vis &= ~np.asarray(kvc.is_masked_swa(cfg.swa_type, cfg.n_swa, p[None, :], p[idx][:, None]))
        want = _direct_attention_jit(q_all[idx], k_all, v_all, jnp.asarray(vis))
        np.testing.assert_allclose(got[: len(idx)], want, rtol=1e-5, atol=1e-5)
        n_checked += len(idx)
    assert n_checked == n


# --------------------------------------------------------------------------------------------
# K-shift (§2.12)


@functools.partial(jax.jit, static_argnames=("cfg", "theta", "neox"))
def _place_jit(cache, ub, k_raw, *, cfg, theta, neox):
    slot = kvc.find_slot(cache, ub, cfg)
    cache = kvc.apply_ubatch(cache, ub, slot, cfg)
    k = rope(k_raw, ub.pos[: k_raw.shape[0]], theta=theta, neox=neox)
    pad = ub.valid.shape[0] - k_raw.shape[0]
    k, k_raw = jnp.pad(k, ((0, pad), (0, 0), (0, 0))), jnp.pad(k_raw, ((0, pad), (0, 0), (0, 0)))
    for layer in range(cfg.n_layers):
        cache = kvc.write_kv(cache, layer, k * (layer + 1), k_raw * (layer + 1), slot, cfg)
    return cache, slot.ok


def _place_seq(cache, cfg, seq, positions, k_raw, theta, neox):
    """Places one sequence's tokens; K = rope(k_raw, pos), V = k_raw (so V remembers k_raw)."""
    n = len(positions)
    ub = _ubatch_of(positions, [seq] * n, n, cfg)
    cache, ok = _place_jit(
        cache, ub, jnp.asarray(k_raw, jnp.float32), cfg=cfg, theta=theta, neox=neox
    )
    assert bool(ok)
    return cache


def _assert_k_matches_positions(cache, theta, neox, atol):
    pos = cache.cells.pos
    want = rope(
        cache.v.astype(jnp.float32),
        jnp.broadcast_to(pos[None], cache.v.shape[:3]),
        theta=theta,
        neox=neox,
    )
    full = np.asarray(pos >= 0)
    got = np.asarray(cache.k.astype(jnp.float32))[:, full]
    np.testing.assert_allclose(got, np.asarray(want)[:, full], atol=atol, rtol=0)


@functools.partial(jax.jit, static_argnames=("cfg", "op", "theta", "neox"))
def _kshift_scenario(cache, *, cfg, op, theta, neox):
    cache, ok_cp = kvc.seq_cp(cache, 0, 1, 0, 6, cfg)
    if op == "add":
        cache, ok = kvc.seq_add(cache, 0, 3, -1, -2, cfg)
    else:
        cache, ok = kvc.seq_div(cache, 0, 2, 12, 3, cfg)
    shifted = kvc.has_shift(cache, cfg)
    return kvc.update(cache, cfg, rope_shift_fn(theta=theta, neox=neox))[0], ok & ok_cp, shifted


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize(
    ("op", "dtype", "atol"),
    [("add", jnp.float32, 1e-4), ("div", jnp.float32, 1e-4), ("add", jnp.bfloat16, 0.1)],
)
def test_k_shift_equals_k_at_new_positions(op, neox, dtype, atol):
    # Given seq 0 at positions 0..11 and seq 1 sharing its first 6 cells (seq_cp), two layers
    cfg = KVConfig(
        kv_size=32,
        n_seq_max=2,
        n_layers=2,
        n_kv_heads=2,
        head_dim_k=8,
        dtype_k=dtype,
        dtype_v=dtype,
    )
    theta = 100.0
    k_raw = jnp.asarray(np.random.default_rng(0).normal(size=(12, 2, 8)), jnp.float32)
    cache = _place_seq(kvc.init_kv_cache(cfg), cfg, 0, list(range(12)), k_raw, theta, neox)
    # When positions of seq 0 move (seq_add [3, inf) by -2, or seq_div [2, 12) by 3) and the
    # pending shift is applied with the RoPE helper
    cache, ok, shifted = _kshift_scenario(cache, cfg=cfg, op=op, theta=theta, neox=neox)
    if op == "add":
        expect0 = [0, 1, 2] + [p - 2 for p in range(3, 12)]
    else:
        expect0 = [0, 1] + [p // 3 for p in range(2, 12)]
    assert bool(ok) and bool(shifted)
    # Then every stored K equals K computed directly at its cell's new position, shifts are
    # cleared, seq 0 holds the new positions and seq 1 (split off, difference 10) kept its own
    assert not bool(kvc.has_shift(cache, cfg))
    _assert_k_matches_positions(cache, theta, neox, atol)
    pos, seq = np.asarray(cache.cells.pos[0]), np.asarray(cache.cells.seq[0])
    assert sorted(pos[seq[:, 0]].tolist()) == sorted(expect0)
    assert sorted(pos[seq[:, 1]].tolist()) == list(range(6))


def test_update_without_rope_only_clears_shifts():
    # Given a cache with pending shifts
    cfg = KVConfig(kv_size=8, head_dim_k=4)
    k_raw = jnp.ones((4, 1, 4), jnp.float32)
    cache = _place_seq(kvc.init_kv_cache(cfg), cfg, 0, [0, 1, 2, 3], k_raw, 10000.0, False)
    cache, _ = jax.jit(lambda c: kvc.seq_add(c, 0, -1, -1, 5, cfg))(cache)
    # When updated for a model without RoPE
    new, _ = jax.jit(lambda c: kvc.update(c, cfg, None))(cache)
    # Then K is untouched and the shifts are gone
    chex.assert_trees_all_equal(new.k, cache.k)
    assert not bool(kvc.has_shift(new, cfg)) and bool(kvc.has_shift(cache, cfg))


# --------------------------------------------------------------------------------------------
# Failures leave the cache unchanged


def test_ubatch_that_does_not_fit_fails_and_prepare_leaves_cache():
    # Given a 8-cell cache holding 3 tokens and a batch of 7 more (ubatches of 4)
    cfg = KVConfig(kv_size=8, n_seq_max=2, head_dim_k=2)
    k_raw = jnp.ones((3, 1, 2), jnp.float32)
    cache = _place_seq(kvc.init_kv_cache(cfg), cfg, 0, [0, 1, 2], k_raw, 10000.0, False)
    batch = make_batch([0] * 7, pos=list(range(7)), seq_ids=[1] * 7, n_batch=8)
    plan = split_simple(batch, n_ubatch=4)
    before = jax.tree.map(jnp.copy, cache)
    # When it is dry-run
    ok, failed = jax.jit(lambda c: kvc.prepare(c, batch, plan, cfg, n_ubatch=4))(cache)
    # Then the second ubatch is reported as not fitting and the cache is untouched
    assert not bool(ok) and int(failed) == 1
    chex.assert_trees_all_equal(cache, before)
    # And placing the failing ubatch directly gives ok=False and apply is a no-op
    cache = kvc.apply_ubatch(
        cache,
        *(ub := [get_ubatch(batch, plan, 0, n_ubatch=4, n_seq_max=2)]),
        kvc.find_slot(cache, ub[0], cfg),
        cfg,
    )
    ub1 = get_ubatch(batch, plan, 1, n_ubatch=4, n_seq_max=2)
    slot = kvc.find_slot(cache, ub1, cfg)
    assert not bool(slot.ok)
    chex.assert_trees_all_equal(kvc.apply_ubatch(cache, ub1, slot, cfg), cache)


def test_ubatch_larger_than_kv_size_fails():
    cfg = KVConfig(kv_size=2, head_dim_k=2)
    ub = _ubatch_of([0, 1, 2], [0, 0, 0], 3, cfg)
    assert not bool(kvc.find_slot(kvc.init_kv_cache(cfg), ub, cfg).ok)


def test_streams_reject_ubatch_not_grouped_by_sequence():
    # Given per-sequence streams and a ubatch mixing sequences token by token (simple split)
    cfg = KVConfig(kv_size=8, n_seq_max=2, unified=False, head_dim_k=2)
    ub = _ubatch_of([0, 0, 1, 1], [0, 1, 0, 1], 4, cfg)
    # Then no slot is found (§2.4.1 grouping)
    assert not bool(kvc.find_slot(kvc.init_kv_cache(cfg), ub, cfg).ok)


def _filled_streams_cache():
    cfg = KVConfig(kv_size=4, n_seq_max=2, unified=False, n_layers=1, head_dim_k=2)
    k_raw = jnp.ones((3, 1, 2), jnp.float32)
    cache = _place_seq(kvc.init_kv_cache(cfg), cfg, 0, [0, 1, 2], k_raw, 10000.0, False)
    return cfg, cache


REFUSED = [
    ("rm seq -2", lambda c, cfg: kvc.seq_rm(c, -2, -1, -1, cfg)),
    ("rm seq n_seq_max", lambda c, cfg: kvc.seq_rm(c, 2, -1, -1, cfg)),
    ("cp src out of range", lambda c, cfg: kvc.seq_cp(c, 5, 0, -1, -1, cfg)),
    ("cp dst -1", lambda c, cfg: kvc.seq_cp(c, 0, -1, -1, -1, cfg)),
    ("cp partial across streams", lambda c, cfg: kvc.seq_cp(c, 0, 1, 1, -1, cfg)),
    ("keep -1", lambda c, cfg: kvc.seq_keep(c, -1, cfg)),
    ("add seq out of range", lambda c, cfg: kvc.seq_add(c, 3, -1, -1, 1, cfg)),
    ("div d=0", lambda c, cfg: kvc.seq_div(c, 0, -1, -1, 0, cfg)),
    ("div d<0", lambda c, cfg: kvc.seq_div(c, 0, -1, -1, -2, cfg)),
]


@pytest.mark.parametrize("op", [r[1] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_ops_return_cache_bit_identical(op):
    # Given a cache holding seq 0 in its stream
    cfg, cache = _filled_streams_cache()
    # When an invalid / unsupported operation is requested
    new, ok = jax.jit(op, static_argnums=1)(cache, cfg)
    # Then it is refused and the cache is returned bit-identical
    assert not bool(ok)
    chex.assert_trees_all_equal(new, cache)


def test_seq_add_without_room_to_split_shared_cells_is_refused():
    # Given a full 4-cell cache whose cells are shared by seq 0 and seq 1
    cfg = KVConfig(kv_size=4, n_seq_max=2, head_dim_k=2)
    cache = _place_seq(
        kvc.init_kv_cache(cfg), cfg, 0, [0, 1, 2, 3], jnp.ones((4, 1, 2)), 10000.0, False
    )
    cache, ok = kvc.seq_cp(cache, 0, 1, -1, -1, cfg)
    assert bool(ok)
    # When seq 0 alone is shifted (it would need free cells to split off) or divided
    for new, ok in (kvc.seq_add(cache, 0, 1, -1, 2, cfg), kvc.seq_div(cache, 0, -1, -1, 2, cfg)):
        # Then the operation fails and nothing changes
        assert not bool(ok)
        chex.assert_trees_all_equal(new, cache)
    # But shifting below 0 needs no room: seq 0 just leaves those cells (difference 10)
    new, ok = kvc.seq_add(cache, 0, -1, 2, -2, cfg)
    assert bool(ok)
    assert int(kvc.seq_pos_min(new, 0, cfg)) == 2 and int(kvc.seq_pos_max(new, 0, cfg)) == 3
    assert int(kvc.seq_pos_min(new, 1, cfg)) == 0 and int(kvc.seq_pos_max(new, 1, cfg)) == 3


def test_cross_stream_copy_copies_data_at_once():
    # Given seq 0 in stream 0 of a per-sequence cache
    cfg, cache = _filled_streams_cache()
    # When it is copied to seq 1 over the whole range
    new, ok = kvc.seq_cp(cache, 0, 1, -1, -1, cfg)
    # Then stream 1 holds the same positions and the same K/V rows immediately (difference 12)
    assert bool(ok)
    np.testing.assert_array_equal(new.cells.pos[1], cache.cells.pos[0])
    np.testing.assert_array_equal(new.k[:, 1], cache.k[:, 0])
    np.testing.assert_array_equal(new.v[:, 1], cache.v[:, 0])
    assert int(kvc.seq_pos_max(new, 1, cfg)) == 2


# --------------------------------------------------------------------------------------------
# Contract: structure, jit == no-jit, no retrace, donation


def _script(cache, cfg, ub, x):
    """A fixed operation script; ``x`` is an int32 scalar varied between calls."""
    slot = kvc.find_slot(cache, ub, cfg)
    cache = kvc.apply_ubatch(cache, ub, slot, cfg)
    kk = jnp.ones((ub.valid.shape[0], cfg.n_kv_heads, cfg.head_dim_k), cfg.dtype_k)
    vv = jnp.ones((ub.valid.shape[0], cfg.n_kv_heads, cfg.head_dim_v), cfg.dtype_v)
    cache = kvc.write_kv(cache, x % cfg.n_layers, kk * x.astype(kk.dtype), vv, slot, cfg)
    mask = kvc.kq_mask(cache, ub, slot, cfg)
    outs = [slot.ok, mask, kvc.additive_mask(mask, jnp.bfloat16)]
    cache, ok = kvc.seq_cp(cache, 0, 1, -1, -1, cfg)
    outs.append(ok)
    cache, ok = kvc.seq_add(cache, 1, x, -1, x - 3, cfg)
    outs.append(ok)
    cache, ok = kvc.seq_div(cache, 0, 0, x + 2, 2, cfg)
    outs.append(ok)
    cache, _ = kvc.update(cache, cfg, rope_shift_fn())
    cache, ok = kvc.seq_rm(cache, x - 2, 1, x + 1, cfg)
    outs.append(ok)
    cache, ok = kvc.seq_keep(cache, x % 2, cfg)
    outs += [ok, *kvc.seq_pos_range(cache, cfg), kvc.seq_pos_min(cache, 0, cfg)]
    outs += [kvc.seq_pos_max(cache, x, cfg), kvc.has_shift(cache, cfg)]
    return cache, outs


CONTRACT_CFGS = [
    KVConfig(kv_size=8, n_seq_max=2, n_layers=2, n_kv_heads=2, head_dim_k=4, head_dim_v=2),
    KVConfig(
        kv_size=8,
        n_seq_max=2,
        n_layers=2,
        head_dim_k=4,
        unified=False,
        dtype_k=jnp.bfloat16,
        dtype_v=jnp.float16,
        swa_type=SWAType.STANDARD,
        n_swa=3,
    ),
]


@pytest.mark.parametrize("cfg", CONTRACT_CFGS, ids=["unified", "streams-bf16-swa"])
def test_contract_jit_equals_eager_no_retrace_structure_stable(cfg):
    # Given a jitted script of every operation, with the cache donated
    traces = []

    def traced(cache, ub, x):
        traces.append(1)
        return _script(cache, cfg, ub, x)

    jitted = jax.jit(traced, donate_argnums=0)
    ub = _ubatch_of([0, 1, 2], [0, 0, 0], 4, cfg)
    init = kvc.init_kv_cache(cfg)
    # When it runs eagerly and jitted, then jitted again with a new value of x
    eager_cache, eager_outs = _script(kvc.init_kv_cache(cfg), cfg, ub, jnp.int32(2))
    jit_cache, jit_outs = jitted(kvc.init_kv_cache(cfg), ub, jnp.int32(2))
    jit_cache3, _ = jitted(kvc.init_kv_cache(cfg), ub, jnp.int32(3))
    # Then eager and jit agree, the structure is unchanged and nothing retraced
    chex.assert_trees_all_equal(jit_cache, eager_cache)
    chex.assert_trees_all_equal(jit_outs, eager_outs)
    chex.assert_trees_all_equal_shapes_and_dtypes(jit_cache, init)
    chex.assert_trees_all_equal_shapes_and_dtypes(jit_cache3, init)
    assert len(traces) == 1


def test_cache_is_a_while_loop_carry():
    # Given a cache used as the carry of a while_loop that shifts and clears
    cfg = KVConfig(kv_size=8, n_seq_max=2, head_dim_k=4)
    ub = _ubatch_of([0, 1, 2], [0, 0, 0], 4, cfg)
    cache = kvc.init_kv_cache(cfg)
    cache = kvc.apply_ubatch(cache, ub, kvc.find_slot(cache, ub, cfg), cfg)

    def body(carry):
        i, c = carry
        c, _ = kvc.seq_add(c, 0, -1, -1, 1, cfg)
        return i + 1, kvc.update(c, cfg, rope_shift_fn())[0]

    _, out = jax.lax.while_loop(lambda c: c[0] < 3, body, (jnp.int32(0), cache))
    # Then the structure is stable and positions moved by 3
    chex.assert_trees_all_equal_shapes_and_dtypes(out, cache)
    assert int(kvc.seq_pos_max(out, 0, cfg)) == 5
    chex.assert_trees_all_equal(kvc.clear(out, cfg, data=False).k, out.k)
    assert not np.asarray(kvc.clear(out, cfg).k).any()


def test_config_validation():
    with pytest.raises(ValueError, match="n_swa"):
        KVConfig(kv_size=8, swa_type=SWAType.CHUNKED)
    with pytest.raises(ValueError, match="n_pad"):
        KVConfig(kv_size=10, n_pad=4)
    with pytest.raises(ValueError, match="expected"):
        kvc.seq_rm(kvc.init_kv_cache(KVConfig(kv_size=8)), 0, -1, -1, KVConfig(kv_size=4))


@pytest.mark.parametrize("neox", [False, True])
def test_rope_layouts_against_hand_rotation(neox):
    # Given a 4-wide head at position 1 with theta = 4 (frequencies 1 and 1/2)
    x = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]]])
    got = np.asarray(rope(x, jnp.asarray([1]), theta=4.0, neox=neox))[0, 0]
    # Then pairs (0,1),(2,3) (interleaved) or (0,2),(1,3) (NeoX) are rotated by 1 and 0.5 rad
    pairs = [(0, 2), (1, 3)] if neox else [(0, 1), (2, 3)]
    want = np.zeros(4)
    for (i, j), a in zip(pairs, [1.0, 0.5], strict=True):
        want[i] = x[0, 0, i] * np.cos(a) - x[0, 0, j] * np.sin(a)
        want[j] = x[0, 0, i] * np.sin(a) + x[0, 0, j] * np.cos(a)
    np.testing.assert_allclose(got, want, rtol=1e-6)
