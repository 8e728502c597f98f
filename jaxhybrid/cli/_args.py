"""The demo's command line and the checks of its input (flags, sizes, the plot's file).

Everything is checked before any work: integer flags lie in int32 (the engine stores them so),
the plot's file name is a PNG's, and the sizes fit what the session's memory allows (its cells
are indexed by int32, and its buffers must fit in the device's memory) before the model is
loaded or anything is allocated.
"""

from __future__ import annotations

import argparse
import math
import os
import stat

import jax

import jaxhybrid as jh
from jaxhybrid.models import SUPPORTED_MODEL_TYPES

__all__ = [
    "INT32_MAX",
    "DemoInputError",
    "build_parser",
    "check_memory",
    "check_plot_path",
    "check_sizes",
    "device_memory",
]

INT32_MAX = 2**31 - 1


class DemoInputError(jh.InvalidArgumentError):
    """Bad flags, an unusable checkpoint directory or sizes the session cannot run with (a
    ``ValueError`` too)."""


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


def _int_at_least(low: int, expected: str):
    """An argparse ``type``: an integer in ``[low, INT32_MAX]``."""
    at_least = _parsed(int, lambda v: v >= low, expected)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > INT32_MAX:
            raise argparse.ArgumentTypeError(
                f"expected an integer in [{low}, {INT32_MAX}], got {value}"
            )
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")
_unit_interval = _parsed(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return value


def _png_file(text: str) -> str:
    # matplotlib picks the format from the suffix: anything but .png would fail after the
    # whole session has run.
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"expected a file name ending in .png, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (every flag is documented in ``--help``).

    Examples:
        >>> args = build_parser().parse_args(["--requests", "4"])
        >>> args.requests, args.n_seq, args.ctx
        (4, None, 40)
    """
    p = argparse.ArgumentParser(
        prog="python -m jaxhybrid",
        description=(
            "A scripted continuous-batching session on a hybrid model with jaxhybrid's hybrid "
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
    _add_model_flags(p.add_argument_group("model"))
    _add_session_flags(p.add_argument_group("session"))
    _add_sampling_flags(p.add_argument_group("sampling"))
    _add_output_flags(p.add_argument_group("output"))
    return p


def _add_model_flags(m) -> None:
    m.add_argument(
        "--model",
        metavar="DIR",
        help="Hugging Face checkpoint directory of a supported family (config.json and "
        "*.safetensors; its tokenizer.json is used when present): "
        + ", ".join(SUPPORTED_MODEL_TYPES)
        + ". Default: a tiny seeded Jamba.",
    )
    m.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="parameter, K/V and conv-state dtype",
    )
    m.add_argument("--seed", type=_non_negative, default=0, help="seed of weights and prompts")


def _add_session_flags(s) -> None:
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


def _add_sampling_flags(g) -> None:
    g.add_argument(
        "--temperature", type=_finite, default=0.8, help="sampling temperature (<= 0: greedy)"
    )
    g.add_argument("--top-k", type=_non_negative, default=40, help="top-k (0: off)")
    g.add_argument("--top-p", type=_unit_interval, default=0.95, help="top-p (1: off)")


def _add_output_flags(o) -> None:
    o.add_argument(
        "--plot",
        metavar="FILE",
        type=_png_file,
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


def check_plot_path(args: argparse.Namespace) -> None:
    """Refuses a ``--plot`` file that cannot be written: no folder, a folder or another
    non-regular file in its place (a FIFO would block the writer), or no matplotlib."""
    if args.plot is None:
        return
    folder = os.path.dirname(os.path.abspath(args.plot))
    if not os.path.isdir(folder):
        raise DemoInputError(f"--plot {args.plot}: folder {folder} does not exist")
    if os.path.isdir(args.plot):
        raise DemoInputError(f"--plot {args.plot} is a directory")
    if os.path.exists(args.plot) and not stat.S_ISREG(os.stat(args.plot).st_mode):
        raise DemoInputError(f"--plot {args.plot} is not a regular file")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise DemoInputError(
            "--plot needs matplotlib (python -m pip install 'jaxhybrid[demo]')"
        ) from e


def check_sizes(args: argparse.Namespace, longest: int | None = None) -> tuple[int, int]:
    """Refuses sizes the session cannot run with; returns ``(n_seq, kv_size)``.

    ``longest`` is the longest prompt when it is known (``--prompt-len`` for random prompts,
    else the tokenized texts'); these are flags only, checked before anything is allocated.
    """
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
    if longest is not None and longest >= args.ctx:
        raise DemoInputError(
            f"--ctx {args.ctx} is too small for a prompt of {longest} tokens: a sequence needs "
            f"at least {longest + 1} positions (prompt + one generated token)"
        )
    if args.n_keep > args.ctx - 2:
        raise DemoInputError(
            f"--n-keep {args.n_keep} leaves nothing to drop in a context shift: it must be at "
            f"most --ctx - 2 = {args.ctx - 2}"
        )
    kv_size = _kv_size(args, n_seq)
    cells = kv_size * (n_seq if args.kv_per_seq else 1)
    if cells > INT32_MAX:
        raise DemoInputError(
            f"--n-seq {n_seq} and --ctx {args.ctx} need {cells} KV cells, more than "
            f"{INT32_MAX} KV cells (cells are indexed by int32); lower --ctx, --n-seq or "
            "--kv-size"
        )
    if args.n_ubatch > cells:
        raise DemoInputError(
            f"--n-ubatch {args.n_ubatch} is larger than the KV cache ({cells} cells): a ubatch "
            "never holds more tokens than the cache has cells"
        )
    return n_seq, kv_size


def device_memory() -> tuple[int, str]:
    """``(bytes, what)``: the memory of the first device (its allocator's limit), or the
    machine's RAM where the device reports none (the CPU)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except (RuntimeError, NotImplementedError):  # XLA runtime errors are RuntimeErrors
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform}:{device.id}"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's RAM"


def check_memory(cfg: jh.HybridConfig) -> int:
    """Refuses a memory whose buffers (KV cache, recurrent states, cell metadata) do not fit in
    the device; returns their bytes. Computed from shapes only: nothing is allocated."""
    shapes = jax.eval_shape(lambda: jh.init_hybrid(cfg))
    need = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    limit, where = device_memory()
    if need > limit:
        raise DemoInputError(
            f"the session's memory needs {need} bytes (KV cache and recurrent states of "
            f"{cfg.kv.n_stream * cfg.kv.kv_size} KV cells and {cfg.recurrent.n_seq_max} "
            f"sequences) but {where} has {limit} bytes; lower --ctx, --n-seq or --kv-size"
        )
    return need


def _kv_size(args: argparse.Namespace, n_seq: int) -> int:
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
    return kv_size
