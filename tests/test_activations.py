"""The activation registry (SPEC §1): values, identities, derivatives, ranges, ONNX data, errors, registration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gatelab
from gatelab import activations

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64

# SPEC §1's table, written from the definitions there (plain math, independent of the registry).
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


REFERENCE = {
    "sigmoid": _sig,
    "hard_sigmoid": lambda x: min(max(x / 6 + 0.5, 0.0), 1.0),
    "elliott": lambda x: 0.5 * x / (1 + abs(x)) + 0.5,
    "tanh": math.tanh,
    "hardtanh": lambda x: min(max(x, -1.0), 1.0),
    "softsign": lambda x: x / (1 + abs(x)),
    "relu": lambda x: max(0.0, x),
    "leaky_relu": lambda x: max(0.01 * x, x),
    "elu": lambda x: x if x > 0 else math.expm1(x),
    "selu": lambda x: _SELU_SCALE * (x if x > 0 else _SELU_ALPHA * math.expm1(x)),
    "gelu": lambda x: x * 0.5 * (1 + math.erf(x / math.sqrt(2))),
    "silu": lambda x: x * _sig(x),
    "softplus": lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x))),
    "identity": lambda x: x,
    "linear": lambda x: x,
    "leaky_relu:0.2": lambda x: max(0.2 * x, x),
    "elu:0.5": lambda x: x if x > 0 else 0.5 * math.expm1(x),
    "hard_sigmoid:0.2": lambda x: min(max(0.2 * x + 0.5, 0.0), 1.0),
}
LEARNABLE = {  # name -> (reference f(x, w), init value of w)
    "prelu": (lambda x, a: max(0.0, x) + a * min(0.0, x), 0.25),
    "adaptive_sigmoid": (lambda x, b: _sig(b * x), 1.0),
    "adaptive_tanh": (lambda x, b: math.tanh(b * x), 1.0),
}
SPEC_NAMES = {n for n in REFERENCE if ":" not in n and n != "linear"} | set(LEARNABLE)
PARAMETERISED = ["leaky_relu:0.2", "elu:0.5", "hard_sigmoid:0.2"]
KINKS = (0.0, -1.0, 1.0, -3.0, 3.0, -2.5, 2.5)  # relu-likes, hardtanh, hard_sigmoid, hard_sigmoid:0.2

# A float64 grid that keeps 1e-3 away from every kink above.
_GRID = torch.linspace(-6.0, 6.0, 1201, dtype=F64) + 0.0037
GRID = _GRID[torch.stack([(_GRID - k).abs() > 1e-3 for k in KINKS]).all(0)]


def _ref(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([fn(v) for v in x.tolist()], dtype=x.dtype)


def _autograd(fn, x: torch.Tensor) -> torch.Tensor:
    xr = x.detach().clone().requires_grad_(True)
    (d,) = torch.autograd.grad(fn(xr).sum(), xr)
    return d


def _bound(name: str, units: int, weight: torch.Tensor | None = None):
    """A learnable entry bound to ``units`` in float64, with ``weight`` if given."""
    act = activations.get(name).bind(units).to(F64)
    if weight is not None:
        with torch.no_grad():
            act.weight.copy_(weight)
    return act


# -- the table ------------------------------------------------------------------------------------


def test_every_spec_name_is_registered():
    assert SPEC_NAMES <= set(activations.available())
    assert activations.get("linear") is activations.get("identity")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_forward_matches_spec_definition(name):
    act = activations.get(name)
    x = torch.linspace(-8, 8, 161, dtype=F64)
    torch.testing.assert_close(act(x), _ref(REFERENCE[name], x), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", sorted(LEARNABLE))
def test_learnable_forward_matches_spec_definition(name):
    ref, init = LEARNABLE[name]
    weights = torch.tensor([init, -0.7, 1.5, 0.1], dtype=F64)
    x = torch.linspace(-5, 5, 41, dtype=F64)[:, None].expand(41, 4)
    act = _bound(name, 4)
    torch.testing.assert_close(act.weight, torch.full((4,), init, dtype=F64))  # SPEC: init value
    with torch.no_grad():
        act.weight.copy_(weights)
    expected = torch.tensor([[ref(v, w) for v, w in zip(row, weights.tolist())] for row in x.tolist()], dtype=F64)
    torch.testing.assert_close(act(x), expected, rtol=1e-13, atol=1e-14)


def test_learnable_entry_is_not_callable_before_binding():
    with pytest.raises(TypeError, match="learnable: bind it"):
        activations.get("prelu")(torch.zeros(3))


def test_hard_sigmoid_default_is_pytorch_form():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=F64)
    expected = torch.tensor([0.0, 1 / 3, 1 / 2, 2 / 3, 1.0], dtype=F64)
    torch.testing.assert_close(activations.get("hard_sigmoid")(x), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(F.hardsigmoid(x), expected, rtol=0, atol=1e-15)


def test_hard_sigmoid_keras2_onnx_form():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=F64)
    expected = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0], dtype=F64)
    torch.testing.assert_close(activations.get("hard_sigmoid:0.2")(x), expected, rtol=0, atol=1e-15)


def test_parameters_are_honoured():
    x = torch.tensor([-2.0, -0.5, 1.5], dtype=F64)
    torch.testing.assert_close(activations.get("leaky_relu:0.2")(x), torch.tensor([-0.4, -0.1, 1.5], dtype=F64))
    torch.testing.assert_close(activations.get("leaky_relu")(x), torch.tensor([-0.02, -0.005, 1.5], dtype=F64))
    elu_half = torch.tensor([0.5 * math.expm1(-2.0), 0.5 * math.expm1(-0.5), 1.5], dtype=F64)
    torch.testing.assert_close(activations.get("elu:0.5")(x), elu_half)
    torch.testing.assert_close(activations.get("elu")(x), torch.tensor([math.expm1(-2.0), math.expm1(-0.5), 1.5],
                                                                       dtype=F64))
    assert activations.get("leaky_relu:0.2") is not activations.get("leaky_relu")
    assert activations.get("leaky_relu:0.2").key == "leaky_relu:0.2"


# -- one entry per meaning ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "specs",
    [
        ["tanh", torch.tanh, F.tanh, nn.Tanh(), "TANH", " tanh "],
        ["sigmoid", torch.sigmoid, F.sigmoid, nn.Sigmoid()],
        ["relu", torch.relu, F.relu, nn.ReLU()],
        ["leaky_relu:0.2", nn.LeakyReLU(0.2), "leaky_relu:0.20"],
        ["leaky_relu", "leaky_relu:0.01", nn.LeakyReLU(), F.leaky_relu],
        ["hard_sigmoid", nn.Hardsigmoid(), F.hardsigmoid, "hardsigmoid"],
        ["elu:0.5", nn.ELU(alpha=0.5)],
        ["elu", nn.ELU(), F.elu, "elu:1"],
        ["identity", "linear", nn.Identity()],
        ["gelu", nn.GELU(), F.gelu],
    ],
    ids=lambda specs: str(specs[0]),
)
def test_semantically_equal_specs_are_one_entry(specs):
    entries = [activations.get(s) for s in specs]
    assert all(e is entries[0] for e in entries), entries


def test_different_meanings_are_different_entries():
    assert activations.get(nn.GELU(approximate="tanh")) is not activations.get("gelu")
    assert activations.get(nn.Hardtanh(-2.0, 2.0)) is not activations.get("hardtanh")
    assert activations.get("hard_sigmoid:0.2") is not activations.get("hard_sigmoid")


def test_get_passes_entries_and_plain_callables_through():
    entry = activations.get("tanh")
    assert activations.get(entry) is entry

    def cube(x):
        return x**3

    user = activations.get(cube)
    assert activations.get(cube) is user
    torch.testing.assert_close(user(torch.tensor([2.0])), torch.tensor([8.0]))


# -- derivatives ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(set(activations.available()) - set(LEARNABLE)) + PARAMETERISED)
def test_derivative_agrees_with_autograd_float64(name):
    act = activations.get(name)
    y = act(GRID)
    expected = _autograd(act, GRID)
    torch.testing.assert_close(act.derivative(GRID, y), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(act.derivative(GRID), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(set(activations.available()) - set(LEARNABLE)) + PARAMETERISED)
def test_derivative_agrees_with_autograd_float32(name):
    act = activations.get(name)
    x = GRID.float()
    torch.testing.assert_close(act.derivative(x, act(x)), _autograd(act, x), rtol=1e-5, atol=1e-6)
    assert act.derivative(x, act(x)).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(LEARNABLE))
def test_learnable_derivatives_agree_with_autograd(name):
    weights = torch.tensor([0.3, -0.7, 1.5, 2.0], dtype=F64)
    act = _bound(name, 4, weights)
    x = GRID[::10, None].expand(-1, 4).contiguous()
    y = act(x)
    torch.testing.assert_close(act.derivative(x, y), _autograd(act, x), rtol=1e-12, atol=1e-14)
    # ∂f/∂w elementwise: every row of x alone gives the gradient of the sum with respect to w.
    for row in range(x.shape[0]):
        xr = x[row : row + 1]
        (dw,) = torch.autograd.grad(act(xr).sum(), act.weight)
        torch.testing.assert_close(act.param_derivative(xr, act(xr))[0], dw, rtol=1e-12, atol=1e-14)


def _central_difference(fn, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    return (fn(x + h) - fn(x - h)) / (2 * h)


def test_sigmoid_derivative_identity():
    x = torch.linspace(-8, 8, 321, dtype=F64)
    s = torch.sigmoid(x)
    torch.testing.assert_close(_central_difference(torch.sigmoid, x), s * (1 - s), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(activations.get("sigmoid").derivative(x, s), s * (1 - s), rtol=1e-14, atol=0.0)


def test_tanh_derivative_identity():
    x = torch.linspace(-5, 5, 201, dtype=F64)
    t = torch.tanh(x)
    torch.testing.assert_close(_central_difference(torch.tanh, x), 1 - t * t, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(activations.get("tanh").derivative(x, t), 1 - t * t, rtol=1e-14, atol=0.0)


# -- output range ---------------------------------------------------------------------------------

WIDE = torch.cat([torch.linspace(-60, 60, 12001, dtype=F64), torch.tensor([-1e4, -1e3, 1e3, 1e4], dtype=F64)])


@pytest.mark.parametrize("name", sorted(set(activations.available()) - set(LEARNABLE)) + PARAMETERISED)
def test_output_range_holds_and_is_tight(name):
    act = activations.get(name)
    lo, hi = act.output_range
    y = act(WIDE)
    assert y.min().item() >= lo and y.max().item() <= hi, (y.min().item(), y.max().item(), (lo, hi))
    if math.isfinite(lo):
        assert y.min().item() - lo < 0.01
    if math.isfinite(hi):
        assert hi - y.max().item() < 0.01


@pytest.mark.parametrize("name", ["adaptive_sigmoid", "adaptive_tanh"])
def test_learnable_output_range_holds(name):
    act = _bound(name, 3, torch.tensor([0.2, 1.0, -3.0], dtype=F64))
    lo, hi = act.output_range
    y = act(WIDE[:, None].expand(-1, 3))
    assert y.min().item() >= lo and y.max().item() <= hi


def test_range_of_a_parameterised_elu():
    assert activations.get("elu:0.5").output_range[0] == -0.5


# -- metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, onnx, alpha, beta",
    [
        ("hard_sigmoid", "HardSigmoid", 1 / 6, 0.5),
        ("hard_sigmoid:0.2", "HardSigmoid", 0.2, 0.5),
        ("leaky_relu", "LeakyRelu", 0.01, None),
        ("leaky_relu:0.2", "LeakyRelu", 0.2, None),
        ("elu", "Elu", 1.0, None),
        ("elu:0.5", "Elu", 0.5, None),
        ("sigmoid", "Sigmoid", None, None),
        ("tanh", "Tanh", None, None),
        ("relu", "Relu", None, None),
    ],
)
def test_onnx_metadata(spec, onnx, alpha, beta):
    act = activations.get(spec)
    assert act.onnx == onnx
    assert act.onnx_alpha == (pytest.approx(alpha, rel=1e-15) if alpha is not None else None)
    assert act.onnx_beta == (pytest.approx(beta, rel=1e-15) if beta is not None else None)


def test_torch_default_exactly_sigmoid_tanh_relu():
    defaults = {n for n in activations.available() if activations.get(n).torch_default}
    assert defaults == {"sigmoid", "tanh", "relu"}
    assert not any(activations.get(s).torch_default for s in PARAMETERISED)


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'nope'; valid names: ") as info:
        activations.get("nope")
    for name in activations.available():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tanh:2", r"'tanh' takes no parameter, got 'tanh:2'; parameterised: .*leaky_relu"),
        ("leaky_relu:abc", r"parameter in 'leaky_relu:abc' must be a number, got 'abc'"),
        ("leaky_relu:", r"must be a number, got ''"),
        ("elu:inf", r"parameter in 'elu:inf' must be finite"),
    ],
)
def test_bad_parameter_raises(spec, message):
    with pytest.raises(ValueError, match=message):
        activations.get(spec)


@pytest.mark.parametrize("spec", [3, None, 2.5, [torch.tanh]])
def test_non_callable_raises_type_error(spec):
    with pytest.raises(TypeError, match=rf"activation must be a name, an Activation, a callable or an nn\.Module; "
                                        rf"got {type(spec).__name__}"):
        activations.get(spec)


# -- registration ---------------------------------------------------------------------------------


@pytest.fixture
def clean_registry():
    """Undo registrations made by a test, so ``available()`` is the same for every other test."""
    saved = {d: dict(getattr(activations, d)) for d in ("_FAMILIES", "_CACHE", "_CALLABLES", "_USER_CALLABLES")}
    yield
    for d, content in saved.items():
        getattr(activations, d).clear()
        getattr(activations, d).update(content)


def _scaled_softsign(x):
    return 2 * x / (1 + x.abs())


def test_register_a_user_activation(clean_registry, gen):
    entry = activations.register(
        "scaled_softsign", _scaled_softsign, lambda x, y: 2 / (1 + x.abs()) ** 2, output_range=(-2.0, 2.0)
    )
    assert "scaled_softsign" in activations.available()
    assert activations.get("scaled_softsign") is entry
    assert activations.get(_scaled_softsign) is entry
    assert entry.output_range == (-2.0, 2.0) and not entry.torch_default
    torch.testing.assert_close(entry.derivative(GRID), _autograd(entry, GRID), rtol=1e-12, atol=1e-14)

    cell = gatelab.ElmanCell(3, 4, activation="scaled_softsign", dtype=F64)
    x, h = torch.randn(2, 3, generator=gen, dtype=F64), torch.randn(2, 4, generator=gen, dtype=F64)
    pre = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    torch.testing.assert_close(cell(x, h), 2 * pre / (1 + pre.abs()))


def test_register_without_derivative_uses_autograd(clean_registry):
    entry = activations.register("cube_act", lambda x: x**3)
    torch.testing.assert_close(entry.derivative(GRID), 3 * GRID**2)


def test_reregistering_needs_overwrite(clean_registry):
    activations.register("my_act", torch.sin)
    with pytest.raises(ValueError, match="activation 'my_act' is already registered; pass overwrite=True"):
        activations.register("my_act", torch.cos)
    with pytest.raises(ValueError, match="activation 'tanh' is already registered"):
        activations.register("tanh", torch.sin)
    with pytest.raises(ValueError, match="'linear' is an alias of 'identity'"):
        activations.register("linear", torch.sin)
    new = activations.register("my_act", torch.cos, overwrite=True)
    assert activations.get("my_act") is new
    torch.testing.assert_close(new(torch.zeros(2)), torch.ones(2))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "not a name", "fn": torch.sin}, ValueError, "must be a lower-case identifier, got 'not a name'"),
        ({"name": "ok_name", "fn": 3}, TypeError, "fn must be callable, got int"),
        ({"name": "ok_name", "fn": torch.sin, "derivative": 1.0}, TypeError, "derivative must be callable or None"),
        ({"name": "ok_name", "fn": torch.sin, "uses": "z"}, ValueError, "uses must be 'x', 'y' or 'xy', got 'z'"),
    ],
)
def test_register_rejects_bad_arguments(clean_registry, kwargs, error, message):
    with pytest.raises(error, match=message):
        activations.register(**kwargs)
    assert "ok_name" not in activations.available()


def test_register_rejects_names_get_could_not_resolve(clean_registry):
    with pytest.raises(ValueError, match=r"lower-case identifier, got 'MyAct'"):
        activations.register("MyAct", torch.sin)
    with pytest.raises(ValueError, match=r"alias of 'identity'"):
        activations.register("linear", torch.sin, overwrite=True)


def test_register_does_not_hijack_builtin_callables(clean_registry):
    activations.register("my_tanh", torch.tanh)
    assert activations.get(torch.tanh) is activations.get("tanh")


# -- activations inside cells ---------------------------------------------------------------------


def test_learnable_activations_in_a_cell_are_parameters_and_train(gen):
    cell = gatelab.LSTMCell(
        3, 4, gate_activation={"i": "adaptive_sigmoid", "f": "sigmoid", "o": "adaptive_sigmoid"},
        candidate_activation="prelu", cell_activation="adaptive_tanh",
    )
    slots = cell.activation_slots()
    learnable = {k: v for k, v in slots.items() if isinstance(v, nn.Module)}
    assert set(learnable) == {"sigma_i", "sigma_o", "phi", "psi"}
    assert slots["sigma_f"] is activations.get("sigmoid")
    assert learnable["sigma_i"] is not learnable["sigma_o"]  # one parameter vector per slot
    params = dict(cell.named_parameters())
    for slot, module in learnable.items():
        assert module.weight.shape == (4,)
        assert any(p is module.weight for p in params.values()), slot
        assert f"{slot}.weight" in cell.state_dict()
    x = torch.randn(2, 3, generator=gen)
    state = (torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen))
    h, c = cell(x, state)
    (h.sum() + c.sum()).backward()
    for slot, module in learnable.items():
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, slot

    before = {k: m.weight.detach().clone() for k, m in learnable.items()}
    torch.optim.SGD(cell.parameters(), lr=0.1).step()
    for slot, module in learnable.items():
        assert not torch.equal(module.weight, before[slot]), slot


def test_module_with_parameters_as_activation(gen):
    prelu = nn.PReLU(init=0.1).double()
    cell = gatelab.ElmanCell(3, 4, activation=prelu, dtype=F64)
    assert isinstance(activations.get(prelu), activations.ModuleActivation)
    assert any(p is prelu.weight for p in cell.parameters())
    assert any(torch.equal(v, prelu.weight.detach()) and k.endswith("weight") and "phi" in k
               for k, v in cell.state_dict().items())
    with torch.no_grad():
        cell.bias_ih[:2] = -3.0  # units 0, 1 negative, units 2, 3 positive: both PReLU branches
        cell.bias_ih[2:] = 3.0
    x = torch.rand(2, 3, generator=gen, dtype=F64) - 0.5
    h = torch.rand(2, 4, generator=gen, dtype=F64) - 0.5
    out = cell(x, h)
    pre = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    assert (pre[:, :2] < 0).all() and (pre[:, 2:] > 0).all()
    torch.testing.assert_close(out, torch.where(pre >= 0, pre, 0.1 * pre))
    out.sum().backward()
    assert prelu.weight.grad is not None and prelu.weight.grad.abs().item() > 0


def test_parameter_free_module_is_not_wrapped():
    cell = gatelab.ElmanCell(3, 4, activation=nn.Tanh())
    assert list(dict(cell.named_parameters())) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert cell.activation_slots()["phi"] is activations.get("tanh")


def test_learnable_activation_follows_cell_dtype():
    cell = gatelab.GRUCell(3, 4, gate_activation="adaptive_sigmoid", candidate_activation="prelu", dtype=F64)
    assert {p.dtype for p in cell.parameters()} == {F64}
    cell = gatelab.ElmanCell(3, 4, activation=nn.PReLU(4), dtype=F64)
    assert {p.dtype for p in cell.parameters()} == {F64}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_learnable_activation_follows_cell_device():
    cell = gatelab.LSTMCell(3, 4, gate_activation="adaptive_sigmoid", candidate_activation="prelu", device="cuda")
    assert {p.device.type for p in cell.parameters()} == {"cuda"}
    h, c = cell(torch.randn(2, 3, device="cuda"))
    (h.sum() + c.sum()).backward()
    assert cell.phi.weight.grad.device.type == "cuda"
