"""Gradient-flow diagnostics: see why an activation choice trains or fails (SPEC section 6).

>>> flow = gatelab.diagnostics.gradient_flow(model, batch)     # ‖∂L/∂h_t‖, ‖∂L/∂c_t‖ per step
>>> gatelab.diagnostics.verdict(flow.by_lag())                  # vanishing / exploding / healthy
>>> gatelab.diagnostics.state_verdicts(flow)                    # one per state, the memory state first
>>> gatelab.diagnostics.jacobian_norms(layer, x)                # ‖∂h_T/∂h_t‖₂ by lag

Every diagnostic works whatever engine a layer runs: the layers are rerun on the reference loop with
every step's state kept (:func:`recording`). Figures need the ``report`` extra (matplotlib).
"""

from .callback import GradientFlowCallback, diagnostic_record
from .diagnose import EXPERIMENTS, DiagnosePlan, diagnose_main
from .experiment import ADDING_COMPARISON, ModelSpec, compare
from .gates import (
    RELU_LIKE,
    GateStatistics,
    dead_unit_share,
    gate_statistics,
    recurrent_spectra,
    saturation_share,
    spectral_norm,
    spectral_radius,
)
from .gradients import CellTrace, GradientFlow, gradient_flow, recording, recurrent_layers
from .jacobian import jacobian_norms
from .plots import plot_gate_histograms, plot_gradient_heatmap, plot_norm_vs_lag
from .verdict import (
    FLOOR,
    TOLERANCE,
    StateVerdicts,
    Verdict,
    layer_verdicts,
    log_slope,
    memory_horizon,
    state_verdicts,
    verdict,
)

__all__ = [
    "gradient_flow", "GradientFlow", "recording", "recurrent_layers", "CellTrace",
    "jacobian_norms",
    "gate_statistics", "GateStatistics", "saturation_share", "dead_unit_share", "spectral_radius",
    "spectral_norm", "recurrent_spectra", "RELU_LIKE",
    "verdict", "Verdict", "log_slope", "memory_horizon", "TOLERANCE", "FLOOR", "state_verdicts", "layer_verdicts",
    "StateVerdicts",
    "GradientFlowCallback", "diagnostic_record",
    "plot_gradient_heatmap", "plot_norm_vs_lag", "plot_gate_histograms",
    "diagnose_main", "DiagnosePlan", "EXPERIMENTS", "ADDING_COMPARISON", "ModelSpec", "compare",
]
