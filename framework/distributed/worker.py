"""A rank other than 0: builds the model engine (its shard of the model), then runs each forward
rank 0 sends it until rank 0 stops. Started by an engine on one machine (settings on stdin), or by
`python -m framework` under torchrun with RANK > 0 (`serve_forward`)."""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from pathlib import Path

from framework.distributed.launch import PARENT_ENV

logger = logging.getLogger(__name__)


def serve_forward(engine_config, model_config, checkpoint_dir, plugins) -> None:
    """Build this rank's engine and serve rank 0's steps until it stops."""
    from framework.engine.pytorch_model_engine import PyTorchModelEngine

    engine = PyTorchModelEngine(engine_config, None, model_config, checkpoint_dir, plugins)
    try:
        while (step := engine.ranks.receive()) is not None:
            engine.forward_rows(step)
    finally:
        engine.close()


def _exit_with_parent(parent: int) -> None:
    """End this process once the engine that started it has gone (even killed)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def main() -> None:
    from omegaconf import OmegaConf

    from framework.plugins.manager import plugins_from

    logging.basicConfig(level=logging.WARNING, format=f"rank {os.environ['RANK']}: %(levelname)s %(message)s")
    parent = int(os.environ[PARENT_ENV])
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    settings = pickle.loads(sys.stdin.buffer.read())
    serve_forward(
        OmegaConf.create(settings["engine"]), OmegaConf.create(settings["model"]), Path(settings["checkpoint_dir"]),
        plugins_from(settings["plugins"]),
    )


if __name__ == "__main__":
    main()
