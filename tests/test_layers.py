"""Layer discovery and selection."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import camanim
from camanim.core.layout import NCHW, NHWC, VECTOR
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


# "blocks" = the last layer before each downsampling (the SISE rule). The
# expected lists, derived from torchvision's code at the given input size:
BLOCKS = {
    # conv-relu stages, each closed by a max pool (64 -> 32 -> 16 -> 8 -> 4 -> 2):
    # the ReLU before each pool. Not the last pool's output (the `features`
    # container, 2x2) nor `avgpool` (2x2 -> 7x7): pools compute nothing.
    "vgg11": (64, ["features.1", "features.4", "features.9", "features.14", "features.19"]),
    # stem relu0 (32) before pool0, then each dense block before its
    # transition (conv 1x1 + avg pool); the last stage ends in norm5, the
    # `features` container's output (2x2), before the head's relu + pool
    "densenet121": (64, ["features.relu0", "features.denseblock1", "features.denseblock2",
                         "features.denseblock3", "features"]),
    # the stride-2 blocks 2, 4, 7, 14 start the stages 16, 8, 4, 2; features.18
    # (the 1x1 conv, = `features`) ends the last one
    "mobilenet_v2": (64, ["features.1", "features.3", "features.6", "features.13", "features"]),
    # stages 2, 3, 4 and 6 start with a stride-2 MBConv (stage 5 keeps 4x4)
    "efficientnet_b0": (64, ["features.1", "features.2", "features.3", "features.5",
                             "features"]),
    # conv1 (stride 2), then maxpool1..4 close conv3, inception3b, 4e; 5b is last
    "googlenet": (64, ["conv1", "conv3", "inception3b", "inception4e", "inception5b"]),
    # 96 -> 47 (1a, stride 2) -> 45 (2a, an unpadded 3x3: same stage) -> pool
    # -> 22 (3b) -> 20 (4a, unpadded: same stage) -> pool -> 9 (5b..5d)
    # -> 4 (6a stride 2; 6b..6e); Mixed_7 is 1x1 at this size (no extent)
    "inception_v3": (96, ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"]),
}


@pytest.mark.parametrize("arch", sorted(BLOCKS))
def test_blocks_is_the_last_layer_before_each_downsampling(arch):
    size, want = BLOCKS[arch]
    kw = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") \
        else {}
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, **kw).eval()
    table = camanim.list_layers(model, torch.randn(1, 3, size, size), "blocks")
    assert table.names == want
    sizes = [i.spatial_size for i in table.selected]
    # one per stage, shrinking
    assert all(a[0] > b[0] for a, b in zip(sizes, sizes[1:], strict=False))


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
    for r, info in zip(maps.raw, maps.layers, strict=False):
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
    for r, info in zip(maps.raw, maps.layers, strict=False):
        assert info.layout in (NCHW, NHWC)
        assert tuple(r.shape[1:]) == info.spatial_size
    assert no_hooks(model)


class Tokens(nn.Module):
    """Patch embedding (4x4 patches) + one token mixer: ``(B, prefix + n, 8)``
    tokens, with ``prefix`` leading tokens (class / register tokens)."""

    def __init__(self, prefix: int = 0):
        super().__init__()
        self.prefix = prefix
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.extra = nn.Parameter(torch.randn(1, max(prefix, 1), 8))
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)      # (B, n, 8)
        if self.prefix:
            t = torch.cat([self.extra[:, :self.prefix].expand(len(t), -1, -1), t], 1)
        t = self.mix(t)
        return self.head(t.mean(1))


def test_token_grid_is_told_with_one_notice_and_reshape_transform_overrides():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for prefix in (0, 1):                                   # grid alone; class token + grid
        model = Tokens(prefix).double().eval()
        with pytest.warns(UserWarning, match="4x4 patch grid") as rec:
            maps = camanim.CAManim(model, "gradcam", ["mix"], progress=False)(x)
        assert len([w for w in rec if "patch grid" in str(w.message)]) == 1
        assert maps.raw[0].shape == (2, 4, 4)
        assert maps.layers[0].token_grid == (prefix, 4, 4)
        # the grid read by hand gives the same map; no notice with an override
        calls = []

        def by_hand(t, p=prefix, calls=calls):
            calls.append(t.shape)
            return t[:, p:].transpose(1, 2).reshape(t.shape[0], 8, 4, 4)

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            same = camanim.CAManim(model, "gradcam", ["mix"], reshape_transform=by_hand,
                                   progress=False)(x)
        assert calls
        torch.testing.assert_close(same.raw[0], maps.raw[0], rtol=0, atol=0)
    # a non-square image: the grid has its aspect ratio (4 x 2 patches)
    wide = Tokens(1).double().eval()
    with pytest.warns(UserWarning, match="4x2 patch grid"):
        got = camanim.CAManim(wide, "gradcam", ["mix"], progress=False)(x[..., :8])
    assert got.raw[0].shape == (2, 4, 2)


def test_token_layers_no_grid_fits_need_reshape_transform():
    model = Tokens(prefix=4).double().eval()               # 4 register tokens: 20 tokens
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(camanim.CAManimError, match="reshape_transform"):
        camanim.list_layers(model, x, ["mix"])
    table = camanim.list_layers(model, x, "all")
    assert "mix" in {i.name for i in table.skipped}
    assert "N = 20" in next(i.skipped for i in table.skipped if i.name == "mix")

    def to_map(t):
        return t[:, 4:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 4)

    maps = camanim.CAManim(model, "gradcam", ["mix"], reshape_transform=to_map)(x)
    assert maps.raw[0].shape == (2, 4, 4)


def test_torchvision_vit_without_reshape_transform():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=64).eval()   # 4x4 patches
    x = torch.randn(1, 3, 64, 64)
    names = ["encoder.layers.encoder_layer_10.ln_1", "encoder.layers.encoder_layer_11"]
    with pytest.warns(UserWarning, match=r"\(B, 17, C\) drawn as a class token \(dropped\) "
                                         r"\+ a 4x4 patch grid") as rec:
        maps = camanim.CAManim(model, "gradcam", names, progress=False)(x)
    assert len([w for w in rec if "patch grid" in str(w.message)]) == 1   # once, not per layer
    assert maps.names == names
    for r in maps.raw:
        assert r.shape == (1, 4, 4) and torch.isfinite(r).all()
    assert no_hooks(model)


def test_swin_is_channels_last_and_needs_no_notice():
    torch.manual_seed(0)
    # swin_t's code with one narrow block per stage (swin_t itself: 12 s here)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24,
                                               depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                               window_size=[7, 7]).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = camanim.list_layers(model, x, "blocks")
        # patch embedding + 3 patch mergings: 16, 8, 4, 2; the last stage ends
        # in norm + permute (the NCHW view of features.7 the head pools)
        assert [(i.name, i.layout, i.spatial_size) for i in table.selected] == [
            ("features.1", NHWC, (16, 16)), ("features.3", NHWC, (8, 8)),
            ("features.5", NHWC, (4, 4)), ("permute", NCHW, (2, 2))]
        maps = camanim.CAManim(model, "gradcam", "blocks", progress=False)(x)
    assert [tuple(r.shape[1:]) for r in maps.raw] == [(16, 16), (8, 8), (4, 4), (2, 2)]
