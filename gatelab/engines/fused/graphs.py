"""CUDA graphs for the per-step form of the Triton loop (:mod:`.gpu`): a direction's T recurrent
products and T elementwise kernels, captured once per shape and replayed, so that kernel launches do
not dominate at small batch sizes (the lesson of FlashRNN and haste: at small sizes an RNN step is a
few microseconds of work and as much launch overhead).

A captured graph reads and writes fixed addresses. Each key (cell, shapes, dtype, activations,
options) keeps static copies of the loop's buffers: a call copies its buffers in, replays, and copies
back those the loop writes. The first call of a key runs eagerly (which compiles the Triton kernels,
as capture requires), the second captures. At most :data:`CAPACITY` graphs are kept, least recently
used first out; only loops whose buffers are small are graphed at all (:func:`.gpu.graph_worth_it`), so
that the static copies cost little memory.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

CAPACITY = 8

_graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor]] | None] = OrderedDict()
_seen: set[tuple] = set()  # keys run once: a key is captured the second time it comes


def run(loop: Callable[[list[Tensor]], None], key: tuple, buffers: list[Tensor], written: Sequence[int]) -> None:
    """``loop(buffers)``, through the graph captured for ``key`` (see the module docstring). A key is
    captured the second time it is seen (a shape seen once, e.g. one odd sequence length, is not worth
    a capture); a capture that fails leaves the key on the eager loop."""
    key = (*key, buffers[0].device, *(tuple(t.shape) for t in buffers))
    if key not in _graphs:
        loop(buffers)
        if key in _seen:
            _graphs[key] = _capture(loop, buffers)
            while len(_graphs) > CAPACITY:
                _graphs.popitem(last=False)
        _seen.add(key)
        return
    _graphs.move_to_end(key)
    entry = _graphs[key]
    if entry is None:  # its capture failed
        loop(buffers)
        return
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


def _capture(loop: Callable[[list[Tensor]], None], buffers: list[Tensor]) -> tuple | None:
    static = _static_copies(buffers)
    try:
        loop(static)  # warm-up on the static buffers themselves (their alignment may pick other kernels)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loop(static)
    except RuntimeError as e:
        warnings.warn(f"gatelab: capturing the Triton loop as a CUDA graph failed ({e}); this shape runs without one",
                      RuntimeWarning, stacklevel=4)
        return None
    return graph, static


def _static_copies(buffers: list[Tensor]) -> list[Tensor]:
    """One clone per distinct tensor (a tensor passed in two places stays one buffer)."""
    clones: dict[int, Tensor] = {}
    return [clones.setdefault(id(t), t.clone()) for t in buffers]


def clear() -> None:
    """Drop every captured graph (and the memory its buffers hold)."""
    _graphs.clear()
    _seen.clear()
