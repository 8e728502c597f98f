"""Hybrid model families on jaxhybrid memory (needs Flax; the core package does not).

Model code only: each family's layers and Hugging Face loader, and its plug-in for the serving
layer (a :class:`jaxhybrid.HybridModel`, e.g. :class:`JambaModel`). Generation, the Engine and
speculative decoding live in :mod:`jaxhybrid.serving`.

Public names: :func:`load_model`, which reads a checkpoint directory's ``config.json`` and loads
any supported family (:data:`SUPPORTED_MODEL_TYPES`); per family (Jamba, Nemotron-H,
Granite-4.0-H, Falcon-H1, Bamba, Qwen3-Next / Qwen3.5, LFM2) its config, model, Hugging Face loader
and plug-in; the Mamba-2 mixer and its SSD scan, the Gated DeltaNet mixer and its delta rule;
the generic pieces a new family is built from (:class:`FlaxHybridModel`,
:func:`hybrid_step_fn`, :func:`layer_memory_config`, :func:`load_checkpoint`); the
:class:`ModelMemory` protocol every model step runs against, and :class:`DenseMemory`, a plain
reference implementation of that protocol.
"""

from jaxhybrid.models._dense_memory import DenseMemory, init_dense_memory
from jaxhybrid.models._gated_deltanet import GatedDeltaNet, gated_delta_rule
from jaxhybrid.models._hybrid_adapter import (
    FlaxHybridModel,
    HybridModelMemory,
    JambaModel,
    hybrid_step_fn,
    jamba_hybrid_config,
    jamba_step_fn,
    layer_memory_config,
)
from jaxhybrid.models._loader import (
    Slot,
    checkpoint_dir,
    checkpoint_tensor_names,
    hf_tensor_shapes,
    load_checkpoint,
    load_jamba,
)
from jaxhybrid.models._mamba2 import Mamba2Mixer, ssd
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models._registry import SUPPORTED_MODEL_TYPES, load_model, model_plugin
from jaxhybrid.models._sharding import (
    jamba_param_sharding,
    jamba_param_specs,
    rule_param_specs,
    shard_jamba,
)
from jaxhybrid.models.bamba import Bamba, BambaConfig, BambaModel, init_bamba, load_bamba
from jaxhybrid.models.falcon_h1 import (
    FalconH1,
    FalconH1Config,
    FalconH1Model,
    init_falcon_h1,
    load_falcon_h1,
)
from jaxhybrid.models.granite_hybrid import (
    GraniteHybrid,
    GraniteHybridConfig,
    GraniteHybridModel,
    init_granite_hybrid,
    load_granite_hybrid,
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
from jaxhybrid.models.lfm2 import Lfm2, Lfm2Config, Lfm2Model, init_lfm2, load_lfm2
from jaxhybrid.models.nemotron_h import (
    NemotronH,
    NemotronHConfig,
    NemotronHModel,
    init_nemotron_h,
    load_nemotron_h,
)
from jaxhybrid.models.qwen3_next import (
    Qwen3Next,
    Qwen3NextConfig,
    Qwen3NextModel,
    init_qwen3_next,
    load_qwen3_next,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Bamba",
    "BambaConfig",
    "BambaModel",
    "FalconH1",
    "FalconH1Config",
    "FalconH1Model",
    "GraniteHybrid",
    "GraniteHybridConfig",
    "GraniteHybridModel",
    "GatedDeltaNet",
    "Lfm2",
    "Lfm2Config",
    "Lfm2Model",
    "Mamba2Mixer",
    "NemotronH",
    "NemotronHConfig",
    "NemotronHModel",
    "Qwen3Next",
    "Qwen3NextConfig",
    "Qwen3NextModel",
    "gated_delta_rule",
    "init_qwen3_next",
    "load_qwen3_next",
    "checkpoint_dir",
    "checkpoint_tensor_names",
    "init_bamba",
    "init_falcon_h1",
    "init_granite_hybrid",
    "init_lfm2",
    "init_nemotron_h",
    "load_bamba",
    "load_falcon_h1",
    "load_granite_hybrid",
    "load_lfm2",
    "load_nemotron_h",
    "ssd",
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
