"""Every Triton launch runs inside ``_triton_common.on_device``: the device guard, and Triton's scratch
allocator set on the launching thread (issue 18, items 1 and 3).

Both hazards are GPU-only, so the CPU checks are structural: the allocator a thread sees after
``_ensure_allocator`` (Triton keeps it in a ``ContextVar``, which a new thread, such as PyTorch's
autograd thread, does not inherit), and a spy on the interpreter's launch that fails any launch made
outside the guard, for the dense forward, backward and decode paths and the 4-bit ones.
"""

import contextlib
import threading

import pytest
import torch
from helpers import rel_error, spy_on_launches, tolerance

triton = pytest.importorskip("triton")
from fastlora.ops import _triton_common  # noqa: E402

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not _triton_common.INTERPRET, reason="the launch spy needs TRITON_INTERPRET=1")


def _allocator_in_fresh_thread(before=None):
    """What Triton's allocator ContextVar holds in a new thread, after ``before()`` ran there."""
    from triton.runtime import _allocation

    seen = []

    def body():
        if before is not None:
            before()
        seen.append(_allocation._allocator.get())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=30)
    assert seen, "the thread did not finish"
    return seen[0]


def test_triton_allocator_is_not_inherited_by_a_new_thread():
    """The premise: a value set on this thread is not what a new thread sees."""
    from triton.runtime import _allocation

    previous = _allocation._allocator.get()
    triton.set_allocator(_triton_common._tma_allocator)
    try:
        assert isinstance(_allocator_in_fresh_thread(), _allocation.NullAllocator)
    finally:
        triton.set_allocator(previous)


def test_ensure_allocator_sets_ours_on_the_launching_thread():
    assert _allocator_in_fresh_thread(_triton_common._ensure_allocator) is _triton_common._tma_allocator


def test_ensure_allocator_keeps_an_allocator_already_set():
    def theirs(size, alignment, stream):
        raise AssertionError("not called here")

    def before():
        triton.set_allocator(theirs)
        _triton_common._ensure_allocator()

    assert _allocator_in_fresh_thread(before) is theirs


def test_on_device_guards_the_tensors_device_and_sets_the_allocator(monkeypatch):
    """For a CUDA device, ``on_device`` makes that device current (not the current one) after setting
    the allocator, on whatever thread launches, and restores the previous device on exit, also when
    the block raises: as ``torch.cuda.device`` does, through the same two functions."""
    from triton.runtime import _allocation

    calls = []

    def exchange(index):
        calls.append(("exchange", index, _allocation._allocator.get()))
        return 0  # the device current before

    monkeypatch.setattr(_triton_common, "_exchange_device", exchange)
    monkeypatch.setattr(_triton_common, "_maybe_exchange_device", lambda index: calls.append(("restore", index)))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def launch():
        with _triton_common.on_device(torch.device("cuda", 1)):
            calls.append("inside")
        with pytest.raises(ValueError), _triton_common.on_device(torch.device("cuda", 1)):
            raise ValueError("in the block")

    _allocator_in_fresh_thread(launch)
    entered = ("exchange", 1, _triton_common._tma_allocator)
    assert calls == [entered, "inside", ("restore", 0), entered, ("restore", 0)]


def test_on_device_falls_back_to_torch_cuda_device(monkeypatch):
    """Where torch lacks the two private functions, the guard is ``torch.cuda.device(<that device>)``."""
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        from triton.runtime import _allocation

        entered.append((torch.device(device), _allocation._allocator.get()))
        yield
        entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    monkeypatch.setattr(_triton_common, "_exchange_device", None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def launch():
        with _triton_common.on_device(torch.device("cuda", 1)):
            pass

    _allocator_in_fresh_thread(launch)
    assert entered == [(torch.device("cuda", 1), _triton_common._tma_allocator), "exit"]


def test_on_device_is_a_no_op_for_cpu_tensors():
    with _triton_common.on_device(torch.device("cpu")) as guard:
        assert guard is None


@pytest.fixture
def launch_spy(monkeypatch):
    """The kernels launched during the test; a launch outside ``on_device`` fails it."""
    return spy_on_launches(monkeypatch)


def _dense_case(M, K, N, r, dtype=torch.float32):
    g = torch.Generator().manual_seed(M * 1000 + K + N + r)
    x = torch.randn(M, K, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    bias = torch.randn(N, generator=g, dtype=dtype, requires_grad=True)
    lora_A = (torch.randn(r, K, generator=g, dtype=dtype) / K**0.5).requires_grad_()
    lora_B = torch.randn(N, r, generator=g, dtype=dtype).requires_grad_()
    return x, weight, bias, lora_A, lora_B


@pytest.mark.parametrize("M", [3, 70], ids=["decode", "prefill"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_every_dense_launch_is_guarded(launch_spy, M, dropout):
    x, weight, bias, lora_A, lora_B = _dense_case(M, 40, 72, 4)
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, dropout=dropout, backend="triton")
    y.backward(torch.randn_like(y))
    assert len(launch_spy) >= 2, launch_spy  # forward and backward both launched kernels
    if not dropout:  # the guard changes nothing in the result
        x64 = [t.detach().double() for t in (x, weight, bias, lora_A, lora_B)]
        want = reference.lora_linear(*x64, scaling=2.0)
        assert rel_error(y.detach(), want) <= tolerance(torch.float32, "cpu")


def test_every_dense_launch_is_guarded_on_the_autograd_thread(launch_spy):
    """The backward, run from another thread (as PyTorch's autograd thread runs CUDA backwards)."""
    x, weight, bias, lora_A, lora_B = _dense_case(33, 24, 40, 2)
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, backend="triton")
    forward_launches = len(launch_spy)
    errors = []

    def backward():
        try:
            y.sum().backward()
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the backward did not finish"
    assert not errors, errors
    assert len(launch_spy) > forward_launches
    assert lora_A.grad is not None and torch.isfinite(lora_A.grad).all()


def test_every_4bit_launch_is_guarded(launch_spy):
    pytest.importorskip("bitsandbytes")
    from fastlora import qlora

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True, dtype=torch.float16)
    layer = qlora.quantize_linear(linear, "nf4", 64, True, compute_dtype=torch.float16)
    layer.support_avx512bf16_for_cpu = False
    lora = fastlora.FusedLoRALinear.from_linear(layer, r=4, alpha=8, backend="triton")
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 64, dtype=torch.float16, requires_grad=True)
    lora(x).sum().backward()
    assert any("qlora" in name for name in launch_spy), launch_spy


def test_target_limits_are_seen_on_every_thread():
    """``fastlora inspect``'s stand-in limits reach a launch on another thread (the autograd thread's
    case) too: they are process-wide, not a ContextVar."""
    from fastlora.ops import _device

    target = _device.KNOWN_LIMITS[(8, 0)]
    seen = []
    with _device.target_limits(target):
        thread = threading.Thread(target=lambda: seen.append(_device.device_limits(torch.device("cpu"))))
        thread.start()
        thread.join(timeout=30)
    assert seen == [target]
    assert _device.device_limits(torch.device("cpu")) != target


def test_launches_from_two_threads_are_serialised():
    """One lock around every launch: Triton's Autotuner keeps a call's arguments on the shared
    launcher while it tunes, so a second thread's launch in between broke the first (seen by a review,
    reproduced with a two-config kernel under the interpreter). Here: while one thread holds a
    launch, another thread's launch waits."""
    order = []
    inside = threading.Event()
    release = threading.Event()

    def first():
        with _triton_common.on_device(torch.device("cpu")):
            order.append("first in")
            inside.set()
            release.wait(timeout=30)
            order.append("first out")

    def second():
        inside.wait(timeout=30)
        with _triton_common.on_device(torch.device("cpu")):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(timeout=30)
    import time

    time.sleep(0.2)  # the second thread is now blocked on the lock, if there is one
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert order == ["first in", "first out", "second in"]


def test_autotuning_is_refused_inside_a_capture(monkeypatch):
    """Inside a CUDA-graph capture an autotuner's timing would synchronise and invalidate it: the
    benchmark every autotuner here uses raises a clear error instead (capture simulated)."""
    monkeypatch.setattr(_triton_common._launch_state, "capturing", True, raising=False)
    with pytest.raises(_triton_common.CaptureAutotuneError, match="Run the step once eagerly"):
        _triton_common.autotune_bench(lambda: None, (0.5, 0.2, 0.8))


def test_every_autotuner_times_with_the_capture_aware_benchmark():
    from fastlora.ops import _qlora_configs, triton_lora

    tuners = [triton_lora._lora_gemm, triton_lora._lora_gemm_grad_x, _qlora_configs._qlora_matmul, _qlora_configs._qlora_low_rank]
    for tuner in tuners:
        assert tuner._do_bench is _triton_common.autotune_bench, tuner


def test_target_limits_leave_gpu_tensors_alone(monkeypatch):
    """A real GPU launch on another thread while `fastlora inspect` runs sizes itself by its own GPU."""
    from fastlora.ops import _device

    own = _device.KNOWN_LIMITS[(9, 0)]
    monkeypatch.setattr(_device, "_cuda_limits", lambda index: own)
    with _device.target_limits(_device.KNOWN_LIMITS[(8, 0)]):
        assert _device.device_limits(torch.device("cuda", 0)) is own
