"""Rollback benchmarks (issue 10): re-answering an edited chat turn with exact rollback vs
re-prefilling (what llama.cpp must do for a hybrid model), greedy speculative decoding vs plain
greedy decoding, and the memory cost of the snapshots.

Run ``python -m benchmarks.rollback`` (``--quick`` for a shorter history). Every ratio is measured
in one run, same machine, same weights (the tiny Jamba of the parity tests, float32), each timed
call compiled beforehand; the median of ``--repeat`` runs is reported. Prints a table and writes
``benchmarks/results/rollback.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxhybrid as jh
from jaxhybrid.models import JambaConfig, JambaModel, init_jamba, jamba_hybrid_config
from jaxhybrid.serving import generate, prefill, speculative_generate


def _tiny_config() -> JambaConfig:
    """The tiny Jamba of the parity tests (``tests/jamba_utils.py``: MoE + GQA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import jamba_utils

    return JambaConfig(**jamba_utils.MOE_GQA)


def _time(fn, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def chat_turn(model, config, *, history: int, edit: int, n_ubatch: int, repeat: int) -> dict:
    """A conversation of ``history`` tokens whose last ``edit`` tokens are replaced."""
    rng = np.random.default_rng(0)
    toks = rng.integers(0, config.vocab_size, history).astype(np.int32)
    new = rng.integers(0, config.vocab_size, edit).astype(np.int32)
    kv_size = 1 << (history + edit).bit_length()
    cfg = jamba_hybrid_config(config, kv_size=kv_size, n_seq_max=1, n_snapshots=edit)
    seq = jnp.zeros((1,), jnp.int32)

    def run_prefill(mem, tokens):
        # ubatches no larger than the tokens (a serving loop buckets its batch sizes likewise)
        out, mem, code = prefill(
            JambaModel(config),
            model,
            mem,
            jnp.asarray(tokens)[None],
            jnp.asarray([len(tokens)], jnp.int32),
            seq,
            cfg=cfg,
            n_ubatch=min(n_ubatch, len(tokens)),
        )
        return out, mem, code

    # The full conversation, the one to edit (donated calls consume their input: copy first).
    _, full, code = run_prefill(jh.init_hybrid(cfg), toks)
    assert int(code) == 0
    rm = jax.jit(lambda m: jh.seq_rm(m, 0, history - edit, -1, cfg))

    def with_rollback():
        mem, ok = rm(_copy(full))
        out, mem, code = run_prefill(mem, new)
        return out, ok, code

    edited = np.concatenate([toks[: history - edit], new])

    def re_prefill():
        out, _, code = run_prefill(jh.init_hybrid(cfg), edited)
        return out, code

    # Compile both, check they agree, then time.
    out_a, ok, code_a = with_rollback()
    out_b, code_b = re_prefill()
    assert bool(ok) and int(code_a) == 0 and int(code_b) == 0
    err = float(jnp.max(jnp.abs(out_a - out_b)))
    copy_t, _ = _time(lambda: _copy(full), repeat)
    t_roll, roll_all = _time(with_rollback, repeat)
    t_pre, pre_all = _time(re_prefill, repeat)
    t_roll_net = max(t_roll - copy_t, 1e-9)  # the benchmark's own copy of the memory excluded
    return dict(
        history=history,
        edit=edit,
        n_ubatch=n_ubatch,
        rollback_s=t_roll_net,
        reprefill_s=t_pre,
        speedup=t_pre / t_roll_net,
        max_logit_diff=err,
        rollback_runs_s=roll_all,
        reprefill_runs_s=pre_all,
        memory_copy_s=copy_t,
    )


def speculative(model, config, *, k: int, noise: float, n_new: int, repeat: int) -> dict:
    """Greedy speculative decoding with a perturbed copy of the target as draft."""
    rng = np.random.default_rng(1)

    def perturb(p):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return p + noise * jnp.asarray(rng.standard_normal(p.shape), p.dtype)

    draft = jax.tree.map(perturb, model)
    prompts = [[5, 17, 99, 3, 64, 21, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    cfg = jamba_hybrid_config(config, kv_size=256, n_seq_max=1, n_snapshots=k)
    plain_cfg = jamba_hybrid_config(config, kv_size=256, n_seq_max=1)

    def spec():
        return speculative_generate(
            JambaModel(config),
            model,
            JambaModel(config),
            draft,
            prompts,
            target_cfg=cfg,
            draft_cfg=cfg,
            k=k,
            max_new_tokens=n_new,
            n_ubatch=16,
        )

    def plain():
        return generate(
            JambaModel(config),
            model,
            jh.init_hybrid(plain_cfg),
            prompts,
            cfg=plain_cfg,
            n_ubatch=16,
            max_new_tokens=n_new,
        )

    out, ref = spec(), plain()
    same = bool(np.array_equal(np.asarray(out.tokens), np.asarray(ref.tokens)))
    t_spec, _ = _time(lambda: spec().tokens, repeat)
    t_plain, _ = _time(lambda: plain().tokens, repeat)
    return dict(
        k=k,
        draft_noise=noise,
        n_new=n_new,
        same_tokens_as_plain_greedy=same,
        acceptance=int(out.n_accepted) / max(1, int(out.n_drafted)),
        rounds=int(out.n_rounds),
        speculative_tok_s=n_new / t_spec,
        plain_tok_s=n_new / t_plain,
        ratio=t_plain / t_spec,
        note="the draft is as large as the target here: the ratio measures the machinery, "
        "a real draft model is several times smaller",
    )


def snapshot_cost(config, horizons=(0, 4, 8, 16)) -> list[dict]:
    rows = []
    for h in horizons:
        cfg = jamba_hybrid_config(config, kv_size=4096, n_seq_max=8, n_snapshots=h)
        shapes = jax.eval_shape(lambda cfg=cfg: jh.init_hybrid(cfg))
        nbytes = {
            name: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(part))
            for name, part in (("kv", shapes.kv), ("recurrent", shapes.recurrent))
        }
        snap = sum(
            x.size * x.dtype.itemsize
            for x in (shapes.recurrent.snap_r, shapes.recurrent.snap_s)
            if x is not None
        )
        rows.append(dict(n_snapshots=h, snapshot_bytes=snap, **nbytes))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 500-token history, 2 repeats")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/rollback.json")
    args = ap.parse_args(argv)
    repeat = 2 if args.quick else args.repeat
    config = _tiny_config()
    model = init_jamba(config, seed=3)
    history = 500 if args.quick else 2000
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus")
    chat = chat_turn(model, config, history=history, edit=8, n_ubatch=512, repeat=repeat)
    print(
        f"\nchat turn, {chat['history']}-token history, last {chat['edit']} tokens edited:\n"
        f"  rollback + decode 8 : {chat['rollback_s'] * 1e3:8.1f} ms\n"
        f"  re-prefill {chat['history']:5d}     : {chat['reprefill_s'] * 1e3:8.1f} ms\n"
        f"  speedup             : {chat['speedup']:8.1f}x   (logits differ by "
        f"{chat['max_logit_diff']:.1e})"
    )
    spec = [
        speculative(model, config, k=4, noise=noise, n_new=32 if args.quick else 64, repeat=repeat)
        for noise in (0.0, 0.001, 0.005)
    ]
    print("\nspeculative decoding, k=4 (draft = the target's weights + noise, same size):")
    print("  noise  acceptance  speculative tok/s  plain tok/s  ratio  same tokens")
    for row in spec:
        print(
            f"  {row['draft_noise']:5.3f} {row['acceptance']:10.0%} "
            f"{row['speculative_tok_s']:18.0f} {row['plain_tok_s']:12.0f} "
            f"{row['ratio']:6.2f}  {row['same_tokens_as_plain_greedy']}"
        )
    cost = snapshot_cost(config)
    print("\nsnapshot memory (tiny Jamba, 8 sequences, kv_size 4096):")
    print("  n_snapshots   snapshots     recurrent          kv")
    for row in cost:
        print(
            f"  {row['n_snapshots']:11d} {row['snapshot_bytes']:11,d} "
            f"{row['recurrent']:13,d} {row['kv']:11,d}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(chat_turn=chat, speculative=spec, snapshot_cost=cost), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
