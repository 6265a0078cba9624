"""The default decoder: the full sampling set, vectorised over the batch.

Order of operations per row (as documented on SamplingParams): repetition, presence and frequency
penalties; `min_tokens` (EOS and stop token ids masked while too few tokens exist); temperature;
top-k; top-p; min-p; then a draw (or the argmax for temperature 0). Each seeded request draws from
its own generator, so its tokens do not depend on what else is in the batch. A verify step's
drafts that come with the drafter's distribution q go through the accept/resample rule
(`_accept_or_resample`); the others are compared with the draw from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.decoder.base import Decoder, DecoderOutput, DraftRows
from framework.decoder.logprobs import top_logprobs
from framework.request import LlmRequest
from framework.resources.request_states import RequestStates

NEG_INF = float("-inf")


@dataclass
class _PenaltyState:
    """Per-request token statistics, kept on the request between steps."""

    in_prompt: torch.Tensor  # [vocab] bool
    counts: torch.Tensor  # [vocab] float, occurrences in the output so far
    seen_outputs: int  # how many output tokens `counts` includes


@dataclass
class _RequestState:
    penalties: _PenaltyState | None = None
    generator: torch.Generator | None = None  # a seeded request's own


class SamplingDecoder(Decoder):
    def __init__(self, decoder_config, config=None, seed: int = 0, backend=None):
        super().__init__(decoder_config, config, seed, backend)
        self._generators: dict[torch.device, torch.Generator] = {}
        self.request_states = RequestStates()  # request -> _RequestState, freed when it finishes

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _request_generator(self, request: LlmRequest, device: torch.device) -> torch.Generator:
        state = self.request_states.get(request, _RequestState)
        if state.generator is None:
            state.generator = torch.Generator(device=device).manual_seed(request.sampling_params.seed)
        return state.generator

    def decode(self, requests, logits):
        return self._choose(requests, logits, None)

    def verify(self, requests, logits, drafts):
        return self._choose(requests, logits, drafts)

    def decodes_rows_alone(self, requests):
        # greedy rows without penalties or a pending min_tokens mask (a subclass opts in itself:
        # its own processing may read the tokens before a row)
        return type(self) is SamplingDecoder and all(
            r.sampling_params.temperature == 0 and not r.sampling_params.has_penalties and len(r.output_token_ids) >= r.sampling_params.min_tokens
            for r in requests
        )

    def _choose(self, requests, logits, drafts: DraftRows | None) -> DecoderOutput:
        if not requests:
            return DecoderOutput([])
        distinct = list({id(r): r for r in requests}.values())  # (all rows at once repeat each request)
        if drafts is None and self.decodes_rows_alone(distinct) and all(r.sampling_params.logprobs is None for r in distinct):
            return DecoderOutput(self.argmax(logits).tolist())  # plain greedy rows: nothing to process or draw
        params = [r.sampling_params for r in requests]
        raw = logits  # the unmodified distribution, for logprobs
        logits = self.processed_logits(requests, logits)
        tokens, probs, noise = draw(requests, logits, self.argmax, self._shared_generator, self._request_generator)
        if probs is not None and drafts is not None and any(q is not None for q in drafts.probs):
            self._accept_or_resample(requests, probs, noise, tokens, drafts)
        logprobs = None
        if any(p.logprobs is not None for p in params):
            k = max(p.logprobs or 0 for p in params)
            rows = top_logprobs(raw, tokens, k)
            logprobs = [
                None if p.logprobs is None else {t: v for t, v in row.items() if v[1] <= p.logprobs or t == tok}
                for p, row, tok in zip(params, rows, tokens.tolist())
            ]
        self._record(requests, tokens)
        return DecoderOutput(tokens.tolist(), logprobs)

    def _accept_or_resample(self, requests, probs, noise, tokens, drafts: DraftRows) -> None:
        """In `tokens`, for each sampled row whose draft d came with its distribution q: d if a
        uniform u satisfies u * q(d) < p(d) (probability min(1, p(d) / q(d))), else a draw from
        max(p - q, 0) with the row's own noise. Rows without q keep their draw from p: it equals a
        point-mass draft with probability p(d) and is otherwise a draw from p without d."""
        rows = [
            i for i, (r, d, q) in enumerate(zip(requests, drafts.token_ids, drafts.probs))
            if q is not None and d is not None and r.sampling_params.temperature > 0
        ]
        if not rows:
            return
        index = torch.tensor(rows, device=probs.device)
        p = probs[index]
        q = torch.stack([drafts.probs[i] for i in rows]).to(p)
        d = torch.tensor([drafts.token_ids[i] for i in rows], device=p.device)[:, None]
        u = uniforms([requests[i] for i in rows], p.device, self._shared_generator, self._request_generator)
        accepted = u * q.gather(1, d).squeeze(1) < p.gather(1, d).squeeze(1)
        residual = (p - q).clamp_(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q up to rounding: never rejected
        resampled = self.argmax(residual / noise[index])
        tokens[index] = torch.where(accepted, d.squeeze(1), resampled)

    # ---- penalties and masks -----------------------------------------------------------------
    def processed_logits(self, requests, logits):
        """Penalties and the `min_tokens` mask applied (to a copy, when any applies)."""
        penalised = any(r.sampling_params.has_penalties for r in requests)
        below_min = any(len(r.output_token_ids) < r.sampling_params.min_tokens for r in requests)
        if penalised or below_min:
            logits = logits.clone()
        if penalised:
            self._apply_penalties(requests, logits)
        if below_min:
            self._apply_min_tokens(requests, logits)
        return logits

    def _state(self, request: LlmRequest, vocab: int, device) -> _PenaltyState:
        holder = self.request_states.get(request, _RequestState)
        state = holder.penalties
        if state is None:
            in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            in_prompt[torch.tensor(request.prompt_token_ids, device=device)] = True
            state = holder.penalties = _PenaltyState(in_prompt, torch.zeros(vocab, device=device), 0)
        missing = request.output_token_ids[state.seen_outputs :]
        if missing:  # outputs appended since the last step (normally none: _record adds them)
            state.counts.index_add_(0, torch.tensor(missing, device=device), torch.ones(len(missing), device=device))
            state.seen_outputs += len(missing)
        return state

    def _apply_penalties(self, requests, logits) -> None:
        rows = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
        vocab, device = logits.shape[1], logits.device
        states = [self._state(requests[i], vocab, device) for i in rows]
        counts = torch.stack([s.counts for s in states])
        seen = torch.stack([s.in_prompt for s in states]) | (counts > 0)
        p = [requests[i].sampling_params for i in rows]
        dtype = logits.dtype
        rep = torch.tensor([x.repetition_penalty for x in p], dtype=dtype, device=device)[:, None]
        presence = torch.tensor([x.presence_penalty for x in p], dtype=dtype, device=device)[:, None]
        frequency = torch.tensor([x.frequency_penalty for x in p], dtype=dtype, device=device)[:, None]
        sub = logits[rows]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - presence * (counts > 0) - frequency * counts
        logits[rows] = sub

    @staticmethod
    def _apply_min_tokens(requests, logits) -> None:
        for i, request in enumerate(requests):
            p = request.sampling_params
            if len(request.output_token_ids) < p.min_tokens:
                blocked = list(p.stop_token_ids) + ([] if p.ignore_eos else list(request.eos_token_ids))
                if blocked:
                    logits[i, blocked] = NEG_INF

    def _record(self, requests, tokens) -> None:
        """Count each penalised request's new token now, so the next step need not."""
        if not any(r.sampling_params.has_penalties for r in requests):
            return
        for request, token in zip(requests, tokens.tolist()):
            holder = self.request_states.peek(request)
            if holder is not None and holder.penalties is not None:
                holder.penalties.counts[token] += 1
                holder.penalties.seen_outputs += 1


def filtered_probs(params, logits, temperatures) -> torch.Tensor:
    """Per row: temperature, then top-k, top-p and min-p, as probabilities (temperature-0 rows are
    left at temperature 1; their callers take the argmax)."""
    scaled = logits / torch.where(temperatures > 0, temperatures, 1.0)[:, None]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(tp < 1.0 for tp in top_p):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(scaled.shape[1], device=scaled.device)[None, :]
        k = torch.tensor([k if k > 0 else scaled.shape[1] for k in top_k], device=scaled.device)[:, None]
        drop = ranks >= k
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, NEG_INF), dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ranked above
        tp = torch.tensor(top_p, device=scaled.device, dtype=scaled.dtype)[:, None]
        drop |= before >= tp  # keeps the smallest prefix whose mass reaches top_p (at least one)
        scaled = scaled.scatter(1, order, sorted_logits.masked_fill(drop, NEG_INF))
    probs = torch.softmax(scaled, dim=-1)
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        threshold = torch.tensor(min_p, device=probs.device, dtype=probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def draw(requests, logits, argmax, shared_generator, own_generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens, probs, noise): each row's argmax at temperature 0, elsewhere a draw from its
    filtered distribution (the argmax of p / E, E ~ Exp(1) from `exponential_noise`). probs and
    noise are None when every row is greedy."""
    params = [r.sampling_params for r in requests]
    tokens = argmax(logits)
    if all(p.temperature == 0 for p in params):
        return tokens, None, None
    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    greedy = temperatures == 0
    probs = filtered_probs(params, logits, temperatures)
    noise = exponential_noise(requests, probs, shared_generator, own_generator)
    return torch.where(greedy, tokens, argmax(probs / noise)), probs, noise


def exponential_noise(requests, probs, shared_generator, own_generator) -> torch.Tensor:
    """Exp(1) noise shaped like `probs`: a seeded sampled request's row from its own generator
    (`own_generator(request, device)`), the others' from `shared_generator(device)`."""
    noise = torch.empty_like(probs).exponential_(generator=shared_generator(probs.device))
    for i, request in enumerate(requests):
        if request.sampling_params.seed is not None and request.sampling_params.temperature > 0:
            noise[i].exponential_(generator=own_generator(request, probs.device))
    return noise


def uniforms(requests, device, shared_generator, own_generator) -> torch.Tensor:
    """U[0, 1) per request, drawn as `exponential_noise` draws its rows."""
    u = torch.rand(len(requests), generator=shared_generator(device), device=device)
    for i, request in enumerate(requests):
        if request.sampling_params.seed is not None:
            u[i] = torch.rand((), generator=own_generator(request, device), device=device)
    return u
