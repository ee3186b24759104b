"""The :class:`Form` base: one forward process ``x_t = alpha_t x0 + sigma_t eps``.

Every diffusion model in rectdiff is a :class:`Form`: a pair of functions ``alpha(t)``,
``sigma(t)`` on continuous time ``t in [0, 1]`` with **t = 0 data and t = 1 noise**, and
``logsnr(t) = log(alpha_t^2 / sigma_t^2)`` strictly decreasing. The concrete forms only
supply ``alpha``, ``sigma``, their analytic derivatives and the exact inverse of ``logsnr``;
everything else (noising, prediction conversions, samplers, losses) is written once on top.

All schedule arithmetic runs in float64 and is cast back to the caller's dtype, because
float32 loses digits exactly where it matters (VP near t = 0, flow matching near t = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["Form", "Coefficients", "as_time", "broadcast"]

C = TypeVar("C", Tensor, float)


@dataclass(frozen=True, slots=True)
class Coefficients(Generic[C]):
    """``(alpha, sigma, d_alpha, d_sigma)`` at one time (tensors, or floats in the samplers).

    Unpacks like a tuple: ``alpha, sigma, d_alpha, d_sigma = form.coefficients(t)``.
    """

    alpha: C
    sigma: C
    d_alpha: C
    d_sigma: C

    def __iter__(self) -> Iterator[C]:
        return iter((self.alpha, self.sigma, self.d_alpha, self.d_sigma))


_F64 = torch.float64


def as_time(t: Any) -> Tensor:
    """``t`` as a float64 tensor (scalars become 0-d tensors)."""
    if isinstance(t, Tensor):
        return t.to(_F64)
    return torch.as_tensor(t, dtype=_F64)


def _out_dtype(t: Any) -> torch.dtype:
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.dtype
    return _F64


def broadcast(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape ``()`` or ``(B,)`` to broadcast over ``x``.

    Raises:
        ValueError: if ``coef`` is neither a scalar nor a ``(B,)`` vector matching ``x``.
    """
    if coef.ndim == 0:
        return coef.to(x.dtype)
    if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must be a scalar or have shape (B,) = ({x.shape[0]},) to match a batch of "
            f"shape {tuple(x.shape)}; got shape {tuple(coef.shape)}. Pass one time per sample."
        )
    return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Form:
    """A diffusion form ``x_t = alpha(t) x0 + sigma(t) eps`` on ``t in [0, 1]``.

    Subclasses implement the float64 kernels ``_alpha``, ``_sigma``, ``_d_alpha``,
    ``_d_sigma`` and ``_t_from_logsnr``; the public methods accept floats or tensors, compute
    in float64 and return the caller's floating dtype (float64 for Python numbers).

    Attributes:
        t_min: smallest time at which a network is evaluated (training and sampling).
        t_max: largest such time; samplers start from ``x = sigma(t_max) * eps``.
    """

    name: str = "form"
    family: str = ""
    #: the variable adaptive solvers integrate the ODE in: "logsnr" or "t" (samplers.adaptive)
    ode_variable: str = "logsnr"

    def __init__(self, t_min: float, t_max: float) -> None:
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(
                f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}. "
                "t = 0 is data and t = 1 is noise."
            )
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # --- float64 kernels, supplied by subclasses --------------------------------------
    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _model_time(self, t: Tensor) -> Tensor:
        return t

    def _logsnr(self, t: Tensor) -> Tensor:
        return 2.0 * (torch.log(self._alpha(t)) - torch.log(self._sigma(t)))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------
    def _apply(self, kernel: Callable[[Tensor], Tensor], t: Any) -> Tensor:
        return kernel(as_time(t)).to(_out_dtype(t))

    def alpha(self, t: Any) -> Tensor:
        """Signal coefficient alpha_t."""
        return self._apply(self._alpha, t)

    def sigma(self, t: Any) -> Tensor:
        """Noise coefficient sigma_t."""
        return self._apply(self._sigma, t)

    def d_alpha(self, t: Any) -> Tensor:
        """d alpha_t / dt, analytic."""
        return self._apply(self._d_alpha, t)

    def d_sigma(self, t: Any) -> Tensor:
        """d sigma_t / dt, analytic."""
        return self._apply(self._d_sigma, t)

    def logsnr(self, t: Any) -> Tensor:
        """log(alpha_t^2 / sigma_t^2), strictly decreasing in t."""
        return self._apply(self._logsnr, t)

    def t_from_logsnr(self, lam: Any) -> Tensor:
        """Exact inverse of :meth:`logsnr` (up to float64 rounding)."""
        return self._apply(self._t_from_logsnr, lam)

    def model_time(self, t: Any) -> Tensor:
        """What the network receives as its time input; ``t`` itself for continuous forms."""
        return self._apply(self._model_time, t)

    def kernels(self, *names: str) -> tuple[Callable[[Tensor], Tensor], ...]:
        """The float64 kernels behind :meth:`model_time`, :meth:`alpha`, :meth:`sigma`,
        :meth:`d_alpha`, :meth:`d_sigma` and :meth:`logsnr`, by those names, for a hot loop
        that already holds float64 times: the same numbers without the public methods'
        dtype conversions.

        Raises:
            ValueError: for a name that is not one of those six.
        """
        allowed = ("model_time", "alpha", "sigma", "d_alpha", "d_sigma", "logsnr")
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise ValueError(f"unknown kernel {unknown[0]!r}; allowed: {', '.join(allowed)}.")
        return tuple(getattr(self, f"_{name}") for name in names)

    def affine_kernels(self, *names: str) -> tuple[Tensor, Tensor] | None:
        """``(c, s)``, float64 columns of shape ``(len(names), 1)``, when every named kernel
        (see :meth:`kernels`) is ``c + s t`` with an exact product (``s`` in {0, 1, -1} or
        ``c = 0``): then ``torch.addcmul(c, s, t)`` gives the kernels' own numbers, fused
        multiply-add or not, in one operation. None where any of them is not (every form but
        flow matching's straight path)."""
        return None

    def t_from_model_time(self, model_t: Any) -> Tensor:
        """Inverse of :meth:`model_time`."""
        return self._apply(lambda s: s, model_t)

    def coefficients(self, t: Any) -> Coefficients[Tensor]:
        """``(alpha, sigma, d_alpha, d_sigma)`` at ``t`` in one call."""
        return Coefficients(self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Any) -> Tensor:
        """``x_t = alpha_t x0 + sigma_t eps`` with ``t`` a scalar or of shape ``(B,)``."""
        if x0.shape != eps.shape:
            raise ValueError(
                f"x0 and eps must have the same shape, got {tuple(x0.shape)} and "
                f"{tuple(eps.shape)}."
            )
        t64 = as_time(t).to(x0.device)
        alpha = broadcast(self._alpha(t64), x0)
        sigma = broadcast(self._sigma(t64), x0)
        return alpha * x0 + sigma * eps

    def logsnr_range(self) -> tuple[float, float]:
        """``(logsnr(t_max), logsnr(t_min))``: the logsnr interval a network is trained on."""
        lo = float(self.logsnr(self.t_max))
        hi = float(self.logsnr(self.t_min))
        return lo, hi

    def config(self) -> dict[str, Any]:
        """The parameters that rebuild this form with :func:`from_config` (TOML-ready)."""
        return {"family": self.family, **self._params(), "t_min": self.t_min, "t_max": self.t_max}

    def _params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Form)
            and type(self) is type(other)
            and self.config() == other.config()
        )

    def __hash__(self) -> int:
        return hash(repr(self.config()))
