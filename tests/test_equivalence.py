"""Per-layer maps equal pytorch-grad-cam run one layer at a time.

Reference: pytorch_grad_cam 1.5.7, one ``BaseCAM`` pipeline per layer
(forward, backward, get_cam_image, ReLU, scale_cam_image, aggregate), on
float64 random-weight models. Tolerance: max abs difference <= 1e-4 of the
min-max normalized maps (the reference casts to float32 before resizing).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

import camanim

TOL = 1e-4
GRADIENT_METHODS = {
    "gradcam": GradCAM, "hirescam": HiResCAM, "gradcamelementwise": GradCAMElementWise,
    "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
}


def without_inplace(model: nn.Module) -> nn.Module:
    """A twin with every in-place ReLU/SiLU made out-of-place: the same
    function, but pytorch-grad-cam's capture is no longer fooled by the
    in-place trap (PRODUCT.md), so its output is the hand-checkable truth."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return twin


def reference_maps(model, layer, x, classes):
    """Run every gradient method of pytorch-grad-cam on one layer, sharing
    one reference forward/backward (its own ActivationsAndGradients)."""
    targets = [camanim.core.inputs.logit_target(int(c)) for c in classes]
    out, keep = {}, []  # keep: BaseCAM.__del__ would clear the shared capture
    with GradCAM(model, [layer]) as first:
        first(x, targets)
        for name, cls in GRADIENT_METHODS.items():
            cam = cls.__new__(cls)
            cam.__dict__.update(first.__dict__)
            keep.append(cam)
            per_layer = cam.compute_cam_per_layer(x, targets, False)
            out[name] = cam.aggregate_multi_layers(per_layer)
    return out


@pytest.mark.parametrize("arch,size", [
    ("resnet18", 64),
    pytest.param("densenet121", 64, marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", 64, marks=pytest.mark.slow),
    ("squeezenet1_1", 64),
])
def test_gradient_methods_match_reference_on_every_conv(arch, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    ours = {name: camanim.CAManim(model, name, "conv")(x) for name in GRADIENT_METHODS}
    maps = ours["gradcam"]
    convs = [i for i in camanim.list_layers(model, x, "conv").calls if i.type == "Conv2d"]
    drawable = [i.name for i in convs if i.skipped is None]
    assert maps.names == drawable
    # the only Conv2d calls left out are 1x1-output ones (squeeze-excitation)
    assert all(i.output_shape[2:] == (1, 1) for i in convs if i.skipped is not None)
    ups = {name: m.upsample("local").numpy() for name, m in ours.items()}
    # squeezenet's convs feed ReLU(inplace=True): the reference captures the
    # overwritten tensor there, so compare with the reference on the twin.
    ref_model = without_inplace(model)
    modules = dict(ref_model.named_modules())
    worst = {name: 0.0 for name in GRADIENT_METHODS}
    for l, info in enumerate(maps.layers):
        ref = reference_maps(ref_model, modules[info.module_name], x, maps.targets)
        for name in GRADIENT_METHODS:
            worst[name] = max(worst[name], float(np.abs(ups[name][l] - ref[name]).max()))
    assert all(v <= TOL for v in worst.values()), worst


def test_inplace_trap_reference_is_wrong_and_ours_is_not():
    """On squeezenet the reference (captured on the real model) differs from
    the truth (reference on the in-place-free twin); ours equals the truth."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    name = "features.3.squeeze"
    ours = camanim.CAManim(model, "gradcam", [name])(x).upsample("local")[0].numpy()
    with GradCAM(model, [dict(model.named_modules())[name]]) as cam:
        fooled = cam(x, None)
    twin = without_inplace(model)
    with GradCAM(twin, [dict(twin.named_modules())[name]]) as cam:
        truth = cam(x, None)
    assert np.abs(ours - truth).max() <= TOL
    assert np.abs(fooled - truth).max() > 1e-2


def _eigen_close(ours, ref, proj_fn):
    """Equal to the reference, or to the reference with the principal
    component's sign flipped: the sign of a singular vector is arbitrary and
    LAPACK builds (numpy's vs torch's) differ in it."""
    if np.abs(ours - ref).max() <= TOL:
        return True
    return np.abs(ours - proj_fn()).max() <= TOL


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).double().eval()


LAYERS = ["layer2.0.conv1", "layer3.1.conv2", "layer4.1.conv2"]


@pytest.mark.parametrize("method,cls", [("eigencam", EigenCAM), ("eigengradcam", EigenGradCAM)])
def test_eigen_methods_match_reference_up_to_sign(r18, method, cls):
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    maps = camanim.CAManim(r18, method, LAYERS)(x)
    up = maps.upsample("local").numpy()
    modules = dict(r18.named_modules())
    for l, name in enumerate(LAYERS):
        for b in range(2):
            with cls(r18, [modules[name]]) as cam:
                ref = cam(x[b:b + 1], None)
                acts = cam.activations_and_grads.activations[0].numpy()
                grads = (cam.activations_and_grads.gradients[0].numpy()
                         if cam.activations_and_grads.gradients else None)

            def flipped(acts=acts, grads=grads):
                m = acts if method == "eigencam" else grads * acts
                p = -get_2d_projection(m)
                s = scale_cam_image(np.maximum(p, 0), (64, 64))
                return scale_cam_image(s[:, None].mean(1))
            assert _eigen_close(up[l, b:b + 1], ref, flipped), (name, b)


@pytest.mark.parametrize("method,cls", [("scorecam", ScoreCAM), ("ablationcam", AblationCAM)])
def test_perturbation_methods_match_reference(method, cls):
    """Score-CAM and Ablation-CAM on the non-negative (post-ReLU) outputs of a
    small CNN: there the reference's ablation value is 0 and well defined."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    names = ["1", "3"]
    maps = camanim.CAManim(model, method, names, batch_size=4, progress=False)(x)
    up = maps.upsample("local").numpy()
    assert maps.extra["n_masks"] == [6, 8]
    for l, name in enumerate(names):
        with cls(model, [model[int(name)]]) as cam:
            cam.batch_size = 4
            ref = cam(x, [camanim.core.inputs.logit_target(int(c)) for c in maps.targets])
        assert np.abs(up[l] - ref).max() <= TOL, name


def test_basecam_subclass_adapter_matches_running_it(r18):
    class MaxGradCAM(BaseCAM):
        """A user's own method: channel weight = max gradient."""

        def __init__(self, model, target_layers, reshape_transform=None):
            super().__init__(model, target_layers, reshape_transform)

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            return grads.max(axis=(2, 3))

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    maps = camanim.CAManim(r18, MaxGradCAM, LAYERS)(x)
    assert maps.method == "MaxGradCAM"
    up = maps.upsample("local").numpy()
    modules = dict(r18.named_modules())
    for l, name in enumerate(LAYERS):
        with MaxGradCAM(r18, [modules[name]]) as cam:
            ref = cam(x, None)
        assert np.abs(up[l] - ref).max() <= TOL


def test_reference_class_maps_to_native_method():
    assert camanim.get_method(GradCAM).name == "gradcam"
    assert camanim.get_method(GradCAMPlusPlus).name == "gradcam++"


def test_randomcam_repeatable_by_seed(r18):
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    a = camanim.CAManim(r18, "randomcam", LAYERS, seed=7)(x)
    b = camanim.CAManim(r18, "randomcam", LAYERS, seed=7)(x)
    c = camanim.CAManim(r18, "randomcam", LAYERS, seed=8)(x)
    state = torch.get_rng_state()
    for ra, rb in zip(a.raw, b.raw, strict=False):
        assert torch.equal(ra, rb)
    assert any(not torch.equal(ra, rc) for ra, rc in zip(a.raw, c.raw, strict=False))
    camanim.CAManim(r18, "randomcam", LAYERS, seed=7)(x)
    assert torch.equal(state, torch.get_rng_state())
