"""Registers the built-in architectures under their checkpoint `architectures` names."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "framework.models.llama:LlamaForCausalLM")
    register("MistralForCausalLM", "framework.models.llama:LlamaForCausalLM")
