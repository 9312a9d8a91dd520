"""`camanim.lightning.media`: the bounded, ordered background queue of the
callback's pictures, and the small TensorBoard helpers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from camanim.engine import CAManim
from camanim.errors import CAManimError
from camanim.lightning.media import (
    EpochMedia,
    MediaQueue,
    gif_tag,
    tensorboard_norms,
    write_epoch_media,
)

# ------------------------------------------------------------------ the queue

def test_queue_is_bounded_ordered_and_blocks_when_full():
    q = MediaQueue(workers=2, max_pending=1)
    running, peak, order = [0], [0], []
    lock = threading.Lock()

    def job(e):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.15)
            order.append(e)
            with lock:
                running[0] -= 1
        return run

    t = time.perf_counter()
    for e in range(4):
        q.submit(e, job(e))
        assert q.in_flight <= 1
    submitted = time.perf_counter() - t
    q.drain()
    assert order == [0, 1, 2, 3] and peak[0] == 1
    # the 2nd, 3rd and 4th submit each waited for the job before them
    assert submitted >= 3 * 0.15 * 0.9 and q.waited_s >= 3 * 0.15 * 0.9
    q.close()


def test_queue_synchronous_mode_and_errors_handed_back_once():
    q = MediaQueue(workers=1, max_pending=0)
    ran = []
    q.submit(0, lambda: ran.append(threading.current_thread().name))
    assert ran == [threading.current_thread().name]  # media_queue=0: on the caller's thread

    def boom():
        raise OSError(28, "No space left on device")

    q2 = MediaQueue(workers=1, max_pending=1)
    q2.submit(3, boom)
    q2.drain()
    errs = q2.errors()
    assert [(e, type(x).__name__) for e, x in errs] == [(3, "OSError")]
    assert q2.errors() == []
    q2.close()


def test_tensorboard_gets_local_and_global_as_one_side_by_side_gif():
    assert tensorboard_norms(("local", "global")) == ["both"]
    assert tensorboard_norms(("none", "global", "local")) == ["both", "none"]
    assert tensorboard_norms(("global",)) == ["global"]
    assert tensorboard_norms(("both", "local")) == ["local", "both"]
    assert gif_tag("p", "both") == "camanim/p/local_global" and gif_tag("p", "none") == \
        "camanim/p/none"


def test_one_failed_output_stops_no_other_and_all_are_named(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    maps = CAManim(net, "gradcam", "conv", progress=False)(torch.rand(1, 3, 8, 8))
    names = list(maps.names)
    (tmp_path / "videos").write_text("a file where the videos folder should be")
    m = EpochMedia(epoch=0, step=1, images=torch.rand(1, 3, 8, 8), maps=maps, probes=["p"],
                   out_dir=tmp_path, method="gradcam", road=np.zeros((2, 1)),
                   normalization=("local",), log_videos=False, save_maps=True,
                   history={"p": ([0], names, np.zeros((1, 2)))})
    with pytest.raises(CAManimError, match=r"1 output\(s\) failed: video .*p_epoch000_local"):
        write_epoch_media(m)
    assert (tmp_path / "maps" / "epoch000.npz").is_file()      # the others were written
    assert (tmp_path / "heatmaps" / "p.png").is_file()
    assert "media" in m.timing
