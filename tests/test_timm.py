"""timm models: layouts read from the model, the traps flagged, "blocks" on
feature stages, an oracle against timm's own ``forward_intermediates``,
equivalence with pytorch-grad-cam, the CLI and the example.

Every model is built with ``pretrained=False`` (random weights, nothing
downloaded), narrowed (few blocks, small inputs) to keep each test a few
seconds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import camanim
from camanim.core.capture import capture
from camanim.core.inputs import logit_target
from camanim.core.layers import NCHW, NHWC, TOKENS

timm = pytest.importorskip("timm")


def make(name: str, dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).to(dtype).eval()


def vit_reg(**kw) -> torch.nn.Module:
    """A class token + 4 register tokens ViT (2 blocks, 32 px: a 4x4 grid)."""
    return make("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, reg_tokens=4, **kw)


def swin(**kw) -> torch.nn.Module:
    """Swin's code with one narrow block per stage, 64 px (16, 8, 4, 2 grids)."""
    return make("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), **kw)


def quiet_table(model, x, layers="all"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return camanim.list_layers(model, x, layers)


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("name,kw,prefix,what", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, reg_tokens=4), 5,
     "1 class + 4 register tokens"),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2), 2,
     "1 class + 1 distillation tokens"),
    ("vit_pwee_patch16_reg1_gap_256", dict(img_size=32, depth=2), 1, "1 register token"),
])
def test_prefix_tokens_and_grid_are_read_from_the_model(name, kw, prefix, what):
    model = make(name, **kw)
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="read from the model") as rec:
        table = camanim.list_layers(model, x, "blocks")
    msgs = [str(w.message) for w in rec if "camanim" in str(w.message)]
    assert len(msgs) == 1 and f"num_prefix_tokens={prefix} ({what})" in msgs[0]
    assert "patch_embed" in msgs[0]
    assert table.names == ["blocks.0", "blocks.1"]          # feature_info: every block
    for info in table.selected:
        side = 32 // model.patch_embed.patch_size[0]
        grid = (prefix, side, side)
        assert info.layout == TOKENS and info.token_grid == grid
        assert info.layout_source.startswith("read from the model")
    # a guessed grid would not fit 1 + 4 (or 1 + 1) prefix tokens: the blocks drew
    # nothing before; now the maps have the grid's shape
    maps = camanim.CAManim(model, "gradcam", "blocks", progress=False)(x)
    assert [tuple(r.shape) for r in maps.raw] == [(1, grid[1], grid[2])] * 2


def test_grid_follows_the_input_with_a_dynamic_image_size():
    model = make("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, reg_tokens=2,
                 dynamic_img_size=True)
    x = torch.randn(1, 3, 48, 32)                                # not the built size
    table = quiet_table(model, x, "blocks")
    assert table.selected[0].token_grid == (3, 6, 4)           # 1 class + 2 reg, 6 x 4 patches
    assert "dynamic_feat_size" in table.selected[0].layout_source


def test_layout_guessed_when_the_model_states_nothing():
    class Plain(torch.nn.Module):                              # tokens, no timm attributes
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.mix = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.mix(self.embed(x).flatten(2).transpose(1, 2)).mean(1))

    with pytest.warns(UserWarning, match=r"4x4 patch grid \(guessed from the token count\)"):
        table = camanim.list_layers(Plain().eval(), torch.randn(1, 3, 16, 16), ["mix"])
    assert table.selected[0].layout_source == "guessed from the token count"


def test_swin_stages_are_read_as_nhwc_and_window_tensors_skipped():
    model = swin()
    x = torch.randn(1, 3, 64, 64)
    table = quiet_table(model, x)
    stages = [i for i in table.calls if i.name in ("layers.0", "layers.1", "layers.2",
                                                   "layers.3")]
    assert [(i.layout, i.spatial_size) for i in stages] == [
        (NHWC, (16, 16)), (NHWC, (8, 8)), (NHWC, (4, 4)), (NHWC, (2, 2))]
    assert all(i.layout_source == "read from the model: output_fmt=NHWC" for i in stages)
    # windowed attention tensors (B * windows, N, C) are never drawn as a grid
    windows = [i for i in table.calls if i.layout != NCHW and i.output_shape
               and i.output_shape[0] != 1]
    assert windows and all(i not in table.selected for i in windows)
    assert any("not the batch" in (i.skipped or "") for i in windows)
    assert quiet_table(model, x, "blocks").names == ["layers.0", "layers.1", "layers.2",
                                                      "layers.3"]


def test_hiera_unrolled_tokens_are_skipped_with_their_reason():
    model = make("hiera_tiny_224", img_size=(64, 64), stages=(1, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    table = quiet_table(model, x)
    blocks = [i for i in table.calls if i.name.startswith("blocks.") and i.layout == TOKENS]
    assert blocks and all(i not in table.selected for i in blocks)
    assert all("unrolled (mask-unit) order" in i.skipped for i in blocks)
    with pytest.raises(camanim.CAManimError, match="unrolled"):
        camanim.list_layers(model, x, ["blocks.0"])


# ------------------------------------------------------------------ traps

def test_last_block_of_a_class_token_vit_is_flagged_zero_gradient():
    model = vit_reg(dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.warns(UserWarning, match="get no gradient") as rec:
        maps = camanim.CAManim(model, "gradcam", "all", progress=False)(x)
    assert len([w for w in rec if "camanim" in str(w.message)]) == 1  # one notice
    flagged = {i.name for i in maps.layers if i.zero_gradient}
    assert {"blocks", "blocks.1.mlp.fc2", "norm"} <= flagged      # blocks: = blocks.1 (merged)
    assert not any(n.startswith("blocks.0") for n in flagged)
    assert "blocks.1.norm1" not in flagged                    # read by the class token's attention
    for name, r in maps:
        if name in flagged:
            assert bool((r == 0).all()), name                 # the trap is real
    assert any(bool((r > 0).any()) for name, r in maps if name.startswith("blocks.0"))


def test_average_pooled_vit_has_no_zero_gradient_layer():
    model = make("vit_pwee_patch16_reg1_gap_256", img_size=32, depth=2)
    table = quiet_table(model, torch.randn(1, 3, 32, 32))
    assert not any(i.zero_gradient for i in table.calls)


# ------------------------------------------------------------------ blocks

@pytest.mark.parametrize("name,kw,size,want", [
    ("resnet18", {}, 64, ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ("convnext_atto", {}, 64, ["stages.0", "stages.1", "stages.2", "stages.3"]),
])
def test_blocks_follow_feature_info(name, kw, size, want):
    model = make(name, **kw)
    assert [d["module"] for d in model.feature_info] == want
    assert quiet_table(model, torch.randn(1, 3, size, size), "blocks").names == want


# ------------------------------------------------------------------ oracle

def _oracle_cases():
    return [
        ("vit_reg", vit_reg, 32),
        ("deit_distilled", lambda: make("deit_tiny_distilled_patch16_224", img_size=32,
                                        depth=2), 32),
        ("swin", swin, 64),
        ("convnext_atto", lambda: make("convnext_atto"), 64),
    ]


@pytest.mark.parametrize("case", _oracle_cases(), ids=lambda c: c[0])
def test_activations_laid_out_equal_timms_forward_intermediates(case):
    """Oracle: the NCHW map camanim reads for each feature stage equals the
    NCHW intermediate timm's ``forward_intermediates`` returns for it.
    Catches prefix tokens, NHWC stages and unrolled orders at once."""
    _, build, size = case
    model = build()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
    names = [d["module"] for d in model.feature_info]
    assert len(names) == len(want)
    table = quiet_table(model, x[:1], names)
    got = capture(model, x, table.selected, gradients=False).activations
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_hiera_oracle_shows_the_raster_reading_would_be_scrambled():
    model = make("hiera_tiny_224", img_size=(64, 64), stages=(1, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)[0]    # (1, C, 16, 16)
    table = quiet_table(model, x)
    info = next(i for i in table.calls if i.name == "blocks.0")
    assert info.skipped and "unrolled" in info.skipped
    from camanim.core.capture import Hooks

    with torch.no_grad(), Hooks(model, [info]) as hooks:
        model(x)
    t = hooks.outputs["blocks.0"]                                            # (1, 256, C)
    raster = t.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    assert raster.shape == want.shape and not torch.allclose(raster, want)
    rerolled = model.reroll(t, 0).permute(0, 3, 1, 2)
    torch.testing.assert_close(rerolled, want, rtol=0, atol=0)


# ------------------------------------------------------------------ equivalence

def _tokens(prefix: int, h: int, w: int):
    """The correct reshape_transform, by hand: drop the prefix, raster grid."""
    def to_map(t):
        return t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return to_map


def _nhwc(t):
    return t.permute(0, 3, 1, 2)


# model, input size, {layer: the reshape_transform pytorch-grad-cam needs}
EQUIVALENCE = {
    # class + 4 register tokens, 4x4 patches; blocks.1.mlp gets no gradient (both zero)
    "vit_reg": (vit_reg, 32, {name: _tokens(5, 4, 4) for name in (
        "blocks.0.norm1", "blocks.0.attn", "blocks.0", "blocks.1.norm1", "blocks.1.mlp")}),
    # NHWC stages; the MLP's (B, h*w, C) tokens in raster order
    "swin": (swin, 64, {"layers.0.blocks.0.mlp": _tokens(0, 16, 16), "layers.0": _nhwc,
                        "layers.1": _nhwc, "layers.2.blocks.0.norm1": _nhwc,
                        "layers.3": _nhwc}),
    # channels-last inside the blocks (norm, MLP: conv_mlp=False as in convnext_tiny and
    # larger), NCHW between them; timm's narrow ConvNeXt for tests
    "convnext": (lambda **kw: make("test_convnext", conv_mlp=False, **kw), 32, {
        "stages.0.blocks.0.norm": _nhwc, "stages.0.blocks.0.mlp.fc1": _nhwc,
        "stages.1": None, "stages.2.blocks.0.conv_dw": None, "stages.2": None}),
    # timm's own small EfficientNet for tests (the B0 code, narrow; float64 depthwise
    # convolutions are slow on the CPU)
    "efficientnet": (lambda **kw: make("test_efficientnet", **kw), 64, {
        "conv_stem": None, "blocks.0": None, "blocks.3.0.conv_pw": None, "blocks.3": None,
        "bn2": None}),
}


@pytest.mark.parametrize("arch", sorted(EQUIVALENCE))
def test_gradcam_equals_pytorch_grad_cam_with_a_hand_written_reshape(arch):
    """Reference: pytorch_grad_cam.GradCAM run on ONE layer at a time, given
    the correct reshape_transform by hand, on the float64 model (its in-place
    activations made out-of-place for the reference's capture, see
    test_equivalence.without_inplace). Tolerance: 1e-4 on the min-max
    normalized maps. camanim reads every layout itself (no reshape_transform)."""
    from pytorch_grad_cam import GradCAM

    from test_equivalence import without_inplace

    build, size, layers = EQUIVALENCE[arch]
    model = build(dtype=torch.float64)
    x = torch.randn(2, 3, size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        maps = camanim.CAManim(model, "gradcam", list(layers), progress=False)(x)
    assert maps.names == list(layers)
    ours = maps.upsample("local").numpy()
    ref_model = without_inplace(model)
    modules = dict(ref_model.named_modules())
    targets = [logit_target(int(c)) for c in maps.targets]
    for k, (name, fn) in enumerate(layers.items()):
        with GradCAM(ref_model, [modules[name]], reshape_transform=fn) as cam:
            ref = cam(x, targets)
        assert np.abs(ours[k] - ref).max() <= 1e-4, name


@pytest.mark.parametrize("arch", ["vit_reg", "swin"])
def test_ybroad_runs_on_timm_models(arch):
    build, size, layers = EQUIVALENCE[arch]
    model = build()
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        maps = camanim.CAManim(model, "gradcam", list(layers)[:3], progress=False)(x)
    road = camanim.ybroad(model, x, maps, percentiles=(20, 80))
    assert road.names == maps.names and road.scores.shape == (3, 2)
    assert np.isfinite(road.scores).all()


# ------------------------------------------------------------------ CLI and example

def test_cli_explains_a_timm_model(tmp_path, capsys):
    from PIL import Image

    from camanim import cli

    png = tmp_path / "img.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(png)
    rc = cli.main(["explain", str(png), "--model", "timm:convnext_atto", "--size", "64",
                   "--layers", "blocks", "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert any((tmp_path / "out").iterdir())
    rc = cli.main(["layers", "--model", "timm:vit_tiny_patch16_224", "--size", "32",
                   "--layers", "blocks"])
    out = capsys.readouterr().out
    assert rc == 0 and "blocks.11" in out            # dynamic_img_size: any size, 2x2 grid
    assert cli.main(["layers", "--model", "timm:convnext_atoo", "--size", "32"]) != 0
    assert "did you mean timm:convnext_atto" in capsys.readouterr().err
    assert cli.main(["explain", str(png), "--model", "timm:convnext_atto", "--weights", "DEFAULT",
                     "--out", str(tmp_path / "x")]) != 0
    assert "--checkpoint" in capsys.readouterr().err


def test_example_takes_timm_arch():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from finetune_bus import model as bm
    from finetune_bus import train

    net = bm.build_backbone("timm:convnext_atto", num_classes=3)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="random weights"):
        bm.build_backbone("timm:convnext_atto", weights="imagenet")
    assert train.parse_args(["--arch", "timm:convnext_atto"]).arch == "timm:convnext_atto"
    with pytest.raises(SystemExit):
        train.parse_args(["--arch", "convnext"])
