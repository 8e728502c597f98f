"""Tiny seeded Jamba checkpoints written by transformers, and helpers to run them through the
memory protocol."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxhybrid.cli import TINY_JAMBA
from jaxhybrid.models import DenseMemory, forward, init_dense_memory

# Attention at layers 1 and 3, MoE (4 experts, top 2) at layers 1 and 3, GQA 4 query / 2 KV heads:
# the demo's tiny Jamba with transformers' default init range (init_jamba draws from it).
MOE_GQA = {k: v for k, v in TINY_JAMBA.items() if k != "initializer_range"}
MOE_GQA["tie_word_embeddings"] = False

# Dense MLPs, multi-head attention (no grouping), tied embeddings, the other bias choices,
# attention first (offset 0) and a wider conv.
DENSE_MHA = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    attn_layer_period=3,
    attn_layer_offset=0,
    num_experts=1,
    mamba_d_state=8,
    mamba_d_conv=3,
    mamba_expand=2,
    mamba_dt_rank=6,
    mamba_conv_bias=False,
    mamba_proj_bias=True,
    tie_word_embeddings=True,
)


def hf_config(**kwargs):
    from transformers import JambaConfig

    base = dict(use_mamba_kernels=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    base.update(kwargs)
    return JambaConfig(**base)


def randomize_(model, seed: int) -> None:
    """Overwrites every parameter with seeded values of order-one effect.

    transformers' own init makes most layers near-identities, which would hide mistakes. Fully
    unit-gain random projections, on the other hand, make a chaotic network that turns a 1-ulp
    input change into ~1e-5 logit changes; input projections get gain 0.5 and residual outputs
    0.7 so that float32 comparisons measure the implementation, not the conditioning.
    """
    import torch

    outputs = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            fan_in = math.sqrt(p.shape[-1])
            if name.endswith("A_log"):
                n = p.shape[-1]
                base = torch.log(torch.arange(1, n + 1, dtype=torch.float32))[None, :]
                value = base + 0.3 * noise
            elif name.endswith("norm.weight") or name.endswith(".D"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("dt_proj.bias"):
                value = -2.0 + 0.5 * noise
            elif name.endswith("conv1d.weight"):
                value = noise / fan_in
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                # Logits of order one, tied or not.
                value = noise / fan_in
            elif name.endswith(outputs):
                value = 0.7 * noise / fan_in
            else:  # input projections [.., out, in], stacked experts and the router
                value = 0.5 * noise / fan_in
            p.copy_(value.to(p.dtype))


def make_checkpoint(path, params: dict, *, seed: int = 0, max_shard_size=None):
    """Builds ``JambaForCausalLM`` with seeded random weights and saves it in ``path``."""
    import torch
    from transformers import JambaForCausalLM

    torch.manual_seed(seed)
    model = JambaForCausalLM(hf_config(**params)).eval()
    randomize_(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kwargs)
    return model


def hf_logits(hf_model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = hf_model(torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(hf_model, prompt, n_new: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([list(prompt)], dtype=torch.long),
            max_new_tokens=n_new,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


_step = jax.jit(forward)
_bind = jax.jit(DenseMemory.bind)


def run_ubatches(model, mem, ubatches):
    """Runs ``[(tokens, seq_ids, positions), ...]`` (each padded to the memory's ``n_ubatch``
    with seq id -1) and returns the logits per (seq, pos) and the memory."""
    n_ubatch = mem.tok_seq.shape[0]
    out = {}
    for tokens, seq_ids, pos in ubatches:
        n = len(tokens)
        assert n <= n_ubatch
        pad = n_ubatch - n
        tok = jnp.asarray(np.concatenate([tokens, np.zeros(pad, np.int64)]), jnp.int32)
        sid = jnp.asarray(np.concatenate([seq_ids, -np.ones(pad, np.int64)]), jnp.int32)
        p = jnp.asarray(np.concatenate([pos, np.zeros(pad, np.int64)]), jnp.int32)
        mem = _bind(mem, sid, p)
        logits, mem = _step(model, tok, mem.tok_pos, mem.valid, mem)
        logits = np.asarray(logits)
        for t in range(n):
            out[(int(seq_ids[t]), int(pos[t]))] = logits[t]
    return out, mem


def seq_logits(out, seq: int, length: int) -> np.ndarray:
    return np.stack([out[(seq, p)] for p in range(length)])


def prefill_plan(prompts, chunks, n_ubatch):
    """Ubatches of at most ``n_ubatch`` tokens that feed ``prompts`` (lists of tokens, sequence
    ``s`` = ``prompts[s]``); every ubatch takes a chunk of ``chunks(seq, start)`` tokens from each
    unfinished sequence while room is left."""
    done = [0] * len(prompts)
    plan = []
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        toks, sids, poss = [], [], []
        for s, prompt in enumerate(prompts):
            room = n_ubatch - len(toks)
            if done[s] >= len(prompt) or room == 0:
                continue
            n = min(chunks(s, done[s]), len(prompt) - done[s], room)
            toks += prompt[done[s] : done[s] + n]
            sids += [s] * n
            poss += list(range(done[s], done[s] + n))
            done[s] += n
        plan.append((np.array(toks), np.array(sids), np.array(poss)))
    return plan


def dense_greedy(config, model, prompt, n_new):
    """Greedy tokens through DenseMemory, one token per step (a reference that uses neither the
    hybrid memory nor the serving layer)."""
    mem = new_memory(config, n_seq_max=1, n_ctx=32, n_ubatch=16)
    toks = list(prompt)
    out, mem = run_ubatches(
        model, mem, [(np.array(toks), np.zeros(len(toks)), np.arange(len(toks)))]
    )
    new = []
    for _ in range(n_new):
        t = int(np.argmax(out[(0, len(toks) - 1)]))
        new.append(t)
        toks.append(t)
        out, mem = run_ubatches(model, mem, [(np.array([t]), np.array([0]), [len(toks) - 1])])
    return new


def new_memory(config, *, n_seq_max=4, n_ctx=160, n_ubatch=16):
    return init_dense_memory(config, n_seq_max=n_seq_max, n_ctx=n_ctx, n_ubatch=n_ubatch)
