"""Frame rendering: sizes, overlay orientation, captions, normalizations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camanim.core.layers import LayerInfo
from camanim.core.maps import LayerMaps
from camanim.errors import CAManimError
from camanim.viz.render import (
    FrameRenderer,
    colormap_lut,
    display_images,
    overlay,
    panel_size,
    render_frames,
)

# --------------------------------------------------------------- helpers
# (imported by test_video.py and test_figures.py)

def make_maps(L: int = 5, B: int = 1, H: int = 32, W: int = 32, grow: bool = True,
              seed: int = 0) -> LayerMaps:
    """L layers, each a blob moving down the image; with ``grow`` the raw
    magnitude grows 10x from the first to the last layer (so local and
    global normalization differ)."""
    g = torch.Generator().manual_seed(seed)
    raw, infos, names = [], [], []
    for i in range(L):
        h = max(2, H // (2 ** min(i, 3)))
        w = max(2, W // (2 ** min(i, 3)))
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        cy = 0.15 + 0.7 * i / max(1, L - 1)
        m = torch.exp(-((yy - cy) ** 2 + (xx - 0.5) ** 2) / 0.03)[None].repeat(B, 1, 1)
        m = m + 0.05 * torch.rand(B, h, w, generator=g)
        m = m - m.flatten(1).amin(1)[:, None, None]
        m = m / m.flatten(1).amax(1)[:, None, None]   # range 0..1 at every resolution
        if grow:
            m = m * 10.0 ** (i / max(1, L - 1))
        raw.append(m)
        name = f"block{i}.conv" if i % 2 == 0 else f"block{i}.relu#2"
        names.append(name)
        infos.append(LayerInfo(name=name, module_name=name.split("#")[0], call=1, order=i,
                               type="Conv2d" if i % 2 == 0 else "ReLU",
                               output_shape=(1, 8 * (i + 1), h, w), params=100 * i,
                               params_total=100 * i, depth=1, layout="nchw"))
    return LayerMaps(names=names, raw=raw, input_size=(H, W), layers=infos,
                     targets=torch.arange(B), method="gradcam", seconds=[0.01] * L)


def make_images(B: int = 1, H: int = 32, W: int = 32) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: red grows downwards, green to the right."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    return torch.stack([yy, xx, 0.5 * torch.ones_like(yy)])[None].repeat(B, 1, 1, 1)


# ----------------------------------------------------------------- tests

def test_one_frame_per_layer_even_fixed_size():
    maps = make_maps(L=4, H=30, W=46)
    frames = list(render_frames(make_images(1, 30, 46), maps))
    assert len(frames) == 4
    shapes = {f.shape for f in frames}
    assert len(shapes) == 1
    h, w, c = shapes.pop()
    assert c == 3 and h % 2 == 0 and w % 2 == 0
    assert all(f.dtype == np.uint8 for f in frames)
    # consecutive frames differ (new map, new caption, progress strip)
    assert all(
        np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, frames[1:], strict=False)
    )


def test_overlay_orientation_and_colormap():
    # A map hot in the top rows only: top of the panel is jet-red, bottom jet-blue.
    raw = torch.zeros(1, 8, 8)
    raw[0, :2] = 1.0
    info = LayerInfo(name="c", module_name="c", call=1, order=0, type="Conv2d",
                     output_shape=(1, 4, 8, 8), params=0, params_total=0, depth=0, layout="nchw")
    maps = LayerMaps(names=["c"], raw=[raw], input_size=(64, 64), layers=[info])
    r = FrameRenderer(torch.zeros(1, 3, 64, 64), maps, alpha=1.0, size=(64, 64))
    frame = next(r.iter_layers())[0]
    panel = frame[:64, :64].astype(int)
    top, bottom = panel[2, 32], panel[60, 32]
    assert top[0] > 100 and top[2] < 60          # jet at 1.0: dark red
    assert bottom[2] > 100 and bottom[0] < 60    # jet at 0.0: dark blue


def test_progress_strip_grows_with_depth():
    maps = make_maps(L=4)
    r = FrameRenderer(make_images(), maps)
    frames = [f[0] for f in r.iter_layers()]
    h = r.layout.height
    strip = [f[h - 1] for f in frames]   # bottom row of pixels
    yellow = [int((np.abs(s.astype(int) - (245, 197, 24)).sum(1) < 10).sum()) for s in strip]
    assert yellow == sorted(yellow) and yellow[0] < yellow[-1] == r.layout.width


def test_local_and_global_differ_when_magnitudes_differ():
    maps = make_maps(L=4, grow=True)
    imgs = make_images()
    loc = list(render_frames(imgs, maps, normalization="local"))
    glo = list(render_frames(imgs, maps, normalization="global"))
    ph = FrameRenderer(imgs, maps).layout.ph
    # the first layer is 10x weaker than the last: globally it is faint
    assert np.abs(loc[0][:ph].astype(int) - glo[0][:ph]).mean() > 5
    # the strongest layer has the same min-max under both
    assert np.abs(loc[-1][:ph].astype(int) - glo[-1][:ph]).mean() < 2
    same = make_maps(L=4, grow=False)
    loc2 = list(render_frames(imgs, same, normalization="local"))
    glo2 = list(render_frames(imgs, same, normalization="global"))
    assert np.abs(loc2[0][:ph].astype(int) - glo2[0][:ph]).mean() < 5


def test_both_is_side_by_side_local_global():
    maps = make_maps(L=3)
    imgs = make_images()
    r1 = FrameRenderer(imgs, maps, normalization="local")
    r2 = FrameRenderer(imgs, maps, normalization="both")
    assert r2.frame_size[1] == 2 * r1.frame_size[1] + 2
    f = next(r2.iter_layers())[0]
    lay = r2.layout
    y, x = lay.panel_origin(0, 0)
    y2, x2 = lay.panel_origin(0, 1)
    left = f[y:y + lay.ph, x:x + lay.pw].astype(int)
    right = f[y2:y2 + lay.ph, x2:x2 + lay.pw].astype(int)
    assert np.abs(left - right).mean() > 5       # layer 0: weak globally


def test_caption_band_and_road_curve_drawn():
    maps = make_maps(L=5)
    imgs = make_images()
    plain = FrameRenderer(imgs, maps)
    scored = FrameRenderer(imgs, maps, road=np.linspace(-0.2, 0.5, 5)[:, None])
    assert scored.layout.band > plain.layout.band          # one more caption line
    f = next(scored.iter_layers())[0]
    lay = scored.layout
    band = f[lay.grid_h:lay.grid_h + lay.band]
    assert (band > 200).any()                              # white caption text
    x0, y0, x1, y1 = scored._curve_box()
    curve = band[y0:y1, x0:x1].astype(int)
    blue = (np.abs(curve - (110, 170, 255)).sum(-1) < 40).sum()
    assert blue > 10                                       # the ybROAD curve


def test_road_accepts_ybroad_like_object_and_checks_shape():
    maps = make_maps(L=3, B=2)

    class FakeRoad:
        scores = np.zeros((3, 2))

    r = FrameRenderer(make_images(2), maps, road=FakeRoad(), grid=True)
    assert r.scores.shape == (3, 2)
    with pytest.raises(CAManimError, match="road scores have shape"):
        FrameRenderer(make_images(2), maps, road=np.zeros((4, 2)), grid=True)


def test_batch_needs_index_or_grid():
    maps = make_maps(L=3, B=3)
    imgs = make_images(3)
    with pytest.raises(CAManimError, match="index=i"):
        next(render_frames(imgs, maps))
    a = list(render_frames(imgs, maps, index=2))
    assert len(a) == 3
    g = list(render_frames(imgs, maps, grid=True))
    assert len(g) == 3
    assert g[0].shape[1] > a[0].shape[1]       # 2x2 grid is wider than one panel
    assert all(s % 2 == 0 for s in g[0].shape[:2])


def test_index_frames_equal_single_image_frames():
    maps = make_maps(L=3, B=2)
    imgs = make_images(2)
    imgs[1] = 1 - imgs[1]
    single = LayerMaps(names=maps.names, raw=[r[1:] for r in maps.raw], input_size=maps.input_size,
                       layers=maps.layers, targets=maps.targets[1:], method=maps.method)
    a = list(render_frames(imgs, maps, index=1, normalization="global"))
    b = list(render_frames(imgs[1:], single, normalization="global"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))


def test_display_images_undoes_normalization():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = make_images()
    x = (img - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    out = display_images(x, mean, std)
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(out[0], img[0].permute(1, 2, 0).numpy(), atol=1e-5)
    out2 = display_images(x, denormalize=lambda t: t * 0 + 0.25)
    assert np.allclose(out2, 0.25)
    u8 = (img[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_allclose(display_images(u8)[0], u8 / 255.0, atol=1e-6)
    gray = display_images(torch.rand(2, 1, 8, 8))
    assert gray.shape == (2, 8, 8, 3)


def test_colormaps_and_errors():
    assert colormap_lut("jet").shape == (256, 3)
    assert not np.array_equal(colormap_lut("turbo"), colormap_lut("viridis"))
    with pytest.raises(CAManimError, match="did you mean viridis"):
        colormap_lut("virdis")
    maps = make_maps(L=2)
    with pytest.raises(CAManimError, match="normalization"):
        FrameRenderer(make_images(), maps, normalization="loc")
    with pytest.raises(CAManimError, match="alpha"):
        FrameRenderer(make_images(), maps, alpha=2)
    with pytest.raises(CAManimError, match="2 images for maps of 1"):
        FrameRenderer(make_images(2), maps)
    a = overlay(np.zeros((4, 4, 3)), np.ones((4, 4)), "jet", alpha=1.0)
    assert tuple(a[0, 0]) == tuple(colormap_lut("jet")[-1])


def test_panel_size_rules():
    assert panel_size((64, 64)) == (320, 320)           # upscaled for legible captions
    assert panel_size((224, 336)) == (224, 336)
    assert max(panel_size((3000, 2000))) == 1024          # big images scaled down
    assert panel_size((31, 45), 100) == (68, 100)       # long side, even sides
    assert panel_size((10, 10), (51, 77)) == (52, 76)


def test_frames_stream_lazily(monkeypatch):
    """render_frames is a generator all the way down: after k frames are
    taken, k layers have been upsampled, blended and drawn, not all 50."""
    import camanim.viz.overlay as overlay_mod

    drawn, blended = [], []
    real_frame, real_blend = FrameRenderer._frame, overlay_mod.blend
    monkeypatch.setattr(FrameRenderer, "_frame",
                        lambda self, i, *a: drawn.append(i) or real_frame(self, i, *a))
    monkeypatch.setattr(overlay_mod, "blend", lambda *a: blended.append(1) or real_blend(*a))
    maps = make_maps(L=50, H=16, W=16)
    gen = render_frames(make_images(1, 16, 16), maps, size=32)
    for k in (1, 2, 3):
        assert next(gen).ndim == 3
        assert drawn == list(range(k)) and len(blended) == k
    gen.close()
    assert len(drawn) == 3


def test_quantized_maps_equal_the_float_path_exactly():
    """Frames are drawn from uint8 colour-map indices made where the maps are
    (`iter_maps(quantize=True)`): the same indices the float path gives."""
    from camanim.viz.overlay import blend, iter_maps

    g = torch.Generator().manual_seed(3)
    raw = [torch.rand(2, s, s, generator=g) * 7 for s in (4, 7, 16)]
    infos = [LayerInfo(name=f"l{i}", module_name=f"l{i}", call=1, order=i, type="Conv2d",
                       output_shape=(2, 8, s, s), params=0, params_total=0, depth=1,
                       layout="nchw") for i, s in enumerate((4, 7, 16))]
    maps = LayerMaps(names=[i.name for i in infos], raw=raw, input_size=(24, 20), layers=infos)
    lut = np.random.default_rng(0).uniform(0, 255, (256, 3)).astype(np.float32)
    bg = np.zeros((24, 20, 3), np.float32)
    for norm in ("local", "global"):
        for f, q in zip(
            iter_maps(maps, norm, (24, 20)),
            iter_maps(maps, norm, (24, 20), quantize=True),
            strict=False,
        ):
            assert q.dtype == np.uint8 and q.shape == f.shape
            want = (np.clip(f, 0, 1) * 255.0 + 0.5).astype(np.uint8)
            assert np.array_equal(q, want)
            want_panel = (bg + lut[want[0]] + 0.5).astype(np.uint8)
            got = blend(torch.from_numpy(bg), torch.from_numpy(q[0]), torch.from_numpy(lut))
            assert np.array_equal(got.numpy(), want_panel)


def test_overlay_panels_made_where_the_maps_are_equal_the_numpy_blend():
    """`iter_maps(overlay_on=...)`: upsampling, colour lookup and blend as
    tensor ops on the maps' device give exactly the numpy overlay
    ``uint8(background + lut[round(clip(map) * 255)] + 0.5)`` (reference:
    that formula in numpy on the float maps; exact equality)."""
    from camanim.viz.overlay import iter_maps

    g = torch.Generator().manual_seed(4)
    raw = [torch.rand(3, s, s + 1, generator=g) * 5 - 1 for s in (3, 9)]
    infos = [LayerInfo(name=f"l{i}", module_name=f"l{i}", call=1, order=i, type="Conv2d",
                       output_shape=(3, 8, s, s + 1), params=0, params_total=0, depth=1,
                       layout="nchw") for i, s in enumerate((3, 9))]
    maps = LayerMaps(names=[i.name for i in infos], raw=raw, input_size=(18, 22), layers=infos)
    rng = np.random.default_rng(1)
    lut = (rng.uniform(0, 255, (256, 3)) * 0.4).astype(np.float32)
    bg = (rng.uniform(0, 1, (3, 18, 22, 3)) * 255 * 0.6).astype(np.float32)
    for norm in ("local", "global", "none"):
        floats = list(iter_maps(maps, norm, (18, 22)))
        panels = list(iter_maps(maps, norm, (18, 22), overlay_on=(bg, lut)))
        assert len(panels) == len(floats) == 2
        for f, p in zip(floats, panels, strict=False):
            idx = (np.clip(f, 0, 1) * 255.0 + 0.5).astype(np.uint8)
            assert p.dtype == np.uint8 and p.shape == (3, 18, 22, 3)
            assert np.array_equal(p, (bg + lut[idx] + 0.5).astype(np.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlay_panels_on_cuda_equal_the_cpu_ones():
    from camanim.viz.overlay import iter_maps

    g = torch.Generator().manual_seed(5)
    raw = [torch.rand(2, 7, 7, generator=g)]
    infos = [LayerInfo(name="l0", module_name="l0", call=1, order=0, type="Conv2d",
                       output_shape=(2, 8, 7, 7), params=0, params_total=0, depth=1, layout="nchw")]
    cpu = LayerMaps(names=["l0"], raw=raw, input_size=(32, 32), layers=infos)
    gpu = LayerMaps(names=["l0"], raw=[r.cuda() for r in raw], input_size=(32, 32), layers=infos)
    lut = np.linspace(0, 100, 768, dtype=np.float32).reshape(256, 3)
    bg = np.full((2, 32, 32, 3), 60.0, np.float32)
    a = next(iter_maps(cpu, "local", (32, 32), overlay_on=(bg, lut)))
    b = next(iter_maps(gpu, "local", (32, 32), overlay_on=(bg, lut)))
    assert (
        np.abs(a.astype(int) - b.astype(int)).max() <= 1
    )  # bilinear rounding may differ by one step
