"""Top-k log-probabilities of chosen tokens, vectorised over rows."""

from __future__ import annotations

import torch


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[dict[int, tuple[float, int]]]:
    """For each row: {token_id: (logprob, rank)} for the `k` most likely tokens and the chosen one."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
    rows: list[dict[int, tuple[float, int]]] = [{} for _ in range(logits.shape[0])]
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        for row, ids, lps in zip(rows, top_ids.tolist(), top_lp.tolist()):
            for rank, (token, lp) in enumerate(zip(ids, lps), start=1):
                row[token] = (lp, rank)
    for row, token, lp, rank in zip(rows, chosen.tolist(), chosen_lp.tolist(), ranks.tolist()):
        row[token] = (lp, rank)
    return rows


def record_prompt_logprobs(prompt_logits) -> None:
    """Append to each request's `prompt_logprobs` those of the prompt tokens this chunk predicts:
    `prompt_logits` holds (request, first position, logits of every position of its chunk)."""
    for request, start, logits in prompt_logits:
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]  # the first prompt token has no logprob
        # logits row j predicts the token at position start + j + 1; keep prompt positions not yet seen
        first = len(request.prompt_logprobs) - 1 - start
        count = min(logits.shape[0], request.prompt_len - 1 - start) - first
        if count <= 0:
            continue
        targets = torch.tensor(request.prompt_token_ids[start + first + 1 : start + first + 1 + count], device=logits.device)
        request.prompt_logprobs += top_logprobs(logits[first : first + count], targets, request.sampling_params.prompt_logprobs)
