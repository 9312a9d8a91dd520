"""CAManim over the torchvision classification zoo: maps, or a clear error.

For every model of ``torchvision.models.list_models(module=torchvision.models)``
(random weights, eval mode, batch 1, one torch thread) this runs
``CAManim(model, "gradcam", layers="all")`` on one random image and reports:

* ``drawn``: the layers that got a map;
* ``skipped``: the layers ``"all"`` matched but cannot draw, grouped by the
  reason `camanim.list_layers` gives;
* ``seconds``: wall time of the CAManim call (discovery, the one forward
  and backward pass, every layer's map; model construction excluded);
* ``status``: ``ok``, ``error`` (a `camanim.CAManimError`, with its message),
  ``failure`` (any other exception: a bug to fix, with the traceback tail),
  ``model_error`` (the model itself does not run at any tried size) or
  ``timeout``.

Inputs are ``--size`` pixels square, or the smallest of a few larger sizes
at which the model's own forward runs (Inception-v3 needs 75 px, MaxViT a
multiple of 224's grid); ViTs are built with ``image_size`` rounded up to
their patch size. Each model runs in a forked child process with a timeout,
so one hang or crash does not stop the sweep.

    OMP_NUM_THREADS=1 python benchmarks/bench_zoo.py --out zoo.json --markdown zoo_table.md
    python benchmarks/bench_zoo.py --models resnet18 vit_b_16 --size 64

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torchvision

import camanim

FALLBACK_SIZES = (75, 96, 128, 160, 224)


def build(name: str, size: int) -> tuple[torch.nn.Module, int]:
    """The model with random weights and the input size it is built for."""
    kw = {}
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        size = math.ceil(size / patch) * patch
        kw["image_size"] = size
    elif name.startswith("maxvit"):
        kw["input_size"] = (size, size)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init_weights FutureWarnings of googlenet/inception
        model = torchvision.models.get_model(name, weights=None, **kw)
    return model.eval(), size


def runnable(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor, list[str]]:
    """The model and a (1, 3, s, s) input for the smallest size >= ``size``
    at which the model's own forward runs; raises the last forward error."""
    tried: list[str] = []
    last: BaseException | None = None
    for s in [size] + [s for s in FALLBACK_SIZES if s > size]:
        try:
            model, s = build(name, s)
            x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(x)
            return model, x, tried
        except Exception as e:  # noqa: BLE001 - the model's own limits, not camanim's
            tried.append(f"{s}px: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            last = e
    raise RuntimeError("the model's own forward fails at every tried size: "
                       + " | ".join(tried)) from last


def reason_key(reason: str) -> str:
    """A skip reason with its shapes and sizes generalized, for grouping."""
    return re.sub(r"\d+", "N", reason)


def run_one(name: str, size: int) -> dict:
    out: dict = {"model": name}
    try:
        model, x, tried = runnable(name, size)
    except Exception as e:  # noqa: BLE001 - any model of the zoo may fail; it is reported, the others go on
        out.update(status="model_error", message=str(e)[:600])
        return out
    out["size"] = int(x.shape[-1])
    out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if tried:
        out["smaller_sizes_failed"] = tried
    try:
        table = camanim.list_layers(model, x, layers="all")
        out["calls"] = len(table.calls)
        out["selectable"] = len(table.selected)
        groups = Counter(reason_key(i.skipped or "") for i in table.skipped)
        out["skipped"] = len(table.skipped)
        out["skip_reasons"] = dict(groups.most_common())
        out["skipped_layers"] = [[i.name, i.skipped] for i in table.skipped]
    except Exception as e:  # noqa: BLE001 - any model of the zoo may fail; it is reported, the others go on
        out["list_layers_error"] = f"{type(e).__name__}: {e}"[:600]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            maps = camanim.CAManim(model, "gradcam", layers="all", progress=False)(x)
        except camanim.CAManimError as e:
            out.update(status="error", message=str(e), seconds=round(time.perf_counter() - t0, 3))
        except Exception as e:  # noqa: BLE001 - anything but CAManimError is a bug
            out.update(status="failure", exception=type(e).__name__, message=str(e)[:600],
                       traceback="".join(traceback.format_exc())[-2500:],
                       seconds=round(time.perf_counter() - t0, 3))
        else:
            out.update(status="ok", seconds=round(time.perf_counter() - t0, 3), drawn=len(maps))
            bad = [n for n, r in maps if not torch.isfinite(r).all()]
            zero = [n for n, r in maps if bool((r == 0).all())]
            out["nonfinite_layers"] = bad
            out["all_zero_layers"] = len(zero)
    msgs = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                   if "camanim" in str(w.filename)})
    if msgs:
        out["camanim_warnings"] = [m[:300] for m in msgs]
    return out


def _child(name: str, size: int, conn) -> None:
    torch.set_num_threads(1)
    try:
        conn.send(run_one(name, size))
    except BaseException as e:  # noqa: BLE001 - any model of the zoo may fail; it is reported, the others go on
        conn.send({"model": name, "status": "failure", "exception": type(e).__name__,
                   "message": str(e)[:600], "traceback": traceback.format_exc()[-2500:]})
    conn.close()


def run_isolated(name: str, size: int, timeout: float) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    p = ctx.Process(target=_child, args=(name, size, child), daemon=True)
    p.start()
    child.close()
    res = None
    if parent.poll(timeout):
        try:
            res = parent.recv()
        except EOFError:
            res = None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if res is None:
        status = "timeout" if time.perf_counter() - t0 >= timeout else "crashed"
        res = {"model": name, "status": status,
               "message": f"no result after {time.perf_counter() - t0:.0f} s "
                          f"(exit code {p.exitcode})"}
    res["total_seconds"] = round(time.perf_counter() - t0, 2)
    return res


SHORT = (("spatial output: no spatial extent", "1x1"), ("vector output", "vector"),
         ("token sequence", "tokens"), ("layout cannot be told", "layout?"),
         ("not a single tensor", "non-tensor"))


def short_reasons(r: dict) -> str:
    """``"1x1 45, vector 1"``: the skip reasons of one model, abbreviated."""
    out: Counter = Counter()
    for k, v in r.get("skip_reasons", {}).items():
        out[next((s for pat, s in SHORT if pat in k), k[:40])] += v
    return ", ".join(f"{k} {v}" for k, v in out.most_common())


def markdown(result: dict) -> str:
    meta = result["meta"]
    rows = result["models"]
    counts = Counter(r["status"] for r in rows)
    lines = [
        "### `CAManim(model, \"gradcam\", layers=\"all\")` over the torchvision zoo",
        "",
        f"`python benchmarks/bench_zoo.py --size {meta['size']}`: {len(rows)} models of "
        f"torchvision {meta['torchvision']} (torch {meta['torch']}), random weights, batch 1, "
        f"{meta['threads']} CPU thread, {meta['machine']}. "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ".",
        "Seconds: the CAManim call (layer discovery, one forward and backward, every map). "
        "Skipped: layers `\"all\"` matched that have no drawable map, by reason "
        "(abbreviated; the reasons in full are in the second table).",
        "",
        "| model | px | params (M) | drawn | skipped | skipped by reason | seconds | result |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            res = "ok"
            if r.get("nonfinite_layers"):
                res += f" ({len(r['nonfinite_layers'])} maps not finite)"
        elif r["status"] == "error":
            res = "CAManimError: " + r["message"].splitlines()[0]
        elif r["status"] == "failure":
            res = f"**{r['exception']}**: " + r["message"].splitlines()[0][:150]
        else:
            res = f"{r['status']}: {r.get('message', '')[:150]}"
        res = res.replace("|", "\\|")
        sk = r.get("skipped", "")
        lines.append(f"| {r['model']} | {r.get('size', '')} | {r.get('params_m', '')} | "
                     f"{r.get('drawn', '')} | {sk} | {short_reasons(r)} | {r.get('seconds', '')} | "
                     f"{res} |")
    reasons: Counter = Counter()
    models_per_reason: dict[str, set] = {}
    for r in rows:
        for k, v in r.get("skip_reasons", {}).items():
            reasons[k] += v
            models_per_reason.setdefault(k, set()).add(r["model"])
    if reasons:
        lines += ["", "Skip reasons over the zoo (N: a number):", "",
                  "| short | reason | layers | models |", "|---|---|---:|---:|"]
        for k, v in reasons.most_common():
            short = next((s for pat, s in SHORT if pat in k), "")
            lines.append(f"| {short} | {k.replace('|', chr(92) + '|')} | {v} | "
                         f"{len(models_per_reason[k])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", help="subset of model names (default: the whole zoo)")
    ap.add_argument("--size", type=int, default=64, help="input pixels (default 64)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--markdown", type=Path, help="write a markdown table here")
    ap.add_argument("--quiet", action="store_true", help="no per-model progress on stderr")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only write --markdown from a JSON file this script wrote")
    args = ap.parse_args()
    if args.render:
        if not args.markdown:
            ap.error("--render needs --markdown")
        args.markdown.write_text(markdown(json.loads(args.render.read_text())))
        return
    torch.set_num_threads(1)
    zoo = torchvision.models.list_models(module=torchvision.models)
    names = args.models or zoo
    unknown = [n for n in names if n not in zoo]
    if unknown:
        ap.error(f"not classification models of torchvision: {unknown}")
    rows = []
    for n in names:
        r = run_isolated(n, args.size, args.timeout)
        rows.append(r)
        if not args.quiet:
            print(f"{n:28s} {r['status']:12s} drawn={r.get('drawn', '-')} "
                  f"skipped={r.get('skipped', '-')} {r.get('seconds', '-')} s "
                  f"{(r.get('message') or '')[:100]}", file=sys.stderr, flush=True)
        if args.out:  # partial results survive an interrupted sweep
            args.out.write_text(json.dumps({"models": rows}, indent=1))
    meta = {"size": args.size, "threads": 1, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "camanim": camanim.__version__,
            "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
            "python": platform.python_version()}
    result = {"meta": meta, "summary": dict(Counter(r["status"] for r in rows)), "models": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(result))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
