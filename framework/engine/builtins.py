"""Registers the built-in model engine through the same hook a plugin uses."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_model_engines(register):
    register("pytorch", "framework.engine.pytorch_model_engine:PyTorchModelEngine")
