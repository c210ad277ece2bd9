"""Triton kernels (imported lazily: Triton is optional on CPU machines)."""
