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

from jaxhybrid import _hybrid as hy
from jaxhybrid._typing import Array, Int, Scalar
from jaxhybrid.models._generate import (
    _as_prompts,
    _decode,
    _prompt_batch,
    _step_decode,
    _unpermute,
    prefill,
)

__all__ = ["SpeculativeOutput", "speculative_generate"]

_I32 = jnp.int32


class SpeculativeOutput(NamedTuple):
    """Result of :func:`speculative_generate`.

    Attributes:
        tokens: ``[n_seq, max_new]`` generated tokens (the target's greedy continuation).
        n_rounds: draft-and-verify rounds run.
        n_drafted: draft tokens proposed, over all sequences.
        n_accepted: draft tokens the target agreed with.
        target_mem, draft_mem: the final memories (each sequence holds its prompt and all but
            the last generated token, as after plain decoding).
        code: 0, or the first non-zero :func:`jaxhybrid.decode` code; 2 when a rollback was
            refused (``n_snapshots < k``).
    """

    tokens: Int[Array, "seqs new"]
    n_rounds: Scalar
    n_drafted: Scalar
    n_accepted: Scalar
    target_mem: hy.HybridMemory
    draft_mem: hy.HybridMemory
    code: Scalar


def _rollback(mem, keep_upto, active, cfg):
    """``seq_rm(s, keep_upto[s] + 1, -1)`` for every active sequence; all must succeed."""

    def one(s, carry):
        mem, ok = carry
        new, ok_s = hy.seq_rm(mem, s, keep_upto[s] + 1, -1, cfg)
        use = active[s]
        mem = jax.tree.map(lambda a, b: jnp.where(use, a, b), new, mem)
        return mem, ok & (ok_s | ~use)

    return jax.lax.fori_loop(0, keep_upto.shape[0], one, (mem, jnp.bool_(True)))


@functools.partial(
    jax.jit,
    static_argnames=(
        "target_graphdef",
        "draft_graphdef",
        "target_cfg",
        "draft_cfg",
        "k",
        "max_new",
        "n_ubatch",
    ),
    donate_argnames=("target_mem", "draft_mem"),
)
def _speculate(
    target,
    draft,
    target_mem,
    draft_mem,
    prompts,
    lengths,
    *,
    target_graphdef,
    draft_graphdef,
    target_cfg,
    draft_cfg,
    k: int,
    max_new: int,
    n_ubatch: int,
) -> SpeculativeOutput:
    n_seq = prompts.shape[0]
    seq_ids = jnp.arange(n_seq, dtype=_I32)
    # Both memories absorb the prompts but their last token, which starts the first round.
    held = jnp.maximum(lengths - 1, 0)
    _, target_mem, c1 = prefill(
        target,
        target_mem,
        prompts,
        held,
        seq_ids,
        graphdef=target_graphdef,
        cfg=target_cfg,
        n_ubatch=n_ubatch,
    )
    _, draft_mem, c2 = prefill(
        draft,
        draft_mem,
        prompts,
        held,
        seq_ids,
        graphdef=draft_graphdef,
        cfg=draft_cfg,
        n_ubatch=n_ubatch,
    )
    last = jnp.take_along_axis(prompts, held[:, None], axis=1)[:, 0]
    active = lengths > 0
    out = jnp.full((n_seq, max_new + k + 1), -1, _I32)
    count = jnp.zeros((n_seq,), _I32)
    code = jnp.where(c1 != 0, c1, c2).astype(_I32)
    zero = jnp.int32(0)
    init = (target_mem, draft_mem, last, active & (code == 0), count, out, zero, zero, zero, code)

    def cond(c):
        return jnp.any(c[3]) & (c[9] == 0)

    def body(c):
        t_mem, d_mem, last, act, count, out, n_rounds, n_drafted, n_accepted, code = c
        base = hy.seq_pos_range(t_mem, target_cfg)[1]  # position before ``last``

        # Draft: k + 1 single-token steps (the last one only absorbs the k-th draft).
        def draft_step(carry, _):
            d_mem, tok, code = carry
            logits, d_mem, c = _step_decode(
                draft, d_mem, tok, seq_ids, act, draft_graphdef, draft_cfg, n_ubatch
            )
            nxt = jnp.argmax(logits, axis=-1).astype(_I32)
            return (d_mem, nxt, jnp.where(code != 0, code, c)), nxt

        (d_mem, _, code_d), drafts = jax.lax.scan(draft_step, (d_mem, last, code), None, k + 1)
        drafts = drafts[:k].T  # [n_seq, k]

        # Target: [last, d_1..d_k] of every active sequence in one batch, logits of each.
        cand = jnp.concatenate([last[:, None], drafts], axis=1)
        batch, perm = _prompt_batch(cand, jnp.where(act, k + 1, 0), seq_ids, output_all=True)
        logits, t_mem, res = _decode(
            target, t_mem, batch, graphdef=target_graphdef, cfg=target_cfg, n_ubatch=n_ubatch
        )
        greedy = jnp.argmax(_unpermute(logits, perm).reshape(n_seq, k + 1, -1), axis=-1)
        greedy = greedy.astype(_I32)
        match = jnp.cumprod((drafts == greedy[:, :k]).astype(_I32), axis=1)
        m = jnp.sum(match, axis=1)  # accepted drafts
        bonus = greedy[jnp.arange(n_seq), m]  # the target's own next token
        i = jnp.arange(k + 1)[None, :]
        padded = jnp.concatenate([drafts, jnp.zeros((n_seq, 1), _I32)], axis=1)
        new = jnp.where(i < m[:, None], padded, bonus[:, None])
        n_new = jnp.where(act, jnp.minimum(m + 1, max_new - count), 0)
        col = jnp.where(i < n_new[:, None], count[:, None] + i, out.shape[1])
        out = out.at[jnp.arange(n_seq)[:, None], col].set(new, mode="drop")

        # Both memories keep everything up to the last accepted draft (position base + 1 + m).
        keep = base + 1 + m
        t_mem, ok_t = _rollback(t_mem, keep, act, target_cfg)
        d_mem, ok_d = _rollback(d_mem, keep, act, draft_cfg)
        code = jnp.where(code_d != 0, code_d, res.code.astype(_I32))
        code = jnp.where((code == 0) & ~(ok_t & ok_d), 2, code)

        count = count + n_new
        last = bonus
        n_drafted = n_drafted + jnp.sum(jnp.where(act, k, 0))
        n_accepted = n_accepted + jnp.sum(jnp.where(act, m, 0))
        act = act & (count < max_new)
        return t_mem, d_mem, last, act, count, out, n_rounds + 1, n_drafted, n_accepted, code

    t_mem, d_mem, _, _, _, out, n_rounds, n_drafted, n_accepted, code = jax.lax.while_loop(
        cond, body, init
    )
    return SpeculativeOutput(out[:, :max_new], n_rounds, n_drafted, n_accepted, t_mem, d_mem, code)


def speculative_generate(
    target,
    draft,
    prompts,
    *,
    target_cfg: hy.HybridConfig,
    draft_cfg: hy.HybridConfig,
    k: int,
    max_new_tokens: int,
    n_ubatch: int,
    target_graphdef=None,
    draft_graphdef=None,
    n_prompt: int | None = None,
) -> SpeculativeOutput:
    """Greedy generation by the target model, drafted ``k`` tokens at a time by the draft model.

    Args:
        target, draft: the models (pytrees), or their ``nnx.split`` states with the graphdefs.
            They must share the vocabulary.
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
    """
    for name, cfg in (("target_cfg", target_cfg), ("draft_cfg", draft_cfg)):
        if cfg.recurrent.n_snapshots < k:
            raise ValueError(
                f"{name}.recurrent.n_snapshots={cfg.recurrent.n_snapshots} cannot roll back the "
                f"{k} draft tokens of a round: build it with n_snapshots >= {k}"
            )
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"k and max_new_tokens must be >= 1, got {k} and {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    toks, lens = _as_prompts(prompts, n_prompt)
    return _speculate(
        target,
        draft,
        hy.init_hybrid(target_cfg),
        hy.init_hybrid(draft_cfg),
        toks,
        lens,
        target_graphdef=target_graphdef,
        draft_graphdef=draft_graphdef,
        target_cfg=target_cfg,
        draft_cfg=draft_cfg,
        k=k,
        max_new=max_new_tokens,
        n_ubatch=n_ubatch,
    )
