"""``camanim explain --checkpoint`` explains the weights it is given (issue 23).

The maps the command saves (``--save-maps``) equal, to float32 rounding,
the maps of the same model with the checkpoint loaded in Python, and differ
from the maps of the model's random initialization.
"""

from __future__ import annotations

import json

import pytest
import torch

from camanim import CAManim, LayerMaps, cli
from camanim.core.images import IMAGENET_MEAN, IMAGENET_STD, load_image, to_model_input
from test_cli import TINY, image, tiny_cnn  # noqa: F401 - image is a fixture used below

TARGET = 1


def trained_weights() -> dict[str, torch.Tensor]:
    """tiny_cnn's state dict with every parameter redrawn (a "trained" model)."""
    model = tiny_cnn()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.state_dict()


def python_maps(image_path, state: dict[str, torch.Tensor] | None) -> LayerMaps:
    model = tiny_cnn().eval()
    if state is not None:
        model.load_state_dict(state)
    x = to_model_input(load_image(image_path), (24, 24), IMAGENET_MEAN, IMAGENET_STD, 3)
    return CAManim(model, "gradcam", progress=False)(x, [TARGET])


@pytest.mark.parametrize("kind", ["lightning", "state_dict"])
def test_explain_maps_are_those_of_the_checkpoint(tmp_path, image, capsys, kind):  # noqa: F811
    state = trained_weights()
    ckpt = tmp_path / "best.ckpt"
    if kind == "lightning":
        torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()}}, ckpt)
    else:
        torch.save(state, ckpt)
    out = tmp_path / "out"
    rc = cli.main(["explain", str(image), "--model", TINY, "--checkpoint", str(ckpt),
                   "--size", "24", "--norm", "local", "--target", str(TARGET), "--out", str(out),
                   "--quiet", "--save-maps", "--format", "gif"])
    assert rc == 0, capsys.readouterr().err
    got = LayerMaps.load(out / "scan_maps.npz")
    assert json.loads((out / "scan_summary.json").read_text())["weights"] == str(ckpt)
    want, init = python_maps(image, state), python_maps(image, None)
    assert got.names == want.names and len(got) == 3
    for name, g, w, r in zip(got.names, got.raw, want.raw, init.raw, strict=True):
        scale = float(w.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(g, w, atol=1e-5 * scale, rtol=0, msg=name)
        # the random-init model's maps are another thing altogether
        assert float((g - r).abs().max()) > 0.1 * max(scale, float(r.abs().max())), name
