"""The CAManim tab and the report in a real browser (issue 20, item 3).

Headless Chromium (Debian's ``chromium``, or ``CAMANIM_CHROMIUM``, driven by
playwright) opens TensorBoard, served in this process on a tiny callback
run, and the offline report. Without playwright or a browser every test
skips, saying which is missing.

Reference of the pixel test: the callback's own frame for (epoch, layer),
`camanim.viz.render.FrameRenderer` at the viewer's panel size on the maps
the callback saved that epoch; the panels must be equal, exactly.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from camanim.core.maps import LayerMaps
from camanim.viewer.data import write_viewer_epoch
from camanim.viewer.report import write_report
from camanim.viz.render import FrameRenderer
from viewer_run import PROBES, tiny_run

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install playwright; a Chromium: apt-get install chromium)")
program = pytest.importorskip("tensorboard.program")

XSS = "<img src=x onerror=alert(1)>"


def _executable() -> str | None:
    for exe in (os.environ.get("CAMANIM_CHROMIUM"), "chromium", "chromium-browser",
                "google-chrome"):
        if exe and shutil.which(exe):
            return shutil.which(exe)
    return None


@pytest.fixture(scope="module")
def browser():
    pw = sync_api.sync_playwright().start()
    exe = _executable()
    try:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
    except Exception as e:  # noqa: BLE001 - any launch failure means: no browser here
        pw.stop()
        pytest.skip(f"no headless Chromium could be started ({exe or 'none found'}: "
                    f"{str(e).splitlines()[0]}); apt-get install chromium")
    try:
        yield b
    finally:
        b.close()
        pw.stop()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """run-a (a callback run), a run named with markup (its probe and class
    names too), broken (a malformed index)."""
    root = tmp_path_factory.mktemp("tab")
    out, probes = tiny_run(root)
    maps = LayerMaps.load(out / "maps" / "epoch001.npz")
    write_viewer_epoch(root / XSS, epoch=0, step=1, images=probes, maps=maps,
                       probes=[XSS, "dog"], method="gradcam",
                       render={"class_names": [XSS, "b", "c"]})
    (root / "broken" / "viewer").mkdir(parents=True)
    (root / "broken" / "viewer" / "index.json").write_text("{not json")
    return root, out, probes


@pytest.fixture(scope="module")
def tensorboard(logdir):
    from tensorboard import default

    from camanim.viewer.plugin import CAManimPlugin

    servers = []

    def make_server(app, flags):
        server = program.WerkzeugServer(app, flags)
        servers.append(server)
        return server

    tb = program.TensorBoard(plugins=default.get_static_plugins() + [CAManimPlugin],
                             server_class=make_server)
    tb.configure(argv=["tensorboard", "--logdir", str(logdir[0]), "--host", "127.0.0.1",
                       "--port", "0", "--load_fast", "false", "--reload_interval", "0"])
    url = tb.launch().rstrip("/")
    try:
        yield url
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


@pytest.fixture()
def tab(browser, tensorboard):
    """The CAManim tab's frame (TensorBoard loads it in an iframe), polling every 300 ms."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.add_init_script("globalThis.CAMANIM_POLL_MS = 300;")
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(tensorboard + "/#camanim")
    deadline = time.monotonic() + 60
    frame = None
    while frame is None and time.monotonic() < deadline:
        frame = next((f for f in page.frames if "plugin_entry.html" in f.url), None)
        page.wait_for_timeout(100)
    assert frame is not None, "TensorBoard did not open the CAManim tab's frame"
    frame.wait_for_selector("#cm-main-local[data-drawn]", timeout=30000)
    try:
        yield page, frame, dialogs
    finally:
        page.close()


def reference(out, probes, epoch: int, b: int, layer: int) -> dict[str, np.ndarray]:
    """The callback's frame for (epoch, layer) of probe ``b``, cut into its panels."""
    maps = LayerMaps.load(out / "maps" / f"epoch{epoch:03d}.npz").image(b)
    r = FrameRenderer(probes[b:b + 1], maps, normalization="both", size=96)
    frame = list(r.iter_layers())[layer][0]
    lay = r.layout
    return {norm: frame[y:y + lay.ph, x:x + lay.pw]
            for k, norm in enumerate(r.norms) for y, x in [lay.panel_origin(0, k)]}


def canvas(frame, cid: str) -> np.ndarray:
    data = frame.evaluate("""(id) => { const c = document.getElementById(id);
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""", cid)
    h, w = frame.evaluate("(id) => [document.getElementById(id).height, "
                          "document.getElementById(id).width]", cid)
    return np.array(data, np.uint8).reshape(h, w, 4)[..., :3]


CLICK = """async ([box, col, layer]) => {
    const root = document.querySelector('.camanim');
    const cell = document.querySelector(
        `${box} .cm-cell[data-col="${col}"][data-layer="${layer}"]`);
    const drawn = new Promise((r) => root.addEventListener('camanim-drawn', (e) => r(e.detail),
                                                           { once: true }));
    const t0 = performance.now();
    cell.click();
    const d = await drawn;
    return { ms: performance.now() - t0, epoch: d.epoch, layer: d.layer };
}"""


def click_shows_the_callbacks_frame(frame, out, probes, box="#cm-heatmap") -> list[float]:
    n_layers = frame.locator("#cm-heatmap .cm-row[data-layer]").count()
    times = []
    for col, layer in ((0, 0), (1, n_layers - 1), (0, 1)):
        got = frame.evaluate(CLICK, [box, col, layer])
        assert (got["epoch"], got["layer"]) == (col, layer)
        times.append(got["ms"])
        ref = reference(out, probes, col, 0, layer)
        for norm in ("local", "global"):
            np.testing.assert_array_equal(canvas(frame, f"cm-main-{norm}"), ref[norm],
                                          err_msg=f"epoch {col} layer {layer} {norm}")
    return times


# ---------------------------------------------------------------- the tab

def test_tab_is_listed_and_shows_one_row_per_layer_and_a_column_per_epoch(tab, tensorboard):
    import json
    import urllib.request

    page, frame, _ = tab
    with urllib.request.urlopen(tensorboard + "/data/plugins_listing", timeout=30) as r:
        listing = json.loads(r.read())
    assert listing["camanim"]["enabled"] and listing["camanim"]["tab_name"] == "CAManim"
    assert page.get_by_text("CAManim", exact=True).count() >= 1
    runs = frame.eval_on_selector_all("#cm-run option", "os => os.map((o) => o.textContent)")
    assert runs == [XSS, "broken", "run-a"]
    frame.select_option("#cm-run", "run-a")
    frame.wait_for_function("document.querySelectorAll('#cm-heatmap .cm-row[data-layer]')"
                            ".length === 3")
    for box in ("#cm-heatmap", "#cm-convergence"):
        rows = frame.locator(f"{box} .cm-row[data-layer]")
        assert rows.count() == 3                               # layers f.0, f.2, f.4
        for i in range(3):
            cells = rows.nth(i).locator(".cm-cell")
            assert [cells.nth(c).get_attribute("data-epoch") for c in range(cells.count())] \
                == ["0", "1"]                                  # the callback's epochs


def test_click_shows_the_frame_the_callback_rendered(tab, logdir):
    _, frame, _ = tab
    _, out, probes = logdir
    frame.select_option("#cm-run", "run-a")
    frame.wait_for_function("document.querySelectorAll('#cm-heatmap .cm-row[data-layer=\"0\"]"
                            " .cm-cell').length === 2")       # run-a's two epochs, not x's one
    times = click_shows_the_callbacks_frame(frame, out, probes)
    print(f"click-to-map ms (TensorBoard tab, cold): {[round(t, 1) for t in times]}")
    frame.evaluate(CLICK, ["#cm-convergence", 1, 2])          # the convergence map clicks too
    np.testing.assert_array_equal(canvas(frame, "cm-main-local"),
                                  reference(out, probes, 1, 0, 2)["local"])
    frame.hover("#cm-heatmap .cm-cell[data-col='1'][data-layer='1']")
    tip = frame.text_content("#cm-tip")
    assert "layer 2/3 f.2" in tip and "epoch 1" in tip and "chance ROAD" in tip \
        and "map change" in tip


def test_sliders_play_and_compare(tab, logdir):
    _, frame, _ = tab
    frame.select_option("#cm-run", "run-a")
    frame.wait_for_selector("#cm-main-local[data-drawn='1/2']")
    frame.focus("#cm-layer")
    frame.press("#cm-layer", "ArrowLeft")
    frame.wait_for_selector("#cm-main-local[data-drawn='1/1']")
    frame.press("#cm-epoch", "ArrowLeft")
    frame.wait_for_selector("#cm-main-local[data-drawn='0/1']")
    assert frame.text_content("#cm-layer-value").startswith("2/3 f.2")
    frame.click("#cm-play-layer")                             # through the layers
    seen = set()
    for _ in range(60):
        seen.add(frame.get_attribute("#cm-main-local", "data-drawn"))
        frame.wait_for_timeout(50)
    frame.click("#cm-play-layer")
    assert {"0/0", "0/1", "0/2"} <= seen, seen
    frame.click("#cm-play-epoch")                             # one layer through the epochs
    seen = set()
    for _ in range(60):
        seen.add(frame.get_attribute("#cm-main-local", "data-drawn")[:2])
        frame.wait_for_timeout(50)
    frame.click("#cm-play-epoch")
    assert {"0/", "1/"} <= seen, seen
    frame.select_option("#cm-epoch2", "0")                    # one layer, two epochs
    frame.select_option("#cm-probe2", "1")                    # two probes
    frame.wait_for_selector("#cm-epoch2-global[data-drawn]")
    frame.wait_for_selector("#cm-probe2-global[data-drawn]")
    layer = int(frame.get_attribute("#cm-main-local", "data-layer"))
    _, out, probes = logdir
    np.testing.assert_array_equal(canvas(frame, "cm-probe2-local"),
                                  reference(out, probes, int(frame.get_attribute(
                                      "#cm-probe2-local", "data-epoch")), 1, layer)["local"])


def test_markup_names_show_as_text_and_malformed_runs_as_a_message(tab):
    page, frame, dialogs = tab
    frame.select_option("#cm-run", "run-a")
    frame.wait_for_selector("#cm-main-local[data-drawn]")
    frame.select_option("#cm-run", XSS)
    frame.wait_for_function(f"document.getElementById('cm-probe').options[0].textContent"
                            f" === {XSS!r}")
    frame.wait_for_selector("#cm-main-local[data-drawn]")
    assert frame.eval_on_selector_all("#cm-probe option", "os => os.map((o) => o.textContent)") \
        == [XSS, "dog"]
    assert XSS in frame.text_content("#cm-info")              # the class name, as text
    assert frame.locator("img").count() == 0 and dialogs == []
    frame.select_option("#cm-run", "broken")
    frame.wait_for_function("document.getElementById('cm-status').textContent.includes("
                            "'unreadable')")
    assert frame.is_hidden(".cm-main")


def test_an_epoch_written_while_the_page_is_open_appears(tab, logdir):
    _, frame, _ = tab
    root, out, probes = logdir
    shutil.copytree(out, root / "run-b")
    frame.wait_for_function("Array.from(document.querySelectorAll('#cm-run option'))"
                            ".some((o) => o.value === 'run-b')", timeout=15000)
    frame.select_option("#cm-run", "run-b")
    frame.wait_for_function("document.querySelectorAll('#cm-heatmap .cm-row[data-layer=\"0\"]"
                            " .cm-cell').length === 2")
    maps = LayerMaps.load(out / "maps" / "epoch001.npz")
    write_viewer_epoch(root / "run-b", epoch=2, step=6, images=probes, maps=maps,
                       probes=list(PROBES), method="gradcam")
    frame.wait_for_function("document.querySelectorAll('#cm-heatmap .cm-row[data-layer=\"0\"]"
                            " .cm-cell').length === 3", timeout=15000)
    frame.wait_for_selector("#cm-main-local[data-drawn^='2/']")   # it follows the newest epoch


# ---------------------------------------------------------------- the report

def test_report_opens_offline_and_shows_the_callbacks_frames(browser, logdir, tmp_path):
    root, out, probes = logdir
    html = write_report(out, tmp_path / "report.html")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(
        ("file:", "data:", "blob:")) else route.continue_())  # offline: nothing else loads
    try:
        page.goto(html.as_uri())
        page.wait_for_selector("#cm-main-local[data-drawn]")
        assert page.locator("#cm-heatmap .cm-row[data-layer]").count() == 3
        times = click_shows_the_callbacks_frame(page, out, probes)
        print(f"click-to-map ms (report): {[round(t, 1) for t in times]}")
        page.goto(html.as_uri() + "#epoch=1&layer=1&compare_epoch=0")   # a view in the link
        page.wait_for_selector("#cm-epoch2-local[data-drawn='0/1']")
        assert page.get_attribute("#cm-main-local", "data-drawn") == "1/1"
        xss = write_report(root / XSS, tmp_path / "x.html")
        page.goto(xss.as_uri())
        page.wait_for_selector("#cm-main-local[data-drawn]")
        assert page.eval_on_selector_all("#cm-probe option", "os => os.map((o) => o.textContent)") \
            == [XSS, "dog"]
        assert page.text_content("#cm-run option") == XSS and XSS in page.title()
        assert page.locator("img").count() == 0 and dialogs == []
    finally:
        page.close()


def test_the_entry_point_registers_the_tab():
    from importlib import metadata

    eps = [ep for ep in metadata.entry_points(group="tensorboard_plugins") if ep.name == "camanim"]
    if not eps:
        pytest.skip("camanim's tensorboard_plugins entry point is not installed: "
                    "reinstall the package (pip install -e .)")
    from camanim.viewer.plugin import CAManimPlugin

    assert eps[0].load() is CAManimPlugin
