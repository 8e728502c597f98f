"""Exact rollback of recurrent state (spec §5.9-5.10, issue 10): with ``n_snapshots`` the hybrid
``seq_rm(seq, p0, -1)`` rewinds a sequence within the horizon, and the memory then equals one that
never saw the removed tokens: recurrent states and K/V rows bit for bit, logits bit for bit where
the cell layout is the same (else to float32 rounding of a reordered sum)."""

from __future__ import annotations

import dataclasses
import functools

import hybrid_model as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxhybrid as jh

N_SEQ = 4
N_BATCH = 12
KV_SIZE = 64
H = 5  # the rollback horizon of these tests


def _config(unified: bool, n_snapshots: int = H) -> jh.HybridConfig:
    return jh.HybridConfig.from_layers(
        hm.layer_kinds(),
        hm.kv_config(KV_SIZE, N_SEQ, unified, hm.ModelSpec()),
        dataclasses.replace(hm.recurrent_config(N_SEQ), n_snapshots=n_snapshots),
    )


@functools.cache
def _seq_rm(cfg):
    return jax.jit(functools.partial(jh.seq_rm, cfg=cfg))


def _decode(cfg, n_ubatch, params, mem, tokens, seqs, pos):
    batch = jh.make_batch(tokens, seq_ids=seqs, pos=pos, output_all=True, n_batch=N_BATCH)
    out, mem, res = hm.decoder(cfg, n_ubatch, donate=False)(params, mem, batch)
    jh.raise_for_result(res)
    return np.asarray(out)[: len(tokens)], mem


def _rebuild(cfg, n_ubatch, params, history: dict[int, list[int]]):
    """A memory that only ever saw each sequence's kept tokens, fed one sequence at a time."""
    mem = jh.init_hybrid(cfg)
    for s, toks in history.items():
        for i in range(0, len(toks), N_BATCH):
            chunk = toks[i : i + N_BATCH]
            _, mem = _decode(
                cfg, n_ubatch, params, mem, chunk, [s] * len(chunk), list(range(i, i + len(chunk)))
            )
    return mem


def _per_seq(mem, cfg) -> dict:
    """Each sequence's recurrent state (position and bytes) and K/V rows by position."""
    pos, seqs, k, v = jax.device_get((mem.kv.cells.pos, mem.kv.cells.seq, mem.kv.k, mem.kv.v))
    rpos, tail, r, s = jax.device_get(
        (mem.recurrent.cells.pos, mem.recurrent.cells.tail, mem.recurrent.r, mem.recurrent.s)
    )
    out = {}
    for q in range(cfg.n_seq_max):
        st, c = np.nonzero(seqs[:, :, q])
        kv = sorted(
            (int(pos[a, b]), k[:, a, b].tobytes(), v[:, a, b].tobytes())
            for a, b in zip(st, c, strict=True)
        )
        t = int(tail[q])
        state = None if t < 0 else (int(rpos[t]), r[:, t].tobytes(), s[:, t].tobytes())
        out[q] = (kv, state)
    return out


def _trees_equal(a, b) -> bool:
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("unified", [True, False])
def test_random_rollbacks_equal_a_memory_that_never_saw_the_tokens(unified):
    cfg = _config(unified)
    params = hm.init_params(3)
    rm = _seq_rm(cfg)
    n_rollbacks = n_refused = n_forked_rollbacks = 0
    max_logit_err = 0.0
    for trial in range(8):
        rng = np.random.default_rng(100 + trial)
        n_ubatch = int(rng.choice([2, 4, 8]))
        mem = jh.init_hybrid(cfg)
        history = {s: [] for s in range(N_SEQ)}
        forked = set()
        for _ in range(12):
            live = [s for s in range(N_SEQ) if history[s]]
            action = rng.choice(["decode", "decode", "fork", "rollback", "rollback"])
            if action == "fork" and live:
                a = int(rng.choice(live))
                b = int(rng.choice([s for s in range(N_SEQ) if s != a]))
                mem, ok = jh.seq_cp(mem, a, b, -1, -1, cfg)
                assert bool(ok)
                history[b] = list(history[a])
                forked.add(b)
                continue
            if action == "rollback" and live:
                s = int(rng.choice(live))
                lo = int(jh.seq_pos_min(mem, s, cfg))
                hi = int(jh.seq_pos_max(mem, s, cfg))
                assert hi == len(history[s]) - 1
                if lo > 0:
                    # Beyond what is kept: refused, memory bit-identical
                    new, ok = rm(mem, s, lo, -1)
                    assert not bool(ok)
                    assert _trees_equal(new, mem)
                    n_refused += 1
                # Within the horizon (lo is the oldest kept state: any p0 > lo works)
                assert hi - lo <= H
                if hi > lo:
                    p0 = int(rng.integers(lo + 1, hi + 1))
                    mem, ok = rm(mem, s, p0, -1)
                    assert bool(ok), (trial, s, lo, hi, p0)
                    history[s] = history[s][:p0]
                    n_rollbacks += 1
                    n_forked_rollbacks += s in forked
                    assert int(jh.seq_pos_max(mem, s, cfg)) == p0 - 1
                continue
            # Decode: a few sequences, 1-4 new tokens each, interleaved
            seqs = [int(s) for s in rng.choice(N_SEQ, size=int(rng.integers(1, 4)), replace=False)]
            queue = [s for s in seqs for _ in range(int(rng.integers(1, 7)))][:N_BATCH]
            rng.shuffle(queue)
            toks, pos = [], []
            for s in queue:
                toks.append(int(rng.integers(0, hm.VOCAB)))
                pos.append(len(history[s]))
                history[s].append(toks[-1])
            _, mem = _decode(cfg, n_ubatch, params, mem, toks, queue, pos)

        # The memory equals one rebuilt from the kept tokens only: states and K/V bit for bit
        ref = _rebuild(cfg, n_ubatch, params, {s: h for s, h in history.items() if h})
        assert _per_seq(mem, cfg) == _per_seq(ref, cfg), trial
        # ... and the next token of every live sequence gets the same logits
        live = [s for s in range(N_SEQ) if history[s]]
        toks = [int(t) for t in rng.integers(0, hm.VOCAB, len(live))]
        pos = [len(history[s]) for s in live]
        got, _ = _decode(cfg, n_ubatch, params, mem, toks, live, pos)
        want, _ = _decode(cfg, n_ubatch, params, ref, toks, live, pos)
        max_logit_err = max(max_logit_err, float(np.max(np.abs(got - want))))
    # Cells sit elsewhere than in the rebuilt memory, so attention sums in another order: a few
    # float32 ulps of logits of magnitude ~5 (the single-sequence test below is bit for bit)
    assert max_logit_err <= 5e-6, max_logit_err
    assert n_rollbacks >= 8 and n_refused >= 3 and n_forked_rollbacks >= 1, (
        n_rollbacks,
        n_refused,
        n_forked_rollbacks,
    )
    # One compilation per ubatch size, whatever the rollbacks did
    assert all(hm.decoder(cfg, n, donate=False)._cache_size() <= 1 for n in (2, 4, 8))


@pytest.mark.parametrize("r", [1, 3, H])
def test_rollback_then_new_tokens_gives_bitwise_equal_logits(r):
    # Given one conversation decoded in chunks, the last r tokens rejected and other ones decoded
    cfg = _config(True)
    params = hm.init_params(5)
    rng = np.random.default_rng(r)
    prompt = [int(t) for t in rng.integers(0, hm.VOCAB, 9)]
    rejected = [int(t) for t in rng.integers(0, hm.VOCAB, r)]
    accepted = [int(t) for t in rng.integers(0, hm.VOCAB, 4)]

    def run(chunks):
        mem, out, n = jh.init_hybrid(cfg), [], 0
        for c in chunks:
            if c == "rollback":
                mem, ok = _seq_rm(cfg)(mem, 0, n - r, -1)
                assert bool(ok)
                n -= r
                continue
            o, mem = _decode(cfg, 4, params, mem, c, [0] * len(c), list(range(n, n + len(c))))
            out.append(o)
            n += len(c)
        return out, mem

    with_rollback, mem = run([prompt, rejected, "rollback", accepted])
    never_saw, ref = run([prompt, accepted])
    # Then the logits after the rollback are bit for bit those of the memory that never saw them
    assert np.array_equal(with_rollback[-1], never_saw[-1])
    assert _per_seq(mem, cfg) == _per_seq(ref, cfg)


def test_horizon_limits_rollback_and_shifts_restart_it():
    cfg = _config(True, n_snapshots=3)
    params = hm.init_params(0)
    mem = _rebuild(cfg, 4, params, {0: list(range(10)), 1: [3, 4]})
    # seq 0 holds positions 0..9: the states after 6, 7, 8 are kept
    assert int(jh.seq_pos_min(mem, 0, cfg)) == 6
    assert int(jh.seq_pos_max(mem, 0, cfg)) == 9
    before = jax.tree.map(jnp.copy, mem)
    new, ok = jh.seq_rm(mem, 0, 6, -1, cfg)  # needs the state after 5: not kept
    assert not bool(ok) and _trees_equal(new, before)
    new, ok = jh.seq_rm(mem, 0, 7, -1, cfg)
    assert bool(ok) and int(jh.seq_pos_max(new, 0, cfg)) == 6
    assert int(jh.seq_pos_min(new, 0, cfg)) == 6  # nothing older than 6 was kept
    # A context shift moves positions, so the sequence's snapshots are dropped
    shifted, ok = jh.seq_add(mem, 0, 0, -1, -2, cfg)
    assert bool(ok)
    assert int(jh.seq_pos_min(shifted, 0, cfg)) == int(jh.seq_pos_max(shifted, 0, cfg)) == 7
    _, ok = jh.seq_rm(shifted, 0, 7, -1, cfg)
    assert not bool(ok)
    # Without snapshots the same removal is refused, as in llama.cpp (§5.9)
    plain = _config(True, n_snapshots=0)
    mem0 = _rebuild(plain, 4, params, {0: list(range(10))})
    _, ok = jh.seq_rm(mem0, 0, 9, -1, plain)
    assert not bool(ok)


def test_rolling_back_a_forked_sequence_leaves_the_other_alone():
    cfg = _config(False)
    params = hm.init_params(1)
    mem = _rebuild(cfg, 4, params, {0: [1, 2, 3, 4, 5, 6]})
    mem, ok = jh.seq_cp(mem, 0, 2, -1, -1, cfg)
    assert bool(ok)
    # seq 2 shares seq 0's state: rewinding 2 splits it off, seq 0 keeps its state
    mem, ok = jh.seq_rm(mem, 2, 3, -1, cfg)
    assert bool(ok)
    ref = _rebuild(cfg, 4, params, {0: [1, 2, 3, 4, 5, 6], 2: [1, 2, 3]})
    got, want = _per_seq(mem, cfg), _per_seq(ref, cfg)
    assert got[0] == want[0] and got[2][1] == want[2][1]


def test_write_states_requires_per_token_states_with_snapshots():
    cfg = _config(True)
    mem = jh.init_hybrid(cfg)
    batch = jh.make_batch([1, 2], seq_ids=[0, 0], pos=[0, 1], n_batch=4)
    plan, _ = jh.init_batch(mem, batch, cfg, n_ubatch=4)
    mem, ub, place = jh.apply(mem, batch, plan, 0, cfg, n_ubatch=4)
    r = jnp.zeros((4, *cfg.recurrent.r_shape))
    s = jnp.zeros((4, *cfg.recurrent.s_shape))
    with pytest.raises(ValueError, match="per-token"):
        jh.write_states(mem, 0, place, r, s, ub.n_seqs, cfg)


def test_saved_sequence_keeps_its_snapshots_when_asked():
    cfg = _config(False)
    params = hm.init_params(2)
    toks = [3, 1, 4, 1, 5, 9, 2, 6]
    mem = _rebuild(cfg, 4, params, {1: toks})
    with_snaps = jh.state_write(mem, cfg, 1, flags=jh.StateFlags.SNAPSHOTS)
    plain = jh.state_write(mem, cfg, 1)
    assert len(with_snaps) > len(plain)
    # Restored with its snapshots into sequence 3 of another memory, it rewinds exactly
    other = _rebuild(cfg, 4, params, {0: [7, 7, 7]})
    restored = jh.load_state(other, cfg, with_snaps, 3, flags=jh.StateFlags.SNAPSHOTS)
    assert int(jh.seq_pos_min(restored, 3, cfg)) == len(toks) - 1 - H
    rewound, ok = jh.seq_rm(restored, 3, 5, -1, cfg)
    assert bool(ok)
    want = _rebuild(cfg, 4, params, {0: [7, 7, 7], 3: toks[:5]})
    assert _per_seq(rewound, cfg)[3][1] == _per_seq(want, cfg)[3][1]
    assert _per_seq(rewound, cfg)[3][0] == _per_seq(want, cfg)[3][0]
    # Whole-memory round trips keep them as well
    whole = jh.state_write(mem, cfg, flags=jh.StateFlags.SNAPSHOTS)
    again = jh.load_state(jh.init_hybrid(cfg), cfg, whole, flags=jh.StateFlags.SNAPSHOTS)
    assert jh.state_write(again, cfg, flags=jh.StateFlags.SNAPSHOTS) == whole
    # Without the flag the restored sequence has no snapshots: the same rewind is refused
    bare = jh.load_state(other, cfg, plain, 3)
    assert int(jh.seq_pos_min(bare, 3, cfg)) == len(toks) - 1
    _, ok = jh.seq_rm(bare, 3, 5, -1, cfg)
    assert not bool(ok)
    # A memory without snapshots cannot take them, and says so
    no_snap_cfg = _config(False, n_snapshots=0)
    _, status = jh.state_read(
        jh.init_hybrid(no_snap_cfg), no_snap_cfg, with_snaps, 3, flags=jh.StateFlags.SNAPSHOTS
    )
    assert not status.ok and "n_snapshots=0" in status.message


def test_checkpoint_restores_a_turn_beyond_the_horizon():
    # Given a conversation checkpointed after its first turn, then 12 more tokens (horizon 5)
    cfg = _config(True)
    params = hm.init_params(4)
    turn1, turn2, edited = [1, 2, 3, 4, 5, 6], list(range(12)), [9, 8, 7]
    mem = _rebuild(cfg, 4, params, {0: turn1, 2: [4, 4]})
    ckpt = jax.jit(functools.partial(jh.checkpoint, cfg=cfg))(mem, 0)
    assert int(ckpt.pos) == len(turn1) - 1
    _, mem = _decode(cfg, 4, params, mem, turn2, [0] * 12, list(range(6, 18)))
    _, ok = jh.seq_rm(mem, 0, len(turn1), -1, cfg)
    assert not bool(ok)  # 12 tokens back: beyond the snapshots
    # When the second turn is replaced: rewind to the checkpoint, decode the edited turn
    restore = jax.jit(functools.partial(jh.restore_checkpoint, cfg=cfg))
    mem, ok = restore(mem, 0, ckpt)
    assert bool(ok) and int(jh.seq_pos_max(mem, 0, cfg)) == len(turn1) - 1
    got, mem = _decode(cfg, 4, params, mem, edited, [0] * 3, [6, 7, 8])
    # Then it is as if the second turn never happened
    ref = _rebuild(cfg, 4, params, {0: turn1, 2: [4, 4]})
    want, ref = _decode(cfg, 4, params, ref, edited, [0] * 3, [6, 7, 8])
    assert _per_seq(mem, cfg)[0] == _per_seq(ref, cfg)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)
    # A checkpoint past what the attention part holds, or an empty one, is refused unchanged
    before = jax.tree.map(jnp.copy, mem)
    late = ckpt._replace(pos=jnp.int32(50))
    for bad in (late, jh.checkpoint(jh.init_hybrid(cfg), 0, cfg)):
        new, ok = restore(mem, 0, bad)
        assert not bool(ok) and _trees_equal(new, before)


def test_coupling_needs_one_shared_state_with_its_snapshots():
    # Given sequence 0, a restored copy of it in 1 (no snapshots: its seq_pos_min differs) and a
    # fork of it in 2 (one shared cell, snapshots included)
    cfg = _config(True)
    params = hm.init_params(0)
    mem = _rebuild(cfg, 4, params, {0: [1, 2, 3, 4, 5, 6, 7]})
    mem = jh.load_state(mem, cfg, jh.state_write(mem, cfg, 0), 1)
    mem, ok = jh.seq_cp(mem, 0, 2, -1, -1, cfg)
    assert bool(ok) and int(jh.seq_pos_min(mem, 0, cfg)) != int(jh.seq_pos_min(mem, 1, cfg))
    dec = hm.decoder(cfg, 4, donate=False)
    # When a token lists 0 and the copy, then it is refused: two cells are two histories (§6.2.7)
    batch = jh.make_batch([8], seq_ids=[[0, 1]], pos=[7], n_batch=N_BATCH)
    _, _, res = dec(params, mem, batch)
    assert int(res.check.code) == jh.BatchErrorCode.COUPLED_DIVERGED
    # and a token listing 0 and the fork is decoded for both
    batch = jh.make_batch([8], seq_ids=[[0, 2]], pos=[7], n_batch=N_BATCH)
    _, mem, res = dec(params, mem, batch)
    jh.raise_for_result(res)
    assert int(jh.seq_pos_max(mem, 2, cfg)) == 7
