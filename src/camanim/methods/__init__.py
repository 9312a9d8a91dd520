"""CAM methods: one file per method, each a few lines of tensor math.

Every per-layer method maps (activations (B, C, h, w), gradients, ctx) to a
(B, h, w) map before ReLU; the engine applies ReLU and keeps raw magnitudes.
"""

from __future__ import annotations

from typing import Any

from ..errors import CAManimError
from .ablationcam import ablationcam
from .base import CamFn, LayerContext, Method
from .basecam import adapt_basecam, is_basecam_class
from .eigencam import eigencam, eigengradcam
from .gradcam import gradcam
from .gradcam_elementwise import gradcam_elementwise
from .gradcam_plusplus import gradcam_plusplus
from .hirescam import hirescam
from .integrated_gradcam import IG_OPTIONS, ig_options, run_integrated_gradcam
from .layercam import layercam
from .randomcam import randomcam
from .scorecam import scorecam
from .sise import ADA_SISE_OPTIONS, SISE_OPTIONS, run_ada_sise, run_sise, sise_options
from .xgradcam import xgradcam

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method under ``method.name`` (lower case)."""
    METHODS[method.name.lower()] = method
    return method


for _m in (
    Method("gradcam", gradcam, reference="GradCAM"),
    Method("hirescam", hirescam, reference="HiResCAM"),
    Method("gradcamelementwise", gradcam_elementwise, reference="GradCAMElementWise"),
    Method("gradcam++", gradcam_plusplus, reference="GradCAMPlusPlus"),
    Method("xgradcam", xgradcam, reference="XGradCAM"),
    Method("layercam", layercam, reference="LayerCAM"),
    Method("eigencam", eigencam, uses_gradients=False, reference="EigenCAM"),
    Method("eigengradcam", eigengradcam, reference="EigenGradCAM"),
    Method("randomcam", randomcam, uses_gradients=False, reference="RandomCAM"),
    Method("scorecam", scorecam, uses_gradients=False, extra_forwards=True, reference="ScoreCAM"),
    Method("ablationcam", ablationcam, uses_gradients=False, extra_forwards=True,
           reference="AblationCAM"),
):
    register(_m)

register(Method("integrated-gradcam", None, extra_forwards=True, runner=run_integrated_gradcam,
                options=IG_OPTIONS, check_options=ig_options))
register(Method("sise", None, extra_forwards=True, runner=run_sise, options=SISE_OPTIONS,
                check_options=lambda o: sise_options(o, adaptive=False),
                default_layers="blocks"))
register(Method("ada-sise", None, extra_forwards=True, runner=run_ada_sise,
                options=ADA_SISE_OPTIONS, check_options=lambda o: sise_options(o, adaptive=True),
                default_layers="blocks"))

_ALIASES = {"grad-cam": "gradcam", "gradcampp": "gradcam++", "gradcamplusplus": "gradcam++",
            "grad-cam++": "gradcam++", "score-cam": "scorecam", "ablation-cam": "ablationcam",
            "layer-cam": "layercam", "eigen-cam": "eigencam", "xgrad-cam": "xgradcam",
            "hires-cam": "hirescam", "random-cam": "randomcam",
            "gradcam-elementwise": "gradcamelementwise",
            "integratedgradcam": "integrated-gradcam", "integrated_gradcam": "integrated-gradcam",
            "integrated-grad-cam": "integrated-gradcam", "ig-cam": "integrated-gradcam",
            "adasise": "ada-sise", "ada_sise": "ada-sise"}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(method: Any) -> Method:
    """Resolve a method name or a pytorch-grad-cam ``BaseCAM`` subclass."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        key = _ALIASES.get(method.lower(), method.lower())
        if key in METHODS:
            return METHODS[key]
        raise CAManimError(f"unknown CAM method {method!r}; valid methods: "
                           f"{', '.join(METHODS)} (or a pytorch_grad_cam BaseCAM subclass)")
    if is_basecam_class(method):
        # pytorch-grad-cam's own classes map to our native (identical, batched) code
        for m in METHODS.values():
            if m.reference and m.reference == method.__name__ and \
                    method.__module__.startswith("pytorch_grad_cam"):
                return m
        return Method(method.__name__, adapt_basecam(method), uses_gradients=True,
                      reference=method.__name__)
    raise CAManimError(f"method must be a name ({', '.join(METHODS)}) or a pytorch_grad_cam "
                       f"BaseCAM subclass, got {method!r}")


def check_method_options(method: Method, options: dict[str, Any]) -> None:
    """Raise `CAManimError` naming the method, the unknown option(s) and the
    valid ones; then let the method check the values."""
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        valid = ", ".join(method.options) if method.options else "none (it takes no options)"
        hint = ""
        if "steps" in unknown and method.name != "integrated-gradcam":
            hint = " (steps= belongs to method='integrated-gradcam')"
        raise CAManimError(f"unknown option(s) {', '.join(unknown)} for method "
                           f"{method.name!r}{hint}; valid options: {valid}")
    if method.check_options is not None:
        method.check_options(dict(options))


__all__ = ["METHODS", "Method", "LayerContext", "CamFn", "check_method_options", "get_method",
           "method_names", "register"]
