"""`camanim.lightning.validation`: every argument check of the callback, in
one pass at construction and one at fit start (strategy, model outputs)."""

from __future__ import annotations

import pytest
import torch

from camanim import (
    CAManimCallback,
    CAManimError,
    ConvergenceOptions,
    MediaOptions,
    RoadOptions,
    VideoOptions,
)
from camanim.lightning.validation import (
    check_model_outputs,
    check_sanity,
    check_setup,
    resolve_module,
)

X = torch.zeros(2, 3, 8, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(video=VideoOptions(tb_colors=300)), "within 2..256"),
    (dict(video=VideoOptions(tb_size=8)), "tb_size must be an int >= 16"),
    (dict(video=VideoOptions(std=[0.2, 0.0, 0.1])), "std values must be > 0"),
    (dict(video=VideoOptions(mean=[0.5, 0.5])), "3 channels"),
    (dict(video=VideoOptions(normalization=())), "normalization is empty"),
    (dict(video=VideoOptions(fps=True)), "fps must be a positive number"),
    (dict(road=RoadOptions(percentiles=())), "strictly between 0 and 100"),
    (dict(road=RoadOptions(noise=-1)), "noise must be >= 0"),
    (dict(road=RoadOptions(score="prob")), "score must be one of"),
    (dict(road="yes"), "road must be True, False or a camanim.RoadOptions"),
    (dict(convergence=ConvergenceOptions(settle_threshold=3)), r"settle_threshold.*\(0, 2\]"),
    (dict(media=MediaOptions(queue=-1)), "media queue must be an int >= 0"),
    (dict(media=MediaOptions(workers=0)), "media workers must be an int >= 1"),
    (dict(cam_options={"steps": 4}), "unknown option.*steps"),
    (dict(cam_options={"seed": 1}), "pass seed= to CAManimCallback itself"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(model=3), "model must be None"),
    (dict(sanity="middle"), "sanity must be"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
])
def test_construction_pass_names_the_argument_and_the_fix(kw, match):
    with pytest.raises(CAManimError, match=match):
        CAManimCallback(X, **kw)


def test_construction_pass_resolves_values():
    cb = CAManimCallback(X, video=VideoOptions(normalization=["global", "local"], fps=5,
                                               mean=(0.5,), class_names=("a", "b")),
                         media=MediaOptions(), sanity="end, start")
    assert cb.video.normalization == ("global", "local") and cb.video.mean == [0.5]
    assert cb.video.class_names == ["a", "b"] and cb.sanity == ("start", "end")
    assert 2 <= cb.media.workers <= 8
    assert check_sanity(None) == () and check_sanity(["end"]) == ("end",)


def test_setup_pass_refuses_sharded_strategies():
    class FSDPStrategy:
        pass

    class T:
        strategy = FSDPStrategy()

    with pytest.raises(CAManimError, match="sharded strategy FSDPStrategy.*Use DDP"):
        check_setup(T())
    check_setup(object())  # no strategy: nothing to refuse


def test_fit_start_pass_checks_the_model_outputs():
    logits = torch.zeros(1, 3)
    assert check_model_outputs(logits, "given", [0, 2], "auto", True) == "softmax"
    with pytest.raises(CAManimError, match="model has 3 classes"):
        check_model_outputs(logits, "given", [3], "auto", True)
    with pytest.raises(CAManimError, match=r"returns shape \(1, 3, 4\)"):
        check_model_outputs(torch.zeros(1, 3, 4), "predicted", None, "auto", True)
    one = torch.zeros(1, 1)
    with pytest.raises(CAManimError, match="single output.*score='logit'"):
        check_model_outputs(one, "predicted", None, "softmax", True)
    with pytest.warns(UserWarning, match="single-output model: ROAD scores the logit"):
        assert check_model_outputs(one, "predicted", None, "auto", True) == "logit"
    assert check_model_outputs(one, "predicted", None, "auto", False) == "softmax"
    # the user's own score callables: no class count to check
    assert check_model_outputs(torch.zeros(1, 3, 4), "callables", None, "logit", True) == "logit"


def test_resolve_module_follows_an_attribute_path():
    outer = torch.nn.Module()
    outer.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    assert resolve_module("backbone.0", outer) is outer.backbone[0]
    assert resolve_module(lambda m: m.backbone, outer) is outer.backbone
    with pytest.raises(CAManimError, match="no attribute 'head'"):
        resolve_module("head", outer)
    with pytest.raises(CAManimError, match="gave a int, not an nn.Module"):
        resolve_module(lambda m: 3, outer)
