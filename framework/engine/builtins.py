"""Registers the built-in model engines through the same hook a plugin uses."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_model_engines(register):
    from framework.engine.config import SimEngineConfig  # a plain dataclass, no torch

    register("pytorch", "framework.engine.pytorch_model_engine:PyTorchModelEngine")
    register("sim", "framework.engine.sim_engine:SimModelEngine", config=SimEngineConfig)
