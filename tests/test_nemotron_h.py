"""Nemotron-H in Flax NNX against transformers' ``NemotronHForCausalLM``, on the hybrid memory.

One tiny seeded checkpoint (tests/family_nemotron_h.py: every layer kind, grouped Mamba-2, MoE
with grouped routing and a latent projection) is written by transformers' ``save_pretrained`` and
read back by :func:`load_nemotron_h`. The model runs through the serving layer's jitted
``prefill`` on :func:`jaxhybrid.init_hybrid` memory; one compilation serves every prompt length
and the greedy decoding steps.
"""

from __future__ import annotations

import json
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
nnx = pytest.importorskip("flax.nnx")

import family_nemotron_h as fam  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import jaxhybrid as jh  # noqa: E402
from jaxhybrid.models.nemotron_h import (  # noqa: E402
    NemotronHConfig,
    NemotronHModel,
    load_nemotron_h,
)
from jaxhybrid.serving import prefill  # noqa: E402

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

PROMPT_LENGTHS = (1, 7, 33, 100)  # 33 and 100 span more than two 16-token SSD chunks
PARITY_TOL = 1e-4
N_UBATCH = 64  # the 100-token prompt is cut across ubatches, next to the other prompts
KV_SIZE = 256
N_NEW = 32
GREEDY_SEQS = (1, 2)  # the 7- and 33-token prompts continue into greedy decoding


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fam.tiny_checkpoint(tmp_path_factory.mktemp("nemotron_h"), seed=0)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_nemotron_h(ckpt)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, fam.HF_CONFIG["vocab_size"], n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def prefilled(loaded, prompts):
    """Every prompt prefilled at once through the hybrid memory: ``(logits [seqs, prompt,
    vocab], mem, plug-in, memory config)``."""
    config, model = loaded
    plugin = NemotronHModel(config)
    cfg = plugin.memory_config(kv_size=KV_SIZE, n_seq_max=len(prompts))
    toks = np.zeros((len(prompts), max(PROMPT_LENGTHS)), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    logits, mem, code = prefill(
        plugin,
        model,
        jh.init_hybrid(cfg),
        jnp.asarray(toks),
        jnp.asarray(np.array(PROMPT_LENGTHS, np.int32)),
        jnp.arange(len(prompts), dtype=jnp.int32),
        cfg=cfg,
        n_ubatch=N_UBATCH,
        output_all=True,
    )
    assert int(code) == 0
    return np.asarray(logits), mem, plugin, cfg


def _dt_clamped_fraction(path, prompt) -> float:
    """Fraction of (token, head) steps of the first Mamba-2 layer whose ``softplus(dt)`` falls
    under ``time_step_min`` in transformers' model (where the clamp changes the result)."""
    hf = fam.hf_model(str(path))
    mixer = hf.model.layers[0].mixer
    seen = []
    hook = mixer.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        fam.hf_logits(path, prompt)
    finally:
        hook.remove()
    dt = seen[0][0, :, -mixer.num_heads :] + mixer.dt_bias.detach()
    return float((torch.nn.functional.softplus(dt) < fam.HF_CONFIG["time_step_min"]).float().mean())


# --------------------------------------------------------------------------------------------
# Parity with transformers


def test_prefill_logits_match_transformers(ckpt, prompts, prefilled, record_property):
    # Given every prompt prefilled at once through the hybrid memory (one compilation)
    logits = prefilled[0]
    assert max(PROMPT_LENGTHS) > 2 * fam.HF_CONFIG["chunk_size"]
    # When transformers runs each prompt alone
    diffs = {}
    for s, prompt in enumerate(prompts):
        ref = fam.hf_logits(ckpt, prompt)
        diffs[len(prompt)] = float(np.abs(logits[s, : len(prompt)] - ref).max())
    record_property("max_abs_logit_diff", diffs)
    print("nemotron_h max |logit diff| per prompt length:", diffs)
    # Then every logit agrees, on logits of order one
    assert max(diffs.values()) <= PARITY_TOL, diffs
    assert np.abs(logits[-1, : PROMPT_LENGTHS[-1]]).max() > 1.0
    # And the dt clamp at time_step_min was active, so its placement was compared too
    assert 0.01 < _dt_clamped_fraction(ckpt, prompts[-1]) < 0.9


def test_greedy_decoding_matches_transformers_generate(ckpt, loaded, prompts, prefilled):
    # Given two prefilled prompts continued together, one token per sequence per step, each
    # step a ubatch of two tokens and padding (the prefill's own compilation: rows of length 0
    # are skipped)
    logits, mem, plugin, cfg = prefilled
    n_seq, n_prompt = len(prompts), max(PROMPT_LENGTHS)
    gen = {s: [int(np.argmax(logits[s, PROMPT_LENGTHS[s] - 1]))] for s in GREEDY_SEQS}
    lengths = jnp.asarray([int(s in GREEDY_SEQS) for s in range(n_seq)], jnp.int32)
    for _ in range(N_NEW - 1):
        toks = np.zeros((n_seq, n_prompt), np.int32)
        for s, g in gen.items():
            toks[s, 0] = g[-1]
        step, mem, code = prefill(
            plugin,
            loaded[1],
            mem,
            jnp.asarray(toks),
            lengths,
            jnp.arange(n_seq, dtype=jnp.int32),
            cfg=cfg,
            n_ubatch=N_UBATCH,
            output_all=True,
        )
        assert int(code) == 0
        step = np.asarray(step)
        for s, g in gen.items():
            g.append(int(np.argmax(step[s, 0])))
    # When transformers generates greedily from each prompt alone (with its cache)
    expected = {s: fam.hf_greedy(ckpt, prompts[s], N_NEW) for s in GREEDY_SEQS}
    # Then the tokens are identical
    assert gen == expected


# --------------------------------------------------------------------------------------------
# Loader


def _copy(ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def test_loader_names_a_missing_and_a_misshapen_tensor(ckpt, tmp_path):
    # Given a checkpoint without one Mamba tensor and with an attention weight of a wrong shape
    path = _copy(ckpt, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["backbone.layers.4.mixer.dt_bias"]
    q = "backbone.layers.5.mixer.q_proj.weight"
    tensors[q] = tensors[q][:-1]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    # When it is loaded
    with pytest.raises(jh.InvalidArgumentError) as err:
        load_nemotron_h(path)
    # Then both tensors are named, with the expected shapes
    msg = str(err.value)
    assert "missing tensor 'backbone.layers.4.mixer.dt_bias' (expected shape (8,))" in msg
    assert f"tensor '{q}' has shape (63, 48), expected shape (64, 48)" in msg


@pytest.mark.parametrize(
    ("key", "value"), [("hidden_size", 48.0), ("use_conv_bias", "true"), ("n_groups", True)]
)
def test_loader_refuses_a_config_field_of_the_wrong_type(ckpt, tmp_path, key, value):
    # Given a checkpoint whose config.json holds a field of the wrong JSON type
    path = _copy(ckpt, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    # Then loading refuses it, naming the field
    with pytest.raises(jh.InvalidTypeError, match=f"NemotronHConfig.{key}"):
        load_nemotron_h(path)


def test_loader_reads_model_prefix_stacked_experts_and_skips_mtp(ckpt, loaded, tmp_path):
    # Given the same weights under "model." (transformers' in-memory names), the experts of one
    # MoE layer stacked into 3-D tensors, and a multi-token-prediction tensor
    path = _copy(ckpt, tmp_path)
    old = load_file(path / "model.safetensors")
    new = {k.replace("backbone.", "model.", 1): v for k, v in old.items()}
    moe = "model.layers.1.mixer.experts"
    for proj in ("up_proj", "down_proj"):
        names = [f"{moe}.{e}.{proj}.weight" for e in range(fam.HF_CONFIG["n_routed_experts"])]
        new[f"{moe}.{proj}"] = np.stack([new.pop(n) for n in names])
    new["mtp.layers.0.norm.weight"] = np.ones(48, np.float32)
    save_file(new, path / "model.safetensors", metadata={"format": "pt"})
    # When it is loaded
    _, model = load_nemotron_h(path)
    # Then every parameter equals the original load
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(loaded[1]))


# --------------------------------------------------------------------------------------------
# Config and memory layout


def test_config_reads_transformers_config_and_legacy_pattern(ckpt):
    from transformers import NemotronHConfig as HFConfig

    # Given transformers' config of the tiny model
    hf_cfg = HFConfig(**fam.HF_CONFIG)
    cfg = NemotronHConfig.from_hf(ckpt)
    # Then the layer kinds agree, in either spelling
    assert list(cfg.layers_block_type) == hf_cfg.layers_block_type
    assert cfg.hybrid_override_pattern == hf_cfg.hybrid_override_pattern == "ME*-M*E"
    assert cfg.d_inner == hf_cfg.mamba_num_heads * hf_cfg.mamba_head_dim
    # And an old-style config (pattern string, mamba_* key names) reads the same
    old = json.loads((ckpt / "config.json").read_text())
    del old["layers_block_type"]
    old["hybrid_override_pattern"] = "ME*-M*E"
    old["num_hidden_layers"] = 7
    for new_key, old_key in (
        ("n_groups", "mamba_n_groups"),
        ("conv_kernel", "mamba_d_conv"),
        ("chunk_size", "mamba_chunk_size"),
    ):
        old[old_key] = old.pop(new_key)
    assert NemotronHConfig.from_hf(old) == cfg
    assert hash(NemotronHConfig.from_hf(old)) == hash(cfg)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"mlp_hidden_act": "silu"}, jh.InvalidArgumentError, "relu2"),
        ({"mamba_hidden_act": "gelu"}, jh.InvalidArgumentError, "silu"),
        ({"sliding_window": 64}, jh.InvalidArgumentError, "sliding"),
        ({"layers_block_type": "M*X"}, jh.InvalidArgumentError, "'X'"),
        ({"layers_block_type": ["mamba", "cross"]}, jh.InvalidArgumentError, "cross"),
        ({"layers_block_type": 3}, jh.InvalidTypeError, "layers_block_type"),
        ({"num_experts_per_tok": 5}, jh.InvalidArgumentError, "num_experts_per_tok"),
        ({"n_group": 8}, jh.InvalidArgumentError, "n_group"),
        ({"mamba_num_heads": 7}, jh.InvalidArgumentError, "n_groups"),
        ({"model_type": "jamba"}, jh.InvalidArgumentError, "nemotron_h"),
    ],
)
def test_config_refuses_unsupported_or_invalid_values(change, error, message):
    with pytest.raises(error, match=message):
        NemotronHConfig.from_hf({"model_type": "nemotron_h", **fam.HF_CONFIG, **change})


def test_memory_config_routes_mamba_and_attention_layers_only():
    # Given the plug-in of the tiny config (layers M E * - M * E)
    config = NemotronHConfig.from_hf({"model_type": "nemotron_h", **fam.HF_CONFIG})
    plugin = NemotronHModel(config)
    cfg = plugin.memory_config(kv_size=32, n_seq_max=2)
    # Then the Mamba-2 layers are recurrent, the attention layers use the KV cache, and the MLP
    # and MoE layers use neither
    assert cfg.recurrent_layers == config.mamba_layers == (0, 4)
    assert cfg.attn_layers == config.attention_layers == (2, 5)
    kinds = plugin.memory_layout()["layer_kinds"]
    assert [kinds[i] for i in (1, 3, 6)] == [jh.LayerKind.NONE] * 3
    # With Mamba-2's per-head state shapes and the attention's KV heads
    assert cfg.recurrent.r_shape == (3, 64 + 2 * 2 * 8)
    assert cfg.recurrent.s_shape == (8, 8, 8)
    assert (cfg.kv.n_kv_heads, cfg.kv.head_dim_k) == (2, 16)
    # And no RoPE (nothing to shift), and equal configs give equal plug-ins
    assert plugin.rope_fn is None
    assert NemotronHModel(config) == plugin and hash(NemotronHModel(config)) == hash(plugin)


def test_sharding_rules_split_attention_mlp_and_experts_only(loaded):
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    # Given the loaded model and a two-device model axis
    config, model = loaded
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    specs = nnx.to_pure_dict(NemotronHModel(config).param_specs(nnx.state(model), mesh))
    layers = specs["layers"]
    # Then attention heads, MLP / expert features and the vocabulary are split
    assert layers[2]["mixer"]["q_proj"]["kernel"] == P(None, "model")
    assert layers[5]["mixer"]["o_proj"]["kernel"] == P("model", None)
    assert layers[3]["mixer"]["up_proj"]["kernel"] == P(None, "model")
    assert layers[1]["mixer"]["experts"]["up_proj"] == P(None, None, "model")
    assert layers[6]["mixer"]["experts"]["down_proj"] == P(None, "model", None)
    assert specs["lm_head"]["kernel"] == P(None, "model")
    # And Mamba-2, the router and the latent projections are replicated
    mamba = jax.tree.leaves(layers[0]["mixer"])
    assert len(mamba) == 8 and all(spec == P() for spec in mamba)
    assert layers[1]["mixer"]["gate"]["weight"] == P()
    assert layers[1]["mixer"]["fc1_latent_proj"]["kernel"] == P()
