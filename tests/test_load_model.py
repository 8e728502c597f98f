"""The one entry point: :func:`jaxhybrid.models.load_model` reads ``config.json`` and loads the
family its ``model_type`` names, exactly as that family's own loader does (§7.2: the memory
layout it plans routes each layer as the family declares)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

pytest.importorskip("flax")
pytest.importorskip("transformers")

import family_bamba
import family_falcon_h1
import family_granite
import family_lfm2
import family_nemotron_h
import family_qwen
import jamba_utils

import jaxhybrid as jh
import jaxhybrid.models as jm

# model_type -> (build a tiny checkpoint in a directory, the family's own loader, plug-in,
# memory routing of the tiny config: per layer (attention, recurrent)).
FAMILIES = {
    "jamba": (
        lambda p: jamba_utils.make_checkpoint(p, jamba_utils.MOE_GQA),
        jm.load_jamba,
        jm.JambaModel,
    ),
    "nemotron_h": (family_nemotron_h.tiny_checkpoint, jm.load_nemotron_h, jm.NemotronHModel),
    "granitemoehybrid": (
        family_granite.tiny_checkpoint,
        jm.load_granite_hybrid,
        jm.GraniteHybridModel,
    ),
    "falcon_h1": (family_falcon_h1.tiny_checkpoint, jm.load_falcon_h1, jm.FalconH1Model),
    "bamba": (family_bamba.tiny_checkpoint, jm.load_bamba, jm.BambaModel),
    "lfm2": (family_lfm2.tiny_checkpoint, jm.load_lfm2, jm.Lfm2Model),
    "qwen3_next": (family_qwen.tiny_checkpoint, jm.load_qwen3_next, jm.Qwen3NextModel),
    "qwen3_5_text": (
        lambda p: family_qwen.tiny_checkpoint(p, "qwen3_5"),
        jm.load_qwen3_next,
        jm.Qwen3NextModel,
    ),
    "qwen3_5_moe_text": (
        lambda p: family_qwen.tiny_checkpoint(p, "qwen3_5_moe"),
        jm.load_qwen3_next,
        jm.Qwen3NextModel,
    ),
    # The conditional-generation checkpoints (their vision tower is skipped with a warning).
    "qwen3_5": (
        lambda p: family_qwen.tiny_conditional_checkpoint(p, "qwen3_5"),
        jm.load_qwen3_next,
        jm.Qwen3NextModel,
    ),
    "qwen3_5_moe": (
        lambda p: family_qwen.tiny_conditional_checkpoint(p, "qwen3_5_moe"),
        jm.load_qwen3_next,
        jm.Qwen3NextModel,
    ),
}


def test_every_supported_model_type_has_a_case():
    assert sorted(FAMILIES) == list(jm.SUPPORTED_MODEL_TYPES)


@pytest.mark.filterwarnings("ignore:.*vision tower:UserWarning")
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_load_model_picks_the_family(tmp_path, model_type):
    # Given a tiny checkpoint of the family written by transformers
    build, load_family, plugin_cls = FAMILIES[model_type]
    build(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type

    # When it is loaded through the entry point and through the family's own loader
    plugin, model = jm.load_model(tmp_path)
    config, own = load_family(tmp_path)

    # Then the entry point returns the family's plug-in of the same config, the same weights
    assert type(plugin) is plugin_cls
    assert plugin.config == config
    assert type(model) is type(own)
    got, want = jax.tree.leaves(model), jax.tree.leaves(own)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the config alone gives the same plug-in (what the demo plans its memory with)
    assert jm.model_plugin(tmp_path) == plugin
    cfg = plugin.memory_config(kv_size=32, n_seq_max=2)
    assert isinstance(cfg, jh.HybridConfig)
    assert len(cfg.layer_kinds) == config.num_hidden_layers
    # and its tensor-parallel rules give every parameter a spec, splitting some over "model"
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    specs = jax.tree.leaves(
        plugin.param_specs(model, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    assert len(specs) == len(want)
    assert any("model" in spec for spec in specs)


def test_layer_routing_follows_the_family(tmp_path):
    # Falcon-H1 runs attention and Mamba-2 in every layer: both parts serve each layer (§7.2);
    # Nemotron-H's MLP and MoE layers are served by neither.
    family_falcon_h1.tiny_checkpoint(tmp_path / "falcon")
    family_nemotron_h.tiny_checkpoint(tmp_path / "nemotron")
    falcon = jm.model_plugin(tmp_path / "falcon").memory_config(kv_size=32, n_seq_max=2)
    nemotron = jm.model_plugin(tmp_path / "nemotron").memory_config(kv_size=32, n_seq_max=2)

    assert all(kind == jh.LayerKind.BOTH for kind in falcon.layer_kinds)
    want = [
        {"linear_attention": jh.LayerKind.RECURRENT, "full_attention": jh.LayerKind.ATTENTION}.get(
            kind, jh.LayerKind.NONE
        )
        for kind in family_nemotron_h.HF_CONFIG["layers_block_type"]
    ]
    assert list(nemotron.layer_kinds) == want


@pytest.mark.parametrize("model_type", ["llama", None, 3])
def test_an_unsupported_model_type_lists_the_supported_ones(tmp_path, model_type):
    config = {"model_type": model_type} if model_type is not None else {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for entry in (jm.load_model, jm.model_plugin):
        with pytest.raises(jh.InvalidArgumentError) as e:
            entry(tmp_path)
        assert f"model_type {model_type!r} is not supported" in str(e.value)
        assert "supported model types: " + ", ".join(jm.SUPPORTED_MODEL_TYPES) in str(e.value)


def test_load_model_refuses_a_path_that_is_no_directory(tmp_path):
    with pytest.raises(jh.InvalidArgumentError, match="is not a directory"):
        jm.load_model(tmp_path / "missing")
    with pytest.raises(jh.InvalidTypeError, match=r"path must be a str or os\.PathLike"):
        jm.load_model(3)
