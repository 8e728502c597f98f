"""The main job (``python -m jaxhybrid``) and the Engine features it runs on: context shift,
save/restore of a request into another sequence id, memory usage.

Every heavy test uses the demo's default tiny model layout (``TINY_JAMBA``, 4 sequence ids,
160 KV cells, prompts in chunks of 16), so the jitted prefill and step compile once per process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("matplotlib")

import jaxhybrid as jh
from jaxhybrid import cli as demo
from jaxhybrid.cli._model import load_model
from jaxhybrid.models import JambaConfig, JambaModel, hf_tensor_shapes, init_jamba
from jaxhybrid.serving import Engine

N_SEQ, KV_SIZE, N_PROMPT, N_UBATCH = 4, 160, 16, 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny():
    config = JambaConfig(**demo.TINY_JAMBA)
    plugin = JambaModel(config)
    params = init_jamba(config, seed=5)
    cfg = plugin.memory_config(kv_size=KV_SIZE, n_seq_max=N_SEQ)
    return config, plugin, params, cfg


def _engine(tiny, **kw):
    _, plugin, params, cfg = tiny
    return Engine(plugin, params, cfg, n_ubatch=N_UBATCH, n_prompt=N_PROMPT, n_stop=1, **kw)


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(0, 128, size=n).tolist()


def _run(argv, capsys):
    """Runs the demo in this process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = demo.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# Engine: context shift, save/restore, memory usage


def test_memory_usage_counts_cells_and_bytes(tiny):
    config = tiny[0]
    eng = _engine(tiny)
    # Given two prompts of 7 and 11 tokens, and a fork of the first
    a = eng.submit(_prompt(7, 0), 4)
    eng.submit(_prompt(11, 1), 4)
    eng.fork(a)
    u = eng.memory_usage()
    # Then each sequence holds its prompt's cells, the fork shares all 7 of its parent's
    assert u.kv_cells_per_seq.tolist() == [7, 11, 7, 0]
    assert (u.kv_cells_used, u.kv_cells_shared, u.kv_cells_total) == (18, 7, KV_SIZE)
    # And three sequences hold states, the fork sharing its parent's cell
    assert u.recurrent_cells_used == 2 and u.recurrent_cells_total == N_SEQ
    assert (
        u.recurrent_cell_of_seq[0] == u.recurrent_cell_of_seq[2] >= 0
        and u.recurrent_cell_of_seq[3] == -1
    )
    assert u.pos_max.tolist() == [6, 10, 6, -1]
    # And the byte counts follow the config: K and V of 2 attention layers, f32
    n_attn, n_mamba = len(config.attention_layers), len(config.mamba_layers)
    kv_bytes = 2 * n_attn * KV_SIZE * config.num_key_value_heads * config.head_dim * 4
    conv = (config.mamba_d_conv - 1) * config.d_inner
    ssm = config.d_inner * config.mamba_d_state
    assert u.kv_bytes == kv_bytes and u.kv_bytes_used == kv_bytes * 18 // KV_SIZE
    assert u.recurrent_bytes == n_mamba * N_SEQ * (conv + ssm) * 4
    assert u.recurrent_bytes_used == u.recurrent_bytes // 2


def test_context_shift_equals_removing_the_range(tiny):
    # Given two engines holding the same 20-token prompt (greedy)
    shifted, holed = _engine(tiny, n_ctx_seq=22, n_keep=3), _engine(tiny)
    prompt = _prompt(20, 2)
    a = shifted.submit(prompt, 12)
    b = holed.submit(prompt, 12)
    for _ in range(2):
        shifted.step()
        holed.step()
    # When the first reaches its context (22) and is shifted on the next step, while in the
    # second the same positions [3, 13) are only removed (a hole; Jamba's attention has no
    # positional encoding, so the visible cells and their K/V are the same)
    assert shifted.requests[a].n_past == 22
    shifted.step()
    n_discard = (22 - 3) // 2
    seq = holed.requests[b].seq
    holed.mem, ok = jh.seq_rm(holed.mem, seq, 3, 3 + n_discard, holed.cfg)
    assert bool(ok)
    holed.step()
    # Then the shift moved the later positions down by n_discard
    req = shifted.requests[a]
    assert req.n_shifts == 1 and req.n_past == 23 - n_discard
    u = shifted.memory_usage()
    held = u.kv_pos[0][u.kv_seq[0, :, 0]]
    assert (held.min(), held.max(), u.pos_max[0]) == (0, 22 - n_discard, 22 - n_discard)
    assert u.kv_cells_per_seq[0] == 23 - n_discard
    assert not bool(jh.kv.has_shift(shifted.mem.kv, shifted.cfg.kv))  # the K-shift update ran
    # And decoding goes on exactly as over the removed range
    for _ in range(4):
        shifted.step()
        holed.step()
    assert shifted.requests[a].tokens == holed.requests[b].tokens
    np.testing.assert_allclose(shifted._logits[0], holed._logits[0], atol=1e-5)
    # And a sequence never holds more than its context
    assert shifted.memory_usage().pos_max[0] < 22


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_restore_into_another_sequence_continues_the_conversation(tiny, temperature):
    kw = dict(temperature=temperature, top_k=20, seed=9)
    # Given a request run without interruption
    ref = _engine(tiny)
    ref.submit(_prompt(5, 4), 14, **kw)
    r = ref.submit(_prompt(9, 3), 14, **kw)
    ref.run()
    # When the same request is saved after 5 tokens, cancelled, its sequence id taken by a
    # newcomer, and restored into sequence 3
    eng = _engine(tiny)
    eng.submit(_prompt(5, 4), 14, **kw)
    a = eng.submit(_prompt(9, 3), 14, **kw)
    for _ in range(5):
        eng.step()
    saved = eng.save(a)
    n_saved = len(saved.request.tokens)
    eng.cancel(a)
    eng.submit(_prompt(6, 5), 3)
    assert eng.requests[a].seq == -1
    b = eng.restore(saved, seq=3)
    assert eng.requests[b].seq == 3 and eng.requests[b].tokens == eng.requests[a].tokens
    eng.run()
    got, want = eng.requests[b].tokens, ref.requests[r].tokens
    assert len(got) == 14
    if temperature == 0.0:
        # Then greedy decoding generates exactly the tokens of the uninterrupted run
        assert got == want
    else:
        # Then the token sampled after the restore is the uninterrupted run's: the saved logits,
        # seed and count are restored exactly. Later tokens are sampled from logits computed in
        # other ubatch compositions (the newcomer, another sequence id), which differ by float
        # rounding (~1e-6) and sampling can amplify that (it does without any restore too, when
        # only the submission order changes), so they are not compared.
        assert got[: n_saved + 1] == want[: n_saved + 1]


def test_context_shift_refusals(tiny):
    with pytest.raises(ValueError, match="n_keep must be in"):
        _engine(tiny, n_ctx_seq=10, n_keep=9)
    eng = _engine(tiny, n_ctx_seq=10, n_keep=2)
    with pytest.raises(ValueError, match="leaves no room to generate"):
        eng.submit(_prompt(10, 7), 3)
    a = eng.submit(_prompt(6, 7), 3)
    # 4 positions after n_keep: dropping 0 or all 4 is refused, memory unchanged
    for n in (0, 4):
        with pytest.raises(ValueError, match=f"cannot drop {n} of the 4 positions"):
            eng.context_shift(a, n)
    assert eng.memory_usage().kv_cells_per_seq[0] == 6
    eng.cancel(a)
    with pytest.raises(ValueError, match="is not running"):
        eng.context_shift(a)


def test_restore_refuses_a_busy_sequence_and_a_foreign_record(tiny):
    eng = _engine(tiny)
    a = eng.submit(_prompt(4, 6), 3)
    saved = eng.save(a)
    with pytest.raises(ValueError, match="not a free id"):
        eng.restore(saved, seq=eng.requests[a].seq)
    bad = type(saved)(saved.data[:-5], saved.request, saved.logits)
    with pytest.raises(jh.StateError, match="restore into sequence 1 failed"):
        eng.restore(bad, seq=1)
    assert eng.memory_usage().kv_cells_per_seq.tolist() == [4, 0, 0, 0]


# --------------------------------------------------------------------------------------------
# The demo


def test_help_documents_every_flag():
    # Given the installed entry point
    res = subprocess.run(
        [sys.executable, "-m", "jaxhybrid", "--help"], capture_output=True, text=True, timeout=120
    )
    # Then --help exits 0 and names every flag, each with a description
    assert res.returncode == 0, res.stderr
    for action in demo.build_parser()._actions:
        assert action.help, action.option_strings
        for flag in action.option_strings:
            assert flag in res.stdout


def test_default_session_runs_every_phase(tiny):
    # When the default session runs (the tiny seeded model, no download)
    out = io.StringIO()
    args = demo.build_parser().parse_args([])
    res = demo.run_session(args, load_model(args), out)
    phases = {p.name: p for p in res.phases}
    text = out.getvalue()
    # Then every phase ran and reported its tokens/s
    for name in ("join", "decode", "fork", "cancel", "save/restore", "drain"):
        assert f"[{name}]" in text and name in phases
    assert phases["join"].prompt_tokens > 0 and phases["decode"].generated_tokens > 0
    assert all(p.tokens_per_s > 0 for n, p in phases.items() if n != "compile")
    # And the fork shared cells, the cancel freed a sequence, the restore moved a conversation
    snaps = dict(res.snapshots)
    assert snaps["fork"].kv_cells_shared > 0
    assert snaps["cancel"].kv_cells_per_seq[2] == 0
    old_req, old_seq, new_req, new_seq = res.restored
    assert old_seq != new_seq and res.saved_bytes > 0
    assert res.requests[old_req].cancelled and not res.requests[new_req].cancelled
    assert len(res.requests[new_req].tokens) == args.max_new
    # And sequences that reached the context were shifted, never holding more than --ctx
    assert sum(p.shifts for p in res.phases) > 0
    assert max(int(u.pos_max.max()) for u in snaps.values()) < args.ctx
    # And the memory is empty at the end, with the summary printed
    assert snaps["drain"].kv_cells_used == 0 and snaps["drain"].recurrent_cells_used == 0
    assert "peak memory use" in text and "KV cells per sequence" in text


def test_main_exits_zero_and_plot_writes_a_png(tmp_path, tiny, capsys):
    import matplotlib.image

    path = tmp_path / "memory.png"
    # When the default session runs through the entry point with --plot
    code, out, err = _run(["--plot", str(path)], capsys)
    # Then it exits 0 after printing the summary, and the file is a PNG matplotlib can read
    assert code == 0, err
    assert f"wrote {path}" in out and "tok/s" in out and "saved conversation" in out
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _tiny_checkpoint(path, *, break_shape=False):
    """A tiny checkpoint written with our own parameter names and shapes (no torch)."""
    from safetensors.numpy import save_file

    shapes = hf_tensor_shapes(JambaConfig(**demo.TINY_JAMBA))
    rng = np.random.default_rng(0)
    tensors = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    if break_shape:
        tensors["model.embed_tokens.weight"] = np.zeros((7, 3), np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    hf = dict(demo.TINY_JAMBA, model_type="jamba", eos_token_id=None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return path


def test_model_directory_with_a_tokenizer(tmp_path, tiny, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # Given a checkpoint directory with a word-level tokenizer inside the model's vocabulary
    path = _tiny_checkpoint(tmp_path / "ckpt")
    words = ["the", "a", "hybrid", "model", "cache", "reads", "prompt", "once", "and", "then"]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    # When the demo runs on it with text prompts
    argv = ["--model", str(path), "--prompt", "the hybrid model reads the prompt once"]
    code, out, err = _run([*argv, "--max-new", "10", "--temperature", "0"], capsys)
    # Then the prompts were tokenized and the outputs decoded into words of the vocabulary
    assert code == 0, err
    assert f"model: {path}" in out
    last_rows = out.split("request  prompt")[1].splitlines()[1:7]
    assert all("'" in row for row in last_rows)  # decoded text is shown quoted
    assert any(w in out.split("request  prompt")[1] for w in words)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--requests", "0"], "expected a positive integer, got 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--top-p", "2"], "expected a number in (0, 1], got 2.0"),
        (["--temperature", "nan"], "expected a finite number, got nan"),
        (["--requests", "2"], "needs at least 3 requests"),
        (["--requests", "4", "--n-seq", "4"], "the session needs 5 sequence ids"),
        (["--kv-size", "100"], "--kv-size 100 is too small"),
        (["--kv-per-seq", "--kv-size", "30"], "each sequence's stream needs --ctx = 40 cells"),
        (["--ctx", "12"], "--ctx 12 is too small for a prompt of 16 tokens"),
        (["--n-keep", "39"], "it must be at most --ctx - 2 = 38"),
        (["--prompt", "hello"], "--prompt needs a tokenizer"),
        (["--model", "/nonexistent/jamba"], "--model /nonexistent/jamba: no such directory"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message(argv, message, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err


def test_bad_checkpoint_directories(tmp_path, capsys):
    # A directory without config.json
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["--model", str(empty)], capsys)
    assert code == 2 and "no config.json" in err
    # A checkpoint whose tensor does not match its config
    bad = _tiny_checkpoint(tmp_path / "bad", break_shape=True)
    code, _, err = _run(["--model", str(bad)], capsys)
    assert code == 2
    assert "tensor 'model.embed_tokens.weight' has shape (7, 3), expected shape (128, 32)" in err
    # A config of another architecture
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = _run(["--model", str(bad)], capsys)
    assert code == 2 and "model_type 'llama' is not supported; supported model types: " in err
    assert "jamba" in err


# --------------------------------------------------------------------------------------------
# The notebooks (nbmake runs them; here: how they are committed)


@pytest.mark.parametrize(
    "name", ["01_quickstart.ipynb", "02_decoding_with_jamba.ipynb"], ids=lambda n: n[:2]
)
def test_notebooks_are_colab_ready_and_committed_without_outputs(name):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", name)
    with open(path) as f:
        nb = json.load(f)
    first = nb["cells"][0]
    # The first cell installs the package and is skipped in CI
    assert first["cell_type"] == "code" and "skip-execution" in first["metadata"]["tags"]
    assert "pip install" in "".join(first["source"])
    # And no cell carries outputs or execution counts
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    # And only the public API is used
    source = "".join("".join(c["source"]) for c in code)
    assert "jaxhybrid._" not in source and "models._" not in source


def test_header_counts_layers_by_the_memory_part_serving_them():
    # Given plug-ins of families whose configs name their recurrent layers differently (GDN
    # layers, short-conv blocks, Nemotron-H's MLP layers served by neither part)
    import argparse

    from jaxhybrid.cli._model import DemoModel
    from jaxhybrid.cli._report import Printer, print_header
    from jaxhybrid.models import (
        Lfm2Config,
        Lfm2Model,
        NemotronHConfig,
        NemotronHModel,
        Qwen3NextConfig,
        Qwen3NextModel,
    )

    plugins = {
        "2 attention, 6 recurrent": Qwen3NextModel(Qwen3NextConfig(num_hidden_layers=8)),
        "1 attention, 2 recurrent": Lfm2Model(
            Lfm2Config(num_hidden_layers=3, layer_types=("conv", "full_attention", "conv"))
        ),
        "1 attention, 1 recurrent": NemotronHModel(NemotronHConfig(layers_block_type="M*-E")),
    }
    args = argparse.Namespace(kv_per_seq=False, ctx=40, n_keep=4)
    for want, plugin in plugins.items():
        out = io.StringIO()
        mdl = DemoModel(plugin.config, plugin, None, None, (), "tiny")
        # When the session header is printed
        print_header(Printer(out, quiet=False, every=1), mdl, args, 4, 160)
        # Then the layers are counted by the memory part that serves them
        assert f"{plugin.config.num_hidden_layers} layers ({want})" in out.getvalue()
