"""Host inputs (issue 22, class 6): state files, checkpoint directories and the demo's flags are
validated before any work. Nothing hangs on a FIFO or a device, nothing reads or allocates more
than the configuration allows, wrong types are refused and never converted (docs/semantics.md
§15.6), a failed save leaves nothing behind (§15.5), and the CLI ends with a one-line error and a
nonzero status instead of a traceback.

Every test is fast: one tiny checkpoint per module (our own tensor names, no torch), and no demo
session runs for a refused flag (the tests replace the steps that would do work by tripwires).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import threading

import numpy as np
import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("safetensors")

from safetensors.numpy import load_file, save_file

import jaxhybrid as jh
from jaxhybrid import cli as demo
from jaxhybrid._state_io import FORMAT_VERSION
from jaxhybrid.models import JambaConfig, hf_tensor_shapes, load_jamba

N_SEQ = 2
KV = jh.KVConfig(kv_size=8, n_seq_max=N_SEQ, n_layers=1, n_kv_heads=1, head_dim_k=4)
RECURRENT = jh.RecurrentConfig(n_seq_max=N_SEQ, r_shape=(2, 3), s_shape=(3, 2), n_snapshots=2)
HYBRID = jh.HybridConfig.from_layers([True, False], KV, RECURRENT)


def _finishes(fn, fifo=None, timeout: float = 10.0):
    """Runs ``fn`` in a thread and returns its result (or raises its error). If it is still
    blocked after ``timeout`` s (opening a FIFO without a writer), ``fifo`` is opened for writing
    to release it, and the test fails."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    hung = thread.is_alive()
    if hung and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees EOF
        thread.join(timeout)
    assert not hung, f"blocked for {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# State files


@pytest.fixture(scope="module")
def hybrid():
    return jh.init_hybrid(HYBRID)


def test_load_state_file_refuses_a_fifo_without_hanging(tmp_path, hybrid):
    # Given a FIFO nobody writes to
    fifo = tmp_path / "state.jhs"
    os.mkfifo(fifo)
    # Then loading it is refused at once, as not a regular file
    with pytest.raises(jh.StateError, match="not a regular file"):
        _finishes(lambda: jh.load_state_file(fifo, hybrid, HYBRID), fifo)


def test_load_state_file_refuses_devices_without_reading_them(hybrid):
    # /dev/null first: it checks the refusal without risk; /dev/zero would be read until memory
    # runs out if it were not refused.
    for device in ("/dev/null", "/dev/zero"):
        with pytest.raises(jh.StateError, match=f"'{device}' is not a regular file"):
            jh.load_state_file(device, hybrid, HYBRID)


def test_load_state_file_refuses_a_file_larger_than_this_memory_can_produce(tmp_path, hybrid):
    # Given a valid state file of this memory, then the same header on a sparse 1 TiB file
    good = tmp_path / "good.jhs"
    jh.save_state_file(good, hybrid, HYBRID, tokens=[1, 2])
    _, tokens = jh.load_state_file(good, hybrid, HYBRID)
    assert tokens.tolist() == [1, 2]
    for size in (1 << 26, 1 << 40):
        big = tmp_path / f"big{size}.jhs"
        with open(big, "wb") as f:
            f.write(b"JHSF" + struct.pack("<II", FORMAT_VERSION, 0))
            f.truncate(size)
        # Then it is refused from its size alone (reading 1 TiB would exhaust memory)
        with pytest.raises(jh.StateError, match=rf"{size} bytes.*at most \d+ bytes"):
            jh.load_state_file(big, hybrid, HYBRID)


def test_the_size_limit_of_state_files_holds_the_largest_record(tmp_path):
    from jaxhybrid._state_io import _max_file_bytes

    # Given a memory whose every cell is held by every sequence, with snapshots (the writer does
    # not check invariants, so the record is as large as this configuration can make one)
    mem = jh.init_hybrid(HYBRID)
    kv, rc = mem.kv, mem.recurrent
    kv = kv._replace(
        cells=kv.cells._replace(
            pos=np.arange(kv.cells.pos.size, dtype=np.int32).reshape(kv.cells.pos.shape),
            seq=np.ones(kv.cells.seq.shape, bool),
        )
    )
    rc = rc._replace(
        cells=rc.cells._replace(
            pos=np.full(rc.cells.pos.shape, 7, np.int32),
            seq=np.ones(rc.cells.seq.shape, bool),
            snap=np.full(rc.cells.snap.shape, 5, np.int32),
        )
    )
    full = jh.HybridMemory(kv, rc)
    path = tmp_path / "full.jhs"
    n = jh.save_state_file(path, full, HYBRID, tokens=[3] * 5, flags=jh.StateFlags.SNAPSHOTS)
    # Then the file fits the limit load_state_file applies
    assert n <= _max_file_bytes(HYBRID, 5)


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        ([1, 2.0], jh.InvalidTypeError, r"tokens\[1\] must be an integer"),
        ([1.5], jh.InvalidTypeError, r"tokens\[0\] must be an integer"),
        ([True], jh.InvalidTypeError, r"tokens\[0\] must be an integer"),
        (np.array([1.0, 2.0]), jh.InvalidTypeError, "dtype float64"),
        ([2**31], jh.InvalidArgumentError, "outside int32"),
        ([[1, 2]], jh.InvalidArgumentError, "1-D"),
        ("12", jh.InvalidTypeError, "tokens"),
    ],
    ids=repr,
)
def test_save_state_file_refuses_tokens_that_are_not_int32(
    tmp_path, hybrid, tokens, error, message
):
    path = tmp_path / "s.jhs"
    with pytest.raises(error, match=message):
        jh.save_state_file(path, hybrid, HYBRID, tokens=tokens)
    assert _listing(tmp_path) == []


def test_save_state_file_refuses_a_symlink_and_keeps_it(tmp_path, hybrid):
    # Given a link to a file holding something else
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.jhs"
    link.symlink_to(target)
    # Then saving to the link is refused; link and target stay as they were
    with pytest.raises(jh.InvalidArgumentError, match="symbolic link"):
        jh.save_state_file(link, hybrid, HYBRID)
    assert link.is_symlink() and target.read_text() == "keep me"
    assert _listing(tmp_path) == ["link.jhs", "target.txt"]


def test_save_state_file_refuses_what_is_not_a_regular_file(tmp_path, hybrid, monkeypatch):
    # Writing into /dev is made to fail the test, so that a regression cannot replace
    # /dev/null (the tests may run as root).
    def guarded(real):
        def call(*paths, **kwargs):
            if any(str(p).startswith("/dev/") for p in paths if isinstance(p, str | os.PathLike)):
                raise AssertionError(f"{real.__name__}{paths} would write into /dev")
            return real(*paths, **kwargs)

        return call

    monkeypatch.setattr(os, "open", guarded(os.open))
    monkeypatch.setattr(os, "replace", guarded(os.replace))
    fifo = tmp_path / "fifo.jhs"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jhs"
    folder.mkdir()
    for path in (os.devnull, fifo, folder):
        with pytest.raises(jh.InvalidArgumentError, match="not a regular file"):
            jh.save_state_file(path, hybrid, HYBRID)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()
    assert _listing(tmp_path) == ["fifo.jhs", "folder.jhs"]


def test_save_state_file_leaves_nothing_behind_when_writing_fails(tmp_path, hybrid, monkeypatch):
    import jaxhybrid._state_io as state_io

    path = tmp_path / "s.jhs"
    path.write_bytes(b"old")

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    # When the final rename fails (as a full disk would make the write fail)
    monkeypatch.setattr(state_io.os, "replace", no_room)
    with pytest.raises(jh.StateError, match="No space left on device"):
        jh.save_state_file(path, hybrid, HYBRID, tokens=[1])
    # Then the old file is intact and no temporary file is left
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["s.jhs"]
    # And a missing folder is a StateError too
    with pytest.raises(jh.StateError, match="cannot write"):
        jh.save_state_file(tmp_path / "missing" / "s.jhs", hybrid, HYBRID)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(seq_id=N_SEQ), jh.InvalidArgumentError, "seq_id must be -1"),
        (dict(flags="x"), jh.InvalidTypeError, "flags must be"),
        (dict(flags=True), jh.InvalidTypeError, "flags must be"),
        (dict(flags=2), jh.InvalidArgumentError, "flags 2 has bits"),
    ],
    ids=repr,
)
def test_state_file_arguments_are_checked_before_the_file(tmp_path, hybrid, kwargs, error, message):
    # A FIFO as the file: the arguments are refused without opening it
    fifo = tmp_path / "fifo.jhs"
    os.mkfifo(fifo)
    with pytest.raises(error, match=message):
        _finishes(lambda: jh.load_state_file(fifo, hybrid, HYBRID, **kwargs), fifo)
    with pytest.raises(error, match=message):
        jh.save_state_file(tmp_path / "s.jhs", hybrid, HYBRID, **kwargs)
    assert _listing(tmp_path) == ["fifo.jhs"]


def test_state_file_paths_must_be_paths(hybrid):
    with pytest.raises(jh.InvalidTypeError, match="path"):
        jh.save_state_file(3, hybrid, HYBRID)
    with pytest.raises(jh.InvalidTypeError, match="path"):
        jh.load_state_file(None, hybrid, HYBRID)


# --------------------------------------------------------------------------------------------
# The checkpoint loader

TINY = dict(demo.TINY_JAMBA, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with our own tensor names and shapes (untied LM head)."""
    path = tmp_path_factory.mktemp("ckpt")
    shapes = hf_tensor_shapes(JambaConfig(**TINY))
    rng = np.random.default_rng(0)
    tensors = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(TINY, model_type="jamba")))
    return path


def _variant(checkpoint, dst, *, config=None, raw_config=None, edit=None):
    """A copy of the checkpoint with config.json replaced (a dict merged in, or raw text) and
    its tensors edited in place by ``edit``."""
    os.makedirs(dst, exist_ok=True)
    if raw_config is not None:
        (dst / "config.json").write_text(raw_config)
    else:
        hf = json.loads((checkpoint / "config.json").read_text())
        hf.update(config or {})
        (dst / "config.json").write_text(json.dumps(hf))
    src = os.path.join(checkpoint, "model.safetensors")
    if edit is None:
        shutil.copy(src, dst / "model.safetensors")
    else:
        tensors = load_file(src)
        edit(tensors)
        save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_the_tiny_checkpoint_loads(checkpoint):
    config, model = load_jamba(checkpoint)
    assert config == JambaConfig(**TINY) and model.lm_head is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1, 2]", "must hold a JSON object, got list"),
        ('"jamba"', "must hold a JSON object, got str"),
        ('{"model_type": "jamba",', "not valid JSON"),
        ("", "not valid JSON"),
    ],
    ids=["list", "string", "truncated", "empty"],
)
def test_loader_refuses_a_config_that_is_not_an_object(checkpoint, tmp_path, raw, message):
    path = _variant(checkpoint, tmp_path, raw_config=raw)
    with pytest.raises(jh.InvalidArgumentError, match=message):
        load_jamba(path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_loader_refuses_a_fifo_without_hanging(checkpoint, tmp_path, name):
    path = _variant(checkpoint, tmp_path)
    os.remove(path / name)
    os.mkfifo(path / name)
    with pytest.raises(jh.InvalidArgumentError, match="not a regular file"):
        _finishes(lambda: load_jamba(path), path / name)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("tie_word_embeddings", "false", jh.InvalidTypeError, "must be a bool, got 'false'"),
        ("mamba_conv_bias", 1, jh.InvalidTypeError, "must be a bool, got 1"),
        ("rms_norm_eps", "1e-6", jh.InvalidTypeError, "must be a number, got '1e-6'"),
        ("rms_norm_eps", True, jh.InvalidTypeError, "must be a number, got True"),
        ("rms_norm_eps", -1e-6, jh.InvalidArgumentError, "must be > 0"),
        ("rms_norm_eps", float("nan"), jh.InvalidArgumentError, "must be > 0"),
        ("initializer_range", float("inf"), jh.InvalidArgumentError, "must be >= 0"),
        ("num_hidden_layers", 4.0, jh.InvalidTypeError, "must be an int, got 4.0"),
        ("num_experts", True, jh.InvalidTypeError, "must be an int, got True"),
        ("hidden_size", "32", jh.InvalidTypeError, "must be an int, got '32'"),
        ("num_attention_heads", "4", jh.InvalidTypeError, "must be an int, got '4'"),
        ("mamba_dt_rank", "full", jh.InvalidTypeError, "must be an int, got 'full'"),
        ("vocab_size", 0, jh.InvalidArgumentError, "must be an int >= 1, got 0"),
    ],
    ids=lambda x: repr(x)[:20],
)
def test_loader_refuses_fields_of_the_wrong_type(
    checkpoint, tmp_path, field, value, error, message
):
    path = _variant(checkpoint, tmp_path, config={field: value})
    with pytest.raises(error, match=rf"JambaConfig\.{field} {message}"):
        load_jamba(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", 10**6),
        ("num_experts", 10**7),
        ("vocab_size", 10**12),
        ("hidden_size", 10**9),
        ("intermediate_size", 10**15),
    ],
)
def test_loader_refuses_sizes_the_checkpoint_cannot_hold_before_allocating(
    checkpoint, tmp_path, field, value
):
    # Given a config whose sizes imply far more parameters than the files hold
    path = _variant(checkpoint, tmp_path, config={field: value})
    size = os.path.getsize(path / "model.safetensors")
    # Then it is refused at once, naming the field, the parameter count and the limit
    with pytest.raises(
        jh.InvalidArgumentError,
        match=rf"{field}={value}.* parameters.*{size} bytes.*at most {size // 2} ",
    ):
        _finishes(lambda: load_jamba(path))


def test_the_parameter_count_check_matches_the_tensor_shapes(checkpoint):
    from jaxhybrid.models._loader import _n_params

    for kw in (TINY, dict(TINY, tie_word_embeddings=True, num_experts=1, mamba_proj_bias=True)):
        config = JambaConfig(**kw)
        shapes = hf_tensor_shapes(config).values()
        assert _n_params(config) == sum(int(np.prod(s)) for s in shapes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_loader_refuses_weights_that_are_not_finite(checkpoint, tmp_path, bad):
    name = "model.layers.1.feed_forward.experts.2.up_proj.weight"

    def edit(t):
        t[name][3, 5] = bad

    path = _variant(checkpoint, tmp_path, edit=edit)
    with pytest.raises(jh.InvalidArgumentError, match=rf"tensor '{name}' holds 1 non-finite"):
        load_jamba(path)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_loader_refuses_weights_that_are_not_floats(checkpoint, tmp_path, dtype):
    name = "model.final_layernorm.weight"

    def edit(t):
        t[name] = np.ones(t[name].shape, dtype)

    path = _variant(checkpoint, tmp_path, edit=edit)
    with pytest.raises(jh.InvalidArgumentError, match=rf"tensor '{name}' has dtype \w+"):
        load_jamba(path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ([1, 2], "must hold a JSON object"),
        ({"weight_map": ["model.safetensors"]}, "weight_map"),
        ({"weight_map": {"lm_head.weight": "../model.safetensors"}}, "not a file name"),
        ({"weight_map": {"lm_head.weight": "/etc/passwd"}}, "not a file name"),
        ({"weight_map": {"lm_head.weight": 3}}, "not a file name"),
    ],
    ids=["list", "map-list", "parent", "absolute", "int"],
)
def test_loader_refuses_a_bad_shard_index(checkpoint, tmp_path, index, message):
    path = _variant(checkpoint, tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(jh.InvalidArgumentError, match=message):
        load_jamba(path)


def test_loader_refuses_a_corrupt_safetensors_file(checkpoint, tmp_path):
    path = _variant(checkpoint, tmp_path)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(jh.InvalidArgumentError, match="cannot read"):
        load_jamba(path)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(dtype="float16"), jh.InvalidArgumentError, "dtype"),
        (dict(dtype="nonsense"), jh.InvalidArgumentError, "dtype"),
        (dict(dtype=3), jh.InvalidTypeError, "dtype"),
    ],
)
def test_loader_refuses_bad_arguments(checkpoint, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_jamba(checkpoint, **kwargs)
    with pytest.raises(jh.InvalidTypeError, match="path"):
        load_jamba(42)
    with pytest.raises(jh.InvalidArgumentError, match="not a directory"):
        load_jamba(checkpoint / "config.json")


# --------------------------------------------------------------------------------------------
# The demo's command line


@pytest.fixture
def tripwires(monkeypatch):
    """Loading the model, making prompts and building an engine fail the test: a refused flag
    must be refused before any of them."""
    import jaxhybrid.cli._main as cli_main
    import jaxhybrid.cli._session as cli_session

    def trip(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} ran for a refused flag")

        return fail

    monkeypatch.setattr(cli_main, "load_model", trip("load_model"))
    monkeypatch.setattr(cli_session, "make_prompts", trip("make_prompts"))
    monkeypatch.setattr(cli_session, "make_engine", trip("make_engine"))


@pytest.fixture
def no_session(monkeypatch):
    """The session (prompts, engine) must not run; loading the model may."""
    import jaxhybrid.cli._session as cli_session

    def fail(*args, **kwargs):
        raise AssertionError("the session ran for refused input")

    monkeypatch.setattr(cli_session, "make_prompts", fail)
    monkeypatch.setattr(cli_session, "make_engine", fail)


def _run(argv, capsys):
    capsys.readouterr()
    code = demo.main(argv)
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top-k", str(2**31)], "expected an integer in [0, 2147483647], got 2147483648"),
        (["--seed", str(2**31)], "expected an integer in [0, 2147483647], got 2147483648"),
        (["--max-new", str(2**40)], "expected an integer in [1, 2147483647]"),
        (["--plot", "memory.txt"], "--plot: expected a file name ending in .png"),
        (["--plot", "memory"], "--plot: expected a file name ending in .png"),
    ],
)
def test_flags_out_of_range_are_usage_errors(argv, message, capsys, tripwires):
    code, err = _run(argv, capsys)
    assert code == 2 and message in err


def test_a_plot_into_a_directory_is_refused_before_the_session(tmp_path, capsys, tripwires):
    folder = tmp_path / "pic.png"
    folder.mkdir()
    code, err = _run(["--plot", str(folder)], capsys)
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-len", "1000000000"], "--ctx 40 is too small for a prompt of 1000000000 tok"),
        (["--ctx", "1000000000"], "more than 2147483647 KV cells"),
        (["--kv-per-seq", "--ctx", "500000000"], "the session's memory needs"),
        (["--n-ubatch", "1000"], "--n-ubatch 1000 is larger than the KV cache (160 cells)"),
        (["--requests", "2000000000"], "more than 2147483647 KV cells"),
    ],
)
def test_sizes_are_checked_before_anything_is_allocated(argv, message, capsys, tripwires):
    code, err = _run(argv, capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[1, 2]", "must hold a JSON object, got list"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
        ({"tie_word_embeddings": "false"}, "must be a bool"),
        ({"num_hidden_layers": 10000}, "num_hidden_layers=10000"),
    ],
    ids=["list", "eps", "tie", "layers"],
)
def test_model_flag_with_a_bad_config_is_one_line_error(
    checkpoint, tmp_path, config, message, capsys, no_session
):
    if isinstance(config, str):
        path = _variant(checkpoint, tmp_path, raw_config=config)
    else:
        path = _variant(checkpoint, tmp_path, config=config)
    code, err = _run(["--model", str(path)], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("eos", "message"),
    [
        (1.5, "eos_token_id must be an int or a list of ints, got 1.5"),
        ("2", "eos_token_id must be an int or a list of ints, got '2'"),
        ([1, True], "eos_token_id must be an int or a list of ints"),
        (128, "eos_token_id 128 is outside the vocabulary [0, 128)"),
    ],
    ids=repr,
)
def test_model_flag_with_a_bad_eos_token(checkpoint, tmp_path, eos, message, capsys, no_session):
    path = _variant(checkpoint, tmp_path, config={"eos_token_id": eos})
    code, err = _run(["--model", str(path)], capsys)
    assert code == 2 and message in err


def test_model_flag_with_a_tokenizer_that_is_a_fifo(checkpoint, tmp_path, capsys, no_session):
    path = _variant(checkpoint, tmp_path)
    os.mkfifo(path / "tokenizer.json")
    code, err = _finishes(lambda: _run(["--model", str(path)], capsys), path / "tokenizer.json")
    assert code == 2 and "tokenizer.json is not a regular file" in err
