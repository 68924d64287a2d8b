// kru dashboard: a single page over the HTTP API (/v1), no libraries. Charts are hand-written SVG.
"use strict";

const KEY_STORAGE = "kru-api-key";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];
const main = document.getElementById("main");
let cleanups = []; // stopped when the page changes (timers, event streams)

// --- API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.field = this.body.field;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let keyWaiters = null;
function askForKey(message) {
  const box = document.getElementById("keybox");
  document.getElementById("keymsg").textContent = message;
  box.hidden = false;
  document.getElementById("keyinput").focus();
  if (!keyWaiters) keyWaiters = [];
  return new Promise((resolve) => keyWaiters.push(resolve));
}
document.getElementById("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("keyinput");
  sessionStorage.setItem(KEY_STORAGE, input.value.trim());
  input.value = "";
  document.getElementById("keybox").hidden = true;
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((resolve) => resolve());
});

async function api(path, options = {}) {
  for (;;) {
    const headers = { ...authHeaders(), ...(options.headers || {}) };
    let body = options.body;
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(options.json);
    }
    const response = await fetch(path, { method: options.method || "GET", headers, body });
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY_STORAGE);
      await askForKey(
        response.status === 401
          ? "This server needs an API key (KRU_API_KEYS). It is kept for this tab only."
          : "That key was refused: invalid API key. Enter another one."
      );
      continue;
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header). Resumes after
// the last event id with Last-Event-ID when the connection drops; ids already seen are skipped.
function followEvents(jobId, onEvent, onEnd) {
  let lastId = 0;
  let stopped = false;
  let controller = null;
  async function connect() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const headers = authHeaders();
        if (lastId) headers["Last-Event-ID"] = String(lastId);
        const response = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal: controller.signal });
        if (response.status === 401 || response.status === 403) {
          await api(`/v1/jobs/${jobId}`); // asks for a key, then retry
          continue;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let event = {};
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let nl;
          while ((nl = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, nl).replace(/\r$/, "");
            buffer = buffer.slice(nl + 1);
            if (line === "") {
              if (event.event) {
                const id = event.id ? Number(event.id) : null;
                if (event.event === "end") {
                  stopped = true;
                  onEnd(JSON.parse(event.data));
                  return;
                }
                if (id === null || id > lastId) {
                  if (id !== null) lastId = id;
                  onEvent(event.event, JSON.parse(event.data), id);
                }
              }
              event = {};
            } else if (!line.startsWith(":")) {
              const i = line.indexOf(":");
              const name = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (name === "data") event.data = event.data ? event.data + "\n" + val : val;
              else if (name === "event" || name === "id") event[name] = val;
            }
          }
        }
      } catch (err) {
        if (stopped) return;
      }
      if (!stopped) await sleep(1000); // dropped: reconnect after the last id
    }
  }
  connect();
  return {
    stop() { stopped = true; if (controller) controller.abort(); },
    get lastId() { return lastId; },
    drop() { if (controller) controller.abort(); }, // for tests: simulate a lost connection
  };
}

// --- helpers -----------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function statusBadge(status) {
  return h("span", { class: `status s-${status}`, "data-status": status }, status);
}

function progressBar(fraction, label) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  return h("div", {},
    h("div", { class: "bar", role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
      h("span", { style: `width:${pct}%` })),
    h("div", { class: "bar-label" }, label || `${pct}%`));
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toPrecision(4).replace(/\.?0+$/, "");
}

function seconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function duration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return (end - Date.parse(job.started_at)) / 1000;
}

function eta(job) {
  const f = job.progress.fraction;
  const d = duration(job);
  if (job.status !== "running" || !d || !f || f >= 1) return null;
  return (d * (1 - f)) / f;
}

function evalMetric(metrics) {
  for (const name of ["eval_accuracy", "eval_mse", "eval_bpc"]) {
    if (metrics && metrics[name] !== undefined) return [name, metrics[name]];
  }
  return [null, null];
}

function jobTitle(job) {
  return job.name || job.id.slice(0, 8);
}

function showError(where, err) {
  where.replaceChildren(h("p", { class: "error", role: "alert" }, err.message || String(err)));
}

function every(ms, fn) {
  const timer = setInterval(fn, ms);
  cleanups.push(() => clearInterval(timer));
}

// --- charts ------------------------------------------------------------------------------------

// A line chart of series [{name, points: [[x, y], ...]}] as SVG, x and y axes with ticks.
function lineChart(title, series, { log = false, xLabel = "step" } = {}) {
  const W = 560, H = 260, L = 66, R = 14, T = 10, B = 34;
  const box = h("div", { class: "chart", "data-chart": title });
  box.append(h("h3", {}, title));
  const all = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y) && (!log || y > 0));
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title} against ${xLabel}`);
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  box.dataset.points = String(all.length);
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, "no points yet");
    box.append(svg);
    return box;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const f = log ? Math.log10 : (v) => v;
  let y0 = Math.min(...all.map((p) => f(p[1]))), y1 = Math.max(...all.map((p) => f(p[1])));
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 = !log && y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad; // losses do not go below 0
  y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (f(y) - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    const y = T + (1 - i / 4) * (H - T - B);
    el("line", { x1: L, x2: W - R, y1: y, y2: y, class: "gridline" });
    el("text", { x: L - 4, y: y + 3, "text-anchor": "end", class: "axis" }, fmt(log ? 10 ** v : v));
    const xv = x0 + ((x1 - x0) * i) / 4;
    el("text", { x: sx(xv), y: H - B + 14, "text-anchor": "middle", class: "axis" }, fmt(Math.round(xv)));
  }
  el("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, xLabel + (log ? " (log scale)" : ""));
  el("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#9ca3af" });
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9ca3af" });
  const legend = h("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = s.points.filter(([, y]) => Number.isFinite(y) && (!log || y > 0));
    if (!pts.length) return;
    const d = pts.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    el("path", { d, fill: "none", stroke: color, "stroke-width": 1.8, "data-series": s.name });
    if (pts.length < 40) pts.forEach(([x, y]) => el("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: color }));
    legend.append(h("span", {}, h("i", { style: `background:${color}` }), `${s.name} (${pts.length})`));
  });
  box.append(svg, legend);
  return box;
}

// --- pages -------------------------------------------------------------------------------------

async function jobsPage(params) {
  const status = params.get("status") || "";
  const filter = h("select", { id: "status-filter", "aria-label": "status filter",
    onchange: (ev) => { location.hash = ev.target.value ? `#/jobs?status=${ev.target.value}` : "#/jobs"; } },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const compare = h("button", { class: "secondary", id: "compare-selected", onclick: () => {
    const ids = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
    location.hash = `#/compare?ids=${ids.join(",")}`;
  } }, "Compare selected");
  const tableBox = h("div", { class: "scroll" }, h("p", { class: "muted" }, "loading…"));
  const count = h("span", { class: "muted" });
  main.replaceChildren(h("h1", {}, "Jobs"), h("div", { class: "toolbar" }, filter, compare, count,
    h("a", { href: "#/new", class: "button" }, "New job")), tableBox);
  const picked = new Set();
  async function refresh() {
    let page;
    try {
      page = await api(`/v1/jobs?limit=100${status ? `&status=${status}` : ""}`);
    } catch (err) { showError(tableBox, err); return; }
    count.textContent = `${page.total} job${page.total === 1 ? "" : "s"}`;
    if (!page.items.length) { tableBox.replaceChildren(h("p", { class: "muted" }, "No jobs yet.")); return; }
    const rows = page.items.map((job) => {
      const c = job.config;
      const [metricName, metricValue] = evalMetric(job.progress.metrics);
      return h("tr", { "data-job": job.id },
        h("td", {}, h("input", { type: "checkbox", class: "pick", value: job.id, "aria-label": "select for comparison",
          checked: picked.has(job.id), onchange: (ev) => (ev.target.checked ? picked.add(job.id) : picked.delete(job.id)) })),
        h("td", {}, h("a", { href: `#/jobs/${job.id}` }, jobTitle(job))),
        h("td", {}, c.task.kind),
        h("td", { class: "hide-narrow" }, c.model.cell),
        h("td", { class: "hide-narrow" }, c.model.hidden_size),
        h("td", {}, statusBadge(job.status)),
        h("td", {}, progressBar(job.progress.fraction, `${job.progress.step} / ${job.progress.total_steps}`)),
        h("td", { class: "hide-narrow" }, job.attempts),
        h("td", { class: "hide-narrow" }, seconds(duration(job))),
        h("td", {}, fmt(job.progress.metrics.loss)),
        h("td", { title: metricName || "" }, metricName ? `${metricName.replace("eval_", "")} ${fmt(metricValue)}` : "–"));
    });
    tableBox.replaceChildren(h("table", { id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["", "name", "task", "cell", "hidden", "status", "progress", "attempts", "duration", "loss", "eval"]
        .map((t, i) => h("th", { class: [3, 4, 7, 8].includes(i) ? "hide-narrow" : null }, t)))),
      h("tbody", {}, rows)));
  }
  await refresh();
  every(2000, refresh);
}

async function jobPage(id) {
  let job;
  try { job = await api(`/v1/jobs/${id}`); } catch (err) { showError(main, err); return; }
  const head = h("div");
  const history = h("tbody");
  const charts = h("div", { class: "grid", id: "charts" });
  const logToggle = h("input", { type: "checkbox", id: "log-scale", onchange: () => draw() });
  const series = { loss: [], eval_loss: [], eval_accuracy: [], eval_mse: [], eval_bpc: [], penalty: [], grad_norm: [] };
  const seen = new Set(); // phase:attempt:step -- a point is drawn once
  let attempt = 1;

  function renderHead() {
    const e = eta(job);
    const cancel = !FINISHED.has(job.status)
      ? h("button", { class: "danger", id: "cancel", disabled: job.cancel_requested, onclick: async (ev) => {
          ev.target.disabled = true;
          try { job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); renderHead(); }
          catch (err) { alert(err.message); ev.target.disabled = false; }
        } }, job.cancel_requested ? "Cancel requested…" : "Cancel job")
      : null;
    head.replaceChildren(
      h("h1", {}, "Job ", jobTitle(job), " ", statusBadge(job.status)),
      h("div", { class: "card" },
        progressBar(job.progress.fraction, `step ${job.progress.step} of ${job.progress.total_steps}` +
          (e !== null ? ` · about ${seconds(e)} left` : "") +
          (job.status === "running" || FINISHED.has(job.status) ? ` · ${seconds(duration(job))} so far` : "")),
        h("dl", { class: "kv" },
          h("dt", {}, "id"), h("dd", {}, job.id),
          h("dt", {}, "task / cell"), h("dd", {}, `${job.config.task.kind} / ${job.config.model.cell}, hidden ${job.config.model.hidden_size}`),
          h("dt", {}, "attempts"), h("dd", {}, job.attempts),
          h("dt", {}, "worker"), h("dd", {}, job.worker || "–"),
          h("dt", {}, "created"), h("dd", {}, job.created_at),
          h("dt", {}, "model"), h("dd", {}, job.model_id ? h("a", { href: `#/models/${job.model_id}`, id: "model-link" }, job.model_id) : "–")),
        job.error ? h("p", { class: "error", id: "job-error" }, `Error: ${job.error}`) : null,
        h("div", { class: "toolbar" }, cancel, h("a", { href: `#/compare?ids=${job.id}` }, "compare with others…"))));
  }

  function addPoint(phase, step, metrics, att) {
    const key = `${phase}:${att}:${step}`;
    if (seen.has(key)) return;
    seen.add(key);
    for (const [name, value] of Object.entries(metrics)) {
      if (series[name] !== undefined && typeof value === "number") series[name].push([step, value]);
    }
  }

  let pending = false;
  let headPending = false;
  function draw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const log = logToggle.checked;
      const list = [lineChart("loss", [{ name: "train loss", points: series.loss }, { name: "eval loss", points: series.eval_loss }], { log })];
      for (const name of ["eval_accuracy", "eval_mse", "eval_bpc"]) {
        if (series[name].length) list.push(lineChart(name.replace("eval_", "eval "), [{ name, points: series[name] }], { log: log && name !== "eval_accuracy" }));
      }
      if (series.penalty.length) list.push(lineChart("unitary penalty", [{ name: "penalty", points: series.penalty }], { log }));
      if (series.grad_norm.length) list.push(lineChart("gradient norm", [{ name: "grad_norm", points: series.grad_norm }], { log }));
      charts.replaceChildren(...list);
    });
  }

  renderHead();
  main.replaceChildren(head,
    h("h2", {}, "Training curves"),
    h("div", { class: "toolbar" }, h("label", {}, logToggle, " log scale")),
    charts,
    h("h2", {}, "Status history"),
    h("div", { class: "scroll" }, h("table", { id: "history" },
      h("thead", {}, h("tr", {}, ["time", "status", "attempt", "worker", "details"].map((t) => h("th", {}, t)))), history)),
    h("h2", {}, "Config"),
    h("pre", { id: "config" }, JSON.stringify(job.config, null, 2)));
  draw();

  const stream = followEvents(id, (kind, data) => {
    if (kind === "status") {
      if (data.attempt) attempt = data.attempt;
      const details = [data.error && `error: ${data.error}`, data.reason, data.resumed_from_step && `resumed from step ${data.resumed_from_step}`,
        data.model_id && `model ${data.model_id}`, data.cancel_requested && "cancel requested"].filter(Boolean).join("; ");
      history.append(h("tr", {}, h("td", {}, data.time), h("td", {}, statusBadge(data.status)),
        h("td", {}, data.attempt || "–"), h("td", {}, data.worker || "–"), h("td", { class: data.error ? "error" : "" }, details)));
      job = { ...job, status: data.status };
      renderHead();
    } else if (kind === "progress") {
      job = { ...job, progress: { ...job.progress, step: data.step, total_steps: data.total_steps, fraction: data.fraction } };
      if (data.phase === "train" || data.phase === "eval") {
        addPoint(data.phase, data.step, data.metrics, attempt);
        draw();
      }
      if (!headPending) { // at most one redraw of the header a frame
        headPending = true;
        requestAnimationFrame(() => { headPending = false; renderHead(); });
      }
    }
  }, (finished) => { job = finished; renderHead(); });
  cleanups.push(() => stream.stop());
  window.kruStream = stream; // tests drop the connection to check the resume
  every(5000, async () => { // times and cancel flag; the stream carries the rest
    try { const fresh = await api(`/v1/jobs/${id}`); job = { ...fresh, progress: { ...fresh.progress } }; renderHead(); } catch (e) { /* shown on next load */ }
  });
}

async function comparePage(params) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean);
  const box = h("div", { class: "grid", id: "charts" });
  const logToggle = h("input", { type: "checkbox", id: "log-scale", onchange: () => draw() });
  const picker = h("div", { class: "card" }, h("p", { class: "muted" }, "loading jobs…"));
  main.replaceChildren(h("h1", {}, "Compare jobs"), picker,
    h("div", { class: "toolbar" }, h("label", {}, logToggle, " log scale")), box);
  let data = [];
  function draw() {
    const log = logToggle.checked;
    const label = (j) => `${jobTitle(j)} (λ=${j.config.train.unitary_penalty}, lr=${j.config.train.lr})`;
    const metric = (name) => data.map(({ job, points }) => ({ name: label(job),
      points: points.filter((p) => p[name] !== undefined).map((p) => [p.step, p[name]]) }));
    const charts = [lineChart("train loss", metric("loss"), { log }), lineChart("eval loss", metric("eval_loss"), { log })];
    for (const name of ["eval_accuracy", "eval_mse", "eval_bpc"]) {
      const s = metric(name);
      if (s.some((x) => x.points.length)) charts.push(lineChart(name.replace("eval_", "eval "), s, { log: log && name !== "eval_accuracy" }));
    }
    box.replaceChildren(...charts);
  }
  try {
    const page = await api("/v1/jobs?limit=100");
    picker.replaceChildren(h("p", {}, "Pick the jobs to draw together (e.g. the unitary-penalty weights of a sweep):"),
      h("div", { class: "toolbar" }, page.items.map((j) => h("label", {}, h("input", { type: "checkbox", value: j.id, checked: ids.includes(j.id),
        onchange: () => { const sel = [...picker.querySelectorAll("input:checked")].map((c) => c.value); location.hash = `#/compare?ids=${sel.join(",")}`; } }),
        ` ${jobTitle(j)} `, statusBadge(j.status)))));
    data = await Promise.all(ids.map(async (jid) => ({ job: await api(`/v1/jobs/${jid}`), points: await api(`/v1/jobs/${jid}/metrics`) })));
    draw();
  } catch (err) { showError(box, err); }
}

async function modelsPage() {
  const box = h("div", { class: "scroll" }, h("p", { class: "muted" }, "loading…"));
  main.replaceChildren(h("h1", {}, "Models"), box);
  try {
    const page = await api("/v1/models?limit=100");
    if (!page.items.length) { box.replaceChildren(h("p", { class: "muted" }, "No models yet: a job that succeeds registers one.")); return; }
    box.replaceChildren(h("table", { id: "models-table" },
      h("thead", {}, h("tr", {}, ["model", "task", "cell", "parameters", "metrics", "created"].map((t) => h("th", {}, t)))),
      h("tbody", {}, page.items.map((m) => h("tr", {},
        h("td", {}, h("a", { href: `#/models/${m.id}` }, m.name || m.id.slice(0, 8))),
        h("td", {}, m.task.task_kind), h("td", {}, m.config.model.cell),
        h("td", {}, `${fmt(m.parameter_counts.total)} (${fmt(m.parameter_counts.recurrent)} recurrent)`),
        h("td", {}, Object.entries(m.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join(", ")),
        h("td", {}, m.created_at))))));
  } catch (err) { showError(box, err); }
}

function randomSymbols(n) {
  return Array.from({ length: n }, () => 1 + Math.floor(Math.random() * 8));
}

// An example input for the model's task and how to read the answer.
function example(model) {
  const task = model.config.task;
  if (model.task.task_kind === "copy") {
    const data = randomSymbols(10);
    const input = [...data, ...Array(task.delay - 1).fill(0), 9, ...Array(10).fill(0)];
    return { input, read: (pred) => {
      const recalled = pred.slice(-10);
      return h("div", { class: "answer", id: "answer" },
        h("div", {}, "expected: ", data.join(" ")),
        h("div", {}, "recalled: ", recalled.map((s, i) => h("span", { class: s === data[i] ? "" : "miss" }, `${s} `))),
        h("div", {}, `${recalled.filter((s, i) => s === data[i]).length} of 10 symbols recalled`));
    } };
  }
  if (model.task.task_kind === "adding") {
    const T = task.length;
    const values = Array.from({ length: T }, () => Math.round(Math.random() * 1000) / 1000);
    const a = Math.floor(Math.random() * Math.floor(T / 2)), b = Math.floor(T / 2) + Math.floor(Math.random() * (T - Math.floor(T / 2)));
    const input = values.map((v, i) => [v, i === a || i === b ? 1 : 0]);
    const expected = values[a] + values[b];
    return { input, read: (pred) => h("div", { class: "answer", id: "answer" },
      h("div", {}, `expected sum: ${fmt(expected)} (${values[a]} + ${values[b]})`),
      h("div", {}, `predicted: ${fmt(Array.isArray(pred) ? pred[0] : pred)}`)) };
  }
  if (model.task.task_kind === "text") {
    const vocab = new Set(model.task.vocabulary || []);
    const prompt = [..."The "].filter((c) => vocab.has(c)).join("") || (model.task.vocabulary || ["a"]).slice(0, 3).join("");
    return { prompt };
  }
  const size = model.task.input_size || 1;
  const input = Array.from({ length: 8 }, () => (model.task.vocab_size ? 1 : size === 1 ? 0.5 : Array(size).fill(0.5)));
  return { input, read: (pred) => h("div", { class: "answer", id: "answer" }, `prediction: ${JSON.stringify(pred)}`) };
}

async function modelPage(id) {
  let model;
  try { model = await api(`/v1/models/${id}`); } catch (err) { showError(main, err); return; }
  const n = model.config.model.hidden_size;
  const counts = model.parameter_counts;
  const ex = example(model);
  const result = h("div", { id: "result" });
  let form;
  if (ex.prompt !== undefined) {
    const prompt = h("input", { id: "prompt", value: ex.prompt, style: "width:100%" });
    const tokens = h("input", { id: "max-tokens", type: "number", value: 200, min: 1 });
    form = h("form", { id: "try-it", onsubmit: async (ev) => {
      ev.preventDefault();
      result.replaceChildren(h("p", { class: "muted" }, "generating…"));
      try {
        const r = await api(`/v1/models/${id}/generate`, { method: "POST", json: { prompt: prompt.value, max_new_tokens: Number(tokens.value), temperature: 0.8, seed: 1 } });
        result.replaceChildren(h("pre", { id: "answer" }, r.prompt + r.text));
      } catch (err) { showError(result, err); }
    } }, h("label", {}, "prompt ", prompt), " ", h("label", {}, "characters ", tokens), " ", h("button", { type: "submit" }, "Generate"));
  } else {
    const input = h("textarea", { id: "inputs", rows: 4 }, JSON.stringify(ex.input));
    form = h("form", { id: "try-it", onsubmit: async (ev) => {
      ev.preventDefault();
      result.replaceChildren(h("p", { class: "muted" }, "predicting…"));
      let seq;
      try { seq = JSON.parse(input.value); } catch (err) { showError(result, new Error(`not JSON: ${err.message}`)); return; }
      try {
        const r = await api(`/v1/models/${id}/predict`, { method: "POST", json: { inputs: [seq] } });
        result.replaceChildren(ex.read(r.predictions[0]), h("details", {}, h("summary", {}, "raw answer"), h("pre", {}, JSON.stringify(r.predictions[0]))));
      } catch (err) { showError(result, err); }
    } }, h("label", {}, "one input sequence (JSON)", input), h("button", { type: "submit" }, "Predict"));
  }
  main.replaceChildren(
    h("h1", {}, "Model ", model.name || model.id.slice(0, 8)),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("dl", { class: "kv" },
        h("dt", {}, "id"), h("dd", {}, model.id),
        h("dt", {}, "task"), h("dd", {}, `${model.task.task_kind} (${model.task.target_kind}${model.task.per_step ? ", one label per step" : ""})`),
        h("dt", {}, "cell"), h("dd", {}, `${model.config.model.cell}, hidden ${n}`),
        h("dt", {}, "parameters"), h("dd", { id: "param-counts" }, `${fmt(counts.total)} in total, ${fmt(counts.recurrent)} recurrent`),
        h("dt", {}, "dense RNN"), h("dd", {}, `${fmt(n * n)} recurrent (N² = ${n}²), ${fmt(n * n / Math.max(1, counts.recurrent))}× as many`),
        h("dt", {}, "source job"), h("dd", {}, h("a", { href: `#/jobs/${model.job_id}` }, model.job_id)),
        h("dt", {}, "created"), h("dd", {}, model.created_at))),
      h("div", { class: "card" }, h("h2", {}, "Final metrics"), h("dl", { class: "kv", id: "final-metrics" },
        Object.entries(model.metrics).map(([k, v]) => [h("dt", {}, k), h("dd", {}, fmt(v))])))),
    h("h2", {}, "Try it"),
    h("div", { class: "card" }, form, result),
    h("h2", {}, "Config"), h("pre", {}, JSON.stringify(model.config, null, 2)));
}

async function datasetsPage() {
  const result = h("div", { id: "upload-result" });
  const list = h("div", { class: "scroll" });
  const fileInput = h("input", { type: "file", id: "file", onchange: () => fileInput.files[0] && upload(fileInput.files[0]) });
  const drop = h("div", { class: "drop", id: "drop" },
    h("p", {}, "Drop a JSONL file (one {\"input\": [...], \"target\": ...} a line) or a UTF-8 text file here, or "),
    h("label", {}, "choose one: ", fileInput));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); if (ev.dataTransfer.files[0]) upload(ev.dataTransfer.files[0]); });
  async function upload(file) {
    result.replaceChildren(h("p", { class: "muted" }, `uploading ${file.name}…`));
    const body = new FormData();
    body.append("file", file, file.name);
    try {
      const d = await api("/v1/datasets", { method: "POST", body });
      result.replaceChildren(h("div", { class: "card ok", role: "status" }, h("p", {}, `Stored ${d.filename} as ${d.kind} dataset ${d.id}.`),
        h("pre", {}, JSON.stringify(d.summary, null, 2))));
      refresh();
    } catch (err) {
      const items = err.body.errors || [];
      result.replaceChildren(h("div", { class: "card", role: "alert" }, h("p", { class: "error" }, err.message),
        items.length ? h("table", { id: "bad-lines" }, h("thead", {}, h("tr", {}, h("th", {}, "line"), h("th", {}, "problem"))),
          h("tbody", {}, items.map((e) => h("tr", {}, h("td", {}, e.line ?? "–"), h("td", {}, e.message))))) : null,
        err.body.errors_total ? h("p", { class: "muted" }, `${err.body.errors_total} problems in all; the first ${items.length} are listed.`) : null));
    }
  }
  async function refresh() {
    try {
      const page = await api("/v1/datasets?limit=100");
      list.replaceChildren(page.items.length ? h("table", { id: "datasets-table" },
        h("thead", {}, h("tr", {}, ["file", "kind", "size", "summary", "id"].map((t) => h("th", {}, t)))),
        h("tbody", {}, page.items.map((d) => h("tr", {}, h("td", {}, d.filename), h("td", {}, d.kind), h("td", {}, `${fmt(d.size_bytes)} B`),
          h("td", {}, Object.entries(d.summary).filter(([, v]) => typeof v !== "object").map(([k, v]) => `${k} ${fmt(v)}`).join(", ")),
          h("td", {}, h("code", {}, d.id)))))) : h("p", { class: "muted" }, "No datasets yet."));
    } catch (err) { showError(list, err); }
  }
  main.replaceChildren(h("h1", {}, "Datasets"), drop, result, h("h2", {}, "Uploaded"), list);
  await refresh();
}

const TASK_FIELDS = { copy: ["delay"], adding: ["length"], mnist: ["permuted"], dataset: ["dataset_id"], text: ["dataset_id", "seq_len"] };

function newJobPage() {
  const f = (name, label, attrs = {}) => h("label", { "data-field": name }, label, h("input", { name, ...attrs }));
  const sel = (name, label, options, value) => h("label", { "data-field": name }, label,
    h("select", { name }, options.map((o) => h("option", { value: o, selected: o === value }, o))));
  const form = h("form", { class: "fields card", id: "job-form", novalidate: true },
    f("name", "name", { value: "copy-demo" }),
    sel("task.kind", "task", Object.keys(TASK_FIELDS), "copy"),
    f("task.delay", "copy: delay", { type: "number", value: 10 }),
    f("task.length", "adding: length", { type: "number", value: 100 }),
    sel("task.permuted", "mnist: permuted", ["false", "true"], "false"),
    f("task.dataset_id", "dataset id", { placeholder: "from the Datasets page" }),
    f("task.seq_len", "text: window", { type: "number", value: 100 }),
    sel("model.cell", "cell", ["kru", "kru_lstm", "rnn", "lstm"], "kru"),
    f("model.hidden_size", "hidden size N", { type: "number", value: 32 }),
    f("model.factors", "factors (e.g. 2,2,2,2,2; empty: default)", {}),
    sel("model.complex", "complex", ["true", "false"], "true"),
    f("train.steps", "steps", { type: "number", value: 500 }),
    f("train.batch_size", "batch size", { type: "number", value: 32 }),
    sel("train.optimizer", "optimizer", ["adam", "rmsprop"], "adam"),
    f("train.lr", "learning rate", { type: "number", value: 0.01, step: "any" }),
    f("train.unitary_penalty", "unitary penalty", { type: "number", value: 0.01, step: "any" }),
    f("train.eval_every", "eval every", { type: "number", value: 100 }),
    f("train.log_every", "log every (empty: ~250 points)", { type: "number" }),
    h("div", {}, h("button", { type: "submit", id: "submit-job" }, "Submit job")));
  const preview = h("pre", { id: "config-json" });
  const message = h("div", { id: "form-error", role: "alert" });
  const num = (v) => (v.trim() === "" ? undefined : Number(v));
  function config() {
    const v = (name) => form.elements[name].value;
    const kind = v("task.kind");
    const task = { kind };
    for (const k of TASK_FIELDS[kind]) {
      const raw = v(`task.${k}`);
      if (raw.trim() === "") continue;
      task[k] = k === "dataset_id" ? raw.trim() : k === "permuted" ? raw === "true" : num(raw);
    }
    const model = { cell: v("model.cell"), hidden_size: num(v("model.hidden_size")), complex: v("model.complex") === "true" };
    if (v("model.factors").trim()) model.factors = v("model.factors").split(",").map((x) => num(x));
    const train = { steps: num(v("train.steps")), batch_size: num(v("train.batch_size")), optimizer: v("train.optimizer"),
      lr: num(v("train.lr")), unitary_penalty: num(v("train.unitary_penalty")), eval_every: num(v("train.eval_every")) };
    if (v("train.log_every").trim()) train.log_every = num(v("train.log_every"));
    for (const part of [model, train]) for (const k of Object.keys(part)) if (part[k] === undefined) delete part[k];
    const out = { task, model, train };
    if (v("name").trim()) out.name = v("name").trim();
    return out;
  }
  function update() {
    const kind = form.elements["task.kind"].value;
    for (const label of form.querySelectorAll("label[data-field^='task.']")) {
      const key = label.dataset.field.slice(5);
      label.hidden = key !== "kind" && !TASK_FIELDS[kind].includes(key);
    }
    preview.textContent = JSON.stringify(config(), null, 2);
  }
  form.addEventListener("input", update);
  form.addEventListener("change", update);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    form.querySelectorAll("label.bad").forEach((l) => l.classList.remove("bad"));
    message.replaceChildren();
    try {
      const job = await api("/v1/jobs", { method: "POST", json: config() });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      const field = err.field || "";
      const label = [...form.querySelectorAll("label[data-field]")].find((l) => field === l.dataset.field || field.startsWith(l.dataset.field + "."));
      if (label) label.classList.add("bad");
      message.replaceChildren(h("p", { class: "error" }, err.message, field ? ` (field ${field})` : ""));
    }
  });
  main.replaceChildren(h("h1", {}, "New job"), form, message, h("h2", {}, "The config it submits (POST /v1/jobs)"), preview);
  update();
}

async function workersPage() {
  const box = h("div", { class: "scroll" }, h("p", { class: "muted" }, "loading…"));
  main.replaceChildren(h("h1", {}, "Workers"), box);
  async function refresh() {
    try {
      const page = await api("/v1/workers");
      if (!page.items.length) { box.replaceChildren(h("p", { class: "muted" }, "No live worker: start one with kru worker (or kru serve).")); return; }
      box.replaceChildren(h("table", { id: "workers-table" },
        h("thead", {}, h("tr", {}, ["worker", "device", "memory", "torch", "CUDA", "job", "last heartbeat"].map((t) => h("th", {}, t)))),
        h("tbody", {}, page.items.map((w) => h("tr", {},
          h("td", {}, w.name), h("td", {}, w.device_name ? `${w.device} (${w.device_name})` : w.device),
          h("td", {}, w.memory_bytes ? `${(w.memory_bytes / 2 ** 30).toFixed(1)} GiB` : "–"),
          h("td", {}, w.torch_version), h("td", {}, w.cuda_version || "none"),
          h("td", {}, w.job_id ? h("a", { href: `#/jobs/${w.job_id}` }, w.job_id.slice(0, 8)) : "idle"),
          h("td", {}, `${seconds((Date.now() - Date.parse(w.heartbeat_at)) / 1000)} ago`))))));
    } catch (err) { showError(box, err); }
  }
  await refresh();
  every(3000, refresh);
}

// --- router ------------------------------------------------------------------------------------

async function route() {
  cleanups.forEach((fn) => fn());
  cleanups = [];
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("nav a").forEach((a) => a.toggleAttribute("aria-current", a.getAttribute("href") === `#/${parts[0]}`));
  main.replaceChildren(h("p", { class: "muted" }, "loading…"));
  if (parts[0] === "jobs" && parts[1]) return jobPage(parts[1]);
  if (parts[0] === "models" && parts[1]) return modelPage(parts[1]);
  const pages = { jobs: () => jobsPage(params), new: newJobPage, compare: () => comparePage(params), models: modelsPage, datasets: datasetsPage, workers: workersPage };
  return (pages[parts[0]] || pages.jobs)();
}

window.addEventListener("hashchange", route);
route();
