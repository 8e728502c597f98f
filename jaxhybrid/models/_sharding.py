"""Tensor-parallel sharding of Jamba's parameters over the *model* axis of a device mesh.

The usual Megatron-style split, expressed as ``PartitionSpec`` s and left to JAX's SPMD
partitioner (no hand-written collectives):

- **Column-parallel** (output features split): attention ``q_proj`` / ``k_proj`` / ``v_proj``
  (so the heads are split, matching the KV cache's head split of
  :func:`jaxhybrid.memory_sharding`), the MLP and expert ``gate_proj`` / ``up_proj``, Mamba's
  ``in_proj`` and ``dt_proj``, and the LM head (vocabulary split).
- **Row-parallel** (input features split; the partial sums are all-reduced): attention
  ``o_proj``, MLP and expert ``down_proj``, Mamba's ``x_proj`` and ``out_proj``.
- **Per-channel Mamba parameters** (``conv_weight``, ``conv_bias``, ``dt_proj.bias``,
  ``A_log``, ``D``) split along ``d_inner``, like the recurrent states of the memory.
- The token embedding is split along the vocabulary; norms and the MoE router are replicated.

Parameters are replicated over every other mesh axis (e.g. ``data``).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxhybrid as jh
from jaxhybrid.models.jamba import Jamba

__all__ = ["jamba_param_sharding", "jamba_param_specs", "rule_param_specs", "shard_jamba"]

_P = PartitionSpec

# Which dimension of a parameter is split over the model axis, by the last names of its path
# (a path ends in ``.value``; that key is dropped). Dimension -1 = output features of an
# ``[in, out]`` kernel (column-parallel), -2 = input features (row-parallel; also the ff axis of
# the stacked experts' ``down_proj``).
_COLUMN = -1
_ROW = -2
_RULES: dict[tuple[str, ...], int] = {
    ("embed_tokens",): 0,
    ("lm_head", "kernel"): _COLUMN,
    ("self_attn", "q_proj", "kernel"): _COLUMN,
    ("self_attn", "k_proj", "kernel"): _COLUMN,
    ("self_attn", "v_proj", "kernel"): _COLUMN,
    ("self_attn", "o_proj", "kernel"): _ROW,
    ("feed_forward", "gate_proj", "kernel"): _COLUMN,
    ("feed_forward", "up_proj", "kernel"): _COLUMN,
    ("feed_forward", "down_proj", "kernel"): _ROW,
    # MoE experts, stacked: gate/up [experts, hidden, ff], down [experts, ff, hidden].
    ("feed_forward", "gate_proj"): _COLUMN,
    ("feed_forward", "up_proj"): _COLUMN,
    ("feed_forward", "down_proj"): _ROW,
    ("mamba", "in_proj", "kernel"): _COLUMN,
    ("mamba", "in_proj", "bias"): 0,
    ("mamba", "conv_weight"): _COLUMN,
    ("mamba", "conv_bias"): 0,
    ("mamba", "x_proj", "kernel"): _ROW,
    ("mamba", "dt_proj", "kernel"): _COLUMN,
    ("mamba", "dt_proj", "bias"): 0,
    ("mamba", "A_log"): 0,
    ("mamba", "D"): 0,
    ("mamba", "out_proj", "kernel"): _ROW,
}


def _names(path) -> tuple[str, ...]:
    out = []
    for key in path:
        name = getattr(key, "name", getattr(key, "key", getattr(key, "idx", None)))
        if name is not None and name != "value":
            out.append(str(name))
    return tuple(out)


def _spec(path, leaf, model_axis: str | None, n_model: int, rules) -> PartitionSpec:
    names = _names(path)
    dim = None
    for suffix, d in rules.items():
        if names[-len(suffix) :] == suffix:
            dim = d
            break
    shape = getattr(leaf, "shape", ())
    if dim is None or model_axis is None or not shape:
        return _P()
    dim %= len(shape)
    if shape[dim] % n_model:
        raise jh.InvalidArgumentError(
            f"parameter {'.'.join(names)} of shape {tuple(shape)}: dimension {dim} "
            f"({shape[dim]}) is not divisible by the size {n_model} of mesh axis {model_axis!r}"
        )
    dims = [None] * len(shape)
    dims[dim] = model_axis
    return _P(*dims)


def jamba_param_specs(model: Jamba, mesh: Mesh, *, model_axis: str | None = "model"):
    """A pytree like ``model`` (or its ``nnx.split`` state) holding each parameter's
    ``PartitionSpec`` (see the module docstring)."""
    return rule_param_specs(model, mesh, _RULES, model_axis=model_axis)


def rule_param_specs(
    model, mesh: Mesh, rules: dict[tuple[str, ...], int], *, model_axis: str | None = "model"
):
    """Each parameter's ``PartitionSpec`` by ``rules``: the parameter whose path ends with a
    rule's names is split over ``model_axis`` along the rule's dimension; every other parameter
    is replicated. (Any rules give the same results under JAX's SPMD partitioner; they only
    decide what is communicated.)

    Raises:
        ValueError: ``model_axis`` is not an axis of ``mesh``, or a dimension to split is not
            divisible by it (the message names the parameter).
    """
    if model_axis is not None and model_axis not in mesh.shape:
        raise jh.InvalidArgumentError(
            f"mesh has axes {tuple(mesh.axis_names)}, not {model_axis!r} (pass None to replicate)"
        )
    n_model = 1 if model_axis is None else int(mesh.shape[model_axis])
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _spec(path, leaf, model_axis, n_model, rules), model
    )


def jamba_param_sharding(model: Jamba, mesh: Mesh, *, model_axis: str | None = "model"):
    """Like :func:`jamba_param_specs` with a ``NamedSharding`` on ``mesh`` per parameter
    (usable as ``jit``'s ``in_shardings`` or with ``jax.device_put``)."""
    specs = jamba_param_specs(model, mesh, model_axis=model_axis)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_jamba(model: Jamba, mesh: Mesh, *, model_axis: str | None = "model") -> Jamba:
    """The model with every parameter placed on ``mesh`` tensor-parallel (values unchanged).

    Works on the module (a pytree in Flax >= 0.12) or on its ``nnx.split`` state.
    """
    return jax.device_put(model, jamba_param_sharding(model, mesh, model_axis=model_axis))
