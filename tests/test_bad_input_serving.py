"""The serving layer validates, then acts (docs/semantics.md §15.5, §15.6): ``Engine``,
``generate`` and ``speculative_generate`` refuse every bad argument before any device work, with
a :class:`jaxhybrid.JaxHybridError` naming the argument, its value and the limit. A refused or
failed call leaves the engine's memory and bookkeeping bit-identical, so the next request does not
continue someone else's history.

The engines are small plug-in ones (``tests/hybrid_model.py``) of one config: the refusals compile
nothing, and the valid requests after them share one compile.

A property test (issue 22) runs random sequences of ``submit``, ``fork``, ``cancel``, ``step``,
``context_shift``, ``save`` and ``restore`` with valid arguments and bad ones of every Python and
NumPy kind, and checks after each that a refusal changed nothing and that the memory keeps the
invariants of §15.1-§15.4 (``tests/invariants.py``).
"""

from __future__ import annotations

import dataclasses

import hybrid_model as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from invariants import check_invariants

import jaxhybrid as jh
from jaxhybrid.serving import (
    Engine,
    EngineError,
    SavedRequest,
    generate,
    prefill,
    speculative_generate,
)

MODEL = hm.TinyHybridModel()
PARAMS = hm.init_params(seed=4)
KV_SIZE, N_SEQ, N_UBATCH, N_PROMPT, N_STOP = 32, 3, 8, 8, 2
CFG = MODEL.memory_config(kv_size=KV_SIZE, n_seq_max=N_SEQ)
SPEC_CFG = MODEL.memory_config(kv_size=KV_SIZE, n_seq_max=2, n_snapshots=2)
PROMPT, N_NEW = [3, 1, 4, 1, 5], 4
NAN, INF = float("nan"), float("inf")
BIG = 2**31  # one past int32


def _engine() -> Engine:
    return Engine(MODEL, PARAMS, CFG, n_ubatch=N_UBATCH, n_prompt=N_PROMPT, n_stop=N_STOP)


@pytest.fixture(scope="module")
def want() -> list[int]:
    """PROMPT's greedy continuation on a fresh engine."""
    eng = _engine()
    rid = eng.submit(PROMPT, N_NEW)
    eng.run()
    return eng.requests[rid].tokens


@pytest.fixture
def engine() -> Engine:
    """An engine with some history (each test its own; all share one compile)."""
    eng = _engine()
    eng.submit(PROMPT, 2)  # some history in memory and in the bookkeeping
    eng.run()
    return eng


def _snapshot(eng: Engine) -> dict:
    """Everything the engine holds, on the host: memory leaves as bytes, bookkeeping as copies."""
    return dict(
        mem=[(x.dtype, x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(eng.mem)],
        logits=None if eng._logits is None else np.asarray(eng._logits).tobytes(),
        requests={k: dataclasses.asdict(r) for k, r in eng.requests.items()},
        by_seq=list(eng._by_seq),
        next_id=repr(eng._ids),
    )


def _assert_refused(eng: Engine, call, error, message: str) -> None:
    """``call`` raises ``error`` matching ``message`` and changes nothing in ``eng``."""
    before = _snapshot(eng)
    with pytest.raises(error, match=message):
        call()
    after = _snapshot(eng)
    for key in before:
        assert after[key] == before[key], f"the refused call changed the engine's {key}"


def _assert_serves_cleanly(eng: Engine, want: list[int]) -> None:
    """A valid request after a refusal gets the tokens it gets on a fresh engine."""
    rid = eng.submit(PROMPT, N_NEW)
    eng.run()
    assert eng.requests[rid].tokens == want
    assert not eng.running()


NOT_INT = [
    (2.0, jh.InvalidTypeError, "must be an integer"),
    (True, jh.InvalidTypeError, "must be an integer"),
    (NAN, jh.InvalidTypeError, "must be an integer"),
    (np.float32(1.0), jh.InvalidTypeError, "must be an integer"),
    ("3", jh.InvalidTypeError, "must be an integer"),
]
OUT_OF_INT32 = [
    (BIG, jh.InvalidArgumentError, "outside int32"),
    (-BIG - 1, jh.InvalidArgumentError, "outside int32"),
    (np.int64(2**40), jh.InvalidArgumentError, "outside int32"),
]

SUBMIT_CASES = [
    # the prompt: integer token ids inside the vocabulary, at least one
    (dict(prompt=[1, 2.0]), jh.InvalidTypeError, r"prompt\[1\] must be an integer"),
    (dict(prompt=[1, True]), jh.InvalidTypeError, r"prompt\[1\] must be an integer"),
    (dict(prompt=[NAN]), jh.InvalidTypeError, r"prompt\[0\] must be an integer"),
    (dict(prompt=np.array([1.0, 2.0])), jh.InvalidTypeError, r"prompt\[0\]"),
    (dict(prompt=[1, BIG]), jh.InvalidArgumentError, r"prompt\[1\] = 2147483648"),
    (dict(prompt=[1, hm.VOCAB]), jh.InvalidArgumentError, r"prompt\[1\] = 17 .*vocabulary.*17"),
    (dict(prompt=[-1, 2]), jh.InvalidArgumentError, r"prompt\[0\] = -1 .*vocabulary"),
    (dict(prompt=[]), jh.InvalidArgumentError, "at least one token"),
    (dict(prompt=5), jh.InvalidTypeError, "prompt must be a sequence"),
    (dict(prompt=[1] * (KV_SIZE + 1)), jh.InvalidArgumentError, f"kv_size={KV_SIZE}"),
    # max_new_tokens: an integer in [1, int32]
    *[(dict(max_new_tokens=v), e, "max_new_tokens" + ".*" + m) for v, e, m in NOT_INT],
    *[(dict(max_new_tokens=v), e, "max_new_tokens" + ".*" + m) for v, e, m in OUT_OF_INT32],
    (dict(max_new_tokens=0), jh.InvalidArgumentError, "max_new_tokens = 0"),
    # stop tokens: integers inside int32, at most n_stop of them
    (dict(stop_tokens=[BIG]), jh.InvalidArgumentError, r"stop_tokens\[0\] = 2147483648"),
    (dict(stop_tokens=[2, 1.0]), jh.InvalidTypeError, r"stop_tokens\[1\] must be an integer"),
    (dict(stop_tokens=[True]), jh.InvalidTypeError, r"stop_tokens\[0\]"),
    (dict(stop_tokens=[1, 2, 3]), jh.InvalidArgumentError, f"n_stop={N_STOP}"),
    (dict(stop_tokens=7), jh.InvalidTypeError, "stop_tokens must be a sequence"),
    # sampling: a finite temperature (<= 0 is greedy), top_p in (0, 1], top_k and seed integers
    (dict(temperature=NAN), jh.InvalidArgumentError, "temperature = nan"),
    (dict(temperature=INF), jh.InvalidArgumentError, "temperature = inf"),
    (dict(temperature=True), jh.InvalidTypeError, "temperature must be a real number"),
    (dict(temperature="0.5"), jh.InvalidTypeError, "temperature must be a real number"),
    (dict(top_p=5.0), jh.InvalidArgumentError, r"top_p = 5.0 .*\(0, 1\]"),
    (dict(top_p=0.0), jh.InvalidArgumentError, r"top_p = 0.0"),
    (dict(top_p=-0.5), jh.InvalidArgumentError, r"top_p = -0.5"),
    (dict(top_p=NAN), jh.InvalidArgumentError, r"top_p = nan"),
    (dict(top_k=-3), jh.InvalidArgumentError, "top_k = -3"),
    *[(dict(top_k=v), e, "top_k" + ".*" + m) for v, e, m in NOT_INT + OUT_OF_INT32],
    *[(dict(seed=v), e, "seed" + ".*" + m) for v, e, m in NOT_INT + OUT_OF_INT32],
]


def _ids(case) -> str:
    return repr(case)[:40] if not isinstance(case, type) else case.__name__


@pytest.mark.parametrize("kwargs, error, message", SUBMIT_CASES, ids=_ids)
def test_submit_refuses_a_bad_argument_and_changes_nothing(engine, want, kwargs, error, message):
    # Given the engine's state, and a submit with one bad argument
    args = dict(prompt=PROMPT, max_new_tokens=N_NEW) | kwargs
    prompt, max_new = args.pop("prompt"), args.pop("max_new_tokens")
    # Then the submit is refused, the memory and the bookkeeping are bit-identical
    _assert_refused(engine, lambda: engine.submit(prompt, max_new, **args), error, message)
    # And the next valid request does not continue the refused prompt's history
    _assert_serves_cleanly(engine, want)


FORK_CASES = [
    (c[0], c[1], c[2])
    for c in SUBMIT_CASES
    if set(c[0]) & {"max_new_tokens", "stop_tokens", "temperature", "top_p", "top_k", "seed"}
]


@pytest.mark.parametrize("kwargs, error, message", FORK_CASES, ids=_ids)
def test_fork_refuses_a_bad_argument_and_changes_nothing(engine, want, kwargs, error, message):
    # Given a running parent, and a fork of it with one bad setting
    parent = engine.submit(PROMPT, N_NEW)
    _assert_refused(engine, lambda: engine.fork(parent, **kwargs), error, message)
    # Then the parent and the next request go on as on a fresh engine
    engine.run()
    assert engine.requests[parent].tokens == want
    _assert_serves_cleanly(engine, want)


@pytest.mark.parametrize(
    "request_id, error, message",
    [
        (10**6, jh.InvalidArgumentError, "no request 1000000"),
        (-1, jh.InvalidArgumentError, "no request -1"),
        (0.0, jh.InvalidTypeError, "request_id must be an integer"),
        (True, jh.InvalidTypeError, "request_id must be an integer"),
        (BIG, jh.InvalidArgumentError, "outside int32"),
    ],
    ids=_ids,
)
def test_request_ids_are_checked_by_every_request_operation(engine, request_id, error, message):
    # Given a running request (so that a wrong id could touch someone's sequence)
    running = engine.submit(PROMPT, N_NEW)
    calls = {
        "fork": lambda: engine.fork(request_id),
        "cancel": lambda: engine.cancel(request_id),
        "context_shift": lambda: engine.context_shift(request_id),
        "save": lambda: engine.save(request_id),
    }
    # Then every operation on a request refuses the id and changes nothing
    for name, call in calls.items():
        try:
            _assert_refused(engine, call, error, message)
        except BaseException as e:
            raise AssertionError(f"{name}({request_id!r})") from e
    engine.cancel(running)


def test_a_finished_request_cannot_be_forked_or_shifted(engine, want):
    rid = engine.submit(PROMPT, N_NEW)
    engine.run()
    for call in (lambda: engine.fork(rid), lambda: engine.context_shift(rid)):
        _assert_refused(engine, call, jh.InvalidArgumentError, f"request {rid} is not running")
    _assert_serves_cleanly(engine, want)


def test_context_shift_refuses_a_non_integer_discard(engine):
    rid = engine.submit(PROMPT, N_NEW)
    for bad, error in ((2.0, jh.InvalidTypeError), (BIG, jh.InvalidArgumentError)):
        _assert_refused(engine, lambda b=bad: engine.context_shift(rid, b), error, "n_discard")
    engine.cancel(rid)


def test_restore_refuses_a_record_that_does_not_fit_and_changes_nothing(engine, want):
    # Given a saved request, and copies of it with logits of another vocabulary or bad settings
    rid = engine.submit(PROMPT, N_NEW)
    saved = engine.save(rid)
    engine.cancel(rid)
    wrong_vocab = dataclasses.replace(saved, logits=np.zeros(hm.VOCAB + 1, np.float32))
    bad_top_k = dataclasses.replace(saved, request=dataclasses.replace(saved.request, top_k=BIG))
    # Then each restore is refused before the memory is touched
    cases = [
        (lambda: engine.restore(wrong_vocab), jh.InvalidArgumentError, "logits"),
        (lambda: engine.restore(bad_top_k), jh.InvalidArgumentError, "top_k"),
        (lambda: engine.restore(saved.data), jh.InvalidTypeError, "SavedRequest"),
        (lambda: engine.restore(saved, seq=1.0), jh.InvalidTypeError, "seq must be an integer"),
        (lambda: engine.restore(saved, seq=N_SEQ), jh.InvalidArgumentError, "not a free id"),
    ]
    for call, error, message in cases:
        _assert_refused(engine, call, error, message)
    # And the good record still restores to the request it was
    r = engine.restore(saved)
    engine.run()
    assert engine.requests[r].tokens == want
    _assert_serves_cleanly(engine, want)


def test_a_prompt_that_fails_midway_leaves_memory_bit_identical(want):
    # Given a fresh engine whose memory holds 24 of its 32 cells
    eng = _engine()
    eng.submit([1] * 24, N_NEW)
    # When a 16-token prompt (two chunks of 8) finds room for its first chunk only
    _assert_refused(eng, lambda: eng.submit([2] * 16, N_NEW), EngineError, "NO_SLOT")
    # Then nothing changed, and the engine goes on serving
    eng.run()
    _assert_serves_cleanly(eng, want)


def test_a_full_engine_refuses_and_changes_nothing(engine, want):
    ids = [engine.submit(PROMPT, N_NEW) for _ in range(N_SEQ)]
    _assert_refused(engine, lambda: engine.submit(PROMPT, N_NEW), EngineError, "no free sequence")
    _assert_refused(engine, lambda: engine.fork(ids[0]), EngineError, "no free sequence")
    engine.run()
    assert all(engine.requests[i].tokens == want for i in ids)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_ubatch=0), jh.InvalidArgumentError, "n_ubatch = 0"),
        (dict(n_ubatch=8.0), jh.InvalidTypeError, "n_ubatch must be an integer"),
        (dict(n_prompt=0), jh.InvalidArgumentError, "n_prompt = 0"),
        (dict(n_prompt=True), jh.InvalidTypeError, "n_prompt must be an integer"),
        (dict(n_prompt=KV_SIZE + 1), jh.InvalidArgumentError, f"n_prompt = 33 .*kv_size={KV_SIZE}"),
        (dict(n_stop=-1), jh.InvalidArgumentError, "n_stop = -1"),
        (dict(n_stop=2.5), jh.InvalidTypeError, "n_stop must be an integer"),
        (dict(n_stop=hm.VOCAB + 1), jh.InvalidArgumentError, f"n_stop = 18 .*n_vocab={hm.VOCAB}"),
        (dict(n_ctx_seq=8.0), jh.InvalidTypeError, "n_ctx_seq must be an integer"),
        (dict(n_ctx_seq=8, n_keep=1.0), jh.InvalidTypeError, "n_keep must be an integer"),
        (dict(cfg=CFG.kv), jh.InvalidTypeError, "HybridConfig"),
    ],
    ids=_ids,
)
def test_engine_refuses_bad_capacities(kwargs, error, message):
    args = dict(cfg=CFG, n_ubatch=N_UBATCH, n_prompt=N_PROMPT) | kwargs
    cfg = args.pop("cfg")
    with pytest.raises(error, match=message):
        Engine(MODEL, PARAMS, cfg, **args)


# -- generate -------------------------------------------------------------------------------------

GENERATE_CASES = [
    # sequence ids: integers in [0, n_seq_max), one per prompt, none twice
    (dict(seq_ids=[0, 0]), jh.InvalidArgumentError, r"seq_ids\[1\] = 0 .*twice"),
    (dict(seq_ids=[0, N_SEQ]), jh.InvalidArgumentError, rf"seq_ids\[1\] = {N_SEQ} .*\[0, 3\)"),
    (dict(seq_ids=[0, -1]), jh.InvalidArgumentError, r"seq_ids\[1\] = -1"),
    (dict(seq_ids=[0, 1.0]), jh.InvalidTypeError, r"seq_ids\[1\] must be an integer"),
    (dict(seq_ids=[0]), jh.InvalidArgumentError, "1 seq_ids for 2 prompts"),
    # prompts: integer token ids inside the vocabulary
    (dict(prompts=[[1], [2, hm.VOCAB]]), jh.InvalidArgumentError, r"prompts\[1\]\[1\] = 17 .*17"),
    (dict(prompts=[[1], [-1]]), jh.InvalidArgumentError, r"prompts\[1\]\[0\] = -1 .*vocabulary"),
    (dict(prompts=[[1.5], [2]]), jh.InvalidTypeError, r"prompts\[0\]\[0\] must be an integer"),
    (dict(prompts=[[BIG], [2]]), jh.InvalidArgumentError, r"prompts\[0\]\[0\] = 2147483648"),
    (dict(prompts=[]), jh.InvalidArgumentError, "at least one prompt"),
    (dict(prompts=[[1] * (KV_SIZE + 1), [2]]), jh.InvalidArgumentError, f"kv_size={KV_SIZE}"),
    # max_new_tokens: integers >= 0, for all or per sequence, that the memory can hold
    (dict(max_new_tokens=KV_SIZE + 1), jh.InvalidArgumentError, f"kv_size={KV_SIZE}"),
    (dict(max_new_tokens=10**9), jh.InvalidArgumentError, f"1000000000.*kv_size={KV_SIZE}"),
    (dict(max_new_tokens=[2, KV_SIZE + 1]), jh.InvalidArgumentError, r"max_new_tokens\[1\]"),
    (dict(max_new_tokens=2.0), jh.InvalidTypeError, "max_new_tokens must be an integer"),
    (dict(max_new_tokens=[2, True]), jh.InvalidTypeError, r"max_new_tokens\[1\] must be an"),
    (dict(max_new_tokens=-1), jh.InvalidArgumentError, "max_new_tokens = -1"),
    (dict(max_new_tokens=BIG), jh.InvalidArgumentError, "max_new_tokens = 2147483648"),
    (dict(max_new_tokens=[1, 2, 3]), jh.InvalidArgumentError, "3 max_new_tokens for 2"),
    # static capacities: integers the memory can use
    (dict(max_new=10**9, max_new_tokens=1), jh.InvalidArgumentError, f"max_new.*{KV_SIZE}"),
    (dict(max_new=1.5), jh.InvalidTypeError, "max_new must be an integer"),
    (dict(max_new=2, max_new_tokens=3), jh.InvalidArgumentError, "exceeds max_new=2"),
    (dict(n_prompt=10**9), jh.InvalidArgumentError, f"n_prompt = 1000000000 .*{KV_SIZE}"),
    (dict(n_prompt=2.0), jh.InvalidTypeError, "n_prompt must be an integer"),
    (dict(n_stop=10**9), jh.InvalidArgumentError, f"n_stop = 1000000000 .*n_vocab={hm.VOCAB}"),
    (dict(n_stop=2.0), jh.InvalidTypeError, "n_stop must be an integer"),
    (dict(n_ubatch=0), jh.InvalidArgumentError, "n_ubatch = 0"),
    (dict(cfg=CFG.kv), jh.InvalidTypeError, "HybridConfig"),
    # stop tokens and sampling settings, for all or per sequence
    (dict(stop_tokens=[BIG]), jh.InvalidArgumentError, r"stop_tokens\[0\] = 2147483648"),
    (dict(stop_tokens=[[1], [1.0]]), jh.InvalidTypeError, r"stop_tokens\[1\]\[0\]"),
    (dict(temperature=NAN), jh.InvalidArgumentError, "temperature = nan"),
    (dict(temperature=[0.5, INF]), jh.InvalidArgumentError, r"temperature\[1\] = inf"),
    (dict(top_p=5.0), jh.InvalidArgumentError, r"top_p = 5.0"),
    (dict(top_p=[1.0, NAN]), jh.InvalidArgumentError, r"top_p\[1\] = nan"),
    (dict(top_k=-3), jh.InvalidArgumentError, "top_k = -3"),
    (dict(top_k=[0, 2.0]), jh.InvalidTypeError, r"top_k\[1\] must be an integer"),
    (dict(top_k=[0, 1, 2]), jh.InvalidArgumentError, "3 top_k for 2"),
    (dict(seed=BIG), jh.InvalidArgumentError, "seed = 2147483648"),
    (dict(seed=[0, 1.5]), jh.InvalidTypeError, r"seed\[1\] must be an integer"),
]


@pytest.mark.parametrize("kwargs, error, message", GENERATE_CASES, ids=_ids)
def test_generate_refuses_a_bad_argument_before_touching_memory(kwargs, error, message):
    # Given a memory to generate in, and a call with one bad argument
    mem = jh.init_hybrid(CFG)
    args = dict(prompts=[[1, 2], [3]], cfg=CFG, n_ubatch=N_UBATCH, max_new_tokens=2) | kwargs
    prompts = args.pop("prompts")
    # Then it is refused before the memory is donated to any device work
    with pytest.raises(error, match=message):
        generate(MODEL, PARAMS, mem, prompts, **args)
    assert not any(x.is_deleted() for x in jax.tree.leaves(mem))


def test_prefill_reports_an_out_of_vocabulary_token_and_keeps_memory():
    # Given a memory holding a prompt (the jitted building block checks inside jit, with a code)
    eng = _engine()
    eng.submit(PROMPT, N_NEW)
    before = [np.asarray(x).tobytes() for x in jax.tree.leaves(eng.mem)]
    toks = np.zeros((1, N_PROMPT), np.int32)
    toks[0, :2] = [1, hm.VOCAB]
    _, mem, code = prefill(
        MODEL,
        PARAMS,
        eng.mem,
        jnp.asarray(toks),
        jnp.asarray([2], jnp.int32),
        jnp.asarray([1], jnp.int32),
        cfg=CFG,
        n_ubatch=N_UBATCH,
    )
    # Then the decode is refused and the memory returned bit-identical
    assert int(code) == jh.DecodeCode.INVALID_BATCH
    assert [np.asarray(x).tobytes() for x in jax.tree.leaves(mem)] == before


# -- speculative decoding ------------------------------------------------------------------------

SPECULATIVE_CASES = [
    (dict(k=1.0), jh.InvalidTypeError, "k must be an integer"),
    (dict(k=True), jh.InvalidTypeError, "k must be an integer"),
    (dict(k=0), jh.InvalidArgumentError, "k = 0"),
    (dict(k=BIG), jh.InvalidArgumentError, "k = 2147483648"),
    (dict(max_new_tokens=2.0), jh.InvalidTypeError, "max_new_tokens must be an integer"),
    (dict(max_new_tokens=0), jh.InvalidArgumentError, "max_new_tokens = 0"),
    (dict(max_new_tokens=BIG), jh.InvalidArgumentError, "max_new_tokens = 2147483648"),
    (dict(max_new_tokens=10**9), jh.InvalidArgumentError, f"1000000000.*kv_size={KV_SIZE}"),
    (dict(n_ubatch=0.5), jh.InvalidTypeError, "n_ubatch must be an integer"),
    (dict(n_prompt=10**9), jh.InvalidArgumentError, f"n_prompt = 1000000000 .*{KV_SIZE}"),
    (dict(prompts=[[1, hm.VOCAB]]), jh.InvalidArgumentError, r"prompts\[0\]\[1\] = 17"),
    (dict(prompts=[[1.0]]), jh.InvalidTypeError, r"prompts\[0\]\[0\] must be an integer"),
    (dict(prompts=[[1]] * 3), jh.InvalidArgumentError, "3 prompts .*n_seq_max=2"),
    (dict(prompts=[[1], []]), jh.InvalidArgumentError, "at least one token"),
    (dict(target_cfg=SPEC_CFG.kv), jh.InvalidTypeError, "HybridConfig"),
]


@pytest.mark.parametrize("kwargs, error, message", SPECULATIVE_CASES, ids=_ids)
def test_speculative_generate_refuses_a_bad_argument(kwargs, error, message):
    args = (
        dict(
            prompts=[[1, 2]],
            target_cfg=SPEC_CFG,
            draft_cfg=SPEC_CFG,
            k=2,
            max_new_tokens=4,
            n_ubatch=N_UBATCH,
        )
        | kwargs
    )
    prompts = args.pop("prompts")
    with pytest.raises(error, match=message):
        speculative_generate(MODEL, PARAMS, MODEL, PARAMS, prompts, **args)


# -- the property: random operations with valid and invalid arguments (issue 22) -----------------

F32_MAX = float(np.finfo(np.float32).max)
# What a careless caller passes where a number is due: every Python and NumPy kind
WEIRD = [1.5, True, np.float32(2.0), NAN, INF, np.bool_(True), BIG, -BIG - 1, np.int64(2**40)]
WEIRD += ["1", None, [1], -1]
ARG_ERRORS = (jh.InvalidTypeError, jh.InvalidArgumentError)
N_OPS = 60
OPS = ["submit"] * 5 + ["fork"] * 4 + ["step"] * 3 + ["cancel"] * 2 + ["context_shift"] * 2
OPS += ["save"] * 2 + ["restore"] * 2


def _scalar(v):
    return v[()] if isinstance(v, np.ndarray) and v.shape == () else v


def _is_int(v, lo: int = -BIG, hi: int = BIG) -> bool:
    """``v`` is an integer argument in ``[lo, hi)``: no bool, no float, inside int32 (§15.6)."""
    v = _scalar(v)
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) and lo <= v < hi


def _is_real(v, lo: float = -F32_MAX, hi: float = F32_MAX) -> bool:
    """``v`` is a real-number argument (an int or a float, no bool) in ``[lo, hi]``."""
    v = _scalar(v)
    real = isinstance(v, int | float | np.integer | np.floating)
    return real and not isinstance(v, bool | np.bool_) and lo <= v <= hi


def _is_list(v, item, n_min: int, n_max: int) -> bool:
    """``v`` is a 1-D sequence of ``n_min`` to ``n_max`` entries that ``item`` accepts."""
    if not isinstance(v, list | tuple | np.ndarray) or np.asarray(v, object).ndim != 1:
        return False
    return n_min <= len(v) <= n_max and all(item(x) for x in v)


def _an_int(rng, v: int):
    """``v`` as a Python int, a NumPy integer or a 0-d array (the engine takes each as it is)."""
    return [v, np.int32(v), np.int64(v), np.array(v, np.int32)][rng.integers(4)]


def _a_real(rng, v: float):
    return [v, np.float32(v), np.float64(v)][rng.integers(3)]


def _is_flags(x) -> bool:
    return _is_int(x, 0, 8) and int(_scalar(x)) & ~5 == 0  # PARTIAL_ONLY | SNAPSHOTS


def _optional(ok):
    return lambda x: x is None or ok(x)


def _settings(rng, optional: bool) -> dict:
    """Slots ``name: (valid value, check, extra bad values)`` of a request's settings (for a fork
    each may be None: the parent's)."""
    wrap = _optional if optional else (lambda ok: ok)
    stops = [_an_int(rng, int(t)) for t in rng.integers(0, hm.VOCAB, rng.integers(0, N_STOP + 1))]
    return {
        "max_new_tokens": (
            _an_int(rng, int(rng.integers(1, 5))),
            wrap(lambda x: _is_int(x, 1)),
            [0],
        ),
        "stop_tokens": (
            stops,
            wrap(lambda x: _is_list(x, _is_int, 0, N_STOP)),
            [[1] * (N_STOP + 1), [1.0], [[1]]],
        ),
        "temperature": (_a_real(rng, float(rng.choice([0.0, 0.8, -1.0]))), wrap(_is_real), []),
        "top_k": (_an_int(rng, int(rng.integers(0, 5))), wrap(lambda x: _is_int(x, 0)), [-3]),
        "top_p": (
            _a_real(rng, float(rng.choice([1.0, 0.9, 0.5]))),
            wrap(lambda x: _is_real(x, 0.0, 1.0) and _scalar(x) > 0),
            [0.0, -0.5, 1.0 + 1e-6],
        ),
        "seed": (
            None if rng.random() < 0.5 else _an_int(rng, int(rng.integers(-5, 100))),
            _optional(_is_int),
            [],
        ),
    }


def _draw(rng, eng: Engine, saved: list) -> tuple:
    """A random operation on ``eng``: ``(name, args, kwargs, valid, errors)``: ``valid`` whether
    every argument is one the operation takes, ``errors`` what refuses an invalid one. Most draws
    are valid; about a third put one bad value of some kind in one slot."""
    ids, running = list(eng.requests), [r.id for r in eng.running()]
    finished = [i for i in ids if i not in running]
    free = [s for s, r in enumerate(eng._by_seq) if r is None]
    op = str(rng.choice(OPS))
    if rng.random() < 0.5:  # fewer draws that the engine's state refuses whatever the arguments
        if not free and op in ("submit", "fork", "restore"):
            op = "step"
        elif not running and op in ("fork", "context_shift", "save"):
            op = "submit"
    unknown = [len(ids) + 7, 10**6]  # request ids count up from 0

    def request_id(pool):
        v = _an_int(rng, int(rng.choice(pool))) if pool else unknown[0]
        return (v, lambda x: _is_int(x) and int(_scalar(x)) in pool, unknown + finished[-1:])

    slots, positional, errors = {}, [], ARG_ERRORS
    if op == "submit":
        n = int(rng.integers(1, 2 * N_PROMPT + 1))  # one or two prefill chunks
        prompt = [_an_int(rng, int(t)) for t in rng.integers(0, hm.VOCAB, n)]
        if rng.random() < 0.3:
            prompt = np.asarray(prompt, [np.int32, np.int64][rng.integers(2)])
        bad = [[], [1] * (KV_SIZE + 1), np.array([1.0, 2.0]), np.zeros((2, 2), np.int32)]
        slots["prompt"] = (
            prompt,
            lambda x: _is_list(x, lambda t: _is_int(t, 0, hm.VOCAB), 1, KV_SIZE),
            [*bad, [1, hm.VOCAB], [10**6]],
        )
        slots |= _settings(rng, optional=False)
        positional = ["prompt", "max_new_tokens"]
    elif op == "fork":
        slots["request_id"] = request_id(running)
        slots |= _settings(rng, optional=True)
        positional = ["request_id"]
    elif op == "cancel":
        slots["request_id"] = request_id(ids)
        positional = ["request_id"]
    elif op == "context_shift":
        slots["request_id"] = rid = request_id(running)
        n_left = eng.requests[int(_scalar(rid[0]))].n_past - eng.n_keep if running else 0
        n_discard = None if rng.random() < 0.4 or n_left < 2 else int(rng.integers(1, n_left))
        slots["n_discard"] = (
            n_discard,
            lambda x: n_left >= 2 if x is None else _is_int(x, 1, n_left),
            [0, n_left, n_left + 5],
        )
        positional = ["request_id", "n_discard"]
    elif op == "save":
        slots["request_id"] = request_id(running)
        slots["flags"] = (int(rng.choice([0, jh.StateFlags.PARTIAL_ONLY])), _is_flags, [2, 8])
        positional = ["request_id"]
    elif op == "restore":
        record, flags = saved[rng.integers(len(saved))] if saved else (None, 0)
        bad = []
        if record is not None:
            bad = [
                record.data,
                dataclasses.replace(record, logits=np.zeros(hm.VOCAB + 1, np.float32)),
                dataclasses.replace(record, request=dataclasses.replace(record.request, top_k=BIG)),
                dataclasses.replace(record, data=record.data[:-1]),
                dataclasses.replace(record, data=record.data[:40] + b"\x7f" + record.data[41:]),
            ]
        slots["saved"] = (record, lambda x: any(x is r for r, _ in saved), bad)
        seq = None if rng.random() < 0.6 or not free else int(rng.choice(free))
        busy = [s for s in range(N_SEQ) if s not in free]
        slots["seq"] = (
            seq,
            _optional(lambda x: _is_int(x, 0, N_SEQ) and int(_scalar(x)) in free),
            [N_SEQ, *busy[:1]],
        )
        # mostly the flags the record was written with (other ones: a StateError)
        slots["flags"] = (flags if rng.random() < 0.8 else 1 - flags, _is_flags, [2, 8])
        positional = ["saved"]
    # Make one slot bad: a weird value, an out-of-range one, or one bad entry of a list
    if slots and rng.random() < 0.35:
        name = str(rng.choice(list(slots)))
        value, ok, extra = slots[name]
        if isinstance(value, list) and value and rng.random() < 0.5:
            value = list(value)
            value[rng.integers(len(value))] = WEIRD[rng.integers(len(WEIRD))]
        else:
            pool = WEIRD + extra
            value = pool[rng.integers(len(pool))]
        slots[name] = (value, ok, extra)
        errors = jh.JaxHybridError if name == "saved" else ARG_ERRORS
    elif op in ("submit", "fork", "save", "restore"):  # leave some keywords out
        keep = set(positional) | {k for k in slots if rng.random() < 0.5}
        slots = {k: v for k, v in slots.items() if k in keep}
    args = tuple(slots[k][0] for k in positional)
    kwargs = {k: v[0] for k, v in slots.items() if k not in positional}
    valid = all(ok(v) for v, ok, _ in slots.values())
    return op, args, kwargs, valid, errors


def _short(v) -> str:
    if isinstance(v, SavedRequest):
        return f"<saved request {v.request.id}, {len(v.data)} bytes>"
    return repr(v)[:80]


def _random_operations(seed: int, n_ops: int) -> tuple[Engine, dict[tuple[str, str], int]]:
    """Runs ``n_ops`` random operations on a new engine (the module's compile), checking after
    each that a refusal changed nothing and that the memory keeps every invariant; returns the
    engine and how often each operation succeeded (``"ok"``) or was refused (the error's name)."""
    rng = np.random.default_rng(seed)
    eng = _engine()
    saved: list = []  # (record, flags) of every save
    outcomes: dict[tuple[str, str], int] = {}
    for i in range(n_ops):
        op, args, kwargs, valid, errors = _draw(rng, eng, saved)
        shown = [*map(_short, args), *(f"{k}={_short(v)}" for k, v in kwargs.items())]
        what = f"op {i}: {op}({', '.join(shown)})"
        before = _snapshot(eng)
        try:
            out = getattr(eng, op)(*args, **kwargs)
        except jh.JaxHybridError as e:  # anything else fails the test
            # A refusal (a bad argument, or no room) changed nothing, bit for bit (§15.5)
            after = _snapshot(eng)
            changed = [k for k in before if after[k] != before[k]]
            assert not changed, f"{what} raised {e!r} and changed the engine's {changed}"
            # and a bad argument is refused for what it is, before the engine looks for room
            assert valid or isinstance(e, errors), f"{what}: a bad argument refused as {e!r}"
            outcome = type(e).__name__
        else:
            assert valid, f"{what} took a bad argument"
            outcome = "ok"
            if op == "save":  # saving changes nothing either
                assert _snapshot(eng) == before, what
                saved.append((out, kwargs.get("flags", 0)))
        outcomes[op, outcome] = outcomes.get((op, outcome), 0) + 1
        # After every operation the memory keeps every invariant (§15.1-§15.4)
        check_invariants(eng.mem, CFG)
    return eng, outcomes


@pytest.mark.parametrize("seed", range(16))
def test_random_engine_operations_keep_every_invariant(want, seed):
    # Given random operations on one engine, with valid arguments and bad ones of every kind
    # When each runs, Then a refusal changed nothing and every invariant holds (checked inside)
    eng, outcomes = _random_operations(seed, N_OPS)
    # And successes and refusals of submit and fork were both exercised (not passing vacuously)
    for op in ("submit", "fork"):
        assert outcomes.get((op, "ok"), 0) > 0, (op, outcomes)
        assert sum(n for (o, w), n in outcomes.items() if o == op and w != "ok"), (op, outcomes)
    # And the engine drains (a step refused for want of cells is answered by a cancel) ...
    while eng.running():
        before = _snapshot(eng)
        try:
            eng.step()
        except EngineError as e:
            assert _snapshot(eng) == before, f"the refused step changed the engine: {e!r}"
            eng.cancel(eng.running()[-1].id)
        check_invariants(eng.mem, CFG)
    eng.run()
    # ... leaks no cell, and serves the next request as a fresh engine does
    assert not np.any(np.asarray(eng.mem.kv.cells.seq))
    assert not np.any(np.asarray(eng.mem.recurrent.cells.seq))
    _assert_serves_cleanly(eng, want)
    check_invariants(eng.mem, CFG)
