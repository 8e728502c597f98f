"""Every family on the generic serving layer (Mamba-2, Gated DeltaNet and short-convolution
hybrids), against transformers' own greedy decoding.

Per family (a tiny seeded checkpoint written by transformers and read by
:func:`jaxhybrid.models.load_model`): one :class:`~jaxhybrid.serving.Engine` run with joins,
a fork, cancels, a save restored into another sequence id and a context shift, whose tokens are
transformers' ``generate`` of each prompt alone; then the same kind of run with other prompt
lengths compiles nothing new; and a rollback of ``r <= n_snapshots`` tokens (§5.10) leaves a
sequence as if it had never seen them, logits and all. Each family's checks are one test, so
that they share one set of compilations (the checkpoints' own tests cover prefill parity at
every prompt length and greedy decoding of 32 tokens).
"""

from __future__ import annotations

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import family_bamba  # noqa: E402
import family_falcon_h1  # noqa: E402
import family_granite  # noqa: E402
import family_lfm2  # noqa: E402
import family_nemotron_h  # noqa: E402
import family_qwen  # noqa: E402

import jaxhybrid as jh  # noqa: E402
import jaxhybrid.models as jm  # noqa: E402
from jaxhybrid.serving import Engine, prefill  # noqa: E402

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]


class _QwenVariant:
    """A Qwen3-Next / Qwen3.5 variant of ``family_qwen`` with the family modules' interface."""

    hf_greedy = staticmethod(family_qwen.hf_greedy)
    hf_logits = staticmethod(family_qwen.hf_logits)

    def __init__(self, variant: str):
        self.variant = variant

    def tiny_checkpoint(self, path):
        return family_qwen.tiny_checkpoint(path, self.variant)


FAMILIES = {
    "nemotron_h": family_nemotron_h,
    "granitemoehybrid": family_granite,
    "falcon_h1": family_falcon_h1,
    "bamba": family_bamba,
    "lfm2": family_lfm2,
    # One Gated DeltaNet family member: Qwen3-Next and Qwen3.5-MoE serve through the same GDN,
    # attention and memory layout (they differ in projections and feed-forward, whose parity
    # tests/test_qwen3_next.py covers).
    "qwen3_5": _QwenVariant("qwen3_5"),
}
N_SEQ = 4
N_UBATCH = 16
N_PROMPT = 16  # a 20-token prompt is decoded in two chunks
N_CTX = 24  # positions per sequence: the shifted request outgrows it
N_NEW = 6
K = 3  # rollback depth kept (n_snapshots)
TOL = 1e-4
ROLLBACK_TOL = 1e-5

_COMPILES = [0]


def _count(name: str, *_args, **_kw) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def _loaded(family: str, root: str):
    """``(checkpoint dir, plug-in, params, memory config)`` of the family."""
    path = f"{root}/{family}"
    FAMILIES[family].tiny_checkpoint(path)
    plugin, params = jm.load_model(path)
    return path, plugin, params, plugin.memory_config(kv_size=96, n_seq_max=N_SEQ, n_snapshots=K)


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "family_serving"
    root.mkdir(exist_ok=True)
    return request.param, *_loaded(request.param, str(root))


def _prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _engine_run(plugin, params, cfg, prompts):
    """The continuous-batching run: ``a`` joins and decodes two tokens, ``b`` forks it, ``c``
    joins (a two-chunk prompt) and is cancelled after one token, ``a`` is saved, cancelled and
    restored into ``c``'s freed sequence id, and ``d`` joins and outgrows its context. Returns the
    requests' tokens and facts about the run."""
    p0, p1, p2 = prompts
    eng = Engine(plugin, params, cfg, n_ubatch=N_UBATCH, n_prompt=N_PROMPT, n_ctx_seq=N_CTX)
    a = eng.submit(p0, N_NEW)
    eng.step()
    eng.step()
    b = eng.fork(a)
    c = eng.submit(p1, N_NEW)
    eng.step()
    seq_a, seq_c = eng.requests[a].seq, eng.requests[c].seq
    eng.cancel(c)
    saved = eng.save(a)
    eng.cancel(a)
    r = eng.restore(saved, seq=seq_c)
    d = eng.submit(p2, 8)
    eng.run()
    reqs = eng.requests
    return {
        "fork": reqs[b].tokens,
        "restored": reqs[r].tokens,
        "cancelled": reqs[c].tokens,
        "shifted": reqs[d].tokens,
        "n_shifts": reqs[d].n_shifts,
        "restored_into_other_id": seq_c != seq_a,
        "all_freed": all(x.done and x.seq == -1 for x in reqs.values())
        and bool((np.asarray(jh.seq_pos_range(eng.mem, cfg)[1]) == -1).all()),
    }


def _rollback_logits(plugin, params, cfg, prompt, extra, want):
    """Sequence 0 fed ``prompt``; sequences 1 and 2 fed ``prompt`` and then 1 and ``K`` tokens of
    ``extra`` in the same ubatch, rolled back to the prompt's end; then all three fed ``want``
    token by token. Returns each sequence's logits of every ``want`` token. Runs the Engine's
    own compiled prefill (one row of ``N_PROMPT`` tokens per call)."""

    def feed(mem, seq, toks):
        row = np.zeros((1, N_PROMPT), np.int32)
        row[0, : len(toks)] = toks
        logits, mem, code = prefill(
            plugin,
            params,
            mem,
            jnp.asarray(row),
            jnp.asarray([len(toks)], jnp.int32),
            jnp.asarray([seq], jnp.int32),
            cfg=cfg,
            n_ubatch=N_UBATCH,
        )
        assert int(code) == jh.DecodeCode.OK
        return np.asarray(logits[0]), mem

    mem = jh.init_hybrid(cfg)
    for seq, toks in enumerate((prompt, prompt + extra[:1], prompt + extra)):
        _, mem = feed(mem, seq, toks)
    for seq in (1, 2):
        mem, ok = jh.seq_rm(mem, seq, len(prompt), -1, cfg)
        assert bool(ok) and int(jh.seq_pos_max(mem, seq, cfg)) == len(prompt) - 1
    out = {seq: [] for seq in range(3)}
    for tok in want:
        for seq in range(3):
            logits, mem = feed(mem, seq, [tok])
            out[seq].append(logits)
    return out, mem


def test_serving_matches_transformers_and_compiles_once(family):
    name, path, plugin, params, cfg = family
    fam = FAMILIES[name]
    vocab = plugin.n_vocab
    # Given an engine run with joins, a fork, cancels, a save restored into another sequence id
    # and a context shift, every request decoded interleaved with the others
    p0, p1, p2 = prompts = _prompts(vocab, (7, 20, 18), seed=1)
    got = _engine_run(plugin, params, cfg, prompts)

    # Then every request's tokens are transformers' greedy tokens of its prompt decoded alone:
    # the fork continues from the parent's third token, the restored request as the parent would
    # have, the cancelled one stopped after one token, the shifted one until its shift
    assert got["fork"] == fam.hf_greedy(path, p0, N_NEW + 2)[2:]
    assert got["restored"] == fam.hf_greedy(path, p0, N_NEW)
    assert got["cancelled"] == fam.hf_greedy(path, p1, 1)
    n_before_shift = N_CTX - len(p2) + 1
    assert got["n_shifts"] >= 1 and len(got["shifted"]) == 8
    assert got["shifted"][:n_before_shift] == fam.hf_greedy(path, p2, n_before_shift)
    assert got["restored_into_other_id"] and got["all_freed"]

    # When two sequences roll back 1 and K = n_snapshots tokens (§5.10) decoded in the prompt's
    # ubatch, and a third never saw them
    prompt, extra = _prompts(vocab, (6, K), seed=3)
    want = fam.hf_greedy(path, prompt, N_NEW)
    logits, mem = _rollback_logits(plugin, params, cfg, prompt, extra, want)
    # Then all three continue with the logits transformers gives the prompt alone
    ref = fam.hf_logits(path, prompt + want)[len(prompt) :]
    for seq, rows in logits.items():
        err = float(np.abs(np.stack(rows) - ref).max())
        assert err <= TOL, (name, seq, err)
        # and the rolled-back sequences continue as the one that never saw the tokens (their
        # recurrent states are the same scan's values; only attention sums may round apart)
        np.testing.assert_allclose(np.stack(rows), np.stack(logits[0]), atol=ROLLBACK_TOL, rtol=0)
    # And a rollback deeper than n_snapshots is refused, leaving the memory as it was
    leaves = [np.asarray(x) for x in jax.tree.leaves(mem)]
    new, ok = jh.seq_rm(mem, 0, len(prompt) + N_NEW - K - 1, -1, cfg)
    assert not bool(ok)
    for x, y in zip(leaves, jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))

    # When a second engine run joins prompts of other lengths (one chunk instead of two, a later
    # shift; the saved sequence's 12 cells in the same power-of-two bucket of state I/O rows as 9)
    before = _COMPILES[0]
    again = _engine_run(plugin, params, cfg, _prompts(vocab, (10, 13, 19), seed=2))
    # Then it compiled nothing: one compilation of each step serves every mix of requests
    assert _COMPILES[0] == before, f"{_COMPILES[0] - before} compilations in the second run"
    assert again["n_shifts"] >= 1 and again["all_freed"]
