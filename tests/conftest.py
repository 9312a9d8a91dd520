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
