"""The layers on a CUDA device (skipped without one): native (cuDNN), reference and fused engines."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gatelab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("layer_cls", [gatelab.LSTM, gatelab.GRU, gatelab.RNN])
@pytest.mark.parametrize("packed", [False, True])
def test_native_on_cuda_equals_torch(layer_cls, packed):
    torch.manual_seed(0)
    torch_cls = {gatelab.LSTM: torch.nn.LSTM, gatelab.GRU: torch.nn.GRU, gatelab.RNN: torch.nn.RNN}[layer_cls]
    ref = torch_cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, device=CUDA)
    layer = layer_cls.from_torch(ref)
    assert layer.engine_name == "native"
    x = torch.randn(6, 4, 3, dtype=torch.float64, device=CUDA)
    inp = pack_padded_sequence(x, torch.tensor([6, 1, 4, 3]), enforce_sorted=False) if packed else x
    (o1, h1), (o2, h2) = ref(inp), layer(inp)
    o1, o2 = (o1.data, o2.data) if packed else (o1, o2)
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    for a, b in zip(h1 if isinstance(h1, tuple) else (h1,), h2 if isinstance(h2, tuple) else (h2,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layer_cls", [gatelab.LSTM, gatelab.GRU, gatelab.RNN, gatelab.GatedStateRNN])
def test_fused_on_cuda_equals_reference(layer_cls):
    torch.manual_seed(0)
    opts = {"activation": "softsign"} if layer_cls is gatelab.RNN else {"gate_activation": "hard_sigmoid"}
    ref = layer_cls(3, 5, bidirectional=True, backend="reference", dtype=torch.float64, device=CUDA, **opts)
    fus = layer_cls(3, 5, bidirectional=True, backend="fused", dtype=torch.float64, device=CUDA, **opts)
    fus.load_state_dict(ref.state_dict())
    from gatelab.engines.fused import gpu

    # the Triton loop where triton is installed, else the PyTorch loop (the C++ loop is CPU-only)
    assert ("Triton loop on CUDA" if not gpu.unavailable() else "C++ loop runs on the CPU") in fus.explain()
    x = torch.randn(6, 4, 3, dtype=torch.float64, device=CUDA, requires_grad=True)
    results = []
    for layer in (ref, fus):
        out, _ = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
