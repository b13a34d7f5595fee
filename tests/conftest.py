"""Test set-up: on a machine without a GPU the Triton kernels run under Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, i.e. before
``fastlora`` is imported, so it is set here, at collection time. ``backend="auto"`` remembers its
GPU measurements in a throw-away directory, not in the user's cache.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLORA_CACHE_DIR", tempfile.mkdtemp(prefix="fastlora-test-cache-"))
