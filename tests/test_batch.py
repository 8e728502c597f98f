"""Batch layer (spec §6): validation, automatic positions and the three splits, compared with the
pure-Python reference in ``ref_batch.py`` on random batches, plus hand-written edge cases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ref_batch as ref

import jaxhybrid as jh
from jaxhybrid import _batch as jh_batch

N_SEQ_ID_MAX = 3
BUCKETS = [(8, 4), (16, 6)]  # (n_batch, n_seq_max): a few fixed shapes, one compile each
N_UBATCHES = [1, 3, 4]
N_VOCAB = 50

_validate = jax.jit(jh.validate, static_argnames=("n_seq_max", "n_vocab", "output_all"))
_split = jax.jit(jh.split, static_argnames=("kind", "n_ubatch", "n_seq_max", "sequential"))


# --------------------------------------------------------------------------------------------
# Random batches


def _random_case(rng: np.random.Generator, n_batch: int, n_seq_max: int):
    """A random batch (mostly valid, sometimes mutated to break one rule) and memory ranges."""
    mem_min = [-1] * n_seq_max
    mem_max = [-1] * n_seq_max
    for q in range(n_seq_max):
        if rng.random() < 0.5:
            mem_min[q] = int(rng.integers(0, 5))
            mem_max[q] = mem_min[q] + int(rng.integers(0, 6))
    seqs: list[list[int]] = []
    # A shared prompt: a group of sequences with equal memory, fed by multi-sequence tokens.
    if rng.random() < 0.5 and n_seq_max >= 2:
        group = [int(q) for q in rng.choice(n_seq_max, size=int(rng.integers(2, 4)), replace=False)]
        group = group[: min(len(group), N_SEQ_ID_MAX)]
        for q in group[1:]:
            mem_min[q], mem_max[q] = mem_min[group[0]], mem_max[group[0]]
        for _ in range(int(rng.integers(1, 4))):
            seqs.append(list(group))
            if rng.random() < 0.3:  # a nested sub-set continues the prompt for part of the group
                group = group[: max(1, len(group) - 1)]
    n_single = int(rng.integers(0 if seqs else 1, n_batch - len(seqs) + 1))
    active = [int(q) for q in rng.choice(n_seq_max, size=int(rng.integers(1, n_seq_max + 1)))]
    seqs += [[int(rng.choice(active))] for _ in range(n_single)]
    n = len(seqs)
    tokens = [int(t) for t in rng.integers(0, N_VOCAB, size=n)]
    auto = rng.random() < 0.4
    pos = None
    if not auto:
        nxt = {
            q: mem_max[q] + 1 if mem_max[q] >= 0 else int(rng.integers(0, 3))
            for q in range(n_seq_max)
        }
        pos = []
        for s in seqs:
            p = nxt[s[0]]
            pos.append(p)
            for q in s:
                nxt[q] = p + 1
    output = [bool(x) for x in rng.random(n) < 0.4]

    mutation = rng.integers(0, 14) if rng.random() < 0.4 else -1
    i = int(rng.integers(0, n)) if n else 0
    if mutation == 0:
        tokens[i] = int(rng.choice([-1, N_VOCAB, N_VOCAB + 7]))
    elif mutation == 1:
        seqs[i] = [*seqs[i][:-1], int(rng.choice([-1, n_seq_max, n_seq_max + 3]))]
    elif mutation == 2 and len(seqs[i]) < N_SEQ_ID_MAX:
        seqs[i] = [*seqs[i], seqs[i][0]]
    elif mutation == 3 and pos is not None:
        pos[i] = -int(rng.integers(1, 4))
    elif mutation == 4 and pos is not None:
        pos[i] += int(rng.choice([-2, -1, 1, 2]))
    elif mutation == 5 and pos is not None and n >= 2:
        j = int(rng.integers(0, n))
        pos[i], pos[j] = pos[j], pos[i]
    elif mutation == 6:
        q = seqs[i][0]
        mem_max[q] += int(rng.choice([-1, 1, 3]))
        mem_min[q] = min(mem_min[q], mem_max[q]) if mem_max[q] >= 0 else -1
    elif mutation == 7 and len(seqs[i]) < N_SEQ_ID_MAX:
        extra = [q for q in range(n_seq_max) if q not in seqs[i]]
        if extra:
            seqs[i] = [*seqs[i], int(rng.choice(extra))]
    elif mutation == 8:
        seqs[i] = []
    elif mutation == 9:
        n_extra = int(rng.integers(1, 4))
        seqs += [[0]] * n_extra
        tokens += [1] * n_extra
        output += [False] * n_extra
        if pos is not None:
            pos += list(range(10_000, 10_000 + n_extra))
    elif mutation == 10:
        seqs, tokens, output, pos = [], [], [], None if pos is None else []
    b = ref.RefBatch(tokens, seqs, pos, output, n_batch)
    return b, mem_min, mem_max


def _make(b: ref.RefBatch) -> jh.Batch:
    return jh.make_batch(
        np.asarray(b.tokens, np.int64),
        pos=b.pos,
        seq_ids=b.seqs,
        output=b.output,
        n_batch=b.n_batch,
        n_seq_id_max=N_SEQ_ID_MAX,
    )


def _plan_lists(plan: jh.UBatchPlan):
    n_ub = int(plan.n_ubatches)
    order = np.asarray(plan.order)
    ubs = [
        order[int(plan.start[u]) : int(plan.start[u]) + int(plan.n_tokens[u])].tolist()
        for u in range(n_ub)
    ]
    return (
        ubs,
        np.asarray(plan.n_seqs[:n_ub]).tolist(),
        np.asarray(plan.n_seq_tokens[:n_ub]).tolist(),
        bool(plan.complete),
        [int(x) for x in np.asarray(plan.out_ids) if x >= 0],
    )


def _ref_plan(b: ref.RefBatch, kind, n_ubatch: int, sequential: bool) -> ref.RefPlan:
    if kind == jh.SplitKind.SIMPLE:
        return ref.ref_split_simple(b.n, n_ubatch)
    if kind == jh.SplitKind.EQUAL:
        return ref.ref_split_equal(b.seqs, n_ubatch, sequential)
    return ref.ref_split_seq(b.seqs, n_ubatch)


SPLITS = [
    (jh.SplitKind.SIMPLE, False),
    (jh.SplitKind.EQUAL, False),
    (jh.SplitKind.EQUAL, True),
    (jh.SplitKind.SEQ, False),
]


@pytest.mark.parametrize(("n_batch", "n_seq_max"), BUCKETS)
def test_random_batches_match_reference(n_batch, n_seq_max):
    # Given hundreds of random batches (valid and broken ones) against random memory ranges
    rng = np.random.default_rng(1234 + n_batch)
    n_cases, n_valid, n_split = 250, 0, 0
    codes_seen = set()
    for _ in range(n_cases):
        b, mem_min, mem_max = _random_case(rng, n_batch, n_seq_max)
        # When validated by jaxhybrid and by the reference
        batch, check = _validate(
            _make(b),
            jnp.asarray(mem_min, jnp.int32),
            jnp.asarray(mem_max, jnp.int32),
            n_seq_max=n_seq_max,
            n_vocab=N_VOCAB,
        )
        pos, outputs, want = ref.ref_validate(
            b, mem_min, mem_max, n_seq_max=n_seq_max, n_vocab=N_VOCAB
        )
        got = (int(check.code), int(check.token), int(check.seq), int(check.expected))
        got += (int(check.found),)
        # Then the error code and every detail agree exactly
        assert got == (want.code, want.token, want.seq, want.expected, want.found), (b, got, want)
        codes_seen.add(want.code)
        if want.code != ref.OK:
            continue
        n_valid += 1
        assert np.asarray(batch.pos[: b.n]).tolist() == pos
        assert np.asarray(batch.output[: b.n]).tolist() == outputs
        # And every split of a valid batch matches the reference split
        for kind, sequential in SPLITS:
            n_ubatch = int(rng.choice(N_UBATCHES))
            plan = _split(
                batch, kind=kind, n_ubatch=n_ubatch, n_seq_max=n_seq_max, sequential=sequential
            )
            want_plan = _ref_plan(b, kind, n_ubatch, sequential)
            got_plan = _plan_lists(plan)
            want_lists = (
                want_plan.ubatches,
                want_plan.n_seqs,
                want_plan.n_seq_tokens,
                want_plan.complete,
                want_plan.out_ids(outputs) if want_plan.complete else got_plan[4],
            )
            assert got_plan == want_lists, (b, kind, sequential, n_ubatch)
            assert all(len(u) <= n_ubatch for u in got_plan[0])  # Q3 fixed
            n_split += 1
    # The generator exercises valid batches and most rules (guards against a vacuous test).
    assert n_valid >= n_cases // 3
    assert n_split >= 4 * n_valid
    assert len(codes_seen) >= 9, codes_seen


# --------------------------------------------------------------------------------------------
# Hand-written validation cases

E = jnp.full((4,), -1, jnp.int32)


def _check(batch, mem_min=E, mem_max=E, n_seq_max=4, n_vocab=N_VOCAB, **kw):
    return _validate(
        batch,
        jnp.asarray(mem_min, jnp.int32),
        jnp.asarray(mem_max, jnp.int32),
        n_seq_max=n_seq_max,
        n_vocab=n_vocab,
        **kw,
    )


@pytest.mark.parametrize(
    ("kwargs", "mem_max", "code", "message"),
    [
        (dict(tokens=[]), E, jh.BatchErrorCode.EMPTY, "no tokens"),
        (dict(tokens=[1] * 5), E, jh.BatchErrorCode.TOO_MANY_TOKENS, "limit 4, found 5"),
        (dict(tokens=[1, 99]), E, jh.BatchErrorCode.TOKEN_OUT_OF_RANGE, "token 1"),
        (dict(tokens=[1, 2], seq_ids=[0, []]), E, jh.BatchErrorCode.NO_SEQ_ID, "token 1"),
        (dict(tokens=[1], seq_ids=[7]), E, jh.BatchErrorCode.SEQ_ID_OUT_OF_RANGE, "seq 7"),
        (dict(tokens=[1], seq_ids=[[1, 1]]), E, jh.BatchErrorCode.DUPLICATE_SEQ_ID, "seq 1"),
        (dict(tokens=[1], pos=[-3]), E, jh.BatchErrorCode.POSITION_OUT_OF_RANGE, "position -3"),
        (
            dict(tokens=[1], pos=[2**31 - 1]),
            E,
            jh.BatchErrorCode.POSITION_OUT_OF_RANGE,
            "2147483647",
        ),
        (
            dict(tokens=[1, 2], pos=[4, 4]),
            E,
            jh.BatchErrorCode.POSITION_NOT_INCREASING,
            "token 1, seq 0, expected position 5, found 4",
        ),
        (
            dict(tokens=[1, 2], pos=[7, 8]),
            jnp.asarray([4, -1, -1, -1]),
            jh.BatchErrorCode.POSITION_NOT_CONSECUTIVE,
            "token 0, seq 0, expected position 5, found 7",
        ),
        (
            dict(tokens=[1, 2], pos=[0, 2]),
            E,
            jh.BatchErrorCode.POSITION_GAP,
            "token 1, seq 0, expected position 1, found 2",
        ),
        (
            dict(tokens=[1], seq_ids=[[0, 1]]),
            (jnp.asarray([0, 2, -1, -1]), jnp.asarray([3, 3, -1, -1])),
            jh.BatchErrorCode.COUPLED_DIVERGED,
            "seq 1, primary has 0, coupled sequence has 2",
        ),
        (
            dict(tokens=[1, 2], seq_ids=[[0, 1], [1, 2]], pos=[0, 1]),
            E,
            jh.BatchErrorCode.SEQ_SETS_NOT_NESTED,
            "token 1, seq 1, conflicts with token 0",
        ),
    ],
)
def test_each_rule_has_a_code_and_a_precise_message(kwargs, mem_max, code, message):
    # Given a batch that breaks exactly one rule
    batch = jh.make_batch(n_batch=4, n_seq_id_max=2, **kwargs)
    if isinstance(mem_max, tuple):
        mem_min, mem_max = mem_max
    else:
        mem_min = jnp.where(mem_max >= 0, 0, -1)
    # When it is validated
    _, check = _check(batch, mem_min, mem_max)
    # Then the code names the rule and the host helper raises with the details
    assert int(check.code) == code
    with pytest.raises(jh.BatchError, match=message) as info:
        jh.raise_for_check(check)
    assert info.value.code == code


def test_rules_are_tried_in_the_order_of_their_codes():
    # validate reports the first failing rule of its table: one rule per code, in code order
    assert [rule.code for rule in jh_batch._RULES] == list(jh.BatchErrorCode)[1:]
    # Given a token that breaks three rules (id, seq id, position)
    batch = jh.make_batch([N_VOCAB], pos=[-1], seq_ids=[9], n_batch=4)
    # Then the earliest is reported, with its own details
    check = _check(batch)[1]
    assert int(check.code) == jh.BatchErrorCode.TOKEN_OUT_OF_RANGE
    assert (int(check.token), int(check.expected), int(check.found)) == (0, N_VOCAB, N_VOCAB)
    # ... and without the token-id check (embeddings) the next one
    assert int(_check(batch, n_vocab=None)[1].code) == jh.BatchErrorCode.SEQ_ID_OUT_OF_RANGE


def test_batch_error_is_a_jaxhybrid_error_and_a_value_error():
    batch = jh.make_batch([1], pos=[-1], n_batch=4)
    with pytest.raises(
        jh.JaxHybridError, match=r"POSITION_OUT_OF_RANGE.*token 0.*found position -1"
    ):
        jh.raise_for_check(_check(batch)[1])
    assert issubclass(jh.BatchError, ValueError) and issubclass(jh.BatchError, RuntimeError)


def test_repeated_position_is_rejected_although_llama_cpp_accepts_it():
    # Given two tokens of sequence 0 at the same position (Q2: upstream lets it through)
    batch = jh.make_batch([1, 2], pos=[0, 0], n_batch=4)
    # Then the batch is refused
    assert int(_check(batch)[1].code) == jh.BatchErrorCode.POSITION_NOT_INCREASING


def test_shared_prompt_then_branches_is_valid():
    # Given a shared prompt {0,1} followed by tokens of 0 and of 1 (nested sets)
    batch = jh.make_batch([1, 2, 3, 4], seq_ids=[[0, 1], [0, 1], 0, 1], n_batch=4)
    # When validated with automatic positions
    batch, check = _check(batch)
    # Then it passes and both branches continue after the prompt
    assert int(check.code) == 0
    assert batch.pos.tolist() == [0, 1, 2, 2]


def test_automatic_positions_continue_memory_and_defaults():
    # Given memory holding positions 0..4 of seq 1 and a batch without positions or flags
    mem_max = jnp.asarray([-1, 4, -1, -1], jnp.int32)
    mem_min = jnp.asarray([-1, 0, -1, -1], jnp.int32)
    batch = jh.make_batch([1, 2, 3], seq_ids=[1, 0, 1], n_batch=4)
    # When validated
    batch, check = _check(batch, mem_min, mem_max)
    # Then positions continue each sequence and only the last token outputs (§6.2.3)
    assert int(check.code) == 0
    assert batch.pos.tolist()[:3] == [5, 0, 6]
    assert batch.output.tolist() == [False, False, True, False]


def test_output_all_forces_every_flag():
    batch = jh.make_batch([1, 2, 3], output=[True, False, False], n_batch=4)
    batch, check = _check(batch, output_all=True)
    assert int(check.code) == 0
    assert batch.output.tolist() == [True, True, True, False]


def test_make_batch_rejects_malformed_host_input():
    with pytest.raises(ValueError, match="exactly one of tokens and embd"):
        jh.make_batch()
    with pytest.raises(ValueError, match="seq_ids has 1 entries for 2 tokens"):
        jh.make_batch([1, 2], seq_ids=[0])
    with pytest.raises(ValueError, match="more than n_seq_id_max=1"):
        jh.make_batch([1], seq_ids=[[0, 1]], n_seq_id_max=1)


def test_embeddings_skip_the_token_check():
    batch = jh.make_batch(embd=np.ones((3, 5), np.float32), n_batch=4)
    _, check = _check(batch)
    assert int(check.code) == 0
    assert batch.embd.shape == (4, 5)


# --------------------------------------------------------------------------------------------
# Hand-written split cases


def _split_lists(batch, kind, n_ubatch, n_seq_max=4, sequential=False):
    batch, check = _check(batch, n_seq_max=n_seq_max)
    assert int(check.code) == 0
    plan = _split(batch, kind=kind, n_ubatch=n_ubatch, n_seq_max=n_seq_max, sequential=sequential)
    return _plan_lists(plan)


def test_empty_batch_cannot_be_split():
    batch = jh.make_batch([], n_batch=4)
    plan = jh.split(batch, jh.SplitKind.EQUAL, n_ubatch=2, n_seq_max=2)
    assert int(plan.n_ubatches) == 0
    assert not bool(plan.complete)


@pytest.mark.parametrize(("kind", "sequential"), SPLITS)
def test_one_token_is_one_ubatch(kind, sequential):
    ubs, n_seqs, n_seq_tokens, complete, out = _split_lists(
        jh.make_batch([3], n_batch=4), kind, 2, sequential=sequential
    )
    assert (ubs, n_seqs, n_seq_tokens, complete, out) == ([[0]], [1], [1], True, [0])


def test_more_disjoint_sets_than_n_ubatch_never_exceeds_it():
    # Given four single-token sequences and n_ubatch = 3 (Q3: upstream would build 4 tokens)
    batch = jh.make_batch([1, 2, 3, 4], seq_ids=[0, 1, 2, 3], n_batch=4)
    ubs, n_seqs, n_seq_tokens, complete, _ = _split_lists(batch, jh.SplitKind.EQUAL, 3)
    # Then the first ubatch holds three sets and the fourth comes next
    assert ubs == [[0, 1, 2], [3]]
    assert n_seqs == [3, 1]
    assert n_seq_tokens == [1, 1]
    assert complete


def test_overlapping_sets_never_share_a_ubatch():
    # Given a shared token {0,1} then tokens of {0}
    batch = jh.make_batch([1, 2, 3], seq_ids=[[0, 1], 0, 0], n_batch=4)
    ubs, n_seqs, _, complete, _ = _split_lists(batch, jh.SplitKind.EQUAL, 4)
    # Then {0,1} and {0} go to separate ubatches
    assert ubs == [[0], [1, 2]]
    assert n_seqs == [1, 1]
    assert complete


def test_sequential_split_of_seqs_0_and_2_takes_two_ubatches():
    # Given busy sequences {0, 2} (§6.6: sequential needs consecutive ids)
    batch = jh.make_batch([1, 2], seq_ids=[0, 2], n_batch=4)
    seq = _split_lists(batch, jh.SplitKind.EQUAL, 4, sequential=True)
    non_seq = _split_lists(batch, jh.SplitKind.EQUAL, 4, sequential=False)
    # Then the sequential split needs two ubatches, the non-sequential one (difference 5) one
    assert seq[0] == [[0], [1]]
    assert non_seq[0] == [[0, 1]]


def test_sequential_split_refuses_coupled_sequences():
    batch = jh.make_batch([1, 2], seq_ids=[[0, 1], 0], n_batch=4)
    ubs, _, _, complete, _ = _split_lists(batch, jh.SplitKind.EQUAL, 4, sequential=True)
    assert ubs == []
    assert not complete


def test_lock_step_equal_split_and_output_mapping():
    # Given seq 0 with 3 tokens and seq 1 with 2, outputs on tokens 2 and 3
    batch = jh.make_batch(
        [1, 2, 3, 4, 5], seq_ids=[0, 0, 1, 1, 0], output=[0, 0, 1, 1, 0], n_batch=8
    )
    ubs, n_seqs, n_seq_tokens, complete, out = _split_lists(batch, jh.SplitKind.EQUAL, 4)
    # Then two tokens per set go first (set 0 then set 1), the leftover token after
    assert ubs == [[0, 1, 2, 3], [4]]
    assert n_seqs == [2, 1]
    assert n_seq_tokens == [2, 1]
    assert out == [2, 3]
    assert complete


def test_split_seq_follows_narrowing_sets():
    batch = jh.make_batch([1, 2, 3, 4], seq_ids=[[0, 1], 1, 0, 1], n_batch=4)
    ubs, _, _, _, _ = _split_lists(batch, jh.SplitKind.SEQ, 4)
    assert ubs == [[0, 1, 3], [2]]


def test_get_ubatch_materialises_tokens_in_processing_order():
    batch = jh.make_batch([10, 11, 12, 13], seq_ids=[0, 1, 0, 1], n_batch=4)
    batch, _ = _check(batch)
    plan = jh.split_equal(batch, n_ubatch=4, n_seq_max=4, sequential=False)
    ub = jh.get_ubatch(batch, plan, 0, n_ubatch=4, n_seq_max=4)
    assert ub.token.tolist() == [10, 12, 11, 13]
    assert ub.pos.tolist() == [0, 1, 0, 1]
    assert ub.seq_set.tolist() == [0, 0, 1, 1]
    assert ub.primary.tolist() == [0, 0, 1, 1]
    padded = jh.get_ubatch(batch, plan, 3, n_ubatch=4, n_seq_max=4)
    assert not bool(padded.valid.any())
    assert int(padded.n_tokens) == 0


# --------------------------------------------------------------------------------------------
# Contract: jit == no-jit, no retrace


def test_jit_and_no_jit_agree():
    rng = np.random.default_rng(7)
    for _ in range(20):
        b, mem_min, mem_max = _random_case(rng, 8, 4)
        args = (_make(b), jnp.asarray(mem_min, jnp.int32), jnp.asarray(mem_max, jnp.int32))
        eager = jh.validate(*args, n_seq_max=4, n_vocab=N_VOCAB)
        jitted = _validate(*args, n_seq_max=4, n_vocab=N_VOCAB)
        jax.tree.map(np.testing.assert_array_equal, eager, jitted)
        if int(eager[1].code) == 0:
            for kind, sequential in SPLITS:
                kw = dict(kind=kind, n_ubatch=3, n_seq_max=4, sequential=sequential)
                jax.tree.map(
                    np.testing.assert_array_equal,
                    jh.split(eager[0], **kw),
                    _split(eager[0], **kw),
                )


def test_no_retrace_for_new_values_of_the_same_shapes():
    traces = []

    @functools.partial(jax.jit, static_argnames=("n_ubatch",))
    def plan_batch(batch, mem_min, mem_max, n_ubatch):
        traces.append(1)
        batch, check = jh.validate(batch, mem_min, mem_max, n_seq_max=4, n_vocab=N_VOCAB)
        return check, jh.split_equal(batch, n_ubatch=n_ubatch, n_seq_max=4, sequential=False)

    rng = np.random.default_rng(3)
    for _ in range(10):
        b, mem_min, mem_max = _random_case(rng, 8, 4)
        plan_batch(_make(b), jnp.asarray(mem_min), jnp.asarray(mem_max), n_ubatch=3)
    assert len(traces) == 1
