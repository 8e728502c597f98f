"""Decode and prefill of the model families (``python -m benchmarks --only families``).

For each family of :mod:`jaxhybrid.models` but Jamba (Nemotron-H, Granite-4.0-H, Falcon-H1,
Bamba, LFM2, Qwen3-Next, Qwen3.5, Qwen3.5-MoE) the tiny seeded test checkpoint
(``tests/family_*.py``, written by transformers, float32) with the options llama.cpp implements
(``benchmarks/llama_cpp_parity.py``: no projection biases, ...) is loaded with
:func:`jaxhybrid.models.load_model` and run by every peer, measured as ``benchmarks/run.py``
measures the Jamba (peers interleaved round by round, min over rounds).

Decode (greedy):

- ``jaxhybrid``: :func:`jaxhybrid.decode` with the family's ``plugin.step_fn(cfg)`` in the jitted
  greedy loop of :func:`benchmarks.run.jh_decode` (prompts in one ubatch, then one token per
  sequence per step); ``(T(n) - T(1)) / (n - 1)`` of decode-only loops. The memory is
  ``plugin.memory_config(kv_size=context * seqs, n_seq_max=seqs)`` (one unified stream) with the
  same ``context`` per sequence as the Jamba rows (4096): attention runs over the used cells only,
  so the tiny models do not pay for the empty cells.
- ``transformers``: the family's ``generate`` (greedy, same checkpoint), timed whole: ``n_new`` and
  1 new tokens, the difference over ``n_new - 1`` steps; one round.
- ``llama.cpp`` (with ``--llama-cpp-src``): the checkpoint converted to GGUF f32 by llama.cpp's
  converter, decoded in parallel sequences (``benchmarks/_llama_cpp.py``), decode steps timed as
  jaxhybrid's; not for Granite-4.0-H, whose tiny config crashes llama.cpp.

``same tokens`` says whether a peer's greedy tokens equal jaxhybrid's (reported, not asserted: a
near tie of two logits may flip a token in float32).

The Gated DeltaNet's two forms alone (``gdn_forms``): :func:`jaxhybrid.models.gated_delta_rule`
on 512 tokens of one sequence, chunked and one-step, for the tiny test shape and two real ones
(Qwen3-Next / Qwen3.5 layers: 16 or 32 value heads of 128 x 128), with one seq set and with 512
(the sets a 512-slot ubatch carries through the memory protocol), the per-token states returned
or dropped.

Prefill of one 512-token prompt (``family_prefill``): :func:`jaxhybrid.serving.prefill` in one
ubatch of 512 (the Gated DeltaNet in its chunked form, and again pinned to its one-step
recurrence, ``jaxhybrid, GDN per-token scan``, for the chunked form's speed-up), transformers'
forward with a cache (``use_cache=True``), llama.cpp's prefill in one ubatch of 512.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from benchmarks import _llama_cpp as lcpp
from benchmarks.run import (
    _TESTS,
    Ctx,
    Rounds,
    _block,
    _hf_peer,
    _prompts,
    decode_rounds,
    jh_decode_time,
)
from jaxhybrid.models import SUPPORTED_MODEL_TYPES, load_model
from jaxhybrid.serving import prefill

# family -> the test helper module (tests/) writing its tiny checkpoint (the Qwen variants are
# the variants of family_qwen).
FAMILIES: dict[str, str] = {
    "nemotron_h": "family_nemotron_h",
    "granitemoehybrid": "family_granite",
    "falcon_h1": "family_falcon_h1",
    "bamba": "family_bamba",
    "lfm2": "family_lfm2",
    "qwen3_next": "family_qwen",
    "qwen3_5": "family_qwen",
    "qwen3_5_moe": "family_qwen",
}
N_PREFILL = 512


def _first_diff(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first step (token index) where any sequence of ``a`` and ``b`` differs, or None."""
    diff = np.flatnonzero((np.asarray(a) != np.asarray(b)).any(axis=0))
    return int(diff[0]) if diff.size else None


# llama.cpp segfaults on this family's tiny test config (benchmarks/llama_cpp_parity.py).
_LLAMA_CPP_CRASHES = ("granitemoehybrid",)


def bench_families(ctx: Ctx) -> list[dict]:
    """Decode steps of jaxhybrid, transformers and llama.cpp (when available) on every Mamba-2
    family's tiny checkpoint."""
    from benchmarks import llama_cpp_parity as parity  # it imports FAMILIES from here

    a = ctx.args
    sys.path.insert(0, str(_TESTS))
    work = Path(tempfile.mkdtemp(prefix="families-", dir=ctx.ckpt.parent))
    rows = []
    n_new = a.new_tokens
    for family, helper in FAMILIES.items():
        # Every family compiles a dozen programs; dropping the last family's keeps the process
        # within the kernel's limit on memory mappings (vm.max_map_count), which LLVM exhausts.
        jax.clear_caches()
        gc.collect()
        tests = importlib.import_module(helper)
        path = parity.llama_cpp_checkpoint(family, tests, work / family)
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        assert model_type in SUPPORTED_MODEL_TYPES, (family, model_type)
        plugin, params = load_model(path)
        gguf = None
        if ctx.llama_skip is None and family not in _LLAMA_CPP_CRASHES:
            gguf = parity.convert(
                path, a.llama_cpp_src, work / f"{family}.gguf", plugin.n_vocab, family=family
            )
        ctx.results.setdefault("family_prefill", []).extend(
            _prefill_rows(ctx, family, plugin, params, tests, path, gguf)
        )
        for n_seq in a.decode_seqs:
            prompts = _prompts(n_seq, a.prompt, plugin.n_vocab, seed=n_seq)
            cfg = plugin.memory_config(kv_size=a.context * n_seq, n_seq_max=n_seq)

            def jh_loop(n, cfg=cfg, prompts=prompts, n_seq=n_seq, plugin=plugin, params=params):
                return jh_decode_time(params, cfg, prompts, n, n_ubatch=n_seq, plugin=plugin)

            steps = {"jaxhybrid": jh_loop}
            whole = {}
            if not a.no_transformers:
                whole["transformers"] = _hf_peer(ctx, prompts, hf=tests.hf_model(path))
            llama = None
            if gguf is not None:
                llama = lcpp.LlamaCppPeer(
                    gguf, n_seq=n_seq, n_ctx_seq=a.context, threads=a.threads, n_ubatch=512
                )

                def llama_run(n, prompts=prompts, llama=llama):
                    out, dt = llama.generate(prompts.tolist(), n + 1)
                    return dt, np.asarray(out)

                steps["llama.cpp"] = llama_run
            step, rounds, tokens = decode_rounds(steps, whole, n_new, a.rounds)
            if llama is not None:
                llama.close()
            ref = tokens["jaxhybrid"]
            for name in (*steps, *whole):
                rows.append(
                    dict(
                        family=family,
                        n_seq=n_seq,
                        peer=name,
                        timed="decode steps" if name in steps else "whole generate",
                        ms_per_step=step[name] * 1e3,
                        tok_per_s=n_seq / step[name],
                        spread=rounds.spread(name + "/n"),
                        rounds=len(rounds.times[name + "/n"]),
                        jaxhybrid_speedup=step[name] / step["jaxhybrid"],
                        same_tokens=bool(np.array_equal(tokens[name], ref)),
                        first_diff_step=_first_diff(tokens[name], ref),
                    )
                )
    ctx.results["gdn_forms"] = bench_gdn_forms(ctx)
    if ctx.llama_skip is None:
        ctx.results["skipped"].append(
            "llama.cpp rows of granitemoehybrid: llama.cpp crashes on its tiny test config "
            "(benchmarks/llama_cpp_parity.py)"
        )
    return rows


def _gdn_pinned(params, method: str):
    """A copy of a Qwen model whose Gated DeltaNet layers all run ``method``."""
    pinned = copy.deepcopy(params)
    for layer in pinned.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.method = method
    return pinned


def _prefill_rows(ctx: Ctx, family, plugin, params, tests, path, gguf) -> list[dict]:
    """Milliseconds of one 512-token prompt's prefill by every peer (module docstring)."""
    import torch

    a = ctx.args
    prompt = _prompts(1, N_PREFILL, plugin.n_vocab, seed=11)
    cfg = plugin.memory_config(kv_size=2 * N_PREFILL, n_seq_max=1)

    def ours(params):
        def run():
            mem = _block(jh.init_hybrid(cfg))
            t = time.perf_counter()
            _, _, code = _block(
                prefill(
                    plugin,
                    params,
                    mem,
                    jnp.asarray(prompt),
                    jnp.asarray([N_PREFILL], jnp.int32),
                    jnp.asarray([0], jnp.int32),
                    cfg=cfg,
                    n_ubatch=N_PREFILL,
                )
            )
            assert int(code) == jh.DecodeCode.OK
            return time.perf_counter() - t

        return run

    fns = {"jaxhybrid": ours(params)}
    if family.startswith("qwen"):
        fns["jaxhybrid, GDN per-token scan"] = ours(_gdn_pinned(params, "recurrent"))
    if not a.no_transformers:
        torch.set_num_threads(a.threads)
        hf = tests.hf_model(path)
        ids = torch.tensor(prompt, dtype=torch.long)

        def hf_run():
            with torch.no_grad():
                t = time.perf_counter()
                hf(ids, use_cache=True)
                return time.perf_counter() - t

        fns["transformers"] = hf_run
    peer = None
    if gguf is not None:
        peer = lcpp.LlamaCppPeer(
            gguf, n_seq=1, n_ctx_seq=2 * N_PREFILL, threads=a.threads, n_ubatch=N_PREFILL
        )

        def llama_run():
            peer.clear()
            t = time.perf_counter()
            peer.prefill(prompt.tolist())
            return time.perf_counter() - t

        fns["llama.cpp"] = llama_run
    for fn in fns.values():
        fn()
    rounds = Rounds()
    for r in range(a.rounds):
        for name, fn in fns.items():
            if name == "transformers" and r:
                continue  # one round, as in the decode rows
            rounds.add(name, fn())
    if peer is not None:
        peer.close()
    base = rounds.best("jaxhybrid")
    return [
        dict(
            family=family,
            peer=name,
            ms=rounds.best(name) * 1e3,
            tok_per_s=N_PREFILL / rounds.best(name),
            jaxhybrid_speedup=rounds.best(name) / base,
            spread=rounds.spread(name),
            rounds=len(rounds.times[name]),
        )
        for name in fns
    ]


# (value heads, key width, value width, seq sets) of the GDN-form rows.
_GDN_SHAPES = (
    (4, 8, 8, 1),
    (4, 8, 8, 512),
    (16, 128, 128, 1),
    (16, 128, 128, 512),
    (32, 128, 128, 1),
)


def bench_gdn_forms(ctx: Ctx) -> list[dict]:
    """Milliseconds of the gated delta rule on 512 tokens, chunked vs one-step (docstring)."""
    from jaxhybrid.models import gated_delta_rule
    from jaxhybrid.models._gated_deltanet import l2norm
    from jaxhybrid.models._mamba import set_spans

    n_tok = N_PREFILL
    rows = []
    for heads, dk, dv, n_sets in _GDN_SHAPES:
        rng = np.random.default_rng(0)
        q = l2norm(jnp.asarray(rng.standard_normal((n_tok, heads, dk)), jnp.float32)) * dk**-0.5
        k = l2norm(jnp.asarray(rng.standard_normal((n_tok, heads, dk)), jnp.float32))
        v = jnp.asarray(rng.standard_normal((n_tok, heads, dv)), jnp.float32)
        g = -jnp.asarray(rng.uniform(0.01, 0.5, (n_tok, heads)), jnp.float32)
        beta = jnp.asarray(rng.uniform(0.1, 0.9, (n_tok, heads)), jnp.float32)
        s0 = jnp.zeros((n_sets, heads, dk, dv), jnp.float32)
        seq_set = jnp.zeros((n_tok,), jnp.int32)  # one sequence holds every token
        args = (q, k, v, g, beta, s0, seq_set)
        fns = {}
        for method in ("chunked", "recurrent"):
            for keep in (False, True):

                @jax.jit
                def run(q, k, v, g, beta, s0, seq_set, method=method, keep=keep):
                    spans = set_spans(seq_set, s0.shape[0])
                    y, s, s_tok = gated_delta_rule(q, k, v, g, beta, s0, spans, method=method)
                    return (y, s, s_tok) if keep else (y, s)

                def timed(run=run, args=args):
                    t = time.perf_counter()
                    _block(run(*args))
                    return time.perf_counter() - t

                fns[(method, keep)] = timed
        for fn in fns.values():
            fn()
        rounds = Rounds()
        for _ in range(ctx.args.rounds):
            for key, fn in fns.items():
                rounds.add(str(key), fn())
        for keep in (False, True):
            chunked = rounds.best(str(("chunked", keep)))
            recurrent = rounds.best(str(("recurrent", keep)))
            rows.append(
                dict(
                    heads=heads,
                    dk=dk,
                    dv=dv,
                    n_sets=n_sets,
                    token_states=keep,
                    chunked_ms=chunked * 1e3,
                    recurrent_ms=recurrent * 1e3,
                    chunked_speedup=recurrent / chunked,
                )
            )
    return rows
