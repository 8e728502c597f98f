"""One error convention: every exception the package raises derives from
:class:`jaxhybrid.JaxHybridError` and names what was wrong; decode results are
:class:`jaxhybrid.DecodeCode` members.

The scan reads every ``raise`` of ``jaxhybrid/`` with ``ast`` and resolves the raised class in
its module's namespace, so a new ``raise ValueError(...)`` anywhere fails here.
"""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

import jaxhybrid as jh

ROOT = Path(__file__).resolve().parent.parent / "jaxhybrid"
FILES = sorted(ROOT.rglob("*.py"))


def _module(path: Path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return importlib.import_module(".".join(parts))


def _raised(tree: ast.AST):
    """``(line, dotted name)`` of every ``raise X(...)`` / ``raise X`` (bare re-raises skipped)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            yield node.lineno, ast.unparse(exc)


def bad_raises(path: Path, module=None) -> list[str]:
    """The raises of ``path`` whose class is not a ``JaxHybridError``."""
    module = _module(path) if module is None else module
    out = []
    for line, name in _raised(ast.parse(path.read_text())):
        if name == "argparse.ArgumentTypeError":  # argparse catches it: a usage error, exit 2
            continue
        head, *rest = name.split(".")
        obj = getattr(module, head, getattr(builtins, head, None))
        for attr in rest:
            obj = getattr(obj, attr, None)
        if not (isinstance(obj, type) and issubclass(obj, jh.JaxHybridError)):
            out.append(f"{path.name}:{line}: raise {name}")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_every_raise_is_a_jaxhybrid_error(path):
    assert bad_raises(path) == []


def test_the_scan_finds_builtin_raises(tmp_path):
    # Given a module raising builtins and jaxhybrid errors
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import jaxhybrid as jh\n"
        "def f(x):\n"
        "    if x == 1:\n"
        "        raise ValueError('no')\n"
        "    if x == 2:\n"
        "        raise RuntimeError\n"
        "    if x == 3:\n"
        "        raise jh.InvalidArgumentError('x')\n"
        "    try:\n"
        "        pass\n"
        "    except KeyError:\n"
        "        raise\n"
    )

    class Probe:
        jh = jh

    # Then the builtins are reported and the rest is not
    found = bad_raises(probe, Probe)
    assert [f.split(":")[1] for f in found] == ["4", "6"], found


def test_argument_errors_are_also_the_builtin_kinds():
    # Code catching ValueError / TypeError keeps working
    assert issubclass(jh.InvalidArgumentError, ValueError)
    assert issubclass(jh.InvalidTypeError, TypeError)
    assert issubclass(jh.InvalidArgumentError, jh.JaxHybridError)
    with pytest.raises(jh.InvalidArgumentError, match="kv_size"):
        jh.KVConfig(kv_size=0)


def test_decode_codes_are_an_enum():
    assert [int(c) for c in jh.DecodeCode] == [0, 1, -1, -3]
    result = jh.DecodeResult(
        code=jh.DecodeCode.NO_SLOT, status=0, check=None, updated=False, n_outputs=0
    )
    with pytest.raises(jh.DecodeError, match="NO_SLOT"):
        jh.raise_for_result(result)


def test_serving_refuses_a_model_that_is_not_a_plug_in():
    from jaxhybrid.serving import generate

    # Given 0.1's call shape, the parameters where the plug-in is due
    with pytest.raises(jh.InvalidTypeError, match="plug-in comes first"):
        generate({"w": 1}, None, None, [[1]], cfg=None, n_ubatch=1, max_new_tokens=1)
