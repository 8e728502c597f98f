"""Granite-4.0-H in Flax NNX against transformers' ``GraniteMoeHybridForCausalLM``, through the
hybrid memory.

Two tiny seeded checkpoints (``family_granite``) are written by transformers' ``save_pretrained``
and read back by :func:`jaxhybrid.models.granite_hybrid.load_granite_hybrid`: the MoE one with
RoPE and every μP multiplier, and the other branches (no positional encoding, no experts, untied
embeddings, biases). Every forward of a checkpoint runs through :func:`jaxhybrid.serving.prefill`
with the same static shapes, so it compiles once; the second checkpoint's forward runs alone.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
nnx = pytest.importorskip("flax.nnx")

import family_bamba as fb  # noqa: E402
import family_granite as fam  # noqa: E402

import jaxhybrid as jh  # noqa: E402
from jaxhybrid.models.granite_hybrid import (  # noqa: E402
    GraniteHybridConfig,
    GraniteHybridModel,
    granite_hybrid_forward,
    granite_hybrid_tensor_shapes,
    init_granite_hybrid,
    load_granite_hybrid,
)

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

# 33 and 100 tokens span more than two chunks of the mixer (chunk size 16, 8 for the other
# config, whose single ubatch of 141 slots runs the mixer's chunked form).
PROMPT_LENGTHS = (1, 7, 33, 100)
PARITY_TOL = 1e-4


class Case:
    def __init__(self, path, params):
        self.path, self.params = path, params
        self.config, self.model = load_granite_hybrid(path)
        # Ubatches of 16 slots: the mixer's recurrent form (the chunked one is Bamba's test's
        # and the fresh run's below), and prompts cut at many ubatch boundaries.
        self.run = fb.HybridRunner(GraniteHybridModel(self.config), self.model, n_ubatch=16)
        rng = np.random.default_rng(7)
        self.prompts = [rng.integers(0, params["vocab_size"], n).tolist() for n in PROMPT_LENGTHS]

    def parity(self, logits):
        """Max abs logit difference per prompt length (``logits[i]``: prompt ``i``'s)."""
        diffs = {}
        for i, prompt in enumerate(self.prompts):
            ref = fam.hf_logits(self.path, prompt)
            diffs[len(prompt)] = float(np.abs(logits[i][: len(prompt)] - ref).max())
        assert np.abs(logits[3][:100]).max() > 1.0
        return diffs


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = fam.tiny_checkpoint(tmp_path_factory.mktemp("granite"), seed=1)
    return Case(path, fam.HF_CONFIG)


@pytest.fixture(scope="module")
def other_case(tmp_path_factory):
    params = fam.HF_CONFIG_OTHER
    path = fam.tiny_checkpoint(tmp_path_factory.mktemp("granite_other"), params, seed=2)
    return Case(path, params)


def test_logits_match_transformers(case, record_property):
    # Given the four prompts decoded together through the hybrid memory
    logits, _ = case.run(case.run.new_memory(), case.prompts)
    # Then every logit agrees with transformers running each prompt alone
    diffs = case.parity(logits)
    record_property("max_abs_logit_diff", diffs)
    print("granite parity", diffs)
    assert max(diffs.values()) <= PARITY_TOL, diffs


def test_logits_match_transformers_without_rope_or_experts(other_case, record_property):
    # Given the four prompts as the seq sets of one ubatch (the forward alone: the hybrid
    # memory's plumbing is the same as the first checkpoint's, which covers it)
    c = other_case.config
    logits = fb.fresh_logits(
        granite_hybrid_forward,
        other_case.model,
        other_case.prompts,
        conv_shape=(c.mamba_d_conv - 1, c.conv_dim),
        ssm_shape=(c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state),
    )
    # Then every logit agrees with transformers running each prompt alone
    diffs = other_case.parity(logits)
    record_property("max_abs_logit_diff", diffs)
    print("granite other parity", diffs)
    assert max(diffs.values()) <= PARITY_TOL, diffs


def test_greedy_generation_matches_transformers(case):
    # Given two prompts decoded together, then one token per sequence and step
    prompts = [case.prompts[1], case.prompts[2]]
    got = case.run.greedy(prompts, 32)
    # When transformers generates greedily from each prompt alone (its cached decode path)
    expected = [fam.hf_greedy(case.path, p, 32) for p in prompts]
    # Then the 32 tokens are identical
    assert got == expected


def test_memory_config_routes_layer_kinds(case, other_case):
    plugin = GraniteHybridModel(case.config)
    cfg = plugin.memory_config(kv_size=32, n_seq_max=2)
    # Attention at layers 0 and 3, Mamba-2 elsewhere, in model order
    assert case.config.layer_types == ("attention", "mamba", "mamba", "attention", "mamba")
    assert cfg.attn_layers == (0, 3)
    assert cfg.recurrent_layers == (1, 2, 4)
    # Mamba-2 states: conv over x, B and C (64 + 2 * 2 * 8 channels), SSM per head
    assert cfg.recurrent.r_shape == (2, 96)
    assert cfg.recurrent.s_shape == (4, 16, 8)
    assert (cfg.kv.n_kv_heads, cfg.kv.head_dim_k) == (2, 8)
    # Whole-head RoPE for the K shift; none without positional encoding
    assert plugin.rope_fn == jh.kv.rope_shift_fn(theta=10000.0, neox=True)
    other = GraniteHybridModel(other_case.config)
    assert other.rope_fn is None
    assert other.memory_config(kv_size=32, n_seq_max=2).attn_layers == (1,)


def test_config_matches_transformers(case):
    hf = fam.hf_config(**fam.HF_CONFIG)
    kinds = {"full_attention": "attention", "linear_attention": "mamba"}
    assert case.config.layer_types == tuple(kinds[t] for t in hf.layers_block_type)
    raw = dict(case.config.__dict__, model_type="granitemoehybrid")
    assert GraniteHybridConfig.from_hf(raw) == case.config
    # The legacy key and names of the layer types read the same
    legacy = dict(raw, layers_block_type=list(fam.HF_CONFIG["layer_types"]))
    del legacy["layer_types"]
    assert GraniteHybridConfig.from_hf(legacy) == case.config


def test_init_has_the_structure_of_a_loaded_checkpoint(case, other_case):
    for c in (case, other_case):
        model = init_granite_hybrid(c.config, seed=0)
        chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(model), nnx.state(c.model))


def test_loader_reports_a_missing_tensor(case, tmp_path):
    name = "model.layers.3.block_sparse_moe.router.layer.weight"
    path = fb.copy_checkpoint(case.path, tmp_path, edit_tensors=lambda t: t.pop(name))
    assert granite_hybrid_tensor_shapes(case.config)[name] == (4, 32)
    with pytest.raises(jh.InvalidArgumentError, match=rf"missing tensor '{name}' \(expected"):
        load_granite_hybrid(path)


def test_loader_reports_a_wrong_shape(case, tmp_path):
    name = "model.layers.1.block_sparse_moe.input_linear.weight"

    def edit(t):
        t[name] = np.zeros((4, 24, 32), np.float32)

    path = fb.copy_checkpoint(case.path, tmp_path, edit_tensors=edit)
    with pytest.raises(
        jh.InvalidArgumentError,
        match=rf"'{name}' has shape \(4, 24, 32\), expected shape \(4, 48, 32\)",
    ):
        load_granite_hybrid(path)


def test_loader_ignores_a_tied_lm_head(case, tmp_path):
    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    path = fb.copy_checkpoint(case.path, tmp_path, edit_tensors=edit)
    _, model = load_granite_hybrid(path)
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(case.model))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("num_local_experts", 4.0, jh.InvalidTypeError),
        ("residual_multiplier", "0.6", jh.InvalidTypeError),
        ("logits_scaling", 0, jh.InvalidArgumentError),
        ("layer_types", ["mamba", "attention"], jh.InvalidArgumentError),
        ("position_embedding_type", "alibi", jh.InvalidArgumentError),
    ],
)
def test_loader_refuses_a_bad_config_field(case, tmp_path, field, value, error):
    def edit(config):
        config[field] = value

    path = fb.copy_checkpoint(case.path, tmp_path, edit_config=edit)
    with pytest.raises(error, match=field):
        load_granite_hybrid(path)


def test_config_takes_a_dense_model_routing_no_experts(case):
    # Given the test config made dense, with 0 experts of 0 (as Granite-4.0-H-Micro's config)
    raw = dict(case.config.__dict__, model_type="granitemoehybrid")
    dense = GraniteHybridConfig.from_hf(dict(raw, num_local_experts=0, num_experts_per_tok=0))
    # Then it is accepted, and 0 routed experts of a sparse model is not
    assert (dense.num_local_experts, dense.num_experts_per_tok) == (0, 0)
    with pytest.raises(jh.InvalidArgumentError, match="num_experts_per_tok"):
        GraniteHybridConfig.from_hf(dict(raw, num_experts_per_tok=0))
