"""The timm half of ``bench_zoo.py --source timm``: the architectures, one
model's run (maps of every layer, then one training epoch with the
callback), and the markdown table.

Every model is built with ``pretrained=False`` (random weights, nothing
downloaded) at the input size of its ``pretrained_cfg``.
"""

from __future__ import annotations

import tempfile
import time
import traceback
import warnings
from collections import Counter

import torch

import camanim

# family -> architectures (small variants: the sweep runs on one CPU thread)
TIMM_ZOO: dict[str, list[str]] = {
    "ViT with registers": [
        "vit_pwee_patch16_reg1_gap_256", "vit_little_patch16_reg4_gap_256",
        "vit_medium_patch16_reg4_gap_256", "vit_small_patch14_reg4_dinov2"],
    "ViT/DeiT/EVA": [
        "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
        "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224", "eva02_tiny_patch14_224",
        "flexivit_small", "vit_relpos_small_patch16_224", "cait_xxs24_224",
        "xcit_nano_12_p16_224", "pit_ti_224", "convit_tiny", "crossvit_tiny_240",
        "vit_tiny_r_s16_p8_224"],
    "Swin/SwinV2": ["swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224",
                    "swinv2_tiny_window8_256", "swin_s3_tiny_224"],
    "ConvNeXt/V2": ["convnext_atto", "convnext_femto", "convnextv2_atto", "convnextv2_nano"],
    "MaxViT/CoAtNet": ["maxvit_nano_rw_256", "maxvit_pico_rw_256", "coatnet_nano_rw_224",
                       "maxxvit_rmlp_nano_rw_256", "coatnext_nano_rw_224"],
    "EfficientNet/V2": ["efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0",
                        "efficientnetv2_rw_t"],
    "RegNet": ["regnetx_002", "regnety_002", "regnetz_b16"],
    "MobileNet & mobile CNNs": [
        "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_small",
        "lcnet_050", "ghostnet_050", "mobileone_s0", "rexnet_100"],
    "FastViT": ["fastvit_t8", "fastvit_mci0"],
    "LeViT": ["levit_128s", "levit_conv_128s"],
    "ResNet & classic CNNs": [
        "resnet18", "resnet50", "resnext26ts", "densenet121", "dla34", "cspresnet50",
        "resnest14d", "repvgg_a0", "hgnetv2_b0"],
    "Other hybrids & transformers": [
        "twins_svt_small", "pvt_v2_b0", "efficientformer_l1", "efficientformerv2_s0",
        "edgenext_xx_small", "mobilevit_xxs", "mobilevitv2_050", "poolformer_s12",
        "caformer_s18", "inception_next_tiny", "hiera_tiny_224", "repvit_m1",
        "tiny_vit_5m_224", "rdnet_tiny", "starnet_s1", "mambaout_femto"],
}
FAMILY = {n: f for f, names in TIMM_ZOO.items() for n in names}


def build_timm(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with random weights and one input at its default size."""
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(1))
    return model, x


def _layout_facts(table: camanim.core.layers.LayerTable) -> dict:
    """Where the token / channels-last layouts came from, and the traps flagged."""
    sources = Counter((i.layout_source or "").split(":")[0] for i in table.calls
                      if i.layout_source)
    return {"layout_sources": dict(sources),
            "layout_read": sorted({i.layout_source.split(": ", 1)[1] for i in table.calls
                                   if (i.layout_source or "").startswith("read")}),
            "zero_gradient": [i.name for i in table.calls if i.zero_gradient],
            "layouts_drawn": dict(Counter(i.layout for i in table.selected))}


def oracle(model: torch.nn.Module, x: torch.Tensor) -> list[str] | str:
    """Per feature stage (``feature_info``): does the NCHW map camanim reads
    equal timm's own ``forward_intermediates`` output? ``"equal"``,
    ``"skipped: <reason>"`` (never drawn), or the mismatch."""
    from camanim.core.capture import capture

    if not hasattr(model, "forward_intermediates") or not isinstance(
            getattr(model, "feature_info", None), list):
        return "no forward_intermediates"
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = camanim.list_layers(model, x, "all").calls
    first = {i.module_name: i for i in reversed(calls) if i.call == 1}
    out = []
    for d, w in zip(model.feature_info, want, strict=False):
        info = first.get(d["module"])
        if info is None or info.skipped:
            out.append(f"skipped: {info.skipped[:60]}" if info else "not called")
            continue
        a = capture(model, x, [info], gradients=False).activations[0]
        out.append("equal" if a.shape == w.shape and torch.equal(a, w) else
                   f"differs: {tuple(a.shape)} vs {tuple(w.shape)}")
    return out


def callback_epoch(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """One training epoch (2 images, SGD) with ``CAManimCallback`` on "blocks",
    ybROAD on; light settings keep the sweep short on one CPU thread: at most 2
    block layers (the first and the last), ROAD at one percentile (50), no
    chance baseline."""
    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, t):
            return self.net(t)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    xs = torch.cat([x, x.flip(-1)])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, torch.tensor([0, 1])),
                                       batch_size=2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = camanim.CAManimCallback(x, layers="blocks", max_layers=2, save_dir=tmp,
                                     road_percentiles=(50,), chance=False, log_videos=False,
                                     save_videos=False, progress=False)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp, callbacks=[cb])
        trainer.fit(Lit().train(), data)  # train mode, as a fine-tuning run would
        done = cb.epochs_done
        said = [str(w.message) for w in caught if "CAManimCallback" in str(w.message)]
        return {"callback": "ok" if done == [0] else
                f"no record ({said[0] if said else f'epochs done {done}'})",
                "callback_seconds": round(time.perf_counter() - t0, 2)}


def run_one_timm(name: str) -> dict:
    """Maps of every layer of one timm model, then one callback epoch."""
    out: dict = {"model": name, "family": FAMILY.get(name, "")}
    try:
        model, x = build_timm(name)
    except Exception as e:  # noqa: BLE001 - the model's own constructor, not camanim
        return {**out, "status": "model_error", "message": f"{type(e).__name__}: {e}"[:600]}
    out["size"] = list(x.shape[-2:])
    out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            anim = camanim.CAManim(model, "gradcam", layers="all", progress=False)
            maps = anim(x)
            table = anim.layer_table(x)
        except camanim.CAManimError as e:
            return {**out, "status": "error", "message": str(e)}
        except Exception as e:  # noqa: BLE001 - anything but CAManimError is a bug
            return {**out, "status": "failure", "exception": type(e).__name__,
                    "message": str(e)[:600], "traceback": traceback.format_exc()[-2500:]}
        out.update(status="ok", seconds=round(time.perf_counter() - t0, 3), drawn=len(maps),
                   calls=len(table.calls), skipped=len(table.skipped))
    out["skip_reasons"] = dict(Counter(_key(i.skipped or "") for i in table.skipped))
    out["blocks"] = camanim.list_layers(model, x, "blocks").names
    out.update(_layout_facts(table))
    try:
        out["oracle"] = oracle(model, x)
    except Exception as e:  # noqa: BLE001 - timm's own forward_intermediates may not run
        out["oracle"] = f"{type(e).__name__}: {str(e)[:200]}"
    out["nonfinite_layers"] = [n for n, r in maps if not torch.isfinite(r).all()]
    out["camanim_warnings"] = sorted({str(w.message)[:400] for w in caught
                                      if "camanim" in str(w.message)})
    try:
        out.update(callback_epoch(model, x))
    except Exception as e:  # noqa: BLE001 - reported in the table, the sweep goes on
        out.update(callback=f"{type(e).__name__}: {str(e)[:300]}",
                   callback_traceback=traceback.format_exc()[-2000:])
    return out


def _key(reason: str) -> str:
    import re

    return re.sub(r"\d+", "N", reason)


def markdown_timm(rows: list[dict], meta: dict) -> str:
    """The table for benchmarks/RESULTS.md."""
    counts = Counter(r["status"] for r in rows)
    cb_ok = sum(r.get("callback") == "ok" for r in rows)
    lines = [
        "### `CAManim(model, \"gradcam\", layers=\"all\")` over timm architectures",
        "",
        f"`python benchmarks/bench_zoo.py --source timm`: {len(rows)} models of timm "
        f"{meta.get('timm', '?')} (torch {meta.get('torch', '?')}), random weights "
        "(`pretrained=False`), each at its default input size, batch 1, 1 CPU thread. "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        + f"; the callback ran one epoch on {cb_ok}.",
        "Seconds: the CAManim call (discovery, one forward and backward, every map). "
        "Layout: where token / channels-last layouts came from (read: stated by the model; "
        "guessed: told from the token count). Zero-grad: layers flagged `zero_gradient`. "
        "Callback: one training epoch with `CAManimCallback(layers=\"blocks\", max_layers=2, "
        "road_percentiles=(50,), chance=False)` (ybROAD on, light settings for one CPU thread).",
        "",
        "| family | model | px | params (M) | drawn | skipped (why) | layout | zero-grad | "
        "seconds | blocks | callback |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        why = _why(r)
        layout = ", ".join(f"{k} {v}" for k, v in r.get("layout_sources", {}).items()) or "-"
        res = r.get("callback", "") if r["status"] == "ok" else \
            f"{r['status']}: {r.get('message', '')[:120]}"
        lines.append(
            f"| {r.get('family') or FAMILY.get(r['model'], '')} | {r['model']} | "
            f"{'x'.join(map(str, r.get('size', [])))} | "
            f"{r.get('params_m', '')} | {r.get('drawn', '')} | {why} | {layout} | "
            f"{len(r.get('zero_gradient', []))} | {r.get('seconds', '')} | "
            f"{len(r.get('blocks', []))} | {str(res).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


SHORT = (("spatial output: no spatial extent", "1x1"), ("vector output", "vector"),
         ("unrolled (mask-unit) order", "unrolled"), ("not the batch", "window"),
         ("token sequence", "tokens?"), ("layout cannot be told", "layout?"),
         ("not a single tensor", "non-tensor"), ("dtype", "non-float"))


def _short(reason: str) -> str:
    return next((s for pat, s in SHORT if pat in reason), reason[:30])


def _why(r: dict) -> str:
    c: Counter = Counter()
    for k, v in r.get("skip_reasons", {}).items():
        c[_short(k)] += v
    return f"{sum(c.values())} (" + ", ".join(f"{k} {v}" for k, v in c.most_common()) + ")" \
        if c else "0"
