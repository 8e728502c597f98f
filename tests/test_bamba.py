"""Bamba in Flax NNX against transformers' ``BambaForCausalLM``, through the hybrid memory.

One tiny seeded checkpoint (``family_bamba.HF_CONFIG``) is written by transformers'
``save_pretrained`` and read back by :func:`jaxhybrid.models.bamba.load_bamba`. Every forward
runs through :func:`jaxhybrid.serving.prefill` with the same static shapes, so it compiles once.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
nnx = pytest.importorskip("flax.nnx")

import family_bamba as fam  # noqa: E402

import jaxhybrid as jh  # noqa: E402
from jaxhybrid.models.bamba import (  # noqa: E402
    BambaConfig,
    BambaModel,
    bamba_tensor_shapes,
    init_bamba,
    load_bamba,
)

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

# 33 and 100 tokens span more than two chunks of the mixer (chunk size 8); the 100-token prompt
# also crosses the boundary between the two ubatches of 128 slots.
PROMPT_LENGTHS = (1, 7, 33, 100)
PARITY_TOL = 1e-4


class Case:
    def __init__(self, path):
        self.path = path
        self.config, self.model = load_bamba(path)
        self.run = fam.HybridRunner(BambaModel(self.config), self.model)
        rng = np.random.default_rng(7)
        vocab = fam.HF_CONFIG["vocab_size"]
        self.prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = fam.tiny_checkpoint(tmp_path_factory.mktemp("bamba"), seed=1)
    return Case(path)


def test_logits_match_transformers(case, record_property):
    # Given the four prompts decoded together through the hybrid memory
    logits, _ = case.run(case.run.new_memory(), case.prompts)
    # When transformers runs each prompt alone
    diffs = {}
    for i, prompt in enumerate(case.prompts):
        ref = fam.hf_logits(case.path, prompt)
        diffs[len(prompt)] = float(np.abs(logits[i, : len(prompt)] - ref).max())
    record_property("max_abs_logit_diff", diffs)
    print("bamba parity", diffs)
    # Then every logit agrees (and the logits are not trivially small)
    assert max(diffs.values()) <= PARITY_TOL, diffs
    assert np.abs(logits[3, :100]).max() > 1.0


def test_greedy_generation_matches_transformers(case):
    # Given two prompts decoded together, then one token per sequence and step
    prompts = [case.prompts[1], case.prompts[2]]
    got = case.run.greedy(prompts, 32)
    # When transformers generates greedily from each prompt alone (its cached decode path)
    expected = [fam.hf_greedy(case.path, p, 32) for p in prompts]
    # Then the 32 tokens are identical
    assert got == expected


def test_memory_config_routes_layer_kinds(case):
    c = case.config
    plugin = BambaModel(c)
    cfg = plugin.memory_config(kv_size=32, n_seq_max=2)
    # Attention at layers 1 and 4, Mamba-2 elsewhere, in model order
    assert c.layer_types == ("mamba", "attention", "mamba", "mamba", "attention")
    assert cfg.attn_layers == (1, 4)
    assert cfg.recurrent_layers == (0, 2, 3)
    # Mamba-2 states: conv over x, B and C (64 + 2 * 2 * 8 channels), SSM per head
    assert cfg.recurrent.r_shape == (3, 96)
    assert cfg.recurrent.s_shape == (8, 8, 8)
    assert (cfg.kv.n_kv_heads, cfg.kv.head_dim_k) == (2, 8)
    # The K-shift RoPE is the partial one: 4 of 8 features, NeoX layout, base 5000
    assert plugin.rope_fn == jh.kv.rope_shift_fn(theta=5000.0, neox=True, n_rot=4)
    assert plugin.n_vocab == 160


def test_config_matches_transformers(case):
    hf = fam.hf_config(**fam.HF_CONFIG)
    kinds = {"full_attention": "attention", "linear_attention": "mamba"}
    assert case.config.layer_types == tuple(kinds[t] for t in hf.layers_block_type)
    assert case.config.mamba_d_head == hf.mamba_d_head
    assert case.config.n_rot == int(hf.hidden_size // hf.num_attention_heads * 0.5)
    assert BambaConfig.from_hf(dict(case.config.__dict__, model_type="bamba")) == case.config


def test_init_has_the_structure_of_a_loaded_checkpoint(case):
    model = init_bamba(case.config, seed=0)
    chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(model), nnx.state(case.model))


def test_loader_reports_a_missing_tensor(case, tmp_path):
    name = "model.layers.2.mamba.dt_bias"
    path = fam.copy_checkpoint(case.path, tmp_path, edit_tensors=lambda t: t.pop(name))
    assert bamba_tensor_shapes(case.config)[name] == (8,)
    with pytest.raises(jh.InvalidArgumentError, match=rf"missing tensor '{name}' \(expected"):
        load_bamba(path)


def test_loader_reports_a_wrong_shape(case, tmp_path):
    name = "model.layers.0.mamba.conv1d.weight"

    def edit(t):
        t[name] = np.zeros((64, 1, 4), np.float32)

    path = fam.copy_checkpoint(case.path, tmp_path, edit_tensors=edit)
    with pytest.raises(
        jh.InvalidArgumentError, match=rf"'{name}' has shape \(64, 1, 4\), expected shape \(96,"
    ):
        load_bamba(path)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("mamba_n_groups", 2.0, jh.InvalidTypeError),
        ("attention_bias", "true", jh.InvalidTypeError),
        ("attn_layer_indices", [1, 5], jh.InvalidArgumentError),
        ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, jh.InvalidArgumentError),
    ],
)
def test_loader_refuses_a_bad_config_field(case, tmp_path, field, value, error):
    def edit(config):
        config[field] = value

    path = fam.copy_checkpoint(case.path, tmp_path, edit_config=edit)
    with pytest.raises(error, match=field.split("_")[0]):
        load_bamba(path)
