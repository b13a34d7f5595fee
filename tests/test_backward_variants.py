"""The Triton backward's two variants (issue 20: "fused", grad_B reduced inside the gy pass at small
grad_x tiles, and "split", the gy pass at full tiles plus a grouped reduction) and the measured
choice between them (``_triton_backward_variants``).

Each variant against the float64 formula on fresh random inputs, every buffer poisoned with NaN
first: odd sizes, M = 1 and M = 0, r = 1 to 64, bias or not, LoRA dropout (its mask recovered from
the forward's ``xa`` with identity adapters), fp32, bf16 and fp32 adapters on bf16, and for the fused
one several row slices. Then the split variant's launches (3, no memset, no other ATen op), and the
chooser with a fake benchmark: it picks the faster, caches it per key, measures under the launch
lock once, returns what one call returns, leaves out a variant that fails, refuses to time inside
a (simulated) CUDA-graph capture, and rejects an unknown FASTLORA_TRITON_BACKWARD.
"""

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import poisoned, rel_error, spy_on_launches, tolerance  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora.census.counting import op_kind

triton_lora = pytest.importorskip("fastlora.ops.triton_lora")
from fastlora.ops import _triton_backward_variants as variants  # noqa: E402
from fastlora.ops import _triton_common  # noqa: E402

if not triton_lora.INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend runs on the CPU only under the interpreter", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENV = variants.ENV
SCALING = 1.5
SPLIT_KERNELS = ["_lora_gemm_kernel", "_grouped_reduce_kernel", "_finalize_kernel"]
FUSED_KERNELS = ["_lora_gemm_kernel", "_lora_reduce_kernel", "_finalize_kernel"]


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    variants.clear()
    yield
    variants.clear()


def _problem(m, k, n, r, dtype, adapter_dtype=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    x, gy = rand(m, k), rand(m, n)
    w = rand(n, k, scale=k**-0.5)
    b = rand(n) if bias else None
    A, B = rand(r, k, scale=k**-0.5, dt=adapter_dtype), rand(n, r, scale=r**-0.5, dt=adapter_dtype)
    return x, w, b, A, B, gy


def _keep_mask(m, k, p, seed):
    """The dropout keep mask (float64 0/1) the forward draws for an x of [m, k]: with A = I its xa is D(x)."""
    if m == 0:
        return torch.ones(0, k, dtype=torch.float64)
    ones, eye = torch.ones(m, k, device=DEVICE), torch.eye(k, device=DEVICE)
    _, xa = triton_lora.triton_forward(ones, torch.zeros(1, k, device=DEVICE), None, eye, eye[:1].t(), 1.0, p, seed)
    return (xa != 0).double().cpu()


def _reference_grads(x, w, b, A, B, gy, p, keep):
    """grad_x, grad_A, grad_B, grad_bias of y = x Wᵀ + b + scaling·(D(x) Aᵀ) Bᵀ in float64."""
    x64, w64, A64, B64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, A, B))
    b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
    dropped = x64 * keep / (1 - p) if p else x64
    y = F.linear(x64, w64, b64) + SCALING * F.linear(F.linear(dropped, A64), B64)
    wanted = [x64, A64, B64] + ([b64] if b is not None else [])
    return torch.autograd.grad(y, wanted, gy.double().cpu())


def _check_variant(variant, m, k, n, r, dtype, adapter_dtype, bias, p, monkeypatch, launches=None):
    monkeypatch.setenv(ENV, variant)
    x, w, b, A, B, gy = _problem(m, k, n, r, dtype, adapter_dtype, bias, seed=m + k + n + r)
    seed = torch.tensor(1234)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, p, seed)
    if launches is not None:
        launches.clear()
    got = triton_lora.triton_backward(gy, x, xa, w, A, B, SCALING, p, seed, True, True, True, bias)
    launched = list(launches) if launches is not None else None  # (before _keep_mask's forward)
    want = _reference_grads(x, w, b, A, B, gy, p, _keep_mask(m, k, p, seed) if p else None)
    tol = tolerance(dtype, DEVICE)
    names = ["x", "lora_A", "lora_B", "bias"]
    for name, g, g64, like in zip(names, got, want, [x, A, B, b]):
        assert g.shape == g64.shape and g.dtype == like.dtype, name
        assert rel_error(g.cpu(), g64) <= tol, f"{variant} grad {name}: {rel_error(g.cpu(), g64):.3e} > {tol}"
    return launched


# (m, k, n, r, dropout): sizes that are multiples of no block size, M = 1, r = 1 to 64; dropout on
# the middle one (interpreter time).
CASES = [(1, 45, 67, 1, 0.0), (37, 67, 45, 16, 0.0), (150, 33, 29, 64, 0.0), (37, 67, 45, 16, 0.25)]
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("variant", variants.VARIANTS)
@pytest.mark.parametrize("m, k, n, r, p", CASES, ids=str)
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_variant_against_float64(variant, m, k, n, r, p, dtype, adapter_dtype, bias, monkeypatch):
    _check_variant(variant, m, k, n, r, dtype, adapter_dtype, bias, p, monkeypatch)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("variant", variants.VARIANTS)
def test_variant_with_no_rows(variant, monkeypatch):
    _check_variant(variant, 0, 24, 40, 3, torch.float32, None, True, 0.0, monkeypatch)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES, ids=str)
def test_fused_variant_over_several_row_slices(dtype, adapter_dtype, monkeypatch):
    monkeypatch.setattr(triton_lora, "_MIN_PARTIAL_BLOCKS", 1)
    monkeypatch.setattr(triton_lora, "_MAX_PARTIAL_BYTES", 4 * 40 * 6)  # one 64-row block a slice: 4 slices
    launches = spy_on_launches(monkeypatch)
    launched = _check_variant("fused", 200, 48, 40, 6, dtype, adapter_dtype, True, 0.25, monkeypatch, launches)
    assert launched.count("_lora_gemm_kernel") == 4 and len(launched) == 2 * 4 + 1


class _Census(TorchDispatchMode):
    """ATen ops by kind (``op_kind``), leaving out those made while a kernel runs (``paused.depth``)."""

    def __init__(self, paused):
        super().__init__()
        self.paused, self.kinds = paused, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(self.paused, "depth", 0):
            self.kinds.append(op_kind(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "need, kernels",
    [("xABb", SPLIT_KERNELS), ("ABb", SPLIT_KERNELS), ("B", SPLIT_KERNELS[1:]), ("b", SPLIT_KERNELS[1:])],
)
def test_split_variant_launches(need, kernels, monkeypatch):
    if not triton_lora.INTERPRET:
        pytest.skip("the launch spy needs TRITON_INTERPRET=1")
    monkeypatch.setenv(ENV, "split")
    x, w, b, A, B, gy = _problem(70, 40, 72, 4, torch.bfloat16)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, 0.25, torch.tensor(3))
    state = threading.local()
    launches = spy_on_launches(monkeypatch, during_launch=state)
    census = _Census(state)
    with census:
        grads = triton_lora.triton_backward(
            gy, x, xa, w, A, B, SCALING, 0.25, torch.tensor(3), "x" in need, "A" in need, "B" in need, "b" in need
        )
    assert launches == kernels
    assert [k for k in census.kinds if k in ("memset", "compute", "scalar")] == []
    assert all(g.numel() == 0 or torch.isfinite(g).all() for g in grads)


def test_split_variant_reruns_are_bit_identical(monkeypatch):
    monkeypatch.setenv(ENV, "split")
    x, w, b, A, B, gy = _problem(150, 48, 40, 6, torch.bfloat16, torch.float32)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, 0.25, torch.tensor(5))
    args = (gy, x, xa, w, A, B, SCALING, 0.25, torch.tensor(5), True, True, True, True)
    for first, again in zip(triton_lora.triton_backward(*args), triton_lora.triton_backward(*args), strict=True):
        assert torch.equal(first, again)


def test_default_without_timing_is_fused(monkeypatch):
    if not triton_lora.INTERPRET:
        pytest.skip("a GPU measures")
    launches = spy_on_launches(monkeypatch)
    x, w, b, A, B, gy = _problem(37, 24, 40, 3, torch.float32)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, 0.0, None)
    launches.clear()
    triton_lora.triton_backward(gy, x, xa, w, A, B, SCALING, 0.0, None, True, True, True, True)
    assert launches == FUSED_KERNELS
    assert variants.chosen() == {}  # nothing measured


@pytest.mark.parametrize("value", ["fast", "Fused", "none"])
def test_unknown_override_is_rejected(value, monkeypatch):
    monkeypatch.setenv(ENV, value)
    x, w, b, A, B, gy = _problem(5, 16, 16, 2, torch.float32)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, 0.0, None)
    with pytest.raises(ValueError, match=f"{ENV}=.*expected one of fused, split, auto"):
        triton_lora.triton_backward(gy, x, xa, w, A, B, SCALING, 0.0, None, True, True, True, True)


def _fake_bench(monkeypatch, ms, timed=None):
    """``_time_variant`` returning ``ms[variant]`` for a ``run`` that returns its variant (``_run``)."""

    def fake(call):
        variant = call()
        if timed is not None:
            timed.append(variant)
        return ms[variant]

    monkeypatch.setattr(variants, "_time_variant", fake)


def _run(record=None):
    def run(variant):
        if record is not None:
            record.append(variant)
        return variant

    return run


@pytest.mark.parametrize("faster", variants.VARIANTS)
def test_chooser_picks_the_faster_and_caches_it_per_key(faster, monkeypatch):
    ms = {"fused": 2.0, "split": 3.0} if faster == "fused" else {"fused": 3.0, "split": 1.5}
    timed, runs = [], []
    _fake_bench(monkeypatch, ms, timed)
    run = _run(runs)
    device = torch.device(DEVICE)
    assert variants.choose(("key", 1), device, run) == faster
    assert sorted(timed) == ["fused", "split"] and sorted(set(runs)) == ["fused", "split"]
    runs.clear()
    assert variants.choose(("key", 1), device, run) == faster
    assert runs == []  # cached: nothing runs again
    assert variants.chosen()[("key", 1)] == (faster, ms)
    ms["fused"], ms["split"] = ms["split"], ms["fused"]
    assert variants.choose(("key", 2), device, run) != faster  # another key is measured for itself


def test_chooser_measures_a_key_once_across_threads(monkeypatch):
    timed = []

    def slow(call):
        call()
        timed.append(1)
        time.sleep(0.05)
        return 1.0

    monkeypatch.setattr(variants, "_time_variant", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(variants.choose(("k",), torch.device(DEVICE), _run())))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["fused"] * 4 and len(timed) == 2  # one measurement (a tie keeps "fused")


def test_chooser_leaves_out_a_variant_that_fails(monkeypatch):
    _fake_bench(monkeypatch, {"fused": 5.0, "split": 1.0})

    def run(variant):
        if variant == "split":
            raise RuntimeError("out of resources")
        return variant

    with pytest.warns(RuntimeWarning, match="out of resources"):
        assert variants.choose(("k",), torch.device(DEVICE), run) == "fused"


def test_chooser_runs_the_default_when_no_variant_can_be_timed(monkeypatch):
    """Both variants run but their timing fails (e.g. out of memory for the benchmark's cache flush):
    the default, untimed, with a warning, kept for the key; a variant that cannot run at all is not
    picked."""

    def no_bench(call):
        raise RuntimeError("CUDA out of memory in the L2 flush buffer")

    monkeypatch.setattr(variants, "_time_variant", no_bench)
    runs = []
    with pytest.warns(RuntimeWarning, match="could not be timed"):
        assert variants.choose(("t",), torch.device(DEVICE), lambda v: runs.append(v)) == variants.UNTIMED_DEFAULT
    assert runs == ["fused", "split"]
    assert variants.choose(("t",), torch.device(DEVICE), lambda v: runs.append(v)) == variants.UNTIMED_DEFAULT
    assert runs == ["fused", "split"]  # decided: nothing timed again

    def fused_broken(variant):
        if variant == "fused":
            raise RuntimeError("fused cannot run")

    with pytest.warns(RuntimeWarning, match="could not be timed"):
        assert variants.choose(("u",), torch.device(DEVICE), fused_broken) == "split"
    with pytest.raises(RuntimeError, match="every Triton backward variant failed"):
        variants.choose(("v",), torch.device(DEVICE), lambda v: (_ for _ in ()).throw(RuntimeError("no")))


def test_chooser_refuses_to_time_inside_a_capture(monkeypatch):
    _fake_bench(monkeypatch, {"fused": 1.0, "split": 2.0})
    run = _run()
    device = torch.device(DEVICE)
    assert variants.choose(("decided",), device, run) == "fused"
    monkeypatch.setattr(_triton_common._launch_state, "capturing", True, raising=False)
    assert variants.choose(("decided",), device, run) == "fused"  # a decided key: no timing needed
    with pytest.raises(_triton_common.CaptureAutotuneError, match="Run the step once eagerly"):
        variants.choose(("undecided",), device, run)
    assert ("undecided",) not in variants.chosen()


@pytest.mark.usefixtures("poisoned")
def test_auto_times_both_and_returns_what_one_call_returns(monkeypatch):
    """``auto`` end to end, with CPU tensors standing in for timed ones: both variants run (untimed,
    then timed), the faster (split, by the fake benchmark) gives the result, which is what one split
    call gives."""
    if not triton_lora.INTERPRET:
        pytest.skip("the launch spy needs TRITON_INTERPRET=1")
    monkeypatch.setattr(variants, "TIMED_DEVICE_TYPES", (torch.device(DEVICE).type,))
    launches = spy_on_launches(monkeypatch)

    def fake(call):
        before = len(launches)
        call()
        return 1.0 if "_grouped_reduce_kernel" in launches[before:] else 2.0

    monkeypatch.setattr(variants, "_time_variant", fake)
    x, w, b, A, B, gy = _problem(37, 24, 40, 3, torch.bfloat16, torch.float32)
    seed = torch.tensor(9)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, 0.25, seed)
    args = (gy, x, xa, w, A, B, SCALING, 0.25, seed, True, True, True, True)
    launches.clear()
    got = triton_lora.triton_backward(*args)
    assert launches == FUSED_KERNELS * 2 + SPLIT_KERNELS * 3  # each untimed then timed; the winner once more
    [(winner, times)] = variants.chosen().values()
    assert winner == "split" and times == {"fused": 2.0, "split": 1.0}
    launches.clear()
    again = triton_lora.triton_backward(*args)
    assert launches == SPLIT_KERNELS  # decided: one split backward
    monkeypatch.setenv(ENV, "split")
    for g, a, s in zip(got, again, triton_lora.triton_backward(*args), strict=True):
        assert torch.equal(g, s) and torch.equal(a, s)


def test_auto_does_not_time_in_deterministic_mode(monkeypatch):
    monkeypatch.setattr(variants, "TIMED_DEVICE_TYPES", (torch.device(DEVICE).type,))
    monkeypatch.setattr(variants, "_time_variant", lambda call: pytest.fail("timed in deterministic mode"))
    x, w, b, A, B, gy = _problem(5, 16, 16, 2, torch.float32)
    _, xa = triton_lora.triton_forward(x, w, b, A, B, SCALING, 0.0, None)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        triton_lora.triton_backward(gy, x, xa, w, A, B, SCALING, 0.0, None, True, True, True, True)
    finally:
        torch.use_deterministic_algorithms(was)
    assert variants.chosen() == {}
