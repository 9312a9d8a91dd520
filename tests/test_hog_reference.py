"""`camanim.metrics.sanity.hog` against a plain numpy HOG (issue 23).

The reference follows Dalal and Triggs (2005) pixel by pixel, written with
loops and no vectorization tricks: centred differences (one-sided at the
border), unsigned orientation in [0, 180) degrees voting with its magnitude
into the two nearest of ``bins`` bin centres (linear split; the votes wrap
from the last bin to the first), cells of ``cell x cell`` pixels (a partial
last row / column of cells dropped), ``block x block`` cells per block at a
one-cell stride, L2-Hys normalization (eps 1e-5, clip 0.2). scikit-image's
``hog`` is not used: it gives each pixel's vote to one bin only (no linear
split), so it is another descriptor. Tolerance: 1e-12 on float64
descriptors in [0, 1] (summation order only); the Pearson similarity to
1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from camanim.metrics.sanity import hog, hog_similarity


def np_hog(img: np.ndarray, cell: int, bins: int = 9, block: int = 2,
           clip: float = 0.2) -> np.ndarray:
    h, w = img.shape
    ch, cw = h // cell, w // cell
    cells = np.zeros((ch, cw, bins))
    width = 180.0 / bins
    for y in range(ch * cell):
        for x in range(cw * cell):
            up, down = img[max(y - 1, 0), x], img[min(y + 1, h - 1), x]
            left, right = img[y, max(x - 1, 0)], img[y, min(x + 1, w - 1)]
            gy = (down - up) / (2 if 0 < y < h - 1 else 1)
            gx = (right - left) / (2 if 0 < x < w - 1 else 1)
            mag = math.hypot(gx, gy)
            deg = math.degrees(math.atan2(gy, gx)) % 180.0
            pos = deg / width - 0.5                       # bin k's centre is (k + 0.5) * width
            k = math.floor(pos)
            frac = pos - k
            cells[y // cell, x // cell, k % bins] += mag * (1 - frac)
            cells[y // cell, x // cell, (k + 1) % bins] += mag * frac
    out = []
    for i in range(ch - block + 1):
        for j in range(cw - block + 1):
            v = cells[i:i + block, j:j + block].reshape(-1)   # row-major cells, bins last
            v = v / math.sqrt((v ** 2).sum() + 1e-10)
            v = np.minimum(v, clip)
            out.append(v / math.sqrt((v ** 2).sum() + 1e-10))
    return np.concatenate(out)


def test_hog_equals_the_numpy_reference():
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:22, 0:29] / 6.0
    maps = np.stack([g.random((22, 29)),                          # noise: every orientation
                     np.exp(-((yy - 1.8) ** 2 + (xx - 2.5) ** 2)),  # a blob
                     np.sin(xx + 0.7 * yy) ** 2])                  # oblique stripes
    for cell, bins in ((4, 9), (5, 6)):
        got = hog(torch.tensor(maps), cell=cell, bins=bins).numpy()
        want = np.stack([np_hog(m, cell, bins) for m in maps])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    # the similarity is Pearson's r of the descriptors
    a, b = torch.tensor(maps[:2]), torch.tensor(maps[[2, 0]])
    da, db = (np.stack([np_hog(m, 4) for m in t.numpy()]) for t in (a, b))
    r = [np.corrcoef(p, q)[0, 1] for p, q in zip(da, db, strict=True)]
    np.testing.assert_allclose(hog_similarity(a, b, cell=4).numpy(), r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(6, 7), (3, 40)])
def test_small_maps_use_smaller_cells(size):
    """Maps under ``block`` cells of 8 px use cells of min(h, w) // block px."""
    img = np.random.default_rng(1).random(size)
    cell = min(size) // 2
    np.testing.assert_allclose(hog(torch.tensor(img)[None])[0].numpy(), np_hog(img, cell),
                               atol=1e-12, rtol=0)
