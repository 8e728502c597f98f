"""Falcon-H1 in Flax NNX against transformers' ``FalconH1ForCausalLM``, through the hybrid memory.

Checkpoints are tiny, seeded and written by transformers (``tests/family_falcon_h1.py``); they are
read back by :func:`jaxhybrid.models.falcon_h1.load_falcon_h1` and run by the serving layer's
:func:`jaxhybrid.serving.prefill` on the real hybrid memory, where every layer is a
``LayerKind.BOTH`` layer. Prompts and greedy decode steps share one compiled prefill per model
(compiling is most of this file's time).
"""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
nnx = pytest.importorskip("flax.nnx")

import family_falcon_h1 as ff  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import jaxhybrid as jh  # noqa: E402
from jaxhybrid.models.falcon_h1 import (  # noqa: E402
    FalconH1Config,
    FalconH1Model,
    falcon_h1_tensor_shapes,
    init_falcon_h1,
    load_falcon_h1,
    mup_vector,
)
from jaxhybrid.serving import prefill  # noqa: E402

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

# 33 and 100 are longer than two chunks of the mixer (mamba_chunk_size=16), and the prompts run in
# ubatches of 64 slots, so the mixer's chunked form runs over several chunks and seq sets,
# continuing each sequence's state from one ubatch to the next.
PROMPT_LENGTHS = (1, 7, 33, 100)
PARITY_TOL = 1e-4
N_NEW = 32


class Case:
    """A saved checkpoint, our model loaded from it, and one compiled prefill for everything.

    Every call of :func:`jaxhybrid.serving.prefill` here has the same shapes (``n_rows`` rows of
    ``width`` tokens, ``n_ubatch``-slot ubatches), so prompts and greedy decode steps share one
    compilation.
    """

    def __init__(self, path, params, *, lengths, n_ubatch):
        self.path, self.params = path, params
        self.config, self.model = load_falcon_h1(path)
        self.plugin = FalconH1Model(self.config)
        rng = np.random.default_rng(7)
        self.prompts = [rng.integers(0, params["vocab_size"], n).tolist() for n in lengths]
        self.n_rows, self.width, self.n_ubatch = len(lengths), max(lengths), n_ubatch
        self.cfg = self.plugin.memory_config(kv_size=256, n_seq_max=self.n_rows)

    def run(self, mem, rows: dict[int, list[int]]):
        """Decodes ``rows`` (sequence -> its next tokens) through the hybrid memory ``mem``
        (donated); returns every token's logits per sequence and the memory."""
        toks = np.zeros((self.n_rows, self.width), np.int32)
        lens = np.zeros((self.n_rows,), np.int32)
        for s, t in rows.items():
            toks[s, : len(t)], lens[s] = t, len(t)
        logits, mem, code = prefill(
            self.plugin,
            self.model,
            mem,
            jnp.asarray(toks),
            jnp.asarray(lens),
            jnp.arange(self.n_rows, dtype=jnp.int32),
            cfg=self.cfg,
            n_ubatch=self.n_ubatch,
            output_all=True,
        )
        assert int(code) == jh.DecodeCode.OK
        logits = np.asarray(logits)
        return {s: logits[s, : len(t)] for s, t in rows.items()}, mem

    def prompt_logits(self) -> list[np.ndarray]:
        """Every prompt's logits, all prompts decoded together from a fresh memory."""
        out, _ = self.run(jh.init_hybrid(self.cfg), dict(enumerate(self.prompts)))
        return [out[s] for s in range(self.n_rows)]

    def greedy(self, prompts: list[list[int]], n_new: int) -> list[list[int]]:
        """Greedy tokens of the prompts decoded together, then one token per sequence per step."""
        out, mem = self.run(jh.init_hybrid(self.cfg), dict(enumerate(prompts)))
        new = [[int(np.argmax(out[s][-1]))] for s in range(len(prompts))]
        for _ in range(n_new - 1):
            out, mem = self.run(mem, {s: g[-1:] for s, g in enumerate(new)})
            for s, g in enumerate(new):
                g.append(int(np.argmax(out[s][-1])))
        return new


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = ff.tiny_checkpoint(tmp_path_factory.mktemp("falcon_h1"), seed=1)
    return Case(path, ff.HF_CONFIG, lengths=PROMPT_LENGTHS, n_ubatch=64)


@pytest.fixture(scope="module")
def other_case(tmp_path_factory):
    path = ff.tiny_checkpoint(
        tmp_path_factory.mktemp("falcon_h1_other"), ff.HF_CONFIG_OTHER, seed=2
    )
    # Ubatches of at most 16 slots: the mixer's recurrent form.
    return Case(path, ff.HF_CONFIG_OTHER, lengths=(1, 7, 12), n_ubatch=16)


def _parity(case, record_property) -> dict[int, float]:
    ours = case.prompt_logits()
    diffs = {
        len(p): float(np.abs(got - ff.hf_logits(case.path, p)).max())
        for p, got in zip(case.prompts, ours, strict=True)
    }
    record_property("max_abs_logit_diff", diffs)
    print("falcon_h1 parity", diffs)
    return diffs


# --------------------------------------------------------------------------------------------
# Parity with transformers


def test_prefill_matches_transformers(case, record_property):
    # Given four prompts of lengths 1, 7, 33 and 100 decoded together in ubatches of 64 slots
    # When transformers runs each prompt alone
    diffs = _parity(case, record_property)
    # Then every logit agrees
    assert max(diffs.values()) <= PARITY_TOL, diffs


def test_greedy_generation_matches_transformers(case):
    # Given two prompts decoded together, then 32 greedy tokens each, one token per sequence per
    # step, through the same memory
    prompts = [case.prompts[1], case.prompts[2][:20]]
    got = case.greedy(prompts, N_NEW)
    # When transformers generates greedily from each prompt alone
    want = [ff.hf_greedy(case.path, p, N_NEW) for p in prompts]
    # Then the tokens are identical
    assert got == want


def test_other_options_match_transformers(other_case, record_property):
    # Given the other branch of every option (tied embeddings, no mixer norm, out_proj bias only,
    # no conv bias, MHA, mamba_d_ssm from mamba_expand), prompts of 1, 7 and 12 tokens in ubatches
    # of 16 slots (the mixer's recurrent form)
    diffs = _parity(other_case, record_property)
    # Then the logits agree with transformers'
    assert max(diffs.values()) <= PARITY_TOL, diffs


# --------------------------------------------------------------------------------------------
# Config


def test_config_matches_transformers():
    # Given the tiny configs in transformers
    for params in (ff.HF_CONFIG, ff.HF_CONFIG_OTHER):
        hf = ff.hf_config(**params)
        cfg = FalconH1Config.from_hf(hf.to_dict())
        # Then the derived sizes and the μP vector agree with transformers'
        assert cfg.mamba_d_head == hf.mamba_d_head
        assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
        assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
        assert cfg.time_step_limit == tuple(hf.time_step_limit)
        from transformers.models.falcon_h1.modeling_falcon_h1 import compute_mup_vector

        np.testing.assert_array_equal(mup_vector(cfg), compute_mup_vector(hf).reshape(-1).numpy())
    # And the other config derived mamba_d_ssm from mamba_expand
    other = FalconH1Config.from_hf(ff.hf_config(**ff.HF_CONFIG_OTHER).to_dict())
    assert other.mamba_d_ssm == 64 and other.mamba_d_head == 8


def test_config_reads_config_json(case):
    with open(os.path.join(case.path, "config.json")) as f:
        raw = json.load(f)
    # transformers writes the infinite time-step bound as {"__float__": "Infinity"}
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}
    assert FalconH1Config.from_hf(raw) == case.config
    assert case.config.time_step_limit == (0.0, float("inf"))
    assert FalconH1Config.from_hf(case.path, dtype="bfloat16").dtype == "bfloat16"
    # Older files: top-level rope_theta, a bare Infinity
    old = dict(raw, rope_theta=5000.0, time_step_limit=[0.0, float("inf")])
    del old["rope_parameters"]
    assert FalconH1Config.from_hf(old) == case.config


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        ({"mamba_n_heads": 6.0}, TypeError, "mamba_n_heads must be an int"),
        ({"mamba_rms_norm": "true"}, TypeError, "mamba_rms_norm must be a bool"),
        ({"key_multiplier": "0.7"}, TypeError, "key_multiplier must be a number"),
        ({"ssm_multipliers": [1.0, 1.0]}, ValueError, "ssm_multipliers must hold 5"),
        ({"mamba_d_head": 7}, ValueError, "mamba_d_ssm"),
        ({"hidden_act": "gelu"}, ValueError, "silu"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, ValueError, "default"),
        (
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            ValueError,
            "partial_rotary_factor",
        ),
        ({"time_step_limit": [0.1, 0.01]}, ValueError, "time_step_limit"),
    ],
)
def test_config_refuses_bad_fields(edit, error, message):
    raw = dict(ff.hf_config(**ff.HF_CONFIG).to_dict(), **edit)
    with pytest.raises(error, match=message):
        FalconH1Config.from_hf(raw)


# --------------------------------------------------------------------------------------------
# Plug-in


def test_memory_config_routes_every_layer_to_both_parts(case):
    c = case.config
    layout = case.plugin.memory_layout()
    assert layout["layer_kinds"] == [jh.LayerKind.BOTH] * c.num_hidden_layers
    cfg = case.plugin.memory_config(kv_size=32, n_seq_max=2)
    every = tuple(range(c.num_hidden_layers))
    # Every layer owns KV rows (attn_layer i) and recurrent states (mamba_layer i)
    assert cfg.attn_layers == every and cfg.recurrent_layers == every
    assert cfg.kv.n_kv_heads == 2 and cfg.kv.head_dim_k == 12
    assert cfg.recurrent.r_shape == (3, 48 + 2 * 2 * 8)
    assert cfg.recurrent.s_shape == (6, 8, 8)
    # And K-shifts rotate with the model's RoPE (NeoX layout, the whole head)
    assert case.plugin.rope_fn == jh.kv.rope_shift_fn(theta=5000.0, neox=True)
    assert hash(FalconH1Model(c)) == hash(case.plugin)


def test_init_has_the_structure_of_a_loaded_checkpoint(case, other_case):
    for c in (case, other_case):
        chex.assert_trees_all_equal_shapes_and_dtypes(
            nnx.state(init_falcon_h1(c.config, seed=0)), nnx.state(c.model)
        )


# --------------------------------------------------------------------------------------------
# Loader


def _copy_with(src, dst, edit):
    """Copies a single-file checkpoint, editing its tensor dict with ``edit``."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_loader_reports_a_missing_tensor(case, tmp_path):
    name = "model.layers.1.mamba.dt_bias"
    path = _copy_with(case.path, tmp_path, lambda t: t.pop(name))
    assert falcon_h1_tensor_shapes(case.config)[name] == (6,)
    with pytest.raises(ValueError, match=rf"missing tensor '{name}' \(expected shape \(6,\)\)"):
        load_falcon_h1(path)


def test_loader_reports_a_wrong_shape(case, tmp_path):
    name = "model.layers.0.mamba.in_proj.weight"

    def edit(t):
        t[name] = np.zeros((133, 32), np.float32)

    path = _copy_with(case.path, tmp_path, edit)
    with pytest.raises(
        ValueError, match=rf"'{name}' has shape \(133, 32\), expected shape \(134, 32\)"
    ):
        load_falcon_h1(path)


def test_loader_refuses_a_config_field_of_the_wrong_type(case, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(case.path, dst)
    with open(dst / "config.json") as f:
        raw = json.load(f)
    raw["mamba_d_state"] = "8"
    with open(dst / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(TypeError, match=r"FalconH1Config\.mamba_d_state must be an int"):
        load_falcon_h1(dst)


def test_loader_ignores_a_stored_mup_vector_and_a_tied_head(case, other_case, tmp_path):
    # Given checkpoints holding transformers' (non-persistent) μP buffer, and a tied LM head
    def edit(t):
        t["model.layers.1.mamba.mup_vector"] = np.full((1, 1, 134), 5.0, np.float32)

    path = _copy_with(case.path, tmp_path / "mup", edit)
    _, model = load_falcon_h1(path)
    # Then the buffer is ignored (derived from the config, as transformers does)
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(case.model))
    # And a tied checkpoint has no lm_head in our model, whether the file holds one or not
    assert other_case.model.lm_head is None
    assert "lm_head.weight" not in falcon_h1_tensor_shapes(other_case.config)

    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    _, tied = load_falcon_h1(_copy_with(other_case.path, tmp_path / "tied", add_head))
    chex.assert_trees_all_equal(nnx.state(tied), nnx.state(other_case.model))
