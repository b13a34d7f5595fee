"""Which backend a call runs on: a named one (checked by the registry) or ``"auto"``'s choice.

The layering is ``registry`` (the table of backends, importing nothing of fastlora above it) →
``auto`` (the measured choice among them, and the resolver, whose fast path is inline there) →
this module, the one the layers and ``lora_linear`` import.
"""

from __future__ import annotations

from .auto import resolve_backend  # noqa: F401
from .registry import backend_ops  # noqa: F401
