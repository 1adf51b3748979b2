"""Shared fixtures.

Under pytest-xdist (``make test`` runs two workers on CI's two cores) each worker and every process it
starts uses one OpenMP thread, so the two workers do not fight over the cores.
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the CLI/app subprocesses the tests start
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on a busy 2-core machine are ~20x slower than one; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
