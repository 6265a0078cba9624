"""Plugins end to end: registered in-process, installed for real, and broken in the usual ways."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from framework import LLM, SamplingParams
from framework.plugins.hookspecs import hookimpl
from framework.plugins.manager import PluginError, create_plugin_manager
from framework.scheduler.capacity import GuaranteedNoEvictScheduler

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN = REPO / "plugins" / "framework-priority"


class CountingScheduler(GuaranteedNoEvictScheduler):
    calls = 0

    def schedule(self, active, kv_cache):
        CountingScheduler.calls += 1
        return super().schedule(active, kv_cache)


class InTestPlugin:
    @hookimpl
    def register_capacity_schedulers(self, register):
        register("counting", CountingScheduler)


def test_in_process_plugin_is_selected_by_config(tiny_dir):
    plugins = create_plugin_manager(extra_plugins=[InTestPlugin()], autoload=False)
    assert "counting" in plugins["capacity_scheduler"]
    CountingScheduler.calls = 0
    llm = LLM(str(tiny_dir), plugins=plugins, scheduler="counting", dtype="float32", **{"kv_cache.max_tokens": 256})
    assert isinstance(llm.executor.capacity_scheduler, CountingScheduler)
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert CountingScheduler.calls >= 4


def test_duplicate_names_name_both_providers():
    class Clash:
        @hookimpl
        def register_micro_batch_schedulers(self, register):
            register("fcfs", CountingScheduler)

    with pytest.raises(PluginError, match=r"'fcfs' is registered twice: by framework and by Clash"):
        create_plugin_manager(extra_plugins=[Clash()], autoload=False)


def test_misspelt_hook_fails_loudly():
    class Misspelt:
        @hookimpl
        def register_capacity_scheduler(self, register):  # missing the final "s"
            register("x", CountingScheduler)

    with pytest.raises(PluginError, match="register_capacity_scheduler"):
        create_plugin_manager(extra_plugins=[Misspelt()], autoload=False)


def test_a_hook_without_hookimpl_is_warned_about(caplog):
    class Unmarked:
        def register_decoders(self, register):  # no @hookimpl: pluggy passes over it
            register("never_seen", CountingScheduler)

        def helper(self):
            pass

    with caplog.at_level("WARNING", logger="framework.plugins.manager"):
        plugins = create_plugin_manager(extra_plugins=[Unmarked()], autoload=False)
    assert "never_seen" not in plugins["decoder"]
    (message,) = caplog.messages
    assert "Unmarked" in message and "register_decoders without @hookimpl" in message and "helper" not in message


def test_marked_hooks_and_imported_functions_are_not_warned_about(caplog):
    import types

    module = types.ModuleType("imports_a_register_function")
    from framework.config import register_configs  # a function named register_*, not a hook

    module.register_configs = register_configs
    with caplog.at_level("WARNING", logger="framework.plugins.manager"):
        create_plugin_manager(extra_plugins=[InTestPlugin(), module], autoload=False)
    assert caplog.messages == []


def test_unknown_name_from_python_lists_the_choices(tiny_dir):
    with pytest.raises(LookupError, match=r"unknown decoder 'nope'; available: sampling \(framework\), greedy \(framework\)"):
        LLM(str(tiny_dir), **{"decoder.name": "nope"})


def test_unknown_python_option_is_a_clear_error(tiny_dir):
    with pytest.raises(TypeError, match="unknown option 'max_batch'"):
        LLM(str(tiny_dir), max_batch=4)


def test_every_hook_is_documented():
    from framework.plugins.hookspecs import FrameworkHookSpecs

    doc = (REPO / "docs" / "plugin-hooks.md").read_text()
    hooks = [name for name in vars(FrameworkHookSpecs) if not name.startswith("_")]
    assert hooks
    for name in hooks:
        assert f"## {name}" in doc, f"docs/plugin-hooks.md has no section for {name}"


# ---- a real installation, in subprocesses -----------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example plugin installed with pip into a private folder (no network needed)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True,
        capture_output=True,
        cwd=tmp_path_factory.mktemp("build"),
    )
    return target


def cli(args, site, cwd, **env):
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "HF_HUB_OFFLINE": "1", **env}
    for var in ("FRAMEWORK_DISABLE_PLUGIN_AUTOLOAD", "FRAMEWORK_PLUGINS", "FRAMEWORK_BLOCK_PLUGINS"):
        if var not in env:
            full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "framework", *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=300)


def listed_capacity(result):
    assert result.returncode == 0, result.stderr
    return {c["name"]: c["provider"] for c in json.loads(result.stdout)["components"]["capacity_scheduler"]}


def test_installed_plugin_is_listed_and_runs(installed, tiny_dir, tmp_path):
    assert listed_capacity(cli(["--list-plugins"], installed, tmp_path))["priority"] == "framework-priority 0.1.0"
    run = cli(
        [f"model.path={tiny_dir}", "run.chat=false", "run.max_tokens=4", "kv_cache.max_tokens=256", "scheduler=priority", 'run.prompts=["Hi"]'],
        installed,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "scheduler priority+fcfs" in run.stdout
    preset = cli(["--cfg", "job", "scheduler=priority_preempt"], installed, tmp_path)
    assert preset.returncode == 0, preset.stderr
    assert "capacity: priority" in preset.stdout and "preempt: true" in preset.stdout


@pytest.mark.parametrize(
    "env",
    [{"FRAMEWORK_DISABLE_PLUGIN_AUTOLOAD": "1"}, {"FRAMEWORK_BLOCK_PLUGINS": "framework_priority"}, {"FRAMEWORK_PLUGINS": "something_else"}],
)
def test_switched_off_plugin_is_absent_and_rejected(installed, tmp_path, env):
    assert "priority" not in listed_capacity(cli(["--list-plugins"], installed, tmp_path, **env))
    rejected = cli(["scheduler=priority"], installed, tmp_path, **env)
    assert rejected.returncode == 2
    assert "unknown scheduler 'priority'" in rejected.stderr and "guaranteed_no_evict (framework)" in rejected.stderr
    assert "Traceback" not in rejected.stderr


def fake_distribution(site: Path, name: str, module_source: str) -> None:
    """A minimally installed distribution: a module plus its dist-info with one entry point."""
    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(module_source)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[framework.plugins]\n{module} = {module}\n")


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise ImportError('needs a missing library')", "failed to import"),
        (
            "from framework.plugins.hookspecs import hookimpl\n"
            "@hookimpl\ndef register_decoder(register):\n    pass\n",
            "register_decoder",
        ),
    ],
)
def test_broken_plugin_fails_loudly_with_its_distribution(tmp_path, source, message):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "broken-plugin", source)
    result = cli(["--list-plugins"], site, tmp_path)
    assert result.returncode == 2
    assert "broken-plugin 1.0" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    # the switch to block it gets the user going again
    assert cli(["--list-plugins"], site, tmp_path, FRAMEWORK_BLOCK_PLUGINS="broken_plugin").returncode == 0


def test_check_imports_every_factory_and_names_the_broken_ones(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(
        site, "lazy-plugin",
        "from framework.plugins.hookspecs import hookimpl\n"
        "@hookimpl\ndef register_decoders(register):\n"
        "    register('lazy', 'nowhere.mod:Thing')\n"
        "    register('not_a_decoder', 'collections:OrderedDict')\n",
    )
    only = {"FRAMEWORK_PLUGINS": "lazy_plugin"}  # whatever else is installed
    listed = cli(["--list-plugins"], site, tmp_path, **only)
    assert listed.returncode == 0 and "lazy" in listed.stdout  # listing alone imports no factory
    checked = cli(["--list-plugins", "--check"], site, tmp_path, **only)
    assert checked.returncode == 2, checked.stderr
    errors = checked.stderr.splitlines()
    assert "framework: error: decoder 'lazy' from lazy-plugin 1.0 points at 'nowhere.mod:Thing', which cannot be loaded: No module named 'nowhere'" in errors
    assert "framework: error: decoder 'not_a_decoder' from lazy-plugin 1.0: 'collections:OrderedDict' is not a Decoder subclass or factory" in errors
    assert len(errors) == 2 and "Traceback" not in checked.stderr
    assert json.loads(checked.stdout)["components"]["decoder"]  # the listing is still printed


def test_check_passes_where_every_factory_loads(tmp_path):
    result = cli(["--list-plugins", "--check"], tmp_path, tmp_path, FRAMEWORK_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"framework: all \d+ registered factories load\n", result.stderr)


def test_check_without_list_plugins_is_refused(tmp_path):
    result = cli(["--check"], tmp_path, tmp_path)
    assert result.returncode == 2 and "--check goes with --list-plugins" in result.stderr


def test_conf_ships_inside_the_wheel(tmp_path):
    """The CLI works from a non-editable install: conf/ travels as framework.conf."""
    import shutil

    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", ".gpu", "build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert (target / "framework" / "conf" / "config.yaml").is_file()
    assert (target / "framework" / "conf" / "model" / "llama.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv=['framework','--cfg','job']; import framework, framework.cli; "
         "assert framework.__file__.startswith(sys.argv[0]) or True; print(framework.__file__); framework.cli.main()"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(target))
    assert "capacity: guaranteed_no_evict" in result.stdout


def test_python_api_rejects_bad_options_clearly(tiny_dir):
    with pytest.raises(LookupError, match=r"unknown scheduler 'nope'; available: .*max_utilization \(framework\)"):
        LLM(str(tiny_dir), scheduler="nope")
    with pytest.raises(TypeError, match="kv_cache.max_tokens"):
        LLM(str(tiny_dir), max_tokens=10)
    with pytest.raises(TypeError, match="selects an implementation by name"):
        LLM(str(tiny_dir), decoder=3)
    with pytest.raises(ValueError, match="max_num_tokens must be >= 1"):
        LLM(str(tiny_dir), max_num_tokens=0)


def test_a_name_shared_by_both_scheduler_kinds_is_refused():
    from framework.config import register_configs

    class Both:
        @hookimpl
        def register_micro_batch_schedulers(self, register):
            register("max_utilization", CountingScheduler)

    plugins = create_plugin_manager(extra_plugins=[Both()], autoload=False)
    with pytest.raises(PluginError, match="'max_utilization' is provided twice"):
        register_configs(plugins)


def test_models_are_checked_against_the_causal_lm_abc(tiny_dir, tmp_path):
    import shutil

    import torch

    from framework.models.llama import LlamaForCausalLM

    class NotAModel(torch.nn.Module):
        def __init__(self, config, backend):
            super().__init__()

    class MyLlama(LlamaForCausalLM):
        pass

    class Models:
        @hookimpl
        def register_models(self, register):
            register("NotAModel", NotAModel)
            register("MyLlama", MyLlama)

    plugins = create_plugin_manager(extra_plugins=[Models()], autoload=False)
    for architecture in ("NotAModel", "MyLlama"):
        path = shutil.copytree(tiny_dir, tmp_path / architecture)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    with pytest.raises(TypeError, match="model 'NotAModel' from .* is not a CausalLM"):
        LLM(str(tmp_path / "NotAModel"), plugins=plugins, dtype="float32", **{"kv_cache.max_tokens": 256})
    llm = LLM(str(tmp_path / "MyLlama"), plugins=plugins, dtype="float32", **{"kv_cache.max_tokens": 256})
    assert type(llm.executor.model_engine.model) is MyLlama
