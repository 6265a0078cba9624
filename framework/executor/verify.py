"""Decoding a step's sampled rows into runs of tokens, verifying drafts on the way.

A request scheduled with k draft tokens has 1 + k logits rows: row j predicts the token after its
j-th draft. Its rows are decoded in order, one position at a time across the batch: while the
decoded token equals the next draft, that draft is accepted and the next position is decoded;
the first token that differs (or the bonus token after the last draft) ends the run. So a run is
0..k accepted drafts plus one token of the target's own. The decoder's `verify` draws each
position's token (greedy: the argmax; sampled: the accept/resample rule with the drafter's
distribution, `request.draft_probs`), so the tokens follow exactly the distribution that decoding
one token per step gives.
"""

from __future__ import annotations

from itertools import accumulate

from framework.decoder.base import DraftRows
from framework.request import LlmRequest


def decode_runs(decoder, sampled: list[LlmRequest], logits) -> list[tuple[LlmRequest, list[int], list]]:
    """(request, tokens, logprobs of each token) for each sampled request."""
    rows = [1 + len(r.draft_token_ids) for r in sampled]
    if all(n == 1 for n in rows):  # no drafts: the plain decode step
        decoded = decoder.decode(sampled, logits)
        logprobs = decoded.logprobs or [None] * len(sampled)
        return [(r, [t], [lp]) for r, t, lp in zip(sampled, decoded.token_ids, logprobs)]
    if decoder.decodes_rows_alone(sampled):
        return _runs_at_once(decoder, sampled, logits, rows)
    first_row = list(accumulate(rows, initial=0))
    runs: list[tuple[list[int], list]] = [([], []) for _ in sampled]
    live = list(range(len(sampled)))
    try:
        for position in range(max(rows)):
            requests = [sampled[i] for i in live]
            decoded = decoder.verify(requests, logits[[first_row[i] + position for i in live]], _drafts_at(position, requests))
            logprobs = decoded.logprobs or [None] * len(live)
            still = []
            for i, token, lp in zip(live, decoded.token_ids, logprobs):
                runs[i][0].append(token)
                runs[i][1].append(lp)
                if position < rows[i] - 1 and token == sampled[i].draft_token_ids[position]:
                    sampled[i].output_token_ids.append(token)  # the next position's context (min_tokens...)
                    still.append(i)
            live = still
    finally:  # the executor appends the runs itself, with its stop checks
        for request, (tokens, _) in zip(sampled, runs):
            if len(tokens) > 1:
                del request.output_token_ids[-(len(tokens) - 1) :]
    return [(r, tokens, logprobs) for r, (tokens, logprobs) in zip(sampled, runs)]


def _runs_at_once(decoder, sampled: list[LlmRequest], logits, rows: list[int]) -> list[tuple[LlmRequest, list[int], list]]:
    """`decode_runs` where each row's token depends on that row alone: every row decoded in one
    call, each run cut after the first token that is not the next draft."""
    decoded = decoder.decode([r for r, n in zip(sampled, rows) for _ in range(n)], logits)
    logprobs = decoded.logprobs or [None] * len(decoded.token_ids)
    runs, first = [], 0
    for request, n in zip(sampled, rows):
        tokens, length = decoded.token_ids[first : first + n], 1
        while length < n and tokens[length - 1] == request.draft_token_ids[length - 1]:
            length += 1
        runs.append((request, tokens[:length], logprobs[first : first + length]))
        first += n
    return runs


def _drafts_at(position: int, requests: list[LlmRequest]) -> DraftRows:
    """Each request's draft at `position` and the distribution it was drawn from (None past its last)."""
    drafted = [position < len(r.draft_token_ids) for r in requests]
    return DraftRows(
        [r.draft_token_ids[position] if has else None for r, has in zip(requests, drafted)],
        [r.draft_probs[position] if has and r.draft_probs is not None else None for r, has in zip(requests, drafted)],
    )
