"""The bitsandbytes 4-bit format as the fused QLoRA kernels read it: code tables, the checks on a
quant state, and ``Quant4bit``, the kernels' view of one weight. No kernels here and nothing that
imports them: ``fastlora.qlora`` (the layers' side) and the kernel modules (``triton_qlora``) both
import this, in one direction.

The layout (``quantize_4bit`` of a row-major ``W [N, K]``, flat element index ``i = n·K + k``):

    packed[i // 2]      uint8, two 4-bit codes a byte, element ``2j`` in the high nibble
    code[16]            fp32 value of each code (NF4 or FP4, ``code_table``)
    absmax[i // QBLOCK] fp32 scale of each run of QBLOCK consecutive elements (runs may cross rows),
                        or, double-quantized (nested): uint8 codes into ``code2[256]``,
                        ``absmax = code2[q]·absmax2[b // QBLOCK2] + offset``
    W[n, k] = (code[packed nibble]·absmax) rounded once to the compute dtype (x's dtype),

exactly as ``bitsandbytes.functional.dequantize_4bit`` computes it. Read for NF4 or FP4, block sizes
32 to 4096 (powers of two), absmax plain or double-quantized; ``unsupported_reason`` names anything
else. Nothing here imports bitsandbytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

QUANT_TYPES = ("nf4", "fp4")
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the compute dtypes the 4-bit kernels run in

# bitsandbytes' NF4 levels (normal-distribution quantiles, QLoRA paper, appendix E), sorted.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4: code bit 3 is the sign; codes 0-7 are the magnitudes of an e2m1 format in
# bitsandbytes' own code order (bit 0 the mantissa), divided by the largest, 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_FP4 = tuple(v / 12 for v in _FP4_MAGNITUDES) + tuple(-v / 12 for v in _FP4_MAGNITUDES)
CODE_TABLES = {"nf4": _NF4, "fp4": _FP4}


def code_table(quant_type: str, device) -> torch.Tensor:
    """The 16 fp32 values of ``quant_type``'s 4-bit codes, indexed by code."""
    return torch.tensor(CODE_TABLES[quant_type], dtype=torch.float32, device=device)


class Quant4bit(NamedTuple):
    """The tensors and sizes of a bitsandbytes 4-bit weight ``W [out_features, in_features]`` (see
    the module doc); ``absmax2``, ``code2``, ``offset`` are None unless nested (blocksize2 then > 0)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    out_features: int
    blocksize: int
    blocksize2: int


def unsupported_reason(weight) -> str | None:
    """Why the fused kernels cannot read the 4-bit ``weight``'s quant state, or None."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "the 4-bit weight is not quantized yet (no quant_state; move the layer to its device first)"
    try:
        quant_type, blocksize, shape, absmax = state.quant_type, state.blocksize, state.shape, state.absmax
        nested, code = state.nested, state.code
    except AttributeError as err:
        return f"this bitsandbytes version's QuantState has no {err.name!r}: its layout is unknown to fastlora"
    if getattr(state, "packing_format_for_cpu", False):
        return "the weight is repacked for bitsandbytes' CPU kernel (packing_format_for_cpu)"
    if quant_type not in QUANT_TYPES:
        return f"quant_type {quant_type!r} (fastlora reads {', '.join(QUANT_TYPES)})"
    if not (isinstance(blocksize, int) and 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        return f"blocksize {blocksize!r} (fastlora reads powers of two from 32 to 4096)"
    if len(shape) != 2 or not weight.is_contiguous() or weight.numel() * weight.element_size() * 2 < math.prod(shape):
        return f"packed storage {weight.dtype} {tuple(weight.shape)} does not hold a {tuple(shape)} 4-bit weight"
    if code is None or code.numel() != 16 or code.detach().cpu().float().tolist() != code_table(quant_type, "cpu").tolist():
        return f"its {quant_type} code table differs from the one fastlora decodes"
    if nested:
        state2 = state.state2
        if absmax.dtype != torch.uint8 or state2.code.numel() != 256 or state2.blocksize & (state2.blocksize - 1):
            return "its nested absmax is not 8-bit blockwise with a power-of-two block (unknown layout)"
    elif absmax.dtype != torch.float32:
        return f"absmax in {absmax.dtype} (fastlora reads float32)"
    return None


def quant_of(weight) -> Quant4bit:
    """The kernels' view of a bitsandbytes ``Params4bit``'s quant state, no copies of W (checked
    once by ``unsupported_reason``, not here: the check reads the code table back from the device)."""
    state = weight.quant_state
    code = _table(state.quant_type, weight.device)
    packed = weight.data.view(torch.uint8)  # quant_storage may be another dtype (FSDP): same bytes
    if state.nested:
        s2 = state.state2
        return Quant4bit(packed, state.absmax, code, s2.absmax, s2.code, state.offset,
                         state.shape[0], state.blocksize, s2.blocksize)  # fmt: skip
    return Quant4bit(packed, state.absmax, code, None, None, None, state.shape[0], state.blocksize, 0)


_TABLES: dict = {}


def _table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry code table on ``device``, made once (not a host-to-device copy a call)."""
    key = (quant_type, device)
    if key not in _TABLES:
        _TABLES[key] = code_table(quant_type, device)
    return _TABLES[key]
