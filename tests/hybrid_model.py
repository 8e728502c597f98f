"""A tiny hybrid test model in plain JAX, run through the hybrid memory or directly.

Layer 0 is recurrent: a short causal depthwise convolution followed by a diagonal linear
recurrence ``h_t = a * h_{t-1} + b * conv_t`` (state: the last ``D_CONV - 1`` inputs and ``h``).
Layer 1 is attention with RoPE, GQA (2 query heads, 1 KV head) and an optional sliding window.
Outputs are per-token logits.

``step`` is the model's per-ubatch step for :func:`jaxhybrid.decode` (it reads and writes memory
only through the placement); ``direct_logits`` computes the same numbers for one sequence from its
token history without any cache, which is what the memory must reproduce.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid._kv_cache import is_masked_swa
from jaxhybrid._rope import rope, rope_shift_fn

VOCAB = 17
D = 8
D_CONV = 3
N_HEADS = 2
N_KV = 1
HD = 4
THETA = 100.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    swa_type: jh.SWAType = jh.SWAType.NONE
    n_swa: int = 0


def init_params(seed: int = 0):
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.5):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    return dict(
        embed=w(VOCAB, D, scale=1.0),
        conv=w(D_CONV, D),
        a=jnp.asarray(rng.uniform(0.5, 0.95, size=(D,)), jnp.float32),
        b=w(D),
        wq=w(D, N_HEADS * HD),
        wk=w(D, N_KV * HD),
        wv=w(D, N_KV * HD),
        wo=w(N_HEADS * HD, D),
        head=w(D, VOCAB),
    )


def layer_kinds() -> list[bool]:
    """The model's layer types: layer 0 recurrent, layer 1 attention."""
    return [True, False]


def recurrent_config(n_seq_max: int) -> jh.RecurrentConfig:
    return jh.RecurrentConfig(n_seq_max=n_seq_max, r_shape=(D_CONV - 1, D), s_shape=(D,))


def kv_config(
    kv_size: int, n_seq_max: int, unified: bool, spec: ModelSpec, dtype=jnp.float32
) -> jh.KVConfig:
    return jh.KVConfig(
        kv_size=kv_size,
        n_seq_max=n_seq_max,
        n_kv_heads=N_KV,
        head_dim_k=HD,
        unified=unified,
        swa_type=spec.swa_type,
        n_swa=spec.n_swa,
        dtype_k=dtype,
        dtype_v=dtype,
    )


ROPE_FN = rope_shift_fn(theta=THETA)


def _recurrent_token(params, r, h, x):
    """One token of layer 0: ``r`` = last D_CONV-1 inputs (oldest first), ``h`` = state."""
    window = jnp.concatenate([r, x[None, :]], axis=0)
    conv = jnp.sum(window * params["conv"], axis=0)
    h = params["a"] * h + params["b"] * conv
    return window[1:], h, x + jnp.tanh(h)


def _attend(q, k, v, mask):
    """q [T, H, hd], k/v [C, KV, hd], mask [T, C] -> [T, H * hd]."""
    group = N_HEADS // N_KV
    k = jnp.repeat(k, group, axis=1)
    v = jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("thd,chd->htc", q, k) / jnp.sqrt(jnp.float32(HD))
    scores = jnp.where(mask[None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    p = jnp.where(mask[None], p, 0.0)
    return jnp.einsum("htc,chd->thd", p, v).reshape(q.shape[0], -1)


def step(params, ub: jh.UBatch, mem: jh.HybridMemory, place: jh.Placement, *, cfg):
    """The model's per-ubatch step for :func:`jaxhybrid.decode`."""
    x = params["embed"][ub.token]
    n_ub = x.shape[0]

    # Layer 0 (recurrent): walk the tokens in ubatch order; each seq set carries its own state.
    r0, s0 = jh.read_states(mem, 0, place, cfg)

    def tok(carry, xs):
        r, h = carry
        xt, k, valid = xs
        kk = jnp.maximum(k, 0)
        r_new, h_new, y = _recurrent_token(params, r[kk], h[kk], xt)
        r = jnp.where(valid, r.at[kk].set(r_new), r)
        h = jnp.where(valid, h.at[kk].set(h_new), h)
        return (r, h), (y, r_new, h_new)

    (r, s), (x, r_tok, s_tok) = jax.lax.scan(tok, (r0, s0), (x, place.seq_set, place.valid))
    # The per-token states feed the rollback snapshots when the memory keeps them.
    mem = jh.write_states(mem, 0, place, r, s, ub.n_seqs, cfg, r_tok=r_tok, s_tok=s_tok)

    # Layer 1 (attention with RoPE at the tokens' positions).
    q = rope((x @ params["wq"]).reshape(n_ub, N_HEADS, HD), ub.pos, theta=THETA)
    k = rope((x @ params["wk"]).reshape(n_ub, N_KV, HD), ub.pos, theta=THETA)
    v = (x @ params["wv"]).reshape(n_ub, N_KV, HD)
    mem = jh.write_kv(mem, 1, k, v, place, cfg)
    k_all, v_all = jh.read_kv(mem, 1, cfg)
    att = _attend(q, k_all.astype(jnp.float32), v_all.astype(jnp.float32), place.mask)
    x = x + att @ params["wo"]
    return x @ params["head"], mem


MAX_HISTORY = 96


def direct_logits(params, tokens, positions, kept, spec: ModelSpec) -> np.ndarray:
    """Logits of every token of one sequence computed from scratch, without a cache.

    Args:
        tokens: every token the sequence ever absorbed, in order (the recurrent layer saw all).
        positions: the current position of each token (after shifts).
        kept: whether the attention part still holds the token (False after removal).
        spec: the sliding-window setting.

    Returns:
        ``[len(tokens), VOCAB]``; row ``i`` is token ``i``'s logits as if computed now over the
        kept tokens (only rows of tokens decoded since the last change are meaningful).
    """
    n = len(tokens)
    if n > MAX_HISTORY:
        raise ValueError(f"history of {n} tokens is longer than MAX_HISTORY={MAX_HISTORY}")
    pad = MAX_HISTORY - n
    out = _direct(
        params,
        jnp.asarray(list(tokens) + [0] * pad, jnp.int32),
        jnp.asarray(list(positions) + [0] * pad, jnp.int32),
        jnp.asarray(list(kept) + [False] * pad),
        spec,
    )
    return np.asarray(out[:n])


@functools.partial(jax.jit, static_argnames=("spec",))
def _direct(params, tokens, pos, kept, spec: ModelSpec):
    x = params["embed"][tokens]

    def tok(carry, xt):
        r, h = carry
        r, h, y = _recurrent_token(params, r, h, xt)
        return (r, h), y

    init = (jnp.zeros((D_CONV - 1, D), jnp.float32), jnp.zeros((D,), jnp.float32))
    _, x = jax.lax.scan(tok, init, x)
    q = rope((x @ params["wq"]).reshape(-1, N_HEADS, HD), pos, theta=THETA)
    k = rope((x @ params["wk"]).reshape(-1, N_KV, HD), pos, theta=THETA)
    v = (x @ params["wv"]).reshape(-1, N_KV, HD)
    p0, p1 = pos[None, :], pos[:, None]
    swa = is_masked_swa(spec.swa_type, spec.n_swa, p0, p1)
    mask = kept[None, :] & (p0 <= p1) & ~swa
    att = _attend(q, k, v, mask)
    return (x + att @ params["wo"]) @ params["head"]


@functools.cache
def decoder(cfg: jh.HybridConfig, n_ubatch: int, *, donate: bool = True):
    """:func:`jaxhybrid.decode` of this model, jitted once per config and ubatch size; the memory
    is donated unless ``donate`` is False (tests that keep the input memory to compare)."""
    dec = functools.partial(
        jh.decode,
        functools.partial(step, cfg=cfg),
        cfg=cfg,
        n_ubatch=n_ubatch,
        n_vocab=VOCAB,
        rope_fn=ROPE_FN,
    )
    return jax.jit(dec, donate_argnums=(1,) if donate else ())


@dataclasses.dataclass(frozen=True)
class TinyHybridModel:
    """This model as a :class:`jaxhybrid.HybridModel` plug-in: the serving layer runs it through
    the same code as Jamba (``tests/test_serving.py``). Its step writes per-token states, so its
    memory can roll back (speculative decoding)."""

    spec: ModelSpec = ModelSpec()

    @property
    def n_vocab(self) -> int:
        return VOCAB

    @property
    def per_token_states(self) -> bool:
        return True

    @property
    def rope_fn(self):
        return ROPE_FN

    def memory_config(
        self, *, kv_size: int, n_seq_max: int, unified: bool = True, n_snapshots: int = 0
    ) -> jh.HybridConfig:
        kv = kv_config(kv_size, n_seq_max, unified, self.spec)
        rc = dataclasses.replace(recurrent_config(n_seq_max), n_snapshots=n_snapshots)
        return jh.HybridConfig.from_layers(layer_kinds(), kv, rc)

    def step_fn(self, cfg: jh.HybridConfig):
        return functools.partial(step, cfg=cfg)

    def param_specs(self, params, mesh):
        return jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params)
