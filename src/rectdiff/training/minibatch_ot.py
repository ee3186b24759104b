"""Minibatch optimal-transport couplings of noise and data, for training in any form.

Within each training batch the drawn noise is re-paired with the data by the exact optimal
assignment under the squared Euclidean cost (Tong et al. 2023, "Improving and generalizing
flow-based generative models with minibatch optimal transport", OT-CFM; Pooladian et al.
2023, "Multisample Flow Matching: Straightening Flows with Minibatch Couplings"):

    pi* = argmin_{pi in S_B}  sum_i || x0_i - eps_pi(i) ||^2,
    x_t = alpha_t x0_i + sigma_t eps_pi*(i),   target from (x0_i, eps_pi*(i)) in the prediction.

The noise is permuted, not the data, so ``x0`` keeps its row and with it its conditioning
(class labels, text) and its time ``t_i``. The assignment is the plan of POT's ``ot.emd``
(network simplex) on uniform weights ``1/B``: a vertex of the Birkhoff polytope, i.e. a
permutation matrix times ``1/B``. Should POT stop early or return a plan that is not one,
scipy's ``linear_sum_assignment`` (the same linear program, Jonker-Volgenant) gives it instead.

torchcfm's ``ExactOptimalTransportConditionalFlowMatcher`` draws B pairs *with replacement*
from that plan, so a batch repeats about a third of its pairs and drops as many; here every
data point keeps one noise sample (the permutation itself, as in Pooladian et al.). In the
rectified-flow papers' time (t = 1 data) the pairing is the same; only t is mirrored.
Under ``accelerate`` every process couples the whole batch alike and computes its own rows,
so the coupling does not depend on the number of processes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "COUPLINGS", "check_coupling", "check_coupling_use", "ot_assignment", "ot_coupled_noise",
    "transport_cost",
]  # fmt: skip

#: how noise is paired with data in a training batch: as drawn, or re-paired by minibatch OT
COUPLINGS = ("independent", "ot")


def check_coupling(coupling: str) -> str:
    """``coupling`` if it names one of :data:`COUPLINGS`.

    Raises:
        ValueError: naming the value and the allowed ones.
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; allowed: {', '.join(COUPLINGS)}.")
    return coupling


def check_coupling_use(coupling: str, pairs: bool, custom_loss: bool) -> None:
    """Refuse ``coupling="ot"`` in a training run where it could not act.

    Raises:
        ValueError: on fixed pairs (``pairs=True``: the pairs are the coupling) or with a
            custom ``loss_fn`` (which draws its own noise).
    """
    if coupling == "independent":
        return
    if pairs:
        raise ValueError(
            f"TrainConfig.coupling = {coupling!r} re-pairs freshly drawn noise with the data, "
            "but with pairs=True the (eps, x0) pairs are the coupling and are trained as given; "
            "set coupling = 'independent' (e.g. for reflow after an OT-coupled teacher)."
        )
    if custom_loss:
        raise ValueError(
            f"TrainConfig.coupling = {coupling!r} is applied by the default diffusion loss; a "
            "custom loss_fn draws its own noise. Set coupling = 'independent', or couple inside "
            "the loss (rectdiff.training.minibatch_ot.ot_coupled_noise)."
        )


def transport_cost(x0: Tensor, eps: Tensor) -> Tensor:
    """The ``(B, B)`` float64 cost ``C[i, j] = ||x0_i - eps_j||^2`` over the flattened samples."""
    x0_flat = x0.detach().flatten(1).to("cpu", torch.float64)
    eps_flat = eps.detach().flatten(1).to("cpu", torch.float64)
    return torch.cdist(x0_flat, eps_flat).square()


def ot_assignment(x0: Tensor, eps: Tensor) -> Tensor:
    """The permutation ``perm`` (int64, on ``x0``'s device) minimising
    ``sum_i ||x0_i - eps_perm[i]||^2``: data point ``i`` is paired with noise ``perm[i]``.

    Args:
        x0: data, shape ``(B, ...)``.
        eps: noise, the same shape.

    Raises:
        ValueError: when the shapes differ.
    """
    if x0.shape != eps.shape:
        raise ValueError(
            f"x0 and eps must have the same shape to be coupled, got {tuple(x0.shape)} and "
            f"{tuple(eps.shape)}."
        )
    import ot  # POT, imported on use: 2 s of every process's start otherwise

    batch = x0.shape[0]
    cost = transport_cost(x0, eps).numpy()
    weights = np.full(batch, 1.0 / batch)
    plan, log = ot.emd(
        weights, weights, cost, numItermax=max(100_000, 50 * batch * batch), log=True
    )
    perm = plan.argmax(1)
    # a vertex of the assignment polytope has one entry 1/B per row and column
    exact = log["warning"] is None and np.array_equal(np.sort(perm), np.arange(batch))
    if not exact or not np.allclose(plan[np.arange(batch), perm], 1.0 / batch):
        perm = linear_sum_assignment(cost)[1]
    return torch.as_tensor(perm, dtype=torch.long, device=x0.device)


def ot_coupled_noise(x0: Tensor, eps: Tensor) -> Tensor:
    """``eps`` re-ordered so that row ``i`` is the noise optimally paired with ``x0[i]``
    (:func:`ot_assignment`); ``x0`` and anything attached to its rows stay as they are."""
    return eps[ot_assignment(x0, eps)]
