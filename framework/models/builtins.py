"""Registers the built-in architectures under their checkpoint `architectures` names. A factory is
called as `factory(hf_config, backend)`: the model's layers run their hot ops on that backend."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "framework.models.llama:LlamaForCausalLM")
    register("MistralForCausalLM", "framework.models.llama:LlamaForCausalLM")
    register("Qwen2ForCausalLM", "framework.models.qwen2:Qwen2ForCausalLM")
    register("Qwen3ForCausalLM", "framework.models.qwen3:Qwen3ForCausalLM")
    register("Gemma2ForCausalLM", "framework.models.gemma2:Gemma2ForCausalLM")
    register("Gemma3ForCausalLM", "framework.models.gemma3:Gemma3ForCausalLM")
