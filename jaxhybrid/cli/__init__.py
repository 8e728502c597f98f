"""The main job: a scripted continuous-batching session on Jamba (``python -m jaxhybrid``).

The session runs on the :class:`~jaxhybrid.serving.Engine` with Jamba's plug-in
(:class:`~jaxhybrid.models.JambaModel`) and goes through these phases, each timed on its own
after everything has been compiled once (``compile``):

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

The top layer (core → models → serving → cli): it imports only public names of
:mod:`jaxhybrid`, :mod:`jaxhybrid.models` and :mod:`jaxhybrid.serving`. It needs the ``demo``
extra (Flax, safetensors, matplotlib, tokenizers).
"""

from jaxhybrid.cli._args import DemoInputError, build_parser
from jaxhybrid.cli._main import main
from jaxhybrid.cli._model import TINY_JAMBA
from jaxhybrid.cli._plot import plot_memory
from jaxhybrid.cli._report import DemoResult, PhaseStats
from jaxhybrid.cli._session import run_session

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
