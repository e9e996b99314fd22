"""Initialisation schemes for recurrent cells, applied per gate block.

* ``"torch"``: every weight and bias ~ U(±1/√H), as torch.nn does.
* ``"orthogonal"``: Xavier-uniform input weights and an orthogonal recurrent matrix per gate block;
  biases zero.
* ``"identity"``: IRNN (Le et al. 2015): each recurrent block is the identity, input weights
  ~ N(0, 0.001²), biases zero.
* ``"chrono"``: Tallec & Ollivier 2018: torch's weights, then the forget bias (GRU: update gate ``z``)
  ~ log U(1, T_max − 1) and the input bias its negative; needs ``chrono_max_length``.

``forget_bias=v`` then sets the *effective* forget bias ``b_ih + b_hh`` of every unit to ``v``
(``b_ih = v``, ``b_hh = 0``). For a GRU the gate that plays the forget gate's part is ``z``
(``h' = (1 − z) n + z h``), so the value goes there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cells import RecurrentCell

SCHEMES = ("torch", "orthogonal", "identity", "chrono")


def _blocks(cell: RecurrentCell, t: Tensor) -> dict[str, Tensor]:
    """Views of ``t``'s row blocks by name (``weight_ih``, ``weight_hh`` or a bias)."""
    return dict(zip(cell.blocks, t.split(cell.hidden_size, 0)))


@torch.no_grad()
def init_cell(
    cell: RecurrentCell,
    scheme: str = "torch",
    *,
    forget_bias: float | None = None,
    chrono_max_length: int | None = None,
) -> None:
    """Initialise ``cell`` in place with ``scheme``, then apply ``forget_bias`` if given."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(SCHEMES)}")
    cell.reset_parameters()
    biases = [b for b in (cell.bias_ih, cell.bias_hh) if b is not None]
    if scheme == "orthogonal":
        for w in _blocks(cell, cell.weight_ih).values():
            nn.init.xavier_uniform_(w)
        for w in _blocks(cell, cell.weight_hh).values():
            nn.init.orthogonal_(w)
        for b in biases:
            b.zero_()
    elif scheme == "identity":
        if cell.recurrent_size != cell.hidden_size:
            raise ValueError(f"init='identity' needs square recurrent blocks; this cell's are "
                             f"{cell.hidden_size}x{cell.recurrent_size} (proj_size)")
        for w in _blocks(cell, cell.weight_hh).values():
            w.copy_(torch.eye(cell.hidden_size, dtype=w.dtype, device=w.device))
        nn.init.normal_(cell.weight_ih, 0.0, 0.001)
        for b in biases:
            b.zero_()
    elif scheme == "chrono":
        gate = cell.keep_gate
        if gate is None:
            raise ValueError(f"init='chrono' needs a forget gate; {type(cell).__name__} has none")
        if chrono_max_length is None or chrono_max_length < 3:
            raise ValueError(f"init='chrono' needs chrono_max_length >= 3 (the longest dependency), "
                             f"got {chrono_max_length}")
        if not biases:
            raise ValueError("init='chrono' sets gate biases, but the cell has bias=False")
        H = cell.hidden_size
        keep = torch.log(torch.empty(H, dtype=cell.bias_ih.dtype).uniform_(1, chrono_max_length - 1))
        _blocks(cell, cell.bias_ih)[gate].copy_(keep)
        _blocks(cell, cell.bias_hh)[gate].zero_()
        if "i" in cell.blocks and gate == "f":
            _blocks(cell, cell.bias_ih)["i"].copy_(-keep)
            _blocks(cell, cell.bias_hh)["i"].zero_()
    if forget_bias is not None:
        set_forget_bias(cell, forget_bias)


@torch.no_grad()
def set_forget_bias(cell: RecurrentCell, value: float) -> None:
    """Make the effective bias ``b_ih + b_hh`` of the forget gate (GRU: ``z``) equal ``value``."""
    gate = cell.keep_gate
    if gate is None:
        raise ValueError(f"forget_bias needs a forget gate; {type(cell).__name__} "
                         f"{'with gates=' + repr(getattr(cell, 'gates', '')) if hasattr(cell, 'gates') else ''} has none")
    if cell.bias_ih is None:
        raise ValueError("forget_bias sets a bias, but the cell has bias=False")
    if not math.isfinite(value):
        raise ValueError(f"forget_bias must be finite, got {value}")
    _blocks(cell, cell.bias_ih)[gate].fill_(value)
    _blocks(cell, cell.bias_hh)[gate].zero_()
