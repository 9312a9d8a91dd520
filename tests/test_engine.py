"""CAManim engine: capture correctness, no side effects, errors, LayerMaps."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision

import camanim
from camanim.core.capture import capture
from helpers import TinyCNN, no_hooks


def test_inplace_overwritten_output_is_captured_before_the_overwrite(tiny, tiny_input):
    """bn1's output is overwritten by ReLU(inplace=True); hand-computed
    Grad-CAM of the true bn1 output (on an out-of-place twin) must match."""
    maps = camanim.CAManim(tiny, "gradcam", ["bn1"])(tiny_input)
    assert maps.layers[0].overwritten
    twin = copy.deepcopy(tiny)
    twin.relu.inplace = False
    store = {}
    h = twin.bn1.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    out = twin(tiny_input)
    h.remove()
    score = out.gather(1, out.argmax(1, keepdim=True)).sum()
    g = torch.autograd.grad(score, store["a"])[0]
    a = store["a"].detach()
    want = (g.mean((2, 3), keepdim=True) * a).sum(1).clamp_min(0)
    torch.testing.assert_close(maps.raw[0], want, rtol=1e-10, atol=1e-12)
    assert (a < 0).any()   # so the overwrite (ReLU) would have mattered


def test_reused_module_calls_get_their_own_maps(tiny, tiny_input):
    """The shared `relu` runs 3 times; each call's map uses its own output."""
    maps = camanim.CAManim(tiny, "hirescam", ["relu", "relu#2", "relu#3"])(tiny_input)
    assert maps.names == ["relu", "relu#2", "relu#3"]
    assert maps.raw[0].shape[1:] == (16, 20) and maps.raw[1].shape[1:] == (8, 10)
    assert not torch.equal(maps.raw[1], maps.raw[2])


def test_training_state_is_untouched():
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    model.conv2.eval()                      # a mixed-mode model
    model.conv3.weight.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16)
    model(x).sum().backward()               # some existing .grad
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    modes = {k: m.training for k, m in model.named_modules()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    rng = torch.get_rng_state()
    for method in ("gradcam", "scorecam", "ablationcam", "eigencam", "randomcam"):
        camanim.CAManim(model, method, "all", progress=False)(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k      # weights and BN running stats
    for k, p in model.named_parameters():
        if k in grads:
            assert torch.equal(p.grad, grads[k]), k
        else:
            assert p.grad is None, k
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert torch.equal(rng, torch.get_rng_state())
    assert no_hooks(model)


def test_frozen_model_still_gets_gradients(tiny, tiny_input):
    for p in tiny.parameters():
        p.requires_grad_(False)
    maps = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input)
    assert all(r.abs().sum() > 0 for r in maps.raw)
    assert all(not p.requires_grad for p in tiny.parameters())


def test_works_under_inference_mode_and_no_grad(tiny, tiny_input):
    ref = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input)
    with torch.inference_mode():
        x = tiny_input.clone()
        a = camanim.CAManim(tiny, "gradcam", "conv")(x)
    with torch.no_grad():
        b = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input)
    for r, ra, rb in zip(ref.raw, a.raw, b.raw, strict=False):
        assert torch.equal(r, ra) and torch.equal(r, rb)


def test_targets_int_list_and_callables_agree(tiny, tiny_input):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    a = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input, targets=[1, 3])
    b = camanim.CAManim(tiny, "gradcam", "conv")(
        tiny_input, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(3)])
    assert a.targets.tolist() == [1, 3] and b.targets.tolist() == [1, 3]
    for ra, rb in zip(a.raw, b.raw, strict=False):
        assert torch.equal(ra, rb)
    c = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input, targets=[1, 4])
    assert not torch.equal(a.raw[-1][1], c.raw[-1][1]) and torch.equal(a.raw[-1][0], c.raw[-1][0])


def test_batch_equals_one_image_at_a_time(tiny, tiny_input):
    both = camanim.CAManim(tiny, "gradcam++", "all")(tiny_input, targets=[0, 2])
    for b, t in enumerate([0, 2]):
        one = camanim.CAManim(tiny, "gradcam++", "all")(tiny_input[b:b + 1], targets=[t])
        for rb, r1 in zip(both.raw, one.raw, strict=False):
            torch.testing.assert_close(rb[b:b + 1], r1, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("images,match", [
    (torch.randn(3, 16, 16), "unsqueeze"),
    (torch.randn(1, 1, 3, 16, 16), "4 dimensions"),
    (torch.randn(0, 3, 16, 16), "empty batch"),
    (torch.randint(0, 255, (1, 3, 16, 16)), "dtype"),
    (torch.randn(1, 1, 16, 16), "channels.*expand"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    ([[1.0]], "torch.Tensor"),
])
def test_bad_images(tiny, images, match):
    with pytest.raises(camanim.CAManimError, match=match):
        camanim.CAManim(tiny, "gradcam")(images)


@pytest.mark.parametrize("targets,match", [
    ([0, 5], "out of range.*5 classes"),
    ([0], "1 targets for 2 images"),
    ([0, 1, 2], "3 targets for 2 images"),
    ("cat", "targets must be"),
])
def test_bad_targets(tiny, tiny_input, targets, match):
    with pytest.raises(camanim.CAManimError, match=match):
        camanim.CAManim(tiny, "gradcam")(tiny_input, targets=targets)
    assert no_hooks(tiny)


def test_unknown_method_lists_the_valid_ones(tiny):
    with pytest.raises(camanim.CAManimError, match="valid methods: gradcam, hirescam"):
        camanim.CAManim(tiny, "gradkam")


def test_no_hook_left_when_the_forward_raises(tiny_input):
    class Broken(TinyCNN):
        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            raise RuntimeError("boom")

    model = Broken().double().eval()
    anim = camanim.CAManim(model, "gradcam", "conv")
    with pytest.raises(camanim.CAManimError, match="boom"):
        anim(tiny_input)
    assert no_hooks(model)
    # and when it raises during capture (after discovery succeeded)
    tiny = TinyCNN().double().eval()
    anim = camanim.CAManim(tiny, "gradcam", "conv")
    anim(tiny_input)
    with pytest.raises(camanim.CAManimError, match="target class 99 is out of range"):
        anim(tiny_input, targets=[0, 99])
    assert no_hooks(tiny)


def test_non_finite_maps_name_the_layer(tiny_input):
    class Overflow(TinyCNN):
        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.conv2(x) * float("inf")
            x = self.relu(self.conv3(x))
            return self.fc(self.pool(x).flatten(1))

    model = Overflow().double().eval()
    with pytest.raises(camanim.CAManimError, match="non-finite.*conv2"):
        camanim.CAManim(model, "gradcam", ["conv1", "conv2"])(tiny_input, targets=[0, 0])


# -------------------------------------------------------------- LayerMaps
def test_local_global_none_normalizations(tiny, tiny_input):
    maps = camanim.CAManim(tiny, "gradcam", "all")(tiny_input)
    local = maps.upsample("local")
    glob = maps.upsample("global")
    none = maps.upsample("none")
    L, B = len(maps), 2
    assert local.shape == glob.shape == none.shape == (L, B, 16, 20)
    for l in range(L):
        for b in range(B):
            if maps.raw[l][b].max() > 0:
                assert local[l, b].max() == pytest.approx(1, abs=1e-6)
            assert local[l, b].min() == pytest.approx(0, abs=1e-6)
    # global: one range per image across layers -> only the strongest layer reaches ~1
    peak = torch.stack([r.flatten(1).amax(1) for r in maps.raw])      # (L, B)
    for b in range(B):
        strongest = int(peak[:, b].argmax())
        weakest = int(peak[:, b].argmin())
        assert glob[weakest, b].max() < glob[strongest, b].max()
        assert glob[:, b].max() <= 1 + 1e-6
    torch.testing.assert_close(none[0], torch.nn.functional.interpolate(
        maps.raw[0][:, None], size=(16, 20), mode="bilinear", align_corners=False)[:, 0])
    with pytest.raises(camanim.CAManimError, match="normalization"):
        maps.upsample("per-layer")


def _resize(r, size):
    return torch.nn.functional.interpolate(r[:, None], size=size, mode="bilinear",
                                           align_corners=False)[:, 0]


def test_global_normalization_divides_by_the_max_over_layers_of_each_image(tiny, tiny_input):
    """upsample("global")[l, b] == resize(raw[l][b]) / max over layers of image b.

    Hand-made maps: ReLU'd (each image has a 0, so its minimum is 0) and
    image 1 is 100 times weaker than image 0: a range taken over the whole
    batch would scale image 1 to at most 0.01 and fail."""
    g = torch.Generator().manual_seed(3)
    raw = [torch.rand(2, 4, 5, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0, 0.5)]
    for r in raw:
        r[:, 0, 0] = 0
        r[1] /= 100
    info = camanim.list_layers(tiny, tiny_input, ["conv1", "conv2", "conv3"]).selected
    maps = camanim.LayerMaps(names=["a", "b", "c"], raw=raw, input_size=(8, 10), layers=info)
    glob = maps.upsample("global")
    for b in range(2):
        top = max(float(r[b].max()) for r in raw)
        for l, r in enumerate(raw):
            want = _resize(r[b:b + 1], (8, 10))[0] / (1e-7 + top)
            torch.testing.assert_close(glob[l, b], want, rtol=0, atol=1e-12)
        assert float(glob[:, b].max()) > 0.5     # per image (batch-wide: <= 0.01 for b = 1)
    # the same rule on real maps, with each image's own minimum over layers
    real = camanim.CAManim(tiny, "gradcam", "all", progress=False)(tiny_input)
    glob = real.upsample("global")
    for b in range(2):
        lo = min(float(r[b].min()) for r in real.raw)
        hi = max(float(r[b].max()) for r in real.raw)
        for l, r in enumerate(real.raw):
            want = (_resize(r[b:b + 1], (16, 20))[0] - lo) / (1e-7 + hi - lo)
            torch.testing.assert_close(glob[l, b], want, rtol=0, atol=1e-12)


def test_save_load_roundtrip_without_pickle(tmp_path, tiny, tiny_input):
    maps = camanim.CAManim(tiny, "layercam", "all")(tiny_input)
    path = maps.save(tmp_path / "maps.npz")
    with np.load(path, allow_pickle=False) as data:       # no pickle inside
        assert "meta" in data.files
    back = camanim.LayerMaps.load(path)
    assert back.names == maps.names and back.input_size == maps.input_size
    assert back.layers == maps.layers and back.method == "layercam"
    assert torch.equal(back.targets, maps.targets)
    for a, b in zip(maps.raw, back.raw, strict=False):
        assert torch.equal(a, b)
    assert back.params == maps.params
    with pytest.raises(camanim.CAManimError, match="no LayerMaps file"):
        camanim.LayerMaps.load(tmp_path / "missing.npz")


def test_select_and_iteration(tiny, tiny_input):
    maps = camanim.CAManim(tiny, "gradcam", "all")(tiny_input)
    sub = maps.select(["conv3", "conv1"])
    assert sub.names == ["conv3", "conv1"]
    assert torch.equal(sub.raw[0], maps.raw[maps.index("conv3")])
    with pytest.raises(camanim.CAManimError, match="no layer"):
        maps.index("nope")
    assert [n for n, _ in maps] == maps.names


def test_resnet50_all_layers_blocks_and_seconds():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    maps = camanim.CAManim(model, "gradcam", "blocks")(torch.randn(1, 3, 64, 64))
    assert maps.names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert len(maps.seconds) == 5 and all(s > 0 for s in maps.seconds)
    assert [r.shape[1:] for r in maps.raw] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_numpy_integer_targets(tiny, tiny_input):
    a = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input, targets=[1, 3])
    for t in (np.array([1, 3]), [np.int64(1), np.int64(3)]):
        b = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input, targets=t)
        assert b.targets.tolist() == [1, 3]
        assert all(torch.equal(x, y) for x, y in zip(a.raw, b.raw, strict=False))
    with pytest.raises(camanim.CAManimError, match="integer class indices"):
        camanim.CAManim(tiny, "gradcam")(tiny_input, targets=np.array([1.0, 3.0]))


def test_callable_targets_with_an_out_of_range_category_keep_no_class_index(tiny, tiny_input):
    class Score:
        category = 7            # not a class of this 5-class model: not used as an index

        def __call__(self, out):
            return out[0] - out[1]

    maps = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input, targets=[Score(), Score()])
    assert maps.targets is None


def test_load_finds_the_suffix_save_added(tmp_path, tiny, tiny_input):
    maps = camanim.CAManim(tiny, "gradcam", "conv")(tiny_input)
    written = maps.save(tmp_path / "mm")
    assert written.name == "mm.npz"
    assert camanim.LayerMaps.load(tmp_path / "mm").names == maps.names


def test_basecam_adapter_on_bfloat16(tiny_input):
    from pytorch_grad_cam import GradCAM

    class MyGradCAM(GradCAM):
        pass

    model = TinyCNN().to(torch.bfloat16).eval()
    maps = camanim.CAManim(model, MyGradCAM, ["conv2", "conv3"])(tiny_input.to(torch.bfloat16))
    assert all(torch.isfinite(r.float()).all() for r in maps.raw)


# ------------------------------------------------------------ options
@pytest.mark.parametrize("method,options,valid", [
    ("gradcam", {"steps": 5}, "none"),
    ("scorecam", {"mu": 0.5}, "none"),
    ("sise", {"steps": 5}, "mu, score, mask_norm"),
    ("ada-sise", {"mu": 0.5}, "score, mask_norm"),
    ("integrated-gradcam", {"mu": 0.5, "stepz": 3}, "steps, baseline, mean, std"),
])
def test_unknown_method_options_are_an_error_at_construction(tiny, method, options, valid):
    with pytest.raises(camanim.CAManimError, match="unknown option") as err:
        camanim.CAManim(tiny, method, **options)          # no images needed to fail
    msg = str(err.value)
    assert repr(method) in msg and valid in msg
    assert all(k in msg for k in options)


def test_bad_option_values_fail_at_construction_too(tiny):
    with pytest.raises(camanim.CAManimError, match="steps"):
        camanim.CAManim(tiny, "integrated-gradcam", steps=0)
    with pytest.raises(camanim.CAManimError, match="mu"):
        camanim.CAManim(tiny, "sise", mu=2)


def test_sise_layers_default_explicit_conv_warns_others_are_honoured(tiny, tiny_input):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the default: its blocks, silently
        anim = camanim.CAManim(tiny, "sise", progress=False)
        assert anim.layers == "blocks"
        assert camanim.CAManim(tiny, "gradcam").layers == "conv"
        assert camanim.CAManim(tiny, "sise", "all").layers == "all"
    with pytest.warns(UserWarning, match="layers='conv' was replaced by 'blocks'") as rec:
        replaced = camanim.CAManim(tiny, "ada-sise", "conv", progress=False)
    assert len(rec) == 1 and replaced.layers == "blocks"
    assert replaced(tiny_input).names == anim(tiny_input).names


# ------------------------------------------------------ half precision
def test_bfloat16_model_maps_accumulate_in_float32():
    """A bfloat16 model runs in bfloat16; its maps are made in float32.

    1. Exactly: each raw map equals the float64 Grad-CAM of the bf16 model's
       own activations and gradients to 1e-5 of its peak (bf16 arithmetic
       would be off by ~4e-3: 8 significant bits); the local normalization
       and resize equal the float64 ones to 1e-6.
    2. Against the float32 copy of the model: local maps within 0.05
       (stated tolerance: three bf16 conv layers shift each activation by
       up to ~1%, the maps are min-max scaled to [0, 1])."""
    torch.manual_seed(0)
    m32 = TinyCNN().eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    anim = camanim.CAManim(m16, "gradcam", "conv", progress=False)
    maps = anim(x, targets=[1, 3])
    assert all(r.dtype == torch.float32 for r in maps.raw)
    cap = capture(m16, x.to(torch.bfloat16), anim.layer_table(x).selected, [1, 3])
    assert cap.activations[0].dtype == torch.bfloat16          # the model ran in bf16
    for r, a, g in zip(maps.raw, cap.activations, cap.gradients, strict=False):
        want = (g.double().mean((2, 3), keepdim=True) * a.double()).sum(1).clamp_min(0)
        torch.testing.assert_close(r.double(), want, rtol=0, atol=1e-5 * float(want.max()))
    local = maps.upsample("local")
    assert local.dtype == torch.float32
    as64 = camanim.LayerMaps(names=maps.names, raw=[r.double() for r in maps.raw],
                             input_size=maps.input_size, layers=maps.layers)
    torch.testing.assert_close(local.double(), as64.upsample("local"), rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.upsample("global").double(), as64.upsample("global"),
                               rtol=0, atol=1e-6)
    ref = camanim.CAManim(m32, "gradcam", "conv", progress=False)(x, targets=[1, 3])
    assert float((local - ref.upsample("local")).abs().max()) < 0.05


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "gradcam++"])
def test_bfloat16_model_with_perturbation_methods(method):
    torch.manual_seed(0)
    m32 = TinyCNN().eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randn(1, 3, 16, 16)
    got = camanim.CAManim(m16, method, ["conv3"], progress=False)(x, targets=[2])
    ref = camanim.CAManim(m32, method, ["conv3"], progress=False)(x, targets=[2])
    assert got.raw[0].dtype == torch.float32 and torch.isfinite(got.raw[0]).all()
    # stated tolerance: bf16 model, min-max scaled maps in [0, 1]. bfloat16 keeps 8
    # significant bits (a relative step of 2^-8 = 0.004); measured here: 0.0031
    # (gradcam++), 6e-8 (scorecam), 0 (ablationcam). 0.02 is ~5 such steps.
    assert float((got.upsample("local") - ref.upsample("local")).abs().max()) < 0.02
