"""``fastlora inspect``: the compiled GPU code of every kernel, on a machine with or without a GPU.

Triton kernels: every op module in ``fastlora/ops/`` that defines ``launch_for_inspection(M, K, N, r,
dtype, adapter_dtype, dropout, backward)`` is run on CPU tensors for each problem, with Triton's launch
entry points (``Autotuner.run``, ``JITFunction.run``) replaced by recorders and ``device_limits``
standing in the target GPU (``target_limits``), so grids and budgets are those of the target. For an
autotuned launch the autotuner's own pruning says which configs can be picked; each kernel ×
specialisation × config × arch is then compiled once (``ops/_triton_compile.py``, which specialises
as the JIT does) and read with Triton's ``cuobjdump``: registers, stack (spills), shared memory and the
SASS instructions that decide speed. Configs the pruner compiled and dropped are listed as not
pickable. One worker process per arch.

``fastlora._C``: ``cuobjdump`` over the built library, every kernel of every arch it carries.

What this cannot tell: time, how the memory system behaves, anything that happens after launch.

The roles live in: ``problems`` (archs, dtypes, the problems and ``Row``), ``recording`` (the launch
interception, shared with ``fastlora census``), ``compiling`` (compile and read), ``report`` (markdown,
JSON, cubins, the command).
"""

from __future__ import annotations

from .compiling import (_cubin_sass, count_sass, extension_library, inspect_arch, inspect_extension,  # noqa: F401
                        inspect_triton)  # fmt: skip
from .problems import (ARCHS, DEFAULT_DROPOUTS, DEFAULT_DTYPES, DEFAULT_RANKS, DEFAULT_SHAPES,  # noqa: F401
                       DEFAULT_TOKENS, DTYPES, SASS_OPS, Problem, Row, make_problems, parse_archs, parse_dtypes,
                       parse_floats, parse_ints)  # fmt: skip
from .recording import Launch, intercepted_launches, op_modules  # noqa: F401
from .report import add_arguments, render_markdown, run, write_cubins  # noqa: F401
