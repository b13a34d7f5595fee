"""The base weight of a LoRA layer, dense or 4-bit: one small strategy object that layers and the
PEFT integration call instead of branching on the weight's kind.

``base_weight(weight)`` gives a ``DenseWeight`` for a float tensor and a ``Weight4bit`` for a
bitsandbytes ``Params4bit`` (``bnb.nn.Linear4bit.weight``) whose quant state the fused QLoRA
kernels read (``fastlora.ops.triton_qlora``): NF4 or FP4, block sizes 32 to 4096 (powers of two),
absmax plain or double-quantized, compute dtype fp16 or bf16. ``check_4bit`` raises
``Unsupported4bitState`` naming why for anything else. The 4-bit weight is never dequantized to a float copy on the
fused path; ``backend="torch"`` (and ``"auto"`` where Triton cannot run) dequantizes it with
bitsandbytes first, as PEFT does.

bitsandbytes is optional (the ``qlora`` extra: ``pip install -e ".[qlora]"`` in a checkout): nothing here imports it until
a 4-bit weight needs it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .functional import lora_linear

# The format (code tables, quant-state checks, the kernels' Quant4bit view) lives below the kernels,
# which import it too; re-exported here, where the layers and the PEFT integration look.
from .ops._quant4bit import (  # noqa: F401
    CODE_TABLES, HALF_DTYPES, QUANT_TYPES, Quant4bit, code_table, quant_of, unsupported_reason,
)  # fmt: skip

# From the source tree: PyPI's "fastlora" is another project (this one is not published yet).
EXTRA_HINT = "pip install 'bitsandbytes>=0.45' (or, in the fastlora checkout: pip install -e '.[qlora]')"


class Unsupported4bitState(ValueError):
    """A 4-bit weight whose quantization state the fused kernels do not read."""


def bitsandbytes():
    """The bitsandbytes module, or an ImportError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"4-bit (QLoRA) layers need bitsandbytes ({err}); install it with `{EXTRA_HINT}`") from err
    return bitsandbytes


def is_4bit(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit parameter (checked without importing bitsandbytes)."""
    return type(weight).__name__ == "Params4bit" and type(weight).__module__.startswith("bitsandbytes")


class DenseWeight(NamedTuple):
    """A float base weight ``[out, in]``: ``fastlora.lora_linear`` on it."""

    weight: torch.Tensor

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype == self.weight.dtype

    def lora_linear(self, x, bias, lora_A, lora_B, scaling, dropout: float, backend: str) -> torch.Tensor:
        return lora_linear(x, self.weight, bias, lora_A, lora_B, scaling, dropout=dropout, backend=backend)


class Weight4bit(NamedTuple):
    """A bitsandbytes 4-bit base weight, computed in ``compute_dtype`` (x must be in it)."""

    weight: torch.nn.Parameter
    compute_dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.quant_state.shape)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype == self.compute_dtype and x.dtype in HALF_DTYPES

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """A full float copy of W in ``dtype`` (the unfused path; PEFT's way)."""
        return bitsandbytes().functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)

    def lora_linear(self, x, bias, lora_A, lora_B, scaling, dropout: float, backend: str) -> torch.Tensor:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # bitsandbytes casts a float32 bias the same way
        if not _fused_runs(backend, x, lora_A.shape[0], self.accepts(x), (self, bias, lora_A, lora_B, dropout)):
            W = self.dequantized(x.dtype)
            return lora_linear(x, W, bias, lora_A, lora_B, scaling, dropout=dropout, backend="torch")
        from ._checks import check_dropout
        from .functional import draw_seed
        from .ops.triton_qlora import qlora_linear_2d

        out_features, in_features = self.shape
        _check_inputs(x, self.compute_dtype, in_features, out_features, bias, lora_A, lora_B)
        dropout = check_dropout(dropout)
        seed = draw_seed(dropout)  # refused under CUDA-graph capture, as on the dense path
        y = qlora_linear_2d(x.reshape(-1, in_features), self.quant(), bias, lora_A, lora_B, float(scaling), dropout, seed)
        return y.reshape(*x.shape[:-1], out_features)

    def quant(self) -> Quant4bit:
        """The kernel's view of the quant state (``Quant4bit``), no copies of W."""
        return quant_of(self.weight)


def _fused_runs(backend: str, x: torch.Tensor, rank: int, accepted: bool, call: tuple | None = None) -> bool:
    """Whether the fused QLoRA kernels take this call, else the dequantizing torch path: always for
    ``"triton"`` (raising where they cannot run), for ``"auto"`` where they run on an input they
    accept (in the compute dtype, fp16 or bf16, r <= 256) and, on CUDA, have passed ``auto``'s
    correctness gate for the problem class (``call``: ``(weight4bit, bias, lora_A, lora_B, dropout)``;
    see ``fastlora.ops.auto_4bit``)."""
    from .ops.registry import MAX_FUSED_RANK, backend_state

    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"4-bit base weights run on backend 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch" or (backend == "auto" and not (accepted and rank <= MAX_FUSED_RANK)):
        return False
    # The 4-bit kernels run where the dense triton backend runs (CUDA tensors; CPU ones under the
    # interpreter): its loaded state answers that, a dict look-up a call.
    state = backend_state("triton")
    reason = state if isinstance(state, str) else None
    if reason is None and x.device.type not in state.runs_on:
        reason = f"the 4-bit kernels run on {'/'.join(state.runs_on)} tensors, got {x.device}"
    if reason is not None and backend == "triton":
        raise ValueError(f"backend='triton' cannot run the 4-bit kernels here: {reason}; use backend='torch' or 'auto'")
    if reason is None and backend == "auto" and call is not None:
        from .ops.auto_4bit import fused_4bit_passes

        return fused_4bit_passes(x, *call)
    return reason is None


def _check_inputs(x, compute_dtype, in_features, out_features, bias, lora_A, lora_B) -> None:
    from .ops.registry import MAX_FUSED_RANK

    if x.dtype not in HALF_DTYPES or x.dtype != compute_dtype:
        raise TypeError(
            f"the 4-bit kernels compute in float16 or bfloat16, in the layer's compute dtype {compute_dtype}; "
            f"got x in {x.dtype}"
        )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must be in_features = {in_features}, got x of shape {tuple(x.shape)}")
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or tuple(lora_B.shape) != (out_features, r) or r < 1:
        raise ValueError(
            f"adapters must be lora_A [r, {in_features}] and lora_B [{out_features}, r], "
            f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if r > MAX_FUSED_RANK:
        raise ValueError(f"the 4-bit kernels support r <= {MAX_FUSED_RANK}, got r={r}; use backend='torch'")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"adapters must both be float32 or x's dtype {x.dtype}, got {lora_A.dtype} and {lora_B.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move all tensors to one device")


def compute_dtype_of(linear) -> torch.dtype:
    """The dtype a bitsandbytes ``Linear4bit`` computes in: its ``compute_dtype``, else the dtype it
    was quantized from."""
    return linear.compute_dtype or linear.weight.quant_state.dtype


def base_weight(weight, compute_dtype: torch.dtype | None = None) -> DenseWeight | Weight4bit:
    """The strategy object for ``weight``. A 4-bit one computes in ``compute_dtype`` (default: the
    dtype it was quantized from) and must have passed ``check_4bit`` once (not re-checked a call:
    the check reads the code table back from the device)."""
    if not is_4bit(weight):
        return DenseWeight(weight)
    return Weight4bit(weight, compute_dtype or weight.quant_state.dtype)


def check_4bit(weight) -> None:
    """Raise ``Unsupported4bitState`` naming why the kernels cannot read a 4-bit ``weight``."""
    reason = unsupported_reason(weight)
    if reason is not None:
        raise Unsupported4bitState(f"unsupported 4-bit weight: {reason}")


def quantize_linear(linear: torch.nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, compute_dtype: torch.dtype | None = None,
                    quant_storage: torch.dtype = torch.uint8):  # fmt: skip
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight quantized on its device (CPU works)
    and its bias; ``compute_dtype`` defaults to the weight's dtype."""
    bnb = bitsandbytes()
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype or weight.dtype, compress_statistics=compress_statistics,
        quant_type=quant_type, quant_storage=quant_storage, device="meta",
    )  # fmt: skip
    params = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize, compress_statistics=compress_statistics,
                               quant_type=quant_type, quant_storage=quant_storage)  # fmt: skip
    layer.weight = params.to(weight.device)  # quantizes: a Params4bit is quantized on its first move
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer
