"""Benchmarks of jaxhybrid against transformers, llama.cpp and a bare JAX loop (issue 9).

Run ``python -m benchmarks`` (``--quick`` for a short run); see ``benchmarks/run.py``.
"""
