"""The rank processes an engine starts on one machine (`engine.tensor_parallel_size=N` without
torchrun): ranks 1..N-1 as `python -m framework.distributed.worker`, given their settings on stdin.
Each worker exits when its parent does (it watches its parent's pid), so none outlives rank 0."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import framework

PARENT_ENV = "FRAMEWORK_TP_PARENT"  # set for the workers an engine starts: the pid they watch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalWorkers:
    """Ranks 1..size-1 on this machine, rendezvousing with rank 0 at 127.0.0.1:`port`."""

    def __init__(self, size: int, settings: dict):
        self.port = free_port()
        checkout = str(Path(framework.__file__).resolve().parent.parent)  # the framework this process runs
        self.processes: dict[int, subprocess.Popen] = {}
        try:
            message = pickle.dumps(settings)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"the settings of the other ranks cannot be sent to them ({exc}): a plugin given to "
                "LLM(plugins=...) must be a module, or an object of a class defined at a module's top level"
            ) from exc
        for rank in range(1, size):
            env = {
                **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port), "RANK": str(rank),
                "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size), PARENT_ENV: str(os.getpid()),
                "PYTHONPATH": os.pathsep.join([checkout, *filter(None, [os.environ.get("PYTHONPATH")])]),
            }
            process = subprocess.Popen([sys.executable, "-m", "framework.distributed.worker"], stdin=subprocess.PIPE, env=env)
            process.stdin.write(message)
            process.stdin.close()
            self.processes[rank] = process

    def exited(self, wait: float = 0.0) -> str | None:
        """How the first rank that ended did (waiting up to `wait` seconds for one), or None."""
        deadline = time.monotonic() + wait
        while True:
            for rank, process in self.processes.items():
                if process.poll() is not None:
                    return f"tensor-parallel rank {rank} (pid {process.pid}) {_describe_exit(process.returncode)}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for every worker to exit, then kill the rest."""
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()
