"""Registers the built-in decoders through the same hook a plugin uses."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_decoders(register):
    register("sampling", "framework.decoder.sampling:SamplingDecoder")
    register("greedy", "framework.decoder.greedy:GreedyDecoder")
