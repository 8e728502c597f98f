"""Rollback on Jamba (issue 10): a rewound Mamba state continues as if the removed tokens were
never seen. That greedy speculative decoding equals plain greedy decoding token for token is
checked for every model plug-in in ``tests/test_serving.py``."""

from __future__ import annotations

import jamba_utils as ju
import jax.numpy as jnp
import numpy as np
import pytest

import jaxhybrid as jh
from jaxhybrid.models import JambaConfig, JambaModel, init_jamba, jamba_hybrid_config
from jaxhybrid.serving import prefill, speculative_generate

K = 3
CONFIG = JambaConfig(**ju.MOE_GQA)
JM = JambaModel(CONFIG)  # the plug-in of target and draft (same shapes, other weights)


@pytest.fixture(scope="module")
def jamba():
    return CONFIG, init_jamba(CONFIG, seed=3)


P = 16  # one prompt capacity for every prefill below: one compilation


def _prefill(model, cfg, mem, tokens, seq=0):
    """Logits of every token of ``tokens`` appended to ``seq``."""
    toks = np.zeros((1, P), np.int32)
    toks[0, : len(tokens)] = tokens
    out, mem, code = prefill(
        JM,
        model,
        mem,
        jnp.asarray(toks),
        jnp.asarray([len(tokens)], jnp.int32),
        jnp.asarray([seq], jnp.int32),
        cfg=cfg,
        n_ubatch=8,
        output_all=True,
    )
    assert int(code) == 0
    return np.asarray(out[0, : len(tokens)]), mem


def test_jamba_rollback_equals_never_seeing_the_tokens(jamba):
    config, model = jamba
    cfg = jamba_hybrid_config(config, kv_size=64, n_seq_max=2, n_snapshots=4)
    rng = np.random.default_rng(0)
    prompt, rejected, accepted = (
        [int(t) for t in rng.integers(0, config.vocab_size, n)] for n in (11, 4, 5)
    )
    # Given a prompt, then 4 tokens in single-token steps that are then removed
    _, mem = _prefill(model, cfg, jh.init_hybrid(cfg), prompt)
    for t in rejected:
        _, mem = _prefill(model, cfg, mem, [t])
    mem, ok = jh.seq_rm(mem, 0, len(prompt), -1, cfg)
    assert bool(ok)
    assert int(jh.seq_pos_max(mem, 0, cfg)) == len(prompt) - 1
    # (one token further back than the horizon is refused)
    _, ok = jh.seq_rm(mem, 0, len(prompt) - 1, -1, cfg)
    assert not bool(ok)
    got, _ = _prefill(model, cfg, mem, accepted)
    # Then decoding goes on as in a memory that never saw them
    want, _ = _prefill(model, cfg, jh.init_hybrid(cfg), prompt + accepted)
    np.testing.assert_allclose(got, want[len(prompt) :], atol=2e-5, rtol=0)


def test_speculative_decoding_needs_a_deep_enough_horizon(jamba):
    config, model = jamba
    cfg = jamba_hybrid_config(config, kv_size=32, n_seq_max=1, n_snapshots=2)
    with pytest.raises(ValueError, match="n_snapshots >= 3"):
        speculative_generate(
            JM,
            model,
            JM,
            model,
            [[1, 2]],
            target_cfg=cfg,
            draft_cfg=cfg,
            k=3,
            max_new_tokens=4,
            n_ubatch=8,
        )
