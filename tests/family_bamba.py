"""A tiny seeded Bamba checkpoint written by transformers, and transformers' own outputs on it.

The config exercises every code path of the family: Mamba-2 and attention layers (attention
second and last, so Mamba layers come before, between and after), GQA with 2 query heads per KV
head, partial RoPE (transformers' hardcoded factor 0.5: 4 of 8 features rotated) with a
non-default base, biases on the attention and MLP projections and on the mixer's ``in_proj`` /
``out_proj`` and conv, 2 groups with the grouped gated RMSNorm, and a chunk of 8 so that the
longer prompts span many chunks. Biases off and tied embeddings are Granite's
(``family_granite``).
"""

from __future__ import annotations

import math
import os

import numpy as np

HF_CONFIG = dict(
    vocab_size=160,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=5,
    attn_layer_indices=[1, 4],
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=True,
    mlp_bias=True,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    mamba_n_heads=8,
    mamba_n_groups=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=8,
    mamba_conv_bias=True,
    mamba_proj_bias=True,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def hf_config(**kwargs):
    from transformers import BambaConfig

    base = dict(eos_token_id=None, pad_token_id=None, bos_token_id=None)
    base.update(kwargs)
    return BambaConfig(**base)


def randomize_(model, seed: int) -> None:
    """Overwrites every parameter with seeded values of order-one effect.

    transformers' own init makes most layers near-identities, which would hide mistakes. As
    ``jamba_utils.randomize_``: input projections get gain 0.5 and residual outputs 0.7, so that
    float32 comparisons measure the implementation rather than a chaotic network's conditioning.
    Mamba-2's per-head ``dt_bias`` is drawn around -2 (time steps ~0.1) and ``A_log`` around
    ``log(1..n_heads)``. Also used for Granite-4.0-H (fused and stacked expert tensors, whose
    fan-in is their last axis).
    """
    import torch

    outputs = (
        "o_proj.weight",
        "out_proj.weight",
        "down_proj.weight",
        "experts.down_proj",
        "output_linear.weight",
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            fan_in = math.sqrt(p.shape[-1])
            if name.endswith("A_log"):
                base = torch.log(torch.arange(1, p.shape[0] + 1, dtype=torch.float32))
                value = base + 0.3 * noise
            elif name.endswith("dt_bias"):
                value = -2.0 + 0.5 * noise
            elif name.endswith("norm.weight") or name.endswith(".D"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("conv1d.weight"):
                value = noise / fan_in
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                value = noise / fan_in
            elif name.endswith(outputs):
                value = 0.7 * noise / fan_in
            else:  # input projections [.., out, in], stacked experts and the router
                value = 0.5 * noise / fan_in
            p.copy_(value.to(p.dtype))


def tiny_checkpoint(path, params: dict | None = None, *, seed: int = 0):
    """Builds ``BambaForCausalLM`` (float32, seeded, randomized) and saves it in ``path``.

    Returns:
        ``path``.
    """
    import torch
    from transformers import BambaForCausalLM

    torch.manual_seed(seed)
    model = BambaForCausalLM(hf_config(**(HF_CONFIG if params is None else params)))
    model = model.float().eval()
    randomize_(model, seed)
    model.save_pretrained(os.fspath(path))
    return path


_MODELS: dict[str, object] = {}


def hf_model(path):
    """transformers' model of a checkpoint directory (cached per path), float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    key = os.fspath(path)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def hf_logits(path, ids) -> np.ndarray:
    """transformers' float32 logits ``[len(ids), vocab]`` for one prompt (no cache)."""
    import torch

    with torch.no_grad():
        out = hf_model(path)(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(path, ids, n_new: int) -> list[int]:
    """transformers' ``generate(do_sample=False)`` tokens after the prompt."""
    import torch

    with torch.no_grad():
        out = hf_model(path).generate(
            torch.tensor([list(ids)], dtype=torch.long),
            max_new_tokens=n_new,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


class HybridRunner:
    """Runs a model plug-in through the hybrid memory with one compiled prefill: every call feeds
    ``n_seq`` rows padded to ``n_prompt`` tokens (an empty row is skipped), in ubatches of
    ``n_ubatch``, continuing what the memory holds, and returns every token's logits."""

    def __init__(self, plugin, params, *, n_seq=4, n_prompt=100, n_ubatch=128, kv_size=256):
        import jaxhybrid as jh

        self.plugin, self.params = plugin, params
        self.n_seq, self.n_prompt, self.n_ubatch = n_seq, n_prompt, n_ubatch
        self.cfg = plugin.memory_config(kv_size=kv_size, n_seq_max=n_seq)
        self.new_memory = lambda: jh.init_hybrid(self.cfg)

    def __call__(self, mem, rows):
        """``(logits [n_seq, n_prompt, vocab] as NumPy, mem)`` after feeding ``rows``."""
        import jax.numpy as jnp

        from jaxhybrid.serving import prefill

        toks = np.zeros((self.n_seq, self.n_prompt), np.int32)
        lens = np.zeros(self.n_seq, np.int32)
        for i, row in enumerate(rows):
            toks[i, : len(row)] = row
            lens[i] = len(row)
        logits, mem, code = prefill(
            self.plugin,
            self.params,
            mem,
            jnp.asarray(toks),
            jnp.asarray(lens),
            jnp.arange(self.n_seq, dtype=jnp.int32),
            cfg=self.cfg,
            n_ubatch=self.n_ubatch,
            output_all=True,
        )
        assert int(code) == 0, int(code)
        return np.asarray(logits), mem

    def greedy(self, prompts, n_new: int) -> list[list[int]]:
        """Greedy continuation of every prompt (decoded together, one token per sequence and
        step, through the same compiled prefill)."""
        logits, mem = self(self.new_memory(), prompts)
        out = [[int(np.argmax(logits[i, len(p) - 1]))] for i, p in enumerate(prompts)]
        for _ in range(n_new - 1):
            logits, mem = self(mem, [[g[-1]] for g in out])
            for i, g in enumerate(out):
                g.append(int(np.argmax(logits[i, 0])))
        return out


def copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    """Copies a single-file checkpoint, editing its tensor dict and/or its config dict."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if edit_config is not None:
        edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    if edit_tensors is None:
        shutil.copy(os.path.join(src, "model.safetensors"), dst)
    else:
        tensors = load_file(os.path.join(src, "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _fresh_memory_class():
    """The minimal in-test :class:`~jaxhybrid.models.ModelMemory` of :func:`fresh_logits`: one
    class for the process (a pytree type), so that jitted forwards of equal shapes are compiled
    once."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class FreshMemory:
        seq_set: jax.Array
        pos: jax.Array
        n_sets: int = dataclasses.field(metadata=dict(static=True))
        conv_shape: tuple = dataclasses.field(metadata=dict(static=True))
        ssm_shape: tuple = dataclasses.field(metadata=dict(static=True))

        def kv(self, attn_layer, k, v):
            del attn_layer
            valid = self.seq_set >= 0
            mask = (
                valid[:, None]
                & (self.seq_set[:, None] == self.seq_set[None, :])
                & (self.pos[None, :] <= self.pos[:, None])
            )
            return k, v, mask, self

        def ssm_states(self, mamba_layer):
            del mamba_layer
            return (
                jnp.zeros((self.n_sets, *self.conv_shape), jnp.float32),
                jnp.zeros((self.n_sets, *self.ssm_shape), jnp.float32),
            )

        def set_ssm_states(self, mamba_layer, conv, ssm, *, conv_tok=None, ssm_tok=None):
            return self

    return FreshMemory


_FRESH: dict = {}


def fresh_logits(forward, model, prompts, *, conv_shape, ssm_shape, n_slots=None):
    """Every token's logits of ``prompts`` (fresh sequences) run as the seq sets of one ubatch
    against a minimal in-test :class:`~jaxhybrid.models.ModelMemory`: attention reads the
    ubatch's own K/V (same set, earlier or equal position), every set starts from zero states.
    Compiles only the model's forward (cheap; once per ``forward``, shapes and number of
    prompts), for configs whose memory plumbing another test already covers.

    Returns:
        One ``[len(prompt), vocab]`` NumPy array per prompt.
    """
    import jax
    import jax.numpy as jnp

    if "memory" not in _FRESH:
        _FRESH["memory"] = _fresh_memory_class()
    if forward not in _FRESH:
        _FRESH[forward] = jax.jit(forward)
    n = sum(len(p) for p in prompts)
    n_slots = n if n_slots is None else n_slots
    toks, sets, pos = (np.zeros(n_slots, np.int32) for _ in range(3))
    sets[:] = -1
    at = 0
    for s, p in enumerate(prompts):
        toks[at : at + len(p)], sets[at : at + len(p)] = p, s
        pos[at : at + len(p)] = np.arange(len(p))
        at += len(p)
    mem = _FRESH["memory"](
        jnp.asarray(sets), jnp.asarray(pos), len(prompts), tuple(conv_shape), tuple(ssm_shape)
    )
    logits, _ = _FRESH[forward](
        model, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(sets >= 0), mem
    )
    logits = np.asarray(logits)
    out, at = [], 0
    for p in prompts:
        out.append(logits[at : at + len(p)])
        at += len(p)
    return out


def fresh_greedy(forward, model, prompt, n_new: int, *, conv_shape, ssm_shape) -> list[int]:
    """Greedy continuation of ``prompt`` by :func:`fresh_logits` of the whole sequence at every
    step (no memory; one compilation for every step: the slots are padded to the final length)."""
    seq = list(prompt)
    n_slots = len(prompt) + n_new
    for _ in range(n_new):
        logits = fresh_logits(
            forward, model, [seq], conv_shape=conv_shape, ssm_shape=ssm_shape, n_slots=n_slots
        )[0]
        seq.append(int(np.argmax(logits[-1])))
    return seq[len(prompt) :]
