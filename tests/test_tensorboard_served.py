"""What TensorBoard serves after a callback run (issue 15, item 2).

A tiny training run logs through `camanim.CAManimCallback`; TensorBoard then
runs in this process on that folder (127.0.0.1, a port the OS picks) and the
test reads its HTTP data API, the same JSON and bytes the browser's Images,
Scalars and Text dashboards fetch: every expected tag at every callback
epoch, each GIF decoding with one frame per drawn layer.
"""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageSequence

import camanim
from lit_models import TinyLitNet

program = pytest.importorskip("tensorboard.program")

# ---------------------------------------------------------------- expected tags
# The one place to update when the callback's tag names change.
PROBES = ("cat", "dog")
NORMS = ("local", "global")   # the callback's `normalization=`
LAYERS = "conv"               # the callback's `layers=`


def gif_tags(p: str) -> list[str]:
    """Animated GIFs, one frame per drawn layer: local and global side by side
    in one GIF (the TensorBoard budget, issue 11)."""
    return [f"camanim/{p}/local_global"]


def png_tags(p: str) -> list[str]:
    """Still images (ybROAD heatmap over epochs, this epoch's curve)."""
    return [f"ybroad/{p}/heatmap", f"ybroad/{p}/curve"]


def scalar_tags(p: str) -> list[str]:
    return [f"ybroad/{p}/{s}" for s in ("mean", "max", "best_layer", "final_layer")]


GLOBAL_SCALAR_TAGS = ["camanim/seconds"]


def text_tag_prefix(p: str) -> str:
    return f"camanim/{p}/summary"


# ---------------------------------------------------------------- a tiny run

def Net() -> TinyLitNet:
    return TinyLitNet(n_conv=3, lr=0.1)


class _Steps(Callback):
    """The global step at the end of each training epoch (the callback's step)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(int(trainer.global_step))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train 2 epochs with the callback; returns (logdir, steps, n_layers)."""
    root = tmp_path_factory.mktemp("tb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 3, 16, 16, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        probes = x[:len(PROBES)]
        cb = camanim.CAManimCallback(probes, probe_names=list(PROBES), layers=LAYERS,
                                     normalization=NORMS, save_videos=False, fps=4)
        steps = _Steps()
        torch.manual_seed(0)
        model = Net()
        n_layers = len(camanim.list_layers(model, probes, layers=LAYERS))
        trainer = L.Trainer(max_epochs=2, limit_train_batches=2, accelerator="cpu", devices=1,
                            logger=TensorBoardLogger(str(root), name="exp"),
                            callbacks=[cb, steps], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            log_every_n_steps=1, default_root_dir=str(root))
        trainer.fit(model, dl)
    finally:
        torch.set_num_threads(threads)
    assert cb.epochs_done == [0, 1]
    assert steps.steps == [2, 4]
    assert n_layers >= 2  # so that "one frame per layer" tells layers apart
    return root, steps.steps, n_layers


# ---------------------------------------------------------------- TensorBoard in process

class Served:
    """A TensorBoard serving ``logdir`` on 127.0.0.1 until `close`."""

    def __init__(self, logdir) -> None:
        self._servers: list = []

        def make_server(app, flags):  # keep the server so it can be shut down
            server = program.WerkzeugServer(app, flags)
            self._servers.append(server)
            return server

        tb = program.TensorBoard(server_class=make_server)
        tb.configure(argv=["tensorboard", "--logdir", str(logdir), "--host", "127.0.0.1",
                           "--port", "0", "--samples_per_plugin", "images=100",
                           # the run is finished: load it once (in a thread
                           # that ends), with the pure-Python loader
                           "--load_fast", "false", "--reload_interval", "0"])
        before = set(threading.enumerate())
        self.url = tb.launch().rstrip("/")
        self.threads = [t for t in threading.enumerate()
                        if t not in before and t.name == "TensorBoard"]
        assert urllib.parse.urlparse(self.url).hostname == "127.0.0.1"

    def get(self, path: str, **query) -> tuple[bytes, str]:
        q = ("?" + urllib.parse.urlencode(query)) if query else ""
        with urllib.request.urlopen(f"{self.url}{path}{q}", timeout=30) as r:
            return r.read(), r.headers.get("Content-Type", "")

    def json(self, path: str, **query):
        return json.loads(self.get(path, **query)[0])

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()        # stops serve_forever in TensorBoard's thread
            s.server_close()


@pytest.fixture(scope="module")
def served(run):
    tb = Served(run[0])
    try:
        yield tb
    finally:
        tb.close()


def wait_for(fetch, ready, timeout: float = 60.0):
    """Poll ``fetch()`` until ``ready(result)``: TensorBoard loads event files
    in a background thread, so the first answers may be empty."""
    deadline = time.monotonic() + timeout
    while True:
        got = fetch()
        if ready(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def the_run(tags: dict) -> str:
    runs = [r for r, t in tags.items() if t]
    assert len(runs) == 1, f"expected one TensorBoard run, got {sorted(tags)}"
    return runs[0]


# ---------------------------------------------------------------- tests

def test_images_served_for_every_epoch(run, served):
    _, steps, n_layers = run
    expected = [t for p in PROBES for t in gif_tags(p) + png_tags(p)]
    tags = wait_for(lambda: served.json("/data/plugin/images/tags"),
                    lambda t: any(set(expected) <= set(v) for v in t.values()))
    name = the_run(tags)
    missing = sorted(set(expected) - set(tags[name]))
    assert not missing, f"image tags TensorBoard does not serve: {missing}"
    gifs = {t for p in PROBES for t in gif_tags(p)}
    for tag in expected:
        series = served.json("/data/plugin/images/images", run=name, tag=tag)
        assert [e["step"] for e in series] == steps, tag
        sizes = set()
        for e in series:
            blob, mime = served.get("/data/plugin/images/individualImage?" + e["query"])
            img = Image.open(io.BytesIO(blob))
            if tag in gifs:
                assert mime == "image/gif" and img.format == "GIF", (tag, mime)
                frames = [f.convert("RGB") for f in ImageSequence.Iterator(img)]
                assert len(frames) == n_layers, f"{tag} step {e['step']}: {len(frames)} frames"
                assert len({f.size for f in frames}) == 1
                # an animation, not one picture repeated
                assert len({f.tobytes() for f in frames}) > 1, tag
                sizes.add(frames[0].size)
            else:
                assert mime == "image/png" and img.format == "PNG", (tag, mime)
                img.load()
                assert min(img.size) > 50, (tag, img.size)
        if tag in gifs:
            assert len(sizes) == 1  # same frame size every epoch
    # the heatmap gains one epoch column per epoch
    for p in PROBES:
        series = served.json("/data/plugin/images/images", run=name, tag=f"ybroad/{p}/heatmap")
        widths = [Image.open(io.BytesIO(served.get(
            "/data/plugin/images/individualImage?" + e["query"])[0])).size[0] for e in series]
        assert widths[0] < widths[1], widths


def test_scalars_served_for_every_epoch(run, served):
    _, steps, n_layers = run
    expected = [t for p in PROBES for t in scalar_tags(p)] + GLOBAL_SCALAR_TAGS
    tags = wait_for(lambda: served.json("/data/plugin/scalars/tags"),
                    lambda t: any(set(expected) <= set(v) for v in t.values()))
    name = the_run(tags)
    missing = sorted(set(expected) - set(tags[name]))
    assert not missing, f"scalar tags TensorBoard does not serve: {missing}"
    for tag in expected:
        series = served.json("/data/plugin/scalars/scalars", run=name, tag=tag)
        assert [s[1] for s in series] == steps, tag  # [wall_time, step, value]
        assert all(isinstance(s[2], float) for s in series), tag
    for p in PROBES:
        best = served.json("/data/plugin/scalars/scalars", run=name, tag=f"ybroad/{p}/best_layer")
        assert all(0 <= s[2] < n_layers and s[2] == int(s[2]) for s in best)
        mean = served.json("/data/plugin/scalars/scalars", run=name, tag=f"ybroad/{p}/mean")
        mx = served.json("/data/plugin/scalars/scalars", run=name, tag=f"ybroad/{p}/max")
        assert all(a[2] <= b[2] + 1e-6 for a, b in zip(mean, mx, strict=False))


def test_summary_text_served(run, served):
    _, steps, _ = run
    tags = wait_for(lambda: served.json("/data/plugin/text/tags"),
                    lambda t: any(len(v) >= len(PROBES) for v in t.values()))
    name = the_run(tags)
    for p in PROBES:
        found = [t for t in tags[name] if t.startswith(text_tag_prefix(p))]
        assert len(found) == 1, (p, tags[name])
        series = served.json("/data/plugin/text/text", run=name, tag=found[0])
        assert [e["step"] for e in series] == steps
        assert all(p in e["text"] for e in series)


def test_server_stops(run):
    tb = Served(run[0])
    assert len(tb.threads) == 1 and tb.threads[0].is_alive()
    assert json.loads(tb.get("/data/runs")[0]) is not None
    tb.close()
    tb.threads[0].join(10)
    assert not tb.threads[0].is_alive(), "TensorBoard's server thread still runs"
    with pytest.raises(urllib.error.URLError, match="urlopen error"):
        urllib.request.urlopen(tb.url + "/data/runs", timeout=5)
