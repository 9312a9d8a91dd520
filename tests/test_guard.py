"""`camanim.core.guard.untouched`, one test per thing it restores (issue 23).

Each test changes one thing inside the block and checks it is back after;
each fails when that restore is removed from the guard. The CUDA RNG test
runs on the CPU: torch.cuda's RNG functions are replaced by a fake device
whose state the block changes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import camanim.core.guard as guard
from camanim.core.guard import untouched
from helpers import TinyCNN, no_hooks


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_torch_cpu_rng(model):
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    with untouched(model):
        torch.rand(100)
        torch.randn(7)
    assert torch.equal(torch.rand(4), want)


def test_numpy_rng(model):
    np.random.seed(3)
    want = np.random.rand(4)
    np.random.seed(3)
    with untouched(model):
        np.random.rand(100)
    np.testing.assert_array_equal(np.random.rand(4), want)


def test_python_random(model):
    random.seed(3)
    want = [random.random() for _ in range(4)]
    random.seed(3)
    with untouched(model):
        [random.random() for _ in range(100)]
    assert [random.random() for _ in range(4)] == want


class FakeCuda:
    """One fake CUDA device whose RNG state is a byte tensor."""

    def __init__(self) -> None:
        self.state = torch.tensor([1, 2, 3], dtype=torch.uint8)

    def get_rng_state(self, device=None) -> torch.Tensor:  # noqa: ARG002 - one device
        return self.state.clone()

    def set_rng_state(self, state: torch.Tensor, device=None) -> None:  # noqa: ARG002
        self.state = state.clone()

    def draw(self) -> None:
        self.state = self.state + 1


def test_cuda_rng_on_a_fake_device(model, monkeypatch):
    fake = FakeCuda()
    for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True),
                        ("current_device", lambda: 0), ("device_count", lambda: 1),
                        ("get_rng_state", fake.get_rng_state),
                        ("set_rng_state", fake.set_rng_state)):
        monkeypatch.setattr(torch.cuda, name, value)
    assert guard._cuda_devices(model) == [0]
    with untouched(model):
        fake.draw()
        assert fake.state.tolist() == [2, 3, 4]
    assert fake.state.tolist() == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_on_a_real_device(model):
    model.cuda()
    torch.cuda.manual_seed(3)
    want = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(3)
    with untouched(model):
        torch.rand(100, device="cuda")
    assert torch.equal(torch.rand(4, device="cuda"), want)


def test_training_modes(model):
    model.train()
    model.bn1.eval()
    with untouched(model):
        model.eval()
        model.bn1.train()
    assert model.training and not model.bn1.training and model.conv1.training


def test_requires_grad(model):
    model.conv2.weight.requires_grad_(False)
    with untouched(model):
        for p in model.parameters():
            p.requires_grad_(not p.requires_grad)
    assert not model.conv2.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv2.weight")


def test_grad_objects(model):
    held = torch.full_like(model.fc.weight, 2.0)
    model.fc.weight.grad = held
    with untouched(model):
        model.fc.weight.grad = None
        model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    assert model.fc.weight.grad is held and model.conv1.weight.grad is None
    assert torch.equal(held, torch.full_like(held, 2.0))


def test_hooks_added_inside_are_removed_and_older_ones_kept(model):
    keep = model.conv1.register_forward_hook(lambda *_: None)
    with untouched(model):
        model.conv1.register_forward_hook(lambda *_: None)
        model.fc.register_forward_pre_hook(lambda *_: None)
        model.conv3.register_full_backward_hook(lambda *_: None)
    assert list(model.conv1._forward_hooks) == [keep.id]
    keep.remove()
    assert no_hooks(model)


def test_intra_op_threads(model):
    n = torch.get_num_threads()
    try:
        with untouched(model):
            torch.set_num_threads(n + 1)
        assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(n)


def test_in_place_changes_are_reported(model):
    with pytest.warns(RuntimeWarning, match=r"changed \['parameters/gradients'\] in place"):
        with untouched(model), torch.no_grad():
            model.conv1.weight.add_(1.0)
    model.train()
    with pytest.warns(RuntimeWarning, match=r"buffers \(e\.g\. BatchNorm statistics\)"):
        with untouched(model):
            model(torch.randn(2, 3, 8, 8))                   # BatchNorm statistics move
    model.fc.weight.grad = torch.zeros_like(model.fc.weight)
    with pytest.warns(RuntimeWarning, match="parameters/gradients"):
        with untouched(model):
            model.fc.weight.grad.add_(1.0)


def test_a_block_that_changes_nothing_is_silent(model, recwarn):
    with untouched(model), torch.no_grad():
        model(torch.randn(2, 3, 8, 8))                       # eval mode: no statistics move
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
