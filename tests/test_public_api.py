"""The public API is exactly the ``__all__`` of each public namespace and every name resolves."""

import subprocess
import sys

import pytest

import jaxhybrid as jh


@pytest.mark.parametrize("module", [jh, jh.kv, jh.recurrent])
def test_every_exported_name_resolves(module):
    # Given a public namespace's declared API
    names = module.__all__
    # Then every name exists and there are no duplicates
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None, name


def test_core_imports_without_flax():
    # The core must not pull in Flax (Flax is for jaxhybrid.models only).
    code = "import sys, jaxhybrid; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_namespace_resolves():
    models = pytest.importorskip("jaxhybrid.models")
    assert len(models.__all__) == len(set(models.__all__))
    for name in models.__all__:
        assert getattr(models, name) is not None, name
