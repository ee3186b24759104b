"""An outside network seen through rectdiff's model contract ``model(x_t, model_time, **cond)``.

Models trained elsewhere differ from rectdiff in three places, and :class:`OutsideModel`
undoes each one explicitly:

* **time direction and scale**: most flow-matching code puts noise at ``s = 0`` and data at
  ``s = 1`` (rectdiff: t = 0 data, t = 1 noise), so the network must see ``s = 1 - t``;
  ``time_map = (offset, scale)`` gives the network ``offset + scale * model_time``;
* **call signature**: ``net(x, s)``, ``net(s, x)`` (torchdiffeq / torchdyn vector fields),
  ``net(x=x, t=s)`` (facebookresearch/flow_matching's ``ModelWrapper``), ``net(x, times=s)``
  (rectified-flow-pytorch) or ``net(cat([x, s]))`` (torchcfm's toy MLP);
* **output sign**: a velocity ``dx/ds`` in the reversed time is ``-dx/dt``, rectdiff's flow.

The form and the prediction type (what the output means once the sign is fixed) come with the
model in an :class:`Adapted`, which is what every adapter returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..forms import Form
from ..io.configs import check_choice
from ..predictions import check_prediction

__all__ = ["Adapted", "OutsideModel", "CALLS"]

#: how an outside network is called with the state ``x`` and its own time ``s``
CALLS = ("x_t", "t_x", "keywords", "concat")


@dataclass(frozen=True)
class Adapted:
    """A model in rectdiff's calling convention, with its form and prediction type.

    Unpacks like a tuple: ``model, form, prediction = adapters.flow_tutorial(net)``.
    ``model.net`` (for :class:`OutsideModel`) is the user's own network, unchanged: training
    the adapted model trains it, and its ``state_dict`` is what the user saves and loads.
    """

    model: nn.Module
    form: Form
    prediction: str

    def __post_init__(self) -> None:
        check_prediction(self.prediction)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.form, self.prediction))


class OutsideModel(nn.Module):
    """Calls ``net`` in its own convention from rectdiff's ``(x_t, model_time, **cond)``.

    Args:
        net: the outside network (its parameters are this module's, under ``net.``).
        time_map: ``(offset, scale)``: the network's time is ``offset + scale * model_time``;
            ``(1, -1)`` for noise at s = 0 and data at s = 1.
        call: one of :data:`CALLS`: ``"x_t"`` -> ``net(x, s, *cond_args, **cond)``,
            ``"t_x"`` -> ``net(s, x, ...)``, ``"keywords"`` -> ``net(x=x, t=s, **cond)``,
            ``"concat"`` -> ``net(cat([x.flatten(1), s[:, None]], 1))`` reshaped to x's shape.
        time_kwarg: with ``call="x_t"``, pass the time as this keyword instead
            (``net(x, times=s)`` for rectified-flow-pytorch).
        sign: multiplies the output (-1 turns ``dx/ds`` into rectdiff's ``dx/dt``).
        cond_args: names of conditioning inputs passed positionally after ``(x, s)`` (for
            ``model(x, t, labels)``); the other conditioning inputs go as keywords.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        time_map: tuple[float, float] = (0.0, 1.0),
        call: str = "x_t",
        time_kwarg: str | None = None,
        sign: float = 1.0,
        cond_args: Sequence[str] = (),
    ) -> None:
        super().__init__()
        check_choice(call, CALLS, "call convention")
        if time_kwarg is not None and call != "x_t":
            raise ValueError(f"time_kwarg={time_kwarg!r} needs call='x_t', got call={call!r}.")
        if sign not in (1.0, -1.0):
            raise ValueError(f"sign must be 1 or -1, got {sign}.")
        self.net = net
        self.time_map = (float(time_map[0]), float(time_map[1]))
        self.call, self.time_kwarg, self.sign = call, time_kwarg, float(sign)
        self.cond_args = tuple(cond_args)

    def options(self) -> dict[str, Any]:
        """The constructor's options (JSON-able), to rebuild the wrapper around a new net."""
        return {"time_map": list(self.time_map), "call": self.call, "time_kwarg": self.time_kwarg,
                "sign": self.sign, "cond_args": list(self.cond_args)}  # fmt: skip

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The wrapped network's ``sample_shape`` (AttributeError when it has none)."""
        return tuple(self.net.sample_shape)

    def outside_time(self, model_time: Any, x: Tensor) -> Tensor:
        """The network's own ``(B,)`` time for rectdiff's ``model_time``, in x's dtype."""
        time = torch.as_tensor(model_time, dtype=x.dtype, device=x.device)
        time = time.expand(x.shape[0]) if time.ndim == 0 else time
        offset, scale = self.time_map
        return time if (offset, scale) == (0.0, 1.0) else offset + scale * time

    def forward(self, x: Tensor, model_time: Any, **cond: Any) -> Tensor:
        s = self.outside_time(model_time, x)
        args = [cond.pop(name) for name in self.cond_args if name in cond]
        if self.call == "x_t" and self.time_kwarg is not None:
            out = self.net(x, *args, **{self.time_kwarg: s}, **cond)
        elif self.call == "x_t":
            out = self.net(x, s, *args, **cond)
        elif self.call == "t_x":
            out = self.net(s, x, *args, **cond)
        elif self.call == "keywords":
            out = self.net(x=x, t=s, **cond)
        else:
            out = self.net(torch.cat([x.flatten(1), s[:, None]], dim=1), *args, **cond)
            out = out.reshape(x.shape)
        return out if self.sign == 1.0 else -out
