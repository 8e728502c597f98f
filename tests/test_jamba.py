"""Jamba in Flax NNX against transformers' ``JambaForCausalLM``, through the memory protocol.

Checkpoints are tiny, seeded and written by transformers' ``save_pretrained``; they are read back
by :func:`jaxhybrid.models.load_jamba`. The reference memory is :class:`DenseMemory`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
nnx = pytest.importorskip("flax.nnx")

import jamba_utils as ju  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxhybrid.models import (  # noqa: E402
    DenseMemory,
    JambaConfig,
    ModelMemory,
    forward,
    hf_tensor_shapes,
    init_jamba,
    load_jamba,
)

torch.set_num_threads(1)

# transformers warns through the warnings module in a few places we cannot avoid.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

PROMPT_LENGTHS = (1, 7, 33, 100)
PARITY_TOL = 1e-4
SELF_TOL = 1e-5


class Case:
    """A saved checkpoint, its transformers model and our loaded model."""

    def __init__(self, path, params, hf_model):
        self.path, self.params, self.hf = path, params, hf_model
        self.config, self.model = load_jamba(path)
        rng = np.random.default_rng(7)
        self.prompts = [rng.integers(0, params["vocab_size"], n).tolist() for n in PROMPT_LENGTHS]
        self._ref = None

    def all_at_once(self):
        """Logits of every prompt, all four prompts in one ubatch of 160 slots."""
        if self._ref is None:
            self._ref, _ = ju.run_ubatches(self.model, self.new_mem(160), [self.one_ubatch()])
        return self._ref

    def one_ubatch(self, seqs=None):
        seqs = range(len(self.prompts)) if seqs is None else seqs
        ps = [self.prompts[s] for s in seqs]
        return (
            np.concatenate(ps),
            np.concatenate([[s] * len(p) for s, p in zip(seqs, ps, strict=True)]),
            np.concatenate([np.arange(len(p)) for p in ps]),
        )

    def new_mem(self, n_ubatch):
        return ju.new_memory(self.config, n_seq_max=4, n_ctx=160, n_ubatch=n_ubatch)


@pytest.fixture(scope="module")
def moe_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("jamba_moe")
    hf = ju.make_checkpoint(path, ju.MOE_GQA, seed=1)
    return Case(path, ju.MOE_GQA, hf)


@pytest.fixture(scope="module")
def dense_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("jamba_dense")
    hf = ju.make_checkpoint(path, ju.DENSE_MHA, seed=2)
    return Case(path, ju.DENSE_MHA, hf)


@pytest.fixture(params=["moe", "dense"])
def case(request, moe_case, dense_case):
    return {"moe": moe_case, "dense": dense_case}[request.param]


def _max_diff(out_a, out_b, case, seqs=None):
    seqs = range(len(case.prompts)) if seqs is None else seqs
    return max(
        float(
            np.abs(
                ju.seq_logits(out_a, s, len(case.prompts[s]))
                - ju.seq_logits(out_b, s, len(case.prompts[s]))
            ).max()
        )
        for s in seqs
    )


# --------------------------------------------------------------------------------------------
# Config


def test_config_from_hf_dict_resolves_auto_dt_rank_and_layer_kinds():
    # Given a transformers-style config dict with dt_rank "auto"
    cfg = JambaConfig.from_hf(
        {
            "model_type": "jamba",
            "hidden_size": 40,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": None,
            "attn_layer_period": 3,
            "attn_layer_offset": 2,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 4,
            "mamba_dt_rank": "auto",
        }
    )
    # Then dt_rank is ceil(hidden / 16), KV heads default to the heads, and the layer kinds follow
    assert cfg.mamba_dt_rank == 3
    assert cfg.num_key_value_heads == 4
    assert cfg.head_dim == 10
    assert cfg.layer_types == ("mamba", "mamba", "attention") * 2
    assert cfg.attention_layers == (2, 5)
    assert cfg.mamba_layers == (0, 1, 3, 4)
    assert cfg.moe_layers == (False, True) * 3
    assert hash(cfg) == hash(JambaConfig.from_hf(dict(cfg.__dict__, model_type="jamba")))


def test_config_matches_transformers_layer_kinds():
    # Given the same hyper-parameters in transformers
    hf_cfg = ju.hf_config(**ju.MOE_GQA)
    cfg = JambaConfig.from_hf(hf_cfg.to_dict())
    # Then the layer kinds and the expert layout agree
    assert list(cfg.layer_types) == hf_cfg.layers_block_type
    assert [4 if m else 1 for m in cfg.moe_layers] == hf_cfg.layers_num_experts
    assert cfg.mamba_dt_rank == hf_cfg.mamba_dt_rank


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attn_layer_offset": 8}, "attn_layer_offset"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
        ({"dtype": "float16"}, "dtype"),
        ({"mamba_d_conv": 1}, "mamba_d_conv"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JambaConfig(**kwargs)


def test_config_rejects_other_activations():
    with pytest.raises(ValueError, match="silu"):
        JambaConfig.from_hf({"model_type": "jamba", "hidden_act": "gelu"})


# --------------------------------------------------------------------------------------------
# Parity with transformers


def test_prefill_matches_transformers(case, record_property):
    # Given four prompts of lengths 1, 7, 33 and 100 in one ubatch (four seq sets + padding)
    ours = case.all_at_once()
    # When transformers runs each prompt alone
    diffs = {}
    for s, prompt in enumerate(case.prompts):
        ref = ju.hf_logits(case.hf, prompt)
        diffs[len(prompt)] = float(np.abs(ju.seq_logits(ours, s, len(prompt)) - ref).max())
    record_property("max_abs_logit_diff", diffs)
    print("parity", case.params["num_experts"], diffs)
    # Then every logit agrees
    assert max(diffs.values()) <= PARITY_TOL, diffs


def test_sharded_checkpoint_loads_the_same_weights(moe_case, tmp_path):
    # Given the same transformers model saved in several shards with an index
    moe_case.hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    # When it is loaded
    _, model = load_jamba(tmp_path)
    # Then every parameter equals the single-file load
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(moe_case.model))


def test_greedy_generation_matches_transformers(case):
    # Given two prompts prefilled together, then decoded together one token per sequence
    prompts = [case.prompts[1], case.prompts[2][:9]]
    n_new = 32
    mem = case.new_mem(16)
    plan = [
        (
            np.concatenate(prompts),
            np.concatenate([[s] * len(p) for s, p in enumerate(prompts)]),
            np.concatenate([np.arange(len(p)) for p in prompts]),
        )
    ]
    out, mem = ju.run_ubatches(case.model, mem, plan)
    generated = [[int(np.argmax(out[(s, len(p) - 1)]))] for s, p in enumerate(prompts)]
    for _ in range(n_new - 1):
        step = (
            np.array([g[-1] for g in generated]),
            np.arange(len(prompts)),
            np.array([len(p) + len(g) - 1 for p, g in zip(prompts, generated, strict=True)]),
        )
        out, mem = ju.run_ubatches(case.model, mem, [step])
        for s, g in enumerate(generated):
            g.append(int(np.argmax(out[(s, len(prompts[s]) + len(g) - 1)])))
    # When transformers generates greedily from each prompt alone
    expected = [ju.hf_greedy(case.hf, p, n_new) for p in prompts]
    # Then the tokens are identical
    assert generated == expected


# --------------------------------------------------------------------------------------------
# Self-consistency through the memory protocol


def test_several_sequences_in_one_ubatch_equal_each_alone(case):
    # Given the four prompts together in one ubatch
    together = case.all_at_once()
    # When each prompt runs alone through a fresh memory with the same ubatch size
    alone = {}
    for s in range(len(case.prompts)):
        out, _ = ju.run_ubatches(case.model, case.new_mem(160), [case.one_ubatch([s])])
        alone.update(out)
    # Then the logits agree
    assert _max_diff(together, alone, case) <= SELF_TOL


@pytest.mark.parametrize("chunking", ["random", "token_by_token", "interleaved_tokens"])
def test_chunked_prefill_equals_prefill_at_once(case, chunking):
    # Given the four prompts fed in small ubatches of 16 slots continuing earlier state
    rng = np.random.default_rng(3)
    if chunking == "random":
        # several sequences per ubatch, chunk sizes 1..9, padding in most ubatches
        plan = ju.prefill_plan(case.prompts, lambda s, start: int(rng.integers(1, 10)), 16)
    elif chunking == "token_by_token":
        # one token of one sequence per ubatch
        plan = []
        for s in range(len(case.prompts)):
            plan += ju.prefill_plan([[]] * s + [case.prompts[s]], lambda s, start: 1, 16)
    else:
        # one token of every unfinished sequence per ubatch
        plan = ju.prefill_plan(case.prompts, lambda s, start: 1, 16)
    out, _ = ju.run_ubatches(case.model, case.new_mem(16), plan)
    # Then the logits equal those of the single big ubatch
    assert _max_diff(out, case.all_at_once(), case) <= SELF_TOL


def test_padding_only_ubatch_changes_no_memory(moe_case):
    # Given a memory after a prefill
    _, mem = ju.run_ubatches(moe_case.model, moe_case.new_mem(16), [moe_case.one_ubatch([1])])
    # When a ubatch holding only padding runs
    pad = jnp.full((16,), -1, jnp.int32)
    bound = mem.bind(pad, jnp.zeros((16,), jnp.int32))
    _, after = jax.jit(forward)(
        moe_case.model, jnp.zeros((16,), jnp.int32), bound.tok_pos, bound.valid, bound
    )
    # Then the caches and states are untouched
    for name in ("k", "v", "cell_pos", "conv", "ssm"):
        chex.assert_trees_all_equal(getattr(after, name), getattr(mem, name))


def test_step_does_not_retrace_and_keeps_memory_structure(moe_case):
    # Given a jitted step that counts its traces
    traces = []

    def step(model, tokens, pos, valid, mem):
        traces.append(1)
        return forward(model, tokens, pos, valid, mem)

    jitted = jax.jit(step)
    mem = moe_case.new_mem(16)
    for tokens, seq_ids in (([5, 6, 7], [0, 0, 1]), ([8], [2]), ([9, 10], [0, 1])):
        n = len(tokens)
        sid = jnp.asarray(seq_ids + [-1] * (16 - n), jnp.int32)
        pos = jnp.zeros((16,), jnp.int32)
        bound = mem.bind(sid, pos)
        tok = jnp.asarray(tokens + [0] * (16 - n), jnp.int32)
        logits, new_mem = jitted(moe_case.model, tok, bound.tok_pos, bound.valid, bound)
        # Then the memory keeps its structure, shapes and dtypes
        chex.assert_trees_all_equal_shapes_and_dtypes(new_mem, mem)
        chex.assert_shape(logits, (16, moe_case.config.vocab_size))
        mem = new_mem
    # And the step was traced once for all batch compositions
    assert len(traces) == 1


def test_mamba_mixer_sets_with_gaps_equal_each_set_alone(moe_case):
    # Given Mamba layer 0, a ubatch of 12 slots holding sets 2, 0 and 1 (set 3 is empty) with
    # padding between and after them, and random initial states for all four sets
    mixer = moe_case.model.layers[0].mamba
    cfg = moe_case.config
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((12, cfg.hidden_size)), jnp.float32)
    seq_set = jnp.asarray([2, 2, 2, -1, 0, 0, -1, 1, 1, 1, 1, -1], jnp.int32)
    conv0 = jnp.asarray(rng.standard_normal((4, cfg.mamba_d_conv - 1, cfg.d_inner)), jnp.float32)
    ssm0 = jnp.asarray(rng.standard_normal((4, cfg.d_inner, cfg.mamba_d_state)), jnp.float32)
    run = jax.jit(lambda x, seq_set: mixer(x, seq_set, conv0, ssm0))
    # When they run together, and each set runs alone from the front of the ubatch
    out, conv, ssm, (conv_tok, ssm_tok) = run(x, seq_set)
    for s in range(3):
        (slots,) = np.nonzero(np.asarray(seq_set) == s)
        for n in range(1, len(slots) + 1):
            alone_x = jnp.zeros_like(x).at[:n].set(x[slots[:n]])
            alone_set = jnp.full((12,), -1, jnp.int32).at[:n].set(s)
            out_s, conv_s, ssm_s, _ = run(alone_x, alone_set)
            # Then the per-token states (rollback snapshots) are the final states of the set
            # cut after that token
            np.testing.assert_allclose(conv_tok[slots[n - 1]], conv_s[s], atol=1e-6)
            np.testing.assert_allclose(ssm_tok[slots[n - 1]], ssm_s[s], atol=1e-5, rtol=1e-5)
        # ... and with the whole set, outputs and final states agree; each set's state is its own
        np.testing.assert_allclose(out[slots], out_s[:n], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(conv[s], conv_s[s], atol=1e-6)
        np.testing.assert_allclose(ssm[s], ssm_s[s], atol=1e-5, rtol=1e-5)
    # And the empty set keeps its state
    chex.assert_trees_all_equal((conv[3], ssm[3]), (conv0[3], ssm0[3]))
    # And a set shorter than the conv width keeps the older inputs of its state (set 0: 2 tokens)
    in_x = mixer.in_proj(x)[:, : cfg.d_inner]
    np.testing.assert_allclose(conv[0][0], conv0[0][2], atol=0)
    np.testing.assert_allclose(conv[0][1:], in_x[4:6], atol=1e-6)


def test_cleared_sequence_starts_fresh(moe_case):
    # Given sequence 1 holding one prompt
    mem = moe_case.new_mem(16)
    first, mem = ju.run_ubatches(moe_case.model, mem, [moe_case.one_ubatch([1])])
    # When it is cleared and fed the same prompt again
    mem = mem.clear(1)
    again, _ = ju.run_ubatches(moe_case.model, mem, [moe_case.one_ubatch([1])])
    # Then the logits are those of the first time
    chex.assert_trees_all_close(again, first, atol=0)


def test_dense_memory_implements_the_protocol(moe_case):
    assert isinstance(moe_case.new_mem(4), ModelMemory)
    assert isinstance(moe_case.new_mem(4), DenseMemory)


# --------------------------------------------------------------------------------------------
# Initialisation, dtypes


def test_init_has_the_structure_of_a_loaded_checkpoint(case):
    model = init_jamba(case.config, seed=0)
    chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(model), nnx.state(case.model))


def test_bfloat16_load_is_close_to_float32(moe_case):
    # Given the checkpoint loaded in bfloat16
    cfg, model = load_jamba(moe_case.path, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    # When the prompts run in one ubatch
    out, mem = ju.run_ubatches(
        model, ju.new_memory(cfg, n_seq_max=4, n_ctx=160, n_ubatch=160), [moe_case.one_ubatch()]
    )
    # Then the memory keeps bfloat16 K/V and float32 SSM states, and the logits stay near
    # float32's (a rare expert-routing flip moves single logits by a few tenths)
    assert mem.k.dtype == jnp.bfloat16 and mem.ssm.dtype == jnp.float32
    ref = moe_case.all_at_once()
    ours = np.concatenate([ju.seq_logits(out, s, len(p)) for s, p in enumerate(moe_case.prompts)])
    full = np.concatenate([ju.seq_logits(ref, s, len(p)) for s, p in enumerate(moe_case.prompts)])
    assert np.all(np.isfinite(ours))
    assert np.abs(ours - full).mean() < 0.03
    assert np.mean(ours.argmax(-1) == full.argmax(-1)) >= 0.95


def test_bfloat16_checkpoint_loads_exactly(moe_case, tmp_path):
    # Given the checkpoint saved by transformers in bfloat16
    copy.deepcopy(moe_case.hf).to(torch.bfloat16).save_pretrained(tmp_path)
    # When it is loaded in bfloat16
    _, model = load_jamba(tmp_path, dtype="bfloat16")
    # Then it equals the float32 checkpoint rounded to bfloat16
    _, rounded = load_jamba(moe_case.path, dtype="bfloat16")
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(rounded))


# --------------------------------------------------------------------------------------------
# Loader errors


def _copy_with(src, dst, edit):
    """Copies a single-file checkpoint, editing its tensor dict with ``edit``."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_loader_reports_a_missing_tensor(moe_case, tmp_path):
    name = "model.layers.2.mamba.dt_layernorm.weight"
    path = _copy_with(moe_case.path, tmp_path, lambda t: t.pop(name))
    shape = hf_tensor_shapes(moe_case.config)[name]
    with pytest.raises(ValueError, match=rf"missing tensor '{name}' \(expected shape \(8,\)\)"):
        load_jamba(path)
    assert shape == (8,)


def test_loader_reports_a_wrong_shape(moe_case, tmp_path):
    name = "model.layers.1.feed_forward.experts.3.down_proj.weight"

    def edit(t):
        t[name] = np.zeros((32, 40), np.float32)

    path = _copy_with(moe_case.path, tmp_path, edit)
    with pytest.raises(
        ValueError, match=rf"'{name}' has shape \(32, 40\), expected shape \(32, 48\)"
    ):
        load_jamba(path)


def test_loader_reports_an_unexpected_tensor(moe_case, tmp_path):
    name = "model.layers.0.feed_forward.experts.0.up_proj.weight"

    def edit(t):
        t[name] = np.zeros((48, 32), np.float32)

    path = _copy_with(moe_case.path, tmp_path, edit)
    with pytest.raises(ValueError, match=rf"unexpected tensor '{name}' with shape \(48, 32\)"):
        load_jamba(path)


def test_loader_reads_config_json(moe_case):
    with open(os.path.join(moe_case.path, "config.json")) as f:
        raw = json.load(f)
    assert JambaConfig.from_hf(raw) == moe_case.config
    assert JambaConfig.from_hf(moe_case.path, dtype="bfloat16").dtype == "bfloat16"
