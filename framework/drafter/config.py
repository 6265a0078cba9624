"""The built-in drafters' own settings: plain dataclasses (no torch), registered with them, whose
fields sit in the `speculative` config group (`speculative.ngram_max=3`, `speculative.model.path=...`)."""

from dataclasses import dataclass, field

# (no `from __future__ import annotations`: the config builds each option's dataclass from these
# fields, and a nested one's type must be a class, not a string)


@dataclass
class NgramConfig:
    ngram_min: int = 1  # shortest suffix that may match
    ngram_max: int = 4  # longest suffix tried (the longest match wins)
    min_acceptance: float = 0.2  # below this recent share of accepted drafts a request pauses drafting
    pause_steps: int = 8  # decode steps a paused request goes without drafts


@dataclass
class DraftCheckpoint:
    path: str | None = None  # a checkpoint folder (or .gguf) of a smaller model with the target's tokenizer


@dataclass
class DraftModelConfig:
    model: DraftCheckpoint = field(default_factory=DraftCheckpoint)  # `speculative.model.path=...`
