"""Static, hashable configurations of the memory parts.

Configs are frozen dataclasses: they are passed to jitted functions as static arguments, so every
field must be hashable and every size here is a Python ``int``. Invalid combinations raise a
``ValueError`` at construction that names the field and the value.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp
import numpy as np

from jaxhybrid._status import InvalidArgumentError

__all__ = ["KVConfig", "RecurrentConfig", "SWAType"]

_FLOAT_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


class SWAType(enum.IntEnum):
    """Sliding-window attention kinds (``llama_swa_type``, spec §3.1)."""

    NONE = 0
    STANDARD = 1
    CHUNKED = 2
    SYMMETRIC = 3


def _positive_int(name: str, value, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise InvalidArgumentError(f"{name} must be {bound}, got {value}")


def _float_dtype(name: str, value) -> np.dtype:
    try:
        dtype = np.dtype(jnp.dtype(value))
    except TypeError as e:
        raise InvalidArgumentError(f"{name} must be a floating dtype, got {value!r}") from e
    if dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentError(f"{name} must be float32, bfloat16 or float16, got {dtype}")
    return dtype


@dataclasses.dataclass(frozen=True)
class KVConfig:
    """Static description of an attention KV cache (spec §2.1).

    Attributes:
        kv_size: cells per stream (the whole context when unified, one sequence's otherwise).
        n_seq_max: number of sequence ids ``[0, n_seq_max)``.
        n_layers: attention layers served by this cache (0 is allowed: metadata only).
        n_kv_heads: KV heads per layer.
        head_dim_k: width of one K head.
        head_dim_v: width of one V head (defaults to ``head_dim_k``).
        dtype_k: K storage dtype (float32, bfloat16 or float16).
        dtype_v: V storage dtype.
        unified: one stream shared by all sequences, else one stream per sequence.
        swa_type: sliding-window kind used by the mask and by cell reuse (§3.1).
        n_swa: window size (required > 0 when ``swa_type`` is not NONE).
        causal: causal attention mask (§3.3.3).
        n_pad: ``kv_size`` must be a multiple of it (§2.1).
    """

    kv_size: int
    n_seq_max: int = 1
    n_layers: int = 1
    n_kv_heads: int = 1
    head_dim_k: int = 64
    head_dim_v: int | None = None
    dtype_k: object = jnp.float32
    dtype_v: object = jnp.float32
    unified: bool = True
    swa_type: SWAType = SWAType.NONE
    n_swa: int = 0
    causal: bool = True
    n_pad: int = 1

    def __post_init__(self):
        _positive_int("kv_size", self.kv_size)
        _positive_int("n_seq_max", self.n_seq_max)
        _positive_int("n_layers", self.n_layers, allow_zero=True)
        _positive_int("n_kv_heads", self.n_kv_heads)
        _positive_int("head_dim_k", self.head_dim_k)
        if self.head_dim_v is None:
            object.__setattr__(self, "head_dim_v", self.head_dim_k)
        _positive_int("head_dim_v", self.head_dim_v)
        object.__setattr__(self, "dtype_k", _float_dtype("dtype_k", self.dtype_k))
        object.__setattr__(self, "dtype_v", _float_dtype("dtype_v", self.dtype_v))
        try:
            object.__setattr__(self, "swa_type", SWAType(self.swa_type))
        except ValueError as e:
            raise InvalidArgumentError(
                f"swa_type must be one of {list(SWAType)}, got {self.swa_type!r}"
            ) from e
        _positive_int("n_swa", self.n_swa, allow_zero=True)
        if self.swa_type != SWAType.NONE and self.n_swa == 0:
            raise InvalidArgumentError(f"swa_type={self.swa_type.name} needs n_swa > 0")
        _positive_int("n_pad", self.n_pad)
        if self.kv_size % self.n_pad:
            raise InvalidArgumentError(
                f"kv_size={self.kv_size} must be a multiple of n_pad={self.n_pad}"
            )
        for name in ("unified", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def n_stream(self) -> int:
        """Number of KV streams: 1 when unified, else one per sequence (§2.1)."""
        return 1 if self.unified else self.n_seq_max


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """Static description of a recurrent-state memory (spec §5.1-§5.3).

    Attributes:
        n_seq_max: number of sequence ids; the memory has ``rs_size = max(1, n_seq_max)`` cells.
        n_layers: recurrent layers served (0 is allowed: metadata only).
        r_shape: shape of one cell's ``r`` (convolution / token-shift) state, per layer.
        s_shape: shape of one cell's ``s`` (SSM / WKV / delta-net) state, per layer.
        dtype_r: ``r`` storage dtype (float32 by default, as llama.cpp).
        dtype_s: ``s`` storage dtype.
        n_snapshots: rollback horizon (0 = off): every cell keeps the states after each of the
            ``n_snapshots`` positions before its last one, so ``seq_rm(seq, p0, -1)`` can rewind
            a sequence by up to that many tokens exactly (§5.9-5.10). Costs ``n_snapshots``
            extra states per cell.
    """

    n_seq_max: int = 1
    n_layers: int = 1
    r_shape: tuple[int, ...] = (3, 16)
    s_shape: tuple[int, ...] = (16, 16)
    dtype_r: object = jnp.float32
    dtype_s: object = jnp.float32
    n_snapshots: int = 0

    def __post_init__(self):
        _positive_int("n_seq_max", self.n_seq_max)
        _positive_int("n_layers", self.n_layers, allow_zero=True)
        _positive_int("n_snapshots", self.n_snapshots, allow_zero=True)
        for name in ("r_shape", "s_shape"):
            shape = getattr(self, name)
            if not isinstance(shape, tuple | list):
                raise InvalidArgumentError(f"{name} must be a tuple of ints, got {shape!r}")
            shape = tuple(shape)
            for d in shape:
                _positive_int(f"{name} entry", d, allow_zero=True)
            object.__setattr__(self, name, tuple(int(d) for d in shape))
        object.__setattr__(self, "dtype_r", _float_dtype("dtype_r", self.dtype_r))
        object.__setattr__(self, "dtype_s", _float_dtype("dtype_s", self.dtype_s))

    @property
    def rs_size(self) -> int:
        """Number of recurrent cells: ``max(1, n_seq_max)`` (§5.1)."""
        return max(1, self.n_seq_max)
