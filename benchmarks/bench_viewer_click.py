"""Click-to-map time of TensorBoard's CAManim tab, measured in the browser.

    python benchmarks/bench_viewer_click.py        # prints one JSON object

A run at the full setting (4 probes x 53 layers, local and global, 224 px
input; smooth random maps of ResNet-50's shapes, ``--epochs`` callback
epochs) is written with `camanim.viewer.data.write_viewer_epoch`, served by
TensorBoard in this process (127.0.0.1) and opened in headless Chromium
(playwright; ``CAMANIM_CHROMIUM`` or ``chromium`` on the PATH). Each click
on a heatmap cell is timed in the page with ``performance.now()`` from the
click until every map panel of that cell is drawn. ``cold``: the first
click on an epoch (its sprite sheet is fetched and decoded);
``after_150ms_hover``: the first click on an epoch after the pointer rested
150 ms on the cell (hovering fetches ahead); ``warm``: a layer of an epoch
already loaded. The budget is 100 ms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_viewer import batch_maps, images  # noqa: E402 - the benchmarks' folder first

from camanim.viewer.data import write_viewer_epoch  # noqa: E402

CLICK = """async ([col, layer, hoverMs]) => {
    const root = document.querySelector('.camanim');
    const cell = document.querySelector(
        `#cm-heatmap .cm-cell[data-col="${col}"][data-layer="${layer}"]`);
    if (hoverMs) {      // the pointer rests on the cell before the click, as a hand does
        cell.dispatchEvent(new MouseEvent('mouseover', { bubbles: true }));
        await new Promise((r) => setTimeout(r, hoverMs));
    }
    const drawn = new Promise((r) => root.addEventListener('camanim-drawn', r, { once: true }));
    const t0 = performance.now();
    cell.click();
    await drawn;
    return performance.now() - t0;
}"""


def serve(logdir: Path):
    from tensorboard import default, program

    from camanim.viewer.plugin import CAManimPlugin

    servers = []

    def make_server(app, flags):
        servers.append(program.WerkzeugServer(app, flags))
        return servers[-1]

    tb = program.TensorBoard(plugins=default.get_static_plugins() + [CAManimPlugin],
                             server_class=make_server)
    tb.configure(argv=["tensorboard", "--logdir", str(logdir), "--host", "127.0.0.1",
                       "--port", "0", "--load_fast", "false", "--reload_interval", "0"])
    return tb.launch().rstrip("/"), servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        x, maps = images(4, 224), batch_maps(53, 4, 224)
        for e in range(args.epochs):
            write_viewer_epoch(Path(tmp) / "run", epoch=e, step=e, images=x, maps=maps,
                               probes=[f"probe{b}" for b in range(4)], method="gradcam")
        url, servers = serve(Path(tmp))
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url + "/#camanim")
                page.wait_for_timeout(500)
                frame = None
                while frame is None:
                    frame = next((f for f in page.frames if "plugin_entry" in f.url), None)
                    page.wait_for_timeout(100)
                frame.wait_for_selector("#cm-main-local[data-drawn]", timeout=60000)
                n = args.epochs - 1          # the last epoch is open at the start
                cold = [frame.evaluate(CLICK, [e, (7 * e) % 53, 0]) for e in range(0, n, 2)]
                hover = [frame.evaluate(CLICK, [e, (5 * e) % 53, 150]) for e in range(1, n, 2)]
                warm = [frame.evaluate(CLICK, [e, (11 * e + 5) % 53, 0]) for e in range(n)]
                browser.close()
        finally:
            for s in servers:
                s.shutdown()
                s.server_close()
    out = {"setting": "4 probes x 53 layers, local+global, 96 px panels", "epochs": args.epochs,
           "cold_ms": {"median": round(statistics.median(cold), 1), "max": round(max(cold), 1)},
           "after_150ms_hover_ms": {"median": round(statistics.median(hover), 1),
                                    "max": round(max(hover), 1)},
           "warm_ms": {"median": round(statistics.median(warm), 1), "max": round(max(warm), 1)},
           "within_100_ms": max(cold + hover + warm) <= 100.0}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
