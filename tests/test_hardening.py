"""Callback side effects on the user's process (issue 12, items 10 and 11):
no thread-count toggling on the training thread, a stable resume key for
callable selectors, warn-by-default after strict setup checks."""

from __future__ import annotations

import threading

import pytest
import torch

from camanim import CAManimError
from camanim.lightning.callback import CAManimCallback
from lit_models import Net, data, loader, trainer


def _selector():
    return lambda name, module: isinstance(module, torch.nn.Conv2d)


def test_state_key_of_a_callable_selector_is_stable():
    x, _, _ = data(n=4)
    a = CAManimCallback(x[:1], layers=_selector())
    b = CAManimCallback(x[:1], layers=_selector())   # another object, same definition
    assert a.layers is not b.layers
    assert a.state_key == b.state_key
    assert "0x" not in a.state_key                   # no address in the key
    c = CAManimCallback(x[:1], layers="conv")
    assert c.state_key != a.state_key


def test_training_thread_count_never_toggled(tmp_path, monkeypatch):
    """Rendering and encoding run on worker threads that set their own
    (thread-local) count once; on the training thread the count is set at
    most once per callback epoch (EBPG's one-thread block) and restored."""
    calls = []
    real = torch.set_num_threads

    def spy(n):
        calls.append((threading.current_thread().name, n))
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", spy)
    x, y, m = data(n=8)
    cb = CAManimCallback(x[:2], masks=m[:2], save_dir=tmp_path / "c")
    main = threading.current_thread().name
    before = torch.get_num_threads()
    trainer(tmp_path, [cb], max_epochs=2).fit(Net(), loader(x, y))
    assert (tmp_path / "c" / "videos").is_dir()
    on_main = [n for name, n in calls if name == main]
    assert on_main == [1, before] * 2                       # 2 callback epochs, one pair each
    assert all(name.startswith("camanim-") and n == 1 for name, n in calls if name != main)
    assert any(name.startswith("camanim-") for name, _ in calls)
    assert torch.get_num_threads() == before


def test_setup_errors_raise_before_training_and_later_failures_warn(tmp_path, monkeypatch):
    x, y, _ = data(n=8)
    model = Net()
    w = model.f[0].weight.detach().clone()
    with pytest.raises(CAManimError, match="out of range"):
        trainer(tmp_path, [CAManimCallback(x[:1], targets=[7])]).fit(model, loader(x, y))
    assert torch.equal(model.f[0].weight, w)       # no step was taken
    assert CAManimCallback(x[:1]).on_error == "warn"
