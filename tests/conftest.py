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


#: session fixtures that build a tiny Stable Diffusion flow (minutes each), shared between
#: pytest-xdist workers through a file lock: their tests go to one worker (``make test`` runs
#: ``--dist loadgroup``), so that the other worker runs other tests instead of waiting
_FLOW_FIXTURES = ("flow", "sd2_flow", "xl", "sd3")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = [name for name in _FLOW_FIXTURES if name in getattr(item, "fixturenames", ())]
        if not used:
            continue
        name = used[-1]  # a test on two flows (none yet) goes with the later-listed one
        if name == "sd2_flow":
            name += "-" + str(item.callspec.params["sd2_flow"])
        item.add_marker(pytest.mark.xdist_group(name=name))
