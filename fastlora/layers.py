"""``FusedLoRALinear`` and ``replace_linear_with_lora``: thin nn.Module wrappers over ``lora_linear``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_dropout, check_dtype, check_layer_args, check_target_modules
from .functional import lora_linear
from .qlora import base_weight, check_4bit, compute_dtype_of, is_4bit


class FusedLoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank adapter, computed in one fused pass.

    ``y = x Wᵀ + b + scaling·(x Aᵀ) Bᵀ`` with ``W = weight [out, in]`` and ``b = bias [out]`` frozen,
    ``A = lora_A [r, in]`` and ``B = lora_B [out, r]`` trainable (PEFT's layout), and
    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``, as in rsLoRA; PEFT's convention:
    for a layer whose scale is ``alpha`` itself, as in Raschka's ``LinearWithLoRA``, pass
    ``alpha = scale * r``). ``alpha`` must be > 0 and ``r`` >= 1. A named fused ``backend`` must be
    installed and have a device here (checked now); device, dtype and rank are checked per call,
    as the module can be moved and cast after it is built. ``lora_A`` is
    kaiming-uniform (a=√5) and ``lora_B`` zero, as in PEFT and the LoRA paper, so a new layer equals
    its base. ``adapter_dtype`` (default: the weight's) may be float32 with an fp16/bf16 base, which
    is PEFT's default. ``dropout`` is LoRA dropout on the low-rank branch's input in training mode
    (PEFT's ``lora_dropout``), fused into the kernels.

    ``merge()`` folds the adapter into the weight for inference (``merged`` is then True and the
    forward is the base product alone); ``unmerge()`` takes it back out.

    ``from_linear`` of a bitsandbytes ``Linear4bit`` keeps its 4-bit ``Params4bit`` as ``weight``
    (QLoRA; see ``fastlora.qlora``): the forward then computes in the layer's ``compute_dtype`` and
    dequantizes W inside the fused kernels; merging is not offered (it would requantize W).

    ``use_dora=True`` makes it a DoRA layer (PEFT's ``use_dora``, ``fastlora.dora``):
    ``y = (m/n) ⊙ (x Wᵀ + scaling·(x Aᵀ) Bᵀ) + b`` with the trainable ``magnitude = m [out]``
    (initialised to ``‖W_j‖``, in ``adapter_dtype``) and ``n_j = ‖W_j + scaling·B_j A‖`` detached.
    A 4-bit weight with DoRA (QDoRA) is not supported.
    """

    compute_dtype: torch.dtype | None = None  # set for a 4-bit weight only

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        bias: bool = True,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ):
        super().__init__()
        self.use_dora = bool(use_dora)
        self.r, self.alpha = check_layer_args(in_features, out_features, r, alpha, backend)
        check_dtype("dtype", dtype)
        check_dtype("adapter_dtype", adapter_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_dropout = check_dropout(dropout)
        self.backend = backend
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias.requires_grad_(False) if bias else None)
        adapter_dtype = adapter_dtype or self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, device=self.weight.device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, device=self.weight.device, dtype=adapter_dtype))
        self.merged = False
        self.reset_lora_parameters()

    def _init_dora(self) -> None:
        """(Re)create ``magnitude`` as PEFT does: ``‖W_j + scaling·B_j A‖`` (``‖W_j‖`` while B is zero)."""
        from .dora import WeightNormCache, initial_magnitude

        self._dora_cache = WeightNormCache()
        if self.weight.device.type == "meta":
            value = torch.empty(self.out_features, device="meta", dtype=self.lora_A.dtype)
        else:
            value = initial_magnitude(self.weight, self.lora_A, self.lora_B, self.scaling, self.lora_A.dtype)
        self.magnitude = nn.Parameter(value)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> "FusedLoRALinear":
        """Wrap an existing ``nn.Linear`` or bitsandbytes ``Linear4bit``: its ``weight`` and ``bias``
        Parameters are shared (not copied) and frozen; new adapters are created on its device, in
        ``adapter_dtype`` (default: the weight's dtype, the compute dtype for a 4-bit weight).
        Raises ``fastlora.qlora.Unsupported4bitState`` for a 4-bit weight the kernels cannot read."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        compute_dtype = None
        if is_4bit(weight):
            if use_dora:
                raise NotImplementedError("DoRA on a 4-bit base (QDoRA) is not supported by fastlora; use a float base weight")
            check_4bit(weight)
            compute_dtype = compute_dtype_of(linear)
        else:
            check_dtype("linear.weight's dtype", weight.dtype)
        layer = cls(
            linear.in_features,
            linear.out_features,
            r,
            alpha,
            bias=linear.bias is not None,
            use_rslora=use_rslora,
            dropout=dropout,
            backend=backend,
            device="meta",
            dtype=compute_dtype or weight.dtype,
            adapter_dtype=adapter_dtype,
            use_dora=use_dora,
        )
        layer.compute_dtype = compute_dtype
        layer.weight = weight.requires_grad_(False)
        layer.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        layer.lora_A = nn.Parameter(torch.empty_like(layer.lora_A, device=weight.device))
        layer.lora_B = nn.Parameter(torch.empty_like(layer.lora_B, device=weight.device))
        layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if getattr(self, "use_dora", False):
            self._init_dora()

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        """``W ← W + sign·scaling·B A``, formed in float32 (float64 for a float64 W) and rounded to
        W's dtype once, in place (the Parameter and its storage are kept)."""
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        B, A = self.lora_B.to(wide), self.lora_A.to(wide)
        self.weight.copy_(torch.addmm(self.weight.to(wide), B, A, alpha=sign * self.scaling))

    def _check_mergeable(self) -> None:
        if self.compute_dtype is not None:
            raise NotImplementedError("merging into a 4-bit weight would requantize it; fastlora does not merge QLoRA layers")

    def merge(self) -> None:
        """Fold the adapter into the weight: ``W ← W + scaling·B A`` (a no-op if already merged).

        The forward then runs ``x Wᵀ + b`` only, and the adapters get no gradient: unmerge before
        training again. No copy of W is kept; ``unmerge`` subtracts the same product. ``merged`` is
        not part of the state_dict, so save checkpoints unmerged.
        """
        self._check_mergeable()
        if not self.merged:
            if self.use_dora:  # PEFT's DoRA merge: W ← (m/n)·(W + s·B A); m/n is kept for unmerge
                from .dora import merge_weight

                self._dora_merge_scale = merge_weight(self.weight, self.lora_A, self.lora_B, self.magnitude, self.scaling)
            else:
                self._add_delta(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge``: ``W ← W − scaling·B A`` in float32, which gives back W to within one
        rounding step of its dtype."""
        self._check_mergeable()
        if self.merged:
            if self.use_dora:
                from .dora import unmerge_weight

                unmerge_weight(self.weight, self.lora_A, self.lora_B, self._dora_merge_scale, self.scaling)
            else:
                self._add_delta(-1.0)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout = self.lora_dropout if self.training else 0.0
        if self.merged:
            if dropout:
                raise RuntimeError(
                    f"a merged FusedLoRALinear cannot apply LoRA dropout (p={dropout}) in training mode: "
                    "call unmerge() to train, or eval() for inference"
                )
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            from .dora import dora_linear

            return dora_linear(
                x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, self.scaling,
                dropout=dropout, backend=self.backend, cache=self._dora_cache,
            )  # fmt: skip
        # The Parameters from _parameters: each self.<parameter> is a Python call to
        # nn.Module.__getattr__ (0.3 µs, 1.2 of a call's host time for the four). A name that is
        # not a registered Parameter there (FSDP swaps in plain tensors) is read as an attribute.
        params = self._parameters
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        lora_A = params["lora_A"] if "lora_A" in params else self.lora_A
        lora_B = params["lora_B"] if "lora_B" in params else self.lora_B
        if self.compute_dtype is None and not is_4bit(weight):  # base_weight's DenseWeight, without building it
            return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, dropout=dropout, backend=self.backend)
        return base_weight(weight, self.compute_dtype).lora_linear(x, bias, lora_A, lora_B, self.scaling, dropout, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.lora_dropout:g}, "
            f"backend={self.backend!r}, merged={self.merged}"
            + (", use_dora=True" if self.use_dora else "")
            + (f", 4-bit {self.weight.quant_state.quant_type}, compute_dtype={self.compute_dtype}" if self.compute_dtype else "")
        )


def replace_linear_with_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    target_modules=None,
    *,
    freeze: bool = True,
    **layer_kwargs,
) -> nn.Module:
    """Replace, recursively and in place, the ``nn.Linear`` layers of ``model`` that
    ``target_modules`` selects by ``FusedLoRALinear.from_linear(linear, r, alpha, **layer_kwargs)``.
    Returns ``model``. ``r`` and ``alpha`` default as ``FusedLoRALinear``'s (8 and 16).

    ``target_modules`` is read as PEFT's ``LoraConfig`` reads it: None selects every ``nn.Linear``;
    ``"all-linear"`` every one but the output layer (``get_output_embeddings()``); another string
    is a regex matched against whole module names; a list, e.g. ``["q_proj", "v_proj"]``, selects
    the modules whose name equals or ends with '.' + an entry (see ``_checks.check_target_modules``).

    ``freeze=True`` (the default) leaves only LoRA adapters trainable, as ``get_peft_model`` does:
    every other parameter of ``model`` gets ``requires_grad=False``. ``freeze=False`` freezes only
    the replaced layers' base weights and leaves the rest of the model as it was (e.g. to train a
    new head beside the adapters). Raises, before changing anything, when a target matches no
    ``nn.Linear`` or an argument is invalid.
    """
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze must be a bool, got {type(freeze).__name__} {freeze!r}")
    targets = check_target_modules(model, target_modules)
    check_dtype("adapter_dtype", layer_kwargs.get("adapter_dtype"))
    for name, linear in targets:
        check_dtype(f"{name}.weight's dtype", linear.weight.dtype)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FusedLoRALinear.from_linear(linear, r, alpha, **layer_kwargs))
    if freeze:
        model.requires_grad_(False)
        for layer in model.modules():
            if isinstance(layer, FusedLoRALinear):
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``FusedLoRALinear`` of ``model`` by a plain ``nn.Linear`` whose weight
    is the merged ``W + scaling·B A`` (see ``FusedLoRALinear.merge``); the adapters are dropped. The
    new layers reuse the weight and bias Parameters (still frozen). Returns ``model``, or the new
    ``nn.Linear`` when ``model`` is itself a ``FusedLoRALinear``.
    """

    def unloaded(layer: FusedLoRALinear) -> nn.Linear:
        layer.merge()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        return linear.train(layer.training)

    if isinstance(model, FusedLoRALinear):
        return unloaded(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, unloaded(layer))
    return model
