"""The main job: a scripted continuous-batching session on Jamba (``python -m jaxhybrid``).

The session runs on the :class:`~jaxhybrid.models.Engine` and goes through these phases, each
timed on its own after everything has been compiled once (``compile``):

1. ``join``: several requests join; their prompts are decoded (prefill).
2. ``decode``: every running request generates, one token per step, all in one batch.
3. ``fork``: request 0 is forked; the fork shares its memory through ``seq_cp`` (§4.2, §5.7.2).
4. ``cancel``: the last request is cancelled; ``seq_rm`` frees its cells (§4.1, §5.7.1).
5. ``save/restore``: request 1 is saved (``jaxhybrid.state_write``, §9) and cancelled, a new
   request takes its sequence id, and the saved conversation is restored into another sequence
   id, where it goes on.
6. ``drain``: steps until every request is done.

Whenever a sequence reaches ``--ctx`` positions, its context is shifted before its next token:
``seq_rm`` of the positions after ``--n-keep`` (half of them), ``seq_add`` of the rest and the
K-shift ``update`` (§2.12, §4.4; Jamba's attention has no positional encoding, so K needs no
re-rotation, only the cells' positions move). The recurrent state keeps what it absorbed
(§5.7.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import numpy as np

import jaxhybrid as jh
from jaxhybrid.models._generate import Engine, MemoryUsage
from jaxhybrid.models._hybrid_adapter import jamba_hybrid_config
from jaxhybrid.models._loader import load_jamba
from jaxhybrid.models.jamba import JambaConfig, init_jamba

__all__ = [
    "TINY_JAMBA",
    "DemoInputError",
    "DemoResult",
    "PhaseStats",
    "build_parser",
    "main",
    "plot_memory",
    "run_session",
]

# The default model: a tiny Jamba (attention at layers 1 and 3, MoE at layers 1 and 3, GQA) with
# seeded random weights, so the demo needs no download.
TINY_JAMBA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=2,
    expert_layer_offset=1,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=8,
    # Larger than transformers' 0.02 so that the random model's logits are not flat.
    initializer_range=0.2,
)

_TEXTS = [
    "The hybrid model reads the whole prompt once and then",
    "Continuous batching lets requests join and leave while",
    "A recurrent state cannot be rewound, so the cache",
    "Saving one conversation to bytes means that",
    "Shifting the context keeps the first tokens and",
    "Every sequence operation returns a new memory, and",
]

_PHASES = ("compile", "join", "decode", "fork", "cancel", "save/restore", "drain")


class DemoInputError(ValueError):
    """Bad flags, an unusable checkpoint directory or sizes the session cannot run with."""


# --------------------------------------------------------------------------------------------
# Command line


def _parsed(convert, ok, expected: str):
    """An argparse ``type``: ``convert`` the text, then require ``ok(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive = _parsed(int, lambda v: v >= 1, "a positive integer")
_non_negative = _parsed(int, lambda v: v >= 0, "an integer >= 0")
_unit_interval = _parsed(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (every flag is documented in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m jaxhybrid",
        description=(
            "A scripted continuous-batching session on a Jamba model with jaxhybrid's hybrid "
            "memory: requests join, one is forked (seq_cp), one is cancelled (seq_rm), one "
            "conversation is saved and restored into another sequence id, and sequences that "
            "reach --ctx positions are context-shifted (seq_rm + seq_add + K-shift update). "
            "Prints progress, tokens/s per phase and memory use."
        ),
        epilog=(
            "Without --model, a tiny Jamba with seeded random weights is built (no download); "
            "its prompts are random token ids. Exit status: 0 ok, 1 the session failed, "
            "2 bad flags, checkpoint or sizes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        metavar="DIR",
        help="Hugging Face Jamba checkpoint directory (config.json and *.safetensors; its "
        "tokenizer.json is used when present). Default: a tiny seeded model.",
    )
    m.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="parameter, K/V and conv-state dtype",
    )
    m.add_argument("--seed", type=_non_negative, default=0, help="seed of weights and prompts")
    s = p.add_argument_group("session")
    s.add_argument(
        "--requests",
        type=_positive,
        default=3,
        help="requests that join at the start (at least 3: one is forked, one cancelled, one "
        "saved and restored)",
    )
    s.add_argument(
        "--n-seq",
        type=_positive,
        default=None,
        help="sequence ids of the memory (default: --requests + 1, room for the fork)",
    )
    s.add_argument(
        "--ctx",
        type=_positive,
        default=40,
        help="positions one sequence may hold; a sequence that reaches it is context-shifted",
    )
    s.add_argument(
        "--n-keep",
        type=_non_negative,
        default=4,
        help="positions a context shift keeps at the start of a sequence",
    )
    s.add_argument(
        "--kv-size",
        type=_positive,
        default=None,
        help="KV cells (per stream with --kv-per-seq); default: just enough, --n-seq * --ctx "
        "(unified) or --ctx (per sequence)",
    )
    s.add_argument(
        "--kv-per-seq",
        action="store_true",
        help="one KV stream per sequence instead of one unified cache",
    )
    s.add_argument(
        "--prompt-len",
        type=_positive,
        default=16,
        help="length of the longest random prompt (prompts without a tokenizer)",
    )
    s.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt text (repeatable; needs a checkpoint with tokenizer.json); the prompts "
        "are used in turn",
    )
    s.add_argument("--max-new", type=_positive, default=32, help="tokens each request generates")
    s.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="decode steps of each middle phase (default: --max-new / 5)",
    )
    s.add_argument("--n-ubatch", type=_positive, default=32, help="ubatch size of the decodes")
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--temperature", type=_finite, default=0.8, help="sampling temperature (<= 0: greedy)"
    )
    g.add_argument("--top-k", type=_non_negative, default=40, help="top-k (0: off)")
    g.add_argument("--top-p", type=_unit_interval, default=0.95, help="top-p (1: off)")
    o = p.add_argument_group("output")
    o.add_argument(
        "--plot",
        metavar="FILE",
        help="write a PNG of the memory after every phase: KV cells x sequences (colour = "
        "position) and recurrent cells x sequences",
    )
    o.add_argument(
        "--every",
        type=_positive,
        default=4,
        help="print a progress line every N decode steps (a live line on a terminal)",
    )
    o.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p


# --------------------------------------------------------------------------------------------
# Model, tokenizer, prompts


@dataclasses.dataclass
class _Model:
    config: JambaConfig
    model: object
    tokenizer: object | None
    stop_tokens: tuple[int, ...]
    name: str


def _load_model(args) -> _Model:
    if args.model is None:
        config = JambaConfig(**TINY_JAMBA, dtype=args.dtype)
        model = init_jamba(config, seed=args.seed)
        return _Model(config, model, None, (), f"tiny Jamba (seeded random weights, {args.dtype})")
    path = args.model
    if not os.path.isdir(path):
        raise DemoInputError(f"--model {path}: no such directory")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise DemoInputError(
            f"--model {path}: no config.json; expected a Hugging Face Jamba checkpoint directory "
            "(config.json and *.safetensors)"
        )
    from safetensors import SafetensorError

    try:
        config, model = load_jamba(path, dtype=args.dtype)
        with open(cfg_file) as f:
            hf = json.load(f)
    except (ValueError, OSError, KeyError, TypeError, SafetensorError) as e:
        raise DemoInputError(f"--model {path}: {e}") from e
    eos = hf.get("eos_token_id")
    stop = () if eos is None else tuple(int(t) for t in np.atleast_1d(eos))
    tokenizer = None
    tok_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_file):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise DemoInputError(
                f"--model {path} has a tokenizer.json but the 'tokenizers' package is missing "
                "(python -m pip install 'jaxhybrid[demo]')"
            ) from e
        try:
            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as e:  # the Rust library raises its own exception type
            raise DemoInputError(f"--model {path}: cannot read tokenizer.json: {e}") from e
    return _Model(config, model, tokenizer, stop, f"{path} ({args.dtype})")


def _prompts(args, mdl: _Model, n: int) -> list[list[int]]:
    """``n`` prompts: the texts (tokenized) or seeded random ids of varying lengths."""
    if mdl.tokenizer is not None:
        texts = args.prompt or _TEXTS
        out = [mdl.tokenizer.encode(texts[i % len(texts)]).ids for i in range(n)]
        for i, ids in enumerate(out):
            if not ids:
                raise DemoInputError(f"prompt {texts[i % len(texts)]!r} encodes to no tokens")
            bad = [t for t in ids if not 0 <= t < mdl.config.vocab_size]
            if bad:
                raise DemoInputError(
                    f"the tokenizer gives ids {bad[:3]} outside the model's vocabulary of "
                    f"{mdl.config.vocab_size}: tokenizer.json does not belong to this checkpoint"
                )
        return [list(ids) for ids in out]
    if args.prompt:
        where = "the default tiny model" if args.model is None else f"--model {args.model}"
        raise DemoInputError(f"--prompt needs a tokenizer, and {where} has no tokenizer.json")
    rng = np.random.default_rng(args.seed)
    lo = max(1, args.prompt_len // 2)
    lens = [args.prompt_len, *rng.integers(lo, args.prompt_len + 1, size=n - 1)]
    return [rng.integers(0, mdl.config.vocab_size, size=int(k)).tolist() for k in lens]


def _check_sizes(args, prompts: list[list[int]]) -> tuple[int, int]:
    """Refuses sizes the session cannot run with; returns ``(n_seq, kv_size)``."""
    r = args.requests
    if r < 3:
        raise DemoInputError(
            f"--requests {r}: the session needs at least 3 requests (one is forked, one "
            "cancelled, one saved and restored)"
        )
    n_seq = r + 1 if args.n_seq is None else args.n_seq
    if n_seq < r + 1:
        raise DemoInputError(
            f"--requests {r} with --n-seq {n_seq}: every running request holds one sequence id, "
            f"and request 0 is forked while all {r} run, so the session needs {r + 1} sequence "
            f"ids; use --n-seq {r + 1} or --requests {n_seq - 1}"
        )
    longest = max(len(p) for p in prompts)
    if longest >= args.ctx:
        raise DemoInputError(
            f"--ctx {args.ctx} is too small for a prompt of {longest} tokens: a sequence needs "
            f"at least {longest + 1} positions (prompt + one generated token)"
        )
    if args.n_keep > args.ctx - 2:
        raise DemoInputError(
            f"--n-keep {args.n_keep} leaves nothing to drop in a context shift: it must be at "
            f"most --ctx - 2 = {args.ctx - 2}"
        )
    need = args.ctx if args.kv_per_seq else n_seq * args.ctx
    kv_size = need if args.kv_size is None else args.kv_size
    if kv_size < need:
        layout = (
            f"each sequence's stream needs --ctx = {need} cells"
            if args.kv_per_seq
            else f"a unified cache needs --n-seq x --ctx = {n_seq} x {args.ctx} = {need} cells"
        )
        raise DemoInputError(
            f"--kv-size {kv_size} is too small: {n_seq} sequences may each hold {args.ctx} "
            f"positions, and {layout}; raise --kv-size or lower --ctx / --n-seq"
        )
    return n_seq, kv_size


# --------------------------------------------------------------------------------------------
# The session


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


class _Printer:
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


def _fmt_bytes(n: int) -> str:
    k = 0 if n < 1024 else min(int(math.log(n, 1024)), 3)
    return f"{n} B" if k == 0 else f"{n / 1024**k:.1f} {('KiB', 'MiB', 'GiB')[k - 1]}"


def _memory_line(u: MemoryUsage) -> str:
    return (
        f"memory: KV cells {u.kv_cells_used}/{u.kv_cells_total} ({u.kv_cells_shared} shared), "
        f"recurrent cells {u.recr_cells_used}/{u.recr_cells_total}; "
        f"K/V {_fmt_bytes(u.kv_bytes_used)} used of {_fmt_bytes(u.kv_bytes)}, "
        f"states {_fmt_bytes(u.recr_bytes_used)} of {_fmt_bytes(u.recr_bytes)}, "
        f"metadata {_fmt_bytes(u.meta_bytes)}"
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
            f"{usage.kv_cells_per_seq[s]:>4} {usage.recr_cell_of_seq[s]:>3}  "
            f"{_show(r.tokens, tokenizer)}"
        )
    return rows


def _progress_text(name: str, step: int, eng: Engine) -> str:
    cells = []
    by_seq = {r.seq: r for r in eng.running()}
    for s in range(eng.cfg.n_seq_max):
        r = by_seq.get(s)
        cells.append(f"s{s}:-" if r is None else f"s{s}:r{r.id}@{r.n_past}")
    return f"  [{name:>12}] step {step:4d} | " + " ".join(cells)


def _engine(mdl: _Model, cfg, args, n_prompt: int, n_stop: int) -> Engine:
    """The session's engine; the warm-up builds one with the same static settings."""
    return Engine(
        mdl.model,
        cfg,
        n_ubatch=args.n_ubatch,
        n_prompt=n_prompt,
        n_stop=n_stop,
        n_ctx_seq=args.ctx,
        n_keep=args.n_keep,
    )


def _warm_up(mdl: _Model, cfg, args, prompts, n_prompt: int, n_stop: int) -> None:
    """Compiles every jitted function of the session on a throwaway engine."""
    eng = _engine(mdl, cfg, args, n_prompt, n_stop)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    a = eng.submit(prompts[0], args.ctx + 2, stop_tokens=mdl.stop_tokens, **kw)
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


def run_session(args, mdl: _Model, out: TextIO = sys.stdout) -> DemoResult:
    """Runs the scripted session (see the module docstring) and prints its progress."""
    r_count = args.requests
    prompts = _prompts(args, mdl, r_count + 1)
    n_seq, kv_size = _check_sizes(args, prompts)
    cfg = jamba_hybrid_config(
        mdl.config, kv_size=kv_size, n_seq_max=n_seq, unified=not args.kv_per_seq
    )
    # Prompts are decoded in chunks of a static width: a multiple of 16 compiles once for
    # every prompt length up to it.
    n_prompt = -(-max(len(p) for p in prompts) // 16) * 16
    n_stop = max(1, len(mdl.stop_tokens))
    pr = _Printer(out, args.quiet, args.every)
    c = mdl.config
    pr.line(f"model: {mdl.name}")
    pr.line(
        f"  {c.num_hidden_layers} layers ({len(c.attention_layers)} attention, "
        f"{len(c.mamba_layers)} Mamba), hidden {c.hidden_size}, vocab {c.vocab_size}"
    )
    layout = f"{n_seq} streams x {kv_size}" if args.kv_per_seq else f"unified, {kv_size}"
    pr.line(
        f"memory: {n_seq} sequence ids, KV cells {layout}; context {args.ctx} positions per "
        f"sequence, context shift keeps {args.n_keep}"
    )

    phases = {name: PhaseStats(name) for name in _PHASES}
    t0 = time.perf_counter()
    _warm_up(mdl, cfg, args, prompts, n_prompt, n_stop)
    phases["compile"].seconds = time.perf_counter() - t0
    phases["compile"].note = "every jitted function, once"
    pr.line(f"compiled in {phases['compile'].seconds:.1f} s")

    eng = _engine(mdl, cfg, args, n_prompt, n_stop)
    kw = dict(
        stop_tokens=mdl.stop_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    steps_per_phase = args.steps or max(1, args.max_new // 5)
    snapshots: list[tuple[str, MemoryUsage]] = []
    step_no = 0

    def shifts() -> int:
        return sum(r.n_shifts for r in eng.requests.values())

    def decode(ph: PhaseStats, n_steps: int | None) -> None:
        nonlocal step_no
        k = 0
        while eng.running() and (n_steps is None or k < n_steps):
            before = shifts()
            t = time.perf_counter()
            got = eng.step()
            ph.seconds += time.perf_counter() - t
            ph.shifts += shifts() - before
            if ph.shifts and not any(name.startswith("shift") for name, _ in snapshots):
                # The picture shows the memory right after the first context shift.
                shifted = [r.id for r in eng.requests.values() if r.n_shifts]
                snapshots.append((f"shift (r{shifted[0]})", eng.memory_usage()))
            ph.generated_tokens += len(got)
            ph.steps += 1
            k += 1
            step_no += 1
            pr.progress(step_no, _progress_text(ph.name, step_no, eng))

    def end(ph: PhaseStats) -> None:
        usage = eng.memory_usage()
        snapshots.append((ph.name, usage))
        rate = f"{ph.tokens_per_s:,.0f} tok/s" if ph.seconds > 0 else "-"
        extra = f", {ph.shifts} context shift(s)" if ph.shifts else ""
        note = f" | {ph.note}" if ph.note else ""
        pr.line(
            f"[{ph.name}] {ph.prompt_tokens} prompt + {ph.generated_tokens} generated tokens "
            f"in {ph.seconds:.3f} s: {rate}{extra}{note}"
        )
        for row in _seq_table(eng, usage, mdl.tokenizer):
            pr.line(row)
        pr.line("  " + _memory_line(usage))

    # 1. join
    ph = phases["join"]
    ids = []
    for p in prompts[:r_count]:
        t = time.perf_counter()
        ids.append(eng.submit(p, args.max_new, **kw))
        ph.seconds += time.perf_counter() - t
        ph.prompt_tokens += len(p)
    ph.note = f"{r_count} requests joined (prefill, ubatches of {args.n_ubatch})"
    end(ph)

    # 2. decode
    decode(phases["decode"], steps_per_phase)
    end(phases["decode"])

    # 3. fork: the fork shares request 0's cells and state (seq_cp)
    ph = phases["fork"]
    parent = ids[0]
    if eng.requests[parent].seq >= 0:
        t = time.perf_counter()
        child = eng.fork(parent, seed=args.seed + 1000)
        ph.seconds += time.perf_counter() - t
        rc, rp = eng.requests[child], eng.requests[parent]
        ph.note = (
            f"request {parent} (seq {rp.seq}) forked into request {child} (seq {rc.seq}) "
            "with seq_cp"
        )
    else:
        ph.note = f"request {parent} already finished; nothing to fork"
    decode(ph, steps_per_phase)
    end(ph)

    # 4. cancel
    ph = phases["cancel"]
    victim = eng.requests[ids[-1]]
    if victim.seq >= 0:
        seq = victim.seq
        t = time.perf_counter()
        eng.cancel(victim.id)
        ph.seconds += time.perf_counter() - t
        ph.note = f"request {victim.id} cancelled after {len(victim.tokens)} tokens (seq_rm {seq})"
    else:
        ph.note = f"request {victim.id} already finished; nothing to cancel"
    decode(ph, steps_per_phase)
    end(ph)

    # 5. save / restore
    ph = phases["save/restore"]
    restored = None
    saved_bytes = 0
    keep = eng.requests[ids[1]]
    if keep.seq < 0:
        ph.note = f"request {keep.id} already finished; nothing to save"
    else:
        old_seq = keep.seq
        t = time.perf_counter()
        saved = eng.save(keep.id)
        t_save = time.perf_counter() - t
        eng.cancel(keep.id)
        saved_bytes = len(saved.data)
        # A newcomer takes the freed sequence id, so the conversation comes back elsewhere.
        t1 = time.perf_counter()
        eng.submit(prompts[r_count], args.max_new, **kw)
        ph.prompt_tokens += len(prompts[r_count])
        free = [s for s in range(n_seq) if s not in {r.seq for r in eng.running()}]
        dest = next((s for s in free if s != old_seq), free[0] if free else None)
        if dest is None:
            raise RuntimeError("no free sequence id to restore into")
        t2 = time.perf_counter()
        new_id = eng.restore(saved, seq=dest)
        t_restore = time.perf_counter() - t2
        ph.seconds += time.perf_counter() - t1 + t_save
        restored = (keep.id, old_seq, new_id, dest)
        ph.note = (
            f"request {keep.id} saved from seq {old_seq} ({_fmt_bytes(saved_bytes)} in "
            f"{1e3 * t_save:.0f} ms), restored into seq {dest} as request {new_id} "
            f"(in {1e3 * t_restore:.0f} ms)"
        )
    decode(ph, steps_per_phase)
    end(ph)

    # 6. drain
    ph = phases["drain"]
    decode(ph, None)
    ph.note = "until every request is done"
    end(ph)

    result = DemoResult(
        phases=[phases[n] for n in _PHASES],
        requests=dict(eng.requests),
        snapshots=snapshots,
        restored=restored,
        saved_bytes=saved_bytes,
        n_seq=n_seq,
        kv_size=kv_size,
    )
    _summary(result, mdl, out)
    return result


def _summary(res: DemoResult, mdl: _Model, out: TextIO) -> None:
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
            f"{_show(r.tokens, mdl.tokenizer, 50)}\n"
        )
    peak = max(res.snapshots, key=lambda s: s[1].kv_cells_used)
    u = peak[1]
    w(f"\npeak memory use (after '{peak[0]}'):\n")
    w(f"  KV cells per sequence: {u.kv_cells_per_seq.tolist()}\n")
    w(f"  recurrent cell per sequence: {u.recr_cell_of_seq.tolist()}\n")
    w(f"  {_memory_line(u)}\n")
    if res.restored:
        a, s0, b, s1 = res.restored
        w(
            f"  saved conversation: {_fmt_bytes(res.saved_bytes)} (request {a}, seq {s0} -> "
            f"request {b}, seq {s1})\n"
        )
    out.flush()


# --------------------------------------------------------------------------------------------
# The picture


def plot_memory(res: DemoResult, path: str) -> None:
    """Writes a PNG: after every phase (and right after the first context shift), KV cells x
    sequences (colour = position, blank = not held) and recurrent cells x sequences."""
    from matplotlib.figure import Figure

    # The memory after the last phase is empty: leave out empty pictures.
    snaps = [(n, u) for n, u in res.snapshots if u.kv_cells_used or u.recr_cells_used]
    snaps = snaps or res.snapshots
    fig = Figure(figsize=(11, 1.1 + 1.0 * len(snaps)), layout="constrained")
    axes = fig.subplots(len(snaps), 2, squeeze=False, width_ratios=[5, 1])
    vmax = max(1, max(int(u.kv_pos.max()) for _, u in snaps))
    image = None
    for (name, u), (ax_kv, ax_rs) in zip(snaps, axes, strict=True):
        n_seq = u.kv_seq.shape[-1]
        held = u.kv_seq.reshape(-1, n_seq).T  # [seq, stream * cell]
        pos = np.broadcast_to(u.kv_pos.reshape(1, -1), held.shape)
        grid = np.where(held, pos, np.nan)
        image = ax_kv.imshow(
            grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax
        )
        ax_kv.set_ylabel(name, rotation=0, ha="right", va="center")
        ax_kv.set_yticks(range(n_seq), [f"s{s}" for s in range(n_seq)], fontsize=7)
        n_cells = held.shape[1]
        if u.kv_pos.shape[0] > 1:
            for b in range(1, u.kv_pos.shape[0]):
                ax_kv.axvline(b * u.kv_pos.shape[1] - 0.5, color="k", lw=0.5)
        ax_kv.set_xlim(-0.5, n_cells - 0.5)
        rs = u.recr_seq.T.astype(float)  # [seq, cell]
        rs_grid = np.where(u.recr_seq.T, u.recr_pos[None, :], np.nan)
        ax_rs.imshow(
            rs_grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax
        )
        ax_rs.set_yticks(range(n_seq), [f"s{s}" for s in range(n_seq)], fontsize=7)
        ax_rs.set_xticks(range(rs.shape[1]))
        ax_rs.tick_params(labelsize=7)
        ax_kv.tick_params(labelsize=7)
    axes[0, 0].set_title("KV cells (colour: position)", fontsize=9)
    axes[0, 1].set_title("recurrent cells", fontsize=9)
    axes[-1, 0].set_xlabel("cell")
    axes[-1, 1].set_xlabel("cell")
    fig.colorbar(image, ax=axes[:, 1], label="position", shrink=0.6)
    fig.savefig(path, dpi=90)


# --------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Runs the demo; returns the exit status (0 ok, 1 the session failed, 2 bad input)."""
    out = sys.stdout if out is None else out
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, message already printed)
        return 0 if e.code is None else int(e.code)
    try:
        if args.plot is not None:
            folder = os.path.dirname(os.path.abspath(args.plot))
            if not os.path.isdir(folder):
                raise DemoInputError(f"--plot {args.plot}: folder {folder} does not exist")
            try:
                import matplotlib  # noqa: F401
            except ImportError as e:
                raise DemoInputError(
                    "--plot needs matplotlib (python -m pip install 'jaxhybrid[demo]')"
                ) from e
        mdl = _load_model(args)
        result = run_session(args, mdl, out)
    except DemoInputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, jh.JaxHybridError) as e:
        print(f"{parser.prog}: the session failed: {e}", file=sys.stderr)
        return 1
    if args.plot is not None:
        plot_memory(result, args.plot)
        out.write(f"\nwrote {args.plot}\n")
    return 0
