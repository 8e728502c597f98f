"""jaxhybrid benchmarks (issue 9): ``python -m benchmarks [--quick] [--json FILE]``.

Every figure that is compared is measured in the same process, peers interleaved round by round,
and each time is the minimum over the rounds (CPU timings on a shared machine are noisy; the
spread over rounds is reported next to each time). Peers:

- ``jaxhybrid``: :func:`jaxhybrid.decode` with :func:`~jaxhybrid.models.jamba_step_fn` in one
  jitted greedy loop (prompt in one batch, then one token per sequence per step, argmax on device).
- ``jaxhybrid generate()``: the library's :func:`~jaxhybrid.serving.generate` (adds its sampler).
- ``bare JAX``: the same model and loop with a fixed per-sequence cache (``benchmarks/_bare.py``).
- ``transformers``: ``JambaForCausalLM.generate`` (greedy, same weights, ``torch`` threads set).
- ``llama.cpp``: llama-cpp-python built from source (``benchmarks/_llama_cpp.py``).

Decode time per step is ``(T(n) - T(1)) / (n - 1)`` of two runs of ``n`` and 1 decode steps after
the same prompt, which is not timed (jaxhybrid, bare JAX and llama.cpp time their decode loop
alone); ``generate()`` and transformers can only be timed whole, prompt included, and there the
difference of ``n_new`` and 1 new tokens holds the ``n_new - 1`` decode steps. At several sequences
jaxhybrid and llama.cpp run with both KV layouts: one unified stream (``kv_unified``), and one
stream per sequence (`` streams``, llama.cpp's default). The ``families`` section
(``benchmarks/families.py``) times the same jaxhybrid loop, transformers and llama.cpp on the
tiny test checkpoints of the other families (Nemotron-H, Granite-4.0-H, Falcon-H1, Bamba, LFM2,
Qwen3-Next, Qwen3.5, Qwen3.5-MoE), decode and a 512-token prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from benchmarks import _llama_cpp as lcpp
from benchmarks._bare import bare_decode, bare_prefill, init_bare
from jaxhybrid.models import (
    JambaConfig,
    JambaModel,
    jamba_hybrid_config,
    jamba_step_fn,
    load_jamba,
)
from jaxhybrid.serving import Engine, decode_tokens, generate, prefill

_TESTS = Path(__file__).resolve().parent.parent / "tests"


def _model_config() -> dict:
    """The tiny Jamba of the parity tests (``tests/jamba_utils.py``: MoE + GQA)."""
    sys.path.insert(0, str(_TESTS))
    import jamba_utils

    return dict(jamba_utils.MOE_GQA)


def _make_checkpoint(path: Path, seed: int) -> None:
    sys.path.insert(0, str(_TESTS))
    import jamba_utils

    jamba_utils.make_checkpoint(path, jamba_utils.MOE_GQA, seed=seed)


# --------------------------------------------------------------------------------------------
# Timing helpers


def _block(x):
    return jax.block_until_ready(x)


class Rounds:
    """Collects the times of several peers measured round by round."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def best(self, name: str) -> float:
        return min(self.times[name])

    def spread(self, name: str) -> float:
        t = self.times[name]
        return (max(t) - min(t)) / min(t) if len(t) > 1 else 0.0


# --------------------------------------------------------------------------------------------
# The jaxhybrid greedy loop


def _prompt_batch(prompts) -> jh.Batch:
    n_seq, p = prompts.shape
    return jh.Batch(
        token=prompts.reshape(-1),
        embd=None,
        pos=jnp.tile(jnp.arange(p, dtype=jnp.int32), n_seq),
        seq_id=jnp.repeat(jnp.arange(n_seq, dtype=jnp.int32), p)[:, None],
        n_seq_id=jnp.ones((n_seq * p,), jnp.int32),
        output=jnp.tile(jnp.arange(p) == p - 1, n_seq),
        auto_pos=jnp.asarray(False),
        n_tokens=jnp.asarray(n_seq * p, jnp.int32),
    )


def _step_fn(plugin, cfg, used_span: bool):
    """The step function of ``plugin`` (a :class:`jaxhybrid.HybridModel` plug-in, whose own
    ``used_span`` holds), or of the Jamba of :func:`jamba_step_fn` when ``plugin`` is None."""
    if plugin is None:
        return jamba_step_fn(None, cfg, used_span=used_span)
    return plugin.step_fn(cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "used_span", "plugin"), donate_argnames="mem")
def jh_prefill(model, mem, prompts, *, cfg, used_span: bool = True, plugin=None):
    """Every prompt (``[seqs, P]``, one length) in one ubatch, as the bare loop does; returns the
    greedy next token of every sequence, the memory and the decode status code. ``model`` is the
    Jamba's params, or ``plugin``'s (any family's plug-in, static) when given."""
    n_seq, p = prompts.shape
    step = _step_fn(plugin, cfg, used_span)
    logits, mem, res = jh.decode(step, model, mem, _prompt_batch(prompts), cfg, n_ubatch=n_seq * p)
    tok = jnp.argmax(logits.reshape(n_seq, p, -1)[:, -1], axis=-1).astype(jnp.int32)
    return tok, mem, res.code


MAX_NEW = 128


@functools.partial(
    jax.jit, static_argnames=("cfg", "n_ubatch", "used_span", "plugin"), donate_argnames="mem"
)
def jh_decode(model, mem, tok, n_steps, *, cfg, n_ubatch: int, used_span: bool = True, plugin=None):
    """``n_steps`` (run-time, at most ``MAX_NEW``) greedy steps through :func:`jaxhybrid.decode`,
    one token per sequence (ubatches of ``n_ubatch``), in a ``fori_loop``; returns ``[seqs,
    MAX_NEW]`` tokens (the first ``n_steps`` set), the memory and the first non-zero status.
    ``plugin``: as :func:`jh_prefill`."""
    n_seq = tok.shape[0]
    step = _step_fn(plugin, cfg, used_span)
    seqs = jnp.arange(n_seq, dtype=jnp.int32)

    def body(i, carry):
        tok, mem, out, code = carry
        b = jh.Batch(
            token=tok,
            embd=None,
            pos=jnp.zeros((n_seq,), jnp.int32),
            seq_id=seqs[:, None],
            n_seq_id=jnp.ones((n_seq,), jnp.int32),
            output=jnp.ones((n_seq,), jnp.bool_),
            auto_pos=jnp.asarray(True),
            n_tokens=jnp.asarray(n_seq, jnp.int32),
        )
        logits, mem, res = jh.decode(step, model, mem, b, cfg, n_ubatch=n_ubatch)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, mem, out.at[:, i].set(tok), jnp.where(code == 0, res.code, code)

    out = jnp.zeros((n_seq, MAX_NEW), jnp.int32)
    _, mem, out, code = jax.lax.fori_loop(0, n_steps, body, (tok, mem, out, jnp.int32(0)))
    return out, mem, code


def jh_decode_time(
    model, cfg, prompts, n_steps: int, *, n_ubatch: int, used_span: bool = True, plugin=None
):
    """Seconds of ``n_steps`` greedy decode steps after the prompts (prefill not timed), and the
    generated tokens ``[seqs, 1 + n_steps]``. ``plugin``: as :func:`jh_prefill`."""
    mem = jh.init_hybrid(cfg)
    tok, mem, code = _block(
        jh_prefill(model, mem, jnp.asarray(prompts), cfg=cfg, used_span=used_span, plugin=plugin)
    )
    assert int(code) == 0
    t = time.perf_counter()
    out, _, code = _block(
        jh_decode(
            model,
            mem,
            tok,
            jnp.int32(n_steps),
            cfg=cfg,
            n_ubatch=n_ubatch,
            used_span=used_span,
            plugin=plugin,
        )
    )
    dt = time.perf_counter() - t
    assert int(code) == 0
    return dt, np.concatenate([np.asarray(tok)[:, None], np.asarray(out)[:, :n_steps]], axis=1)


# --------------------------------------------------------------------------------------------
# Context


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    config: JambaConfig
    model: object
    ckpt: Path
    gguf: Path | None
    llama_skip: str | None
    results: dict


def _prompts(n_seq: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (n_seq, length)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# 1 + 2: decode throughput against the peers, and the overhead over the bare loop


def bench_decode(ctx: Ctx) -> list[dict]:
    """Decode steps of every peer; at several sequences both KV layouts (one unified stream, and
    one stream per sequence: llama.cpp's default) for jaxhybrid and llama.cpp."""
    a = ctx.args
    rows = []
    n_new = a.new_tokens
    for n_seq in a.decode_seqs:
        prompts = _prompts(n_seq, a.prompt, ctx.config.vocab_size, seed=n_seq)
        layouts = {"": True} if n_seq == 1 else {"": True, " streams": False}
        # Peers timing their decode steps only: fn(steps) -> (seconds, tokens [seqs, 1 + steps]).
        steps: dict = {}
        # Peers timed as a whole generate() call: fn(new) -> (seconds, tokens [seqs, new]).
        whole: dict = {}
        for suffix, unified in layouts.items():
            cfg = jamba_hybrid_config(
                ctx.config,
                kv_size=a.context * (n_seq if unified else 1),
                n_seq_max=n_seq,
                unified=unified,
            )

            def jh_loop(n, cfg=cfg, prompts=prompts, n_seq=n_seq):
                return jh_decode_time(ctx.model, cfg, prompts, n, n_ubatch=n_seq)

            steps["jaxhybrid" + suffix] = jh_loop

        if a.api_peer:
            cfg = jamba_hybrid_config(ctx.config, kv_size=a.context * n_seq, n_seq_max=n_seq)

            def jh_api(n, cfg=cfg, prompts=prompts, n_seq=n_seq):
                mem = _block(jh.init_hybrid(cfg))
                t = time.perf_counter()
                out = _block(
                    generate(
                        JambaModel(ctx.config),
                        ctx.model,
                        mem,
                        prompts.tolist(),
                        cfg=cfg,
                        n_ubatch=n_seq,
                        max_new_tokens=n,
                        max_new=a.new_tokens,
                    )
                )
                dt = time.perf_counter() - t
                assert int(out.code) == 0
                return dt, np.asarray(out.tokens)

            whole["jaxhybrid generate()"] = jh_api

        def bare(n, prompts=prompts, n_seq=n_seq):
            state = init_bare(ctx.config, n_seq=n_seq, n_ctx=a.context)
            tok, state = _block(bare_prefill(ctx.model, state, jnp.asarray(prompts)))
            t = time.perf_counter()
            out, _ = _block(bare_decode(ctx.model, state, tok, jnp.int32(n)))
            dt = time.perf_counter() - t
            return dt, np.concatenate([np.asarray(tok)[:, None], np.asarray(out)[:, :n]], axis=1)

        steps["bare JAX"] = bare
        if not a.no_transformers:
            whole["transformers"] = _hf_peer(ctx, prompts)
        llamas = []
        if ctx.llama_skip is None:
            for suffix, unified in layouts.items():
                llama = lcpp.LlamaCppPeer(
                    ctx.gguf,
                    n_seq=n_seq,
                    n_ctx_seq=a.context,
                    threads=a.threads,
                    n_ubatch=512,
                    unified=unified,
                )
                llamas.append(llama)

                def llama_run(n, prompts=prompts, llama=llama):
                    out, dt = llama.generate(prompts.tolist(), n + 1)
                    return dt, np.asarray(out)

                steps["llama.cpp" + suffix] = llama_run

        step, rounds, tokens = decode_rounds(steps, whole, n_new, a.rounds)
        for llama in llamas:
            llama.close()
        ref = tokens["bare JAX"]
        for name in (*steps, *whole):
            same_layout = "jaxhybrid streams" if name.endswith("streams") else "jaxhybrid"
            rows.append(
                dict(
                    n_seq=n_seq,
                    peer=name,
                    timed="decode steps" if name in steps else "whole generate",
                    ms_per_step=step[name] * 1e3,
                    tok_per_s=n_seq / step[name],
                    spread=rounds.spread(name + "/n"),
                    rounds=len(rounds.times[name + "/n"]),
                    jaxhybrid_speedup=step[name] / step[same_layout],
                    best_jaxhybrid_speedup=step[name]
                    / min(step[k] for k in steps if k.startswith("jaxhybrid")),
                    same_tokens_as_bare=bool(np.array_equal(tokens[name], ref)),
                )
            )
    return rows


def decode_rounds(steps: dict, whole: dict, n_new: int, n_rounds: int):
    """Seconds per decode step of every peer, measured round by round.

    ``steps``: peers timing their decode steps only, ``fn(steps) -> (seconds, tokens [seqs, 1 +
    steps])``; ``whole``: peers timed as a whole generate() call, ``fn(new) -> (seconds, tokens
    [seqs, new])``. A warm-up (compiles), then ``n_rounds`` rounds, peers interleaved: step peers
    run ``n_new - 1`` and 1 steps, whole peers ``n_new`` and 1 new tokens (the difference holds
    ``n_new - 1`` steps); transformers runs one round. Returns ``(step, rounds, tokens)``: the
    seconds per step of the best times (NaN where the steps drowned in the noise), the
    :class:`Rounds` (keys ``name/n`` and ``name/1``) and every peer's ``n_new`` tokens."""
    n_steps = n_new - 1  # the first new token comes from the prompt's logits
    tokens = {}
    for name, fn in steps.items():
        fn(1)
        _, tokens[name] = fn(n_steps)
    for name, fn in whole.items():
        fn(1)
        _, tokens[name] = fn(n_new)
    rounds = Rounds()
    for r in range(n_rounds):
        for name, fn in steps.items():
            rounds.add(name + "/n", fn(n_steps)[0])
            rounds.add(name + "/1", fn(1)[0])
        for name, fn in whole.items():
            if name == "transformers" and r:
                continue  # one round: it is two orders of magnitude slower
            rounds.add(name + "/n", fn(n_new)[0])
            rounds.add(name + "/1", fn(1)[0])
    step = {}
    for name in (*steps, *whole):
        n = n_steps - 1 if name in steps else n_steps
        step[name] = (rounds.best(name + "/n") - rounds.best(name + "/1")) / n
        if step[name] <= 0:  # the decode steps drowned in the noise of the prompt's run
            step[name] = float("nan")
    return step, rounds, tokens


def _hf_peer(ctx: Ctx, prompts: np.ndarray, hf=None):
    """transformers' greedy ``generate`` of ``n`` new tokens after ``prompts``, as ``fn(n) ->
    (seconds, tokens [seqs, n])``; ``hf``: the model (default: the Jamba of ``ctx.ckpt``)."""
    import torch
    from transformers import JambaForCausalLM

    torch.set_num_threads(ctx.args.threads)
    if hf is None:
        hf = JambaForCausalLM.from_pretrained(ctx.ckpt).eval()
    ids = torch.tensor(prompts, dtype=torch.long)

    def run(n):
        with torch.no_grad():
            t = time.perf_counter()
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            dt = time.perf_counter() - t
        return dt, out[:, ids.shape[1] :].numpy()

    return run


# --------------------------------------------------------------------------------------------
# 3: cost follows used cells


def _step_seconds(fns: dict, n: int, n_rounds: int) -> tuple[dict, Rounds]:
    """Seconds per decode step of every ``fns[key](steps) -> seconds``: a warm-up, then
    ``n_rounds`` rounds of ``n`` and 1 steps, peers interleaved; ``(T(n) - T(1)) / (n - 1)`` of
    the best times."""
    for fn in fns.values():
        fn(1), fn(n)
    rounds = Rounds()
    for _ in range(n_rounds):
        for key, fn in fns.items():
            rounds.add(f"{key}/n", fn(n))
            rounds.add(f"{key}/1", fn(1))
    return {k: (rounds.best(f"{k}/n") - rounds.best(f"{k}/1")) / (n - 1) for k in fns}, rounds


def bench_kv_scaling(ctx: Ctx) -> list[dict]:
    a = ctx.args
    prompt = _prompts(1, 192, ctx.config.vocab_size, seed=7)
    n_new = 64  # 192 + 64 = 256 cells in use at the end: the smallest span throughout
    variants = [(256, True), (16384, True)] + ([(16384, False)] if not a.quick else [])
    fns = {}
    for kv_size, used_span in variants:
        cfg = jamba_hybrid_config(ctx.config, kv_size=kv_size, n_seq_max=1)

        def run(n, cfg=cfg, used_span=used_span):
            return jh_decode_time(ctx.model, cfg, prompt, n, n_ubatch=1, used_span=used_span)[0]

        fns[(kv_size, used_span)] = run
    step, rounds = _step_seconds(fns, n_new, a.rounds)
    base = step[(256, True)]
    return [
        dict(
            kv_size=k[0],
            attention="used span" if k[1] else "all cells",
            used_cells="193-256",
            ms_per_step=step[k] * 1e3,
            ratio_to_kv256=step[k] / base,
            spread=rounds.spread(f"{k}/n"),
        )
        for k in fns
    ]


def bench_decode_ubatch(ctx: Ctx) -> list[dict]:
    """generate()'s decode step with a large prompt ubatch against one sized to the step (issue
    21, item 3): the steps run in one ubatch of ``min(n_ubatch, n_seq)`` tokens either way."""
    a = ctx.args
    jm = JambaModel(ctx.config)
    n_new = 16 if a.quick else 64
    rows = []
    for n_seq in (1, 8):
        prompts = _prompts(n_seq, 16, ctx.config.vocab_size, seed=5).tolist()
        cfg = jamba_hybrid_config(ctx.config, kv_size=256, n_seq_max=n_seq)
        fns = {}
        for n_ubatch in (64, n_seq):

            def run(n, n_ubatch=n_ubatch, cfg=cfg, prompts=prompts):
                mem = jh.init_hybrid(cfg)
                t = time.perf_counter()
                out = generate(
                    jm, ctx.model, mem, prompts, cfg=cfg, max_new_tokens=n, max_new=n_new,
                    n_ubatch=n_ubatch,
                )  # fmt: skip
                jax.block_until_ready(out.tokens)
                return time.perf_counter() - t

            fns[n_ubatch] = run
        step, rounds = _step_seconds(fns, n_new, a.rounds)
        rows += [
            dict(
                n_seq=n_seq,
                n_ubatch=k,
                ms_per_step=step[k] * 1e3,
                ratio_to_step_sized=step[k] / step[n_seq],
                spread=rounds.spread(f"{k}/n"),
            )
            for k in fns
        ]
    return rows


def bench_scaling_table(ctx: Ctx) -> list[dict]:
    a = ctx.args
    n_new = 17
    rows = []
    fns = {}
    for n_seq in a.batches:
        for kv_size in a.kv_sizes:
            p = 8
            prompts = _prompts(n_seq, p, ctx.config.vocab_size, seed=n_seq)
            cfg = jamba_hybrid_config(ctx.config, kv_size=kv_size, n_seq_max=n_seq)

            def run(n, cfg=cfg, prompts=prompts, n_seq=n_seq):
                return jh_decode_time(ctx.model, cfg, prompts, n, n_ubatch=n_seq)[0]

            fns[(n_seq, kv_size)] = run
    step, rounds = _step_seconds(fns, n_new, a.rounds)
    for k, sec in step.items():
        rows.append(
            dict(
                n_seq=k[0],
                kv_size=k[1],
                ms_per_step=sec * 1e3,
                tok_per_s=k[0] / sec,
                spread=rounds.spread(f"{k}/n"),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# 6: prefill


def bench_prefill(ctx: Ctx) -> list[dict]:
    a = ctx.args
    n_tok = 512
    prompt = _prompts(1, n_tok, ctx.config.vocab_size, seed=11)
    cfg = jamba_hybrid_config(ctx.config, kv_size=1024, n_seq_max=1)
    fns = {}
    for n_ubatch in a.ubatches:

        def run(n_ubatch=n_ubatch):
            mem = _block(jh.init_hybrid(cfg))
            t = time.perf_counter()
            _, _, code = _block(
                prefill(
                    JambaModel(ctx.config),
                    ctx.model,
                    mem,
                    jnp.asarray(prompt),
                    jnp.asarray([n_tok], jnp.int32),
                    jnp.asarray([0], jnp.int32),
                    cfg=cfg,
                    n_ubatch=n_ubatch,
                )
            )
            assert int(code) == 0
            return time.perf_counter() - t

        fns[("jaxhybrid", n_ubatch)] = run
        if ctx.llama_skip is None:
            peer = lcpp.LlamaCppPeer(
                ctx.gguf, n_seq=1, n_ctx_seq=1024, threads=a.threads, n_ubatch=n_ubatch
            )

            def lrun(peer=peer):
                peer.clear()
                t = time.perf_counter()
                peer.prefill(prompt.tolist())
                return time.perf_counter() - t

            fns[("llama.cpp", n_ubatch)] = lrun
    for fn in fns.values():
        fn()
    rounds = Rounds()
    for _ in range(a.rounds):
        for key, fn in fns.items():
            rounds.add(str(key), fn())
    return [
        dict(
            peer=k[0],
            n_ubatch=k[1],
            ms=rounds.best(str(k)) * 1e3,
            tok_per_s=n_tok / rounds.best(str(k)),
            spread=rounds.spread(str(k)),
        )
        for k in fns
    ]


# --------------------------------------------------------------------------------------------
# 4: retraces over a continuous-batching run


class _CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Finished XLA compilation of "):
            self.names.append(msg.split(" in ")[0].removeprefix("Finished XLA compilation of "))


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="mem")
def _context_shift(mem, seq, n_keep, n_discard, *, cfg):
    """llama.cpp's context shift: drop ``[n_keep, n_keep + n_discard)`` and move the rest
    back by ``n_discard`` (Jamba has no RoPE, so nothing to re-rotate)."""
    mem, ok1 = jh.seq_rm(mem, seq, n_keep, n_keep + n_discard, cfg)
    mem, ok2 = jh.seq_add(mem, seq, n_keep + n_discard, -1, -n_discard, cfg)
    return mem, ok1 & ok2


@functools.partial(jax.jit, static_argnames="cfg")
def _pos_max(mem, *, cfg):
    return jh.seq_pos_range(mem, cfg)[1]


def bench_retrace(ctx: Ctx) -> dict:
    a = ctx.args
    n_seq, n_steps, limit = 8, a.engine_steps, 96
    cfg = jamba_hybrid_config(ctx.config, kv_size=2048, n_seq_max=n_seq)
    eng = Engine(JambaModel(ctx.config), ctx.model, cfg, n_ubatch=n_seq, n_prompt=32, n_stop=2)
    rng = np.random.default_rng(0)
    log = _CompileLog()
    logger = logging.getLogger("jax._src.dispatch")
    jax.config.update("jax_log_compiles", True)
    logger.addHandler(log)
    propagate, logger.propagate = logger.propagate, False
    counts = dict(joins=0, leaves=0, forks=0, cancels=0, shifts=0, refused_shifts=0, tokens=0)
    marks = {}
    try:
        for step in range(n_steps):
            running = eng.running()
            free = n_seq - len(running)
            if free and (not running or rng.random() < 0.15):
                length = int(rng.integers(1, 60))
                eng.submit(
                    rng.integers(3, ctx.config.vocab_size, length).tolist(),
                    int(rng.integers(8, 200)),
                    stop_tokens=[5],
                    temperature=float(rng.choice([0.0, 0.8])),
                )
                counts["joins"] += 1
            elif free and running and rng.random() < 0.1:
                eng.fork(running[int(rng.integers(len(running)))].id)
                counts["forks"] += 1
            elif running and rng.random() < 0.02:
                eng.cancel(running[int(rng.integers(len(running)))].id)
                counts["cancels"] += 1
            pos_max = np.asarray(_pos_max(eng.mem, cfg=cfg))
            for r in eng.running():
                n_pos = int(pos_max[r.seq]) + 1
                if n_pos >= limit:
                    n_keep, n_discard = 4, (n_pos - 4) // 2
                    eng.mem, ok = _context_shift(
                        eng.mem, jnp.int32(r.seq), n_keep, n_discard, cfg=cfg
                    )
                    if bool(ok):
                        counts["shifts"] += 1
                    else:  # no free cell to split shared cells off (difference 10): give up
                        eng.cancel(r.id)
                        counts["refused_shifts"] += 1
            before = {r.id for r in eng.running()}
            out = eng.step()
            counts["tokens"] += len(out)
            counts["leaves"] += len(before - {r.id for r in eng.running()})
            if step + 1 in (10, 100, n_steps):
                marks[step + 1] = len(log.names)
    finally:
        logger.removeHandler(log)
        logger.propagate = propagate
        jax.config.update("jax_log_compiles", False)
    per_fn: dict[str, int] = {}
    for n in log.names:
        per_fn[n] = per_fn.get(n, 0) + 1
    heavy = {
        k: v
        for k, v in per_fn.items()
        if any(s in k for s in ("_engine_step", "prefill", "_fork", "_free", "_context_shift"))
    }
    return dict(
        steps=n_steps,
        events=counts,
        compilations_total=len(log.names),
        compilations_after_step=marks,
        engine_functions=heavy,
        max_compilations_per_function=max(heavy.values()) if heavy else 0,
        all_functions=per_fn,
    )


# --------------------------------------------------------------------------------------------
# 5: memory


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _buffer_report(config: JambaConfig, kv_size: int, n_seq: int, label: str) -> dict:
    cfg = jamba_hybrid_config(config, kv_size=kv_size, n_seq_max=n_seq)
    mem = jax.eval_shape(lambda: jh.init_hybrid(cfg))
    kv, rc = cfg.kv, cfg.recurrent
    item = jnp.dtype(kv.dtype_k).itemsize
    theory_kv = 2 * kv.n_layers * kv.n_stream * kv.kv_size * kv.n_kv_heads * kv.head_dim_k * item
    theory_r = rc.n_layers * rc.rs_size * int(np.prod(rc.r_shape)) * jnp.dtype(rc.dtype_r).itemsize
    theory_s = rc.n_layers * rc.rs_size * int(np.prod(rc.s_shape)) * jnp.dtype(rc.dtype_s).itemsize
    theory = theory_kv + theory_r + theory_s
    total = _tree_bytes(mem)
    return dict(
        model=label,
        kv_size=kv_size,
        n_seq=n_seq,
        theoretical_bytes=theory,
        buffer_bytes=total,
        data_bytes=_tree_bytes((mem.kv.k, mem.kv.v, mem.recurrent.r, mem.recurrent.s)),
        metadata_overhead=(total - theory) / theory,
    )


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes (Linux /proc)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def bench_memory(ctx: Ctx) -> dict:
    a = ctx.args
    buffers = [_buffer_report(ctx.config, 4096 * 8, 8, "tiny (parity tests)")]
    full = JambaConfig(  # ai21labs/Jamba-v0.1's shapes (abstract, nothing is allocated)
        vocab_size=65536,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        dtype="bfloat16",
    )
    buffers.append(_buffer_report(full, 4096 * 8, 8, "Jamba-v0.1 shapes, bf16"))

    # Peak RSS over a long donated decode: compile first, then allocate, then run.
    rss = {}
    if os.path.exists("/proc/self/status"):
        n_seq, kv_size = 8, a.rss_kv_size
        cfg = jamba_hybrid_config(ctx.config, kv_size=kv_size, n_seq_max=n_seq)
        seq_ids = jnp.arange(n_seq, dtype=jnp.int32)
        active = jnp.ones((n_seq,), jnp.bool_)
        tokens = jnp.full((n_seq,), 7, jnp.int32)
        abstract = jax.eval_shape(lambda: jh.init_hybrid(cfg))
        step = decode_tokens.lower(
            JambaModel(ctx.config),
            ctx.model,
            abstract,
            tokens,
            seq_ids,
            active,
            cfg=cfg,
            n_ubatch=n_seq,
        ).compile()
        mem_bytes = _tree_bytes(abstract)
        param_bytes = _tree_bytes(ctx.model)
        base, _ = _rss()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak to now
            f.write("5")
        mem = jh.init_hybrid(cfg)
        samples = {}
        for i in range(1, a.rss_steps + 1):
            logits, mem, code = step(ctx.model, mem, tokens, seq_ids, active)
            if i in (1, 10, a.rss_steps // 2, a.rss_steps):
                _block(logits)
                samples[i] = _rss()[0] - base
        _, peak = _rss()
        assert int(code) == 0
        rss = dict(
            kv_size=kv_size,
            steps=a.rss_steps,
            memory_bytes=mem_bytes,
            param_bytes=param_bytes,
            rss_growth_after_step=samples,
            peak_above_runtime=peak - base,
            peak_ratio_to_params_plus_memory=(peak - base) / (mem_bytes + param_bytes),
        )
    return dict(buffers=buffers, rss=rss)


# --------------------------------------------------------------------------------------------
# Output


def _fmt_table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = [c[1] for c in cols]
    body = [[format(r[c[0]], c[2]) if c[2] else str(r[c[0]]) for c in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        f"\n## {title}",
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
    ]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(lines)


def _report(res: dict) -> str:
    out = []
    if "decode" in res:
        out.append(
            _fmt_table(
                "Decode (greedy, prompt {prompt}, {new_tokens} new tokens, "
                "context {context}/seq)".format(**res["setup"]),
                res["decode"],
                [
                    ("n_seq", "seqs", ""),
                    ("peer", "peer", ""),
                    ("ms_per_step", "ms/step", ".3f"),
                    ("tok_per_s", "tok/s", ",.0f"),
                    ("jaxhybrid_speedup", "jaxhybrid speed-up (same layout)", ".2f"),
                    ("best_jaxhybrid_speedup", "best jaxhybrid speed-up", ".2f"),
                    ("spread", "spread", ".0%"),
                    ("same_tokens_as_bare", "same tokens", ""),
                ],
            )
        )
    if "decode_ubatch" in res:
        out.append(
            _fmt_table(
                "generate() decode step by the n_ubatch asked for (steps use min(n_ubatch, seqs))",
                res["decode_ubatch"],
                [
                    ("n_seq", "seqs", ""),
                    ("n_ubatch", "n_ubatch", ""),
                    ("ms_per_step", "ms/step", ".3f"),
                    ("ratio_to_step_sized", "vs n_ubatch = seqs", ".2f"),
                    ("spread", "spread", ".0%"),
                ],
            )
        )
    if "kv_scaling" in res:
        out.append(
            _fmt_table(
                "Cost follows used cells (1 seq, 193-256 cells used)",
                res["kv_scaling"],
                [
                    ("kv_size", "kv_size", ""),
                    ("attention", "attention over", ""),
                    ("ms_per_step", "ms/step", ".3f"),
                    ("ratio_to_kv256", "vs kv_size 256", ".2f"),
                    ("spread", "spread", ".0%"),
                ],
            )
        )
    if "scaling" in res:
        out.append(
            _fmt_table(
                "Decode step vs batch and kv_size (8-token prompts, 16 steps)",
                res["scaling"],
                [
                    ("n_seq", "seqs", ""),
                    ("kv_size", "kv_size", ""),
                    ("ms_per_step", "ms/step", ".3f"),
                    ("tok_per_s", "tok/s", ",.0f"),
                    ("spread", "spread", ".0%"),
                ],
            )
        )
    if "prefill" in res:
        out.append(
            _fmt_table(
                "Prefill of a 512-token prompt",
                res["prefill"],
                [
                    ("peer", "peer", ""),
                    ("n_ubatch", "n_ubatch", ""),
                    ("ms", "ms", ".1f"),
                    ("tok_per_s", "tok/s", ",.0f"),
                    ("spread", "spread", ".0%"),
                ],
            )
        )
    if "retrace" in res:
        r = res["retrace"]
        out.append(
            f"\n## Retraces over a {r['steps']}-step continuous-batching run\n"
            f"events: {r['events']}\n"
            f"compilations (all jit calls, cumulative) after steps: "
            f"{r['compilations_after_step']}\n"
            f"engine functions: {r['engine_functions']}"
        )
    if "memory" in res:
        m = res["memory"]
        out.append(
            _fmt_table(
                "Memory buffers vs theoretical K/V + r + s sizes",
                m["buffers"],
                [
                    ("model", "model", ""),
                    ("kv_size", "kv_size", ""),
                    ("n_seq", "seqs", ""),
                    ("theoretical_bytes", "theoretical B", ",d"),
                    ("buffer_bytes", "buffers B", ",d"),
                    ("metadata_overhead", "metadata", ".2%"),
                ],
            )
        )
        if m["rss"]:
            r = m["rss"]
            out.append(
                f"peak RSS: {r['steps']} donated decode steps at kv_size {r['kv_size']}: "
                f"growth after steps {r['rss_growth_after_step']} B; peak above the runtime "
                f"{r['peak_above_runtime']:,} B = {r['peak_ratio_to_params_plus_memory']:.2f} x "
                f"(params {r['param_bytes']:,} B + memory {r['memory_bytes']:,} B)"
            )
    if "families" in res:
        out.append(
            _fmt_table(
                "Model families: decode ms/step (tiny test checkpoints, float32, greedy, "
                "prompt {prompt}, {new_tokens} new tokens, context {context}/seq)".format(
                    **res["setup"]
                ),
                [
                    {
                        **r,
                        "first_diff": "-" if r["first_diff_step"] is None else r["first_diff_step"],
                    }
                    for r in res["families"]
                ],
                [
                    ("family", "family", ""),
                    ("n_seq", "seqs", ""),
                    ("peer", "peer", ""),
                    ("timed", "timed", ""),
                    ("ms_per_step", "ms/step", ".3f"),
                    ("tok_per_s", "tok/s", ",.0f"),
                    ("jaxhybrid_speedup", "jaxhybrid speed-up", ".2f"),
                    ("spread", "spread", ".0%"),
                    ("same_tokens", "same tokens as jaxhybrid", ""),
                    ("first_diff", "first diff", ""),
                ],
            )
        )
    if "gdn_forms" in res:
        out.append(
            _fmt_table(
                "Gated DeltaNet on 512 tokens of one sequence: chunked form vs one-step scan",
                res["gdn_forms"],
                [
                    ("heads", "v heads", ""),
                    ("dk", "dk", ""),
                    ("dv", "dv", ""),
                    ("n_sets", "seq sets", ""),
                    ("token_states", "per-token states", ""),
                    ("chunked_ms", "chunked ms", ".1f"),
                    ("recurrent_ms", "one-step ms", ".1f"),
                    ("chunked_speedup", "chunked speed-up", ".2f"),
                ],
            )
        )
    if "family_prefill" in res:
        out.append(
            _fmt_table(
                "Model families: prefill of a 512-token prompt (one sequence, ubatch 512)",
                res["family_prefill"],
                [
                    ("family", "family", ""),
                    ("peer", "peer", ""),
                    ("ms", "ms", ".1f"),
                    ("tok_per_s", "tok/s", ",.0f"),
                    ("jaxhybrid_speedup", "jaxhybrid speed-up", ".2f"),
                    ("spread", "spread", ".0%"),
                ],
            )
        )
    if "skipped" in res:
        out += [f"skipped: {s}" for s in res["skipped"]]
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (under two minutes)")
    p.add_argument("--json", default="benchmarks/results.json", help="where to write results")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    p.add_argument(
        "--llama-cpp-src",
        default=os.environ.get("LLAMA_CPP_SRC"),
        help="llama.cpp tree holding convert_hf_to_gguf.py (or env LLAMA_CPP_SRC)",
    )
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=[
            "decode",
            "decode_ubatch",
            "kv_scaling",
            "scaling",
            "prefill",
            "retrace",
            "memory",
            "families",
        ],
    )
    a = p.parse_args(argv)
    full = not a.quick
    a.prompt, a.context = 64, 4096
    # --quick is a smoke run of every section (about 110 s on an idle 2-core machine, most of it
    # compiling, plus about 4 minutes for families: four models compiled, transformers' Mamba-2
    # on its reference PyTorch path); its figures are indicative only.
    a.new_tokens = 128 if full else 32
    a.rounds = 7 if full else 1
    a.batches = (1, 8, 32) if full else (8,)
    a.kv_sizes = (1024, 4096, 16384) if full else (1024,)
    a.decode_seqs = (1, 8) if full else (8,)
    a.ubatches = (64, 128, 512) if full else (128,)
    a.api_peer = full  # generate() adds a compilation per batch size
    a.engine_steps = 1000 if full else 60
    a.rss_kv_size, a.rss_steps = (1 << 20, 1000) if full else (1 << 16, 50)
    sections = [
        "decode",
        "decode_ubatch",
        "kv_scaling",
        "scaling",
        "prefill",
        "retrace",
        "memory",
        "families",
    ]
    only = set(a.only or sections)

    from benchmarks.families import bench_families  # imports this module

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="jaxhybrid-bench-"))
    ckpt = work / "jamba"
    _make_checkpoint(ckpt, seed=0)
    config, model = load_jamba(ckpt)
    llama_skip = lcpp.available(a.llama_cpp_src)
    gguf_path = None
    if llama_skip is None and only & {"decode", "prefill"}:
        gguf_path = lcpp.convert(ckpt, a.llama_cpp_src, work / "jamba-f32.gguf", config.vocab_size)
    res = dict(
        setup=dict(
            quick=a.quick,
            prompt=a.prompt,
            context=a.context,
            new_tokens=a.new_tokens,
            rounds=a.rounds,
            threads=a.threads,
            model=_model_config(),
            dtype="float32",
            jax=jax.__version__,
            backend=jax.default_backend(),
            cpu_count=os.cpu_count(),
            machine=platform.platform(),
        ),
        skipped=[],
    )
    if llama_skip:
        res["skipped"].append(f"llama.cpp peer: {llama_skip}")
    ctx = Ctx(a, config, model, ckpt, gguf_path, llama_skip, res)
    for name, fn in [
        ("decode", bench_decode),
        ("decode_ubatch", bench_decode_ubatch),
        ("kv_scaling", bench_kv_scaling),
        ("scaling", bench_scaling_table),
        ("prefill", bench_prefill),
        ("retrace", bench_retrace),
        ("memory", bench_memory),
        ("families", bench_families),
    ]:
        if name in only:
            t = time.perf_counter()
            res[name] = fn(ctx)
            print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    res["setup"]["wall_s"] = time.perf_counter() - t_start
    print(_report(res))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {a.json} ({res['setup']['wall_s']:.0f} s)")
    return res
