"""`engine.backend=<name>` for a backend that cannot run the model names why and what was wanted;
`auto` passes over it to the next one."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from framework.backend.choice import choose_backend
from framework.backend.torch_backend import TorchBackend
from framework.plugins.hookspecs import hookimpl
from framework.plugins.manager import create_plugin_manager


class Picky(TorchBackend):
    """Runs nothing."""

    priority = 10

    @classmethod
    def supports(cls, device, dtype, head_dim):
        return False


class Plain(TorchBackend):
    """Runs everything, but no attention variant."""

    priority = 5
    attention_variants = frozenset()


class Backends:
    @hookimpl
    def register_backends(self, register):
        register("picky", f"{__name__}:Picky")
        register("plain", f"{__name__}:Plain")


REGISTRY = create_plugin_manager([Backends()], autoload=False)["backend"]
CONFIG = OmegaConf.create({"backend": "auto", "cuda_graphs": False, "cuda_graph_max_batch": 8})


def choose(name, variants=frozenset()):
    return choose_backend(CONFIG, REGISTRY, torch.device("cpu"), torch.float32, 64, variants, name=name)


def test_a_named_backend_that_cannot_run_the_model_says_why_and_what_was_wanted():
    with pytest.raises(ValueError, match=r"backend 'picky' \(.*\) does not run this device, dtype or head size \(cpu / float32 / head size 64\); use engine.backend=auto"):
        choose("picky")
    with pytest.raises(ValueError, match=r"backend 'plain' \(.*\) lacks sliding_window attention \(cpu / float32 / head size 64 / sliding_window attention\)"):
        choose("plain", frozenset({"sliding_window"}))


def test_auto_passes_over_the_ones_that_cannot(caplog):
    caplog.set_level(logging.INFO, logger="framework.backend.choice")
    assert type(choose("auto")) is Plain
    assert "passed over 'picky' (does not run this device, dtype or head size)" in caplog.text
    assert type(choose("auto", frozenset({"sliding_window"}))) is TorchBackend
