"""The ``"cuda"`` backend's kernels and host code (``csrc/``) compiled for the CPU under
``csrc/emulation/cuda_emulation.h`` (blocks of real threads and barriers, WMMA emulated with its
alignment rules asserted), against the float64 reference: every dtype pairing, odd shapes, strided
operands, ``need_*`` flags, dropout, argument errors. The host code's CUTLASS paths run too, against
``csrc/emulation/cutlass_emulation.h``'s stand-in launchers (the LoRA K-block operands, both W
layouts, fp16's range, the portable fallback after a rejection, the error after a failed launch).
Needs the CUDA toolkit's headers (not a GPU); the build takes tens of seconds.
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


# lora_ops.cpp's kernel choice (a pure function of the device and tensor metadata) and the operands
# of the CUTLASS kernels' LoRA K-blocks (ATen ops on the host) as test ops, fastlora_emu::gemm_path
# (0 portable, 1 sm80, 2 sm90) and fastlora_emu::lora_blocks, so they can be checked on CPU tensors;
# fastlora_emu::configure sets the emulated device's capability and what the stand-in CUTLASS
# launchers do (0 compute, 1 reject, 2 fail to launch), cutlass_counts reads their calls.
_GEMM_PATH_HOOK = """
#include "emulation/launch_count.h"
namespace fastlora {
namespace {
int64_t gemm_path_for_test(int64_t major, int64_t minor, bool sm90a, const at::Tensor& a, const at::Tensor& b_nk,
                           int64_t r, const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  return static_cast<int64_t>(choose_gemm_path(major, minor, sm90a, a, b_nk, r, bias.value_or(at::Tensor()), out));
}
std::tuple<at::Tensor, at::Tensor> lora_blocks_for_test(const at::Tensor& xa, const at::Tensor& l_nr, double scaling,
                                                        at::ScalarType dtype, bool k_major_b) {
  return lora_blocks(xa, l_nr, scaling, dtype, k_major_b, nullptr);
}
void configure_for_test(int64_t major, int64_t minor, int64_t cutlass_mode) {
  auto& s = fastlora_emulation::state();
  s.props.major = static_cast<int>(major);
  s.props.minor = static_cast<int>(minor);
  s.mode = static_cast<fastlora_emulation::CutlassMode>(cutlass_mode);
  for (int i = 0; i < 2; ++i) s.attempts[i] = s.launches[i] = 0;
}
std::vector<int64_t> cutlass_counts_for_test() {
  const auto& s = fastlora_emulation::state();
  return {s.attempts[0], s.attempts[1], s.launches[0], s.launches[1]};
}
int64_t launch_count_for_test() { return emulation::launch_count; }
// One launch of the narrow tensor-core GEMM (lora_narrow.cuh) on w ([U, T] if wide_t_contig, else
// [T, U]) and r ([J, T] if narrow_t_contig, else [T, J]), both with unit inner stride; returns the
// partials [splits, U, J] (j_fastest) or [splits, J, U] and, with col_sum, W's column-sum partials
// [splits, U] (else an empty tensor), all poisoned with NaN before the launch.
std::tuple<at::Tensor, at::Tensor> narrow_gemm_for_test(const at::Tensor& w, const at::Tensor& r, bool wide_t_contig,
                                                        bool narrow_t_contig, int64_t t_per_split, double scale,
                                                        bool j_fastest, bool col_sum) {
  TORCH_CHECK(w.dim() == 2 && r.dim() == 2, "narrow_gemm: w and r must be 2-D");
  TORCH_CHECK(unit_inner_stride(w).data_ptr() == w.data_ptr() && unit_inner_stride(r).data_ptr() == r.data_ptr(),
              "narrow_gemm: w and r must have unit inner stride");
  const int64_t U = w.size(wide_t_contig ? 0 : 1), T_len = w.size(wide_t_contig ? 1 : 0);
  const int64_t J = r.size(narrow_t_contig ? 0 : 1);
  TORCH_CHECK(r.size(narrow_t_contig ? 1 : 0) == T_len, "narrow_gemm: w and r disagree on the reduction depth");
  const int64_t splits = t_per_split > 0 ? ceil_div(T_len, t_per_split) : 1;
  at::Tensor out = at::empty(j_fastest ? std::vector<int64_t>{splits, U, J} : std::vector<int64_t>{splits, J, U},
                             w.options().dtype(at::kFloat));
  out.fill_(NAN);
  at::Tensor sums = at::empty({col_sum ? splits : 0, U}, w.options().dtype(at::kFloat));
  sums.fill_(NAN);
  auto run = [&](auto wt, auto rt) {
    using T = typename decltype(wt)::type;
    using TR = typename decltype(rt)::type;
    NarrowParams<T, TR> p{};
    p.U = U, p.J = J, p.T_len = T_len;
    p.w = ptr<T>(w), p.ldw = w.stride(0), p.r = ptr<TR>(r), p.ldr = r.stride(0);
    p.out = out.mutable_data_ptr<float>(), p.out_split_stride = U * J;
    p.ldo_u = j_fastest ? J : 1, p.ldo_j = j_fastest ? 1 : U;
    p.scale = static_cast<float>(scale), p.t_per_split = t_per_split;
    if (col_sum) p.col_sum = sums.mutable_data_ptr<float>(), p.col_sum_split_stride = U;
    cudaError_t err = cudaErrorInvalidValue;
    if (wide_t_contig) {
      err = narrow_t_contig ? launch_narrow_gemm<true, true>(p, nullptr) : launch_narrow_gemm<true, false>(p, nullptr);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16> && std::is_same_v<TR, float>) {
      TORCH_CHECK(!narrow_t_contig, "narrow_gemm: no (false, true) instantiation");
      err = launch_narrow_gemm<false, false>(p, nullptr);
    } else {
      TORCH_CHECK(false, "narrow_gemm: the reductions' layout is instantiated for bf16 with fp32 only");
    }
    check_launch(err, "narrow_gemm");
  };
  const auto wd = w.scalar_type(), rd = r.scalar_type();
  if (wd == at::kBFloat16 && rd == at::kBFloat16) {
    run(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
  } else if (wd == at::kBFloat16 && rd == at::kFloat) {
    run(Tag<__nv_bfloat16>{}, Tag<float>{});
  } else {
    TORCH_CHECK(wd == at::kHalf && rd == at::kHalf, "narrow_gemm: unsupported dtypes ", wd, ", ", rd);
    run(Tag<__half>{}, Tag<__half>{});
  }
  return {out, sums};
}
}  // namespace
}  // namespace fastlora
TORCH_LIBRARY_FRAGMENT(fastlora_emu, m) {
  m.def("gemm_path(int major, int minor, bool sm90a, Tensor a, Tensor b_nk, int r, Tensor? bias, Tensor out) -> int",
        &fastlora::gemm_path_for_test);
  m.def("lora_blocks(Tensor xa, Tensor l_nr, float scaling, ScalarType dtype, bool k_major) -> (Tensor, Tensor)",
        &fastlora::lora_blocks_for_test);
  m.def("configure(int major, int minor, int cutlass_mode) -> ()", &fastlora::configure_for_test);
  m.def("cutlass_counts() -> int[]", &fastlora::cutlass_counts_for_test);
  m.def("launch_count() -> int", &fastlora::launch_count_for_test);
  m.def("narrow_gemm(Tensor w, Tensor r, bool wide_t_contig, bool narrow_t_contig, int t_per_split, float scale, "
        "bool j_fastest, bool col_sum) -> (Tensor, Tensor)",
        &fastlora::narrow_gemm_for_test);
}
"""


def _emulated_sources(out_dir: Path) -> list[str]:
    """csrc/'s sources rewritten for a host compiler: launches through the emulation, the host file's
    CUDA runtime calls stubbed, its CUTLASS launchers the stand-ins of cutlass_emulation.h, its ops
    registered as CPU kernels of ``fastlora_emu::cuda_*``."""
    sources = []
    # Each kernel file and its launches (kernel<<<grid, block, 0, stream>>>(args)).
    for name, want in {"lora_kernels.cu": 5, "lora_narrow.cu": 1}.items():
        kernels = (CSRC / name).read_text().replace("#include <mma.h>", "")
        kernels, launches = re.subn(
            r"(\w+(?:<[^<>]*>)?)<<<([^;]*?),\s*([^,;]+),\s*0,\s*stream>>>\(([^;]*)\);",
            r"emulation::launch(dim3(\2), dim3(\3), [&] { \1(\4); });",
            kernels,
        )
        assert launches == want, f"{name}'s launches changed: update _emulated_sources"
        target = out_dir / name.replace(".cu", ".cpp")
        target.write_text('#include "emulation/cuda_emulation.h"\n' + kernels)
        sources.append(str(target))
    host = (CSRC / "lora_ops.cpp").read_text()
    for old, new in {
        "#include <ATen/cuda/CUDAContext.h>": "",
        "#include <c10/cuda/CUDAGuard.h>": "",
        '#include "lora_cutlass.cuh"': '#include "emulation/cutlass_emulation.h"',
        "t.is_cuda()": "true",
        "const c10::cuda::CUDAGuard guard(x_in.device());": "",
        "at::cuda::getCurrentCUDAStream()": "nullptr",
        "at::cuda::getCurrentDeviceProperties()": "fastlora_emulation::device_properties()",
        "cudaGetErrorName(": "fastlora_emulation::error_name(",
        "cudaGetErrorString(": "fastlora_emulation::error_string(",
        "TORCH_LIBRARY_IMPL(fastlora, CUDA, m)": "TORCH_LIBRARY_IMPL(fastlora_emu, CPU, m)",
    }.items():
        assert old in host, f"lora_ops.cpp no longer contains {old!r}: update _emulated_sources"
        host = host.replace(old, new)
    assert "GemmPath choose_gemm_path(" in host, "lora_ops.cpp's kernel choice changed: update _emulated_sources"
    # The CUTLASS paths, with the Hopper kernels: the emulated device decides which one runs.
    host = "#define FASTLORA_CUTLASS 1\n#define FASTLORA_SM90A 1\n" + host + _GEMM_PATH_HOOK
    (out_dir / "ops.cpp").write_text(host)
    return [str(out_dir / "ops.cpp"), *sources]


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
    (70, 1100, 24, 6),  # K deep enough for the rank-r GEMMs' split-K (2 splits at 132 SMs)
    (45, 40, 50, 70),  # r over two of the narrow kernel's 64-column blocks, the second one fragment wide
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


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32,) * 2, (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("m", [0, 37])
def test_emulated_need_flags_match_the_torch_backend(emulated, m, dtype, adapter_dtype):
    # bf16 too: its bias gradient rides on grad_B's pass when both are needed, else it is its own.
    x, w, _, A, B = _cpu_inputs(m, 70, 45, 5, dtype, adapter_dtype)
    y, xa = emulated.forward(x, w, None, A, B, 1.5, 0.0, None)
    gy = torch.randn(m, 45).to(dtype)
    for needs in itertools.product([False, True], repeat=4):
        got = emulated.backward(gy, x, xa, w, A, B, 1.5, 0.0, None, *needs)
        want = backend_ops("torch").backward(gy, x, xa, w, A, B, 1.5, 0.0, None, *needs)
        for g, g_ref in zip(got, want):
            assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, needs
            assert rel_error(g, g_ref) <= (1e-5 if dtype == torch.float32 else TOLERANCE[dtype]), needs


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


# The narrow tensor-core GEMM's launches (lora_narrow.cu), with the layouts lora_ops.cpp uses:
# (wide_t_contig, narrow_t_contig, dtype of W, dtype of R). x Aᵀ is (True, True), gy B (True, False),
# the adapter-gradient reductions (False, False).
NARROW_LAYOUTS = [
    *((True, ntc, d, a) for ntc in (True, False) for d, a in [(torch.bfloat16,) * 2, (torch.bfloat16, torch.float32), (torch.float16,) * 2]),
    (False, False, torch.bfloat16, torch.float32),
]
# (U, J, T, t_per_split): one partial tile; several row tiles and two column blocks; one element;
# exactly one full tile; depth 0; r = 1 over many rows; split depth with a partial last split.
NARROW_SHAPES = [(37, 5, 45, 0), (130, 70, 100, 0), (1, 1, 1, 0), (64, 64, 64, 0), (20, 3, 0, 0), (200, 1, 33, 0),
                 (70, 17, 300, 64), (33, 80, 97, 32)]


@pytest.mark.parametrize("shape", NARROW_SHAPES, ids=str)
@pytest.mark.parametrize("layout", NARROW_LAYOUTS, ids=str)
def test_narrow_gemm_matches_float64(emulated, layout, shape):
    wide_t_contig, narrow_t_contig, w_dtype, r_dtype = layout
    u, j, t, t_per_split = shape
    g = torch.Generator().manual_seed(u * 1000 + j * 10 + t)
    w = torch.randn(u, t, generator=g).to(w_dtype)  # W(u, t)
    r = (torch.randn(t, j, generator=g) * 0.3).to(r_dtype)  # R(t, j)
    want = 1.7 * (w.double() @ r.double())
    for j_fastest in (True, False):
        col_sum = not wide_t_contig  # the bias gradient's column sums ride on the reductions' layout
        out, sums = torch.ops.fastlora_emu.narrow_gemm(
            w if wide_t_contig else w.t().contiguous(),
            r.t().contiguous() if narrow_t_contig else r,
            wide_t_contig,
            narrow_t_contig,
            t_per_split,
            1.7,
            j_fastest,
            col_sum,
        )
        splits = -(-t // t_per_split) if t_per_split else 1
        assert out.shape == ((splits, u, j) if j_fastest else (splits, j, u))
        assert not out.isnan().any()  # every partial of every split written
        if col_sum:  # Σ_t W(u, t), unscaled, fp32 sums of exact values
            assert sums.shape == (splits, u) and not sums.isnan().any()
            assert rel_error(sums.sum(0), w.double().sum(1)) <= 1e-5
        got = out.sum(0) if j_fastest else out.sum(0).t()
        if r_dtype == torch.float32:  # R as bf16 hi + lo: fp32-grade, far better than one rounding of R
            rounded_once = 1.7 * (w.double() @ r.to(w_dtype).double())
            assert rel_error(got, want) <= 1e-4
            if t:
                assert rel_error(got, want) <= rel_error(rounded_once, want) / 16
        else:  # fp16/bf16 operands: exact products, fp32 sums
            assert rel_error(got, want) <= 1e-5


@pytest.mark.parametrize("layout", [lay for lay in NARROW_LAYOUTS if lay[3] == torch.float32], ids=str)
def test_narrow_gemm_split_keeps_extremes(emulated, layout):
    # An fp32 R near fp32's maximum must stay finite (rounding hi to bf16 gave inf, and hi + lo =
    # inf − inf = NaN), and an infinite R must give ±inf, as the FMA kernels do.
    wide_t_contig, narrow_t_contig, w_dtype, _ = layout
    w = torch.zeros(20, 32, dtype=w_dtype)  # W(u, t)
    w[:, 0] = 0.5
    w[:, 1] = torch.linspace(-1, 1, 20).to(w_dtype)
    r = torch.zeros(32, 3)  # R(t, j)
    r[0] = torch.tensor([3.4e38, -3.39e38, float("inf")])
    r[1] = torch.tensor([1.0, 2.0, 3.0])
    out, _ = torch.ops.fastlora_emu.narrow_gemm(
        w if wide_t_contig else w.t().contiguous(),
        r.t().contiguous() if narrow_t_contig else r,
        wide_t_contig,
        narrow_t_contig,
        0,
        1.0,
        True,
        False,
    )
    got, want = out[0], w.double() @ r.double()
    assert torch.isfinite(got[:, :2]).all() and rel_error(got[:, :2], want[:, :2]) <= 1e-4
    assert torch.equal(got[:, 2], torch.full((20,), float("inf")))


def test_lora_k_blocks_keep_huge_fp16_columns_in_range(emulated):
    # |s·xa| far beyond fp16's 65504 in some columns (a huge A), ordinary in others: the fp16 operands
    # must stay finite and the K-blocks still carry s·xa·lᵀ to fp32 accuracy (the portable kernel keeps
    # xa in fp32, so the CUTLASS paths must not overflow where it does not).
    m, n, r, scaling = 37, 24, 6, 2.0
    xa = torch.randn(m, r, generator=torch.Generator().manual_seed(3))
    xa[:, ::2] *= 3e5  # columns 0, 2, 4 up to ~2e6
    for adapter_dtype in (torch.float16, torch.float32):
        l_nr = (torch.randn(n, r, generator=torch.Generator().manual_seed(4)) * 1e-3).to(adapter_dtype)
        want = scaling * xa.double() @ l_nr.double().t()
        for k_major in (True, False):
            a_ext, b_ext = torch.ops.fastlora_emu.lora_blocks(xa, l_nr, scaling, torch.float16, k_major)
            assert torch.isfinite(a_ext).all() and torch.isfinite(b_ext).all()
            assert a_ext.abs().max() <= 2.0**14
            b_nk = b_ext if k_major else b_ext.t()
            assert rel_error(a_ext.double() @ b_nk.double().t(), want) <= 1e-4
        # Columns already in range are untouched: the same operands as without any scaling.
        small = xa[:, 1::2].contiguous()
        a_small, b_small = torch.ops.fastlora_emu.lora_blocks(small, l_nr[:, 1::2].contiguous(), scaling, torch.float16, True)
        assert torch.equal(a_small[:, :3], (scaling * small).half())
        assert torch.equal(b_small[:, :3], l_nr[:, 1::2].half())


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_lora_k_blocks_keep_bf16_extremes(emulated, adapter_dtype):
    # s·xa near fp32's maximum must split into finite parts (hi rounded to bf16 was inf, and hi + lo
    # = inf − inf = NaN on the tensor cores), and an infinite s·xa must stay non-finite: ±inf with
    # bf16 adapters; with fp32 ones the term hi(s·xa)·lo(l) is inf·0 = NaN where l is exact in bf16
    # (inherent to the three-part product; an FMA gives inf; either way the output has overflowed).
    xa = torch.tensor([[3.39e38, 1.0], [-3.0e38, 2.0], [float("inf"), 3.0]])
    l_nr = torch.tensor([[0.5, 0.25], [0.25, 1.0]]).to(adapter_dtype)
    for k_major in (True, False):
        a_ext, b_ext = torch.ops.fastlora_emu.lora_blocks(xa, l_nr, 1.0, torch.bfloat16, k_major)
        b_nk = b_ext if k_major else b_ext.t()
        got = a_ext.double() @ b_nk.double().t()
        want = xa.double() @ l_nr.double().t()
        assert torch.isfinite(a_ext[:2]).all() and rel_error(got[:2], want[:2]) <= 1e-4
        if adapter_dtype == torch.bfloat16:
            assert torch.equal(got[2], torch.full((2,), float("inf"), dtype=torch.float64))
        else:
            assert not torch.isfinite(got[2]).any()


# Shapes on the CUTLASS paths' 16-byte contract (K, N multiples of 8): partial 128-tiles, r above
# one K-block's 2r ≤ 64, r = 1.
CUTLASS_SHAPES = [(37, 64, 48, 5), (130, 72, 136, 40), (5, 16, 8, 1)]
DEVICES = {"sm90": ((9, 0), 1), "sm80": ((8, 0), 0), "sm86": ((8, 6), 0)}


@pytest.fixture
def emulated_device(emulated):
    """Sets the emulated device for one test (capability, stand-in CUTLASS mode); back to 7.5 after."""
    yield lambda major, minor, mode=0: torch.ops.fastlora_emu.configure(major, minor, mode)
    torch.ops.fastlora_emu.configure(7, 5, 0)


def _counts():
    attempts80, attempts90, launches80, launches90 = torch.ops.fastlora_emu.cutlass_counts()
    return (attempts80, attempts90), (launches80, launches90)


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("shape", CUTLASS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, adapter_dtype", [(d, a) for d in HALVES for a in (d, torch.float32)], ids=str)
def test_emulated_cutlass_paths_match_reference(emulated, emulated_device, dtype, adapter_dtype, shape, device):
    (major, minor), path = DEVICES[device]
    emulated_device(major, minor)
    m, k, n, r = shape
    gy = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    _check_emulated(emulated, _cpu_inputs(m, k, n, r, dtype, adapter_dtype), 1.7, gy)
    attempts, launches = _counts()
    assert launches[path] == attempts[path] == 2 and launches[1 - path] == 0  # y, then grad_x
    # GPT-2's Conv1D: W stored [K, N], passed transposed; both GEMMs read it in place, in the other layout.
    emulated_device(major, minor)
    x, w, b, A, B = _cpu_inputs(m, k, n, r, dtype, adapter_dtype)
    _check_emulated(emulated, (x, w.t().contiguous().t(), b, A, B), 0.9, gy)
    assert _counts()[1][path] == 2


@pytest.mark.parametrize("dtype", HALVES)
def test_emulated_cutlass_rejection_takes_the_portable_kernel(emulated, emulated_device, dtype):
    emulated_device(9, 0, 1)  # every CUTLASS launcher refuses
    m, k, n, r = CUTLASS_SHAPES[0]
    gy = torch.randn(m, n).to(dtype)
    _check_emulated(emulated, _cpu_inputs(m, k, n, r, dtype, dtype), 1.3, gy)
    attempts, launches = _counts()
    assert attempts == (0, 2) and launches == (0, 0)  # asked twice, computed by the portable kernel


@pytest.mark.parametrize("device", ["sm90", "sm80"])
def test_emulated_cutlass_launch_failure_raises_naming_the_kernel_and_error(emulated, emulated_device, device):
    (major, minor), _ = DEVICES[device]
    emulated_device(major, minor, 2)  # every launch fails as out of resources
    x, w, b, A, B = _cpu_inputs(*CUTLASS_SHAPES[0], torch.bfloat16, torch.bfloat16)
    want = rf"CUTLASS {device} LoRA GEMM \(bf16, W K-major\) kernel \(M=37, N=48, K=64, LoRA depth 16\) failed: cudaErrorLaunchOutOfResources"
    with pytest.raises(RuntimeError, match=want):
        emulated.forward(x, w, b, A, B, 1.0, 0.0, None)


def test_emulated_fp16_cutlass_path_keeps_a_huge_low_rank_product(emulated, emulated_device):
    # s·xa ~ 1e6 (beyond fp16) times a small B: a low-rank term of ~1e3 that fp16 holds. The portable
    # kernel keeps xa in fp32; the CUTLASS path must match it (it gave inf before columns were scaled).
    emulated_device(9, 0)
    g = torch.Generator().manual_seed(11)
    m, k, n, r = 40, 64, 48, 4
    x = (torch.randn(m, k, generator=g) * 30).half()
    w = (torch.randn(n, k, generator=g) * 0.05).half()
    A = (torch.randn(r, k, generator=g) * 3000).half()
    for adapter_dtype in (torch.float16, torch.float32):
        B = (torch.randn(n, r, generator=g) * 2e-4).to(adapter_dtype)
        y, xa = emulated.forward(x, w, None, A.to(adapter_dtype), B, 1.5, 0.0, None)
        assert xa.abs().max() > 1e5
        ref = fastlora.reference.lora_linear(x.double(), w.double(), None, A.double(), B.double(), 1.5)
        assert ref.abs().max() < 6e4 and torch.isfinite(y).all()
        assert rel_error(y, ref) <= TOLERANCE[torch.float16]
    assert _counts()[1] == (0, 2)


# The cuda backend's launch census (issue 20: no ATen kernel around the GEMMs but allocation): what
# one forward and one full backward put on a stream, counted on the emulated build. Host-only ops
# (allocation, views) launch nothing on a GPU; every other ATen op would be a kernel.
_HOST_ONLY_OPS = {"aten::empty", "aten::empty_strided", "aten::t", "aten::transpose", "aten::as_strided"}


def _launch_census(fn):
    """(our kernel launches, CUTLASS launches, the other ATen ops) of one fn() call."""
    kernels, cutlass = torch.ops.fastlora_emu.launch_count(), sum(_counts()[1])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    aten = sorted(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in _HOST_ONLY_OPS)
    return torch.ops.fastlora_emu.launch_count() - kernels, sum(_counts()[1]) - cutlass, aten


# (dtype, adapter dtype): the forward's and the full backward's (kernels, CUTLASS launches, other ATen
# ops) on the sm90 path. Forward: x Aᵀ (narrow), lora_ext, the CUTLASS GEMM. Backward: gy B, lora_ext,
# the CUTLASS grad_x, grad_A's narrow pass, grad_B's narrow pass (the bias column sums riding on it),
# one launch for the three split sums. fp16 adds its column-max reduction before each lora_ext and
# keeps the FMA reductions (row_reduce ×2, column_sum); with fp32 adapters its rank-r passes are
# the portable kernel.
_CENSUS = {
    (torch.bfloat16, torch.bfloat16): ((2, 1, []), (5, 1, [])),
    (torch.bfloat16, torch.float32): ((2, 1, []), (5, 1, [])),
    (torch.float16, torch.float16): ((2, 1, ["aten::linalg_vector_norm"]), (6, 1, ["aten::linalg_vector_norm"])),
    (torch.float16, torch.float32): ((2, 1, ["aten::linalg_vector_norm"]), (6, 1, ["aten::linalg_vector_norm"])),
}


@pytest.mark.parametrize("dtype, adapter_dtype", list(_CENSUS), ids=str)
def test_emulated_launch_census(emulated, emulated_device, dtype, adapter_dtype):
    emulated_device(9, 0)
    x, w, b, A, B = _cpu_inputs(40, 64, 48, 16, dtype, adapter_dtype)
    ops = torch.ops.fastlora_emu
    out = {}
    forward = _launch_census(lambda: out.update(fwd=ops.cuda_forward(x, w, b, A, B, 1.5, 0.0, None)))
    y, xa = out["fwd"]
    gy = torch.randn_like(y)
    backward = _launch_census(
        lambda: out.update(bwd=ops.cuda_backward(gy, x, xa, w, A, B, 1.5, 0.0, None, True, True, True, True))
    )
    assert (forward, backward) == _CENSUS[dtype, adapter_dtype]
    # The counted calls computed the right thing (a census of a broken path would count nothing).
    ref = fastlora.reference.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), 1.5)
    assert rel_error(y, ref) <= TOLERANCE[dtype]
    grad_bias = out["bwd"][3]
    assert rel_error(grad_bias, gy.double().sum(0)) <= TOLERANCE[dtype]


def test_emulated_ops_reject_bad_arguments_clearly(emulated):
    x, w, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32, got Double"):
        emulated.forward(x.double(), w.double(), None, A.double(), B.double(), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[5, 2\], got \[5, 3\]"):
        emulated.forward(x, w, None, A, torch.randn(5, 3), 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs seed"):
        emulated.forward(x, w, None, A, B, 1.0, 0.5, None)

