"""CUDA graphs for the per-step form of the Triton loop (:mod:`.gpu`): a direction's T recurrent
products and T elementwise kernels, captured once per shape and replayed, so that kernel launches do
not dominate at small batch sizes (the lesson of FlashRNN and haste: at small sizes an RNN step is a
few microseconds of work and as much launch overhead).

A captured graph reads and writes fixed addresses. Each key (cell, shapes, dtype, activations,
options) keeps static copies of the loop's buffers: a call copies its buffers in, replays, and copies
back those the loop writes. The first call of a key runs eagerly (which compiles the Triton kernels,
as capture requires) and then captures. At most :data:`CAPACITY` graphs are kept, least recently used
first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

CAPACITY = 8

_graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor]]] = OrderedDict()


def run(loop: Callable[[list[Tensor]], None], key: tuple, buffers: list[Tensor], written: Sequence[int]) -> None:
    """``loop(buffers)``, through the graph captured for ``key`` (see the module docstring)."""
    key = (*key, buffers[0].device, *(tuple(t.shape) for t in buffers))
    entry = _graphs.get(key)
    if entry is None:
        loop(buffers)  # this call's result, and the kernels compiled before capture
        static = _static_copies(buffers)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop(static)
        _graphs[key] = (graph, static)
        while len(_graphs) > CAPACITY:
            _graphs.popitem(last=False)
        return
    _graphs.move_to_end(key)
    graph, static = entry
    done: set[int] = set()
    for s, t in zip(static, buffers):
        if id(s) not in done:
            s.copy_(t)
            done.add(id(s))
    graph.replay()
    done.clear()
    for i in written:
        if id(buffers[i]) not in done:
            buffers[i].copy_(static[i])
            done.add(id(buffers[i]))


def _static_copies(buffers: list[Tensor]) -> list[Tensor]:
    """One clone per distinct tensor (a tensor passed in two places stays one buffer)."""
    clones: dict[int, Tensor] = {}
    return [clones.setdefault(id(t), t.clone()) for t in buffers]


def clear() -> None:
    """Drop every captured graph (and the memory its buffers hold)."""
    _graphs.clear()
