"""Decode of the Mamba-2 families (``python -m benchmarks --only families``).

For each Mamba-2 family of :mod:`jaxhybrid.models` (Nemotron-H, Granite-4.0-H, Falcon-H1, Bamba)
the tiny seeded test checkpoint (``tests/family_*.py``, written by transformers, float32) with the
options llama.cpp implements (``benchmarks/llama_cpp_parity.py``: no projection biases, ...) is
loaded with :func:`jaxhybrid.models.load_model` and decoded greedily by every peer, measured as
``benchmarks/run.py`` measures the Jamba (peers interleaved round by round, min over rounds):

- ``jaxhybrid``: :func:`jaxhybrid.decode` with the family's ``plugin.step_fn(cfg)`` in the jitted
  greedy loop of :func:`benchmarks.run.jh_decode` (prompts in one ubatch, then one token per
  sequence per step); ``(T(n) - T(1)) / (n - 1)`` of decode-only loops. The memory is
  ``plugin.memory_config(kv_size=context * seqs, n_seq_max=seqs)`` (one unified stream) with the
  same ``context`` per sequence as the Jamba rows (4096): attention runs over the used cells only,
  so the tiny models do not pay for the empty cells.
- ``transformers``: the family's ``generate`` (greedy, same checkpoint), timed whole: ``n_new`` and
  1 new tokens, the difference over ``n_new - 1`` steps; one round.
- ``llama.cpp`` (with ``--llama-cpp-src``): the checkpoint converted to GGUF f32 by llama.cpp's
  converter, decoded in parallel sequences (``benchmarks/_llama_cpp.py``), decode steps timed as
  jaxhybrid's; not for Granite-4.0-H, whose tiny config crashes llama.cpp.

``same tokens`` says whether a peer's greedy tokens equal jaxhybrid's (reported, not asserted: a
near tie of two logits may flip a token in float32).
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import _llama_cpp as lcpp
from benchmarks.run import _TESTS, Ctx, _hf_peer, _prompts, decode_rounds, jh_decode_time
from jaxhybrid.models import load_model

# model_type -> the test helper module (tests/) writing its tiny checkpoint.
FAMILIES: dict[str, str] = {
    "nemotron_h": "family_nemotron_h",
    "granitemoehybrid": "family_granite",
    "falcon_h1": "family_falcon_h1",
    "bamba": "family_bamba",
}


def _first_diff(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first step (token index) where any sequence of ``a`` and ``b`` differs, or None."""
    diff = np.flatnonzero((np.asarray(a) != np.asarray(b)).any(axis=0))
    return int(diff[0]) if diff.size else None


# llama.cpp segfaults on this family's tiny test config (benchmarks/llama_cpp_parity.py).
_LLAMA_CPP_CRASHES = ("granitemoehybrid",)


def bench_families(ctx: Ctx) -> list[dict]:
    """Decode steps of jaxhybrid, transformers and llama.cpp (when available) on every Mamba-2
    family's tiny checkpoint."""
    from benchmarks import llama_cpp_parity as parity  # it imports FAMILIES from here

    a = ctx.args
    sys.path.insert(0, str(_TESTS))
    work = Path(tempfile.mkdtemp(prefix="families-", dir=ctx.ckpt.parent))
    rows = []
    n_new = a.new_tokens
    for family, helper in FAMILIES.items():
        tests = importlib.import_module(helper)
        path = parity.llama_cpp_checkpoint(family, tests, work / family)
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        assert model_type == family, (family, model_type)
        plugin, params = load_model(path)
        gguf = None
        if ctx.llama_skip is None and family not in _LLAMA_CPP_CRASHES:
            gguf = parity.convert(path, a.llama_cpp_src, work / f"{family}.gguf", plugin.n_vocab)
        for n_seq in a.decode_seqs:
            prompts = _prompts(n_seq, a.prompt, plugin.n_vocab, seed=n_seq)
            cfg = plugin.memory_config(kv_size=a.context * n_seq, n_seq_max=n_seq)

            def jh_loop(n, cfg=cfg, prompts=prompts, n_seq=n_seq, plugin=plugin, params=params):
                return jh_decode_time(params, cfg, prompts, n, n_ubatch=n_seq, plugin=plugin)

            steps = {"jaxhybrid": jh_loop}
            whole = {}
            if not a.no_transformers:
                whole["transformers"] = _hf_peer(ctx, prompts, hf=tests.hf_model(path))
            llama = None
            if gguf is not None:
                llama = lcpp.LlamaCppPeer(
                    gguf, n_seq=n_seq, n_ctx_seq=a.context, threads=a.threads, n_ubatch=512
                )

                def llama_run(n, prompts=prompts, llama=llama):
                    out, dt = llama.generate(prompts.tolist(), n + 1)
                    return dt, np.asarray(out)

                steps["llama.cpp"] = llama_run
            step, rounds, tokens = decode_rounds(steps, whole, n_new, a.rounds)
            if llama is not None:
                llama.close()
            ref = tokens["jaxhybrid"]
            for name in (*steps, *whole):
                rows.append(
                    dict(
                        family=family,
                        n_seq=n_seq,
                        peer=name,
                        timed="decode steps" if name in steps else "whole generate",
                        ms_per_step=step[name] * 1e3,
                        tok_per_s=n_seq / step[name],
                        spread=rounds.spread(name + "/n"),
                        rounds=len(rounds.times[name + "/n"]),
                        jaxhybrid_speedup=step[name] / step["jaxhybrid"],
                        same_tokens=bool(np.array_equal(tokens[name], ref)),
                        first_diff_step=_first_diff(tokens[name], ref),
                    )
                )
    if ctx.llama_skip is None:
        ctx.results["skipped"].append(
            "llama.cpp rows of granitemoehybrid: llama.cpp crashes on its tiny test config "
            "(benchmarks/llama_cpp_parity.py)"
        )
    return rows
