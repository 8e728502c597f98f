"""State save and restore (spec §9): round trips of whole memories and single sequences for KV,
recurrent and hybrid memories; decoding continues after a restore exactly as it would have; bad
blobs never change the memory; a bounded fuzz test mutates valid blobs."""

from __future__ import annotations

import dataclasses
import functools
import struct
import zlib

import hybrid_model as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxhybrid as jh

N_SEQ = 4
N_BATCH = 12
KV_SIZE = 40
LOGIT_TOL = 1e-6  # same computation, cells in other places: only the summation order may differ


def _config(unified: bool, dtype=jnp.float32, kv_size: int = KV_SIZE) -> jh.HybridConfig:
    """The test model's memory; ``dtype`` is the K/V storage dtype (states stay float32, as in
    llama.cpp; bfloat16 states are covered by the recurrent-only round trip)."""
    return jh.HybridConfig.from_layers(
        hm.layer_kinds(),
        hm.kv_config(kv_size, N_SEQ, unified, hm.ModelSpec(), dtype=dtype),
        hm.recurrent_config(N_SEQ),
    )


@functools.cache
def _decoder(cfg: jh.HybridConfig):
    step = functools.partial(hm.step, cfg=cfg)
    return jax.jit(
        functools.partial(
            jh.decode, step, cfg=cfg, n_ubatch=4, n_vocab=hm.VOCAB, rope_fn=hm.ROPE_FN
        )
    )


def _decode(cfg, params, mem, tokens, seq_ids, pos=None):
    out, mem, res = _decoder(cfg)(
        params,
        mem,
        jh.make_batch(tokens, seq_ids=seq_ids, pos=pos, output_all=True, n_batch=N_BATCH),
    )
    jh.raise_for_result(res)
    return np.asarray(out), mem


def _filled(cfg, params, seed: int):
    """Sequences 0-2 with interleaved history, 3 forked from 0 (shared cells and state), a hole
    and a shift (applied) in sequence 1: every kind of cell the records must carry."""
    rng = np.random.default_rng(seed)
    mem = jh.init_hybrid(cfg)
    for _ in range(3):
        seqs = [int(s) for s in rng.permutation([0, 0, 1, 1, 1, 2, 2, 0])]
        _, mem = _decode(cfg, params, mem, [int(t) for t in rng.integers(0, hm.VOCAB, 8)], seqs)
    mem, ok = jh.seq_cp(mem, 0, 3, -1, -1, cfg)
    assert bool(ok)
    mem, ok = jh.seq_rm(mem, 1, 2, 4, cfg)
    assert bool(ok)
    mem, ok = jh.seq_add(mem, 1, 4, -1, -2, cfg)
    assert bool(ok)
    mem, status = jh.update(mem, cfg, hm.ROPE_FN)
    assert int(status) == jh.MemoryStatus.SUCCESS
    return mem


def _next_logits(cfg, params, mem, seq_ids, token=5):
    """Logits of one more token for each of ``seq_ids`` (each at its next position)."""
    _, hi = jh.seq_pos_range(mem, cfg)
    hi = np.asarray(hi)
    out, _ = _decode(
        cfg, params, mem, [token] * len(seq_ids), seq_ids, pos=[int(hi[s]) + 1 for s in seq_ids]
    )
    assert np.all(np.any(out[: len(seq_ids)] != 0, axis=1))  # every row was computed
    return out


def _trees_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _ranges(mem, cfg):
    lo, hi = jh.seq_pos_range(mem, cfg)
    return np.asarray(lo).tolist(), np.asarray(hi).tolist()


# --------------------------------------------------------------------------------------------
# Observable content of each part, independent of cell indices


def _kv_content(cache: jh.kv.KVCache, cfg: jh.KVConfig) -> dict:
    """Per sequence: sorted (position, K row bytes, V row bytes)."""
    pos, seqs, k, v = jax.device_get((cache.cells.pos, cache.cells.seq, cache.k, cache.v))
    out = {}
    for q in range(cfg.n_seq_max):
        st, c = np.nonzero((pos >= 0) & seqs[:, :, q])
        out[q] = sorted(
            (int(pos[s, i]), k[:, s, i].tobytes(), v[:, s, i].tobytes())
            for s, i in zip(st, c, strict=True)
        )
    return out


def _recurrent_content(mem: jh.recurrent.RecurrentMemory, cfg: jh.RecurrentConfig) -> dict:
    """Per sequence: (position, state bytes, the set of sequences sharing the state)."""
    pos, seqs, tail, r, s = jax.device_get(
        (mem.cells.pos, mem.cells.seq, mem.cells.tail, mem.r, mem.s)
    )
    out = {}
    for q in range(cfg.n_seq_max):
        c = int(tail[q])
        assert (c >= 0) == bool(np.any(seqs[:, q]))
        if c >= 0:
            sharing = tuple(np.nonzero(seqs[c])[0].tolist())
            out[q] = (int(pos[c]), r[:, c].tobytes(), s[:, c].tobytes(), sharing)
    return out


def _check_invariants(mem: jh.HybridMemory, cfg: jh.HybridConfig) -> None:
    """What every memory built by the library satisfies (a restore must not break it)."""
    pos, seqs, shift = jax.device_get((mem.kv.cells.pos, mem.kv.cells.seq, mem.kv.cells.shift))
    empty = pos < 0
    assert np.all(empty == ~np.any(seqs, axis=-1))
    assert np.all(shift[empty] == 0)
    if not cfg.kv.unified:
        own = np.eye(cfg.n_seq_max, dtype=bool)[:, None, :]
        assert not np.any(seqs & ~own)
    rpos, rseqs, tail = jax.device_get(
        (mem.recurrent.cells.pos, mem.recurrent.cells.seq, mem.recurrent.cells.tail)
    )
    for q in range(cfg.n_seq_max):  # §15.1 (one position may sit in several cells, §9.3.5)
        held = pos[seqs[:, :, q]]
        last = int(held.max()) if held.size else -1
        assert last == (int(rpos[tail[q]]) if tail[q] >= 0 else -1), f"seq {q}: parts disagree"
    assert np.all((rpos < 0) == ~np.any(rseqs, axis=1))
    assert np.all(np.sum(rseqs, axis=0) <= 1)
    for q in range(cfg.n_seq_max):
        assert (tail[q] >= 0) == bool(np.any(rseqs[:, q]))
        if tail[q] >= 0:
            assert rseqs[tail[q], q]


# --------------------------------------------------------------------------------------------
# Round trips


CASES = [(True, jnp.float32), (False, jnp.float32), (True, jnp.bfloat16), (False, jnp.bfloat16)]


@pytest.mark.parametrize(("unified", "dtype"), CASES)
def test_whole_memory_round_trip_continues_decoding(unified, dtype):
    # Given a memory with forks, holes and an applied shift
    cfg = _config(unified, dtype)
    params = hm.init_params(2)
    mem = _filled(cfg, params, seed=3)
    blob = jh.state_write(mem, cfg)
    # When it is restored into a memory holding something else
    other = _filled(cfg, params, seed=9)
    restored, status = jh.state_read(other, cfg, blob)
    # Then the restore reports success, every part holds the same content
    assert status.ok and status.message == ""
    _check_invariants(restored, cfg)
    assert _ranges(restored, cfg) == _ranges(mem, cfg)
    assert _kv_content(restored.kv, cfg.kv) == _kv_content(mem.kv, cfg.kv)
    assert _recurrent_content(restored.recurrent, cfg.recurrent) == _recurrent_content(
        mem.recurrent, cfg.recurrent
    )
    # ... the blob is canonical (saving the restored memory gives the same bytes)
    assert jh.state_write(restored, cfg) == blob
    # ... and the next token of every sequence has the logits it would have had
    want = _next_logits(cfg, params, mem, [0, 1, 2, 3])
    got = _next_logits(cfg, params, restored, [0, 1, 2, 3])
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize(("unified", "dtype"), CASES)
def test_every_sequence_restores_into_another_id_and_continues(unified, dtype):
    cfg = _config(unified, dtype)
    params = hm.init_params(4)
    mem = _filled(cfg, params, seed=5)
    want = _next_logits(cfg, params, mem, [0, 1, 2, 3])
    for s in range(N_SEQ):
        blob = jh.state_write(mem, cfg, s)
        # Given a memory where every other id is busy, restore into dest != s
        dest = (s + 1) % N_SEQ
        target = _filled(cfg, params, seed=11 + s)
        before = _kv_content(target.kv, cfg.kv)
        restored, status = jh.state_read(target, cfg, blob, dest)
        assert status.ok, status.message
        _check_invariants(restored, cfg)
        # Then dest holds exactly what s held; the other sequences are untouched
        after = _kv_content(restored.kv, cfg.kv)
        assert after[dest] == _kv_content(mem.kv, cfg.kv)[s]
        assert all(after[q] == before[q] for q in range(N_SEQ) if q != dest)
        lo, hi = _ranges(restored, cfg)
        mlo, mhi = _ranges(mem, cfg)
        assert (lo[dest], hi[dest]) == (mlo[s], mhi[s])
        r_mem = _recurrent_content(mem.recurrent, cfg.recurrent)[s]
        r_new = _recurrent_content(restored.recurrent, cfg.recurrent)[dest]
        assert r_new[:3] == r_mem[:3] and r_new[3] == (dest,)
        # ... and decoding dest continues as s would have
        got = _next_logits(cfg, params, restored, [dest])
        np.testing.assert_allclose(got[0], want[s], rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize(("unified", "dtype"), CASES)
def test_kv_only_and_recurrent_only_memories_round_trip(unified, dtype):
    cfg = _config(unified, dtype)
    mem = _filled(cfg, hm.init_params(1), seed=7)
    empty = jh.init_hybrid(cfg)
    # The recurrent states stored as ``dtype`` too
    r_cfg = dataclasses.replace(cfg.recurrent, dtype_r=dtype, dtype_s=dtype)
    recr = mem.recurrent._replace(r=mem.recurrent.r.astype(dtype), s=mem.recurrent.s.astype(dtype))
    for part, empty_part, sub, content in (
        (mem.kv, empty.kv, cfg.kv, _kv_content),
        (recr, jh.recurrent.init_recurrent(r_cfg), r_cfg, _recurrent_content),
    ):
        blob = jh.state_write(part, sub)
        restored, status = jh.state_read(empty_part, sub, blob)
        assert status.ok, status.message
        assert content(restored, sub) == content(part, sub)
        assert jh.state_write(restored, sub) == blob
        for s in range(N_SEQ):
            one = jh.state_write(part, sub, s)
            restored = jh.load_state(empty_part, sub, one, (s + 2) % N_SEQ)
            got = content(restored, sub)[(s + 2) % N_SEQ]
            want = content(part, sub)[s]
            if content is _recurrent_content:  # (the state is no longer shared)
                got, want = got[:3], want[:3]
            assert got == want


def test_partial_only_saves_and_restores_the_recurrent_part():
    cfg = _config(True)
    params = hm.init_params(0)
    mem = _filled(cfg, params, seed=1)
    full = jh.state_write(mem, cfg, 2)
    part = jh.state_write(mem, cfg, 2, flags=jh.StateFlags.PARTIAL_ONLY)
    # The partial blob is the full one without the attention record
    last = int(np.asarray(_ranges(mem, cfg)[1])[2])
    k_bytes = (last + 1) * 2 * hm.N_KV * hm.HD * 4
    assert len(full) - len(part) >= k_bytes
    # Restoring it into the same history two tokens later (a context checkpoint, §9.5) restores
    # the state and removes the attention positions after it; other sequences are untouched
    target = _decode(cfg, params, mem, [3, 4], [2, 2])[1]
    restored, status = jh.state_read(target, cfg, part, 2, flags=jh.StateFlags.PARTIAL_ONLY)
    assert status.ok, status.message
    assert _kv_content(restored.kv, cfg.kv) == _kv_content(mem.kv, cfg.kv)
    got = _recurrent_content(restored.recurrent, cfg.recurrent)[2]
    assert got == _recurrent_content(mem.recurrent, cfg.recurrent)[2]
    # A sequence that does not hold the state's position cannot take it (§15.1)
    empty = jh.init_hybrid(cfg)
    other, status = jh.state_read(empty, cfg, part, 2, flags=jh.StateFlags.PARTIAL_ONLY)
    assert other is empty and "§15.1" in status.message
    # Reading with other flags than it was written with is refused
    same, status = jh.state_read(target, cfg, part, 1)
    assert same is target and "flags" in status.message


def test_saved_size_is_the_rows_plus_small_metadata():
    cfg = _config(False)
    mem = _filled(cfg, hm.init_params(0), seed=2)
    pos = np.asarray(mem.kv.cells.pos)
    for s in range(N_SEQ):
        n_cells = int(np.sum(np.asarray(mem.kv.cells.seq)[:, :, s] & (pos >= 0)))
        kv_rows = n_cells * cfg.kv.n_layers * hm.N_KV * hm.HD * 4 * 2
        recr_rows = (
            cfg.recurrent.n_layers
            * 4
            * (int(np.prod(cfg.recurrent.r_shape)) + int(np.prod(cfg.recurrent.s_shape)))
        )
        size = len(jh.state_write(mem, cfg, s))
        overhead = size - kv_rows - recr_rows
        # Per cell: i32 pos, u32 n_seq_id, i32 id; plus the header, JSON description and layer
        # headers: a few hundred bytes whatever the sequence's length
        assert 0 < overhead <= 600 + 12 * n_cells, (s, size, overhead)


# --------------------------------------------------------------------------------------------
# Bad input: a clear status, the memory given back unchanged, and an exception from load_state


def _reseal(blob: bytes) -> bytes:
    """A blob with its checksum recomputed (to reach the checks behind it)."""
    body = blob[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _patch(blob: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(blob[:-4])
    struct.pack_into(fmt, b, offset, value)
    return _reseal(bytes(b) + b"\0\0\0\0")


def _desc_end(blob: bytes) -> int:
    (n,) = struct.unpack_from("<I", blob, 20)
    return 24 + n


@functools.cache
def _bad_blob_fixture():
    cfg = _config(True)
    mem = _filled(cfg, hm.init_params(0), seed=4)
    return cfg, mem, jh.state_write(mem, cfg), jh.state_write(mem, cfg, 1)


def _bad_cases():
    cfg, _, whole, one = _bad_blob_fixture()
    end = _desc_end(whole)
    other_cfg = _config(True, kv_size=8)
    return [
        ("truncated", whole[:-9], -1, cfg, "checksum"),
        ("extended", whole + b"\0", -1, cfg, "checksum"),
        ("bit flip", whole[:100] + bytes([whole[100] ^ 4]) + whole[101:], -1, cfg, "checksum"),
        ("empty", b"", -1, cfg, "too short"),
        ("magic", _reseal(b"XXXX" + whole[4:]), -1, cfg, "magic"),
        ("version", _patch(whole, 4, "<I", 99), -1, cfg, "version 99"),
        ("kind", _patch(whole, 8, "<I", 2), -1, cfg, "recurrent memory record"),
        ("whole as seq", whole, 2, cfg, "whole memory"),
        ("seq as whole", one, -1, cfg, "one sequence"),
        ("dest out of range", one, N_SEQ, cfg, "seq_id"),
        ("unified", whole, -1, _config(False), "'kv.unified'"),
        ("dtype", whole, -1, _config(True, jnp.bfloat16), "'kv.dtype_k'"),
        ("streams", _patch(whole, end, "<I", 7), -1, cfg, "7 streams"),
        ("count", _patch(whole, end + 4, "<I", 10**9), -1, cfg, "1000000000 cells"),
        ("over capacity", whole, -1, other_cfg, "this cache has 8"),
        ("negative pos", _patch(whole, end + 8, "<i", -3), -1, cfg, "position -3"),
        ("absurd ids", _patch(whole, end + 12, "<I", 2**31), -1, cfg, "2147483648 sequences"),
        ("id range", _patch(whole, end + 16, "<i", 77), -1, cfg, "outside"),
        ("junk", _reseal(whole[:-4] + b"abcd" + b"\0\0\0\0"), -1, cfg, "unexpected bytes"),
    ]


@pytest.mark.parametrize("case", range(19))
def test_bad_blobs_leave_memory_unchanged_and_say_why(case):
    name, blob, seq, cfg, needle = _bad_cases()[case]
    if cfg == _bad_blob_fixture()[0]:
        target = _filled(cfg, hm.init_params(0), seed=6)
    else:
        target = jh.init_hybrid(cfg)
    before = jax.tree.map(np.asarray, target)
    new, status = jh.state_read(target, cfg, blob, seq)
    assert not status.ok, name
    assert needle in status.message, (name, status.message)
    assert new is target and _trees_equal(jax.tree.map(jnp.asarray, before), target)
    with pytest.raises(jh.StateError, match="cannot restore state"):
        jh.load_state(target, cfg, blob, seq)


def test_crafted_records_are_refused():
    # Duplicate tails, a position held twice, and a sequence that does not fit
    cfg = jh.RecurrentConfig(n_seq_max=3, n_layers=1, r_shape=(2,), s_shape=(2,))
    mem = jh.recurrent.init_recurrent(cfg)
    for q in (0, 1):
        ub = jh.get_ubatch(
            b := jh.make_batch([1], pos=[0], seq_ids=[q], n_batch=2),
            jh.split_equal(b, n_ubatch=2, n_seq_max=3, sequential=True),
            0,
            n_ubatch=2,
            n_seq_max=3,
        )
        slot = jh.recurrent.find_slot(mem, ub, cfg)
        mem = jh.recurrent.apply_ubatch(mem, ub, slot, cfg)
        assert bool(slot.ok)
    blob = bytearray(jh.state_write(mem, cfg)[:-4])
    # cells are [pos=0, n=1, id=0] and [pos=0, n=1, id=1]: make the second one name seq 0
    off = _desc_end(bytes(blob)) + 4 + 12 + 8
    assert struct.unpack_from("<i", blob, off)[0] == 1
    struct.pack_into("<i", blob, off, 0)
    _, status = jh.state_read(mem, cfg, _reseal(bytes(blob) + b"\0\0\0\0"))
    assert "duplicate tail" in status.message

    kv_cfg = jh.KVConfig(kv_size=4, n_seq_max=2, head_dim_k=2)
    cache = jh.kv.init_kv_cache(kv_cfg)
    b = jh.make_batch([1, 2], pos=[0, 1], seq_ids=[0, 0], n_batch=2)
    plan = jh.split_simple(b, n_ubatch=2)
    ub = jh.get_ubatch(b, plan, 0, n_ubatch=2, n_seq_max=2)
    cache = jh.kv.apply_ubatch(cache, ub, jh.kv.find_slot(cache, ub, kv_cfg), kv_cfg)
    blob = bytearray(jh.state_write(cache, kv_cfg)[:-4])
    off = _desc_end(bytes(blob)) + 8 + 12  # second cell's position
    assert struct.unpack_from("<i", blob, off)[0] == 1
    struct.pack_into("<i", blob, off, 0)
    # One position in two cells of a sequence is what seq_div makes (as in llama.cpp): such a
    # record restores (§9.3.5)
    got, status = jh.state_read(cache, kv_cfg, _reseal(bytes(blob) + b"\0\0\0\0"))
    assert status.ok and np.asarray(got.cells.pos)[0, :2].tolist() == [0, 0]
    # A 2-cell sequence into a cache of 1 cell, or of 4 cells with 3 held by another sequence
    two = jh.state_write(cache, kv_cfg, 0)
    small_cfg = dataclasses.replace(kv_cfg, kv_size=1)
    _, status = jh.state_read(jh.kv.init_kv_cache(small_cfg), small_cfg, two, 1)
    assert "holds 2 cells, this cache has 1" in status.message
    b = jh.make_batch([1, 2, 3], pos=[0, 1, 2], seq_ids=[1, 1, 1], n_batch=3)
    ub = jh.get_ubatch(b, jh.split_simple(b, n_ubatch=3), 0, n_ubatch=3, n_seq_max=2)
    busy = jh.kv.init_kv_cache(kv_cfg)
    busy = jh.kv.apply_ubatch(busy, ub, jh.kv.find_slot(busy, ub, kv_cfg), kv_cfg)
    same, status = jh.state_read(busy, kv_cfg, two, 0)
    assert same is busy and "needs 2 cells, stream 0 has 1 free" in status.message


def test_pending_shift_must_be_applied_before_saving():
    cfg = _config(True)
    mem = _filled(cfg, hm.init_params(0), seed=0)
    mem, ok = jh.seq_add(mem, 2, 0, -1, 3, cfg)
    assert bool(ok)
    with pytest.raises(ValueError, match="pending K-shifts"):
        jh.state_write(mem, cfg, 2)
    jh.state_write(mem, cfg, 0)  # other sequences have no pending shift
    with pytest.raises(ValueError, match="seq_id"):
        jh.state_write(mem, cfg, N_SEQ)


def test_state_errors_are_jaxhybrid_errors_and_runtime_errors():
    # One base for every host-side exception (still a RuntimeError for existing handlers)
    assert issubclass(jh.StateError, jh.JaxHybridError)
    assert issubclass(jh.JaxHybridError, RuntimeError)
    cfg = _config(True)
    with pytest.raises(jh.JaxHybridError, match="cannot restore state: blob of 3 bytes"):
        jh.load_state(jh.init_hybrid(cfg), cfg, b"abc")


def test_state_files_carry_tokens_and_reject_other_files(tmp_path):
    cfg = _config(True)
    mem = _filled(cfg, hm.init_params(0), seed=0)
    path = tmp_path / "conv.jhs"
    n = jh.save_state_file(path, mem, cfg, 1, tokens=[5, 6, 7])
    assert n == path.stat().st_size
    restored, tokens = jh.load_state_file(path, jh.init_hybrid(cfg), cfg, 3)
    assert tokens.tolist() == [5, 6, 7]
    assert _kv_content(restored.kv, cfg.kv)[3] == _kv_content(mem.kv, cfg.kv)[1]
    bad = tmp_path / "bad.jhs"
    bad.write_bytes(b"not a state file")
    with pytest.raises(jh.StateError, match="not a jaxhybrid state file"):
        jh.load_state_file(bad, mem, cfg)
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(jh.StateError, match="checksum"):
        jh.load_state_file(bad, mem, cfg, 3)


# --------------------------------------------------------------------------------------------
# Fuzz: mutated valid blobs never crash, never restore partially


@functools.cache
def _fuzz_fixture():
    cfg = _config(False)
    mem = _filled(cfg, hm.init_params(0), seed=12)
    target = _filled(cfg, hm.init_params(0), seed=13)
    blobs = (jh.state_write(mem, cfg), jh.state_write(mem, cfg, 0))
    return cfg, target, jax.tree.map(np.asarray, target), blobs


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(
        st.just("u32"), st.integers(0, 10**6), st.sampled_from([0, 1, 2, 255, 2**31, 2**32 - 1])
    ),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(1, 64)),
)


def _mutate(blob: bytes, mutations, reseal: bool, records_only: bool = False) -> bytes:
    """``blob`` mutated; with ``records_only`` the mutations land after the description, in
    the records themselves."""
    b = bytearray(blob[:-4] if reseal else blob)
    start = _desc_end(blob) if records_only else 0
    for kind, where, arg in mutations:
        if len(b) <= start:
            break
        i = start + where % (len(b) - start)
        if kind == "flip":
            b[i] ^= 1 << arg
        elif kind == "byte":
            b[i] = arg
        elif kind == "u32":
            b[i : i + 4] = struct.pack("<I", arg)
        elif kind == "cut":
            del b[i:]
        else:
            b[i:i] = bytes(arg)
    return _reseal(bytes(b) + b"\0\0\0\0") if reseal else bytes(b)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    which=st.integers(0, 1),
    reseal=st.booleans(),
    records_only=st.booleans(),
    mutations=st.lists(_mutation, min_size=1, max_size=3),
)
def test_fuzzed_blobs_never_crash_or_restore_partially(which, reseal, records_only, mutations):
    cfg, target, before, blobs = _fuzz_fixture()
    seq = -1 if which == 0 else 2
    blob = _mutate(blobs[which], mutations, reseal, records_only)
    new, status = jh.state_read(target, cfg, blob, seq)
    if not status.ok:
        assert status.message
        assert new is target
        assert _trees_equal(jax.tree.map(jnp.asarray, before), target)
        return
    # Accepted (the mutation hit data or metadata that is still valid): a consistent memory
    _check_invariants(new, cfg)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == jax.tree.map(
        lambda a: (a.shape, a.dtype), target
    )
    if seq == -1:
        # A whole record is rebuilt exactly: saving again gives the same records (the
        # description may differ only in capacities, which restore does not copy)
        again = jh.state_write(new, cfg)
        assert again[_desc_end(again) : -4] == blob[_desc_end(blob) : -4]
