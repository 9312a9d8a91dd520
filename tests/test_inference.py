"""The BatchNorm-folded stand-in ybROAD scores perturbed images with
(`camanim.core.inference`): same function, model untouched, refused where
it cannot promise the same function, checked before use.

Reference for the agreement: the model's own eval-mode forward on the same
inputs; tolerance 1e-5 of the largest logit in float32 (folding reorders
one multiply-add per weight) and 1e-12 in float64.
"""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camanim import CAManimError
from camanim.core import inference
from camanim.core.inference import folded_model, outputs_agree
from camanim.metrics.imputation import solve_dtype
from camanim.metrics.road import ybroad
from helpers import TinyCNN


def _trained_bn_resnet18() -> nn.Module:
    """resnet18 whose BatchNorms hold non-trivial running statistics and
    affine parameters (fresh ones fold to the identity and prove nothing)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_folded_resnet_equals_model_and_leaves_it_untouched():
    model = _trained_bn_resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    mods = list(model.modules())
    fast = folded_model(model)
    assert fast is not None
    own = dict(model.named_modules())
    called = [own[n.target] for n in fast.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in called)   # all 20 pairs folded
    assert len(fast.fused) == 20
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in fast.fused.values()
    )
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-5 * scale
    assert outputs_agree(got, want)
    assert list(model.modules()) == mods              # no module replaced in the model
    for k, v in model.state_dict().items():
        assert v.data_ptr() == ptrs[k] and torch.equal(v, before[k]), k
        assert v.is_contiguous(), k                   # memory format of the model unchanged
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


def test_float64_fold_is_exact_to_rounding():
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    fast = folded_model(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max().item() < 1e-12


class Untraceable(TinyCNN):
    def forward(self, x):
        if x.sum() > 0:                               # data-dependent control flow
            x = x * 2
        return super().forward(x)


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class ReusedConv(nn.Module):
    """One conv called twice, followed by a BatchNorm only the first time."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = (
            nn.Conv2d(3, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.Linear(3, 2),
        )

    def forward(self, x):
        return self.fc(self.conv(self.bn(self.conv(x))).mean((2, 3)))


def test_no_code_is_generated_per_build():
    """Built every callback epoch, the stand-in must not grow a cache: no
    GraphModule source lands in linecache (fx's loader keeps every one)."""
    import linecache

    model = _trained_bn_resnet18()
    before = len(linecache.cache)
    for _ in range(3):
        assert folded_model(model) is not None
    assert len(linecache.cache) == before


def test_a_conv_called_twice_is_not_folded():
    model = ReusedConv().eval()
    assert folded_model(model) is None


def test_refused_where_the_function_could_change():
    assert folded_model(TinyCNN().train()) is None            # BN would use batch statistics
    assert folded_model(Untraceable().eval()) is None
    assert folded_model(NoBatchNorm().eval()) is None          # nothing to gain
    hooked = TinyCNN().eval()
    h = hooked.conv3.register_forward_hook(lambda m, a, o: o * 0)
    try:
        assert folded_model(hooked) is None                    # hooks would be skipped
    finally:
        h.remove()
    assert folded_model(hooked) is not None
    g = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert folded_model(hooked) is None
    finally:
        g.remove()


def test_outputs_agree_rejects_wrong_outputs():
    ref = torch.tensor([[10.0, -3.0]])
    assert outputs_agree(ref + 5e-4, ref)
    assert not outputs_agree(ref + 5e-3, ref)
    assert not outputs_agree(ref[:, :1], ref)
    assert not outputs_agree(ref.double(), ref)
    assert not outputs_agree((ref,), ref)


def _maps_model():
    import camanim
    model = _trained_bn_resnet18()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    maps = camanim.CAManim(model, "gradcam", layers=["layer1", "layer3"], progress=False)(x)
    return model, x, maps


def test_ybroad_with_and_without_folding_agree():
    model, x, maps = _maps_model()
    fast = ybroad(model, x, maps, progress=False)
    slow = ybroad(model, x, maps, progress=False, fold=False)
    assert fast.extra["folded"] is True and slow.extra["folded"] is False
    assert np.abs(fast.scores).max() > 0
    assert np.abs(fast.morf - slow.morf).max() < 1e-5
    assert np.abs(fast.lerf - slow.lerf).max() < 1e-5
    assert all(not m._forward_hooks for m in model.modules())


def test_ybroad_falls_back_when_the_stand_in_disagrees(monkeypatch):
    """A stand-in whose outputs differ from the model's on the clean images
    is not used: the scores are the model's own."""
    model, x, maps = _maps_model()

    class Wrong(nn.Module):
        def forward(self, x):
            return model(x.contiguous()) + 1.0

    monkeypatch.setattr(inference, "folded_model", lambda m: Wrong())  # scoring_runner
    res = ybroad(model, x, maps, progress=False)
    ref = ybroad(model, x, maps, progress=False, fold=False)
    assert res.extra["folded"] is False
    assert np.array_equal(res.scores, ref.scores)


def test_fold_argument_checked():
    model, x, maps = _maps_model()
    with pytest.raises(CAManimError, match="fold must be True, False or a FoldCache"):
        ybroad(model, x, maps, progress=False, fold="yes")


def test_cpu_solve_follows_the_images_precision():
    assert solve_dtype("cpu") == torch.float64
    assert solve_dtype("cpu", torch.float64) == torch.float64
    assert solve_dtype("cpu", torch.float32) == torch.float32
    assert solve_dtype("cpu", torch.bfloat16) == torch.float32
    assert solve_dtype("cuda", torch.float64) == torch.float32
    assert "folded_model" in inference.__all__
