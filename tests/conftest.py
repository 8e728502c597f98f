"""Strict JAX for every test: rank promotion raises, and shapes/dtypes are never silently mixed."""

import gc
import os

# Eight simulated CPU devices for the mesh tests (tests/test_sharding.py). XLA reads the flag when
# JAX starts its backend, so it is set before anything runs; every other test keeps using the
# first device (measured: no measurable change in their run time).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each module (modules share almost none).

    Each XLA CPU executable holds a few memory mappings of JIT code, and a process may have at
    most ``vm.max_map_count`` (65530 by default) of them: measured, tests/test_kv_cache.py and
    tests/test_hybrid.py alone leave 28,209 mappings in a process, so an xdist worker running half
    the suite ran out and crashed inside XLA's compiler (segfault or abort). Cleared after each
    module, the same two files leave 698.
    """
    yield
    jax.clear_caches()
    gc.collect()
