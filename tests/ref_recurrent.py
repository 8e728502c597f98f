"""A slow, obvious pure-Python model of llama.cpp's recurrent memory (spec §5), for the tests.

Written from the spec, not from ``jaxhybrid._recurrent``: it follows llama.cpp's sequential
``find_slot`` literally, including the compaction step (§5.4.6) that the JAX version leaves out,
so cell indices differ between the two and only observable behaviour is compared.

State data is kept per cell as ``data[cell][layer] = (r, s)`` (tuples of floats) and copied
eagerly where llama.cpp reads through ``src`` (copy-on-write, split-off); a new sequence starts
from zeros. jaxhybrid's deliberate differences 1, 10, 11 and 13 (docs/semantics.md) are applied:
failures change nothing, ``seq_add``/``seq_div`` move only the named sequence, a state shifted
below 0 is cleared, and out-of-range ids return False.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

INF = 2**31 - 1


@dataclass
class Cell:
    pos: int = -1
    seqs: set[int] = field(default_factory=set)
    data: list = field(default_factory=list)  # per layer (r, s)


@dataclass
class SeqSet:
    """One seq set of a ubatch: the first token's seq ids (primary first), and its tokens."""

    ids: list[int]
    tokens: list[int]
    pos: list[int]


class RefRecurrent:
    def __init__(self, n_seq_max: int, n_layers: int, r_size: int, s_size: int):
        self.n_seq_max = n_seq_max
        self.size = max(1, n_seq_max)
        self.n_layers = n_layers
        self.r_size = r_size
        self.s_size = s_size
        self.cells = [Cell(data=self._zeros()) for _ in range(self.size)]
        self.tail = [-1] * self.size  # cells[s].tail in llama.cpp: cell of sequence s
        self.head = 0

    # ---------------------------------------------------------------- helpers

    def _zeros(self):
        return [((0.0,) * self.r_size, (0.0,) * self.s_size) for _ in range(self.n_layers)]

    @property
    def used(self) -> int:
        return sum(1 for c in self.cells if c.seqs)

    def _free(self, i: int) -> None:
        self.cells[i].pos = -1
        self.cells[i].seqs = set()

    def _lower_head(self, i: int) -> None:
        if i < self.head:
            self.head = i

    def _snapshot(self):
        return copy.deepcopy((self.cells, self.tail, self.head))

    def _restore(self, snap) -> None:
        self.cells, self.tail, self.head = snap

    def _next_empty(self, start: int) -> int:
        """First empty cell scanning circularly from ``start`` (inclusive), or -1."""
        for j in range(self.size):
            i = (start + j) % self.size
            if not self.cells[i].seqs:
                return i
        return -1

    # ---------------------------------------------------------------- observables

    def pos_range(self, s: int) -> tuple[int, int]:
        ps = [c.pos for c in self.cells if s in c.seqs]
        return (min(ps), max(ps)) if ps else (-1, -1)

    def groups(self) -> set[frozenset[int]]:
        """Which sequences share one state."""
        return {frozenset(c.seqs) for c in self.cells if c.seqs}

    def seq_data(self, s: int):
        t = self.tail[s]
        return None if t < 0 else self.cells[t].data

    def check_invariants(self) -> None:
        for s in range(self.size):
            t = self.tail[s]
            holders = [i for i, c in enumerate(self.cells) if s in c.seqs]
            assert holders == ([t] if t >= 0 else []), (s, t, holders)
        for c in self.cells:
            assert (c.pos >= 0) == bool(c.seqs), c

    # ---------------------------------------------------------------- placement (§5.4)

    def find_slot(self, sets: list[SeqSet]) -> tuple[bool, list[int]]:
        """Places one ubatch; returns (ok, cell of each set). Unchanged on failure."""
        snap = self._snapshot()
        ok, out = self._find_slot(sets)
        if not ok:
            self._restore(snap)
        return ok, out

    def _find_slot(self, sets: list[SeqSet]) -> tuple[bool, list[int]]:
        n = len(sets)
        if n == 0:
            return True, []
        # 1. restart heuristic
        if self.head > self.used + 2 * n:
            self.head = 0
        # sets of an equal split are disjoint (llama.cpp would assert)
        all_ids = [i for st in sets for i in st.ids]
        if len(all_ids) != len(set(all_ids)):
            return False, []
        # 2.-3. ids in range; secondary ids leave their cell
        for st in sets:
            for j, sid in enumerate(st.ids):
                if not 0 <= sid < self.size:
                    return False, []
                if j > 0 and self.tail[sid] >= 0:
                    cell = self.cells[self.tail[sid]]
                    cell.seqs.discard(sid)
                    self.tail[sid] = -1
                    if not cell.seqs:
                        cell.pos = -1
        # 4. first empty cell from head
        next_empty = self._next_empty(self.head)
        # 5. keep an owned tail, else take the next empty cell (copy-on-write of a shared one)
        fresh = set()  # cells taken by new sequences, still empty until step 7
        chosen = []
        for k, st in enumerate(sets):
            p = st.ids[0]
            t = self.tail[p]
            if not (t >= 0 and self.cells[t].seqs == {p}):
                if next_empty < 0:
                    return False, []
                new = self.cells[next_empty]
                if t >= 0:
                    old = self.cells[t]
                    new.pos = old.pos
                    new.data = copy.deepcopy(old.data)
                    old.seqs.discard(p)
                    new.seqs.add(p)
                else:
                    new.data = self._zeros()
                    fresh.add(next_empty)
                self.tail[p] = next_empty
                if k + 1 < n:
                    nxt = -1
                    for j in range(1, self.size + 1):
                        i = (next_empty + j) % self.size
                        if not self.cells[i].seqs and i not in fresh:
                            nxt = i
                            break
                    next_empty = nxt
            chosen.append(self.tail[p])
        lo = min(chosen)
        # 6. compaction: set k moves to cell lo + k, tails follow the swapped cells
        for k, st in enumerate(sets):
            dst, src = lo + k, self.tail[st.ids[0]]
            if dst != src:
                a, b = self.cells[dst], self.cells[src]
                self.cells[dst], self.cells[src] = b, a
                self.tail = [dst if t == src else src if t == dst else t for t in self.tail]
        # 7. position and membership
        for k, st in enumerate(sets):
            cell = self.cells[lo + k]
            cell.pos = st.pos[-1]
            cell.seqs |= set(st.ids)
            for sid in st.ids:
                self.tail[sid] = lo + k
        # 9.
        self.head = lo
        return True, [lo + k for k in range(n)]

    def prepare(self, ubatches: list[list[SeqSet]]) -> tuple[bool, int]:
        snap = self._snapshot()
        result = (True, -1)
        for u, sets in enumerate(ubatches):
            ok, _ = self.find_slot(sets)
            if not ok:
                result = (False, u)
                break
        self._restore(snap)
        return result

    # ---------------------------------------------------------------- seq ops (§5.7)

    @staticmethod
    def _norm(p0: int, p1: int) -> tuple[int, int]:
        return (0 if p0 < 0 else p0), (INF if p1 < 0 else p1)

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        p0, p1 = self._norm(p0, p1)
        if seq >= self.size:
            return False
        if seq >= 0:
            t = self.tail[seq]
            if t < 0:
                return True
            last = self.cells[t].pos
            if 0 < p0 <= last < p1:
                return False  # cannot rewind
            if p0 <= last < p1:
                cell = self.cells[t]
                cell.seqs.discard(seq)
                self.tail[seq] = -1
                if not cell.seqs:
                    self._free(t)
                    self._lower_head(t)
            return True
        if p0 == p1:
            return True
        if not (p0 == 0 and p1 == INF):
            return False
        for i, c in enumerate(self.cells):
            if c.seqs:
                self._free(i)
                self._lower_head(i)
        self.tail = [-1] * self.size
        return True

    def seq_cp(self, src: int, dst: int) -> bool:
        if not (0 <= src < self.n_seq_max and 0 <= dst < self.n_seq_max):
            return False
        if src == dst:
            return True
        t = self.tail[dst]
        if t >= 0:
            self.cells[t].seqs.discard(dst)
            self.tail[dst] = -1
            if not self.cells[t].seqs:
                self._free(t)
        if self.tail[src] >= 0:
            self.cells[self.tail[src]].seqs.add(dst)
            self.tail[dst] = self.tail[src]
        return True

    def seq_keep(self, seq: int) -> bool:
        if not 0 <= seq < self.n_seq_max:
            return False
        for i, c in enumerate(self.cells):
            if i != seq:
                self.tail[i] = -1
            if seq in c.seqs:
                c.seqs = {seq}
            else:
                self._free(i)
                self._lower_head(i)
        return True

    def _move(self, seq: int, new_pos: int) -> bool:
        t = self.tail[seq]
        cell = self.cells[t]
        if new_pos < 0:  # difference 11: clear the state
            cell.seqs.discard(seq)
            self.tail[seq] = -1
            if not cell.seqs:
                self._free(t)
                self._lower_head(t)
            return True
        if cell.seqs == {seq}:
            cell.pos = new_pos
            return True
        # difference 10: split off a shared state (with its data) before moving it
        f = self._next_empty(self.head)
        if f < 0:
            return False
        cell.seqs.discard(seq)
        new = self.cells[f]
        new.seqs = {seq}
        new.pos = new_pos
        new.data = copy.deepcopy(cell.data)
        self.tail[seq] = f
        return True

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> bool:
        if not 0 <= seq < self.n_seq_max:
            return False
        p0, p1 = self._norm(p0, p1)
        if delta == 0 or p0 == p1:
            return True
        t = self.tail[seq]
        if t >= 0 and p0 <= self.cells[t].pos < p1:
            return self._move(seq, self.cells[t].pos + delta)
        return True

    def seq_div(self, seq: int, p0: int, p1: int, d: int) -> bool:
        if not 0 <= seq < self.n_seq_max or d < 1:
            return False
        p0, p1 = self._norm(p0, p1)
        if d == 1 or p0 == p1:
            return True
        t = self.tail[seq]
        if t >= 0 and p0 <= self.cells[t].pos < p1:
            old = self.cells[t].pos
            if old // d != old:
                return self._move(seq, old // d)
        return True

    def clear(self, data: bool = True) -> None:
        for i in range(self.size):
            self._free(i)
            if data:
                self.cells[i].data = self._zeros()
        self.tail = [-1] * self.size
        self.head = 0
