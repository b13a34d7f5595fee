"""The ``"cuda"`` backend: the C++/CUDA extension ``fastlora._C`` (sources and design in ``csrc/``).

The ops ``fastlora::cuda_forward`` and ``fastlora::cuda_backward`` are defined here from the shared
schemas of ``_contract``; ``csrc/lora_ops.cpp`` registers only their CUDA kernels
(``TORCH_LIBRARY_IMPL``), and this module attaches the shared fakes and autograd. It runs on CUDA
tensors of compute capability 8.0 or newer, in fp16, bf16 and fp32.
"""

from __future__ import annotations

import functools

import torch

from ._contract import LoRAOps, attach_autograd, define_ops
from ._extension import load_extension


@functools.cache
def _device_unsupported(index: int) -> str | None:
    # Asked per call device, not at load: reading the capability initialises CUDA, which loading
    # a backend must not do (fork-based DataLoader workers), and GPUs of one machine may differ.
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 0):
        return f"the kernels need compute capability 8.0 (Ampere) or newer, cuda:{index} has {major}.{minor}"
    return None


def device_unsupported(device: torch.device) -> str | None:
    """Why the kernels cannot run on CUDA device ``device``, or None."""
    return _device_unsupported(device.index if device.index is not None else torch.cuda.current_device())


def load_cuda_ops() -> LoRAOps | str:
    """The backend's ops, or why it cannot run here (no CUDA build of torch, no CUDA device, or the
    extension is not built). Initialises no CUDA context: ``torch.cuda.is_available()`` only counts
    devices."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False); the backend runs on NVIDIA GPUs"
    reason = load_extension()
    if reason is not None:
        return reason
    forward, backward = define_ops("fastlora", "cuda")
    return attach_autograd(forward, backward, runs_on=("cuda",), device_unsupported=device_unsupported)
