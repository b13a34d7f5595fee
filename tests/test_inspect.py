"""``fastlora inspect`` and the compiler-informed pruning (``ops/_triton_compile.py``), on the CPU.

The end-to-end test compiles every Triton kernel × pickable config for sm_90a and sm_80 in a
subprocess without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled) and fails on a compile
error or on local memory (spills) in a config the autotuner can pick. The others are fast checks of
the parsing, the bad-input messages, the JIT-style specialisation and the pruning's choice.
"""

import json
import os
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from fastlora import inspect as fl_inspect
from fastlora.__main__ import main
from fastlora.ops import _triton_compile

ROOT = Path(__file__).resolve().parent.parent

# Triton's interpreter leaves ``triton.language.core`` patched after every interpreted launch whose
# kernel calls a jit helper of ``triton.language.standard`` (``tl.cdiv``, ...): the nested call's
# ``InterpretedFunction.__call__`` runs ``_patch_lang`` on the helper's globals (``core``) and drops
# the scope that would restore it (triton 3.8; seen: 65 attributes of ``tl.core`` left as interpreter
# wrappers after the first triton test of tests/test_determinism.py). A compile in this process
# after that can bind the wrappers (issue 21 item 6: "'ir.value' object has no attribute 'dtype'"
# at ``tl.arange``, after test_determinism, test_distributed, test_dropout, test_fallbacks and
# test_fuzz, not after any four of them). The language as it was when this module was collected
# (before any test ran a kernel) is put back before each test here.
_LANGUAGE = (tl, tl.core, tl.tensor, tl.dtype, tl.math)
_PRISTINE = [dict(vars(obj)) for obj in _LANGUAGE]


@pytest.fixture(autouse=True)
def pristine_triton_language():
    for obj, attrs in zip(_LANGUAGE, _PRISTINE):
        for name, value in attrs.items():
            if vars(obj).get(name) is not value:
                setattr(obj, name, value)


def _scale_kernel(x_ptr, out_ptr, n, stride, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n)
    tl.store(out_ptr + offs, x * scale, mask=offs < n)


# JITFunction directly, not @triton.jit: the tests run with TRITON_INTERPRET=1, under which the
# decorator makes an interpreted function, which cannot be specialised or compiled.
SCALE = JITFunction(_scale_kernel)


def test_specialisation_follows_the_jit():
    target = _triton_compile.target_of((9, 0))
    x = torch.empty(4096, dtype=torch.bfloat16)
    out = torch.empty(4096, dtype=torch.float32)
    spec = _triton_compile.specialise(SCALE, target, (x, out, 4096, 1, 0.5), {"BLOCK": 128, "num_warps": 4})
    assert spec.signature["x_ptr"] == "*bf16" and spec.signature["out_ptr"] == "*fp32"
    assert spec.signature["stride"] == "constexpr" and spec.constexprs[(3,)] == 1  # an int equal to 1
    assert spec.constexprs[(5,)] == 128
    assert spec.attrs[(2,)] == [["tt.divisibility", 16]]  # 4096: a multiple of 16
    assert spec.attrs[(0,)] == [["tt.divisibility", 16]]  # an aligned pointer
    assert spec.signature["scale"] == "fp32" and spec.options.num_warps == 4

    odd = _triton_compile.specialise(SCALE, target, (x[1:], out, 4095, 3, 0.5), {"BLOCK": 128})
    assert odd.signature["n"] == "i32" and odd.signature["stride"] == "i32"
    assert not odd.attrs.get((2,)) and not odd.attrs.get((3,))  # neither 4095 nor 3 is a multiple of 16
    assert not odd.attrs.get((0,))  # x[1:] is 2 bytes past an aligned address
    assert odd.key() != spec.key()


_COMPILE_IN_A_FRESH_PROCESS = """
import json, torch
from triton.runtime.jit import JITFunction
from fastlora import inspect as fl_inspect
from fastlora.ops import _triton_compile
import test_inspect

kernel = JITFunction(test_inspect._scale_kernel)
target = _triton_compile.target_of((8, 0))
x = torch.empty(4096, dtype=torch.float16)
spec = _triton_compile.specialise(kernel, target, (x, x, 4096, 1, 2.0), {"BLOCK": 256})
compiled = _triton_compile.compile_for(kernel, target, spec)
result = {"error": compiled.error, "again": _triton_compile.compiled_already(kernel, target, spec) is compiled}
if compiled.error is None:
    result.update(resources=list(compiled.resources), elf=compiled.cubin[:4] == b"\\x7fELF",
                  sass=fl_inspect._cubin_sass(compiled.cubin), sass_ops=list(fl_inspect.SASS_OPS))
print(json.dumps(result))
"""


def test_compile_for_reads_registers_and_shared_memory():
    """In a fresh process: a compile in this one would see whatever earlier interpreted launches left
    in ``triton.language`` (Triton's interpreter patches it during each launch), and did fail so in a
    full run (issue 21, item 6); the compile must not depend on the tests before it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("TRITON_INTERPRET", None)  # the kernel module is imported as on a GPU machine
    done = subprocess.run([sys.executable, "-c", _COMPILE_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result["error"]
    registers, stack_bytes, shared_bytes = result["resources"]
    assert registers > 0 and stack_bytes == 0 and shared_bytes >= 0
    assert result["elf"] and result["again"]
    assert set(result["sass"]) == set(result["sass_ops"]) and result["sass"]["STL"] == 0


def _fake_config(name):
    return triton.Config({"NAME": name}, num_warps=4, num_stages=2)


@pytest.mark.parametrize(
    "outcomes, expected",
    [
        ({"a": (0, 1000), "b": (64, 1000), "c": (0, 10**6)}, ["a"]),  # b spills; c overflows shared memory
        ({"a": (128, 1000), "b": (8, 1000), "c": None}, ["b"]),  # all bad: the least spilling; c fails
        ({"a": (0, 1), "b": (0, 2)}, ["a", "b"]),
    ],
)
def test_drop_spilling_keeps_what_the_compiler_allows(monkeypatch, outcomes, expected):
    def compile_for(kernel, target, spec):
        outcome = outcomes[spec]
        if outcome is None:
            return _triton_compile.Compiled("k", None, None, "CompilationError")
        return _triton_compile.Compiled("k", b"", _triton_compile.Resources(100, *outcome), None)

    monkeypatch.setattr(_triton_compile, "INTERPRET", False)
    monkeypatch.setattr(_triton_compile, "specialise", lambda kernel, target, args, kwargs: kwargs["NAME"])
    monkeypatch.setattr(_triton_compile, "compile_for", compile_for)
    configs = [_fake_config(n) for n in outcomes]
    with _triton_compile_limits((8, 0)):
        kept = _triton_compile.drop_spilling(None, configs, {"x": torch.empty(1)})
    assert [c.kwargs["NAME"] for c in kept] == expected


def _triton_compile_limits(capability):
    from fastlora.ops._device import KNOWN_LIMITS, target_limits

    return target_limits(KNOWN_LIMITS[capability])


def test_drop_spilling_compiles_nothing_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton_compile, "INTERPRET", True)
    monkeypatch.setattr(_triton_compile, "compile_for", lambda *a: pytest.fail("compiled under the interpreter"))
    configs = [_fake_config("a"), _fake_config("b")]
    assert _triton_compile.drop_spilling(None, configs, {}) == configs


@pytest.fixture
def pruning_on(monkeypatch):
    """The compiler-informed pruning as on a GPU (not the interpreter's no-op), not yet turned off."""
    monkeypatch.setattr(_triton_compile, "INTERPRET", False)
    monkeypatch.setattr(_triton_compile, "_pruning_off", [])


def test_this_triton_has_every_private_piece_the_pruning_uses():
    assert _triton_compile.missing_private_api() is None


def test_pruning_turns_itself_off_with_one_warning_where_a_private_api_is_missing(monkeypatch, pruning_on):
    """Triton 3.4 has no ``JITFunction._pack_args``: the configs come back as given, never compiled."""
    monkeypatch.delattr(JITFunction, "_pack_args")
    monkeypatch.setattr(_triton_compile, "compile_for", lambda *a: pytest.fail("compiled without the private API"))
    configs = [_fake_config(n) for n in "abc"]
    with pytest.warns(RuntimeWarning, match=r"pruning of Triton configs is off .*JITFunction\._pack_args"):
        assert _triton_compile.drop_spilling(None, configs, {"x": torch.empty(1)}) == configs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a process
        assert _triton_compile.drop_spilling(None, configs[:2], {"x": torch.empty(1)}) == configs[:2]


def test_pruning_turns_itself_off_where_specialising_raises(monkeypatch, pruning_on):
    def changed_binder(kernel, target, args, kwargs):
        raise TypeError("binder() got an unexpected keyword argument 'instrumentation_mode'")

    monkeypatch.setattr(_triton_compile, "specialise", changed_binder)
    configs = [_fake_config(n) for n in "ab"]
    with _triton_compile_limits((9, 0)), pytest.warns(RuntimeWarning, match="raised TypeError: binder"):
        assert _triton_compile.drop_spilling(None, configs, {"x": torch.empty(1)}) == configs


def test_the_formula_pruning_stays_when_the_compilers_is_off(monkeypatch, pruning_on):
    """What the GEMM's pruner keeps without the private API is exactly what its formula keeps."""
    triton_lora = pytest.importorskip("fastlora.ops.triton_lora")
    args = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "la_ptr": torch.empty(1, dtype=torch.bfloat16),
            "out_ptr": torch.empty(1, dtype=torch.bfloat16), "M_BUCKET": 8192, "BLOCK_M_FIXED": 0, "PRECISION": "tf32"}  # fmt: skip
    with _triton_compile_limits((8, 0)):
        from fastlora.ops import _triton_lora_configs  # where the GEMM's pruner looks drop_spilling up

        monkeypatch.setattr(_triton_lora_configs, "drop_spilling", lambda kernel, configs, named_args, **kw: list(configs))
        formula = triton_lora.prune_gemm_configs(triton_lora.GPU_CONFIGS, args, R_PAD=16)
        monkeypatch.undo()
        monkeypatch.setattr(_triton_compile, "INTERPRET", False)
        monkeypatch.setattr(_triton_compile, "_pruning_off", [])
        monkeypatch.delattr(JITFunction, "_pack_args")
        with pytest.warns(RuntimeWarning, match="pruning of Triton configs is off"):
            kept = triton_lora.prune_gemm_configs(triton_lora.GPU_CONFIGS, args, R_PAD=16)
    assert kept == formula and 1 < len(formula) < len(triton_lora.GPU_CONFIGS)


def test_parsing():
    assert fl_inspect.parse_archs("90a, sm_80") == (["90a", "80"], [])
    archs, errors = fl_inspect.parse_archs("90a,75")
    assert archs == ["90a"] and "'75'" in errors[0] and "90a" in errors[0]
    assert fl_inspect.parse_ints("--ranks", "16,64") == (16, 64)
    with pytest.raises(ValueError, match="--tokens"):
        fl_inspect.parse_ints("--tokens", "64,lots")
    with pytest.raises(ValueError, match="--dtypes: unknown int8"):
        fl_inspect.parse_dtypes("bf16,int8")
    with pytest.raises(ValueError, match="--dropout"):
        fl_inspect.parse_floats("--dropout", "0,1.5")
    with pytest.raises(ValueError, match="--shapes: shape '4096by4096'"):
        fl_inspect.make_problems("4096by4096", (64,), (16,), ("bf16",), (0.0,))
    problems = fl_inspect.make_problems("4096x1024,8x512x256", (64, 8192), (16,), ("bf16",), (0.0, 0.1))
    assert len(problems) == 2 * 2 + 1 * 2
    assert fl_inspect.Problem(8, 512, 256, 16, "bf16", 0.1) in problems


def test_count_sass_counts_predicated_instructions():
    sass = """
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0110*/              @!P0 LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*0120*/               @P1 STL.64 [R1+0x8], R10 ;
        /*0130*/                   LDL R2, [R1] ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
    """
    counts = fl_inspect.count_sass(sass)
    assert counts["HGMMA"] == 2 and counts["LDGSTS"] == 1 and counts["STL"] == 1 and counts["LDL"] == 1
    assert counts["HMMA"] == 0 and counts["UTMALDG"] == 0


def test_extension_rows_from_cuobjdump(monkeypatch):
    res_usage = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Function _Z6kernelPf:
  REG:120 STACK:0 SHARED:20480 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
Resource usage:
 Function _Z6kernelPf:
  REG:96 STACK:16 SHARED:20480 LOCAL:8 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    sass = """
	code for sm_80
		Function : _Z6kernelPf
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
	code for sm_90a
		Function : _Z6kernelPf
        /*0000*/                   STL [R1], R2 ;
"""
    outputs = {"-res-usage": res_usage, "-sass": sass}
    monkeypatch.setattr(_triton_compile, "cuobjdump", lambda path, flag: outputs[flag])
    rows = fl_inspect.inspect_extension("lib.so")
    assert [(r.kernel, r.arch, r.registers, r.stack_bytes) for r in rows] == [("kernel", "80", 120, 0), ("kernel", "90a", 96, 24)]
    assert rows[0].sass["HMMA"] == 1 and rows[1].sass["STL"] == 1 and rows[1].spills


def test_bad_input_is_named_and_the_rest_still_prints(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fl_inspect.compiling, "extension_library", lambda: None)
    code = main(["inspect", "--arch", "90a,75", "--shapes", "4096by4096"])
    out = capsys.readouterr().out
    assert code == 2
    assert "--arch: cannot target '75'" in out
    assert "--shapes: shape '4096by4096'" in out
    assert "TRITON_INTERPRET=1 is set" in out and "env -u TRITON_INTERPRET" in out
    assert "fastlora._C not built" in out and ".ci/build_cuda.sh" in out


def test_every_kernel_and_pickable_config_compiles_without_spills(tmp_path):
    """sm_90a and sm_80, one problem that launches every kernel (forward and backward, with dropout,
    whose epilogue is the register-heaviest) at training size, so that every config is pickable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    report = tmp_path / "inspect.json"
    args = ["--arch", "90a,80", "--shapes", "4096x4096", "--tokens", "8192", "--ranks", "16", "--dtypes", "bf16",
            "--dropout", "0.1", "--json", str(report)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "fastlora", "inspect", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert report.exists(), done.stdout + done.stderr
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert not [m for m in data["messages"] if m.startswith("error")], data["messages"]
    assert not [(r["kernel"], r["arch"], r["config"], r["error"]) for r in rows if r["error"]]
    spilling = [(r["kernel"], r["arch"], r["config"], r["stack_bytes"]) for r in rows if r["pickable"] and r["spills"]]
    assert not spilling
    kernels = {r["kernel"] for r in rows}
    assert {"_lora_gemm_kernel", "_lora_reduce_kernel", "_grouped_reduce_kernel", "_qlora_matmul_kernel"} <= kernels
    for kernel in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == kernel and r["pickable"]} == {"90a", "80"}, kernel
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
