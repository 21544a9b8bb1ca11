// Fleet dashboard. The fleet view asks the gateway ONE thing per refresh (/api/fleet/dashboard: the fleet's
// summary, one server-side sorted, filtered page of devices, the last rollouts), and never asks again before
// that answer came: a slow gateway is polled less, not piled up. A device's charts are on its own page
// (#device=<id>), which polls that device alone. No libraries, nothing fetched from the internet.
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a"];

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits) {
  return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
}

// series: [{name, values: [numbers or null]}]; draws polylines scaled to the data.
function lineChart(series, opts) {
  const w = 300, h = 110, pad = 22;
  const svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "chart-svg " + (opts.cls || ""));
  const all = series.flatMap(s => s.values.filter(v => v !== null && v !== undefined && isFinite(v)));
  const lo = opts.min !== undefined ? opts.min : Math.min(0, ...all);
  let hi = Math.max(opts.max !== undefined ? opts.max : 0, ...all);
  if (!(hi > lo)) hi = lo + 1;
  const n = Math.max(2, ...series.map(s => s.values.length));
  const x = i => pad + (i * (w - pad - 4)) / (n - 1);
  const y = v => h - pad + 8 - ((v - lo) * (h - pad)) / (hi - lo);
  const axis = document.createElementNS(SVGNS, "path");
  axis.setAttribute("d", `M${pad},4 V${h - pad + 8} H${w - 2}`);
  axis.setAttribute("stroke", "#bbb"); axis.setAttribute("fill", "none");
  svg.appendChild(axis);
  for (const [label, yy] of [[hi, y(hi)], [lo, y(lo)]]) {
    const t = document.createElementNS(SVGNS, "text");
    t.setAttribute("x", 2); t.setAttribute("y", yy + 3); t.setAttribute("font-size", "8");
    t.textContent = opts.fmt ? opts.fmt(label) : fmt(label, 2);
    svg.appendChild(t);
  }
  if (opts.line !== undefined) {
    const l = document.createElementNS(SVGNS, "line");
    l.setAttribute("x1", pad); l.setAttribute("x2", w - 2);
    l.setAttribute("y1", y(opts.line)); l.setAttribute("y2", y(opts.line));
    l.setAttribute("stroke", "#c62828"); l.setAttribute("stroke-dasharray", "3,3");
    svg.appendChild(l);
  }
  series.forEach((s, k) => {
    const pts = s.values.map((v, i) => (v === null || v === undefined || !isFinite(v)) ? null : `${x(i)},${y(v)}`)
      .filter(p => p !== null);
    const pl = document.createElementNS(SVGNS, "polyline");
    pl.setAttribute("points", pts.join(" "));
    pl.setAttribute("fill", "none"); pl.setAttribute("stroke", COLORS[k % COLORS.length]);
    pl.setAttribute("stroke-width", "1.5"); pl.setAttribute("data-series", s.name);
    svg.appendChild(pl);
  });
  return svg;
}

function chartBox(title, svg, names) {
  const box = el("div", {class: "chart"});
  box.appendChild(el("h3", {}, title));
  box.appendChild(svg);
  if (names.length > 1) {
    const lg = el("div", {class: "legend"});
    names.forEach((n, k) => { const s = el("span", {}, "■ " + n + "  "); s.style.color = COLORS[k]; lg.appendChild(s); });
    box.appendChild(lg);
  }
  return box;
}

function renderDevice(d) {
  const hist = d.history || [];
  const card = el("section", {class: "device" + (d.drift_flag ? " drifted" : ""), "data-id": d.device_id});
  const head = el("header");
  head.appendChild(el("h2", {}, d.device_id));
  head.appendChild(el("span", {class: "state " + d.state}, d.state));
  if (d.drift_flag) head.appendChild(el("span", {class: "drift-flag", title: "drift tests flagged this device"}, "DRIFT"));
  card.appendChild(head);
  // The last window that saw inputs: a device that stopped still shows what it did.
  const busy = [...hist].reverse().find(h => ((h.counts || {}).inputs || 0) > 0) || d;
  const lat = busy.latency || {};
  const edge = lat.edge || {}, cloud = lat.cloud_rtt || {};
  card.appendChild(el("div", {class: "stats", title: "last window with inputs"},
    `offload ${fmt(100 * (busy.offload_rate || 0), 1)}% · fallback ${fmt(100 * (busy.fallback_rate || 0), 1)}% · ` +
    `edge p95 ${fmt(1000 * edge.p95, 2)} ms · cloud p95 ${fmt(1000 * cloud.p95, 1)} ms · ` +
    `threshold ${fmt((d.status || {}).threshold, 3)} · bundle ${(d.bundle_sha256 || "").slice(0, 10)}`));
  const charts = el("div", {class: "charts"});
  const ms = v => (v === null || v === undefined) ? null : 1000 * v;
  charts.appendChild(chartBox("latency p95 (ms)", lineChart([
    {name: "edge", values: hist.map(h => ms(((h.latency || {}).edge || {}).p95))},
    {name: "cloud", values: hist.map(h => ms(((h.latency || {}).cloud_rtt || {}).p95))},
  ], {cls: "latency", fmt: v => fmt(v, 1)}), ["edge", "cloud"]));
  charts.appendChild(chartBox("offload rate", lineChart([
    {name: "offload", values: hist.map(h => h.offload_rate)},
    {name: "fallback", values: hist.map(h => h.fallback_rate)},
  ], {cls: "offload", min: 0, max: 0.2}), ["offload", "fallback"]));
  charts.appendChild(chartBox("drift (PSI of confidence)", lineChart([
    {name: "psi", values: hist.map(h => ((h.drift || {}).confidence || {}).psi ?? null)},
  ], {cls: "drift", min: 0, max: 0.3, line: 0.25}), ["psi"]));
  card.appendChild(charts);
  return card;
}

const pct = v => (v === null || v === undefined) ? "–" : fmt(100 * v, 1) + "%";
const msec = (v, d) => (v === null || v === undefined) ? "–" : fmt(1000 * v, d === undefined ? 2 : d);
const spread = l => l && l.p50 !== undefined ? `${msec(l.p50)} / ${msec(l.p95)} / ${msec(l.p99)}` : "–";

function tile(label, value, alert) {
  const t = el("div", {class: "tile" + (alert ? " alert" : "")});
  t.appendChild(el("b", {}, String(value)));
  t.appendChild(el("span", {}, label));
  return t;
}

function renderSummary(s) {
  document.getElementById("summary").textContent =
    `${s.devices} devices · ${s.online} online · ${s.offline} offline · ${s.drifting} drifted · ` +
    `updated ${new Date().toLocaleTimeString()}`;
  const edge = (s.latency || {}).edge_p95 || {}, cloud = (s.latency || {}).cloud_p95 || {};
  document.getElementById("tiles").replaceChildren(
    tile("devices", s.devices), tile("online", s.online), tile("offline", s.offline, s.offline > 0),
    tile("drifting", s.drifting, s.drifting > 0), tile("offload (fleet)", pct(s.offload_rate)),
    tile("fallback (fleet)", pct(s.fallback_rate)),
    tile("edge p95 ms: p50 / p95 / p99 of devices", spread(edge)),
    tile("cloud p95 ms: p50 / p95 / p99 of devices", cloud.p50 !== undefined
      ? `${msec(cloud.p50, 1)} / ${msec(cloud.p95, 1)} / ${msec(cloud.p99, 1)}` : "–"));
  document.querySelector("#groups tbody").replaceChildren(...(s.groups || []).map(g => {
    const tr = el("tr", {class: "group", "data-line": g.model_line || "", "data-version": g.version || ""});
    for (const v of [g.model_line || "(none)", g.version || "(none)", g.devices, g.online, g.offline, g.drifting,
                     pct(g.offload_rate), pct(g.fallback_rate), spread((g.latency || {}).edge_p95)]) {
      tr.appendChild(el("td", {}, String(v)));
    }
    return tr;
  }));
}

// What the device table shows: sort, filters, and the cursors of the pages before this one (keyset paging).
const view = {sort: "device_id", cursors: [null], next: null};

function filterParams() {
  const p = new URLSearchParams();
  for (const f of document.querySelectorAll("#filters [name]")) if (f.value.trim()) p.set(f.name, f.value.trim());
  p.set("sort", view.sort);
  const cur = view.cursors[view.cursors.length - 1];
  if (cur) p.set("cursor", cur);
  return p;
}

function deviceRow(d) {
  const tr = el("tr", {class: "device" + (d.drift_flag ? " drifted" : ""), "data-id": d.device_id});
  const id = el("td");
  id.appendChild(el("a", {href: "#device=" + encodeURIComponent(d.device_id)}, d.device_id));
  tr.appendChild(id);
  const st = el("td");
  st.appendChild(el("span", {class: "state " + d.state}, d.state));
  tr.appendChild(st);
  const lat = d.latency || {};
  for (const v of [d.model_line || "–", d.version || (d.bundle_sha256 || "").slice(0, 10) || "–", pct(d.offload_rate),
                   pct(d.fallback_rate), msec((lat.edge || {}).p95) + " ms", msec((lat.cloud_rtt || {}).p95, 1) + " ms",
                   d.last_seen ? new Date(1000 * d.last_seen).toLocaleTimeString() : "–"]) {
    tr.appendChild(el("td", {}, String(v)));
  }
  const drift = el("td");
  if (d.drift_flag) drift.appendChild(el("span", {class: "drift-flag", title: "drift tests flagged this device"}, "DRIFT"));
  tr.appendChild(drift);
  return tr;
}

function renderPage(page) {
  document.querySelector("#devices tbody").replaceChildren(...page.devices.map(deviceRow));
  view.next = page.next_cursor;
  const start = (view.cursors.length - 1) * page.limit;
  document.getElementById("page-info").textContent = page.total
    ? `${start + 1}–${start + page.devices.length} of ${page.total}` : "no device matches";
  document.getElementById("next-page").disabled = !page.next_cursor;
  document.getElementById("prev-page").disabled = view.cursors.length < 2;
  for (const th of document.querySelectorAll("#devices th[data-sort]")) {
    const k = th.dataset.sort;
    th.className = view.sort === k ? "sorted-asc" : view.sort === "-" + k ? "sorted-desc" : "";
  }
}

async function refreshFleet() {
  const r = await fetch("/api/fleet/dashboard?" + filterParams());
  const d = await r.json();
  if (!r.ok) throw new Error(d.error || r.status);
  renderSummary(d.summary);
  renderPage(d.page);
  const root = document.getElementById("rollouts");
  if (d.rollouts.length) root.replaceChildren(...d.rollouts.map(renderRollout));
}

async function refreshDevice(id) {
  const r = await fetch(`/api/devices/${encodeURIComponent(id)}?history=120`);
  const d = await r.json();
  const root = document.getElementById("device-detail");
  if (!r.ok) { root.textContent = d.error || String(r.status); return; }
  root.replaceChildren(renderDevice(d));
  document.getElementById("summary").textContent = `${d.device_id} · ${d.state} · updated ${new Date().toLocaleTimeString()}`;
}

function deviceInHash() {
  const m = location.hash.match(/^#device=(.+)$/);
  return m ? decodeURIComponent(m[1]) : null;
}

// One poll at a time: the next starts 3 s after the last answer (or at once after a change a person made).
const poll = {busy: false, again: false, timer: null, count: 0};
async function refresh() {
  if (poll.busy) { poll.again = true; return; }
  poll.busy = true;
  clearTimeout(poll.timer);
  poll.count += 1;
  const id = deviceInHash();
  document.getElementById("fleet-view").hidden = id !== null;
  document.getElementById("device-page").hidden = id === null;
  try {
    await (id !== null ? refreshDevice(id) : refreshFleet());
    document.body.setAttribute("data-loaded", "1");
    document.body.setAttribute("data-polls", String(poll.count));
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach the gateway API: " + e;
  } finally {
    poll.busy = false;
    if (poll.again) { poll.again = false; refresh(); } else poll.timer = setTimeout(refresh, 3000);
  }
}

function restart() { view.cursors = [null]; refresh(); }
document.getElementById("filters").addEventListener("input", restart);
document.getElementById("filters").addEventListener("submit", e => { e.preventDefault(); restart(); });
for (const th of document.querySelectorAll("#devices th[data-sort]")) {
  th.addEventListener("click", () => {
    const k = th.dataset.sort;
    view.sort = view.sort === k ? "-" + k : k;
    restart();
  });
}
document.getElementById("next-page").addEventListener("click", () => {
  if (view.next) { view.cursors.push(view.next); refresh(); }
});
document.getElementById("prev-page").addEventListener("click", () => {
  if (view.cursors.length > 1) { view.cursors.pop(); refresh(); }
});
document.getElementById("first-page").addEventListener("click", restart);
window.addEventListener("hashchange", refresh);

function renderRollout(r) {
  const box = el("div", {class: "rollout", "data-id": String(r.id)});
  const head = el("div");
  head.appendChild(el("strong", {}, `rollout ${r.id}: ${r.bundle}`));
  head.appendChild(el("span", {class: "state " + r.state}, r.state));
  head.appendChild(el("span", {}, `  canaries ${(r.plan.canaries || []).join(", ")} · watch ${r.plan.watch_s} s · ` +
                                   `promote if ${r.plan.promote_if}`));
  box.appendChild(head);
  const ol = el("ol");
  for (const s of r.steps || []) {
    ol.appendChild(el("li", {}, `${new Date(1000 * s.time).toLocaleTimeString()} ${s.step}`));
  }
  box.appendChild(ol);
  return box;
}

// A wire-format tensor (docs/wire.md): "ET", version, dtype code, ndim, 3 pad bytes, ndim uint32 dims, data.
function decodeTensor(b64) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const ndim = bytes[4];
  const dims = [];
  for (let i = 0; i < ndim; i++) dims.push(view.getUint32(8 + 4 * i, true));
  const off = 8 + 4 * ndim;
  const n = dims.reduce((a, b) => a * b, 1);
  const data = bytes[3] === 1 ? new Float32Array(bytes.buffer.slice(off, off + 4 * n)) : null;
  return {dims, data};
}

function drawInput(t) {
  const c = el("canvas");
  const d = t.dims.slice(-2);
  if (!t.data || d.length < 2) return c;
  const [h, w] = d;
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  const plane = t.data.slice(0, h * w);
  const lo = Math.min(...plane), hi = Math.max(...plane), span = (hi - lo) || 1;
  plane.forEach((v, i) => { const g = 255 - Math.round(255 * (v - lo) / span);
    img.data.set([g, g, g, 255], 4 * i); });
  ctx.putImageData(img, 0, 0);
  return c;
}

function authHeaders() {
  const token = document.getElementById("token").value.trim();
  return token ? {"Authorization": "Bearer " + token} : {};
}

async function label(sample, k, card) {
  const r = await fetch(`/api/samples/${sample.id}/label`, {method: "POST",
    headers: {...authHeaders(), "Content-Type": "application/json"}, body: JSON.stringify({label: k})});
  if (r.ok) { card.classList.add("labelled"); card.querySelector(".who").textContent = `labelled ${k} (yours)`; }
}

// A detection frame: the image (RGB, or gray) scaled up, the teacher's boxes drawn over it, numbered.
function drawFrame(t, dets, scale) {
  const c = el("canvas");
  const d = t.dims.slice(-3);
  if (!t.data || d.length < 3) return c;
  const [ch, h, w] = d;
  c.width = w * scale; c.height = h * scale;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  const n = h * w, planes = Math.min(ch, 3);
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < planes * n; i++) { const v = t.data[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
  const span = (hi - lo) || 1;
  for (let i = 0; i < n; i++) {
    const px = [0, 1, 2].map(k => Math.round(255 * (t.data[(planes === 3 ? k : 0) * n + i] - lo) / span));
    img.data.set([...px, 255], 4 * i);
  }
  const tmp = el("canvas"); tmp.width = w; tmp.height = h;
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, w * scale, h * scale);
  ctx.lineWidth = 2; ctx.font = "12px sans-serif";
  dets.forEach((det, i) => {
    const [x1, y1, x2, y2] = det.box.map(v => v * scale);
    ctx.strokeStyle = det.score >= 0.5 ? "#2e7d32" : "#ef6c00";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillText(`${i} ${det.label}`, x1 + 2, Math.max(12, y1 - 2));
  });
  return c;
}

async function acceptBoxes(sample, boxes, card) {
  const accept = boxes.filter(b => b.checked).map(b => Number(b.dataset.box));
  const r = await fetch(`/api/samples/${sample.id}/label`, {method: "POST",
    headers: {...authHeaders(), "Content-Type": "application/json"}, body: JSON.stringify({accept})});
  const who = card.querySelector(".who");
  if (r.ok) { card.classList.add("labelled"); who.textContent = `kept boxes ${accept.join(", ") || "none"} (yours)`; }
  else who.textContent = `the gateway refused: ${(await r.json()).error}`;
}

// A frame whose teacher answer is detections: a person accepts or rejects each box, then saves.
function detectionCard(s) {
  const card = el("div", {class: "sample detection", "data-id": String(s.id)});
  const dets = s.teacher_answer.detections;
  card.appendChild(drawFrame(decodeTensor(s.input), dets, 3));
  card.appendChild(el("div", {class: "who"}, `${s.device} · teacher found ${dets.length} boxes`));
  const boxes = dets.map((det, i) => {
    const box = el("input", {type: "checkbox", "data-box": String(i)});
    box.checked = det.score >= 0.5;
    const row = el("label", {class: "box"});
    row.appendChild(box);
    row.appendChild(document.createTextNode(` ${i}: ${det.label} ${fmt(100 * det.score, 0)}%`));
    card.appendChild(row);
    return box;
  });
  const save = el("button", {type: "button", class: "save"}, "save: keep the ticked boxes");
  save.addEventListener("click", () => acceptBoxes(s, boxes, card));
  card.appendChild(save);
  return card;
}

async function loadQueue() {
  const root = document.getElementById("queue");
  const r = await fetch("/api/labels/queue?limit=40", {headers: authHeaders()});
  if (!r.ok) { root.textContent = `the gateway refused: ${(await r.json()).error}`; return; }
  const page = await r.json();
  if (!page.samples.length) { root.textContent = "nothing waiting for a label"; return; }
  root.replaceChildren(...page.samples.map(s => {
    if (s.teacher_answer && Array.isArray(s.teacher_answer.detections)) return detectionCard(s);
    const card = el("div", {class: "sample", "data-id": String(s.id)});
    card.appendChild(drawInput(decodeTensor(s.input)));
    const top = Math.max(...s.teacher_probs);
    card.appendChild(el("div", {class: "who"}, `${s.device} · teacher says ${s.teacher_label} (${fmt(100 * top, 0)}%)`));
    const buttons = el("div");
    s.teacher_probs.forEach((_, k) => {
      const b = el("button", {type: "button", "data-label": String(k)}, String(k));
      b.addEventListener("click", () => label(s, k, card));
      buttons.appendChild(b);
    });
    card.appendChild(buttons);
    return card;
  }));
}

document.getElementById("load-queue").addEventListener("click", loadQueue);
refresh();
