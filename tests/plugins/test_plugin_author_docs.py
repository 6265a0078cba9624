"""The code the plugin authors' docs show runs, and does what the docs say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from framework.plugins import conformance
from framework.testing import make_executor, make_scheduler, run_to_completion

DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def scheduler_example():
    """The ShortestFirst class of docs/scheduler.md, defined from the page's own code."""
    (source,) = [block for block in python_blocks("scheduler.md") if "class ShortestFirst" in block]
    namespace: dict = {}
    exec(compile(source, "docs/scheduler.md", "exec"), namespace)
    return namespace["ShortestFirst"]


@pytest.mark.parametrize("case", list(conformance.check_capacity_scheduler.cases))
def test_the_shortest_first_example_conforms(case):
    conformance.check_capacity_scheduler.cases[case](scheduler_example(), None)


def test_the_shortest_first_example_keeps_its_order_at_every_step():
    requests = conformance.workload(seed=7)
    prompt_len = {r.request_id: r.prompt_len for r in requests}
    capacity = make_scheduler(scheduler_example(), max_batch_size=4, max_num_tokens=16)
    trace = run_to_completion(make_executor(capacity=capacity, max_batch_size=4, max_num_tokens=16), requests)
    assert sum(len(step.fitting) > 1 for step in trace.steps) > 10
    for number, step in enumerate(trace.steps):
        lengths = [prompt_len[rid] for rid in step.fitting]
        assert lengths == sorted(lengths), f"step {number} serves prompts of {lengths} tokens in that order"


def test_the_helpers_the_tutorial_imports_exist():
    imports = [line for block in python_blocks("writing-plugins.md") for line in block.splitlines() if line.startswith("from framework.testing import")]
    assert imports
    for line in imports:
        exec(line, {})


def test_a_plugin_author_runs_the_suite_with_pytest_p_framework_testing(tmp_path):
    (tmp_path / "test_mine.py").write_text(
        "from framework.testing import conformance_suite\n"
        "test_conforms = conformance_suite('micro_batch_scheduler', 'framework.scheduler.micro_batch:EqualProgressMicroBatchScheduler')\n"
        "def test_fixtures(kv_cache, fake_engine):\n"
        "    assert kv_cache.num_free_blocks == 16 and fake_engine.kv_cache_spec().num_layers == 1\n"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "framework.testing", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout
    assert f"{len(conformance.check_micro_batch_scheduler.cases) + 1} passed" in result.stdout
