"""The serving layer is generic over the model plug-in: ``generate``, the ``Engine`` (join, fork,
cancel, context shift, save/restore) and speculative decoding run two different models through
the same code, Jamba (Flax NNX, Mamba + attention without positions) and the plain-JAX test model
of ``tests/hybrid_model.py`` (a diagonal recurrence + attention with RoPE).

Each model's greedy tokens are checked against a reference that does not use the serving layer:
Jamba's :class:`~jaxhybrid.models.DenseMemory` path and the test model's cache-free
``direct_logits``.
"""

from __future__ import annotations

import dataclasses

import hybrid_model as hm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax.nnx")

import jamba_utils as ju

import jaxhybrid as jh
from jaxhybrid.models import JambaConfig, JambaModel, init_jamba
from jaxhybrid.serving import Engine, generate, speculative_generate

N_SEQ = 4
N_UBATCH = 8
N_NEW = 6
K = 3  # drafts per round: rollbacks of depth 1..3 (n_snapshots = K)
PROMPTS = [[5, 11, 3, 9, 2, 7, 1], [4, 8, 15, 16], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    name: str
    model: jh.HybridModel
    params: object
    greedy: object  # greedy(prompt, n) -> n tokens, without the serving layer
    draft_noise: float  # weight noise of a speculative draft that the target partly agrees with


def _jamba_case() -> Case:
    config = JambaConfig(**ju.MOE_GQA)
    params = init_jamba(config, seed=3)

    def greedy(prompt, n):
        return ju.dense_greedy(config, params, prompt, n)

    return Case("jamba", JambaModel(config), params, greedy, 0.01)


def _tiny_case() -> Case:
    params = hm.init_params(seed=4)

    def greedy(prompt, n):
        toks = list(prompt)
        for _ in range(n):
            logits = hm.direct_logits(
                params, toks, range(len(toks)), [True] * len(toks), hm.ModelSpec()
            )
            toks.append(int(np.argmax(logits[-1])))
        return toks[len(prompt) :]

    return Case("tiny", hm.TinyHybridModel(), params, greedy, 0.2)


@pytest.fixture(scope="module", params=["jamba", "tiny"])
def case(request) -> Case:
    return _jamba_case() if request.param == "jamba" else _tiny_case()


_WANT: dict = {}


def want(case: Case, prompt, n: int = N_NEW) -> list[int]:
    """The reference greedy continuation (cached per model, prompt and length)."""
    key = (case.name, tuple(prompt), n)
    if key not in _WANT:
        _WANT[key] = case.greedy(list(prompt), n)
    return _WANT[key]


def _cfg(case: Case, **kw) -> jh.HybridConfig:
    return case.model.memory_config(kv_size=64, n_seq_max=N_SEQ, **kw)


def test_generate_runs_any_plug_in(case):
    # Given greedy generation of three prompts at once through the plug-in
    cfg = _cfg(case)
    out = generate(
        case.model,
        case.params,
        jh.init_hybrid(cfg),
        PROMPTS,
        cfg=cfg,
        n_ubatch=N_UBATCH,
        max_new_tokens=N_NEW,
    )
    # Then every sequence's tokens are the model's own greedy continuation
    assert int(out.code) == jh.DecodeCode.OK
    for s, prompt in enumerate(PROMPTS):
        assert np.asarray(out.tokens[s]).tolist() == want(case, prompt), s


def test_engine_join_fork_cancel_save_restore(case):
    cfg = _cfg(case)
    eng = Engine(case.model, case.params, cfg, n_ubatch=N_UBATCH, n_prompt=16)
    # Given a request and a fork of it after two tokens, and a second request cancelled early
    a = eng.submit(PROMPTS[0], N_NEW)
    eng.step()
    eng.step()
    b = eng.fork(a)
    c = eng.submit(PROMPTS[1], N_NEW)
    eng.step()
    eng.cancel(c)
    # When a is saved, cancelled, and restored into another sequence id
    saved = eng.save(a)
    eng.cancel(a)
    r = eng.restore(saved)
    eng.run()
    reqs = eng.requests
    # Then the fork continues from the parent's third token (its own 6 new ones), and the
    # restored request exactly as the parent would have
    assert reqs[b].tokens == want(case, PROMPTS[0], N_NEW + 2)[2:]
    assert reqs[r].tokens == want(case, PROMPTS[0])
    assert reqs[c].tokens == want(case, PROMPTS[1])[:1]
    # And every finished request freed its sequence
    assert all(x.done and x.seq == -1 for x in reqs.values())
    assert (np.asarray(jh.seq_pos_range(eng.mem, cfg)[1]) == -1).all()


def test_engine_context_shift(case):
    cfg = _cfg(case)
    n_ctx = 12
    eng = Engine(case.model, case.params, cfg, n_ubatch=N_UBATCH, n_prompt=16, n_ctx_seq=n_ctx)
    # Given a request whose prompt and tokens outgrow its context of 12 positions
    prompt = PROMPTS[2]
    a = eng.submit(prompt, 8)
    seen = []
    while eng.running():
        eng.step()
        req = eng.requests[a]
        if req.seq >= 0:
            seen.append((req.n_past, int(jh.seq_pos_max(eng.mem, req.seq, cfg))))
    req = eng.requests[a]
    # Then it was shifted and finished, and before the shift it was the greedy continuation
    assert req.n_shifts >= 1 and len(req.tokens) == 8
    assert req.tokens[: n_ctx - len(prompt) + 1] == want(case, prompt, 8)[: n_ctx - len(prompt) + 1]
    # And memory always held exactly the positions the engine counted
    assert all(hi == n_past - 1 and n_past <= n_ctx for n_past, hi in seen), seen


def test_speculative_decoding_equals_greedy(case):
    cfg = _cfg(case, n_snapshots=K)
    rng = np.random.default_rng(1)

    def perturb(p):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return p + case.draft_noise * jnp.asarray(rng.standard_normal(p.shape), p.dtype)

    # Given a draft of the same family with perturbed weights
    draft = jax.tree.map(perturb, case.params)
    out = speculative_generate(
        case.model,
        case.params,
        case.model,
        draft,
        PROMPTS[:2],
        target_cfg=cfg,
        draft_cfg=cfg,
        k=K,
        max_new_tokens=N_NEW,
        n_ubatch=N_UBATCH,
    )
    # Then its tokens are the target's greedy ones, drafts accepted and rejected on the way
    assert int(out.code) == jh.DecodeCode.OK
    for s, prompt in enumerate(PROMPTS[:2]):
        assert np.asarray(out.tokens[s]).tolist() == want(case, prompt), s
    assert 0 < int(out.n_accepted) < int(out.n_drafted), (out.n_accepted, out.n_drafted)


def test_speculative_decoding_refuses_a_model_without_per_token_states(case):
    @dataclasses.dataclass(frozen=True)
    class NoStates:
        inner: jh.HybridModel
        per_token_states: bool = False

        def __getattr__(self, name):
            return getattr(self.inner, name)

    cfg = _cfg(case, n_snapshots=K)
    weak = NoStates(case.model)
    with pytest.raises(ValueError, match="per-token recurrent states"):
        speculative_generate(
            weak,
            case.params,
            case.model,
            case.params,
            PROMPTS[:1],
            target_cfg=cfg,
            draft_cfg=cfg,
            k=K,
            max_new_tokens=2,
            n_ubatch=N_UBATCH,
        )
