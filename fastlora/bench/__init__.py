"""Benchmarks of the LoRA linear layer: fastlora's backends against the usual compositions.

Shared by ``fastlora bench`` (``fastlora/__main__.py``) and ``pytest benchmarks/``:

``cases``      shapes of real models, the grids, each case's inputs and FLOP count
``providers``  the registry of implementations (base, naive, peft, addmm, fastlora-*, compiled)
``workload``   a provider set up for a case: its timed step and its check against float64
``timing``     interleaved median timing (CUDA events or perf_counter), peak memory
``runner``     check-then-time over cases and providers, ratios to ``base``
``report``     markdown, JSON, CSV; ``plot``: the PNG of ratios
"""

from .._quiet import quiet_foreign_logs

# The bench imports PEFT (bitsandbytes with it) and runs torch.compile on the CPU, which log two
# messages that say nothing about fastlora (listed in fastlora/_quiet.py): drop those two.
quiet_foreign_logs()
