"""Project-wide test settings.

The suite runs as ``pytest -n 2`` on a 2-core machine: each xdist worker (and every process it
starts) gets one intra-op thread. With two threads per worker the tiny models of this suite
spend most of their time in thread contention (measured: 79 s of CPU against 8 s for the
detection tests, with identical results).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by launched subprocesses


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
