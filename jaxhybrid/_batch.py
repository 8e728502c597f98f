"""The batch layer (spec §6): a padded ``Batch`` pytree, validation, automatic positions and the
three splits into ubatches, all as pure jittable functions.

A batch holds at most ``n_batch`` tokens (the static capacity, i.e. the arrays' leading size);
``n_tokens`` says how many leading slots are real. Every token belongs to one or several sequences,
given as an ordered list of seq ids whose first entry is the token's *primary* sequence (llama.cpp
uses only that one for masking, automatic positions and rollback, Q4).

Nothing here raises on bad values inside jit: :func:`validate` returns a :class:`BatchCheck`
holding an error code and the offending token / sequence, and :func:`raise_for_check` turns it into
an exception on the host.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxhybrid._cells import POS_INF, check_int
from jaxhybrid._status import InvalidArgumentError, InvalidTypeError, JaxHybridError
from jaxhybrid.array_typing import Array, Bool, Float, Int, Scalar, ScalarBool

__all__ = [
    "Batch",
    "BatchCheck",
    "BatchError",
    "BatchErrorCode",
    "SplitKind",
    "UBatch",
    "UBatchPlan",
    "get_ubatch",
    "make_batch",
    "raise_for_check",
    "seq_membership",
    "split",
    "split_equal",
    "split_seq",
    "split_simple",
    "validate",
]


# --------------------------------------------------------------------------------------------
# Records


class Batch(NamedTuple):
    """A batch of tokens padded to a static capacity ``n_batch`` (spec §6.1).

    Attributes:
        token: token ids (0 in padding and when ``embd`` is used).
        embd: input embeddings instead of token ids, or ``None``.
        pos: positions; ignored (and filled in by :func:`validate`) when ``auto_pos`` is set.
        seq_id: seq ids of each token in order; only the first ``n_seq_id[i]`` columns count.
        n_seq_id: number of seq ids of each token.
        output: whether a token's output (logits / embedding) is wanted.
        auto_pos: positions are to be assigned from memory (llama.cpp's missing ``pos``).
        n_tokens: number of real tokens; slots ``>= n_tokens`` are padding and ignored. It may
            exceed the capacity, which :func:`validate` reports as ``TOO_MANY_TOKENS``.
    """

    token: Int[Array, " batch"]
    embd: Float[Array, "batch embd"] | None
    pos: Int[Array, " batch"]
    seq_id: Int[Array, "batch seq_ids"]
    n_seq_id: Int[Array, " batch"]
    output: Bool[Array, " batch"]
    auto_pos: ScalarBool
    n_tokens: Scalar

    @property
    def capacity(self) -> int:
        """The static capacity ``n_batch``."""
        return self.pos.shape[0]


def _seq_lists(
    seq_ids: Sequence[int | Sequence[int]] | np.ndarray | None, n: int, n_seq_id_max: int | None
) -> tuple[list[list[int]], int]:
    """Per token its list of seq ids (default: sequence 0), and the number of seq-id columns."""
    if seq_ids is None:
        seq_lists = [[0]] * n
    else:
        if len(seq_ids) != n:
            raise InvalidArgumentError(f"seq_ids has {len(seq_ids)} entries for {n} tokens")
        seq_lists = [
            [check_int(s, f"seq_ids[{i}]")]
            if np.ndim(s) == 0
            else _int_array(s, f"seq_ids[{i}]").tolist()
            for i, s in enumerate(seq_ids)
        ]
    widest = max((len(s) for s in seq_lists), default=1)
    if n_seq_id_max is None:
        n_seq_id_max = max(widest, 1)
    if widest > n_seq_id_max:
        raise InvalidArgumentError(
            f"a token has {widest} seq ids, more than n_seq_id_max={n_seq_id_max}"
        )
    return seq_lists, n_seq_id_max


def _seq_id_table(seq_lists: list[list[int]], n_seq_id_max: int) -> tuple[np.ndarray, np.ndarray]:
    """``[n, n_seq_id_max]`` seq ids (-1 padded) and the number of ids of each token."""
    n = len(seq_lists)
    seq_arr = np.full((n, n_seq_id_max), -1, np.int64)
    n_seq_arr = np.zeros((n,), np.int64)
    for i, s in enumerate(seq_lists):
        seq_arr[i, : len(s)] = s
        n_seq_arr[i] = len(s)
    return seq_arr, n_seq_arr


def _output_flags(
    output: Sequence[bool] | np.ndarray | None, n: int, output_all: bool
) -> np.ndarray:
    """Per-token output flags from host input (default: the last token, or all)."""
    if output is not None:
        out_arr = np.asarray(output, bool).reshape(-1)
        if out_arr.shape[0] != n:
            raise InvalidArgumentError(f"output has {out_arr.shape[0]} entries for {n} tokens")
        return out_arr
    out_arr = np.zeros((n,), bool)
    if output_all:
        out_arr[:] = True
    elif n:
        out_arr[-1] = True
    return out_arr


def _pad_to(a: np.ndarray, n_batch: int, fill, dtype) -> np.ndarray:
    """``a`` cut or padded with ``fill`` to ``n_batch`` rows."""
    m = min(a.shape[0], n_batch)
    full = np.full((n_batch, *a.shape[1:]), fill, dtype)
    full[:m] = a[:m]
    return full


_INT32 = np.iinfo(np.int32)


def _int_array(values, what: str) -> np.ndarray:
    """A flat int32 array of integer values (see :func:`check_int`); an integer array is
    checked at once, anything else element by element."""
    if isinstance(values, np.ndarray | jax.Array):
        arr = np.asarray(values).reshape(-1)
        if arr.dtype.kind not in "iu":
            raise InvalidTypeError(f"{what} must hold integers, got dtype {arr.dtype}")
        bad = (arr < _INT32.min) | (arr > _INT32.max)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgumentError(f"{what}[{i}] = {arr[i]} is outside int32")
        return arr.astype(np.int32)
    items = np.asarray(values, dtype=object).reshape(-1)
    return np.asarray([check_int(v, f"{what}[{i}]") for i, v in enumerate(items)], np.int32)


def make_batch(
    tokens: Sequence[int] | np.ndarray | None = None,
    *,
    embd: np.ndarray | None = None,
    pos: Sequence[int] | np.ndarray | None = None,
    seq_ids: Sequence[int | Sequence[int]] | np.ndarray | None = None,
    output: Sequence[bool] | np.ndarray | None = None,
    output_all: bool = False,
    n_batch: int | None = None,
    n_seq_id_max: int | None = None,
) -> Batch:
    """Builds a padded :class:`Batch` on the host from Python lists or NumPy arrays.

    Defaults follow llama.cpp (§6.2.3): no ``seq_ids`` -> every token in sequence 0; no ``pos`` ->
    automatic positions (continuing what memory holds, assigned by :func:`validate`); no
    ``output`` -> only the last token outputs, or every token when ``output_all``.

    Args:
        tokens: token ids (exclusive with ``embd``).
        embd: ``[n_tokens, n_embd]`` input embeddings (exclusive with ``tokens``).
        pos: explicit positions, one per token.
        seq_ids: per token an int or a sequence of ints (first = primary sequence).
        output: per-token output flags.
        output_all: default every token to output (embeddings / ``embd_all``).
        n_batch: static capacity (default: the number of tokens, at least 1). More tokens than
            ``n_batch`` are not an exception here: the batch keeps the true count in
            ``n_tokens`` and :func:`validate` reports ``TOO_MANY_TOKENS``.
        n_seq_id_max: static number of seq-id columns (default: the most any token has, >= 1).

    Returns:
        A :class:`Batch` of NumPy-backed JAX arrays.

    Examples:
        >>> b = make_batch([5, 6, 7], seq_ids=[0, 0, [0, 1]], n_batch=4)
        >>> b.n_tokens.item(), b.seq_id.shape, b.output.tolist()
        (3, (4, 2), [False, False, True, False])
    """
    if (tokens is None) == (embd is None):
        raise InvalidArgumentError("give exactly one of tokens and embd")
    if embd is not None:
        embd = np.asarray(embd, np.float32)
        if embd.ndim != 2:
            raise InvalidArgumentError(f"embd must be [n_tokens, n_embd], got shape {embd.shape}")
        n = embd.shape[0]
        token_arr = np.zeros((n,), np.int32)
    else:
        token_arr = _int_array(tokens, "tokens")
        n = token_arr.shape[0]
    if n_batch is None:
        n_batch = max(n, 1)
    if n_batch < 1:
        raise InvalidArgumentError(f"n_batch must be >= 1, got {n_batch}")

    seq_lists, n_seq_id_max = _seq_lists(seq_ids, n, n_seq_id_max)
    auto_pos = pos is None
    if pos is not None:
        pos_arr = _int_array(pos, "pos")
        if pos_arr.shape[0] != n:
            raise InvalidArgumentError(f"pos has {pos_arr.shape[0]} entries for {n} tokens")
    else:
        pos_arr = np.zeros((n,), np.int32)

    out_arr = _output_flags(output, n, output_all)
    seq_arr, n_seq_arr = _seq_id_table(seq_lists, n_seq_id_max)

    def pad(a, fill, dtype):
        return _pad_to(a, n_batch, fill, dtype)

    return Batch(
        token=jnp.asarray(pad(token_arr, 0, np.int32)),
        embd=None if embd is None else jnp.asarray(pad(embd, 0.0, np.float32)),
        pos=jnp.asarray(pad(pos_arr, 0, np.int32)),
        seq_id=jnp.asarray(pad(seq_arr.astype(np.int32), -1, np.int32)),
        n_seq_id=jnp.asarray(pad(n_seq_arr.astype(np.int32), 0, np.int32)),
        output=jnp.asarray(pad(out_arr, False, bool)),
        auto_pos=jnp.asarray(auto_pos),
        n_tokens=jnp.asarray(n, jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# Validation (§6.2)


class BatchErrorCode(enum.IntEnum):
    """Why a batch was rejected; checked in this order, the first failing rule is reported."""

    OK = 0
    EMPTY = 1  # n_tokens == 0
    TOO_MANY_TOKENS = 2  # n_tokens > n_batch (expected = n_batch, found = n_tokens)
    TOKEN_OUT_OF_RANGE = 3  # token id outside [0, n_vocab) (expected = n_vocab, found = id)
    NO_SEQ_ID = 4  # a token with no seq id (or more than the batch has columns for)
    SEQ_ID_OUT_OF_RANGE = 5  # seq id outside [0, n_seq_max) (expected = n_seq_max, found = id)
    DUPLICATE_SEQ_ID = 6  # a token lists the same seq id twice
    POSITION_OUT_OF_RANGE = 7  # a position (explicit or assigned) outside [0, 2^31 - 1) (§15.2)
    NEGATIVE_POSITION = 7  # the 0.1 name of POSITION_OUT_OF_RANGE, kept as an alias
    POSITION_NOT_INCREASING = 8  # positions of a sequence must strictly increase (Q2 fix)
    POSITION_NOT_CONSECUTIVE = 9  # first position != memory seq_pos_max + 1 (§6.2.6)
    POSITION_GAP = 10  # a gap between two positions of a sequence inside the batch (§6.2.6)
    COUPLED_DIVERGED = 11  # coupled sequences whose memory min/max differ (§6.2.7)
    SEQ_SETS_NOT_NESTED = 12  # two seq sets share a sequence but neither contains the other (Q2)


_MESSAGES = {
    BatchErrorCode.EMPTY: "the batch has no tokens",
    BatchErrorCode.TOO_MANY_TOKENS: "the batch has more tokens than its capacity n_batch",
    BatchErrorCode.TOKEN_OUT_OF_RANGE: "token id out of range [0, n_vocab)",
    BatchErrorCode.NO_SEQ_ID: "token has no valid list of seq ids",
    BatchErrorCode.SEQ_ID_OUT_OF_RANGE: "seq id out of range [0, n_seq_max)",
    BatchErrorCode.DUPLICATE_SEQ_ID: "token lists the same seq id twice",
    BatchErrorCode.POSITION_OUT_OF_RANGE: "position outside [0, 2^31 - 1)",
    BatchErrorCode.POSITION_NOT_INCREASING: "positions of a sequence must strictly increase",
    BatchErrorCode.POSITION_NOT_CONSECUTIVE: (
        "positions must continue the sequence in memory (seq_pos_max + 1)"
    ),
    BatchErrorCode.POSITION_GAP: "positions of a sequence have a gap inside the batch",
    BatchErrorCode.COUPLED_DIVERGED: (
        "coupled sequences (a token lists both) hold different position ranges or histories "
        "in memory"
    ),
    BatchErrorCode.SEQ_SETS_NOT_NESTED: (
        "two tokens' seq sets share a sequence but neither set contains the other"
    ),
}


class BatchCheck(NamedTuple):
    """Result of :func:`validate`: an error code and where it happened.

    ``token`` / ``seq`` are -1 when they do not apply. ``expected`` / ``found`` carry the values
    named in :class:`BatchErrorCode`; for positions they are the expected and found position; for
    ``SEQ_SETS_NOT_NESTED`` ``found`` is the index of the earlier conflicting token; for
    ``COUPLED_DIVERGED`` they are the memory ``seq_pos_max`` (or ``seq_pos_min`` when the maxima
    agree; -1 for both when only the histories differ) of the primary and of the coupled
    sequence.
    """

    code: Scalar
    token: Scalar
    seq: Scalar
    expected: Scalar
    found: Scalar

    @property
    def ok(self) -> ScalarBool:
        return self.code == BatchErrorCode.OK


class BatchError(JaxHybridError, ValueError):
    """Raised by :func:`raise_for_check` for an invalid batch."""

    def __init__(self, check: BatchCheck):
        code = BatchErrorCode(int(check.code))
        self.code = code
        self.token = int(check.token)
        self.seq = int(check.seq)
        self.expected = int(check.expected)
        self.found = int(check.found)
        parts = [f"invalid batch ({code.name}): {_MESSAGES.get(code, code.name)}"]
        if self.token >= 0:
            parts.append(f"token {self.token}")
        if self.seq >= 0:
            parts.append(f"seq {self.seq}")
        if code in (
            BatchErrorCode.POSITION_NOT_INCREASING,
            BatchErrorCode.POSITION_NOT_CONSECUTIVE,
            BatchErrorCode.POSITION_GAP,
        ):
            parts.append(f"expected position {self.expected}, found {self.found}")
        elif code == BatchErrorCode.POSITION_OUT_OF_RANGE:
            parts.append(f"found position {self.found}")
        elif code == BatchErrorCode.SEQ_SETS_NOT_NESTED:
            parts.append(f"conflicts with token {self.found}")
        elif code in (
            BatchErrorCode.TOO_MANY_TOKENS,
            BatchErrorCode.TOKEN_OUT_OF_RANGE,
            BatchErrorCode.SEQ_ID_OUT_OF_RANGE,
        ):
            parts.append(f"limit {self.expected}, found {self.found}")
        elif code == BatchErrorCode.COUPLED_DIVERGED:
            parts.append(f"primary has {self.expected}, coupled sequence has {self.found}")
        super().__init__(", ".join(parts))


def raise_for_check(check: BatchCheck) -> None:
    """Raises :class:`BatchError` if ``check`` reports an error (host side; syncs with device)."""
    if int(check.code) != BatchErrorCode.OK:
        raise BatchError(check)


def _valid_tokens(batch: Batch) -> Bool[Array, " batch"]:
    return jnp.arange(batch.capacity) < batch.n_tokens


def _seq_columns_valid(batch: Batch) -> Bool[Array, "batch seq_ids"]:
    cols = jnp.arange(batch.seq_id.shape[1])
    return (cols[None, :] < batch.n_seq_id[:, None]) & _valid_tokens(batch)[:, None]


def seq_membership(batch: Batch, n_seq_max: int) -> Bool[Array, "batch seqs"]:
    """``[n_batch, n_seq_max]`` membership of each real token in each sequence.

    Seq ids outside ``[0, n_seq_max)`` and padding tokens are dropped (validation reports them).
    """
    cols_ok = _seq_columns_valid(batch)
    onehot = jax.nn.one_hot(jnp.where(cols_ok, batch.seq_id, -1), n_seq_max, dtype=jnp.bool_)
    return jnp.any(onehot, axis=1)


def _first_true(mask: Bool[Array, " n"]) -> tuple[ScalarBool, Scalar]:
    """(any, index of the first True or -1)."""
    any_ = jnp.any(mask)
    return any_, jnp.where(any_, jnp.argmax(mask), -1).astype(jnp.int32)


def _assign_positions(
    batch: Batch, member: Bool[Array, "batch seqs"], seq_pos_max: Int[Array, " seqs"]
) -> Int[Array, " batch"]:
    """Automatic positions (§6.2.3): token i continues its primary sequence, and the next
    position of every sequence it belongs to becomes ``pos_i + 1``."""
    n_seq_max = member.shape[1]
    primary = jnp.clip(batch.seq_id[:, 0], 0, n_seq_max - 1)

    def step(next_pos, xs):
        m, p = xs
        pos = next_pos[p]
        return jnp.where(m, pos + 1, next_pos), pos

    _, pos = jax.lax.scan(step, seq_pos_max.astype(jnp.int32) + 1, (member, primary))
    return jnp.where(_valid_tokens(batch), pos, 0)


class _Facts(NamedTuple):
    """What the validation rules read: the batch (positions assigned) and what is derived from it
    once for all rules. ``n_vocab`` is static (None: no token-id check)."""

    batch: Batch
    valid: Bool[Array, " batch"]
    cols_ok: Bool[Array, "batch seq_ids"]
    member: Bool[Array, "batch seqs"]
    # Per token and sequence: the sequence's previous position in the batch before the token
    # (exclusive running max, -1 for none; positions are >= 0 when it is read).
    prev: Int[Array, "batch seqs"]
    seq_pos_min: Int[Array, " seqs"]
    seq_pos_max: Int[Array, " seqs"]
    n_vocab: int | None
    # Per sequence, what identifies its history beyond positions (the hybrid passes its
    # recurrent tail cells), or None: coupled sequences must also share it (§6.2.7).
    history: Int[Array, " seqs"] | None = None


class _Finding(NamedTuple):
    """One rule's verdict: whether it failed, and where (fields as in :class:`BatchCheck`)."""

    failed: ScalarBool
    token: Scalar
    seq: Scalar
    expected: Scalar
    found: Scalar


def _finding(failed, token=-1, seq=-1, expected=-1, found=-1) -> _Finding:
    i32 = jnp.int32
    return _Finding(
        jnp.asarray(failed, jnp.bool_),
        *(jnp.asarray(x).astype(i32) for x in (token, seq, expected, found)),
    )


def _first_cell(bad: Bool[Array, "batch cols"]) -> tuple[ScalarBool, Scalar, Scalar, Scalar]:
    """The first token with a bad cell: ``(any, token or -1, that token's first bad column or
    -1, the row to read details from)``."""
    any_, t = _first_true(jnp.any(bad, axis=1))
    row = jnp.maximum(t, 0)
    col = jnp.argmax(bad[row]).astype(jnp.int32)
    return any_, t, jnp.where(any_, col, -1), row


# Rules, one per error code (§6.2, Q2). Each returns a _Finding; the details of a rule that does
# not fail are never read.


def _rule_empty(f: _Facts) -> _Finding:
    return _finding(f.batch.n_tokens <= 0, expected=1, found=f.batch.n_tokens)


def _rule_too_many_tokens(f: _Facts) -> _Finding:
    n_batch = f.batch.capacity
    return _finding(f.batch.n_tokens > n_batch, expected=n_batch, found=f.batch.n_tokens)


def _rule_token_out_of_range(f: _Facts) -> _Finding:
    b = f.batch
    if f.n_vocab is None or b.embd is not None:  # static: embeddings have no token ids
        return _finding(False)
    any_, t = _first_true(f.valid & ((b.token < 0) | (b.token >= f.n_vocab)))
    return _finding(any_, t, expected=f.n_vocab, found=b.token[jnp.maximum(t, 0)])


def _rule_no_seq_id(f: _Facts) -> _Finding:
    b = f.batch
    any_, t = _first_true(f.valid & ((b.n_seq_id < 1) | (b.n_seq_id > b.seq_id.shape[1])))
    return _finding(any_, t, expected=1, found=b.n_seq_id[jnp.maximum(t, 0)])


def _rule_seq_id_out_of_range(f: _Facts) -> _Finding:
    b, n_seq_max = f.batch, f.member.shape[1]
    any_, t, col, row = _first_cell(f.cols_ok & ((b.seq_id < 0) | (b.seq_id >= n_seq_max)))
    bad_id = b.seq_id[row, jnp.maximum(col, 0)]
    return _finding(any_, t, bad_id, n_seq_max, bad_id)


def _rule_duplicate_seq_id(f: _Facts) -> _Finding:
    ids, ok = f.batch.seq_id, f.cols_ok
    same = (ids[:, :, None] == ids[:, None, :]) & (ok[:, :, None] & ok[:, None, :])
    dup_cell = jnp.any(same & ~jnp.eye(ids.shape[1], dtype=bool)[None], axis=2)
    any_, t, col, row = _first_cell(dup_cell)
    dup_id = ids[row, jnp.maximum(col, 0)]
    return _finding(any_, t, dup_id, -1, dup_id)


def _rule_position_out_of_range(f: _Facts) -> _Finding:
    # Explicit positions, and automatic ones: those continue seq_pos_max + 1 in int32, so one
    # that passes 2^31 - 2 is POS_INF or wraps negative; either way it is caught here (§15.2).
    b = f.batch
    any_, t = _first_true(f.valid & ((b.pos < 0) | (b.pos >= POS_INF)))
    return _finding(any_, t, expected=0, found=b.pos[jnp.maximum(t, 0)])


def _position_finding(f: _Facts, bad: Bool[Array, "batch seqs"], expected) -> _Finding:
    """A per-(token, sequence) position rule: ``expected[token, seq]`` vs the token's position."""
    any_, t, s, row = _first_cell(bad)
    return _finding(any_, t, s, expected[row, jnp.maximum(s, 0)], f.batch.pos[row])


def _rule_position_not_increasing(f: _Facts) -> _Finding:
    bad = f.member & (f.prev >= 0) & (f.batch.pos[:, None] <= f.prev)
    return _position_finding(f, bad, f.prev + 1)


def _rule_position_not_consecutive(f: _Facts) -> _Finding:
    # The first token of each sequence in the batch must continue memory (if memory holds it).
    mem_max = f.seq_pos_max[None, :]
    is_first = f.member & (f.prev < 0)
    bad = is_first & (mem_max >= 0) & (f.batch.pos[:, None] != mem_max + 1)
    return _position_finding(f, bad, jnp.broadcast_to(mem_max + 1, f.prev.shape))


def _rule_position_gap(f: _Facts) -> _Finding:
    bad = f.member & (f.prev >= 0) & (f.batch.pos[:, None] != f.prev + 1)
    return _position_finding(f, bad, f.prev + 1)


def _rule_coupled_diverged(f: _Facts) -> _Finding:
    # §6.2.7: a token lists its primary first and others later -> memory ranges must agree.
    n_seq_max = f.member.shape[1]
    lo, hi = f.seq_pos_min, f.seq_pos_max
    primary = jnp.clip(f.batch.seq_id[:, 0], 0, n_seq_max - 1)
    p_min, p_max = lo[primary], hi[primary]
    differs = (lo[None, :] != p_min[:, None]) | (hi[None, :] != p_max[:, None])
    if f.history is not None:
        differs |= f.history[None, :] != f.history[primary][:, None]
    bad = f.member & (jnp.arange(n_seq_max)[None, :] != primary[:, None]) & differs
    any_, t, s, row = _first_cell(bad)
    s0 = jnp.maximum(s, 0)
    # Report the maxima when they differ, else the minima, else -1 (the histories differ).
    max_differs = hi[s0] != p_max[row]
    min_differs = lo[s0] != p_min[row]
    pick = lambda a, b: jnp.where(max_differs, a, jnp.where(min_differs, b, -1))
    return _finding(any_, t, s, pick(p_max[row], p_min[row]), pick(hi[s0], lo[s0]))


def _rule_seq_sets_not_nested(f: _Facts) -> _Finding:
    # Q2: sets sharing a sequence must be nested. i32 matmuls count shared members and members
    # of one set missing from the other.
    mi = f.member.astype(jnp.int32)
    shared = mi @ mi.T
    i_not_in_j = mi @ (1 - mi).T
    conflict = (shared > 0) & (i_not_in_j > 0) & (i_not_in_j.T > 0)
    idx = jnp.arange(f.batch.capacity)
    earlier = idx[None, :] < idx[:, None]  # [j, i]: i earlier than j
    any_, t, other, row = _first_cell(conflict & earlier)
    s = jnp.argmax(f.member[row] & f.member[jnp.maximum(other, 0)])
    return _finding(any_, t, jnp.where(any_, s, -1), -1, other)


class _Rule(NamedTuple):
    code: BatchErrorCode
    check: Callable[[_Facts], _Finding]


# In precedence order, which is the order of the codes: the first failing rule is reported.
_RULES: tuple[_Rule, ...] = (
    _Rule(BatchErrorCode.EMPTY, _rule_empty),
    _Rule(BatchErrorCode.TOO_MANY_TOKENS, _rule_too_many_tokens),
    _Rule(BatchErrorCode.TOKEN_OUT_OF_RANGE, _rule_token_out_of_range),
    _Rule(BatchErrorCode.NO_SEQ_ID, _rule_no_seq_id),
    _Rule(BatchErrorCode.SEQ_ID_OUT_OF_RANGE, _rule_seq_id_out_of_range),
    _Rule(BatchErrorCode.DUPLICATE_SEQ_ID, _rule_duplicate_seq_id),
    _Rule(BatchErrorCode.POSITION_OUT_OF_RANGE, _rule_position_out_of_range),
    _Rule(BatchErrorCode.POSITION_NOT_INCREASING, _rule_position_not_increasing),
    _Rule(BatchErrorCode.POSITION_NOT_CONSECUTIVE, _rule_position_not_consecutive),
    _Rule(BatchErrorCode.POSITION_GAP, _rule_position_gap),
    _Rule(BatchErrorCode.COUPLED_DIVERGED, _rule_coupled_diverged),
    _Rule(BatchErrorCode.SEQ_SETS_NOT_NESTED, _rule_seq_sets_not_nested),
)


def _first_failing(rules: Sequence[_Rule], facts: _Facts) -> BatchCheck:
    """The :class:`BatchCheck` of the first failing rule in table order (OK when none fails)."""
    findings = [rule.check(facts) for rule in rules]
    failed = jnp.stack([x.failed for x in findings])
    details = jnp.stack([jnp.stack(x[1:]) for x in findings])  # [rules, 4]
    codes = jnp.asarray([int(rule.code) for rule in rules], jnp.int32)
    any_ = jnp.any(failed)
    first = jnp.argmax(failed)
    token, seq, expected, found = jnp.where(any_, details[first], -1)
    return BatchCheck(jnp.where(any_, codes[first], 0), token, seq, expected, found)


def _facts(
    batch: Batch,
    seq_pos_min: Int[Array, " seqs"],
    seq_pos_max: Int[Array, " seqs"],
    n_seq_max: int,
    n_vocab: int | None,
    history: Int[Array, " seqs"] | None = None,
) -> _Facts:
    member = seq_membership(batch, n_seq_max)
    running = jax.lax.cummax(jnp.where(member, batch.pos[:, None], -1), axis=0)
    prev = jnp.concatenate([jnp.full((1, n_seq_max), -1, jnp.int32), running[:-1]], axis=0)
    return _Facts(
        batch=batch,
        valid=_valid_tokens(batch),
        cols_ok=_seq_columns_valid(batch),
        member=member,
        prev=prev,
        seq_pos_min=seq_pos_min,
        seq_pos_max=seq_pos_max,
        n_vocab=n_vocab,
        history=history,
    )


def validate(
    batch: Batch,
    seq_pos_min: Int[Array, " seqs"],
    seq_pos_max: Int[Array, " seqs"],
    *,
    n_seq_max: int,
    n_vocab: int | None = None,
    output_all: bool = False,
    history: Int[Array, " seqs"] | None = None,
) -> tuple[Batch, BatchCheck]:
    """Validates a batch against spec §6.2 and fills in automatic positions.

    Args:
        batch: the batch.
        seq_pos_min: ``[n_seq_max]`` smallest position memory holds per sequence (-1 = none).
        seq_pos_max: ``[n_seq_max]`` largest position memory holds per sequence (-1 = none).
        n_seq_max: static number of sequence ids.
        n_vocab: static vocabulary size, or None to skip the token-id check (embeddings).
        output_all: every token must output (embeddings); flags are forced on (§6.2.3).
        history: ``[n_seq_max]`` an identity of each sequence's history, or None: a token that
            couples sequences also needs them to share it (the hybrid passes its recurrent tail
            cells: coupled sequences must share one state, §6.2.7).

    Returns:
        ``(batch, check)``: the batch with positions assigned (when ``auto_pos``) and output
        flags forced (when ``output_all``), and a :class:`BatchCheck`. Only trust the returned
        batch when ``check.code == OK``.

    Examples:
        >>> import jax.numpy as jnp
        >>> mem_min = mem_max = jnp.full((2,), -1, jnp.int32)
        >>> b, check = validate(make_batch([1, 2], seq_ids=[0, 1]), mem_min, mem_max, n_seq_max=2)
        >>> int(check.code), b.pos.tolist()
        (0, [0, 0])
    """
    chex_shape = (n_seq_max,)
    if seq_pos_min.shape != chex_shape or seq_pos_max.shape != chex_shape:
        raise InvalidArgumentError(
            f"seq_pos_min/max must have shape {chex_shape}, "
            f"got {seq_pos_min.shape} and {seq_pos_max.shape}"
        )
    valid = _valid_tokens(batch)
    member = seq_membership(batch, n_seq_max)
    pos = jnp.where(batch.auto_pos, _assign_positions(batch, member, seq_pos_max), batch.pos)
    output = batch.output | (valid if output_all else False)
    batch = batch._replace(pos=jnp.where(valid, pos.astype(jnp.int32), 0), output=output & valid)
    facts = _facts(batch, seq_pos_min, seq_pos_max, n_seq_max, n_vocab, history)
    return batch, _first_failing(_RULES, facts)


# --------------------------------------------------------------------------------------------
# Plans and splits (§6.4-§6.9)


class SplitKind(enum.IntEnum):
    """How a batch is cut into ubatches (§6.5-§6.7)."""

    SIMPLE = 0
    EQUAL = 1
    SEQ = 2


class UBatchPlan(NamedTuple):
    """The ubatches of a batch, in processing order (static shapes).

    Ubatch ``u < n_ubatches`` consists of the batch tokens
    ``order[start[u] : start[u] + n_tokens[u]]`` in that order. For the equal and seq splits the
    tokens are grouped by seq set: set ``k`` is ``[k * n_seq_tokens[u], (k+1) * n_seq_tokens[u])``;
    for the simple split every token is its own set (``n_seq_tokens == 1``).

    Attributes:
        order: batch indices in processing order (``n_batch`` long; padding repeats 0).
        start: first slot of each ubatch in ``order``.
        n_tokens: tokens per ubatch (``<= n_ubatch``, Q3 fixed).
        n_seqs: seq sets per ubatch (``n_tokens`` for the simple split).
        n_seq_tokens: tokens per seq set.
        n_ubatches: number of ubatches.
        complete: every real token was placed in a ubatch (else the batch cannot be split, e.g.
            coupled sequences under a sequential split, §6.6.1); callers fail with FAILED_PREPARE.
        out_ids: batch indices of the output tokens in processing order (-1 padded) (§6.4).
        n_outputs: number of output tokens.
    """

    order: Int[Array, " batch"]
    start: Int[Array, " ubatches"]
    n_tokens: Int[Array, " ubatches"]
    n_seqs: Int[Array, " ubatches"]
    n_seq_tokens: Int[Array, " ubatches"]
    n_ubatches: Scalar
    complete: ScalarBool
    out_ids: Int[Array, " batch"]
    n_outputs: Scalar


class UBatch(NamedTuple):
    """One ubatch materialised from a batch and a plan, padded to ``n_ubatch`` (§6.3).

    Slots ``t >= n_tokens`` are padding (``valid`` False, ``seq`` all False, ``seq_id`` -1).
    Token ``t`` belongs to seq set ``t // n_seq_tokens``.
    """

    token: Int[Array, " ubatch"]
    embd: Float[Array, "ubatch embd"] | None
    pos: Int[Array, " ubatch"]
    seq_id: Int[Array, "ubatch seq_ids"]
    seq: Bool[Array, "ubatch seqs"]
    output: Bool[Array, " ubatch"]
    batch_idx: Int[Array, " ubatch"]
    valid: Bool[Array, " ubatch"]
    n_tokens: Scalar
    n_seqs: Scalar
    n_seq_tokens: Scalar

    @property
    def primary(self) -> Int[Array, " ubatch"]:
        """The first seq id of each token (-1 in padding)."""
        return self.seq_id[:, 0]

    @property
    def seq_set(self) -> Int[Array, " ubatch"]:
        """Index of each token's seq set inside the ubatch (-1 in padding)."""
        t = jnp.arange(self.valid.shape[0], dtype=jnp.int32)
        return jnp.where(self.valid, t // jnp.maximum(self.n_seq_tokens, 1), -1)


def get_ubatch(batch: Batch, plan: UBatchPlan, u, *, n_ubatch: int, n_seq_max: int) -> UBatch:
    """Materialises ubatch ``u`` (may be traced) of ``plan`` as a padded :class:`UBatch`."""
    n_batch = batch.capacity
    t = jnp.arange(n_ubatch, dtype=jnp.int32)
    u = jnp.asarray(u, jnp.int32)
    in_range = u < plan.n_ubatches
    n_tok = jnp.where(in_range, plan.n_tokens[u], 0)
    valid = t < n_tok
    bidx = plan.order[jnp.clip(plan.start[u] + t, 0, n_batch - 1)]
    bidx = jnp.where(valid, bidx, 0)
    member = seq_membership(batch, n_seq_max)[bidx] & valid[:, None]
    return UBatch(
        token=jnp.where(valid, batch.token[bidx], 0),
        embd=None if batch.embd is None else jnp.where(valid[:, None], batch.embd[bidx], 0),
        pos=jnp.where(valid, batch.pos[bidx], 0),
        seq_id=jnp.where(valid[:, None], batch.seq_id[bidx], -1),
        seq=member,
        output=valid & batch.output[bidx],
        batch_idx=jnp.where(valid, bidx, -1),
        valid=valid,
        n_tokens=n_tok,
        n_seqs=jnp.where(in_range, plan.n_seqs[u], 0),
        n_seq_tokens=jnp.where(in_range, plan.n_seq_tokens[u], 0),
    )


def _finish_plan(
    batch: Batch,
    order,
    start,
    n_tokens,
    n_seqs,
    n_seq_tokens,
    n_ubatches,
    placed: Bool[Array, " batch"],
) -> UBatchPlan:
    n_batch = batch.capacity
    valid = _valid_tokens(batch)
    total = jnp.sum(n_tokens)
    slot_ok = jnp.arange(n_batch) < total
    is_out = slot_ok & batch.output[order]
    row = jnp.cumsum(is_out) - 1
    out_ids = jnp.full((n_batch,), -1, jnp.int32)
    out_ids = out_ids.at[jnp.where(is_out, row, n_batch)].set(order, mode="drop")
    complete = jnp.all(placed | ~valid) & (batch.n_tokens > 0) & (batch.n_tokens <= n_batch)
    return UBatchPlan(
        order=jnp.where(slot_ok, order, 0).astype(jnp.int32),
        start=start.astype(jnp.int32),
        n_tokens=n_tokens.astype(jnp.int32),
        n_seqs=n_seqs.astype(jnp.int32),
        n_seq_tokens=n_seq_tokens.astype(jnp.int32),
        n_ubatches=jnp.asarray(n_ubatches, jnp.int32),
        complete=complete,
        out_ids=out_ids,
        n_outputs=jnp.sum(is_out).astype(jnp.int32),
    )


def _n_ubatches_bound(batch: Batch, max_ubatches: int | None) -> int:
    return batch.capacity if max_ubatches is None else max_ubatches


def split_simple(batch: Batch, *, n_ubatch: int, max_ubatches: int | None = None) -> UBatchPlan:
    """Consecutive chunks of ``n_ubatch`` tokens in batch order (§6.5)."""
    n_batch = batch.capacity
    n_max = _n_ubatches_bound(batch, max_ubatches)
    n = jnp.clip(batch.n_tokens, 0, n_batch)
    n_ub = jnp.minimum((n + n_ubatch - 1) // n_ubatch, n_max)
    u = jnp.arange(n_max, dtype=jnp.int32)
    start = u * n_ubatch
    n_tok = jnp.where(u < n_ub, jnp.clip(n - start, 0, n_ubatch), 0)
    order = jnp.arange(n_batch, dtype=jnp.int32)
    placed = order < jnp.minimum(n, n_ub * n_ubatch)
    return _finish_plan(
        batch,
        order,
        jnp.where(u < n_ub, start, 0),
        n_tok,
        n_tok,
        jnp.minimum(n_tok, 1),
        n_ub,
        placed,
    )


def _set_keys(member: Bool[Array, "batch seqs"], valid) -> Int[Array, " batch"]:
    """For each token, the index of the first token with exactly the same seq set."""
    mi = member.astype(jnp.int32)
    shared = mi @ mi.T
    size = jnp.sum(mi, axis=1)
    same = (shared == size[:, None]) & (shared == size[None, :]) & valid[None, :] & valid[:, None]
    return jnp.argmax(same, axis=1).astype(jnp.int32)


class _SplitState(NamedTuple):
    used: Bool[Array, " batch"]
    order: Int[Array, " batch"]
    start: Int[Array, " ubatches"]
    n_tokens: Int[Array, " ubatches"]
    n_seqs: Int[Array, " ubatches"]
    n_seq_tokens: Int[Array, " ubatches"]
    u: Scalar
    filled: Scalar
    stalled: ScalarBool


def _run_splits(batch: Batch, n_max: int, take_ubatch) -> UBatchPlan:
    """Repeatedly takes ubatches with ``take_ubatch(used) -> (sel, slot, n_seqs, n_seq_tokens)``
    until every real token is used, the bound is hit or no ubatch can be formed."""
    n_batch = batch.capacity
    valid = _valid_tokens(batch)
    zeros_u = jnp.zeros((n_max,), jnp.int32)
    init = _SplitState(
        used=~valid,
        order=jnp.zeros((n_batch,), jnp.int32),
        start=zeros_u,
        n_tokens=zeros_u,
        n_seqs=zeros_u,
        n_seq_tokens=zeros_u,
        u=jnp.int32(0),
        filled=jnp.int32(0),
        stalled=jnp.bool_(False),
    )
    ok_size = (batch.n_tokens > 0) & (batch.n_tokens <= n_batch)

    def cond(st: _SplitState):
        return ok_size & ~st.stalled & (st.u < n_max) & ~jnp.all(st.used)

    def body(st: _SplitState):
        sel, slot, n_seqs, n_seq_tokens = take_ubatch(st.used)
        n_tok = jnp.sum(sel).astype(jnp.int32)
        dest = jnp.where(sel, st.filled + slot, n_batch)
        order = st.order.at[dest].set(jnp.arange(n_batch, dtype=jnp.int32), mode="drop")
        stalled = n_tok == 0
        keep = ~stalled
        return _SplitState(
            used=st.used | sel,
            order=order,
            start=st.start.at[st.u].set(jnp.where(keep, st.filled, 0)),
            n_tokens=st.n_tokens.at[st.u].set(n_tok),
            n_seqs=st.n_seqs.at[st.u].set(jnp.where(keep, n_seqs, 0)),
            n_seq_tokens=st.n_seq_tokens.at[st.u].set(jnp.where(keep, n_seq_tokens, 0)),
            u=st.u + keep.astype(jnp.int32),
            filled=st.filled + n_tok,
            stalled=stalled,
        )

    st = jax.lax.while_loop(cond, body, init)
    return _finish_plan(
        batch, st.order, st.start, st.n_tokens, st.n_seqs, st.n_seq_tokens, st.u, st.used & valid
    )


def split_equal(
    batch: Batch,
    *,
    n_ubatch: int,
    n_seq_max: int,
    sequential: bool,
    max_ubatches: int | None = None,
) -> UBatchPlan:
    """Equal split (§6.6): disjoint seq sets advanced in lock-step, ``<= n_ubatch`` tokens (Q3).

    With ``sequential`` the chosen sets' primary ids must be consecutive (needed for per-sequence
    KV streams) and a batch with coupled sequences (multi-sequence tokens) cannot be split at all:
    the plan is then returned with ``complete == False`` and no ubatches.
    """
    n_batch = batch.capacity
    valid = _valid_tokens(batch)
    member = seq_membership(batch, n_seq_max)
    primary = batch.seq_id[:, 0]
    key = _set_keys(member, valid)
    has_coupled = jnp.any(valid & (batch.n_seq_id > 1))
    blocked = jnp.bool_(sequential) & has_coupled
    perm = jnp.argsort(key, stable=True)  # tokens grouped by set, batch order inside a set
    key_sorted = key[perm]
    idx = jnp.arange(n_batch, dtype=jnp.int32)

    def take_ubatch(used):
        # 1. Choose seq sets in batch order: disjoint from the chosen ones (and, if sequential,
        #    primary id = previous + 1), at most n_ubatch of them (Q3 fix).
        def choose(carry, xs):
            taken, n_sets, last, chosen, rank_of = carry
            _, m, p, k, free = xs
            ok = free & ~jnp.any(m & taken) & (n_sets < n_ubatch)
            if sequential:
                ok = ok & ((n_sets == 0) | (p == last + 1))
            taken = taken | (m & ok)
            chosen = chosen.at[k].set(chosen[k] | ok)
            rank_of = rank_of.at[k].set(jnp.where(ok, n_sets, rank_of[k]))
            return (taken, n_sets + ok, jnp.where(ok, p, last), chosen, rank_of), None

        init = (
            jnp.zeros((n_seq_max,), bool),
            jnp.int32(0),
            jnp.int32(-2),
            jnp.zeros((n_batch,), bool),
            jnp.zeros((n_batch,), jnp.int32),
        )
        free = valid & ~used & ~blocked
        (_, n_sets, _, chosen, rank_of), _ = jax.lax.scan(
            choose, init, (idx, member, primary, key, free)
        )
        # 2. Lock-step fill: c tokens from every chosen set, c = min(available, n_ubatch // sets).
        avail = jax.ops.segment_sum((valid & ~used).astype(jnp.int32), key, n_batch)
        c_avail = jnp.min(jnp.where(chosen, avail, n_batch))
        c = jnp.minimum(c_avail, n_ubatch // jnp.maximum(n_sets, 1))
        c = jnp.where(n_sets > 0, c, 0)
        # Rank of each unused token inside its set (exclusive segmented cumsum, in batch order).
        unused_sorted = (valid & ~used)[perm].astype(jnp.int32)
        cs = jnp.cumsum(unused_sorted) - unused_sorted
        base = jax.ops.segment_min(cs, key_sorted, n_batch)
        rank = jnp.zeros((n_batch,), jnp.int32).at[perm].set(cs - base[key_sorted])
        sel = valid & ~used & chosen[key] & (rank < c)
        slot = rank_of[key] * c + rank
        return sel, slot, n_sets, c

    return _run_splits(batch, _n_ubatches_bound(batch, max_ubatches), take_ubatch)


def split_seq(
    batch: Batch, *, n_ubatch: int, n_seq_max: int, max_ubatches: int | None = None
) -> UBatchPlan:
    """Seq split (§6.7): from the first unused token, add later unused tokens whose seq set is a
    subset of the current one (the current set narrows to it), up to ``n_ubatch`` tokens."""
    n_batch = batch.capacity
    valid = _valid_tokens(batch)
    member = seq_membership(batch, n_seq_max)
    idx = jnp.arange(n_batch, dtype=jnp.int32)

    def take_ubatch(used):
        free = valid & ~used
        first = jnp.argmax(free).astype(jnp.int32)

        def step(carry, xs):
            cur, count = carry
            i, m, f = xs
            subset = ~jnp.any(m & ~cur)
            ok = f & (i >= first) & (count < n_ubatch) & ((i == first) | subset)
            return (jnp.where(ok, m, cur), count + ok), (ok, count)

        (_, _), (sel, slot) = jax.lax.scan(step, (member[first], jnp.int32(0)), (idx, member, free))
        return sel, slot, jnp.int32(1), jnp.sum(sel).astype(jnp.int32)

    return _run_splits(batch, _n_ubatches_bound(batch, max_ubatches), take_ubatch)


def split(
    batch: Batch,
    kind: SplitKind,
    *,
    n_ubatch: int,
    n_seq_max: int,
    sequential: bool = False,
    max_ubatches: int | None = None,
) -> UBatchPlan:
    """Dispatches on the static ``kind`` to the simple, equal or seq split."""
    if n_ubatch < 1:
        raise InvalidArgumentError(f"n_ubatch must be >= 1, got {n_ubatch}")
    kind = SplitKind(kind)
    if kind == SplitKind.SIMPLE:
        return split_simple(batch, n_ubatch=n_ubatch, max_ubatches=max_ubatches)
    if kind == SplitKind.EQUAL:
        return split_equal(
            batch,
            n_ubatch=n_ubatch,
            n_seq_max=n_seq_max,
            sequential=sequential,
            max_ubatches=max_ubatches,
        )
    return split_seq(batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max, max_ubatches=max_ubatches)
