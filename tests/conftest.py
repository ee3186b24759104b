"""Test-wide settings and fixtures; the shared constants live in ``shared.py``.

``make test`` runs two pytest-xdist workers on two cores; tiny models run several times
faster on one torch thread each than with the workers fighting over two threads apiece.
"""

import pytest
import torch
from shared import FOUR, NAMED_FORMS

torch.set_num_threads(1)


@pytest.fixture(params=FOUR)
def four_forms(request):
    """Each of VP, sub-VP, VE and flow matching in turn: ``(name, form)``."""
    return request.param, NAMED_FORMS[request.param]
