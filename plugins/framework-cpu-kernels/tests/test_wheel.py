"""The distribution as users get it: its wheel carries every source the kernels compile from (the
`.cpp` files and `common.h`), and once installed beside framework (`--no-deps`) it provides the
backend, which builds from those sources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
CSRC = PLUGIN_ROOT / "framework_cpu_kernels" / "csrc"


def pip(*args, cwd=None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a clean copy of the sources (the checkout keeps no build/)."""
    if subprocess.run([sys.executable, "-c", "import setuptools"]).returncode != 0:
        pytest.skip("setuptools is not installed: the wheel cannot be built without network")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "framework-cpu-kernels"
    shutil.copytree(PLUGIN_ROOT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(work / "dist"), str(source))
    (found,) = (work / "dist").glob("framework_cpu_kernels-*.whl")
    return found


def test_the_wheel_carries_every_source_the_kernels_compile(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))
    assert "common.h" in sources
    missing = [s for s in sources if f"framework_cpu_kernels/csrc/{s}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_beside_framework_it_provides_the_backend(kernels, wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    code = (
        "import torch, framework_cpu_kernels\n"
        "from framework.plugins.manager import create_plugin_manager\n"
        "entry = create_plugin_manager()['backend'].get('cpu_kernels')\n"
        "backend = entry.load()(None, None, torch.device('cpu'), torch.float32)\n"
        "assert backend.argmax(torch.tensor([[0.0, 2.0, 1.0]])).tolist() == [1]\n"
        "print(framework_cpu_kernels.__file__, entry.provider, sep='\\n')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env.pop("FRAMEWORK_PLUGINS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, provider = done.stdout.split("\n")[:2]
    assert Path(module_file).is_relative_to(site), "the test ran another copy of the plugin than the wheel's"
    assert provider == "framework-cpu-kernels 0.1.0"
