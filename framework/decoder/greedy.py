"""A pure-greedy decoder: argmax, whatever the request's temperature."""

from framework.decoder.base import Decoder


class GreedyDecoder(Decoder):
    def decode(self, requests, logits):
        return logits.argmax(dim=-1).tolist() if requests else []
