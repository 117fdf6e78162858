"""Triton kernels for CUDA (placeholder until the kernel lands)."""

from __future__ import annotations


def kernels_available() -> bool:
    return False
