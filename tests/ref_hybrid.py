"""A slow, obvious reference model of the hybrid memory (spec §7, §10) composed of the KV and
recurrent references, with jaxhybrid's deliberate differences 1 (transactional) and 2 (atomic
``seq_rm``): any refused operation or failed decode leaves both parts as they were."""

from __future__ import annotations

import copy

import ref_batch as rb
from ref_kv import RefKV, Token
from ref_recurrent import RefRecurrent, SeqSet


class RefHybrid:
    def __init__(self, kv: RefKV, recr: RefRecurrent):
        self.kv = kv
        self.recurrent = recr
        self.n_seq_max = kv.n_seq_max

    def pos_range(self, s: int) -> tuple[int, int]:
        """§7.6: min = max of the parts, max = min of the parts, -1 if either lacks ``s``."""
        a = (self.kv.seq_pos_min(s), self.kv.seq_pos_max(s))
        r = self.recurrent.pos_range(s)
        hi = -1 if a[1] < 0 or r[1] < 0 else min(a[1], r[1])
        return max(a[0], r[0]), hi

    def agree(self, s: int) -> bool:
        """§15.1: the state sits at the attention part's last position (or both lack ``s``)."""
        return self.kv.seq_pos_max(s) == self.recurrent.pos_range(s)[1]

    def _atomic(self, kv_op, recr_op) -> bool:
        snap = (copy.deepcopy(self.kv), copy.deepcopy(self.recurrent))
        before = [self.agree(s) for s in range(self.n_seq_max)]
        ok = bool(recr_op()) & bool(kv_op())
        # A sequence whose parts agreed must still agree (§15.1), else the operation is refused.
        ok = ok and all(self.agree(s) or not was for s, was in enumerate(before))
        if not ok:
            self.kv, self.recurrent = snap
        return ok

    def seq_rm(self, s, p0, p1):
        return self._atomic(
            lambda: self.kv.seq_rm(s, p0, p1), lambda: self.recurrent.seq_rm(s, p0, p1)
        )

    def seq_cp(self, a, b, p0, p1):
        return self._atomic(
            lambda: self.kv.seq_cp(a, b, p0, p1), lambda: self.recurrent.seq_cp(a, b)
        )

    def seq_keep(self, s):
        return self._atomic(lambda: self.kv.seq_keep(s), lambda: self.recurrent.seq_keep(s))

    def seq_add(self, s, p0, p1, d):
        return self._atomic(
            lambda: self.kv.seq_add(s, p0, p1, d), lambda: self.recurrent.seq_add(s, p0, p1, d)
        )

    def seq_div(self, s, p0, p1, d):
        return self._atomic(
            lambda: self.kv.seq_div(s, p0, p1, d), lambda: self.recurrent.seq_div(s, p0, p1, d)
        )

    def decode(self, b: rb.RefBatch, n_vocab: int, n_ubatch: int) -> int:
        """llama_decode's return code (§10.3): 0, 1 (no slot; unchanged) or -1 (invalid)."""
        ranges = [self.pos_range(s) for s in range(self.n_seq_max)]
        pos, _, check = rb.ref_validate(
            b,
            [r[0] for r in ranges],
            [r[1] for r in ranges],
            n_seq_max=self.n_seq_max,
            n_vocab=n_vocab,
            same_history=lambda p, q: self.recurrent.tail[p] == self.recurrent.tail[q],
        )
        if check.code != rb.OK:
            return -1
        # §6.8 with difference 5: non-sequential equal split when the KV cache is unified.
        plan = rb.ref_split_equal(b.seqs, n_ubatch, sequential=not self.kv.unified)
        if not plan.complete:
            return 1
        kv_ubs, recr_ubs = [], []
        for ub, n_sets, n_tok in zip(plan.ubatches, plan.n_seqs, plan.n_seq_tokens, strict=True):
            kv_ubs.append([Token(pos[i], list(b.seqs[i]), uid=1000 + i) for i in ub])
            sets = []
            for k in range(n_sets):
                idx = ub[k * n_tok : (k + 1) * n_tok]
                sets.append(
                    SeqSet(list(b.seqs[idx[0]]), [b.tokens[i] for i in idx], [pos[i] for i in idx])
                )
            recr_ubs.append(sets)
        # §7.3: recurrent part first, attention second; both dry runs.
        if not self.recurrent.prepare(recr_ubs)[0] or not self.kv.prepare(kv_ubs)[0]:
            return 1
        for tokens, sets in zip(kv_ubs, recr_ubs, strict=True):
            self.kv.apply_ubatch(tokens, self.kv.find_slot(tokens))
            ok, _ = self.recurrent.find_slot(sets)
            assert ok
        return 0
