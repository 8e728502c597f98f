"""Loading Jamba weights from a Hugging Face checkpoint directory.

The directory holds ``config.json`` and one or several ``*.safetensors`` files (a sharded
checkpoint lists its files in ``model.safetensors.index.json``). Tensor names and layouts are those
of ``JambaForCausalLM.save_pretrained`` and of the published AI21 checkpoints: one tensor per
expert (``feed_forward.experts.{e}.gate_proj.weight``), ``nn.Linear`` weights ``[out, in]``, conv
weights ``[d_inner, 1, d_conv]``. Every tensor is checked by name, shape and dtype before
anything is converted, and every value for being finite as it is converted.

Nothing is read or allocated before the input is known to fit: the files must be regular files
(see :mod:`jaxhybrid.models._hf_files`), and the parameters ``config.json`` describes must fit in
the checkpoint's bytes (at two bytes each, the narrowest float dtype) before the tensor table and
the model are built, so a config of a million layers or ten million experts is refused at once.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

import jaxhybrid as jh
from jaxhybrid.models._hf_files import check_regular_file, read_json_object
from jaxhybrid.models.jamba import Jamba, JambaConfig

__all__ = [
    "Slot",
    "checkpoint_dir",
    "checkpoint_tensor_names",
    "hf_tensor_shapes",
    "load_checkpoint",
    "load_jamba",
]


class Slot(NamedTuple):
    """Where a checkpoint tensor goes in the model."""

    path: tuple  # attribute path of the nnx.Param inside the model
    shape: tuple[int, ...]  # shape in the checkpoint
    kind: str  # "copy"; "t" (swap the last two axes: nn.Linear [out, in] -> [in, out]);
    # "conv" (nn.Conv1d depthwise [channels, 1, width] -> [width, channels])
    expert: int | None = None  # index into a stacked leading axis (one tensor per expert)


def _slots(config: JambaConfig) -> dict[str, Slot]:
    c = config
    h, f, d_in, n = c.hidden_size, c.intermediate_size, c.d_inner, c.mamba_d_state
    r, hd = c.mamba_dt_rank, c.head_dim
    out: dict[str, Slot] = {
        "model.embed_tokens.weight": Slot(("embed_tokens",), (c.vocab_size, h), "copy", None)
    }

    def lin(name, path, d_out, d_in_, bias=False):
        out[f"{name}.weight"] = Slot((*path, "kernel"), (d_out, d_in_), "t", None)
        if bias:
            out[f"{name}.bias"] = Slot((*path, "bias"), (d_out,), "copy", None)

    for i, kind in enumerate(c.layer_types):
        p, path = f"model.layers.{i}", ("layers", i)
        out[f"{p}.input_layernorm.weight"] = Slot(
            (*path, "input_layernorm", "weight"), (h,), "copy", None
        )
        out[f"{p}.pre_ff_layernorm.weight"] = Slot(
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
            out[f"{m}.conv1d.weight"] = Slot(
                (*mpath, "conv_weight"), (d_in, 1, c.mamba_d_conv), "conv", None
            )
            if c.mamba_conv_bias:
                out[f"{m}.conv1d.bias"] = Slot((*mpath, "conv_bias"), (d_in,), "copy", None)
            lin(f"{m}.x_proj", (*mpath, "x_proj"), r + 2 * n, d_in)
            lin(f"{m}.dt_proj", (*mpath, "dt_proj"), d_in, r, True)
            out[f"{m}.A_log"] = Slot((*mpath, "A_log"), (d_in, n), "copy", None)
            out[f"{m}.D"] = Slot((*mpath, "D"), (d_in,), "copy", None)
            lin(f"{m}.out_proj", (*mpath, "out_proj"), h, d_in, c.mamba_proj_bias)
            for norm, dim in (("dt_layernorm", r), ("b_layernorm", n), ("c_layernorm", n)):
                out[f"{m}.{norm}.weight"] = Slot((*mpath, norm, "weight"), (dim,), "copy", None)
        ff, fpath = f"{p}.feed_forward", (*path, "feed_forward")
        if c.moe_layers[i]:
            out[f"{ff}.router.weight"] = Slot((*fpath, "router"), (c.num_experts, h), "t", None)
            for e in range(c.num_experts):
                x = f"{ff}.experts.{e}"
                out[f"{x}.gate_proj.weight"] = Slot((*fpath, "gate_proj"), (f, h), "t", e)
                out[f"{x}.up_proj.weight"] = Slot((*fpath, "up_proj"), (f, h), "t", e)
                out[f"{x}.down_proj.weight"] = Slot((*fpath, "down_proj"), (h, f), "t", e)
        else:
            lin(f"{ff}.gate_proj", (*fpath, "gate_proj"), f, h)
            lin(f"{ff}.up_proj", (*fpath, "up_proj"), f, h)
            lin(f"{ff}.down_proj", (*fpath, "down_proj"), h, f)
    out["model.final_layernorm.weight"] = Slot(("final_layernorm", "weight"), (h,), "copy", None)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = Slot(("lm_head", "kernel"), (c.vocab_size, h), "t", None)
    return out


def hf_tensor_shapes(config: JambaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds, with its shape."""
    return {name: slot.shape for name, slot in _slots(config).items()}


# safetensors dtype names of floating tensors (the narrowest is 2 bytes).
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MIN_PARAM_BYTES = 2

# The config fields that set the parameter count.
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_dt_rank",
)


def _n_matching(n: int, period: int, offset: int) -> int:
    """How many ``i`` in ``[0, n)`` have ``i % period == offset`` (``offset < period``)."""
    return 0 if offset >= n else (n - 1 - offset) // period + 1


def _n_params(config: JambaConfig) -> int:
    """The number of parameters of ``config``'s checkpoint, in closed form (the count of
    :func:`hf_tensor_shapes`, without building its table)."""
    c = config
    h, f, d, n, r, hd = (
        c.hidden_size,
        c.intermediate_size,
        c.d_inner,
        c.mamba_d_state,
        c.mamba_dt_rank,
        c.head_dim,
    )
    n_layers = c.num_hidden_layers
    n_attn = _n_matching(n_layers, c.attn_layer_period, c.attn_layer_offset)
    n_moe = (
        _n_matching(n_layers, c.expert_layer_period, c.expert_layer_offset)
        if c.num_experts > 1
        else 0
    )
    attn = 2 * h * c.num_attention_heads * hd + 2 * h * c.num_key_value_heads * hd
    mamba = (
        2 * d * h  # in_proj
        + d * c.mamba_d_conv  # conv1d
        + (r + 2 * n) * d  # x_proj
        + d * r
        + d  # dt_proj and its bias
        + d * n
        + d  # A_log, D
        + h * d  # out_proj
        + r
        + 2 * n  # dt, B and C norms
        + (2 * d + h if c.mamba_proj_bias else 0)
        + (d if c.mamba_conv_bias else 0)
    )
    moe = c.num_experts * h + 3 * c.num_experts * f * h
    dense = 3 * f * h
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return (
        embed
        + h  # final norm
        + n_layers * 2 * h  # two norms per layer
        + n_attn * attn
        + (n_layers - n_attn) * mamba
        + n_moe * moe
        + (n_layers - n_moe) * dense
    )


def _checkpoint_files(path: str) -> list[str]:
    """The checkpoint's files (those its shard index names, or every ``*.safetensors``), each a
    regular file inside ``path``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.lexists(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise jh.InvalidArgumentError(
                f"{index}: 'weight_map' must be a JSON object of tensor name -> file name, got "
                f"{type(weight_map).__name__}"
            )
        names = set()
        for tensor, name in weight_map.items():
            if (
                not isinstance(name, str)
                or name in ("", ".", "..")
                or os.path.basename(name) != name
            ):
                raise jh.InvalidArgumentError(
                    f"{index}: the file of tensor {tensor!r} is {name!r}, not a file name in {path}"
                )
            names.add(name)
        files = [os.path.join(path, name) for name in sorted(names)]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise jh.InvalidArgumentError(f"no *.safetensors file in {path}")
    for file in files:
        check_regular_file(file)
    return files


def _open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise jh.InvalidArgumentError(f"cannot read {file}: {e}") from None


def _read_headers(files: list[str]) -> list[tuple[str, str, tuple[int, ...], str]]:
    """``(file, name, shape, dtype)`` of every tensor, from the files' headers only."""
    out = []
    for file in files:
        with _open(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                sl = f.get_slice(name)
                out.append((file, name, tuple(sl.get_shape()), sl.get_dtype()))
    return out


def _tensor(f, file: str, name: str) -> np.ndarray:
    """One tensor's values, refused if any is NaN or infinite."""
    try:
        x = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise jh.InvalidArgumentError(f"cannot read tensor '{name}' of {file}: {e}") from None
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise jh.InvalidArgumentError(
            f"{file}: tensor '{name}' holds {int(bad.sum())} non-finite values (NaN or "
            f"infinity), the first at index {first}"
        )
    return x


def _check_fits(config: JambaConfig, path: str, files: list[str]) -> None:
    """Refuses a config that describes more parameters than the files can hold, before the
    tensor table (one entry per tensor) or the model is built."""
    n = _n_params(config)
    disk = sum(os.path.getsize(file) for file in files)
    if n * _MIN_PARAM_BYTES > disk:
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in _SIZE_FIELDS)
        raise jh.InvalidArgumentError(
            f"{os.path.join(path, 'config.json')} ({sizes}) describes {n} parameters, but the "
            f"checkpoint files hold {disk} bytes: room for at most {disk // _MIN_PARAM_BYTES} "
            f"parameters of {_MIN_PARAM_BYTES} bytes (the narrowest float dtype)"
        )


def _param(model: Jamba, path: tuple) -> nnx.Variable:
    obj = model
    for part in path:
        obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    return obj


def checkpoint_dir(path) -> str:
    """``path`` as a string naming an existing directory.

    Raises:
        InvalidTypeError: ``path`` is not a str or os.PathLike.
        InvalidArgumentError: ``path`` is not a directory.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise jh.InvalidTypeError(
            f"path must be a str or os.PathLike, got {type(path).__name__}"
        ) from None
    if not os.path.isdir(path):
        raise jh.InvalidArgumentError(f"{path} is not a directory")
    return path


def checkpoint_tensor_names(path: str) -> set[str]:
    """The names of the tensors a checkpoint directory's safetensors files hold (headers only;
    no tensor is read). A loader uses it to choose between layouts or to list the tensors it
    ignores.

    Raises:
        InvalidArgumentError: as :func:`load_checkpoint`.
    """
    return {name for _, name, _, _ in _read_headers(_checkpoint_files(path))}


def load_checkpoint(
    path: str,
    make_model: Callable[[], nnx.Module],
    slots: Callable[[], Iterable[tuple[str, Slot]]],
    *,
    dtype,
    ignored: Iterable[str] = (),
    check_fits: Callable[[list[str]], None] | None = None,
) -> nnx.Module:
    """Fills an abstract model (``make_model()``, built with ``seed=None``) from the safetensors
    files of a Hugging Face checkpoint directory ``path``.

    Args:
        make_model: builds the model with abstract parameters.
        slots: yields ``(tensor name, Slot)`` for every tensor the model needs. It is consumed
            before the model is built and stopped as soon as it describes far more tensors
            (twice, plus 64) or more parameters (at 2 bytes each) than the files hold, so a
            config describing a huge model is refused without building anything of its size.
        dtype: the parameters' dtype (tensors are cast to it).
        ignored: tensor names the checkpoint may hold and the model does not use (e.g. a tied
            ``lm_head.weight``).
        check_fits: an extra check of the files' size against the config (Jamba's closed form).

    Raises:
        InvalidArgumentError: as :func:`load_jamba`.
    """
    files = _checkpoint_files(path)
    headers = _read_headers(files)
    if check_fits is not None:
        check_fits(files)
    disk = sum(os.path.getsize(file) for file in files)
    table: dict[str, Slot] = {}
    n_params = 0
    for name, slot in slots():
        table[name] = slot
        n_params += math.prod(slot.shape)
        if len(table) > 2 * len(headers) + 64 or n_params * _MIN_PARAM_BYTES > disk:
            raise jh.InvalidArgumentError(
                f"{os.path.join(path, 'config.json')} describes more than {len(table) - 1} "
                f"tensors or {n_params} parameters, but the checkpoint files hold "
                f"{len(headers)} tensors in {disk} bytes"
            )
    ignored = set(ignored)
    where: dict[str, str] = {}
    problems: list[str] = []
    for file, name, shape, st_dtype in headers:
        if name in where:
            problems.append(f"tensor '{name}' appears in two files")
        where[name] = file
        if name in ignored:
            continue
        if name not in table:
            problems.append(f"unexpected tensor '{name}' with shape {shape}")
            continue
        if shape != table[name].shape:
            problems.append(
                f"tensor '{name}' has shape {shape}, expected shape {table[name].shape}"
            )
        if st_dtype not in _FLOAT_DTYPES:
            problems.append(
                f"tensor '{name}' has dtype {st_dtype}, expected a float dtype "
                f"({', '.join(_FLOAT_DTYPES)})"
            )
    for name, slot in table.items():
        if name not in where:
            problems.append(f"missing tensor '{name}' (expected shape {slot.shape})")
    if problems:
        raise jh.InvalidArgumentError(
            f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems)
        )

    model = make_model()
    n_stack: dict[tuple, int] = {}
    for slot in table.values():
        if slot.expert is not None:
            n_stack[slot.path] = max(n_stack.get(slot.path, 0), slot.expert + 1)
    stacked: dict[tuple, np.ndarray] = {}
    by_file: dict[str, list[str]] = {}
    for name in table:
        by_file.setdefault(where[name], []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                slot = table[name]
                x = _tensor(f, file, name)
                if slot.kind == "t":
                    x = np.swapaxes(x, -1, -2)
                elif slot.kind == "conv":
                    x = x[:, 0, :].T
                if slot.expert is None:
                    _param(model, slot.path).set_value(jnp.asarray(x, dtype))
                else:
                    buf = stacked.get(slot.path)
                    if buf is None:
                        buf = stacked[slot.path] = np.zeros((n_stack[slot.path], *x.shape), x.dtype)
                    buf[slot.expert] = x
    for p, buf in stacked.items():
        _param(model, p).set_value(jnp.asarray(buf, dtype))
    return model


def load_jamba(path: str | os.PathLike, dtype: str = "float32") -> tuple[JambaConfig, Jamba]:
    """Loads a Hugging Face Jamba checkpoint directory.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
        dtype: ``"float32"`` or ``"bfloat16"``; tensors are cast to it.

    Returns:
        ``(config, model)``.

    Raises:
        InvalidTypeError: ``path`` is not a path, or ``dtype`` or a config field has the wrong
            type (see :meth:`JambaConfig.from_hf`).
        InvalidArgumentError: a file is missing, unreadable or not a regular file; the config
            is invalid or describes more parameters than the files can hold; the checkpoint
            lacks a tensor, holds one the model does not have, or holds one of the wrong shape or
            of a non-float dtype (the message lists every such tensor with its expected shape);
            or a tensor holds NaN or infinity.
    """
    path = checkpoint_dir(path)
    config = JambaConfig.from_hf(path, dtype=dtype)
    model = load_checkpoint(
        path,
        lambda: Jamba(config, seed=None),
        lambda: _slots(config).items(),
        dtype=config.jnp_dtype,
        ignored={"lm_head.weight"} if config.tie_word_embeddings else (),
        check_fits=lambda files: _check_fits(config, path, files),
    )
    return config, model
