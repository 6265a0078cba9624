"""Decode-only steps replayed from recorded CPU graphs.

With the CPU kernels, a decode step at a small batch spends a quarter of its time in Python: module
calls, kernel wrappers, argument checks, a few hundred of them per step. A `CPUGraph` records one
step's work in order (every kernel call with the raw addresses it got, and every PyTorch operation
that computes something) and replays it later without the Python around it. Like a CUDA graph it
reads fixed addresses: the step's input tensors stay the graph's inputs, and a later step with the
same shapes copies its own inputs into them before the replay.

A step is replayable only if it did nothing whose effect a replay cannot repeat: no value read back
into Python (`.item()`), no tensor made from Python data, no operation returning a non-tensor.
Views and fresh allocations are left out of the replay (the recorded tensors stay alive in the
graph); a PyTorch operation is run again and its result copied into the recorded output.

A collective of torch.distributed (an op of the `c10d` namespace: a tensor-parallel step's
all-reduces and its gather of the logits) is called again at its place and waited for. A replay
thus runs the same collectives in the same order as the eager step it recorded, so the ranks meet
in each one whether a rank replays the step, records it or runs it eagerly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOCATIONS = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.empty_strided.default,
}
_FROM_PYTHON = {torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default}


class CPUGraph:
    def __init__(self):
        self.entries: list[tuple] = []  # ("kernel", fn, args) | ("torch", op, args, kwargs, out) | ("collective", op, args, kwargs)
        self.keep: list = []  # everything the recorded addresses point into
        self.replayable = True
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None

    def add_kernel(self, fn, args, tensors) -> None:
        self.entries.append(("kernel", fn, args))
        self.keep.append(tensors)

    def add_op(self, op, args, kwargs, out) -> None:
        if op.namespace == "c10d":
            self.entries.append(("collective", op, args, kwargs))
            return
        if op in _ALLOCATIONS:
            return
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if op in _FROM_PYTHON or not all(isinstance(o, torch.Tensor) for o in outs):
            self.replayable = False
        elif _writes(op) or not all(_aliases(o, args) for o in outs):  # (views: same memory, nothing to compute)
            if len(outs) == 1:
                self.entries.append(("torch", op, args, kwargs, out))
            else:
                self.replayable = False

    def replay(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        for static, fresh in zip(self.inputs, inputs):
            static.copy_(fresh)
        for entry in self.entries:
            if entry[0] == "kernel":
                entry[1](*entry[2])
            elif entry[0] == "collective":
                _, op, args, kwargs = entry
                result = op(*args, **kwargs)  # (tensors, work) or work
                (result[-1] if isinstance(result, tuple) else result).wait()
            else:
                _, op, args, kwargs, out = entry
                result = op(*args, **kwargs)
                if result.data_ptr() != out.data_ptr():
                    out.copy_(result)
        return self.output


def _writes(op) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _aliases(out: torch.Tensor, args) -> bool:
    storage = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage for a in args)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: CPUGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = op(*args, **kwargs)
        self.graph.add_op(op, args, kwargs, out)
        return out


def record(kernels, step, inputs: list[torch.Tensor]) -> CPUGraph:
    """Run `step()` (which reads `inputs` and returns a tensor) once for real, recording it."""
    graph = CPUGraph()
    graph.inputs = inputs
    with kernels.recording(graph), _Recorder(graph):
        graph.output = step()
    return graph


class CPUDecodeGraphs:
    """The graphs of decode steps, keyed by what fixes a step's shapes and kernel arguments. A key is
    recorded the second time it is seen among the last `4 * capacity` keys (a key seen once, as in
    steps whose batch keeps changing, would not pay for its recording; verify steps alternate
    between a few query lengths), replayed from then on; the `capacity` most recent graphs are kept
    (a serving run's batch sizes are a few dozen keys)."""

    def __init__(self, kernels, kv_caches, capacity: int = 48):
        self.kernels = kernels
        self.kv_caches = kv_caches
        self.capacity = capacity
        self.graphs: OrderedDict[tuple, CPUGraph | None] = OrderedDict()  # None: not replayable
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # keys run once, not recorded yet

    def run(self, key: tuple, step, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The output of `step()` on `inputs`: replayed, recorded, or run as it is."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            graph = self.graphs[key]
            return step() if graph is None else graph.replay(inputs)
        if key not in self.seen:  # a first sight runs as it is
            self.seen[key] = None
            if len(self.seen) > 4 * self.capacity:
                self.seen.popitem(last=False)
            return step()
        del self.seen[key]
        graph = record(self.kernels, step, inputs)
        self.graphs[key] = graph if graph.replayable else None
        if len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)
        return graph.output
