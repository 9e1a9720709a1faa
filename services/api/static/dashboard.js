// FlowCloud dashboard: streams, a live overlay, latency and fps, class shares over time, and
// where each frame's time goes (stacked stages, capture to persisted).
// Plain browser JavaScript with no dependencies, so the page works offline. The API key comes
// from the URL fragment (#key=..., never sent to the server), this tab's storage, or the form.
"use strict";

const REFRESH_MS = 3000;
const STATS_POINTS = 120;
const KEY_STORAGE = "flowcloud.apikey";
// One colour per stage (flowcloud.stages), pipeline order: edge, network, gateway, then worker.
const STAGE_COLORS = {
  edge: "#b48ead", network: "#ebcb8b", decode: "#d08770", publish: "#bf616a",
  queue: "#8fbcbb", batch: "#88c0d0", inference: "#5e9cff", persist: "#a3be8c",
};

const state = { key: null, selected: null, live: null, timer: null, liveFps: null, summaryFps: null };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function loadKey() {
  const match = /(?:^|[#&])key=([^&]+)/.exec(location.hash);
  if (match) {
    const key = decodeURIComponent(match[1]);
    sessionStorage.setItem(KEY_STORAGE, key);
    history.replaceState(null, "", location.pathname + location.search);  // keep it out of history
    return key;
  }
  return sessionStorage.getItem(KEY_STORAGE);
}

class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.key}`, ...(options.headers || {}) },
  });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  return response;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}
function fmtNumber(x, digits = 1) {
  return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
}
function fmtAgo(ts) {
  if (!ts) return "-";
  const ago = Date.now() / 1000 - ts;
  if (ago < 60) return `${Math.max(0, ago).toFixed(0)} s ago`;
  if (ago < 3600) return `${(ago / 60).toFixed(0)} min ago`;
  return new Date(ts * 1000).toLocaleString();
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function renderStreams(items) {
  const body = $("streams").querySelector("tbody");
  body.replaceChildren();
  $("no-streams").hidden = items.length > 0;
  for (const s of items) {
    const tr = document.createElement("tr");
    tr.dataset.stream = s.stream_id;
    tr.classList.toggle("selected", s.stream_id === state.selected);
    const status = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `badge ${s.status}`;
    badge.textContent = s.status;
    status.append(badge);
    const lat = s.latency || {};
    tr.append(
      cell(s.stream_id),
      cell(s.tenant ?? "-"),
      status,
      cell(s.width && s.height ? `${s.width}x${s.height}` : "-"),
      cell(fmtNumber(s.fps)),
      cell(`${fmtSeconds(lat.p50)} / ${fmtSeconds(lat.p95)}`),
      cell(String(s.results)),
      cell(fmtAgo(s.last_seen)),
    );
    tr.addEventListener("click", () => select(s.stream_id));
    body.append(tr);
    if (s.stream_id === state.selected) {
      $("fig-latency-summary").textContent = `${fmtSeconds(lat.p50)} / ${fmtSeconds(lat.p95)}`;
      state.summaryFps = lat.result_fps;
      showFps();
    }
  }
  if (state.selected === null && items.length > 0) select(items[0].stream_id);
}

// --- live overlay: server-sent events read through fetch (EventSource cannot send a key) ------
async function readEvents(response, onEvent, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (!signal.aborted) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

// Results per second: measured between live events, else over the newest results.
function showFps() {
  $("fig-fps").textContent = fmtNumber(state.liveFps ?? state.summaryFps);
}

function showMask(m) {
  const img = $("live");
  img.onload = () => { img.dataset.seq = String(m.seq); };
  img.src = `data:image/jpeg;base64,${m.jpeg}`;
  $("fig-latency").textContent = fmtSeconds(m.latency);
  $("fig-stages").textContent = biggestStages(m.stages || {}, 3);
  if (m.fps) state.liveFps = m.fps;
  showFps();
  $("fig-seq").textContent = String(m.seq);
  const by = `by ${m.model} (${m.producer}${m.backfill ? ", backfilled after an outage" : ""})`;
  $("live-caption").textContent = m.overlay
    ? `frame ${m.seq}, ${m.width}x${m.height}, mask over the frame, ${by}`
    : `frame ${m.seq}, ${m.width}x${m.height}, mask only (the frame has left the recent window), ${by}`;
}

async function startLive(streamId) {
  stopLive();
  const controller = new AbortController();
  state.live = controller;
  while (!controller.signal.aborted) {
    try {
      const response = await api(`/streams/${encodeURIComponent(streamId)}/live?fps=5`, {
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      await readEvents(response, (event, data) => {
        if (event === "mask") showMask(data);
        else if (event === "error") setStatus(`live view: ${data.detail}`, true);
      }, controller.signal);
    } catch (err) {
      if (controller.signal.aborted) return;
      setStatus(`live view: ${err.message}`, true);
      if (err.status === 401) return showKeyForm();
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));  // reconnect after a drop
  }
}

function stopLive() {
  if (state.live) state.live.abort();
  state.live = null;
}

// --- charts drawn on canvas --------------------------------------------------------------
function rgb(color) {
  return `rgb(${color[0]}, ${color[1]}, ${color[2]})`;
}

function prepare(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  return ctx;
}

function axes(ctx, box, yLabels, xRange) {
  ctx.strokeStyle = "#2e3440";
  ctx.fillStyle = "#8a93a3";
  ctx.font = "11px sans-serif";
  ctx.lineWidth = 1;
  for (const [value, label] of yLabels) {
    const y = box.y + box.h - value * box.h;
    ctx.beginPath();
    ctx.moveTo(box.x, y);
    ctx.lineTo(box.x + box.w, y);
    ctx.stroke();
    ctx.fillText(label, 4, y + 4);
  }
  if (xRange) {
    const fmt = (t) => new Date(t * 1000).toLocaleTimeString();
    ctx.fillText(fmt(xRange[0]), box.x, box.y + box.h + 14);
    const right = fmt(xRange[1]);
    ctx.fillText(right, box.x + box.w - ctx.measureText(right).width, box.y + box.h + 14);
  }
}

function drawShares(stats) {
  const canvas = $("shares-chart");
  const ctx = prepare(canvas);
  const series = stats.series;
  canvas.dataset.points = String(series.length);
  const box = { x: 40, y: 8, w: canvas.width - 48, h: canvas.height - 30 };
  axes(ctx, box, [[0, "0%"], [0.5, "50%"], [1, "100%"]],
    series.length ? [series[0].capture_ts, series[series.length - 1].capture_ts] : null);
  if (series.length === 0) return;
  const t0 = series[0].capture_ts;
  const span = Math.max(series[series.length - 1].capture_ts - t0, 1e-6);
  const xOf = (p, i) => box.x + (series.length === 1 ? box.w / 2 : ((p.capture_ts - t0) / span) * box.w);
  const yOf = (v) => box.y + box.h - Math.min(v, 1) * box.h;
  const below = new Array(series.length).fill(0);
  // Stacked areas, largest mean share at the bottom.
  const classes = [...stats.classes].sort((a, b) => (stats.mean[b.id] || 0) - (stats.mean[a.id] || 0));
  for (const cls of classes) {
    const above = series.map((p, i) => below[i] + (p.shares[String(cls.id)] || 0));
    ctx.beginPath();
    series.forEach((p, i) => (i === 0 ? ctx.moveTo(xOf(p, i), yOf(above[i])) : ctx.lineTo(xOf(p, i), yOf(above[i]))));
    for (let i = series.length - 1; i >= 0; i--) ctx.lineTo(xOf(series[i], i), yOf(below[i]));
    ctx.closePath();
    ctx.fillStyle = rgb(cls.color);
    ctx.fill();
    above.forEach((v, i) => { below[i] = v; });
  }
  const legend = $("legend");
  legend.replaceChildren();
  for (const cls of classes) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = rgb(cls.color);
    li.append(swatch, `${cls.name} ${(100 * (stats.mean[cls.id] || 0)).toFixed(1)}%`);
    legend.append(li);
  }
}

// "network 352 ms, inference 40 ms, ...": a frame's largest stages first.
function biggestStages(stages, count) {
  const known = Object.entries(stages).filter(([, s]) => s !== null && s !== undefined);
  if (known.length === 0) return "-";
  known.sort((a, b) => b[1] - a[1]);
  return known.slice(0, count).map(([name, s]) => `${name} ${fmtSeconds(Math.max(s, 0))}`).join(", ");
}

// Stacked areas of each stage's seconds per frame, pipeline order from the bottom: the top edge
// is the capture-to-persisted latency. Beside it, each stage's p50, p95 and share of the mean.
function drawStages(stats) {
  const canvas = $("stages-chart");
  const ctx = prepare(canvas);
  const series = stats.series.filter((p) => !p.backfill); // live frames: a backfilled one waited out an outage
  const names = stats.stages.map((s) => s.name);
  canvas.dataset.points = String(series.length);
  const box = { x: 40, y: 8, w: canvas.width - 48, h: canvas.height - 30 };
  const top = Math.max(0.001, ...series.map((p) => p.latency)) * 1.1;
  axes(ctx, box, [[0, "0"], [0.5, (top / 2).toFixed(2)], [1, top.toFixed(2)]],
    series.length ? [series[0].capture_ts, series[series.length - 1].capture_ts] : null);
  if (series.length > 0) {
    const t0 = series[0].capture_ts;
    const span = Math.max(series[series.length - 1].capture_ts - t0, 1e-6);
    const xOf = (p) => box.x + (series.length === 1 ? box.w / 2 : ((p.capture_ts - t0) / span) * box.w);
    const yOf = (v) => box.y + box.h - Math.min(v / top, 1) * box.h;
    const below = new Array(series.length).fill(0);
    for (const name of names) {
      const above = series.map((p, i) => below[i] + Math.max((p.stages || {})[name] || 0, 0));
      ctx.beginPath();
      series.forEach((p, i) => (i === 0 ? ctx.moveTo(xOf(p), yOf(above[i])) : ctx.lineTo(xOf(p), yOf(above[i]))));
      for (let i = series.length - 1; i >= 0; i--) ctx.lineTo(xOf(series[i]), yOf(below[i]));
      ctx.closePath();
      ctx.fillStyle = STAGE_COLORS[name] || "#888";
      ctx.fill();
      above.forEach((v, i) => { below[i] = v; });
    }
  }
  const measured = stats.stages.filter((s) => s.share !== null);
  const largest = measured.reduce((a, b) => (b.share > (a ? a.share : -1) ? b : a), null);
  const body = $("stages-table").querySelector("tbody");
  body.replaceChildren();
  for (const s of stats.stages) {
    const tr = document.createElement("tr");
    tr.dataset.stage = s.name;
    tr.title = s.what;
    tr.classList.toggle("top", largest !== null && s.name === largest.name);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = STAGE_COLORS[s.name] || "#888";
    const first = document.createElement("td");
    first.append(swatch);
    tr.append(first, cell(s.name), cell(fmtSeconds(s.p50)), cell(fmtSeconds(s.p95)),
      cell(s.share === null ? "-" : `${(100 * s.share).toFixed(0)}%`));
    body.append(tr);
  }
  $("stages-verdict").textContent = largest === null
    ? "no stage times yet"
    : `Most of the time goes to ${largest.name} (${(100 * largest.share).toFixed(0)}% of the mean, `
      + `p50 ${fmtSeconds(largest.p50)}): ${largest.what}.`;
}

// --- polling ---------------------------------------------------------------------------
async function refresh() {
  try {
    const streams = await (await api("/streams")).json();
    renderStreams(streams.items);
    if (state.selected) {
      const id = encodeURIComponent(state.selected);
      const stats = await (await api(`/streams/${id}/stats?points=${STATS_POINTS}`)).json();
      drawShares(stats);
      drawStages(stats);
    }
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setStatus(err.message, true);
    if (err.status === 401) showKeyForm();
    if (err.status === 404 && state.selected) deselect();
  }
}

function select(streamId) {
  if (state.selected === streamId) return;
  state.selected = streamId;
  state.liveFps = null;
  state.summaryFps = null;
  $("stream-panel").hidden = false;
  $("stream-name").textContent = streamId;
  $("live").removeAttribute("data-seq");
  for (const tr of $("streams").querySelectorAll("tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.stream === streamId);
  }
  startLive(streamId);
  refresh();
}

function deselect() {
  stopLive();
  state.selected = null;
  $("stream-panel").hidden = true;
}

function showKeyForm() {
  clearInterval(state.timer);
  stopLive();
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  $("key-form").hidden = false;
  $("key-input").focus();
}

function start(key) {
  state.key = key;
  $("key-form").hidden = true;
  setStatus("loading...");
  clearInterval(state.timer);
  state.timer = setInterval(refresh, REFRESH_MS);
  refresh();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  start(key);
});

const initialKey = loadKey();
if (initialKey) start(initialKey);
else setStatus("enter an API key (flowcloud apikeys add --role reader --tenant T)");
