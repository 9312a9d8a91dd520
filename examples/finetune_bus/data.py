"""Data for the breast-ultrasound example: BUSI reader, synthetic set, split,
MONAI transforms and a LightningDataModule.

Records
    Every image is a *record* (a dict) before loading::

        {"id": "malignant/malignant (1).png", "class": "malignant",
         "image": "/abs/path.png", "masks": ["/abs/path_mask.png", ...]}
        {"id": "synthetic/malignant/0007", "class": "malignant",
         "synthetic": {"kind": "malignant", "index": 7, "seed": 0, "size": 224}}

    ``id`` is stable (a path relative to the data folder, or the synthetic
    recipe), so a split written as JSON can be re-read by a later run.

Batches
    ``{"image": float32 (B, 3, S, S) ImageNet-normalized,
       "mask": float32 (B, S, S) in {0, 1} (the lesion; all 0 for normal),
       "label": int64 (B,), "id": list[str]}``

Orientation
    Images are read with PIL into ``(H, W)`` numpy arrays (rows first) and
    only MONAI *array* transforms are applied.  MONAI's ``PILReader`` would
    return ``(W, H)`` unless ``reverse_indexing=False``; we never use it, and
    ``tests/test_bus_data.py`` checks a non-square image keeps its
    orientation.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from camanim.core.images import IMAGENET_MEAN, IMAGENET_STD  # re-exported for train.py

try:  # part of the finetune_bus package (tests) or run as a script
    from .synthetic import BUSI_COUNTS, cached_bus_image, synthesize_bus_image
except ImportError:  # pragma: no cover - script mode
    from synthetic import BUSI_COUNTS, cached_bus_image, synthesize_bus_image

__all__ = [
    "BUSI_COUNTS", "BUSILayoutError", "BUSDataModule", "IMAGENET_MEAN", "IMAGENET_STD",
    "class_names", "scan_busi", "synthetic_records", "load_record", "load_grayscale",
    "load_mask", "limit_records", "stratified_split", "save_split", "load_split",
    "apply_split", "make_transforms", "synthesize_bus_image", "export_synthetic_busi",
]


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
BUSI_FOLDER = "Dataset_BUSI_with_GT"
SPLIT_VERSION = 1

# "<base>_mask", "<base>_mask_1", tolerant to spaces/dashes: "x (3) _mask-2"
_MASK_RE = re.compile(r"^(?P<base>.*?)[\s_\-]*mask(?:[\s_\-]*(?P<k>\d+))?$", re.IGNORECASE)


class BUSILayoutError(ValueError):
    """The folder given as ``--data-dir`` does not look like BUSI."""


def class_names(include_benign: bool = False) -> list[str]:
    """Class order (= label index).  Binary: ``["normal", "malignant"]``, so
    label 1 (the positive class of AUROC, sensitivity) is malignant."""
    return ["normal", "benign", "malignant"] if include_benign else ["normal", "malignant"]


# ---------------------------------------------------------------------------
# BUSI folder
# ---------------------------------------------------------------------------

def _key(stem: str) -> str:
    """Matching key of an image/mask base name: case and whitespace ignored."""
    return re.sub(r"\s+", "", stem).lower()


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


_LAYOUT_HELP = (
    "Expected the BUSI layout (Kaggle 'Breast Ultrasound Images Dataset', "
    "Al-Dhabyani et al. 2020):\n"
    f"  {BUSI_FOLDER}/\n"
    "    benign/     benign (1).png, benign (1)_mask.png, ...\n"
    "    malignant/  malignant (1).png, malignant (1)_mask.png, malignant (1)_mask_1.png, ...\n"
    "    normal/     normal (1).png, normal (1)_mask.png, ...\n"
    "Pass the Dataset_BUSI_with_GT folder (or the folder that contains it) as --data-dir, "
    "or leave --data-dir out to use the synthetic set."
)


def _resolve_busi_root(data_dir: Path, classes: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    if not data_dir.exists():
        raise BUSILayoutError(f"--data-dir {data_dir} does not exist.\n{_LAYOUT_HELP}")
    if not data_dir.is_dir():
        raise BUSILayoutError(f"--data-dir {data_dir} is not a folder.\n{_LAYOUT_HELP}")

    def class_dirs(root: Path) -> dict[str, Path]:
        found = {}
        for p in root.iterdir():
            if p.is_dir() and p.name.lower() in classes:
                found[p.name.lower()] = p
        return found

    found = class_dirs(data_dir)
    if not found:  # the folder that contains Dataset_BUSI_with_GT (Kaggle zip)
        subs = [p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        nested = [p for p in subs if p.name.lower() == BUSI_FOLDER.lower()] or (
            subs if len(subs) == 1 else []
        )
        for sub in nested:
            if class_dirs(sub):
                data_dir, found = sub, class_dirs(sub)
                break
    missing = [c for c in classes if c not in found]
    if missing:
        present = sorted(p.name + "/" for p in data_dir.iterdir() if p.is_dir()) or [
            "(no sub-folders)"
        ]
        raise BUSILayoutError(
            f"{data_dir} is missing the class folder(s) {', '.join(m + '/' for m in missing)}; "
            f"found: {', '.join(present)}.\n{_LAYOUT_HELP}")
    return data_dir, found


def scan_busi(data_dir: str | Path, include_benign: bool = False) -> list[dict]:
    """Records of a BUSI folder (``Dataset_BUSI_with_GT``).

    Masks ``<name>_mask.png``, ``<name>_mask_1.png``, ... are attached to the
    image ``<name>.png`` (case and spaces ignored when matching) and merged
    by OR when loaded.  Hidden and non-image files are skipped.  Raises
    :class:`BUSILayoutError` when the layout is wrong or a class has no image.
    """
    classes = class_names(include_benign)
    root, dirs = _resolve_busi_root(Path(data_dir).expanduser(), classes)
    records: list[dict] = []
    orphans: list[str] = []
    unmasked: list[str] = []
    for cls in classes:
        images: dict[str, Path] = {}
        masks: dict[str, list[Path]] = {}
        for p in sorted(dirs[cls].iterdir(), key=lambda q: _natural(q.name)):
            if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTS:
                continue
            m = _MASK_RE.match(p.stem)
            if m and m.group("base").strip():
                masks.setdefault(_key(m.group("base")), []).append(p)
            else:
                k = _key(p.stem)
                if k in images:
                    warnings.warn(f"BUSI: two images share the name {p.stem!r} in {dirs[cls]}; "
                                  f"keeping {images[k].name}", stacklevel=2)
                    continue
                images[k] = p
        if not images:
            raise BUSILayoutError(
                f"{dirs[cls]} contains no images (png/jpg/bmp/tif).\n{_LAYOUT_HELP}"
            )
        orphans += [str(v[0]) for k, v in masks.items() if k not in images]
        for k, p in images.items():
            ms = sorted(masks.get(k, []), key=lambda q: _natural(q.name))
            if not ms:
                unmasked.append(str(p))
            records.append({
                "id": f"{dirs[cls].name}/{p.name}",
                "class": cls,
                "image": str(p),
                "masks": [str(m) for m in ms],
            })
    if orphans:
        warnings.warn(
            f"BUSI: {len(orphans)} mask(s) without an image were ignored, e.g. {orphans[0]}",
            stacklevel=2)
    if unmasked:
        warnings.warn(f"BUSI: {len(unmasked)} image(s) have no mask (an empty mask is used), "
                      f"e.g. {unmasked[0]}", stacklevel=2)
    return records


def load_grayscale(path: str | Path) -> np.ndarray:
    """An image file as a ``uint8`` ``(H, W)`` array (rows first).

    RGB/RGBA/palette images are converted to luminance (PIL ``"L"``);
    16-bit and float images are rescaled to 0..255."""
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
            return np.rint(a).astype(np.uint8)
        return np.array(im.convert("L"), dtype=np.uint8)


def load_mask(paths: Iterable[str | Path], shape: tuple[int, int]) -> np.ndarray:
    """The OR of all mask files as a ``uint8`` ``(H, W)`` array in {0, 1}.

    Works for 0/255 and 0/1 masks and RGB masks; a mask whose size differs
    from the image is resized (nearest) with a warning."""
    out = np.zeros(shape, dtype=bool)
    for p in paths:
        m = load_grayscale(p)
        if m.shape != tuple(shape):
            warnings.warn(
                f"mask {p} has shape {m.shape}, image has {tuple(shape)}: resized (nearest)",
                stacklevel=2)
            m = np.array(Image.fromarray(m).resize((shape[1], shape[0]), Image.NEAREST))
        if m.max() > 0:
            out |= m > (m.max() / 2)
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------
# synthetic set
# ---------------------------------------------------------------------------

def synthetic_records(include_benign: bool = False, seed: int = 0, size: int = 224,
                      counts: dict[str, int] | None = None) -> list[dict]:
    """Records of the synthetic set (images are made when loaded, then cached).

    ``counts`` defaults to BUSI's (133 normal, 210 malignant, 437 benign)."""
    counts = dict(BUSI_COUNTS, **(counts or {}))
    return [
        {"id": f"synthetic/{cls}/{i:04d}", "class": cls,
         "synthetic": {"kind": cls, "index": i, "seed": int(seed), "size": int(size)}}
        for cls in class_names(include_benign) for i in range(int(counts[cls]))
    ]


_SYNTH_ID = re.compile(r"^synthetic/(?P<kind>normal|benign|malignant)/(?P<index>\d+)$")


def load_record(rec: dict) -> dict:
    """Load one record: ``{"image": uint8 (H, W), "mask": uint8 (H, W), "id", "class"}``."""
    if "synthetic" in rec:
        s = rec["synthetic"]
        img, mask = cached_bus_image(s["kind"], int(s["index"]), int(s["seed"]), int(s["size"]))
    else:
        img = load_grayscale(rec["image"])
        mask = load_mask(rec.get("masks", []), img.shape)
    return {"image": img, "mask": mask, "id": rec["id"], "class": rec["class"]}


# ---------------------------------------------------------------------------
# limit and split
# ---------------------------------------------------------------------------

def _by_class(records: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["class"], []).append(r)
    return out


def limit_records(records: Sequence[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """At most ``limit`` records, keeping the class proportions (at least 3
    per class, so every split gets one).  Seeded; ``None`` keeps all."""
    if limit is None or limit >= len(records):
        return list(records)
    groups = _by_class(records)
    total = len(records)
    quota = {c: max(min(3, len(g)), int(round(limit * len(g) / total))) for c, g in groups.items()}
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    keep = set()
    for c, g in groups.items():
        idx = rng.permutation(len(g))[: quota[c]]
        keep.update(g[i]["id"] for i in idx)
    return [r for r in records if r["id"] in keep]


def stratified_split(records: Sequence[dict], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> dict[str, list[str]]:
    """Seeded per-class split of record ids into ``train``/``val``/``test``.

    Per class: ``round(n * f_val)`` validation and ``round(n * f_test)`` test
    images (at least one each when the class has 3 or more), the rest train."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, g in sorted(_by_class(records).items()):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2, *map(ord, c)]))
        ids = [g[i]["id"] for i in rng.permutation(len(g))]
        n = len(ids)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n >= 3:
            n_val, n_test = (
                max(n_val, 1 if fractions[1] > 0 else 0),
                max(n_test, 1 if fractions[2] > 0 else 0),
            )
        split["val"] += ids[:n_val]
        split["test"] += ids[n_val:n_val + n_test]
        split["train"] += ids[n_val + n_test:]
    return split


def save_split(path: str | Path, split: dict[str, list[str]], **info: Any) -> Path:
    """Write a split (and provenance: seed, source, classes, ...) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": SPLIT_VERSION,
        **info,
        "counts": {k: len(v) for k, v in split.items()},
        "train": list(split["train"]),
        "val": list(split["val"]),
        "test": list(split["test"]),
    }
    path.write_text(json.dumps(payload, indent=1))
    return path


def load_split(path: str | Path) -> dict[str, Any]:
    """Read a split JSON written by :func:`save_split` (train/val/test id lists
    plus whatever provenance it holds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist (a run writes one as split.json "
                                "in its run folder)")
    payload = json.loads(path.read_text())
    for k in ("train", "val", "test"):
        if not isinstance(payload.get(k), list):
            raise ValueError(f"split file {path} has no '{k}' list")
    seen: dict[str, str] = {}
    for k in ("train", "val", "test"):
        for i in payload[k]:
            if i in seen:
                raise ValueError(f"split file {path}: {i!r} is in both {seen[i]} and {k}")
            seen[i] = k
    return payload


def apply_split(records: Sequence[dict], split: dict[str, list[str]],
                include_benign: bool = False) -> dict[str, list[dict]]:
    """Records of each part of ``split``.  Ids of the synthetic set that are
    not in ``records`` are re-created from the id; other unknown ids raise."""
    by_id = {r["id"]: r for r in records}
    synth = next((r["synthetic"] for r in records if "synthetic" in r), None)
    allowed = set(class_names(include_benign))
    out: dict[str, list[dict]] = {}
    missing = []
    for part in ("train", "val", "test"):
        recs = []
        for i in split[part]:
            r = by_id.get(i)
            m = _SYNTH_ID.match(i)
            if r is None and m and synth is not None:
                r = {"id": i, "class": m["kind"],
                     "synthetic": dict(synth, kind=m["kind"], index=int(m["index"]))}
            if r is None:
                missing.append(i)
                continue
            if r["class"] not in allowed:
                raise ValueError(f"split holds {i!r} of class {r['class']!r}, but the classes are "
                                 f"{sorted(allowed)} (use --include-benign for three classes)")
            recs.append(r)
        out[part] = recs
    if missing:
        raise ValueError(f"{len(missing)} id(s) of the split file are not in the data set, "
                         f"e.g. {missing[0]!r}: was it written for another --data-dir?")
    return out


# ---------------------------------------------------------------------------
# transforms (MONAI)
# ---------------------------------------------------------------------------

class LoadBUSd:
    """Record -> ``{"image": float32 (H, W), "mask": float32 (H, W), "label", "id"}``."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    def __call__(self, rec: dict) -> dict:
        d = load_record(rec)
        return {"image": d["image"].astype(np.float32), "mask": d["mask"].astype(np.float32),
                "label": self.classes.index(d["class"]), "id": d["id"]}


class _Squeeze0:
    def __init__(self, key: str):
        self.key = key

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        d[self.key] = d[self.key][0]
        return d


def make_transforms(image_size: int, classes: Sequence[str], train: bool):
    """MONAI pipeline: load (PIL), channel first, scale intensity to [0, 1],
    resize to ``image_size``^2; for training random rotation (+-15 deg),
    zoom (0.9-1.1) and left-right flip (never up-down: shadowing points
    down); then 1 -> 3 channels and ImageNet normalization.  The mask follows
    every spatial transform (nearest neighbour)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        NormalizeIntensityd,
        RandFlipd,
        RandRotated,
        RandZoomd,
        RepeatChanneld,
        Resized,
        ScaleIntensityd,
    )
    keys = ["image", "mask"]
    tf: list = [
        LoadBUSd(classes),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        ScaleIntensityd("image", minv=0.0, maxv=1.0),
        Resized(keys, spatial_size=(image_size, image_size), mode=("area", "nearest")),
    ]
    if train:
        tf += [
            RandRotated(keys, range_x=math.radians(15), prob=0.5, mode=("bilinear", "nearest"),
                        padding_mode="zeros"),
            RandZoomd(keys, min_zoom=0.9, max_zoom=1.1, prob=0.5, mode=("bilinear", "nearest"),
                      padding_mode="constant"),
            RandFlipd(keys, spatial_axis=1, prob=0.5),
        ]
    tf += [
        RepeatChanneld("image", repeats=3),
        NormalizeIntensityd(
            "image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True
        ),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        _Squeeze0("mask"),
    ]
    return Compose(tf)


# ---------------------------------------------------------------------------
# LightningDataModule
# ---------------------------------------------------------------------------

class BUSDataModule(L.LightningDataModule):
    """BUSI (``data_dir``) or the synthetic set (``data_dir=None``), split
    80/10/10 per class, as MONAI ``CacheDataset`` s (the deterministic part of
    the pipeline is cached in memory once).

    ``setup()`` is idempotent and may be called before ``Trainer.fit`` (the
    example does, to write the split and pick probe images)."""

    def __init__(self, data_dir: str | Path | None = None, include_benign: bool = False,
                 image_size: int = 128, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0, limit: int | None = None, split_file: str | Path | None = None,
                 synthetic_size: int = 224, fractions: Sequence[float] = (0.8, 0.1, 0.1)):
        super().__init__()
        self.data_dir = Path(data_dir) if data_dir else None
        self.include_benign = include_benign
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.limit = limit
        self.split_file = Path(split_file) if split_file else None
        self.synthetic_size = int(synthetic_size)
        self.fractions = tuple(fractions)
        self.classes = class_names(include_benign)
        self.split: dict[str, list[str]] | None = None
        self.parts: dict[str, list[dict]] = {}
        self._datasets: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def source(self) -> str:
        return f"busi:{self.data_dir.resolve()}" if self.data_dir else "synthetic"

    def setup(self, stage: str | None = None) -> None:  # noqa: ARG002 - Lightning's hook signature
        if self._datasets:
            return
        if self.data_dir is not None:
            records = scan_busi(self.data_dir, self.include_benign)
        else:
            records = synthetic_records(self.include_benign, self.seed, self.synthetic_size)
        if self.split_file is not None:
            payload = load_split(self.split_file)
            if self.limit is not None:
                warnings.warn("--limit is ignored when --split-file is given", stacklevel=2)
            self.split = {k: list(payload[k]) for k in ("train", "val", "test")}
        else:
            records = limit_records(records, self.limit, self.seed)
            self.split = stratified_split(records, self.fractions, self.seed)
        self.parts = apply_split(records, self.split, self.include_benign)
        for part, recs in self.parts.items():
            if not recs:
                raise ValueError(f"the {part} split is empty; use more images (--limit)")
        from monai.data import CacheDataset
        for part, recs in self.parts.items():
            self._datasets[part] = CacheDataset(
                recs,
                transform=make_transforms(self.image_size, self.classes, train=part == "train"),
                cache_rate=1.0,
                num_workers=1,
                progress=False,
            )

    def dataset(self, part: str):
        self.setup()
        return self._datasets[part]

    def save_split(self, path: str | Path) -> Path:
        self.setup()
        return save_split(
            path,
            self.split,
            seed=self.seed,
            source=self.source,
            classes=self.classes,
            fractions=list(self.fractions),
            limit=self.limit,
        )

    def describe(self) -> str:
        """One line per split: counts per class."""
        self.setup()
        lines = []
        for part, recs in self.parts.items():
            counts = {c: sum(r["class"] == c for r in recs) for c in self.classes}
            lines.append(
                f"  {part:5s} {len(recs):4d}  " + ", ".join(f"{c} {n}" for c, n in counts.items())
            )
        return "\n".join(lines)

    def _loader(self, part: str, shuffle: bool):
        from monai.data.utils import set_rnd, worker_init_fn
        ds = self.dataset(part)
        g = torch.Generator().manual_seed(self.seed + {"train": 0, "val": 1, "test": 2}[part])
        if self.num_workers == 0:  # workers seed themselves (worker_init_fn)
            set_rnd(ds, self.seed)
        return torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            generator=g, worker_init_fn=worker_init_fn, drop_last=False,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def probes(self, n: int = 4, part: str = "test",
               prefer: Sequence[str] = ("malignant",)) -> dict[str, Any]:
        """``n`` images of ``part`` (un-augmented), classes in ``prefer`` first
        (the paper explains a malignant test image), as one batch:
        ``{"image": (n, 3, S, S), "mask": (n, S, S), "label": (n,), "id": [...]}``.
        Meant for ``CAManimCallback(batch["image"], masks=batch["mask"], ...)``."""
        self.setup()
        ds = self._datasets[part]
        recs = self.parts[part]
        order = sorted(range(len(recs)), key=lambda i: (recs[i]["class"] not in prefer, i))[:n]
        items = [ds[i] for i in order]
        return {"image": torch.stack([it["image"] for it in items]),
                "mask": torch.stack([it["mask"] for it in items]),
                "label": torch.tensor([it["label"] for it in items]),
                "id": [it["id"] for it in items]}


# ---------------------------------------------------------------------------
# export the synthetic set as a BUSI folder
# ---------------------------------------------------------------------------

def export_synthetic_busi(out_dir: str | Path, include_benign: bool = False, seed: int = 0,
                          size: int = 224, limit: int | None = None) -> Path:
    """Write the synthetic set in BUSI's layout (``<out_dir>/Dataset_BUSI_with_GT/
    <class>/<class> (N).png`` and ``<class> (N)_mask.png``, N from 1), e.g. to
    try ``--data-dir`` or ``camanim explain`` on PNG files.  Returns the
    ``Dataset_BUSI_with_GT`` folder."""
    root = Path(out_dir) / BUSI_FOLDER
    recs = limit_records(synthetic_records(include_benign, seed, size), limit, seed)
    for rec in recs:
        d = load_record(rec)
        cls, n = rec["class"], rec["synthetic"]["index"] + 1
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(d["image"]).save(root / cls / f"{cls} ({n}).png")
        Image.fromarray(d["mask"] * np.uint8(255)).save(root / cls / f"{cls} ({n})_mask.png")
    return root


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="python examples/finetune_bus/data.py",
        description="Write the synthetic breast-ultrasound set as a BUSI-style folder of PNGs "
                    "(Dataset_BUSI_with_GT/<class>/<class> (N).png + _mask.png).")
    ap.add_argument("out_dir", type=Path, help="folder to create Dataset_BUSI_with_GT in")
    ap.add_argument("--include-benign", action="store_true", help="also write the benign class")
    ap.add_argument(
        "--limit", type=int, default=None, help="about this many images in total (default: all)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    a = ap.parse_args()
    root = export_synthetic_busi(a.out_dir, a.include_benign, a.seed, a.size, a.limit)
    print(f"wrote {sum(1 for _ in root.rglob('*_mask.png'))} images and masks to {root}")
