"""Hybrid model families on jaxhybrid memory (needs Flax; the core package does not).

Model code only: each family's layers and Hugging Face loader, and its plug-in for the serving
layer (a :class:`jaxhybrid.HybridModel`, e.g. :class:`JambaModel`). Generation, the Engine and
speculative decoding live in :mod:`jaxhybrid.serving`.

Public names: the Jamba model (:mod:`jaxhybrid.models.jamba`), its Hugging Face loader and
plug-in, the :class:`ModelMemory` protocol every model step runs against, and
:class:`DenseMemory`, a plain reference implementation of that protocol.
"""

from jaxhybrid.models._dense_memory import DenseMemory, init_dense_memory
from jaxhybrid.models._hybrid_adapter import (
    FlaxHybridModel,
    HybridModelMemory,
    JambaModel,
    hybrid_step_fn,
    jamba_hybrid_config,
    jamba_step_fn,
    layer_memory_config,
)
from jaxhybrid.models._loader import Slot, hf_tensor_shapes, load_checkpoint, load_jamba
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models._registry import SUPPORTED_MODEL_TYPES, load_model, model_plugin
from jaxhybrid.models._sharding import (
    jamba_param_sharding,
    jamba_param_specs,
    rule_param_specs,
    shard_jamba,
)
from jaxhybrid.models.jamba import (
    Jamba,
    JambaAttention,
    JambaConfig,
    JambaLayer,
    JambaMLP,
    JambaMoE,
    forward,
    init_jamba,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DenseMemory",
    "FlaxHybridModel",
    "Slot",
    "HybridModelMemory",
    "Jamba",
    "JambaAttention",
    "JambaConfig",
    "JambaLayer",
    "JambaMLP",
    "JambaMoE",
    "JambaModel",
    "ModelMemory",
    "forward",
    "hf_tensor_shapes",
    "hybrid_step_fn",
    "init_dense_memory",
    "init_jamba",
    "jamba_hybrid_config",
    "jamba_param_sharding",
    "jamba_param_specs",
    "jamba_step_fn",
    "layer_memory_config",
    "load_checkpoint",
    "load_jamba",
    "load_model",
    "model_plugin",
    "rule_param_specs",
    "shard_jamba",
]
