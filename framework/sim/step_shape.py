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
    def of(cls, scheduled, sampled: list | None = None) -> StepShape:
        """The shape of a step computing `scheduled`; `sampled`, when given, receives (request,
        drafts) for each request whose chunk reaches its last token, in order."""
        tokens = rows = attended = context = 0
        for request in scheduled:
            start, n = request.num_computed_tokens, request.num_scheduled_tokens
            tokens += n
            attended += request.scheduled_attention
            context += start + n
            drafts = start + n - request.num_tokens  # past its last token
            if drafts >= 0:
                rows += 1 + drafts
                if sampled is not None:
                    sampled.append((request, drafts))
        return cls(tokens, rows, attended, context, len(scheduled))

    def to_dict(self) -> dict:
        return asdict(self)
