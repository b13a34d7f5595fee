"""Placeholder loader for the CUDA C++ backend (filled by the CUDA C++ work)."""

from __future__ import annotations


def load_cuda_ops():
    return "the CUDA C++ extension fastlora._C is not built"
