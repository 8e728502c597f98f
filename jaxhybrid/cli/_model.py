"""The demo's model: the default tiny Jamba or a ``--model DIR`` checkpoint, its tokenizer and
the session's prompts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

import jaxhybrid as jh
import jaxhybrid.models as jm
from jaxhybrid.cli._args import DemoInputError
from jaxhybrid.models import (
    SUPPORTED_MODEL_TYPES,
    FlaxHybridModel,
    JambaConfig,
    JambaModel,
    init_jamba,
    model_plugin,
)

__all__ = ["TINY_JAMBA", "DemoModel", "load_model", "make_prompts", "model_config"]

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


@dataclasses.dataclass
class DemoModel:
    """The session's model: its plug-in for :mod:`jaxhybrid.serving` and its parameters (the
    model module itself), with its tokenizer and stop tokens."""

    config: object
    plugin: FlaxHybridModel
    params: object
    tokenizer: object | None
    stop_tokens: tuple[int, ...]
    name: str


def model_config(args: argparse.Namespace) -> tuple[FlaxHybridModel, tuple[int, ...]]:
    """The model's plug-in (its ``config`` attribute is the family's config) and stop tokens,
    read and checked without loading any weights."""
    if args.model is None:
        return JambaModel(JambaConfig(**TINY_JAMBA, dtype=args.dtype)), ()
    path = args.model
    if not os.path.isdir(path):
        raise DemoInputError(f"--model {path}: no such directory")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_file):
        raise DemoInputError(
            f"--model {path}: no config.json; expected a Hugging Face checkpoint directory "
            f"(config.json and *.safetensors) of one of: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        plugin = model_plugin(path, dtype=args.dtype)
        # from_hf has checked that config.json is a regular file holding a JSON object.
        with open(cfg_file, "rb") as f:
            hf = json.load(f)
    except (jh.JaxHybridError, OSError, ValueError) as e:
        raise DemoInputError(f"--model {path}: {e}") from e
    return plugin, _stop_tokens(path, hf, plugin.n_vocab)


def _stop_tokens(path: str, hf: dict, n_vocab: int) -> tuple[int, ...]:
    """``eos_token_id`` of config.json (an int, a list of ints or null), never converted."""
    eos = hf.get("eos_token_id") if isinstance(hf, dict) else None
    if eos is None:
        return ()
    items = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        raise DemoInputError(
            f"--model {path}: config.json eos_token_id must be an int or a list of ints, "
            f"got {eos!r}"
        )
    for t in items:
        if not 0 <= t < n_vocab:
            raise DemoInputError(
                f"--model {path}: config.json eos_token_id {t} is outside the vocabulary "
                f"[0, {n_vocab})"
            )
    return tuple(items)


def load_model(args: argparse.Namespace) -> DemoModel:
    """The tiny seeded Jamba, or the checkpoint of ``--model DIR`` of any supported family
    (with its tokenizer)."""
    plugin, stop = model_config(args)
    if args.model is None:
        params = init_jamba(plugin.config, seed=args.seed)
        name = f"tiny Jamba (seeded random weights, {args.dtype})"
        return DemoModel(plugin.config, plugin, params, None, (), name)
    path = args.model
    tokenizer = _load_tokenizer(path)
    try:
        plugin, params = jm.load_model(path, dtype=args.dtype)
    except (jh.JaxHybridError, OSError) as e:
        raise DemoInputError(f"--model {path}: {e}") from e
    name = f"{path} ({type(plugin.config).__name__.removesuffix('Config')}, {args.dtype})"
    return DemoModel(plugin.config, plugin, params, tokenizer, stop, name)


def _load_tokenizer(path: str):
    """The checkpoint's ``tokenizer.json``, or None when it has none."""
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.lexists(tok_file):
        return None
    if not os.path.isfile(tok_file):  # a FIFO would block the reader
        raise DemoInputError(f"--model {path}: tokenizer.json is not a regular file")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise DemoInputError(
            f"--model {path} has a tokenizer.json but the 'tokenizers' package is missing "
            "(python -m pip install 'jaxhybrid[demo]')"
        ) from e
    try:
        return Tokenizer.from_file(tok_file)
    except Exception as e:  # the Rust library raises its own exception type
        raise DemoInputError(f"--model {path}: cannot read tokenizer.json: {e}") from e


def make_prompts(args: argparse.Namespace, mdl: DemoModel, n: int) -> list[list[int]]:
    """``n`` prompts: the texts (tokenized) or seeded random ids of varying lengths."""
    if mdl.tokenizer is not None:
        return _text_prompts(args.prompt or _TEXTS, mdl, n)
    if args.prompt:
        where = "the default tiny model" if args.model is None else f"--model {args.model}"
        raise DemoInputError(f"--prompt needs a tokenizer, and {where} has no tokenizer.json")
    rng = np.random.default_rng(args.seed)
    lo = max(1, args.prompt_len // 2)
    lens = [args.prompt_len, *rng.integers(lo, args.prompt_len + 1, size=n - 1)]
    return [rng.integers(0, mdl.config.vocab_size, size=int(k)).tolist() for k in lens]


def _text_prompts(texts: list[str], mdl: DemoModel, n: int) -> list[list[int]]:
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
