"""A plugin module for the tensor-parallel tests: the torch backend under another name, given to
`LLM(plugins=...)` and not installed, so only rank 0's process knows it unless the ranks are told."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    register("renamed_torch", "framework.backend.torch_backend:TorchBackend")
