"""`camanim.lightning.epoch`: the pieces of one monitored epoch (the engine
built from values, the probes kept, the typed record) and the record's
round trip through the checkpoint state and ybroad.csv."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camanim import CAManimError
from camanim.engine import CAManim
from camanim.lightning.epoch import build_engine, epoch_record, finite_probes, pick, state_key_parts
from camanim.runs.history import EpochRecord, History, group_rows, record_from_rows

NET = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                          torch.nn.Linear(4, 3))


def test_build_engine_takes_values_and_gives_integrated_gradcam_the_baseline():
    kw = dict(cam_options={"max_layers": 1}, seed=3, progress=False, batch_size=5,
              mean=[0.5], std=[0.25])
    anim = build_engine(NET, "gradcam", "conv", **kw)
    assert isinstance(anim, CAManim) and anim.max_layers == 1 and anim.seed == 3
    assert anim.batch_size == 5 and anim.options == {}      # mean/std: IG only
    ig = build_engine(NET, "integrated-gradcam", "conv", **{**kw, "batch_size": None})
    assert ig.options["mean"] == [0.5] and ig.options["std"] == [0.25]
    own = build_engine(NET, "integrated-gradcam", "conv",
                       **{**kw, "cam_options": {"mean": [0.1]}})
    assert own.options["mean"] == [0.1]                     # the user's own wins


def test_state_key_parts_name_a_callable_selector_stably():
    def convs(name, module):
        return isinstance(module, torch.nn.Conv2d)

    parts = state_key_parts("gradcam", convs, ["a", "b"])
    assert parts == dict(method="gradcam", layers=f"callable:{convs.__qualname__}",
                         probes=["a", "b"])
    assert state_key_parts("gradcam", ["f.0"], ["a"])["layers"] == "['f.0']"


def test_finite_probes_names_the_bad_ones_and_refuses_all_bad():
    x = torch.rand(3, 3, 8, 8)
    x[1, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"epoch 4: the logits of probe\(s\) b are NaN"):
        keep = finite_probes(NET, x, ["a", "b", "c"], 4)
    assert keep.tolist() == [True, False, True]
    with pytest.raises(CAManimError, match="NaN or Inf for every probe.*diverged"):
        finite_probes(NET, torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], None)
    assert pick(["a", "b", "c"], keep) == ["a", "c"] and pick(x, keep).shape[0] == 2
    assert pick(None, keep) is None


def test_epoch_record_leaves_dropped_probes_missing_and_round_trips(tmp_path):
    x = torch.rand(2, 3, 8, 8)
    maps = CAManim(NET, "gradcam", "conv", progress=False)(x, [0, 2])
    keep = np.array([True, False, True])
    road = np.array([[0.25, np.nan]])                        # (L, K), K kept probes
    rec = epoch_record(7, maps, road, None, ["a", "b", "c"], keep, masked=[])
    assert isinstance(rec, EpochRecord) and rec.global_step == 7
    assert rec.targets == {"a": 0, "b": None, "c": 2}
    assert rec.road == {"a": [0.25], "b": [None], "c": [None]} and rec.ebpg is None
    assert EpochRecord.from_dict({**rec.to_dict(), "future_key": 1}) == rec
    h = History(["a", "b", "c"])
    h[3] = rec
    h.write_csv(tmp_path, 3, rec.method)
    import csv

    with open(tmp_path / "ybroad.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = group_rows(rows)
    back = record_from_rows({p: groups[(rec.method, p)][3] for p in ("a", "b", "c")},
                            rec.method)
    assert back is not None and back.road == rec.road and back.targets == rec.targets
    fresh = History(["a", "b", "c"])
    fresh.recover(tmp_path, rec.method)                       # read back from the CSV
    assert fresh.epochs == [3] and fresh[3].road == rec.road


def test_above_chance_counts_scored_layers_strictly_above_the_line():
    rec = EpochRecord(global_step=1, names=["a", "b", "c", "d"], method="m",
                      targets={"p": 0}, road={"p": [0.3, 0.2, None, 0.1]},
                      chance={"random": {"p": 0.2}, "blob": {"p": None}})
    assert rec.above_chance("p") == (1, 3, 0.2)               # equal is not above
    assert rec.chance_of("p", "blob") is None
    assert EpochRecord(global_step=1, names=[], method="m", targets={}).above_chance("p") is None
