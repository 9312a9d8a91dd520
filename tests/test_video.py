"""Video writers: decode what was written and check it."""

from __future__ import annotations

import io
import os

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from camanim.errors import CAManimError
from camanim.viz import render as render_mod
from camanim.viz.render import FrameRenderer, render_frames
from camanim.viz.video import encode_gif, iter_video, video_format, write_frames, write_video
from test_render import make_images, make_maps


def _mp4_frames(path) -> tuple[dict, list[np.ndarray]]:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return meta, [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]


def _changes(frames: list[np.ndarray]) -> list[float]:
    return [
        float(np.abs(a.astype(int) - b).mean()) for a, b in zip(frames, frames[1:], strict=False)
    ]


def test_mp4_one_frame_per_layer_h264_even_size(tmp_path):
    maps, imgs = make_maps(L=5), make_images()
    out = write_video(tmp_path / "v.mp4", imgs, maps, fps=8)
    assert out == tmp_path / "v.mp4" and out.exists()
    meta, frames = _mp4_frames(out)
    assert meta["codec"] == "h264"
    assert len(frames) == 5
    h, w = FrameRenderer(imgs, maps).frame_size
    assert frames[0].shape == (h, w, 3) and h % 2 == 0 and w % 2 == 0
    assert all(f.std() > 10 for f in frames)                 # not constant
    assert min(_changes(frames)) > 1                          # changes between layers
    # pixel format yuv420p, as players need
    probe = os.popen(f'"{imageio_ffmpeg.get_ffmpeg_exe()}" -hide_banner -i "{out}" 2>&1').read()
    assert "yuv420p" in probe and "h264" in probe
    # the decoded frames match what was rendered (lossy, but close)
    ref = list(render_frames(imgs, maps))
    assert np.abs(frames[2].astype(int) - ref[2]).mean() < 6


def test_mp4_hold_last_adds_frames(tmp_path):
    maps, imgs = make_maps(L=3), make_images()
    _, frames = _mp4_frames(write_video(tmp_path / "h.mp4", imgs, maps, hold_last=4))
    assert len(frames) == 7
    assert max(_changes(frames[2:])) < 2                      # held frames repeat the last


def test_gif_loops_one_frame_per_layer(tmp_path):
    maps, imgs = make_maps(L=4), make_images()
    out = write_video(tmp_path / "a.gif", imgs, maps, fps=5, hold_last=2)
    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 4
    assert frames.shape[1:3] == FrameRenderer(imgs, maps).frame_size
    assert min(_changes(list(frames[..., :3]))) > 1
    with Image.open(out) as im:
        assert im.info.get("loop") == 0                      # loops forever
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            durations.append(im.info["duration"])
    assert durations[:3] == [200, 200, 200] and durations[3] == 600   # held 2 more frames


def test_webm(tmp_path):
    maps, imgs = make_maps(L=3), make_images()
    meta, frames = _mp4_frames(write_video(tmp_path / "w.webm", imgs, maps))
    assert meta["codec"] == "vp9" and len(frames) == 3


def test_png_folder_numbered(tmp_path):
    maps, imgs = make_maps(L=4), make_images()
    out = write_video(tmp_path / "frames", imgs, maps)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"frame_{i:04d}.png" for i in range(4)]
    ref = list(render_frames(imgs, maps))
    assert np.array_equal(np.asarray(Image.open(out / "frame_0002.png")), ref[2])  # lossless
    # rewriting a shorter run into the same folder leaves no stale frames
    write_video(str(tmp_path / "frames") + "/", imgs, make_maps(L=2))
    assert sorted(p.name for p in out.iterdir()) == ["frame_0000.png", "frame_0001.png"]


def test_batch_gives_one_file_per_image_or_a_grid(tmp_path):
    maps, imgs = make_maps(L=3, B=2), make_images(2)
    outs = write_video(tmp_path / "b.mp4", imgs, maps)
    assert outs == [tmp_path / "b_0.mp4", tmp_path / "b_1.mp4"]
    assert all(len(_mp4_frames(p)[1]) == 3 for p in outs)
    dirs = write_video(tmp_path / "bp", imgs, maps)
    assert [d.name for d in dirs] == ["bp_0", "bp_1"]
    grid = write_video(tmp_path / "g.gif", imgs, maps, grid=True)
    assert grid == tmp_path / "g.gif"
    g = iio.imread(grid, index=None)
    assert g.shape[0] == 3 and g.shape[2] > _mp4_frames(outs[0])[1][0].shape[1]


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    maps, imgs = make_maps(L=4), make_images()

    original = FrameRenderer.iter_layers

    def broken(self):
        for k, frames in enumerate(original(self)):
            if k == 2:
                raise RuntimeError("boom")
            yield frames

    monkeypatch.setattr(render_mod.FrameRenderer, "iter_layers", broken)
    for name in ("x.mp4", "x.gif", "xdir"):
        with pytest.raises(RuntimeError, match="boom"):
            write_video(tmp_path / name, imgs, maps)
    assert list(tmp_path.iterdir()) == []                     # no partial files either
    # an existing good file survives a failed rewrite
    monkeypatch.undo()
    good = write_video(tmp_path / "x.mp4", imgs, maps)
    size = good.stat().st_size
    monkeypatch.setattr(render_mod.FrameRenderer, "iter_layers", broken)
    with pytest.raises(RuntimeError, match="boom"):
        write_video(tmp_path / "x.mp4", imgs, maps)
    assert good.stat().st_size == size and len(_mp4_frames(good)[1]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]


def test_encode_gif_bytes():
    maps, imgs = make_maps(L=3), make_images()
    data = encode_gif(render_frames(imgs, maps), fps=4)
    assert data[:6] == b"GIF89a"
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3 and im.info.get("loop") == 0
    with pytest.raises(CAManimError, match="no frames"):
        encode_gif([], fps=4)


def test_write_frames_and_checks(tmp_path):
    frames = [np.full((10, 12, 3), v, np.uint8) for v in (0, 100, 200)]
    out = write_frames(tmp_path / "f.mp4", frames, fps=2)
    assert len(list(iter_video(out))) == 3
    with pytest.raises(CAManimError, match="even"):
        write_frames(tmp_path / "odd.mp4", [np.zeros((9, 12, 3), np.uint8)])
    with pytest.raises(CAManimError, match="one size"):
        write_frames(tmp_path / "mix.gif", [frames[0], np.zeros((8, 8, 3), np.uint8)])
    assert not (tmp_path / "odd.mp4").exists() and not (tmp_path / "mix.gif").exists()
    with pytest.raises(CAManimError, match=r"\.mp4, \.webm or \.gif"):
        video_format("clip.avi")
    assert video_format("out/") == "png" and video_format("out") == "png"
    with pytest.raises(CAManimError, match="fps"):
        write_video(tmp_path / "z.mp4", make_images(), make_maps(L=2), fps=0)
