"""fastlora: a fused LoRA linear layer for PyTorch, forward and backward in one pass."""

from . import reference
from .ops.auto import explain_backend, set_default_backend
from .ops.registry import BackendStatus, BackendUnavailableError, available_backends
from .adapters import load_adapter, save_adapter
from .functional import lora_linear
from .layers import FusedLoRALinear, merge_and_unload, replace_linear_with_lora
from .peft_integration import patch_peft, unpatch_peft

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "FusedLoRALinear",
    "available_backends",
    "explain_backend",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "patch_peft",
    "reference",
    "replace_linear_with_lora",
    "save_adapter",
    "set_default_backend",
    "unpatch_peft",
]
__version__ = "0.1.0"
