"""Attention over the used cells only (spec §2.7 ``n_kv``): spans, the used span, masks and K/V
over a span, and Jamba decoding through the span switch.

The switch must change nothing but the cost: logits equal attention over every cell exactly, and
the span changing between steps never retraces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxhybrid as jh
from jaxhybrid import kv as jkv

# --------------------------------------------------------------------------------------------
# Spans


def test_spans_are_powers_of_two_up_to_kv_size():
    # Given cache sizes below, at and above the smallest span, Then the spans double up to size
    assert jkv.n_kv_spans(16384) == (256, 512, 1024, 2048, 4096, 8192, 16384)
    assert jkv.n_kv_spans(256) == (256,)
    assert jkv.n_kv_spans(1000) == (256, 512, 1000)
    assert jkv.n_kv_spans(64, min_span=8) == (8, 16, 32, 64)
    assert jkv.n_kv_spans(5) == (5,)


@pytest.mark.parametrize("bad", [dict(kv_size=0), dict(kv_size=64, min_span=0)])
def test_spans_reject_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        jkv.n_kv_spans(**bad)


def test_span_index_picks_the_smallest_covering_span():
    spans = (8, 16, 32, 64)
    got = [int(jkv.span_index(n, spans)) for n in (0, 1, 8, 9, 16, 17, 33, 64)]
    assert got == [0, 0, 0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize("bad", [0, 65, 3.0])
def test_read_kv_rejects_a_bad_span(bad):
    cfg = jh.KVConfig(kv_size=64, head_dim_k=4)
    cache = jkv.init_kv_cache(cfg)
    with pytest.raises(ValueError, match="n_kv must be a static int"):
        jkv.read_kv(cache, 0, cfg, bad)


# --------------------------------------------------------------------------------------------
# The used span and span masks on the KV cache


def _place(cache, cfg, tokens, seqs, pos):
    """Places one ubatch (every token of its own seq set) and returns the cache, ubatch, slot."""
    batch = jh.make_batch(tokens, seq_ids=seqs, pos=pos, n_batch=len(tokens))
    batch, check = jh.validate(batch, *jkv.seq_pos_range(cache, cfg), n_seq_max=cfg.n_seq_max)
    jh.raise_for_check(check)
    plan = jh.split_equal(
        batch, n_ubatch=len(tokens), n_seq_max=cfg.n_seq_max, sequential=not cfg.unified
    )
    ub = jh.get_ubatch(batch, plan, 0, n_ubatch=len(tokens), n_seq_max=cfg.n_seq_max)
    slot = jkv.find_slot(cache, ub, cfg)
    assert bool(slot.ok)
    return jkv.apply_ubatch(cache, ub, slot, cfg), ub, slot


@pytest.mark.parametrize(
    "kw",
    [
        dict(unified=True),
        dict(unified=False),
        dict(unified=True, swa_type=jh.SWAType.STANDARD, n_swa=3),
    ],
    ids=["unified", "streams", "swa"],
)
def test_span_mask_and_kv_equal_the_full_ones_cut_to_the_span(kw):
    # Given a cache with a few placed tokens of two sequences and holes left by seq_rm
    cfg = jh.KVConfig(kv_size=32, n_seq_max=2, n_kv_heads=1, head_dim_k=2, **kw)
    cache = jkv.init_kv_cache(cfg)
    cache = cache._replace(k=jnp.arange(cache.k.size, dtype=jnp.float32).reshape(cache.k.shape))
    cache, _, _ = _place(cache, cfg, [1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])
    cache, ok = jkv.seq_rm(cache, 0, 1, 2, cfg)
    assert bool(ok)
    cache, ub, slot = _place(cache, cfg, [7, 8], [0, 1], [3, 3])
    # The used span is one past the highest non-empty cell of any stream
    pos = np.asarray(cache.cells.pos)
    expected = max(int(np.nonzero(row >= 0)[0].max()) + 1 for row in pos if (row >= 0).any())
    n_kv = int(jkv.used_span(cache, cfg))
    assert n_kv == expected
    full = np.asarray(jkv.kq_mask(cache, ub, slot, cfg))
    k_full, _ = jkv.read_kv(cache, 0, cfg)
    st = cfg.n_stream
    # The full mask sees nothing at or beyond the used span
    assert not full.reshape(2, st, 32)[:, :, n_kv:].any()
    assert full.any()
    for span in (n_kv, 8, 16, 32):
        if span < n_kv:
            continue
        # When mask and K are taken over the span
        mask = np.asarray(jkv.kq_mask(cache, ub, slot, cfg, span))
        k_span, _ = jkv.read_kv(cache, 0, cfg, span)
        # Then they are the full ones cut to the span, stream by stream
        np.testing.assert_array_equal(
            mask, full.reshape(2, st, 32)[:, :, :span].reshape(2, st * span)
        )
        np.testing.assert_array_equal(
            np.asarray(k_span),
            np.asarray(k_full).reshape(st, 32, 1, 2)[:, :span].reshape(st * span, 1, 2),
        )
        # And the mask over each token's own stream is its stream's part of the full one
        own = np.asarray(jkv.kq_mask(cache, ub, slot, cfg, span, own_stream=True))
        stream = np.asarray(slot.stream)
        np.testing.assert_array_equal(own, full.reshape(2, st, 32)[np.arange(2), stream, :span])


def test_freed_cells_are_reused_so_the_used_span_stays_put():
    # Given two sequences of 8 tokens, Then 16 cells are in use from the front
    cfg = jh.KVConfig(kv_size=64, n_seq_max=3, head_dim_k=2)
    cache = jkv.init_kv_cache(cfg)
    cache, _, _ = _place(cache, cfg, list(range(16)), [0] * 8 + [1] * 8, list(range(8)) * 2)
    assert int(jkv.used_span(cache, cfg)) == 16
    # When sequence 0 leaves and a new sequence places 8 tokens
    cache, _ = jkv.seq_rm(cache, 0, -1, -1, cfg)
    cache, _, slot = _place(cache, cfg, list(range(8)), [2] * 8, list(range(8)))
    # Then it takes the freed cells (§4.1 lowers the head) and the used span does not grow
    assert np.asarray(slot.cell).tolist() == list(range(8))
    assert int(jkv.used_span(cache, cfg)) == 16


# --------------------------------------------------------------------------------------------
# Jamba through the span switch

pytest.importorskip("flax.nnx")

import jamba_utils as ju  # noqa: E402

from jaxhybrid.models import JambaConfig, init_jamba, jamba_hybrid_config, jamba_step_fn  # noqa: E402

KV_SIZE = 64
MIN_SPAN = 8  # spans 8, 16, 32, 64: a few steps cross every boundary


@pytest.fixture(scope="module")
def model():
    config = JambaConfig(**ju.MOE_GQA)
    return config, init_jamba(config, seed=5)


def _decoder(config, *, unified: bool, used_span: bool, n_ubatch: int = 4):
    cfg = jamba_hybrid_config(config, kv_size=KV_SIZE, n_seq_max=2, unified=unified)
    step = jamba_step_fn(None, cfg, used_span=used_span, min_span=MIN_SPAN)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def dec(params, mem, batch):
        out, mem, res = jh.decode(step, params, mem, batch, cfg, n_ubatch=n_ubatch)
        return out, mem, res.code

    return cfg, dec


def _run(model, *, unified, used_span, n_ubatch=4):
    """Prompts of 3 and 5 tokens, then 11 greedy steps of both sequences, with sequence 0
    removed and restarted half way; returns the logits of every step and the spans used."""
    config, params = model
    cfg, dec = _decoder(config, unified=unified, used_span=used_span, n_ubatch=n_ubatch)
    mem = jh.init_hybrid(cfg)
    batch = jh.make_batch([3, 9, 27, 5, 7, 11, 13, 17], seq_ids=[0] * 3 + [1] * 5, n_batch=8)
    out, mem, code = dec(params, mem, batch)
    assert int(code) == 0
    logits = [np.asarray(out)]
    spans = []
    tok = np.asarray(out).argmax(-1)
    nxt = [int(tok[2]), int(tok[7])]
    for step in range(11):
        if step == 6:
            mem, ok = jax.jit(lambda m: jh.seq_rm(m, 0, -1, -1, cfg))(mem)
            assert bool(ok)
        out, mem, code = dec(params, mem, jh.make_batch(nxt, seq_ids=[0, 1], n_batch=8))
        assert int(code) == 0
        out = np.asarray(out)
        logits.append(out)
        nxt = [int(out[0].argmax()), int(out[1].argmax())]
        n_kv = int(jkv.used_span(mem.kv, cfg.kv))
        spans.append(int(jkv.span_index(n_kv, jkv.n_kv_spans(KV_SIZE, MIN_SPAN))))
    return logits, spans, dec


@pytest.mark.parametrize(
    "unified, n_ubatch",
    # 2 streams and ubatches of 2: every token attends over its own stream only.
    [(True, 4), (False, 4), (False, 2)],
    ids=["unified", "streams", "streams-per-token"],
)
def test_span_switch_gives_exactly_the_logits_of_full_attention(model, unified, n_ubatch):
    # Given the same decode steps with attention over the used span and over every cell
    got, spans, dec = _run(model, unified=unified, used_span=True, n_ubatch=n_ubatch)
    want, _, dec_full = _run(model, unified=unified, used_span=False, n_ubatch=n_ubatch)
    # Then the steps ran in several different spans
    assert len(set(spans)) >= 2, spans
    # And every logit is identical
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # And neither decoder retraced as the span changed
    assert dec._cache_size() == 1
    assert dec_full._cache_size() == 1
