"""Per-cell elementwise steps of the fused engine, forward and hand-written backward, in PyTorch.

Each ``*Step`` class knows one cell type. Given the input pre-activations ``xw_t = W_ih x_t + b``
and the recurrent product ``gh = W_hh h_rec + b_hh``, ``forward`` returns the step's output, its new
state and what the backward needs; ``backward`` turns the gradients of the output and new state into
the gradients of ``xw_t`` and ``gh`` (the engine turns those into weight gradients with matrix
products after the loop), of the old state and of the cell's extra parameters (peepholes, learnable
activations). The matrix products around these steps live in :mod:`.function`.

The C++ kernels in ``kernels.cpp`` compute exactly these steps; tests tie the two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.parametrize import type_before_parametrizations

from ...activations import Activation, LearnableActivation
from ...cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell, RecurrentCell

Saved = tuple[Tensor | None, ...]


def _act_param(act: Any) -> Tensor | None:
    return act.weight if isinstance(act, LearnableActivation) else None


class Step:
    """Shared plumbing: the cell's extra parameters and the activation-derivative helpers."""

    def __init__(self, cell: RecurrentCell, weight_hh: Tensor | None = None) -> None:
        self.cell = cell
        self.W_hh = cell.weight_hh if weight_hh is None else weight_hh  # DropConnect may replace it
        self.slots = cell.activation_slots()  # e.g. {"sigma_i": ..., "phi": ...}

    def extra_params(self) -> list[Tensor]:
        """Parameters besides W_ih, W_hh, b_ih, b_hh whose gradients this step produces."""
        return [p for act in self.slots.values() if (p := _act_param(act)) is not None]

    def act_param_grads(self, grads: dict[str, Tensor]) -> list[Tensor]:
        """Order ``grads`` (slot -> gradient of its learnable weight) like :meth:`extra_params`."""
        return [grads.get(s, torch.zeros_like(p)) for s, act in self.slots.items() if (p := _act_param(act)) is not None]

    def param_grads(self, grads: dict[str, Tensor]) -> list[Tensor]:
        """Gradients of :meth:`extra_params`, in that order."""
        return self.act_param_grads(grads)

    def fix_weight_grads(self, dW_hh: Tensor, db_hh: Tensor | None, dxws: Tensor, saved: list[Saved]) -> None:
        """Add weight-gradient terms the generic GEMMs miss (none for most cells)."""

    @staticmethod
    def d(act: Activation | LearnableActivation, z: Tensor, y: Tensor, dy: Tensor,
          pgrads: dict[str, Tensor], slot: str) -> Tensor:
        """``dL/dz`` from ``dL/dy`` for ``y = act(z)``; accumulates a learnable weight's gradient."""
        if isinstance(act, LearnableActivation):
            pg = (dy * act.param_derivative(z, y)).sum(0)
            pgrads[slot] = pgrads[slot] + pg if slot in pgrads else pg
        return dy * act.derivative(z, y)


class ElmanStep(Step):
    """h' = φ(xw + gh)."""

    def forward(
        self, xw: Tensor, gh: Tensor, state: tuple[Tensor, ...], h_rec: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...], Saved]:
        z = xw + gh
        h = self.cell.phi(z)
        return h, (h,), (z, h)

    def backward(self, dout: Tensor, dstate: tuple[Tensor, ...], saved: Saved, state: tuple[Tensor, ...],
                 pgrads: dict[str, Tensor], pext: list[Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        z, h = saved
        dz = self.d(self.cell.phi, z, h, dout + dstate[0], pgrads, "phi")
        return dz, dz, (torch.zeros_like(h),), None


class GatedStateStep(Step):
    """f, i, o, s̃ from xw + gh; s' = f s + i s̃; y = o s'."""

    def forward(self, xw, gh, state, h_rec):
        (s,) = state
        zf, zi, zo, zn = (xw + gh).chunk(4, 1)
        c = self.cell
        f, i, o, n = c.sigma_f(zf), c.sigma_i(zi), c.sigma_o(zo), c.phi(zn)
        s_new = f * s + i * n
        y = o * s_new
        return y, (s_new,), (zf, zi, zo, zn, f, i, o, n, s, s_new)

    def backward(self, dout, dstate, saved, state, pgrads, pext):
        zf, zi, zo, zn, f, i, o, n, s, s_new = saved
        c = self.cell
        ds = dstate[0] + dout * o
        dzo = self.d(c.sigma_o, zo, o, dout * s_new, pgrads, "sigma_o")
        dzf = self.d(c.sigma_f, zf, f, ds * s, pgrads, "sigma_f")
        dzi = self.d(c.sigma_i, zi, i, ds * n, pgrads, "sigma_i")
        dzn = self.d(c.phi, zn, n, ds * i, pgrads, "phi")
        dz = torch.cat([dzf, dzi, dzo, dzn], 1)
        return dz, dz, (ds * f,), None


class GRUStep(Step):
    """r, z from xw + gh; n = φ(xw_n + r ⊙ gh_n) (reset-after) or φ(xw_n + W_hn (r ⊙ h) + b_hn) (reset-before)."""

    def forward(self, xw, gh, state, h_rec):
        (h,) = state
        c = self.cell
        xr, xz, xn = xw.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = c.sigma_r(xr + hr), c.sigma_z(xz + hz)
        rh = None
        if not c.reset_after:  # the n block needs its own product with r ⊙ h
            rh = r * h_rec
            hn = rh @ self.W_hh[2 * c.hidden_size:].t()
            if c.bias:
                hn = hn + c.bias_hh[2 * c.hidden_size:]
        zn = xn + r * hn if c.reset_after else xn + hn
        n = c.phi(zn)
        h_new = (1 - z) * n + z * h
        return h_new, (h_new,), (xr + hr, xz + hz, zn, r, z, n, hn, h, h_rec, rh)

    def backward(self, dout, dstate, saved, state, pgrads, pext):
        ar, az, zn, r, z, n, hn, h, h_rec, rh = saved
        c = self.cell
        dh = dout + dstate[0]
        dzn = self.d(c.phi, zn, n, dh * (1 - z), pgrads, "phi")
        daz = self.d(c.sigma_z, az, z, dh * (h - n), pgrads, "sigma_z")
        if c.reset_after:
            dar = self.d(c.sigma_r, ar, r, dzn * hn, pgrads, "sigma_r")
            dgh = torch.cat([dar, daz, dzn * r], 1)
            return torch.cat([dar, daz, dzn], 1), dgh, (dh * z,), None
        drh = dzn @ self.W_hh[2 * c.hidden_size:]  # (B, H)
        dar = self.d(c.sigma_r, ar, r, drh * h_rec, pgrads, "sigma_r")
        dgh = torch.cat([dar, daz, torch.zeros_like(dzn)], 1)
        return torch.cat([dar, daz, dzn], 1), dgh, (dh * z,), drh * r

    def fix_weight_grads(self, dW_hh: Tensor, db_hh: Tensor | None, dxws: Tensor, saved: list[Saved]) -> None:
        """Reset-before: the n rows of W_hh multiply r ⊙ h, not h; add their gradient here."""
        c = self.cell
        if c.reset_after:
            return
        H = c.hidden_size
        dzn = dxws[..., 2 * H:].reshape(-1, H)
        rh = torch.stack([s[-1] for s in saved if s is not None]).reshape(-1, H) if saved else None
        dW_hh[2 * H:] += dzn.t() @ rh
        if db_hh is not None:
            db_hh[2 * H:] += dzn.sum(0)


class LSTMStep(Step):
    """LSTM with peepholes (both output forms), CIFG, removed gates and projection."""

    def __init__(self, cell: LSTMCell, weight_hh: Tensor | None = None) -> None:
        super().__init__(cell, weight_hh)
        self.peep = {g: getattr(cell, f"weight_c{g}") for g in "ifo"}

    def extra_params(self) -> list[Tensor]:
        c = self.cell
        own = [p for p in (*self.peep.values(), c.weight_hr) if p is not None]
        return own + super().extra_params()

    def forward(self, xw, gh, state, h_rec):
        c = self.cell
        h, c_prev = state
        pre = dict(zip(c.blocks, (xw + gh).chunk(len(c.blocks), 1)))
        z, a = {}, {}
        for g in "if":
            if g in pre:
                z[g] = pre[g] + self.peep[g] * c_prev if self.peep[g] is not None else pre[g]
                a[g] = getattr(c, f"sigma_{g}")(z[g])
        if c.coupled:
            a["i"] = 1 - a["f"]
        z["g"] = pre["g"]
        a["g"] = c.phi(z["g"])
        c_new = (a["f"] * c_prev if "f" in a else c_prev) + (a["i"] * a["g"] if "i" in a else a["g"])
        if "o" in pre:
            c_ref = c_prev if c.peephole_output == "previous" else c_new
            z["o"] = pre["o"] + self.peep["o"] * c_ref if self.peep["o"] is not None else pre["o"]
            a["o"] = c.sigma_o(z["o"])
        k = c.psi(c_new)
        h_raw = a["o"] * k if "o" in a else k
        h_new = h_raw @ c.weight_hr.t() if c.proj_size else h_raw
        return h_new, (h_new, c_new), (z, a, c_prev, c_new, k, h_raw)

    def backward(self, dout, dstate, saved, state, pgrads, pext):
        c = self.cell
        z, a, c_prev, c_new, k, h_raw = saved
        dh = dout + dstate[0]
        if c.proj_size:
            pgrads["weight_hr"] = pgrads.get("weight_hr", 0) + dh.t() @ h_raw
            dh = dh @ c.weight_hr
        dk = dh * a["o"] if "o" in a else dh
        dc = dstate[1] + self.d(c.psi, c_new, k, dk, pgrads, "psi")
        dz: dict[str, Tensor] = {}
        dc_prev_extra = 0.0
        if "o" in a:
            dz["o"] = self.d(c.sigma_o, z["o"], a["o"], dh * k, pgrads, "sigma_o")
            if self.peep["o"] is not None:
                if c.peephole_output == "previous":
                    dc_prev_extra = dz["o"] * self.peep["o"]
                    _acc(pgrads, "weight_co", (dz["o"] * c_prev).sum(0))
                else:
                    dc = dc + dz["o"] * self.peep["o"]
                    _acc(pgrads, "weight_co", (dz["o"] * c_new).sum(0))
        da = {"g": dc * a["i"] if "i" in a else dc}
        if "i" in a:
            da["i"] = dc * a["g"]
        if "f" in a:
            da["f"] = dc * c_prev
        if c.coupled:
            da["f"] = da["f"] - da["i"]
        dc_prev = (dc * a["f"] if "f" in a else dc) + dc_prev_extra
        dz["g"] = self.d(c.phi, z["g"], a["g"], da["g"], pgrads, "phi")
        for g in "if":
            if g in z:
                dz[g] = self.d(getattr(c, f"sigma_{g}"), z[g], a[g], da[g], pgrads, f"sigma_{g}")
                if self.peep[g] is not None:
                    dc_prev = dc_prev + dz[g] * self.peep[g]
                    _acc(pgrads, f"weight_c{g}", (dz[g] * c_prev).sum(0))
        dpre = torch.cat([dz[b] for b in c.blocks], 1)
        return dpre, dpre, (torch.zeros_like(dout), dc_prev), None

    def param_grads(self, pgrads: dict[str, Tensor]) -> list[Tensor]:
        c = self.cell
        own = [(f"weight_c{g}", p) for g, p in self.peep.items() if p is not None]
        if c.weight_hr is not None:
            own.append(("weight_hr", c.weight_hr))
        return [pgrads.get(n, torch.zeros_like(p)) for n, p in own] + self.act_param_grads(pgrads)


def _acc(grads: dict[str, Tensor], name: str, value: Tensor) -> None:
    grads[name] = grads[name] + value if name in grads else value


class GenericStep(Step):
    """Any cell with a ``"matrix"`` recurrence and :meth:`~gatelab.cells.RecurrentCell.combine`: the
    forward runs ``combine`` under autograd on fresh leaves, the backward asks autograd for the
    step's gradients. Slower than a hand-written step, but a new cell kind runs on the fused engine's
    loop (one input GEMM, one recurrent GEMM per step, weight gradients after the loop) with nothing
    more than its registry entry."""

    _MATRIX = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def extra_params(self) -> list[Tensor]:
        return [p for n, p in self.cell.named_parameters() if n not in self._MATRIX]

    def forward(self, xw, gh, state, h_rec):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (xw, gh, *state)]
            out, new = self.cell.combine(leaves[0], leaves[1], tuple(leaves[2:]))
        return out.detach(), tuple(s.detach() for s in new), (leaves, out, new)

    def backward(self, dout, dstate, saved, state, pgrads, pext):
        leaves, out, new = saved
        params = self.extra_params()
        outputs, grads = zip(*[(t, g) for t, g in zip((out, *new), (dout, *dstate)) if t.requires_grad])
        # retain_graph: a caller may run the outer backward twice (gradcheck does)
        found = torch.autograd.grad(outputs, [*leaves, *params], grads, allow_unused=True, retain_graph=True)
        found = [torch.zeros_like(t) if g is None else g for t, g in zip([*leaves, *params], found)]
        n = len(leaves)
        for i, g in enumerate(found[n:]):
            _acc(pgrads, i, g)
        return found[0], found[1], tuple(found[2:n]), None

    def param_grads(self, pgrads: dict[Any, Tensor]) -> list[Tensor]:
        return [pgrads.get(i, torch.zeros_like(p)) for i, p in enumerate(self.extra_params())]


# The hand-written steps, for exactly these classes (a subclass may compute something else).
STEPS: dict[type, type[Step]] = {ElmanCell: ElmanStep, GRUCell: GRUStep, LSTMCell: LSTMStep, GatedStateCell: GatedStateStep}


def step_class(cell: RecurrentCell) -> type[Step] | None:
    """The step the fused loops use for ``cell``: its hand-written one, :class:`GenericStep` for a
    matrix recurrence with ``combine()``, else None (the fused engine cannot run it)."""
    cls = type_before_parametrizations(cell)
    if cls in STEPS:
        return STEPS[cls]
    if cell.recurrence == "matrix" and cls.combine is not RecurrentCell.combine and cls.step is RecurrentCell.step:
        return GenericStep  # its step is the two products and combine(), which is what the loop runs
    return None
