"""The package's layering: core -> models -> serving -> cli, each upper layer using only public
names of the layers below it (STYLE.md rule 14, docs/semantics.md has the rules the core keeps).

Scans every import of ``jaxhybrid/models``, ``jaxhybrid/serving`` and ``jaxhybrid/cli`` with
``ast``; a module may import
- public modules of lower layers (no path component starting with ``_``) and names in their
  ``__all__``;
- modules of its own package, but no name starting with ``_`` from them (a helper another module
  needs is not private to its module);
and never a higher layer.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jaxhybrid"
LAYERS = ("core", "models", "serving", "cli")


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "jaxhybrid.__main__":  # the program entry point: ``python -m jaxhybrid``
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[1:] else "core"


def _package(module: str) -> str:
    """The package a module belongs to (``jaxhybrid`` for the core)."""
    layer = _layer(module)
    return "jaxhybrid" if layer == "core" else f"jaxhybrid.{layer}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """``(line, imported module, names)`` of every absolute jaxhybrid import in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jaxhybrid":
                    yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            top = node.module.split(".")[0]
            if top == "jaxhybrid":
                yield node.lineno, node.module, tuple(a.name for a in node.names)


def violations(path: Path, me: str | None = None) -> list[str]:
    """Every import of ``path`` (module ``me``, by default from its place in the package) that
    breaks the layering (empty for a clean module)."""
    me = _module_name(path) if me is None else me
    my_layer = LAYERS.index(_layer(me))
    out = []
    for line, module, names in _imports(path):
        where = f"{path.name}:{line}"
        their_layer = LAYERS.index(_layer(module))
        if their_layer > my_layer:
            out.append(f"{where}: {module} is a higher layer ({LAYERS[their_layer]})")
            continue
        same_package = _package(module) == _package(me) and their_layer == my_layer
        if same_package:
            private = [n for n in names if n.startswith("_")]
            if private:
                out.append(f"{where}: private names {private} from {module}")
            continue
        if any(p.startswith("_") for p in module.split(".")):
            out.append(f"{where}: private module {module}")
            continue
        for name in names:
            target = importlib.import_module(module)
            sub = f"{module}.{name}"
            is_module = isinstance(getattr(target, name, None), type(importlib))
            if is_module and not any(p.startswith("_") for p in sub.split(".")):
                continue
            if name not in getattr(target, "__all__", ()):
                out.append(f"{where}: {name} is not public in {module} (not in __all__)")
    return out


UPPER = sorted(p for layer in LAYERS[1:] for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", UPPER, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_upper_layers_import_only_public_names_below(path):
    assert violations(path) == []


def test_core_imports_no_upper_layer():
    core = list(ROOT.glob("*.py"))
    bad = [v for p in core for v in violations(p) if "higher layer" in v]
    assert bad == []


def test_the_scan_finds_violations(tmp_path):
    # Given a fake serving module breaking each rule
    bad = tmp_path / "probe.py"
    bad.write_text(
        "from jaxhybrid import _hybrid\n"
        "from jaxhybrid._batch import Batch\n"
        "from jaxhybrid.cli import main\n"
        "from jaxhybrid.serving._generate import _GenerateCarry\n"
        "from jaxhybrid.models import _loader\n"
        "from jaxhybrid import not_a_public_name\n"
        "from jaxhybrid import kv, seq_rm\n"
        "from jaxhybrid.serving._generate import prefill\n"
    )
    found = violations(bad, "jaxhybrid.serving._probe")
    # Then each bad import is reported once, and the good ones are not
    lines = sorted(int(v.split(":")[1]) for v in found)
    assert lines == [1, 2, 3, 4, 5, 6], found
