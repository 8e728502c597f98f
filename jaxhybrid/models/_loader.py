"""Loading Jamba weights from a Hugging Face checkpoint directory.

The directory holds ``config.json`` and one or several ``*.safetensors`` files (a sharded
checkpoint lists its files in ``model.safetensors.index.json``). Tensor names and layouts are those
of ``JambaForCausalLM.save_pretrained`` and of the published AI21 checkpoints: one tensor per
expert (``feed_forward.experts.{e}.gate_proj.weight``), ``nn.Linear`` weights ``[out, in]``, conv
weights ``[d_inner, 1, d_conv]``. Every tensor is checked by name and shape before anything is
converted.
"""

from __future__ import annotations

import glob
import json
import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

import jaxhybrid as jh
from jaxhybrid.models.jamba import Jamba, JambaConfig

__all__ = ["hf_tensor_shapes", "load_jamba"]


class _Slot(NamedTuple):
    path: tuple  # attribute path of the nnx.Param inside Jamba
    shape: tuple[int, ...]  # shape in the checkpoint
    kind: str  # "copy", "t" (transpose 2-D), "conv"
    expert: int | None  # index into the stacked expert axis


def _slots(config: JambaConfig) -> dict[str, _Slot]:
    c = config
    h, f, d_in, n = c.hidden_size, c.intermediate_size, c.d_inner, c.mamba_d_state
    r, hd = c.mamba_dt_rank, c.head_dim
    out: dict[str, _Slot] = {
        "model.embed_tokens.weight": _Slot(("embed_tokens",), (c.vocab_size, h), "copy", None)
    }

    def lin(name, path, d_out, d_in_, bias=False):
        out[f"{name}.weight"] = _Slot((*path, "kernel"), (d_out, d_in_), "t", None)
        if bias:
            out[f"{name}.bias"] = _Slot((*path, "bias"), (d_out,), "copy", None)

    for i, kind in enumerate(c.layer_types):
        p, path = f"model.layers.{i}", ("layers", i)
        out[f"{p}.input_layernorm.weight"] = _Slot(
            (*path, "input_layernorm", "weight"), (h,), "copy", None
        )
        out[f"{p}.pre_ff_layernorm.weight"] = _Slot(
            (*path, "pre_ff_layernorm", "weight"), (h,), "copy", None
        )
        if kind == "attention":
            a, apath = f"{p}.self_attn", (*path, "self_attn")
            lin(f"{a}.q_proj", (*apath, "q_proj"), c.num_attention_heads * hd, h)
            lin(f"{a}.k_proj", (*apath, "k_proj"), c.num_key_value_heads * hd, h)
            lin(f"{a}.v_proj", (*apath, "v_proj"), c.num_key_value_heads * hd, h)
            lin(f"{a}.o_proj", (*apath, "o_proj"), h, c.num_attention_heads * hd)
        else:
            m, mpath = f"{p}.mamba", (*path, "mamba")
            lin(f"{m}.in_proj", (*mpath, "in_proj"), 2 * d_in, h, c.mamba_proj_bias)
            out[f"{m}.conv1d.weight"] = _Slot(
                (*mpath, "conv_weight"), (d_in, 1, c.mamba_d_conv), "conv", None
            )
            if c.mamba_conv_bias:
                out[f"{m}.conv1d.bias"] = _Slot((*mpath, "conv_bias"), (d_in,), "copy", None)
            lin(f"{m}.x_proj", (*mpath, "x_proj"), r + 2 * n, d_in)
            lin(f"{m}.dt_proj", (*mpath, "dt_proj"), d_in, r, True)
            out[f"{m}.A_log"] = _Slot((*mpath, "A_log"), (d_in, n), "copy", None)
            out[f"{m}.D"] = _Slot((*mpath, "D"), (d_in,), "copy", None)
            lin(f"{m}.out_proj", (*mpath, "out_proj"), h, d_in, c.mamba_proj_bias)
            for norm, dim in (("dt_layernorm", r), ("b_layernorm", n), ("c_layernorm", n)):
                out[f"{m}.{norm}.weight"] = _Slot((*mpath, norm, "weight"), (dim,), "copy", None)
        ff, fpath = f"{p}.feed_forward", (*path, "feed_forward")
        if c.moe_layers[i]:
            out[f"{ff}.router.weight"] = _Slot((*fpath, "router"), (c.num_experts, h), "t", None)
            for e in range(c.num_experts):
                x = f"{ff}.experts.{e}"
                out[f"{x}.gate_proj.weight"] = _Slot((*fpath, "gate_proj"), (f, h), "t", e)
                out[f"{x}.up_proj.weight"] = _Slot((*fpath, "up_proj"), (f, h), "t", e)
                out[f"{x}.down_proj.weight"] = _Slot((*fpath, "down_proj"), (h, f), "t", e)
        else:
            lin(f"{ff}.gate_proj", (*fpath, "gate_proj"), f, h)
            lin(f"{ff}.up_proj", (*fpath, "up_proj"), f, h)
            lin(f"{ff}.down_proj", (*fpath, "down_proj"), h, f)
    out["model.final_layernorm.weight"] = _Slot(("final_layernorm", "weight"), (h,), "copy", None)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = _Slot(("lm_head", "kernel"), (c.vocab_size, h), "t", None)
    return out


def hf_tensor_shapes(config: JambaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config).items()}


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise jh.InvalidArgumentError(f"no *.safetensors file in {path}")
    return files


def _param(model: Jamba, path: tuple) -> nnx.Variable:
    obj = model
    for part in path:
        obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    return obj


def load_jamba(path: str | os.PathLike, dtype: str = "float32") -> tuple[JambaConfig, Jamba]:
    """Loads a Hugging Face Jamba checkpoint directory.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        ValueError: the checkpoint lacks a tensor, holds one the model does not have, or holds one
            of the wrong shape; the message lists every such tensor with its expected shape.
    """
    path = os.fspath(path)
    config = JambaConfig.from_hf(path, dtype=dtype)
    slots = _slots(config)
    # lm_head.weight of a tied model is a copy of the embedding; accept it and ignore it.
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()

    where: dict[str, str] = {}
    problems: list[str] = []
    for file in _checkpoint_files(path):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                shape = tuple(f.get_slice(name).get_shape())
                if name in where:
                    problems.append(f"tensor '{name}' appears in two files")
                where[name] = file
                if name in ignored:
                    continue
                if name not in slots:
                    problems.append(f"unexpected tensor '{name}' with shape {shape}")
                elif shape != slots[name].shape:
                    problems.append(
                        f"tensor '{name}' has shape {shape}, expected shape {slots[name].shape}"
                    )
    for name, slot in slots.items():
        if name not in where:
            problems.append(f"missing tensor '{name}' (expected shape {slot.shape})")
    if problems:
        raise jh.InvalidArgumentError(
            f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems)
        )

    model = Jamba(config, seed=None)
    dt = config.jnp_dtype
    stacked: dict[tuple, np.ndarray] = {}
    by_file: dict[str, list[str]] = {}
    for name in slots:
        by_file.setdefault(where[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                slot = slots[name]
                x = f.get_tensor(name)
                if slot.kind == "t":
                    x = x.T
                elif slot.kind == "conv":
                    x = x[:, 0, :].T
                if slot.expert is None:
                    _param(model, slot.path).set_value(jnp.asarray(x, dt))
                else:
                    buf = stacked.get(slot.path)
                    if buf is None:
                        shape = (config.num_experts, *x.shape)
                        buf = stacked[slot.path] = np.zeros(shape, x.dtype)
                    buf[slot.expert] = x
    for p, buf in stacked.items():
        _param(model, p).set_value(jnp.asarray(buf, dt))
    return config, model
