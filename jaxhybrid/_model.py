"""The model plug-in contract: what the serving layer needs from a model.

:mod:`jaxhybrid.serving` (``generate``, the ``Engine``, speculative decoding) is generic over any
object implementing :class:`HybridModel`. A plug-in is static: it is passed to ``jax.jit`` as a
static argument, so it must be hashable and compare by value (a frozen dataclass of the model's
config is the usual form). The model's weights travel separately, as ``params`` (any pytree).

A family becomes a plug-in by describing four things (:class:`jaxhybrid.models.JambaModel` is
one; ``tests/hybrid_model.py`` holds a second, plain-JAX one):

- the memory layout its layers need (:meth:`HybridModel.memory_config`),
- its per-ubatch step (:meth:`HybridModel.step_fn`), the function :func:`jaxhybrid.decode` runs,
- the RoPE function the K-shift re-rotates cached keys with (:attr:`HybridModel.rope_fn`; None for
  attention without positional encoding, as Jamba's),
- how its parameters shard over a device mesh (:meth:`HybridModel.param_specs`),

plus two facts: its vocabulary size (token ids are validated against it) and whether its step
writes the per-token recurrent states that rollback snapshots are taken from
(:attr:`HybridModel.per_token_states`; speculative decoding needs them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from jaxhybrid._batch import UBatch
from jaxhybrid._hybrid import HybridConfig, HybridMemory, Placement

__all__ = ["HybridModel", "StepFn"]

StepFn = Callable[[Any, UBatch, HybridMemory, Placement], tuple[Any, HybridMemory]]
"""``step(params, ubatch, memory, placement) -> (logits, memory)``: one ubatch of the model, reading
and writing memory only through the placement (see :func:`jaxhybrid.decode`). ``logits`` has a
leading axis of ``n_ubatch`` token slots."""


@runtime_checkable
class HybridModel(Protocol):
    """A model family's plug-in for the serving layer (see the module docstring).

    Attributes:
        n_vocab: vocabulary size; token ids outside ``[0, n_vocab)`` are refused by decoding.
        per_token_states: the step passes the state after every token to
            :func:`jaxhybrid.write_states` (``r_tok`` / ``s_tok``), so a memory built with
            ``n_snapshots > 0`` can roll back exactly.
        rope_fn: ``rope_fn(k, delta_pos)`` re-rotating cached K rows after a position shift
            (:func:`jaxhybrid.kv.rope_shift_fn`), or None when attention has no positional
            encoding.
    """

    @property
    def n_vocab(self) -> int: ...

    @property
    def per_token_states(self) -> bool: ...

    @property
    def rope_fn(self) -> Callable | None: ...

    def memory_config(
        self, *, kv_size: int, n_seq_max: int, unified: bool = True, n_snapshots: int = 0
    ) -> HybridConfig:
        """The hybrid memory layout the model's layers need.

        Args:
            kv_size: KV cells per stream (the whole context when ``unified``).
            n_seq_max: number of sequence ids.
            unified: one KV stream for every sequence, else one per sequence.
            n_snapshots: rollback horizon of the recurrent states (0: off).
        """
        ...

    def step_fn(self, cfg: HybridConfig) -> StepFn:
        """The model's per-ubatch step for a memory built with ``cfg``."""
        ...

    def param_specs(self, params: Any, mesh: Any) -> Any:
        """A pytree of ``jax.sharding.PartitionSpec`` matching ``params`` for ``mesh``."""
        ...
