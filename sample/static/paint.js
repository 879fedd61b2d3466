// The paint-with-words page: a canvas of hard-edged colours (no anti-aliasing, so every pixel
// is exactly one region's colour or white), each colour bound to a phrase of the prompt; the
// request goes to /api/sample and the page polls the job for progress and the result.
"use strict";

const PALETTE = ["#e6194b", "#4363d8", "#3cb44b", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                 "#9a6324"];
const WHITE = [255, 255, 255];
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d", {willReadFrequently: true});
let info = null;
let active = 0;           // index of the colour being painted
let regions = [];         // {colour, phrase, strength}
let pixels = null;        // the canvas's ImageData, edited directly
let checkTimer = null;

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

function say(text) { $("message").textContent = text || ""; }

// --- the canvas -------------------------------------------------------------------------

function sizeCanvas(height, width) {
  // 256 px on the long side, at the output's aspect ratio; the drawing is kept (nearest).
  const long = 256;
  const w = width >= height ? long : Math.max(8, Math.round(long * width / height));
  const h = height >= width ? long : Math.max(8, Math.round(long * height / width));
  if (canvas.width === w && canvas.height === h && pixels) return;
  const old = pixels ? {data: pixels, w: canvas.width, h: canvas.height} : null;
  canvas.width = w; canvas.height = h;
  pixels = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const o = 4 * (y * w + x);
      let rgb = WHITE;
      if (old) {
        const so = 4 * (Math.floor(y * old.h / h) * old.w + Math.floor(x * old.w / w));
        rgb = [old.data.data[so], old.data.data[so + 1], old.data.data[so + 2]];
      }
      pixels.data.set([rgb[0], rgb[1], rgb[2], 255], o);
    }
  }
  canvas.style.height = (384 * h / w) + "px";
  redraw();
}

function redraw() { ctx.putImageData(pixels, 0, 0); }

function setPixel(x, y, rgb) {
  if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return;
  pixels.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * (y * canvas.width + x));
}

function stamp(cx, cy, r, rgb) {
  for (let y = Math.floor(cy - r); y <= cy + r; y++)
    for (let x = Math.floor(cx - r); x <= cx + r; x++)
      if ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) setPixel(x, y, rgb);
}

function line(a, b, r, rgb) {
  const n = Math.max(1, Math.ceil(Math.hypot(b[0] - a[0], b[1] - a[1]) / Math.max(1, r / 2)));
  for (let i = 0; i <= n; i++)
    stamp(a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n, r, rgb);
}

function rect(a, b, rgb) {
  const [x0, x1] = [Math.min(a[0], b[0]), Math.max(a[0], b[0])].map(Math.round);
  const [y0, y1] = [Math.min(a[1], b[1]), Math.max(a[1], b[1])].map(Math.round);
  for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) setPixel(x, y, rgb);
}

function fill(x, y, rgb) {
  const w = canvas.width, h = canvas.height, d = pixels.data;
  const at = (x, y) => 4 * (y * w + x);
  const o = at(x, y);
  const from = [d[o], d[o + 1], d[o + 2]];
  if (from.every((v, i) => v === rgb[i])) return;
  const stack = [[x, y]];
  while (stack.length) {
    const [px, py] = stack.pop();
    if (px < 0 || py < 0 || px >= w || py >= h) continue;
    const q = at(px, py);
    if (d[q] !== from[0] || d[q + 1] !== from[1] || d[q + 2] !== from[2]) continue;
    d.set([rgb[0], rgb[1], rgb[2], 255], q);
    stack.push([px + 1, py], [px - 1, py], [px, py + 1], [px, py - 1]);
  }
}

function canvasPoint(e) {
  const box = canvas.getBoundingClientRect();
  return [(e.clientX - box.left) * canvas.width / box.width,
          (e.clientY - box.top) * canvas.height / box.height];
}

let stroke = null;  // {tool, start, last, saved}
canvas.addEventListener("pointerdown", (e) => {
  const tool = document.querySelector("input[name=tool]:checked").value;
  const p = canvasPoint(e);
  const rgb = tool === "erase" ? WHITE : hexToRgb(regions[active].colour);
  const r = Number($("brush").value) / 2 * canvas.width / 384;
  canvas.setPointerCapture(e.pointerId);
  if (tool === "fill") {
    fill(Math.floor(p[0]), Math.floor(p[1]), rgb);
    redraw(); changed();
    return;
  }
  stroke = {tool, rgb, r, start: p, last: p, saved: new Uint8ClampedArray(pixels.data)};
  if (tool !== "rect") { stamp(p[0], p[1], r, rgb); redraw(); }
});
canvas.addEventListener("pointermove", (e) => {
  if (!stroke) return;
  const p = canvasPoint(e);
  if (stroke.tool === "rect") {
    pixels.data.set(stroke.saved);
    rect(stroke.start, p, stroke.rgb);
  } else {
    line(stroke.last, p, stroke.r, stroke.rgb);
  }
  stroke.last = p;
  redraw();
});
function endStroke(e) {
  if (!stroke) return;
  if (stroke.tool === "rect") {
    pixels.data.set(stroke.saved);
    rect(stroke.start, canvasPoint(e), stroke.rgb);
    redraw();
  }
  stroke = null;
  changed();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

$("clear").onclick = () => {
  for (let i = 0; i < pixels.data.length; i += 4) pixels.data.set([255, 255, 255, 255], i);
  redraw(); changed();
};

// --- the regions: each colour bound to a phrase ----------------------------------------------

function painted() {
  // colours present on the canvas, as "#rrggbb"
  const seen = new Set(), d = pixels.data;
  for (let i = 0; i < d.length; i += 4)
    if (d[i] !== 255 || d[i + 1] !== 255 || d[i + 2] !== 255)
      seen.add("#" + [d[i], d[i + 1], d[i + 2]].map((v) => v.toString(16).padStart(2, "0")).join(""));
  return seen;
}

function renderRegions() {
  const body = document.querySelector("#regions tbody");
  body.textContent = "";
  const prompt = $("prompt").value.toLowerCase();
  regions.forEach((r, i) => {
    const tr = document.createElement("tr");
    tr.className = i === active ? "active" : "";
    tr.dataset.index = i;
    const missing = r.phrase.trim() && !prompt.includes(r.phrase.trim().toLowerCase());
    tr.innerHTML = `<td><div class="swatch" style="background:${r.colour}" title="paint with ${r.colour}"></div></td>
      <td><input class="phrase${missing ? " missing" : ""}" type="text" value=""
           placeholder="words of the prompt"><div class="flag">${missing ? "not in the prompt" : ""}</div></td>
      <td><input class="strength" type="number" step="0.1" value="${r.strength}"></td>
      <td><button type="button" class="remove" title="remove this colour">×</button></td>`;
    tr.querySelector(".phrase").value = r.phrase;
    tr.querySelector(".swatch").onclick = () => { active = i; renderRegions(); };
    tr.querySelector(".phrase").onfocus = () => { if (active !== i) { active = i; markActive(); } };
    tr.querySelector(".phrase").oninput = (e) => { r.phrase = e.target.value; flagPhrases(); changed(); };
    tr.querySelector(".strength").oninput = (e) => { r.strength = Number(e.target.value); changed(); };
    tr.querySelector(".remove").onclick = () => {
      regions.splice(i, 1);
      if (!regions.length) addRegion();
      active = Math.min(active, regions.length - 1);
      renderRegions(); changed();
    };
    body.appendChild(tr);
  });
}

function markActive() {
  document.querySelectorAll("#regions tbody tr").forEach((tr) =>
    tr.classList.toggle("active", Number(tr.dataset.index) === active));
}

function flagPhrases() {
  // phrases that are not in the prompt, flagged as the user types (the server checks tokens)
  const prompt = $("prompt").value.toLowerCase();
  document.querySelectorAll("#regions tbody tr").forEach((tr) => {
    const r = regions[Number(tr.dataset.index)];
    const missing = r.phrase.trim() && !prompt.includes(r.phrase.trim().toLowerCase());
    tr.querySelector(".phrase").classList.toggle("missing", !!missing);
    tr.querySelector(".flag").textContent = missing ? "not in the prompt" : "";
  });
}

function addRegion(phrase = "") {
  const used = new Set(regions.map((r) => r.colour));
  const colour = PALETTE.find((c) => !used.has(c));
  if (!colour) { say(`at most ${PALETTE.length} colours`); return; }
  regions.push({colour, phrase, strength: 1.0});
}
$("add-region").onclick = () => { addRegion(); active = regions.length - 1; renderRegions(); };

// --- the request --------------------------------------------------------------------------

let styleData = null;
$("style").onchange = (e) => {
  const file = e.target.files[0];
  if (!file) { styleData = null; return; }
  const reader = new FileReader();
  reader.onload = () => { styleData = reader.result; changed(); };
  reader.readAsDataURL(file);
};

function request() {
  const onCanvas = painted();
  // Colours bound to a phrase, and any colour painted (so an unbound one is reported).
  const used = regions.filter((r) => r.phrase.trim() || onCanvas.has(r.colour));
  const body = {
    prompt: $("prompt").value, seed: Number($("seed").value), num: Number($("num").value),
    steps: Number($("steps").value), sampler: $("sampler").value,
    guidance_scale: Number($("guidance").value), paint_scale: Number($("paint-scale").value),
    height: Number($("height").value), width: Number($("width").value || $("height").value),
    regions: used.map((r) => ({colour: r.colour, phrase: r.phrase, strength: r.strength})),
  };
  if (info.has_negative) body.negative_prompt = $("negative").value;
  if (used.length) body.canvas = canvas.toDataURL("image/png");
  if (styleData && info.has_style) body.style = styleData;
  return body;
}

async function post(path, body) {
  const res = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body)});
  let answer;
  try { answer = await res.json(); } catch (e) { answer = {error: `server answered ${res.status}`}; }
  return answer;
}

function changed() {
  // the server checks the request as it changes (phrases against the prompt's tokens, sizes)
  clearTimeout(checkTimer);
  checkTimer = setTimeout(async () => {
    if (!info) return;
    const answer = await post("/api/check", request());
    say(answer.error || "");
    if (answer.plan) drawPlan(answer.plan, null);
  }, 400);
}

// --- progress and the result ----------------------------------------------------------------

const EXPERT_COLOURS = ["#23313f", "#4363d8", "#3cb44b", "#f58231", "#911eb4", "#9a6324",
                        "#e6194b", "#42d4f4"];

function drawPlan(plan, now) {
  // one strip for all stages, a block per segment, width by its steps; `now` = [stage, segment]
  const strip = $("plan");
  strip.textContent = "";
  const total = plan.reduce((n, segs) => n + segs[segs.length - 1].stop, 0);
  plan.forEach((segs, k) => segs.forEach((s, j) => {
    const div = document.createElement("div");
    div.style.width = (100 * (s.stop - s.start) / total) + "%";
    div.style.background = EXPERT_COLOURS[s.experts[0] % EXPERT_COLOURS.length];
    div.textContent = `E${s.experts[0]}`;
    div.title = `${info.stages[k]}: steps ${s.start}-${s.stop - 1}, sigma ` +
      `${s.sigma_start.toPrecision(3)} → ${s.sigma_stop.toPrecision(3)}, expert ${s.experts.join("/")}`;
    if (now && now[0] === k && now[1] === j) div.className = "now";
    strip.appendChild(div);
  }));
  $("progress").hidden = false;
}

function transparentMask(dataUrl) {
  // the colour map with white made transparent, for the overlay on each sample
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height);
      for (let i = 0; i < d.data.length; i += 4)
        if (d.data[i] === 255 && d.data[i + 1] === 255 && d.data[i + 2] === 255) d.data[i + 3] = 0;
      g.putImageData(d, 0, 0);
      resolve(c.toDataURL());
    };
    img.src = dataUrl;
  });
}

async function generate() {
  say("");
  const body = request();
  $("generate").disabled = true;
  $("status").textContent = "checking…";
  try {
    const answer = await post("/api/sample", body);
    if (answer.error) { say(answer.error); $("status").textContent = ""; return; }
    drawPlan(answer.plan, null);
    const overlay = body.canvas ? await transparentMask(body.canvas) : null;
    const done = await follow(answer.job, answer.plan);
    if (done) show(answer.job, done, overlay, answer.command);
  } catch (e) {
    say(`the server did not answer: ${e}`);
  } finally {
    $("generate").disabled = false;
  }
}

async function follow(job, plan) {
  const totalSteps = plan.reduce((n, segs) => n + segs[segs.length - 1].stop, 0);
  for (;;) {
    const res = await fetch(`/api/jobs/${job}`);
    const s = await res.json();
    const p = s.progress;
    if (s.state === "queued") $("status").textContent = "waiting for the previous call…";
    if (s.state === "running" && !p) $("status").textContent = "encoding and compiling…";
    if (p) {
      const before = plan.slice(0, p.stage_index).reduce((n, segs) => n + segs[segs.length - 1].stop, 0);
      $("bar").value = (before + p.step) / totalSteps;
      $("status").textContent = `${p.stage}: step ${p.step}/${p.steps}, expert ` +
        `${p.experts.join("/")} (segment ${p.segment + 1}/${p.segments}), sigma ${p.sigma.toPrecision(3)}`;
      drawPlan(plan, [p.stage_index, p.segment]);
    }
    if (s.state === "error") { say(s.error); return null; }
    if (s.state === "done") {
      $("bar").value = 1;
      $("status").textContent = `done: ${s.images} image(s) in ${s.seconds} s`;
      return s;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

function show(job, state, overlay, command) {
  const grid = $("grid");
  grid.textContent = "";
  for (let i = 0; i < state.images; i++) {
    const cell = document.createElement("div");
    cell.className = "sample";
    const img = document.createElement("img");
    img.className = "image";
    img.src = `/api/jobs/${job}/${i}.png`;
    img.alt = `sample ${i}`;
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `sample${i}.png`;
    link.appendChild(img);
    cell.appendChild(link);
    if (overlay) {
      const m = document.createElement("img");
      m.className = "mask";
      m.src = overlay;
      m.style.pointerEvents = "none";
      cell.appendChild(m);
    }
    grid.appendChild(cell);
  }
  $("download").href = `/api/jobs/${job}/call.zip`;
  $("command").textContent = command.map((a) => /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`).join(" ");
  $("result").hidden = false;
  $("result").dataset.job = job;
}
$("overlay").onchange = (e) => $("result").classList.toggle("plain", !e.target.checked);

// --- start --------------------------------------------------------------------------------

async function start() {
  info = await (await fetch("/api/info")).json();
  const [h, w] = info.native;
  $("model").textContent = `${info.name}: ${h}x${w}` +
    (info.stages.length > 1 ? `, stages ${info.stages.join(" → ")}` : "") +
    (info.can_paint ? "" : " (this model cannot paint)");
  info.samplers.forEach((s) => $("sampler").add(new Option(s, s)));
  $("sampler").value = info.defaults.sampler;
  $("steps").value = info.defaults.steps;
  $("steps").max = info.max_steps;
  $("num").max = info.max_num;
  $("guidance").value = info.defaults.guidance_scale;
  $("paint-scale").value = info.defaults.paint_scale;
  $("height").value = h; $("width").value = w;
  $("height").max = $("width").max = info.max_side;
  $("height").step = $("width").step = info.multiple;
  $("negative-row").hidden = !info.has_negative;
  $("style-row").hidden = !info.has_style;
  $("size-note").textContent = `native ${h}x${w}; up to ${info.max_side} px a side` +
    (info.highres === "scalecrafter" ? " (ScaleCrafter past the native size)" : "") +
    `, multiples of ${info.multiple}` + (info.square ? ", square" : "");
  $("width-row").hidden = info.square;
  const sizeChanged = () => {
    if ($("width-row").hidden) $("width").value = $("height").value;
    const hh = Number($("height").value), ww = Number($("width").value);
    if (hh > 0 && ww > 0) sizeCanvas(hh, ww);
    changed();
  };
  $("height").oninput = $("width").oninput = sizeChanged;
  ["prompt", "negative", "seed", "num", "steps", "sampler", "guidance", "paint-scale"].forEach(
    (id) => $(id).addEventListener("input", () => { if (id === "prompt") flagPhrases(); changed(); }));
  sizeCanvas(h, w);
  addRegion("red circle");
  addRegion("blue square");
  renderRegions();
  $("draw").hidden = false;
  if (!info.can_paint) $("draw").classList.add("disabled");
  $("generate").onclick = generate;
  changed();
}
start().catch((e) => say(`could not reach the server: ${e}`));
