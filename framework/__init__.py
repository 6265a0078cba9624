"""framework: a plugin-based LLM inference engine."""

from framework.outputs import CompletionOutput, RequestOutput
from framework.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":  # lazy: keeps `import framework` (and plugin discovery) free of torch
        from framework.api.llm import LLM

        return LLM
    raise AttributeError(name)
