"""Jitted prefill, decode and generation for any :class:`~jaxhybrid.HybridModel`.

The decode rhythm is llama.cpp's: a prompt is decoded with an output on its last token; each step
samples one token per active sequence from its latest logits, and the sampled tokens of the
sequences that go on are decoded together in one batch (one token per sequence) to give the next
logits. A sequence stops after a stop token (kept in its output) or ``max_new`` tokens; its last
token is never decoded, so memory holds the prompt and all generated tokens but the last.

Every function takes the model plug-in (static: one compilation per plug-in, memory config and
capacities) and its parameters (any pytree) separately.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Float, Int, Scalar
from jaxhybrid.serving._batches import (
    as_prompts,
    check_capacity,
    check_prompts,
    check_stop_tokens,
    int_arg,
    int_list,
    per_seq,
    prompt_batch,
    stop_array,
    token_batch,
    unpermute,
)
from jaxhybrid.serving._sampling import SamplingParams, sample, sampling_params

__all__ = [
    "GenerateOutput",
    "check_setup",
    "decode_ubatch",
    "decode_tokens",
    "generate",
    "model_decode",
    "prefill",
    "StepOutput",
    "sample_step",
    "step_decode",
]

_I32 = jnp.int32


def check_setup(model, cfg, n_ubatch, what: str = "model") -> int:
    """The plug-in, its memory config and the ubatch size every entry point takes; returns
    ``n_ubatch``.

    Raises:
        jaxhybrid.InvalidTypeError: ``model`` is not a :class:`~jaxhybrid.HybridModel`, ``cfg``
            not a :class:`~jaxhybrid.HybridConfig`, or ``n_ubatch`` not an integer.
        jaxhybrid.InvalidArgumentError: ``n_ubatch < 1``.
    """
    if not isinstance(model, jh.HybridModel):
        raise jh.InvalidTypeError(
            f"{what} must implement jaxhybrid.HybridModel (e.g. JambaModel(config)), got "
            f"{type(model).__name__}; since 0.2 the plug-in comes first and its params second"
        )
    if not isinstance(cfg, jh.HybridConfig):
        raise jh.InvalidTypeError(
            f"cfg must be a jaxhybrid.HybridConfig (model.memory_config(...)), got "
            f"{type(cfg).__name__}"
        )
    return int_arg(n_ubatch, "n_ubatch", lo=1)


def model_decode(model: jh.HybridModel, params, mem, batch, *, cfg, n_ubatch):
    """:func:`jaxhybrid.decode` of the model's step, with its vocabulary and K-shift RoPE."""
    return jh.decode(
        model.step_fn(cfg),
        params,
        mem,
        batch,
        cfg,
        n_ubatch=n_ubatch,
        n_vocab=model.n_vocab,
        rope_fn=model.rope_fn,
    )


@functools.partial(
    jax.jit, static_argnames=("model", "cfg", "n_ubatch", "output_all"), donate_argnames="mem"
)
def prefill(
    model: jh.HybridModel,
    params,
    mem: jh.HybridMemory,
    prompts: Int[Array, "seqs prompt"],
    lengths: Int[Array, " seqs"],
    seq_ids: Int[Array, " seqs"],
    *,
    cfg: jh.HybridConfig,
    n_ubatch: int,
    output_all: bool = False,
):
    """Decodes several prompts at once (continuing what memory holds of each sequence).

    Rows with ``lengths == 0`` are skipped. The batch has capacity ``seqs * prompt`` and is run in
    ubatches of ``n_ubatch`` tokens. Being jitted, it checks its arrays inside jit: a token outside
    the model's vocabulary, a bad sequence id or a full memory is a code, not an exception.

    Returns:
        ``(logits, mem, code)``: ``logits [seqs, vocab]`` of every prompt's last token (``[seqs,
        prompt, vocab]`` of every token with ``output_all``), the memory (donated) and
        :func:`jaxhybrid.decode`'s :class:`~jaxhybrid.DecodeCode` (on failure memory is
        unchanged).
    """
    n_seq, p = prompts.shape
    batch, perm = prompt_batch(prompts, lengths, seq_ids, output_all)
    out, mem, res = model_decode(model, params, mem, batch, cfg=cfg, n_ubatch=n_ubatch)
    out = unpermute(out, perm).reshape(n_seq, p, -1)
    if not output_all:
        out = jnp.take_along_axis(out, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return out, mem, res.code


def decode_ubatch(n_ubatch: int, n_seq: int) -> int:
    """The ubatch of a decode step of one token for each of ``n_seq`` rows: the step's own size,
    not the prompt's ``n_ubatch`` (a 512-token ubatch for an 8-token step would pad it 64-fold);
    at most ``n_ubatch`` (the caller's bound on a ubatch)."""
    return max(1, min(n_ubatch, n_seq))


def step_decode(model, params, mem, tokens, seq_ids, active, cfg, n_ubatch):
    """:func:`decode_tokens` without its own ``jit`` (for use inside other jitted loops)."""
    batch, perm = token_batch(tokens, seq_ids, active)
    out, mem, res = model_decode(model, params, mem, batch, cfg=cfg, n_ubatch=n_ubatch)
    return unpermute(out, perm), mem, res.code


@functools.partial(jax.jit, static_argnames=("model", "cfg", "n_ubatch"), donate_argnames="mem")
def decode_tokens(
    model: jh.HybridModel,
    params,
    mem: jh.HybridMemory,
    tokens: Int[Array, " seqs"],
    seq_ids: Int[Array, " seqs"],
    active: Bool[Array, " seqs"],
    *,
    cfg: jh.HybridConfig,
    n_ubatch: int,
):
    """Decodes one token per active sequence (positions continue memory). Being jitted, it checks
    its arrays inside jit (a token outside the vocabulary is ``DecodeCode.INVALID_BATCH``).

    Returns:
        ``(logits [seqs, vocab], mem, code)``; rows of inactive sequences are zero.
    """
    return step_decode(model, params, mem, tokens, seq_ids, active, cfg, n_ubatch)


class StepOutput(NamedTuple):
    """One sampling step of :func:`sample_step`."""

    tokens: Int[Array, " seqs"]
    finished: Bool[Array, " seqs"]
    logits: Float[Array, "seqs vocab"]
    active: Bool[Array, " seqs"]
    mem: jh.HybridMemory
    code: Scalar


def sample_step(
    model, params, mem, logits, active, count, sp, stop, max_new, seq_ids, *, cfg, n_ubatch
) -> StepOutput:
    """Samples a token for every active sequence, retires finished ones and decodes the tokens of
    the others (``active`` of the result: the sequences that go on)."""
    tok = sample(logits, sp, count)
    count = count + active.astype(_I32)
    is_stop = jnp.any((tok[:, None] == stop) & (stop >= 0), axis=-1)
    finished = active & (is_stop | (count >= max_new))
    going = active & ~finished

    def run(m):
        return step_decode(model, params, m, tok, seq_ids, going, cfg, n_ubatch)

    def skip(m):
        return jnp.zeros_like(logits), m, jnp.int32(jh.DecodeCode.OK)

    new_logits, mem, code = jax.lax.cond(jnp.any(going), run, skip, mem)
    # A failed decode (no memory slot) stops the sequences it carried.
    going = going & (code == jh.DecodeCode.OK)
    return StepOutput(tok, finished, new_logits, going, mem, code)


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
        tokens: ``[n_seq, max_new]`` generated tokens, -1 after a sequence's end.
        lengths: ``[n_seq]`` number of generated tokens.
        mem: the final memory.
        code: ``DecodeCode.OK``, or the first other :class:`~jaxhybrid.DecodeCode` met.
    """

    tokens: Int[Array, "seqs new"]
    lengths: Int[Array, " seqs"]
    mem: jh.HybridMemory
    code: Any


class _GenerateCarry(NamedTuple):
    logits: Float[Array, "seqs vocab"]
    mem: jh.HybridMemory
    active: Bool[Array, " seqs"]
    count: Int[Array, " seqs"]
    out: Int[Array, "seqs new"]
    code: Scalar


@functools.partial(
    jax.jit, static_argnames=("model", "cfg", "n_ubatch", "max_new"), donate_argnames="mem"
)
def _generate(
    model, params, mem, prompts, lengths, seq_ids, max_new_seq, stop, sp, *, cfg, n_ubatch, max_new
):
    n_seq = prompts.shape[0]
    logits, mem, code0 = prefill(
        model, params, mem, prompts, lengths, seq_ids, cfg=cfg, n_ubatch=n_ubatch
    )
    active = (lengths > 0) & (max_new_seq > 0) & (code0 == jh.DecodeCode.OK)
    out = jnp.full((n_seq, max_new), -1, _I32)
    count = jnp.zeros((n_seq,), _I32)

    def body(c: _GenerateCarry) -> _GenerateCarry:
        st = sample_step(
            model,
            params,
            c.mem,
            c.logits,
            c.active,
            c.count,
            sp,
            stop,
            max_new_seq,
            seq_ids,
            cfg=cfg,
            n_ubatch=decode_ubatch(n_ubatch, n_seq),
        )
        rows = jnp.where(c.active, jnp.arange(n_seq), n_seq)
        out = c.out.at[rows, c.count].set(st.tokens, mode="drop")
        code = jnp.where(c.code == jh.DecodeCode.OK, st.code, c.code)
        count = c.count + c.active.astype(_I32)
        return _GenerateCarry(st.logits, st.mem, st.active, count, out, code)

    init = _GenerateCarry(logits, mem, active, count, out, code0)
    final = jax.lax.while_loop(lambda c: jnp.any(c.active), body, init)
    return GenerateOutput(final.out, final.count, final.mem, final.code)


def generate(
    model: jh.HybridModel,
    params,
    mem: jh.HybridMemory,
    prompts: Sequence[Sequence[int]],
    *,
    cfg: jh.HybridConfig,
    n_ubatch: int,
    max_new_tokens: int | Sequence[int],
    seq_ids: Sequence[int] | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] = 0,
    max_new: int | None = None,
    n_prompt: int | None = None,
    n_stop: int | None = None,
) -> GenerateOutput:
    """Generates for several sequences at once in one jitted call (memory donated).

    The prompts are decoded in one batch (ubatches of ``n_ubatch``), continuing whatever memory
    holds of their sequences; then every step samples one token per active sequence and decodes
    them together in a ``lax.while_loop`` (see the module docstring). Every argument is checked
    before any device work: a refused call has not touched ``mem``.

    Args:
        model: the model plug-in (e.g. :class:`jaxhybrid.models.JambaModel`).
        params: its parameters (a pytree).
        mem: a hybrid memory built with ``cfg`` (donated: do not reuse it).
        prompts: one list of token ids per sequence; an empty prompt leaves its row idle.
        cfg: the hybrid config (``model.memory_config(...)``).
        n_ubatch: ubatch size of the prompt decode; each later step (one token per prompt)
            runs in one ubatch of ``min(n_ubatch, len(prompts))`` tokens.
        max_new_tokens: tokens to generate at most, for all or per sequence.
        seq_ids: sequence id of each prompt (default ``0..n-1``).
        stop_tokens: ids ending a sequence (kept in its output), for all or per sequence.
        temperature, top_k, top_p, seed: sampling settings, for all or per sequence.
        max_new, n_prompt, n_stop: static capacities (defaults: the largest needed). Calls with the
            same capacities, number of prompts and model compile once.

    Returns:
        A :class:`GenerateOutput` (device arrays).

    Raises:
        jaxhybrid.InvalidTypeError: an argument of the wrong type, e.g. a float or a bool where an
            integer is due (token ids, sequence ids, lengths, ``top_k``, ``seed``; never
            converted, docs/semantics.md §15.6).
        jaxhybrid.InvalidArgumentError: a value out of range: a token id outside the vocabulary,
            a sequence id outside ``[0, n_seq_max)`` or listed twice, a negative
            ``max_new_tokens``, a prompt and ``max_new_tokens`` (or a capacity) that one
            sequence's ``kv_size`` cells cannot hold, sampling settings out of range
            (finite temperature, ``top_k >= 0``, ``top_p`` in ``(0, 1]``), lists of the wrong
            length.
    """
    n_ubatch = check_setup(model, cfg, n_ubatch)
    if not isinstance(mem, jh.HybridMemory):
        raise jh.InvalidTypeError(f"mem must be a jaxhybrid.HybridMemory, got {type(mem).__name__}")
    rows = check_prompts(prompts, model.n_vocab)
    n = len(rows)
    if n == 0:
        raise jh.InvalidArgumentError("generate needs at least one prompt")
    ids = _check_seq_ids(seq_ids, n, cfg.n_seq_max)
    if n_prompt is not None:
        n_prompt = int_arg(n_prompt, "n_prompt", lo=1)
        check_capacity(n_prompt, "n_prompt", cfg)
    mnt, names = per_seq(
        max_new_tokens, n, "max_new_tokens", lambda v, what: int_arg(v, what, lo=0)
    )
    for i, (p, m, name) in enumerate(zip(rows, mnt, names, strict=True)):
        if p:  # the prompt and all generated tokens but the last are decoded
            need = f"len(prompts[{i}]) + {name} - 1 = {len(p)} + {m} - 1"
            check_capacity(len(p) + max(m, 1) - 1, need, cfg)
    if max_new is None:
        cap = max(1, *mnt)
    else:
        cap = int_arg(max_new, "max_new", lo=1)
        check_capacity(cap, "max_new", cfg)
    if max(mnt) > cap:
        raise jh.InvalidArgumentError(f"max_new_tokens {max(mnt)} exceeds max_new={cap}")
    if n_stop is not None:
        n_stop = int_arg(
            n_stop, "n_stop", lo=0, hi=model.n_vocab + 1, limit=f"n_vocab={model.n_vocab}"
        )
    stops = check_stop_tokens(stop_tokens, n, n_stop)
    sp = sampling_params(n, temperature, top_k, top_p, seed)
    toks, lens = as_prompts(rows, n_prompt)
    return _generate(
        model,
        params,
        mem,
        jnp.asarray(toks),
        jnp.asarray(lens),
        jnp.asarray(np.asarray(ids, np.int32)),
        jnp.asarray(np.asarray(mnt, np.int32)),
        jnp.asarray(stop_array(stops, n_stop)),
        SamplingParams(*(jnp.asarray(a) for a in sp)),
        cfg=cfg,
        n_ubatch=n_ubatch,
        max_new=cap,
    )


def _check_seq_ids(seq_ids, n: int, n_seq_max: int) -> list[int]:
    """One sequence id per prompt, each in ``[0, n_seq_max)``, none twice (default ``0..n-1``)."""
    if seq_ids is None:
        if n > n_seq_max:
            raise jh.InvalidArgumentError(f"{n} prompts, more than n_seq_max={n_seq_max}")
        return list(range(n))
    ids = int_list(seq_ids, "seq_ids", 0, n_seq_max, f"n_seq_max={n_seq_max}")
    if len(ids) != n:
        raise jh.InvalidArgumentError(f"{len(ids)} seq_ids for {n} prompts")
    first: dict[int, int] = {}
    for j, s in enumerate(ids):
        if s in first:
            raise jh.InvalidArgumentError(
                f"seq_ids[{j}] = {s} is listed twice (also seq_ids[{first[s]}]): two prompts "
                "would write one sequence"
            )
        first[s] = j
    return ids
