"""A slow, obvious pure-Python model of the KV cache (docs/semantics.md §1-§4, differences 4, 6-13).

Written from the spec text with lists, sets and loops, independently of ``jaxhybrid._kv_cache``;
the randomized tests run the same operations on both and compare everything observable. Each cell
also remembers ``data``: an id of the token whose K/V rows it holds, so copies of K/V rows
(cross-stream ``seq_cp``, splitting shared cells in ``seq_add``/``seq_div``) can be checked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

NONE, STANDARD, CHUNKED, SYMMETRIC = 0, 1, 2, 3
INF = 2**31 - 1


@dataclass
class Token:
    """One real ubatch token: position, seq ids (first = primary) and a data id."""

    pos: int
    seqs: list[int]
    uid: int = 0


class RefKV:
    def __init__(self, kv_size, n_seq_max, unified=True, swa_type=NONE, n_swa=0, causal=True):
        self.kv_size = kv_size
        self.n_seq_max = n_seq_max
        self.unified = unified
        self.n_stream = 1 if unified else n_seq_max
        self.swa_type = int(swa_type)
        self.n_swa = n_swa
        self.causal = causal
        self.clear()

    # -- basics ---------------------------------------------------------------------------

    def clear(self):
        n = self.kv_size
        self.pos = [[-1] * n for _ in range(self.n_stream)]
        self.seqs = [[set() for _ in range(n)] for _ in range(self.n_stream)]
        self.shift = [[0] * n for _ in range(self.n_stream)]
        self.data = [[0] * n for _ in range(self.n_stream)]
        self.head = [0] * self.n_stream

    def copy(self):
        return copy.deepcopy(self)

    def stream_of(self, s):
        return 0 if self.unified else s

    def _free_cell(self, st, c):
        self.pos[st][c] = -1
        self.seqs[st][c] = set()
        self.shift[st][c] = 0

    def seq_pos_min(self, s):
        if not 0 <= s < self.n_seq_max:
            return -1
        st = self.stream_of(s)
        ps = [self.pos[st][c] for c in range(self.kv_size) if s in self.seqs[st][c]]
        return min(ps) if ps else -1

    def seq_pos_max(self, s):
        if not 0 <= s < self.n_seq_max:
            return -1
        st = self.stream_of(s)
        ps = [self.pos[st][c] for c in range(self.kv_size) if s in self.seqs[st][c]]
        return max(ps) if ps else -1

    def masked_swa(self, p0, p1):
        """§3.1."""
        if self.swa_type == STANDARD:
            return p1 - p0 >= self.n_swa
        if self.swa_type == CHUNKED:
            return p0 < (p1 // self.n_swa) * self.n_swa
        if self.swa_type == SYMMETRIC:
            h = self.n_swa // 2
            return p1 - p0 < -h or p1 - p0 > h
        return False

    @staticmethod
    def norm_range(p0, p1):
        return max(p0, 0), (INF if p1 < 0 else p1)

    # -- placement ------------------------------------------------------------------------

    def _usable(self, st, c):
        """§2.4.5."""
        if self.pos[st][c] == -1:
            return True
        if self.swa_type == NONE or len(self.seqs[st][c]) != 1:
            return False
        (q,) = self.seqs[st][c]
        return self.masked_swa(self.pos[st][c], self.seq_pos_max(q) + 1)

    def _groups(self, tokens):
        if self.n_stream == 1:
            return [(0, list(range(len(tokens))))]
        unq = sorted({s for t in tokens for s in t.seqs})
        if not unq or len(tokens) % len(unq):
            return None
        size = len(tokens) // len(unq)
        groups = []
        for k, s in enumerate(unq):
            idxs = list(range(k * size, (k + 1) * size))
            if any(tokens[i].seqs != [s] for i in idxs):
                return None
            groups.append((self.stream_of(s), idxs))
        return groups

    def find_slot(self, tokens):
        """§2.4 (non-contiguous): list of (stream, cell) per token, or None."""
        groups = self._groups(tokens)
        if groups is None:
            return None
        slot = [None] * len(tokens)
        for st, idxs in groups:
            n = len(idxs)
            used = sum(p != -1 for p in self.pos[st])
            head = self.head[st]
            if head > used + 2 * n:
                head = 0
            if n > self.kv_size:
                return None
            found = []
            for i in range(self.kv_size):
                if len(found) == n:
                    break
                c = (head + i) % self.kv_size
                if self._usable(st, c):
                    found.append(c)
            if len(found) < n:
                return None
            for i, c in zip(idxs, found, strict=True):
                slot[i] = (st, c)
        return slot

    def apply_ubatch(self, tokens, slot):
        """§2.6."""
        max_rm = {}
        for tok, (st, c) in zip(tokens, slot, strict=True):
            if self.pos[st][c] != -1:
                for q in self.seqs[st][c]:
                    max_rm[q] = max(max_rm.get(q, -1), self.pos[st][c])
                self._free_cell(st, c)
            self.pos[st][c] = tok.pos
            self.seqs[st][c] = set(tok.seqs)
            self.data[st][c] = tok.uid
        for q, m in sorted(max_rm.items()):
            lo = self.seq_pos_min(q)
            if lo != -1 and lo <= m:
                st = self.stream_of(q)
                for c in range(self.kv_size):
                    if q in self.seqs[st][c] and lo <= self.pos[st][c] < m + 1:
                        self.seqs[st][c].discard(q)
                        if not self.seqs[st][c]:
                            self._free_cell(st, c)
        groups = self._groups(tokens)
        for st, idxs in groups:
            if idxs:
                self.head[st] = slot[idxs[-1]][1] + 1

    def prepare(self, ubatches):
        """§2.5 dry run: (ok, index of the failing ubatch or -1); self is untouched."""
        sim = self.copy()
        for u, tokens in enumerate(ubatches):
            slot = sim.find_slot(tokens)
            if slot is None:
                return False, u
            sim.apply_ubatch(tokens, slot)
        return True, -1

    def mask(self, tokens, slot):
        """§3.3: rows per token over all streams' cells (stream-major)."""
        rows = []
        for tok, (st_t, _) in zip(tokens, slot, strict=True):
            row = []
            for st in range(self.n_stream):
                for c in range(self.kv_size):
                    p0, p1 = self.pos[st][c], tok.pos
                    vis = (
                        st == st_t
                        and p0 != -1
                        and tok.seqs[0] in self.seqs[st][c]
                        and not (self.causal and p0 > p1)
                        and not self.masked_swa(p0, p1)
                    )
                    row.append(vis)
            rows.append(row)
        return rows

    # -- sequence operations ----------------------------------------------------------------

    def seq_rm(self, seq, p0, p1):
        """§4.1 (seq -1 = all)."""
        if not (seq == -1 or 0 <= seq < self.n_seq_max):
            return False
        lo, hi = self.norm_range(p0, p1)
        streams = range(self.n_stream) if seq == -1 else [self.stream_of(seq)]
        for st in streams:
            first = None
            for c in range(self.kv_size):
                p = self.pos[st][c]
                if p == -1 or not lo <= p < hi:
                    continue
                if seq == -1:
                    self._free_cell(st, c)
                elif seq in self.seqs[st][c]:
                    self.seqs[st][c].discard(seq)
                    if self.seqs[st][c]:
                        continue
                    self._free_cell(st, c)
                else:
                    continue
                if first is None:
                    first = c
            if first is not None and first < self.head[st]:
                self.head[st] = first
        return True

    def seq_cp(self, src, dst, p0, p1):
        """§4.2 with differences 6 (dst replaced), 8 (partial range across streams refused), 12."""
        if not (0 <= src < self.n_seq_max and 0 <= dst < self.n_seq_max):
            return False
        if src == dst:
            return True
        lo, hi = self.norm_range(p0, p1)
        ss, ds = self.stream_of(src), self.stream_of(dst)
        if ss == ds:
            self.seq_rm(dst, -1, -1)
            for c in range(self.kv_size):
                if src in self.seqs[ss][c] and lo <= self.pos[ss][c] < hi:
                    self.seqs[ss][c].add(dst)
            return True
        mn, mx = self.seq_pos_min(src), self.seq_pos_max(src)
        if mx != -1 and not (lo <= mn and hi > mx):
            return False
        for c in range(self.kv_size):
            self._free_cell(ds, c)
            if src in self.seqs[ss][c]:
                self.pos[ds][c] = self.pos[ss][c]
                self.shift[ds][c] = self.shift[ss][c]
                self.seqs[ds][c] = {dst}
            self.data[ds][c] = self.data[ss][c]
        self.head[ds] = self.head[ss]
        return True

    def seq_keep(self, seq):
        """§4.3 in every stream (difference 7)."""
        if not 0 <= seq < self.n_seq_max:
            return False
        for st in range(self.n_stream):
            first = None
            for c in range(self.kv_size):
                if seq in self.seqs[st][c]:
                    self.seqs[st][c] = {seq}
                elif self.pos[st][c] != -1:
                    self._free_cell(st, c)
                    if first is None:
                        first = c
            if first is not None and first < self.head[st]:
                self.head[st] = first
        return True

    def _move(self, seq, lo, hi, new_pos):
        """Moves only ``seq`` (difference 10); returns (ok, first freed cell or None)."""
        st = self.stream_of(seq)
        cells = [
            c
            for c in range(self.kv_size)
            if seq in self.seqs[st][c]
            and lo <= self.pos[st][c] < hi
            and new_pos(self.pos[st][c]) != self.pos[st][c]
        ]
        need = [c for c in cells if len(self.seqs[st][c]) > 1 and new_pos(self.pos[st][c]) >= 0]
        free = [c for c in range(self.kv_size) if self.pos[st][c] == -1]
        if len(need) > len(free):
            return False, None
        first = None
        for c in cells:
            old = self.pos[st][c]
            new = new_pos(old)
            if new < 0:
                self.seqs[st][c].discard(seq)
                if not self.seqs[st][c]:
                    self._free_cell(st, c)
                    if first is None:
                        first = c
            elif len(self.seqs[st][c]) == 1:
                self.pos[st][c] = new
                self.shift[st][c] += new - old
            else:
                f = free.pop(0)
                self.seqs[st][c].discard(seq)
                self.pos[st][f] = new
                self.seqs[st][f] = {seq}
                self.shift[st][f] = self.shift[st][c] + new - old
                self.data[st][f] = self.data[st][c]
        return True, first

    def seq_add(self, seq, p0, p1, delta):
        """§4.4."""
        if not 0 <= seq < self.n_seq_max:
            return False
        lo, hi = self.norm_range(p0, p1)
        if delta == 0 or lo == hi:
            return True
        ok, first = self._move(seq, lo, hi, lambda p: p + delta)
        if ok:
            self.head[self.stream_of(seq)] = 0 if first is None else first
        return ok

    def seq_div(self, seq, p0, p1, d):
        """§4.5 (shift accumulates new - old, Q1)."""
        if not 0 <= seq < self.n_seq_max or d < 1:
            return False
        lo, hi = self.norm_range(p0, p1)
        if d == 1 or lo == hi:
            return True
        ok, _ = self._move(seq, lo, hi, lambda p: p // d)
        return ok

    def update(self):
        """§2.12 metadata: pending shifts are applied and reset."""
        self.shift = [[0] * self.kv_size for _ in range(self.n_stream)]
