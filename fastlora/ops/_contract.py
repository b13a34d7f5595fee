"""One contract for every backend, registered as ``torch.library`` ops with fakes and autograd.

A backend supplies two functions on 2-D inputs (the public wrapper flattens leading dims):

``forward(x [M, K], weight [N, K], bias [N] | None, lora_A [R, K], lora_B [N, R], scaling, dropout_p, seed)``
    returns ``(y [M, N] in x.dtype, xa [M, R])`` with ``y = x Wᵀ + b + scaling·(D(x) Aᵀ) Bᵀ`` and
    ``xa = D(x) Aᵀ`` unscaled, held in float32 (float64 for float64 inputs) so that an fp16 input
    whose low-rank product exceeds fp16's range stays correct. ``xa`` is what the backward needs.
    ``D`` is LoRA dropout on the low-rank branch's input: ``D(x) = x ⊙ mask / (1 − dropout_p)``
    with ``mask ~ Bernoulli(1 − dropout_p)`` drawn from a counter-based RNG keyed by ``seed`` (a
    0-d int64 CPU tensor; None when ``dropout_p`` is 0) and each element's flat index ``m·K + k``,
    so the backward regenerates the mask instead of storing it.

``backward(gy [M, N], x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias)``
    returns ``(grad_x [M, K], grad_A [R, K], grad_B [N, R], grad_bias [N])``, each in the dtype of
    its input, or an empty tensor where its ``need_*`` flag is False:
    ``grad_x = gy W + scaling·D((gy B) A)``, ``grad_A = scaling·(gy B)ᵀ D(x)``,
    ``grad_B = scaling·gyᵀ xa``, ``grad_bias = Σ_m gy``.

``register_backend`` turns a Python pair into ``fastlora::<name>_forward`` / ``fastlora::<name>_backward``
custom ops. ``define_ops`` defines the pair from the schemas alone, for a backend whose kernels are
registered elsewhere (the C++ extension's ``TORCH_LIBRARY_IMPL``), and ``attach_autograd`` gives it
the same fakes and autograd: the schemas are written here only. The autograd saves only ``x`` and
``xa`` besides the parameters; a ``weight`` that requires grad gets ``gyᵀ x`` from one unfused
matmul (LoRA training freezes it).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.autograd import forward_ad as _forward_ad

# The schemas every backend implements; csrc/lora_ops.cpp only implements ops defined with them here.
FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
    "Tensor? seed) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor gy, Tensor x, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
    "Tensor? seed, bool need_x, bool need_A, bool need_B, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)"
)


class LoRAOps(NamedTuple):
    """One backend: its two ``torch.library`` ops, an ``autograd.Function`` that runs the same
    computation eagerly, the device types it runs on (None: any), and ``device_unsupported(device)``,
    why it cannot run on one device of those types (None: it can; None as the field: never asked).

    Calling it gives ``y``. Under ``torch.compile`` the call goes through the ops, which the compiler
    traces; in eager mode through the Function, which skips the ops' Python dispatch (about 40 µs a
    call on the CPU, comparable to a small layer's whole GPU time). With grad mode off (no_grad,
    inference_mode: decoding) ``eager_forward``, the Function's own forward, runs without the
    Function, whose node and context cost about 3 µs a call and would record nothing; not under a
    transform that needs the Function (forward-mode AD, functorch, ``torch.jit.trace``).
    """

    forward: Callable
    backward: Callable
    function: type[torch.autograd.Function]
    runs_on: tuple[str, ...] | None = None
    device_unsupported: Callable[[torch.device], str | None] | None = None
    eager_forward: Callable | None = None  # ``(inputs) -> (y, xa)``; None: always the Function

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
        if (
            not torch.is_grad_enabled() and self.eager_forward is not None and _forward_ad._current_level < 0
            and not torch._C._are_functorch_transforms_active() and torch._C._get_tracing_state() is None
        ):  # fmt: skip
            return self.eager_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
        return self.function.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of ``xa`` and of the low-rank accumulators: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    xa = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=wide_dtype(x.dtype))
    return y, xa


def fake_grads(x, lora_A, lora_B, out_features: int, need_x, need_A, need_B, need_bias) -> tuple:
    """What a backward returns, as fakes: ``(grad_x, grad_A, grad_B, grad_bias)``, each empty where
    its ``need_*`` is False."""

    def maybe(needed, like, shape):
        return like.new_empty(shape if needed else (0,))

    return (
        maybe(need_x, x, x.shape),
        maybe(need_A, lora_A, lora_A.shape),
        maybe(need_B, lora_B, lora_B.shape),
        maybe(need_bias, x, (out_features,)),
    )


def _fake_backward(gy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_A, need_B, need_bias):
    return fake_grads(x, lora_A, lora_B, weight.shape[0], need_x, need_A, need_B, need_bias)


def _save_for_backward(ctx, inputs, xa) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed


def _input_grads(ctx, backward: Callable, gy: torch.Tensor) -> tuple:
    """The gradients of the forward's eight inputs, from the saved tensors and ``backward``."""
    x, xa, weight, lora_A, lora_B = ctx.saved_tensors
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    args = (gy, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed, need_x, need_A, need_B, need_bias)
    # A backward called inside torch.autocast runs under it too; the forward ran with it off
    # (functional.lora_linear casts first), and the backward must see the same dtypes. Entering
    # torch.autocast(enabled=False) costs 3-4 µs (about 15 µs of a CPU step, measured with the
    # engine around it), so it is entered only when some autocast is on (one C call, 0.2 µs).
    if torch._C._is_any_autocast_enabled():
        with torch.autocast(gy.device.type, enabled=False):
            grad_x, grad_A, grad_B, grad_bias = backward(*args)
            grad_w = gy.t().mm(x) if need_w else None
    else:
        grad_x, grad_A, grad_B, grad_bias = backward(*args)
        grad_w = gy.t().mm(x) if need_w else None
    return (
        grad_x if need_x else None,
        grad_w,
        grad_bias if need_bias else None,
        grad_A if need_A else None,
        grad_B if need_B else None,
        None,
        None,
        None,
    )


def autograd_pair(name: str, forward_op, backward_op, forward_impl, backward_impl, save, input_grads) -> type:
    """Register autograd on ``forward_op`` (whose outputs are ``(y, xa)``) and return the eager
    ``torch.autograd.Function`` called ``name`` that runs the same computation through
    ``forward_impl`` / ``backward_impl``. ``save(ctx, inputs, xa)`` keeps what the backward needs,
    ``input_grads(ctx, backward, gy)`` returns the gradients of the forward's inputs; both are the
    op family's, which fixes its signature (this module's for the dense contract)."""
    torch.library.register_autograd(
        forward_op,
        lambda ctx, gy, _grad_xa: input_grads(ctx, backward_op, gy),
        setup_context=lambda ctx, inputs, output: save(ctx, inputs, output[1]),
    )

    def forward(ctx, *inputs):
        y, xa = forward_impl(*inputs)
        save(ctx, inputs, xa)
        return y

    def backward(ctx, gy):
        return input_grads(ctx, backward_impl, gy)

    # type() rather than a class statement: the Function's name (and its grad_fn's, "<name>Backward") is the caller's.
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def attach_autograd(
    forward_op,
    backward_op,
    runs_on: tuple[str, ...] | None = None,
    *,
    forward_impl=None,
    backward_impl=None,
    device_unsupported: Callable[[torch.device], str | None] | None = None,
) -> LoRAOps:
    """Register fakes and autograd for an existing forward/backward op pair (see module doc) and
    build the eager Function, which calls ``forward_impl``/``backward_impl`` (default: the ops)."""
    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)
    function = autograd_pair(
        "LoRAFunction", forward_op, backward_op, forward_impl or forward_op, backward_impl or backward_op,
        _save_for_backward, _input_grads,
    )  # fmt: skip
    return LoRAOps(forward_op, backward_op, function, runs_on, device_unsupported, forward_impl or forward_op)


def define_ops(namespace: str, name: str) -> tuple:
    """Define ``<namespace>::<name>_forward`` / ``_backward`` with the shared schemas (no kernels yet:
    a C++ library adds them with ``m.impl``) and return the two op overloads."""
    library = torch.library.Library(namespace, "FRAGMENT")
    library.define(f"{name}_forward{FORWARD_SCHEMA}")
    library.define(f"{name}_backward{BACKWARD_SCHEMA}")
    _LIBRARIES.append(library)  # a Library's definitions last as long as the object
    ops = getattr(torch.ops, namespace)
    return getattr(ops, f"{name}_forward").default, getattr(ops, f"{name}_backward").default


_LIBRARIES: list[torch.library.Library] = []


def register_backend(
    name: str, forward: Callable, backward: Callable, runs_on: tuple[str, ...] | None = None, *, eager_backward=None
) -> LoRAOps:
    """Define ``fastlora::<name>_forward`` / ``_backward`` from Python functions and attach autograd.
    ``eager_backward`` (default: ``backward``) is what the eager Function's backward calls: it may
    return None for a gradient it was not asked for (the Function drops those), where the op
    must return a tensor."""
    forward_op = torch.library.custom_op(f"fastlora::{name}_forward", forward, mutates_args=(), schema=FORWARD_SCHEMA)
    backward_op = torch.library.custom_op(f"fastlora::{name}_backward", backward, mutates_args=(), schema=BACKWARD_SCHEMA)
    return attach_autograd(forward_op, backward_op, runs_on, forward_impl=forward, backward_impl=eager_backward or backward)
