"""Data of examples/finetune_bus: BUSI reader, synthetic set, split, transforms,
datamodule.  Small images only; the whole file runs in a few seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from finetune_bus import data as bd  # noqa: E402 - after the sys.path set-up above
from finetune_bus import synthetic as bs  # noqa: E402 - after the sys.path set-up above

# ---------------------------------------------------------------------------
# a small fake BUSI folder
# ---------------------------------------------------------------------------

def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _img(h=24, w=32, value=100, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(value, 10, (h, w)), 0, 255).astype(np.uint8)


def _mask(h=24, w=32, box=(4, 10, 6, 14)):
    m = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    return m


@pytest.fixture
def busi(tmp_path) -> Path:
    """Dataset_BUSI_with_GT with 10 malignant, 6 normal and 5 benign images,
    two-part masks, an RGB image, odd names and junk files."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    for i in range(1, 11):
        _png(root / "malignant" / f"malignant ({i}).png", _img(seed=i))
        _png(root / "malignant" / f"malignant ({i})_mask.png", _mask())
    # malignant (2): a second mask, disjoint from the first
    _png(root / "malignant" / "malignant (2)_mask_1.png", _mask(box=(15, 20, 20, 30)))
    # malignant (3): RGB image (pure red/green/blue stripes)
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:8, :, 0] = 255
    rgb[8:16, :, 1] = 255
    rgb[16:, :, 2] = 255
    _png(root / "malignant" / "malignant (3).png", rgb)
    # malignant (4): an RGB mask
    _png(root / "malignant" / "malignant (4)_mask.png", np.stack([_mask(box=(0, 5, 0, 5))] * 3, -1))
    # odd names: space before the extension, no space before the parenthesis, upper case
    _png(root / "malignant" / "malignant (11) .png", _img(seed=11))
    _png(root / "malignant" / "malignant (11)_mask.png", _mask(box=(1, 3, 1, 3)))
    _png(root / "malignant" / "Malignant(12).PNG", _img(seed=12))
    _png(root / "malignant" / "malignant (12) _mask_1.png", _mask(box=(2, 4, 2, 4)))
    for i in range(1, 7):
        _png(root / "normal" / f"normal ({i}).png", _img(seed=100 + i))
        _png(root / "normal" / f"normal ({i})_mask.png", np.zeros((24, 32), np.uint8))
    for i in range(1, 6):
        _png(root / "benign" / f"benign ({i}).png", _img(seed=200 + i))
        _png(root / "benign" / f"benign ({i})_mask.png", _mask())
    (root / "malignant" / ".DS_Store").write_bytes(b"\0junk")
    (root / "normal" / "Thumbs.db").write_bytes(b"junk")
    (root / "normal" / "notes.txt").write_text("not an image")
    return root


def _by_id(records):
    return {r["id"]: r for r in records}


def test_scan_classes_and_counts(busi):
    recs = bd.scan_busi(busi)
    counts = {c: sum(r["class"] == c for r in recs) for c in ("normal", "malignant", "benign")}
    assert counts == {"normal": 6, "malignant": 12, "benign": 0}
    recs3 = bd.scan_busi(busi, include_benign=True)
    assert sorted({r["class"] for r in recs3}) == ["benign", "malignant", "normal"]
    assert sum(r["class"] == "benign" for r in recs3) == 5
    # junk files and masks are not images
    assert not any("mask" in Path(r["image"]).name or r["image"].endswith((".db", ".txt"))
                   for r in recs3)
    assert bd.class_names(True) == ["normal", "benign", "malignant"]
    assert bd.class_names(False) == ["normal", "malignant"]


def test_multiple_masks_merged_by_or(busi):
    rec = _by_id(bd.scan_busi(busi))["malignant/malignant (2).png"]
    assert [Path(m).name for m in rec["masks"]] == [
        "malignant (2)_mask.png",
        "malignant (2)_mask_1.png",
    ]
    m = bd.load_record(rec)["mask"]
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert m[4:10, 6:14].all() and m[15:20, 20:30].all()
    assert m.sum() == 6 * 8 + 5 * 10


def test_rgb_image_and_rgb_mask_become_single_channel(busi):
    recs = _by_id(bd.scan_busi(busi))
    img = bd.load_record(recs["malignant/malignant (3).png"])["image"]
    assert img.shape == (24, 32) and img.dtype == np.uint8
    # ITU-R 601-2 luma of pure red, green, blue (PIL "L")
    assert (img[:8] == 76).all() and (img[8:16] == 150).all() and (img[16:] == 29).all()
    m = bd.load_record(recs["malignant/malignant (4).png"])["mask"]
    assert m.shape == (24, 32) and m.sum() == 25


def test_odd_names_are_matched(busi):
    recs = _by_id(bd.scan_busi(busi))
    r11 = recs["malignant/malignant (11) .png"]
    assert [Path(m).name for m in r11["masks"]] == ["malignant (11)_mask.png"]
    assert bd.load_record(r11)["mask"].sum() == 4
    r12 = recs["malignant/Malignant(12).PNG"]
    assert [Path(m).name for m in r12["masks"]] == ["malignant (12) _mask_1.png"]
    # natural order: (2) before (10)
    ids = [r["id"] for r in bd.scan_busi(busi) if r["class"] == "malignant"]
    assert ids.index("malignant/malignant (2).png") < ids.index("malignant/malignant (10).png")


def test_parent_folder_is_accepted(busi):
    assert len(bd.scan_busi(busi.parent)) == len(bd.scan_busi(busi))


def test_wrong_layout_raises_clear_error(tmp_path, busi):
    with pytest.raises(bd.BUSILayoutError, match="does not exist"):
        bd.scan_busi(tmp_path / "nope")
    bad = tmp_path / "bad"
    (bad / "normal").mkdir(parents=True)
    (bad / "tumours").mkdir()
    with pytest.raises(bd.BUSILayoutError, match="malignant/") as e:
        bd.scan_busi(bad)
    assert (
        "malignant/" in str(e.value)
        and "tumours/" in str(e.value)
        and "Dataset_BUSI_with_GT" in str(e.value)
    )
    # benign is only required with --include-benign
    import shutil
    shutil.rmtree(busi / "benign")
    assert bd.scan_busi(busi)
    with pytest.raises(bd.BUSILayoutError, match="benign/"):
        bd.scan_busi(busi, include_benign=True)
    empty = tmp_path / "empty"
    (empty / "normal").mkdir(parents=True)
    (empty / "malignant").mkdir()
    with pytest.raises(bd.BUSILayoutError, match="no images"):
        bd.scan_busi(empty)


def test_non_square_image_keeps_orientation(tmp_path):
    """H=40, W=60: bright top band, lesion mask bottom-left.  A transposing
    reader (MONAI PILReader without reverse_indexing=False) would fail."""
    img = np.full((40, 60), 20, np.uint8)
    img[:10] = 230                       # bright top rows
    mask = np.zeros((40, 60), np.uint8)
    mask[28:38, 2:20] = 255              # bottom-left
    root = tmp_path / "Dataset_BUSI_with_GT"
    _png(root / "malignant" / "malignant (1).png", img)
    _png(root / "malignant" / "malignant (1)_mask.png", mask)
    _png(root / "normal" / "normal (1).png", img)
    rec = _by_id(bd.scan_busi(root))["malignant/malignant (1).png"]
    d = bd.load_record(rec)
    assert d["image"].shape == (40, 60) and d["mask"].shape == (40, 60)
    assert (d["image"][:10] == 230).all() and d["mask"][30, 5] == 1 and d["mask"][5, 50] == 0

    out = bd.make_transforms(32, ["normal", "malignant"], train=False)(rec)
    x, m = out["image"], out["mask"]
    assert x.shape == (3, 32, 32) and m.shape == (32, 32)
    top, bottom = x[:, :6].mean(), x[:, 12:].mean()
    left, right = x[:, :, :6].mean(), x[:, :, -6:].mean()
    assert top > bottom + 1.0            # still bright at the top, not on the left
    assert abs(left - right) < 0.1
    assert m[26, 4] == 1 and m[4, 26] == 0 and m[26, 28] == 0


def test_stratified_split_proportions_and_determinism():
    recs = bd.synthetic_records(include_benign=False, seed=0)
    assert len(recs) == 343
    s0 = bd.stratified_split(recs, seed=0)
    cls = {r["id"]: r["class"] for r in recs}

    def count(part, c):
        return sum(cls[i] == c for i in s0[part])

    assert (count("train", "malignant"), count("val", "malignant"), count("test", "malignant")) == (
        168,
        21,
        21,
    )
    assert (count("train", "normal"), count("val", "normal"), count("test", "normal")) == (
        107,
        13,
        13,
    )
    all_ids = s0["train"] + s0["val"] + s0["test"]
    assert len(all_ids) == len(set(all_ids)) == 343
    assert bd.stratified_split(recs, seed=0) == s0
    s1 = bd.stratified_split(recs, seed=1)
    assert set(s1["test"]) != set(s0["test"])


def test_limit_keeps_class_proportions():
    recs = bd.synthetic_records(seed=0)
    lim = bd.limit_records(recs, 40, seed=0)
    n_mal = sum(r["class"] == "malignant" for r in lim)
    assert len(lim) == 40 and n_mal == 24
    assert bd.limit_records(recs, 40, seed=0) == lim
    assert {r["id"] for r in bd.limit_records(recs, 40, seed=1)} != {r["id"] for r in lim}
    # tiny limits still give each class three images (one per split)
    tiny = bd.limit_records(recs, 6, seed=0)
    assert all(sum(r["class"] == c for r in tiny) >= 3 for c in ("normal", "malignant"))
    s = bd.stratified_split(tiny, seed=0)
    assert all(len(s[p]) >= 2 for p in ("train", "val", "test"))


def test_split_json_round_trip(tmp_path):
    recs = bd.limit_records(bd.synthetic_records(seed=3), 30, seed=3)
    split = bd.stratified_split(recs, seed=3)
    p = bd.save_split(tmp_path / "run" / "split.json", split, seed=3, source="synthetic")
    payload = bd.load_split(p)
    assert {k: payload[k] for k in ("train", "val", "test")} == split
    assert payload["seed"] == 3 and payload["counts"]["test"] == len(split["test"])
    # a datamodule given the file uses exactly that split (ignoring its own seed)
    dm = bd.BUSDataModule(image_size=32, seed=99, split_file=p)
    dm.setup()
    assert dm.split == split
    assert [r["id"] for r in dm.parts["val"]] == split["val"]
    # an id the data set does not have is an error, not silently dropped
    bad = dict(payload, test=payload["test"] + ["malignant/malignant (999).png"])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not in the data set"):
        bd.BUSDataModule(image_size=32, split_file=tmp_path / "bad.json").setup()
    with pytest.raises(FileNotFoundError, match=r"split file .*missing\.json does not exist"):
        bd.load_split(tmp_path / "missing.json")


# ---------------------------------------------------------------------------
# synthetic set
# ---------------------------------------------------------------------------

def _bbox(m):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return rows[0], rows[-1], cols[0], cols[-1]


def test_synthetic_deterministic_by_seed():
    a = bs.synthesize_bus_image("malignant", 5, seed=0, size=96)
    b = bs.synthesize_bus_image("malignant", 5, seed=0, size=96)
    c = bs.synthesize_bus_image("malignant", 5, seed=1, size=96)
    d = bs.synthesize_bus_image("malignant", 6, seed=0, size=96)
    assert a[0].dtype == np.uint8 and a[0].shape == (96, 96) and a[1].shape == (96, 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    # not a constant image: it has texture over most of the range
    assert a[0].std() > 20 and np.ptp(a[0]) > 150


@pytest.mark.parametrize("index", range(6))
def test_synthetic_lesions(index):
    size = 128
    img, m = bs.synthesize_bus_image("malignant", index, seed=0, size=size)
    _, nm = bs.synthesize_bus_image("normal", index, seed=0, size=size)
    bimg, bm = bs.synthesize_bus_image("benign", index, seed=0, size=size)
    assert nm.sum() == 0
    assert m.sum() > 0.005 * size * size and bm.sum() > 0.005 * size * size
    y0, y1, x0, x1 = _bbox(m)
    assert (y1 - y0) > (x1 - x0), "malignant: taller than wide"
    by0, by1, bx0, bx1 = _bbox(bm)
    assert (bx1 - bx0) > (by1 - by0), "benign: wider than tall"
    from scipy import ndimage
    f, inside = img.astype(float), m > 0
    ring = ndimage.binary_dilation(inside, iterations=6) & ~ndimage.binary_dilation(
        inside, iterations=2
    )
    assert f[inside].mean() < 0.8 * f[ring].mean(), "malignant: hypoechoic (darker than around it)"


def _posterior_ratio(img, m):
    """Mean intensity just below the mass / the same rows away from it."""
    f = img.astype(float)
    size = f.shape[0]
    y0, y1, x0, x1 = _bbox(m)
    cx0, cx1 = x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4
    rows = slice(y1 + 3, min(size, y1 + 3 + size // 6))
    under = f[rows, cx0:cx1 + 1].mean()
    side = np.concatenate(
        [f[rows, : max(1, x0 - 8)].ravel(), f[rows, min(size - 1, x1 + 8) :].ravel()]
    ).mean()
    return under / side


def test_synthetic_posterior_shadowing_and_enhancement():
    """Most malignant masses cast a shadow below them; benign ones do not
    (they tend to enhance)."""
    mal = [_posterior_ratio(*bs.synthesize_bus_image("malignant", i, 0, 96)) for i in range(20)]
    ben = [_posterior_ratio(*bs.synthesize_bus_image("benign", i, 0, 96)) for i in range(20)]
    assert np.mean(np.array(mal) < 0.85) >= 0.6, mal
    assert np.mean(np.array(ben) < 0.85) <= 0.1, ben
    assert np.median(ben) > np.median(mal) + 0.3


def test_synthetic_records_and_cache():
    recs = bd.synthetic_records(include_benign=True, seed=0, counts={"benign": 4})
    assert sum(r["class"] == "benign" for r in recs) == 4 and len(recs) == 133 + 210 + 4
    r = next(r for r in recs if r["class"] == "malignant")
    d1, d2 = bd.load_record(r), bd.load_record(r)
    assert d1["image"] is d2["image"]                      # cached in memory
    assert not d1["image"].flags.writeable
    assert np.array_equal(d1["image"], bs.synthesize_bus_image("malignant", 0, 0, 224)[0])


# ---------------------------------------------------------------------------
# transforms and datamodule
# ---------------------------------------------------------------------------

def test_datamodule_batches(tmp_path):
    dm = bd.BUSDataModule(image_size=48, batch_size=8, limit=30, seed=0)
    dm.setup()
    assert dm.num_classes == 2 and dm.classes == ["normal", "malignant"]
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (8, 3, 48, 48) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (8, 48, 48) and b["mask"].dtype == torch.float32
    assert b["label"].shape == (8,) and b["label"].dtype == torch.int64
    assert isinstance(b["id"], list) and len(b["id"]) == 8
    assert set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    assert type(b["image"]) is torch.Tensor               # no MetaTensor
    # ImageNet normalization of a [0, 1] image: below 0 and above 1 occur
    assert b["image"].min() < -1.0 and b["image"].max() > 1.5
    # the three channels are the same gray image, normalized per channel
    x = b["image"][0]
    g0 = x[0] * 0.229 + 0.485
    g1 = x[1] * 0.224 + 0.456
    assert torch.allclose(g0, g1, atol=1e-5)
    # masks follow the (augmented) image: lesions are dark
    mal = (b["label"] == 1) & (b["mask"].flatten(1).sum(1) > 5)
    assert mal.any()
    for i in torch.nonzero(mal).flatten().tolist():
        inside = b["image"][i, 0][b["mask"][i] > 0].mean()
        outside = b["image"][i, 0][b["mask"][i] == 0].mean()
        assert inside < outside
    for i in torch.nonzero(b["label"] == 0).flatten().tolist():
        assert b["mask"][i].sum() == 0
    # val batches are not augmented: identical on two passes
    v1 = next(iter(dm.val_dataloader()))
    v2 = next(iter(dm.val_dataloader()))
    assert torch.equal(v1["image"], v2["image"])


def test_augmentation_deterministic_by_seed():
    def first_batch(seed):
        dm = bd.BUSDataModule(image_size=32, batch_size=6, limit=24, seed=seed)
        return next(iter(dm.train_dataloader()))

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert (
        a["id"] == b["id"]
        and torch.equal(a["image"], b["image"])
        and torch.equal(a["mask"], b["mask"])
    )
    assert a["id"] != c["id"] or not torch.equal(a["image"], c["image"])


def test_probes_prefer_malignant_and_match_eval_transform():
    dm = bd.BUSDataModule(image_size=32, limit=60, seed=0)
    p = dm.probes(n=3)
    assert p["image"].shape == (3, 3, 32, 32) and p["mask"].shape == (3, 32, 32)
    assert p["label"].tolist() == [1, 1, 1] and all(
        i.startswith("synthetic/malignant/") for i in p["id"]
    )
    assert (p["mask"].flatten(1).sum(1) > 0).all()
    assert torch.equal(p["image"][0], dm.dataset("test")[
        [r["id"] for r in dm.parts["test"]].index(p["id"][0])]["image"])


def test_busi_datamodule_three_classes(busi):
    dm = bd.BUSDataModule(data_dir=busi, include_benign=True, image_size=32, batch_size=4, seed=0)
    dm.setup()
    assert dm.classes == ["normal", "benign", "malignant"] and dm.source.startswith("busi:")
    sizes = {p: len(r) for p, r in dm.parts.items()}
    assert sum(sizes.values()) == 6 + 5 + 12 and sizes["val"] == sizes["test"] == 3
    b = next(iter(dm.val_dataloader()))
    assert b["image"].shape[1:] == (3, 32, 32) and set(b["label"].tolist()) <= {0, 1, 2}
    ids = {r["id"]: r["class"] for rs in dm.parts.values() for r in rs}
    assert {ids[i] for i in b["id"]} <= {"normal", "benign", "malignant"}


def test_exported_synthetic_set_reads_back_as_busi(tmp_path):
    root = bd.export_synthetic_busi(tmp_path, include_benign=True, seed=0, size=48, limit=12)
    recs = bd.scan_busi(root, include_benign=True)
    synth = {(r["class"], r["synthetic"]["index"] + 1): r
             for r in bd.limit_records(bd.synthetic_records(True, 0, 48), 12, 0)}
    # "about" 12: the minimum of 3 per class adds one normal image
    assert len(recs) == len(synth) == 13 and {r["class"] for r in recs} == {
        "normal",
        "benign",
        "malignant",
    }
    for r in recs:
        n = int(Path(r["image"]).stem.split("(")[1].rstrip(")"))
        a, b = bd.load_record(r), bd.load_record(synth[(r["class"], n)])
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
