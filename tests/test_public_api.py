"""The public API is exactly ``jaxhybrid.__all__`` and every name in it resolves."""

import jaxhybrid as jh


def test_every_exported_name_resolves():
    # Given the package's declared public API
    names = jh.__all__
    # Then every name exists and there are no duplicates
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(jh, name) is not None, name


def test_core_imports_without_flax():
    # The core must not pull in Flax (Flax is for jaxhybrid.models only).
    import subprocess
    import sys

    code = "import sys, jaxhybrid; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
