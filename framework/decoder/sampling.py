"""The default decoder: greedy for temperature 0, otherwise sampling from softmax(logits / T),
vectorised over the batch."""

from __future__ import annotations

import torch

from framework.decoder.base import Decoder


class SamplingDecoder(Decoder):
    def __init__(self, decoder_config, config=None, seed: int = 0):
        super().__init__(decoder_config, config, seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def decode(self, requests, logits):
        if not requests:
            return []
        tokens = logits.argmax(dim=-1)
        temperatures = [r.sampling_params.temperature for r in requests]
        if any(t > 0 for t in temperatures):
            temps = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)
            probs = torch.softmax(logits / temps.clamp_min(1e-6)[:, None], dim=-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
            noise = torch.empty_like(probs).exponential_(generator=self._generator(logits.device))
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(temps > 0, sampled, tokens)
        return tokens.tolist()
