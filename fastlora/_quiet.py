"""Log records of other libraries that fastlora's own commands trigger and that say nothing to a
fastlora user; ``quiet_foreign_logs()`` drops them (those records only, nothing else of those
loggers). ``import fastlora`` drops bitsandbytes' (so a script that imports fastlora before PEFT
prints nothing of it); ``patch_peft`` and ``fastlora bench`` drop both.

- bitsandbytes, when imported on a CPU with AVX512-BF16 (PEFT imports it when installed), tries to
  fetch an optional CPU kernel from the HuggingFace Hub and logs "Failed to load CPU
  gemm_4bit_forward from kernels-community ..." when the ``kernels`` package is absent. fastlora's
  4-bit path never uses that kernel.
- torch's C++-extension module logs "No CUDA runtime is found, using CUDA_HOME=..." when a CUDA
  toolkit is installed but no GPU is visible; ``torch.compile``'s CPU code generation imports it
  (``fastlora bench``'s ``compiled`` row).

A record logged before the filter is in place (``import peft`` before ``import fastlora``) still
appears: it is not fastlora's to hide. docs/troubleshooting.md lists what remains.
"""

from __future__ import annotations

import logging

# logger name -> the start of the message that is dropped
_DROPPED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_foreign_logs(*names: str) -> None:
    """Attach the filters of the loggers ``names`` (default: all of them), once each;
    ``logging.getLogger`` imports nothing."""
    for name in names or _DROPPED:
        prefix = _DROPPED[name]
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
