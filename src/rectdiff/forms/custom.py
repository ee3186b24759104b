"""A user's own schedule: :class:`Custom` alpha(t), sigma(t) from callables or expressions.

An expression such as ``"cos(pi * t / 2)"`` is parsed with :mod:`ast` and compiled into a
function of a float64 tensor by walking the tree; any node outside the whitelist (numbers,
``t``, ``pi``, ``+ - * / **``, unary minus, ``exp log sqrt sin cos tan``) is rejected with an
error naming the offending token. Nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import Form

__all__ = [
    "Custom", "compile_expression", "ALLOWED_FUNCTIONS", "ALLOWED_NAMES", "MAX_EXPRESSION_LENGTH",
]  # fmt: skip

_F64 = torch.float64

ALLOWED_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
}
ALLOWED_NAMES = ("t", "pi")
#: longest expression accepted (a schedule is a line; a huge one would exhaust the parser)
MAX_EXPRESSION_LENGTH = 1000
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}

Fn = Callable[[Tensor], Tensor]


def _reject(source: str, node: ast.AST, what: str, label: str) -> ValueError:
    token = ast.get_source_segment(source, node) or type(node).__name__
    return ValueError(
        f"{label} expression {source!r}: {what} {token!r} is not allowed. Allowed: numbers, "
        f"the names {', '.join(ALLOWED_NAMES)}, the operators + - * / **, and the functions "
        f"{', '.join(ALLOWED_FUNCTIONS)}."
    )


def _compile(node: ast.AST, source: str, label: str) -> Fn:
    if isinstance(node, ast.Expression):
        return _compile(node.body, source, label)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise _reject(source, node, "constant", label)
        value = float(node.value)
        return lambda t: torch.full_like(t, value)
    if isinstance(node, ast.Name):
        if node.id == "t":
            return lambda t: t
        if node.id == "pi":
            return lambda t: torch.full_like(t, math.pi)
        raise _reject(source, node, "name", label)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op = _BINARY[type(node.op)]
        left, right = _compile(node.left, source, label), _compile(node.right, source, label)
        return lambda t: op(left(t), right(t))
    if isinstance(node, ast.BinOp):
        raise _reject(source, node, "operator in", label)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        op1 = _UNARY[type(node.op)]
        inner = _compile(node.operand, source, label)
        return lambda t: op1(inner(t))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in ALLOWED_FUNCTIONS:
            raise _reject(source, node.func, "function", label)
        if len(node.args) != 1 or node.keywords:
            raise _reject(source, node, "call (one positional argument expected)", label)
        fn = ALLOWED_FUNCTIONS[node.func.id]
        arg = _compile(node.args[0], source, label)
        return lambda t: fn(arg(t))
    raise _reject(source, node, "token", label)


def compile_expression(source: str, label: str = "schedule") -> Fn:
    """Compile a whitelisted expression in ``t`` into a function of a float64 tensor.

    Args:
        source: e.g. ``"cos(pi * t / 2)"``; ``**`` is the power operator.
        label: what the expression defines (``"alpha"``, ``"sigma"``), used in errors.

    Raises:
        ValueError: on a syntax error or any token outside the whitelist, naming the token.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{label} expression must be a non-empty string, got {source!r}.")
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ValueError(
            f"{label} expression {source[:40]!r}... has {len(source)} characters; allowed: at "
            f"most {MAX_EXPRESSION_LENGTH}. Shorten it, or pass a Python callable "
            "(forms.Custom(alpha=fn, sigma=fn))."
        )
    try:
        tree = ast.parse(source.strip(), mode="eval")
        return _compile(tree, source.strip(), label)
    except SyntaxError as err:
        raise ValueError(
            f"{label} expression {source!r} is not valid: {err.msg} at column {err.offset}."
        ) from None
    except (RecursionError, MemoryError):
        raise ValueError(
            f"{label} expression {source[:40]!r}... is nested too deeply to parse; write it "
            "with fewer nested parentheses and operators."
        ) from None


class Custom(Form):
    """A user's own ``alpha(t)``, ``sigma(t)``: callables on float64 tensors, or expression strings.

    Strings are parsed with a whitelist (numbers, ``t``, ``pi``, ``+ - * / **``, ``exp``,
    ``log``, ``sqrt``, ``sin``, ``cos``, ``tan``) and never evaluated as Python. Derivatives are
    exact (automatic differentiation of the expression); ``t_from_logsnr`` is a float64
    bisection, exact to rounding. The schedule is checked for alpha > 0, sigma > 0 and
    strictly decreasing logsnr on ``[t_min, t_max]``.
    """

    name = "custom"
    family = "custom"
    ode_variable = "t"  # finite wherever alpha and sigma are, whatever the schedule

    def __init__(
        self,
        alpha: str | Callable[[Tensor], Tensor],
        sigma: str | Callable[[Tensor], Tensor],
        t_min: float = 1e-3,
        t_max: float = 1.0 - 1e-3,
        check_points: int = 2001,
    ) -> None:
        super().__init__(t_min, t_max)
        self.alpha_expr = alpha if isinstance(alpha, str) else None
        self.sigma_expr = sigma if isinstance(sigma, str) else None
        self._alpha_fn = compile_expression(alpha, "alpha") if isinstance(alpha, str) else alpha
        self._sigma_fn = compile_expression(sigma, "sigma") if isinstance(sigma, str) else sigma
        self._check(check_points)

    def _params(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha_expr or getattr(self._alpha_fn, "__name__", "callable"),
            "sigma": self.sigma_expr or getattr(self._sigma_fn, "__name__", "callable"),
        }

    def _check(self, points: int) -> None:
        t = torch.linspace(self.t_min, self.t_max, points, dtype=_F64)
        alpha, sigma = self._alpha(t), self._sigma(t)
        for label, value in (("alpha", alpha), ("sigma", sigma)):
            bad = ~(torch.isfinite(value) & (value > 0))
            if bad.any():
                t_bad = float(t[bad.nonzero()[0, 0]])
                raise ValueError(
                    f"custom schedule: {label}(t) must be finite and > 0 on [t_min, t_max] = "
                    f"[{self.t_min}, {self.t_max}], but {label}({t_bad:.6g}) = "
                    f"{float(value[bad][0]):.6g}. Narrow t_min/t_max or fix the expression."
                )
        lam = self._logsnr(t)
        rising = torch.diff(lam) >= 0
        if rising.any():
            i = int(rising.nonzero()[0, 0])
            raise ValueError(
                "custom schedule: logsnr(t) = log(alpha^2 / sigma^2) must be strictly decreasing, "
                f"but logsnr({float(t[i]):.6g}) = {float(lam[i]):.6g} <= logsnr({float(t[i + 1]):.6g})"
                f" = {float(lam[i + 1]):.6g}. alpha/sigma must fall as t goes from data (0) to "
                "noise (1)."
            )

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.as_tensor(self._alpha_fn(t), dtype=_F64).expand_as(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(self._sigma_fn(t), dtype=_F64).expand_as(t)

    def _derivative(self, fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            value = fn(tt)
            if not value.requires_grad:  # constant expression
                return torch.zeros_like(t)
            (grad,) = torch.autograd.grad(value.sum(), tt)
        return grad.detach()

    def _d_alpha(self, t: Tensor) -> Tensor:
        return self._derivative(self._alpha, t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self._derivative(self._sigma, t)

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(64):  # bisection: the bracket halves to float64 resolution
            mid = 0.5 * (lo + hi)
            above = self._logsnr(mid) > lam  # logsnr decreases: the root lies to the right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)
