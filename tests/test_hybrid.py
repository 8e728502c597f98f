"""Hybrid memory (spec §7, §8, §10): the tiny hybrid model of ``hybrid_model.py`` run through the
memory with random batch compositions must equal the direct per-sequence computation; failures are
transactional; the whole decode runs in one jit without retracing."""

from __future__ import annotations

import functools

import hybrid_model as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxhybrid as jh

N_SEQ = 4
N_BATCH = 12
KV_SIZE = 48
TOL = 2e-5


def _config(unified: bool, spec: hm.ModelSpec, kv_size: int = KV_SIZE) -> jh.HybridConfig:
    return jh.HybridConfig.from_layers(
        hm.layer_kinds(),
        hm.kv_config(kv_size, N_SEQ, unified, spec),
        hm.recurrent_config(N_SEQ),
    )


@functools.cache
def _ops(cfg: jh.HybridConfig):
    return dict(
        rm=jax.jit(functools.partial(jh.seq_rm, cfg=cfg)),
        cp=jax.jit(functools.partial(jh.seq_cp, cfg=cfg)),
        keep=jax.jit(functools.partial(jh.seq_keep, cfg=cfg)),
        add=jax.jit(functools.partial(jh.seq_add, cfg=cfg)),
        range=jax.jit(functools.partial(jh.seq_pos_range, cfg=cfg)),
    )


def _copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


class Shadow:
    """Per-sequence token history (what the direct computation needs)."""

    def __init__(self):
        self.h = {s: dict(tokens=[], pos=[], kept=[]) for s in range(N_SEQ)}

    def next_pos(self, s):
        ps = [p for p, k in zip(self.h[s]["pos"], self.h[s]["kept"], strict=True) if k]
        return max(ps) + 1 if ps else 0

    def live(self):
        return [s for s in range(N_SEQ) if self.h[s]["tokens"]]


def _run_scenario(seed: int, unified: bool, spec: hm.ModelSpec, n_steps: int = 14):
    rng = np.random.default_rng(seed)
    params = hm.init_params(seed % 3)
    cfg = _config(unified, spec)
    ops = _ops(cfg)
    mem = jh.init_hybrid(cfg)
    shadow = Shadow()
    max_err = 0.0
    n_checked = 0
    for _ in range(n_steps):
        live = shadow.live()
        action = rng.choice(["decode", "decode", "decode", "fork", "rm", "keep", "shift"])
        if action == "fork" and live and len(live) < N_SEQ:
            a = int(rng.choice(live))
            b = int(rng.choice([s for s in range(N_SEQ) if s not in live]))
            mem, ok = ops["cp"](mem, a, b, -1, -1)
            if bool(ok):
                shadow.h[b] = {k: list(v) for k, v in shadow.h[a].items()}
            continue
        if action == "rm" and live:
            s = int(rng.choice(live))
            mem, ok = ops["rm"](mem, s, -1, -1)
            assert bool(ok)  # removing a whole sequence never fails
            shadow.h[s] = dict(tokens=[], pos=[], kept=[])
            continue
        if action == "keep" and len(live) > 2:
            s = int(rng.choice(live))
            mem, ok = ops["keep"](mem, s)
            assert bool(ok)
            for q in range(N_SEQ):
                if q != s:
                    shadow.h[q] = dict(tokens=[], pos=[], kept=[])
            continue
        if action == "shift" and live and spec.swa_type == jh.SWAType.NONE:
            # (With SWA, cells already recycled by the window would come back into view after a
            # shift in the direct computation but not in memory, in llama.cpp too.)
            # Context shift: drop n_discard positions after the first n_keep, move the rest.
            s = int(rng.choice(live))
            n = shadow.next_pos(s)
            if n >= 4:
                n_keep, n_discard = 1, int(rng.integers(1, n - 2))
                mem, ok = ops["rm"](mem, s, n_keep, n_keep + n_discard)
                assert bool(ok)  # a middle range is trimmed in the attention part only
                h = shadow.h[s]
                for i, p in enumerate(h["pos"]):
                    if h["kept"][i] and n_keep <= p < n_keep + n_discard:
                        h["kept"][i] = False
                mem, ok = ops["add"](mem, s, n_keep + n_discard, -1, -n_discard)
                if bool(ok):  # (fails without change when shared cells cannot be split off)
                    for i, p in enumerate(h["pos"]):
                        if h["kept"][i] and p >= n_keep + n_discard:
                            h["pos"][i] = p - n_discard
                continue
        # Decode a batch: a few sequences, 1-4 new tokens each, interleaved at random.
        seqs = [
            int(s) for s in rng.choice(N_SEQ, size=int(rng.integers(1, N_SEQ + 1)), replace=False)
        ]
        queue = []
        for s in seqs:
            queue += [s] * int(rng.integers(1, 5))
        queue = queue[:N_BATCH]
        rng.shuffle(queue)
        toks = [int(t) for t in rng.integers(0, hm.VOCAB, size=len(queue))]
        n_ubatch = int(rng.choice([2, 4, 8]))
        batch = jh.make_batch(toks, seq_ids=queue, output_all=True, n_batch=N_BATCH)
        logits, mem, res = hm.decoder(cfg, n_ubatch)(params, mem, batch)
        if int(res.code) == 1:  # no room: free the longest sequence and go on
            s = max(live, key=lambda q: len(shadow.h[q]["tokens"]))
            mem, ok = ops["rm"](mem, s, -1, -1)
            shadow.h[s] = dict(tokens=[], pos=[], kept=[])
            continue
        jh.raise_for_result(res)
        logits = np.asarray(logits)
        rows = {s: [] for s in seqs}  # batch index of each new token, per sequence
        for i, (s, t) in enumerate(zip(queue, toks, strict=True)):
            h = shadow.h[s]
            h["pos"].append(shadow.next_pos(s))
            h["tokens"].append(t)
            h["kept"].append(True)
            rows[s].append(i)
        for s, idx in rows.items():
            if not idx:
                continue
            h = shadow.h[s]
            want = hm.direct_logits(params, h["tokens"], h["pos"], h["kept"], spec)[-len(idx) :]
            err = float(np.max(np.abs(logits[idx] - want)))
            max_err = max(max_err, err)
            n_checked += len(idx)
            assert err < TOL, (seed, s, idx, err)
        # The memory reports what the shadow holds.
        _, hi = ops["range"](mem)
        for s in range(N_SEQ):
            assert int(hi[s]) == shadow.next_pos(s) - 1
    return max_err, n_checked


@pytest.mark.parametrize(
    ("unified", "spec"),
    [
        (True, hm.ModelSpec()),
        (False, hm.ModelSpec()),
        (True, hm.ModelSpec(jh.SWAType.STANDARD, 6)),
        (False, hm.ModelSpec(jh.SWAType.CHUNKED, 4)),
    ],
)
def test_memory_matches_direct_computation(unified, spec):
    # Given random scenarios: sequences join (decode), fork (seq_cp), leave (seq_rm), seq_keep,
    # context shifts (seq_rm of a middle range + seq_add + K re-rotation), random n_ubatch
    total, worst = 0, 0.0
    for seed in range(6):
        # When each is run through the hybrid memory
        err, n = _run_scenario(seed, unified, spec)
        total += n
        worst = max(worst, err)
    # Then every output agrees with the direct per-sequence computation
    assert total > 100
    assert worst < TOL


# --------------------------------------------------------------------------------------------
# Transactional failures


def _trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def _filled_memory(cfg, params, rng, n_tokens=6):
    """A memory holding a few tokens of sequences 0 and 1."""
    mem = jh.init_hybrid(cfg)
    toks = [int(t) for t in rng.integers(0, hm.VOCAB, size=n_tokens)]
    batch = jh.make_batch(toks, seq_ids=[i % 2 for i in range(n_tokens)], n_batch=N_BATCH)
    _, mem, res = hm.decoder(cfg, 4, donate=False)(params, mem, batch)
    jh.raise_for_result(res)
    return mem


@pytest.mark.parametrize("unified", [True, False])
def test_failed_decodes_and_refused_removals_leave_memory_bit_identical(unified):
    # Given a memory with two live sequences and small room (kv_size 16)
    cfg = _config(unified, hm.ModelSpec(), kv_size=16)
    params = hm.init_params(1)
    rng = np.random.default_rng(5)
    decoder = hm.decoder(cfg, 4, donate=False)
    ops = _ops(cfg)
    n_failures = dict(invalid=0, no_slot=0, refused=0)
    for trial in range(30):
        mem = _filled_memory(cfg, params, rng)
        before = _copy(mem)
        kind = trial % 6
        # When something fails: a bad token / seq id / position, a batch that does not fit, or
        # a partial removal the recurrent part must refuse
        if kind == 0:
            batch = jh.make_batch([int(rng.integers(hm.VOCAB, 99))], n_batch=N_BATCH)
        elif kind == 1:
            batch = jh.make_batch([1, 2], seq_ids=[0, int(rng.integers(N_SEQ, 9))], n_batch=N_BATCH)
        elif kind == 2:
            batch = jh.make_batch([1], pos=[int(rng.integers(5, 30))], n_batch=N_BATCH)
        elif kind == 3:
            # unified: 6 used + 12 > 16 cells; per-sequence streams: 3 + 12 + 2 > 16 in stream 0
            n = N_BATCH
            batch = jh.make_batch([3] * n, seq_ids=[0] * n, n_batch=N_BATCH)
            if not unified:
                mem, _ = ops["rm"](mem, 2, -1, -1)
                before = _copy(mem)
                pre = jh.make_batch([4, 4], seq_ids=[0, 0], n_batch=N_BATCH)
                _, mem, res = decoder(params, mem, pre)
                jh.raise_for_result(res)
                before = _copy(mem)
        elif kind == 4:
            batch = jh.make_batch([1, 2], seq_ids=[[0, 2], 0], n_batch=N_BATCH)  # diverged
        else:
            p0 = int(rng.integers(1, 3))
            new, ok = ops["rm"](mem, int(rng.integers(0, 2)), p0, -1)
            assert not bool(ok)
            assert _trees_equal(new, before)
            n_failures["refused"] += 1
            continue
        out, new, res = decoder(params, mem, batch)
        code = int(res.code)
        # Then the call reports the failure and returns the memory it was given, bit for bit
        assert code != 0, (trial, kind)
        assert _trees_equal(new, before), (trial, kind)
        assert not bool(jnp.any(jax.tree.leaves(out)[0] != 0))
        n_failures["invalid" if code == -1 else "no_slot"] += 1
        with pytest.raises(jh.DecodeError, match="code"):
            jh.raise_for_result(res)
    assert all(v > 0 for v in n_failures.values()), n_failures


def test_hybrid_seq_rm_is_atomic_and_reports_the_combined_range():
    # Given sequence 0 with positions 0..5 in both parts
    cfg = _config(True, hm.ModelSpec())
    params = hm.init_params(0)
    mem = _filled_memory(cfg, params, np.random.default_rng(0), n_tokens=12)
    # Then the hybrid range is the intersection: min = max of parts, max = min of parts (§7.6)
    assert int(jh.seq_pos_min(mem, 0, cfg)) == 5  # the recurrent part holds only the last
    assert int(jh.seq_pos_max(mem, 0, cfg)) == 5
    # When a tail is removed (needs a rewind of the recurrent state): refused, nothing changes
    new, ok = jh.seq_rm(mem, 0, 3, -1, cfg)
    assert not bool(ok)
    assert _trees_equal(new, mem)
    # When a leading range is removed: succeeds and trims only the attention part (§5.7.1)
    new, ok = jh.seq_rm(mem, 0, 0, 2, cfg)
    assert bool(ok)
    from jaxhybrid import _kv_cache as kvc

    assert int(kvc.seq_pos_min(new.kv, 0, cfg.kv)) == 2
    assert int(jh.seq_pos_max(new, 0, cfg)) == 5
    # When the whole sequence is removed: both parts forget it
    new, ok = jh.seq_rm(mem, 0, -1, -1, cfg)
    assert bool(ok)
    assert int(jh.seq_pos_max(new, 0, cfg)) == -1
    assert int(jh.seq_pos_max(new, 1, cfg)) == 5
    # Invalid sequence ids are refused without change (difference 13)
    for op in (
        lambda m: jh.seq_rm(m, 7, -1, -1, cfg),
        lambda m: jh.seq_cp(m, 0, 9, -1, -1, cfg),
        lambda m: jh.seq_keep(m, -2, cfg),
        lambda m: jh.seq_add(m, 5, 0, -1, 2, cfg),
        lambda m: jh.seq_div(m, 0, 0, -1, 0, cfg),
    ):
        new, ok = op(mem)
        assert not bool(ok)
        assert _trees_equal(new, mem)


def test_update_status_follows_pending_shifts():
    cfg = _config(True, hm.ModelSpec())
    params = hm.init_params(0)
    mem = _filled_memory(cfg, params, np.random.default_rng(1), n_tokens=8)
    assert int(jh.init_update(mem, cfg)) == jh.MemoryStatus.NO_UPDATE
    assert int(jh.init_full(mem, cfg)) == jh.MemoryStatus.SUCCESS
    mem, ok = jh.seq_add(mem, 1, 0, -1, 3, cfg)
    assert bool(ok)
    assert int(jh.init_update(mem, cfg)) == jh.MemoryStatus.SUCCESS
    mem, status = jh.update(mem, cfg, hm.ROPE_FN)
    assert int(status) == jh.MemoryStatus.SUCCESS
    assert int(jh.init_update(mem, cfg)) == jh.MemoryStatus.NO_UPDATE
    assert jh.can_shift(cfg)


# --------------------------------------------------------------------------------------------
# One jit for the whole decode, donated, no retrace


def test_fifty_steps_of_changing_batches_compile_once():
    # Given a jitted decode with the memory donated and a trace counter
    cfg = _config(True, hm.ModelSpec())
    params = hm.init_params(2)
    traces = []

    def counted_step(params, ub, mem, place):
        traces.append(1)
        return hm.step(params, ub, mem, place, cfg=cfg)

    decoder = jax.jit(
        functools.partial(jh.decode, counted_step, cfg=cfg, n_ubatch=4, n_vocab=hm.VOCAB),
        donate_argnums=(1,),
    )
    rm = _ops(cfg)["rm"]
    mem = jh.init_hybrid(cfg)
    rng = np.random.default_rng(9)
    lengths = dict.fromkeys(range(N_SEQ), 0)
    # When 50 steps run with joins, leaves and varying numbers of tokens per sequence
    for _ in range(50):
        for s in range(N_SEQ):
            if lengths[s] > 8:
                mem, _ = rm(mem, s, -1, -1)
                lengths[s] = 0
        seqs = [
            int(s) for s in rng.choice(N_SEQ, size=int(rng.integers(1, N_SEQ + 1)), replace=False)
        ]
        queue = [s for s in seqs for _ in range(int(rng.integers(1, 3)))]
        batch = jh.make_batch([1] * len(queue), seq_ids=queue, n_batch=N_BATCH)
        _, mem, res = decoder(params, mem, batch)
        jh.raise_for_result(res)
        for s in queue:
            lengths[s] += 1
    # Then the step was traced for one compilation only (the body of the while loop, plus
    # eval_shape for the outputs: both in the single trace of decode)
    assert decoder._cache_size() == 1
    assert len(traces) <= 2


def test_config_routing_and_errors():
    kv = hm.kv_config(16, 2, True, hm.ModelSpec())
    rc = hm.recurrent_config(2)
    cfg = jh.HybridConfig.from_layers([True, False, True, False], kv, rc)
    assert cfg.attn_layers == (1, 3)
    assert cfg.recurrent_layers == (0, 2)
    assert cfg.sub_index(3) == (jh.LayerKind.ATTENTION, 1)
    assert cfg.sub_index(2) == (jh.LayerKind.RECURRENT, 1)
    custom = jh.HybridConfig.from_layers(
        [True, False, True, False], kv, rc, filter_attn=lambda il: il == 3
    )
    assert custom.sub_index(1) == (jh.LayerKind.NONE, -1)
    # Falcon-H1: every layer in both parts; Nemotron-H: MLP layers in neither.
    both = jh.HybridConfig.from_layers(
        [True, False, True], kv, rc, filter_attn=lambda il: il != 2, filter_recr=lambda il: il != 1
    )
    assert both.layer_kinds == (jh.LayerKind.BOTH, jh.LayerKind.ATTENTION, jh.LayerKind.RECURRENT)
    assert both.attn_layers == (0, 1) and both.recurrent_layers == (0, 2)
    assert (both.kv.n_layers, both.recurrent.n_layers) == (2, 2)
    assert both.part_index(0, jh.LayerKind.RECURRENT) == 0
    assert both.part_index(2, jh.LayerKind.RECURRENT) == 1
    assert both.part_index(1, jh.LayerKind.ATTENTION) == 1
    with pytest.raises(ValueError, match="served by ATTENTION, not RECURRENT"):
        both.part_index(1, jh.LayerKind.RECURRENT)
    with pytest.raises(ValueError, match="served by NONE, not ATTENTION"):
        custom.part_index(1, jh.LayerKind.ATTENTION)
    with pytest.raises(ValueError, match="same n_seq_max"):
        jh.HybridConfig.from_layers([True], kv, hm.recurrent_config(3))
    with pytest.raises(ValueError, match="served by ATTENTION, not RECURRENT"):
        jh.read_states(jh.init_hybrid(cfg), 1, None, cfg)


# --------------------------------------------------------------------------------------------
# Reference-model comparison of statuses, return values and ranges (§7)


def _null_step(params, ub, mem, place):
    del params, place
    return jnp.zeros((ub.token.shape[0], 1), jnp.float32), mem


@pytest.mark.parametrize("unified", [True, False])
def test_random_operation_sequences_match_the_reference(unified):
    import ref_hybrid
    from ref_batch import RefBatch
    from ref_kv import RefKV
    from ref_recurrent import RefRecurrent

    # Given a small memory (room for failures) and its pure-Python reference
    n_seq, kv_size, n_ubatch = 3, 12, 3
    cfg = jh.HybridConfig.from_layers(
        hm.layer_kinds(),
        hm.kv_config(kv_size, n_seq, unified, hm.ModelSpec()),
        hm.recurrent_config(n_seq),
    )
    decoder = jax.jit(
        functools.partial(jh.decode, _null_step, cfg=cfg, n_ubatch=n_ubatch, n_vocab=hm.VOCAB)
    )
    ops = _ops(cfg)
    div = jax.jit(functools.partial(jh.seq_div, cfg=cfg))
    rng = np.random.default_rng(11 + unified)
    n_sequences, n_ops, outcomes = 40, 12, {}
    for _ in range(n_sequences):
        mem = jh.init_hybrid(cfg)
        ref = ref_hybrid.RefHybrid(
            RefKV(kv_size, n_seq, unified=unified), RefRecurrent(n_seq, 1, 1, 1)
        )
        for _ in range(n_ops):
            # When a random operation (valid or not) runs on both
            op = rng.choice(["decode"] * 5 + ["rm", "cp", "keep", "add", "div"])
            s = int(rng.integers(-1, n_seq + 1))
            p0, p1 = (int(x) for x in rng.integers(-1, 8, size=2))
            if op == "decode":
                n = int(rng.integers(1, 6))
                seqs = [[int(q)] for q in rng.integers(0, n_seq, size=n)]
                if rng.random() < 0.15:
                    seqs[0] = [0, 1]
                toks = [int(t) for t in rng.integers(0, hm.VOCAB + (rng.random() < 0.1), size=n)]
                b = RefBatch(toks, seqs, None, [False] * (n - 1) + [True], N_BATCH)
                batch = jh.make_batch(toks, seq_ids=seqs, n_batch=N_BATCH, n_seq_id_max=2)
                _, mem, res = decoder(None, mem, batch)
                got, want = int(res.code), ref.decode(b, hm.VOCAB, n_ubatch)
            elif op == "rm":
                mem, got = ops["rm"](mem, s, p0, p1)
                want = ref.seq_rm(s, p0, p1)
            elif op == "cp":
                d = int(rng.integers(0, n_seq + 1))
                mem, got = ops["cp"](mem, s, d, -1, -1)
                want = ref.seq_cp(s, d, -1, -1)
            elif op == "keep":
                mem, got = ops["keep"](mem, s)
                want = ref.seq_keep(s)
            elif op == "add":
                delta = int(rng.integers(-4, 5))
                mem, got = ops["add"](mem, s, p0, p1, delta)
                want = ref.seq_add(s, p0, p1, delta)
            else:
                d = int(rng.integers(0, 4))
                mem, got = div(mem, s, p0, p1, d)
                want = ref.seq_div(s, p0, p1, d)
            # Then return values / codes and every sequence's (pos_min, pos_max) agree
            assert int(got) == int(want), (op, s, p0, p1)
            outcomes[(op, int(want))] = outcomes.get((op, int(want)), 0) + 1
            lo, hi = ops["range"](mem)
            for q in range(n_seq):
                assert (int(lo[q]), int(hi[q])) == ref.pos_range(q), (op, q)
    # Both successes and failures of decodes and removals were exercised.
    for key in [("decode", 0), ("decode", 1), ("decode", -1), ("rm", 1), ("rm", 0)]:
        assert outcomes.get(key, 0) > 0, (key, outcomes)
