"""A pure-greedy decoder: argmax, whatever the request's sampling settings (a fast path for
benchmarks and exactness checks)."""

from framework.decoder.base import Decoder, DecoderOutput, argmax


class GreedyDecoder(Decoder):
    def decode(self, requests, logits):
        return DecoderOutput(argmax(logits).tolist() if requests else [])
