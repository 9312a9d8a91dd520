"""The viewer's data, the TensorBoard plugin's routes and the report, without
a browser (issue 20, items 1, 2 and 4). Browser tests: test_viewer_browser.py.

A tiny training run writes the viewer data through `CAManimCallback`; the
plugin's WSGI routes are called with werkzeug's test client."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from camanim.core.maps import LayerMaps
from camanim.errors import CAManimError
from camanim.viewer.data import read_index, sprite_path, write_viewer_epoch
from camanim.viewer.report import report_data, write_report
from camanim.viz.overlay import iter_maps
from viewer_run import PROBES, tiny_run

pytest.importorskip("tensorboard")
from werkzeug.test import Client  # noqa: E402 - after the skip

from camanim.viewer.plugin import CAManimPlugin  # noqa: E402 - after the skip

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    out, probes = tiny_run(root)
    return root, out, probes


class Ctx:
    def __init__(self, logdir):
        self.logdir = str(logdir)


def get(plugin, route, query=""):
    """(status, body, content type) of ``/data/plugin/camanim<route>?<query>``."""
    app = plugin.get_plugin_apps()[route]
    r = Client(app).get(route + ("?" + query if query else ""))
    return r.status_code, r.get_data(), r.headers.get("Content-Type", "")


# ---------------------------------------------------------------- data

def test_callback_writes_each_epochs_maps_as_the_frames_show_them(run):
    _, out, _ = run
    index = read_index(out / "viewer")
    assert [e["epoch"] for e in index["epochs"]] == [0, 1]
    assert [p["name"] for p in index["probes"]] == list(PROBES)
    assert index["norms"] == ["local", "global"] and index["panel"] == [96, 96]
    for e in index["epochs"]:
        maps = LayerMaps.load(out / "maps" / f"epoch{e['epoch']:03d}.npz")
        assert len(index["layers"]) == len(maps) == len(e["road"]["cat"])
        for k in range(len(PROBES)):
            sheet = np.asarray(Image.open(sprite_path(out / "viewer", e["epoch"], k)))
            assert sheet.shape == (len(maps) * 96, 2 * 96)
            for j, norm in enumerate(index["norms"]):
                # reference: the colour indices the frames are drawn with, exact
                for i, idx in enumerate(iter_maps(maps, norm, (96, 96), quantize=True)):
                    np.testing.assert_array_equal(
                        sheet[i * 96:(i + 1) * 96, j * 96:(j + 1) * 96], idx[k])
    assert index["epochs"][1]["change"]["cat"][0] is not None   # map change from epoch 1 on


def test_a_rewritten_epoch_replaces_its_entry(run, tmp_path):
    _, out, probes = run
    maps = LayerMaps.load(out / "maps" / "epoch001.npz")
    plugin, stamps = CAManimPlugin(Ctx(tmp_path)), []
    for epoch in (3, 3, 2):
        write_viewer_epoch(tmp_path, epoch=epoch, step=epoch, images=probes, maps=maps,
                           probes=list(PROBES), method="gradcam")
        stamps.append(json.loads(get(plugin, "/runs")[1])["stamps"]["."])
    assert [e["epoch"] for e in read_index(tmp_path / "viewer")["epochs"]] == [2, 3]
    assert len(set(stamps)) == 3                        # each write is seen by the page


# ---------------------------------------------------------------- plugin routes

def test_plugin_serves_runs_index_maps_and_page(run):
    root, out, _ = run
    plugin = CAManimPlugin(Ctx(root))
    assert plugin.is_active()
    assert plugin.frontend_metadata().es_module_path == "/index.js"
    status, body, _ = get(plugin, "/runs")
    assert status == 200 and json.loads(body)["runs"] == ["run-a"]
    assert json.loads(body)["stamps"]["run-a"]        # the page polls this, not the index
    status, body, ctype = get(plugin, "/index", "run=run-a")
    assert status == 200 and ctype.startswith("application/json")
    assert [e["epoch"] for e in json.loads(body)["epochs"]] == [0, 1]
    status, body, ctype = get(plugin, "/sprite", "run=run-a&epoch=1&probe=1")
    assert status == 200 and ctype == "image/png"
    assert body == sprite_path(out / "viewer", 1, 1).read_bytes()
    status, body, _ = get(plugin, "/background", "run=run-a&probe=0")
    assert status == 200 and len(body) == 96 * 96 * 3 * 4
    for name in ("index.js", "viewer.js"):
        status, body, ctype = get(plugin, f"/{name}")
        assert status == 200 and ctype.split(";")[0] == "text/javascript" and body
    assert get(plugin, "/viewer.css")[2].startswith("text/css")


@pytest.mark.parametrize("query", [
    "run=../run-a", "run=/etc", "run=run-a/../run-a", "run=..%2Frun-a", "run=run-a%252F..",
    "run=run-a%5C..", "run=", "run=nothere", "run=run-a&epoch=../1&probe=0",
    "run=run-a&epoch=1&probe=-1", "run=run-a&epoch=1%2F..&probe=0",
])
def test_plugin_refuses_paths_that_are_not_plain_run_names(run, query):
    root, _, _ = run
    plugin = CAManimPlugin(Ctx(root))
    # a bad epoch or probe number concerns the sprite route (the others take no epoch)
    routes = ("/sprite",) if "epoch" in query else ("/index", "/sprite", "/background")
    for route in routes:
        status, body, _ = get(plugin, route, query)
        assert status in (400, 403, 404) and body == b"", (route, query, status)


def test_plugin_refuses_symlinks_out_of_the_logdir(run, tmp_path):
    _, out, _ = run
    logdir = tmp_path / "logs"
    (logdir / "good" / "viewer" / "maps").mkdir(parents=True)
    for f in ("index.json", "bg_0.f32"):
        os.symlink(out / "viewer" / f, logdir / "good" / "viewer" / f)  # leads out
    (logdir / "evil").mkdir()
    os.symlink(out / "viewer", logdir / "evil" / "viewer")              # a folder leading out
    os.symlink(out / "viewer" / "maps" / "e00001_0.png",
               logdir / "good" / "viewer" / "maps" / "e00001_0.png")
    plugin = CAManimPlugin(Ctx(logdir))
    assert json.loads(get(plugin, "/runs")[1])["runs"] == ["evil", "good"]
    for run_name in ("good", "evil"):
        for route, query in (("/index", ""), ("/sprite", "&epoch=1&probe=0"),
                             ("/background", "&probe=0")):
            status, body, _ = get(plugin, route, f"run={run_name}{query}")
            assert status == 403 and body == b"", (run_name, route, status)


def test_plugin_reports_missing_or_malformed_data_as_a_message(tmp_path):
    (tmp_path / "empty" / "viewer").mkdir(parents=True)
    (tmp_path / "broken" / "viewer").mkdir(parents=True)
    (tmp_path / "broken" / "viewer" / "index.json").write_text("{not json")
    (tmp_path / "other" / "viewer").mkdir(parents=True)
    (tmp_path / "other" / "viewer" / "index.json").write_text('{"format": "x"}')
    plugin = CAManimPlugin(Ctx(tmp_path))
    for run_name, words in (("empty", "no index.json"), ("broken", "unreadable"),
                            ("other", "not camanim-viewer")):
        status, body, _ = get(plugin, "/index", f"run={run_name}")
        assert status == 200 and words in json.loads(body)["error"], run_name
        assert str(tmp_path) not in json.loads(body)["error"]
    status, body, _ = get(plugin, "/sprite", "run=broken&epoch=0&probe=0")
    assert status == 404 and body == b""
    assert "no run" in json.loads(get(CAManimPlugin(Ctx(tmp_path / "none")), "/runs")[1])["message"]


# ---------------------------------------------------------------- report

def xss_run(folder, run_out, probes):
    """A run whose probe, class and layer-bearing names are markup."""
    maps = LayerMaps.load(run_out / "maps" / "epoch001.npz")
    write_viewer_epoch(folder, epoch=0, step=1, images=probes, maps=maps,
                       probes=[XSS, "dog"], method="gradcam",
                       render={"class_names": [XSS, "b", "c"]})
    return folder


def test_report_inlines_the_run_and_takes_subsets(run, tmp_path):
    root, out, _ = run
    full = write_report(out, tmp_path / "r.html")
    text = full.read_text()
    assert text.startswith("<!DOCTYPE html>") and "CAManimViewer.start" in text
    data = report_data(out)
    assert data["runs"] == ["run-a"]
    assert sorted(data["data"]["run-a"]["sprites"]) == ["0_0", "0_1", "1_0", "1_1"]
    small = report_data(out, epochs=[1], layers=[0, "f.4"], probes=["dog"], frame_size=48)
    d = small["data"]["run-a"]
    assert [e["epoch"] for e in d["index"]["epochs"]] == [1]
    assert [lay["name"] for lay in d["index"]["layers"]] == ["f.0", "f.4"]
    assert d["index"]["panel"] == [48, 48] and sorted(d["sprites"]) == ["1_0"]
    sheet = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(d["sprites"]["1_0"]))))
    assert sheet.shape == (2 * 48, 2 * 48)
    assert len(d["index"]["epochs"][0]["road"]["dog"]) == 2
    with pytest.raises(CAManimError, match=r"over the limit of 0.01 MiB: keep fewer epochs"):
        write_report(out, tmp_path / "big.html", max_mib=0.01)
    assert not (tmp_path / "big.html").exists()
    with pytest.raises(CAManimError, match=r"epochs \[7\] are not in the run"):
        report_data(out, epochs=[7])
    with pytest.raises(CAManimError, match="no viewer data under"):
        report_data(tmp_path)


def test_report_keeps_markup_in_names_out_of_the_html(run, tmp_path):
    _, out, probes = run
    folder = xss_run(tmp_path / XSS, out, probes)          # the run's name too
    text = write_report(folder, tmp_path / "x.html").read_text()
    assert XSS not in text and "<img" not in text
    block = text.split('id="camanim-data">', 1)[1].split("</script>", 1)[0]
    data = json.loads(block)
    assert data["runs"] == [XSS] and data["data"][XSS]["index"]["probes"][0]["name"] == XSS


def test_cli_report(run, tmp_path, capsys):
    from camanim.cli import main

    _, out, _ = run
    assert main(["report", str(out), "--out", str(tmp_path / "r.html"), "--epochs", "1",
                 "--probes", "cat"]) == 0
    assert (tmp_path / "r.html").stat().st_size > 0 and "MiB" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "s.html"), "--max-mib", "0.001"]) == 2
    assert "over the limit" in capsys.readouterr().err


def test_tensorboard_serves_the_tab_and_refuses_paths_out_of_the_logdir(run):
    """The same routes through a real TensorBoard server (its middleware, its
    URL handling), without a browser."""
    import urllib.error
    import urllib.request

    from tensorboard import default, program

    root, out, _ = run
    servers = []

    def make_server(app, flags):
        servers.append(program.WerkzeugServer(app, flags))
        return servers[-1]

    tb = program.TensorBoard(plugins=default.get_static_plugins() + [CAManimPlugin],
                             server_class=make_server)
    tb.configure(argv=["tensorboard", "--logdir", str(root), "--host", "127.0.0.1", "--port",
                       "0", "--load_fast", "false", "--reload_interval", "0"])
    url = tb.launch().rstrip("/")

    def fetch(path):
        try:
            with urllib.request.urlopen(url + path, timeout=30) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), ""

    try:
        listing = json.loads(fetch("/data/plugins_listing")[1])
        assert listing["camanim"]["enabled"] and listing["camanim"]["tab_name"] == "CAManim"
        base = "/data/plugin/camanim"
        status, body, ctype = fetch(base + "/index.js")
        assert status == 200 and ctype.startswith("text/javascript") and b"render" in body
        assert json.loads(fetch(base + "/runs")[1])["runs"] == ["run-a"]
        status, body, _ = fetch(base + "/sprite?run=run-a&epoch=0&probe=0")
        assert status == 200 and body == sprite_path(out / "viewer", 0, 0).read_bytes()
        for bad in ("/sprite?run=..&epoch=0&probe=0", "/sprite?run=%2Fetc&epoch=0&probe=0",
                    "/index?run=run-a%2F..%2F..", "/background?run=run-a%252F..&probe=0",
                    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"):
            status, body, _ = fetch(base + bad)
            assert status >= 400 and b"root:" not in body, bad
            if "?" in bad:
                assert body == b"", bad
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
