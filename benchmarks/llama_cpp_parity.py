"""Logit parity of the model families with llama.cpp (a peer comparison, not a CI test).

``python -m benchmarks.llama_cpp_parity --llama-cpp-src DIR [--json FILE]``

For each family of :data:`benchmarks.families.FAMILIES` (Nemotron-H, Granite-4.0-H, Falcon-H1,
Bamba, LFM2, Qwen3-Next, Qwen3.5, Qwen3.5-MoE) the tiny seeded test checkpoint
(``tests/family_*.py``, written by transformers, float32) is converted to GGUF f32 by llama.cpp's
own ``convert_hf_to_gguf.py`` and run through llama-cpp-python's C API
(``benchmarks/_llama_cpp.py``: f32 K/V, no flash attention). Compared with
jaxhybrid (the checkpoint loaded by :func:`jaxhybrid.models.load_model`, run by
:func:`jaxhybrid.serving.prefill` on the hybrid memory):

- every token's logits of prompts of 1, 7, 33, 100 and 200 tokens (100 spans six 16-token SSD
  chunks, 200 more than three 64-token GDN chunks): the largest absolute difference per prompt;
- 16 greedy tokens after the 7-token prompt: whether they are the same.

A family the converter or llama.cpp refuses is reported with the reason instead of figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from benchmarks import _llama_cpp as lcpp
from benchmarks.families import FAMILIES
from benchmarks.run import _TESTS
from jaxhybrid.models import load_model
from jaxhybrid.serving import prefill

PROMPT_LENGTHS = (1, 7, 33, 100, 200)

# The test configs (tests/family_*.py) with the options llama.cpp implements, as the published
# checkpoints have them (each found by a failed or differing run, 2026-12-02, llama.cpp of
# llama-cpp-python 0.3.36):
# - no attention / MLP / Mamba projection biases: llama.cpp loads none ("wrong number of
#   tensors"), and its Falcon-H1 converter cannot scale an in_proj bias (IndexError);
# - Nemotron-H's feed-forward layers all MoE: llama.cpp's Nemotron-H is dense or MoE, not both
#   ("-" layers of a MoE model are read as Mamba layers); and the dt clamp inactive: llama.cpp
#   does not apply time_step_limit (with the test's active clamp its logits leave transformers'
#   and ours by up to 2e-2 at 100 tokens, greedy tokens still the same);
# - Bamba with full rotary: llama.cpp ignores partial_rotary_factor (transformers' Bamba default
#   is 0.5, which jaxhybrid follows; with it llama.cpp differs by 0.3 from the second token on).
# - Qwen3-Next's feed-forward layers all MoE and top-k weights renormalised: llama.cpp's
#   qwen3next cannot map a dense MLP beside MoE layers ("Can not map tensor ... mlp.down_proj"),
#   and renormalises whatever norm_topk_prob says (with the test's False its logits differ by 0.8
#   from the first token on);
# - Qwen3.5's M-RoPE sections sized to the tiny heads' 4 rotated features ([1, 1, 0]; llama.cpp
#   asserts that the sections fit, transformers' default [11, 11, 10] does not; for text the
#   three position streams are equal and the sections change nothing);
# - LFM2 without conv bias: the converter squeezes the conv tensors and fails on a bias (the
#   published checkpoints have none).
# Granite-4.0-H: llama.cpp crashes (segfault) building the graph of the tiny test config, sparse
# or dense; not investigated further.
_LLAMA_CPP_CONFIG: dict[str, dict] = {
    "nemotron_h": dict(
        layers_block_type=[
            "linear_attention",
            "moe",
            "full_attention",
            "moe",
            "linear_attention",
            "full_attention",
            "moe",
        ],
        mlp_bias=False,
        time_step_min=1e-4,  # below every softplus(dt): the clamp is inactive
    ),
    "granitemoehybrid": {},
    "falcon_h1": dict(attention_bias=False, mlp_bias=False, mamba_proj_bias=False),
    "lfm2": dict(conv_bias=False),
    "qwen3_next": dict(mlp_only_layers=[], norm_topk_prob=True),
    **{
        variant: dict(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [1, 1, 0],
                "mrope_interleaved": True,
            }
        )
        for variant in ("qwen3_5", "qwen3_5_moe")
    },
    "bamba": dict(
        attention_bias=False,
        mlp_bias=False,
        mamba_proj_bias=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000.0,
            "partial_rotary_factor": 1.0,
        },
    ),
}
N_GREEDY = 16
N_PROMPT = 200


def llama_cpp_checkpoint(family: str, tests, path: Path) -> Path:
    """The family's tiny test checkpoint with :data:`_LLAMA_CPP_CONFIG`, written in ``path``."""
    if family == "nemotron_h":
        return tests.tiny_checkpoint(path, seed=0, **_LLAMA_CPP_CONFIG[family])
    if family.startswith("qwen"):
        return tests.tiny_checkpoint(path, family, seed=0, **_LLAMA_CPP_CONFIG[family])
    return tests.tiny_checkpoint(path, {**tests.HF_CONFIG, **_LLAMA_CPP_CONFIG[family]}, seed=0)


def convert(path: Path, src, out: Path, vocab_size: int, family: str) -> Path:
    """``path`` converted to GGUF f32 by llama.cpp's converter (after jaxhybrid loaded it: the
    converter reads transformers 4's layer type names of the Mamba-2 families, written into
    config.json here; LFM2's are its own). Qwen checkpoints are converted without multi-token
    prediction layers (``--no-mtp``; they have none, which the converter asserts otherwise);
    transformers' Qwen3.5-MoE tokenizer class adds a token to the file's, which the converter
    requires below the vocabulary size, so that tokenizer file holds one token less."""
    config = json.loads((path / "config.json").read_text())
    extra, n_tokens = (), vocab_size
    if family.startswith("qwen"):
        extra = ("--no-mtp",)
        n_tokens -= family == "qwen3_5_moe"
    elif "layer_types" in config and family != "lfm2":
        legacy = {"full_attention": "attention", "linear_attention": "mamba"}
        config["layer_types"] = [legacy.get(t, t) for t in config["layer_types"]]
        (path / "config.json").write_text(json.dumps(config))
    return lcpp.convert(path, src, out, n_tokens, default_pre=True, extra=extra)


class _Ours:
    """The family on jaxhybrid: one compiled prefill (one row of ``N_PROMPT`` tokens)."""

    def __init__(self, path: Path):
        self.plugin, self.params = load_model(path)
        self.cfg = self.plugin.memory_config(kv_size=256, n_seq_max=1)

    def feed(self, mem, tokens: list[int]) -> tuple[np.ndarray, object]:
        row = np.zeros((1, N_PROMPT), np.int32)
        row[0, : len(tokens)] = tokens
        logits, mem, code = prefill(
            self.plugin,
            self.params,
            mem,
            jnp.asarray(row),
            jnp.asarray([len(tokens)], jnp.int32),
            jnp.asarray([0], jnp.int32),
            cfg=self.cfg,
            n_ubatch=128,
            output_all=True,
        )
        if int(code) != jh.DecodeCode.OK:
            raise RuntimeError(f"prefill returned code {int(code)}")
        return np.asarray(logits[0, : len(tokens)]), mem

    def logits(self, prompt: list[int]) -> np.ndarray:
        return self.feed(jh.init_hybrid(self.cfg), prompt)[0]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        logits, mem = self.feed(jh.init_hybrid(self.cfg), prompt)
        out = [int(np.argmax(logits[-1]))]
        for _ in range(n - 1):
            logits, mem = self.feed(mem, [out[-1]])
            out.append(int(np.argmax(logits[-1])))
        return out


def compare(family: str, helper: str, work: Path, src, threads: int) -> dict:
    """One family's figures (or the reason it could not be compared)."""
    tests = importlib.import_module(helper)
    path = llama_cpp_checkpoint(family, tests, work / family)
    ours = _Ours(path)
    vocab = ours.plugin.n_vocab
    try:
        gguf = convert(path, src, work / f"{family}-f32.gguf", vocab, family)
        peer = lcpp.LlamaCppPeer(gguf, n_seq=1, n_ctx_seq=256, threads=threads)
    except Exception as e:  # the converter's or llama.cpp's refusal is the finding
        return dict(family=family, error=f"{type(e).__name__}: {str(e)[-600:]}")
    try:
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]
        diffs, scale = {}, 0.0
        for prompt in prompts:
            mine = ours.logits(prompt)
            diffs[len(prompt)] = float(np.abs(mine - peer.logits(prompt)).max())
            scale = max(scale, float(np.abs(mine).max()))
        ref_greedy = peer.generate([prompts[1]], N_GREEDY)[0][0]
        our_greedy = ours.greedy(prompts[1], N_GREEDY)
    finally:
        peer.close()
    return dict(
        family=family,
        max_abs_logit_diff=diffs,
        max_abs_logit=scale,
        greedy_same=ref_greedy == our_greedy,
        greedy_ours=our_greedy,
        greedy_llama_cpp=ref_greedy,
        llama_cpp=peer.params,
    )


def _in_subprocess(family: str, a: argparse.Namespace) -> dict:
    """``compare`` of one family in a child process (a crash of llama.cpp is reported)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "benchmarks.llama_cpp_parity", "--families", family]
        cmd += ["--llama-cpp-src", str(a.llama_cpp_src), "--threads", str(a.threads)]
        proc = subprocess.run([*cmd, "--json", out.name], capture_output=True, text=True)
        if proc.returncode != 0:
            return dict(family=family, error=f"the process died with exit code {proc.returncode}")
        return json.loads(Path(out.name).read_text())[0]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp_parity", description=__doc__)
    p.add_argument("--llama-cpp-src", required=True, help="llama.cpp tree or unpacked sdist")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--families", nargs="*", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    a = p.parse_args(argv)
    why = lcpp.available(a.llama_cpp_src)
    if why is not None:
        p.error(why)
    sys.path.insert(0, str(_TESTS))
    work = Path(tempfile.mkdtemp(prefix="jaxhybrid-llama-parity-"))
    rows = []
    for family, helper in FAMILIES.items():
        if family not in a.families:
            continue
        if len(a.families) > 1:  # one process per family: llama.cpp may crash on a config
            rows.append(_in_subprocess(family, a))
            continue
        try:
            rows.append(compare(family, helper, work, a.llama_cpp_src, a.threads))
        except Exception:
            rows.append(dict(family=family, error=traceback.format_exc(limit=3)[-800:]))
    print("| family | max abs logit diff per prompt length | max abs logit | greedy 16 same |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | not compared: {r['error'].splitlines()[-1]} | | |")
            continue
        d = ", ".join(f"{n}: {v:.1e}" for n, v in r["max_abs_logit_diff"].items())
        print(f"| {r['family']} | {d} | {r['max_abs_logit']:.2f} | {r['greedy_same']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
