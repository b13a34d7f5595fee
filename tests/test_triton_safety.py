"""The Triton kernels' safety properties that a CPU can show (issue 18 items 4, 5, 9; issue 20):

- the persistent kernel's flags cannot be stale: a launch re-run with identical arguments (as the
  autotuner's benchmark does) is still right, every launch leaves its flag workspace zeroed, and the
  dense forward issues no memset;
- the consumers' wait is bounded, and a consumer whose producer has not run computes its row
  block's ``t`` itself (the interpreter runs programs one after another, so with several programs an
  early consumer's producer comes later: it must time out and fall back);
- TF32 is modelled under the interpreter where the kernels multiply in TF32 on a GPU.
"""

import collections
import sys

import pytest
import torch
from helpers import check_against_reference, make_inputs, poisoned, rel_error, tolerance  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora.ops._device import KNOWN_LIMITS, target_limits

triton_lora = pytest.importorskip("fastlora.ops.triton_lora")
if not triton_lora.INTERPRET:
    pytest.skip("these tests model the GPU's behaviour under the interpreter", allow_module_level=True)

from fastlora.ops import _triton_common  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned")
KERNEL = triton_lora._lora_gemm_kernel


class _Launches:
    """Stands in for the autotuned launchers: records each launch's arguments (by name) and grid
    size, and with ``rerun`` launches it a second time with the very same arguments, as the
    autotuner's benchmark does, after poisoning what the first run wrote (so that a consumer reading
    the first run's ``t`` early fails)."""

    def __init__(self, monkeypatch, rerun=False):
        self.seen, self.rerun = [], rerun
        for name in ("_lora_gemm", "_lora_gemm_grad_x"):
            monkeypatch.setattr(triton_lora, name, self._spy(getattr(triton_lora, name)))

    def _spy(self, tuned):
        outer = self

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    named = {**dict(zip(KERNEL.arg_names, args)), **kwargs}
                    config = _triton_common.INTERPRETER_CONFIGS[0].kwargs
                    tuned[grid](*args, **kwargs)
                    if outer.rerun:
                        for name, written in (("out_ptr", "WRITE_OUT"), ("t_ptr", "STORE_T")):
                            if named[written]:
                                named[name].fill_(float("nan"))
                        tuned[grid](*args, **kwargs)
                    outer.seen.append({**named, "programs": grid(config)[0], "flags_after": named["flags_ptr"].clone()})

                return launch

        return Spy()


def _with_flags(launch):
    return launch["WRITE_OUT"] and launch["STORE_T"] and not launch["SPLIT_K"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rerun_with_the_same_flags_is_right(monkeypatch, dtype, dropout):
    # 5 row blocks × 4 column blocks: every launch has producers and consumers.
    launches = _Launches(monkeypatch, rerun=True)
    inputs = make_inputs(300, 64, 256, 7, dtype, "cpu")
    if dropout:
        x, w, b, A, B = (t.detach() for t in inputs)
        seed = torch.tensor(3)
        y, xa = triton_lora.triton_forward(x, w, b, A, B, 0.75, dropout, seed)
        # The mask is the kernel's own: the rerun must match a launch run once.
        launches.rerun = False
        y1, xa1 = triton_lora.triton_forward(x, w, b, A, B, 0.75, dropout, seed)
        assert rel_error(y, y1) <= 1e-6 and rel_error(xa, xa1) <= 1e-6
    else:
        check_against_reference(inputs, 0.75, "triton")
    flagged = [launch for launch in launches.seen if _with_flags(launch)]
    assert flagged, "no launch used the flags"
    for launch in flagged:
        assert not launch["flags_after"].any(), "a launch left its flags set"


def test_the_workspace_is_zero_after_every_call_and_kept():
    x, w, b, A, B = (t.detach() for t in make_inputs(200, 64, 200, 5, torch.float32, "cpu"))
    triton_lora.triton_forward(x, w, b, A, B, 1.0, 0.0, None)
    first = _triton_common._flag_workspace(x.device, 2)
    assert not first.any()
    y, xa = triton_lora.triton_forward(x, w, b, A, B, 1.0, 0.0, None)
    again = _triton_common._flag_workspace(x.device, 2)
    assert again.data_ptr() == first.data_ptr() and not again.any()
    ref = x.double() @ w.double().t() + b.double() + (x.double() @ A.double().t()) @ B.double().t()
    assert rel_error(y, ref) <= tolerance(torch.float32, "cpu")


def test_a_launch_without_flags_gets_a_dummy_of_its_own(monkeypatch):
    launches = _Launches(monkeypatch)
    x, w, b, A, B = make_inputs(5, 1024, 40, 8, torch.float32, "cpu")  # decode: split over K
    check_against_reference((x, w, b, A, B), 1.5, "triton")
    forward = launches.seen[0]
    assert forward["SPLIT_K"] and forward["flags_ptr"].dtype == torch.int32
    others = [v for k, v in forward.items() if k.endswith("_ptr") and k != "flags_ptr"]
    assert all(forward["flags_ptr"].data_ptr() != t.data_ptr() for t in others)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("m", [130, 16])
def test_the_dense_forward_issues_no_memset(monkeypatch, m):
    # The real allocator, not the poisoning one (whose torch.full is the memset looked for here).
    monkeypatch.setattr(_triton_common, "_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    x, w, b, A, B = (t.detach() for t in make_inputs(m, 64, 200, 5, torch.bfloat16, "cpu"))
    triton_lora.triton_forward(x, w, b, A, B, 1.0, 0.0, None)  # the workspace is allocated once
    with _CountOps() as counted:
        triton_lora.triton_forward(x, w, b, A, B, 1.0, 0.0, None)
    memsets = {op: n for op, n in counted.ops.items() if "zero" in op or "fill" in op or "full" in op}
    assert not memsets, memsets
    with _CountOps() as counted:
        fastlora.lora_linear(x, w, b, A, B, 1.0, backend="triton")
    memsets = {op: n for op, n in counted.ops.items() if "zero" in op or "fill" in op or "full" in op}
    assert not memsets, memsets


@pytest.fixture
def fallbacks(monkeypatch):
    """Counts the consumers that timed out and computed their row block's t themselves."""
    module = sys.modules[KERNEL.fn.__module__]
    original, calls = module._recompute_t, []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_recompute_t", counted)
    return calls


@pytest.mark.parametrize(
    "dtype, adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32), (torch.float16, None)], ids=str
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_consumers_whose_producer_comes_later_compute_t_themselves(fallbacks, dtype, adapter_dtype, p):
    # 5 row blocks × 4 column blocks on 4 programs, run one after another: program 0's consumers of
    # row blocks 1-3 come before their producers, time out and fall back. Their t must be the one
    # the producer stores (the same K loop), so the result equals a one-program run's to the bit.
    x, w, b, A, B = (t.detach() for t in make_inputs(300, 128, 256, 7, dtype, "cpu", adapter_dtype=adapter_dtype))
    seed = torch.tensor(11) if p else None
    several = triton_lora.triton_forward(x, w, b, A, B, 0.5, p, seed)
    assert fallbacks, "no consumer fell back"
    fallbacks.clear()
    with target_limits(KNOWN_LIMITS[(9, 0)]._replace(sm_count=1)):
        one = triton_lora.triton_forward(x, w, b, A, B, 0.5, p, seed)
    assert not fallbacks, "a consumer of a one-program grid waited in vain"
    assert torch.equal(several[0], one[0]) and torch.equal(several[1], one[1])
    if not p:
        x64, A64 = x.double(), A.double()
        xa = x64 @ A64.t()
        ref = x64 @ w.double().t() + b.double() + 0.5 * xa @ B.double().t()
        assert rel_error(several[0], ref) <= tolerance(dtype, "cpu")
        assert rel_error(several[1], xa) <= tolerance(dtype, "cpu")


@pytest.mark.parametrize("spins", [0, 2, 50])
def test_forward_and_gradients_with_fallbacks_meet_the_tolerance(monkeypatch, fallbacks, spins):
    monkeypatch.setattr(triton_lora, "_SPIN_LIMIT", spins)
    launches = _Launches(monkeypatch)
    check_against_reference(make_inputs(300, 200, 256, 9, torch.bfloat16, "cpu", adapter_dtype=torch.float32), 1.5, "triton")
    assert [launch["spin_limit"] for launch in launches.seen] == [spins, spins]
    assert len(fallbacks) >= 2  # in the forward and in grad_x
