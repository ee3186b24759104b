"""What many test files share, defined once: float64, the named test forms, Gaussian data,
the README's snippets, a rectdiff process, an experiment script as a module, a counter of
dispatched tensor operations.

Importable from every test folder (``pythonpath = ["tests"]`` in pyproject.toml);
``conftest.py`` turns the same objects into fixtures.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rectdiff import forms

F64 = torch.float64

#: every form the tests exercise, by name; a test file picks its subset with :func:`pick`
NAMED_FORMS = {
    "vp": forms.VP(),
    "subvp": forms.SubVP(),
    "vp-cosine": forms.VPCosine(),
    "ve": forms.VE(),
    "fm": forms.FlowMatching(),
    "fm-shift3": forms.FlowMatching(shift=3.0),
    "fm-shift": forms.FlowMatching(shift=3.0, sigma_min=1e-4),
    "sd15": forms.load("sd15"),
    "trig": forms.load("trig"),
}
#: the four forms of the paper's comparison (VP, sub-VP, VE, flow matching)
FOUR = ("vp", "subvp", "ve", "fm")

#: Gaussian test data N(MEAN, STD^2 I) for the closed-form oracles
MEAN = torch.tensor([0.3, -0.2], dtype=F64)
STD = 0.5


def pick(*names: str) -> dict[str, forms.Form]:
    """The named forms, in the order given."""
    return {name: NAMED_FORMS[name] for name in names}


def readme_snippets() -> list[str]:
    """The README's ```python blocks, in order (tests/test_readme_snippets.py runs them)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks, block = [], None
    for line in text.splitlines():
        if block is None and line.strip() == "```python":
            block = []
        elif block is not None and line.strip() == "```":
            blocks.append("\n".join(block) + "\n")
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def start_rectdiff(argv: list[str], cwd):
    """``rectdiff argv`` in its own process, as a terminal starts it (one torch thread,
    stdout discarded, stderr piped), for the tests that signal or kill it mid-run."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-c", "import sys; from rectdiff.cli import main; sys.exit(main())"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*command, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def load_script(path):
    """The experiment script at ``path`` as a module named after its file, registered in
    ``sys.modules`` before it runs (dataclasses look their module up while being built)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name (``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def dispatched(step: Callable[[], object]) -> collections.Counter[str]:
    """The aten operations one call of ``step`` dispatches, after one uncounted call (so that
    lazily built state is not counted)."""
    step()
    with CountOps() as counter:
        step()
    return counter.ops
