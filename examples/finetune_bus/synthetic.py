"""A synthetic breast-ultrasound data set, made in code (the offline default).

No data set can be downloaded on many machines, so the example generates
B-mode-like images that share the features radiologists (and, it turns out,
CNNs) use on BUSI:

* tissue: skin line, hypoechoic subcutaneous fat with fat lobules, brighter
  mottled fibroglandular tissue, striated pectoral muscle, wavy interfaces;
* physics: multiplicative, laterally elongated speckle (the magnitude of a
  smoothed complex Gaussian field, i.e. Rayleigh distributed), depth
  attenuation, log compression to 8 bits;
* malignant: a hypoechoic (dark), irregular and spiculated mass, *taller
  than wide*, often with an echogenic halo, and mostly (80 %) *posterior
  acoustic shadowing* (a dark band below the mass, following its columns);
* benign (``--include-benign``): an oval, smooth mass, *wider than tall*,
  hypoechoic or anechoic (cyst), with *posterior acoustic enhancement*;
* normal: the same tissue without a mass.  Fat lobules (dark ovals) and
  narrow refraction/Cooper's-ligament shadows occur in every class, so
  neither a dark blob nor a shadow alone gives the class away.

Every lesion comes with its binary mask (normal images: an empty mask), in
the pixel grid of the image, like BUSI's ``*_mask.png``.

Sample ``index`` of class ``kind`` depends only on ``(seed, kind, index,
size)``: the set is reproducible, and taking fewer images (``--limit``)
yields a subset of the full set.  One 224 x 224 image takes ~2-3 ms.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

#: Fixed per-class codes for the RNG stream (independent of class order).
KIND_CODES = {"normal": 0, "benign": 1, "malignant": 2}

#: Image counts of BUSI (Al-Dhabyani et al. 2020).
BUSI_COUNTS = {"normal": 133, "benign": 437, "malignant": 210}


@lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Smooth (Gaussian-kernel) interpolation weights from ``n_in`` control
    points to ``n_out`` pixels; rows sum to 1."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    w = np.exp(-(((pos[:, None] - np.arange(n_in)[None, :]) / 0.7) ** 2))
    w /= w.sum(1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int],
                  cells: tuple[int, int]) -> np.ndarray:
    """Band-limited noise, roughly in [-1, 1]: Gaussian control points on a
    coarse ``cells`` grid, interpolated smoothly (two small matrix products)."""
    coarse = rng.standard_normal((cells[0] + 2, cells[1] + 2)).astype(np.float32)
    # einsum, not matmul: tiny products are slower through a threaded BLAS
    # when the CPU is oversubscribed (DataLoader workers, shared machines)
    rows = np.einsum("ij,jk->ik", _interp_matrix(shape[0], cells[0] + 2), coarse)
    fine = np.einsum("ik,lk->il", rows, _interp_matrix(shape[1], cells[1] + 2))
    return fine * np.float32(1.6)


def _boundary(rng, x: np.ndarray, base: float, amp: float) -> np.ndarray:
    """A wavy horizontal tissue interface (depth as a function of x)."""
    f = rng.uniform(0.4, 1.6)
    phase = rng.uniform(0, 2 * np.pi)
    f2 = rng.uniform(2.0, 4.0)
    phase2 = rng.uniform(0, 2 * np.pi)
    return (base + amp * np.sin(2 * np.pi * f * x + phase)
            + 0.35 * amp * np.sin(2 * np.pi * f2 * x + phase2))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


def _lesion(rng, kind: str, H: int, W: int, top: np.ndarray, bottom: np.ndarray):
    """A malignant or benign mass.

    Returns ``(soft, mask, rel)``: a soft indicator in [0, 1] (float32), the
    binary mask, and the radius relative to the (irregular) border, all of
    shape (H, W); computed on a crop around the mass only."""
    cx = rng.uniform(0.28, 0.72) * W
    if kind == "malignant":
        a = rng.uniform(0.07, 0.13) * W            # half width
        b = a * rng.uniform(1.3, 1.75)             # half height: taller than wide
        n_harm, harm_amp = 6, 0.09
        n_spikes = int(rng.integers(5, 12))
    else:
        a = rng.uniform(0.09, 0.16) * W
        b = a / rng.uniform(1.4, 2.1)              # wider than tall
        n_harm, harm_amp = 3, 0.025
        n_spikes = 0
    # centre inside the glandular layer, leaving room for the mass
    col = int(np.clip(cx, 0, W - 1))
    lo = top[col] * H + b * 0.9
    hi = bottom[col] * H - b * 0.6
    cy = rng.uniform(lo, max(lo + 1.0, hi))

    # irregular border r(theta) in elliptical coordinates, tabulated once
    tg = np.linspace(-np.pi, np.pi, 2049)
    ks = np.arange(2, 2 + n_harm)[:, None]
    r_tab = 1.0 + (rng.uniform(0, harm_amp, (n_harm, 1))
                   * np.cos(ks * tg[None] + rng.uniform(0, 2 * np.pi, (n_harm, 1)))).sum(0)
    if n_spikes:  # spicules: narrow angular spikes
        st = rng.uniform(-np.pi, np.pi, (n_spikes, 1))
        sh = rng.uniform(0.2, 0.55, (n_spikes, 1))
        sw = rng.uniform(0.04, 0.10, (n_spikes, 1))
        d = np.mod(tg[None] - st + np.pi, 2 * np.pi) - np.pi
        r_tab = r_tab + (sh * np.exp(-np.square(d / sw))).sum(0)
    softness = 0.06 if kind == "malignant" else 0.03
    r_max = float(r_tab.max()) + 6 * softness

    for _ in range(8):  # stretch vertically until taller than wide (malignant)
        y0, y1 = max(0, int(cy - r_max * b) - 1), min(H, int(cy + r_max * b) + 2)
        x0, x1 = max(0, int(cx - r_max * a) - 1), min(W, int(cx + r_max * a) + 2)
        v = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / b
        u = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / a
        rho = np.sqrt(u * u + v * v)
        r = np.interp(np.arctan2(v, u), tg, r_tab).astype(np.float32)
        crop = rho < r
        if kind != "malignant":
            break
        rows = np.flatnonzero(crop.any(1))
        cols = np.flatnonzero(crop.any(0))
        if rows.size and cols.size and (rows[-1] - rows[0]) > 1.15 * (cols[-1] - cols[0]):
            break
        b *= 1.15
    soft = np.zeros((H, W), np.float32)
    mask = np.zeros((H, W), bool)
    rel = np.full((H, W), 10.0, np.float32)
    soft[y0:y1, x0:x1] = _sigmoid((r - rho) / softness)
    mask[y0:y1, x0:x1] = crop
    rel[y0:y1, x0:x1] = rho / np.maximum(r, 1e-3)
    return soft, mask, rel


def synthesize_bus_image(kind: str, index: int, seed: int = 0,
                         size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic ultrasound image and its lesion mask.

    Returns ``(image, mask)``: ``uint8`` arrays of shape ``(size, size)``;
    ``mask`` is 1 on the lesion, 0 elsewhere (all 0 for ``"normal"``).
    Deterministic in ``(kind, index, seed, size)``.
    """
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {sorted(KIND_CODES)}, got {kind!r}")
    if int(size) < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), KIND_CODES[kind], int(index)]))
    H = W = int(size)
    s = H / 224.0
    f32 = np.float32
    x = ((np.arange(W) + 0.5) / W).astype(f32)
    Y = ((np.arange(H) + 0.5) / H).astype(f32)[:, None]
    X = x[None, :]

    # --- tissue layers ------------------------------------------------------
    skin = _boundary(rng, x, rng.uniform(0.035, 0.06), 0.004).astype(f32)
    fat_end = _boundary(rng, x, rng.uniform(0.17, 0.28), 0.03).astype(f32)
    gland_end = _boundary(rng, x, rng.uniform(0.72, 0.84), 0.035).astype(f32)
    w_edge = 0.012
    in_skin = 1 - _sigmoid((Y - skin[None]) / (0.4 * w_edge))
    below_fat = _sigmoid((Y - fat_end[None]) / w_edge)
    below_gland = _sigmoid((Y - gland_end[None]) / w_edge)

    mottle = _smooth_noise(rng, (H, W), (int(rng.integers(6, 10)), int(rng.integers(3, 6))))
    streaks = _smooth_noise(rng, (H, W), (int(rng.integers(14, 22)), int(rng.integers(3, 5))))
    e_fat = 0.30 + 0.06 * mottle
    e_gland = 0.62 + 0.16 * mottle + 0.10 * streaks
    stri = np.sin(f32(2 * np.pi) * (Y * f32(rng.uniform(28, 40)) + X * f32(rng.uniform(-1.5, 1.5))))
    e_muscle = 0.42 + 0.10 * stri + 0.04 * mottle
    E = e_fat + (e_gland - e_fat) * below_fat
    E += (e_muscle - E) * below_gland
    E += (0.95 - E) * in_skin
    # bright interface lines (fascia) at the layer boundaries
    for bnd, amp in ((fat_end, 0.35), (gland_end, 0.45)):
        E += amp * np.exp(-np.square((Y - bnd[None]) / f32(0.006)))

    # fat lobules: small hypoechoic ovals in the fat layer (all classes)
    for _ in range(int(rng.integers(2, 6))):
        lx = rng.uniform(0.05, 0.95) * W
        col = int(np.clip(lx, 0, W - 1))
        ly = rng.uniform(skin[col] + 0.03, max(skin[col] + 0.04, fat_end[col] - 0.03)) * H
        la = rng.uniform(0.04, 0.09) * W
        lb = la * rng.uniform(0.3, 0.55)
        y0, y1 = max(0, int(ly - 2 * lb)), min(H, int(ly + 2 * lb) + 1)
        x0, x1 = max(0, int(lx - 2 * la)), min(W, int(lx + 2 * la) + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        d = (np.square((np.arange(x0, x1, dtype=f32)[None] - lx) / la)
             + np.square((np.arange(y0, y1, dtype=f32)[:, None] - ly) / lb))
        E[y0:y1, x0:x1] *= 1 - 0.45 * _sigmoid((1 - d) / f32(0.15))

    # refraction / Cooper's-ligament shadows: narrow dark columns without a
    # mass, in every class, so that shadowing alone does not give it away
    n_cols = int(rng.integers(1, 3)) if rng.random() < 0.4 else 0
    for _ in range(n_cols):
        xc, wc = rng.uniform(0.1, 0.9) * W, rng.uniform(0.012, 0.03) * W
        prof = np.exp(-np.square((np.arange(W, dtype=f32) - f32(xc)) / f32(wc)))[None]
        start = _sigmoid((Y - f32(rng.uniform(0.15, 0.45))) / f32(0.01))
        E *= 1 - f32(rng.uniform(0.3, 0.6)) * prof * start

    # --- lesion -------------------------------------------------------------
    mask = np.zeros((H, W), dtype=bool)
    if kind in ("malignant", "benign"):
        soft, mask, rel = _lesion(rng, kind, H, W, fat_end, gland_end)
        if kind == "malignant":
            inner = rng.uniform(0.06, 0.18) * (1 + 0.25 * _smooth_noise(rng, (H, W), (12, 12)))
            if rng.random() < 0.6:  # echogenic halo around the mass
                halo = rng.uniform(0.15, 0.4) * np.exp(-np.square((rel - f32(1.15)) / f32(0.18)))
                E *= 1 + halo * (1 - soft)
            # posterior shadowing, in most (not all) malignant masses
            post_strength = (
                -rng.uniform(0.35, 0.75) if rng.random() < 0.8 else -rng.uniform(0.0, 0.15)
            )
        else:
            cyst = rng.random() < 0.4
            inner = rng.uniform(0.02, 0.06) if cyst else rng.uniform(0.22, 0.4)
            post_strength = rng.uniform(0.25, 0.55)          # posterior enhancement
        E += (inner - E) * soft
        # posterior effect: every pixel below the mass, column by column
        below = np.maximum.accumulate(soft, axis=0) - soft
        below = ndimage.gaussian_filter1d(below, sigma=2.5 * s, axis=1)
        fade = np.exp(-np.cumsum(below, axis=0) / f32(1.2 * H))  # weakens with depth
        E *= 1 + f32(post_strength) * below * fade

    # --- physics: attenuation, speckle, log compression ----------------------
    alpha = rng.uniform(0.5, 1.2)
    E = np.maximum(E, f32(0.01)) * (np.exp(-alpha * Y) * (1 + rng.uniform(0.0, 0.25) * Y)).astype(
        f32
    )
    sig = (0.8 * s, 1.8 * s)  # axial, lateral speckle correlation (pixels)
    re = ndimage.gaussian_filter(rng.standard_normal((H, W), dtype=f32), sig)
    im = ndimage.gaussian_filter(rng.standard_normal((H, W), dtype=f32), sig)
    speckle = np.hypot(re, im)
    speckle /= speckle.mean()
    intensity = E * speckle + f32(0.01) * np.abs(rng.standard_normal((H, W), dtype=f32))
    g = f32(rng.uniform(15, 40))
    img = np.log1p(g * intensity) / np.log1p(g * f32(1.6))
    img = img * f32(rng.uniform(0.85, 1.05)) + f32(rng.uniform(-0.03, 0.03))
    img8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return img8, mask.astype(np.uint8)


@lru_cache(maxsize=2048)  # BUSI-sized set at 224^2: ~80 MB
def cached_bus_image(kind: str, index: int, seed: int = 0,
                     size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """:func:`synthesize_bus_image`, cached in memory (read-only arrays)."""
    img, mask = synthesize_bus_image(kind, index, seed, size)
    img.setflags(write=False)
    mask.setflags(write=False)
    return img, mask
