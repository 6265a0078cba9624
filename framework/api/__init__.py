from framework.api.llm import LLM

__all__ = ["LLM"]
