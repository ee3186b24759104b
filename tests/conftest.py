"""Test-wide settings: one torch thread per pytest-xdist worker.

``make test`` runs two workers on two cores; tiny models run several times faster on one
thread each than with the workers fighting over two threads apiece.
"""

import torch

torch.set_num_threads(1)
