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
from fastlora.ops import _host_programs, _prebound

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
        _prebound.launch(TUNED, grid, toy_args(x, y), {"TWICE": True}, CPU)
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
        _prebound.launch(TOY, (1,), toy_args(x, y, seed, scale), {"BLOCK": 64, "TWICE": False}, CPU)
    assert launches == ["_toy"]
    assert [full[4:6] for _, full in seen] == [(16, 2.0), (12345, 3.5)]
    # A seed past int32 is typed i64 by the binder, past int64 u64: new signatures.
    _prebound.launch(TOY, (1,), toy_args(x, y, 2**40), {"BLOCK": 64, "TWICE": False}, CPU)
    _prebound.launch(TOY, (1,), toy_args(x, y, 2**41), {"BLOCK": 64, "TWICE": False}, CPU)
    _prebound.launch(TOY, (1,), toy_args(x, y, 2**63), {"BLOCK": 64, "TWICE": False}, CPU)
    assert launches == ["_toy", "_toy", "_toy"]


@pytest.mark.parametrize(
    "change",
    ["unaligned pointer", "int value", "int equal to 1", "dtype", "constexpr", "float passed as int"],
)
def test_every_specialised_property_gets_its_own_plan(runs, change):
    seen, launches = runs
    base = torch.randn(80)
    x, y = base[:64], torch.empty(64)
    args, kwargs, grid = toy_args(x, y), {"BLOCK": 64, "TWICE": False}, (1,)
    _prebound.launch(TOY, grid, args, kwargs, CPU)
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
    else:
        args = (x, y, 64, 1, 7, 1)  # scale an int: typed i32, another kernel
    _prebound.launch(TOY, grid, args, kwargs, CPU)
    assert launches == ["_toy", "_toy"], f"{change}: must not reuse the first call's plan"
    assert not seen


def test_free_ints_share_a_plan_and_the_grid_follows_them(runs):
    """``n`` free (as M at the real call sites): one plan for every n of one specialisation class,
    the grid function evaluated on each call with the plan's config; n = 1 or a multiple of 16 is
    another class (the binder specialises on both), so another plan."""
    seen, launches = runs
    x, y = torch.randn(600), torch.empty(600)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731  (reads n at call time)
    block = None
    for n in (301, 299, 555, 7):
        _prebound.launch(TUNED, grid, (x, y, n, 1, 7, 0.5), {"TWICE": False}, CPU, free=("n",))
        block = TUNED.best_config.kwargs["BLOCK"] if block is None else block
    assert launches == ["_toy"]
    assert [(g, full[2]) for g, full in seen] == [((triton.cdiv(n, block), 1, 1), n) for n in (299, 555, 7)]
    for n in (1, 32, 48, 2):  # 1: ==1; 32: %16 (48 reuses it); 2 the first class again
        _prebound.launch(TUNED, grid, (x, y, n, 1, 7, 0.5), {"TWICE": False}, CPU, free=("n",))
    assert launches == ["_toy"] * 3 and [full[2] for _, full in seen[3:]] == [48, 2]
    with pytest.raises(ValueError, match="not parameters"):
        _prebound.launch(TUNED, grid, (x, y, 5, 1, 7, 0.5), {"TWICE": False}, CPU, free=("rows",))


def test_grid_is_read_on_every_call(runs):
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    for grid in ((1,), (3, 2), (5,)):
        _prebound.launch(TOY, grid, toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    assert launches == ["_toy"] and [g for g, _ in seen] == [(3, 2, 1), (5, 1, 1)]


def test_unknown_triton_or_hooks_mean_no_plan(runs, monkeypatch):
    """A Triton outside the releases whose launch protocol was read, or a hook Triton's path would run
    on every call (the JIT's pre-run hooks): Triton's path every time."""
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    monkeypatch.setattr(triton, "__version__", "4.0.0")
    for _ in range(2):
        _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    monkeypatch.undo()
    monkeypatch.setattr(_prebound, "ENABLED", True)
    recording._STUB_PLANS.clear()
    TOY.pre_run_hooks.append(lambda *a, **k: None)
    try:
        for _ in range(2):
            _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    finally:
        TOY.pre_run_hooks.clear()
    assert launches == ["_toy"] * 4 and not seen


def test_triton_debug_option_is_part_of_the_signature(runs, monkeypatch):
    from triton import knobs

    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    assert launches == ["_toy", "_toy"] and not seen


def test_plans_hold_no_tensor_of_their_first_call(runs):
    """A plan lives for the process: it must not keep the first call's tensors allocated (on a GPU,
    activations and gradients of a whole step)."""
    import gc
    import weakref

    seen, launches = runs
    x, y = torch.randn(300), torch.empty(300)
    grid = lambda meta: (triton.cdiv(300, meta["BLOCK"]),)  # noqa: E731
    _prebound.launch(TUNED, grid, toy_args(x, y), {"TWICE": True}, CPU)
    refs = [weakref.ref(x), weakref.ref(y)]
    del x, y
    gc.collect()
    assert recording._STUB_PLANS and all(ref() is None for ref in refs)
    plan = next(iter(recording._STUB_PLANS.values()))
    assert not any(isinstance(v, torch.Tensor) for v in plan.meta.values()) and "BLOCK" in plan.meta


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
        _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
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
            _prebound.launch(TOY, (1,), (x, y, n, 1, 7, 0.5), {"BLOCK": 64, "TWICE": False}, CPU)
    assert launches == ["_toy"] * 3 and not seen
    messages = [str(w.message) for w in caught if "pre-bound" in str(w.message)]
    assert len(messages) == 1 and "AttributeError: device_caches" in messages[0]


def test_plans_are_bounded(runs, monkeypatch):
    """A full table is emptied (plans are remade as called), with one warning."""
    seen, launches = runs
    monkeypatch.setattr(_prebound, "_MAX_PLANS", 3)
    _prebound._warned.discard("the plan table")
    x, y = torch.randn(64), torch.empty(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (2, 3, 4, 5, 5, 2):
            _prebound.launch(TOY, (1,), (x, y, n, 1, 7, 0.5), {"BLOCK": 64, "TWICE": False}, CPU)
    # 2, 3, 4 fill it; 5 empties it and is planned (its repeat runs planned); 2 is remade.
    assert len(recording._STUB_PLANS) == 2 and len(launches) == 5 and len(seen) == 1
    assert sum("3 launch signatures: emptied" in str(w.message) for w in caught) == 1


def test_launch_hooks_see_planned_launches(runs, monkeypatch):
    from triton import knobs

    seen, _ = runs
    metadata = []
    monkeypatch.setattr(recording._StubKernel, "launch_metadata", lambda self, grid, stream, *a: metadata.append(grid) or "md")
    x, y = torch.randn(64), torch.empty(64)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    assert metadata == []  # no hook: no metadata, as JITFunction.run
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda md: None)  # a profiler attaches later
    _prebound.launch(TOY, (2,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    assert metadata == [(2,)] and len(seen) == 2  # the grid as given, as JITFunction.run passes it


def test_off_switch_and_unplannable_launchers(runs, monkeypatch):
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    monkeypatch.setattr(_prebound, "ENABLED", False)
    for _ in range(2):
        _prebound.launch(TOY, (1,), toy_args(x, y), {"BLOCK": 64, "TWICE": False}, CPU)
    monkeypatch.setattr(_prebound, "ENABLED", True)

    class Spy:  # as the tests' spies: indexable by a grid, no JITFunction inside
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append("spy")

    for _ in range(2):
        _prebound.launch(Spy(), (1,), toy_args(x, y), {}, CPU)
    assert launches == ["_toy", "_toy", "spy", "spy"] and not seen and not recording._STUB_PLANS


def test_lazy_setup_runs_once_a_signature(runs):
    seen, launches = runs
    x, y = torch.randn(64), torch.empty(64)
    setups = []

    def setup():
        setups.append(1)
        return {"BLOCK": 64, "TWICE": False}

    for _ in range(3):
        _prebound.launch_lazy(TOY, (1,), toy_args(x, y), ("key",), setup, CPU)
    _prebound.launch_lazy(TOY, (1,), toy_args(x, y), ("other key",), setup, CPU)
    assert len(setups) == 2 and launches == ["_toy", "_toy"] and len(seen) == 2


# ---- launch_keyed: the call site's own signature, and its hit path in C (fastlora._prebound_c) ----

def _modes():
    """The hit paths to run: Python always, C where the module is built."""
    modes = ["python"]
    try:
        import fastlora._prebound_c  # noqa: F401

        modes.append("c")
    except ImportError:
        pass
    return modes


@pytest.fixture(params=["python", "c"])
def hit_path(request, monkeypatch):
    if request.param not in _modes():
        pytest.skip("fastlora._prebound_c is not built here")
    module = None
    if request.param == "c":
        import fastlora._prebound_c as module
    _prebound._triton_options()  # knobs imported, as _accelerated() does
    monkeypatch.setattr(_prebound, "_ACCEL", [module])
    return request.param


def _keyed(x, y, n, stride, seed, scale, grid=(1,)):
    """A keyed TUNED launch whose key holds what is not free (n) or do_not_specialize (seed)."""
    return _prebound.launch_keyed(
        TUNED, grid, (x, y, n, stride, seed, scale), (stride,), (x, y), lambda: {"TWICE": False}, CPU, free=("n",)
    )  # fmt: skip


def test_keyed_launches_plan_and_pass_what_the_generic_path_passes(runs, hit_path):
    seen, launches = runs
    x, y = torch.randn(600), torch.empty(600)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    calls = [(301, 7, 0.5), (299, 2**40, 1.5), (555, 9, 2.0), (1, 3, 0.5), (32, 3, 0.5), (48, 4, 0.25)]
    for n, seed, scale in calls:
        _keyed(x, y, n, 1, seed, scale, grid)
    block = TUNED.best_config.kwargs["BLOCK"]
    # Through Triton: the first call, a seed past int32 (i64), n == 1, n % 16 == 0. Planned: 555 (301's
    # classes, another seed and scale) and 48 (32's), with their own n, seed, scale and grid.
    assert launches == ["_toy"] * 4
    assert seen == [
        ((triton.cdiv(555, block), 1, 1), (x, y, 555, 1, 9, 2.0, block, False)),
        ((triton.cdiv(48, block), 1, 1), (x, y, 48, 1, 4, 0.25, block, False)),
    ]
    _keyed(torch.randn(601)[1:], y, 555, 1, 11, 3.0, grid)  # an unaligned x: another signature
    _keyed(x, y, 555, 2, 11, 3.0, grid)  # another stride (in the key): another signature
    _keyed(x.double(), y, 555, 1, 11, 3.0, grid)  # another dtype
    assert launches == ["_toy"] * 7 and len(seen) == 2


def test_c_signature_is_pythons():
    accel = pytest.importorskip("fastlora._prebound_c")
    found = _prebound._jit_of(TOY, ("n",))
    base = torch.randn(100)
    cases = []
    for x in (base[:64], base[1:65], base.double()[:64], base.to(torch.bfloat16)[3:]):
        for n in (0, 1, 16, 7, -16, -3, 2**31, 2**40, 2**63, -(2**63) - 1):
            for seed in (0, 1, 2**31 - 1, 2**31, -(2**31), 2**63 - 1, 2**63, 2**64 + 5):
                cases.append((x, torch.empty(4), n, 1, seed, 0.5))
    head = ("keyed", found[7], CPU)
    options = _prebound._triton_options()
    for args in cases:
        tensors = (args[0], args[1], args[0])
        want = _prebound._keyed_signature(TOY, CPU, ("k", args[3]), args, tensors, found)
        got = accel.signature(head, ("k", args[3]), options, tensors, args, found[5], found[6])
        assert got == want and hash(got) == hash(want), args[2:]

    class NoStorage:  # what torch raises for a tensor whose data pointer cannot be read
        dtype = torch.float32

        def data_ptr(self):
            raise RuntimeError("no storage")

    bad = (NoStorage(), torch.empty(4), 5, 1, 7, 0.5)
    assert accel.signature(head, (), options, bad[:2], bad, found[5], found[6]) is None
    assert _prebound._keyed_signature(TOY, CPU, (), bad, bad[:2], found) is None
    with pytest.raises(IndexError, match="out of range"):  # a position past the arguments: an error, not a crash
        accel.signature(head, (), options, cases[0][:2], cases[0][:3], (4,), ())


def test_a_stale_c_module_is_not_used(monkeypatch):
    """An editable install keeps an old fastlora._prebound_c until it is rebuilt: one whose API_VERSION
    is not the one launch_keyed calls is left out, with a warning, and launches take the Python path."""
    import types

    stale = types.ModuleType("fastlora._prebound_c")
    stale.API_VERSION = _prebound._ACCEL_API - 1
    import fastlora

    monkeypatch.setitem(sys.modules, "fastlora._prebound_c", stale)
    monkeypatch.setattr(fastlora, "_prebound_c", stale, raising=False)
    monkeypatch.setattr(_prebound, "_ACCEL", [])
    monkeypatch.delenv("FASTLORA_PREBOUND_C", raising=False)
    with pytest.warns(UserWarning, match="stale"):
        assert _prebound._accelerated() is None


def test_keyed_hit_path_runs_launch_hooks(runs, hit_path, monkeypatch):
    """Hooks as on Triton's own path: an empty HookChain (3.6-3.8's default) or None passes no hook and
    builds no metadata; a chain with a hook, or a plain function, gets the metadata of the grid given."""
    from triton import knobs
    from triton.knobs import HookChain

    seen, _ = runs
    metadata, passed = [], []
    monkeypatch.setattr(recording._StubKernel, "launch_metadata", lambda self, grid, stream, *a: metadata.append(grid) or "md")
    monkeypatch.setattr(recording._StubKernel, "run", lambda self, g0, g1, g2, st, fn, pk, md, enter, leave, *full: passed.append((md, enter, leave)))  # noqa: E501
    x, y = torch.randn(64), torch.empty(64)
    chain = HookChain()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", HookChain())
    _keyed(x, y, 64, 1, 7, 0.5)
    _keyed(x, y, 64, 1, 7, 0.5)
    assert metadata == [] and passed == [(None, None, None)]
    chain.add(lambda md: None)
    _keyed(x, y, 64, 1, 7, 0.5, grid=(3, 2))
    assert metadata == [(3, 2)] and passed[-1][0] == "md" and passed[-1][1] is chain
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", lambda md: None)  # a plain function is a hook
    _keyed(x, y, 64, 1, 7, 0.5)
    assert len(metadata) == 2 and passed[-1][0] == "md" and passed[-1][1] is None


def test_check_mode_catches_a_key_that_misses_an_argument(runs, monkeypatch):
    """FASTLORA_PREBOUND_CHECK (``_prebound.CHECK``): a key without the stride lets two launches with
    different strides share a plan; the check sees the generic signatures differ and raises."""
    monkeypatch.setattr(_prebound, "CHECK", True)
    x, y = torch.randn(600), torch.empty(600)

    def incomplete(stride):
        return _prebound.launch_keyed(
            TUNED, (1,), (x, y, 64, stride, 7, 0.5), (), (x, y), lambda: {"TWICE": False}, CPU, free=("n",)
        )  # fmt: skip

    incomplete(1)
    incomplete(1)  # checked, agrees
    with pytest.raises(AssertionError, match="misses something"):
        incomplete(2)


def test_keyed_sites_keep_their_promise():
    """The real launch sites with FASTLORA_PREBOUND_CHECK=1, without the interpreter (a subprocess):
    for dtypes, fp32 adapters, with and without bias and dropout, strided and unaligned inputs, split-K
    decode, several batch sizes and gradient subsets, every planned launch's generic signature is the
    one its plan was made for (``launch_keyed``'s check raises otherwise), the C signature is the
    Python one, every replayed host program launches what its call's own body launches
    (``_host_programs``' check raises otherwise), and every launch but the first of each signature
    is planned."""
    script = textwrap.dedent(
        """
        import itertools, torch
        from fastlora.inspect import recording
        from fastlora.ops import _host_programs, _prebound, triton_lora
        from fastlora.ops._device import KNOWN_LIMITS, target_limits

        assert _prebound.ENABLED and _prebound.CHECK
        recording._StubKernel.run = lambda self, *args: recording._recording[0].append("planned")
        counts = []
        with target_limits(KNOWN_LIMITS[(9, 0)]):
            for dtype, adapters, bias, p, layout, M in itertools.product(
                (torch.float32, torch.bfloat16), ("same", "fp32"), (True, False), (0.0, 0.1),
                ("contiguous", "strided", "unaligned"), (200, 8),
            ):
                K, N, r = (1024, 96, 8) if M == 8 else (96, 80, 8)
                adapter = torch.float32 if adapters == "fp32" else dtype
                W, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype) if bias else None
                A, B = torch.randn(r, K, dtype=adapter), torch.randn(N, r, dtype=adapter)
                if layout == "strided":
                    x = torch.randn(M, 2 * K, dtype=dtype)[:, ::2]
                elif layout == "unaligned":
                    x = torch.randn(M * K + 1, dtype=dtype)[1:].view(M, K)
                else:
                    x = torch.randn(M, K, dtype=dtype)
                gy = torch.randn(M, N, dtype=dtype)
                for need in ((True, True, True, bias), (False, True, True, False), (True, False, False, False)):
                    # 1: through Triton; 2: planned, host programs recorded; 3: replayed and checked.
                    # The op's backward (placeholders) and the eager Function's (host programs) alternate.
                    for rep in range(3):
                        backward = triton_lora._eager_backward if rep != 1 or need[0] else triton_lora.triton_backward
                        with recording.stubbed_launches([]) as names:
                            y, xa = triton_lora.triton_forward(x, W, b, A, B, 2.0, p, torch.tensor(5 + rep))
                            backward(gy, x, xa, W, A, B, 2.0, p, torch.tensor(9 + rep), *need)
                        if rep:
                            counts.append(sum(n != "planned" for n in names))
        programs = len(recording._STUB_PLANS.get(_host_programs._TABLE, {}))
        print("programs", programs, "unplanned-on-repeat", sum(counts), "checked", len(counts) // 2)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FASTLORA_PREBOUND_CHECK"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    assert words[-3:] == ["0", "checked", "288"], out.stdout
    # Host programs: 72 forwards (96 problems, but fp32 inputs with "same" and "fp32" adapters are one)
    # and 144 backwards (3 gradient subsets of the 72, which the bias's presence does not change but
    # for the subset that asks for its gradient).
    assert int(words[-5]) == 216, out.stdout


def test_real_kernels_plan_every_launch_of_a_training_step():
    """The real launch sites, without the interpreter (a subprocess): after one forward and backward,
    every launch of the next is pre-bound (Triton's sm_90a binder agreed with each plan), the plans
    stay out of the real table, and a signature change (an unaligned x) takes Triton's path again."""
    script = textwrap.dedent(
        """
        import torch
        from fastlora.inspect import recording
        from fastlora.ops import _host_programs, _prebound, triton_lora
        from fastlora.ops._device import KNOWN_LIMITS, target_limits

        assert _prebound.ENABLED
        recording._StubKernel.run = lambda self, *args: recording._recording[0].append("planned")
        x, W, b = torch.randn(200, 96), torch.randn(80, 96), torch.randn(80)
        A, B, gy = torch.randn(8, 96), torch.randn(80, 8), torch.randn(200, 80)

        def step(x):  # the backward as the eager Function calls it (no placeholders)
            y, xa = triton_lora.triton_forward(x, W, b, A, B, 2.0, 0.1, torch.tensor(5))
            triton_lora._eager_backward(gy, x, xa, W, A, B, 2.0, 0.1, torch.tensor(9), True, True, True, True)

        with target_limits(KNOWN_LIMITS[(9, 0)]):
            with recording.stubbed_launches([]) as first:
                step(x)
            with recording.stubbed_launches([]) as second:
                step(x)
            x_off = torch.randn(200 * 96 + 1)[1:].view(200, 96)
            with recording.stubbed_launches([]) as third:
                step(x_off)
            gy = torch.randn(233, 80)
            with recording.stubbed_launches([]) as other_m:  # another batch size: the same plans
                step(torch.randn(233, 96))
            gy = torch.randn(200, 80)
            with recording.stubbed_launches([]) as replayed:  # x again: its host programs replay the step
                step(x)
        plans = [p for k, p in recording._STUB_PLANS.items() if k != _host_programs._TABLE]
        programs = recording._STUB_PLANS.get(_host_programs._TABLE, {})
        print(*(sum(name != "planned" for name in names) for names in (first, second, third, other_m)), len(second),
              sum(type(p).__name__ == "_Plan" for p in plans), len(plans),
              len(_prebound._plans), len(programs), replayed.count("planned"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second, third, other_m, second_planned, planned, plans, real, programs, replayed = map(
        int, out.stdout.split()[-10:]
    )  # fmt: skip
    # first: forward 1 + backward 3 through Triton; second: all 4 planned; third: x is read by the
    # forward and by grad_A's reduction, so those two re-plan; M 200 -> 233 (the same
    # specialisation classes of every row count): no new plan. Host programs: a forward and a
    # backward recorded by each call whose launches were all planned (second, other_m), replayed by
    # the last call (its 4 launches through the same plans).
    assert (first, second, third, other_m, second_planned) == (4, 0, 2, 0, 4), out.stdout
    assert planned == plans == 6 and real == 0, out.stdout
    assert programs == 4 and replayed == 4, out.stdout


def test_host_programs_replay_through_the_tests_allocator_and_step_aside():
    """Host programs (``_host_programs``), the real sites in a subprocess: a replay allocates through
    ``_triton_common._empty`` (so the suite's NaN poisoning reaches replayed buffers), makes the same
    4 planned launches, and is not used when programs are off or inside a CUDA-graph capture (the
    capture flag set by hand: the flag workspace of a capture must be a fresh one)."""
    script = textwrap.dedent(
        """
        import torch
        from fastlora.inspect import recording
        from fastlora.ops import _host_programs, _triton_common, triton_lora
        from fastlora.ops._device import KNOWN_LIMITS, target_limits

        recording._StubKernel.run = lambda self, *args: recording._recording[0].append("planned")
        x, W, b = torch.randn(200, 96), torch.randn(80, 96), torch.randn(80)
        A, B, gy = torch.randn(8, 96), torch.randn(80, 8), torch.randn(200, 80)
        replays = []
        replay = _host_programs.Program.replay
        _host_programs.Program.replay = lambda self, *a, **k: replays.append(1) or replay(self, *a, **k)

        def step():
            with recording.stubbed_launches([]) as names:
                y, xa = triton_lora.triton_forward(x, W, b, A, B, 2.0, 0.1, torch.tensor(5))
                grads = triton_lora._eager_backward(gy, x, xa, W, A, B, 2.0, 0.1, torch.tensor(9), True, True, True, True)
            return names, y, grads

        with target_limits(KNOWN_LIMITS[(9, 0)]):
            step(), step()  # through Triton, then planned and recorded
            empty = _triton_common._empty
            _triton_common._empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))
            names, y, grads = step()
            _triton_common._empty = empty
            print("replayed", len(replays), "planned", names.count("planned"), "poisoned",
                  bool(y.isnan().all() and all(g.isnan().all() for g in grads)))
            _host_programs.ENABLED = False
            step()
            _host_programs.ENABLED = True
            print("off", len(replays))
            _triton_common._launch_state.capturing = True
            names, _, _ = step()
            _triton_common._launch_state.capturing = False
            print("capturing", len(replays), names.count("planned"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLORA_PREBOUND_CHECK")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert "replayed 2 planned 4 poisoned True" in lines, out.stdout
    assert "off 2" in lines and "capturing 2 4" in lines, out.stdout


def _planned_like_triton(monkeypatch, call, replays: int):
    """``call(seed)`` (returning tensors) through Triton's path with seed 7, then through plans with
    seeds 1 (planning every launch) and 2 (recording the host programs), then with seed 7 again: that
    last call must be bit-identical to Triton's, replay ``replays`` host programs (one a Triton forward
    and one an eager backward; a replay keeping a recorded seed would differ), and reach
    neither Triton's launch path (a spy on ``JITFunction.run`` / ``Autotuner.run``) nor leave a
    signature unplanned."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setenv("FASTLORA_TRITON_BACKWARD", "fused")  # (the split variant has no host programs)
    monkeypatch.setattr(_prebound, "ENABLED", False)
    _prebound.clear()
    expected = call(7)
    monkeypatch.setattr(_prebound, "ENABLED", True)
    call(1)  # plans every launch
    call(2)  # records the host programs
    through_triton, replayed = [], []
    for cls in (JITFunction, Autotuner):
        original = cls.run

        def spy(self, *args, _original=original, **kwargs):
            through_triton.append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", spy)
    replay = _host_programs.Program.replay
    monkeypatch.setattr(_host_programs.Program, "replay", lambda self, *a, **k: replayed.append(1) or replay(self, *a, **k))
    got = call(7)
    monkeypatch.undo()
    monkeypatch.setattr(_prebound, "ENABLED", True)
    assert not through_triton, f"{len(through_triton)} launches took Triton's path on a planned call"
    assert len(replayed) == replays, f"{len(replayed)} host programs replayed, not {replays}"
    plans = {k: p for k, p in _prebound._plans.items() if k != _host_programs._TABLE}
    assert plans and all(plans.values()), "a signature was left unplanned"
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    return got


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpu_layer(M, K, N, r, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, K, dtype=dtype, device="cuda", generator=g).requires_grad_()
    w = torch.randn(N, K, dtype=dtype, device="cuda", generator=g) / K**0.5
    b = torch.randn(N, dtype=dtype, device="cuda", generator=g)
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).requires_grad_()
    B = torch.randn(N, r, device="cuda", generator=g).requires_grad_()
    gy = torch.randn(M, N, dtype=dtype, device="cuda", generator=g)
    return x, w, b, A, B, gy


@pytest.mark.parametrize(
    "M, K, N, dropout",
    # Few shapes: every new (M bucket, N, K) autotunes, which compiles each candidate config.
    [(300, 264, 200, 0.1), (8, 1024, 200, 0.0)],
    ids=["odd-dropout", "split-k-decode"],
)
def test_gpu_training_step_through_plans_is_tritons(monkeypatch, M, K, N, dropout):
    import fastlora

    x, w, b, A, B, gy = _gpu_layer(M, K, N, 16)

    def step(seed):
        torch.manual_seed(seed)
        y = fastlora.lora_linear(x, w, b, A, B, 2.0, dropout=dropout, backend="triton")
        return (y, *torch.autograd.grad(y, [x, A, B], gy))

    _planned_like_triton(monkeypatch, step, replays=2)


def test_gpu_interleaved_batches_user_stream_and_capture(monkeypatch):
    """Batch sizes interleaved (one plan set serves the rows of each specialisation class), a user
    stream, and a CUDA graph captured after eager warm-up replaying the planned launches."""
    import fastlora

    layers = {M: _gpu_layer(M, 264, 200, 16) for M in (300, 301, 260, 333)}  # one M bucket: one autotuning
    x_off = torch.randn(300 * 264 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(300, 264)

    def step(M, x=None):
        x0, w, b, A, B, gy = layers[M]
        x = x0 if x is None else x
        y = fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
        return (y, *torch.autograd.grad(y, [A, B], gy))

    def all_batches(seed=0):  # (no dropout: the seed is not used)
        return tuple(t for M in (300, 301, 260, 300, 333) for t in step(M)) + step(300, x_off)

    expected = _planned_like_triton(monkeypatch, all_batches, replays=12)  # 6 forwards, 6 backwards
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # host programs replayed on a user stream: its own flag workspace
        got = all_batches()
    torch.cuda.current_stream().wait_stream(side)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    static = step(300)  # warmed up above; captured now through the plans
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(300)
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(captured, static, strict=True):
        assert torch.equal(g, e)


def test_gpu_profiler_hook_sees_planned_launches(monkeypatch):
    from triton import knobs

    import fastlora

    x, w, b, A, B, _ = _gpu_layer(300, 264, 200, 16)
    with torch.no_grad():
        for _ in range(2):
            fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
        names = []
        hook = lambda metadata: names.append(metadata.get()["name"])  # noqa: E731
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
            torch.cuda.synchronize()
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
    assert names == ["_lora_gemm_kernel"]


def test_gpu_qlora_through_plans(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    import fastlora
    from fastlora import qlora

    linear = torch.nn.Linear(264, 200, device="cuda", dtype=torch.bfloat16)
    layer = qlora.quantize_linear(linear, "nf4", 64, True, compute_dtype=torch.bfloat16)
    x, _, b, A, B, gy = _gpu_layer(300, 264, 200, 16)

    base = qlora.base_weight(layer.weight, layer.compute_dtype)

    def step(seed):
        torch.manual_seed(seed)
        y = base.lora_linear(x, b, A, B, 2.0, 0.1, "triton")
        return (y, *torch.autograd.grad(y, [x, A, B], gy))

    _planned_like_triton(monkeypatch, step, replays=0)  # (QLoRA's ops have no host programs)


def test_gpu_host_time_per_forward(monkeypatch, capsys):
    """The session's record: host µs per forward call through Triton's path and through plans."""
    import time

    import fastlora

    x, w, b, A, B, _ = _gpu_layer(300, 264, 200, 16)

    def forward_us():
        with torch.no_grad():
            for _ in range(20):
                fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(300):
                start = time.perf_counter_ns()
                fastlora.lora_linear(x, w, b, A, B, 2.0, backend="triton")
                best = min(best, time.perf_counter_ns() - start)
            torch.cuda.synchronize()
        return best / 1000

    monkeypatch.setattr(_prebound, "ENABLED", False)
    triton_us = forward_us()
    monkeypatch.setattr(_prebound, "ENABLED", True)
    prebound_us = forward_us()
    with capsys.disabled():
        print(f"\nhost µs per forward (300x264 -> 200, r 16, bf16): Triton's path {triton_us:.1f}, pre-bound {prebound_us:.1f}")
    assert prebound_us < triton_us


for _name in [n for n in list(globals()) if n.startswith("test_gpu_")]:
    for _mark in GPU:
        globals()[_name] = _mark(globals()[_name])


def test_matmul_precision_survives_torchs_per_backend_api():
    """After ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (the new API) torch's legacy getter
    raises; the launchers' and the tolerance table's ``matmul_precision`` reads the new setting. In a
    subprocess: the setting is process-wide."""
    script = textwrap.dedent(
        """
        import torch
        from fastlora._tolerance import matmul_precision, tolerance
        from fastlora.ops._triton_common import _precisions
        assert matmul_precision() == "highest"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        try:
            torch.get_float32_matmul_precision()
            mixed = False
        except RuntimeError:
            mixed = True
        print(mixed, matmul_precision(), _precisions(torch.float32)[0], tolerance(torch.float32, "cuda"))
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        print(matmul_precision(), _precisions(torch.float32)[0])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.split("\n")[-3:-1]
    mixed, precision, dot, tol = first.split()
    assert (precision, dot, float(tol)) == ("high", "tf32", 5e-4), first
    assert second.split() == ["highest", "ieee"], second
    assert mixed in ("True", "False")  # the torch here raises (2.14); an older one may not
