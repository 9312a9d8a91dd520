"""The one model-state guard: everything camanim does to a model is undone.

`saved_modes` restores every submodule's train/eval flag; `untouched` also
restores the RNG streams, ``requires_grad``, ``.grad``, hooks and the
intra-op thread count, and reports in-place changes it cannot undo;
`one_torch_thread` runs small elementwise work on one intra-op thread.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["saved_modes", "eval_mode", "untouched", "one_torch_thread"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


@contextlib.contextmanager
def saved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own ``training`` flag when the block ends."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore every submodule's own mode after."""
    with saved_modes(model):
        model.eval()
        yield


def _cuda_devices(model: nn.Module) -> list[int]:
    if not torch.cuda.is_available() or \
            not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch: unannotated
        return []
    devs = {t.device.index for t in list(model.parameters()) + list(model.buffers())
            if t.device.type == "cuda"}
    devs.add(torch.cuda.current_device())
    return sorted(d for d in devs if d is not None)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run a block and leave ``model`` and the global RNG streams as they were.

    Saves and restores: the torch CPU and CUDA, numpy and Python ``random``
    states; torch's intra-op thread count; every submodule's ``training``
    flag; every parameter's ``requires_grad`` and ``.grad`` (the same tensor
    object); hooks added during the block are removed. In-place changes that
    cannot be undone without a copy (parameters, gradients, buffers such as
    BatchNorm statistics) are detected through their version counters and
    reported with a warning.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    threads = torch.get_num_threads()
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad, p._version,
              None if p.grad is None else p.grad._version) for p in params]
    buf_versions = [(b, b._version) for b in model.buffers()]
    hook_keys = [(m, {a: set(getattr(m, a).keys()) for a in _HOOK_DICTS if hasattr(m, a)})
                 for m in model.modules()]
    try:
        with saved_modes(model), torch.random.fork_rng(devices=_cuda_devices(model)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        changed = []
        for p, req, grad, ver, gver in flags:
            if p.requires_grad != req:
                p.requires_grad_(req)
            if p.grad is not grad:
                p.grad = grad
            if p._version != ver or (grad is not None and grad._version != gver):
                changed.append("parameters/gradients")
        if any(b._version != v for b, v in buf_versions):
            changed.append("buffers (e.g. BatchNorm statistics)")
        for m, keys in hook_keys:
            for attr, before in keys.items():
                d = getattr(m, attr)
                for k in [k for k in d if k not in before]:
                    del d[k]
        if changed:
            warnings.warn(f"camanim: the monitoring work changed {sorted(set(changed))} in "
                          "place; training may differ from a run without the callback. "
                          "Please report this.", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def one_torch_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the count.

    Upsampling one small map gains nothing from threads, and on a busy CPU
    (other processes on the cores) OpenMP's parallel regions stall: we
    measured ~100 ms instead of ~1 ms per 320x320 map on a loaded 2-core box.
    Callers that run many such blocks (the callback's media work) set the
    count once around all of them and pass ``enabled=False`` here.
    """
    if not enabled or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
