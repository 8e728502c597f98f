"""The Mamba-2 (SSD) scan and mixer: the chunked and recurrent forms against each other and a NumPy
recurrence over seq sets with gaps and padding; the mixer against transformers' Bamba, Nemotron-H
and Falcon-H1 mixers, and its states across ubatches, padding and token slots."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxhybrid as jh
from jaxhybrid.models._mamba import ParamInit, set_spans
from jaxhybrid.models._mamba2 import SSD_RECURRENT_MAX_TOKENS, Mamba2Mixer, ssd

jax.config.update("jax_enable_x64", False)

# The tests check values, not speed: LLVM's optimisation level 0 halves their compile time.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# ---------------------------------------------------------------------------------------------
# ssd

# Sets crossing the 8-slot chunk boundaries, padding between sets and at the end, set 4 empty.
SSD_LAYOUT = [0] * 7 + [-1] * 2 + [1] * 12 + [2] + [-1] * 3 + [3] * 9 + [-1] * 3
SSD_SETS, SSD_CHUNK = 5, 8
H, P, G, N = 4, 3, 2, 5


@functools.cache
def _ssd_inputs():
    rng = np.random.default_rng(0)
    t = len(SSD_LAYOUT)
    f32 = np.float32
    return dict(
        x=rng.standard_normal((t, H, P)).astype(f32),
        dt=np.log1p(np.exp(rng.standard_normal((t, H)))).astype(f32),
        a=-np.exp(0.5 * rng.standard_normal(H)).astype(f32),
        b=rng.standard_normal((t, G, N)).astype(f32),
        c=rng.standard_normal((t, G, N)).astype(f32),
        ssm0=rng.standard_normal((SSD_SETS, H, P, N)).astype(f32),
        seq_set=np.asarray(SSD_LAYOUT, np.int32),
    )


def _ssd_call(method, seq_set, x, dt, a, b, c, ssm0):
    spans = set_spans(seq_set, ssm0.shape[0])
    return ssd(x, dt, a, b, c, ssm0, spans, chunk_size=SSD_CHUNK, method=method)


@functools.cache
def _ssd_result(method):
    i = _ssd_inputs()
    fn = _jit(functools.partial(_ssd_call, method))
    out = fn(i["seq_set"], i["x"], i["dt"], i["a"], i["b"], i["c"], i["ssm0"])
    return tuple(np.asarray(v) for v in out)


def _ssd_reference(x, dt, a, b, c, ssm0, seq_set):
    """Per set, token by token in float64; head ``h`` reads group ``h // (H // G)``."""
    state = ssm0.astype(np.float64).copy()
    y = np.zeros(x.shape, np.float64)
    tok = np.zeros((len(seq_set), *ssm0.shape[1:]), np.float64)
    per_group = x.shape[1] // b.shape[1]
    for t, s in enumerate(seq_set):
        if s < 0:
            continue
        for h in range(x.shape[1]):
            g = h // per_group
            decay = np.exp(float(dt[t, h]) * float(a[h]))
            state[s, h] = decay * state[s, h] + float(dt[t, h]) * np.outer(x[t, h], b[t, g])
            y[t, h] = state[s, h] @ c[t, g]
        tok[t] = state[s]
    return y, state, tok


def test_ssd_chunked_matches_recurrent():
    y_r, ssm_r, tok_r = _ssd_result("recurrent")
    y_c, ssm_c, tok_c = _ssd_result("chunked")
    valid = np.asarray(SSD_LAYOUT) >= 0
    # Outputs of padding slots are unspecified; states are defined on every slot (a padding slot
    # holds the state of the slot before it).
    np.testing.assert_allclose(y_c[valid], y_r[valid], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ssm_c, ssm_r, rtol=0, atol=1e-5)
    np.testing.assert_allclose(tok_c, tok_r, rtol=0, atol=1e-5)
    # The empty set keeps its state exactly, in both forms.
    ssm0 = _ssd_inputs()["ssm0"]
    np.testing.assert_array_equal(ssm_c[4], ssm0[4])
    np.testing.assert_array_equal(ssm_r[4], ssm0[4])


@pytest.mark.parametrize("method", ["recurrent", "chunked"])
def test_ssd_matches_numpy_reference(method):
    i = _ssd_inputs()
    y_ref, ssm_ref, tok_ref = _ssd_reference(
        i["x"], i["dt"], i["a"], i["b"], i["c"], i["ssm0"], i["seq_set"]
    )
    y, ssm, tok = _ssd_result(method)
    valid = i["seq_set"] >= 0
    np.testing.assert_allclose(y[valid], y_ref[valid], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ssm, ssm_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(tok[valid], tok_ref[valid], rtol=0, atol=1e-5)


def test_ssd_auto_picks_recurrent_for_small_ubatches():
    i = _ssd_inputs()

    def jaxpr(method, n_tokens):
        args = [i[k][:n_tokens] for k in ("seq_set", "x", "dt")]
        args += [i["a"], i["b"][:n_tokens], i["c"][:n_tokens], i["ssm0"]]
        return str(jax.make_jaxpr(functools.partial(_ssd_call, method))(*args))

    small, large = SSD_RECURRENT_MAX_TOKENS, SSD_RECURRENT_MAX_TOKENS + 1
    assert jaxpr("auto", small) == jaxpr("recurrent", small) != jaxpr("chunked", small)
    assert jaxpr("auto", large) == jaxpr("chunked", large) != jaxpr("recurrent", large)


def test_ssd_unknown_method_is_refused():
    i = _ssd_inputs()
    args = [i[k] for k in ("x", "dt", "a", "b", "c", "ssm0")]
    with pytest.raises(jh.InvalidArgumentError, match="method"):
        ssd(*args, None, chunk_size=SSD_CHUNK, method="fast")


# ---------------------------------------------------------------------------------------------
# Mamba2Mixer against transformers

HIDDEN, HEADS, HEAD_DIM, D_STATE, D_CONV, CHUNK = 32, 4, 8, 8, 4, 8
D_INNER = HEADS * HEAD_DIM
# One mixer ubatch shape for every mixer test: two prompts in two sets with padding between and
# after them (prompt 0 crosses two chunk boundaries, prompt 1 starts inside a chunk).
N_UB, N_SETS, LEN0, LEN1, START1 = 40, 2, 21, 16, 22


def _torch_mixer(family: str):
    """A transformers mixer with every parameter random, and the matching Mamba2Mixer kwargs."""
    import torch

    common = dict(num_hidden_layers=1, vocab_size=16)
    if family == "bamba":
        from transformers import BambaConfig
        from transformers.models.bamba.modeling_bamba import BambaMixer

        cfg = BambaConfig(
            hidden_size=HIDDEN,
            mamba_n_heads=HEADS,
            mamba_d_head=HEAD_DIM,
            mamba_expand=D_INNER // HIDDEN,
            mamba_n_groups=2,
            mamba_d_state=D_STATE,
            mamba_d_conv=D_CONV,
            mamba_chunk_size=CHUNK,
            attn_layer_indices=[],
            num_attention_heads=2,
            num_key_value_heads=2,
            **common,
        )
        module = BambaMixer(cfg, 0)
        kw = dict(n_groups=2, norm_eps=cfg.rms_norm_eps, norm_group_size=D_INNER // 2)
    elif family == "nemotron_h":
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

        cfg = NemotronHConfig(
            hidden_size=HIDDEN,
            mamba_num_heads=HEADS,
            mamba_head_dim=HEAD_DIM,
            n_groups=4,
            ssm_state_size=D_STATE,
            conv_kernel=D_CONV,
            chunk_size=CHUNK,
            layers_block_type=["mamba"],
            use_bias=True,
            time_step_min=0.4,  # clamps some of the time steps below
            **common,
        )
        module = NemotronHMamba2Mixer(cfg, 0)
        kw = dict(
            n_groups=4,
            norm_eps=cfg.layer_norm_epsilon,
            norm_group_size=D_INNER // 4,
            proj_bias=True,
            time_step_limit=(0.4, float("inf")),
        )
    else:
        from transformers import FalconH1Config
        from transformers.models.falcon_h1.modeling_falcon_h1 import (
            FalconH1Mixer,
            compute_mup_vector,
        )

        rms = family == "falcon_h1"
        cfg = FalconH1Config(
            hidden_size=HIDDEN,
            mamba_n_heads=HEADS,
            mamba_d_head=HEAD_DIM,
            mamba_d_ssm=D_INNER,
            mamba_n_groups=2,
            mamba_d_state=D_STATE,
            mamba_d_conv=D_CONV,
            mamba_chunk_size=CHUNK,
            mamba_rms_norm=rms,
            mamba_norm_before_gate=True,
            ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 2.0],
            ssm_in_multiplier=0.7,
            num_attention_heads=2,
            num_key_value_heads=2,
            **common,
        )
        module = FalconH1Mixer(cfg, 0)
        module.register_buffer("mup_vector", compute_mup_vector(cfg), persistent=False)
        kw = dict(
            n_groups=2,
            norm_eps=cfg.rms_norm_eps,
            norm_group_size=D_INNER // 2,
            gated_norm=rms,
            norm_before_gate=True,
        )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = {"A_log": 0.5, "dt_bias": 0.5, "D": 1.0, "norm.weight": 0.3}.get(name, 0.3)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if name == "norm.weight":
                p.add_(1.0)
    return module.eval(), kw


def _copy_weights(module, mixer: Mamba2Mixer):
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}

    def put(obj, attr, value):
        setattr(obj, attr, nnx.Param(jnp.asarray(np.ascontiguousarray(value), jnp.float32)))

    put(mixer.in_proj, "kernel", sd["in_proj.weight"].T)
    put(mixer.out_proj, "kernel", sd["out_proj.weight"].T)
    for name in ("in_proj", "out_proj"):
        if f"{name}.bias" in sd:
            put(getattr(mixer, name), "bias", sd[f"{name}.bias"])
        assert (getattr(mixer, name).bias is None) == (f"{name}.bias" not in sd)
    put(mixer, "conv_weight", sd["conv1d.weight"][:, 0, :].T)
    put(mixer, "conv_bias", sd["conv1d.bias"])
    for name in ("dt_bias", "A_log", "D"):
        put(mixer, name, sd[name])
    if mixer.norm is not None:
        put(mixer.norm, "weight", sd["norm.weight"])
    assert (mixer.norm is None) == ("norm.weight" not in sd)


class Family:
    """One transformers mixer, its JAX copy jitted for one ubatch shape, and the two prompts."""

    def __init__(self, family: str):
        import torch

        self.torch_module, kw = _torch_mixer(family)
        mixer = Mamba2Mixer(
            HIDDEN,
            ParamInit(0, jnp.float32, 0.02),
            n_heads=HEADS,
            head_dim=HEAD_DIM,
            d_state=D_STATE,
            d_conv=D_CONV,
            chunk_size=CHUNK,
            **kw,
        )
        _copy_weights(self.torch_module, mixer)
        self.mixer = mixer
        graphdef, state = nnx.split(mixer)
        self.in_scale = None
        self.x_scale = 1.0
        if family.startswith("falcon"):
            self.in_scale = jnp.asarray(self.torch_module.mup_vector.numpy().reshape(-1))
            self.x_scale = self.torch_module.ssm_in_multiplier

        @_jit
        def call(x, seq_set, conv0, ssm0):
            m = nnx.merge(graphdef, state)
            return m(x * self.x_scale, seq_set, conv0, ssm0, in_scale=self.in_scale)

        self.call = call
        self.conv_dim = mixer.conv_dim
        rng = np.random.default_rng(2)
        self.prompts = [rng.standard_normal((n, HIDDEN)).astype(np.float32) for n in (LEN0, LEN1)]
        with torch.no_grad():
            self.torch_out = [
                self.torch_module(torch.from_numpy(p)[None])[0].numpy() for p in self.prompts
            ]

    def zeros(self, n_sets=N_SETS):
        conv0 = np.zeros((n_sets, D_CONV - 1, self.conv_dim), np.float32)
        return conv0, np.zeros((n_sets, HEADS, HEAD_DIM, D_STATE), np.float32)

    def run(self, pieces, conv0=None, ssm0=None, n_tokens=N_UB, garbage_seed=3):
        """``pieces``: (first slot, set, token rows); every other slot is padding holding random
        values. Returns NumPy ``(out, conv, ssm, conv_tok, ssm_tok)``."""
        rng = np.random.default_rng(garbage_seed)
        x = 5.0 * rng.standard_normal((n_tokens, HIDDEN)).astype(np.float32)
        seq_set = np.full((n_tokens,), -1, np.int32)
        for first, s, rows in pieces:
            x[first : first + len(rows)] = rows
            seq_set[first : first + len(rows)] = s
        if conv0 is None:
            conv0, ssm0 = self.zeros(ssm0.shape[0] if ssm0 is not None else N_SETS)
        out, conv, ssm, (conv_tok, ssm_tok) = self.call(x, seq_set, conv0, ssm0)
        return tuple(np.asarray(v) for v in (out, conv, ssm, conv_tok, ssm_tok))

    @functools.cached_property
    def one_pass(self):
        return self.run([(0, 0, self.prompts[0]), (START1, 1, self.prompts[1])])


@functools.cache
def _family(name: str) -> Family:
    return Family(name)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("family", ["bamba", "nemotron_h", "falcon_h1", "falcon_h1_no_norm"])
def test_mixer_matches_transformers(family):
    f = _family(family)
    out = f.one_pass[0]
    assert _max_err(out[:LEN0], f.torch_out[0]) <= 1e-5
    assert _max_err(out[START1 : START1 + LEN1], f.torch_out[1]) <= 1e-5
    assert np.abs(f.torch_out[0]).max() > 0.1  # the comparison is not of near-zero outputs


def test_nemotron_time_step_floor_is_active():
    f = _family("nemotron_h")
    proj = np.asarray(f.mixer.in_proj(jnp.asarray(f.prompts[0])))
    dt = np.logaddexp(0.0, proj[:, -HEADS:] + np.asarray(f.mixer.dt_bias[...])[None])
    assert (dt < 0.4).any() and (dt > 0.4).any()


def test_two_ubatches_equal_one_pass():
    f = _family("bamba")
    p0, p1 = f.prompts
    out, conv, ssm, _, _ = f.one_pass
    # Set order, slots and padding differ between the ubatches; states carry over.
    out_a, conv_a, ssm_a, _, _ = f.run([(0, 0, p0[:9]), (13, 1, p1[:10])])
    out_b, conv_b, ssm_b, _, _ = f.run([(0, 1, p1[10:]), (9, 0, p0[9:])], conv_a, ssm_a)
    split0 = np.concatenate([out_a[:9], out_b[9 : 9 + LEN0 - 9]])
    split1 = np.concatenate([out_a[13:23], out_b[: LEN1 - 10]])
    assert _max_err(split0, out[:LEN0]) <= 1e-5
    assert _max_err(split1, out[START1 : START1 + LEN1]) <= 1e-5
    assert _max_err(conv_b, conv) <= 1e-6
    assert _max_err(ssm_b, ssm) <= 1e-5


def test_padding_changes_nothing():
    f = _family("bamba")
    p0, p1 = f.prompts
    pieces = [(0, 0, p0), (START1, 1, p1)]
    base = f.one_pass
    other = f.run(pieces, garbage_seed=4)
    valid = np.zeros((N_UB,), bool)
    valid[:LEN0] = valid[START1 : START1 + LEN1] = True
    np.testing.assert_array_equal(other[0][valid], base[0][valid])
    for a, b in zip(other[1:3], base[1:3], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(other[4][valid], base[4][valid])
    # Set 1 without tokens: its nonzero state comes back as it was; set 0 is unaffected.
    rng = np.random.default_rng(5)
    conv0, ssm0 = (rng.standard_normal(v.shape).astype(np.float32) for v in f.zeros())
    conv0[0], ssm0[0] = 0.0, 0.0
    alone = f.run([(0, 0, p0)], conv0, ssm0)
    np.testing.assert_array_equal(alone[1][1], conv0[1])
    np.testing.assert_array_equal(alone[2][1], ssm0[1])
    assert _max_err(alone[0][:LEN0], base[0][:LEN0]) <= 1e-6
    assert _max_err(alone[2][0], base[2][0]) <= 1e-6


def test_token_states_are_states_of_truncated_runs():
    f = _family("bamba")
    p0, p1 = f.prompts
    _, _, _, conv_tok, ssm_tok = f.one_pass
    for k0, k1 in [(1, 16), (3, 1), (8, 7), (9, 8), (17, 11), (20, 2)]:
        _, conv, ssm, _, _ = f.run([(0, 0, p0[:k0]), (START1, 1, p1[:k1])])
        for s, slot in ((0, k0 - 1), (1, START1 + k1 - 1)):
            assert _max_err(ssm_tok[slot], ssm[s]) <= 1e-5, (s, slot)
            assert _max_err(conv_tok[slot], conv[s]) <= 1e-6, (s, slot)


def test_decode_step_continues_the_prompt():
    # A 4-slot decode ubatch takes the recurrent form ("auto"); it continues each set from the
    # states after all but the last prompt token.
    assert SSD_RECURRENT_MAX_TOKENS >= 4
    f = _family("bamba")
    p0, p1 = f.prompts
    out, conv, ssm, conv_tok, ssm_tok = f.one_pass
    last0, last1 = LEN0 - 1, START1 + LEN1 - 1
    conv0 = np.stack([conv_tok[last0 - 1], conv_tok[last1 - 1]])
    ssm0 = np.stack([ssm_tok[last0 - 1], ssm_tok[last1 - 1]])
    step = f.run([(0, 1, p1[-1:]), (2, 0, p0[-1:])], conv0, ssm0, n_tokens=4)
    assert _max_err(step[0][2], out[last0]) <= 1e-5
    assert _max_err(step[0][0], out[last1]) <= 1e-5
    assert _max_err(step[1], conv) <= 1e-6
    assert _max_err(step[2], ssm) <= 1e-5
    np.testing.assert_array_equal(step[4][1], step[4][0])  # padding holds the state before it
