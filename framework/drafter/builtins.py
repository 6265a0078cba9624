"""Registers the built-in drafters through the same hook a plugin uses."""

from framework.drafter.config import DraftModelConfig, NgramConfig  # plain dataclasses, no torch
from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_drafters(register):
    register("none", "framework.drafter.base:NoDrafter")
    register("ngram", "framework.drafter.ngram:NgramDrafter", config=NgramConfig)
    register("draft_model", "framework.drafter.draft_model:DraftModelDrafter", config=DraftModelConfig)
    register("decode_runs", "framework.sim.decode_runs:DecodeRunDrafter")
