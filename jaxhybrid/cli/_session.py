"""The scripted session: compile, then the phases join, decode, fork, cancel, save/restore and
drain on one :class:`~jaxhybrid.serving.Engine`, each timed on its own."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from jaxhybrid.cli._args import INT32_MAX, check_memory, check_sizes
from jaxhybrid.cli._model import DemoModel, make_prompts
from jaxhybrid.cli._report import (
    DemoResult,
    PhaseStats,
    Printer,
    fmt_bytes,
    print_header,
    print_phase,
    print_summary,
    progress_text,
)
from jaxhybrid.serving import Engine, EngineError, MemoryUsage

__all__ = ["PHASES", "Lap", "make_engine", "plan_memory", "run_session", "timed"]

PHASES = ("compile", "join", "decode", "fork", "cancel", "save/restore", "drain")


@dataclasses.dataclass
class Lap:
    """The wall time of one :func:`timed` block (set when the block ends)."""

    seconds: float = 0.0


@contextlib.contextmanager
def timed(ph: PhaseStats | None = None) -> Iterator[Lap]:
    """Times the block; its wall time goes to the yielded :class:`Lap` and into ``ph.seconds``."""
    lap = Lap()
    start = time.perf_counter()
    yield lap
    lap.seconds = time.perf_counter() - start
    if ph is not None:
        ph.seconds += lap.seconds


def make_engine(
    mdl: DemoModel, cfg, args: argparse.Namespace, n_prompt: int, n_stop: int
) -> Engine:
    """The session's engine; the warm-up builds one with the same static settings."""
    return Engine(
        mdl.plugin,
        mdl.params,
        cfg,
        n_ubatch=args.n_ubatch,
        n_prompt=n_prompt,
        n_stop=n_stop,
        n_ctx_seq=args.ctx,
        n_keep=args.n_keep,
    )


def _warm_up(eng: Engine, args: argparse.Namespace, prompt: list[int], stop_tokens) -> None:
    """Compiles every jitted function of the session on a throwaway engine."""
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    a = eng.submit(prompt, args.ctx + 2, stop_tokens=stop_tokens, **kw)
    eng.step()
    eng.fork(a)
    while eng.requests[a].n_past - args.n_keep < 2 and eng.running():
        eng.step()
    if eng.requests[a].seq >= 0:
        eng.context_shift(a, 1)
        eng.restore(eng.save(a))
    eng.cancel(a)
    eng.memory_usage()
    for r in eng.running():
        eng.cancel(r.id)


@dataclasses.dataclass
class _Session:
    """What the phases share: the engine, the settings and the memory after every phase."""

    eng: Engine
    args: argparse.Namespace
    mdl: DemoModel
    pr: Printer
    prompts: list[list[int]]
    submit_kw: dict
    steps_per_phase: int
    snapshots: list[tuple[str, MemoryUsage]] = dataclasses.field(default_factory=list)
    step_no: int = 0

    def shifts(self) -> int:
        return sum(r.n_shifts for r in self.eng.requests.values())


def _decode(s: _Session, ph: PhaseStats, n_steps: int | None) -> None:
    """Steps every running request ``n_steps`` times (None: until none runs)."""
    k = 0
    while s.eng.running() and (n_steps is None or k < n_steps):
        before = s.shifts()
        with timed(ph):
            got = s.eng.step()
        ph.shifts += s.shifts() - before
        if ph.shifts and not any(name.startswith("shift") for name, _ in s.snapshots):
            # The picture shows the memory right after the first context shift.
            shifted = [r.id for r in s.eng.requests.values() if r.n_shifts]
            s.snapshots.append((f"shift (r{shifted[0]})", s.eng.memory_usage()))
        ph.generated_tokens += len(got)
        ph.steps += 1
        k += 1
        s.step_no += 1
        s.pr.progress(s.step_no, progress_text(ph.name, s.step_no, s.eng))


def _end(s: _Session, ph: PhaseStats) -> None:
    """Keeps the memory after the phase and prints the phase's report."""
    usage = s.eng.memory_usage()
    s.snapshots.append((ph.name, usage))
    print_phase(s.pr, ph, s.eng, usage, s.mdl.tokenizer)


def _join(s: _Session, ph: PhaseStats) -> list[int]:
    """The first requests join; their prompts are decoded (prefill). Returns their ids."""
    ids = []
    for p in s.prompts[: s.args.requests]:
        with timed(ph):
            ids.append(s.eng.submit(p, s.args.max_new, **s.submit_kw))
        ph.prompt_tokens += len(p)
    ph.note = f"{s.args.requests} requests joined (prefill, ubatches of {s.args.n_ubatch})"
    _end(s, ph)
    return ids


def _decode_phase(s: _Session, ph: PhaseStats) -> None:
    """Every running request generates, one token per step, all in one batch."""
    _decode(s, ph, s.steps_per_phase)
    _end(s, ph)


def _fork(s: _Session, ph: PhaseStats, parent: int) -> None:
    """The fork shares the parent's cells and state (``seq_cp``), then both go on."""
    if s.eng.requests[parent].seq >= 0:
        with timed(ph):
            # Another seed than the parent's, inside int32 whatever --seed is.
            child = s.eng.fork(parent, seed=(s.args.seed + 1000) % (INT32_MAX + 1))
        rc, rp = s.eng.requests[child], s.eng.requests[parent]
        ph.note = (
            f"request {parent} (seq {rp.seq}) forked into request {child} (seq {rc.seq}) "
            "with seq_cp"
        )
    else:
        ph.note = f"request {parent} already finished; nothing to fork"
    _decode(s, ph, s.steps_per_phase)
    _end(s, ph)


def _cancel(s: _Session, ph: PhaseStats, request_id: int) -> None:
    """The request is cancelled; ``seq_rm`` frees its cells."""
    victim = s.eng.requests[request_id]
    if victim.seq >= 0:
        seq = victim.seq
        with timed(ph):
            s.eng.cancel(victim.id)
        ph.note = f"request {victim.id} cancelled after {len(victim.tokens)} tokens (seq_rm {seq})"
    else:
        ph.note = f"request {victim.id} already finished; nothing to cancel"
    _decode(s, ph, s.steps_per_phase)
    _end(s, ph)


def _free_seq_other_than(eng: Engine, old_seq: int) -> int:
    """A free sequence id, another than ``old_seq`` when there is one."""
    busy = {r.seq for r in eng.running()}
    free = [q for q in range(eng.cfg.n_seq_max) if q not in busy]
    dest = next((q for q in free if q != old_seq), free[0] if free else None)
    if dest is None:
        raise EngineError("no free sequence id to restore into")
    return dest


def _save_restore(
    s: _Session, ph: PhaseStats, request_id: int
) -> tuple[tuple[int, int, int, int] | None, int]:
    """The request is saved and cancelled, a newcomer takes its sequence id, and the saved
    conversation is restored into another one. Returns ``(restored, saved_bytes)``."""
    keep = s.eng.requests[request_id]
    restored, saved_bytes = None, 0
    if keep.seq < 0:
        ph.note = f"request {keep.id} already finished; nothing to save"
    else:
        old_seq = keep.seq
        with timed(ph) as save:
            saved = s.eng.save(keep.id)
        s.eng.cancel(keep.id)
        saved_bytes = len(saved.data)
        # A newcomer takes the freed sequence id, so the conversation comes back elsewhere.
        with timed(ph):
            newcomer = s.prompts[s.args.requests]
            s.eng.submit(newcomer, s.args.max_new, **s.submit_kw)
            ph.prompt_tokens += len(newcomer)
            dest = _free_seq_other_than(s.eng, old_seq)
            with timed() as restore:
                new_id = s.eng.restore(saved, seq=dest)
        restored = (keep.id, old_seq, new_id, dest)
        ph.note = (
            f"request {keep.id} saved from seq {old_seq} ({fmt_bytes(saved_bytes)} in "
            f"{1e3 * save.seconds:.0f} ms), restored into seq {dest} as request {new_id} "
            f"(in {1e3 * restore.seconds:.0f} ms)"
        )
    _decode(s, ph, s.steps_per_phase)
    _end(s, ph)
    return restored, saved_bytes


def _drain(s: _Session, ph: PhaseStats) -> None:
    """Steps until every request is done."""
    _decode(s, ph, None)
    ph.note = "until every request is done"
    _end(s, ph)


def plan_memory(args: argparse.Namespace, memory_config, longest: int | None):
    """Checks the sizes (``longest``: the longest prompt if known) and that the memory fits in
    the device, before anything is allocated; returns ``(n_seq, kv_size, cfg)``.
    ``memory_config`` is the plug-in's (:meth:`~jaxhybrid.models.JambaModel.memory_config`)."""
    n_seq, kv_size = check_sizes(args, longest)
    cfg = memory_config(kv_size=kv_size, n_seq_max=n_seq, unified=not args.kv_per_seq)
    check_memory(cfg)
    return n_seq, kv_size, cfg


def run_session(args: argparse.Namespace, mdl: DemoModel, out: TextIO = sys.stdout) -> DemoResult:
    """Runs the scripted session (see :mod:`jaxhybrid.cli`) and prints its progress."""
    # Random prompts are at most --prompt-len long: checked before they are drawn.
    random_prompts = mdl.tokenizer is None and not args.prompt
    longest = args.prompt_len if random_prompts else None
    n_seq, kv_size, cfg = plan_memory(args, mdl.plugin.memory_config, longest)
    prompts = make_prompts(args, mdl, args.requests + 1)
    check_sizes(args, max(len(p) for p in prompts))
    # Prompts are decoded in chunks of a static width: a multiple of 16 compiles once for
    # every prompt length up to it (at most the cells of one sequence's stream).
    n_prompt = min(-(-max(len(p) for p in prompts) // 16) * 16, cfg.kv.kv_size)
    n_stop = max(1, len(mdl.stop_tokens))
    pr = Printer(out, args.quiet, args.every)
    print_header(pr, mdl, args, n_seq, kv_size)

    phases = {name: PhaseStats(name) for name in PHASES}
    compile_ph = phases["compile"]
    with timed(compile_ph):
        _warm_up(make_engine(mdl, cfg, args, n_prompt, n_stop), args, prompts[0], mdl.stop_tokens)
    compile_ph.note = "every jitted function, once"
    pr.line(f"compiled in {compile_ph.seconds:.1f} s")

    submit_kw = dict(
        stop_tokens=mdl.stop_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    eng = make_engine(mdl, cfg, args, n_prompt, n_stop)
    steps_per_phase = args.steps or max(1, args.max_new // 5)
    s = _Session(eng, args, mdl, pr, prompts, submit_kw, steps_per_phase)
    ids = _join(s, phases["join"])
    _decode_phase(s, phases["decode"])
    _fork(s, phases["fork"], ids[0])
    _cancel(s, phases["cancel"], ids[-1])
    restored, saved_bytes = _save_restore(s, phases["save/restore"], ids[1])
    _drain(s, phases["drain"])

    result = DemoResult(
        phases=[phases[n] for n in PHASES],
        requests=dict(eng.requests),
        snapshots=s.snapshots,
        restored=restored,
        saved_bytes=saved_bytes,
        n_seq=n_seq,
        kv_size=kv_size,
    )
    print_summary(result, mdl.tokenizer, out)
    return result
