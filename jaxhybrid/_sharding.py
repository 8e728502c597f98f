"""Sharding the hybrid memory over a device mesh with JAX's own SPMD (``NamedSharding``).

The rules (one :class:`~jax.sharding.PartitionSpec` per buffer of a :class:`HybridMemory`):

- **K / V** ``[layers, streams, cells, heads, head_dim]``: KV heads over the *model* axis; when
  the heads do not divide it, the head dim instead. With one stream per sequence (``unified ==
  False``) the streams go over the *data* axis; a unified cache keeps its single stream and spreads
  its cells over the *data* axis instead. Either way each device stores a ``1 / (data * model)``
  block of the cache, and attention over it needs only reductions of scores, never the cache.
- **Recurrent states** ``r [layers, rs, *r_shape]`` and ``s [layers, rs, *s_shape]``: the channel
  axis (``d_inner`` for Mamba: last axis of ``r_shape = (d_conv - 1, d_inner)``, first of
  ``s_shape = (d_inner, d_state)``) over the *model* axis. The cells ``rs`` are not sharded:
  which cell holds which sequence changes at run time (§5.4), so a state gather would cross
  devices.
- **KV cell metadata** (``pos``, ``seq``, ``shift`` per cell, ``head`` per stream): split over
  the *data* axis along with the cells it describes (streams, or the cells of a unified stream),
  replicated over *model*. Placement (§2.4) and the mask (§3.3) then read the cells where their
  K/V rows are.
- **Recurrent cell metadata** (``pos``, ``seq``, ``tail``, ``head``): replicated; a few integers
  per sequence, read whole by every placement (§5.4).

A mesh axis that is not named (``model_axis=None`` / ``data_axis=None``) is not used. A buffer
dimension that a mesh axis does not divide is a ``ValueError`` (no silent replication of a buffer
that was meant to be split).

Use :func:`memory_sharding` for the shardings, :func:`init_hybrid_sharded` to build an empty
memory directly in place (each device allocates only its own shard), :func:`shard_memory` to move
an existing memory onto the mesh and :func:`constrain_memory` inside a jitted function to pin the
layout of a memory that function returns.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxhybrid import _kv_cache as kvc
from jaxhybrid import _recurrent as rec
from jaxhybrid._config import KVConfig, RecurrentConfig
from jaxhybrid._hybrid import HybridConfig, HybridMemory, init_hybrid
from jaxhybrid._status import InvalidArgumentError

__all__ = [
    "constrain_memory",
    "init_hybrid_sharded",
    "kv_partition_specs",
    "memory_partition_specs",
    "memory_sharding",
    "recurrent_partition_specs",
    "shard_memory",
]

_P = PartitionSpec


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    if axis is None:
        return 1
    if axis not in mesh.shape:
        raise InvalidArgumentError(
            f"mesh has axes {tuple(mesh.axis_names)}, not {axis!r} (pass None to leave it unused)"
        )
    return int(mesh.shape[axis])


def _divides(axis: str | None, size: int, what: str, n: int) -> str | None:
    """``axis`` if the mesh axis of size ``n`` splits ``what`` (of ``size``); None if unused."""
    if axis is None:
        return None
    if size % n:
        raise InvalidArgumentError(
            f"{what} = {size} is not divisible by the size {n} of mesh axis {axis!r}"
        )
    return axis


def kv_partition_specs(
    cfg: KVConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    data_axis: str | None = "data",
) -> kvc.KVCache:
    """The :class:`~jaxhybrid.kv.KVCache` of partition specs for ``cfg`` on ``mesh``.

    Raises:
        ValueError: a named axis is not in the mesh, neither the KV heads nor the head dims are
            divisible by the model axis, or the streams (cells, when unified) are not divisible by
            the data axis.
    """
    n_model = _axis_size(mesh, model_axis)
    n_data = _axis_size(mesh, data_axis)
    heads = hd = None
    if model_axis is not None:
        if cfg.n_kv_heads % n_model == 0:
            heads = model_axis
        elif cfg.head_dim_k % n_model == 0 and cfg.head_dim_v % n_model == 0:
            hd = model_axis
        else:
            raise InvalidArgumentError(
                f"neither n_kv_heads = {cfg.n_kv_heads} nor the head dims (k {cfg.head_dim_k}, "
                f"v {cfg.head_dim_v}) are divisible by the size {n_model} of mesh axis "
                f"{model_axis!r}"
            )
    if cfg.unified:
        stream, cells = None, _divides(data_axis, cfg.kv_size, "kv_size", n_data)
    else:
        stream, cells = _divides(data_axis, cfg.n_stream, "n_stream", n_data), None
    data = _P(None, stream, cells, heads, hd)
    # The metadata of a cell lives where its K/V rows live: placement and masks then read local
    # cells, and the partitioner keeps that layout through a decode on its own.
    meta = kvc.KVCells(
        pos=_P(stream, cells),
        seq=_P(stream, cells, None),
        shift=_P(stream, cells),
        head=_P(stream),
    )
    return kvc.KVCache(cells=meta, k=data, v=data)


def _channel_dims(shape: tuple[int, ...], axis: int, model_axis, n_model: int, what: str):
    """Per-dimension mesh axes of one cell's state: the channel axis over ``model_axis``."""
    dims = [None] * len(shape)
    if model_axis is None or not shape:
        return dims
    if not -len(shape) <= axis < len(shape):
        raise InvalidArgumentError(f"{what} channel axis {axis} is out of range for shape {shape}")
    axis %= len(shape)
    dims[axis] = _divides(model_axis, shape[axis], f"{what}[{axis}]", n_model)
    return dims


def recurrent_partition_specs(
    cfg: RecurrentConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    r_channel_axis: int = -1,
    s_channel_axis: int = 0,
) -> rec.RecurrentMemory:
    """The :class:`~jaxhybrid.recurrent.RecurrentMemory` of partition specs for ``cfg``.

    Rollback snapshots (§5.10), when configured, are split like the states they copy.

    Args:
        cfg: the recurrent config.
        mesh: the device mesh.
        model_axis: mesh axis the channels are split over (None: replicated).
        r_channel_axis: channel axis of ``r_shape`` (default -1: Mamba's ``(d_conv - 1,
            d_inner)``).
        s_channel_axis: channel axis of ``s_shape`` (default 0: Mamba-1's ``(d_inner, d_state)``
            and Mamba-2's ``(n_heads, head_dim, d_state)``).
    """
    n_model = _axis_size(mesh, model_axis)
    r = _channel_dims(cfg.r_shape, r_channel_axis, model_axis, n_model, "r_shape")
    s = _channel_dims(cfg.s_shape, s_channel_axis, model_axis, n_model, "s_shape")
    snapshots = getattr(cfg, "n_snapshots", 0) > 0
    cells = rec.RecurrentCells(pos=_P(), seq=_P(), tail=_P(), head=_P())
    specs = rec.RecurrentMemory(cells=cells, r=_P(None, None, *r), s=_P(None, None, *s))
    if snapshots:
        specs = specs._replace(
            cells=cells._replace(snap=_P()),
            snap_r=_P(None, None, None, *r),
            snap_s=_P(None, None, None, *s),
        )
    return specs


def memory_partition_specs(
    cfg: HybridConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    data_axis: str | None = "data",
    r_channel_axis: int = -1,
    s_channel_axis: int = 0,
) -> HybridMemory:
    """The :class:`~jaxhybrid.HybridMemory` of partition specs (see the module docstring)."""
    return HybridMemory(
        kv=kv_partition_specs(cfg.kv, mesh, model_axis=model_axis, data_axis=data_axis),
        recurrent=recurrent_partition_specs(
            cfg.recurrent,
            mesh,
            model_axis=model_axis,
            r_channel_axis=r_channel_axis,
            s_channel_axis=s_channel_axis,
        ),
    )


def memory_sharding(
    cfg: HybridConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    data_axis: str | None = "data",
    r_channel_axis: int = -1,
    s_channel_axis: int = 0,
) -> HybridMemory:
    """The :class:`~jaxhybrid.HybridMemory` of ``NamedSharding`` s for ``cfg`` on ``mesh``.

    Usable as ``jit``'s ``in_shardings`` / ``out_shardings`` for the memory argument.

    Examples:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> cfg = HybridConfig.from_layers(
        ...     [True, False], KVConfig(kv_size=8, n_kv_heads=2), RecurrentConfig()
        ... )
        >>> memory_sharding(cfg, mesh).kv.k.spec
        P(None, None, 'data', 'model', None)
    """
    specs = memory_partition_specs(
        cfg,
        mesh,
        model_axis=model_axis,
        data_axis=data_axis,
        r_channel_axis=r_channel_axis,
        s_channel_axis=s_channel_axis,
    )
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_memory(
    mem: HybridMemory,
    cfg: HybridConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    data_axis: str | None = "data",
    r_channel_axis: int = -1,
    s_channel_axis: int = 0,
) -> HybridMemory:
    """Places an existing memory on ``mesh`` with the rules of :func:`memory_sharding`.

    The contents are unchanged; only where they live changes (``jax.device_put``). To build an
    empty memory without a full-size copy first, use :func:`init_hybrid_sharded`.
    """
    shardings = memory_sharding(
        cfg,
        mesh,
        model_axis=model_axis,
        data_axis=data_axis,
        r_channel_axis=r_channel_axis,
        s_channel_axis=s_channel_axis,
    )
    return jax.device_put(mem, shardings)


@functools.lru_cache(maxsize=32)
def _jitted_init(cfg: HybridConfig, mesh: Mesh, axes: tuple) -> object:
    model_axis, data_axis, r_axis, s_axis = axes
    shardings = memory_sharding(
        cfg,
        mesh,
        model_axis=model_axis,
        data_axis=data_axis,
        r_channel_axis=r_axis,
        s_channel_axis=s_axis,
    )
    return jax.jit(init_hybrid, static_argnums=0, out_shardings=shardings)


def init_hybrid_sharded(
    cfg: HybridConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    data_axis: str | None = "data",
    r_channel_axis: int = -1,
    s_channel_axis: int = 0,
) -> HybridMemory:
    """An empty memory (as :func:`~jaxhybrid.init_hybrid`) built directly sharded on ``mesh``.

    The init is jitted with ``out_shardings``, so every device fills only its own shard: no
    full-size copy exists on the host or on any one device. Compiled once per config and layout.

    Examples:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> cfg = HybridConfig.from_layers(
        ...     [True, False], KVConfig(kv_size=8, n_kv_heads=2), RecurrentConfig()
        ... )
        >>> mem = init_hybrid_sharded(cfg, mesh)
        >>> mem.kv.k.sharding.spec
        P(None, None, 'data', 'model', None)
    """
    axes = (model_axis, data_axis, r_channel_axis, s_channel_axis)
    return _jitted_init(cfg, mesh, axes)(cfg)


def constrain_memory(
    mem: HybridMemory,
    cfg: HybridConfig,
    mesh: Mesh,
    *,
    model_axis: str | None = "model",
    data_axis: str | None = "data",
    r_channel_axis: int = -1,
    s_channel_axis: int = 0,
) -> HybridMemory:
    """``jax.lax.with_sharding_constraint`` of every buffer to the rules of
    :func:`memory_sharding`, for use inside ``jit`` (outside it, this is :func:`shard_memory`)."""
    shardings = memory_sharding(
        cfg,
        mesh,
        model_axis=model_axis,
        data_axis=data_axis,
        r_channel_axis=r_channel_axis,
        s_channel_axis=s_channel_axis,
    )
    return jax.lax.with_sharding_constraint(mem, shardings)
