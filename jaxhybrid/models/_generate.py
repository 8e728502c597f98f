"""Jitted generation and a small continuous-batching engine on the hybrid memory.

Both run a Jamba-style protocol model (``forward(model, tokens, pos, valid, mem)``) through
:func:`jaxhybrid.decode` with :func:`~jaxhybrid.models.jamba_step_fn`.

The decode rhythm is llama.cpp's: a prompt is decoded with an output on its last token; each step
samples one token per active sequence from its latest logits, and the sampled tokens of the
sequences that go on are decoded together in one batch (one token per sequence) to give the next
logits. A sequence stops after a stop token (kept in its output) or ``max_new`` tokens; its last
token is never decoded, so memory holds the prompt and all generated tokens but the last.

Sampling (:func:`sample`) is per sequence: temperature ``<= 0`` is greedy (argmax); otherwise
top-k (``0`` = off), then top-p (``1.0`` = off) on the tempered distribution, drawn with the key
``fold_in(key(seed), n)`` where ``n`` counts the tokens that sequence has generated. A sequence's
draws thus depend on its own seed only, not on which other sequences share the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhybrid import _hybrid as hy
from jaxhybrid._batch import Batch
from jaxhybrid._state_io import state_read, state_write
from jaxhybrid._status import select_tree
from jaxhybrid._typing import Array, Bool, Float, Int
from jaxhybrid.models._hybrid_adapter import jamba_step_fn

__all__ = [
    "Engine",
    "GenerateOutput",
    "MemoryUsage",
    "Request",
    "SavedRequest",
    "SamplingParams",
    "decode_tokens",
    "generate",
    "memory_usage",
    "prefill",
    "sample",
]

_I32 = jnp.int32


# --------------------------------------------------------------------------------------------
# Sampling


class SamplingParams(NamedTuple):
    """Per-sequence sampling settings (arrays of shape ``[n_seq]``)."""

    temperature: Float[Array, " seqs"]
    top_k: Int[Array, " seqs"]
    top_p: Float[Array, " seqs"]
    seed: Int[Array, " seqs"]


def _sampling(n: int, temperature, top_k, top_p, seed) -> SamplingParams:
    def arr(x, dtype):
        return jnp.asarray(np.broadcast_to(np.asarray(x, dtype), (n,)).copy())

    return SamplingParams(
        arr(temperature, np.float32),
        arr(top_k, np.int32),
        arr(top_p, np.float32),
        arr(seed, np.int32),
    )


def sample(
    logits: Float[Array, "seqs vocab"], sp: SamplingParams, count: Int[Array, " seqs"]
) -> Int[Array, " seqs"]:
    """One token per row (see the module docstring); ``count`` = tokens generated so far."""
    n_vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(_I32)
    temp = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    x = logits / temp[:, None]
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, n_vocab), n_vocab)
    ranks = jnp.arange(n_vocab, dtype=_I32)
    desc = jnp.where(ranks[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < sp.top_p[:, None]) | (ranks[None, :] == 0)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)
    x = jnp.where(x >= cutoff[:, None], x, -jnp.inf)

    def draw(seed, n, row):
        key = jax.random.fold_in(jax.random.key(seed), n)
        return jax.random.categorical(key, row).astype(_I32)

    drawn = jax.vmap(draw)(sp.seed, count, x)
    return jnp.where(sp.temperature > 0, drawn, greedy)


# --------------------------------------------------------------------------------------------
# Batches built inside jit


def _compact(active: Bool[Array, " n"]) -> Int[Array, " n"]:
    """A permutation putting the active slots first, in order."""
    return jnp.argsort(~active, stable=True).astype(_I32)


def _token_batch(tokens, seq_ids, active) -> tuple[Batch, Int[Array, " n"]]:
    """One token per active sequence, automatic positions, every token outputs."""
    perm = _compact(active)
    act = active[perm]
    batch = Batch(
        token=jnp.where(act, tokens[perm], 0).astype(_I32),
        embd=None,
        pos=jnp.zeros(act.shape, _I32),
        seq_id=jnp.where(act, seq_ids[perm], -1).astype(_I32)[:, None],
        n_seq_id=act.astype(_I32),
        output=act,
        auto_pos=jnp.asarray(True),
        n_tokens=jnp.sum(act, dtype=_I32),
    )
    return batch, perm


def _prompt_batch(prompts, lengths, seq_ids, output_all: bool) -> tuple[Batch, Int[Array, " n"]]:
    """Every prompt token (``prompts [n_seq, P]``, ``lengths [n_seq]``), automatic positions,
    outputs on each prompt's last token (or on all with ``output_all``)."""
    n_seq, p = prompts.shape
    j = jnp.arange(p, dtype=_I32)[None, :]
    valid = (j < lengths[:, None]).reshape(-1)
    last = (j == lengths[:, None] - 1).reshape(-1)
    seq = jnp.broadcast_to(seq_ids[:, None], (n_seq, p)).reshape(-1)
    perm = _compact(valid)
    act = valid[perm]
    batch = Batch(
        token=jnp.where(act, prompts.reshape(-1)[perm], 0).astype(_I32),
        embd=None,
        pos=jnp.zeros(act.shape, _I32),
        seq_id=jnp.where(act, seq[perm], -1).astype(_I32)[:, None],
        n_seq_id=act.astype(_I32),
        output=act & (True if output_all else last[perm]),
        auto_pos=jnp.asarray(True),
        n_tokens=jnp.sum(act, dtype=_I32),
    )
    return batch, perm


def _unpermute(out, perm):
    return jnp.zeros_like(out).at[perm].set(out)


def _decode(params, mem, batch, *, graphdef, cfg, n_ubatch):
    step = jamba_step_fn(graphdef, cfg)
    return hy.decode(step, params, mem, batch, cfg, n_ubatch=n_ubatch)


# --------------------------------------------------------------------------------------------
# Jitted building blocks


@functools.partial(
    jax.jit, static_argnames=("graphdef", "cfg", "n_ubatch", "output_all"), donate_argnames="mem"
)
def prefill(
    params,
    mem: hy.HybridMemory,
    prompts: Int[Array, "seqs prompt"],
    lengths: Int[Array, " seqs"],
    seq_ids: Int[Array, " seqs"],
    *,
    graphdef=None,
    cfg: hy.HybridConfig,
    n_ubatch: int,
    output_all: bool = False,
):
    """Decodes several prompts at once (continuing what memory holds of each sequence).

    Rows with ``lengths == 0`` are skipped. The batch has capacity ``seqs * prompt`` and is run in
    ubatches of ``n_ubatch`` tokens.

    Returns:
        ``(logits, mem, code)``: ``logits [seqs, vocab]`` of every prompt's last token (``[seqs,
        prompt, vocab]`` of every token with ``output_all``), the memory (donated) and
        :func:`jaxhybrid.decode`'s code (0 ok; on failure memory is unchanged).
    """
    n_seq, p = prompts.shape
    batch, perm = _prompt_batch(prompts, lengths, seq_ids, output_all)
    out, mem, res = _decode(params, mem, batch, graphdef=graphdef, cfg=cfg, n_ubatch=n_ubatch)
    out = _unpermute(out, perm).reshape(n_seq, p, -1)
    if not output_all:
        out = jnp.take_along_axis(out, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return out, mem, res.code


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "n_ubatch"), donate_argnames="mem")
def decode_tokens(
    params,
    mem: hy.HybridMemory,
    tokens: Int[Array, " seqs"],
    seq_ids: Int[Array, " seqs"],
    active: Bool[Array, " seqs"],
    *,
    graphdef=None,
    cfg: hy.HybridConfig,
    n_ubatch: int,
):
    """Decodes one token per active sequence (positions continue memory).

    Returns:
        ``(logits [seqs, vocab], mem, code)``; rows of inactive sequences are zero.
    """
    return _step_decode(params, mem, tokens, seq_ids, active, graphdef, cfg, n_ubatch)


def _step_decode(params, mem, tokens, seq_ids, active, graphdef, cfg, n_ubatch):
    batch, perm = _token_batch(tokens, seq_ids, active)
    out, mem, res = _decode(params, mem, batch, graphdef=graphdef, cfg=cfg, n_ubatch=n_ubatch)
    return _unpermute(out, perm), mem, res.code


def _sample_step(params, mem, logits, active, count, sp, stop, max_new, seq_ids, statics):
    """Samples a token for every active sequence, retires finished ones and decodes the tokens of
    the others. Returns ``(tok, finished, logits, active, mem, code)``."""
    graphdef, cfg, n_ubatch = statics
    tok = sample(logits, sp, count)
    count = count + active.astype(_I32)
    is_stop = jnp.any((tok[:, None] == stop) & (stop >= 0), axis=-1)
    finished = active & (is_stop | (count >= max_new))
    going = active & ~finished

    def run(m):
        return _step_decode(params, m, tok, seq_ids, going, graphdef, cfg, n_ubatch)

    def skip(m):
        return jnp.zeros_like(logits), m, jnp.int32(0)

    new_logits, mem, code = jax.lax.cond(jnp.any(going), run, skip, mem)
    # A failed decode (no memory slot) stops the sequences it carried.
    going = going & (code == 0)
    return tok, finished, new_logits, going, mem, code


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
        tokens: ``[n_seq, max_new]`` generated tokens, -1 after a sequence's end.
        lengths: ``[n_seq]`` number of generated tokens.
        mem: the final memory.
        code: 0, or the first non-zero :func:`jaxhybrid.decode` code met.
    """

    tokens: Int[Array, "seqs new"]
    lengths: Int[Array, " seqs"]
    mem: hy.HybridMemory
    code: Any


@functools.partial(
    jax.jit, static_argnames=("graphdef", "cfg", "n_ubatch", "max_new"), donate_argnames="mem"
)
def _generate(
    params,
    mem,
    prompts,
    lengths,
    seq_ids,
    max_new_seq,
    stop,
    sp,
    *,
    graphdef,
    cfg,
    n_ubatch,
    max_new,
):
    n_seq = prompts.shape[0]
    logits, mem, code0 = prefill(
        params, mem, prompts, lengths, seq_ids, graphdef=graphdef, cfg=cfg, n_ubatch=n_ubatch
    )
    active = (lengths > 0) & (max_new_seq > 0) & (code0 == 0)
    out = jnp.full((n_seq, max_new), -1, _I32)
    count = jnp.zeros((n_seq,), _I32)
    statics = (graphdef, cfg, n_ubatch)

    def cond(c):
        return jnp.any(c[2])

    def body(c):
        logits, mem, active, count, out, code = c
        tok, _, logits, going, mem, step_code = _sample_step(
            params, mem, logits, active, count, sp, stop, max_new_seq, seq_ids, statics
        )
        rows = jnp.where(active, jnp.arange(n_seq), n_seq)
        out = out.at[rows, count].set(tok, mode="drop")
        count = count + active.astype(_I32)
        code = jnp.where(code == 0, step_code, code)
        return logits, mem, going, count, out, code

    init = (logits, mem, active, count, out, code0)
    _, mem, _, count, out, code = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(out, count, mem, code)


def _as_prompts(prompts, n_prompt):
    lens = [len(p) for p in prompts]
    width = max([1, *lens]) if n_prompt is None else n_prompt
    if max(lens, default=0) > width:
        raise ValueError(f"a prompt has {max(lens)} tokens, more than n_prompt={width}")
    arr = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    return jnp.asarray(arr), jnp.asarray(np.asarray(lens, np.int32))


def _stop_array(stop_tokens, n_seq, n_stop=None) -> np.ndarray:
    """``stop_tokens``: one sequence of ids for all, or one per sequence."""
    if len(stop_tokens) and not np.isscalar(stop_tokens[0]):
        per = [list(s) for s in stop_tokens]
        if len(per) != n_seq:
            raise ValueError(f"stop_tokens has {len(per)} entries for {n_seq} sequences")
    else:
        per = [list(stop_tokens)] * n_seq
    width = max([1, *(len(s) for s in per)]) if n_stop is None else n_stop
    arr = np.full((n_seq, width), -1, np.int32)
    for i, s in enumerate(per):
        arr[i, : len(s)] = s
    return arr


def generate(
    model,
    mem: hy.HybridMemory,
    prompts: Sequence[Sequence[int]],
    *,
    cfg: hy.HybridConfig,
    n_ubatch: int,
    max_new_tokens: int | Sequence[int],
    seq_ids: Sequence[int] | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] = 0,
    graphdef=None,
    max_new: int | None = None,
    n_prompt: int | None = None,
    n_stop: int | None = None,
) -> GenerateOutput:
    """Generates for several sequences at once in one jitted call (memory donated).

    The prompts are decoded in one batch (ubatches of ``n_ubatch``), continuing whatever memory
    holds of their sequences; then every step samples one token per active sequence and decodes
    them together in a ``lax.while_loop`` (see the module docstring).

    Args:
        model: the model (a pytree), or its ``nnx.split`` state with ``graphdef``.
        mem: a hybrid memory built with ``cfg`` (donated: do not reuse it).
        prompts: one list of token ids per sequence; an empty prompt leaves its row idle.
        cfg: the hybrid config (see :func:`~jaxhybrid.models.jamba_hybrid_config`).
        n_ubatch: ubatch size of the decodes.
        max_new_tokens: tokens to generate at most, for all or per sequence.
        seq_ids: sequence id of each prompt (default ``0..n-1``).
        stop_tokens: ids ending a sequence (kept in its output), for all or per sequence.
        temperature, top_k, top_p, seed: sampling settings, for all or per sequence.
        graphdef: see ``model``.
        max_new, n_prompt, n_stop: static capacities (defaults: the largest needed). Calls with the
            same capacities, number of prompts and model compile once.

    Returns:
        A :class:`GenerateOutput` (device arrays).
    """
    n = len(prompts)
    toks, lens = _as_prompts(prompts, n_prompt)
    ids = np.arange(n) if seq_ids is None else np.asarray(seq_ids)
    mnt = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (n,))
    cap = int(max(1, mnt.max(initial=0))) if max_new is None else max_new
    if mnt.max(initial=0) > cap:
        raise ValueError(f"max_new_tokens {int(mnt.max())} exceeds max_new={cap}")
    return _generate(
        model,
        mem,
        toks,
        lens,
        jnp.asarray(ids.astype(np.int32)),
        jnp.asarray(mnt.copy()),
        jnp.asarray(_stop_array(stop_tokens, n, n_stop)),
        _sampling(n, temperature, top_k, top_p, seed),
        graphdef=graphdef,
        cfg=cfg,
        n_ubatch=n_ubatch,
        max_new=cap,
    )


# --------------------------------------------------------------------------------------------
# Continuous batching


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "n_ubatch"), donate_argnames="mem")
def _engine_step(params, mem, logits, active, count, sp, stop, max_new, *, graphdef, cfg, n_ubatch):
    seq_ids = jnp.arange(active.shape[0], dtype=_I32)
    return _sample_step(
        params, mem, logits, active, count, sp, stop, max_new, seq_ids, (graphdef, cfg, n_ubatch)
    )


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames="mem")
def _fork(mem, logits, src, dst, *, cfg):
    mem, ok = hy.seq_cp(mem, src, dst, -1, -1, cfg)
    return mem, logits.at[dst].set(logits[src]), ok


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames="mem")
def _free(mem, seq, *, cfg):
    return hy.seq_rm(mem, seq, -1, -1, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "rope_fn"), donate_argnames="mem")
def _shift(mem, seq, n_keep, n_discard, n_past, *, cfg, rope_fn):
    """llama.cpp's context shift of one sequence, atomically: drop positions
    ``[n_keep, n_keep + n_discard)``, move ``[n_keep + n_discard, n_past)`` down by ``n_discard``
    and apply the pending K-shift (§2.12, §4.1, §4.4).

    In the recurrent part the removal is a middle range, which succeeds and changes nothing (the
    state cannot forget what it absorbed, §5.7.1), and the shift moves the state's position.
    """
    p1 = n_keep + n_discard
    new, ok_rm = hy.seq_rm(mem, seq, n_keep, p1, cfg)
    new, ok_add = hy.seq_add(new, seq, p1, n_past, -n_discard, cfg)
    new, _ = hy.update(new, cfg, rope_fn)
    ok = ok_rm & ok_add
    return select_tree(ok, new, mem), ok


class MemoryUsage(NamedTuple):
    """What a hybrid memory holds, read on the host (see :func:`memory_usage`).

    Attributes:
        kv_cells_per_seq: ``[n_seq_max]`` KV cells holding each sequence (shared cells count for
            every sequence that holds them).
        kv_cells_used: non-empty KV cells (all streams).
        kv_cells_shared: KV cells held by more than one sequence (after ``seq_cp``).
        kv_cells_total: ``n_stream * kv_size``.
        recr_cells_used: recurrent cells holding a state.
        recr_cells_total: recurrent cells (``rs_size``).
        recr_cell_of_seq: ``[n_seq_max]`` the recurrent cell of each sequence (-1: none).
        pos_min, pos_max: ``[n_seq_max]`` each sequence's hybrid range (§7.6: what both parts
            hold; a recurrent state holds only its last position, so both are that; -1: none).
        kv_bytes, recr_bytes: bytes of the K/V buffers and of the recurrent state buffers (r, s
            and any rollback snapshots).
        kv_bytes_used, recr_bytes_used: the part of those bytes in used cells.
        meta_bytes: bytes of the cell metadata of both parts.
        kv_pos: ``[n_stream, kv_size]`` position of every KV cell (-1: empty).
        kv_seq: ``[n_stream, kv_size, n_seq_max]`` which sequences every KV cell holds.
        recr_pos: ``[rs_size]`` position of every recurrent cell (-1: empty).
        recr_seq: ``[rs_size, n_seq_max]`` which sequences share every recurrent cell.
    """

    kv_cells_per_seq: np.ndarray
    kv_cells_used: int
    kv_cells_shared: int
    kv_cells_total: int
    recr_cells_used: int
    recr_cells_total: int
    recr_cell_of_seq: np.ndarray
    pos_min: np.ndarray
    pos_max: np.ndarray
    kv_bytes: int
    recr_bytes: int
    kv_bytes_used: int
    recr_bytes_used: int
    meta_bytes: int
    kv_pos: np.ndarray
    kv_seq: np.ndarray
    recr_pos: np.ndarray
    recr_seq: np.ndarray


_pos_range = jax.jit(hy.seq_pos_range, static_argnames="cfg")


def _nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_usage(mem: hy.HybridMemory, cfg: hy.HybridConfig) -> MemoryUsage:
    """Cells and bytes a hybrid memory uses, per sequence and in total (host side; copies only
    the cell metadata to the host).

    Examples:
        >>> import jaxhybrid as jh
        >>> cfg = jh.HybridConfig.from_layers(
        ...     [True, False],
        ...     jh.KVConfig(kv_size=8, n_seq_max=2, head_dim_k=4),
        ...     jh.RecurrentConfig(n_seq_max=2, r_shape=(2, 4), s_shape=(4, 2)),
        ... )
        >>> use = memory_usage(jh.init_hybrid(cfg), cfg)
        >>> use.kv_cells_used, use.kv_cells_total, use.kv_bytes
        (0, 8, 256)
    """
    kv_cells, rs_cells = jax.device_get((mem.kv.cells, mem.recurrent.cells))
    lo, hi = (np.asarray(x) for x in jax.device_get(_pos_range(mem, cfg=cfg)))
    kv_used = kv_cells.pos >= 0
    rs_used = rs_cells.pos >= 0
    n_kv_used, n_rs_used = int(kv_used.sum()), int(rs_used.sum())
    # Every buffer but the cell metadata: K/V, r/s states and any extra state planes.
    kv_bytes = _nbytes(mem.kv) - _nbytes(mem.kv.cells)
    recr_bytes = _nbytes(mem.recurrent) - _nbytes(mem.recurrent.cells)
    n_kv, n_rs = kv_cells.pos.size, rs_cells.pos.size
    return MemoryUsage(
        kv_cells_per_seq=(kv_cells.seq & kv_used[..., None]).sum(axis=(0, 1)),
        kv_cells_used=n_kv_used,
        kv_cells_shared=int((kv_cells.seq.sum(axis=-1) > 1).sum()),
        kv_cells_total=n_kv,
        recr_cells_used=n_rs_used,
        recr_cells_total=n_rs,
        recr_cell_of_seq=np.asarray(rs_cells.tail),
        pos_min=lo,
        pos_max=hi,
        kv_bytes=kv_bytes,
        recr_bytes=recr_bytes,
        kv_bytes_used=kv_bytes * n_kv_used // n_kv,
        recr_bytes_used=recr_bytes * n_rs_used // n_rs,
        meta_bytes=_nbytes((kv_cells, rs_cells)),
        kv_pos=np.asarray(kv_cells.pos),
        kv_seq=np.asarray(kv_cells.seq),
        recr_pos=np.asarray(rs_cells.pos),
        recr_seq=np.asarray(rs_cells.seq),
    )


@dataclasses.dataclass
class Request:
    """A request of the :class:`Engine` (host side).

    Attributes:
        id: request id.
        seq: the sequence id it occupies (-1 once finished or cancelled).
        prompt: the tokens it started from (for a fork: the parent's prompt and the tokens the
            parent had generated).
        tokens: tokens generated so far.
        max_new_tokens, stop_tokens, temperature, top_k, top_p, seed: its settings.
        done: finished (stop token or length) or cancelled.
        cancelled: removed by :meth:`Engine.cancel`.
        n_past: positions its sequence holds in memory (the next token is decoded at this
            position; context shifts lower it).
        n_shifts: context shifts applied to it.
    """

    id: int
    seq: int
    prompt: list[int]
    max_new_tokens: int
    stop_tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    n_past: int = 0
    n_shifts: int = 0


@dataclasses.dataclass(frozen=True)
class SavedRequest:
    """A request saved by :meth:`Engine.save`: its sequence's memory record and what the engine
    needs to go on (llama.cpp's sequence file keeps the tokens next to the record, §9.7).

    Attributes:
        data: the sequence's state record (:func:`jaxhybrid.state_write`).
        request: a copy of the request (prompt, tokens, settings, ``n_past``).
        logits: ``[vocab]`` the logits its next token is sampled from.
    """

    data: bytes
    request: Request
    logits: np.ndarray


class Engine:
    """A small continuous-batching engine: requests join and leave between steps.

    Every request holds one sequence id of the memory while it runs. :meth:`submit` decodes its
    prompt at once (jitted, in ubatches of ``n_ubatch``); :meth:`fork` shares another request's
    memory via ``seq_cp``; :meth:`step` samples one token for every running request and decodes
    the tokens of those that go on in one jitted batch (one compile for any mix of requests);
    finished and cancelled requests free their sequence (``seq_rm``).

    With ``n_ctx_seq`` set, a request whose next token would not fit its context is shifted
    first, as llama.cpp's examples do: the first ``n_keep`` positions stay, half of the rest is
    dropped and the remainder moves down (:meth:`context_shift`). :meth:`save` and
    :meth:`restore` move a conversation out of memory and back, into any free sequence id.

    Args:
        model: the model (a pytree), or its state with ``graphdef``.
        cfg: the hybrid config; ``cfg.n_seq_max`` bounds the running requests.
        n_ubatch: ubatch size.
        n_prompt: static prompt capacity of one prefill call (longer prompts take several).
        n_stop: static number of stop tokens per request.
        n_ctx_seq: positions one sequence may hold (``None``: no limit and no context shift).
        n_keep: positions a context shift keeps at the start of a sequence.
        rope_fn: ``rope_fn(k, delta_pos)`` re-rotating cached K rows after a shift
            (:func:`jaxhybrid.kv.rope_shift_fn`); ``None`` for models whose attention has no
            positional encoding, such as Jamba.
    """

    def __init__(
        self,
        model,
        cfg: hy.HybridConfig,
        *,
        n_ubatch: int,
        n_prompt: int = 64,
        n_stop: int = 4,
        graphdef=None,
        n_ctx_seq: int | None = None,
        n_keep: int = 0,
        rope_fn=None,
    ):
        if n_ctx_seq is not None and not 0 <= n_keep <= n_ctx_seq - 2:
            # A shift must drop at least one position: n_past - n_keep >= 2 (§4.1, §4.4).
            raise ValueError(f"n_keep must be in [0, n_ctx_seq - 2], got {n_keep} ({n_ctx_seq=})")
        self.model, self.cfg, self.graphdef = model, cfg, graphdef
        self.n_ubatch, self.n_prompt, self.n_stop = n_ubatch, n_prompt, n_stop
        self.n_ctx_seq, self.n_keep, self.rope_fn = n_ctx_seq, n_keep, rope_fn
        n = cfg.n_seq_max
        self.mem = hy.init_hybrid(cfg)
        self.requests: dict[int, Request] = {}
        self._by_seq: list[int | None] = [None] * n
        self._ids = itertools.count()
        self._logits = None

    # -- host bookkeeping ---------------------------------------------------------------------

    def _free_seq(self) -> int:
        for s, r in enumerate(self._by_seq):
            if r is None:
                return s
        raise RuntimeError(f"no free sequence id (all {self.cfg.n_seq_max} are running)")

    def _release(self, req: Request) -> None:
        if req.seq >= 0:
            self.mem, _ = _free(self.mem, jnp.int32(req.seq), cfg=self.cfg)
            self._by_seq[req.seq] = None
            req.seq = -1
        req.done = True

    def running(self) -> list[Request]:
        """Requests that hold a sequence, by sequence id."""
        return [self.requests[r] for r in self._by_seq if r is not None]

    def _new(self, seq, prompt, max_new_tokens, stop_tokens, temperature, top_k, top_p, seed):
        if len(stop_tokens) > self.n_stop:
            raise ValueError(f"{len(stop_tokens)} stop tokens, more than n_stop={self.n_stop}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rid = next(self._ids)
        req = Request(
            id=rid,
            seq=seq,
            prompt=list(prompt),
            max_new_tokens=int(max_new_tokens),
            stop_tokens=tuple(int(t) for t in stop_tokens),
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            seed=rid if seed is None else int(seed),
        )
        self.requests[rid] = req
        self._by_seq[seq] = rid
        return req

    # -- public API ---------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        stop_tokens: Sequence[int] = (),
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> int:
        """Starts a request in a free sequence id and decodes its prompt; returns its id."""
        if len(prompt) < 1:
            raise ValueError("the prompt must have at least one token")
        if self.n_ctx_seq is not None and len(prompt) >= self.n_ctx_seq:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens leaves no room to generate in a context of "
                f"n_ctx_seq={self.n_ctx_seq} positions"
            )
        seq = self._free_seq()
        n = self.cfg.n_seq_max
        logits = None
        for start in range(0, len(prompt), self.n_prompt):
            chunk = list(prompt[start : start + self.n_prompt])
            toks = np.zeros((1, self.n_prompt), np.int32)
            toks[0, : len(chunk)] = chunk
            logits, self.mem, code = prefill(
                self.model,
                self.mem,
                jnp.asarray(toks),
                jnp.asarray([len(chunk)], jnp.int32),
                jnp.asarray([seq], jnp.int32),
                graphdef=self.graphdef,
                cfg=self.cfg,
                n_ubatch=self.n_ubatch,
            )
            if int(code) != 0:
                self.mem, _ = _free(self.mem, jnp.int32(seq), cfg=self.cfg)
                raise RuntimeError(f"prompt decode failed with code {int(code)}")
        if self._logits is None:
            self._logits = jnp.zeros((n, logits.shape[-1]), jnp.float32)
        self._logits = self._logits.at[seq].set(logits[0])
        req = self._new(seq, prompt, max_new_tokens, stop_tokens, temperature, top_k, top_p, seed)
        req.n_past = len(prompt)
        return req.id

    def fork(
        self,
        request_id: int,
        max_new_tokens: int | None = None,
        *,
        stop_tokens: Sequence[int] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> int:
        """A new request continuing from where ``request_id`` is now (its memory shared via
        ``seq_cp``, its next token sampled with the new request's own settings). Settings not
        given are the parent's (``seed`` defaults to the new request id)."""
        parent = self.requests[request_id]
        if parent.seq < 0:
            raise ValueError(f"request {request_id} is not running")
        seq = self._free_seq()
        self.mem, self._logits, ok = _fork(
            self.mem, self._logits, jnp.int32(parent.seq), jnp.int32(seq), cfg=self.cfg
        )
        if not bool(ok):
            raise RuntimeError("seq_cp failed")

        def pick(x, default):
            return default if x is None else x

        req = self._new(
            seq,
            parent.prompt + parent.tokens,
            pick(max_new_tokens, parent.max_new_tokens),
            pick(stop_tokens, parent.stop_tokens),
            pick(temperature, parent.temperature),
            pick(top_k, parent.top_k),
            pick(top_p, parent.top_p),
            seed,
        )
        req.n_past = parent.n_past
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stops a request and frees its sequence (``seq_rm``)."""
        req = self.requests[request_id]
        req.cancelled = True
        self._release(req)

    def step(self) -> dict[int, int]:
        """One token for every running request; returns ``{request_id: token}``.

        Requests that reach a stop token or their ``max_new_tokens`` finish and free their
        sequence.
        """
        running = self.running()
        if not running:
            return {}
        if self.n_ctx_seq is not None:
            for r in running:
                # Only a request that will decode its token needs room for it.
                if r.n_past >= self.n_ctx_seq and len(r.tokens) + 1 < r.max_new_tokens:
                    self.context_shift(r.id)
        n = self.cfg.n_seq_max
        active = np.zeros(n, bool)
        count = np.zeros(n, np.int32)
        max_new = np.zeros(n, np.int32)
        stop = np.full((n, self.n_stop), -1, np.int32)
        temp, top_k, top_p, seed = (
            np.zeros(n, np.float32),
            np.zeros(n, np.int32),
            np.ones(n, np.float32),
            np.zeros(n, np.int32),
        )
        for r in running:
            s = r.seq
            active[s], count[s], max_new[s] = True, len(r.tokens), r.max_new_tokens
            stop[s, : len(r.stop_tokens)] = r.stop_tokens
            temp[s], top_k[s], top_p[s], seed[s] = r.temperature, r.top_k, r.top_p, r.seed
        sp = SamplingParams(*(jnp.asarray(a) for a in (temp, top_k, top_p, seed)))
        tok, finished, self._logits, _, self.mem, code = _engine_step(
            self.model,
            self.mem,
            self._logits,
            jnp.asarray(active),
            jnp.asarray(count),
            sp,
            jnp.asarray(stop),
            jnp.asarray(max_new),
            graphdef=self.graphdef,
            cfg=self.cfg,
            n_ubatch=self.n_ubatch,
        )
        tok, finished = np.asarray(tok), np.asarray(finished)
        if int(code) != 0:
            raise RuntimeError(f"decode step failed with code {int(code)} (memory unchanged)")
        out = {}
        for r in running:
            r.tokens.append(int(tok[r.seq]))
            out[r.id] = int(tok[r.seq])
            if finished[r.seq]:
                self._release(r)
            else:
                r.n_past += 1
        return out

    def run(self) -> None:
        """Steps until no request is running."""
        while self.running():
            self.step()

    def context_shift(self, request_id: int, n_discard: int | None = None) -> int:
        """Makes room in a request's context (llama.cpp's context shift, §4.1, §4.4, §2.12).

        Positions ``[n_keep, n_keep + n_discard)`` are removed with ``seq_rm``, the later ones
        move down by ``n_discard`` with ``seq_add``, and ``update`` applies the pending K-shift
        (re-rotating K with ``rope_fn``). The recurrent state keeps what it absorbed (§5.7.1).

        Args:
            request_id: a running request.
            n_discard: positions to drop (default: half of those after ``n_keep``).

        Returns:
            The number of positions dropped.
        """
        req = self.requests[request_id]
        if req.seq < 0:
            raise ValueError(f"request {request_id} is not running")
        n_left = req.n_past - self.n_keep
        n_discard = n_left // 2 if n_discard is None else int(n_discard)
        if not 1 <= n_discard < n_left:
            raise ValueError(
                f"cannot drop {n_discard} of the {n_left} positions after n_keep={self.n_keep} "
                f"(request {request_id} holds {req.n_past})"
            )
        self.mem, ok = _shift(
            self.mem,
            jnp.int32(req.seq),
            jnp.int32(self.n_keep),
            jnp.int32(n_discard),
            jnp.int32(req.n_past),
            cfg=self.cfg,
            rope_fn=self.rope_fn,
        )
        if not bool(ok):
            raise RuntimeError(
                f"context shift of request {request_id} failed: no free KV cell to split its "
                "shared cells off (memory unchanged)"
            )
        req.n_past -= n_discard
        req.n_shifts += 1
        return n_discard

    def save(self, request_id: int, *, flags: int = 0) -> SavedRequest:
        """Saves a running request: its sequence's memory record (:func:`jaxhybrid.state_write`),
        its tokens and settings, and the logits of its next token. The request keeps running."""
        req = self.requests[request_id]
        if req.seq < 0:
            raise ValueError(f"request {request_id} is not running")
        data = state_write(self.mem, self.cfg, req.seq, flags=flags)
        copy = dataclasses.replace(req, prompt=list(req.prompt), tokens=list(req.tokens))
        return SavedRequest(bytes(data), copy, np.asarray(self._logits[req.seq]))

    def restore(self, saved: SavedRequest, *, seq: int | None = None, flags: int = 0) -> int:
        """Starts a new request that continues a saved one, in sequence ``seq`` (default: the
        first free one), and returns its id. Its next tokens are those the saved request would
        have generated (same seed and token count, §9.3, §9.5).

        Raises:
            ValueError: ``seq`` is out of range or running.
            RuntimeError: the record does not fit this memory (the message says why; memory
                unchanged).
        """
        n = self.cfg.n_seq_max
        if seq is None:
            seq = self._free_seq()
        elif not 0 <= seq < n or self._by_seq[seq] is not None:
            raise ValueError(f"sequence id {seq} is not a free id in [0, {n})")
        mem, status = state_read(self.mem, self.cfg, saved.data, seq, flags=flags)
        if not status.ok:
            raise RuntimeError(f"restore into sequence {seq} failed: {status.message}")
        self.mem = mem
        old = saved.request
        if self._logits is None:
            self._logits = jnp.zeros((n, saved.logits.shape[-1]), jnp.float32)
        self._logits = self._logits.at[seq].set(jnp.asarray(saved.logits))
        req = self._new(
            seq,
            old.prompt,
            old.max_new_tokens,
            old.stop_tokens,
            old.temperature,
            old.top_k,
            old.top_p,
            old.seed,
        )
        req.tokens, req.n_past, req.n_shifts = list(old.tokens), old.n_past, old.n_shifts
        return req.id

    def memory_usage(self) -> MemoryUsage:
        """Cells and bytes the engine's memory uses (:func:`memory_usage`)."""
        return memory_usage(self.mem, self.cfg)
