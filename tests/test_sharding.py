"""Sharding over device meshes (issue 11), on 8 simulated CPU devices.

The partition rules of the memory and of Jamba's parameters, sharded initialisation and
placement (per-device shard shapes), Jamba prefill / decode / generate on 1x8, 2x4 and 8x1 meshes
against the single-device run, sequence operations and K-shift keeping the layout, and the
collectives left in the compiled HLO of one decode step.

``tests/conftest.py`` asks XLA for 8 host devices before JAX starts its backend.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("flax.nnx")

import jamba_utils as ju

import jaxhybrid as jh
from jaxhybrid.models import (
    JambaConfig,
    JambaModel,
    init_jamba,
    jamba_hybrid_config,
    jamba_param_specs,
    shard_jamba,
)
from jaxhybrid.serving import GenerateOutput, decode_tokens, generate

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS set by tests/conftest.py)"
)

# Every head count, d_inner and the stream count divide 8, 4 and 2. Layer 0 is Mamba with a
# dense MLP, layer 1 attention with a mixture of experts.
JAMBA = {
    **ju.MOE_GQA,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 8,
}
N_SEQ = 8
KV_SIZE = 32  # cells per stream
N_UBATCH = 8
N_GEN = 4  # tokens generated per sequence
PROMPTS = [[5, 17, 99, 3, 64, 21, 8], [42, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8], [77], [3, 4]]
MESHES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
JM = JambaModel(JambaConfig(**JAMBA))


def _mesh(shape) -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))


def _prompt_arrays():
    arr = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int32)
    for i, p in enumerate(PROMPTS):
        arr[i, : len(p)] = p
    lens = np.array([len(p) for p in PROMPTS], np.int32)
    return jnp.asarray(arr), jnp.asarray(lens), jnp.arange(len(PROMPTS), dtype=jnp.int32)


def _decode_fn(cfg, mesh=None):
    """``decode_tokens`` for ``cfg``; on a mesh, jitted again with the memory's
    ``out_shardings`` pinned to the rules (the README's recipe), memory donated."""
    dec = functools.partial(decode_tokens, JM, cfg=cfg, n_ubatch=N_UBATCH)
    if mesh is None:
        return dec
    pin = dict(out_shardings=(None, jh.memory_sharding(cfg, mesh), None), donate_argnums=1)
    return jax.jit(dec, **pin)


def _greedy(model, mem, cfg, mesh=None):
    """Feeds every prompt one token per step (all sequences in one batch), then continues each
    greedily for ``N_GEN`` tokens, one compiled decode step for all of it.

    Returns every step's logits ``[steps, seqs, vocab]``, the generated tokens ``[seqs, N_GEN]``,
    the memory after every step and the decode function used.
    """
    dec = _decode_fn(cfg, mesh)
    lens = [len(p) for p in PROMPTS]
    n = len(PROMPTS)
    ids = jnp.arange(n, dtype=jnp.int32)
    gen = [[] for _ in range(n)]
    all_logits, mems, logits = [], [], None
    for t in range(max(lens) + N_GEN - 1):
        tok = np.zeros(n, np.int32)
        active = np.zeros(n, bool)
        for i, p in enumerate(PROMPTS):
            if t < lens[i]:
                tok[i], active[i] = p[t], True
            elif len(gen[i]) < N_GEN:
                gen[i].append(int(np.argmax(logits[i])))
                tok[i], active[i] = gen[i][-1], len(gen[i]) < N_GEN
        logits, mem, code = dec(model, mem, jnp.asarray(tok), ids, jnp.asarray(active))
        assert int(code) == 0
        logits = np.asarray(logits)
        all_logits.append(logits)
        mems.append(mem)
    for i in range(n):  # the longest prompt's last token is sampled, never decoded
        if len(gen[i]) < N_GEN:
            gen[i].append(int(np.argmax(logits[i])))
    assert all(len(g) == N_GEN for g in gen)
    return np.stack(all_logits), np.asarray(gen), mems, dec


@pytest.fixture(scope="module")
def jamba():
    config = JambaConfig(**JAMBA)
    model = init_jamba(config, seed=7)
    cfg = jamba_hybrid_config(config, kv_size=KV_SIZE, n_seq_max=N_SEQ, unified=False)
    ref_logits, ref_tokens, mems, _ = _greedy(model, jh.init_hybrid(cfg), cfg)
    return config, model, cfg, ref_logits, ref_tokens, mems[-1]


def _assert_layout(mem, cfg, mesh, what=None):
    """Every buffer of ``mem`` has the layout the rules give for ``mesh``."""
    want = jh.memory_sharding(cfg, mesh)
    leaves = jax.tree.leaves_with_path(mem)
    for (path, got), exp in zip(leaves, jax.tree.leaves(want), strict=True):
        assert got.sharding.is_equivalent_to(exp, got.ndim), (what, path, got.sharding, exp)


def _hybrid_cfg(unified: bool) -> jh.HybridConfig:
    return jh.HybridConfig.from_layers(
        [True, False, True],
        jh.KVConfig(
            kv_size=32, n_seq_max=N_SEQ, n_kv_heads=4, head_dim_k=8, head_dim_v=16, unified=unified
        ),
        jh.RecurrentConfig(n_seq_max=N_SEQ, r_shape=(3, 16), s_shape=(16, 4)),
    )


# --------------------------------------------------------------------------------------------
# Rules


def test_partition_specs_follow_the_rules():
    mesh = _mesh((2, 4))
    # Given per-sequence streams, then streams go over data and KV heads over model
    specs = jh.memory_partition_specs(_hybrid_cfg(unified=False), mesh)
    assert specs.kv.k == P(None, "data", None, "model", None)
    assert specs.kv.v == P(None, "data", None, "model", None)
    # and recurrent channels (last axis of r, first of s) over model, cells not split
    assert specs.recurrent.r == P(None, None, None, "model")
    assert specs.recurrent.s == P(None, None, "model", None)
    # and KV cell metadata goes with its stream, recurrent cell metadata is replicated
    assert specs.kv.cells == (P("data", None), P("data", None, None), P("data", None), P("data"))
    assert specs.recurrent.cells == (P(), P(), P(), P(), None)  # no snapshots configured
    # Given a unified cache, then its cells go over data instead
    assert jh.memory_partition_specs(_hybrid_cfg(True), mesh).kv.k == P(
        None, None, "data", "model", None
    )


def test_partition_specs_fall_back_to_head_dim_and_reject_what_does_not_divide():
    mesh = _mesh((1, 8))
    # Given 4 KV heads on an 8-wide model axis, then the head dims (8 and 16) are split instead
    specs = jh.memory_partition_specs(_hybrid_cfg(unified=False), mesh)
    assert specs.kv.k == P(None, "data", None, None, "model")
    # Given a recurrent channel axis that 8 does not divide, then a clear error
    cfg = dataclasses_replace_recurrent(_hybrid_cfg(False), r_shape=(3, 12))
    with pytest.raises(ValueError, match=r"r_shape\[1\] = 12 is not divisible by the size 8"):
        jh.memory_partition_specs(cfg, mesh)
    # Given a unified cache of 36 cells on an 8-wide data axis, then a clear error
    kv = jh.KVConfig(kv_size=36, n_seq_max=N_SEQ, n_kv_heads=4, head_dim_k=8)
    with pytest.raises(ValueError, match="kv_size = 36 is not divisible by the size 8"):
        jh.kv_partition_specs(kv, _mesh((8, 1)))
    # Given heads and head dims that 8 does not divide, then an error naming both
    kv = jh.KVConfig(kv_size=32, n_kv_heads=2, head_dim_k=12)
    with pytest.raises(ValueError, match="neither n_kv_heads = 2 nor the head dims"):
        jh.kv_partition_specs(kv, mesh)
    # Given an axis name the mesh lacks, then an error; None leaves the axis unused
    with pytest.raises(ValueError, match="not 'tp'"):
        jh.kv_partition_specs(kv, mesh, model_axis="tp")
    assert jh.kv_partition_specs(kv, mesh, model_axis=None).k == P(None, None, "data", None, None)


def dataclasses_replace_recurrent(cfg: jh.HybridConfig, **changes) -> jh.HybridConfig:
    import dataclasses

    return dataclasses.replace(cfg, recurrent=dataclasses.replace(cfg.recurrent, **changes))


def test_jamba_params_are_split_tensor_parallel(jamba):
    config, model, *_ = jamba
    mesh = _mesh((2, 4))
    specs = jamba_param_specs(model, mesh)
    attn = specs.layers[1].self_attn
    mamba = specs.layers[0].mamba
    # Then q/k/v are column-parallel (heads split), o_proj row-parallel
    assert attn.q_proj.kernel.get_value() == P(None, "model")
    assert attn.k_proj.kernel.get_value() == P(None, "model")
    assert attn.o_proj.kernel.get_value() == P("model", None)
    # and Mamba's in/dt projections are column-parallel, x/out row-parallel, per-channel d_inner
    assert mamba.in_proj.kernel.get_value() == P(None, "model")
    assert mamba.dt_proj.kernel.get_value() == P(None, "model")
    assert mamba.x_proj.kernel.get_value() == P("model", None)
    assert mamba.out_proj.kernel.get_value() == P("model", None)
    assert mamba.A_log.get_value() == P("model", None)
    assert mamba.conv_weight.get_value() == P(None, "model")
    # and experts split their ff width, the router and the norms are replicated
    moe = specs.layers[1].feed_forward
    assert moe.gate_proj.get_value() == P(None, None, "model")
    assert moe.down_proj.get_value() == P(None, "model", None)
    assert moe.router.get_value() == P()
    assert specs.layers[0].input_layernorm.weight.get_value() == P()
    # When the model is placed, then each device holds a quarter of a split kernel
    sharded = shard_jamba(model, mesh)
    q = sharded.layers[1].self_attn.q_proj.kernel[...]
    assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(model.layers[1].self_attn.q_proj.kernel[...])
    )
    # Given a model axis that a split dimension does not divide, then the error names it
    odd = JambaConfig(
        **{**JAMBA, "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 6}
    )
    with pytest.raises(
        ValueError, match=r"layers\.1\.self_attn\.k_proj\.kernel of shape \(32, 18\)"
    ):
        jamba_param_specs(init_jamba(odd, 0), mesh)
    del config


# --------------------------------------------------------------------------------------------
# Placement and initialisation


@pytest.mark.parametrize("name", MESHES)
def test_sharded_init_puts_one_nth_on_each_device(name):
    d, m = MESHES[name]
    mesh = _mesh((d, m))
    cfg = _hybrid_cfg(unified=False)
    # When the memory is built directly sharded
    mem = jh.init_hybrid_sharded(cfg, mesh)
    # Then it equals the unsharded init
    ref = jh.init_hybrid(cfg)
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and every device holds 1/N: streams / d, heads / m (or head dims when heads < m)
    n_layers = cfg.kv.n_layers
    hd_split = m if cfg.kv.n_kv_heads % m else 1
    heads = cfg.kv.n_kv_heads // (1 if hd_split > 1 else m)
    k_shard = (n_layers, N_SEQ // d, 32, heads, 8 // hd_split)
    v_shard = (n_layers, N_SEQ // d, 32, heads, 16 // hd_split)
    r_shard = (cfg.recurrent.n_layers, N_SEQ, 3, 16 // m)
    s_shard = (cfg.recurrent.n_layers, N_SEQ, 16 // m, 4)
    for buf, shard in ((mem.kv.k, k_shard), (mem.kv.v, v_shard), (mem.recurrent.r, r_shard)):
        assert len(buf.addressable_shards) == 8
        assert {s.data.shape for s in buf.addressable_shards} == {shard}
    assert {s.data.shape for s in mem.recurrent.s.addressable_shards} == {s_shard}
    # and KV cell metadata goes with its stream, recurrent metadata is whole on every device
    assert {s.data.shape for s in mem.kv.cells.seq.addressable_shards} == {(N_SEQ // d, 32, N_SEQ)}
    assert {s.data.shape for s in mem.recurrent.cells.seq.addressable_shards} == {(N_SEQ, N_SEQ)}
    _assert_layout(mem, cfg, mesh)


def test_sharded_init_allocates_only_shards():
    mesh = _mesh((2, 4))
    cfg = _hybrid_cfg(unified=True)
    # When the sharded init is compiled, then its per-device output is the shard size, and no
    # temporary holds a full-size buffer
    shardings = jh.memory_sharding(cfg, mesh)
    compiled = jax.jit(jh.init_hybrid, static_argnums=0, out_shardings=shardings).lower(cfg)
    stats = compiled.compile().memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis unavailable on this backend")
    # Per device: K 4096 B and V 8192 B split 8 ways (cells over data, heads over model); KV
    # cell metadata (pos 128, seq 256, shift 128 B) split over data, the unified head (4 B)
    # whole; r 3072 B and s 4096 B split 4 ways (model); recurrent metadata (132 B) whole.
    per_device = 4096 // 8 + 8192 // 8 + (128 + 256 + 128) // 2 + 4 + 3072 // 4 + 4096 // 4 + 132
    # (the output also holds the tuple's table of buffer pointers, 8 bytes per leaf)
    n_leaves = len(jax.tree.leaves(shardings))
    assert per_device <= stats.output_size_in_bytes <= per_device + 16 * n_leaves
    assert stats.temp_size_in_bytes < 4096 // 8
    mem = jh.init_hybrid_sharded(cfg, mesh)
    _assert_layout(mem, cfg, mesh)


def test_shard_memory_moves_a_filled_memory_unchanged(jamba):
    _, _, cfg, _, _, ref_mem = jamba
    mesh = _mesh((2, 4))
    # Given a memory filled on one device, when it is placed on the mesh
    mem = jh.shard_memory(ref_mem, cfg, mesh)
    # Then values are unchanged and the layout is the rules'
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(ref_mem), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_layout(mem, cfg, mesh)


# --------------------------------------------------------------------------------------------
# Jamba under a mesh


def _collectives(hlo: str) -> list[tuple[str, str, int]]:
    """``(kind, result type, element count)`` of every collective in an HLO module's text."""
    kinds = "all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
    pattern = rf"= (\w+)\[([\d,]*)\]\S* ({kinds})(?:-start)?\("
    out = []
    for dtype, dims, kind in re.findall(pattern, hlo):
        n = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
        out.append((kind, f"{dtype}[{dims}]", n))
    return out


@pytest.mark.parametrize("name", MESHES)
def test_jamba_decode_on_mesh_matches_single_device(jamba, name):
    _, model, cfg, ref_logits, ref_tokens, _ = jamba
    mesh = _mesh(MESHES[name])
    # Given tensor-parallel parameters and a memory built sharded
    params = shard_jamba(model, mesh)
    mem = jh.init_hybrid_sharded(cfg, mesh)
    # When prompts are fed and continued greedily
    logits, tokens, mems, dec = _greedy(params, mem, cfg, mesh)
    # Then logits and tokens equal the single-device run
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(tokens, ref_tokens)
    # and the memory keeps its layout after every call, so every step reuses one compile
    for m in mems:
        _assert_layout(m, cfg, mesh)
    assert dec._cache_size() == 1
    # and the compiled decode step moves no cache-sized data: no collective carries as much as
    # a quarter of one layer's K or of one layer's SSM state (a per-step gather of the cache
    # would)
    ids = jnp.arange(N_SEQ, dtype=jnp.int32)
    hlo = dec.lower(params, mems[-1], ids, ids, jnp.ones(N_SEQ, bool)).compile().as_text()
    colls = _collectives(hlo)
    layer_k = N_SEQ * KV_SIZE * JAMBA["num_key_value_heads"] * JAMBA["head_dim"]
    layer_s = N_SEQ * 64 * JAMBA["mamba_d_state"]
    assert all(n < min(layer_k, layer_s) // 4 for _, _, n in colls), colls
    # (with a model axis, the row-parallel projections are all-reduced)
    assert MESHES[name][1] == 1 or any(kind == "all-reduce" for kind, _, _ in colls)


def test_generate_on_mesh_matches_single_device(jamba):
    _, model, cfg, _, ref_tokens, _ = jamba
    mesh = _mesh((2, 4))
    run = functools.partial(
        generate, JM, prompts=PROMPTS, cfg=cfg, n_ubatch=N_UBATCH, max_new_tokens=N_GEN
    )
    out_sh = GenerateOutput(None, None, jh.memory_sharding(cfg, mesh), None)
    # When the jitted generation loop runs on sharded parameters and memory
    out = jax.jit(run, out_shardings=out_sh, donate_argnums=1)(
        shard_jamba(model, mesh), jh.init_hybrid_sharded(cfg, mesh)
    )
    # Then its greedy tokens are those of the single-device step-by-step run
    assert int(out.code) == 0
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
    _assert_layout(out.mem, cfg, mesh)


# --------------------------------------------------------------------------------------------
# Sequence operations


def test_sequence_operations_keep_the_layout(jamba):
    _, _, cfg, _, _, filled = jamba
    mesh = _mesh((2, 4))
    rope = jh.kv.rope_shift_fn()
    ops = [
        lambda m: jh.seq_cp(m, 0, 6, -1, -1, cfg),  # across streams: K rows move between devices
        lambda m: jh.seq_rm(m, 2, 5, -1, cfg),
        lambda m: jh.seq_add(m, 1, 0, -1, 4, cfg),
        lambda m: jh.seq_div(m, 6, 0, -1, 2, cfg),
        lambda m: jh.update(m, cfg, rope),  # K-shift: re-rotates K in place
        lambda m: jh.seq_keep(m, 6, cfg),
    ]

    def chain(m):
        oks = []
        for op in ops:
            m, ok = op(m)
            oks.append(ok)
        return m, oks

    # Given a memory holding five prompts, and the whole chain run on one device
    ref, ref_oks = jax.jit(chain)(filled)
    # When each operation is jitted on its own and applied to the memory on the mesh
    mem = jh.shard_memory(filled, cfg, mesh)
    for i, (op, ref_ok) in enumerate(zip(ops, ref_oks, strict=True)):
        mem, ok = jax.jit(op)(mem)
        # Then every result keeps the layout
        assert int(ok) == int(ref_ok), i
        _assert_layout(mem, cfg, mesh, i)
    # and the end result is the single-device one
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # seq 6 is seq 0 (prompt and all but the last generated token: positions 0..9) divided by 2
    assert int(jh.seq_pos_max(mem, 6, cfg)) == (len(PROMPTS[0]) + N_GEN - 2) // 2
    assert int(jh.seq_pos_max(mem, 0, cfg)) == -1


def test_constrain_memory_pins_the_layout_inside_jit():
    mesh = _mesh((2, 4))
    cfg = _hybrid_cfg(unified=False)
    # Given a function that builds a memory on one device's layout, when constrained
    mem = jax.jit(lambda: jh.constrain_memory(jh.init_hybrid(cfg), cfg, mesh))()
    # Then the output has the rules' layout
    _assert_layout(mem, cfg, mesh)
    assert isinstance(mem.kv.k.sharding, NamedSharding)


# --------------------------------------------------------------------------------------------
# Save / restore (§9)


def _saved(mem: jh.HybridMemory) -> list:
    """The leaves a state blob holds: all but the placement search hints (§2.2, §5.4.4)."""
    kv = mem.kv._replace(cells=mem.kv.cells._replace(head=None))
    recr = mem.recurrent._replace(cells=mem.recurrent.cells._replace(head=None))
    return jax.tree.leaves(jh.HybridMemory(kv, recr))


def test_state_round_trip_on_sharded_memory(jamba):
    _, _, cfg, _, _, filled = jamba
    mesh = _mesh((2, 4))
    mem = jh.shard_memory(filled, cfg, mesh)
    # When the whole sharded memory is saved and restored into an empty sharded memory
    blob = jh.state_write(mem, cfg)
    restored, status = jh.state_read(jh.init_hybrid_sharded(cfg, mesh), cfg, blob)
    # Then the blob is the single-device one and the contents come back
    assert status.ok
    assert blob == jh.state_write(filled, cfg)
    for a, b in zip(_saved(restored), _saved(filled), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the restored memory keeps the layout of the memory it was read into
    _assert_layout(restored, cfg, mesh)


def test_sequence_state_round_trip_on_sharded_memory(jamba):
    _, _, cfg, _, _, filled = jamba
    mesh = _mesh((2, 4))
    mem = jh.shard_memory(filled, cfg, mesh)
    # When one sequence is saved and restored into another id
    one = jh.state_write(mem, cfg, seq_id=1)
    moved, status = jh.state_read(mem, cfg, one, seq_id=7)
    assert status.ok
    # Then both hold the same positions and the layout is kept
    _assert_layout(moved, cfg, mesh)
    assert int(jh.seq_pos_max(moved, 7, cfg)) == int(jh.seq_pos_max(filled, 1, cfg))
    assert int(jh.seq_pos_min(moved, 7, cfg)) == int(jh.seq_pos_min(filled, 1, cfg))
