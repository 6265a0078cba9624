"""The standard workloads, reproducible from a seed: W1-W4 are random token ids without special
tokens, exact lengths, greedy, EOS ignored; W5 is a real prompt whose continuation reuses its text
(framework/bench/grounded.py), greedy, EOS honoured."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    prompts: list[list[int]]
    output_lens: list[int]  # exact with ignore_eos, else the most each may produce
    ignore_eos: bool = True

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _ids(rng: random.Random, allowed: list[int], n: int) -> list[int]:
    return [allowed[rng.randrange(len(allowed))] for _ in range(n)]


def make_workload(name: str, vocab_size: int, special_ids, seed: int = 0, scale: float = 1.0, tokenizer=None) -> Workload:
    """`scale` shrinks request counts and lengths (for smoke tests); 1.0 is the standard size. W5
    needs the tokenizer (its prompt is text)."""
    special = set(special_ids)
    allowed = [t for t in range(vocab_size) if t not in special]
    rng = random.Random(seed)

    def s(x: int) -> int:
        return max(1, round(x * scale))

    if name == "W1":
        prompts = [_ids(rng, allowed, s(128)) for _ in range(s(32))]
        return Workload(name, "offline throughput: 32 x 128 prompt -> 64 output", prompts, [s(64)] * len(prompts))
    if name == "W2":
        return Workload(name, "decode latency: 1 x 32 prompt -> 128 output", [_ids(rng, allowed, s(32))], [s(128)])
    if name == "W3":
        prefix = _ids(rng, allowed, s(384))
        prompts = [prefix + _ids(rng, allowed, s(32)) for _ in range(s(32))]
        return Workload(name, "shared prefix: 32 x (384 shared + 32 own) -> 32 output", prompts, [s(32)] * len(prompts))
    if name == "W4":
        count = s(64)
        prompts = [_ids(rng, allowed, s(rng.randint(16, 512))) for _ in range(count)]
        outputs = [s(rng.randint(16, 256)) for _ in range(count)]
        return Workload(name, "mixed lengths: 64 x [16, 512] prompt -> [16, 256] output", prompts, outputs)
    if name == "W5":
        from framework.bench.grounded import W5_MAX_TOKENS, w5_prompt

        return Workload(name, "input-grounded decode: 1 x 444 prompt -> <= 256 output", [w5_prompt(tokenizer)], [s(W5_MAX_TOKENS)], ignore_eos=False)
    raise ValueError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")


WORKLOADS = ("W1", "W2", "W3", "W4", "W5")
