"""The gated delta rule (:func:`jaxhybrid.models._gated_deltanet.gated_delta_rule`): the chunked
form against the one-step recurrence, both against transformers' own reference functions, on
ubatches of several seq sets with padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhybrid.models._gated_deltanet import gated_delta_rule, l2norm
from jaxhybrid.models._mamba import set_spans

H, DK, DV = 2, 4, 3
CHUNK = 8
# Sets of 5, 19 and 1 tokens with padding between and after them: the second set starts inside a
# chunk and spans three, the third starts and ends inside one.
LAYOUT = [0] * 5 + [-1] * 2 + [1] * 19 + [2] + [-1] * 3
N_SETS = 4  # the last set holds no token


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    n = len(LAYOUT)
    q = l2norm(jnp.asarray(rng.standard_normal((n, H, DK)), jnp.float32)) * DK**-0.5
    k = l2norm(jnp.asarray(rng.standard_normal((n, H, DK)), jnp.float32))
    v = jnp.asarray(rng.standard_normal((n, H, DV)), jnp.float32)
    g = -jnp.asarray(rng.uniform(0.01, 2.0, (n, H)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.05, 0.95, (n, H)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((N_SETS, H, DK, DV)), jnp.float32)
    return q, k, v, g, beta, s0


@pytest.fixture(scope="module")
def runs():
    args = _inputs()
    spans = set_spans(jnp.asarray(LAYOUT, jnp.int32), N_SETS)
    out = {}
    for method in ("recurrent", "chunked"):
        fn = jax.jit(lambda *a, m=method: gated_delta_rule(*a, spans, chunk_size=CHUNK, method=m))
        out[method] = [np.asarray(x) for x in fn(*args)]
    return args, out


def test_chunked_form_equals_the_recurrence(runs):
    _, out = runs
    valid = np.asarray(LAYOUT) >= 0
    (y_r, s_r, tok_r), (y_c, s_c, tok_c) = out["recurrent"], out["chunked"]
    np.testing.assert_allclose(y_c[valid], y_r[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(s_c, s_r, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tok_c[valid], tok_r[valid], atol=1e-5, rtol=0)
    assert np.all(np.isfinite(y_c)) and np.all(np.isfinite(tok_c))


def test_both_forms_equal_transformers_reference_per_set(runs):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as ref

    (q, k, v, g, beta, s0), out = runs
    layout = np.asarray(LAYOUT)

    def t(x):  # [T, ...] of one set -> [1, T, ...]
        return torch.from_numpy(np.asarray(x)[None].copy())

    for s in range(N_SETS):
        rows = np.flatnonzero(layout == s)
        if rows.size == 0:
            for method in out:
                np.testing.assert_array_equal(out[method][1][s], np.asarray(s0[s]))
            continue
        # transformers scales the queries itself.
        want_y, want_s = ref.torch_recurrent_gated_delta_rule(
            t(q[rows] * DK**0.5),
            t(k[rows]),
            t(v[rows]),
            g=t(g[rows]),
            beta=t(beta[rows]),
            initial_state=torch.from_numpy(np.asarray(s0[s : s + 1]).copy()),
            output_final_state=True,
        )
        for method, (y, s_fin, _) in out.items():
            np.testing.assert_allclose(y[rows], want_y[0].numpy(), atol=1e-5, err_msg=method)
            np.testing.assert_allclose(s_fin[s], want_s[0].numpy(), atol=1e-5, err_msg=method)


def test_token_states_are_states_of_truncated_runs(runs):
    # The state after token i of a set is the final state of the set's first i + 1 tokens.
    (q, k, v, g, beta, s0), out = runs
    layout = np.asarray(LAYOUT)
    rows = np.flatnonzero(layout == 1)[:11]
    cut = np.where(np.isin(np.arange(len(LAYOUT)), rows), 0, -1).astype(np.int32)
    spans = set_spans(jnp.asarray(cut), 1)
    _, s_cut, _ = gated_delta_rule(
        q, k, v, g, beta, s0[1:2], spans, chunk_size=CHUNK, method="chunked"
    )
    np.testing.assert_allclose(out["chunked"][2][rows[-1]], np.asarray(s_cut[0]), atol=1e-5)


def test_unknown_method_is_refused():
    import jaxhybrid as jh

    q, k, v, g, beta, s0 = _inputs()
    spans = set_spans(jnp.asarray(LAYOUT, jnp.int32), N_SETS)
    with pytest.raises(jh.InvalidArgumentError, match="method"):
        gated_delta_rule(q, k, v, g, beta, s0, spans, method="parallel")
