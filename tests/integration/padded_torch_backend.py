"""A plugin module for the tensor-parallel tests: the torch backend whose decode graphs are the CUDA
graphs' padded steps run eagerly (`capture=False`, on any device), split as under tensor parallelism
(the LM head after the graph's part). Given to `LLM(plugins=...)`, so every rank runs it. Where
`$FRAMEWORK_TEST_PADDED_STEPS` names a file, each rank appends `batch bucket, width bucket, requests`
of every step it runs so to that name plus `.<rank>`."""

import os

import torch

from framework.backend.cuda_graphs import CUDADecodeGraphs, bucket
from framework.backend.torch_backend import TorchBackend
from framework.plugins.hookspecs import hookimpl

LOG = "FRAMEWORK_TEST_PADDED_STEPS"


class NotedDecodeGraphs(CUDADecodeGraphs):
    def run(self, tokens, positions, tables, query_len=1):
        if os.environ.get(LOG):
            with open(f"{os.environ[LOG]}.{torch.distributed.get_rank()}", "a") as log:
                print(bucket(len(tokens), self.max_batch), bucket(max(map(len, tables)), self.max_blocks), len(tokens), file=log)
        return super().run(tokens, positions, tables, query_len)


class PaddedTorchBackend(TorchBackend):
    def decode_graphs(self, model, kv_caches, block_size, max_model_len):
        max_blocks = -(-max_model_len // block_size)
        return NotedDecodeGraphs(
            model, kv_caches, block_size, self.config.cuda_graph_max_batch, max_blocks, capture=False, logits_in_graph=False,
        )


@hookimpl
def register_backends(register):
    register("padded_torch", "tests.integration.padded_torch_backend:PaddedTorchBackend")
