"""Qwen3-Next and Qwen3.5 (dense and MoE) in Flax NNX against transformers.

One tiny seeded checkpoint per variant (``family_qwen.VARIANTS``) is written by transformers'
``save_pretrained`` and read back by :func:`jaxhybrid.models.qwen3_next.load_qwen3_next`.
Qwen3-Next runs through the hybrid memory: every forward goes through
:func:`jaxhybrid.serving.prefill` with the same static shapes (5 rows of up to 200 tokens in
ubatches of 128 slots), so it compiles once. The Qwen3.5 variants share its GDN and attention and
differ in projections and feed-forward; their prompts run as the seq sets of one ubatch through
the model's forward alone (one cheaper compilation each; ``tests/test_family_serving.py`` runs
Qwen3.5 on the memory). The 200-token prompt spans more than three chunks of the GDN's chunked
form (64 tokens).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import family_bamba  # noqa: E402
import family_qwen as fam  # noqa: E402

import jaxhybrid as jh  # noqa: E402
from jaxhybrid.models.qwen3_next import (  # noqa: E402
    Qwen3NextConfig,
    Qwen3NextModel,
    init_qwen3_next,
    load_qwen3_next,
    qwen3_next_forward,
    qwen3_next_tensor_shapes,
)

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

PROMPT_LENGTHS = (1, 7, 33, 100, 200)
PARITY_TOL = 1e-4
# Feeding a prompt whole, in pieces or token by token changes only the rounding of the chunked
# form's matmuls.
SPLIT_TOL = 2e-5


class Case:
    def __init__(self, path):
        self.path = path
        self.config, self.model = load_qwen3_next(path)
        self.plugin = Qwen3NextModel(self.config)
        self._run = None
        rng = np.random.default_rng(7)
        self.prompts = [rng.integers(0, fam.VOCAB, n).tolist() for n in PROMPT_LENGTHS]

    @property
    def run(self) -> fam.HybridRunner:
        """The compiled prefill through the hybrid memory (built on first use)."""
        if self._run is None:
            self._run = fam.HybridRunner(
                self.plugin, self.model, n_seq=5, n_prompt=200, n_ubatch=128, kv_size=1024
            )
        return self._run

    def fresh_logits(self, prompts) -> list[np.ndarray]:
        """Every prompt's logits, the prompts the seq sets of one ubatch (forward only)."""
        c = self.config
        return family_bamba.fresh_logits(
            qwen3_next_forward,
            self.model,
            prompts,
            conv_shape=(c.linear_conv_kernel_dim - 1, c.conv_dim),
            ssm_shape=(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
        )


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen")


def _case(root, variant: str) -> Case:
    if variant not in _CASES:
        _CASES[variant] = Case(fam.tiny_checkpoint(root / variant, variant, seed=1))
    return _CASES[variant]


@pytest.fixture(scope="module", autouse=True)
def _drop_cases():
    yield
    _CASES.clear()


@pytest.mark.parametrize("variant", sorted(fam.VARIANTS))
def test_logits_match_transformers(root, variant, record_property):
    # Given the five prompts decoded together (through the hybrid memory for Qwen3-Next)
    case = _case(root, variant)
    if variant == "qwen3_next":
        logits, _ = case.run(case.run.new_memory(), case.prompts)
    else:
        logits = np.zeros((5, 200, fam.VOCAB), np.float32)
        for i, rows in enumerate(case.fresh_logits(case.prompts)):
            logits[i, : len(rows)] = rows
    # When transformers runs each prompt alone
    diffs = {}
    for i, prompt in enumerate(case.prompts):
        ref = fam.hf_logits(case.path, prompt)
        diffs[len(prompt)] = float(np.abs(logits[i, : len(prompt)] - ref).max())
    record_property("max_abs_logit_diff", diffs)
    print(variant, "parity", diffs)
    # Then every logit agrees (and the logits are not trivially small)
    assert max(diffs.values()) <= PARITY_TOL, diffs
    assert np.abs(logits[4, :200]).max() > 1.0


def test_greedy_generation_matches_transformers(root):
    # Given two prompts decoded together, then one token per sequence and step
    case = _case(root, "qwen3_next")
    prompts = [case.prompts[1], case.prompts[2]]
    got = case.run.greedy(prompts, 32)
    # Then each sequence's 32 tokens are transformers' cached greedy decoding of it alone
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == fam.hf_greedy(case.path, prompt, 32)


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_greedy_generation_matches_transformers(root, variant):
    # Given a prompt continued greedily by the forward alone (the whole sequence every step)
    case = _case(root, variant)
    c = case.config
    got = family_bamba.fresh_greedy(
        qwen3_next_forward,
        case.model,
        case.prompts[1],
        32,
        conv_shape=(c.linear_conv_kernel_dim - 1, c.conv_dim),
        ssm_shape=(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
    )
    # Then its 32 tokens are transformers' cached greedy decoding
    assert got == fam.hf_greedy(case.path, case.prompts[1], 32)


def test_prompt_whole_in_pieces_or_token_by_token_gives_the_same_logits(root):
    # Given a 70-token prompt fed whole (sequence 0), in pieces of 30 and 40 (sequence 1, the
    # second piece interleaved with sequence 2's whole prompt) and token by token (sequence 2)
    case = _case(root, "qwen3_next")
    prompt = case.prompts[3][:70]
    run = case.run
    whole, _ = run(run.new_memory(), [prompt])
    mem = run.new_memory()
    first, mem = run(mem, [[], prompt[:30]])
    second, mem = run(mem, [[], prompt[30:], prompt[:30]])
    pieces = np.concatenate([first[1, :30], second[1, :40]])
    tokens = []
    for tok in prompt[30:]:
        out, mem = run(mem, [[], [], [tok]])
        tokens.append(out[2, 0])
    by_token = np.concatenate([second[2, :30], np.stack(tokens)])
    # Then all three agree with each other (and the whole prompt with transformers)
    np.testing.assert_allclose(pieces, whole[0, :70], atol=SPLIT_TOL, rtol=0)
    np.testing.assert_allclose(by_token, whole[0, :70], atol=SPLIT_TOL, rtol=0)


@pytest.mark.parametrize("variant", ["qwen3_5", "qwen3_5_moe"])
def test_conditional_generation_checkpoint_loads_its_language_model(tmp_path, variant):
    import transformers
    from flax import nnx

    # Given a conditional-generation checkpoint (vision tower included) written by transformers,
    # and a causal-LM checkpoint holding the same language model
    cond_path = fam.tiny_conditional_checkpoint(tmp_path / "cond", variant, seed=2)
    prefix = "Qwen3_5Moe" if variant == "qwen3_5_moe" else "Qwen3_5"
    cond = getattr(transformers, f"{prefix}ForConditionalGeneration").from_pretrained(cond_path)
    text = cond.config.text_config
    text.tie_word_embeddings = cond.config.tie_word_embeddings  # the outer config ties
    causal = getattr(transformers, f"{prefix}ForCausalLM")(text).eval()
    causal.model.load_state_dict(cond.model.language_model.state_dict())
    causal.lm_head.load_state_dict(cond.lm_head.state_dict())
    causal.save_pretrained(tmp_path / "causal")
    prompt = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want = cond.eval()(prompt, use_cache=False).logits
        assert torch.equal(causal(prompt, use_cache=False).logits, want)
    # When the conditional checkpoint is loaded
    with pytest.warns(UserWarning, match="vision tower .* not loaded"):
        config, model = load_qwen3_next(cond_path)
    # Then it is the language model: the causal checkpoint's config and every parameter
    causal_config, causal_model = load_qwen3_next(tmp_path / "causal")
    assert config.variant == variant and config.layer_types == tuple(fam.LAYER_TYPES)
    assert config == causal_config
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(causal_model)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_matches_transformers():
    import transformers

    for variant, (config_cls, _, kwargs) in fam.VARIANTS.items():
        hf = getattr(transformers, config_cls)(**kwargs)
        ours = Qwen3NextConfig.from_hf(hf.to_dict())
        assert ours.variant == variant
        assert ours.layer_types == tuple(hf.layer_types)
        assert ours.n_rot == 4 and ours.rope_theta == 5000.0
        assert ours.tie_word_embeddings == hf.tie_word_embeddings
        if variant == "qwen3_5":
            assert not any(ours.moe_layers)
        elif variant == "qwen3_5_moe":
            assert all(ours.moe_layers) and ours.norm_topk_prob
        else:
            assert ours.moe_layers == (True, False, True, True, True)
            assert not ours.norm_topk_prob
    # transformers' defaults: attention every 4th layer, partial rotary factor 0.25
    default = Qwen3NextConfig.from_hf(transformers.Qwen3NextConfig(num_hidden_layers=8).to_dict())
    assert (
        list(default.layer_types) == transformers.Qwen3NextConfig(num_hidden_layers=8).layer_types
    )
    assert default.n_rot == 64


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (dict(model_type="qwen3"), jh.InvalidArgumentError, "model_type"),
        (dict(hidden_act="gelu"), jh.InvalidArgumentError, "hidden_act"),
        (dict(linear_num_value_heads=3), jh.InvalidArgumentError, "multiple"),
        (dict(linear_num_key_heads=2.0), jh.InvalidTypeError, "linear_num_key_heads"),
        (dict(layer_types=["linear_attention"] * 4), jh.InvalidArgumentError, "layers"),
        (dict(layer_types=["mamba"] * 5), jh.InvalidArgumentError, "layer_types"),
        (dict(num_experts_per_tok=9), jh.InvalidArgumentError, "num_experts"),
        (dict(norm_topk_prob="yes"), jh.InvalidTypeError, "norm_topk_prob"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            jh.InvalidArgumentError,
            "RoPE",
        ),
        (dict(mlp_only_layers=3), jh.InvalidTypeError, "mlp_only_layers"),
    ],
)
def test_config_refuses_bad_fields(edit, error, message):
    import transformers

    config = transformers.Qwen3NextConfig(**fam.VARIANTS["qwen3_next"][2]).to_dict()
    config.update(edit)
    with pytest.raises(error, match=message):
        Qwen3NextConfig.from_hf(config)


def test_memory_config_routes_gdn_and_attention_layers(root):
    case = _case(root, "qwen3_5_moe")
    c = case.config
    cfg = case.plugin.memory_config(kv_size=64, n_seq_max=3)
    assert cfg.attn_layers == (1, 4) and cfg.recurrent_layers == (0, 2, 3)
    assert cfg.recurrent.r_shape == (3, c.conv_dim) and c.conv_dim == 2 * 2 * 8 + 4 * 8
    assert cfg.recurrent.s_shape == (4, 8, 8)
    assert np.dtype(cfg.recurrent.dtype_s) == np.float32
    assert cfg.kv.n_kv_heads == 2 and cfg.kv.head_dim_k == 8


def test_init_has_the_structure_of_a_loaded_checkpoint(root):
    import chex
    from flax import nnx

    for variant in ("qwen3_next", "qwen3_5"):
        case = _case(root, variant)
        chex.assert_trees_all_equal_shapes_and_dtypes(
            nnx.state(init_qwen3_next(case.config, seed=3)), nnx.state(case.model)
        )


def test_loader_reports_a_missing_and_a_misshapen_tensor(root, tmp_path):
    case = _case(root, "qwen3_next")
    missing = "model.layers.0.linear_attn.in_proj_ba.weight"
    bad = "model.layers.1.self_attn.q_norm.weight"

    def edit(tensors):
        del tensors[missing]
        tensors[bad] = np.zeros((5,), np.float32)

    fam.copy_checkpoint(case.path, tmp_path / "broken", edit_tensors=edit)
    with pytest.raises(jh.InvalidArgumentError) as info:
        load_qwen3_next(tmp_path / "broken")
    assert missing in str(info.value) and bad in str(info.value)
    shapes = qwen3_next_tensor_shapes(case.config)
    assert shapes[missing] == (8, 32) and shapes[bad] == (8,)
