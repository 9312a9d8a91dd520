"""`LayerMaps`: every selected layer's class activation map for a batch.

Raw maps are kept at each layer's own resolution, ReLU'd but not normalized,
so that both normalizations of the paper can be derived at the end:

* ``"local"``: min-max per layer per image (what pytorch-grad-cam returns
  for that single layer),
* ``"global"``: min-max over all layers of one image,
* ``"none"``: raw values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CAManimError
from .layers import LayerInfo

NORMALIZATIONS = ("local", "global", "none")
# pytorch-grad-cam's scale_cam_image divides by (1e-7 + max); we use the same
# epsilon so that "local" equals its output to float precision.
EPS = 1e-7
_FORMAT = "camanim.LayerMaps/1"


def minmax(x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
           eps: float = EPS) -> torch.Tensor:
    """Min-max scaling ``(x - lo) / (eps + hi - lo)``; camanim's only one.

    Args:
        x: ``(N, ...)`` maps; float16 / bfloat16 are computed in float32.
        lo, hi: bounds broadcastable to ``x``; default: each row's own min
            and max over all dimensions but the first (shape ``(N, 1, ...)``).
        eps: ``1e-7`` (default) is pytorch-grad-cam's ``scale_cam_image``;
            Score-CAM's masks use ``1e-8``. ``eps=0``: a constant row gives
            zeros, not NaN (SISE's masks).

    Returns:
        Scaled maps, the shape of ``x`` (float32 for half-precision input).
    """
    x = wide(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    lo = x.flatten(1).amin(1).view(view) if lo is None else lo.to(x.dtype)
    hi = x.flatten(1).amax(1).view(view) if hi is None else hi.to(x.dtype)
    rng = hi - lo
    if eps:
        return (x - lo) / (eps + rng)
    ok = rng > 0
    return torch.where(ok, (x - lo) / torch.where(ok, rng, torch.ones_like(rng)),
                       torch.zeros_like(x))


def image_size(x: torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of a ``(..., H, W)`` tensor."""
    return int(x.shape[-2]), int(x.shape[-1])


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is float16 / bfloat16, else unchanged: maps,
    sums and min-max of a half-precision model are accumulated in float32
    (the model itself runs in its own dtype)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def exact_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype for sums and solves that want float64: float64 on the CPU,
    float32 on any accelerator (MPS has no float64; consumer GPUs run it
    32-64x slower than float32)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def resize_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, h, w)`` maps to ``(N, H, W)`` (half precision
    is resized in float32).

    ``align_corners=False`` without antialiasing samples exactly like
    OpenCV's ``cv2.resize(..., INTER_LINEAR)``, which pytorch-grad-cam uses.
    """
    maps = wide(maps)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


@dataclass
class LayerMaps:
    """Class activation maps of L layers for a batch of B images.

    Attributes:
        names: L layer-call names in forward-execution order
            (``"layer1.0.relu#2"`` for the second call of a reused module).
        raw: L tensors of shape ``(B, h_l, w_l)``: ReLU'd, not normalized,
            each at its layer's own resolution.
        input_size: ``(H, W)`` of the images the maps explain.
        layers: L `LayerInfo` records (type, output shape, parameters, ...).
        targets: ``(B,)`` class indices explained, or ``None`` when the
            targets were user callables without a class index.
        method: name of the CAM method.
        seconds: L per-layer compute times in seconds (the shared forward and
            backward pass is spread evenly over the layers).
        extra: per-layer method details, e.g. ``{"n_masks": [..]}``.
        logits: ``(B, K)`` model outputs (eval mode) of the pass that made
            the maps, when the method has one (ybROAD reuses them instead
            of a second clean forward); not saved by `save`.
    """

    names: list[str]
    raw: list[torch.Tensor]
    input_size: tuple[int, int]
    layers: list[LayerInfo]
    targets: torch.Tensor | None = None
    method: str = ""
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, list[object]] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.raw) or len(self.names) != len(self.layers):
            raise CAManimError(
                f"LayerMaps needs as many names ({len(self.names)}), raw maps "
                f"({len(self.raw)}) and layer records ({len(self.layers)}).")
        self.input_size = (int(self.input_size[0]), int(self.input_size[1]))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(zip(self.names, self.raw, strict=False))

    @property
    def batch_size(self) -> int:
        return int(self.raw[0].shape[0]) if self.raw else 0

    @property
    def params(self) -> list[int]:
        """Own parameter count of every layer (paper Fig. 3)."""
        return [info.params for info in self.layers]

    def index(self, name: str) -> int:
        """Position of layer ``name``; a clear error if it is not here."""
        try:
            return self.names.index(name)
        except ValueError:
            raise CAManimError(f"no layer {name!r} in these maps; layers are "
                               f"{_short_list(self.names)}") from None

    def select(self, which: Sequence[int] | Sequence[str]) -> LayerMaps:
        """A new `LayerMaps` with only the given layers (indices or names)."""
        idx = [self.index(w) if isinstance(w, str) else int(w) for w in which]
        return LayerMaps(
            names=[self.names[i] for i in idx],
            raw=[self.raw[i] for i in idx],
            input_size=self.input_size,
            layers=[self.layers[i] for i in idx],
            targets=self.targets,
            method=self.method,
            seconds=[self.seconds[i] for i in idx] if self.seconds else [],
            extra={k: [v[i] for i in idx] for k, v in self.extra.items()
                   if isinstance(v, list) and len(v) == len(self)},
            logits=self.logits,
        )

    def image(self, b: int) -> LayerMaps:
        """The maps of image ``b`` alone (normalization is per image, so the
        normalized maps are the same)."""
        return LayerMaps(
            names=self.names,
            raw=[r[b : b + 1] for r in self.raw],
            input_size=self.input_size,
            layers=self.layers,
            targets=None if self.targets is None else self.targets.reshape(-1)[b : b + 1],
            method=self.method,
            seconds=self.seconds,
            extra=self.extra,
            logits=None if self.logits is None else self.logits[b : b + 1],
        )

    def to(self, device: torch.device | str) -> LayerMaps:
        """The same maps on another device."""
        self.raw = [r.to(device) for r in self.raw]
        if self.logits is not None:
            self.logits = self.logits.to(device)
        return self

    # ----------------------------------------------------------- normalization
    def _range(self, normalization: str) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Per layer ``(B, 1, 1)`` lower and upper bounds for min-max."""
        if normalization not in NORMALIZATIONS:
            raise CAManimError(f"unknown normalization {normalization!r}; "
                               f"use one of {', '.join(NORMALIZATIONS)}")
        if normalization == "none":
            return None
        los = [wide(r).flatten(1).amin(1)[:, None, None] for r in self.raw]
        his = [wide(r).flatten(1).amax(1)[:, None, None] for r in self.raw]
        if normalization == "global":
            lo = torch.stack([x.to(los[0].device) for x in los]).amin(0)
            hi = torch.stack([x.to(his[0].device) for x in his]).amax(0)
            los = [lo.to(r.device) for r in self.raw]
            his = [hi.to(r.device) for r in self.raw]
        return los, his

    def normalized(self, normalization: str = "local") -> list[torch.Tensor]:
        """L tensors ``(B, h_l, w_l)`` normalized at native resolution
        (float32 for half-precision maps)."""
        rng = self._range(normalization)
        if rng is None:
            return [wide(r) for r in self.raw]
        return [minmax(r, lo, hi) for r, lo, hi in zip(self.raw, *rng, strict=False)]

    def iter_upsampled(self, normalization: str = "local",
                       size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """Yield one ``(B, H, W)`` map per layer, so memory stays flat
        (float32 for half-precision maps)."""
        size = self.input_size if size is None else (int(size[0]), int(size[1]))
        rng = self._range(normalization)
        for i, r in enumerate(self.raw):
            r = wide(r)
            m = r if rng is None else minmax(r, rng[0][i], rng[1][i])
            m = resize_map(m, size)
            if normalization == "local":
                # pytorch-grad-cam min-max scales again after resizing (its
                # aggregate step); bilinear samples miss the native extremes
                m = minmax(m)
            yield m

    def upsample(self, normalization: str = "local",
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """All maps at input size: ``(L, B, H, W)``.

        Normalization happens at each layer's own resolution, then a bilinear
        resize; ``"local"`` then min-max scales the resized map once more,
        exactly the steps of pytorch-grad-cam, so it equals its output for
        that single layer. ``"global"`` uses the min and max of all raw maps
        of one image (at native resolution).
        """
        return torch.stack(list(self.iter_upsampled(normalization, size)))

    # ------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` file (no pickle); `load` reads it back."""
        path = Path(path)
        if path.suffix != ".npz":
            path = (
                path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
            )
        meta = {
            "format": _FORMAT,
            "names": self.names,
            "input_size": list(self.input_size),
            "layers": [asdict(info) for info in self.layers],
            "method": self.method,
            "seconds": list(self.seconds),
            "extra": self.extra,
            "has_targets": self.targets is not None,
        }
        arrays = {f"raw_{i:05d}": r.detach().cpu().numpy() for i, r in enumerate(self.raw)}
        if self.targets is not None:
            arrays["targets"] = self.targets.detach().cpu().numpy()
        from .files import atomic_path

        with atomic_path(path) as tmp:  # never a half-written file under the real name
            # numpy's stub matches **arrays against the allow_pickle: bool keyword
            np.savez_compressed(tmp, meta=np.array(json.dumps(meta)),
                                **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayerMaps:
        """Read maps written by `save`."""
        path = Path(path)
        if not path.exists() and path.suffix != ".npz" and \
                (path.with_name(path.name + ".npz")).exists():
            path = path.with_name(path.name + ".npz")      # save() added the suffix
        if not path.exists():
            raise CAManimError(f"no LayerMaps file at {path}")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != _FORMAT:
                raise CAManimError(f"{path} is not a camanim LayerMaps file")
            raw = [torch.from_numpy(data[f"raw_{i:05d}"].copy()) for i in range(len(meta["names"]))]
            targets = torch.from_numpy(data["targets"].copy()) if meta["has_targets"] else None
        layers = [LayerInfo.from_dict(d) for d in meta["layers"]]
        return cls(names=meta["names"], raw=raw, input_size=tuple(meta["input_size"]),
                   layers=layers, targets=targets, method=meta["method"],
                   seconds=meta["seconds"], extra=meta["extra"])

    def __repr__(self) -> str:
        return (f"LayerMaps(method={self.method!r}, layers={len(self)}, "
                f"batch={self.batch_size}, input_size={self.input_size})")


def _short_list(names: Sequence[str], n: int = 12) -> str:
    if len(names) <= n:
        return ", ".join(names)
    return ", ".join(list(names[: n // 2]) + ["..."] + list(names[-n // 2:]))
