"""Pre-bound launches (``fastlora.ops._prebound``): a signature's first call takes Triton's path, later
ones the compiled kernel's launcher with the argument list Triton's binder would bind.

The GPU's launcher cannot run here. The tests use ``stubbed_launches`` (the census's stand-in): a
stubbed launch returns a stand-in compiled kernel whose ``run`` records what the C launcher would be
given, and plans are checked against Triton's real binder built for sm_90a on the CPU. The suite runs
under ``TRITON_INTERPRET=1``, where pre-binding is off; these tests turn it on (``ENABLED``) and use a
real ``JITFunction`` (the interpreter's stand-in has no binder). ``test_real_kernels_plan_...`` runs
the real launch sites in a subprocess without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from fastlora.inspect import recording
from fastlora.ops import _prebound

ROOT = Path(__file__).resolve().parent.parent


def _toy(x_ptr, y_ptr, n, stride, seed, scale, BLOCK: tl.constexpr, TWICE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n)
    tl.store(y_ptr + offs, x * scale + seed, mask=offs < n)


TOY = JITFunction(_toy, do_not_specialize=["seed"])
TUNED = triton.autotune([triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)],
                        key=["n"])(JITFunction(_toy, do_not_specialize=["seed"]))  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture
def runs(monkeypatch):
    """Pre-binding on; every stand-in C-launcher call as ``(grid, full argument list)``."""
    monkeypatch.setattr(_prebound, "ENABLED", True)
    seen = []

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, leave, *full):
        seen.append(((g0, g1, g2), full))

    monkeypatch.setattr(recording._StubKernel, "run", run)
    recording._STUB_PLANS.clear()
    with recording.stubbed_launches([]) as launches:
        yield seen, launches
    recording._STUB_PLANS.clear()


def toy_args(x, y, seed=7, scale=0.5):
    return (x, y, x.numel(), 1, seed, scale)


def test_second_call_is_pre_bound_with_the_binders_arguments(runs):
    seen, launches = runs
    x, y = torch.randn(300), torch.empty(300)
    grid = lambda meta: (triton.cdiv(300, meta["BLOCK"]),)  # noqa: E731
    for _ in range(3):
        _prebound.launch(TUNED, grid, toy_args(x, y), {"TWICE": True}, CPU, None)
    assert launches == ["_toy"], "only the first call takes Triton's path"
    assert len(seen) == 2
    config = TUNED.best_config
    expected = (*toy_args(x, y), config.kwargs["BLOCK"], True)  # TWICE after BLOCK: the parameters' order
    for grid_seen, full in seen:
        assert grid_seen == (triton.cdiv(300, config.kwargs["BLOCK"]), 1, 1)
        assert len(full) == len(expected) and all(a is b or a == b for a, b in zip(full, expected))


def test_new_seed_reuses_the_plan_and_new_floats_are_passed(runs):
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    for seed, scale in [(1, 1.0), (16, 2.0), (12345, 3.5)]:  # 1 and 16 would be specialised were seed not exempt
        _prebound.launch(TOY, (1,), toy_args(x, y, seed, scale), {"BLOCK": 64, "TWICE": False}, CPU, None)
    assert launches == ["_toy"]
    assert [full[4:6] for _, full in seen] == [(16, 2.0), (12345, 3.5)]
    # A seed past int32 is typed i64 by the binder: a new signature.
    _prebound.launch(TOY, (1,), toy_args(x, y, 2**40), {"BLOCK": 64, "TWICE": False}, CPU, None)
    assert launches == ["_toy", "_toy"]


@pytest.mark.parametrize(
    "change",
    ["unaligned pointer", "int value", "int equal to 1", "dtype", "constexpr", "grid", "float passed as int"],
)
def test_every_specialised_property_gets_its_own_plan(runs, change):
    seen, launches = runs
    base = torch.randn(80)
    x, y = base[:64], torch.empty(64)
    args, kwargs, grid = toy_args(x, y), {"BLOCK": 64, "TWICE": False}, (1,)
    _prebound.launch(TOY, grid, args, kwargs, CPU, None)
    if change == "unaligned pointer":
        args = toy_args(base[1:65], y)  # 4 bytes off: the binder's % 16 specialisation changes
    elif change == "int value":
        args = (x, y, 63, 1, 7, 0.5)
    elif change == "int equal to 1":
        args = (x, y, 64, 2, 7, 0.5)  # stride 1 → 2
    elif change == "dtype":
        args = toy_args(x.double(), y)
    elif change == "constexpr":
        kwargs = {"BLOCK": 64, "TWICE": True}
    elif change == "grid":
        grid = (2,)
    else:
        args = (x, y, 64, 1, 7, 1)  # scale an int: typed i32, another kernel
    _prebound.launch(TOY, grid, args, kwargs, CPU, None)
    assert launches == ["_toy", "_toy"], f"{change}: must not reuse the first call's plan"
    assert not seen


def test_binder_disagreement_means_no_plan(runs, monkeypatch):
    seen, launches = runs
    real = _prebound.binder_of

    def shuffled(jit):
        binder = real(jit)

        def bind(*args, **kwargs):
            bound, spec, options = binder(*args, **kwargs)
            return dict(reversed(list(bound.items()))), spec, options

        return bind

    monkeypatch.setattr(_prebound, "binder_of", shuffled)
    x, y = torch.randn(64), torch.empty(64)
    for _ in range(3):
        _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU, None)
    assert launches == ["_toy"] * 3 and not seen


def test_a_failing_plan_warns_once_and_launches_go_on(runs, monkeypatch):
    seen, launches = runs

    def broken(jit):
        raise AttributeError("device_caches")

    monkeypatch.setattr(_prebound, "binder_of", broken)
    _prebound._warned.discard("_toy")
    x, y = torch.randn(64), torch.empty(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (64, 63, 62):
            _prebound.launch(TOY, (1,), (x, y, n, 1, 7, 0.5), {"BLOCK": 64, "TWICE": False}, CPU, None)
    assert launches == ["_toy"] * 3 and not seen
    messages = [str(w.message) for w in caught if "pre-bound" in str(w.message)]
    assert len(messages) == 1 and "AttributeError: device_caches" in messages[0]


def test_plans_are_bounded(runs, monkeypatch):
    seen, launches = runs
    monkeypatch.setattr(_prebound, "_MAX_PLANS", 3)
    _prebound._warned.discard("_toy")
    x, y = torch.randn(64), torch.empty(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for n in range(1, 7):
                _prebound.launch(TOY, (1,), (x, y, n, 1, 7, 0.5), {"BLOCK": 64, "TWICE": False}, CPU, None)
    assert len(recording._STUB_PLANS) == 3
    assert launches.count("_toy") == 3 + 2 * 3  # n = 4..6 take Triton's path both times
    assert len(seen) == 3
    assert any("more than 3 launch signatures" in str(w.message) for w in caught)


def test_launch_hooks_see_planned_launches(runs, monkeypatch):
    from triton import knobs

    seen, _ = runs
    metadata = []
    monkeypatch.setattr(recording._StubKernel, "launch_metadata", lambda self, grid, stream, *a: metadata.append(grid) or "md")
    x, y = torch.randn(64), torch.empty(64)
    _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU, None)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda md: None)
    _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU, None)
    assert metadata == [(1, 1, 1)] and len(seen) == 1


def test_off_switch_and_unplannable_launchers(runs, monkeypatch):
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    monkeypatch.setattr(_prebound, "ENABLED", False)
    for _ in range(2):
        _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU, None)
    monkeypatch.setattr(_prebound, "ENABLED", True)

    class Spy:  # as the tests' spies: indexable by a grid, no JITFunction inside
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append("spy")

    for _ in range(2):
        _prebound.launch(Spy(), (1,), toy_args(x, y), {}, CPU, None)
    assert launches == ["_toy", "_toy", "spy", "spy"] and not seen and not recording._STUB_PLANS


def test_lazy_setup_runs_once_a_signature(runs):
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    setups = []

    def setup():
        setups.append(1)
        return (1,), {"BLOCK": 64, "TWICE": False}

    for _ in range(3):
        _prebound.launch_lazy(TOY, toy_args(x, y), ("key",), setup, CPU, None)
    _prebound.launch_lazy(TOY, toy_args(x, y), ("other key",), setup, CPU, None)
    assert len(setups) == 2 and launches == ["_toy", "_toy"] and len(seen) == 2


def test_real_kernels_plan_every_launch_of_a_training_step():
    """The real launch sites, without the interpreter (a subprocess): after one forward and backward,
    every launch of the next is pre-bound (Triton's sm_90a binder agreed with each plan), the plans
    stay out of the real table, and a signature change (an unaligned x) takes Triton's path again."""
    script = textwrap.dedent(
        """
        import torch
        from fastlora.inspect import recording
        from fastlora.ops import _prebound, triton_lora
        from fastlora.ops._device import KNOWN_LIMITS, target_limits

        assert _prebound.ENABLED
        recording._StubKernel.run = lambda self, *args: recording._recording[0].append("planned")
        x, W, b = torch.randn(200, 96), torch.randn(80, 96), torch.randn(80)
        A, B, gy = torch.randn(8, 96), torch.randn(80, 8), torch.randn(200, 80)

        def step(x):
            y, xa = triton_lora.triton_forward(x, W, b, A, B, 2.0, 0.1, torch.tensor(5))
            triton_lora.triton_backward(gy, x, xa, W, A, B, 2.0, 0.1, torch.tensor(9), True, True, True, True)

        with target_limits(KNOWN_LIMITS[(9, 0)]):
            with recording.stubbed_launches([]) as first:
                step(x)
            with recording.stubbed_launches([]) as second:
                step(x)
            x_off = torch.randn(200 * 96 + 1)[1:].view(200, 96)
            with recording.stubbed_launches([]) as third:
                step(x_off)
        plans = list(recording._STUB_PLANS.values())
        print(*(sum(name != "planned" for name in names) for names in (first, second, third)), len(second),
              sum(type(p).__name__ == "_Plan" for p in plans), len(plans),
              len(_prebound._plans))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second, third, second_planned, planned, plans, real = map(int, out.stdout.split()[-7:])
    # first: forward 1 + backward 3 through Triton; second: all 4 planned; third: x is read by the
    # forward and by grad_A's reduction, so those two re-plan.
    assert (first, second, third, second_planned) == (4, 0, 2, 4), out.stdout
    assert planned == plans == 6 and real == 0, out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pre_bound_launches_match_tritons_path_on_the_gpu(monkeypatch, capsys):
    """On a GPU: a training step through plans is bit-identical to Triton's own path (dropout on, a
    bias, odd sizes), on the default stream and on a user stream, every launch of the later steps is
    planned, and the host time per forward is printed both ways (the session's record)."""
    import time

    import fastlora

    x = torch.randn(300, 264, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(200, 264, dtype=torch.bfloat16, device="cuda") / 16
    b = torch.randn(200, dtype=torch.bfloat16, device="cuda")
    A = (torch.randn(16, 264, device="cuda") / 16).requires_grad_()
    B = torch.randn(200, 16, device="cuda").requires_grad_()
    gy = torch.randn(300, 200, dtype=torch.bfloat16, device="cuda")

    def step():
        torch.manual_seed(3)
        y = fastlora.lora_linear(x, w, b, A, B, 2.0, dropout=0.1, backend="triton")
        return (y, *torch.autograd.grad(y, [x, A, B], gy))

    def forward_us():
        with torch.no_grad():
            for _ in range(20):
                fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(200):
                start = time.perf_counter_ns()
                fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
                best = min(best, time.perf_counter_ns() - start)
            torch.cuda.synchronize()
        return best / 1000

    monkeypatch.setattr(_prebound, "ENABLED", False)
    _prebound.clear()
    expected = step()
    triton_us = forward_us()
    monkeypatch.setattr(_prebound, "ENABLED", True)
    step()  # plans every launch of the step
    planned = [p for p in _prebound._plans.values() if p]
    assert len(planned) >= 4, _prebound._plans
    for got in (step(), step()):
        for g, e in zip(got, expected):
            assert torch.equal(g, e)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = step()
    torch.cuda.current_stream().wait_stream(side)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    prebound_us = forward_us()
    with capsys.disabled():
        print(f"\nhost µs per forward (300x264 -> 200, r 16, bf16): Triton's path {triton_us:.1f}, pre-bound {prebound_us:.1f}")
    assert prebound_us < triton_us
