"""What a step's duration depends on, counted from its scheduled batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StepShape:
    tokens: int  # tokens computed: prompt chunks, decode tokens and drafts (the linear layers' rows)
    sampled: int  # logits rows: the LM head's rows and the decoder's
    attended: int  # (query, key) pairs the step's attention scores (causal within a chunk)
    context: int  # KV positions read: each request's whole context, once per step
    requests: int

    @classmethod
    def of(cls, scheduled) -> StepShape:
        tokens = sampled = attended = context = 0
        for request in scheduled:
            start, n = request.num_computed_tokens, request.num_scheduled_tokens
            tokens += n
            attended += n * start + n * (n + 1) // 2
            context += start + n
            missing = start + n - request.num_tokens  # past its last token: the drafts it verifies
            if missing >= 0:
                sampled += 1 + missing
        return cls(tokens, sampled, attended, context, len(scheduled))

    def to_dict(self) -> dict:
        return asdict(self)
