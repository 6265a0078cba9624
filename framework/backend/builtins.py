"""Registers the built-in backends through the same hook a plugin uses."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from framework.backend.config import TorchBackendConfig  # a plain dataclass, no torch

    register("torch", "framework.backend.torch_backend:TorchBackend", config=TorchBackendConfig)
