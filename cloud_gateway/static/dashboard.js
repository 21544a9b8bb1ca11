// Fleet dashboard: polls the gateway API and draws small SVG line charts.
// No libraries, nothing fetched from the internet.
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

async function refresh() {
  try {
    const list = await (await fetch("/api/devices")).json();
    const details = await Promise.all(list.map(d => fetch(`/api/devices/${encodeURIComponent(d.device_id)}?history=120`).then(r => r.json())));
    const root = document.getElementById("devices");
    root.replaceChildren(...details.map(renderDevice));
    const drifted = details.filter(d => d.drift_flag).length;
    const online = details.filter(d => d.state === "online").length;
    document.getElementById("summary").textContent =
      `${details.length} devices · ${online} online · ${drifted} drifted · updated ${new Date().toLocaleTimeString()}`;
    document.body.setAttribute("data-loaded", "1");
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach the gateway API: " + e;
  }
}

refresh();
setInterval(refresh, 3000);
