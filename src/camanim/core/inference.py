"""A faster stand-in for a model that only runs eval-mode forwards.

ybROAD runs thousands of inference forwards of one set of weights (8 per
layer, image and trial). On the CPU those forwards are most of its time, and
two rewrites make them cheaper without changing what is computed:

* every BatchNorm that directly follows a convolution is folded into that
  convolution (eval mode: the BatchNorm is an affine map of the running
  statistics), which removes one pass over every activation;
* the folded weights are stored channels-last, and the inputs are passed
  channels-last, which is oneDNN's native layout on the CPU.

`folded_model` builds that stand-in from ``torch.fx`` (the traced graph,
interpreted; the model's own modules, parameters and buffers are never
changed: the folded convolutions are new modules with new tensors). It returns
``None`` whenever it cannot promise the same function: a model that
``torch.fx`` cannot trace, any forward hook anywhere (the traced graph would
skip hooks on container modules), parametrized convolutions, a model in
training mode, half precision, or nothing to fold. The caller still checks
the stand-in's outputs against the model's on real inputs
(`outputs_agree`) before using it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["folded_model", "FoldedModel", "outputs_agree", "scoring_runner", "FoldCache"]

_FOLD_DTYPES = (torch.float32, torch.float64)


def _has_forward_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, name, None) for name in ("_global_forward_hooks",
                                                      "_global_forward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class FoldedModel:
    """``model``'s traced graph, run by a ``torch.fx.Interpreter`` with the
    folded convolutions in place of the Conv2d -> BatchNorm pairs.

    No code is generated (a ``GraphModule`` would add its source to
    ``linecache`` on every build, a small leak per callback epoch); every
    module that is not folded is the model's own.

    Attributes:
        graph: the ``torch.fx.Graph`` that runs (folded BatchNorm nodes removed).
        fused: qualified conv name -> its new folded, channels-last Conv2d.
    """

    def __init__(
        self, model: nn.Module, graph: torch.fx.Graph, fused: dict[str, nn.Module]
    ) -> None:
        import torch.fx as fx

        class Run(fx.Interpreter):
            def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
                mod = fused.get(target)
                return (
                    mod(*args, **kwargs)
                    if mod is not None
                    else super().call_module(target, args, kwargs)
                )

        self.graph, self.fused = graph, fused
        self._run = Run(model, garbage_collect_values=True, graph=graph)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out: torch.Tensor = self._run.run(x)
            return out
        finally:
            self._run.env = {}      # drop the last run's activations


def folded_model(model: nn.Module) -> FoldedModel | None:
    """``model``'s graph with its Conv2d -> BatchNorm pairs folded into single
    channels-last Conv2d modules, or ``None``.

    It computes the same function up to float rounding (folding reorders one
    multiply-add per weight). Weights are read now: build it again after the
    model trains. Feed it channels-last inputs for the speed-up.
    """
    import torch.fx as fx
    from torch.nn.utils import parametrize
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if any(m.training for m in model.modules()) or _has_forward_hooks(model):
        return None
    try:
        with warnings.catch_warnings():     # a trace that warns is still only an attempt
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: run the model as it is
        return None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    fused: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or len(node.args) != 1 \
                or node.kwargs:
            continue
        prev = node.args[0]
        conv = modules.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" \
            else None
        # a conv called twice (calls > 1) would be folded at every call: single-use ones only
        if type(conv) is not nn.Conv2d or len(prev.users) != 1 or calls[prev.target] != 1 \
                or parametrize.is_parametrized(conv) or conv.weight.dtype not in _FOLD_DTYPES \
                or bn.running_mean is None or bn.running_var is None \
                or bn.running_mean.dtype != conv.weight.dtype:
            continue
        with torch.no_grad():
            conv_f = fuse_conv_bn_eval(conv, bn)
            conv_f.weight = nn.Parameter(conv_f.weight.detach().contiguous(
                memory_format=torch.channels_last), requires_grad=False)
            assert conv_f.bias is not None  # fuse_conv_bn_eval always makes one
            conv_f.bias = nn.Parameter(conv_f.bias.detach(), requires_grad=False)
        fused[prev.target] = conv_f
        node.replace_all_uses_with(prev)
        graph.erase_node(node)
    if not fused:
        return None
    graph.lint()
    return FoldedModel(model, graph, fused)


def outputs_agree(fast: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-4) -> bool:
    """True when ``fast`` has ``reference``'s shape and dtype and every entry is
    within ``rtol * max(1, max|reference|)`` of it (float rounding of a
    folded model is ~1e-6 of that scale; a wrong graph is far off)."""
    if not isinstance(fast, torch.Tensor) or fast.shape != reference.shape \
            or fast.dtype != reference.dtype:
        return False
    ref = reference.detach().to(fast.device)
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return bool(((fast.detach() - ref).abs() <= rtol * scale).all())


def scoring_runner(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, bs: int, fold: bool
            ) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    """The module that scores `camanim.ybroad`'s perturbed images, and whether it wants
    channels-last inputs: the folded copy (CPU, float32/64, ``fold``) when
    its outputs on the first clean batch agree with ``logits``, else the
    model."""
    if not fold or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return model, False
    fast = folded_model(model)
    if fast is None:
        return model, False
    n = min(bs, x.shape[0])
    try:
        out = fast(x[:n].contiguous(memory_format=torch.channels_last))
    except Exception:  # noqa: BLE001 - a graph that fails on real inputs: run the model
        return model, False
    if not outputs_agree(out, logits[:n]):
        return model, False
    return fast, True


class FoldCache:
    """The folded stand-in of `camanim.ybroad` (``fold=``), traced and checked once
    for every call with the same model state, images and logits.

    `CAManimCallback` passes one per epoch to the layers' ybROAD and to the
    chance ROAD, which score the same probes with the same model. The key
    holds each parameter's and buffer's storage and version counter (an
    optimizer step or a BatchNorm update changes it), the caller's image
    tensor and the logits: any change folds and checks again. Drop the
    cache with the epoch: it holds the folded copy and the model.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: tuple[Callable[[torch.Tensor], torch.Tensor], bool] | None = None
        #: how many times the stand-in was built (a test's window on the cache)
        self.builds = 0

    def runner(self, model: nn.Module, images: torch.Tensor, x: torch.Tensor,
               logits: torch.Tensor, bs: int
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
        """`scoring_runner` for ``x`` (``images`` on the model's device), cached."""
        state = tuple((t.data_ptr(), t._version)
                      for t in (*model.parameters(), *model.buffers()))
        key = (id(model), state, images.data_ptr(), images._version, tuple(images.shape),
               x.dtype, x.device, logits.data_ptr(), logits._version, min(bs, x.shape[0]))
        if self._value is None or key != self._key:
            self._value, self._key = scoring_runner(model, x, logits, bs, True), key
            self.builds += 1
        return self._value
