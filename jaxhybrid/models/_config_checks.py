"""Checks of the fields of a model family's config (``config.json``): a value of the wrong type
is refused, never converted (§15.6), and every message names the config class and the field."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid.models._hf_files import read_json_object

__all__ = ["DTYPES", "check_bool", "check_int", "check_number", "dtype_name", "read_config"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""The parameter dtypes the model families run in."""


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """An int field ``>= minimum``: a float or a bool is refused, never converted (§15.6)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_):
        raise jh.InvalidTypeError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise jh.InvalidArgumentError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def check_bool(owner: str, name: str, value) -> None:
    """A bool field (JSON true/false: a "false" string or a 0 is a wrong type, not a truth
    value)."""
    if not isinstance(value, bool | np.bool_):
        raise jh.InvalidTypeError(f"{owner}.{name} must be a bool, got {value!r}")


def check_number(owner: str, name: str, value, *, positive: bool) -> None:
    """A finite number field, ``> 0`` when ``positive`` else ``>= 0``."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise jh.InvalidTypeError(f"{owner}.{name} must be a number, got {value!r}")
    ok = value > 0 if positive else value >= 0
    if not (ok and (isinstance(value, int | np.integer) or math.isfinite(value))):
        bound = "> 0" if positive else ">= 0"
        raise jh.InvalidArgumentError(f"{owner}.{name} must be {bound} and finite, got {value!r}")


def dtype_name(dtype) -> str:
    """``"float32"`` or ``"bfloat16"`` from a name or a dtype."""
    try:
        name = str(jnp.dtype(dtype))
    except TypeError:
        if not isinstance(dtype, str):
            raise jh.InvalidTypeError(
                f"dtype must be one of {sorted(DTYPES)}, got {type(dtype).__name__} {dtype!r}"
            ) from None
        name = dtype
    if name not in DTYPES:
        raise jh.InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def read_config(config: Mapping | str | os.PathLike, model_type: str | tuple[str, ...]) -> Mapping:
    """A ``config.json`` as a mapping (given as one, as the file, or as its directory), checked
    to be of ``model_type`` (a family serving several model types gives them all; then the
    config must name one)."""
    if not isinstance(config, Mapping):
        try:
            path = os.fspath(config)
        except TypeError:
            raise jh.InvalidTypeError(
                "config must be a Mapping, a config.json path or its directory, got "
                f"{type(config).__name__}"
            ) from None
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        config = read_json_object(path)
    if isinstance(model_type, tuple):
        got = config.get("model_type")
        if got not in model_type:
            raise jh.InvalidArgumentError(
                f"expected a config with model_type one of {sorted(model_type)}, got {got!r}"
            )
        return config
    got = config.get("model_type", model_type)
    if got != model_type:
        raise jh.InvalidArgumentError(
            f"expected a config with model_type {model_type!r}, got {got!r}"
        )
    return config
