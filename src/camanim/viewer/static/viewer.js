/* camanim viewer: every layer's map at every epoch (docs/VIEWER.md).
 *
 * One script for the TensorBoard tab (data over HTTP, polled for new epochs)
 * and the offline report (data inlined). No build step, no dependencies.
 * Every name that comes from data (run, probe, layer, class) reaches the page
 * through textContent or a property, never as HTML.
 */
(function () {
  "use strict";
  const f32 = Math.fround;

  // ------------------------------------------------------------ sources
  function httpSource(base) {
    const url = (p) => base + p;
    const q = (o) => Object.keys(o).map((k) => k + "=" + encodeURIComponent(o[k])).join("&");
    async function ok(r) {
      if (!r.ok) throw new Error("the server answered " + r.status);
      return r;
    }
    return {
      live: true,
      runs: async () => (await ok(await fetch(url("runs")))).json(),
      index: async (run) => (await ok(await fetch(url("index?" + q({ run }))))).json(),
      sprite: async (run, epoch, k) =>
        (await ok(await fetch(url("sprite?" + q({ run, epoch, probe: k }))))).blob(),
      background: async (run, k) =>
        (await ok(await fetch(url("background?" + q({ run, probe: k }))))).arrayBuffer(),
    };
  }

  function bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function inlineSource(data) {
    const run = (r) => {
      if (!Object.prototype.hasOwnProperty.call(data.data, r)) throw new Error("no such run");
      return data.data[r];
    };
    return {
      live: false,
      runs: async () => ({ runs: data.runs, message: data.message }),
      index: async (r) => run(r).index,
      sprite: async (r, epoch, k) => {
        const b = run(r).sprites[epoch + "_" + k];
        if (b === undefined) throw new Error("this report holds no map for that epoch");
        return new Blob([bytes(b)], { type: "image/png" });
      },
      background: async (r, k) => bytes(run(r).backgrounds[k]).buffer,
    };
  }

  // ------------------------------------------------------------ helpers
  function el(tag, attrs, parent, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  const fmt = (v) => (v === null || v === undefined || !isFinite(v) ? "n/a" : (+v).toFixed(3));

  /** Layer names without the dotted prefix they all share ("model."). */
  function shortNames(names) {
    const parts = names.map((n) => n.split("."));
    let k = 0;
    while (parts.length > 1 && parts.every((p) => p.length > k + 1 && p[k] === parts[0][k])) k++;
    return parts.map((p) => p.slice(k).join("."));
  }

  // viridis-like and magma-like ramps: [t, r, g, b]
  const VIRIDIS = [[0, 68, 1, 84], [0.25, 59, 82, 139], [0.5, 33, 145, 140], [0.75, 94, 201, 98], [1, 253, 231, 37]];
  const MAGMA = [[0, 252, 253, 191], [0.33, 252, 137, 97], [0.66, 183, 55, 121], [1, 28, 16, 68]];
  function ramp(t, stops) {
    t = Math.min(1, Math.max(0, t));
    for (let i = 1; i < stops.length; i++) {
      const [t1, ...c1] = stops[i];
      const [t0, ...c0] = stops[i - 1];
      if (t <= t1) {
        const u = (t - t0) / (t1 - t0);
        return "rgb(" + c0.map((c, j) => Math.round(c + u * (c1[j] - c))).join(",") + ")";
      }
    }
    return "rgb(" + stops[stops.length - 1].slice(1).join(",") + ")";
  }

  // ------------------------------------------------------------ viewer
  function start(root, source, opts) {
    opts = opts || {};
    const S = { runs: [], run: null, index: null, probe: 0, probe2: -1, epoch: 0, epoch2: -1,
                layer: 0, playing: null, timer: null, sprites: new Map(), bgs: new Map() };
    root.classList.add("camanim");
    const top = el("div", { class: "cm-top" }, root);
    const pick = (label, id) => {
      const l = el("label", {}, top, label + " ");
      return el("select", { id }, l);
    };
    const runSel = pick("Run", "cm-run");
    const probeSel = pick("Probe", "cm-probe");
    const probe2Sel = pick("Compare probe", "cm-probe2");
    const epoch2Sel = pick("Compare epoch", "cm-epoch2");
    const status = el("span", { id: "cm-status", class: "cm-status", role: "status" }, top);
    const main = el("div", { class: "cm-main" }, root);
    const left = el("div", { class: "cm-left" }, main);
    const hmBox = (title, id) => {
      const box = el("div", { class: "cm-hmbox" }, left);
      el("h3", {}, box, title);
      return el("div", { id, class: "cm-hm" }, box);
    };
    const heat = hmBox("ybROAD by epoch (columns) and layer (rows)", "cm-heatmap");
    const conv = hmBox("Map change since the previous epoch (1 \u2212 Spearman)", "cm-convergence");
    const right = el("div", { class: "cm-right" }, main);
    const ctl = el("div", { class: "cm-controls" }, right);
    const slider = (label, id) => {
      const row = el("div", { class: "cm-slider" }, ctl);
      el("span", { class: "cm-label" }, row, label);
      const s = el("input", { id, type: "range", min: "0", max: "0", step: "1", value: "0" }, row);
      const out = el("span", { id: id + "-value", class: "cm-value" }, row);
      const play = el("button", { id: id.replace("cm-", "cm-play-"), type: "button" }, row,
                      "\u25B6 play");
      return [s, out, play];
    };
    const [layerS, layerV, playL] = slider("Layer", "cm-layer");
    const [epochS, epochV, playE] = slider("Epoch", "cm-epoch");
    const info = el("div", { id: "cm-info", class: "cm-info" }, right);
    const views = el("div", { id: "cm-views", class: "cm-views" }, right);
    el("h3", {}, right, "ybROAD of this epoch by layer (dashed: chance)");
    const curve = el("canvas", { id: "cm-curve", width: "480", height: "160" }, right);
    const tip = el("div", { id: "cm-tip", class: "cm-tip", hidden: "" }, root);

    const say = (msg) => { status.textContent = msg || ""; };
    const epochs = () => (S.index ? S.index.epochs : []);
    const E = () => epochs()[S.epoch];
    const probeName = (k) => S.index.probes[k].name;

    // .......................................................... data
    const MAX_SHEETS = 24;              // decoded sprite sheets kept (least recently used out)
    function sheet(k, epoch) {
      const key = S.run + "\u0000" + epoch + "\u0000" + k;
      let p = S.sprites.get(key);
      if (p) {
        S.sprites.delete(key);            // most recently used goes last
      } else {
        p = source.sprite(S.run, epoch, k).then((blob) => createImageBitmap(
          blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" }));
        p.catch(() => S.sprites.delete(key));
      }
      S.sprites.set(key, p);
      while (S.sprites.size > MAX_SHEETS) {
        const [old, q] = S.sprites.entries().next().value;
        S.sprites.delete(old);
        q.then((b) => b.close(), () => {});
      }
      return p;
    }
    const scratch = document.createElement("canvas");
    /** The colour indices of one layer's row of panels (all norms), as RGBA. */
    async function layerRow(k, epoch, layer) {
      const bmp = await sheet(k, epoch);
      const [ph] = S.index.panel;
      scratch.width = bmp.width; scratch.height = ph;
      const g = scratch.getContext("2d", { willReadFrequently: true });
      g.imageSmoothingEnabled = false;
      g.drawImage(bmp, 0, layer * ph, bmp.width, ph, 0, 0, bmp.width, ph);
      return g.getImageData(0, 0, bmp.width, ph);
    }
    function background(k) {
      const key = S.run + "\u0000" + k;
      if (!S.bgs.has(key)) {
        const p = source.background(S.run, k).then((buf) => new Float32Array(buf));
        p.catch(() => S.bgs.delete(key));
        S.bgs.set(key, p);
      }
      return S.bgs.get(key);
    }
    /** Panel (k, epoch, layer, norm j) as the callback's blend computes it:
     *  uint8(bg + lut[index] + 0.5) in float32 arithmetic. */
    function panel(img, bg, j) {
      const [ph, pw] = S.index.panel;
      const lut = S.index.lut;
      const out = new ImageData(pw, ph);
      for (let y = 0; y < ph; y++) {
        for (let x = 0; x < pw; x++) {
          const idx = img.data[(y * img.width + j * pw + x) * 4];
          const o = (y * pw + x) * 4;
          const b = (y * pw + x) * 3;
          for (let c = 0; c < 3; c++) {
            out.data[o + c] = Math.trunc(f32(f32(bg[b + c] + lut[idx][c]) + 0.5));
          }
          out.data[o + 3] = 255;
        }
      }
      return out;
    }

    // .......................................................... heatmaps
    function buildHeatmap(box, value, range, stops) {
      box.replaceChildren();
      const n = Math.max(1, epochs().length), L = Math.max(1, S.index.layers.length);
      box.style.setProperty("--cw", Math.max(6, Math.min(20, Math.floor(360 / n))) + "px");
      box.style.setProperty("--ch", Math.max(6, Math.min(22, Math.floor(540 / L))) + "px");
      const names = S.index.layers.map((l) => l.name);
      const short = shortNames(names);
      const [lo, hi] = range;
      names.forEach((name, i) => {
        const row = el("div", { class: "cm-row", "data-layer": String(i) }, box);
        el("span", { class: "cm-rowname", title: name }, row, short[i]);
        epochs().forEach((e, c) => {
          const v = value(e, i);
          const cell = el("div", { class: "cm-cell", "data-epoch": String(e.epoch),
                                   "data-col": String(c), "data-layer": String(i) }, row);
          cell.style.background = v === null || v === undefined ? "#444"
            : ramp(hi > lo ? (v - lo) / (hi - lo) : 0.5, stops);
        });
      });
      const foot = el("div", { class: "cm-row cm-foot" }, box);
      el("span", { class: "cm-rowname" }, foot, "epoch \u2192");
      epochs().forEach((e) => el("span", { class: "cm-colname" }, foot, String(e.epoch)));
    }
    const road = (e, i) => { const r = e.road && e.road[probeName(S.probe)]; return r ? r[i] : null; };
    const change = (e, i) => { const r = e.change && e.change[probeName(S.probe)]; return r ? r[i] : null; };
    function range(value) {
      const vs = [];
      epochs().forEach((e) => S.index.layers.forEach((_, i) => {
        const v = value(e, i); if (v !== null && v !== undefined && isFinite(v)) vs.push(v);
      }));
      return vs.length ? [Math.min(...vs), Math.max(...vs)] : [0, 1];
    }
    function buildHeatmaps() {
      buildHeatmap(heat, road, range(road), VIRIDIS);
      buildHeatmap(conv, change, [0, Math.max(0.2, range(change)[1])], MAGMA);
      mark();
    }
    function mark() {
      for (const box of [heat, conv]) {
        box.querySelectorAll(".cm-sel").forEach((c) => c.classList.remove("cm-sel"));
        const c = box.querySelector(`.cm-cell[data-col="${S.epoch}"][data-layer="${S.layer}"]`);
        if (c) c.classList.add("cm-sel");
      }
    }
    function cellText(e, i) {
      const L = S.index.layers.length;
      const chance = e.chance ? e.chance[probeName(S.probe)] : null;
      return `layer ${i + 1}/${L} ${S.index.layers[i].name} \u00B7 epoch ${e.epoch} \u00B7 ` +
        `ROAD ${fmt(road(e, i))} \u00B7 chance ROAD ${fmt(chance)} \u00B7 map change ${fmt(change(e, i))}`;
    }
    function cellOf(ev) {
      const c = ev.target.closest && ev.target.closest(".cm-cell");
      return c ? [+c.dataset.col, +c.dataset.layer] : null;
    }
    for (const box of [heat, conv]) {
      box.addEventListener("mouseover", (ev) => {
        const hit = cellOf(ev);
        if (!hit) { tip.hidden = true; return; }
        const e = epochs()[hit[0]];
        tip.textContent = cellText(e, hit[1]);
        tip.hidden = false;
        tip.style.left = ev.pageX + 12 + "px"; tip.style.top = ev.pageY + 12 + "px";
        sheet(S.probe, e.epoch).catch(() => {});   // fetch ahead of the click
      });
      box.addEventListener("mouseleave", () => { tip.hidden = true; });
      box.addEventListener("click", (ev) => {
        const hit = cellOf(ev);
        if (hit) { stop(); go(hit[0], hit[1]); }
      });
    }

    // .......................................................... views
    function view(id, caption, k, epoch, layer) {
      const fig = el("figure", { id, class: "cm-view" }, views);
      el("figcaption", {}, fig, caption);
      const row = el("div", { class: "cm-panels" }, fig);
      const [ph, pw] = S.index.panel;
      const canvases = S.index.norms.map((norm) => {
        const box = el("div", { class: "cm-panel" }, row);
        const c = el("canvas", { id: id + "-" + norm, width: String(pw), height: String(ph),
                                 "data-epoch": String(epoch), "data-layer": String(layer),
                                 "data-probe": String(k) }, box);
        el("div", { class: "cm-norm" }, box, norm);
        return c;
      });
      return Promise.all([layerRow(k, epoch, layer), background(k)]).then(([img, bg]) => {
        canvases.forEach((c, j) => {
          c.getContext("2d").putImageData(panel(img, bg, j), 0, 0);
          c.dataset.drawn = epoch + "/" + layer;
        });
      });
    }
    let drawSeq = 0;
    async function draw() {
      const e = E();
      if (!e) return;
      const seq = ++drawSeq;
      const L = S.index.layers;
      const layer = L[S.layer];
      layerS.value = String(S.layer); epochS.value = String(S.epoch);
      layerV.textContent = `${S.layer + 1}/${L.length} ${layer.name}`;
      epochV.textContent = `${e.epoch} (step ${e.step})`;
      info.textContent = `${layer.type} \u00B7 ${layer.shape} \u00B7 ${S.index.method} \u00B7 ` +
        `target: ${target(e, S.probe)} \u00B7 ` + cellText(e, S.layer);
      mark();
      drawCurve(e);
      views.replaceChildren();
      const pname = probeName(S.probe);
      const jobs = [];
      if (e.probes.includes(pname)) {
        jobs.push(view("cm-main", `${pname} \u00B7 epoch ${e.epoch}`, S.probe, e.epoch, S.layer));
      } else {
        el("p", { class: "cm-note" }, views, `probe ${pname} has no maps at epoch ${e.epoch} (set aside)`);
      }
      const e2 = epochs()[S.epoch2];
      if (S.epoch2 >= 0 && e2 && e2.probes.includes(pname)) {
        jobs.push(view("cm-epoch2", `${pname} \u00B7 epoch ${e2.epoch}`, S.probe, e2.epoch, S.layer));
      }
      if (S.probe2 >= 0 && e.probes.includes(probeName(S.probe2))) {
        jobs.push(view("cm-probe2", `${probeName(S.probe2)} \u00B7 epoch ${e.epoch}`, S.probe2,
                       e.epoch, S.layer));
      }
      try {
        await Promise.all(jobs);
        if (seq === drawSeq) {
          root.dispatchEvent(new CustomEvent("camanim-drawn",
            { detail: { epoch: e.epoch, layer: S.layer, probe: S.probe } }));
        }
      } catch (err) {
        if (seq === drawSeq) say("could not load the maps: " + err.message);
      }
      for (const d of [1, -1]) {          // the next and previous epochs, for sliders and play
        const n = epochs()[S.epoch + d];
        if (n && n.probes.includes(pname)) sheet(S.probe, n.epoch).catch(() => {});
      }
    }
    function target(e, k) {
      const t = e.targets ? e.targets[probeName(k)] : null;
      if (t === null || t === undefined) return "n/a";
      const names = S.index.class_names;
      return names && names[t] !== undefined ? `${names[t]} (${t})` : `class ${t}`;
    }
    function drawCurve(e) {
      const g = curve.getContext("2d");
      const W = curve.width, H = curve.height, pad = 24;
      g.clearRect(0, 0, W, H);
      const n = S.index.layers.length;
      const vs = S.index.layers.map((_, i) => road(e, i));
      const chance = e.chance ? e.chance[probeName(S.probe)] : null;
      const fin = vs.concat([chance, 0]).filter((v) => v !== null && v !== undefined && isFinite(v));
      const lo = Math.min(...fin), hi = Math.max(...fin) > lo ? Math.max(...fin) : lo + 1;
      const X = (i) => pad + (W - 2 * pad) * (n > 1 ? i / (n - 1) : 0.5);
      const Y = (v) => H - pad - (H - 2 * pad) * (v - lo) / (hi - lo);
      g.strokeStyle = "#666"; g.beginPath(); g.moveTo(pad, Y(0)); g.lineTo(W - pad, Y(0)); g.stroke();
      if (chance !== null && chance !== undefined) {
        g.setLineDash([5, 4]); g.strokeStyle = "#e66";
        g.beginPath(); g.moveTo(pad, Y(chance)); g.lineTo(W - pad, Y(chance)); g.stroke();
        g.setLineDash([]);
      }
      g.strokeStyle = "#6af"; g.lineWidth = 2; g.beginPath();
      let on = false;
      vs.forEach((v, i) => {
        if (v === null || v === undefined) { on = false; return; }
        if (on) g.lineTo(X(i), Y(v)); else g.moveTo(X(i), Y(v));
        on = true;
      });
      g.stroke(); g.lineWidth = 1;
      g.strokeStyle = "#f5c518"; g.beginPath(); g.moveTo(X(S.layer), pad / 2); g.lineTo(X(S.layer), H - pad / 2); g.stroke();
      const v = vs[S.layer];
      if (v !== null && v !== undefined) {
        g.fillStyle = "#f5c518"; g.beginPath(); g.arc(X(S.layer), Y(v), 4, 0, 2 * Math.PI); g.fill();
      }
      curve.dataset.layer = String(S.layer);
      curve.dataset.epoch = String(e.epoch);
      curve._x = X;
    }
    curve.addEventListener("click", (ev) => {
      if (!S.index) return;
      const r = curve.getBoundingClientRect();
      const x = (ev.clientX - r.left) * curve.width / r.width;
      const n = S.index.layers.length;
      let best = 0;
      for (let i = 1; i < n; i++) if (Math.abs(curve._x(i) - x) < Math.abs(curve._x(best) - x)) best = i;
      stop(); go(S.epoch, best);
    });

    // .......................................................... navigation
    function go(epoch, layer) {
      const n = epochs().length, L = S.index.layers.length;
      S.epoch = Math.max(0, Math.min(n - 1, epoch));
      S.layer = Math.max(0, Math.min(L - 1, layer));
      return draw();
    }
    layerS.addEventListener("input", () => go(S.epoch, +layerS.value));
    epochS.addEventListener("input", () => go(+epochS.value, S.layer));
    function stop() {
      if (S.timer) clearInterval(S.timer);
      S.timer = null; S.playing = null;
      playL.textContent = "\u25B6 play"; playE.textContent = "\u25B6 play";
    }
    function play(what) {
      const was = S.playing;
      stop();
      if (was === what) return;
      S.playing = what;
      (what === "layers" ? playL : playE).textContent = "\u25A0 stop";
      S.timer = setInterval(() => {
        if (what === "layers") go(S.epoch, (S.layer + 1) % S.index.layers.length);
        else go((S.epoch + 1) % epochs().length, S.layer);
      }, opts.frameMs || 125);
    }
    playL.addEventListener("click", () => play("layers"));
    playE.addEventListener("click", () => play("epochs"));
    root.ownerDocument.addEventListener("keydown", (ev) => {
      const t = ev.target.tagName;
      if (!S.index || t === "INPUT" || t === "SELECT" || t === "TEXTAREA") return;
      const step = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [1, 0], ArrowDown: [-1, 0] }[ev.key];
      if (step) { ev.preventDefault(); go(S.epoch + step[0], S.layer + step[1]); }
    });

    // .......................................................... runs
    function fillProbes() {
      for (const [sel, none] of [[probeSel, false], [probe2Sel, true]]) {
        sel.replaceChildren();
        if (none) el("option", { value: "-1" }, sel, "none");
        S.index.probes.forEach((p, k) => el("option", { value: String(k) }, sel, p.name));
      }
      probeSel.value = String(S.probe); probe2Sel.value = String(S.probe2);
    }
    function fillEpochs() {
      epoch2Sel.replaceChildren();
      el("option", { value: "-1" }, epoch2Sel, "none");
      epochs().forEach((e, c) => el("option", { value: String(c) }, epoch2Sel, String(e.epoch)));
      epoch2Sel.value = String(S.epoch2);
      epochS.max = String(Math.max(0, epochs().length - 1));
      layerS.max = String(Math.max(0, S.index.layers.length - 1));
    }
    function show(index) {
      S.index = index;
      fillProbes(); fillEpochs(); buildHeatmaps();
      main.hidden = false;
      say("");
      return draw();
    }
    async function load(run) {
      stop();
      S.run = run; S.index = null; S.stamp = undefined; S.probe = 0; S.probe2 = -1; S.epoch2 = -1;
      main.hidden = true;
      let index;
      try {
        index = await source.index(run);
      } catch (err) {
        say(`run ${run}: the viewer data could not be read (${err.message})`);
        return false;
      }
      if (index.error || !Array.isArray(index.epochs) || !index.epochs.length) {
        say(index.error || `run ${run}: no callback epoch has finished yet`);
        return false;
      }
      S.epoch = index.epochs.length - 1; S.layer = index.layers.length - 1;
      await show(index);
      return true;
    }
    runSel.addEventListener("change", () => load(runSel.value));
    probeSel.addEventListener("change", () => { S.probe = +probeSel.value; buildHeatmaps(); draw(); });
    probe2Sel.addEventListener("change", () => { S.probe2 = +probe2Sel.value; draw(); });
    epoch2Sel.addEventListener("change", () => { S.epoch2 = +epoch2Sel.value; draw(); });

    /** A view named in the address (the report): #layer=5&epoch=3&compare_epoch=0&probe=1
     *  (layer and probe numbers from 0, epoch numbers as trained). */
    function fromHash() {
      const h = new URLSearchParams((root.ownerDocument.location.hash || "").slice(1));
      const num = (k) => (/^[0-9]{1,6}$/.test(h.get(k) || "") ? +h.get(k) : null);
      const col = (e) => epochs().findIndex((x) => x.epoch === e);
      const P = S.index.probes.length, L = S.index.layers.length;
      if (num("probe") !== null && num("probe") < P) S.probe = num("probe");
      if (num("compare_probe") !== null && num("compare_probe") < P) S.probe2 = num("compare_probe");
      if (num("layer") !== null && num("layer") < L) S.layer = num("layer");
      if (num("epoch") !== null && col(num("epoch")) >= 0) S.epoch = col(num("epoch"));
      if (num("compare_epoch") !== null && col(num("compare_epoch")) >= 0) {
        S.epoch2 = col(num("compare_epoch"));
      }
      return h.toString() ? show(S.index) : null;
    }

    root.ownerDocument.defaultView.addEventListener("hashchange", () => {
      if (S.index) fromHash();
    });

    async function refresh() {
      if (document.visibilityState !== "visible") return;
      try {
        const got = await source.runs();
        if (JSON.stringify(got.runs) !== JSON.stringify(S.runs)) fillRuns(got);
        if (!S.run) return;
        const stamp = (got.stamps || {})[S.run];
        if (stamp !== undefined && stamp === S.stamp) return;   // index.json unchanged
        S.stamp = stamp;
        const index = await source.index(S.run);
        if (index.error || !Array.isArray(index.epochs) || !index.epochs.length) return;
        if (!S.index) { S.epoch = index.epochs.length - 1; S.layer = index.layers.length - 1; return show(index); }
        if (JSON.stringify(index.epochs) === JSON.stringify(S.index.epochs)) return;
        const atEnd = S.epoch === epochs().length - 1;
        if (JSON.stringify(index.layers) !== JSON.stringify(S.index.layers)) S.layer = 0;
        S.epoch = atEnd ? index.epochs.length - 1 : Math.min(S.epoch, index.epochs.length - 1);
        S.sprites.clear();
        await show(index);
      } catch (err) {
        say("could not refresh: " + err.message);
      }
    }
    function fillRuns(got) {
      S.runs = got.runs || [];
      runSel.replaceChildren();
      S.runs.forEach((r) => el("option", { value: r }, runSel, r === "." ? "(the logdir)" : r));
      if (S.run && S.runs.includes(S.run)) runSel.value = S.run;
      if (!S.runs.length) say(got.message || "no run has viewer data");
    }
    (async () => {
      main.hidden = true;
      try {
        const got = await source.runs();
        fillRuns(got);
        for (const r of S.runs) {          // the first run that has data
          runSel.value = r;
          if (await load(r)) { await fromHash(); break; }
        }
      } catch (err) {
        say("could not list the runs: " + err.message);
      }
      if (source.live) setInterval(refresh, opts.pollMs || 3000);
    })();
    return S;
  }

  globalThis.CAManimViewer = { start, httpSource, inlineSource };
})();
