"""The recurrent-state memory on its own (spec §5): ``from jaxhybrid import recurrent``.

Most users want the hybrid memory (``jaxhybrid.init_hybrid`` and friends); this namespace exposes
the recurrent part for pure recurrent models and for building other memories.
"""

from jaxhybrid._recurrent import (
    RecurrentCells,
    RecurrentMemory,
    RecurrentSlot,
    apply_ubatch,
    can_shift,
    clear,
    find_slot,
    init_recurrent,
    init_recurrent_cells,
    prepare,
    read_states,
    seq_add,
    seq_cp,
    seq_div,
    seq_keep,
    seq_pos_max,
    seq_pos_min,
    seq_pos_range,
    seq_rm,
    write_states,
)

__all__ = [
    "RecurrentCells",
    "RecurrentMemory",
    "RecurrentSlot",
    "apply_ubatch",
    "can_shift",
    "clear",
    "find_slot",
    "init_recurrent",
    "init_recurrent_cells",
    "prepare",
    "read_states",
    "seq_add",
    "seq_cp",
    "seq_div",
    "seq_keep",
    "seq_pos_max",
    "seq_pos_min",
    "seq_pos_range",
    "seq_rm",
    "write_states",
]
