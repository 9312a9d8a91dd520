"""Layer discovery and selection."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import camanim
from camanim.core.layers import NCHW, NHWC, VECTOR

from helpers import no_hooks


@pytest.fixture(scope="module")
def r50():
    return torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def r50_table(r50):
    return camanim.list_layers(r50, torch.randn(1, 3, 64, 64), "all")


def test_blocks_on_resnet50(r50):
    table = camanim.list_layers(r50, torch.randn(1, 3, 64, 64), "blocks")
    assert table.names == ["relu", "layer1", "layer2", "layer3", "layer4"]


def test_conv_on_resnet50_is_53_layers(r50):
    assert len(camanim.list_layers(r50, torch.randn(1, 3, 64, 64), "conv")) == 53


def test_reused_module_calls_get_numbered_names(r50_table):
    names = [i.name for i in r50_table.calls]
    assert "layer1.0.relu" in names and "layer1.0.relu#2" in names and "layer1.0.relu#3" in names
    assert "layer1.0.relu#4" not in names
    info = next(i for i in r50_table.calls if i.name == "layer1.0.relu#2")
    assert info.module_name == "layer1.0.relu" and info.call == 2


def test_execution_order_and_metadata(r50_table):
    orders = [i.order for i in r50_table.calls]
    assert orders == sorted(orders)
    conv1 = next(i for i in r50_table.calls if i.name == "conv1")
    assert conv1.params == 3 * 64 * 7 * 7 and conv1.output_shape == (1, 64, 32, 32)
    assert conv1.layout == NCHW
    fc = next(i for i in r50_table.calls if i.name == "fc")
    assert fc.layout == VECTOR and "Fig. 7" in fc.skipped


def test_all_merges_a_container_with_its_last_child(r50_table):
    names = r50_table.names
    # layer1 returns the very tensor of layer1.2, which returns relu#3's:
    # one layer, named after the outermost container
    assert "layer1" in names and "layer1.2" not in names and "layer1.2.relu#3" not in names
    layer1 = next(i for i in r50_table.selected if i.name == "layer1")
    assert "layer1.2" in layer1.aliases and "layer1.2.relu#3" in layer1.aliases
    # bn3 also ends up as that tensor (in-place add + ReLU), but it is not the
    # last child: it stays, and is flagged as overwritten later
    bn3 = next(i for i in r50_table.selected if i.name == "layer1.2.bn3")
    assert bn3.overwritten
    assert "avgpool" not in names and "fc" not in names
    assert {i.name for i in r50_table.skipped} >= {"avgpool", "fc"}


def test_explicit_names_aliases_and_errors(r50):
    x = torch.randn(1, 3, 64, 64)
    t = camanim.list_layers(r50, x, ["layer4", "layer1.0.relu#2", "conv1"])
    assert t.names == ["conv1", "layer1.0.relu#2", "layer4"]      # execution order
    assert camanim.list_layers(r50, x, ["layer1.0.relu"]).names == ["layer1.0.relu"]
    assert camanim.list_layers(r50, x, ["layer1.2"]).names == ["layer1.2"]  # folded by "all"
    with pytest.raises(camanim.CAManimError, match="did you mean"):
        camanim.list_layers(r50, x, ["layer1.0.conv9"])
    with pytest.raises(camanim.CAManimError, match="cannot be drawn.*vector"):
        camanim.list_layers(r50, x, ["fc"])
    with pytest.raises(camanim.CAManimError, match="unknown layer selector"):
        camanim.list_layers(r50, x, "convs")


def test_callable_and_max_layers(r50):
    x = torch.randn(1, 3, 64, 64)
    t = camanim.list_layers(r50, x, lambda name, m: isinstance(m, nn.BatchNorm2d))
    assert len(t) == 53 and all(i.type == "BatchNorm2d" for i in t)
    t = camanim.list_layers(r50, x, "conv", max_layers=5)
    full = camanim.list_layers(r50, x, "conv").names
    assert t.names == [full[0], full[13], full[26], full[39], full[52]]


def test_model_without_spatial_layers_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(camanim.CAManimError, match="no drawable layer"):
        camanim.CAManim(mlp, "gradcam", "all")(torch.randn(1, 3, 2, 2))
    with pytest.raises(camanim.CAManimError, match="no drawable layer"):
        camanim.CAManim(mlp, "gradcam", "conv")(torch.randn(1, 3, 2, 2))


def test_convnext_channels_last_layers_run_without_reshape_transform():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    table = camanim.list_layers(model, x, "all")
    layouts = {i.layout for i in table.selected}
    assert NHWC in layouts and NCHW in layouts
    ln = next(i for i in table.selected if i.type == "LayerNorm" and i.layout == NHWC)
    assert ln.spatial_size == (ln.output_shape[1], ln.output_shape[2])
    maps = camanim.CAManim(model, "gradcam", "all")(x)
    assert len(maps) == len(table)
    for r, info in zip(maps.raw, maps.layers):
        assert tuple(r.shape[1:]) == info.spatial_size
        assert torch.isfinite(r).all() and (r >= 0).all()
    assert no_hooks(model)


@pytest.mark.slow
def test_maxvit_runs_with_all_and_skips_window_tensors():
    torch.manual_seed(0)
    model = torchvision.models.maxvit_t(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    anim = camanim.CAManim(model, "gradcam", "all")
    maps = anim(x)
    table = anim.layer_table(x)
    assert len(maps) > 10
    reasons = [i.skipped for i in table.skipped]
    assert any("layout cannot be told" in r for r in reasons)   # window/partition tensors
    for r, info in zip(maps.raw, maps.layers):
        assert info.layout in (NCHW, NHWC)
        assert tuple(r.shape[1:]) == info.spatial_size
    assert no_hooks(model)


def test_token_layers_need_reshape_transform():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)      # (B, 16, 8)
            t = self.mix(t)
            return self.head(t.mean(1))

    model = Tokens().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(camanim.CAManimError, match="reshape_transform"):
        camanim.list_layers(model, x, ["mix"])

    def to_map(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 4)

    maps = camanim.CAManim(model, "gradcam", ["mix"], reshape_transform=to_map)(x)
    assert maps.raw[0].shape == (2, 4, 4)
