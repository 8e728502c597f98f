"""``python -m jaxhybrid`` (console script ``jaxhybrid-demo``): a scripted continuous-batching
session on a Jamba model. Run it with ``--help`` for every flag; the session itself lives in
:mod:`jaxhybrid.cli` (it needs the ``demo`` extra: Flax, safetensors, matplotlib)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo and returns its exit status (0 ok, 1 failed run, 2 bad input)."""
    try:
        from jaxhybrid.cli import main as cli_main
    except ImportError as e:
        print(
            f"jaxhybrid: error: the demo needs the 'demo' extra ({e}); install it with\n"
            "  python -m pip install 'jaxhybrid[demo]'",
            file=sys.stderr,
        )
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
