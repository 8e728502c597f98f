"""LFM2 in Flax NNX against transformers' ``Lfm2ForCausalLM``, through the hybrid memory.

One tiny seeded checkpoint (``family_lfm2.HF_CONFIG``) is written by transformers'
``save_pretrained`` and read back by :func:`jaxhybrid.models.lfm2.load_lfm2`. Every forward runs
through :func:`jaxhybrid.serving.prefill` with the same static shapes and one memory config (with
rollback snapshots), so it compiles once; the tied variant (``TIED_CONFIG``) compiles only its
forward. LFM2's conv blocks keep no SSM state: their recurrent ``s`` is empty (``s_shape = (0,)``),
so the sequence operations, rollback, state save/restore and sharding of the memory are checked
on that shape too.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
nnx = pytest.importorskip("flax.nnx")

import family_lfm2 as fam  # noqa: E402

import jaxhybrid as jh  # noqa: E402
from jaxhybrid.models.lfm2 import (  # noqa: E402
    Lfm2Config,
    Lfm2Model,
    init_lfm2,
    lfm2_forward,
    lfm2_tensor_shapes,
    load_lfm2,
)

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.*"),
]

# The 100-token prompt crosses the boundary between the two ubatches of 128 slots (4 rows of 100).
PROMPT_LENGTHS = (1, 7, 33, 100)
PARITY_TOL = 1e-4
N_SNAPSHOTS = 3


def _copy(mem):
    """A copy of a memory that a donating call may consume."""
    return jax.tree.map(jnp.copy, mem)


class Case:
    def __init__(self, path):
        self.path = path
        self.config, self.model = load_lfm2(path)
        self.plugin = Lfm2Model(self.config)
        self.run = fam.HybridRunner(self.plugin, self.model)
        # One memory config for every test, with rollback snapshots: the empty SSM state then has
        # empty snapshots too.
        self.cfg = self.plugin.memory_config(kv_size=256, n_seq_max=4, n_snapshots=N_SNAPSHOTS)
        self.run.cfg = self.cfg
        rng = np.random.default_rng(7)
        vocab = fam.HF_CONFIG["vocab_size"]
        self.prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]
        self._prefilled = None

    def prefilled(self):
        """``(mem, logits)`` after prompts 2 (33 tokens) and 1 (7 tokens) in sequences 0 and 1;
        the memory is a fresh copy on every call."""
        if self._prefilled is None:
            logits, mem = self.run(self.run.new_memory(), [self.prompts[2], self.prompts[1]])
            self._prefilled = (mem, logits)
        mem, logits = self._prefilled
        return _copy(mem), logits


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = fam.tiny_checkpoint(tmp_path_factory.mktemp("lfm2"), seed=1)
    return Case(path)


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    return fam.tiny_checkpoint(tmp_path_factory.mktemp("lfm2_tied"), fam.TIED_CONFIG, seed=2)


# --------------------------------------------------------------------------------------------
# Parity with transformers


def test_logits_match_transformers(case, record_property):
    # Given the four prompts decoded together through the hybrid memory
    logits, _ = case.run(case.run.new_memory(), case.prompts)
    # When transformers runs each prompt alone
    diffs = {}
    for i, prompt in enumerate(case.prompts):
        ref = fam.hf_logits(case.path, prompt)
        diffs[len(prompt)] = float(np.abs(logits[i, : len(prompt)] - ref).max())
    record_property("max_abs_logit_diff", diffs)
    print("lfm2 parity", diffs)
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


def test_prompt_whole_in_pieces_or_token_by_token_gives_the_same_logits(case):
    # Given a 70-token prompt fed whole (sequence 0), in pieces of 30 and 40 (sequence 1, the
    # second piece interleaved with sequence 2's first piece) and token by token (sequence 2)
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
    # Then all three agree (the conv is exact whatever the split; attention sums may round
    # differently)
    np.testing.assert_allclose(pieces, whole[0, :70], atol=1e-5, rtol=0)
    np.testing.assert_allclose(by_token, whole[0, :70], atol=1e-5, rtol=0)


def test_tied_variant_matches_transformers(tied_path, record_property):
    # Given the tied checkpoint (no lm_head tensor, no conv bias, conv width 4, head_dim 8)
    config, model = load_lfm2(tied_path)
    assert config.tie_word_embeddings and model.lm_head is None
    prompts = [list(range(3, 10)), list(range(40, 73))]
    # When its forward runs the prompts as fresh sequences of one ubatch
    got = fam.fresh_logits(lfm2_forward, model, prompts, conv_shape=(3, 32), ssm_shape=(0,))
    # Then the logits are transformers'
    diffs = [
        float(np.abs(g - fam.hf_logits(tied_path, p)).max())
        for g, p in zip(got, prompts, strict=True)
    ]
    record_property("tied_max_abs_logit_diff", diffs)
    print("lfm2 tied parity", diffs)
    assert max(diffs) <= PARITY_TOL, diffs


# --------------------------------------------------------------------------------------------
# Config and plug-in


def test_memory_config_routes_layer_kinds(case):
    c = case.config
    cfg = case.plugin.memory_config(kv_size=32, n_seq_max=2)
    # Conv first and last, attention at layers 1 and 3, in model order
    assert c.layer_types == ("conv", "full_attention", "conv", "full_attention", "conv")
    assert cfg.attn_layers == (1, 3)
    assert cfg.recurrent_layers == (0, 2, 4)
    # The conv window of B * x is the whole state; the SSM state is empty
    assert cfg.recurrent.r_shape == (2, 32)
    assert cfg.recurrent.s_shape == (0,)
    assert (cfg.kv.n_kv_heads, cfg.kv.head_dim_k) == (2, 8)
    # The K-shift RoPE rotates the whole head, NeoX layout, base 5000
    assert case.plugin.rope_fn == jh.kv.rope_shift_fn(theta=5000.0, neox=True)
    assert case.plugin.n_vocab == 160


def test_config_matches_transformers(case):
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    hf = fam.hf_config(**fam.HF_CONFIG)
    c = case.config
    assert c.layer_types == tuple(hf.layer_types)
    assert c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.ff_dim == Lfm2MLP(hf).w1.out_features == 80
    assert c.tie_word_embeddings == hf.tie_word_embeddings is False
    assert Lfm2Config.from_hf(dict(c.__dict__, model_type="lfm2")) == c


@pytest.mark.parametrize(
    "fields",
    [
        # the legacy keys: tie_embedding, block_ff_dim, full_attn_idxs, a top-level rope_theta
        dict(
            tie_embedding=False,
            block_ff_dim=100,
            full_attn_idxs=[0, 3],
            rope_theta=300.0,
        ),
        # layer_types wins over full_attn_idxs; the feed-forward width taken as given
        dict(
            layer_types=["conv", "conv", "full_attention", "conv"],
            full_attn_idxs=[1],
            block_auto_adjust_ff_dim=False,
            intermediate_size=24,
            head_dim=4,
        ),
        # nothing but the sizes: transformers' defaults (every layer attention, tied, base 1e6)
        dict(),
    ],
)
def test_config_fields_follow_transformers(fields):
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    sizes = dict(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        block_multiple_of=8,
    )
    config = dict(sizes, **fields)
    hf = fam.hf_config(**config)
    ours = Lfm2Config.from_hf(dict(config, model_type="lfm2"))
    assert ours.layer_types == tuple(hf.layer_types)
    assert ours.full_attn_idxs == tuple(
        i for i, t in enumerate(hf.layer_types) if t == "full_attention"
    )
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.intermediate_size == hf.intermediate_size
    assert ours.ff_dim == Lfm2MLP(hf).w1.out_features
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.head_dim == (getattr(hf, "head_dim", None) or 16 // 2)


def test_a_null_ffn_multiplier_turns_the_rounding_off():
    # transformers' Lfm2MLP skips the multiplier and the rounding when it is None (its 5.24
    # config class refuses a null, older ones pass it through)
    config = dict(model_type="lfm2", hidden_size=16, num_attention_heads=2, block_ff_dim=100)
    assert Lfm2Config.from_hf(dict(config, block_ffn_dim_multiplier=None)).ff_dim == 66
    assert Lfm2Config.from_hf(config).ff_dim == 256


def test_init_has_the_structure_of_a_loaded_checkpoint(case):
    model = init_lfm2(case.config, seed=0)
    chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(model), nnx.state(case.model))


# --------------------------------------------------------------------------------------------
# Loader errors


def test_loader_reports_a_missing_tensor(case, tmp_path):
    name = "model.layers.2.conv.conv.bias"
    path = fam.copy_checkpoint(case.path, tmp_path, edit_tensors=lambda t: t.pop(name))
    assert lfm2_tensor_shapes(case.config)[name] == (32,)
    with pytest.raises(jh.InvalidArgumentError, match=rf"missing tensor '{name}' \(expected"):
        load_lfm2(path)


def test_loader_reports_a_wrong_shape(case, tmp_path):
    name = "model.layers.1.self_attn.k_layernorm.weight"

    def edit(t):
        t[name] = np.ones((32,), np.float32)

    path = fam.copy_checkpoint(case.path, tmp_path, edit_tensors=edit)
    with pytest.raises(
        jh.InvalidArgumentError, match=rf"'{name}' has shape \(32,\), expected shape \(8,\)"
    ):
        load_lfm2(path)


def test_loader_ignores_the_lm_head_of_a_tied_checkpoint(tied_path, tmp_path):
    # Given a tied checkpoint that also stores the LM head (the embedding)
    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    path = fam.copy_checkpoint(tied_path, tmp_path, edit_tensors=edit)
    # Then it loads as the tied model it is
    _, model = load_lfm2(path)
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(load_lfm2(tied_path)[1]))


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("conv_L_cache", 3.0, jh.InvalidTypeError, "conv_L_cache must be an int"),
        ("conv_L_cache", 1, jh.InvalidArgumentError, "conv_L_cache must be an int >= 2"),
        ("conv_bias", "true", jh.InvalidTypeError, "conv_bias must be a bool"),
        ("tie_embedding", 0, jh.InvalidTypeError, "tie_word_embeddings must be a bool"),
        ("layer_types", ["conv"] * 4, jh.InvalidArgumentError, "num_hidden_layers=5 layers"),
        ("layer_types", ["conv", "mamba", "conv", "conv", "conv"], jh.InvalidArgumentError, "mam"),
        ("block_ffn_dim_multiplier", "1.5", jh.InvalidTypeError, "block_ffn_dim_multiplier"),
        ("norm_eps", -1e-5, jh.InvalidArgumentError, "norm_eps must be > 0"),
        ("num_key_value_heads", 3, jh.InvalidArgumentError, "multiple of num_key_value_heads"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, jh.InvalidArgumentError, "RoPE"),
        ("model_type", "bamba", jh.InvalidArgumentError, "model_type 'lfm2'"),
    ],
)
def test_loader_refuses_a_bad_config_field(case, tmp_path, field, value, error, match):
    def edit(config):
        config[field] = value

    path = fam.copy_checkpoint(case.path, tmp_path, edit_config=edit)
    with pytest.raises(error, match=match):
        load_lfm2(path)


# --------------------------------------------------------------------------------------------
# The empty recurrent state end to end


def test_memory_holds_an_empty_ssm_state(case):
    mem, _ = case.prefilled()
    # Three conv layers, four cells, nothing per cell; snapshots as empty
    assert mem.recurrent.s.shape == (3, 4, 0)
    assert mem.recurrent.snap_s.shape == (3, 4, N_SNAPSHOTS, 0)
    assert mem.recurrent.r.shape == (3, 4, 2, 32)
    # The conv state holds the last two values of B * x: not zero after a prompt
    assert np.all(np.abs(np.asarray(mem.recurrent.r[:, :2])).max(axis=(2, 3)) > 0)
    pos_max = [int(jh.seq_pos_max(mem, s, case.cfg)) for s in range(4)]
    assert pos_max == [32, 6, -1, -1]


def _next(case, mem, rows):
    """Logits of the first token of every row (continuing ``mem``) and the memory."""
    logits, mem = case.run(mem, rows)
    return logits[:, 0], mem


def test_sequence_operations_on_an_empty_ssm_state(case):
    token = [11]
    mem, _ = case.prefilled()
    expected, _ = _next(case, _copy(mem), [token])
    # seq_cp: sequence 3 shares sequence 0 and continues it identically
    copied, ok = jh.seq_cp(_copy(mem), 0, 3, -1, -1, case.cfg)
    assert bool(ok)
    got, _ = _next(case, copied, [token, [], [], token])
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[3], expected[0])
    # seq_keep: only sequence 0 is left, and it continues as before (its new token takes a cell
    # that sequence 1 freed, before sequence 0's own cells: only the attention sums' order moves)
    kept, ok = jh.seq_keep(_copy(mem), 0, case.cfg)
    assert bool(ok)
    assert [int(jh.seq_pos_max(kept, s, case.cfg)) for s in range(4)] == [32, -1, -1, -1]
    got, _ = _next(case, kept, [token])
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-5)
    # seq_rm of a whole sequence frees it; a partial removal beyond the snapshots is refused
    removed, ok = jh.seq_rm(_copy(mem), 1, -1, -1, case.cfg)
    assert bool(ok) and int(jh.seq_pos_max(removed, 1, case.cfg)) == -1
    assert not np.any(np.asarray(removed.recurrent.cells.seq[:, 1]))
    refused, ok = jh.seq_rm(_copy(mem), 0, 10, -1, case.cfg)
    assert not bool(ok)
    chex.assert_trees_all_equal(refused, mem)


def test_rollback_within_the_snapshots_rewinds_an_empty_ssm_state(case):
    # Given sequence 0 after its 33-token prompt
    mem, logits = case.prefilled()
    prompt = case.prompts[2]
    # When its last 2 tokens are removed (<= n_snapshots, §5.10) and fed again
    mem, ok = jh.seq_rm(mem, 0, 31, -1, case.cfg)
    assert bool(ok) and int(jh.seq_pos_max(mem, 0, case.cfg)) == 30
    again, _ = case.run(mem, [prompt[31:]])
    # Then their logits are those of the first pass
    np.testing.assert_allclose(again[0, :2], logits[0, 31:33], rtol=0, atol=1e-5)


def _seq_content(mem, seq: int):
    """What a memory holds of sequence ``seq``: its KV cells' positions, K and V rows (in
    position order) and its recurrent cell's position, states and snapshots."""
    kv, recr = jax.device_get((mem.kv, mem.recurrent))
    stream, cell = np.nonzero(kv.cells.seq[..., seq])
    order = np.argsort(kv.cells.pos[stream, cell])
    stream, cell = stream[order], cell[order]
    tail = int(recr.cells.tail[seq])
    return dict(
        pos=kv.cells.pos[stream, cell],
        k=kv.k[:, stream, cell],
        v=kv.v[:, stream, cell],
        recurrent_pos=recr.cells.pos[tail],
        r=recr.r[:, tail],
        s=recr.s[:, tail],
        snap=recr.cells.snap[tail],
        snap_r=recr.snap_r[:, tail],
        snap_s=recr.snap_s[:, tail],
    )


@pytest.mark.parametrize("flags", [jh.StateFlags.NONE, jh.StateFlags.SNAPSHOTS])
def test_whole_memory_state_round_trips(case, flags):
    # Given a memory holding two sequences
    mem, _ = case.prefilled()
    blob = jh.state_write(mem, case.cfg, flags=flags)
    # When it is restored into an empty memory
    restored = jh.load_state(case.run.new_memory(), case.cfg, blob, flags=flags)
    # Then it saves to the same bytes and holds the same cells, K/V and states (the search
    # hints start over, §9.5; the empty s rows are records of 0 bytes, §9.4)...
    assert jh.state_write(restored, case.cfg, flags=flags) == blob
    restored_kv = restored.kv._replace(cells=restored.kv.cells._replace(head=mem.kv.cells.head))
    chex.assert_trees_all_equal(restored_kv, mem.kv)
    recr, want = restored.recurrent, mem.recurrent
    chex.assert_trees_all_equal(
        (recr.cells.pos, recr.cells.seq, recr.cells.tail, recr.r, recr.s),
        (want.cells.pos, want.cells.seq, want.cells.tail, want.r, want.s),
    )
    assert recr.s.shape == (3, 4, 0)
    if flags & jh.StateFlags.SNAPSHOTS:
        chex.assert_trees_all_equal(
            (recr.cells.snap, recr.snap_r, recr.snap_s), (want.cells.snap, want.snap_r, want.snap_s)
        )
    # ...and continues both sequences with identical logits
    rows = [[11], [12]]
    expected, _ = _next(case, _copy(mem), rows)
    got, _ = _next(case, restored, rows)
    np.testing.assert_array_equal(got[:2], expected[:2])


def test_sequence_state_round_trips_into_another_sequence(case, tmp_path):
    # Given sequence 0 holding the 33-token prompt alone, saved with its snapshots to a blob and
    # to a file
    _, solo = case.run(case.run.new_memory(), [case.prompts[2]])
    flags = jh.StateFlags.SNAPSHOTS
    blob = jh.state_write(solo, case.cfg, 0, flags=flags)
    path = tmp_path / "seq0.jhs"
    jh.save_state_file(path, solo, case.cfg, 0, tokens=case.prompts[2], flags=flags)
    # When it is restored as sequence 2 of an empty memory, and beside two other sequences
    alone, tokens = jh.load_state_file(path, case.run.new_memory(), case.cfg, 2, flags=flags)
    mem, _ = case.prefilled()
    beside = jh.load_state(mem, case.cfg, blob, 2, flags=flags)
    # Then sequence 2 holds exactly what sequence 0 held...
    assert tokens.tolist() == case.prompts[2]
    want = _seq_content(solo, 0)
    assert want["s"].shape == (3, 0) and want["snap_s"].shape == (3, N_SNAPSHOTS, 0)
    chex.assert_trees_all_equal(_seq_content(alone, 2), want)
    chex.assert_trees_all_equal(_seq_content(beside, 2), want)
    # ...and continues with identical logits
    expected, _ = _next(case, solo, [[11]])
    got, _ = _next(case, alone, [[], [], [11]])
    np.testing.assert_array_equal(got[2], expected[0])
    got, _ = _next(case, beside, [[], [], [11]])
    np.testing.assert_array_equal(got[2], expected[0])


def test_sharding_accepts_an_empty_ssm_state(case):
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    specs = jh.memory_partition_specs(case.cfg, mesh)
    # The channel axes: r's hidden (last) axis and s's only (empty) axis over "model"
    assert specs.recurrent.r == jax.sharding.PartitionSpec(None, None, None, "model")
    assert specs.recurrent.s == jax.sharding.PartitionSpec(None, None, "model")
    assert specs.recurrent.snap_s == jax.sharding.PartitionSpec(None, None, None, "model")
    # The memory moves onto the mesh unchanged, and builds there empty
    mem, _ = case.prefilled()
    sharded = jh.shard_memory(mem, case.cfg, mesh)
    chex.assert_trees_all_equal(sharded, mem)
    assert sharded.recurrent.s.sharding == jh.memory_sharding(case.cfg, mesh).recurrent.s
    empty = jh.init_hybrid_sharded(case.cfg, mesh)
    chex.assert_trees_all_equal_shapes_and_dtypes(empty, mem)
    # The parameters' tensor-parallel specs split the attention heads and the feed-forward
    P = jax.sharding.PartitionSpec
    specs = nnx.to_pure_dict(case.plugin.param_specs(nnx.state(case.model), mesh))
    conv, attn = specs["layers"][0], specs["layers"][1]
    assert attn["self_attn"]["q_proj"]["kernel"] == P(None, "model")
    assert attn["self_attn"]["out_proj"]["kernel"] == P("model", None)
    assert conv["feed_forward"]["w1"]["kernel"] == P(None, "model")
    assert conv["feed_forward"]["w2"]["kernel"] == P("model", None)
    assert specs["lm_head"]["kernel"] == P(None, "model")
    assert all(spec == P() for spec in jax.tree.leaves(conv["conv"]))
