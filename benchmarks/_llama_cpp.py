"""The llama.cpp peer: the same Jamba checkpoint converted to GGUF f32 by llama.cpp's own
converter, decoded through llama-cpp-python's low-level C API with parallel sequences.

Setup (recorded in every result): f32 weights and f32 K/V (``type_k = type_v = GGML_TYPE_F32``),
flash attention disabled, ``n_threads = n_threads_batch`` = the benchmark's thread count, one
sequence id per sequence (``n_seq_max``), ``n_ctx = context * n_seq`` cells either in one unified
KV stream (``kv_unified``) or in one stream of ``context`` cells per sequence (llama.cpp's
default), greedy argmax of the returned logits on the host (llama.cpp's own samplers do the same
work). llama-cpp-python is an optional benchmark dependency (extra ``bench``); when it or the
converter is missing, :func:`available` says why and the peer is skipped.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_CONVERTER = "convert_hf_to_gguf.py"


def _llama():
    import llama_cpp

    return llama_cpp


def find_converter(src: str | os.PathLike | None) -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py`` under ``src`` (a llama.cpp tree, or an unpacked
    llama-cpp-python sdist with ``vendor/llama.cpp``), else None."""
    if src is None:
        return None
    root = Path(src)
    for cand in (root / _CONVERTER, root / "vendor" / "llama.cpp" / _CONVERTER):
        if cand.is_file():
            return cand
    return None


def available(src: str | os.PathLike | None) -> str | None:
    """None when the llama.cpp peer can run, else the reason it is skipped."""
    try:
        _llama()
    except ImportError:
        return (
            "llama-cpp-python is not installed (pip install '.[bench]', built from source: "
            "see README 'Benchmarks')"
        )
    if find_converter(src) is None:
        return (
            f"llama.cpp's {_CONVERTER} not found (pass --llama-cpp-src DIR: a llama.cpp checkout "
            "or the unpacked llama-cpp-python sdist)"
        )
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package (needed by llama.cpp's converter) is not installed"
    return None


def write_tokenizer(ckpt: Path, vocab_size: int, *, one_merge: bool = False) -> None:
    """A minimal Llama-style BPE ``tokenizer.json`` of ``vocab_size`` tokens: the converter
    needs a vocabulary; the benchmark feeds token ids directly and never tokenizes text.
    ``one_merge``: the last token is ``"ab"``, the merge of ``"a"`` and ``"b"`` (llama.cpp refuses
    a GPT-2 style vocabulary without merges)."""
    from tokenizers import Tokenizer, decoders, models

    names = ["<unk>", "<s>", "</s>", *(chr(c) for c in range(33, 127)), "\u2581"]
    names += [f"<t{i}>" for i in range(vocab_size)]
    names = names[:vocab_size]
    merges = []
    if one_merge:
        names[-1], merges = "ab", [("a", "b")]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.save(str(ckpt / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))


# Runs the converter with its BPE pre-tokenizer check answered "default": the families that
# llama.cpp reads with a GPT-2 style vocabulary identify the pre-tokenizer by hashing how the
# tokenizer splits a test text, which the synthetic vocabulary of write_tokenizer matches to no
# known model. The benchmarks feed token ids and never tokenize text, so the name is unused.
_DEFAULT_PRE = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(
    ckpt: Path, src, out: Path, vocab_size: int, *, default_pre: bool = False, extra=()
) -> Path:
    """Converts the Hugging Face checkpoint ``ckpt`` to GGUF f32 with llama.cpp's converter
    (``default_pre``: with the BPE pre-tokenizer named "default", see ``_DEFAULT_PRE``;
    ``extra``: more converter arguments)."""
    write_tokenizer(ckpt, vocab_size, one_merge=default_pre)
    converter = find_converter(src)
    cmd = [sys.executable, str(converter), str(ckpt), "--outtype", "f32", "--outfile", str(out)]
    cmd += list(extra)
    if default_pre:
        cmd[1:1] = ["-c", _DEFAULT_PRE]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=converter.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{_CONVERTER} failed:\n{proc.stderr[-2000:]}")
    return out


class LlamaCppPeer:
    """A llama.cpp context over the GGUF model with ``n_seq`` parallel sequences."""

    def __init__(
        self,
        gguf_path: Path,
        *,
        n_seq: int,
        n_ctx_seq: int,
        threads: int,
        n_batch: int = 512,
        n_ubatch: int = 512,
        unified: bool = True,
    ):
        L = _llama()
        self.L = L
        L.llama_backend_init()
        L.llama_log_set(_silence, ctypes.c_void_p(0))
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx_seq * n_seq
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch
        p.n_seq_max = n_seq
        p.n_threads = threads
        p.n_threads_batch = threads
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = L.GGML_TYPE_F32
        p.type_v = L.GGML_TYPE_F32
        p.kv_unified = unified
        p.no_perf = True
        self.params = dict(
            n_ctx=int(p.n_ctx),
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_seq_max=n_seq,
            threads=threads,
            flash_attn="disabled",
            type_k="f32",
            type_v="f32",
            kv_unified=unified,
            version=getattr(L, "__version__", "?"),
        )
        self.ctx = L.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(max(n_batch, n_seq), 0, 1)
        self.n_batch = n_batch

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, tokens, seqs, pos, outputs) -> list[np.ndarray]:
        L, b = self.L, self.batch
        n = len(tokens)
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = int(pos[i])
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(seqs[i])
            b.logits[i] = 1 if outputs[i] else 0
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = []
        for i in range(n):
            if outputs[i]:
                ptr = L.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return rows

    def logits(self, prompt: list[int]) -> np.ndarray:
        """Logits of every prompt token (sequence 0), for the parity check."""
        self.clear()
        n = len(prompt)
        rows = self._decode(prompt, [0] * n, range(n), [True] * n)
        return np.stack(rows)

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        """Decodes every prompt (sequence ``i`` = prompt ``i``), in batches of ``n_batch``;
        returns the greedy next token of each."""
        toks, seqs, pos, outs = [], [], [], []
        for s, p in enumerate(prompts):
            for j, t in enumerate(p):
                toks.append(t), seqs.append(s), pos.append(j), outs.append(j == len(p) - 1)
        nxt = []
        for start in range(0, len(toks), self.n_batch):
            sl = slice(start, start + self.n_batch)
            rows = self._decode(toks[sl], seqs[sl], pos[sl], outs[sl])
            nxt += [int(np.argmax(r)) for r in rows]
        return nxt

    def generate(self, prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], float]:
        """Greedy decoding of ``n_new`` tokens for every prompt in parallel sequences; returns
        the tokens and the seconds spent in the decode steps (prefill excluded)."""
        self.clear()
        cur = self.prefill(prompts)
        out = [[t] for t in cur]
        n_seq = len(prompts)
        pos = [len(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            rows = self._decode(cur, list(range(n_seq)), pos, [True] * n_seq)
            cur = [int(np.argmax(r)) for r in rows]
            for s in range(n_seq):
                out[s].append(cur[s])
                pos[s] += 1
        return out, time.perf_counter() - t0


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _silence(level, text, user_data):
    del level, text, user_data
