"""The ``"cuda"`` backend: the C++/CUDA extension ``fastlora._C`` (sources and design in ``csrc/``).

The extension defines ``fastlora::cuda_forward`` and ``fastlora::cuda_backward`` with the schemas of
``_registry`` (``TORCH_LIBRARY`` in ``csrc/lora_ops.cpp``) and their CUDA kernels; this module only
attaches the shared fakes and autograd. It runs on CUDA tensors in fp16, bf16 and fp32.
"""

from __future__ import annotations

import torch

from .._extension import load_extension
from ._registry import LoRAOps, attach_autograd


def load_cuda_ops() -> LoRAOps | str:
    """The backend's ops, or why it cannot run here (no CUDA device, a pre-Ampere GPU, or the
    extension is not built)."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False); the backend runs on NVIDIA GPUs"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return f"the kernels need compute capability 8.0 (Ampere) or newer, this GPU has {capability[0]}.{capability[1]}"
    reason = load_extension()
    if reason is not None:
        return reason
    ops = torch.ops.fastlora
    return attach_autograd(ops.cuda_forward.default, ops.cuda_backward.default, runs_on=("cuda",))
