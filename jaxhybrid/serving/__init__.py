"""Serving on jaxhybrid memory, generic over any model plug-in (:class:`jaxhybrid.HybridModel`).

- :func:`generate`: several sequences at once in one jitted call (prefill, then sampling and
  decoding in a ``lax.while_loop``); :func:`prefill` and :func:`decode_tokens` are its jitted
  building blocks; :func:`sample` the per-sequence sampler.
- :class:`Engine`: continuous batching on the host, requests joining and leaving between steps,
  forks, cancels, context shifts, save and restore.
- :func:`speculative_generate`: greedy speculative decoding with exact rollback of the rejected
  drafts.
- :func:`memory_usage`: what a memory holds, per sequence and in total.

The layer above the models: it imports only public names of :mod:`jaxhybrid`; a model family
enters through its plug-in (e.g. :class:`jaxhybrid.models.JambaModel`).
"""

from jaxhybrid.serving._engine import Engine, EngineError, Request, SavedRequest
from jaxhybrid.serving._generate import GenerateOutput, decode_tokens, generate, prefill
from jaxhybrid.serving._sampling import SamplingParams, sample
from jaxhybrid.serving._speculative import SpeculativeOutput, speculative_generate
from jaxhybrid.serving._usage import MemoryUsage, memory_usage

__all__ = [
    "Engine",
    "EngineError",
    "GenerateOutput",
    "MemoryUsage",
    "Request",
    "SamplingParams",
    "SavedRequest",
    "SpeculativeOutput",
    "decode_tokens",
    "generate",
    "memory_usage",
    "prefill",
    "sample",
    "speculative_generate",
]
