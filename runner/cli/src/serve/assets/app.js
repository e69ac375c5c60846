// The xlab dashboard: experiments, an experiment's table and curves, one job. Text from the
// store is always set with textContent (never parsed as HTML); the page polls while it is open,
// so finished jobs and growing curves show without reloading.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("xlab-token", params.get("token"));
const TOKEN = sessionStorage.getItem("xlab-token");
const POLL_MS = 1000;
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  return e;
}

async function api(path, query) {
  const q = new URLSearchParams(query || {});
  const headers = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
  const r = await fetch(path + (q.toString() ? "?" + q : ""), { headers });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") {
    if (!isFinite(v)) return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    return Number(v.toPrecision(4)).toString();
  }
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

function route() {
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, query] = h.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query || "") };
}

function go(parts, query) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) if (v) q.set(k, v);
  location.hash = "/" + parts.map(encodeURIComponent).join("/") + (q.toString() ? "?" + q : "");
}

const main = () => document.getElementById("main");
let timer = null;
let renderedKey = "";
// The state of the store the page shows (`/api/running`'s version): a view is read again when it
// changes, or always while a run holds the store.
let renderedVersion = null;

async function show() {
  clearTimeout(timer);
  if (drag) {
    timer = setTimeout(show, POLL_MS);
    return;
  }
  const r = route();
  const key = location.hash;
  try {
    const now = await api("/api/running");
    if (key !== renderedKey || now.live || now.version !== renderedVersion) {
      const fresh = key !== renderedKey;
      if (r.parts[0] === "exp" && r.parts[1]) await experimentView(r.parts[1], r.query, fresh, now);
      else if (r.parts[0] === "job" && r.parts[1]) await jobView(r.parts[1], fresh);
      else if (r.parts[0] === "compare" && r.parts[1] && r.parts[2]) await compareView(r.parts[1], r.parts[2]);
      else await experimentsView();
      renderedKey = key;
      renderedVersion = now.version;
    }
  } catch (e) {
    main().replaceChildren(el("p", { class: "error", id: "error", text: e.message }));
    renderedKey = "";
  }
  timer = setTimeout(show, POLL_MS);
}

async function experimentsView() {
  const data = await api("/api/experiments");
  document.getElementById("where").textContent = data.store;
  document.getElementById("live").hidden = !data.live;
  if (data.experiments.length === 0) {
    main().replaceChildren(el("p", { id: "empty", text: "This store holds no experiments yet. Run one with `xlab run FILE` and it appears here." }));
    return;
  }
  const cards = data.experiments.map((e) => {
    const counts = Object.entries(e.counts).map(([s, n]) => el("span", { class: "status " + s, text: `${n} ${s}` }));
    const stages = e.stages.map((s) => `${s.name} (${s.jobs})`).join(", ");
    const updated = new Date(e.updated_unix * 1000).toLocaleString();
    return el("div", { class: "card experiment" },
      el("h2", {}, el("a", { href: "#/exp/" + encodeURIComponent(e.name), text: e.name })),
      el("div", {}, ...counts),
      el("div", { class: "muted", text: `${e.jobs} job(s): ${stages}` }),
      el("div", { class: "muted", text: `${e.file} · updated ${updated}` }));
  });
  main().replaceChildren(el("h1", { text: "Experiments" }), runningPanel(data.running), el("div", { class: "cards" }, ...cards));
}

// The jobs running now: device, epoch, the latest metrics, the rate and the time left.
function runningPanel(running, only) {
  const jobs = running.filter((r) => !only || r.experiment === only);
  if (jobs.length === 0) return el("div", { id: "running" });
  const eta = (s) => (s === null ? "–" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
  const rows = jobs.map((r) => el("tr", { class: "running-job" },
    el("td", {}, el("a", { href: "#/job/" + r.job, text: `${r.experiment} / ${r.stage}` })),
    el("td", { text: r.label }), el("td", { text: r.device }),
    el("td", { class: "num", text: `${r.epoch}/${r.epochs}` }),
    el("td", { text: Object.entries(r.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join("  ") }),
    el("td", { class: "num", text: `${fmt(r.epochs_per_min)} epochs/min` }),
    el("td", { class: "num", text: eta(r.eta_s) })));
  return el("div", { id: "running" }, el("h2", { text: `Running now (${jobs.length})` }),
    el("table", {}, el("thead", {}, el("tr", {}, ...["job", "point", "device", "epoch", "latest", "rate", "left"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows)));
}

async function experimentView(name, query, fresh, now) {
  const filter = query.get("filter") || "";
  const metrics = query.get("metrics") || "";
  const sort = query.get("sort") || "";
  const grouping = ["group_by", "agg", "compare_to"].some((k) => query.get(k));
  const x = query.get("x") || "";
  // The table first, in the page as soon as it is here; the rest follows.
  // Other experiments shown with this one: their rows in the table, their curves overlaid.
  const withOthers = query.get("with") || "";
  const tableAsked = api("/api/table", { exp: name, with: withOthers, filter, metrics });
  const curvesAsked = api("/api/curves", { exp: name, with: withOthers, filter, metric: query.get("metric") || "", limit: x ? 5000 : 100 });
  const groupedAsked = grouping
    // A mistake in the grouping is shown beside it; the rest of the page stays.
    ? api("/api/grouped", { exp: name, filter, metrics, group_by: query.get("group_by") || "", agg: query.get("agg") || "",
      compare_to: query.get("compare_to") || "", test: query.get("test") || "", gsort: query.get("gsort") || "" })
      .catch((e) => ({ error: e.message }))
    : Promise.resolve(null);
  // A failed request is reported once, by whichever the page waits for first.
  curvesAsked.catch(() => {});
  groupedAsked.catch(() => {});
  const table = await tableAsked;
  document.getElementById("live").hidden = !now.live;
  document.getElementById("where").textContent = name;
  const controls = fresh || !document.getElementById("filter") ? buildControls(name, query, table) : null;
  const slot = (id) => el("div", { id });
  const box = el("div", { id: "results" },
    runningPanel(now.running, name),
    unfinishedNote(table),
    tableOf(name, table, sort, query),
    slot("grouped"),
    el("h2", { id: "curves-title", text: "Curves" }), slot("chart"),
    slot("parallel"), slot("scatter"));
  // A fresh view shows the table at once; a view read again is swapped in whole (no flicker).
  if (controls) {
    main().replaceChildren(el("h1", { text: name }), controls, box);
    performance.mark("xlab:table");
  }
  const [curves, grouped] = await Promise.all([curvesAsked, groupedAsked]);
  const metricSelect = document.getElementById("metric");
  if (metricSelect && curves.metric) metricSelect.value = curves.metric;
  box.querySelector("#curves-title").textContent = curves.metric ? `Curves: ${curves.metric}` : "Curves";
  box.querySelector("#grouped").replaceWith(groupedOf(grouped));
  box.querySelector("#chart").replaceWith(chart(curves, query.get("logy") === "1", Number(query.get("smooth") || 0),
    { x, logx: query.get("logx") === "1", colorBy: query.get("color") || "", dashBy: query.get("dash") || "" }));
  box.querySelector("#parallel").replaceWith(parallelOf(name, table));
  box.querySelector("#scatter").replaceWith(scatterOf(name, table, query));
  if (!controls) document.getElementById("results").replaceWith(box);
  applyBrushes();
  // For the benchmarks (bench/dashboard.py): when each render of the view was in the page.
  performance.mark("xlab:view");
}

// Said above the table when no job of the view has finished: what happened and what to do.
function unfinishedNote(table) {
  const count = (k) => table.rows.reduce((n, r) => n + (r[k] || 0), 0);
  const [jobs, done, running] = [count("jobs"), count("done"), count("running")];
  if (jobs === 0 || done > 0) return null;
  const failed = table.rows.reduce((n, r) => n + (r.jobs - r.done - (r.running || 0) - (r.pruned || 0) - (r.paused || 0)), 0);
  const text = running > 0
    ? `No job has finished yet: ${running} running. Rows fill in as they finish.`
    : `No job has finished: ${failed} of ${jobs} did not (failed, or never ran). A job's page (the links in the table) shows its attempts, ` +
      "their errors and the worker log's tail; fix the cause and run the experiment file again to retry them.";
  return el("p", { class: running > 0 ? "muted" : "error", id: "unfinished", text });
}

function buildControls(name, query, table) {
  const state = () => ({ filter: input.value, metrics: metricsInput.value, metric: metricSelect.value,
    logy: logy.checked ? "1" : "", logx: logx.checked ? "1" : "", sort: query.get("sort") || "", smooth: smooth.value === "0" ? "" : smooth.value,
    group_by: groupBy.value, agg: agg.value, compare_to: compareTo.value, test: test.value === "t" ? "" : test.value,
    gsort: query.get("gsort") || "", x: xSelect.value, color: colorBy.value, dash: dashBy.value, with: withInput.value });
  const input = el("input", { type: "text", id: "filter", placeholder: 'filter, e.g. optimizer.lr < 0.1 and last(val.acc) > 0.9',
    value: query.get("filter") || "" });
  const apply = () => go(["exp", name], state());
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
  const metricsInput = el("input", { type: "text", id: "metrics", placeholder: "metrics (default: test.*)",
    value: query.get("metrics") || "" });
  metricsInput.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
  const metricSelect = el("select", { id: "metric" });
  for (const m of table.all_metrics) {
    const o = el("option", { value: m, text: m });
    if (m === query.get("metric")) o.selected = true;
    metricSelect.append(o);
  }
  metricSelect.addEventListener("change", apply);
  const logy = el("input", { type: "checkbox", id: "logy" });
  logy.checked = query.get("logy") === "1";
  logy.addEventListener("change", apply);
  const logx = el("input", { type: "checkbox", id: "logx" });
  logx.checked = query.get("logx") === "1";
  logx.addEventListener("change", apply);
  const csv = el("button", { id: "csv", text: "CSV", onclick: () => download(name + ".csv", toCsv(lastTable), "text/csv") });
  // Smoothing of the curves: an exponential moving average, debiased at the start (as TensorBoard's).
  const smooth = el("select", { id: "smooth" });
  for (const w of ["0", "0.6", "0.8", "0.9", "0.95"]) {
    const o = el("option", { value: w, text: w === "0" ? "none" : w });
    if ((query.get("smooth") || "0") === w) o.selected = true;
    smooth.append(o);
  }
  smooth.addEventListener("change", apply);
  const text = (id, placeholder, key) => {
    const e = el("input", { type: "text", id, placeholder, value: query.get(key) || "", class: "short" });
    e.addEventListener("keydown", (ev) => { if (ev.key === "Enter") apply(); });
    return e;
  };
  const groupBy = text("group-by", "group by, e.g. optimizer.lr,seed", "group_by");
  const agg = text("agg", "aggregates, e.g. mean(test.acc),ci95(test.acc),iqm(test.acc),count()", "agg");
  const compareTo = text("compare-to", 'compare to a baseline, e.g. step_rule.use == null', "compare_to");
  const test = el("select", { id: "test" }, el("option", { value: "t", text: "paired t" }), el("option", { value: "wilcoxon", text: "Wilcoxon" }));
  test.value = query.get("test") === "wilcoxon" ? "wilcoxon" : "t";
  test.addEventListener("change", apply);
  // The curves against the step or a swept key; coloured and dashed by swept keys.
  const choose = (id, first, options, key) => {
    const e = el("select", { id }, el("option", { value: "", text: first }), ...options.map((k) => el("option", { value: k, text: k })));
    e.value = options.includes(query.get(key)) ? query.get(key) : "";
    e.addEventListener("change", apply);
    return e;
  };
  const numericKeys = table.keys.filter((k) => table.rows.some((r) => typeof r.point[k] === "number"));
  const xSelect = choose("x", "step", numericKeys, "x");
  const groupKeys = [...(table.experiments.length > 1 ? ["experiment"] : []), "stage", ...table.keys];
  const colorBy = choose("color-by", "each curve", groupKeys, "color");
  const dashBy = choose("dash-by", "solid", groupKeys, "dash");
  const withInput = text("with", "with other experiments, e.g. sweep-b,sweep-c", "with");
  const plotName = () => `${name}-${metricSelect.value}`;
  return el("div", {},
    el("div", { class: "controls" }, input, el("button", { id: "apply", text: "Apply", onclick: apply }),
      metricsInput, el("label", {}, "curve ", metricSelect), el("label", {}, logy, " log y"), el("label", {}, logx, " log x"),
      el("label", {}, "smoothing ", smooth), el("label", {}, "x ", xSelect), el("label", {}, "colour ", colorBy),
      el("label", {}, "line ", dashBy), csv,
      el("button", { id: "svg", text: "SVG", onclick: () => download(plotName() + ".svg", chartSvgText(), "image/svg+xml") }),
      el("button", { id: "png", text: "PNG", onclick: () => chartPng(plotName() + ".png") })),
    el("div", { class: "controls" }, groupBy, agg, compareTo, test,
      el("button", { id: "group", text: "Group", onclick: apply })),
    el("div", { class: "controls" }, withInput, el("button", { id: "overlay", text: "Show with", onclick: apply })));
}

// The grouped table (`xlab query --group-by … --agg … --compare-to …`): the cells as the
// command prints them.
function groupedOf(data) {
  if (!data) return el("div", { id: "grouped" });
  if (data.error) return el("div", { id: "grouped" }, el("p", { class: "error", id: "grouped-error", text: data.error }));
  const head = el("tr", {}, ...data.header.map((h) => el("th", { text: h })));
  const body = data.cells.map((row) => el("tr", {}, ...row.map((c, i) => el("td", { class: i < data.keys ? "" : "num", text: c }))));
  return el("div", { id: "grouped" }, el("h2", { text: "Grouped" }),
    el("table", { id: "grouped-table" }, el("thead", {}, head), el("tbody", {}, ...body)));
}

// The curves' SVG as a file: its styles written into it, so it looks the same outside the page.
function chartSvgText() {
  const node = document.querySelector("#chart svg");
  if (!node) return "";
  const copy = node.cloneNode(true);
  copy.setAttribute("xmlns", SVG);
  copy.insertBefore(svg("rect", { x: 0, y: 0, width: copy.getAttribute("width"), height: copy.getAttribute("height"), fill: "#fff" }), copy.firstChild);
  for (const t of copy.querySelectorAll("text")) { t.setAttribute("font-size", "11"); t.setAttribute("fill", "#6b7280"); t.setAttribute("font-family", "sans-serif"); }
  return new XMLSerializer().serializeToString(copy);
}

// The curves as a PNG at twice their size, drawn from the same SVG in a canvas.
function chartPng(name) {
  const text = chartSvgText();
  if (!text) return;
  const img = new Image();
  img.onload = () => {
    const c = document.createElement("canvas");
    c.width = img.width * 2;
    c.height = img.height * 2;
    const ctx = c.getContext("2d");
    ctx.scale(2, 2);
    ctx.drawImage(img, 0, 0);
    c.toBlob((blob) => download(name, blob, "image/png"), "image/png");
  };
  img.src = "data:image/svg+xml;base64," + btoa(unescape(encodeURIComponent(text)));
}

// Exponential moving average with TensorBoard's debiasing: the first points are not pulled to 0.
function ema(values, w) {
  if (!w) return values;
  let last = 0, weight = 0;
  return values.map((v) => {
    last = last * w + (1 - w) * v;
    weight = weight * w + (1 - w);
    return last / weight;
  });
}

let lastTable = null;
// The run table shown now: its rows in their order, which of them to keep (the brushes), and how
// many to show (a page at a time: 20,000 rows in the page would hold it up for seconds).
const PAGE = 100;
let tableView = null;

function tableOf(name, data, sort, query) {
  lastTable = data;
  tableView = null;
  if (data.rows.length === 0) {
    return el("p", { id: "no-rows", class: "muted", text: "No job matches this filter." });
  }
  const rows = data.rows.slice();
  if (sort) {
    const desc = sort.startsWith("-");
    const key = desc ? sort.slice(1) : sort;
    const val = (r) => (key in r.point ? r.point[key] : r.metrics[key] ? r.metrics[key].mean : null);
    rows.sort((a, b) => {
      const x = val(a), y = val(b);
      if (x === y) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * (desc ? -1 : 1);
    });
  }
  const sortBy = (k) => () => {
    const next = sort === k ? "-" + k : k;
    const q = Object.fromEntries(query.entries());
    q.sort = next;
    go(["exp", name], q);
  };
  const several = data.experiments.length > 1;
  const head = el("tr", {}, ...(several ? [el("th", { text: "experiment" })] : []), el("th", { text: "stage" }),
    ...data.keys.map((k) => el("th", { text: k, onclick: sortBy(k) })),
    ...data.metrics.map((m) => el("th", { text: m + " (mean ± std)", onclick: sortBy(m) })),
    el("th", { text: "seeds" }));
  const body = el("tbody");
  const more = el("div", { id: "table-more", class: "muted" });
  tableView = { data, rows, index: new Map(data.rows.map((r, i) => [r, i])), body, more, shown: PAGE, keep: null };
  fillTable();
  return el("div", { id: "table-box" }, el("table", { id: "table" }, el("thead", {}, head), body), more);
}

function tableRow(data, r, index) {
  const seeds = r.done === r.jobs ? String(r.done)
    : r.pruned === r.jobs ? "pruned"
    : `${r.done}/${r.jobs} done` + (r.running ? `, ${r.running} running` : "") + (r.pruned ? `, ${r.pruned} pruned` : "");
  const link = r.ids.length === 1 ? el("a", { href: "#/job/" + r.ids[0], text: r.stage }) : r.stage;
  // Each seed's job, one link each.
  const jobs = r.ids.length > 1 ? r.ids.map((id, i) => el("a", { href: "#/job/" + id, class: "seed", title: id, text: String(i + 1) })) : [];
  const exp = data.experiments.length > 1 ? [el("td", { class: "experiment", text: r.experiment })] : [];
  return el("tr", { class: "row", "data-row": String(index) }, ...exp, el("td", {}, link),
    ...data.keys.map((k) => el("td", { class: "num", text: k in r.point ? fmt(r.point[k]) : "–" })),
    ...data.metrics.map((m) => {
      const s = r.metrics[m];
      const text = !s ? "–" : s.std === null ? fmt(s.mean) : `${fmt(s.mean)} ± ${fmt(s.std)}`;
      return el("td", { class: "num", "data-metric": m, "data-mean": s ? String(s.mean) : "", text });
    }),
    el("td", { class: "num" }, seeds, ...jobs.flatMap((a) => [" ", a])));
}

// Shows the first rows of the table that the brushes keep, as many as asked.
function fillTable() {
  const t = tableView;
  if (!t) return;
  const out = [];
  let kept = 0;
  for (const r of t.rows) {
    const i = t.index.get(r);
    if (t.keep && !t.keep[i]) continue;
    kept += 1;
    if (out.length < t.shown) out.push(tableRow(t.data, r, i));
  }
  t.body.replaceChildren(...out);
  const showMore = (n) => () => { t.shown = n; fillTable(); };
  t.more.replaceChildren(...(kept > out.length
    ? [`${out.length.toLocaleString()} of ${kept.toLocaleString()} rows shown `,
      el("button", { id: "more-rows", text: `${Math.min(PAGE, kept - out.length)} more`, onclick: showMore(t.shown + PAGE) }), " ",
      el("button", { id: "all-rows", text: "all", onclick: showMore(Infinity) })]
    : []));
}

const DASHES = ["", "6 3", "2 3", "8 3 2 3", "12 4"];

// The final value of each curve against a swept key: one line per value of the other keys.
function againstKey(groups, key) {
  const lines = new Map();
  for (const g of groups) {
    const xv = g.point[key];
    if (typeof xv !== "number" || g.mean.length === 0) continue;
    const rest = Object.fromEntries(Object.entries(g.point).filter(([k]) => k !== key));
    const id = JSON.stringify([g.experiment, g.stage, rest]);
    if (!lines.has(id)) lines.set(id, { experiment: g.experiment, stage: g.stage, point: rest, seeds: g.seeds, pts: [] });
    lines.get(id).pts.push([xv, g.mean[g.mean.length - 1], g.std[g.std.length - 1]]);
  }
  return [...lines.values()].map((l) => {
    l.pts.sort((a, b) => a[0] - b[0]);
    return { experiment: l.experiment, stage: l.stage, point: l.point, seeds: l.seeds, steps: l.pts.map((p) => p[0]), mean: l.pts.map((p) => p[1]), std: l.pts.map((p) => p[2]) };
  });
}

function chart(data, logy, smoothing, opts) {
  const started = performance.now();
  try {
    return drawChart(data, logy, smoothing, opts || {});
  } finally {
    performance.measure("xlab:chart", { start: started });
  }
}

function drawChart(data, logy, smoothing, opts) {
  const W = 760, H = 320, L = 56, R = 12, T = 12, B = 30;
  const box = el("div", { id: "chart" });
  const s = svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  const smoothed = data.groups.map((g) => (smoothing
    ? { ...g, mean: ema(g.mean, smoothing), std: ema(g.std, smoothing) }
    : g));
  const groups = opts.x ? againstKey(smoothed, opts.x) : smoothed;
  const several = (data.experiments || []).length > 1;
  if (groups.length === 0) {
    box.append(el("p", { class: "muted", text: data.metric ? `No job has logged ${data.metric} yet.` : "No job has logged a metric yet." }));
    return box;
  }
  let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
  const ty = (v) => (logy ? Math.log10(v) : v);
  // A log x axis (steps, or a swept learning rate) leaves out x ≤ 0.
  const logx = !!opts.logx;
  const tx = (v) => (logx ? Math.log10(v) : v);
  const okx = (v) => !logx || v > 0;
  for (const g of groups) {
    g.steps.forEach((x, i) => {
      if (!okx(x)) return;
      xmin = Math.min(xmin, tx(x)); xmax = Math.max(xmax, tx(x));
      for (const v of [g.mean[i] - g.std[i], g.mean[i] + g.std[i]]) {
        if (logy && v <= 0) continue;
        ymin = Math.min(ymin, ty(v)); ymax = Math.max(ymax, ty(v));
      }
    });
  }
  if (xmax === xmin) { xmax += 1; }
  if (!(ymax > ymin)) { ymax = ymin + 1; }
  const X = (x) => L + ((tx(x) - xmin) / (xmax - xmin)) * (W - L - R);
  const Y = (y) => T + (1 - (ty(y) - ymin) / (ymax - ymin)) * (H - T - B);
  s.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9ca3af" }));
  s.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#9ca3af" }));
  for (let k = 0; k <= 4; k++) {
    const yv = ymin + (k / 4) * (ymax - ymin);
    const y = T + (1 - k / 4) * (H - T - B);
    s.append(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end", text: fmt(logy ? Math.pow(10, yv) : yv) }));
  }
  // Steps are whole numbers: ticks at whole steps, each once; a swept key's values as they are.
  const xticks = new Set();
  for (let k = 0; k <= 4; k++) {
    const xv = logx ? Math.pow(10, xmin + (k / 4) * (xmax - xmin)) : xmin + (k / 4) * (xmax - xmin);
    xticks.add(opts.x ? xv : Math.max(logx ? 1 : -Infinity, Math.round(xv)));
  }
  for (const xv of xticks) s.append(svg("text", { x: X(xv), y: H - 10, "text-anchor": "middle", text: fmt(xv) }));
  if (opts.x) s.append(svg("text", { x: W - R, y: H - 22, "text-anchor": "end", class: "xlabel", text: `${opts.x} (final value)` }));
  // Colour and dash by a key's value, when asked: the same value, the same colour in every view.
  const by = (key) => {
    if (!key) return null;
    const valueOf = (g) => JSON.stringify(key === "stage" ? g.stage : key === "experiment" ? g.experiment : g.point[key]);
    const values = [...new Set(groups.map(valueOf))];
    return (g) => values.indexOf(valueOf(g));
  };
  const colorOf = by(opts.colorBy), dashOf = by(opts.dashBy);
  const legend = el("div", { class: "legend" });
  groups.forEach((g, i) => {
    const color = PALETTE[(colorOf ? colorOf(g) : i) % PALETTE.length];
    const dash = dashOf ? DASHES[dashOf(g) % DASHES.length] : "";
    const ok = (v) => !logy || v > 0;
    if (g.seeds > 1) {
      const js = g.steps.map((x, j) => j).filter((j) => okx(g.steps[j]));
      const up = js.map((j) => [X(g.steps[j]), Y(Math.max(g.mean[j] + g.std[j], logy ? 1e-300 : -Infinity))]);
      const down = js.map((j) => [X(g.steps[j]), Y(ok(g.mean[j] - g.std[j]) ? g.mean[j] - g.std[j] : g.mean[j])]).reverse();
      s.append(svg("polygon", { points: up.concat(down).map((p) => p.join(",")).join(" "), fill: color, opacity: 0.15, class: "band" }));
    }
    const pts = g.steps.map((x, j) => (ok(g.mean[j]) && okx(x) ? `${X(x)},${Y(g.mean[j])}` : null)).filter(Boolean).join(" ");
    const line = svg("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 1.6, class: "curve" });
    if (dash) line.setAttribute("stroke-dasharray", dash);
    s.append(line);
    const label = [...(several ? [g.experiment] : []), g.stage, ...Object.entries(g.point).map(([k, v]) => `${k}=${fmt(v)}`)].join(" ") + (g.seeds > 1 ? ` (${g.seeds} seeds)` : "");
    // The swatch is a short stretch of the curve itself: its colour and its dashes.
    const swatch = svg("svg", { class: "swatch", width: 22, height: 8, viewBox: "0 0 22 8" });
    swatch.append(svg("line", { x1: 0, y1: 4, x2: 22, y2: 4, stroke: color, "stroke-width": 2, ...(dash ? { "stroke-dasharray": dash } : {}) }));
    legend.append(el("span", {}, swatch, label));
  });
  box.append(s, legend);
  if (data.more) {
    box.append(el("p", { class: "muted", id: "curves-more",
      text: `The curves of the first ${data.groups.length} rows with ${data.metric}, of ${data.rows.toLocaleString()} rows; narrow the filter to see others.` }));
  }
  return box;
}

// Two jobs side by side, of any experiments: only the config keys and final metrics that differ.
async function compareView(a, b) {
  const data = await api("/api/compare", { a, b });
  const who = (j) => el("a", { href: "#/job/" + j.id, text: `${j.experiment} / ${j.stage} / ${j.id.slice(0, 12)} (${j.status})` });
  const tableOf = (id, header, rows, none) => (rows.length === 0 ? el("p", { class: "muted", text: none })
    : el("table", { id }, el("thead", {}, el("tr", {}, ...header.map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c, i) => el("td", { class: i ? "num" : "", text: c })))))));
  document.getElementById("where").textContent = "compare";
  main().replaceChildren(el("h1", { text: "Two jobs" }),
    el("p", {}, "a: ", who(data.a)), el("p", {}, "b: ", who(data.b)),
    el("h2", { text: "Config keys that differ" }), tableOf("compare-config", ["key", "a", "b"], data.config, "The same config."),
    el("h2", { text: "Final metrics that differ" }), tableOf("compare-metrics", ["metric", "a", "b", "b − a"], data.metrics, "The same final metrics."));
}

async function jobView(id, fresh) {
  const data = await api("/api/job", { id });
  // A finished job does not change: its page stays as it is (and what is typed in it).
  if (!fresh && !data.running && document.getElementById("job-status")) return;
  const j = data.job;
  document.getElementById("where").textContent = `${j.experiment} / ${j.stage} / ${j.id}`;
  const pairs = (obj) => el("dl", {}, ...Object.entries(obj).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmt(v) })]));
  const flatten = (obj) => {
    const flat = {};
    (function walk(prefix, v) {
      if (v && typeof v === "object" && !Array.isArray(v)) for (const [k, x] of Object.entries(v)) walk(prefix ? prefix + "." + k : k, x);
      else flat[prefix] = v;
    })("", obj);
    return flat;
  };
  const flat = flatten(j.config);
  const attempts = (j.attempts || []).map((a) => el("li", { text: `#${a.number} on ${a.device || "?"}: ${a.outcome || "running"}${a.error ? " — " + a.error : ""}` }));
  const files = data.files.map((f) => {
    const href = "/api/artifact?" + new URLSearchParams({ id: j.id, path: f.path, ...(TOKEN ? { token: TOKEN } : {}) });
    const item = el("li", { class: "file" }, el("a", { href, text: f.path }), ` (${f.bytes.toLocaleString()} bytes`,
      f.sha256 ? el("span", { class: "sha", title: f.sha256, text: `, sha256 ${f.sha256.slice(0, 16)}…` }) : "", ")");
    if (f.path.endsWith(".png")) item.append(el("div", {}, el("img", { src: href, alt: f.path, class: "artifact" })));
    return item;
  });
  const decisions = data.decisions.map((d) => el("li", { text: `${d.seq} ${d.kind} at epoch ${d.epoch}` + (d.value !== undefined ? ` (${fmt(d.value)})` : "") }));
  const other = el("input", { type: "text", id: "compare-with", placeholder: "another job's id (any experiment)", class: "short" });
  const compare = () => { if (other.value.trim()) go(["compare", j.id, other.value.trim()]); };
  other.addEventListener("keydown", (e) => { if (e.key === "Enter") compare(); });
  main().replaceChildren(
    el("h1", { text: `Job ${j.id}` }),
    el("div", { class: "controls" }, other, el("button", { id: "compare", text: "Compare with…", onclick: compare })),
    el("p", {}, el("a", { href: "#/exp/" + encodeURIComponent(j.experiment), text: "← " + j.experiment }),
      ` · stage ${j.stage} · seed ${j.seed} · `, el("span", { class: "status " + j.status, id: "job-status", text: j.status })),
    el("h2", { text: "Sweep point" }), pairs(Object.fromEntries(j.point)),
    el("h2", { text: "Metrics (last value)" }), pairs(j.last || {}),
    el("h2", { text: "Config" }), pairs(flat),
    el("h2", { text: "Provenance" }), el("div", { id: "provenance" }, pairs(flatten(j.provenance || {}))),
    el("h2", { text: "Attempts" }), el("ul", {}, ...attempts),
    data.decisions.length ? el("h2", { text: "Search decisions" }) : null,
    data.decisions.length ? el("ul", {}, ...decisions) : null,
    el("h2", { text: "Files" }), el("ul", {}, ...files),
    el("h2", { text: "Worker log (tail)" }), el("pre", { text: data.log || "(no log)" }));
}

// Brushes of the parallel-coordinates view, per experiment: axis → [from, to] in the plot's
// pixels; and the brush being dragged, if any (the page does not redraw under it).
const brushes = {};
let drag = null;
// Applies the brushes of the parallel coordinates shown now (to its lines and to the table).
let applyBrushes = () => {};
window.addEventListener("mousemove", (e) => { if (drag) drag.move(e); });
window.addEventListener("mouseup", (e) => { if (drag) { drag.up(e); drag = null; } });

// Parallel coordinates over the swept keys and the table's first metric, a line per row. Dragging
// along an axis keeps the rows inside the range (lines dimmed, table rows hidden); a click on the
// axis clears it.
function parallelOf(name, table) {
  const metric = table.metrics[0];
  const axes = [...table.keys, ...(metric ? [metric] : [])];
  const box = el("div", { id: "parallel" }, el("h2", { text: "Parallel coordinates" }));
  applyBrushes = () => {};
  if (axes.length < 2 || table.rows.length === 0) {
    box.append(el("p", { class: "muted", text: "Needs a sweep over at least one key, and a metric." }));
    return box;
  }
  const value = (r, a) => (a === metric ? (r.metrics[a] ? r.metrics[a].mean : null) : r.point[a]);
  // Each axis: numbers on a linear scale, anything else as evenly spaced categories.
  const scales = axes.map((a) => {
    const vs = table.rows.map((r) => value(r, a)).filter((v) => v !== null && v !== undefined);
    if (vs.every((v) => typeof v === "number")) {
      let lo = Infinity, hi = -Infinity;
      for (const v of vs) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      return { a, num: true, lo, hi: hi > lo ? hi : lo + 1 };
    }
    const cats = [...new Set(vs.map((v) => JSON.stringify(v)))];
    return { a, num: false, cats };
  });
  const W = Math.max(420, 150 * axes.length), H = 300, T = 24, B = 30, L = 40, R = 40;
  const xAt = (i) => L + (i / (axes.length - 1)) * (W - L - R);
  const pos = (sc, v) => {
    if (v === null || v === undefined) return null;
    const f = sc.num ? (v - sc.lo) / (sc.hi - sc.lo) : sc.cats.length > 1 ? sc.cats.indexOf(JSON.stringify(v)) / (sc.cats.length - 1) : 0.5;
    return T + (1 - f) * (H - T - B);
  };
  const mine = (brushes[name] = brushes[name] || {});
  const inside = (r) => scales.every((sc) => {
    const b = mine[sc.a];
    if (!b) return true;
    const y = pos(sc, value(r, sc.a));
    if (y === null) return false;
    const lo = Math.min(b[0], b[1]), hi = Math.max(b[0], b[1]);
    return y >= lo && y <= hi;
  });
  // The lines on a canvas (a line each for 10^4 rows is too many for SVG), the axes and their
  // brushes in an SVG over it.
  const wrap = el("div", { class: "pc-wrap" });
  wrap.style.width = W + "px";
  wrap.style.height = H + "px";
  const canvas = el("canvas", { class: "pc-lines" });
  const ratio = window.devicePixelRatio || 1;
  canvas.width = W * ratio;
  canvas.height = H * ratio;
  canvas.style.width = W + "px";
  canvas.style.height = H + "px";
  const s = svg("svg", { class: "pc-axes", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  wrap.append(canvas, s);
  const paths = table.rows.map((r) => scales.map((sc, i) => [xAt(i), pos(sc, value(r, sc.a))]).filter((p) => p[1] !== null));
  const drawLines = (keep) => {
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.lineWidth = 1.2;
    // The rows left out first, dimmed; the kept ones over them.
    for (const [pass, colour] of [[false, "rgba(209, 213, 219, 0.5)"], [true, "rgba(37, 99, 235, 0.7)"]]) {
      ctx.strokeStyle = colour;
      ctx.beginPath();
      paths.forEach((pts, k) => {
        if (keep[k] !== pass || pts.length === 0) return;
        ctx.moveTo(pts[0][0], pts[0][1]);
        for (let j = 1; j < pts.length; j++) ctx.lineTo(pts[j][0], pts[j][1]);
      });
      ctx.stroke();
    }
  };
  const apply = () => {
    const started = performance.now();
    const keep = table.rows.map(inside);
    const kept = keep.reduce((n, k) => n + (k ? 1 : 0), 0);
    drawLines(keep);
    if (tableView && tableView.data === table) {
      tableView.keep = kept === keep.length ? null : keep;
      fillTable();
    }
    count.textContent = Object.keys(mine).length ? `${kept} of ${table.rows.length} rows in the brushed ranges` : "";
    performance.measure("xlab:brush", { start: started });
  };
  applyBrushes = apply;
  scales.forEach((sc, i) => {
    const x = xAt(i);
    s.append(svg("line", { x1: x, y1: T, x2: x, y2: H - B, stroke: "#6b7280" }));
    s.append(svg("text", { x, y: H - 10, "text-anchor": "middle", text: sc.a }));
    const ends = sc.num ? [fmt(sc.hi), fmt(sc.lo)] : [sc.cats[sc.cats.length - 1], sc.cats[0]];
    s.append(svg("text", { x: x + 4, y: T - 6, text: ends[0] }));
    const band = svg("rect", { x: x - 8, width: 16, y: 0, height: 0, fill: "#2563eb", opacity: 0.2, class: "brush" });
    const hit = svg("rect", { x: x - 12, y: T, width: 24, height: H - T - B, fill: "transparent", class: "axis", "data-axis": sc.a });
    const draw = () => {
      const b = mine[sc.a];
      band.setAttribute("y", b ? Math.min(b[0], b[1]) : 0);
      band.setAttribute("height", b ? Math.abs(b[1] - b[0]) : 0);
    };
    const yOf = (e) => {
      const box = s.getBoundingClientRect();
      return Math.max(T, Math.min(H - B, ((e.clientY - box.top) / box.height) * H));
    };
    hit.addEventListener("mousedown", (e) => {
      e.preventDefault();
      const from = yOf(e);
      drag = {
        move: (ev) => {
          const y = yOf(ev);
          if (Math.abs(y - from) > 2) mine[sc.a] = [from, y];
          draw();
          apply();
        },
        up: (ev) => {
          if (Math.abs(yOf(ev) - from) <= 2) delete mine[sc.a];
          draw();
          apply();
        },
      };
    });
    s.append(band, hit);
    draw();
  });
  const count = el("div", { id: "brushed", class: "muted" });
  box.append(wrap, count);
  return box;
}

// Lower is better for these; higher for the rest.
const lowerIsBetter = (m) => /(loss|ece|error|fid|nfe|time|seconds|passes|swd|mmd|(^|\.)fd$|_s$)/.test(m.toLowerCase());

// Marks `p.front` on the points no other point beats: as good in x and y, and better in one.
// `gx`, `gy`: 1 where higher is better, -1 where lower is. Sorted by x, best first, one pass.
function paretoMark(pts, gx, gy) {
  const order = pts.slice().sort((a, b) => gx * b.x - gx * a.x || gy * b.y - gy * a.y);
  let best = -Infinity; // the best y of the points with a better x
  for (let i = 0; i < order.length;) {
    let j = i;
    while (j < order.length && order[j].x === order[i].x) j++;
    const top = gy * order[i].y; // the best y among those with this x
    for (let k = i; k < j; k++) order[k].front = gy * order[k].y > best && gy * order[k].y >= top;
    best = Math.max(best, top);
    i = j;
  }
}

// Two metrics of every row (means over seeds) against each other, the Pareto front marked:
// the rows no other row beats on both.
function scatterOf(name, table, query) {
  const names = table.all_metrics;
  if (names.length === 0) return el("div", { id: "scatter" });
  const pick = (k, fallback) => (names.includes(query.get(k)) ? query.get(k) : fallback);
  const sx = pick("sx", table.metrics[0] || names[0]);
  const sy = pick("sy", table.metrics.find((m) => m !== sx && m.includes("worst")) || table.metrics.find((m) => m !== sx) || names[0]);
  const select = (id, value) => {
    const s = el("select", { id });
    for (const m of names) {
      const o = el("option", { value: m, text: m });
      if (m === value) o.selected = true;
      s.append(o);
    }
    s.addEventListener("change", () => {
      const q = Object.fromEntries(query.entries());
      q[id] = s.value;
      go(["exp", name], q);
    });
    return s;
  };
  const pts = table.rows
    .filter((r) => r.metrics[sx] && r.metrics[sy])
    .map((r) => ({ x: r.metrics[sx].mean, y: r.metrics[sy].mean, r }));
  paretoMark(pts, lowerIsBetter(sx) ? -1 : 1, lowerIsBetter(sy) ? -1 : 1);
  const box = el("div", { id: "scatter" }, el("h2", { text: "Scatter" }),
    el("div", { class: "controls" }, el("label", {}, "x ", select("sx", sx)), el("label", {}, "y ", select("sy", sy)),
      el("span", { class: "muted", text: `(${lowerIsBetter(sx) ? "lower" : "higher"} x and ${lowerIsBetter(sy) ? "lower" : "higher"} y are better; the Pareto front is joined)` })));
  if (pts.length === 0) {
    box.append(el("p", { class: "muted", text: `No row has both ${sx} and ${sy}.` }));
    return box;
  }
  const W = 520, H = 360, L = 60, R = 14, T = 12, B = 34;
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const p of pts) { x0 = Math.min(x0, p.x); x1 = Math.max(x1, p.x); y0 = Math.min(y0, p.y); y1 = Math.max(y1, p.y); }
  if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const s = svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  s.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9ca3af" }));
  s.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#9ca3af" }));
  for (let k = 0; k <= 4; k++) {
    s.append(svg("text", { x: L - 6, y: Y(y0 + (k / 4) * (y1 - y0)) + 4, "text-anchor": "end", text: fmt(y0 + (k / 4) * (y1 - y0)) }));
    s.append(svg("text", { x: X(x0 + (k / 4) * (x1 - x0)), y: H - 16, "text-anchor": "middle", text: fmt(x0 + (k / 4) * (x1 - x0)) }));
  }
  s.append(svg("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", text: sx }));
  s.append(svg("text", { x: L + 6, y: T + 10, text: sy }));
  const front = pts.filter((p) => p.front).sort((a, b) => a.x - b.x);
  s.append(svg("polyline", { points: front.map((p) => `${X(p.x)},${Y(p.y)}`).join(" "), fill: "none", stroke: "#dc2626", "stroke-width": 1.2, class: "front" }));
  for (const p of pts) {
    const c = svg("circle", { cx: X(p.x), cy: Y(p.y), r: p.front ? 5 : 3.5, fill: p.front ? "#dc2626" : "#2563eb", opacity: 0.8, class: p.front ? "point pareto" : "point" });
    const label = [p.r.experiment, p.r.stage, ...Object.entries(p.r.point).map(([k, v]) => `${k}=${fmt(v)}`)].join(" ");
    c.append(svg("title", { text: `${label}\n${sx} ${fmt(p.x)}, ${sy} ${fmt(p.y)}` }));
    s.append(c);
  }
  box.append(s);
  return box;
}

function toCsv(data) {
  if (!data) return "";
  const q = (s) => (/[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s);
  const header = ["experiment", "stage", ...data.keys, ...data.metrics.flatMap((m) => [m + " mean", m + " std"]), "done", "jobs"];
  const lines = [header.map(q).join(",")];
  for (const r of data.rows) {
    const cells = [r.experiment, r.stage, ...data.keys.map((k) => (k in r.point ? fmt(r.point[k]) : "")),
      ...data.metrics.flatMap((m) => (r.metrics[m] ? [String(r.metrics[m].mean), r.metrics[m].std === null ? "" : String(r.metrics[m].std)] : ["", ""])),
      String(r.done), String(r.jobs)];
    lines.push(cells.map((c) => q(String(c))).join(","));
  }
  return lines.join("\n") + "\n";
}

function download(name, content, type) {
  const blob = content instanceof Blob ? content : new Blob([content], { type });
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

window.addEventListener("hashchange", () => { renderedKey = ""; show(); });
show();
