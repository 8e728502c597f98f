"""Strict JAX for every test: rank promotion raises, and shapes/dtypes are never silently mixed."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")
