"""A small continuous-batching engine over any :class:`~jaxhybrid.HybridModel`: requests join and
leave between steps, fork, cancel, save/restore and context shifts."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid.serving._batches import (
    check_capacity,
    check_stop_tokens,
    check_tokens,
    int_arg,
)
from jaxhybrid.serving._generate import check_setup, decode_ubatch, prefill, sample_step
from jaxhybrid.serving._sampling import SamplingParams, check_sampling
from jaxhybrid.serving._usage import MemoryUsage, memory_usage

__all__ = ["Engine", "EngineError", "Request", "SavedRequest"]

_I32 = jnp.int32


class EngineError(jh.JaxHybridError):
    """A request the :class:`Engine` cannot serve: no free sequence id, a failed decode, fork,
    context shift or restore. The engine's memory and bookkeeping are as before the call.

    Attributes:
        code: the :class:`~jaxhybrid.DecodeCode` of a failed decode (None for other failures).
    """

    def __init__(self, message: str, code: jh.DecodeCode | None = None):
        super().__init__(message)
        self.code = code


@functools.partial(jax.jit, static_argnames=("model", "cfg", "n_ubatch"), donate_argnames="mem")
def _engine_step(model, params, mem, logits, active, count, sp, stop, max_new, *, cfg, n_ubatch):
    seq_ids = jnp.arange(active.shape[0], dtype=_I32)
    return sample_step(
        model,
        params,
        mem,
        logits,
        active,
        count,
        sp,
        stop,
        max_new,
        seq_ids,
        cfg=cfg,
        n_ubatch=n_ubatch,
    )


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames="mem")
def _fork(mem, logits, src, dst, *, cfg):
    mem, ok = jh.seq_cp(mem, src, dst, -1, -1, cfg)
    return mem, logits.at[dst].set(logits[src]), ok


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames="mem")
def _free(mem, seq, *, cfg):
    return jh.seq_rm(mem, seq, -1, -1, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "rope_fn"), donate_argnames="mem")
def _shift(mem, seq, n_keep, n_discard, n_past, *, cfg, rope_fn):
    """llama.cpp's context shift of one sequence, atomically: drop positions
    ``[n_keep, n_keep + n_discard)``, move ``[n_keep + n_discard, n_past)`` down by ``n_discard``
    and apply the pending K-shift (§2.12, §4.1, §4.4).

    In the recurrent part the removal is a middle range, which succeeds and changes nothing (the
    state cannot forget what it absorbed, §5.7.1), and the shift moves the state's position.
    """
    p1 = n_keep + n_discard
    new, ok_rm = jh.seq_rm(mem, seq, n_keep, p1, cfg)
    new, ok_add = jh.seq_add(new, seq, p1, n_past, -n_discard, cfg)
    new, _ = jh.update(new, cfg, rope_fn)
    ok = ok_rm & ok_add
    return jh.select_tree(ok, new, mem), ok


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
        model: the model plug-in (a :class:`~jaxhybrid.HybridModel`); its ``rope_fn``
            re-rotates cached K rows after a context shift.
        params: the model's parameters (a pytree).
        cfg: the hybrid config (``model.memory_config(...)``); ``cfg.n_seq_max`` bounds the
            running requests.
        n_ubatch: ubatch size of prompt decodes; a :meth:`step` (one token per sequence) runs in
            one ubatch of ``min(n_ubatch, n_seq_max)`` tokens.
        n_prompt: static prompt capacity of one prefill call (longer prompts take several).
        n_stop: static number of stop tokens per request.
        n_ctx_seq: positions one sequence may hold (``None``: no limit and no context shift).
        n_keep: positions a context shift keeps at the start of a sequence.

    Every method checks all its arguments before any device work or bookkeeping change, and a
    refused or failed call leaves the memory and the bookkeeping bit-identical
    (docs/semantics.md §15.5); integers are never converted (§15.6).

    Raises:
        jaxhybrid.InvalidTypeError: ``model`` is not a plug-in, ``cfg`` not a
            :class:`~jaxhybrid.HybridConfig`, or a capacity is not an integer.
        jaxhybrid.InvalidArgumentError: a capacity out of range (``n_ubatch``, ``n_prompt`` below
            1, ``n_stop`` below 0, ``n_ctx_seq`` below 2, ``n_keep`` outside
            ``[0, n_ctx_seq - 2]``).
    """

    def __init__(
        self,
        model: jh.HybridModel,
        params,
        cfg: jh.HybridConfig,
        *,
        n_ubatch: int,
        n_prompt: int = 64,
        n_stop: int = 4,
        n_ctx_seq: int | None = None,
        n_keep: int = 0,
    ):
        n_ubatch = check_setup(model, cfg, n_ubatch)
        # A prefill chunk is one sequence's: more tokens than its stream's cells never fit
        # (longer prompts take several chunks), so a larger capacity is never allocated.
        n_prompt = int_arg(
            n_prompt, "n_prompt", lo=1, hi=cfg.kv.kv_size + 1, limit=f"kv_size={cfg.kv.kv_size}"
        )
        n_stop = int_arg(
            n_stop, "n_stop", lo=0, hi=model.n_vocab + 1, limit=f"n_vocab={model.n_vocab}"
        )
        n_keep = int_arg(n_keep, "n_keep", lo=0)
        if n_ctx_seq is not None:
            n_ctx_seq = int_arg(n_ctx_seq, "n_ctx_seq", lo=2)
            if n_keep > n_ctx_seq - 2:
                # A shift must drop at least one position: n_past - n_keep >= 2 (§4.1, §4.4).
                raise jh.InvalidArgumentError(
                    f"n_keep must be in [0, n_ctx_seq - 2], got {n_keep} ({n_ctx_seq=})"
                )
        self.model, self.params, self.cfg = model, params, cfg
        self.n_ubatch, self.n_prompt, self.n_stop = n_ubatch, n_prompt, n_stop
        self.n_ctx_seq, self.n_keep = n_ctx_seq, n_keep
        n = cfg.n_seq_max
        self.mem = jh.init_hybrid(cfg)
        self.requests: dict[int, Request] = {}
        self._by_seq: list[int | None] = [None] * n
        self._ids = itertools.count()
        self._logits = None

    # -- host bookkeeping ---------------------------------------------------------------------

    def _free_seq(self) -> int:
        for s, r in enumerate(self._by_seq):
            if r is None:
                return s
        raise EngineError(f"no free sequence id (all {self.cfg.n_seq_max} are running)")

    def _release(self, req: Request) -> None:
        if req.seq >= 0:
            self.mem, _ = _free(self.mem, jnp.int32(req.seq), cfg=self.cfg)
            self._by_seq[req.seq] = None
            req.seq = -1
        req.done = True

    def running(self) -> list[Request]:
        """Requests that hold a sequence, by sequence id."""
        return [self.requests[r] for r in self._by_seq if r is not None]

    def _request(self, request_id, *, running: bool = True) -> Request:
        """The request ``request_id`` names (refused unless it exists, and runs if ``running``)."""
        rid = int_arg(request_id, "request_id")
        if rid not in self.requests:
            raise jh.InvalidArgumentError(f"no request {rid} in this engine")
        req = self.requests[rid]
        if running and req.seq < 0:
            raise jh.InvalidArgumentError(f"request {rid} is not running")
        return req

    def _check_prompt(self, prompt, what: str = "prompt") -> list[int]:
        """A prompt the engine can decode: token ids in the vocabulary, at least one, fitting
        ``n_ctx_seq`` with room to generate and one sequence's cells."""
        tokens = check_tokens(prompt, self.model.n_vocab, what)
        if len(tokens) < 1:
            raise jh.InvalidArgumentError(f"the {what} must have at least one token")
        if self.n_ctx_seq is not None and len(tokens) >= self.n_ctx_seq:
            raise jh.InvalidArgumentError(
                f"a {what} of {len(tokens)} tokens leaves no room to generate in a context of "
                f"n_ctx_seq={self.n_ctx_seq} positions"
            )
        check_capacity(len(tokens), f"len({what})", self.cfg)
        return tokens

    def _check_settings(self, max_new_tokens, stop_tokens, temperature, top_k, top_p, seed) -> dict:
        """A request's settings, checked (``seed`` None: the request id); the fields of
        :class:`Request` they fill."""
        max_new_tokens = int_arg(max_new_tokens, "max_new_tokens", lo=1)
        (stops,) = check_stop_tokens(stop_tokens, None, self.n_stop)
        t, k, p, s = check_sampling(temperature, top_k, top_p, 0 if seed is None else seed)
        return dict(
            max_new_tokens=max_new_tokens,
            stop_tokens=tuple(stops),
            temperature=t,
            top_k=k,
            top_p=p,
            seed=None if seed is None else s,
        )

    def _new(self, seq: int, prompt: list[int], settings: dict) -> Request:
        rid = next(self._ids)
        if settings["seed"] is None:
            settings = settings | dict(seed=rid)
        req = Request(id=rid, seq=seq, prompt=list(prompt), **settings)
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
        """Starts a request in a free sequence id and decodes its prompt; returns its id.

        A refused or failed call leaves memory and bookkeeping as they were (§15.5).

        Args:
            prompt: token ids in ``[0, n_vocab)``, at least one.
            max_new_tokens: tokens to generate at most (>= 1).
            stop_tokens: at most ``n_stop`` ids ending the request (kept in its output).
            temperature: finite; ``<= 0`` is greedy.
            top_k: ``>= 0`` (0 = off).
            top_p: in ``(0, 1]`` (1 = off).
            seed: inside int32 (None: the request id).

        Raises:
            jaxhybrid.InvalidTypeError: a float or a bool where an integer is due (a token id,
                ``max_new_tokens``, a stop token, ``top_k``, ``seed``), or a setting of another
                wrong type (§15.6).
            jaxhybrid.InvalidArgumentError: a value out of range: a token id outside the
                vocabulary, an empty prompt or one longer than ``n_ctx_seq`` or one sequence's
                ``kv_size`` cells allow, ``max_new_tokens < 1``, more than ``n_stop`` stop
                tokens, an integer outside int32, a non-finite temperature, ``top_p`` outside
                ``(0, 1]``, a negative ``top_k``.
            EngineError: no free sequence id, or the prompt's decode failed (e.g. ``NO_SLOT``).
        """
        tokens = self._check_prompt(prompt)
        settings = self._check_settings(
            max_new_tokens, stop_tokens, temperature, top_k, top_p, seed
        )
        seq = self._free_seq()
        chunks = [tokens[i : i + self.n_prompt] for i in range(0, len(tokens), self.n_prompt)]
        # A failed decode returns the memory it was given (difference 1), but earlier chunks are
        # committed: a prompt of several chunks keeps a copy to hand back on failure (§15.5).
        backup = jax.tree.map(jnp.copy, self.mem) if len(chunks) > 1 else None
        logits = None
        for chunk in chunks:
            toks = np.zeros((1, self.n_prompt), np.int32)
            toks[0, : len(chunk)] = chunk
            logits, self.mem, code = prefill(
                self.model,
                self.params,
                self.mem,
                jnp.asarray(toks),
                jnp.asarray([len(chunk)], jnp.int32),
                jnp.asarray([seq], jnp.int32),
                cfg=self.cfg,
                n_ubatch=self.n_ubatch,
            )
            if int(code) != jh.DecodeCode.OK:
                if backup is not None:
                    self.mem = backup
                code = jh.DecodeCode(int(code))
                raise EngineError(
                    f"prompt decode failed with code {int(code)} ({code.name}; memory unchanged)",
                    code,
                )
        if self._logits is None:
            self._logits = jnp.zeros((self.cfg.n_seq_max, logits.shape[-1]), jnp.float32)
        self._logits = self._logits.at[seq].set(logits[0])
        req = self._new(seq, tokens, settings)
        req.n_past = len(tokens)
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
        given are the parent's (``seed`` defaults to the new request id). A refused or failed call
        leaves memory and bookkeeping as they were (§15.5).

        Raises:
            jaxhybrid.InvalidTypeError, jaxhybrid.InvalidArgumentError: ``request_id`` is not an
                integer, names no request or one not running, or a setting is refused (as in
                :meth:`submit`).
            EngineError: no free sequence id, or ``seq_cp`` failed.
        """
        parent = self._request(request_id)

        def pick(x, default):
            return default if x is None else x

        settings = self._check_settings(
            pick(max_new_tokens, parent.max_new_tokens),
            pick(stop_tokens, parent.stop_tokens),
            pick(temperature, parent.temperature),
            pick(top_k, parent.top_k),
            pick(top_p, parent.top_p),
            seed,
        )
        seq = self._free_seq()
        self.mem, logits, ok = _fork(
            self.mem, self._logits, jnp.int32(parent.seq), jnp.int32(seq), cfg=self.cfg
        )
        if not bool(ok):  # seq_cp returned the memory unchanged; the logits are not taken
            raise EngineError(
                f"fork of request {parent.id} failed: seq_cp found no free cell (memory unchanged)"
            )
        self._logits = logits
        req = self._new(seq, parent.prompt + parent.tokens, settings)
        req.n_past = parent.n_past
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stops a request and frees its sequence (``seq_rm``).

        Raises:
            jaxhybrid.InvalidTypeError, jaxhybrid.InvalidArgumentError: ``request_id`` is not an
                integer or names no request.
        """
        req = self._request(request_id, running=False)
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
        tok, finished, logits, _, mem, code = _engine_step(
            self.model,
            self.params,
            self.mem,
            self._logits,
            jnp.asarray(active),
            jnp.asarray(count),
            sp,
            jnp.asarray(stop),
            jnp.asarray(max_new),
            cfg=self.cfg,
            n_ubatch=decode_ubatch(self.n_ubatch, self.cfg.n_seq_max),
        )
        # The memory was donated: a failed decode hands it back bit-identical. The logits are
        # the failed step's zeros then, so the engine keeps its own (§15.5).
        self.mem = mem
        tok, finished = np.asarray(tok), np.asarray(finished)
        if int(code) != jh.DecodeCode.OK:
            code = jh.DecodeCode(int(code))
            raise EngineError(
                f"decode step failed with code {int(code)} ({code.name}; memory unchanged)", code
            )
        self._logits = logits
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

        Raises:
            jaxhybrid.InvalidTypeError, jaxhybrid.InvalidArgumentError: ``request_id`` names no
                running request, or ``n_discard`` is not an integer in ``[1, n_past - n_keep)``.
            EngineError: the shift failed (memory unchanged).
        """
        req = self._request(request_id)
        n_left = req.n_past - self.n_keep
        n_discard = n_left // 2 if n_discard is None else int_arg(n_discard, "n_discard")
        if not 1 <= n_discard < n_left:
            raise jh.InvalidArgumentError(
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
            rope_fn=self.model.rope_fn,
        )
        if not bool(ok):
            raise EngineError(
                f"context shift of request {request_id} failed: no free KV cell to split its "
                "shared cells off (memory unchanged)"
            )
        req.n_past -= n_discard
        req.n_shifts += 1
        return n_discard

    def save(self, request_id: int, *, flags: int = 0) -> SavedRequest:
        """Saves a running request: its sequence's memory record (:func:`jaxhybrid.state_write`),
        its tokens and settings, and the logits of its next token. The request keeps running.

        Raises:
            jaxhybrid.InvalidTypeError, jaxhybrid.InvalidArgumentError: ``request_id`` names no
                running request, or ``flags`` are refused by :func:`jaxhybrid.state_write`.
        """
        req = self._request(request_id)
        data = jh.state_write(self.mem, self.cfg, req.seq, flags=flags)
        copy = dataclasses.replace(req, prompt=list(req.prompt), tokens=list(req.tokens))
        return SavedRequest(bytes(data), copy, np.asarray(self._logits[req.seq]))

    def restore(self, saved: SavedRequest, *, seq: int | None = None, flags: int = 0) -> int:
        """Starts a new request that continues a saved one, in sequence ``seq`` (default: the
        first free one), and returns its id. Its next tokens are those the saved request would
        have generated (same seed and token count, §9.3, §9.5). A refused or failed call leaves
        memory and bookkeeping as they were (§15.5).

        Raises:
            jaxhybrid.InvalidTypeError: ``saved`` is not a :class:`SavedRequest`, or ``seq`` or
                ``flags`` not an integer.
            jaxhybrid.InvalidArgumentError: ``seq`` is out of range or running, ``flags`` has
                unknown bits, or the saved request does not fit this engine (its logits'
                vocabulary, its tokens or its settings, checked as in :meth:`submit`).
            EngineError: no free sequence id.
            jaxhybrid.StateError: the record does not fit this memory (the message says why).
        """
        if not isinstance(saved, SavedRequest):
            raise jh.InvalidTypeError(
                f"saved must be a SavedRequest (from Engine.save), got {type(saved).__name__}"
            )
        old = saved.request
        n_vocab = self.model.n_vocab
        if np.shape(saved.logits) != (n_vocab,):
            raise jh.InvalidArgumentError(
                f"saved.logits has shape {np.shape(saved.logits)}, this engine's model needs "
                f"({n_vocab},)"
            )
        prompt = check_tokens(old.prompt, n_vocab, "saved.request.prompt")
        tokens = check_tokens(old.tokens, n_vocab, "saved.request.tokens")
        settings = self._check_settings(
            old.max_new_tokens, old.stop_tokens, old.temperature, old.top_k, old.top_p, old.seed
        )
        flags = int_arg(flags, "flags", lo=0)
        known = jh.StateFlags.PARTIAL_ONLY | jh.StateFlags.SNAPSHOTS
        if flags & ~known:
            raise jh.InvalidArgumentError(f"flags = {flags} has bits other than {known!r}")
        n = self.cfg.n_seq_max
        if seq is None:
            seq = self._free_seq()
        else:
            seq = int_arg(seq, "seq")
            if not 0 <= seq < n or self._by_seq[seq] is not None:
                raise jh.InvalidArgumentError(f"sequence id {seq} is not a free id in [0, {n})")
        mem, status = jh.state_read(self.mem, self.cfg, saved.data, seq, flags=flags)
        if not status.ok:
            raise jh.StateError(f"restore into sequence {seq} failed: {status.message}")
        self.mem = mem
        if self._logits is None:
            self._logits = jnp.zeros((n, n_vocab), jnp.float32)
        self._logits = self._logits.at[seq].set(jnp.asarray(saved.logits, jnp.float32))
        req = self._new(seq, prompt, settings)
        req.tokens, req.n_past, req.n_shifts = tokens, old.n_past, old.n_shifts
        return req.id

    def memory_usage(self) -> MemoryUsage:
        """Cells and bytes the engine's memory uses (:func:`memory_usage`)."""
        return memory_usage(self.mem, self.cfg)
