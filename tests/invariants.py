"""The memory invariants of docs/semantics.md §15, checked on host copies of a hybrid memory's
metadata (used by the property tests of the core and of the serving engine)."""

from __future__ import annotations

import jax
import numpy as np

import jaxhybrid as jh


def check_invariants(mem: jh.HybridMemory, cfg: jh.HybridConfig) -> None:
    """§15.1-§15.4 on the host copies of the metadata."""
    kv, rc = jax.device_get(mem.kv.cells), jax.device_get(mem.recurrent.cells)
    pos, seq = np.asarray(kv.pos), np.asarray(kv.seq)
    # §15.2: positions in [0, 2^31 - 1); empty cells hold no sequence
    assert np.all((pos == -1) | ((pos >= 0) & (pos < 2**31 - 1)))
    assert not np.any(seq[pos < 0]) and np.all(np.any(seq, axis=-1)[pos >= 0])
    # §15.3: a cell belongs only to sequences of its own stream
    if not cfg.kv.unified:
        for st in range(cfg.kv.n_stream):
            others = np.delete(seq[st], st, axis=-1)
            assert not np.any(others), f"stream {st} holds cells of another sequence"
    # §15.4: one recurrent cell per sequence, pointed to by tail
    rseq, tail, rpos = np.asarray(rc.seq), np.asarray(rc.tail), np.asarray(rc.pos)
    for s in range(cfg.n_seq_max):
        cells = np.flatnonzero(rseq[:, s])
        assert len(cells) <= 1 and (tail[s] == (cells[0] if len(cells) else -1)), s
    # §15.1: the state sits at the attention part's last position (or both lack the sequence)
    for s in range(cfg.n_seq_max):
        held = pos[seq[..., s]]
        last = int(held.max()) if held.size else -1
        state = int(rpos[tail[s]]) if tail[s] >= 0 else -1
        assert last == state, f"sequence {s}: attention ends at {last}, state at {state}"
