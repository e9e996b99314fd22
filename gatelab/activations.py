"""The activation registry: one place that maps names to activation objects.

Every activation slot in gatelab accepts

* a registered name, ``"tanh"``, or a name with a parameter, ``"leaky_relu:0.2"``;
* an :class:`Activation` (what :func:`get` returns);
* a plain callable such as ``torch.tanh`` or ``F.relu``;
* an ``nn.Module`` such as ``nn.Tanh()`` or ``nn.LeakyReLU(0.2)``; a module with parameters
  (``nn.PReLU()``, your own) is kept as it is and its parameters are trained with the cell.

Semantically equal inputs resolve to the *same* object: ``get("tanh") is get(torch.tanh) is
get(nn.Tanh())``. That identity is what the engines dispatch on.

Each entry knows its forward function, its derivative (``derivative(x, y)`` with ``y = f(x)``, so
hand-written backward passes can use whichever is cheaper), its output range, whether torch's fused
RNN kernels use it (``torch_default``) and its ONNX name, alpha and beta where ONNX has one.

Learnable activations (``prelu``, ``adaptive_sigmoid``, ``adaptive_tanh``) are registry entries too;
a cell calls :meth:`Activation.bind` with its number of units to get an ``nn.Module`` holding one
parameter per unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Activation",
    "LearnableActivation",
    "ModuleActivation",
    "ActivationSpec",
    "get",
    "resolve",
    "check_elementwise",
    "available",
    "register",
]

DerivativeFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Activation:
    """A stateless elementwise activation with everything the engines need to know about it.

    ``derivative(x, y)`` returns ``f'(x)``; ``y`` is ``f(x)`` (passed because for ``sigmoid`` and
    ``tanh`` the derivative is cheapest from the output). ``uses`` says which of the two the
    derivative reads, so an engine knows what to keep for the backward pass.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    dfn: DerivativeFn | None = None
    output_range: tuple[float, float] = (-math.inf, math.inf)
    torch_default: bool = False
    onnx: str | None = None
    onnx_alpha: float | None = None
    onnx_beta: float | None = None
    param: float | None = None
    uses: str = "x"  # "x", "y" or "xy": what derivative() reads
    kind: str = ""  # engine dispatch key: base name ("tanh", "leaky_relu"); "" for user callables
    description: str = ""
    # The Triton forms (the fused engine's GPU loop): expressions in ``x`` for f(x) and in ``y`` (and
    # ``x`` only where the C++ derivative reads it too, see engines.fused.cpp._needs_input) for f'(x),
    # using ``tl`` (triton.language) builtins only (not its @jit library, e.g. tl.sigmoid, which is
    # decorated once per process, compiled or interpreted); None: the GPU loop cannot run it.
    triton: tuple[str, str] | None = None
    learnable: bool = field(default=False, init=False)

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``f'(x)``; ``y = f(x)`` may be passed to save recomputing it."""
        if y is None:
            y = self.fn(x)
        if self.dfn is not None:
            return self.dfn(x, y)
        return _autograd_derivative(self.fn, x)

    def bind(self, units: int) -> Activation:
        """The object a cell stores for this slot; stateless entries are their own binding."""
        return self

    @property
    def key(self) -> str:
        """Canonical spec string: ``"tanh"``, ``"leaky_relu:0.2"``."""
        return self.name if self.param is None else f"{self.name}:{_fmt(self.param)}"

    def __repr__(self) -> str:
        return f"Activation({self.key!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle by name so that unpickling returns the registry's own object (engines dispatch on
        # identity); unregistered callables pickle as the callable itself.
        registered = self.name in _FAMILIES and _entry(self.name, self.param) is self
        return get, (self.key if registered else self.fn,)


@dataclass(frozen=True, eq=False)
class LearnableSpec(Activation):
    """Registry entry of an activation with one learnable parameter per unit.

    ``bind(units)`` creates the :class:`LearnableActivation` module a cell stores.
    """

    factory: Callable[[int], LearnableActivation] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "learnable", True)

    def __call__(self, x: Tensor) -> Tensor:
        raise TypeError(
            f"activation {self.key!r} is learnable: bind it to a number of units first "
            f"(activations.get({self.key!r}).bind(hidden_size))"
        )

    def bind(self, units: int) -> LearnableActivation:
        assert self.factory is not None
        return self.factory(units)


class LearnableActivation(nn.Module):
    """An activation with a parameter vector ``weight`` of shape ``(units,)``.

    Subclasses give ``forward``, ``derivative(x, y)`` (with respect to the input) and
    ``param_derivative(x, y)`` (elementwise ``∂f/∂weight``, broadcast over the batch), so that a
    hand-written backward pass can produce the parameter gradient too.
    """

    name = ""
    kind = ""
    uses = "xy"
    output_range: tuple[float, float] = (-math.inf, math.inf)
    torch_default = False
    onnx: str | None = None
    learnable = True
    param: float | None = None

    def __init__(self, units: int, init: float) -> None:
        super().__init__()
        if units <= 0:
            raise ValueError(f"units must be positive, got {units}")
        self.weight = nn.Parameter(torch.full((units,), float(init)))

    @property
    def key(self) -> str:
        return self.name

    def derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def param_derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class PReLU(LearnableActivation):
    """``max(0, x) + a ⊙ min(0, x)`` with a learnable slope ``a`` per unit (init 0.25)."""

    name = kind = "prelu"
    onnx = "PRelu"

    def __init__(self, units: int, init: float = 0.25) -> None:
        super().__init__(units, init)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, x, self.weight * x)

    def derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.where(x >= 0, torch.ones_like(x), self.weight.expand_as(x))

    def param_derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.where(x >= 0, torch.zeros_like(x), x)


class AdaptiveSigmoid(LearnableActivation):
    """``σ(β ⊙ x)`` with a learnable steepness ``β`` per unit (init 1)."""

    name = kind = "adaptive_sigmoid"
    output_range = (0.0, 1.0)

    def __init__(self, units: int, init: float = 1.0) -> None:
        super().__init__(units, init)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.weight * x)

    def derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        y = self(x) if y is None else y
        return self.weight * y * (1 - y)

    def param_derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        y = self(x) if y is None else y
        return x * y * (1 - y)


class AdaptiveTanh(LearnableActivation):
    """``tanh(β ⊙ x)`` with a learnable steepness ``β`` per unit (init 1)."""

    name = kind = "adaptive_tanh"
    output_range = (-1.0, 1.0)

    def __init__(self, units: int, init: float = 1.0) -> None:
        super().__init__(units, init)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.weight * x)

    def derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        y = self(x) if y is None else y
        return self.weight * (1 - y * y)

    def param_derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        y = self(x) if y is None else y
        return x * (1 - y * y)


class ModuleActivation(nn.Module):
    """A user ``nn.Module`` used as an activation; its parameters train with the cell.

    Its derivative is taken with autograd, so any engine can run it.
    """

    kind = ""
    uses = "x"
    output_range: tuple[float, float] = (-math.inf, math.inf)
    torch_default = False
    onnx: str | None = None
    learnable = True
    param: float | None = None

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    @property
    def name(self) -> str:
        return type(self.module).__name__

    key = name

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def derivative(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return _autograd_derivative(self.module, x)


# What a slot holds once resolved: a stateless entry or a module with parameters.
Bound = Activation | LearnableActivation | ModuleActivation
ActivationSpec = str | Activation | Callable[[Tensor], Tensor] | nn.Module


def _autograd_derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(fn(xr).sum(), xr)
    return d


def _fmt(p: float) -> str:
    return repr(float(p))


def _user_callable(fn: Callable[[Tensor], Tensor]) -> Activation:
    name = getattr(fn, "__name__", type(fn).__name__)
    return Activation(name, fn, None, description="user callable")


# ---------------------------------------------------------------------------------------------
# The built-in entries. Parameterised entries are made by a factory per parameter value and
# cached, so "leaky_relu:0.2" always resolves to the same object.


@dataclass(frozen=True)
class _Family:
    """How to build the entry for one base name, with or without a parameter."""

    make: Callable[[float | None], Activation]
    default: float | None = None  # parameter value when the name has none
    description: str = ""
    learnable: bool = False
    valid: Callable[[float], bool] = lambda a: True  # which parameter values make the activation it names
    rule: str = ""  # that condition, for the error


def _sigmoid(_: float | None) -> Activation:
    return Activation(
        "sigmoid", torch.sigmoid, lambda x, y: y * (1 - y), (0.0, 1.0), torch_default=True,
        onnx="Sigmoid", uses="y", kind="sigmoid", triton=("1 / (1 + tl.exp(-x))", "y * (1 - y)"),
    )


def _hard_sigmoid(a: float | None) -> Activation:
    a = 1 / 6 if a is None else a
    param = None if a == 1 / 6 else a

    def fn(x: Tensor) -> Tensor:
        return torch.clamp(a * x + 0.5, 0.0, 1.0)

    def dfn(x: Tensor, y: Tensor) -> Tensor:
        return ((a * x > -0.5) & (a * x < 0.5)).to(x.dtype) * a

    return Activation(
        "hard_sigmoid", fn, dfn, (0.0, 1.0), onnx="HardSigmoid", onnx_alpha=a, onnx_beta=0.5,
        param=param, kind="hard_sigmoid",
        triton=(f"tl.minimum(tl.maximum({a!r} * x + 0.5, 0.0), 1.0)", f"tl.where((y > 0) & (y < 1), y * 0 + {a!r}, y * 0)"),
    )


def _elliott(_: float | None) -> Activation:
    return Activation(
        "elliott", lambda x: 0.5 * x / (1 + x.abs()) + 0.5,
        lambda x, y: 0.5 / (1 + x.abs()) ** 2, (0.0, 1.0), kind="elliott",
        # 1/(1 + |x|) = 1 - |2y - 1|
        triton=("0.5 * x / (1 + tl.abs(x)) + 0.5", "0.5 * (1 - tl.abs(2 * y - 1)) * (1 - tl.abs(2 * y - 1))"),
    )


def _tanh(_: float | None) -> Activation:
    return Activation(
        "tanh", torch.tanh, lambda x, y: 1 - y * y, (-1.0, 1.0), torch_default=True,
        onnx="Tanh", uses="y", kind="tanh", triton=("2 / (1 + tl.exp(-2 * x)) - 1", "1 - y * y"),
    )


def _hardtanh(_: float | None) -> Activation:
    return Activation(
        "hardtanh", lambda x: torch.clamp(x, -1.0, 1.0),
        lambda x, y: ((x > -1) & (x < 1)).to(x.dtype), (-1.0, 1.0), kind="hardtanh",
        triton=("tl.minimum(tl.maximum(x, -1.0), 1.0)", "tl.where((y > -1) & (y < 1), 1.0, 0.0)"),
    )


def _softsign(_: float | None) -> Activation:
    return Activation(
        "softsign", F.softsign, lambda x, y: 1 / (1 + x.abs()) ** 2, (-1.0, 1.0),
        onnx="Softsign", kind="softsign", triton=("x / (1 + tl.abs(x))", "(1 - tl.abs(y)) * (1 - tl.abs(y))"),
    )


def _relu(_: float | None) -> Activation:
    return Activation(
        "relu", torch.relu, lambda x, y: (x > 0).to(x.dtype), (0.0, math.inf),
        torch_default=True, onnx="Relu", kind="relu", triton=("tl.maximum(x, 0.0)", "tl.where(y > 0, 1.0, 0.0)"),
    )


def _leaky_relu(a: float | None) -> Activation:
    a = 0.01 if a is None else a
    return Activation(
        "leaky_relu", lambda x: F.leaky_relu(x, a),
        lambda x, y: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, a)), (-math.inf, math.inf),
        onnx="LeakyRelu", onnx_alpha=a, param=None if a == 0.01 else a, kind="leaky_relu",
        triton=(f"tl.where(x > 0, x, {a!r} * x)",
                # a constant in the tensor's dtype (a bare literal would be a float32 constant)
                f"tl.where(y > 0, y * 0 + 1, y * 0 + {a!r})" if a > 0 else f"tl.where(x > 0, x * 0 + 1, x * 0 + {a!r})"),
    )


def _elu(a: float | None) -> Activation:
    a = 1.0 if a is None else a
    return Activation(
        "elu", lambda x: F.elu(x, a), lambda x, y: torch.where(x > 0, torch.ones_like(y), y + a),
        (-a, math.inf), onnx="Elu", onnx_alpha=a, param=None if a == 1.0 else a, uses="xy",
        kind="elu", triton=(f"tl.where(x > 0, x, {a!r} * (tl.exp(x) - 1))", f"tl.where(y > 0, 1.0, y + {a!r})"),
    )


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu(_: float | None) -> Activation:
    return Activation(
        "selu", F.selu,
        lambda x, y: torch.where(x > 0, torch.full_like(y, _SELU_SCALE), y + _SELU_SCALE * _SELU_ALPHA),
        (-_SELU_SCALE * _SELU_ALPHA, math.inf), onnx="Selu", onnx_alpha=_SELU_ALPHA,
        onnx_beta=_SELU_SCALE, uses="xy", kind="selu",
        triton=(f"{_SELU_SCALE!r} * tl.where(x > 0, x, {_SELU_ALPHA!r} * (tl.exp(x) - 1))",
                f"tl.where(y > 0, {_SELU_SCALE!r}, y + {_SELU_SCALE * _SELU_ALPHA!r})"),
    )


def _gelu(_: float | None) -> Activation:
    def dfn(x: Tensor, y: Tensor) -> Tensor:
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return cdf + x * pdf

    return Activation("gelu", F.gelu, dfn, (-0.17, math.inf), onnx="Gelu", kind="gelu",
                      triton=(f"0.5 * x * (1 + tl.erf(x * {1 / math.sqrt(2)!r}))",
                              f"0.5 * (1 + tl.erf(x * {1 / math.sqrt(2)!r})) "
                              f"+ x * tl.exp(-0.5 * x * x) * {1 / math.sqrt(2 * math.pi)!r}"))


def _silu(_: float | None) -> Activation:
    def dfn(x: Tensor, y: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))

    return Activation("silu", F.silu, dfn, (-0.28, math.inf), kind="silu",
                      triton=("x / (1 + tl.exp(-x))", "(1 / (1 + tl.exp(-x))) * (1 + x * (1 - 1 / (1 + tl.exp(-x))))"))


def _softplus(_: float | None) -> Activation:
    return Activation(
        "softplus", F.softplus, lambda x, y: torch.sigmoid(x), (0.0, math.inf),
        onnx="Softplus", kind="softplus",
        # torch's softplus is x above 20; σ(x) = 1 - e^-y
        triton=("tl.where(x > 20, x, tl.maximum(x, 0.0) + tl.log(1 + tl.exp(-tl.abs(x))))", "1 - tl.exp(-y)"),
    )


def _identity(_: float | None) -> Activation:
    return Activation(
        "identity", lambda x: x, lambda x, y: torch.ones_like(x), onnx="Identity", kind="identity",
        triton=("x", "y * 0 + 1"),
    )


def _exp(_: float | None) -> Activation:
    return Activation(
        "exp", torch.exp, lambda x, y: y, (0.0, math.inf), onnx="Exp", uses="y", kind="exp",
    )


def _min_g(_: float | None) -> Activation:
    return Activation(
        "min_g", lambda x: torch.where(x >= 0, x + 0.5, torch.sigmoid(x)),
        lambda x, y: torch.where(x >= 0, torch.ones_like(x), y * (1 - y)), (0.0, math.inf), uses="xy", kind="min_g",
    )


def _learnable(name: str, cls: type[LearnableActivation], rng: tuple[float, float]) -> _Family:
    entry = LearnableSpec(name, lambda x: x, output_range=rng, uses="xy", kind=name, factory=cls)
    return _Family(lambda _: entry, learnable=True, description=cls.__doc__ or "")


_FAMILIES: dict[str, _Family] = {
    "sigmoid": _Family(_sigmoid, description="1/(1+e^-x); gate default"),
    "hard_sigmoid": _Family(_hard_sigmoid, 1 / 6, "clamp(a·x + 1/2, 0, 1), a = 1/6 (hard_sigmoid:0.2 is ONNX/Keras 2)",
                            valid=lambda a: a > 0, rule="a slope a > 0 (a = 0 is the constant gate 1/2)"),
    "elliott": _Family(_elliott, description="0.5·x/(1+|x|) + 0.5"),
    "tanh": _Family(_tanh, description="tanh; candidate and cell default"),
    "hardtanh": _Family(_hardtanh, description="clamp(x, -1, 1)"),
    "softsign": _Family(_softsign, description="x/(1+|x|)"),
    "relu": _Family(_relu, description="max(0, x)"),
    "leaky_relu": _Family(_leaky_relu, 0.01, "max(a·x, x), a = 0.01", valid=lambda a: 0 <= a <= 1,
                          rule="a negative slope a in [0, 1] (max(a·x, x) needs a <= 1)"),
    "elu": _Family(_elu, 1.0, "x if x > 0 else a·(e^x − 1), a = 1", valid=lambda a: a > 0, rule="a scale a > 0"),
    "selu": _Family(_selu, description="scaled ELU"),
    "gelu": _Family(_gelu, description="x·Φ(x)"),
    "silu": _Family(_silu, description="x·σ(x)"),
    "softplus": _Family(_softplus, description="log(1 + e^x)"),
    "identity": _Family(_identity, description="x"),
    "exp": _Family(_exp, description="e^x; sLSTM's exponential input and forget gates (Beck et al. 2024)"),
    "min_g": _Family(_min_g, description="x + 1/2 for x >= 0, σ(x) otherwise: minGRU/minLSTM's positive g (Feng et al. 2024)"),
    "prelu": _learnable("prelu", PReLU, (-math.inf, math.inf)),
    "adaptive_sigmoid": _learnable("adaptive_sigmoid", AdaptiveSigmoid, (0.0, 1.0)),
    "adaptive_tanh": _learnable("adaptive_tanh", AdaptiveTanh, (-1.0, 1.0)),
}
_ALIASES = {"linear": "identity", "hardsigmoid": "hard_sigmoid", "swish": "silu"}
_PARAMETERISED = {name for name, fam in _FAMILIES.items() if fam.default is not None}
_CACHE: dict[tuple[str, float | None], Activation] = {}
_USER_CALLABLES: dict[Any, Activation] = {}


def _entry(name: str, param: float | None) -> Activation:
    fam = _FAMILIES[name]
    if param is not None and not fam.valid(param):
        raise ValueError(f"activation {name}:{param!r}: {name} takes {fam.rule}, got {param!r}")
    if param is not None and param == fam.default:
        param = None
    key = (name, param)
    if key not in _CACHE:
        _CACHE[key] = fam.make(param)
    return _CACHE[key]


def available() -> list[str]:
    """The registered names, built-in and user-registered (aliases not included)."""
    return sorted(_FAMILIES)


def register(
    name: str,
    fn: Callable[[Tensor], Tensor],
    derivative: DerivativeFn | None = None,
    *,
    output_range: tuple[float, float] = (-math.inf, math.inf),
    uses: str = "x",
    overwrite: bool = False,
) -> Activation:
    """Register a user activation under ``name`` and return its entry.

    ``derivative(x, y)`` (``y = f(x)``) is optional; without it, hand-written backward passes take
    the derivative with autograd, which is correct but slower.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"activation name must be a lower-case identifier, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if derivative is not None and not callable(derivative):
        raise TypeError(f"derivative must be callable or None, got {type(derivative).__name__}")
    if uses not in ("x", "y", "xy"):
        raise ValueError(f"uses must be 'x', 'y' or 'xy', got {uses!r}")
    if (not isinstance(output_range, (tuple, list)) or len(output_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in output_range)
            or output_range[0] > output_range[1]):
        raise ValueError(f"output_range must be (low, high) with low <= high, got {output_range!r}")
    output_range = (float(output_range[0]), float(output_range[1]))
    if name in _ALIASES:
        raise ValueError(f"{name!r} is an alias of {_ALIASES[name]!r}; register under another name")
    if name in _FAMILIES and not overwrite:
        raise ValueError(f"activation {name!r} is already registered; pass overwrite=True to replace it")
    entry = Activation(name, fn, derivative, output_range, uses=uses, kind="", description="user")
    _FAMILIES[name] = _Family(lambda _: entry, description="user-registered")
    _CACHE.pop((name, None), None)
    try:
        _CALLABLES.setdefault(fn, (name, None))  # never re-route a callable that means a built-in
    except TypeError:  # unhashable callable: reachable by name only
        pass
    return _entry(name, None)


# Plain callables and parameter-free module types that mean a registered entry.
_CALLABLES: dict[Any, tuple[str, float | None]] = {
    torch.sigmoid: ("sigmoid", None), F.sigmoid: ("sigmoid", None), torch.Tensor.sigmoid: ("sigmoid", None),
    torch.tanh: ("tanh", None), F.tanh: ("tanh", None), torch.Tensor.tanh: ("tanh", None),
    torch.relu: ("relu", None), F.relu: ("relu", None), torch.Tensor.relu: ("relu", None),
    F.hardsigmoid: ("hard_sigmoid", None), F.hardtanh: ("hardtanh", None),
    F.softsign: ("softsign", None), F.leaky_relu: ("leaky_relu", None), F.elu: ("elu", None),
    F.selu: ("selu", None), torch.selu: ("selu", None), F.gelu: ("gelu", None), F.silu: ("silu", None),
    F.softplus: ("softplus", None),
    torch.exp: ("exp", None), torch.Tensor.exp: ("exp", None),
}
_MODULES: dict[type, Callable[[nn.Module], tuple[str, float | None] | None]] = {
    nn.Sigmoid: lambda m: ("sigmoid", None),
    nn.Tanh: lambda m: ("tanh", None),
    nn.ReLU: lambda m: ("relu", None),
    nn.Hardsigmoid: lambda m: ("hard_sigmoid", None),
    nn.Hardtanh: lambda m: ("hardtanh", None) if (m.min_val, m.max_val) == (-1.0, 1.0) else None,
    nn.Softsign: lambda m: ("softsign", None),
    nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    nn.ELU: lambda m: ("elu", m.alpha),
    nn.SELU: lambda m: ("selu", None),
    nn.GELU: lambda m: ("gelu", None) if m.approximate == "none" else None,
    nn.SiLU: lambda m: ("silu", None),
    nn.Softplus: lambda m: ("softplus", None) if (m.beta, m.threshold) == (1.0, 20.0) else None,
    nn.Identity: lambda m: ("identity", None),
}


def _parse(spec: str) -> tuple[str, float | None]:
    name, sep, arg = spec.strip().lower().partition(":")
    name = _ALIASES.get(name, name)
    if name not in _FAMILIES:
        raise ValueError(f"unknown activation {spec!r}; valid names: {', '.join(available())}")
    if not sep:
        return name, None
    if name not in _PARAMETERISED:
        with_param = ", ".join(sorted(_PARAMETERISED))
        raise ValueError(f"activation {name!r} takes no parameter, got {spec!r}; parameterised: {with_param}")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"activation parameter in {spec!r} must be a number, got {arg!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"activation parameter in {spec!r} must be finite")
    if not _FAMILIES[name].valid(value):
        raise ValueError(f"activation {spec!r}: {name} takes {_FAMILIES[name].rule}, got {value!r}")
    return name, value


def get(spec: ActivationSpec) -> Activation | ModuleActivation:
    """Resolve ``spec`` to its registry entry.

    Names, callables and parameter-free (or torch-equivalent) modules give the shared
    :class:`Activation`; a module with parameters of its own gives a :class:`ModuleActivation`
    wrapping it. Raises ``ValueError`` for unknown names and ``TypeError`` for non-callables.
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        return _entry(*_parse(spec))
    if isinstance(spec, (LearnableActivation, ModuleActivation)):
        return spec  # already bound (a cell's own activation module)
    if isinstance(spec, nn.Module):
        to_key = _MODULES.get(type(spec))
        key = to_key(spec) if to_key is not None else None
        if key is not None:
            return _entry(*key)
        return ModuleActivation(spec)
    if isinstance(spec, type):
        if spec in _MODULES:
            return get(spec())
        what = f"the module class {spec.__name__}; pass an instance" if issubclass(spec, nn.Module) else \
            f"the class {spec.__name__}"
        raise TypeError(f"activation must be a name, an Activation, a function or an nn.Module instance; got {what}")
    if callable(spec):
        try:
            key = _CALLABLES.get(spec)
        except TypeError:  # an unhashable callable
            return _user_callable(spec)
        if key is not None:
            return _entry(*key)
        if spec not in _USER_CALLABLES:
            _USER_CALLABLES[spec] = _user_callable(spec)
        return _USER_CALLABLES[spec]
    raise TypeError(
        f"activation must be a name, an Activation, a callable or an nn.Module; got {type(spec).__name__}"
    )


def check_elementwise(act: Bound, units: int, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> None:
    """Raise ``TypeError`` unless ``act`` maps a ``(2, units)`` tensor to a tensor of the same shape and
    dtype, as every slot needs (a reduction or a slice would broadcast silently). One cheap call on a
    fixed probe; nothing on the meta device."""
    if torch.device(device or "cpu").type == "meta":
        return
    probe = torch.linspace(-3, 3, 2 * units, dtype=dtype or torch.get_default_dtype(), device=device).view(2, units)
    try:
        with torch.no_grad():
            out = act(probe)
    except Exception as e:  # the user's callable: say what it was called with
        raise TypeError(f"activation {_describe(act)} failed on a {tuple(probe.shape)} {probe.dtype} tensor "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not isinstance(out, Tensor):
        raise TypeError(f"activation {_describe(act)} must return a tensor, returned {type(out).__name__}")
    if out.shape != probe.shape or out.dtype != probe.dtype:
        raise TypeError(f"activation {_describe(act)} must act elementwise (a tensor of its input's shape and dtype): "
                        f"it maps {tuple(probe.shape)} {probe.dtype} to {tuple(out.shape)} {out.dtype}")


def _describe(act: Any) -> str:
    if isinstance(act, ModuleActivation):
        return act.name
    return repr(getattr(act, "key", getattr(act, "name", type(act).__name__)))


def resolve(spec: ActivationSpec, units: int) -> Bound:
    """What a cell stores for one slot: :func:`get`, then bound to ``units`` when learnable."""
    act = get(spec)
    if isinstance(act, Activation):
        return act.bind(units)
    return act
