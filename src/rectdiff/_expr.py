"""Whitelisted math expressions in ``t`` for user schedules; parsed, never ``eval``-ed.

An expression such as ``"cos(pi * t / 2)"`` is parsed with :mod:`ast` and compiled into a
function of a float64 tensor by walking the tree; any node outside the whitelist (numbers,
``t``, ``pi``, ``+ - * / **``, unary minus, ``exp log sqrt sin cos tan``) is rejected with an
error naming the offending token.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["compile_expression", "ALLOWED_FUNCTIONS", "ALLOWED_NAMES"]

ALLOWED_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
}
ALLOWED_NAMES = ("t", "pi")
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
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(
            f"{label} expression {source!r} is not valid: {err.msg} at column {err.offset}."
        ) from None
    return _compile(tree, source.strip(), label)
