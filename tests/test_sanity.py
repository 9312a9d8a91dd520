"""Model-parameter randomization sanity check (Adebayo et al. 2018).

SSIM reference: torchmetrics' ``structural_similarity_index_measure``
(Gaussian window 11, sigma 1.5) with ``return_full_image=True``, cropped to
the window positions inside the image (torchmetrics pads by reflection,
we average the valid positions only, as Wang et al.), to 1e-10.
"""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camanim import CAManimError
from camanim.cli import main as sanity_main
from camanim.metrics.sanity import (
    SanityReport,
    find_blocks,
    hog,
    hog_similarity,
    sanity_check,
    ssim,
)
from helpers import TinyCNN, no_hooks
from sanity_models import EdgeCAM


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().double().eval()


@pytest.fixture
def x():
    return torch.randn(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


def test_ssim_identical_is_one_and_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 40, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(ssim(a, a).numpy(), 1.0, atol=1e-12)
    b = (a + 0.4 * torch.rand(3, 32, 40, generator=g, dtype=torch.float64)).clamp(0, 1)
    tm = pytest.importorskip("torchmetrics.functional.image")
    for i in range(3):
        _, full = tm.structural_similarity_index_measure(
            a[i:i + 1, None], b[i:i + 1, None], data_range=1.0, return_full_image=True)
        ref = full[..., 5:-5, 5:-5].mean().item()
        assert ssim(a[i:i + 1], b[i:i + 1]).item() == pytest.approx(ref, abs=1e-10)
    assert (ssim(a, b) < 0.99).all()
    small = torch.rand(1, 6, 7, generator=g, dtype=torch.float64)    # smaller than the window
    assert ssim(small, small).item() == pytest.approx(1.0)


def test_hog_orientation_and_similarity():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    vertical = (torch.sin(xx / 2) + 1) / 2        # intensity varies along x: gradients at 0 degrees
    horizontal = vertical.T.contiguous()
    maps = torch.stack([vertical, horizontal])
    d = hog(maps).reshape(2, 3, 3, 4, 9)  # 4x4 cells of 8 px -> 3x3 blocks of 2x2 cells
    # the first bin (0-20 degrees, centre 10) and the last share the 0-degree votes;
    # 90 degrees -> bin 4
    assert d[0, ..., 4].sum() < 1e-6 * d[0].sum()
    assert d[1, ..., 4].sum() > 0.9 * d[1].sum()
    sim = hog_similarity(maps, torch.stack([2 * vertical, horizontal.flip(0)]))
    np.testing.assert_allclose(sim.numpy(), 1.0, atol=1e-6)
    assert hog_similarity(vertical[None], horizontal[None]).item() < 0.2
    assert torch.isnan(hog_similarity(torch.zeros(1, 32, 32), vertical[None])).all()


def test_gradcam_maps_change_under_randomization(model, x):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rep = sanity_check(model, x, "gradcam", targets=[1, 3])
    assert rep.layers == ["conv1", "conv2", "conv3"]
    assert rep.blocks == ["fc", "conv3", "conv2", "bn1", "conv1"]
    assert rep.spearman.shape == rep.ssim.shape == rep.hog.shape == (5, 3, 2)
    assert rep.targets == [1, 3]
    assert not rep.method_flagged and rep.flagged_layers == []
    assert np.all(rep.final_spearman < 0.5)
    assert np.all(rep.mean("ssim")[-1] < 0.5)
    # the caller's model is untouched: weights bit-identical, no hooks, mode kept, global RNG kept
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert no_hooks(model) and not model.training


def test_model_independent_cam_is_flagged(model, x):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rep = sanity_check(model, x, EdgeCAM, blocks="leaves")
    assert rep.method == "EdgeCAM"
    assert rep.method_flagged
    assert rep.flagged_layers == rep.layers
    np.testing.assert_allclose(rep.spearman, 1.0, atol=1e-12)
    np.testing.assert_allclose(rep.ssim, 1.0, atol=1e-12)
    assert "FLAG" in rep.table()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_seeded_and_deterministic(model, x):
    a = sanity_check(model, x, "gradcam", seed=5)
    b = sanity_check(model, x, "gradcam", seed=5)
    c = sanity_check(model, x, "gradcam", seed=6)
    np.testing.assert_array_equal(a.spearman, b.spearman)
    assert not np.array_equal(a.spearman, c.spearman)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x):
        return self.net(x)


class Shuffled(nn.Module):
    """Children defined in a different order than they run."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.body = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_blocks():
    x = torch.zeros(1, 3, 16, 16)
    torch.manual_seed(0)
    assert [b for b, _ in find_blocks(Wrapper(), x)] == ["net.fc", "net.conv3", "net.conv2",
                                                         "net.bn1", "net.conv1"]
    assert [b for b, _ in find_blocks(Shuffled(), x)] == ["head", "body"]
    tv = pytest.importorskip("torchvision")
    r18 = tv.models.resnet18(num_classes=3)
    assert [b for b, _ in find_blocks(r18, torch.zeros(1, 3, 32, 32))] == [
        "fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    leaves = [b for b, _ in find_blocks(r18, torch.zeros(1, 3, 32, 32), "leaves")]
    assert leaves[0] == "fc" and leaves[-1] == "conv1" and len(leaves) == 41
    assert (
        leaves.index("layer4.1.bn2")
        < leaves.index("layer4.1.conv2")
        < leaves.index("layer4.0.conv1")
    )
    assert [b for b, _ in find_blocks(r18, x, ["fc", "layer4"])] == ["fc", "layer4"]
    with pytest.raises(CAManimError, match="no module named"):
        find_blocks(r18, x, ["nope"])
    with pytest.raises(CAManimError, match="blocks must be"):
        find_blocks(r18, x, "everything")


def test_bad_arguments(model, x):
    with pytest.raises(CAManimError, match="threshold"):
        sanity_check(model, x, threshold=2)
    with pytest.raises(CAManimError, match="model must be"):
        sanity_check("resnet", x)


def _fake_report(n_layers=53, n_steps=7, b=2):
    rng = np.random.default_rng(0)
    sims = {m: rng.uniform(-1, 1, (n_steps, n_layers, b)) for m in ("spearman", "ssim", "hog")}
    sims["spearman"][:, 5] = 0.99
    sims["spearman"][:, 6] = np.nan
    return SanityReport(
        method="gradcam",
        layers=[f"features.{i}.block.conv" for i in range(n_layers)],
        blocks=[f"stage{k}" for k in range(n_steps)],
        targets=[3, None],
        **sims,
    )


def test_report_files(tmp_path):
    rep = _fake_report()
    assert rep.flagged_layers == ["features.5.block.conv"]       # NaN layer 6 is not flagged
    assert not rep.method_flagged
    path = rep.to_csv(tmp_path / "s.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 7 * 53 * 2
    assert rows[0]["step"] == "1" and rows[0]["target"] == "3" and rows[1]["target"] == ""
    assert [r for r in rows if r["layer_index"] == "6"][0]["spearman"] == ""
    data = json.loads(rep.to_json(tmp_path / "s.json"))
    assert data["flagged_layers"] == ["features.5.block.conv"]
    assert np.array(data["mean"]["ssim"], dtype=float).shape == (7, 53)
    assert data["mean"]["spearman"][0][6] is None
    table = rep.table()
    assert len(table.splitlines()) == 5 + 2 + 53            # 5 lines of header and legend
    png = rep.plot(tmp_path / "s.png")
    with Image.open(png) as im:
        assert im.size[1] >= 0.16 * 53 * 110          # ~0.16 inch per layer at 110 dpi


def test_cli(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (40, 40, 3))).astype(np.uint8)).save(
        img
    )
    out = tmp_path / "out"
    spec = f"{__file__.rsplit('/', 1)[0]}/helpers.py:TinyCNN"
    args = ["sanity", str(img), str(img), "--model", spec, "--size", "32", "--out", str(out), "-q"]
    assert sanity_main(args) == 0
    assert {p.name for p in out.iterdir()} == {
        "sanity.txt",
        "sanity.json",
        "sanity.csv",
        "sanity.png",
    }
    data = json.loads((out / "sanity.json").read_text())
    assert data["method"] == "gradcam" and len(data["layers"]) == 3
    edge = f"{__file__.rsplit('/', 1)[0]}/sanity_models.py:EdgeCAM"
    assert sanity_main(args + ["--method", edge, "--fail-on", "method", "--no-plot"]) == 1
    assert sanity_main(args + ["--blocks", "nope"]) == 2


def test_find_blocks_leaves_model_as_it_was():
    torch.manual_seed(0)
    m = TinyCNN().train()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    find_blocks(m, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert m.training and no_hooks(m)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())   # BN statistics too
