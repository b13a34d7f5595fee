"""The ``"cuda"`` backend (``csrc/``, ``fastlora._C``): its loader, its kernels emulated, its kernels on a GPU.

CPU-runnable: how ``fastlora._extension`` reports a missing, broken or failed-JIT build (one reason
string, at most one warning, never an exception); where ``fastlora._C`` is built, that its ops carry
the shared schemas beside the Python-registered ops and that their fakes propagate shapes; and the
kernels and host code of ``csrc/`` compiled for the CPU under ``csrc/emulation/cuda_emulation.h``
(blocks of real threads and barriers, WMMA emulated with its alignment rules asserted) against the
float64 reference: every dtype pairing, odd shapes, strided operands, ``need_*`` flags, dropout.

GPU-only (skipped with the backend's reason otherwise): forward and every gradient of
``backend="cuda"`` against the float64 reference on odd shapes, every dtype pairing, strided inputs
and M = 0, with the caching allocator poisoned with NaN first so an unwritten output fails; the
``need_*`` flags; run-to-run determinism; int64 indexing past 2³¹ elements; ``torch.library.opcheck``.
The backend-parametrised tests/test_lora_ops.py and tests/test_dropout.py cover "cuda" as well.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_reference, make_inputs, rel_error

import fastlora
from fastlora import _extension
from fastlora.backends import backend_ops
from fastlora.ops._registry import BACKWARD_SCHEMA, FORWARD_SCHEMA, attach_autograd

CUDA_REASON = fastlora.available_backends()["cuda"]
requires_cuda_backend = pytest.mark.skipif(CUDA_REASON is not None, reason=f"backend='cuda' unavailable: {CUDA_REASON}")
BUILT = importlib.util.find_spec("fastlora._C") is not None
requires_built = pytest.mark.skipif(not BUILT, reason="fastlora._C is not built (see .ci/build_cuda.sh)")
HALVES = [torch.float16, torch.bfloat16]
DTYPE_PAIRS = [(torch.float32, torch.float32), *((d, a) for d in HALVES for a in (d, torch.float32))]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CSRC = Path(__file__).resolve().parents[1] / "csrc"


# ---------------------------------------------------------------- loader (CPU) ----------


def _load_uncached():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = _extension.load_extension.__wrapped__()
    return reason, [w for w in caught if "fastlora" in str(w.message)]


def test_import_emits_no_fastlora_warning_and_reports_cuda():
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, fastlora\n"
        "    backends = fastlora.available_backends()\n"
        "print([str(w.message) for w in caught if 'fastlora' in str(w.message)])\n"
        "print(backends['cuda'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTLORA_JIT_BUILD"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], check=True
    )
    fastlora_warnings, cuda_reason = result.stdout.splitlines()[-2:]
    assert fastlora_warnings == "[]"
    if not torch.cuda.is_available():
        assert "CUDA" in cuda_reason


def test_not_built_is_a_silent_reason_naming_the_fix(monkeypatch):
    monkeypatch.setattr(_extension, "_MODULE", "fastlora._C_not_built_here")
    monkeypatch.delenv("FASTLORA_JIT_BUILD", raising=False)
    reason, warned = _load_uncached()
    assert "is not built" in reason and "FASTLORA_FORCE_CUDA_BUILD=1" in reason and "FASTLORA_JIT_BUILD=1" in reason
    assert warned == []


def test_broken_build_is_one_warning(monkeypatch, tmp_path):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c1017SomethingElse')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_extension, "_MODULE", "brokenpkg._C")
    monkeypatch.delenv("FASTLORA_JIT_BUILD", raising=False)
    reason, warned = _load_uncached()
    assert "failed to load" in reason and "undefined symbol" in reason
    assert len(warned) == 1


def test_failed_jit_build_is_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_MODULE", "fastlora._C_not_built_here")
    monkeypatch.setattr(_extension, "_CSRC", tmp_path)  # no sources: fails before any compiler runs
    monkeypatch.setenv("FASTLORA_JIT_BUILD", "1")
    reason, warned = _load_uncached()
    assert "FASTLORA_JIT_BUILD=1" in reason
    assert len(warned) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_a_device_the_reason_says_so():
    from fastlora.ops.cuda_lora import load_cuda_ops

    reason = load_cuda_ops()
    assert isinstance(reason, str) and "CUDA" in reason


# ---------------------------------------------------------------- build description (CPU) ----------

ROOT = CSRC.parent


def _setup_py(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``setup.py --version`` (which decides on the extension, and builds nothing) under env."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FASTLORA_", "CUTLASS_PATH"))}, **env}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)


def test_build_requirements_pin_cutlass_and_leave_torch_to_the_environment():
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert "nvidia-cutlass==4.2.0.0" in requires
    assert not any(req.startswith("torch") for req in requires)  # must match the runtime torch: --no-build-isolation
    # .ci/build_cuda.sh installs the pin it greps out of pyproject.toml.
    assert re.findall(r'"(nvidia-cutlass==[^"]*)"', (ROOT / "pyproject.toml").read_text()) == ["nvidia-cutlass==4.2.0.0"]


def test_forced_build_that_cannot_build_fails_with_the_reason(tmp_path):
    result = _setup_py({"FASTLORA_FORCE_CUDA_BUILD": "1", "CUTLASS_PATH": str(tmp_path)})
    assert result.returncode != 0
    assert "FASTLORA_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built" in result.stderr
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is not None and CUDA_HOME is not None:  # the first missing piece is CUTLASS
        assert f"CUTLASS_PATH={tmp_path} has no {tmp_path / 'include' / 'cute' / 'tensor.hpp'}" in result.stderr


def test_unforced_build_without_cutlass_installs_the_python_package(tmp_path):
    result = _setup_py({"CUTLASS_PATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == fastlora.__version__
    skipped = _setup_py({"FASTLORA_SKIP_CUDA_BUILD": "1", "FASTLORA_FORCE_CUDA_BUILD": "1", "CUTLASS_PATH": str(tmp_path)})
    assert skipped.returncode == 0  # SKIP wins over FORCE


# ---------------------------------------------------------------- built extension (CPU) ----------


@requires_built
def test_ops_carry_the_shared_schemas_beside_python_ops():
    assert _extension.load_extension() is None
    ops = torch.ops.fastlora
    assert ops.cuda_forward.default._schema == torch._C.parse_schema("fastlora::cuda_forward" + FORWARD_SCHEMA)
    assert ops.cuda_backward.default._schema == torch._C.parse_schema("fastlora::cuda_backward" + BACKWARD_SCHEMA)
    # The Python backends' ops live in the same namespace (torch.library FRAGMENTs).
    assert ops.torch_forward.default._schema.name == "fastlora::torch_forward"


def _cuda_ops():
    """The cuda ops with fakes and autograd attached (by the backend where it loaded, else here)."""
    if CUDA_REASON is None:
        return backend_ops("cuda")
    assert _extension.load_extension() is None
    if not hasattr(_cuda_ops, "attached"):
        _cuda_ops.attached = attach_autograd(
            torch.ops.fastlora.cuda_forward.default, torch.ops.fastlora.cuda_backward.default, runs_on=("cuda",)
        )
    return _cuda_ops.attached


@requires_built
def test_fakes_propagate_shapes():
    # Also checks that the C++ library names the module that registers the fakes (set_python_module).
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = _cuda_ops()
    m, k, n, r = 7, 16, 12, 4
    with FakeTensorMode():
        x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        A = torch.empty(r, k, device="cuda")
        B = torch.empty(n, r, device="cuda")
        y, xa = ops.forward(x, w, None, A, B, 0.5, 0.0, None)
        grads = ops.backward(y, x, xa, w, A, B, 0.5, 0.0, None, True, True, False, True)
    assert (y.shape, y.dtype, xa.shape, xa.dtype) == ((m, n), torch.bfloat16, (m, r), torch.float32)
    assert [(g.shape, g.dtype) for g in grads] == [
        ((m, k), torch.bfloat16),
        ((r, k), torch.float32),
        ((0,), torch.float32),
        ((n,), torch.bfloat16),
    ]


# ---------------------------------------------------------------- kernels, emulated (CPU) ----------


# lora_ops.cpp's kernel choice (a pure function of the device and tensor metadata) and the operands
# of the CUTLASS kernels' LoRA K-blocks (ATen ops on the host) as test ops, fastlora_emu::gemm_path
# (0 portable, 1 sm80, 2 sm90) and fastlora_emu::lora_blocks, so they can be checked on CPU tensors.
_GEMM_PATH_HOOK = """
namespace fastlora {
namespace {
int64_t gemm_path_for_test(int64_t major, int64_t minor, bool sm90a, const at::Tensor& a, const at::Tensor& b_nk,
                           int64_t r, const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  return static_cast<int64_t>(choose_gemm_path(major, minor, sm90a, a, b_nk, r, bias.value_or(at::Tensor()), out));
}
std::tuple<at::Tensor, at::Tensor> lora_blocks_for_test(const at::Tensor& xa, const at::Tensor& l_nr, double scaling,
                                                        at::ScalarType dtype, bool k_major_b) {
  return lora_blocks(xa, l_nr, scaling, dtype, k_major_b);
}
}  // namespace
}  // namespace fastlora
TORCH_LIBRARY_FRAGMENT(fastlora_emu, m) {
  m.def("gemm_path(int major, int minor, bool sm90a, Tensor a, Tensor b_nk, int r, Tensor? bias, Tensor out) -> int",
        &fastlora::gemm_path_for_test);
  m.def("lora_blocks(Tensor xa, Tensor l_nr, float scaling, ScalarType dtype, bool k_major) -> (Tensor, Tensor)",
        &fastlora::lora_blocks_for_test);
}
"""


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
        'm.set_python_module("fastlora.ops._registry");': "",
        "TORCH_LIBRARY(fastlora, m)": "TORCH_LIBRARY(fastlora_emu, m)",
        "TORCH_LIBRARY_IMPL(fastlora, CUDA, m)": "TORCH_LIBRARY_IMPL(fastlora_emu, CPU, m)",
    }.items():
        assert old in host, f"lora_ops.cpp no longer contains {old!r}: update _emulated_sources"
        host = host.replace(old, new)
    assert "GemmPath choose_gemm_path(" in host, "lora_ops.cpp's kernel choice changed: update _emulated_sources"
    host += _GEMM_PATH_HOOK
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
    return attach_autograd(torch.ops.fastlora_emu.cuda_forward.default, torch.ops.fastlora_emu.cuda_backward.default)


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
    (70, 1100, 24, 6),  # K deep enough for the rank-r GEMMs' split-K (3 splits at 132 SMs)
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


@pytest.mark.parametrize("k", [37, 1100], ids=["one-split", "split-K"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_emulated_dropout_matches_the_formula_with_its_mask(emulated, p, k):
    # With identity adapters and no base weight, y = D(x): that reveals the mask a seed draws.
    seed = torch.tensor(1234)
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


PORTABLE, SM80, SM90 = 0, 1, 2


def _path(major, minor, a, b_nk, r=16, bias=None, out=None, sm90a=True):
    out = torch.empty(a.shape[0], b_nk.shape[0], dtype=a.dtype) if out is None else out
    return torch.ops.fastlora_emu.gemm_path(major, minor, sm90a, a, b_nk, r, bias, out)


@pytest.mark.parametrize("dtype", HALVES)
def test_kernel_choice_by_device(emulated, dtype):
    x, w = torch.randn(40, 64).to(dtype), torch.randn(48, 64).to(dtype)
    assert _path(9, 0, x, w) == SM90
    assert _path(9, 0, x, w, sm90a=False) == SM80  # a build without sm_90a has no Hopper kernel
    assert [_path(8, minor, x, w) for minor in (0, 6, 9)] == [SM80] * 3
    assert _path(12, 0, x, w) == SM80
    assert _path(7, 5, x, w) == PORTABLE


def test_kernel_choice_reads_either_weight_layout_in_place(emulated):
    x, w = torch.randn(40, 64).bfloat16(), torch.randn(48, 64).bfloat16()
    conv1d_weight = torch.randn(64, 48).bfloat16()  # GPT-2's Conv1D stores W transposed: [K, N]
    gy = torch.randn(40, 48).bfloat16()
    assert _path(9, 0, x, conv1d_weight.t()) == SM90  # forward, N-major W
    assert _path(9, 0, gy, w.t()) == SM90  # grad_x reads row-major W as an N-major operand
    assert _path(8, 0, gy, conv1d_weight) == SM80
    assert _path(9, 0, x, torch.randn(96, 128).bfloat16()[::2, ::2]) == PORTABLE  # no unit stride at all


def test_kernel_choice_falls_back_off_the_vector_contract(emulated):
    bf = torch.bfloat16
    x, w = torch.randn(40, 64, dtype=bf), torch.randn(48, 64, dtype=bf)
    assert _path(9, 0, x.float(), w.float()) == PORTABLE  # fp32
    assert _path(9, 0, torch.randn(40, 60, dtype=bf), torch.randn(48, 60, dtype=bf)) == PORTABLE  # K % 8
    assert _path(9, 0, x, torch.randn(44, 64, dtype=bf)) == PORTABLE  # N % 8
    assert _path(9, 0, torch.randn(40, 72, dtype=bf)[:, 1:65], w) == PORTABLE  # 2-byte-offset base pointer
    assert _path(9, 0, torch.randn(40, 68, dtype=bf)[:, :64], w) == PORTABLE  # row stride 68: rows misaligned
    assert _path(9, 0, torch.randn(40, 72, dtype=bf)[:, :64], w) == SM90  # row stride 72: a padded view is fine
    assert _path(9, 0, torch.randn(1, 64, dtype=bf).expand(40, 64), w) == PORTABLE  # row stride 0
    assert _path(9, 0, x, w, r=0) == PORTABLE
    assert _path(9, 0, torch.randn(40, 0, dtype=bf), torch.randn(48, 0, dtype=bf)) == PORTABLE  # K = 0
    bias = torch.randn(49, dtype=bf)
    assert _path(9, 0, x, w, bias=bias[:48]) == SM90
    assert _path(9, 0, x, w, bias=bias[1:]) == PORTABLE  # misaligned bias
    assert _path(9, 0, x, w, out=torch.empty(40, 56, dtype=bf)[:, :48]) == SM90
    assert _path(9, 0, x, w, out=torch.empty(40, 52, dtype=bf)[:, :48]) == PORTABLE


@pytest.mark.parametrize("k_major", [True, False], ids=["K-major", "N-major"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(d, a) for d in HALVES for a in (d, torch.float32)], ids=str)
@pytest.mark.parametrize("r", [1, 5, 16, 40])
def test_lora_k_blocks_carry_the_low_rank_term_to_fp32_accuracy(emulated, r, dtype, adapter_dtype, k_major):
    # The CUTLASS kernels add a_ext · b_extᵀ to the base product on tensor cores (fp16/bf16 inputs,
    # exact products, fp32 sums): that must equal s · xa · lᵀ far better than one rounding of s·xa.
    m, n, scaling = 37, 24, 1.7
    xa = torch.randn(m, r) * 3
    l_nr = (torch.randn(n, r) * 0.1).to(adapter_dtype)
    a_ext, b_ext = torch.ops.fastlora_emu.lora_blocks(xa, l_nr, scaling, dtype, k_major)
    depth = a_ext.shape[1]
    assert a_ext.dtype == b_ext.dtype == dtype and depth % 8 == 0 and depth >= 2 * r
    assert a_ext.is_contiguous() and b_ext.is_contiguous()  # the kernels read both in place
    b_nk = b_ext if k_major else b_ext.t()
    assert b_nk.shape == (n, depth)
    want = scaling * xa.double() @ l_nr.double().t()
    got = a_ext.double() @ b_nk.double().t()
    rounded_once = (scaling * xa).to(dtype).double() @ l_nr.to(dtype).double().t()
    assert rel_error(got, want) <= rel_error(rounded_once, want) / 16
    assert rel_error(got, want) <= 1e-4


def test_emulated_ops_reject_bad_arguments_clearly(emulated):
    x, w, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32, got Double"):
        emulated.forward(x.double(), w.double(), None, A.double(), B.double(), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[5, 2\], got \[5, 3\]"):
        emulated.forward(x, w, None, A, torch.randn(5, 3), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs seed"):
        emulated.forward(x, w, None, A, B, 1.0, 0.5, None)


# ---------------------------------------------------------------- kernels (GPU) ----------


@pytest.fixture
def nan_cache():
    """Leave NaN-filled blocks in both pools of the caching allocator, where outputs get allocated."""
    torch.cuda.empty_cache()
    blocks = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(16)]  # small pool
    blocks += [torch.full((1 << 24,), float("nan"), device="cuda") for _ in range(4)]  # large pool
    del blocks
    yield


SCALING = 2.0
SHAPES_KN = [(16, 24), (70, 45), (4096, 45), (16, 4096), (70, 4096)]


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("r", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("k, n", SHAPES_KN, ids=[f"k{k}-n{n}" for k, n in SHAPES_KN])
@pytest.mark.parametrize("m", [0, 1, 37, 1000])
def test_odd_shapes_bf16(m, k, n, r):
    check_against_reference(make_inputs(m, k, n, r, torch.bfloat16, "cuda"), SCALING, "cuda")


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("x_noncontiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("shape", [(37, 70, 45, 5), (1000, 4096, 4096, 16)], ids=str)
def test_dtypes_bias_and_strides(shape, dtype, adapter_dtype, bias, x_noncontiguous):
    m, k, n, r = shape
    inputs = make_inputs(
        m, k, n, r, dtype, "cuda", bias=bias, adapter_dtype=adapter_dtype, x_noncontiguous=x_noncontiguous
    )
    check_against_reference(inputs, SCALING, "cuda")


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("conv1d_weight", [False, True], ids=["row-major-W", "transposed-W"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(d, a) for d, a in DTYPE_PAIRS if d != torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1000, 512, 384, 5), (257, 4096, 1024, 16), (64, 64, 64, 256), (1, 8, 8, 1)], ids=str)
def test_cutlass_paths_both_weight_layouts(shape, dtype, adapter_dtype, conv1d_weight):
    # Shapes on the 16-byte vector contract, so the CUTLASS kernels run (sm90 on an H100, sm80 on
    # other Ampere-or-newer parts): partial tiles, r not a multiple of 8, r = 256 (several LoRA K-blocks).
    m, k, n, r = shape
    x, w, b, A, B = make_inputs(m, k, n, r, dtype, "cuda", adapter_dtype=adapter_dtype)
    if conv1d_weight:  # GPT-2's Conv1D hands over weight.t(): [N, K] with strides (1, N)
        w = w.t().contiguous().t()
    check_against_reference((x, w, b, A, B), SCALING, "cuda")


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
def test_row_broadcast_gradient_is_read_in_place():
    # d(Σ_n v_n Σ_m y_mn)/dy is v expanded over rows (sum's backward): a gy with row stride 0, which
    # the kernels read in place.
    x, w, b, A, B = make_inputs(37, 70, 45, 5, torch.bfloat16, "cuda")
    v = torch.randn(45, device="cuda", dtype=torch.bfloat16)
    out = fastlora.lora_linear(x, w, b, A, B, SCALING, backend="cuda")
    grads = torch.autograd.grad(out.sum(0).mul(v).sum(), (x, A, B))
    args64 = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    ref = fastlora.reference.lora_linear(*args64, SCALING).sum(0).mul(v.double()).sum()
    grads64 = torch.autograd.grad(ref, (args64[0], args64[3], args64[4]))
    for g, g64 in zip(grads, grads64):
        assert rel_error(g, g64) <= 1e-2


@requires_cuda_backend
@pytest.mark.usefixtures("nan_cache")
@pytest.mark.parametrize("m", [0, 37])
@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, True, False, False), (False, False, True, True), (True, True, True, True)],
    ids=str,
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backward_flags_match_the_torch_backend(m, needs, dropout_p):
    # With dropout the two backends draw different masks, so only the mask-free grads are compared.
    x, w, _, A, B = (t.detach() if t is not None else None for t in make_inputs(m, 70, 45, 5, torch.float32, "cuda"))
    seed = torch.tensor(1234) if dropout_p else None
    cuda, ref = backend_ops("cuda"), backend_ops("torch")
    y, xa = cuda.forward(x, w, None, A, B, SCALING, dropout_p, seed)
    assert y.shape == (m, 45) and xa.shape == (m, 5) and xa.dtype == torch.float32
    gy = torch.randn(m, 45, device="cuda")
    got = cuda.backward(gy, x, xa, w, A, B, SCALING, dropout_p, seed, *needs)
    want = ref.backward(gy, x, xa, w, A, B, SCALING, dropout_p, seed, *needs)
    comparable = (dropout_p == 0, dropout_p == 0, True, True)  # grad_B reads xa; grad_bias has no mask
    for name, g, g_ref, needed, same_mask in zip(("x", "A", "B", "bias"), got, want, needs, comparable):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        if not needed:
            assert g.numel() == 0, name
        elif same_mask:
            assert not g.isnan().any() and rel_error(g, g_ref) <= 1e-5, name


@requires_cuda_backend
def test_results_are_bitwise_reproducible():
    inputs = make_inputs(1000, 4096, 512, 16, torch.bfloat16, "cuda")
    runs = []
    for _ in range(2):
        out = fastlora.lora_linear(*inputs, SCALING, backend="cuda")
        runs.append([out, *torch.autograd.grad(out.float().square().sum(), [inputs[i] for i in (0, 2, 3, 4)])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_cuda_backend
def test_int64_indexing_past_2_to_the_31_elements():
    m, k, n, r = (1 << 20) + 7, 2048, 64, 8  # x has 2.15e9 > 2^31 elements
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs about 20 GB of GPU memory")
    x, w, b, A, B = make_inputs(m, k, n, r, torch.bfloat16, "cuda")
    out = fastlora.lora_linear(x, w, b, A, B, SCALING, backend="cuda")
    gy = torch.randn_like(out)
    grad_x, grad_A = torch.autograd.grad(out, (x, A), gy)
    tail = slice(m - 300, m)  # rows whose offsets exceed 2^31
    args64 = [t.detach().double().requires_grad_() for t in (x[tail], w, b, A, B)]
    ref = fastlora.reference.lora_linear(*args64, SCALING)
    (ref_grad_x,) = torch.autograd.grad(ref, args64[0], gy[tail].double())
    assert rel_error(out[tail], ref) <= 1e-2
    assert rel_error(grad_x[tail], ref_grad_x) <= 1e-2
    # grad_A = scaling · (gy B)ᵀ x over all rows, in float64 chunks.
    ref_grad_A = torch.zeros(r, k, dtype=torch.float64, device="cuda")
    for rows in torch.arange(m, device="cuda").split(1 << 16):
        g_xa = gy[rows].double() @ B.detach().double()
        ref_grad_A += SCALING * g_xa.t() @ x.detach()[rows].double()
    assert rel_error(grad_A, ref_grad_A) <= 1e-2


@requires_cuda_backend
@pytest.mark.parametrize(
    "dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=str
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(dtype, adapter_dtype, dropout_p):
    ops = backend_ops("cuda")
    x, w, b, A, B = make_inputs(9, 16, 12, 4, dtype, "cuda", adapter_dtype=adapter_dtype)
    seed = torch.tensor(7) if dropout_p else None
    torch.library.opcheck(ops.forward, (x.detach(), w, b.detach(), A.detach(), B.detach(), 0.5, dropout_p, seed))
    torch.library.opcheck(
        ops.forward, (x, w, b, A, B, 0.5, dropout_p, seed), test_utils=("test_schema", "test_autograd_registration")
    )
    gy = torch.randn(9, 12, device="cuda", dtype=dtype)
    xa = torch.randn(9, 4, device="cuda")
    args = (gy, x.detach(), xa, w, A.detach(), B.detach(), 0.5, dropout_p, seed, True, True, True, True)
    torch.library.opcheck(ops.backward, args)
