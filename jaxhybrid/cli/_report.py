"""What the demo prints: progress lines, a table per phase, memory lines and the summary."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import TextIO

import jaxhybrid as jh
from jaxhybrid.cli._model import DemoModel
from jaxhybrid.serving import Engine, MemoryUsage

__all__ = [
    "DemoResult",
    "PhaseStats",
    "Printer",
    "fmt_bytes",
    "print_header",
    "print_phase",
    "print_summary",
    "progress_text",
]


@dataclasses.dataclass
class PhaseStats:
    """One phase of the session: tokens decoded and wall time (after compilation)."""

    name: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    shifts: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        n = self.prompt_tokens + self.generated_tokens
        return n / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class DemoResult:
    """What a session did: its phases, its requests and the memory after every phase."""

    phases: list[PhaseStats]
    requests: dict
    snapshots: list[tuple[str, MemoryUsage]]
    restored: tuple[int, int, int, int] | None  # (old request, old seq, new request, new seq)
    saved_bytes: int
    n_seq: int
    kv_size: int


class Printer:
    """Lines for the session's log (none with ``quiet``) and progress, live on a terminal."""

    def __init__(self, out: TextIO, quiet: bool, every: int):
        self.out, self.quiet, self.every = out, quiet, every
        self.live = not quiet and out.isatty()
        self._open_line = False

    def line(self, text: str = "") -> None:
        if self.quiet:
            return
        if self._open_line:
            self.out.write("\n")
            self._open_line = False
        self.out.write(text + "\n")
        self.out.flush()

    def progress(self, step: int, text: str) -> None:
        if self.live:
            self.out.write("\r" + text + "\033[K")
            self.out.flush()
            self._open_line = True
        elif not self.quiet and step % self.every == 0:
            self.line(text)


def fmt_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB.

    Examples:
        >>> fmt_bytes(512), fmt_bytes(3 * 1024**2)
        ('512 B', '3.0 MiB')
    """
    k = 0 if n < 1024 else min(int(math.log(n, 1024)), 3)
    return f"{n} B" if k == 0 else f"{n / 1024**k:.1f} {('KiB', 'MiB', 'GiB')[k - 1]}"


def _memory_line(u: MemoryUsage) -> str:
    return (
        f"memory: KV cells {u.kv_cells_used}/{u.kv_cells_total} ({u.kv_cells_shared} shared), "
        f"recurrent cells {u.recurrent_cells_used}/{u.recurrent_cells_total}; "
        f"K/V {fmt_bytes(u.kv_bytes_used)} used of {fmt_bytes(u.kv_bytes)}, "
        f"states {fmt_bytes(u.recurrent_bytes_used)} of {fmt_bytes(u.recurrent_bytes)}, "
        f"metadata {fmt_bytes(u.meta_bytes)}"
    )


def _show(tokens: Sequence[int], tokenizer, width: int = 40) -> str:
    if tokenizer is not None:
        text = tokenizer.decode(list(tokens)).replace("\n", " ")
        return repr(text if len(text) <= width else "..." + text[-width + 3 :])
    shown = " ".join(str(t) for t in tokens[-8:])
    return ("... " if len(tokens) > 8 else "") + shown


def _seq_table(eng: Engine, usage: MemoryUsage, tokenizer) -> list[str]:
    rows = [
        f"  {'seq':>3} {'req':>4} {'kv pos':>9} {'gen':>4} {'shifts':>6} {'kv':>4} {'rs':>3}  last"
    ]
    by_seq = {r.seq: r for r in eng.running()}
    for s in range(eng.cfg.n_seq_max):
        r = by_seq.get(s)
        if r is None:
            rows.append(f"  {s:>3} {'-':>4}")
            continue
        held = usage.kv_pos[usage.kv_seq[..., s]]
        span = f"{held.min()}..{held.max()}" if held.size else "-"
        rows.append(
            f"  {s:>3} {r.id:>4} {span:>9} {len(r.tokens):>4} {r.n_shifts:>6} "
            f"{usage.kv_cells_per_seq[s]:>4} {usage.recurrent_cell_of_seq[s]:>3}  "
            f"{_show(r.tokens, tokenizer)}"
        )
    return rows


def progress_text(name: str, step: int, eng: Engine) -> str:
    """One progress line: the phase, the step and every sequence's request and position."""
    cells = []
    by_seq = {r.seq: r for r in eng.running()}
    for s in range(eng.cfg.n_seq_max):
        r = by_seq.get(s)
        cells.append(f"s{s}:-" if r is None else f"s{s}:r{r.id}@{r.n_past}")
    return f"  [{name:>12}] step {step:4d} | " + " ".join(cells)


def print_header(
    pr: Printer, mdl: DemoModel, args: argparse.Namespace, n_seq: int, kv_size: int
) -> None:
    """The model and the memory layout the session runs on."""
    c = mdl.config
    kinds = [jh.LayerKind(k) for k in mdl.plugin.memory_layout()["layer_kinds"]]
    n_attn = sum(k.attention for k in kinds)
    n_recr = sum(k.recurrent for k in kinds)
    pr.line(f"model: {mdl.name}")
    pr.line(
        f"  {len(kinds)} layers ({n_attn} attention, {n_recr} recurrent), hidden "
        f"{c.hidden_size}, vocab {c.vocab_size}"
    )
    layout = f"{n_seq} streams x {kv_size}" if args.kv_per_seq else f"unified, {kv_size}"
    pr.line(
        f"memory: {n_seq} sequence ids, KV cells {layout}; context {args.ctx} positions per "
        f"sequence, context shift keeps {args.n_keep}"
    )


def print_phase(pr: Printer, ph: PhaseStats, eng: Engine, usage: MemoryUsage, tokenizer) -> None:
    """A phase's line (tokens, time, tokens/s, note), its sequence table and memory line."""
    rate = f"{ph.tokens_per_s:,.0f} tok/s" if ph.seconds > 0 else "-"
    extra = f", {ph.shifts} context shift(s)" if ph.shifts else ""
    note = f" | {ph.note}" if ph.note else ""
    pr.line(
        f"[{ph.name}] {ph.prompt_tokens} prompt + {ph.generated_tokens} generated tokens "
        f"in {ph.seconds:.3f} s: {rate}{extra}{note}"
    )
    for row in _seq_table(eng, usage, tokenizer):
        pr.line(row)
    pr.line("  " + _memory_line(usage))


def print_summary(res: DemoResult, tokenizer, out: TextIO) -> None:
    """The summary (printed even with ``--quiet``): phases, requests and peak memory use."""
    w = out.write
    w("\nphase          prompt  generated  steps  shifts   seconds     tok/s\n")
    for ph in res.phases:
        rate = (
            f"{ph.tokens_per_s:9,.0f}" if ph.name != "compile" and ph.seconds > 0 else "        -"
        )
        w(
            f"{ph.name:<13} {ph.prompt_tokens:>7} {ph.generated_tokens:>10} {ph.steps:>6} "
            f"{ph.shifts:>7} {ph.seconds:>9.3f} {rate}\n"
        )
    w("\nrequest  prompt  generated  shifts  end        output\n")
    for r in res.requests.values():
        if r.cancelled:
            end = "cancelled"
        elif res.restored and r.id == res.restored[2]:
            end = "restored"
        else:
            end = "finished"
        w(
            f"{r.id:>7} {len(r.prompt):>7} {len(r.tokens):>10} {r.n_shifts:>7}  {end:<9}  "
            f"{_show(r.tokens, tokenizer, 50)}\n"
        )
    _print_peak(res, out)
    out.flush()


def _print_peak(res: DemoResult, out: TextIO) -> None:
    w = out.write
    peak = max(res.snapshots, key=lambda s: s[1].kv_cells_used)
    u = peak[1]
    w(f"\npeak memory use (after '{peak[0]}'):\n")
    w(f"  KV cells per sequence: {u.kv_cells_per_seq.tolist()}\n")
    w(f"  recurrent cell per sequence: {u.recurrent_cell_of_seq.tolist()}\n")
    w(f"  {_memory_line(u)}\n")
    if res.restored:
        a, s0, b, s1 = res.restored
        w(
            f"  saved conversation: {fmt_bytes(res.saved_bytes)} (request {a}, seq {s0} -> "
            f"request {b}, seq {s1})\n"
        )
