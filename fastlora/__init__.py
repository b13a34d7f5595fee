"""fastlora: a fused LoRA linear layer for PyTorch, forward and backward in one pass."""

from . import reference
from .backends import BackendUnavailableError, available_backends
from .functional import lora_linear
from .layers import FusedLoRALinear, replace_linear_with_lora

__all__ = [
    "BackendUnavailableError",
    "FusedLoRALinear",
    "available_backends",
    "lora_linear",
    "reference",
    "replace_linear_with_lora",
]
__version__ = "0.1.0"
