"""The attention KV cache on its own (spec §1-§4): ``from jaxhybrid import kv``.

Most users want the hybrid memory (``jaxhybrid.init_hybrid`` and friends); this namespace exposes
the attention part for attention-only models and for building other memories.
"""

from jaxhybrid._kv_cache import (
    KVCache,
    KVCells,
    KVSlot,
    additive_mask,
    apply_ubatch,
    can_shift,
    clear,
    find_slot,
    has_shift,
    init_kv_cache,
    is_masked_swa,
    kq_mask,
    prepare,
    read_kv,
    seq_add,
    seq_cp,
    seq_div,
    seq_keep,
    seq_pos_max,
    seq_pos_min,
    seq_pos_range,
    seq_rm,
    update,
    write_kv,
)
from jaxhybrid._rope import rope, rope_shift_fn

__all__ = [
    "KVCache",
    "KVCells",
    "KVSlot",
    "additive_mask",
    "apply_ubatch",
    "can_shift",
    "clear",
    "find_slot",
    "has_shift",
    "init_kv_cache",
    "is_masked_swa",
    "kq_mask",
    "prepare",
    "read_kv",
    "rope",
    "rope_shift_fn",
    "seq_add",
    "seq_cp",
    "seq_div",
    "seq_keep",
    "seq_pos_max",
    "seq_pos_min",
    "seq_pos_range",
    "seq_rm",
    "update",
    "write_kv",
]
