"""The memory invariants of docs/semantics.md §15 hold at every entry point (issue 22, classes 2,
3 and 5): positions never leave int32 (§15.2), the two parts of a hybrid never disagree (§15.1),
a memory's own state blob always restores, and a property test runs random sequences of public
operations with valid and invalid arguments, checking the invariants after each and that every
failure returned its input bit-identical (§15.5)."""

from __future__ import annotations

import functools

import hybrid_model as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from invariants import check_invariants

import jaxhybrid as jh

N_SEQ, KV_SIZE, N_UBATCH, N_BATCH = 3, 16, 4, 6
BIG = 2**31 - 2  # the largest position memory may hold (§15.2)


@functools.cache
def _cfg(unified: bool, n_snapshots: int = 2) -> jh.HybridConfig:
    recr = hm.recurrent_config(N_SEQ)
    recr = jh.RecurrentConfig(
        n_seq_max=N_SEQ, r_shape=recr.r_shape, s_shape=recr.s_shape, n_snapshots=n_snapshots
    )
    return jh.HybridConfig.from_layers(
        hm.layer_kinds(), hm.kv_config(KV_SIZE, N_SEQ, unified, hm.ModelSpec()), recr
    )


@functools.cache
def _jitted(unified: bool):
    """Every public operation of one config, jitted once for the whole module."""
    cfg = _cfg(unified)
    part = functools.partial
    return dict(
        decode=hm.decoder(cfg, N_UBATCH, donate=False),
        rm=jax.jit(part(jh.seq_rm, cfg=cfg)),
        cp=jax.jit(part(jh.seq_cp, cfg=cfg)),
        keep=jax.jit(part(jh.seq_keep, cfg=cfg)),
        add=jax.jit(part(jh.seq_add, cfg=cfg)),
        div=jax.jit(part(jh.seq_div, cfg=cfg)),
        update=jax.jit(part(jh.update, cfg=cfg, rope_fn=hm.ROPE_FN)),
        checkpoint=jax.jit(part(jh.checkpoint, cfg=cfg)),
        restore=jax.jit(part(jh.restore_checkpoint, cfg=cfg)),
    )


PARAMS = hm.init_params(0)


def _decode(unified, mem, tokens, seq_ids, pos=None):
    batch = jh.make_batch(tokens, seq_ids=seq_ids, pos=pos, n_batch=N_BATCH, n_seq_id_max=2)
    _, new, res = _jitted(unified)["decode"](PARAMS, mem, batch)
    return new, res


def _fill(unified, histories: dict[int, list[int]]):
    mem = jh.init_hybrid(_cfg(unified))
    for s, toks in histories.items():
        for i in range(0, len(toks), N_BATCH):
            chunk = toks[i : i + N_BATCH]
            mem, res = _decode(unified, mem, chunk, [s] * len(chunk))
            jh.raise_for_result(res)
    return mem


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


# --------------------------------------------------------------------------------------------
# Class 2: int32 limits (§15.2)


@pytest.mark.parametrize("unified", [True, False])
def test_positions_never_pass_int32(unified):
    ops = _jitted(unified)
    # Given sequence 0 at the last position memory may hold
    mem = _fill(unified, {1: [1, 2, 3]})
    mem, res = _decode(unified, mem, [4], [0], pos=[BIG])
    jh.raise_for_result(res)
    # When more tokens follow it, automatically or explicitly, then the batch is refused
    for toks, pos in (([5], None), ([5, 6], None), ([5], [BIG + 1])):
        new, res = _decode(unified, mem, toks, [0] * len(toks), pos=pos)
        assert int(res.code) == jh.DecodeCode.INVALID_BATCH
        assert int(res.check.code) == jh.BatchErrorCode.POSITION_OUT_OF_RANGE
        assert _same(new, mem)
    # And a shift that would pass 2^31 - 2 is refused in every part, never wrapped and dropped
    for delta in (1, 2**31 - 1):
        for s, lo in ((0, 0), (1, 0), (1, 2)):
            new, ok = ops["add"](mem, s, lo, -1, delta)
            if s == 1 and delta == 1:
                assert bool(ok)  # 1 -> 3 fits
                continue
            assert not bool(ok) and _same(new, mem), (s, lo, delta)
    cfg = _cfg(unified)
    kv, ok = jh.kv.seq_add(mem.kv, 0, 0, -1, 1, cfg.kv)
    assert not bool(ok) and _same(kv, mem.kv)
    recr, ok = jh.recurrent.seq_add(mem.recurrent, 0, 0, -1, 1, cfg.recurrent)
    assert not bool(ok) and _same(recr, mem.recurrent)
    # while a large negative shift is the ordinary rule (positions below 0 are dropped)
    new, ok = ops["add"](mem, 0, 0, -1, -(2**31) + 1)
    assert bool(ok) and int(jh.seq_pos_max(new, 0, cfg)) == -1
    check_invariants(new, cfg)


# --------------------------------------------------------------------------------------------
# Class 3: the two parts never disagree (§15.1)


@pytest.mark.parametrize("unified", [True, False])
def test_operations_that_would_split_the_parts_are_refused(unified):
    ops, cfg = _jitted(unified), _cfg(unified)
    mem = _fill(unified, {0: [1, 2, 3, 4, 5, 6], 1: [7, 8]})
    cases = {
        # a partial copy would give seq 2 cells [0, 3) and the state after position 5
        "partial seq_cp": lambda m: ops["cp"](m, 0, 2, 0, 3),
        # the positions after 2 move past the state, which stays at 5... and the state moves
        # alone when its range leaves cells behind at larger positions
        "partial seq_add": lambda m: ops["add"](m, 0, 0, 3, 10),
        "seq_add dropping the state": lambda m: ops["add"](m, 0, 3, -1, -10),
    }
    for name, op in cases.items():
        new, ok = op(mem)
        assert not bool(ok), name
        assert _same(new, mem), name
    # The whole-range forms succeed and keep the parts in agreement
    whole = [
        lambda m: ops["cp"](m, 0, 2, -1, -1),
        lambda m: ops["add"](m, 0, 0, -1, 10),
        lambda m: ops["div"](m, 0, 0, -1, 2),
    ]
    if unified:  # a leading part may be left out (§5.7.1); across streams only whole (§4.2)
        whole.append(lambda m: ops["cp"](m, 0, 2, 2, -1))
    for op in whole:
        new, ok = op(mem)
        assert bool(ok)
        check_invariants(new, cfg)


@pytest.mark.parametrize("unified", [True, False])
def test_a_token_couples_only_sequences_with_one_history(unified):
    # Given sequences 0 and 1 at the same positions with different histories, and 2 a copy of 0
    mem = _fill(unified, {0: [1, 2, 3], 1: [4, 5, 6]})
    mem, ok = _jitted(unified)["cp"](mem, 0, 2, -1, -1)
    assert bool(ok)
    # When a token lists 0 and 1, then it is refused; 0 and 2 (one history) is accepted
    new, res = _decode(unified, mem, [7], [[0, 1]], pos=[3])
    assert int(res.code) == jh.DecodeCode.INVALID_BATCH
    assert int(res.check.code) == jh.BatchErrorCode.COUPLED_DIVERGED
    assert _same(new, mem)
    if unified:  # coupling across streams is a placement question of its own (§2.1)
        new, res = _decode(unified, mem, [7], [[0, 2]], pos=[3])
        jh.raise_for_result(res)
        check_invariants(new, _cfg(unified))


def test_checkpoints_restore_only_beside_their_own_cells():
    unified = True
    ops, cfg = _jitted(unified), _cfg(unified)
    mem = _fill(unified, {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]})
    ck0, ck1 = ops["checkpoint"](mem, 0), ops["checkpoint"](mem, 1)
    mem, res = _decode(unified, mem, [9, 9, 9], [0, 0, 0])
    jh.raise_for_result(res)
    # Its own checkpoint restores; another sequence's, at the same position, does not
    new, ok = ops["restore"](mem, 0, ck1)
    assert not bool(ok) and _same(new, mem)
    new, ok = ops["restore"](mem, 0, ck0)
    assert bool(ok) and int(jh.seq_pos_max(new, 0, cfg)) == 3
    check_invariants(new, cfg)
    # After its cells before the checkpoint moved (a context shift), it no longer restores
    shifted, ok = ops["rm"](mem, 0, 1, 3)
    shifted, ok2 = ops["add"](shifted, 0, 3, -1, -2)
    assert bool(ok) and bool(ok2)
    new, ok = ops["restore"](shifted, 0, ck0)
    assert not bool(ok) and _same(new, shifted)
    # A checkpoint of another shape or dtype is an error, never broadcast or cast
    for bad in (ck0._replace(r=ck0.r[:, :1]), ck0._replace(s=ck0.s.astype(jnp.bfloat16))):
        with pytest.raises(jh.InvalidArgumentError, match="this memory's"):
            jh.restore_checkpoint(mem, 0, bad, cfg)


@pytest.mark.parametrize("unified", [True, False])
def test_state_blobs_whose_parts_disagree_are_refused(unified):
    cfg = _cfg(unified)
    mem = _fill(unified, {0: [1, 2, 3, 4], 1: [5, 6]})
    # A blob written from a memory whose recurrent position was tampered with (checksum valid)
    rc = mem.recurrent.cells
    t = int(rc.tail[0])
    bad = mem._replace(
        recurrent=mem.recurrent._replace(cells=rc._replace(pos=rc.pos.at[t].add(-1)))
    )
    for seq in (-1, 0):
        blob = jh.state_write(bad, cfg, seq)
        new, status = jh.state_read(mem, cfg, blob, seq)
        assert not status.ok and "§15.1" in status.message and new is mem
    # A PARTIAL_ONLY record into a sequence that lacks its position is refused ...
    part = jh.state_write(mem, cfg, 0, flags=jh.StateFlags.PARTIAL_ONLY)
    for dst in (1, 2):  # 1 holds positions 0..1 only, 2 is empty
        new, status = jh.state_read(mem, cfg, part, dst, flags=jh.StateFlags.PARTIAL_ONLY)
        assert not status.ok and new is mem, dst
    # ... and into one that holds it, the attention positions after it are removed
    longer, res = _decode(unified, mem, [7, 7], [0, 0])
    jh.raise_for_result(res)
    new = jh.load_state(longer, cfg, part, 0, flags=jh.StateFlags.PARTIAL_ONLY)
    assert int(jh.seq_pos_max(new, 0, cfg)) == 3
    check_invariants(new, cfg)
    # A config that does not describe the memory is an error, on writing and reading
    other = _cfg(unified, n_snapshots=0)
    with pytest.raises(jh.InvalidArgumentError, match="config"):
        jh.state_write(mem, other)
    with pytest.raises(jh.InvalidArgumentError, match="config"):
        jh.state_read(mem, other, part)


def test_the_recurrent_part_alone_refuses_negative_ids_other_than_all():
    cfg = _cfg(True).recurrent
    mem = _fill(True, {0: [1, 2]}).recurrent
    for name, op in {
        "seq_rm": lambda: jh.recurrent.seq_rm(mem, -2, 0, -1, cfg),
        "seq_cp": lambda: jh.recurrent.seq_cp(mem, -2, 1, 0, -1, cfg),
        "seq_keep": lambda: jh.recurrent.seq_keep(mem, -2, cfg),
        "seq_add": lambda: jh.recurrent.seq_add(mem, -2, 0, -1, 1, cfg),
        "seq_div": lambda: jh.recurrent.seq_div(mem, -2, 0, -1, 2, cfg),
    }.items():
        new, ok = op()
        assert not bool(ok) and _same(new, mem), name


# --------------------------------------------------------------------------------------------
# Class 5: a memory's own blob restores


@pytest.mark.parametrize("unified", [True, False])
def test_blobs_with_repeated_positions_restore(unified):
    ops, cfg = _jitted(unified), _cfg(unified)
    # Given positions 0..5 divided by 3 (cells at 0, 0, 0, 1, 1, 1) and a partial shift
    mem = _fill(unified, {0: [1, 2, 3, 4, 5, 6], 1: [1, 2, 3, 4]})
    mem, ok = ops["div"](mem, 0, 0, -1, 3)
    mem, ok2 = ops["add"](mem, 1, 0, 2, 2)  # positions 2, 3, 2, 3
    assert bool(ok) and bool(ok2)
    mem, _ = ops["update"](mem)
    # Then the whole memory and each sequence restore, into a fresh memory and another id
    whole = jh.load_state(jh.init_hybrid(cfg), cfg, jh.state_write(mem, cfg))
    assert _same(whole.kv.cells.pos, mem.kv.cells.pos)
    for s in (0, 1):
        blob = jh.state_write(mem, cfg, s)
        dst = jh.load_state(jh.init_hybrid(cfg), cfg, blob, 2)
        assert jh.seq_pos_range(dst, cfg)[1][2] == jh.seq_pos_range(mem, cfg)[1][s]
        check_invariants(dst, cfg)


# --------------------------------------------------------------------------------------------
# The property: random public operations, valid and invalid


def _bad_values(rng):
    """Arguments of every kind a careless caller passes where an int32 is due."""
    return [
        1.5,
        True,
        np.float32(2.0),
        float("nan"),
        np.bool_(True),
        2**31,
        -(2**31) - 1,
        np.int64(2**40),
        "1",
        None,
    ][rng.integers(0, 10)]


OPS = ["decode"] * 4 + ["rm", "cp", "keep", "add", "div", "io", "io", "ckpt", "restore"]
OPS += ["update", "bad"]


@pytest.mark.parametrize("unified", [True, False])
def test_random_operations_keep_every_invariant(unified):
    ops, cfg = _jitted(unified), _cfg(unified)
    rng = np.random.default_rng(22 + unified)
    outcomes: dict[tuple[str, str], int] = {}
    for _ in range(6):
        mem = jh.init_hybrid(cfg)
        ckpts = []
        for _ in range(16):
            before = mem
            op = str(rng.choice(OPS))
            s, d = (int(x) for x in rng.integers(-1, N_SEQ + 1, size=2))
            p0, p1 = (int(x) for x in rng.integers(-1, 12, size=2))
            ok = True
            if op == "decode":
                n = int(rng.integers(1, N_BATCH + 1))
                seqs = [[int(q)] for q in rng.integers(0, N_SEQ, size=n)]
                if rng.random() < 0.2:
                    seqs = [[0, 1]] * n
                pos = None
                if rng.random() < 0.2:
                    pos = [int(x) for x in rng.integers(BIG - 2, BIG + 2, size=n)]
                toks = [int(t) for t in rng.integers(0, hm.VOCAB + (rng.random() < 0.1), size=n)]
                mem, res = _decode(unified, mem, toks, seqs, pos)
                ok = int(res.code) == 0
            elif op in ("rm", "cp", "keep", "add", "div"):
                args = {
                    "rm": (s, p0, p1),
                    "cp": (s, d, p0, p1),
                    "keep": (s,),
                    "add": (s, p0, p1, int(rng.choice([-3, 2, 2**31 - 1]))),
                    "div": (s, p0, p1, int(rng.integers(0, 4))),
                }[op]
                mem, ok = ops[op](mem, *args)
                ok = bool(ok)
            elif op == "io":
                mem, _ = ops["update"](mem)  # pending K-shifts are applied before saving
                before = mem
                seq = int(rng.integers(-1, N_SEQ))
                flags = jh.StateFlags.PARTIAL_ONLY if rng.random() < 0.3 else 0
                blob = jh.state_write(mem, cfg, max(seq, -1), flags=flags)
                dst = -1 if seq < 0 else int(rng.integers(0, N_SEQ))
                mem, status = jh.state_read(mem, cfg, blob, dst, flags=flags)
                ok = status.ok
            elif op == "ckpt":
                ckpts.append(ops["checkpoint"](mem, max(s, 0)))
            elif op == "restore" and ckpts:
                mem, ok = ops["restore"](mem, max(s, 0), ckpts[int(rng.integers(len(ckpts)))])
                ok = bool(ok)
            elif op == "update":
                mem, _ = ops["update"](mem)
            elif op == "bad":  # a wrong type or an int32 overflow in a random slot: an error
                bad = _bad_values(rng)
                name = str(rng.choice(["rm", "cp", "add", "div", "keep"]))
                fn, args = {
                    "rm": (jh.seq_rm, (0, bad, -1)),
                    "cp": (jh.seq_cp, (bad, 1, 0, -1)),
                    "add": (jh.seq_add, (0, 0, -1, bad)),
                    "div": (jh.seq_div, (0, 0, -1, bad)),
                    "keep": (jh.seq_keep, (bad,)),
                }[name]
                with pytest.raises((jh.InvalidTypeError, jh.InvalidArgumentError)):
                    fn(mem, *args, cfg)
                ok = False
            key = (op, "ok" if ok else "refused")
            outcomes[key] = outcomes.get(key, 0) + 1
            if not ok:
                assert _same(mem, before), op
            check_invariants(mem, cfg)
    # Successes and refusals of the operations that can fail were both exercised
    for key in [("decode", "ok"), ("decode", "refused"), ("add", "refused"), ("io", "ok")]:
        assert outcomes.get(key, 0) > 0, (key, outcomes)
