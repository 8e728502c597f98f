"""A slow, obvious reference model of spec §6 (batch validation and splits), in plain Python.

Written from the spec text, with lists and sets, independently of ``jaxhybrid._batch``. The error
codes and the order in which rules are checked mirror ``BatchErrorCode``'s documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OK = 0
EMPTY = 1
TOO_MANY_TOKENS = 2
TOKEN_OUT_OF_RANGE = 3
NO_SEQ_ID = 4
SEQ_ID_OUT_OF_RANGE = 5
DUPLICATE_SEQ_ID = 6
POSITION_OUT_OF_RANGE = 7
POSITION_NOT_INCREASING = 8
POSITION_NOT_CONSECUTIVE = 9
POSITION_GAP = 10
COUPLED_DIVERGED = 11
SEQ_SETS_NOT_NESTED = 12


@dataclass
class RefBatch:
    tokens: list[int]
    seqs: list[list[int]]  # ordered seq ids per token
    pos: list[int] | None  # None = automatic
    output: list[bool]
    n_batch: int

    @property
    def n(self) -> int:
        return len(self.tokens)


@dataclass
class RefCheck:
    code: int = OK
    token: int = -1
    seq: int = -1
    expected: int = -1
    found: int = -1


def ref_validate(
    b: RefBatch,
    mem_min: list[int],
    mem_max: list[int],
    *,
    n_seq_max: int,
    n_vocab: int | None,
    output_all: bool = False,
    same_history=None,
) -> tuple[list[int], list[bool], RefCheck]:
    """Returns (positions, output flags, check). ``same_history(p, q)``: whether coupled
    sequences hold the same history (the hybrid: one recurrent cell), or None."""
    same = same_history or (lambda p, q: True)
    n = b.n
    if n == 0:
        return [], [], RefCheck(EMPTY, -1, -1, 1, 0)
    if n > b.n_batch:
        return [], [], RefCheck(TOO_MANY_TOKENS, -1, -1, b.n_batch, n)
    if n_vocab is not None:
        for i, t in enumerate(b.tokens):
            if not 0 <= t < n_vocab:
                return [], [], RefCheck(TOKEN_OUT_OF_RANGE, i, -1, n_vocab, t)
    for i, s in enumerate(b.seqs):
        if len(s) == 0:
            return [], [], RefCheck(NO_SEQ_ID, i, -1, 1, 0)
    for i, s in enumerate(b.seqs):
        for q in s:
            if not 0 <= q < n_seq_max:
                return [], [], RefCheck(SEQ_ID_OUT_OF_RANGE, i, q, n_seq_max, q)
    for i, s in enumerate(b.seqs):
        for c, q in enumerate(s):
            if q in s[:c] or q in s[c + 1 :]:
                return [], [], RefCheck(DUPLICATE_SEQ_ID, i, q, -1, q)

    # Automatic positions (§6.2.3): continue the token's first sequence; every sequence of the
    # token then continues after it.
    if b.pos is None:
        nxt = {q: mem_max[q] + 1 for q in range(n_seq_max)}
        pos = []
        for s in b.seqs:
            p = nxt[s[0]]
            pos.append(p)
            for q in s:
                nxt[q] = p + 1
    else:
        pos = list(b.pos)
    for i, p in enumerate(pos):  # explicit or assigned: inside [0, 2^31 - 1) (§15.2)
        if not 0 <= p < 2**31 - 1:
            return pos, [], RefCheck(POSITION_OUT_OF_RANGE, i, -1, 0, p)
    outputs = [True] * n if output_all else list(b.output)

    # Strictly increasing positions per sequence along the batch (Q2 fix).
    last: dict[int, int] = {}
    for i, s in enumerate(b.seqs):
        for q in sorted(s):
            if q in last and pos[i] <= last[q]:
                return pos, outputs, RefCheck(POSITION_NOT_INCREASING, i, q, last[q] + 1, pos[i])
        for q in s:
            last[q] = pos[i]

    # Continuation of memory: the first position of a sequence is seq_pos_max + 1 (§6.2.6).
    seen: set[int] = set()
    for i, s in enumerate(b.seqs):
        for q in sorted(s):
            if q not in seen and mem_max[q] >= 0 and pos[i] != mem_max[q] + 1:
                return (
                    pos,
                    outputs,
                    RefCheck(POSITION_NOT_CONSECUTIVE, i, q, mem_max[q] + 1, pos[i]),
                )
        seen.update(s)

    # No gap inside the batch: consecutive positions of a sequence differ by exactly one.
    last = {}
    for i, s in enumerate(b.seqs):
        for q in sorted(s):
            if q in last and pos[i] != last[q] + 1:
                return pos, outputs, RefCheck(POSITION_GAP, i, q, last[q] + 1, pos[i])
        for q in s:
            last[q] = pos[i]

    # Coupled sequences (§6.2.7): a token lists s0 first and s1 later -> same memory range
    # (and the same history, when one is given).
    for i, s in enumerate(b.seqs):
        s0 = s[0]
        for q in sorted(s[1:]):
            if (mem_min[q], mem_max[q]) != (mem_min[s0], mem_max[s0]) or not same(s0, q):
                if mem_max[q] != mem_max[s0]:
                    exp, found = mem_max[s0], mem_max[q]
                elif mem_min[q] != mem_min[s0]:
                    exp, found = mem_min[s0], mem_min[q]
                else:
                    exp, found = -1, -1
                return pos, outputs, RefCheck(COUPLED_DIVERGED, i, q, exp, found)

    # Nested seq sets (Q2 fix): sets that share a sequence must be nested.
    for j in range(n):
        sj = set(b.seqs[j])
        for i in range(j):
            si = set(b.seqs[i])
            if si & sj and not (si <= sj or sj <= si):
                return pos, outputs, RefCheck(SEQ_SETS_NOT_NESTED, j, min(si & sj), -1, i)
    return pos, outputs, RefCheck()


@dataclass
class RefPlan:
    ubatches: list[list[int]] = field(default_factory=list)  # batch indices, processing order
    n_seqs: list[int] = field(default_factory=list)
    n_seq_tokens: list[int] = field(default_factory=list)
    complete: bool = True

    def out_ids(self, output: list[bool]) -> list[int]:
        return [i for ub in self.ubatches for i in ub if output[i]]


def ref_split_simple(n: int, n_ubatch: int) -> RefPlan:
    plan = RefPlan()
    for s in range(0, n, n_ubatch):
        ub = list(range(s, min(n, s + n_ubatch)))
        plan.ubatches.append(ub)
        plan.n_seqs.append(len(ub))
        plan.n_seq_tokens.append(1)
    plan.complete = n > 0
    return plan


def ref_split_equal(seqs: list[list[int]], n_ubatch: int, sequential: bool) -> RefPlan:
    """§6.6 with the Q3 fix (at most n_ubatch seq sets, so at most n_ubatch tokens)."""
    n = len(seqs)
    sets = [frozenset(s) for s in seqs]
    used = [False] * n
    plan = RefPlan()
    coupled = any(len(s) > 1 for s in seqs)
    if sequential and coupled:
        plan.complete = False
        return plan
    while not all(used):
        chosen: list[frozenset[int]] = []
        last_first = None
        for i in range(n):
            if used[i] or len(chosen) >= n_ubatch:
                continue
            if any(sets[i] & c for c in chosen):
                continue
            if sequential and chosen and seqs[i][0] != last_first + 1:
                continue
            chosen.append(sets[i])
            last_first = seqs[i][0]
        if not chosen:
            plan.complete = False
            return plan
        queues = [[i for i in range(n) if not used[i] and sets[i] == c] for c in chosen]
        per_set: list[list[int]] = [[] for _ in chosen]
        while all(len(q) > len(p) for q, p in zip(queues, per_set, strict=True)):
            for q, p in zip(queues, per_set, strict=True):
                p.append(q[len(p)])
            if (len(per_set[0]) + 1) * len(chosen) > n_ubatch:
                break
        ub = [i for p in per_set for i in p]
        for i in ub:
            used[i] = True
        plan.ubatches.append(ub)
        plan.n_seqs.append(len(chosen))
        plan.n_seq_tokens.append(len(per_set[0]))
    plan.complete = n > 0
    return plan


def ref_split_seq(seqs: list[list[int]], n_ubatch: int) -> RefPlan:
    """§6.7: follow narrowing seq sets from the first unused token."""
    n = len(seqs)
    sets = [frozenset(s) for s in seqs]
    used = [False] * n
    plan = RefPlan()
    while not all(used):
        cur = used.index(False)
        current = sets[cur]
        ub = [cur]
        used[cur] = True
        for j in range(cur + 1, n):
            if len(ub) >= n_ubatch:
                break
            if not used[j] and sets[j] <= current:
                ub.append(j)
                used[j] = True
                current = sets[j]
        plan.ubatches.append(ub)
        plan.n_seqs.append(1)
        plan.n_seq_tokens.append(len(ub))
    plan.complete = n > 0
    return plan
