"""Integrated Grad-CAM, SISE and Ada-SISE (issue 5).

References written here, independently of camanim's capture: a plain numpy
Otsu on a histogram, autograd through forward hooks on a twin of the model
without in-place ReLUs, and the papers' formulas in a few numpy/torch lines.
Models are float64 (PRODUCT.md: equivalence on random weights is noisy in
float32).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import camanim
from camanim.errors import CAManimError
from camanim.methods.integrated_gradcam import baseline_images, ig_options, integrated_gradcam
from camanim.methods.otsu import histogram, otsu_binarize, otsu_split, otsu_threshold
from camanim.methods.sise import ada_sise, adaptive_channels, fuse, select_channels, sise
from helpers import TinyCNN, no_hooks


# ------------------------------------------------------------- references
def np_otsu_split(hist) -> int:
    """Plain Otsu on a histogram: first bin of the upper class (1..n-1)
    maximizing w0 * w1 * (mu0 - mu1)^2; an empty class scores 0; first on ties."""
    hist = np.asarray(hist, dtype=np.float64)
    i = np.arange(len(hist), dtype=np.float64)
    best, arg = -1.0, 1
    for j in range(1, len(hist)):
        w0, w1 = hist[:j].sum(), hist[j:].sum()
        var = 0.0
        if w0 > 0 and w1 > 0:
            u0 = (hist[:j] * i[:j]).sum() / w0
            u1 = (hist[j:] * i[j:]).sum() / w1
            var = w0 * w1 * (u0 - u1) ** 2
        if var > best:
            best, arg = var, j
    return arg


def np_binarize(v: np.ndarray, bins: int = 256, soft: bool = False) -> np.ndarray:
    hist, _ = np.histogram(v, bins=bins, range=(0.0, 1.0))
    j = np_otsu_split(hist)
    if soft:
        return 1.0 / (1.0 + np.exp(-100.0 * (v - j / bins)))
    return (np.minimum(np.floor(v * bins), bins - 1) >= j).astype(np.float64)


def np_minmax(e: np.ndarray) -> np.ndarray:
    return (e - e.min()) / (1e-7 + e.max() - e.min())


def twin(model):
    """The same function without in-place ops, so hooks see clean outputs."""
    t = copy.deepcopy(model)
    for m in t.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return t


def acts_grads(model, x, module_name, call, score):
    """Output of call ``call`` of ``module_name`` and d(sum score)/d(output)."""
    outs = []
    h = dict(model.named_modules())[module_name].register_forward_hook(
        lambda m, i, o: outs.append(o))
    try:
        logits = model(x.clone().requires_grad_(True))
    finally:
        h.remove()
    a = outs[call - 1]
    (g,) = torch.autograd.grad(score(logits).sum(), a)
    return a.detach(), g


def softmax_score(cls):
    return lambda logits: torch.softmax(logits, -1)[torch.arange(len(cls)), cls]


def logit_score(cls):
    return lambda logits: logits[torch.arange(len(cls)), cls]


@pytest.fixture(scope="module")
def resnet18_64():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).double().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    return model, x


# -------------------------------------------------------------------- Otsu
def test_otsu_split_equals_numpy_on_histograms():
    g = np.random.default_rng(0)
    hists = [g.integers(0, 50, 256) for _ in range(20)]
    hists += [np.where(g.random(256) < 0.8, 0, g.integers(1, 9, 256)) for _ in range(20)]
    two = np.zeros(256)
    two[[3, 200]] = [7, 2]                       # a gap: many tied splits
    one = np.zeros(256)
    one[40] = 5                                  # one occupied bin: no split
    hists += [two, one, np.zeros(256), g.integers(0, 5, 7)]
    got = [int(otsu_split(torch.as_tensor(h, dtype=torch.float64)[None])[0]) for h in hists]
    assert got == [np_otsu_split(h) for h in hists]
    batched = otsu_split(torch.tensor(np.stack(hists[:40]), dtype=torch.float64))
    assert batched.tolist() == got[:40]


def test_otsu_threshold_on_values_equals_numpy_histogram_otsu():
    g = np.random.default_rng(1)
    for _ in range(5):
        v = np.concatenate([g.beta(2, 8, 500), g.beta(8, 2, 300)])
        hist, _ = np.histogram(v, bins=256, range=(0.0, 1.0))
        assert torch.equal(histogram(torch.tensor(v)[None]),
                           torch.tensor(hist, dtype=torch.float64)[None])
        thr, split = otsu_threshold(torch.tensor(v)[None])
        j = np_otsu_split(hist)
        assert int(split[0]) == j and float(thr[0]) == pytest.approx(j / 256)
        hard = otsu_binarize(torch.tensor(v).view(1, -1))
        np.testing.assert_array_equal(hard[0].numpy(), np_binarize(v))


# ------------------------------------------------------------------ fusion
def test_fusion_follows_the_formula_on_hand_made_maps():
    g = np.random.default_rng(2)
    yy, xx = np.mgrid[0:12, 0:16] / 16.0
    blob = np.exp(-((yy - 0.4) ** 2 + (xx - 0.5) ** 2) * 8)
    maps = np.stack([
        np.stack([g.random((12, 16)), blob]),
        np.stack([blob * g.random((12, 16)), g.random((12, 16))]),
        np.stack([np.clip(blob + 0.1 * g.random((12, 16)), 0, 1), blob ** 2]),
    ])                                            # (L=3, B=2, H, W) in [0, 1]
    valid = np.array([[True, False], [True, True], [True, True]])
    for soft in (False, True):
        got = fuse(torch.tensor(maps), torch.tensor(valid), soft=soft).numpy()
        for b in range(2):
            layers = [maps[l, b] for l in range(3) if valid[l, b]]
            e = layers[0]
            for v in layers[1:]:
                e = (e + v) * np_binarize(v, soft=soft)
            np.testing.assert_allclose(got[b], np_minmax(e), atol=1e-12)
    # skipping image 1's first layer changes its result (the flag is used)
    all_valid = fuse(torch.tensor(maps)).numpy()
    assert not np.allclose(all_valid[1], fuse(torch.tensor(maps), torch.tensor(valid)).numpy()[1])
    with pytest.raises(CAManimError, match=r"min-max scaled to \[0, 1\]"):
        fuse(torch.tensor(maps) * 3)


# -------------------------------------------------------- channel selection
def test_channel_selection_rules():
    a = torch.tensor([[0.1, 0.5, -0.2, 0.4999, 0.0],
                      [-0.1, -0.3, -0.2, -0.5, 0.0]], dtype=torch.float64)
    assert select_channels(a, 0.0)[0].nonzero()[:, 0].tolist() == [0, 1, 3]
    assert select_channels(a, 0.5)[0].nonzero()[:, 0].tolist() == [1, 3]
    assert select_channels(a, 1.0)[0].nonzero()[:, 0].tolist() == [1]
    assert not select_channels(a, 0.0)[1].any() and not adaptive_channels(a)[1].any()
    # Ada-SISE: Otsu on the normalized positive gradients, against numpy
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(6, 300, generator=g, dtype=torch.float64) ** 3
    ada, sis = adaptive_channels(grads), select_channels(grads, 0.0)
    for row, keep in zip(grads.numpy(), ada.numpy(), strict=False):
        norm = row / row.max()
        hist, _ = np.histogram(norm[norm > 0], bins=256, range=(0.0, 1.0))
        j = np_otsu_split(hist)
        want = (norm > 0) & (np.minimum(np.floor(norm * 256), 255) >= j)
        np.testing.assert_array_equal(keep, want)
    assert bool((ada <= sis).all()) and int(ada.sum()) < int(sis.sum())


# --------------------------------------------------------------- SISE runs
def test_sise_mu1_keeps_only_the_strongest_channel(tiny, tiny_input):
    maps = sise(tiny, tiny_input, mu=1.0)
    assert maps.names == ["relu", "relu#3", "fused"]
    ref = twin(tiny)
    cls = tiny(tiny_input).argmax(-1)
    for l, (call, _info) in enumerate(((1, "relu"), (3, "relu#3"))):
        a, gr = acts_grads(ref, tiny_input, "relu", call, softmax_score(cls))
        mean = gr.mean(dim=(2, 3))
        for b in range(2):
            k = int(mean[b].argmax())
            assert maps.extra["channels"][l][b] == [k]
            m = F.interpolate(a[b, k][None, None], size=(16, 20), mode="bilinear",
                              align_corners=False)[0, 0]
            m = (m - m.min()) / (m.max() - m.min())
            v = maps.raw[l][b]
            torch.testing.assert_close(v / v.max(), m, atol=1e-9, rtol=0)
    assert maps.extra["n_masks"] == [2, 2, 4]


def test_ada_sise_keeps_a_subset_of_sise_channels(tiny, tiny_input):
    full, ada = sise(tiny, tiny_input, mu=0.0), ada_sise(tiny, tiny_input)
    fewer = False
    for l in range(len(full) - 1):
        for b in range(tiny_input.shape[0]):
            s, a = set(full.extra["channels"][l][b]), set(ada.extra["channels"][l][b])
            assert a <= s and len(a) >= 1
            fewer |= len(a) < len(s)
    assert fewer and ada.extra["n_masks"][-1] < full.extra["n_masks"][-1]
    # SISE mu=0 keeps exactly the positive-gradient, non-constant channels
    ref = twin(tiny)
    cls = tiny(tiny_input).argmax(-1)
    a, gr = acts_grads(ref, tiny_input, "relu", 3, softmax_score(cls))
    nonconst = a.flatten(2).amax(2) > a.flatten(2).amin(2)
    want = (gr.mean(dim=(2, 3)) > 0) & nonconst
    assert [w.nonzero()[:, 0].tolist() for w in want] == full.extra["channels"][1]


@pytest.mark.parametrize("method", ["sise", "ada-sise"])
def test_sise_is_exactly_repeatable_and_leaves_the_model_alone(tiny, tiny_input, method):
    tiny.train()
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    anim = camanim.CAManim(tiny, method, progress=False, batch_size=5)
    first, second = anim(tiny_input), anim(tiny_input)
    assert first.names == second.names
    assert all(torch.equal(p, q) for p, q in zip(first.raw, second.raw, strict=False))
    assert first.extra == second.extra
    assert all(m.training for m in tiny.modules()) and no_hooks(tiny)
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in state.items())
    # frames: non-negative, every V_l and the fused map at input size in [0, 1]
    for r in first.raw:
        assert r.shape == (2, 16, 20) and r.min() >= 0 and r.max() <= 1


def test_sise_batch_size_does_not_change_the_maps(tiny, tiny_input):
    one = camanim.CAManim(tiny, "sise", batch_size=1, progress=False)(tiny_input)
    many = camanim.CAManim(tiny, "sise", batch_size=64, progress=False)(tiny_input)
    for p, q in zip(one.raw, many.raw, strict=False):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=0)
    # and each image alone gives its own row
    alone = camanim.CAManim(tiny, "sise", progress=False)(tiny_input[1:])
    for p, q in zip(alone.raw, many.raw, strict=False):
        torch.testing.assert_close(p[0], q[1], atol=1e-9, rtol=0)


def test_resnet50_block_layers_and_their_3904_channels(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = camanim.CAManim(model, "sise", mu=1.0, progress=False)(x)   # default layers="conv"
    assert maps.names == ["relu", "layer1", "layer2", "layer3", "layer4", "fused"]
    assert maps.extra["n_channels"] == [64, 256, 512, 1024, 2048, 3904]
    assert maps.extra["n_masks"][:5] == [1, 1, 1, 1, 1] and maps.extra["n_masks"][5] == 5
    fused = maps.layers[-1]
    assert (fused.type, fused.layout, fused.output_shape) == ("SISEFusion", "nchw", (1, 1, 64, 64))
    assert maps.upsample("global").shape == (6, 1, 64, 64)
    back = camanim.LayerMaps.load(maps.save(tmp_path / "sise.npz"))
    assert back.names == maps.names and back.extra["channels"][-1] is None
    # an explicit selector is honoured
    two = camanim.CAManim(model, "sise", layers=["layer3", "layer4"], mu=1.0,
                          progress=False)(x)
    assert two.names == ["layer3", "layer4", "fused"]


# ------------------------------------------------------- Integrated Grad-CAM
def test_one_step_integrated_gradcam_equals_gradcam_on_every_layer(resnet18_64):
    model, x = resnet18_64
    grad = camanim.CAManim(model, "gradcam", layers="conv", progress=False)(x)
    ig = camanim.CAManim(model, "integrated-gradcam", layers="conv", steps=1,
                         subtract_baseline=False, progress=False)(x)
    assert ig.names == grad.names and len(ig) == 20
    for name, p, q in zip(ig.names, ig.raw, grad.raw, strict=False):
        assert p.shape == q.shape
        torch.testing.assert_close(p, q, atol=1e-10 * max(1.0, float(q.abs().max())), rtol=0,
                                   msg=name)


@pytest.mark.parametrize("path", ["paper", "authors"])
def test_integrated_gradcam_follows_the_path_integral(tiny, tiny_input, path):
    steps = 3
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    maps = camanim.CAManim(tiny, "integrated-gradcam", layers=["conv3", "relu#2"],
                           steps=steps, mean=mean, std=std, path=path, batch_size=4,
                           progress=False)(tiny_input)
    ref = twin(tiny)
    cls = tiny(tiny_input).argmax(-1)
    black = ((0 - torch.tensor(mean, dtype=torch.float64)) /
             torch.tensor(std, dtype=torch.float64)).view(1, 3, 1, 1).expand_as(tiny_input)
    if path == "authors":                   # their code: zeros in the normalized input space
        black = torch.zeros_like(tiny_input)
    js = range(1, steps + 1) if path == "paper" else range(steps)
    for l, (module, call) in enumerate((("relu", 2), ("conv3", 1))):
        a0, _ = acts_grads(ref, black, module, call, logit_score(cls))
        want = 0
        for j in js:
            alpha = j / steps
            a, gr = acts_grads(ref, alpha * tiny_input + (1 - alpha) * black, module, call,
                               logit_score(cls))
            diff = a - a0 if path == "paper" else a
            want = want + (gr.mean(dim=(2, 3), keepdim=True) * diff).sum(1).clamp_min(0)
        assert maps.names[l] == ("relu#2", "conv3")[l]
        torch.testing.assert_close(maps.raw[l], want, atol=1e-10, rtol=1e-9)
    assert maps.extra["steps"] == [steps, steps]


def test_integrated_gradcam_plain_function_and_baselines(tiny, tiny_input):
    maps = integrated_gradcam(tiny, tiny_input, steps=4)
    assert maps.names == ["relu#3"] and maps.final.shape == (2, 16, 20)
    # a tensor baseline equal to the black image gives the same maps
    black = baseline_images(tiny_input, ig_options({}))
    np.testing.assert_allclose(black[0, :, 0, 0].numpy(),
                               -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]))
    same = integrated_gradcam(tiny, tiny_input, steps=4, baseline=black[0])
    torch.testing.assert_close(same.raw[0], maps.raw[0], atol=0, rtol=0)
    per_image = integrated_gradcam(tiny, tiny_input, steps=4, baseline=black.expand(2, -1, -1, -1))
    torch.testing.assert_close(per_image.raw[0], maps.raw[0], atol=1e-12, rtol=0)
    other = integrated_gradcam(tiny, tiny_input, steps=4, baseline=torch.zeros(3, 1, 1))
    assert not torch.allclose(other.raw[0], maps.raw[0])


def test_authors_path_starts_from_zeros_in_the_normalized_input_space(tiny, tiny_input):
    """path="authors" integrates from x' = 0 (the tensor the model is fed),
    as smstrzd/IntegratedGradCAM's utils.integrated_gradcam does; the black
    image, (0 - mean) / std, is the paper path's baseline."""
    a = integrated_gradcam(tiny, tiny_input, steps=3, path="authors")
    b = integrated_gradcam(tiny, tiny_input, steps=3, path="authors",
                           mean=(0.5, 0.5, 0.5), std=(0.1, 0.2, 0.3))
    zeros = integrated_gradcam(tiny, tiny_input, steps=3, path="authors",
                               baseline=torch.zeros(3, 1, 1))
    assert torch.equal(a.raw[0], b.raw[0]) and torch.equal(a.raw[0], zeros.raw[0])
    named = integrated_gradcam(tiny, tiny_input, steps=3, path="authors", baseline="zeros")
    assert torch.equal(a.raw[0], named.raw[0])
    # the paper path's black baseline follows mean / std; an explicit one is honoured
    p1 = integrated_gradcam(tiny, tiny_input, steps=3)
    p2 = integrated_gradcam(tiny, tiny_input, steps=3, mean=(0.5, 0.5, 0.5), std=(0.1, 0.2, 0.3))
    assert not torch.allclose(p1.raw[0], p2.raw[0])
    black = integrated_gradcam(tiny, tiny_input, steps=3, path="authors", baseline="black")
    assert not torch.allclose(black.raw[0], a.raw[0])
    # by hand: alpha_j = j / 3, j = 0..2, from zeros, A(x') = 0
    ref = twin(tiny)
    cls = tiny(tiny_input).argmax(-1)
    want = 0
    for j in range(3):
        act, gr = acts_grads(ref, (j / 3) * tiny_input, "relu", 3, logit_score(cls))
        want = want + (gr.mean(dim=(2, 3), keepdim=True) * act).sum(1).clamp_min(0)
    torch.testing.assert_close(a.raw[0], want, atol=1e-10, rtol=1e-9)


def test_mask_area_sums_in_float32():
    """Checks the sum function directly: a float16 sum of a 256 x 256 mask of
    ones is inf (past float16's 65504); SISE's area must be 65536."""
    ones = torch.ones(2, 256, 256, dtype=torch.float16)
    assert torch.isinf(ones.flatten(1).sum(1)).all()        # what float16 would give
    from camanim.methods.sise import mask_areas
    area = mask_areas(ones)
    assert area.dtype == torch.float32 and area.tolist() == [65536.0, 65536.0]


def test_sise_float16_model_at_256_matches_its_float32_copy():
    """A float16 model (CPU float16 convolutions) explained at 256 x 256.

    Per-layer maps V_l within 0.02 of the float32 model's (stated tolerance:
    float16 activations, maps min-max scaled to [0, 1]). The fused map is
    not compared: Otsu's binarization flips pixels whose value sits on a bin
    edge, so a tiny shift there moves whole regions. Without float32 masks,
    areas and sums, float16 score / area ratios (~1e-5) fall into float16's
    subnormal range and the first layer's map is off by ~0.6."""
    torch.manual_seed(0)
    m32 = TinyCNN().eval()
    m16 = copy.deepcopy(m32).half()
    x = torch.randn(1, 3, 256, 256)
    ref = sise(m32, x, targets=[2])
    got = sise(m16, x.half(), targets=[2])
    assert got.names == ref.names and all(r.dtype == torch.float32 for r in got.raw)
    assert got.extra["channels"][:-1] == ref.extra["channels"][:-1]
    for name, p, q in zip(got.names[:-1], got.raw[:-1], ref.raw[:-1], strict=False):
        assert float(q.max()) > 0.99, name                  # a real map, not all zero
        assert float((p - q).abs().max()) < 0.02, name
    assert float(got.final.max()) > 0.99


def test_plain_sise_functions_give_the_fused_final_map(tiny, tiny_input):
    maps = ada_sise(tiny, tiny_input, fusion="soft", mask_norm="pixel")
    assert maps.final.shape == (2, 16, 20)
    torch.testing.assert_close(maps.final, maps.raw[-1], atol=1e-6, rtol=0)
    assert maps.method == "ada-sise"
    assert maps.targets.tolist() == tiny(tiny_input).argmax(-1).tolist()


@pytest.mark.parametrize("method", ["integrated-gradcam", "sise", "ada-sise"])
def test_methods_work_under_inference_mode(tiny, tiny_input, method):
    """Lightning validates under inference_mode: the methods still get gradients."""
    opts = {"steps": 2} if method == "integrated-gradcam" else {}
    want = camanim.CAManim(tiny, method, progress=False, **opts)(tiny_input)
    with torch.inference_mode():
        got = camanim.CAManim(tiny, method, progress=False, **opts)(tiny_input)
    assert not any(r.is_inference() for r in got.raw)
    assert all(torch.equal(p, q) for p, q in zip(got.raw, want.raw, strict=False))


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("method,options,match", [
    ("sise", {"mu": -0.1}, r"mu must be in \[0, 1\]"),
    ("sise", {"mu": 1.5}, r"mu must be in \[0, 1\]"),
    ("sise", {"mu": "high"}, "mu must be a number"),
    ("sise", {"score": "probability"}, "score='probability' is not one of"),
    ("sise", {"mask_norm": "mean"}, "mask_norm='mean' is not one of"),
    ("sise", {"fusion": "otsu"}, "fusion='otsu' is not one of"),
    ("sise", {"temperature": 0}, "temperature must be a positive number"),
    ("sise", {"bins": 1}, "bins must be an int >= 2"),
    ("sise", {"steps": 5}, "steps= belongs to method='integrated-gradcam'"),
    ("ada-sise", {"mu": 0.3}, "unknown option.* mu for method 'ada-sise'"),
    ("integrated-gradcam", {"steps": 0}, "steps must be an int >= 1"),
    ("integrated-gradcam", {"steps": 2.5}, "steps must be an int >= 1"),
    ("integrated-gradcam", {"path": "left"}, "path must be 'paper'"),
    ("integrated-gradcam", {"baseline": "white"}, "baseline must be None"),
    ("integrated-gradcam", {"baseline": torch.zeros(4, 5, 5)},
     r"baseline of shape \(4, 5, 5\) does not fit"),
    ("integrated-gradcam", {"mean": (0.5, 0.5)}, "mean has 2 values"),
    ("integrated-gradcam", {"std": (0, 1, 1)}, "std must be positive"),
    ("integrated-gradcam", {"subtract_baseline": "yes"}, "subtract_baseline must be"),
    ("integrated-gradcam", {"mu": 0.5}, "unknown option.* mu for method 'integrated-gradcam'"),
])
def test_bad_options_raise_camanim_error(tiny, tiny_input, method, options, match):
    with pytest.raises(CAManimError, match=match):
        camanim.CAManim(tiny, method, progress=False, **options)(tiny_input)
