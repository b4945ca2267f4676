// inferd's live dashboard: polls /dashboard/data?since=T once a second and draws each model's series with uPlot.
// Every chart's element carries data-num-values: how many non-null values its series hold (tests read it).
"use strict";

const POLL_PERIOD_MS = 1000;
const KEY_STORAGE = "inferd-dashboard-api-key";
const CHARTS = {
  generate: [
    { title: "time to first token (ms)", series: [["ttft_p50_ms", "p50"], ["ttft_p90_ms", "p90"], ["ttft_p99_ms", "p99"]] },
    { title: "time per output token (ms)", series: [["tpot_p50_ms", "p50"], ["tpot_p90_ms", "p90"], ["tpot_p99_ms", "p99"]] },
    { title: "tokens/s", series: [["prompt_tokens_per_s", "in (prompt)"], ["generation_tokens_per_s", "out (generated)"]] },
    { title: "requests", series: [["num_running", "running"], ["num_waiting", "waiting"]] },
    { title: "KV cache in use (%)", series: [["kv_cache_usage_pct", "KV blocks used"]] },
    { title: "cache hit rate (%)", series: [["prefix_cache_hit_pct", "prefix cache (tokens)"],
                                            ["response_cache_hit_pct", "response cache", "has_response_cache"]] },
  ],
  embed: [{ title: "embeddings requests/s", series: [["requests_per_s", "requests"], ["items_per_s", "texts"]] }],
  tabular: [{ title: "tabular requests/s", series: [["requests_per_s", "requests"], ["items_per_s", "rows"]] }],
};
const COLORS = ["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd"];

const view = { t: [], models: {}, charts: [], lastT: null, maxNumSamples: 600, hasResponseCache: false };
const statusEl = document.getElementById("status");
const keyForm = document.getElementById("key-form");

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, document.getElementById("key-input").value.trim());
  keyForm.hidden = true;
  poll();
});

function clockTime(unixS) {
  const d = new Date(unixS * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

function chartWidth(el) { return Math.max(300, el.clientWidth - 8); }

function makeChart(container, modelName, spec) {
  const el = document.createElement("div");
  el.className = "chart";
  el.dataset.model = modelName;
  el.dataset.title = spec.title;
  el.dataset.numValues = "0";
  const title = document.createElement("h3");
  title.textContent = spec.title;
  el.appendChild(title);
  const empty = document.createElement("div");
  empty.className = "empty";
  empty.textContent = "no data yet";
  el.appendChild(empty);
  container.appendChild(el);
  const series = spec.series.filter(([, , needs]) => !needs || view.hasResponseCache);
  const plot = new uPlot({
    width: chartWidth(el), height: 180,
    scales: { x: { time: true } },
    series: [{}].concat(series.map(([, label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                        spanGaps: false }))),
    axes: [{ values: (u, splits) => splits.map(clockTime) }, { size: 55 }],
    legend: { live: true },
  }, [[]].concat(series.map(() => [])), el);
  return { el, empty, plot, modelName, keys: series.map(([key]) => key) };
}

function ensureModel(name, info) {
  if (view.models[name]) return view.models[name];
  const model = { kind: info.kind, series: {} };
  view.models[name] = model;
  const section = document.createElement("section");
  section.className = "model";
  section.dataset.model = name;
  const heading = document.createElement("h2");
  heading.textContent = name + " ";
  const kind = document.createElement("span");
  kind.className = "kind";
  heading.appendChild(kind);
  section.appendChild(heading);
  model.kindEl = kind;
  const grid = document.createElement("div");
  grid.className = "charts";
  section.appendChild(grid);
  document.getElementById("models").appendChild(section);
  for (const spec of CHARTS[info.kind] || []) view.charts.push(makeChart(grid, name, spec));
  return model;
}

function append(data) {
  view.hasResponseCache = view.hasResponseCache || data.has_response_cache;
  view.maxNumSamples = data.max_num_samples;
  document.getElementById("window-s").textContent = data.window_s;
  const numOld = view.t.length;
  view.t.push(...data.t);
  for (const [name, info] of Object.entries(data.models)) {
    const model = ensureModel(name, info);
    model.kindEl.textContent = info.kind + " · " + info.status;
    for (const [key, values] of Object.entries(info.series)) {
      const column = model.series[key] || (model.series[key] = new Array(numOld).fill(null));
      while (column.length < numOld) column.push(null);
      column.push(...values);
    }
  }
  const numDrop = view.t.length - view.maxNumSamples;
  if (numDrop > 0) {
    view.t.splice(0, numDrop);
    for (const model of Object.values(view.models)) {
      for (const column of Object.values(model.series)) column.splice(0, numDrop);
    }
  }
  if (data.t.length) view.lastT = data.t[data.t.length - 1];
}

function redraw() {
  for (const chart of view.charts) {
    const model = view.models[chart.modelName];
    const columns = chart.keys.map((key) => (model.series[key] || []).slice(0, view.t.length));
    const numValues = columns.reduce((sum, c) => sum + c.filter((v) => v !== null && v !== undefined).length, 0);
    chart.el.dataset.numValues = String(numValues);
    chart.empty.hidden = numValues > 0;
    chart.plot.setData([view.t.slice()].concat(columns));
  }
}

let timer = null;
async function poll() {
  clearTimeout(timer);
  const url = "/dashboard/data" + (view.lastT === null ? "" : "?since=" + view.lastT);
  try {
    const response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      statusEl.textContent = "this server needs an API key for its statistics";
      keyForm.hidden = false;
      return;  // polling resumes when a key is given
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    append(await response.json());
    redraw();
    statusEl.textContent = "live · " + view.t.length + " s of samples · updated " + new Date().toLocaleTimeString();
  } catch (error) {
    statusEl.textContent = "no answer from the server (" + error.message + "); retrying";
  }
  timer = setTimeout(poll, POLL_PERIOD_MS);
}

window.addEventListener("resize", () => {
  for (const chart of view.charts) chart.plot.setSize({ width: chartWidth(chart.el), height: 180 });
});
poll();
