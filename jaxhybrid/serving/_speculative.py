"""Greedy speculative decoding on hybrid models, rejected drafts removed by exact rollback.

A small draft model proposes ``k`` tokens per sequence, one at a time; the target model checks all
of them in one batch of ``k + 1`` tokens per sequence (the last accepted token and the ``k``
drafts). The longest prefix of drafts equal to the target's own greedy choices is kept, plus the
target's next token, so the output is token for token that of plain greedy decoding of the target.
The rejected suffix is removed from both memories with ``seq_rm(seq, p, -1)``, which the rollback
snapshots of the recurrent part (``n_snapshots >= k``, spec §5.10) make exact: no re-prefill. The
whole loop (drafting, verification, rollback) runs in one ``jax.jit`` / ``lax.while_loop``.

Round invariant: each memory has absorbed every token of the sequence but ``last``, the newest
accepted one, which starts the next round.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

import jaxhybrid as jh
from jaxhybrid.array_typing import Array, Bool, Int, Scalar
from jaxhybrid.serving._batches import (
    as_prompts,
    check_capacity,
    check_prompts,
    int_arg,
    prompt_batch,
    unpermute,
)
from jaxhybrid.serving._generate import check_setup, model_decode, prefill, step_decode

__all__ = ["SpeculativeOutput", "speculative_generate"]

_I32 = jnp.int32
_OK = jh.DecodeCode.OK


class SpeculativeOutput(NamedTuple):
    """Result of :func:`speculative_generate`.

    Attributes:
        tokens: ``[n_seq, max_new]`` generated tokens (the target's greedy continuation).
        n_rounds: draft-and-verify rounds run.
        n_drafted: draft tokens proposed, over all sequences.
        n_accepted: draft tokens the target agreed with.
        target_mem, draft_mem: the final memories (each sequence holds its prompt and all but
            the last generated token, as after plain decoding).
        code: ``DecodeCode.OK``, the first other code of a decode, or
            ``DecodeCode.ROLLBACK_REFUSED`` when a rollback was refused (``n_snapshots < k``).
    """

    tokens: Int[Array, "seqs new"]
    n_rounds: Scalar
    n_drafted: Scalar
    n_accepted: Scalar
    target_mem: jh.HybridMemory
    draft_mem: jh.HybridMemory
    code: Scalar


class _Round(NamedTuple):
    """The carry of the draft-and-verify loop."""

    target_mem: jh.HybridMemory
    draft_mem: jh.HybridMemory
    last: Int[Array, " seqs"]  # the newest accepted token, not yet absorbed by either memory
    active: Bool[Array, " seqs"]
    count: Int[Array, " seqs"]
    out: Int[Array, "seqs cap"]
    n_rounds: Scalar
    n_drafted: Scalar
    n_accepted: Scalar
    code: Scalar


class _Models(NamedTuple):
    """Both plug-ins and their memory configs (static)."""

    target: jh.HybridModel
    draft: jh.HybridModel
    target_cfg: jh.HybridConfig
    draft_cfg: jh.HybridConfig


def _rollback(mem, keep_upto, active, cfg):
    """``seq_rm(s, keep_upto[s] + 1, -1)`` for every active sequence; all must succeed."""

    def one(s, carry):
        mem, ok = carry
        new, ok_s = jh.seq_rm(mem, s, keep_upto[s] + 1, -1, cfg)
        use = active[s]
        mem = jh.select_tree(use, new, mem)
        return mem, ok & (ok_s | ~use)

    return jax.lax.fori_loop(0, keep_upto.shape[0], one, (mem, jnp.bool_(True)))


def _draft(models: _Models, draft_params, c: _Round, seq_ids, k: int, n_ubatch: int):
    """``k + 1`` single-token draft steps (the last one only absorbs the ``k``-th draft).

    Returns:
        ``(draft_mem, drafts [n_seq, k], code)``.
    """

    def step(carry, _):
        d_mem, tok, code = carry
        logits, d_mem, c_step = step_decode(
            models.draft, draft_params, d_mem, tok, seq_ids, c.active, models.draft_cfg, n_ubatch
        )
        nxt = jnp.argmax(logits, axis=-1).astype(_I32)
        return (d_mem, nxt, jnp.where(code != _OK, code, c_step)), nxt

    (d_mem, _, code), drafts = jax.lax.scan(step, (c.draft_mem, c.last, c.code), None, k + 1)
    return d_mem, drafts[:k].T, code


def _verify(models: _Models, target_params, c: _Round, drafts, seq_ids, k: int, n_ubatch: int):
    """The target's greedy token after ``last`` and after each draft, in one batch.

    Returns:
        ``(target_mem, greedy [n_seq, k + 1], code)``.
    """
    n_seq = drafts.shape[0]
    cand = jnp.concatenate([c.last[:, None], drafts], axis=1)
    batch, perm = prompt_batch(cand, jnp.where(c.active, k + 1, 0), seq_ids, output_all=True)
    logits, t_mem, res = model_decode(
        models.target, target_params, c.target_mem, batch, cfg=models.target_cfg, n_ubatch=n_ubatch
    )
    greedy = jnp.argmax(unpermute(logits, perm).reshape(n_seq, k + 1, -1), axis=-1)
    return t_mem, greedy.astype(_I32), res.code.astype(_I32)


def _round(
    models: _Models, target_params, draft_params, c: _Round, seq_ids, k: int, max_new: int, n_ubatch
) -> _Round:
    """One draft-and-verify round: ``k`` drafts, one target batch, the accepted prefix and the
    target's own next token appended, the rejected drafts rolled back in both memories."""
    n_seq = seq_ids.shape[0]
    # The position before ``last`` of each prompt's sequence (ids 0..n_seq-1 of n_seq_max).
    base = jh.seq_pos_range(c.target_mem, models.target_cfg)[1][:n_seq]
    d_mem, drafts, code_d = _draft(models, draft_params, c, seq_ids, k, n_ubatch)
    t_mem, greedy, code_t = _verify(models, target_params, c, drafts, seq_ids, k, n_ubatch)
    match = jnp.cumprod((drafts == greedy[:, :k]).astype(_I32), axis=1)
    m = jnp.sum(match, axis=1)  # accepted drafts
    bonus = greedy[jnp.arange(n_seq), m]  # the target's own next token
    i = jnp.arange(k + 1)[None, :]
    padded = jnp.concatenate([drafts, jnp.zeros((n_seq, 1), _I32)], axis=1)
    new = jnp.where(i < m[:, None], padded, bonus[:, None])
    n_new = jnp.where(c.active, jnp.minimum(m + 1, max_new - c.count), 0)
    col = jnp.where(i < n_new[:, None], c.count[:, None] + i, c.out.shape[1])
    out = c.out.at[jnp.arange(n_seq)[:, None], col].set(new, mode="drop")

    # Both memories keep everything up to the last accepted draft (position base + 1 + m).
    keep = base + 1 + m
    t_mem, ok_t = _rollback(t_mem, keep, c.active, models.target_cfg)
    d_mem, ok_d = _rollback(d_mem, keep, c.active, models.draft_cfg)
    code = jnp.where(code_d != _OK, code_d, code_t)
    code = jnp.where((code == _OK) & ~(ok_t & ok_d), jh.DecodeCode.ROLLBACK_REFUSED, code)
    count = c.count + n_new
    return _Round(
        target_mem=t_mem,
        draft_mem=d_mem,
        last=bonus,
        active=c.active & (count < max_new),
        count=count,
        out=out,
        n_rounds=c.n_rounds + 1,
        n_drafted=c.n_drafted + jnp.sum(jnp.where(c.active, k, 0)),
        n_accepted=c.n_accepted + jnp.sum(jnp.where(c.active, m, 0)),
        code=code.astype(_I32),
    )


@functools.partial(
    jax.jit,
    static_argnames=("models", "k", "max_new", "n_ubatch"),
    donate_argnames=("target_mem", "draft_mem"),
)
def _speculate(
    target_params,
    draft_params,
    target_mem,
    draft_mem,
    prompts,
    lengths,
    *,
    models: _Models,
    k: int,
    max_new: int,
    n_ubatch: int,
) -> SpeculativeOutput:
    n_seq = prompts.shape[0]
    seq_ids = jnp.arange(n_seq, dtype=_I32)
    # Both memories absorb the prompts but their last token, which starts the first round.
    held = jnp.maximum(lengths - 1, 0)
    _, target_mem, c1 = prefill(
        models.target,
        target_params,
        target_mem,
        prompts,
        held,
        seq_ids,
        cfg=models.target_cfg,
        n_ubatch=n_ubatch,
    )
    _, draft_mem, c2 = prefill(
        models.draft,
        draft_params,
        draft_mem,
        prompts,
        held,
        seq_ids,
        cfg=models.draft_cfg,
        n_ubatch=n_ubatch,
    )
    code = jnp.where(c1 != _OK, c1, c2).astype(_I32)
    zero = jnp.int32(0)
    init = _Round(
        target_mem=target_mem,
        draft_mem=draft_mem,
        last=jnp.take_along_axis(prompts, held[:, None], axis=1)[:, 0],
        active=(lengths > 0) & (code == _OK),
        count=jnp.zeros((n_seq,), _I32),
        out=jnp.full((n_seq, max_new + k + 1), -1, _I32),
        n_rounds=zero,
        n_drafted=zero,
        n_accepted=zero,
        code=code,
    )

    def body(c: _Round) -> _Round:
        return _round(models, target_params, draft_params, c, seq_ids, k, max_new, n_ubatch)

    final = jax.lax.while_loop(lambda c: jnp.any(c.active) & (c.code == _OK), body, init)
    return SpeculativeOutput(
        final.out[:, :max_new],
        final.n_rounds,
        final.n_drafted,
        final.n_accepted,
        final.target_mem,
        final.draft_mem,
        final.code,
    )


def speculative_generate(
    target: jh.HybridModel,
    target_params,
    draft: jh.HybridModel,
    draft_params,
    prompts,
    *,
    target_cfg: jh.HybridConfig,
    draft_cfg: jh.HybridConfig,
    k: int,
    max_new_tokens: int,
    n_ubatch: int,
    n_prompt: int | None = None,
) -> SpeculativeOutput:
    """Greedy generation by the target model, drafted ``k`` tokens at a time by the draft model.

    Args:
        target, draft: the model plug-ins. They must share the vocabulary, and their steps must
            write per-token recurrent states (``per_token_states``) for the rollback.
        target_params, draft_params: their parameters.
        prompts: one non-empty list of token ids per sequence (sequence ids ``0..n-1``).
        target_cfg, draft_cfg: hybrid configs of the two memories, both with
            ``recurrent.n_snapshots >= k`` (the deepest rollback is ``k`` tokens).
        k: draft tokens per round.
        max_new_tokens: tokens to generate per sequence.
        n_ubatch: ubatch size of every decode (at least ``n_seq * (k + 1)`` for one-ubatch
            verification; smaller values still work, in several ubatches).
        n_prompt: static prompt capacity (default: the longest prompt).

    Returns:
        A :class:`SpeculativeOutput`; ``tokens`` equal plain greedy decoding of the target.

    Raises:
        jaxhybrid.InvalidTypeError: a model that is not a plug-in, a config that is not a
            :class:`~jaxhybrid.HybridConfig`, or a float or a bool where an integer is due
            (``k``, ``max_new_tokens``, ``n_ubatch``, ``n_prompt``, token ids; §15.6).
        jaxhybrid.InvalidArgumentError: a model without per-token states, different
            vocabularies, ``n_snapshots < k``, ``k`` or ``max_new_tokens`` below 1 or outside
            int32, an empty prompt, a token id outside the vocabulary, more prompts than
            ``n_seq_max``, or a prompt and ``max_new_tokens`` one sequence's ``kv_size`` cells
            cannot hold.
    """
    n_ubatch = int_arg(n_ubatch, "n_ubatch", lo=1)
    for name, model, cfg in (("target", target, target_cfg), ("draft", draft, draft_cfg)):
        check_setup(model, cfg, n_ubatch, name)
        if not model.per_token_states:
            raise jh.InvalidArgumentError(
                f"the {name} model's step does not write per-token recurrent states, so its "
                "memory cannot roll back rejected drafts"
            )
    if target.n_vocab != draft.n_vocab:
        raise jh.InvalidArgumentError(
            f"vocabularies differ: target {target.n_vocab}, draft {draft.n_vocab}"
        )
    k = int_arg(k, "k", lo=1)
    max_new_tokens = int_arg(max_new_tokens, "max_new_tokens", lo=1)
    for name, cfg in (("target_cfg", target_cfg), ("draft_cfg", draft_cfg)):
        if cfg.recurrent.n_snapshots < k:
            raise jh.InvalidArgumentError(
                f"{name}.recurrent.n_snapshots={cfg.recurrent.n_snapshots} cannot roll back the "
                f"{k} draft tokens of a round: build it with n_snapshots >= {k}"
            )
    rows = check_prompts(prompts, target.n_vocab)
    if not rows:
        raise jh.InvalidArgumentError("speculative_generate needs at least one prompt")
    if any(len(p) == 0 for p in rows):
        raise jh.InvalidArgumentError("every prompt needs at least one token")
    n_seq_max = min(target_cfg.n_seq_max, draft_cfg.n_seq_max)
    if len(rows) > n_seq_max:
        raise jh.InvalidArgumentError(
            f"{len(rows)} prompts take sequence ids 0..{len(rows) - 1}, more than "
            f"n_seq_max={n_seq_max}"
        )
    if n_prompt is not None:
        n_prompt = int_arg(n_prompt, "n_prompt", lo=1)
    for cfg in (target_cfg, draft_cfg):
        if n_prompt is not None:
            check_capacity(n_prompt, "n_prompt", cfg)
        for i, p in enumerate(rows):
            need = f"len(prompts[{i}]) + max_new_tokens - 1 = {len(p)} + {max_new_tokens} - 1"
            check_capacity(len(p) + max_new_tokens - 1, need, cfg)
    toks, lens = as_prompts(rows, n_prompt)
    return _speculate(
        target_params,
        draft_params,
        jh.init_hybrid(target_cfg),
        jh.init_hybrid(draft_cfg),
        jnp.asarray(toks),
        jnp.asarray(lens),
        models=_Models(target, draft, target_cfg, draft_cfg),
        k=k,
        max_new=max_new_tokens,
        n_ubatch=n_ubatch,
    )
