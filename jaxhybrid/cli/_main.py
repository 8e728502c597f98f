"""The demo's entry point: flags in, exit status out."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from jaxhybrid.cli._args import DemoInputError, build_parser, check_plot_path
from jaxhybrid.cli._model import load_model
from jaxhybrid.cli._plot import plot_memory
from jaxhybrid.cli._session import run_session

__all__ = ["main"]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Runs the demo; returns the exit status (0 ok, 1 the session failed, 2 bad input)."""
    out = sys.stdout if out is None else out
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, message already printed)
        return 0 if e.code is None else int(e.code)
    try:
        check_plot_path(args)
        result = run_session(args, load_model(args), out)
    except DemoInputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # every jaxhybrid.JaxHybridError, and XLA runtime errors
        print(f"{parser.prog}: the session failed: {e}", file=sys.stderr)
        return 1
    if args.plot is not None:
        plot_memory(result, args.plot)
        out.write(f"\nwrote {args.plot}\n")
    return 0
