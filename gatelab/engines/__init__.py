"""Engines run a recurrent layer over a sequence; the layer chooses one and can say why.

* ``reference``: a plain autograd loop over the cell's ``step``; the readable specification.
* ``native``: torch's own fused kernels (cuDNN, oneDNN, ATen), for configurations that are exactly
  torch's.
* ``fused``: gatelab's engine for any registered activation: one input GEMM, one fused elementwise
  step per time step, hand-written backpropagation through time.

Each engine has ``unsupported(layer) -> list[str]`` (why it cannot run that layer as configured, in
its current train/eval mode; empty when it can) and ``forward(layer, batch, hx)``.
"""

from __future__ import annotations

from . import fused, native, reference

ENGINES = {"reference": reference, "native": native, "fused": fused}
BACKENDS = ("auto", *ENGINES)

__all__ = ["ENGINES", "BACKENDS", "fused", "native", "reference"]
