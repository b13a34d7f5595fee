"""A pytest plugin (``-p peft_suite_plugin``) for running PEFT's own test suite with fastlora patched in.

Loaded in both runs of ``benchmarks/peft_suite.py``, so that the two differ only in the patching:

- Always: PEFT's test helpers import ``diffusers`` (``testing_common``) and ``datasets``
  (``testing_utils``) at module level, for tests outside the LoRA/DoRA selection. Where those
  packages are not installed, a stub module stands in; anything taken from it raises
  ``ModuleNotFoundError`` when used, so a test that really needs one fails the same way in both runs.
- With ``FASTLORA_PEFT_SUITE_PATCH=1``: every model that PEFT's public constructors return
  (``get_peft_model``, ``inject_adapter_in_model``, ``PeftModel.from_pretrained``, and the model after
  ``PeftModel.add_adapter`` / ``load_adapter``, which may create new LoRA layers) gets
  ``fastlora.patch_peft(model, backend=$FASTLORA_PEFT_SUITE_BACKEND or "auto")``. The warning that
  lists layers left on PEFT's forward is swallowed (the tests count warnings), and a model with no
  PEFT LoRA layer (an IA3 or LoHa model, say), for which ``patch_peft`` raises ``ValueError``, is
  left alone. Any other error from ``patch_peft`` propagates and fails the test: that is a fastlora bug.

Selection: ``$FASTLORA_PEFT_SUITE_SELECT`` and ``$FASTLORA_PEFT_SUITE_EXCLUDE`` (Python regexes,
searched in each node id) deselect what they do not / do match, after collection; node ids with
brackets and spaces do not fit ``-k``.

``FASTLORA_PEFT_SUITE_SABOTAGE=<factor>`` (with the patching) multiplies every fused forward's output
by ``factor``: a check that the comparison can fail (``peft_suite.py --sabotage 1.01``).

Per test, the number of layers patched and of forward calls that ran on fastlora's fused path
(``qlora.lora_linear`` for LoRA, ``peft_integration._dora_forward`` for DoRA) is written as JSON lines
to ``$FASTLORA_PEFT_SUITE_LOG`` when set, so the report can tell a test that exercised fastlora from
one that only ever ran PEFT's forward.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import types
import warnings

PATCH = os.environ.get("FASTLORA_PEFT_SUITE_PATCH") == "1"
BACKEND = os.environ.get("FASTLORA_PEFT_SUITE_BACKEND", "auto")
LOG = os.environ.get("FASTLORA_PEFT_SUITE_LOG")
SELECT = os.environ.get("FASTLORA_PEFT_SUITE_SELECT")
EXCLUDE = os.environ.get("FASTLORA_PEFT_SUITE_EXCLUDE")
SABOTAGE = float(os.environ.get("FASTLORA_PEFT_SUITE_SABOTAGE") or 1.0)

_counts = {"patched_layers": 0, "fused_lora_calls": 0, "fused_dora_calls": 0}


def _stub(name: str) -> None:
    """Put a module named ``name`` in ``sys.modules`` whose every attribute raises on use."""
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return

    def missing(attr):
        def fail(*args, **kwargs):
            raise ModuleNotFoundError(f"{name} is not installed (stub from peft_suite_plugin); {attr} needs it")

        if not attr[:1].isupper():
            return fail
        return type(attr, (), {"__init__": fail, "from_pretrained": staticmethod(fail), "__call__": fail})  # a class

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return missing(attr)

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__getattr__ = getattr_
    sys.modules[name] = module


def _patch(model):
    """``fastlora.patch_peft(model)``, quiet, skipping models with no PEFT LoRA layer."""
    import fastlora

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fastlora.patch_peft left")
        try:
            _counts["patched_layers"] += fastlora.patch_peft(model, backend=BACKEND)
        except ValueError as err:
            if "found no PEFT LoRA layer" not in str(err):
                raise
    return model


def _wrap_function(owner, name: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return _patch(original(*args, **kwargs))

    setattr(owner, name, wrapper)


def _wrap_method_patching_self(cls, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _patch(self)
        return result

    setattr(cls, name, wrapper)


def _wrap_classmethod(cls, name: str) -> None:
    original = getattr(cls, name).__func__

    @functools.wraps(original)
    def wrapper(klass, *args, **kwargs):
        return _patch(original(klass, *args, **kwargs))

    setattr(cls, name, classmethod(wrapper))


def _count_calls(owner, name: str, key: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        _counts[key] += 1
        y = original(*args, **kwargs)
        return y * SABOTAGE if SABOTAGE != 1.0 else y

    setattr(owner, name, wrapper)


def _install() -> None:
    import peft
    import peft.mapping
    import peft.mapping_func
    from peft import PeftModel

    from fastlora import peft_integration, qlora

    # The test modules do `from peft import get_peft_model` when they are collected, after this runs.
    for owner in (peft, peft.mapping_func):
        if hasattr(owner, "get_peft_model"):
            _wrap_function(owner, "get_peft_model")
    for owner in (peft, peft.mapping):
        if hasattr(owner, "inject_adapter_in_model"):
            _wrap_function(owner, "inject_adapter_in_model")
    _wrap_classmethod(PeftModel, "from_pretrained")
    _wrap_method_patching_self(PeftModel, "add_adapter")
    _wrap_method_patching_self(PeftModel, "load_adapter")
    _count_calls(qlora, "lora_linear", "fused_lora_calls")
    _count_calls(peft_integration, "_dora_forward", "fused_dora_calls")


_stub("diffusers")
_stub("datasets")
if PATCH:
    _install()


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        selected = (not SELECT or re.search(SELECT, item.nodeid)) and not (EXCLUDE and re.search(EXCLUDE, item.nodeid))
        (keep if selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item):
    for key in _counts:
        _counts[key] = 0


def pytest_runtest_logreport(report):
    if LOG and report.when == "teardown":
        with open(LOG, "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid, **_counts}) + "\n")
