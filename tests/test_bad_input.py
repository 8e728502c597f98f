"""Integer arguments are never converted (docs/semantics.md §15.6): a float, a bool or NaN where an
integer is due, or an integer outside int32, is refused with a clear error before any device work,
in the batch builder and in every sequence operation of the three memory layers."""

from __future__ import annotations

import numpy as np
import pytest

import jaxhybrid as jh

N_SEQ = 2
KV = jh.KVConfig(kv_size=8, n_seq_max=N_SEQ)
RECURRENT = jh.RecurrentConfig(n_seq_max=N_SEQ)
HYBRID = jh.HybridConfig.from_layers([True, False], KV, RECURRENT)
LAYERS = {
    "kv": (jh.kv, jh.kv.init_kv_cache(KV), KV),
    "recurrent": (jh.recurrent, jh.recurrent.init_recurrent(RECURRENT), RECURRENT),
    "hybrid": (jh, jh.init_hybrid(HYBRID), HYBRID),
}
NOT_INTEGERS = [1.7, -1.5, float("nan"), True, np.float32(1.0), np.bool_(False), np.array(0.5)]
OUTSIDE_INT32 = [2**31, -(2**31) - 1, 2**70, np.int64(2**40), np.array(2**33)]


def _ops(mod, mem, cfg, bad):
    """Every sequence operation with ``bad`` in each of its integer argument slots."""
    good = dict(seq=0, p0=0, p1=-1)
    for name in ("seq", "p0", "p1"):
        args = {**good, name: bad}
        yield f"seq_rm[{name}]", lambda a=args: mod.seq_rm(mem, a["seq"], a["p0"], a["p1"], cfg)
    yield "seq_cp[src]", lambda: mod.seq_cp(mem, bad, 1, 0, -1, cfg)
    yield "seq_cp[dst]", lambda: mod.seq_cp(mem, 0, bad, 0, -1, cfg)
    yield "seq_keep[seq]", lambda: mod.seq_keep(mem, bad, cfg)
    yield "seq_add[delta]", lambda: mod.seq_add(mem, 0, 0, -1, bad, cfg)
    yield "seq_div[d]", lambda: mod.seq_div(mem, 0, 0, -1, bad, cfg)
    yield "seq_pos_max[seq]", lambda: mod.seq_pos_max(mem, bad, cfg)


BAD_SCALARS = [(bad, jh.InvalidTypeError, "must be an integer") for bad in NOT_INTEGERS] + [
    (bad, jh.InvalidArgumentError, "outside int32") for bad in OUTSIDE_INT32
]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("bad, error, message", BAD_SCALARS, ids=lambda x: repr(x)[:24])
def test_sequence_operations_refuse_what_is_not_an_int32_integer(layer, bad, error, message):
    mod, mem, cfg = LAYERS[layer]
    for name, op in _ops(mod, mem, cfg, bad):
        with pytest.raises(error, match=message):
            op()
            pytest.fail(f"{name} accepted {bad!r}")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(tokens=[1, 2.0]), jh.InvalidTypeError, r"tokens\[1\] must be an integer"),
        (dict(tokens=[1, True]), jh.InvalidTypeError, r"tokens\[1\] must be an integer"),
        (dict(tokens=[float("nan")]), jh.InvalidTypeError, r"tokens\[0\]"),
        (dict(tokens=np.array([1.0, 2.0])), jh.InvalidTypeError, "dtype float64"),
        (dict(tokens=np.array([True])), jh.InvalidTypeError, "dtype bool"),
        (dict(tokens=[2**31]), jh.InvalidArgumentError, r"tokens\[0\] = 2147483648"),
        (dict(tokens=[2**70]), jh.InvalidArgumentError, "outside int32"),
        (dict(tokens=[1], pos=[2**31]), jh.InvalidArgumentError, r"pos\[0\]"),
        (dict(tokens=[1], pos=[0.0]), jh.InvalidTypeError, r"pos\[0\]"),
        (dict(tokens=[1], pos=np.array([2**40])), jh.InvalidArgumentError, r"pos\[0\]"),
        (dict(tokens=[1], seq_ids=[1.7]), jh.InvalidTypeError, r"seq_ids\[0\]"),
        (dict(tokens=[1], seq_ids=[True]), jh.InvalidTypeError, r"seq_ids\[0\]"),
        (dict(tokens=[1], seq_ids=[[0, 1.0]]), jh.InvalidTypeError, r"seq_ids\[0\]\[1\]"),
        (dict(tokens=[1], seq_ids=[2**32]), jh.InvalidArgumentError, r"seq_ids\[0\]"),
    ],
)
def test_make_batch_refuses_what_is_not_an_int32_integer(kwargs, error, message):
    with pytest.raises(error, match=message):
        jh.make_batch(**kwargs)


def test_integers_of_every_kind_are_accepted():
    # Python ints, NumPy integer scalars and arrays of any integer width, inside int32
    b = jh.make_batch(
        np.array([5, 6], np.int64), pos=[np.int16(0), 1], seq_ids=[np.uint8(1), [0, np.int64(1)]]
    )
    assert b.token.tolist() == [5, 6] and b.pos.tolist() == [0, 1]
    assert b.seq_id.tolist() == [[1, -1], [0, 1]]
    _, ok = jh.seq_rm(jh.init_hybrid(HYBRID), np.int64(1), np.int32(0), -1, HYBRID)
    assert bool(ok)
