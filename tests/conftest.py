import os

import pytest
import torch

from helpers import TinyCNN

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyCNN().double().eval()


@pytest.fixture
def tiny_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 20, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for a module's Lightning runs: on a shared 2-core
    machine OpenMP contention makes these tiny models 10x slower with 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
