"""ybROAD against pytorch-grad-cam's ROADCombined run once per layer.

Reference: ``pytorch_grad_cam.metrics.road.ROADCombined(percentiles)`` with
its imputer's noise forced to 0 (``ROADCombined`` builds
``NoisyLinearImputer()`` with the default noise 0.01; the `reference`
fixture replaces the module's class by one whose default noise is 0).

Two quirks of the reference shape these tests:
* ``NoisyLinearImputer`` fails on float64 images (it writes its float32
  solution into a float64 copy), so the reference gets float32 images and a
  wrapper that casts them to float64 in front of the same float64 model; we
  get the float64 model and the same images.
* it rounds the imputed pixels and the scores to float32. With softmax
  scores below 1 that leaves differences of ~1e-7, so 1e-5 is an honest
  tolerance (the issue allows 1e-4).
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics import road as ref_road
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from torch import nn

import camanim
from camanim import CAManimError
from camanim.core.layers import LayerInfo
from camanim.core.maps import LayerMaps
from camanim.metrics.road import YbRoad, ybroad
from helpers import TinyCNN

PS = (20, 40, 60, 80)


class NoiselessImputer(ref_road.NoisyLinearImputer):
    def __init__(self, noise: float = 0.0, weighting=ref_road.neighbors_weights):
        super().__init__(noise=0.0, weighting=weighting)


@pytest.fixture
def reference(monkeypatch):
    """ROADCombined per layer with noise 0: ``(L, B)`` scores."""
    monkeypatch.setattr(ref_road, "NoisyLinearImputer", NoiselessImputer)

    def run(model, images, cams, targets, percentiles=PS):
        wrapped = nn.Sequential(ToDouble(), model)
        return np.stack(
            [
                ref_road.ROADCombined(list(percentiles))(images.float(), c, targets, wrapped)
                for c in cams
            ]
        )
    return run


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def sharp_model(seed=0, classes=5):
    """TinyCNN in float64 whose logits are large enough that perturbations
    move the softmax visibly (random init gives near-uniform outputs)."""
    torch.manual_seed(seed)
    model = TinyCNN(classes=classes).double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(40.0)
    return model


def hand_maps(b, h, w, sizes=((6, 10), (3, 5), (12, 20)), seed=0, dtype=torch.float64):
    """LayerMaps built by hand: ReLU'd raw maps with flat zero regions."""
    g = torch.Generator().manual_seed(seed)
    raw = [torch.relu(torch.randn(b, *s, generator=g, dtype=dtype)) for s in sizes]
    layers = [LayerInfo(name=f"l{i}", module_name=f"l{i}", call=1, order=i, type="Conv2d",
                        output_shape=(b, 4) + tuple(s), params=0, params_total=0, depth=0,
                        layout="nchw") for i, s in enumerate(sizes)]
    return LayerMaps(
        names=[f"l{i}" for i in range(len(sizes))], raw=raw, input_size=(h, w), layers=layers
    )


def images(b=2, h=24, w=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)       # float32 values, exact in float64


# ---------------------------------------------------------------- equivalence

def test_equals_roadcombined_per_layer_softmax(reference):
    """Non-square images, two images with different targets, hand-made maps."""
    model, x = sharp_model(), images()
    maps = hand_maps(2, 24, 40)
    res = ybroad(model, x, maps, targets=[1, 3], noise=0.0, progress=False)
    cams = maps.upsample("local").numpy()
    ref = reference(
        model, x, cams, [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(3)]
    )
    assert res.scores.shape == (3, 2) and res.names == maps.names
    assert np.abs(res.scores).max() > 1e-3          # the comparison is not between zeros
    assert np.abs(res.scores - ref).max() < 1e-5
    assert res.targets == [1, 3] and res.score == "softmax"


def test_equals_roadcombined_on_camanim_gradcam_maps(reference):
    """Maps from the engine (every Conv2d, GradCAM), targets from the maps."""
    model, x = sharp_model(seed=2), images(b=2, h=32, w=32, seed=3)
    maps = camanim.CAManim(model, "gradcam", layers="conv", progress=False)(x, [0, 4])
    res = ybroad(model, x, maps, noise=0.0, percentiles=(10, 50, 90), progress=False)
    assert res.targets == [0, 4]
    cams = maps.upsample("local").numpy()
    ref = reference(
        model,
        x,
        cams,
        [ClassifierOutputSoftmaxTarget(0), ClassifierOutputSoftmaxTarget(4)],
        percentiles=(10, 50, 90),
    )
    assert res.scores.shape == (len(maps), 2)
    assert np.abs(res.scores).max() > 1e-3
    assert np.abs(res.scores - ref).max() < 1e-5


def test_equals_roadcombined_logit_and_callables(reference):
    """score='logit' is ClassifierOutputTarget; callables are used as given."""
    model, x = sharp_model(seed=4), images(seed=5)
    maps = hand_maps(2, 24, 40, seed=6)
    cams = maps.upsample("local").numpy()
    res = ybroad(model, x, maps, targets=[2, 2], noise=0.0, score="logit", progress=False)
    ref = reference(model, x, cams, [ClassifierOutputTarget(2), ClassifierOutputTarget(2)])
    scale = max(1.0, float(np.abs(ref).max()))
    assert res.score == "logit"
    assert np.abs(res.scores - ref).max() < 1e-5 * scale
    calls = [ClassifierOutputSoftmaxTarget(0), ClassifierOutputSoftmaxTarget(3)]
    res_c = ybroad(model, x, maps, targets=calls, noise=0.0, progress=False)
    res_i = ybroad(model, x, maps, targets=[0, 3], noise=0.0, progress=False)
    assert res_c.score == "callable" and res_c.targets == [0, 3]
    assert np.array_equal(res_c.scores, res_i.scores)


def test_default_targets_maps_then_prediction():
    """LayerMaps: their targets; maps of class-less callables (targets None)
    need targets= (else ybROAD could score another class than the maps
    explain); an array of maps: the predicted class."""
    model, x = sharp_model(), images()
    maps = hand_maps(2, 24, 40)
    assert maps.targets is None
    with pytest.raises(CAManimError, match="targets="):
        ybroad(model, x, maps, noise=0.0, progress=False)
    pred = model(x.double()).argmax(1).tolist()
    assert ybroad(model, x, maps.upsample("local"), noise=0.0, progress=False).targets == pred
    other = [(p + 1) % 5 for p in pred]
    maps.targets = torch.tensor(other)
    assert ybroad(model, x, maps, noise=0.0, progress=False).targets == other
    assert ybroad(model, x, maps, targets=[4, 4], noise=0.0, progress=False).targets == [4, 4]
    assert ybroad(model, x, maps, targets=np.array([2, 0]), noise=0.0, progress=False).targets == [
        2,
        0,
    ]
    assert ybroad(model, x, maps, targets=3, noise=0.0, progress=False).targets == [3, 3]


def test_maps_of_classless_callables_need_targets():
    """CAManim with a callable that has no .category gives maps.targets None;
    ybroad then raises unless the callables are passed again."""
    model, x = sharp_model(seed=3), images(b=2, h=16, w=16, seed=4)

    def second_logit(output):
        return output[..., 2]

    maps = camanim.CAManim(model, "gradcam", layers="conv", progress=False)(x, [second_logit] * 2)
    assert maps.targets is None
    with pytest.raises(CAManimError, match=r"maps.targets is None.*targets="):
        ybroad(model, x, maps, progress=False)
    res = ybroad(model, x, maps, targets=[second_logit] * 2, noise=0.0, progress=False)
    assert res.score == "callable" and res.targets == [None, None]
    logit = ybroad(model, x, maps, targets=[2, 2], score="logit", noise=0.0, progress=False)
    assert np.allclose(res.scores, logit.scores, atol=1e-12)


def test_percentile_is_the_share_kept_per_percentile_against_reference(monkeypatch):
    """Non-symmetric percentiles (10, 30, 50): morf[..., j] / lerf[..., j]
    equal ROADMostRelevantFirst(p_j) / ROADLeastRelevantFirst(p_j), which
    keep p_j percent of the pixels. (With a symmetric set, labels reversed
    as "removal percentiles" would still give the right combined score.)"""
    monkeypatch.setattr(ref_road, "NoisyLinearImputer", NoiselessImputer)
    model, x = sharp_model(seed=5), images(seed=6)
    maps = hand_maps(2, 24, 40, seed=7)
    ps = (10, 30, 50)
    res = ybroad(model, x, maps, targets=[1, 2], percentiles=ps, noise=0.0, progress=False)
    assert res.removed_percent == (90, 70, 50)
    assert (
        res.to_dict()["percentile_convention"]
        == "kept"
        == camanim.metrics.road.PERCENTILE_CONVENTION
    )
    wrapped = nn.Sequential(ToDouble(), model)
    calls = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(2)]
    cams = maps.upsample("local").numpy()
    checked = 0
    for layer, cam in enumerate(cams):
        for j, p in enumerate(ps):
            morf = ref_road.ROADMostRelevantFirst(p)(x.float(), cam, calls, wrapped)
            lerf = ref_road.ROADLeastRelevantFirst(p)(x.float(), cam, calls, wrapped)
            assert np.abs(res.morf[0, layer, :, j] - morf).max() < 1e-5
            assert np.abs(res.lerf[0, layer, :, j] - lerf).max() < 1e-5
            checked += 1
    # the labels matter: the extreme percentiles' score changes differ
    assert np.abs(res.morf[0, :, :, 0] - res.morf[0, :, :, 2]).max() > 1e-3
    assert checked == 9


def test_logits_reuse_skips_the_clean_forward():
    model, x = sharp_model(), images()
    maps = hand_maps(2, 24, 40)
    rows = []
    handle = model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        plain = ybroad(model, x, maps, targets=[1, 3], noise=0.0, progress=False)
        n_plain = sum(rows)
        rows.clear()
        with torch.no_grad():
            logits = model(x.double())
        rows.clear()
        reused = ybroad(model, x, maps, targets=[1, 3], noise=0.0, progress=False, logits=logits)
    finally:
        handle.remove()
    assert sum(rows) == n_plain - 2 == 3 * 2 * 4 * 2     # layers x MoRF/LeRF x percentiles x images
    assert np.allclose(plain.scores, reused.scores, atol=1e-12, rtol=0)
    assert np.array_equal(plain.clean, reused.clean)
    for bad, match in [(logits[:1], "2 images"), (logits.numpy(), "tensor"),
                       (logits.masked_fill(logits > 0, float("nan")), "NaN")]:
        with pytest.raises(CAManimError, match=match):
            ybroad(model, x, maps, targets=[1, 3], progress=False, logits=bad)


def test_array_maps_and_clean_scores():
    """An (L, B, H, W) array is used as the maps; morf/lerf hold the score
    changes and road is their combination."""
    model, x = sharp_model(), images()
    cams = hand_maps(2, 24, 40).upsample("local")
    res = ybroad(model, x, cams, targets=[1, 3], noise=0.0, progress=False)
    assert res.names == ["0", "1", "2"]
    probs = torch.softmax(model(x.double()), 1)
    assert np.allclose(res.clean, [probs[0, 1].item(), probs[1, 3].item()], atol=1e-12)
    assert res.morf.shape == (1, 3, 2, 4)
    assert np.allclose(res.scores, ((res.lerf - res.morf) / 2).mean(-1)[0], atol=1e-15)
    one = ybroad(model, x, cams[1].numpy(), targets=[1, 3], noise=0.0, progress=False)
    assert np.allclose(one.scores[0], res.scores[1], atol=1e-12)


# ------------------------------------------------------- noise, state, batching

def test_noise_reproducible_seeded_and_side_effect_free():
    model, x = sharp_model(), images()
    model.bn1.train()                                   # a mixed-mode model
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    grad = model.conv1.weight.grad.clone()
    modes = {n: m.training for n, m in model.named_modules()}
    model.conv3.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    stats = model.bn1.running_mean.clone()
    maps = hand_maps(2, 24, 40)
    rng = torch.get_rng_state()
    a = ybroad(model, x, maps, targets=[1, 3], noise=0.01, seed=0, progress=False)
    b = ybroad(model, x, maps, targets=[1, 3], noise=0.01, seed=0, progress=False)
    c = ybroad(model, x, maps, targets=[1, 3], noise=0.01, seed=1, progress=False)
    z = ybroad(model, x, maps, targets=[1, 3], noise=0.0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert np.array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)
    assert not np.array_equal(a.scores, z.scores)
    assert np.abs(a.scores - z.scores).max() < 0.1     # noise 0.01 perturbs, not dominates
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.conv1.weight.grad, grad)
    assert model.conv2.weight.grad is None
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.bn1.running_mean, stats)      # bn1 was in train mode


def test_scores_do_not_depend_on_batch_size():
    """Forward batches and the noise stream are independent of batch_size."""
    model, x = sharp_model(), images(b=3, seed=9)
    maps = hand_maps(3, 24, 40, seed=2)
    a = ybroad(model, x, maps, targets=[0, 1, 2], noise=0.02, seed=3, progress=False)
    b = ybroad(model, x, maps, targets=[0, 1, 2], noise=0.02, seed=3, batch_size=5, progress=False)
    assert np.allclose(a.scores, b.scores, atol=1e-12, rtol=0)


def test_scores_do_not_depend_on_how_layers_are_grouped(monkeypatch):
    """Layers are imputed together up to the solver's memory budget; the
    grouping (one layer, two, all) changes neither numbers nor noise."""
    model, x = sharp_model(), images(b=2, seed=9)
    maps = hand_maps(2, 24, 40, sizes=((6, 10), (3, 5), (12, 20), (4, 4)), seed=2)
    results = []
    for per_solve in (1, 2 * 4 * 2 * 2, 10 ** 6):        # masks: one layer's 16, two layers, all
        monkeypatch.setattr(camanim.metrics.road, "masks_per_solve", lambda *a, n=per_solve, **k: n)
        res = ybroad(model, x, maps, targets=[0, 1], noise=0.02, seed=3, trials=2, progress=False)
        results.append(res)
    assert [r.extra["layers_per_solve"] for r in results] == [1, 2, 4]
    for r in results[1:]:
        assert np.allclose(r.trials, results[0].trials, atol=1e-12, rtol=0)


def test_memory_probe_is_a_difference_and_leaves_peak_statistics_alone(monkeypatch):
    """The device path of the batch-size choice, run on the CPU with a fake
    allocation counter: batch size = a third of the free bytes over one
    image's extra bytes; its forward doubles as the first clean forward; no
    hook is left behind and the CUDA peak statistics are never reset."""
    from helpers import no_hooks

    model, x = sharp_model(), images(b=3, seed=4)
    maps = hand_maps(3, 24, 40)
    counter = [0]

    def allocated():
        counter[0] += 1000                  # every module "allocates" 1000 bytes
        return counter[0]

    def forbidden(*a, **k):
        raise AssertionError("the user's CUDA peak-memory statistics must stay")

    n_modules = len(list(model.modules()))
    monkeypatch.setattr(
        camanim.metrics.road,
        "_device_memory",
        lambda device: (allocated, 3 * 1000 * 5 * (n_modules + 1)),
    )
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", forbidden)
    monkeypatch.setattr(torch.cuda, "reset_max_memory_allocated", forbidden)
    rows = []
    handle = model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        res = ybroad(model, x, maps, targets=[0, 1, 2], noise=0.0, progress=False)
    finally:
        handle.remove()
    assert no_hooks(model)
    assert 1 <= res.extra["batch_size"] <= 5
    assert rows[:2] == [1, 2]                 # probe image, then the rest of the clean batch
    assert sum(rows) == 3 + 3 * 2 * 4 * 3
    ref = ybroad(model, x, maps, targets=[0, 1, 2], noise=0.0, progress=False,
                 batch_size=res.extra["batch_size"])
    monkeypatch.undo()
    assert np.allclose(res.scores, ref.scores, atol=1e-12, rtol=0)


def test_trials_mean_std_and_seeds():
    """Trial k is the single run with seed + k; scores and std are their
    mean and spread."""
    model, x = sharp_model(), images()
    maps = hand_maps(2, 24, 40)
    res = ybroad(model, x, maps, targets=[1, 3], noise=0.05, seed=5, trials=3, progress=False)
    assert res.trials.shape == (3, 3, 2) and res.n_trials == 3
    one = ybroad(model, x, maps, targets=[1, 3], noise=0.05, seed=6, progress=False)
    assert np.allclose(res.trials[1], one.scores, atol=1e-12)
    assert np.allclose(res.scores, res.trials.mean(0))
    assert np.allclose(res.std, res.trials.std(0, ddof=1))
    assert (res.std > 0).all()
    still = ybroad(model, x, maps, targets=[1, 3], noise=0.0, trials=2, progress=False)
    assert still.trials.shape == (2, 3, 2) and (still.std == 0).all()


# ---------------------------------------------------------------- results API

def synthetic(scores, trials=None, names=None):
    scores = np.asarray(scores, dtype=float)
    t = np.asarray(trials, dtype=float) if trials is not None else scores[None]
    L, B = scores.shape
    z = np.zeros(t.shape + (4,))
    return YbRoad(scores=scores, names=names or [f"layer{i}" for i in range(L)],
                  targets=list(range(B)), percentiles=PS,
                  std=t.std(0, ddof=1) if t.shape[0] > 1 else np.zeros((L, B)),
                  trials=t, morf=z, lerf=z, clean=np.zeros(B))


def test_summary_fails_and_smoothed():
    s = np.array([[0.01, 0.2], [-0.02, 0.5], [0.03, 0.1], [0.0, 0.3]])
    res = synthetic(s)
    summ = res.summary()
    assert [d.best_index for d in summ] == [2, 1]
    assert summ[1].best_layer == "layer1" and summ[1].max == 0.5 and summ[1].final == 0.3
    assert math.isclose(summ[1].max_minus_final, 0.2) and math.isclose(summ[0].mean, 0.005)
    assert [d.fails for d in summ] == [True, False]
    assert list(res.fails(0.001)) == [False, False] and list(res.fails(1.0)) == [True, True]
    json.dumps([d.to_dict() for d in summ])
    assert np.array_equal(res.smoothed(1), s)
    sm = res.smoothed(3)
    assert np.allclose(sm[1:-1], (s[:-2] + s[1:-1] + s[2:]) / 3)
    assert np.allclose(sm[0], s[:2].mean(0)) and np.allclose(sm[-1], s[-2:].mean(0))
    with pytest.raises(CAManimError, match="window"):
        res.smoothed(0)


def test_csv_json_and_plot_files(tmp_path):
    rng = np.random.default_rng(0)
    trials = rng.normal(0.2, 0.05, size=(3, 6, 2))
    res = synthetic(trials.mean(0), trials)
    path = res.to_csv(tmp_path / "road.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 12
    assert list(rows[0])[:5] == ["image", "target", "layer_index", "layer_name", "road"]
    for r in rows:
        i, b = int(r["layer_index"]), int(r["image"])
        assert float(r["road"]) == res.scores[i, b]
        assert float(r["road_std"]) == res.std[i, b]
        assert float(r["road_trial2"]) == trials[2, i, b]
        assert r["layer_name"] == res.names[i] and int(r["target"]) == b
    single = synthetic(trials[0]).to_csv(tmp_path / "one.csv")
    assert list(csv.DictReader(open(single)))[0].keys() == {"image", "target", "layer_index",
                                                            "layer_name", "road"}
    data = json.loads(res.to_json(tmp_path / "road.json"))
    assert data["scores"] == res.scores.tolist() and len(data["summary"]) == 2
    assert json.loads((tmp_path / "road.json").read_text()) == data
    png = res.plot(tmp_path / "road.png", smooth=3)
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    png1 = res.plot(tmp_path / "one.png", images=[1])
    assert png1.stat().st_size > 2000
    with pytest.raises(CAManimError, match="images"):
        res.plot(tmp_path / "bad.png", images=[5])


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(percentiles=()), "empty"),
    (dict(percentiles=(20, 120)), "outside"),
    (dict(percentiles=("a",)), "numbers"),
    (dict(percentiles=(True,)), "numbers"),
    (dict(score="prob"), "unknown score"),
    (dict(trials=0), "trials"),
    (dict(noise=-0.1), "noise"),
    (dict(noise=float("nan")), "noise"),
    (dict(seed=1.5), "seed"),
    (dict(batch_size=0), "batch_size"),
    (dict(targets=[1]), "targets"),
    (dict(targets=[9, 9]), "out of range"),
])
def test_bad_arguments(kwargs, match):
    model, x = sharp_model(), images()
    maps = hand_maps(2, 24, 40)
    with pytest.raises(CAManimError, match=match):
        ybroad(model, x, maps, progress=False, **kwargs)


def test_maps_must_match_images():
    model, x = sharp_model(), images()
    with pytest.raises(CAManimError, match="2 images"):
        ybroad(model, x[:1], hand_maps(2, 24, 40), progress=False)
    with pytest.raises(CAManimError, match="24x40"):
        ybroad(model, images(h=24, w=32), hand_maps(2, 24, 40), progress=False)
    with pytest.raises(CAManimError, match=r"\(L, B, H, W\)"):
        ybroad(model, x, torch.rand(3, 2, 24, 41), progress=False)
    with pytest.raises(CAManimError, match="LayerMaps"):
        ybroad(model, x, [1, 2, 3], progress=False)
    bad = torch.rand(1, 2, 24, 40)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CAManimError, match="NaN"):
        ybroad(model, x, bad, progress=False)
    with pytest.raises(CAManimError, match="channels"):
        ybroad(model, x[:, :1], hand_maps(2, 24, 40), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, x = sharp_model(), images()
    maps = hand_maps(2, 24, 40)
    cpu = ybroad(model, x, maps, targets=[1, 3], noise=0.0, progress=False)
    gpu = ybroad(model.cuda(), x.cuda(), maps, targets=[1, 3], noise=0.0, progress=False)
    assert np.abs(cpu.scores - gpu.scores).max() < 1e-5
    a = ybroad(model, x.cuda(), maps, targets=[1, 3], noise=0.01, seed=0, progress=False)
    b = ybroad(model, x.cuda(), maps, targets=[1, 3], noise=0.01, seed=0, progress=False)
    assert np.array_equal(a.scores, b.scores)


def test_bfloat16_model_against_its_float32_copy():
    """A bf16 model runs in bf16; imputation, noise and scores stay float32.
    Its float32 copy (same, bf16-representable weights) differs only by the
    rounding of activations: bf16 keeps 8 significant bits (~0.4% per op).
    Measured: scores move by ~2e-3 and ROAD (up to ~0.04 here) by ~5e-4;
    the stated tolerance is 5e-3 on both, and ROAD keeps its sign where it
    is clearly away from 0."""
    torch.manual_seed(0)
    m16 = TinyCNN(classes=5).eval()
    with torch.no_grad():
        m16.fc.weight.mul_(100.0)
    m16 = m16.bfloat16()
    m32 = TinyCNN(classes=5).eval()
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    x = 2.0 * images(b=2, h=24, w=32, seed=8)       # |x| up to ~7: bf16 steps up to 0.03
    maps = hand_maps(2, 24, 32, seed=8, dtype=torch.float32)
    kw = dict(targets=[1, 3], noise=0.01, seed=0, trials=2, progress=False)
    r16 = ybroad(m16, x, maps, **kw)
    r32 = ybroad(m32, x, maps, **kw)
    assert r16.scores.dtype == np.float64 and np.isfinite(r16.scores).all()
    assert np.abs(r32.scores).max() > 0.02             # a real signal to compare
    assert np.abs(r16.scores - r32.scores).max() < 5e-3
    clear = np.abs(r32.scores) > 0.01
    assert clear.any() and (np.sign(r16.scores[clear]) == np.sign(r32.scores[clear])).all()
    assert np.abs(r16.clean - r32.clean).max() < 5e-3
    # the noise reaches the bf16 model: noise 0.01 changes its scores
    r16_0 = ybroad(m16, x, maps, **{**kw, "noise": 0.0})
    assert not np.array_equal(r16_0.scores, r16.scores)


def test_single_output_model_with_softmax_score_is_a_clear_error():
    from torch import nn

    import camanim
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 1)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    maps = camanim.CAManim(model, "gradcam", "conv")(x, targets=[0, 0])
    with pytest.raises(camanim.CAManimError, match="single output.*score='logit'"):
        camanim.ybroad(model, x, maps, progress=False)
    res = camanim.ybroad(model, x, maps, score="logit", noise=0.0, progress=False)
    assert np.isfinite(res.scores).all()


def test_maps_logits_are_used_without_being_passed():
    """Maps from the engine carry the CAM pass's logits (`LayerMaps.logits`):
    ybroad uses them (no clean forward) and scores as if they were passed."""
    model, x = sharp_model(seed=2), images(b=2, h=32, w=32, seed=3)
    maps = camanim.CAManim(model, "gradcam", layers="conv", progress=False)(x, [0, 4])
    assert maps.logits is not None
    rows = []
    handle = model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        own = ybroad(model, x, maps, noise=0.0, progress=False)
        n_own = sum(rows)
        rows.clear()
        maps.logits = None
        clean = ybroad(model, x, maps, noise=0.0, progress=False)
    finally:
        handle.remove()
    assert sum(rows) == n_own + 2                 # only the clean forward of the 2 images is spared
    assert np.allclose(own.scores, clean.scores, atol=1e-12, rtol=0)


def test_fold_cache_folds_once_per_model_state_and_scores_as_fold_true():
    """One FoldCache serves calls with the same model state, images and
    logits (the callback's layers and chance ROAD of one epoch); an in-place
    weight update folds again."""
    from camanim.metrics.road import FoldCache

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 16, 16)
    maps = camanim.CAManim(net, "gradcam", "conv", progress=False)(x)
    kw = dict(noise=0.0, progress=False)
    cache = FoldCache()
    a = camanim.ybroad(net, x, maps, fold=cache, **kw)
    b = camanim.ybroad(net, x, maps, fold=cache, **kw)
    ref = camanim.ybroad(net, x, maps, fold=True, **kw)
    assert cache.builds == 1 and a.extra["folded"] and b.extra["folded"]
    np.testing.assert_array_equal(a.scores, ref.scores)   # same stand-in, same scores
    np.testing.assert_array_equal(b.scores, ref.scores)
    with torch.no_grad():
        net[0].weight.mul_(2.0)                            # an optimizer step, in place
    maps2 = camanim.CAManim(net, "gradcam", "conv", progress=False)(x)
    camanim.ybroad(net, x, maps2, fold=cache, **kw)
    assert cache.builds == 2
    with pytest.raises(camanim.CAManimError, match="fold must be True, False or a FoldCache"):
        camanim.ybroad(net, x, maps, fold="yes", **kw)
