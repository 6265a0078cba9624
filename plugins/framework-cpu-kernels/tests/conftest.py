"""Lets the tests import framework_cpu_kernels from this folder without installing the distribution,
and says why they skip: the plugin blocked (FRAMEWORK_BLOCK_PLUGINS), no C++ compiler, or a CPU
without the AVX-512 the kernels need."""

import os
import sys
from pathlib import Path

import pytest

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
if str(PLUGIN_ROOT) not in sys.path:
    sys.path.insert(0, str(PLUGIN_ROOT))

from cpu_kernels_checks import require_compiler, require_kernels  # noqa: E402  (beside this file)

BLOCKED = "framework_cpu_kernels" in {p.strip() for p in os.environ.get("FRAMEWORK_BLOCK_PLUGINS", "").split(",")}


def pytest_collection_modifyitems(config, items):
    if not BLOCKED:
        return
    skip = pytest.mark.skip(reason="framework_cpu_kernels is blocked (FRAMEWORK_BLOCK_PLUGINS): everything runs on `torch`")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def compiler():
    require_compiler()


@pytest.fixture(scope="session")
def kernels():
    return require_kernels()


@pytest.fixture(scope="session")
def plugins():
    """framework's plugins with this one among them, whether its distribution is installed or not."""
    import framework_cpu_kernels
    from framework.plugins.manager import create_plugin_manager

    return create_plugin_manager(extra_plugins=[framework_cpu_kernels])


@pytest.fixture(scope="session")
def tokenizer_dir():
    """SmolLM2's tokenizer, or FRAMEWORK_TEST_TOKENIZER_DIR (as framework's tests take it)."""
    from framework.models.checkpoint import resolve_checkpoint

    return Path(os.environ["FRAMEWORK_TEST_TOKENIZER_DIR"]) if "FRAMEWORK_TEST_TOKENIZER_DIR" in os.environ else resolve_checkpoint(None)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    """framework's tiny random Llama (its tests' checkpoint; the tests run from a framework checkout)."""
    from tests.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)
