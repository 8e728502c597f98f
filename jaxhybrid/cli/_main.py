"""The demo's entry point: flags in, exit status out."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from jaxhybrid.cli._args import DemoInputError, build_parser, check_plot_path
from jaxhybrid.cli._model import load_model, model_config
from jaxhybrid.cli._plot import plot_memory
from jaxhybrid.cli._session import plan_memory, run_session

__all__ = ["main"]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Runs the demo; returns the exit status (0 ok, 1 the session failed, 2 bad input).

    Every flag, the checkpoint's config and the sizes are checked before the model is loaded
    or anything is allocated; every error ends with one ``error:`` line, never a traceback.
    """
    out = sys.stdout if out is None else out
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, message already printed)
        return 0 if e.code is None else int(e.code)
    try:
        check_plot_path(args)
        plugin, _ = model_config(args)
        # The tiny model has no tokenizer: its prompts are random, at most --prompt-len long.
        random_prompts = args.model is None and not args.prompt
        plan_memory(args, plugin.memory_config, args.prompt_len if random_prompts else None)
        result = run_session(args, load_model(args), out)
    except DemoInputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # every JaxHybridError, and XLA runtime errors
        print(f"{parser.prog}: the session failed: {e or type(e).__name__}", file=sys.stderr)
        return 1
    if args.plot is not None:
        try:
            plot_memory(result, args.plot)
        except (OSError, ValueError) as e:
            print(f"{parser.prog}: cannot write --plot {args.plot}: {e}", file=sys.stderr)
            return 1
        out.write(f"\nwrote {args.plot}\n")
    return 0
