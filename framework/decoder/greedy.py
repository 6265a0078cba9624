"""A pure-greedy decoder: argmax, whatever the request's sampling settings (a fast path for
benchmarks and exactness checks)."""

from framework.decoder.base import Decoder, DecoderOutput


class GreedyDecoder(Decoder):
    def decode(self, requests, logits):
        return DecoderOutput(self.argmax(logits).tolist() if requests else [])

    def decodes_rows_alone(self, requests):
        return True
