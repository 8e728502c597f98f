"""Strict JAX for every test: rank promotion raises, and shapes/dtypes are never silently mixed."""

import os

# Eight simulated CPU devices for the mesh tests (tests/test_sharding.py). XLA reads the flag when
# JAX starts its backend, so it is set before anything runs; every other test keeps using the
# first device (measured: no measurable change in their run time).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")
