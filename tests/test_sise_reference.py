"""SISE and Ada-SISE against a plain numpy reference (issue 23).

The reference is written from the paper and the authors' code, not from
camanim: activations and gradients come from forward hooks on a twin of the
model (`test_seed_methods.acts_grads`), masks are upsampled by a numpy
bilinear resize, every masked image ``x * m_k`` is scored by the model, and

    V = minmax(sum_k s_k * m_k / (sum_xy m_k + 1e-6))      (mask_norm="area")
    V = minmax(sum_k s_k * m_k / (sum_k m_k + 1e-6))       (mask_norm="pixel")

with ``s_k`` the softmax probability of the target class on ``x * m_k``, then
the block-wise fusion ``E = V_1; E = (E + V_b) * Otsu(V_b); minmax(E)``.
``minmax`` is ``(v - min) / (1e-7 + max - min)`` (pytorch-grad-cam's
epsilon, which camanim uses everywhere) and 1e-6 is the authors' epsilon on
mask sums.

The model has a sharp softmax (top class 0.99 and 0.92) and a head that sees
where things are (flatten + linear, weights x 100): the masked images' scores
spread by 0.15 to 0.7 within every layer. On a random-init TinyCNN (average
pooling, flat softmax) they move by < 0.02, which hides the scores' weights.
Tolerance: float64 throughout, 1e-9 absolute on maps in [0, 1] (rounding
differences of summation order only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camanim.methods.sise import ada_sise, sise
from test_seed_methods import acts_grads, np_binarize, np_otsu_split, twin

ATOL = 1e-9


def np_resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(h, w)`` to ``size``, half-pixel centres
    (``align_corners=False``; source coordinates below 0 clamp to 0)."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, wy = axis(a.shape[0], size[0])
    x0, x1, wx = axis(a.shape[1], size[1])
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bot = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bot * wy[:, None]


def np_minmax(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) / (1e-7 + v.max() - v.min())


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_sise_keep(grad_mean: np.ndarray, mu: float) -> np.ndarray:
    return (grad_mean > 0) & (grad_mean >= mu * grad_mean.max())


def np_ada_keep(grad_mean: np.ndarray) -> np.ndarray:
    """Otsu's split of the positive normalized mean gradients' 256-bin histogram."""
    norm = grad_mean / grad_mean.max()
    hist, _ = np.histogram(norm[norm > 0], bins=256, range=(0.0, 1.0))
    j = np_otsu_split(hist)
    return (norm > 0) & (np.minimum(np.floor(norm * 256), 255) >= j)


def reference(model, x: torch.Tensor, cls: list[int], keep_rule, layers, mask_norm: str = "area"):
    """Per image: the kept channels, the layer maps V_l and the fused map;
    ``layers``: ``(module name, call)`` of the block layers."""
    ref = twin(model)
    b, size = x.shape[0], tuple(x.shape[-2:])
    score = lambda logits: torch.softmax(logits, -1)[torch.arange(b), cls]  # noqa: E731
    out = []
    for i in range(b):
        kept, maps, spread = [], [], []
        for module, call in layers:
            acts, grads = acts_grads(ref, x, module, call, score)
            a, g = acts[i].numpy(), grads[i].numpy()
            nonconst = np.ptp(a.reshape(len(a), -1), axis=1) > 0
            keep = np.flatnonzero(keep_rule(g.mean((1, 2))) & nonconst)
            masks = np.stack([np_resize(a[k], size) for k in keep])
            masks = np.stack([(m - m.min()) / (m.max() - m.min()) for m in masks])
            with torch.no_grad():
                logits = model(x[i][None] * torch.from_numpy(masks)[:, None]).numpy()
            s = np_softmax(logits)[:, cls[i]]
            if mask_norm == "area":
                v = np.einsum("k,khw->hw", s / (masks.sum((1, 2)) + 1e-6), masks)
            else:
                v = np.einsum("k,khw->hw", s, masks) / (masks.sum(0) + 1e-6)
            kept.append(keep.tolist())
            maps.append(np_minmax(v))
            spread.append(s.max() - s.min())
        fused = maps[0]
        for v in maps[1:]:
            fused = (fused + v) * np_binarize(v)
        out.append(dict(channels=kept, maps=maps, fused=np_minmax(fused), spread=spread))
    return out


def check(got, want) -> None:
    for i, w in enumerate(want):
        for layer, v in enumerate(w["maps"]):
            assert got.extra["channels"][layer][i] == w["channels"][layer]
            assert len(w["channels"][layer]) >= 2            # several masks per layer
            np.testing.assert_allclose(got.raw[layer][i].numpy(), v, atol=ATOL, rtol=0,
                                       err_msg=f"image {i}, layer {got.names[layer]}")
        np.testing.assert_allclose(got.raw[-1][i].numpy(), w["fused"], atol=ATOL, rtol=0,
                                   err_msg=f"image {i}, fused")


class SpatialNet(nn.Module):
    """Three convolutions, then a linear head on the flattened 12 x 16 map."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 12, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU()
        self.conv3, self.act3 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(16 * 12 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.act3(self.conv3(x)).flatten(1))


@pytest.fixture(scope="module")
def sharp():
    torch.manual_seed(1)
    model = SpatialNet().double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    with torch.no_grad():
        assert torch.softmax(model(x), -1).amax(-1).min() > 0.9     # sharp
    return model, x


def blocks(maps) -> list[tuple[str, int]]:
    return [(i.module_name, i.call) for i in maps.layers[:-1]]


@pytest.mark.parametrize("mask_norm", ["area", "pixel"])
def test_sise_equals_the_numpy_reference(sharp, mask_norm):
    model, x = sharp
    cls = [0, 2]                                      # the predicted classes
    got = sise(model, x, targets=cls, mu=0.2, mask_norm=mask_norm)
    assert got.names == ["act1", "act3", "fused"]
    want = reference(model, x, cls, lambda a: np_sise_keep(a, 0.2), blocks(got), mask_norm)
    # the masked images' scores differ widely: the score weights matter
    assert min(s for w in want for s in w["spread"]) > 0.15
    check(got, want)


def test_ada_sise_equals_the_numpy_reference(sharp):
    model, x = sharp
    cls = [0, 2]
    got = ada_sise(model, x, targets=cls)
    check(got, reference(model, x, cls, np_ada_keep, blocks(got)))


def test_area_normalization_changes_the_maps_of_this_model(sharp):
    """The area normalization is visible here (maps move by > 0.05 without it),
    so the reference comparison can tell the two apart."""
    model, x = sharp
    area = sise(model, x, targets=[0, 2], mu=0.2)
    plain = sise(model, x, targets=[0, 2], mu=0.2, mask_norm="none")
    moved = [float((p - q).abs().max()) for p, q in zip(area.raw, plain.raw, strict=True)]
    assert max(moved[:-1]) > 0.05
