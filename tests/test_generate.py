"""Jamba on the hybrid memory: prefill parity with DenseMemory, jitted generation (greedy and
sampled, stop tokens, lengths, batching independence, no retrace) and the continuous-batching
engine (submit / fork / cancel / finish).

One tiny seeded model and one hybrid config are shared by every test, so each jitted function
compiles once for the whole module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax.nnx")

import jamba_utils as ju

import jaxhybrid as jh
from jaxhybrid.models import (
    HybridModelMemory,
    JambaConfig,
    JambaModel,
    ModelMemory,
    init_jamba,
    jamba_hybrid_config,
)
from jaxhybrid.serving import Engine, EngineError, decode_tokens, generate, prefill
from jaxhybrid.serving import _engine as ENG
from jaxhybrid.serving import _generate as GEN

N_SEQ = 4
N_UBATCH = 8
KV_SIZE = 96
CAP = dict(max_new=8, n_prompt=12, n_stop=2)  # generate()'s static capacities, shared
PROMPTS = [[5, 17, 99, 3, 64, 21, 8], [42, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [77]]


@pytest.fixture(scope="module")
def setup():
    config = JambaConfig(**ju.MOE_GQA)
    model = init_jamba(config, seed=3)
    jm = JambaModel(config)
    cfg = jm.memory_config(kv_size=KV_SIZE, n_seq_max=N_SEQ)
    # The plug-in's layout is the Jamba config's own
    assert cfg == jamba_hybrid_config(config, kv_size=KV_SIZE, n_seq_max=N_SEQ)
    return config, model, cfg, jm


def _gen(setup, prompts, **kw):
    _, model, cfg, jm = setup
    kw.setdefault("max_new_tokens", CAP["max_new"])
    out = generate(jm, model, jh.init_hybrid(cfg), prompts, cfg=cfg, n_ubatch=N_UBATCH, **CAP, **kw)
    assert int(out.code) == 0
    return np.asarray(out.tokens), np.asarray(out.lengths)


# --------------------------------------------------------------------------------------------
# The adapter


def test_adapter_is_a_model_memory_pytree(setup):
    config, _, cfg, _ = setup
    # Given the hybrid layout of a Jamba config
    # Then Mamba layers are recurrent with Jamba's state shapes, attention layers are KV
    assert cfg.recurrent_layers == config.mamba_layers
    assert cfg.attn_layers == config.attention_layers
    assert cfg.recurrent.r_shape == (config.mamba_d_conv - 1, config.d_inner)
    assert cfg.recurrent.s_shape == (config.d_inner, config.mamba_d_state)
    assert (cfg.kv.n_kv_heads, cfg.kv.head_dim_k) == (2, config.head_dim)
    # And the bound memory implements the protocol, with the config as static metadata
    mem = jh.init_hybrid(cfg)
    place = jh.Placement(None, None, None, jnp.zeros(N_UBATCH, jnp.int32), None)
    bound = HybridModelMemory(mem=mem, place=place, n_seqs=jnp.int32(0), cfg=cfg)
    assert isinstance(bound, ModelMemory)

    leaves, treedef = jax.tree.flatten(bound)
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert jax.tree.unflatten(treedef, leaves).cfg is cfg


def test_prefill_logits_equal_dense_memory(setup):
    config, model, cfg, jm = setup
    # Given four prompts decoded together, in ubatches of 8, through the hybrid memory
    p = CAP["n_prompt"]
    toks = np.zeros((N_SEQ, p), np.int32)
    for i, pr in enumerate(PROMPTS):
        toks[i, : len(pr)] = pr
    lens = np.array([len(x) for x in PROMPTS], np.int32)
    logits, _, code = prefill(
        jm,
        model,
        jh.init_hybrid(cfg),
        jnp.asarray(toks),
        jnp.asarray(lens),
        jnp.arange(N_SEQ, dtype=jnp.int32),
        cfg=cfg,
        n_ubatch=N_UBATCH,
        output_all=True,
    )
    assert int(code) == 0
    logits = np.asarray(logits)
    # And the same prompts through DenseMemory in differently cut ubatches
    dense = ju.new_memory(config, n_seq_max=N_SEQ, n_ctx=32, n_ubatch=16)
    ref, _ = ju.run_ubatches(model, dense, ju.prefill_plan(PROMPTS, lambda s, d: 5, 16))
    # Then every token's logits agree to 1e-5
    for s, pr in enumerate(PROMPTS):
        want = ju.seq_logits(ref, s, len(pr))
        np.testing.assert_allclose(logits[s, : len(pr)], want, atol=1e-5, rtol=0)
    # And the hybrid memory holds each prompt
    assert np.abs(logits).max() > 0.1


# --------------------------------------------------------------------------------------------
# generate


def test_greedy_generate_equals_dense_and_stepwise_decoding(setup):
    config, model, cfg, jm = setup
    # Given greedy generation of 8 tokens for two prompts at once
    got, lens = _gen(setup, [*PROMPTS[:2], [], []])
    assert lens.tolist() == [8, 8, 0, 0]
    assert (got[2:] == -1).all()
    # Then it equals greedy decoding through DenseMemory
    for s in range(2):
        assert got[s].tolist() == ju.dense_greedy(config, model, PROMPTS[s], 8)
    # And it equals stepping decode_tokens by hand on the hybrid memory
    mem = jh.init_hybrid(cfg)
    toks = np.zeros((2, CAP["n_prompt"]), np.int32)
    for i in range(2):
        toks[i, : len(PROMPTS[i])] = PROMPTS[i]
    ids = jnp.arange(2, dtype=jnp.int32)
    lens2 = jnp.asarray([len(PROMPTS[0]), len(PROMPTS[1])], jnp.int32)
    logits, mem, code = prefill(
        jm, model, mem, jnp.asarray(toks), lens2, ids, cfg=cfg, n_ubatch=N_UBATCH
    )
    steps = []
    for _ in range(8):
        t = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        steps.append(np.asarray(t))
        logits, mem, code = decode_tokens(
            jm, model, mem, t, ids, jnp.ones(2, bool), cfg=cfg, n_ubatch=N_UBATCH
        )
        assert int(code) == 0
    assert np.stack(steps, 1).tolist() == got[:2].tolist()


def test_interleaved_sequences_equal_each_alone_without_retrace(setup):
    # Given every prompt generated alone (other rows idle) and all four together
    size0 = GEN._generate._cache_size()
    together, lens = _gen(setup, PROMPTS)
    alone = []
    for s in range(N_SEQ):
        rows = [PROMPTS[i] if i == s else [] for i in range(N_SEQ)]
        alone.append(_gen(setup, rows)[0][s])
    # Then interleaving changes nothing
    assert together.tolist() == np.stack(alone).tolist()
    assert lens.tolist() == [8] * N_SEQ
    # And sequences in other seq ids than their row give the same tokens
    shuffled, _ = _gen(setup, PROMPTS[::-1], seq_ids=[2, 0, 3, 1])
    assert shuffled.tolist() == together[::-1].tolist()
    # And no call retraced: one compile for every batch composition of this capacity
    assert GEN._generate._cache_size() - size0 <= 1


def test_sampling_is_seeded_and_independent_of_batching(setup):
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    # Given sampled generation with per-sequence seeds
    a, _ = _gen(setup, PROMPTS, seed=[1, 2, 3, 4], **kw)
    b, _ = _gen(setup, PROMPTS, seed=[1, 2, 3, 4], **kw)
    c, _ = _gen(setup, PROMPTS, seed=[5, 6, 7, 8], **kw)
    greedy, _ = _gen(setup, PROMPTS)
    # Then the same seed reproduces, another seed and greedy differ
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert a.tolist() != greedy.tolist()
    # And a sequence's draws do not depend on its batch mates
    alone, _ = _gen(setup, [[], PROMPTS[1], [], []], seed=[0, 2, 0, 0], **kw)
    assert alone[1].tolist() == a[1].tolist()
    # And top_k = 1 is greedy whatever the temperature
    k1, _ = _gen(setup, PROMPTS, temperature=5.0, top_k=1, seed=[9, 9, 9, 9])
    assert k1.tolist() == greedy.tolist()


def test_stop_tokens_and_max_lengths(setup):
    greedy, _ = _gen(setup, PROMPTS)
    # Given per-sequence stop tokens taken from the greedy output and per-sequence limits
    stop = [[int(greedy[0, 2])], [int(greedy[1, 0]), 999], [], [int(greedy[3, 5])]]
    got, lens = _gen(setup, PROMPTS, stop_tokens=stop, max_new_tokens=[8, 8, 3, 8])

    def first(row, t):
        return row.tolist().index(t) + 1

    want = [first(greedy[0], stop[0][0]), 1, 3, first(greedy[3], stop[3][0])]
    # Then each sequence ends at its stop token (kept) or its limit, padded with -1
    assert lens.tolist() == want
    for s in range(N_SEQ):
        assert got[s, : want[s]].tolist() == greedy[s, : want[s]].tolist()
        assert (got[s, want[s] :] == -1).all()
    # And a shared stop list applies to every sequence
    _, lens_all = _gen(setup, PROMPTS, stop_tokens=[int(greedy[1, 0])])
    assert lens_all[1] == 1


# --------------------------------------------------------------------------------------------
# Engine


def test_engine_submit_fork_cancel_finish(setup):
    _, model, cfg, jm = setup
    greedy, _ = _gen(setup, PROMPTS)
    eng = Engine(jm, model, cfg, n_ubatch=N_UBATCH, n_prompt=CAP["n_prompt"], n_stop=CAP["n_stop"])
    # Given a request, a fork of it, and a request with the same prompt from scratch
    a = eng.submit(PROMPTS[0], 6)
    b = eng.fork(a)
    c = eng.submit(PROMPTS[0], 3)
    d = eng.submit(PROMPTS[1], 8, stop_tokens=[int(greedy[1, 4])])
    eng.step()
    size0 = ENG._engine_step._cache_size()
    eng.step()
    # When c is cancelled after two tokens and a new request takes its sequence id
    eng.cancel(c)
    assert eng.requests[c].seq == -1 and eng.requests[c].cancelled
    e = eng.submit(PROMPTS[2], 4)
    assert eng.requests[e].seq == 2
    eng.run()
    r = eng.requests
    # Then the fork and the from-scratch request continue exactly like the parent
    assert r[a].tokens == greedy[0, :6].tolist()
    assert r[b].tokens == greedy[0, :6].tolist()
    assert r[c].tokens == greedy[0, :2].tolist()
    # And the stop token ended d (kept), the others ended at their length
    assert r[d].tokens == greedy[1, :5].tolist()
    assert r[e].tokens == greedy[2, :4].tolist()
    # And every finished request freed its sequence (memory holds nothing)
    assert all(x.done and x.seq == -1 for x in r.values())
    _, hi = jh.seq_pos_range(eng.mem, cfg)
    assert (np.asarray(hi) == -1).all()
    # And the step compiled once for every mix of running requests
    assert ENG._engine_step._cache_size() == size0


def test_engine_fork_samples_its_own_continuation(setup):
    _, model, cfg, jm = setup
    eng = Engine(jm, model, cfg, n_ubatch=N_UBATCH, n_prompt=CAP["n_prompt"], n_stop=CAP["n_stop"])
    # Given a sampled request that generated 3 tokens, forked twice with different seeds
    a = eng.submit(PROMPTS[3], 8, temperature=1.5, seed=11)
    for _ in range(3):
        eng.step()
    b = eng.fork(a, 5, seed=11)
    c = eng.fork(a, 5, seed=12)
    eng.run()
    r = eng.requests
    # Then a fork carries its parent's history as its prompt and draws with its own seed
    assert r[b].prompt == PROMPTS[3] + r[a].tokens[:3]
    assert r[b].tokens != r[c].tokens
    # And with the parent's seed it reproduces the parent (draws are keyed by seed and count:
    # fork b's n-th token uses count n, the parent's 3 + n-th uses 3 + n, so compare to generate)
    ref, _ = _gen(
        setup,
        [r[b].prompt, [], [], []],
        temperature=1.5,
        seed=[11, 0, 0, 0],
        max_new_tokens=[5, 1, 1, 1],
    )
    assert r[b].tokens == ref[0, :5].tolist()
    # And the engine refuses a fifth running request
    eng2 = Engine(jm, model, cfg, n_ubatch=N_UBATCH, n_prompt=CAP["n_prompt"], n_stop=CAP["n_stop"])
    for _ in range(N_SEQ):
        eng2.submit([1], 2)
    with pytest.raises(EngineError, match="no free sequence id"):
        eng2.submit([1], 2)
