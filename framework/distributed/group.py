"""A tensor-parallel engine's process group: how its ranks join (the torchrun environment, or
workers this rank starts), the collectives' two groups, and rank 0's failure handling.

Two groups: rank 0 sends each step on `control`, where the other ranks wait with no practical
timeout (an idle engine is not a fault); the forward's collectives run on `tp.group`. Rank 0 gives
up on either after `engine.distributed_timeout` seconds, so a rank that hangs fails the step
instead of hanging it."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from framework.distributed import step_message
from framework.distributed.launch import LocalWorkers
from framework.layers.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=7)  # how long a worker waits for the next step
LOAD_TIMEOUT = timedelta(minutes=10)  # how long rank 0 waits for every rank to load its shard (gloo)


def torchrun_rank() -> int | None:
    """This process's rank where the torchrun environment sets one (RANK, WORLD_SIZE), else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def plain(cfg) -> dict:
    """A config (DictConfig or dataclass) as a plain dict a worker can be given."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


class RankGroup:
    """This rank's place in the group. Rank 0 sends each step (`send`), runs its own share under
    `guard`, and stops the others (`close`)."""

    def __init__(self, size: int, device: torch.device, timeout: float, settings: dict):
        rank = torchrun_rank()
        self.workers = None
        if rank is None:  # one machine: start the other ranks here
            rank, self.workers = 0, LocalWorkers(size, settings)
            init = f"tcp://127.0.0.1:{self.workers.port}"
        else:
            init = "env://"
            if int(os.environ["WORLD_SIZE"]) != size:
                raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but engine.tensor_parallel_size={size}")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        self.device, self.timeout = device, timeout
        self.broken: str | None = None
        try:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=init, rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
            control_timeout = timedelta(seconds=timeout) if rank == 0 else IDLE_TIMEOUT  # (each rank's own setting)
            self.control = dist.new_group(list(range(size)), timeout=control_timeout)
        except Exception:
            if self.workers is not None:
                self.workers.kill()
            raise
        self.tp = TensorParallel(rank, size, dist.group.WORLD)
        logger.info("tensor parallelism: rank %d of %d (%s, %s)", rank, size, backend, "torchrun" if self.workers is None else "local workers")

    def check(self) -> None:
        """Raise the reason the group is unusable (a rank died earlier), if any."""
        if self.broken is None and self.workers is not None:
            ended = self.workers.exited()
            if ended is not None:
                self._fail(ended)
        if self.broken is not None:
            raise RuntimeError(self.broken)

    def ready(self) -> None:
        """Wait until every rank has its shard loaded (a rank that failed to load fails this one).
        Loading is not a step: on gloo it may take longer than `engine.distributed_timeout`."""
        if dist.get_backend(self.tp.group) == "gloo":
            self.guard(lambda: dist.monitored_barrier(group=self.tp.group, timeout=LOAD_TIMEOUT))
        else:
            self.guard(lambda: dist.barrier(group=self.tp.group))

    def send(self, step) -> None:
        step_message.send_step(step, self.control, self.device)

    def receive(self):
        return step_message.receive_step(self.control, self.device)

    def guard(self, run):
        """`run()` (a step's collectives); a failure breaks the group: the workers are stopped and
        every later step raises at once."""
        self.check()
        try:
            return run()
        except Exception as exc:
            ended = self.workers.exited(wait=1.0) if self.workers is not None else None
            self._fail(ended or f"tensor-parallel step failed (a rank died, or did not answer within engine.distributed_timeout={self.timeout:g}s): {exc}")
            raise RuntimeError(self.broken) from exc

    def _fail(self, reason: str) -> None:
        self.broken = f"{reason}; the tensor-parallel engine is stopped"
        logger.error("%s", self.broken)
        if self.workers is not None:
            self.workers.kill()

    def close(self, timeout: float = 10.0) -> None:
        """Rank 0: stop the other ranks (they exit) and leave the group."""
        if not dist.is_initialized():
            return
        if self.broken is None and self.tp.rank == 0:
            try:
                step_message.send_stop(self.control, self.device)
            except Exception as exc:  # a rank already gone: it is killed below
                logger.warning("stopping tensor-parallel ranks: %s", exc)
        if self.workers is not None:
            self.workers.stop(timeout)
        dist.destroy_process_group()
