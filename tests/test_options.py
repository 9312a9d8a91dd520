"""`camanim.lightning.options`: the callback's option objects, its
keyword-only signature, and the old spellings that still work for one
release with a DeprecationWarning naming the new one."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import camanim
from camanim import (
    CAManimCallback,
    CAManimError,
    ConvergenceOptions,
    MediaOptions,
    RoadOptions,
    VideoOptions,
)
from camanim.lightning.options import LEGACY_NAMES, LEGACY_POSITIONAL, translate_legacy

X = torch.zeros(2, 3, 8, 8)


def test_everything_after_probes_is_keyword_only_and_about_twenty():
    params = list(inspect.signature(CAManimCallback).parameters.values())
    assert params[0].name == "probes"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert len(params) <= 22
    # the product contract's names are still top level
    assert {"targets", "method", "layers", "every_n_epochs"} <= {p.name for p in params}


def test_option_objects_are_exported_and_frozen():
    for cls in (VideoOptions, RoadOptions, ConvergenceOptions, MediaOptions):
        assert getattr(camanim, cls.__name__) is cls and cls.__doc__
        with pytest.raises(AttributeError):
            cls().__setattr__(next(iter(cls.__dataclass_fields__)), 1)


def test_new_spelling_is_resolved_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb = CAManimCallback(X, video=VideoOptions(normalization="local", fps=4, tb_size=None,
                                                   size=96),
                             road=RoadOptions(percentiles=(10, 90), noise=0, score="logit"),
                             convergence=False, media=MediaOptions(workers=3, queue=0),
                             cam_options={"max_layers": 5})
    assert cb.video.normalization == ("local",) and cb.video.fps == 4.0
    assert cb.video.gif_size == 96  # tb_size None: the MP4 size
    assert cb.road == RoadOptions(percentiles=(10.0, 90.0), noise=0.0, score="logit")
    assert cb.convergence is None and cb.media == MediaOptions(3, 0, False)
    assert cb.cam_options == {"max_layers": 5}
    off = CAManimCallback(X, road=False)
    assert off.road is None and off.convergence == ConvergenceOptions()


def test_every_old_keyword_warns_with_the_new_spelling_at_the_callers_line():
    values = dict(normalization="local", fps=3, log_videos=False, save_videos=False,
                  video_size=64, tb_video_size=32, tb_colors=16, mean=[0.5], std=[0.25],
                  class_names=["a", "b"], road_percentiles=(30, 70), road_noise=0.2,
                  score="softmax", chance=False, settle_threshold=0.3, media_workers=2,
                  media_queue=0, save_maps=True, max_layers=4)
    assert set(values) == set(LEGACY_NAMES)
    with pytest.warns(DeprecationWarning) as rec:
        cb = CAManimCallback(X, **values)
    assert len(rec) == 1 and rec[0].filename == __file__
    msg = str(rec[0].message)
    assert "fps= is now video=VideoOptions(fps=...)" in msg
    assert "road_noise= is now road=RoadOptions(noise=...)" in msg
    assert "max_layers= is now cam_options={'max_layers': ...}" in msg
    assert cb.video == VideoOptions(("local",), 3.0, False, False, 64, 32, 16, [0.5], [0.25],
                                    ["a", "b"])
    assert cb.road == RoadOptions((30.0, 70.0), 0.2, "softmax", False)
    assert cb.convergence == ConvergenceOptions(0.3)
    assert cb.media == MediaOptions(2, 0, True) and cb.cam_options == {"max_layers": 4}


def test_positional_arguments_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"keyword-only now \(pass targets=, method=, "
                                                r"layers=, every_n_epochs=\)"):
        cb = CAManimCallback(X, [0, 1], "hirescam", "conv", 2)
    assert cb._targets == [0, 1] and cb.method == "hirescam" and cb.every_n_epochs == 2
    with pytest.warns(DeprecationWarning):
        cb = CAManimCallback(X, *([None, "gradcam", "conv", 1, None, "both", False]))
    assert cb.video.normalization == ("both",) and cb.road is None
    assert len(LEGACY_POSITIONAL) == 21


@pytest.mark.parametrize("args,kw,match", [
    ((), dict(fps=3, video=VideoOptions()), "inside VideoOptions only"),
    ((), dict(max_layers=3, cam_options={"max_layers": 2}), "keep cam_options only"),
    (([0, 1],), dict(targets=[0, 1]), "both by position and by keyword"),
    (tuple(range(22)), {}, "positional arguments at most"),
])
def test_old_and_new_spellings_do_not_mix(args, kw, match):
    with pytest.raises(CAManimError, match=match):
        translate_legacy(args, kw)


def test_road_false_with_old_road_keywords_stays_off():
    with pytest.warns(DeprecationWarning):
        cb = CAManimCallback(X, road=False, road_noise=0.5)
    assert cb.road is None
