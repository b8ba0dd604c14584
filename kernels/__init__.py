"""Triton kernels, installed as `hybrid_kv.kernels` (see pyproject.toml)."""
