"""Registers the built-in drafters through the same hook a plugin uses."""

from framework.drafter.ngram import NgramConfig
from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_drafters(register):
    register("none", "framework.drafter.base:NoDrafter")
    register("ngram", "framework.drafter.ngram:NgramDrafter", config=NgramConfig)
