"""``backend="auto"`` measures once per problem class and remembers (``fastlora.ops.auto``).

On the CPU, with an injected fake timer and the torch backend's ops standing in for "triton" and
"cuda" as runnable, timed backends (``TIMED_DEVICE_TYPES`` extended to the CPU): the fastest is
picked, the cache file round-trips, a corrupt or foreign cache costs one warning, a pin beats the
cache, racing first calls time once and agree, a backend that raises is skipped with its reason,
and the caller's tensors, RNG state and autograd graph are untouched.
"""

import json
import threading
import warnings

import pytest
import torch
from helpers import make_inputs

import fastlora
from fastlora.ops import auto, dispatch, registry


class FakeTimer:
    """Answers preset milliseconds per backend (raising where the value is an exception), after
    running the step once so that a broken step fails as it would under the real timer."""

    def __init__(self, ms: dict):
        self.ms, self.calls, self.lock = ms, [], threading.Lock()

    def __call__(self, name, run, device):
        with self.lock:
            self.calls.append(name)
        run()
        if isinstance(self.ms[name], Exception):
            raise self.ms[name]
        return self.ms[name]


def use_timer(ms: dict) -> FakeTimer:
    timer = FakeTimer(ms)
    auto.set_timer(timer)
    return timer


def problem(m=6, k=16, n=12, r=4, dtype=torch.float32):
    return make_inputs(m, k, n, r, dtype)


def test_the_fastest_backend_is_picked(timed_cpu):
    timer = use_timer({"torch": 3.0, "triton": 1.0, "cuda": 2.0})
    x, w, b, A, B = problem()
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "triton"
    assert sorted(timer.calls) == ["cuda", "torch", "triton"]
    choice = fastlora.explain_backend(x, w, A, B)  # same problem class: remembered, not timed again
    assert choice["backend"] == "triton" and choice["times_ms"] == {"torch": 3.0, "triton": 1.0, "cuda": 2.0}
    assert choice["reason"].startswith("measured fastest for x=float32") and len(timer.calls) == 3
    # Another class (no gradients) is measured afresh.
    use_timer({"torch": 1.0, "triton": 5.0, "cuda": 5.0})
    assert fastlora.explain_backend(x, w, A, B, requires_grad=False)["backend"] == "torch"


def test_the_cache_file_round_trips(timed_cpu):
    use_timer({"torch": 2.0, "triton": 3.0, "cuda": 1.0})
    x, w, b, A, B = problem()
    assert fastlora.explain_backend(x, w, A, B)["backend"] == "cuda"
    data = json.loads(timed_cpu.read_text())
    (environment,) = data["environments"].values()
    (entry,) = environment.values()
    assert entry == {"backend": "cuda", "times_ms": {"torch": 2.0, "triton": 3.0, "cuda": 1.0}}
    auto.clear_memory()  # as a new process: only the file remembers
    timer = use_timer({"torch": 9.0, "triton": 9.0, "cuda": 9.0})
    choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "cuda" and "cached" in choice["reason"] and timer.calls == []


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "someone-else/3", "environments": {}}), "[1, 2]"])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning(timed_cpu, text):
    timed_cpu.write_text(text)
    use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning) as record:
        assert fastlora.explain_backend(x, w, A, B)["backend"] == "triton"
        assert fastlora.explain_backend(x, w, A, B, requires_grad=False)["backend"] == "triton"
    assert len([w for w in record if "autotune cache" in str(w.message)]) == 1
    assert json.loads(timed_cpu.read_text())["format"] == auto.CACHE_FORMAT  # rewritten, valid


def test_a_pin_beats_the_cache(timed_cpu, monkeypatch):
    use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    assert fastlora.explain_backend(x, w, A, B)["backend"] == "triton"
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda")
    auto.clear_memory()  # the variable is read once a process
    assert fastlora.explain_backend(x, w, A, B) == {"backend": "cuda", "reason": "pinned by FASTLORA_BACKEND=cuda", "times_ms": None}
    fastlora.set_default_backend("torch")  # beats the environment variable too
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == "torch"
    fastlora.set_default_backend(None)
    monkeypatch.delenv("FASTLORA_BACKEND")
    auto.clear_memory()
    assert fastlora.explain_backend(x, w, A, B)["backend"] == "triton"


def test_bad_pins_are_refused(timed_cpu, monkeypatch):
    with pytest.raises(ValueError, match="set_default_backend: name must be one of"):
        fastlora.set_default_backend("fast")
    monkeypatch.setenv("FASTLORA_BACKEND", "auto")
    auto.clear_memory()
    with pytest.raises(ValueError, match="FASTLORA_BACKEND must be one of"):
        fastlora.lora_linear(*problem(), 1.0)


def test_racing_first_calls_time_once_and_agree(timed_cpu):
    timer = use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    start, answers = threading.Barrier(4), []

    def first_call():
        start.wait()
        answers.append(dispatch.resolve_backend("auto", x, w, b, A, B))

    threads = [threading.Thread(target=first_call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == ["triton"] * 4 and sorted(timer.calls) == ["cuda", "torch", "triton"]


def test_a_backend_raising_while_timed_is_skipped_with_its_reason(timed_cpu):
    use_timer({"torch": 2.0, "triton": RuntimeError("out of shared memory"), "cuda": 3.0})
    x, w, b, A, B = problem()
    with pytest.warns(RuntimeWarning, match="backend='triton' is excluded"):
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "torch"
    assert choice["times_ms"]["triton"] == "raised RuntimeError: out of shared memory"


def test_timing_leaves_tensors_rng_and_autograd_alone(timed_cpu):
    use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    y_before = fastlora.lora_linear(x, w, b, A, B, 0.5, backend="torch")  # a graph of the caller's
    values = [t.detach().clone() for t in (x, w, b, A, B)]
    rng = torch.get_rng_state()
    y = fastlora.lora_linear(x, w, b, A, B, 0.5, dropout=0.25)  # times, then runs the pick
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    torch.randint(2**31 - 1, (), dtype=torch.int64)  # the call's own draw of its dropout seed, only
    assert torch.equal(after, torch.get_rng_state())
    assert all(torch.equal(t.detach(), v) for t, v in zip((x, w, b, A, B), values))
    assert all(t.grad is None for t in (x, b, A, B))
    grads = torch.autograd.grad(y_before.sum(), [x, A, B])  # the caller's graph is intact
    assert all(g is not None for g in grads) and y.grad_fn is not None


def test_measurement_draws_nothing_from_the_global_generator(timed_cpu):
    use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    rng = torch.get_rng_state()
    fastlora.explain_backend(x, w, A, B, dropout=0.5)
    assert torch.equal(torch.get_rng_state(), rng)


def test_no_timing_in_deterministic_mode(timed_cpu):
    timer = use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        choice = fastlora.explain_backend(x, w, A, B)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert choice["backend"] == "torch" and choice["times_ms"] is None and timer.calls == []


def test_cpu_tensors_run_torch_without_timing():
    x, w, b, A, B = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = fastlora.explain_backend(x, w, A, B)
    assert choice == {"backend": "torch", "reason": "cpu tensors run on the torch backend; no timing", "times_ms": None}


def test_no_timing_while_compiling(timed_cpu):
    timer = use_timer({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x, w, b, A, B = problem()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *inputs: fastlora.lora_linear(*inputs, 0.5), fullgraph=True)
    out = compiled(x, w, b, A, B)
    assert timer.calls == []  # traced with the fixed choice, "torch"
    torch.testing.assert_close(out, fastlora.reference.lora_linear(x, w, b, A, B, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_measured_fastest_is_run(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    auto.clear_memory()
    x, w, b, A, B = make_inputs(256, 512, 384, 16, torch.bfloat16, "cuda", adapter_dtype=torch.float32)
    choice = fastlora.explain_backend(x, w, A, B)
    timed = {name: ms for name, ms in choice["times_ms"].items() if isinstance(ms, float)}
    assert "torch" in timed and choice["backend"] == min(timed, key=timed.get)
    assert dispatch.resolve_backend("auto", x, w, b, A, B) == choice["backend"]
    auto.clear_memory()


def test_a_backend_that_failed_doctor_here_is_not_tried(timed_cpu):
    """``fastlora doctor``'s verdicts (doctor.json beside the autotune cache, same environment key)
    exclude a failing backend before any timing; a passing verdict changes nothing."""
    from fastlora import doctor

    x, w, b, A, B = problem()
    verdicts = {"triton": {"verdict": "fail", "detail": "grad of lora_A off by 3e-1 in M1 K33"},
                "cuda": {"verdict": "pass", "detail": "ok"}, "torch": {"verdict": "pass", "detail": "ok"}}  # fmt: skip
    doctor.store_verdicts(x.device, verdicts, "2026-12-01")
    assert doctor.cached_verdicts(x.device) == {"triton": False, "cuda": True, "torch": True}
    timer = use_timer({"torch": 3.0, "triton": 1.0, "cuda": 2.0})
    choice = fastlora.explain_backend(x, w, A, B)
    assert choice["backend"] == "cuda" and "triton" not in timer.calls
    assert sorted(timer.calls) == ["cuda", "torch"]
