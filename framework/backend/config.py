"""The built-in backends' own settings: plain dataclasses (no torch), registered with them, whose
fields sit in the `engine` config group (`engine.cuda_graphs=false`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TorchBackendConfig:
    cuda_graphs: bool = True  # on CUDA, replay decode-only steps from CUDA graphs (one per padded batch/width)
    cuda_graph_max_batch: int = 128  # larger decode steps run eagerly
