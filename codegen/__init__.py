"""Triton code generation: attention templates and kernels generated from fused graph groups."""
