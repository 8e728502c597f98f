"""The Mamba selective scan's two forms (sequential on CPU, associative elsewhere) against a plain
NumPy recurrence over seq sets with gaps and padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhybrid.models._mamba import selective_scan, set_spans


def _reference(decay, inject, ssm0, seq_set):
    """``h[t] = decay[t] * h_prev + inject[t]`` per set, in float64, slot by slot."""
    state = ssm0.astype(np.float64).copy()
    h = np.zeros(decay.shape, np.float64)
    for t, s in enumerate(seq_set):
        if s < 0:
            continue
        state[s] = decay[t] * state[s] + inject[t]
        h[t] = state[s]
    return h, state


# Contiguous tokens per set, in any set order, sets missing, padding in between and at the end.
LAYOUTS = [
    [0, 1, 2, 3, 4, 5, 6, 7],  # a decode ubatch: one token per set
    [2, 2, 2, -1, 0, 0, 3, -1, -1, 3, 3, 3, 3, -1],
    [1] * 9 + [-1] * 3,
    [-1, -1, -1],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"T{len(x)}")
@pytest.mark.parametrize("method", ["sequential", "parallel", "auto"])
def test_scan_matches_the_recurrence(layout, method):
    rng = np.random.default_rng(len(layout))
    seq_set = np.asarray(layout, np.int32)
    n_sets, d, n = 8, 5, 3
    decay = rng.uniform(0.2, 1.0, (len(layout), d, n)).astype(np.float32)
    inject = rng.standard_normal((len(layout), d, n)).astype(np.float32)
    ssm0 = rng.standard_normal((n_sets, d, n)).astype(np.float32)
    spans = set_spans(jnp.asarray(seq_set), n_sets)
    h, ssm = jax.jit(lambda *a: selective_scan(*a, method=method))(
        jnp.asarray(decay), jnp.asarray(inject), jnp.asarray(ssm0), spans
    )
    h_ref, ssm_ref = _reference(decay, inject, ssm0, seq_set)
    valid = seq_set >= 0
    np.testing.assert_allclose(np.asarray(h)[valid], h_ref[valid], rtol=1e-5, atol=1e-5)
    # Sets without tokens keep their state exactly.
    np.testing.assert_allclose(np.asarray(ssm), ssm_ref, rtol=1e-5, atol=1e-5)
    untouched = np.setdiff1d(np.arange(n_sets), seq_set)
    np.testing.assert_array_equal(np.asarray(ssm)[untouched], ssm0[untouched])


def test_unknown_method_is_refused():
    spans = set_spans(jnp.zeros((1,), jnp.int32), 1)
    x = jnp.ones((1, 1, 1))
    with pytest.raises(ValueError, match="method"):
        selective_scan(x, x, x, spans, method="fast")
