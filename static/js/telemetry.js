// Live per-GPU charts of one reservation (templates/portal/_telemetry.html). On load: the last hour
// of per-minute rollups from the REST API; then one frame per node per second from
// /ws/reservations/<id>/. Four uPlot charts (static/vendor/uplot) share one time axis; the table of
// latest readings is updated in place. Redraws are batched: at most a few a second, in an animation
// frame. The root carries data-telemetry-live="on" while the socket is open and data-frames (live
// frames applied) for tests.
(function () {
  "use strict";
  const root = document.querySelector("[data-telemetry]");
  if (!root) return;

  const WINDOW = 3600; // seconds shown (and kept, plus a minute of margin)
  const GAP = 180; // a GPU silent this long gets a break in its lines
  const HEIGHT = 200; // chart height in CSS pixels, axes included
  const LEGEND_MAX = 16; // more GPUs than this: the table's swatches are the legend
  const STALE = 30; // a reading older than this (seconds) is shown muted
  const STOP_CODES = new Set([4401, 4403, 4404]); // not allowed: do not retry

  const gib = (mib) => (mib == null ? undefined : mib / 1024);
  // Numbers may be null, missing, or (Decimals from the API) strings.
  const num = (v) => (v === null || v === undefined || v === "" || !Number.isFinite(+v) ? undefined : +v);
  const utc = (t) => new Date(t * 1000).toISOString(); // "YYYY-MM-DDTHH:MM:SS.sssZ"
  const hhmm = (t) => utc(t).slice(11, 16);
  const hhmmss = (t) => utc(t).slice(11, 19);
  const round = (v) => String(Math.round(v));

  // One entry per chart. `live` reads a WebSocket GPU reading, `rollup` a per-minute history row.
  const METRICS = [
    { key: "util", unit: "%", live: (r) => num(r.DCGM_FI_DEV_GPU_UTIL), rollup: (r) => num(r.util_mean),
      range: () => [0, 100], fmt: round },
    { key: "power", unit: "W", live: (r) => num(r.DCGM_FI_DEV_POWER_USAGE), rollup: (r) => num(r.power_mean),
      range: (u, min, max) => [0, niceCeil(max, 100)], fmt: round },
    { key: "mem", unit: "GiB", live: (r) => gib(num(r.DCGM_FI_DEV_FB_USED)), rollup: (r) => gib(num(r.fb_used_max)),
      range: (u, min, max) => [0, niceCeil(max, 8)], fmt: (v) => v.toFixed(1) },
    { key: "temp", unit: "°C", live: (r) => num(r.DCGM_FI_DEV_GPU_TEMP), rollup: (r) => num(r.temp_max),
      range: (u, min, max) => [min == null ? 20 : Math.max(0, Math.floor((min - 5) / 10) * 10),
        max == null ? 90 : Math.ceil((max + 5) / 10) * 10], fmt: round },
  ];
  const KEYS = METRICS.map((m) => m.key);

  function niceCeil(max, floor) {
    if (max == null || max <= 0) return floor;
    const step = 10 ** Math.floor(Math.log10(max * 1.1)) / 2;
    return Math.max(floor, Math.ceil((max * 1.1) / step) * step);
  }

  // Eight distinct colours that read well on the dark panels, then golden-angle hues (up to 64 GPUs
  // and beyond stay distinguishable enough, with lightness alternating between neighbours).
  const BASE = ["#7c9cff", "#3ecf8e", "#f5b041", "#e879f9", "#22d3ee", "#f87171", "#a3e635", "#fb923c"];
  const colour = (i) => BASE[i] ?? `hsl(${Math.round((i * 137.508 + 20) % 360)}, 70%, ${i % 2 ? 70 : 58}%)`;

  // --- State. One shared time axis `xs` (Unix seconds, ascending); each GPU holds one array per
  // metric aligned with it. `undefined` = no reading at that time (lines join across it), `null` =
  // a break (uPlot's convention).
  const xs = [];
  const gpus = [];
  const byUuid = new Map();
  const tbody = root.querySelector("[data-telemetry-table] tbody");
  const chartsBox = root.querySelector("[data-telemetry-charts]");
  const statusEl = root.querySelector("[data-telemetry-status]");
  let charts = [];
  let rebuild = true; // the set of GPUs changed: (re)create the charts at the next draw
  let offset = null; // browser clock minus the agents' clock (s), smallest seen: latency + skew
  let xMax = Date.now() / 1000;
  let frames = 0;

  function addGpu(uuid, node, index) {
    let g = byUuid.get(uuid);
    if (g && g.node === "?" && node) { // first seen in a rollup of a GPU the API did not list
      Object.assign(g, { node, index: index ?? g.index, label: `${node}#${index ?? g.index}` });
      g.row.querySelector("code").textContent = g.label;
      rebuild = true;
    }
    if (g) return g;
    let row = tbody.querySelector(`tr[data-gpu="${CSS.escape(uuid)}"]`);
    node = node ?? row?.dataset.gpuNode ?? "?";
    index = index ?? num(row?.dataset.gpuIndex) ?? "?";
    g = { uuid, node, index: Number.isFinite(+index) ? +index : index, label: `${node}#${index}`, lastT: null,
      last: null, fresh: false, ys: Object.fromEntries(KEYS.map((k) => [k, new Array(xs.length).fill(undefined)])) };
    g.row = row || makeRow(g);
    g.cells = Object.fromEntries([...g.row.querySelectorAll("[data-field]")].map((td) => [td.dataset.field, td]));
    g.swatch = g.row.querySelector(".swatch");
    gpus.push(g);
    byUuid.set(uuid, g);
    rebuild = true;
    return g;
  }

  function makeRow(g) {
    const row = document.createElement("tr");
    Object.assign(row.dataset, { gpu: g.uuid, gpuNode: g.node, gpuIndex: g.index });
    row.innerHTML = '<th scope="row"><span class="swatch" aria-hidden="true"></span><code></code></th>' +
      ["util", "power", "mem", "temp", "sm", "at"].map((f) => `<td class="num" data-field="${f}">—</td>`).join("");
    const code = row.querySelector("code");
    code.textContent = g.label;
    code.title = g.uuid;
    tbody.querySelector(".empty-row")?.remove();
    tbody.appendChild(row);
    return row;
  }

  // The row of time t, inserted in order if new (nearly always at the end).
  function rowAt(t) {
    let i = xs.length - 1;
    while (i >= 0 && xs[i] > t) i--;
    if (i >= 0 && xs[i] === t) return i;
    i += 1;
    xs.splice(i, 0, t);
    for (const g of gpus) for (const k of KEYS) g.ys[k].splice(i, 0, undefined);
    return i;
  }

  function put(g, t, values) {
    if (g.lastT !== null && t - g.lastT > GAP) {
      const gap = rowAt(g.lastT + 1);
      for (const k of KEYS) g.ys[k][gap] = null;
    }
    const i = rowAt(t);
    for (const k of KEYS) if (values[k] !== undefined) g.ys[k][i] = values[k];
    if (g.lastT === null || t > g.lastT) g.lastT = t;
  }

  function trim(end) {
    if (!xs.length || xs[0] >= end - WINDOW - 300) return; // in batches: every few minutes at most
    const cutoff = end - WINDOW - 60;
    let n = 0;
    while (n < xs.length && xs[n] < cutoff) n++;
    if (!n) return;
    xs.splice(0, n);
    for (const g of gpus) for (const k of KEYS) g.ys[k].splice(0, n);
  }

  // One telemetry frame (a node's GPUs at one instant): a point per GPU, to the second.
  function applyFrame(frame, live) {
    const at = num(frame?.at);
    if (at === undefined || !Array.isArray(frame.gpus)) return false;
    const t = Math.floor(at);
    for (const r of frame.gpus) {
      if (!r || !r.uuid) continue;
      const g = addGpu(r.uuid, frame.node, r.index);
      const values = {};
      for (const m of METRICS) values[m.key] = m.live(r);
      put(g, t, values);
      if (!g.last || at >= g.last.at) {
        g.last = { at, util: values.util, power: values.power, temp: values.temp,
          used: num(r.DCGM_FI_DEV_FB_USED), total: num(r.DCGM_FI_DEV_FB_TOTAL), sm: num(r.DCGM_FI_DEV_SM_CLOCK) };
        g.fresh = true;
      }
    }
    if (live) offset = Math.min(offset ?? Infinity, Date.now() / 1000 - at);
    if (xs.length && xs[0] < t - WINDOW - 600) trim(t); // a hidden tab does not draw: keep memory flat
    schedule();
    return true;
  }

  // --- Drawing, batched: at most one redraw per MIN_MS, always inside an animation frame.
  let scheduled = false;
  let lastDraw = 0;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    const minMs = gpus.length > 16 ? 1000 : 250; // many series: redraw once a second
    setTimeout(() => requestAnimationFrame(draw), Math.max(0, lastDraw + minMs - performance.now()));
  }

  function draw() {
    scheduled = false;
    lastDraw = performance.now();
    const now = Date.now() / 1000 - (offset ?? 0);
    xMax = Math.max(now, xs.length ? xs[xs.length - 1] : 0);
    trim(xMax);
    if (rebuild) build();
    else charts.forEach((chart, c) => chart.setData(dataOf(METRICS[c])));
    updateTable();
  }

  const dataOf = (m) => [xs, ...gpus.map((g) => g.ys[m.key])];

  function build() {
    rebuild = false;
    gpus.sort((a, b) => (a.node < b.node ? -1 : a.node > b.node ? 1 : a.index - b.index));
    gpus.forEach((g, i) => {
      g.colour = colour(i);
      if (g.swatch) g.swatch.style.background = g.colour;
      tbody.appendChild(g.row); // same order as the series
    });
    charts.forEach((chart) => chart.destroy());
    charts = [];
    if (typeof uPlot !== "function" || !gpus.length) return;
    chartsBox.hidden = false;
    charts = METRICS.map((m) => {
      const box = chartsBox.querySelector(`[data-metric="${m.key}"] .tchart-plot`);
      return new uPlot(options(m, box.clientWidth), dataOf(m), box);
    });
  }

  function options(m, width) {
    const css = getComputedStyle(root);
    const muted = css.getPropertyValue("--muted").trim() || "#8b93a7";
    const line = css.getPropertyValue("--line").trim() || "#2a2f3a";
    const axis = { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
    return {
      width: Math.max(width, 200),
      height: HEIGHT,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"), // ticks fall on UTC minutes
      // Cursors move together across the four charts; no drag-zoom (live data resets the scales).
      cursor: { sync: { key: `telemetry-${root.dataset.telemetry}` }, drag: { x: false, y: false }, focus: { prox: 12 } },
      focus: { alpha: 0.35 }, // the series nearest the cursor stands out
      legend: { show: gpus.length <= LEGEND_MAX, live: true,
        markers: { width: 0, fill: (u, i) => (i ? gpus[i - 1].colour : "transparent") } },
      scales: { x: { time: true, range: () => [xMax - WINDOW, xMax] }, y: { range: m.range } },
      axes: [
        { ...axis, values: (u, splits) => splits.map(hhmm) },
        { ...axis, size: 48, values: (u, splits) => splits.map((v) => (m.key === "mem" ? String(+v.toFixed(1)) : round(v))) },
      ],
      series: [
        { label: "UTC", value: (u, v) => (v == null ? "—" : hhmmss(v)) },
        ...gpus.map((g) => ({ label: g.label, stroke: g.colour, width: 1.5, spanGaps: false,
          value: (u, v) => (v == null ? "—" : `${m.fmt(v)} ${m.unit}`) })),
      ],
    };
  }

  // Resize with the container (one pass per animation frame, whatever the number of events).
  let resizing = false;
  new ResizeObserver(() => {
    if (resizing) return;
    resizing = true;
    requestAnimationFrame(() => {
      resizing = false;
      charts.forEach((chart) => chart.setSize({ width: Math.max(chart.root.parentNode.clientWidth, 200), height: HEIGHT }));
    });
  }).observe(chartsBox);

  const setText = (el, text) => { if (el && el.textContent !== text) el.textContent = text; };

  function updateTable() {
    let total = 0;
    let counted = 0;
    for (const g of gpus) {
      const l = g.last;
      if (!l) continue;
      const stale = xMax - l.at > STALE;
      g.row.classList.toggle("stale", stale);
      if (!stale && l.power !== undefined) { total += l.power; counted += 1; }
      if (!g.fresh) continue;
      g.fresh = false;
      const show = (v, fmt) => (v === undefined ? "—" : fmt(v));
      setText(g.cells.util, show(l.util, (v) => `${round(v)} %`));
      setText(g.cells.power, show(l.power, (v) => `${round(v)} W`));
      setText(g.cells.mem, show(l.used, (v) => `${(v / 1024).toFixed(1)}${l.total ? ` / ${(l.total / 1024).toFixed(1)}` : ""} GiB`));
      setText(g.cells.temp, show(l.temp, (v) => `${round(v)} °C`));
      setText(g.cells.sm, show(l.sm, (v) => `${round(v)} MHz`));
      setText(g.cells.at, hhmmss(l.at));
    }
    const box = root.querySelector("[data-telemetry-power-box]");
    if (box && (counted || !box.hidden)) {
      box.hidden = false;
      const text = !counted ? "—" : total >= 10000 ? `${(total / 1000).toFixed(1)} kW` : `${round(total)} W`;
      setText(root.querySelector("[data-telemetry-power]"), text);
    }
  }

  function setStatus(text) { setText(statusEl, text); }

  // --- Data sources.
  async function loadHistory() {
    try {
      const response = await fetch(root.dataset.telemetryUrl, {
        credentials: "same-origin", headers: { Accept: "application/json" } });
      if ([401, 403, 404].includes(response.status)) return false; // not ours to see: nor is the live feed
      if (!response.ok) throw new Error(String(response.status));
      const body = await response.json();
      for (const g of body.gpus || []) if (g && g.uuid) addGpu(g.uuid, g.node, g.index);
      const rows = (body.rollups || [])
        .map((r) => ({ r, t: Date.parse(r.minute) / 1000 }))
        .filter((x) => x.r && x.r.uuid && Number.isFinite(x.t))
        .sort((a, b) => a.t - b.t);
      for (const { r, t } of rows) {
        const values = {};
        for (const m of METRICS) values[m.key] = m.rollup(r);
        put(addGpu(r.uuid), t, values);
      }
      for (const frame of body.latest || []) applyFrame(frame, false);
      schedule();
    } catch {
      setStatus("History unavailable");
    }
    return true;
  }

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let delay = 1000;
  function connect() {
    const socket = new WebSocket(`${scheme}://${location.host}${root.dataset.telemetryWs}`);
    socket.onopen = () => {
      delay = 1000;
      root.dataset.telemetryLive = "on";
      setStatus("Live");
    };
    socket.onmessage = (message) => {
      let frame;
      try { frame = JSON.parse(message.data); } catch { return; }
      if (frame?.type === "telemetry" && applyFrame(frame, true)) root.dataset.frames = String(++frames);
    };
    socket.onclose = (closing) => {
      root.dataset.telemetryLive = "off";
      if (STOP_CODES.has(closing.code)) { setStatus("Live readings not available"); return; }
      setStatus("Reconnecting…");
      setTimeout(connect, delay + Math.random() * delay); // jittered exponential backoff
      delay = Math.min(delay * 2, 30000);
    };
  }

  // GPUs the server rendered come first, in its order; the history adds any others.
  tbody.querySelectorAll("tr[data-gpu]").forEach((row) => addGpu(row.dataset.gpu));
  setStatus("Loading…");
  loadHistory().then((allowed) => {
    if (!allowed) { setStatus("Live readings not available"); return; }
    if (!root.dataset.telemetryWs) { setStatus("Ended: history only"); return; } // a finished reservation
    if (statusEl.textContent === "Loading…") setStatus("Connecting…");
    connect();
  });
})();
