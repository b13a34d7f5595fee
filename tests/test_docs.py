"""The README and docs/ keep working: every ```python block runs, as a user would paste it.

Each block runs alone in a fresh interpreter (blocks do not share state: each must be complete),
from a scratch directory, with ``TRITON_INTERPRET`` unset (a user's shell does not set it), under
a timeout. A block that cannot run here is preceded by a marker line with its reason::

    <!-- no-run: needs a CUDA GPU -->

Those must stay few (``MAX_NO_RUN``): a page whose examples do not run is the problem these tests
are for. The other checks keep the pages honest about installing (item 1 of issue 21: no command
may fetch PyPI's unrelated ``fastlora``) and their links pointing at files that exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<reason>[^>]*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
MAX_NO_RUN = 2
TIMEOUT_S = 300
OPTIONAL = ("peft", "transformers", "safetensors", "bitsandbytes", "matplotlib")


def blocks(page: Path) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, no-run reason or None)`` of every fenced block of ``page``."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or not opening["lang"]:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.name}:{i + 1}: a ``` block that is never closed"
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_RUN.search(previous)
        found.append((i + 1, opening["lang"], "\n".join(lines[i + 1 : end]) + "\n", marker["reason"] if marker else None))
        i = end + 1
    return found


PYTHON_BLOCKS = [
    pytest.param(page, line, code, reason, id=f"{page.relative_to(ROOT)}:{line}")
    for page in PAGES
    for line, lang, code, reason in blocks(page)
    if lang == "python"
]


@pytest.mark.parametrize("page, line, code, no_run", PYTHON_BLOCKS)
def test_python_block_runs(page, line, code, no_run, tmp_path):
    if no_run:
        pytest.skip(f"marked no-run: {no_run}")
    missing = [m for m in OPTIONAL if re.search(rf"^\s*(import|from) {m}\b", code, re.M) and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (the test extra)")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The checkout's fastlora, whether or not it is installed; a scratch autotune cache.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["FASTLORA_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{page.name}:{line}: the block ran past {TIMEOUT_S} s\n{err.stdout or ''}{err.stderr or ''}")
    assert done.returncode == 0, f"{page.name}:{line}: exit status {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def test_blocks_are_found_and_few_are_skipped():
    """The extraction sees the blocks (so the test above cannot pass by finding none), and the
    no-run markers are few and give a reason."""
    assert any(p.values[0].name == "README.md" for p in PYTHON_BLOCKS), "the README's example block was not found"
    assert len(PYTHON_BLOCKS) >= 5
    skipped = [(p.values[0].name, p.values[1], p.values[3]) for p in PYTHON_BLOCKS if p.values[3] is not None]
    assert len(skipped) <= MAX_NO_RUN, f"too many no-run blocks: {skipped}"
    assert all(reason for *_, reason in skipped)


def test_readme_links_every_docs_page_and_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_no_install_command_fetches_the_other_fastlora():
    """PyPI's ``fastlora`` is another project: every install here is from the checkout."""
    bad = re.compile(r"pip install\s+(-U\s+)?[\"']?fastlora(\[|[\"'\s]|$)", re.M)
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        text = page.read_text()
        assert not bad.search(text), f"{page.relative_to(ROOT)} has a pip install of PyPI's fastlora"
        assert "pip install \"fastlora[" not in text and "pip install 'fastlora[" not in text


def test_readme_set_up_commands_are_what_ci_runs():
    """The README's two commands are the ones .ci/run runs, character for character."""
    bash = [code.strip() for _, lang, code, _ in blocks(ROOT / "README.md") if lang == "bash"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(bash) == 2 and all(command in ci for command in bash), (bash, ci)


def test_the_foreign_log_records_docs_list_are_dropped_and_nothing_else(caplog):
    """docs/troubleshooting.md: bitsandbytes' Hub-kernel line from ``import fastlora`` on, torch's
    "No CUDA runtime" line once bench or patch_peft ran; other records of those loggers pass."""
    import logging

    import fastlora  # noqa: F401  (installs the bitsandbytes filter)
    from fastlora._quiet import quiet_foreign_logs

    bnb, cpp = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("torch.utils.cpp_extension")
    quiet_foreign_logs()
    quiet_foreign_logs()  # idempotent: one filter each
    assert sum(type(f).__name__ == "_DropPrefix" for f in bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module named 'kernels'")
        cpp.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        bnb.warning("some other bitsandbytes warning")
        cpp.warning("some other extension warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning", "some other extension warning"]


def test_the_no_run_marker_is_read_from_the_line_before_the_fence(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- no-run: needs a CUDA GPU -->\n```python\nimport torch\n```\n\n```python\nx = 1\n```\n```bash\nls\n```\n")
    assert blocks(page) == [(4, "python", "import torch\n", "needs a CUDA GPU"), (8, "python", "x = 1\n", None), (11, "bash", "ls\n", None)]
