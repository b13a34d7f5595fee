"""The ``"cuda"`` backend's kernels and host code (``csrc/``) compiled for the CPU under
``csrc/emulation/cuda_emulation.h`` (blocks of real threads and barriers, WMMA emulated with its
alignment rules asserted), against the float64 reference: every dtype pairing, odd shapes, strided
operands, ``need_*`` flags, dropout, argument errors. Needs the CUDA toolkit's headers (not a GPU);
the build takes tens of seconds.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora._tolerance import TOLERANCE, rel_error
from fastlora.ops._contract import attach_autograd, define_ops
from fastlora.ops.registry import backend_ops

pytestmark = pytest.mark.slow

HALVES = [torch.float16, torch.bfloat16]
DTYPE_PAIRS = [(torch.float32, torch.float32), *((d, a) for d in HALVES for a in (d, torch.float32))]
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _emulated_sources(out_dir: Path) -> list[str]:
    """csrc/'s sources rewritten for a host compiler: launches through the emulation, the host file's
    CUDA runtime calls stubbed, its ops registered as CPU kernels of ``fastlora_emu::cuda_*``."""
    kernels = (CSRC / "lora_kernels.cu").read_text().replace("#include <mma.h>", "")
    kernels, launches = re.subn(
        r"(\w+(?:<[^<>]*>)?)<<<([^;]*?),\s*([^,;]+),\s*0,\s*stream>>>\(([^;]*)\);",
        r"emulation::launch(dim3(\2), dim3(\3), [&] { \1(\4); });",
        kernels,
    )
    assert launches == 4, "lora_kernels.cu's launches changed: update _emulated_sources"
    host = (CSRC / "lora_ops.cpp").read_text()
    for old, new in {
        "#include <ATen/cuda/CUDAContext.h>": "",
        "#include <c10/cuda/CUDAException.h>": "#define C10_CUDA_CHECK(expr) (void)(expr)",
        "#include <c10/cuda/CUDAGuard.h>": "",
        "t.is_cuda()": "true",
        "const c10::cuda::CUDAGuard guard(x_in.device());": "",
        "at::cuda::getCurrentCUDAStream()": "nullptr",
        "at::cuda::getCurrentDeviceProperties()->multiProcessorCount": "132",  # an H100's split counts
        "TORCH_LIBRARY_IMPL(fastlora, CUDA, m)": "TORCH_LIBRARY_IMPL(fastlora_emu, CPU, m)",
    }.items():
        assert old in host, f"lora_ops.cpp no longer contains {old!r}: update _emulated_sources"
        host = host.replace(old, new)
    (out_dir / "kernels.cpp").write_text('#include "emulation/cuda_emulation.h"\n' + kernels)
    (out_dir / "ops.cpp").write_text(host)
    return [str(out_dir / "ops.cpp"), str(out_dir / "kernels.cpp")]


def _cuda_include_dirs() -> list[str]:
    """The CUDA toolkit's include directory (cuda_fp16.h and friends), if a toolkit is installed."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    roots = [CUDA_HOME, os.environ.get("CUDA_HOME"), nvcc and Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    found = [Path(root) / "include" for root in roots if root]
    found = [d for d in found if (d / "cuda_fp16.h").is_file() and (d / "crt" / "host_defines.h").is_file()]
    return [str(found[0])] if found else []


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """csrc/ built for the CPU under the CUDA emulation: ops with the cuda backend's fakes and autograd."""
    from torch.utils.cpp_extension import load

    include_dirs = _cuda_include_dirs()
    if not include_dirs:
        pytest.skip("no CUDA toolkit headers to compile the emulation against")
    build_dir = tmp_path_factory.mktemp("cuda_emulation")
    load(
        name="fastlora_emu",
        sources=_emulated_sources(build_dir),
        extra_cflags=[
            "-O2",
            "-pthread",
            "-Wno-unknown-pragmas",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ],
        extra_ldflags=["-pthread"],
        extra_include_paths=[str(CSRC), *include_dirs],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    return attach_autograd(*define_ops("fastlora_emu", "cuda"))


def _cpu_inputs(m, k, n, r, dtype, adapter_dtype, *, bias=True, pad=0):
    """Random CPU inputs; with ``pad``, every 2-D operand is a row slice of a wider buffer (row stride
    > row length, inner stride 1: read in place)."""
    g = torch.Generator().manual_seed(1000 * m + 10 * k + n + r)

    def rand(rows, cols, std, dt):
        return (torch.randn(rows, cols + pad, generator=g) * std).to(dt)[:, :cols]

    x = rand(m, k, 1.0, dtype)
    w = rand(n, k, max(k, 1) ** -0.5, dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    A = rand(r, k, max(k, 1) ** -0.5, adapter_dtype)
    B = rand(n, r, r**-0.5, adapter_dtype)
    return x, w, b, A, B


def _check_emulated(ops, inputs, scaling, gy):
    """Forward (y and xa) and every gradient of the emulated ops vs the float64 reference."""
    x, w, b, A, B = inputs
    tol = TOLERANCE[x.dtype]
    leaves = [t.requires_grad_() for t in (x, b, A, B) if t is not None]
    y, xa = ops.forward(x, w, b, A, B, scaling, 0.0, None)
    args64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = fastlora.reference.lora_linear(*args64, scaling)
    assert y.dtype == x.dtype and xa.dtype == torch.float32
    assert rel_error(y, ref) <= tol
    assert rel_error(xa, args64[0].detach() @ args64[3].detach().t()) <= tol
    grads = torch.autograd.grad(y, leaves, gy)
    grads64 = torch.autograd.grad(ref, [t for t in args64 if t is not None and t.requires_grad], gy.double())
    for leaf, g, g64 in zip(leaves, grads, grads64):
        assert g.dtype == leaf.dtype and rel_error(g, g64) <= tol


# (M, K, N, r): one tile and several, every edge partial, M = 0 and 1, K = 0, r above one rank chunk
# (16), and M = 1000 for three split-M partials.
EMULATED_SHAPES = [
    (37, 70, 45, 5),
    (1, 16, 24, 1),
    (0, 16, 24, 4),
    (65, 33, 130, 20),
    (130, 100, 64, 17),
    (3, 5, 7, 2),
    (4, 0, 8, 2),
    (1000, 40, 30, 3),
]


@pytest.mark.parametrize("shape", EMULATED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPE_PAIRS, ids=str)
def test_emulated_kernels_match_reference(emulated, dtype, adapter_dtype, shape):
    m, k, n, r = shape
    gy = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    _check_emulated(emulated, _cpu_inputs(m, k, n, r, dtype, adapter_dtype), 1.7, gy)


@pytest.mark.parametrize("dtype, adapter_dtype", DTYPE_PAIRS, ids=str)
def test_emulated_kernels_read_strided_operands_in_place(emulated, dtype, adapter_dtype):
    inputs = _cpu_inputs(37, 70, 45, 5, dtype, adapter_dtype, bias=False, pad=13)
    gy = torch.randn(37, 45 + 3).to(dtype)[:, :45]
    _check_emulated(emulated, inputs, 0.7, gy)
    # A gradient broadcast over rows (row stride 0), and an x whose inner stride is not 1 (copied).
    x, w, b, A, B = _cpu_inputs(37, 70, 45, 5, dtype, adapter_dtype)
    x = torch.randn(37, 140).to(dtype)[:, ::2]
    _check_emulated(emulated, (x, w, b, A, B), 0.7, torch.randn(45).to(dtype).expand(37, 45))


@pytest.mark.parametrize("m", [0, 37])
def test_emulated_need_flags_match_the_torch_backend(emulated, m):
    x, w, _, A, B = _cpu_inputs(m, 70, 45, 5, torch.float32, torch.float32)
    y, xa = emulated.forward(x, w, None, A, B, 1.5, 0.0, None)
    gy = torch.randn(m, 45)
    for needs in itertools.product([False, True], repeat=4):
        got = emulated.backward(gy, x, xa, w, A, B, 1.5, 0.0, None, *needs)
        want = backend_ops("torch").backward(gy, x, xa, w, A, B, 1.5, 0.0, None, *needs)
        for g, g_ref in zip(got, want):
            assert g.shape == g_ref.shape and g.dtype == g_ref.dtype and rel_error(g, g_ref) <= 1e-5, needs


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_emulated_dropout_matches_the_formula_with_its_mask(emulated, p):
    # With identity adapters and no base weight, y = D(x): that reveals the mask a seed draws.
    k, seed = 37, torch.tensor(1234)
    x = torch.rand(45, k, dtype=torch.float64).add_(0.5).float()
    eye = torch.eye(k)
    y, _ = emulated.forward(x, torch.zeros(k, k), None, eye, eye, 1.0, p, seed)
    keep = (y != 0).double()
    assert torch.allclose(y[y != 0], x[y != 0] / (1 - p), rtol=1e-5)
    assert abs(keep.mean().item() - (1 - p)) < 0.05
    for dtype, adapter_dtype in DTYPE_PAIRS:
        x, w, b, A, B = (t.requires_grad_() for t in _cpu_inputs(45, k, 29, 6, dtype, adapter_dtype))
        y, _ = emulated.forward(x, w, b, A, B, 1.5, p, seed)
        x64, w64, b64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, w, b, A, B))
        ref = F.linear(x64, w64, b64) + 1.5 * F.linear(F.linear(x64 * keep / (1 - p), A64), B64)
        assert rel_error(y, ref) <= TOLERANCE[dtype]
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, b, A, B), gy)
        grads64 = torch.autograd.grad(ref, (x64, b64, A64, B64), gy.double())
        for g, g64 in zip(grads, grads64):
            assert rel_error(g, g64) <= TOLERANCE[dtype]


def test_emulated_ops_reject_bad_arguments_clearly(emulated):
    x, w, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32, got Double"):
        emulated.forward(x.double(), w.double(), None, A.double(), B.double(), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[5, 2\], got \[5, 3\]"):
        emulated.forward(x, w, None, A, torch.randn(5, 3), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs seed"):
        emulated.forward(x, w, None, A, B, 1.0, 0.5, None)

