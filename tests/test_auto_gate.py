"""``backend="auto"``'s correctness gate, its re-entrance and its CUDA-graph capture rules, on the CPU.

As in test_auto.py: timing enabled for CPU tensors, "triton" and "cuda" played by stand-ins (the
torch backend's ops, or corrupted ones), a fake timer that runs the step. Each test that could hang
on a regression (a deadlock) runs in a thread with a join timeout, so it fails instead.
"""

import functools
import threading
import time
import types
import warnings

import pytest
import torch
from helpers import make_inputs, rel_error, tolerance

import fastlora
from fastlora.ops import auto, dispatch, gate, registry

HANG_S = 120  # far above what any of these takes on a loaded 2-core machine


class StepTimer:
    """Runs the step (as the real timer does), then answers preset ms per backend, raising where
    the value is an exception and sleeping first where ``sleep_s`` names the backend."""

    def __init__(self, ms: dict, sleep_s: dict | None = None):
        self.ms, self.sleep_s, self.calls = ms, sleep_s or {}, []

    def __call__(self, name, run, device):
        self.calls.append(name)
        run()
        time.sleep(self.sleep_s.get(name, 0))
        if isinstance(self.ms[name], Exception):
            raise self.ms[name]
        return self.ms[name]


def corrupted(transform):
    """The torch backend's ops with ``transform`` applied to ``y`` (differentiably, so the gradients
    are wrong too): a fake fused backend that runs but computes something else."""
    base = registry.backend_ops("torch")
    function = types.SimpleNamespace(apply=lambda *inputs: transform(base.function.apply(*inputs)))
    return base._replace(runs_on=("cpu",), function=function)


def finish_within(fn, seconds=HANG_S):
    """``fn()``'s result, run in a thread; fails (instead of hanging) if it does not finish in time."""
    result, errors = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as err:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s: a deadlock"
    if errors:
        raise errors[0]
    return result[0]


def problem(m=6, k=16, n=12, r=4, dtype=torch.float32, bias=True):
    return make_inputs(m, k, n, r, dtype, bias=bias)


# --- re-entrance ------------------------------------------------------------------------------------


def save_matmuls(ctx, op, *args, **kwargs):
    """A selective-checkpoint policy that keeps the outputs of plain matmuls."""
    from torch.utils.checkpoint import CheckpointPolicy

    matmuls = (torch.ops.aten.mm.default,)  # not addmm: the torch backend adds into its output in place
    return CheckpointPolicy.MUST_SAVE if op in matmuls else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_auto_inside_a_non_reentrant_checkpoint_finishes_with_the_torch_gradients(timed_cpu, dropout, selective):
    timer = StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    auto.set_timer(timer)
    x, w, b, A, B = problem()

    def layer(x, A, B, backend):
        return fastlora.lora_linear(torch.tanh(x), w, b, A, B, 0.5, dropout=dropout, backend=backend)

    def step(backend):
        torch.manual_seed(0)
        inputs = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        extra = {}
        if selective:  # its dispatch mode would also cache the measurement's scratch ops as the caller's
            extra["context_fn"] = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, save_matmuls)
        y = torch.utils.checkpoint.checkpoint(layer, *inputs, backend, use_reentrant=False, **extra)
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in inputs]

    got = finish_within(lambda: step("auto"))
    assert sorted(timer.calls) == ["cuda", "torch", "triton"]  # measured once, in the forward
    assert dispatch.resolve_backend("auto", x, w, b, A, B, dropout) == "triton"
    expected = step("torch")
    for g, e in zip(got, expected):
        assert rel_error(g, e) <= tolerance(torch.float32, "cpu")


def test_a_thread_reentering_while_it_measures_takes_torch_unsettled(timed_cpu):
    x, w, b, A, B = problem()
    x2, w2, b2, A2, B2 = problem(m=40, k=24)  # another problem class
    nested = []

    class Reentering(StepTimer):
        def __call__(self, name, run, device):
            if not nested:
                nested.append(auto.choose(x2, w2, b2, A2, B2, 0.0, True))
            return super().__call__(name, run, device)

    auto.set_timer(Reentering({"torch": 2.0, "triton": 1.0, "cuda": 3.0}))
    assert finish_within(lambda: dispatch.resolve_backend("auto", x, w, b, A, B)) == "triton"
    assert nested[0]["backend"] == "torch" and "unsettled" in nested[0]["reason"]
    # Unsettled: the nested class is measured at its next call, outside the measurement.
    assert fastlora.explain_backend(x2, w2, A2, B2)["backend"] == "triton"


def test_measuring_applies_none_of_the_callers_saved_tensor_hooks(timed_cpu):
    auto.set_timer(StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0}))
    x, w, b, A, B = problem()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t.detach(), lambda t: t):
        y = fastlora.lora_linear(x, w, b, A, B, 0.5)
        calls_own = len(packed)
        fastlora.lora_linear(x[:5], w, b, A, B, 0.5)  # same class: no measurement
    assert calls_own == len(packed) - calls_own > 0  # both calls saved the same tensors, only theirs
    assert y.grad_fn is not None


# --- the correctness gate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, reason",
    [
        (lambda y: y * 1.01, "wrong result: y differs from the reference's by 1.0"),
        (lambda y: y + float("nan"), "non-finite result: y holds NaN or inf"),
        (lambda y: y.flip(0), "wrong result: y differs"),
    ],
    ids=["wrong", "nan", "rows-swapped"],
)
def test_a_wrong_backend_is_rejected_with_its_reason_and_one_warning(timed_cpu, monkeypatch, fault, reason):
    monkeypatch.setitem(registry._loaded, "triton", corrupted(fault))
    auto.set_timer(StepTimer({"torch": 3.0, "triton": 1.0, "cuda": 2.0}))  # the wrong one is fastest
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning) as record:
        choice = fastlora.explain_backend(x, w, A, B)
        y = fastlora.lora_linear(x, w, b, A, B, 0.5)
        fastlora.explain_backend(x, w, A, B)
    excluded = [r for r in record if "excluded from backend='auto'" in str(r.message)]
    assert len(excluded) == 1 and "backend='triton'" in str(excluded[0].message)
    assert choice["backend"] == "cuda" and choice["times_ms"]["triton"].startswith(reason)
    assert "excluded: triton (" + reason in choice["reason"]
    expected = fastlora.reference.lora_linear(*(t.double() for t in (x, w, b, A, B)), 0.5)
    assert rel_error(y, expected) <= tolerance(torch.float32, "cpu")
    # A wrong result is no accident: it is written to disk, and a new process keeps it excluded.
    auto.clear_memory()
    with pytest.warns(RuntimeWarning, match="excluded from backend='auto'"):
        cached = fastlora.explain_backend(x, w, A, B)
    assert cached["backend"] == "cuda" and "(cached)" in cached["reason"] and "excluded: triton" in cached["reason"]


def test_wrong_gradients_alone_are_rejected(timed_cpu, monkeypatch):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            return g * 2

    monkeypatch.setitem(registry._loaded, "cuda", corrupted(WrongGrad.apply))
    auto.set_timer(StepTimer({"torch": 3.0, "triton": 2.0, "cuda": 1.0}))
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning, match="backend='cuda' is excluded"):
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "triton" and choice["times_ms"]["cuda"].startswith("wrong result: grad_")
    # Without gradients the same backend is right, and wins.
    assert fastlora.explain_backend(x, w, A, B, requires_grad=False)["backend"] == "cuda"


def test_a_raising_backend_is_excluded_and_cached(timed_cpu):
    auto.set_timer(StepTimer({"torch": 2.0, "triton": RuntimeError("invalid argument"), "cuda": 3.0}))
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: invalid argument"):
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "torch" and choice["times_ms"]["triton"] == "raised RuntimeError: invalid argument"
    assert timed_cpu.exists() and "invalid argument" in timed_cpu.read_text()


@pytest.mark.parametrize("transient", ["oom", "timeout"])
def test_a_transient_failure_is_excluded_in_memory_but_not_written_to_disk(timed_cpu, monkeypatch, transient):
    if transient == "oom":
        timer = StepTimer({"torch": 2.0, "triton": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "cuda": 3.0})
        reason = "raised OutOfMemoryError: CUDA out of memory"
    else:
        monkeypatch.setattr(gate, "DEADLINE_S", 0.3)
        timer = StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0}, sleep_s={"triton": 0.6})
        reason = "timed out: did not finish within 0.3 s"
    auto.set_timer(timer)
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning, match="backend='triton' is excluded"):
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "torch" and choice["times_ms"]["triton"].startswith(reason)
    assert not timed_cpu.exists()  # nothing of this measurement reaches the disk
    calls = len(timer.calls)
    assert fastlora.explain_backend(x, w, A, B)["backend"] == "torch" and len(timer.calls) == calls  # settled here
    auto.clear_memory()  # a new process measures again, and the backend may pass then
    auto.set_timer(StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0}))
    assert fastlora.explain_backend(x, w, A, B)["backend"] == "triton" and timed_cpu.exists()


def test_a_failing_reference_excludes_everything_and_is_not_cached(timed_cpu):
    auto.set_timer(StepTimer({"torch": RuntimeError("boom"), "triton": 1.0, "cuda": 3.0}))
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning):
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "torch" and choice["reason"].startswith("every backend failed")
    assert choice["times_ms"]["triton"].startswith("unchecked: the reference 'torch' failed")
    assert not timed_cpu.exists()


def test_gate_evaluate_on_its_own():
    """The gate's API without auto: candidates as callables, a reference, no timer (check only)."""
    x = torch.randn(5, 7)
    right = gate.Candidate(lambda: {"y": x * 2, "grad": x + 1})
    off = gate.Candidate(lambda: {"y": x * 2 + 1e-3, "grad": x + 1})
    missing = gate.Candidate(lambda: {"y": x * 2, "grad": None})
    results = gate.evaluate({"ref": right, "same": right, "off": off, "missing": missing}, "ref", torch.device("cpu"), None)
    assert results["ref"] is None and results["same"] is None
    assert isinstance(results["off"], gate.Failure) and not results["off"].transient
    assert results["missing"] == gate.Failure("wrong result: grad is missing, unlike the reference's", False)


# --- CUDA-graph capture (the logic, with capture simulated) -----------------------------------------


@pytest.fixture
def capturing(monkeypatch):
    state = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["on"] or torch.cuda._initialized)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


def test_under_capture_a_cached_choice_runs_only_once_it_has_run_here(timed_cpu, capturing):
    timer = StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    auto.set_timer(timer)
    x, w, b, A, B = problem()
    capturing["on"] = True
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "torch" and timer.calls == []  # nothing measured
    capturing["on"] = False
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "triton"  # unsettled: measured now
    capturing["on"] = True
    x7 = x[:5]  # another M of the same class: measured here, so warmed
    assert dispatch.resolve_backend("auto", x7, w, b, A, B) == "triton"
    # From the disk only (as a new process): triton has not run here; it would autotune in the capture.
    auto.clear_memory()
    choice = auto.choose(x, w, b, A, B, 0.0, True)
    assert choice["backend"] == "torch" and "has not run" in choice["reason"]
    capturing["on"] = False
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "triton"  # cached, runs eagerly: warmed
    capturing["on"] = True
    assert dispatch.resolve_backend("auto", x7, w, b, A, B) == "triton"
    # Without a bias the kernels autotune afresh: not warmed for that variant.
    assert dispatch.resolve_backend("auto", x7, w, None, A, B) == "torch"
    assert len(timer.calls) == 3


def test_explain_backend_does_not_count_as_having_run(timed_cpu, capturing):
    auto.set_timer(StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0}))
    x, w, b, A, B = problem()
    fastlora.explain_backend(x, w, A, B)
    auto.clear_memory()
    assert fastlora.explain_backend(x, w, A, B)["backend"] == "triton"  # from the disk, not run
    capturing["on"] = True
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "torch"


def test_dropout_under_capture_is_refused_with_the_workaround(capturing):
    x, w, b, A, B = problem()
    capturing["on"] = True
    with pytest.raises(RuntimeError, match=r"dropout \(p=0.1\) under CUDA-graph capture.*same dropout mask.*dropout off"):
        fastlora.lora_linear(x, w, b, A, B, 0.5, dropout=0.1, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.lora_linear(x, w, b, A, B, 0.5, backend="torch")  # no dropout: fine
    capturing["on"] = False
    fastlora.lora_linear(x, w, b, A, B, 0.5, dropout=0.1, backend="torch")


def test_a_backward_pass_does_not_wait_on_another_threads_measurement(timed_cpu, monkeypatch):
    # Waiting there could hold the autograd device thread that the other measurement's backward needs.
    monkeypatch.setattr(auto, "_in_backward", lambda: True)
    auto.set_timer(StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0}))
    x, w, b, A, B = problem()
    with auto._lock:  # as another thread holds it while it measures
        choice = finish_within(lambda: auto.choose(x, w, b, A, B, 0.0, True))
    assert choice["backend"] == "torch" and "unsettled" in choice["reason"]
    assert finish_within(lambda: auto.choose(x, w, b, A, B, 0.0, True))["backend"] == "triton"


def test_a_cache_from_before_the_gate_is_remeasured_silently(timed_cpu):
    import json

    x, w, b, A, B = problem()
    env, key = auto.environment_key(torch.device("cpu")), auto.problem_key(x, w, A, 0.0, True)
    unchecked = {"backend": "triton", "times_ms": {"torch": 2.0, "triton": 1.0, "cuda": 3.0}}
    timed_cpu.write_text(json.dumps({"format": "fastlora-autotune/1", "environments": {env: {key: unchecked}}}))
    auto.set_timer(StepTimer({"torch": 2.0, "triton": 5.0, "cuda": 1.0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "cuda" and "cached" not in choice["reason"]
    assert json.loads(timed_cpu.read_text())["format"] == auto.CACHE_FORMAT


def test_no_memory_for_the_scratch_inputs_fails_no_call(timed_cpu, monkeypatch):
    from fastlora.ops import candidates

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    monkeypatch.setattr(candidates, "scratch_like", no_memory)
    auto.set_timer(StepTimer({"torch": 2.0, "triton": 1.0, "cuda": 3.0}))
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning, match="no scratch inputs"):
        y = fastlora.lora_linear(x, w, b, A, B, 0.5)
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "torch" and not timed_cpu.exists()
    expected = fastlora.reference.lora_linear(*(t.double() for t in (x, w, b, A, B)), 0.5)
    assert rel_error(y, expected) <= tolerance(torch.float32, "cpu")
