"""Shared by tests/ and benchmarks/: tests marked ``gpu`` skip, with the reason, where torch sees no GPU."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA GPU, and torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip, append=False)  # ahead of "got empty parameter set" where no GPU backend exists
