// FlowCloud dashboard, results: click the class-share chart through to the frame behind a point,
// alert firings on the chart's timeline and in a list, and a search box for mask-native queries.
// Loaded after dashboard.js, whose globals it uses (state, api, $, drawShares).
"use strict";

const FIRINGS_LIMIT = 200;

// The chart point nearest a click, in canvas pixels (the canvas may be scaled by CSS).
function pointAt(canvas, event) {
  const stats = state.stats;
  if (!stats || stats.series.length === 0) return null;
  const x = (event.offsetX * canvas.width) / canvas.clientWidth;
  const series = stats.series;
  const box = { x: 40, w: canvas.width - 48 };
  const t0 = series[0].capture_ts;
  const span = Math.max(series[series.length - 1].capture_ts - t0, 1e-6);
  const t = t0 + ((x - box.x) / box.w) * span;
  let best = series[0];
  for (const p of series) if (Math.abs(p.capture_ts - t) < Math.abs(best.capture_ts - t)) best = p;
  return best;
}

function asDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function showFrame(streamId, seq) {
  const base = `/streams/${encodeURIComponent(streamId)}/masks/${seq}`;
  let response;
  let overlay = true;
  try {
    response = await api(`${base}?format=overlay`);
  } catch (err) {
    if (err.status !== 410) return setStatus(`frame ${seq}: ${err.message}`, true);
    overlay = false;  // the frame has left the recent window: the mask alone
    response = await api(`${base}?format=color`);
  }
  const meta = await (await api(base)).json();
  const img = $("frame-img");
  img.onload = () => { img.dataset.seq = String(seq); img.dataset.stream = streamId; };
  img.src = await asDataUrl(await response.blob());
  const when = new Date(meta.capture_ts * 1000).toLocaleTimeString();
  const top = Object.entries(meta.shares).sort((a, b) => b[1] - a[1]).slice(0, 4);
  const names = (state.stats && state.stats.classes) || [];
  const label = (id) => (names.find((c) => String(c.id) === id) || { name: id }).name;
  $("frame-caption").textContent = `${streamId} frame ${seq} at ${when}` +
    (overlay ? "" : " (mask only)") + ": " +
    top.map(([id, share]) => `${label(id)} ${(100 * share).toFixed(1)}%`).join(", ");
  $("frame-view").hidden = false;
}

async function drawFirings(stats) {
  const canvas = $("shares-chart");
  const series = stats.series;
  const list = $("firings");
  if (!state.selected || series.length === 0) return;
  const streamId = state.selected;
  const t0 = series[0].capture_ts;
  const t1 = series[series.length - 1].capture_ts;
  let items;
  try {
    const query = `stream=${encodeURIComponent(streamId)}&since=${t0}&limit=${FIRINGS_LIMIT}`;
    items = (await (await api(`/alerts/firings?${query}`)).json()).items;
  } catch (err) {
    return setStatus(`alert firings: ${err.message}`, true);
  }
  if (streamId !== state.selected) return;
  const ctx = canvas.getContext("2d");
  const box = { x: 40, y: 8, w: canvas.width - 48, h: canvas.height - 30 };
  const span = Math.max(t1 - t0, 1e-6);
  let drawn = 0;
  ctx.strokeStyle = "#ff3b3b";
  ctx.lineWidth = 2;
  for (const f of items) {
    if (f.capture_ts < t0 || f.capture_ts > t1) continue;
    const x = box.x + ((f.capture_ts - t0) / span) * box.w;
    ctx.beginPath();
    ctx.moveTo(x, box.y);
    ctx.lineTo(x, box.y + box.h);
    ctx.stroke();
    drawn += 1;
  }
  canvas.dataset.firings = String(drawn);
  list.replaceChildren();
  $("no-firings").hidden = items.length > 0;
  for (const f of items) {
    const li = document.createElement("li");
    li.dataset.firing = f.id;
    const when = new Date(f.capture_ts * 1000).toLocaleTimeString();
    li.textContent = `${when}: ${f.class_name} ${f.op} ${(100 * f.threshold).toFixed(0)}% ` +
      `(${(100 * f.share).toFixed(1)}%, frame ${f.seq}, held ${f.run_frames} results) - ${f.status}`;
    li.addEventListener("click", () => showFrame(f.stream, f.seq));
    list.append(li);
  }
}

const drawSharesBase = drawShares;
drawShares = function drawSharesWithFirings(stats) {  // eslint-disable-line no-global-assign
  drawSharesBase(stats);
  state.stats = stats;
  drawFirings(stats);
};

$("shares-chart").addEventListener("click", (event) => {
  const point = pointAt($("shares-chart"), event);
  if (point && state.selected) showFrame(state.selected, point.seq);
});

// --- search ----------------------------------------------------------------------------------
$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const params = new URLSearchParams({
    class: $("search-class").value.trim(),
    min_share: $("search-min").value || "0",
    limit: "50",
  });
  const body = $("search-results").querySelector("tbody");
  body.replaceChildren();
  try {
    const page = await (await api(`/search?${params}`)).json();
    $("search-count").textContent = `${page.items.length}${page.next_cursor ? "+" : ""} results`;
    for (const r of page.items) {
      const tr = document.createElement("tr");
      tr.dataset.stream = r.stream;
      tr.dataset.seq = String(r.seq);
      const names = Object.entries(r.shares).sort((a, b) => b[1] - a[1]).slice(0, 3);
      tr.append(
        cell(r.stream),
        cell(String(r.seq)),
        cell(new Date(r.capture_ts * 1000).toLocaleString()),
        cell(names.map(([id, s]) => `${id}: ${(100 * s).toFixed(1)}%`).join(", ")),
      );
      tr.addEventListener("click", () => showFrame(r.stream, r.seq));
      body.append(tr);
    }
  } catch (err) {
    $("search-count").textContent = err.message;
  }
});
