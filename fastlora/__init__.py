"""fastlora: a fused LoRA linear layer for PyTorch, forward and backward in one pass.

Distribution name `fastlora-kernels` (PyPI's `fastlora` is another project); installed from the
source tree until published (README.md, docs/install.md).
"""

from . import reference
from ._quiet import quiet_foreign_logs as _quiet_foreign_logs
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


def __getattr__(name: str):
    # backend="auto"'s entry points, loaded on first use (fastlora.ops.auto, with its timing, gate and
    # cache modules, is not imported by `import fastlora`).
    if name in ("explain_backend", "set_default_backend"):
        from .ops import auto

        return getattr(auto, name)
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")

# bitsandbytes logs a Hub-kernel message at import on some CPUs (PEFT imports it): see fastlora/_quiet.py.
_quiet_foreign_logs("bitsandbytes.backends.cpu.ops")
