"""Example hybrid models on jaxhybrid memory (needs Flax; the core package does not).

Public names: the Jamba model (:mod:`jaxhybrid.models.jamba`), its Hugging Face loader, the
:class:`ModelMemory` protocol every model step runs against, and :class:`DenseMemory`, a plain
reference implementation of that protocol.
"""

from jaxhybrid.models._dense_memory import DenseMemory, init_dense_memory
from jaxhybrid.models._generate import (
    Engine,
    GenerateOutput,
    Request,
    SamplingParams,
    decode_tokens,
    generate,
    prefill,
    sample,
)
from jaxhybrid.models._hybrid_adapter import (
    HybridModelMemory,
    jamba_hybrid_config,
    jamba_step_fn,
)
from jaxhybrid.models._loader import hf_tensor_shapes, load_jamba
from jaxhybrid.models._protocol import ModelMemory
from jaxhybrid.models._sharding import jamba_param_sharding, jamba_param_specs, shard_jamba
from jaxhybrid.models._speculative import SpeculativeOutput, speculative_generate
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
    "DenseMemory",
    "Engine",
    "GenerateOutput",
    "HybridModelMemory",
    "Jamba",
    "JambaAttention",
    "JambaConfig",
    "JambaLayer",
    "JambaMLP",
    "JambaMoE",
    "ModelMemory",
    "Request",
    "SpeculativeOutput",
    "SamplingParams",
    "decode_tokens",
    "forward",
    "generate",
    "hf_tensor_shapes",
    "init_jamba",
    "init_dense_memory",
    "jamba_hybrid_config",
    "jamba_param_sharding",
    "jamba_param_specs",
    "jamba_step_fn",
    "load_jamba",
    "prefill",
    "sample",
    "speculative_generate",
    "shard_jamba",
]
