"""gatelab quickstart: every cell with non-default activations, the defaults checked against torch.

Run with ``make demo`` (or ``python examples/quickstart.py``). Prints two tables: the cells, and the
sequence layers with the engine each one runs on.
"""

from __future__ import annotations

import time

import torch

import gatelab

torch.manual_seed(0)
B, T, I, H = 8, 20, 16, 32
x_step = torch.randn(B, I, dtype=torch.float64)
x_seq = torch.randn(T, B, I)


def parity(cell: torch.nn.Module, oracle: torch.nn.Module) -> float:
    """Largest |gatelab − torch| over the output and every gradient after copying torch's weights."""
    cell.load_state_dict(oracle.state_dict())
    outs = []
    for m in (cell, oracle):
        out = m(x_step)
        out = torch.cat(out, 1) if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
        outs.append([out, *grads])
    return max((a - b).abs().max().item() for a, b in zip(*outs))


def cell_rows() -> list[tuple[str, str, str]]:
    f64 = {"dtype": torch.float64}
    pairs = [
        ("ElmanCell", "tanh (= torch RNNCell)", gatelab.ElmanCell(I, H, **f64), torch.nn.RNNCell(I, H, **f64)),
        ("ElmanCell", "relu (= torch RNNCell)", gatelab.ElmanCell(I, H, nonlinearity="relu", **f64),
         torch.nn.RNNCell(I, H, nonlinearity="relu", **f64)),
        ("LSTMCell", "defaults (= torch LSTMCell)", gatelab.LSTMCell(I, H, **f64), torch.nn.LSTMCell(I, H, **f64)),
        ("GRUCell", "defaults (= torch GRUCell)", gatelab.GRUCell(I, H, **f64), torch.nn.GRUCell(I, H, **f64)),
    ]
    rows = [(name, what, f"max |gatelab - torch| {parity(cell, oracle):.1e}") for name, what, cell, oracle in pairs]
    custom = [
        ("ElmanCell", "leaky_relu:0.2", gatelab.ElmanCell(I, H, activation="leaky_relu:0.2")),
        ("LSTMCell", "gates hard_sigmoid, candidate relu", gatelab.LSTMCell(I, H, gate_activation="hard_sigmoid",
                                                                           candidate_activation="relu")),
        ("LSTMCell", "forget elliott, peepholes", gatelab.LSTMCell(I, H, gate_activation={"f": "elliott"}, peephole=True)),
        ("LSTMCell", "Greff CIFG", gatelab.LSTMCell(I, H, variant="CIFG")),
        ("LSTMCell", "layer norm, learnable prelu candidate", gatelab.LSTMCell(I, H, layer_norm=True,
                                                                              candidate_activation="prelu")),
        ("GRUCell", "candidate relu, reset before (Cho 2014)", gatelab.GRUCell(I, H, candidate_activation="relu",
                                                                              reset_after=False)),
        ("GatedStateCell", "adaptive_sigmoid gates", gatelab.GatedStateCell(I, H, gate_activation="adaptive_sigmoid")),
    ]
    for name, what, cell in custom:
        out = cell(x_step.float())
        out = out[0] if isinstance(out, tuple) else out
        rows.append((name, what, f"output mean |h| {out.abs().mean().item():.3f}"))
    return rows


def layer_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    configs = [
        ("LSTM", "torch defaults", gatelab.LSTM(I, H)),
        ("LSTM", "gates hard_sigmoid, candidate relu", gatelab.LSTM(I, H, gate_activation="hard_sigmoid",
                                                                   candidate_activation="relu")),
        ("GRU", "gates hard_sigmoid, 2 layers, bidirectional", gatelab.GRU(I, H, 2, bidirectional=True,
                                                                          gate_activation="hard_sigmoid")),
        ("RNN", "softsign, recurrent dropout 0.2", gatelab.RNN(I, H, activation="softsign", recurrent_dropout=0.2)),
        ("LSTM", "layer norm", gatelab.LSTM(I, H, layer_norm=True)),
    ]
    for name, what, layer in configs:
        layer(x_seq)  # warm-up (the fused engine compiles its C++ kernels on first use)
        t0 = time.perf_counter()
        out, _ = layer(x_seq)
        out.sum().backward()
        ms = (time.perf_counter() - t0) * 1e3
        rows.append((name, what, layer.engine_name, f"{ms:.1f}"))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


if __name__ == "__main__":
    print(f"gatelab {gatelab.__version__}, torch {torch.__version__}")
    print(f"{len(gatelab.activations.available())} activations: {', '.join(gatelab.activations.available())}\n")
    print(table(("cell", "activations", "check"), cell_rows()))
    print(f"\nLayers, batch {B}, {T} steps, forward + backward:\n")
    print(table(("layer", "configuration", "engine", "ms"), layer_rows()))
