"""One entry point for every model family: :func:`load_model` reads a Hugging Face checkpoint
directory's ``config.json`` and picks the family by its ``model_type``."""

from __future__ import annotations

import importlib
import os
from typing import Any

import jaxhybrid as jh
from jaxhybrid.models._hf_files import read_json_object
from jaxhybrid.models._loader import checkpoint_dir

__all__ = ["SUPPORTED_MODEL_TYPES", "load_model", "model_plugin"]

# model_type -> names in jaxhybrid.models of (config class, loader, plug-in class). The config is
# read with ``Config.from_hf(path, dtype=...)``, a loader is ``load(path, dtype) -> (config,
# model)``, the plug-in is built as ``PlugIn(config)``.
_FAMILIES: dict[str, tuple[str, str, str]] = {
    "bamba": ("BambaConfig", "load_bamba", "BambaModel"),
    "falcon_h1": ("FalconH1Config", "load_falcon_h1", "FalconH1Model"),
    "granitemoehybrid": ("GraniteHybridConfig", "load_granite_hybrid", "GraniteHybridModel"),
    "jamba": ("JambaConfig", "load_jamba", "JambaModel"),
    "lfm2": ("Lfm2Config", "load_lfm2", "Lfm2Model"),
    "nemotron_h": ("NemotronHConfig", "load_nemotron_h", "NemotronHModel"),
    **{
        t: ("Qwen3NextConfig", "load_qwen3_next", "Qwen3NextModel")
        for t in ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
    },
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))
"""The ``model_type`` values of ``config.json`` that :func:`load_model` loads."""


def _family(path) -> tuple[str, tuple[str, str, str], Any]:
    path = checkpoint_dir(path)
    model_type = read_json_object(os.path.join(path, "config.json")).get("model_type")
    if model_type not in _FAMILIES:
        raise jh.InvalidArgumentError(
            f"{os.path.join(path, 'config.json')}: model_type {model_type!r} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return path, _FAMILIES[model_type], importlib.import_module("jaxhybrid.models")


def model_plugin(path: str | os.PathLike, dtype: str = "float32") -> Any:
    """The plug-in of a checkpoint directory's family, from its ``config.json`` alone (no
    weights are read): enough to plan the memory (``plugin.memory_config(...)``) before loading.

    Raises:
        InvalidArgumentError, InvalidTypeError: as :func:`load_model`.
    """
    path, (config_cls, _, plugin), models = _family(path)
    return getattr(models, plugin)(getattr(models, config_cls).from_hf(path, dtype=dtype))


def load_model(path: str | os.PathLike, dtype: str = "float32") -> tuple[Any, Any]:
    """Loads a Hugging Face checkpoint directory of any supported family.

    Args:
        path: directory with ``config.json`` and ``*.safetensors``.
        dtype: ``"float32"`` or ``"bfloat16"``.

    Returns:
        ``(plugin, model)``: the family's :class:`jaxhybrid.HybridModel` plug-in (its ``config``
        attribute holds the parsed config) and the model, its ``params`` for
        :mod:`jaxhybrid.serving`.

    Raises:
        InvalidArgumentError: the directory or its ``config.json`` is missing or invalid, the
            ``model_type`` is not supported (the message lists those that are), or the
            checkpoint does not match its config (see the family's loader).
        InvalidTypeError: ``path`` or ``dtype`` has the wrong type.
    """
    path, (_, loader, plugin), models = _family(path)
    config, model = getattr(models, loader)(path, dtype)
    return getattr(models, plugin)(config), model
