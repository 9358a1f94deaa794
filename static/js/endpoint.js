// An endpoint's last hour, live (templates/portal/endpoint.html): GET data-metrics-url
// (/api/v1/endpoints/<id>/metrics/) drawn as five uPlot charts (static/vendor/uplot) on one time axis --
// requests/s by outcome, p50/p99 latency, requests in flight, replicas with the autoscaler's scale events
// marked, and the replicas' GPU utilization -- with the numbers of now, the cold starts and the scale
// events beside them, and the cost so far moving by the second.
//
// When it is fetched again: on the tenant feed's events (live.js re-dispatches each as a "tenant-event")
// of this endpoint (endpoint.traffic every few seconds while requests are answered, endpoint.scaled, its
// states) and of its replicas' reservations; and every POLL_MS while the tab is shown, because the
// requests in flight and arriving each second are only in the gateways' Redis counts: nothing pushes
// them, and a request held while an idle endpoint wakes finishes (and is counted) only a minute later.
// Fetches are at least MIN_GAP_MS apart, one at a time. The root carries data-metrics-loaded (documents
// drawn) for tests.
(function () {
  "use strict";
  const root = document.querySelector("[data-endpoint-metrics]");
  if (!root) return;

  const id = root.dataset.endpointMetrics;
  const POLL_MS = 5000;
  const MIN_GAP_MS = 1500;
  const HEIGHT = 190;
  const STOP = new Set([401, 403, 404]);

  const num = (v) => (v === null || v === undefined || v === "" || !Number.isFinite(+v) ? undefined : +v);
  const secs = (iso) => Date.parse(iso) / 1000;
  const utc = (t) => new Date(t * 1000).toISOString();
  const hhmm = (t) => utc(t).slice(11, 16);
  const hhmmss = (t) => utc(t).slice(11, 19);
  const usd = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
  const money = (v) => usd.format(Math.round(v * 100) / 100 || 0);
  const setText = (el, text) => { if (el && el.textContent !== text) el.textContent = text; };
  const now$ = (key) => root.querySelector(`[data-now="${key}"]`);
  const rate = (v) => (v === undefined ? "—" : v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
  const ms = (v) => (v === undefined ? "—" : v >= 100 ? `${v.toFixed(0)} ms` : `${v.toFixed(1)} ms`);
  const took = (s) => (s === undefined ? "—" : s >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`);

  const css = getComputedStyle(root);
  const colour = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const C = { ok: colour("--ok", "#3ecf8e"), warn: colour("--warn", "#f5b041"), bad: colour("--bad", "#ef5b5b"),
    accent: colour("--accent", "#7c9cff"), muted: colour("--muted", "#8b93a7"), line: colour("--line", "#2a2f3a"),
    text: colour("--text", "#e6e8ee") };
  const GPU_COLOURS = ["#7c9cff", "#3ecf8e", "#f5b041", "#e879f9", "#22d3ee", "#f87171", "#a3e635", "#fb923c"];
  const gpuColour = (i) => GPU_COLOURS[i] ?? `hsl(${Math.round((i * 137.508 + 20) % 360)}, 70%, ${i % 2 ? 70 : 58}%)`;

  // --- Turning the document into uPlot's columns. Each series is a list of [t, v] points; `align` puts
  // them on one ascending time axis, `undefined` where a series has no point (its line joins across),
  // `null` where the series says "nothing here" (a break).
  function align(pointLists) {
    const xs = [...new Set(pointLists.flatMap((points) => points.map((p) => p[0])))].sort((a, b) => a - b);
    const at = new Map(xs.map((t, i) => [t, i]));
    const ys = pointLists.map((points) => {
      const column = new Array(xs.length).fill(undefined);
      for (const [t, v] of points) column[at.get(t)] = v;
      return column;
    });
    return [xs, ...ys];
  }

  // A minute's point sits in the middle of what it counted (of the current minute: of its seconds so far).
  const minuteAt = (m) => secs(m.minute) + num(m.seconds) / 2;

  function chartsOf(doc) {
    const minutes = doc.minutes || [];
    const perMinute = (pick) => minutes.map((m) => [minuteAt(m), pick(m)]);
    const live = doc.live;
    const start = live ? secs(live.seconds.start) : null;
    const perSecond = (values) => (live ? values.map((v, i) => [start + i + 0.5, num(v) ?? 0]) : []);
    const perS = (key) => (m) => num(m[key]) / num(m.seconds);
    const steps = (doc.replicas?.steps || []).map((s) => ({ t: secs(s.at), ...s }));
    const stepSeries = (key) => steps.map((s) => [s.t, s[key]]);
    const gpus = doc.gpus || [];
    return {
      requests: {
        data: align([perMinute(perS("ok")), perMinute(perS("client_errors")), perMinute(perS("server_errors")),
          perSecond(live?.seconds.arrivals || [])]),
        series: [
          { label: "answered/s", stroke: C.ok, width: 1.5, spanGaps: true },
          { label: "refused/s (4xx)", stroke: C.warn, width: 1.5, spanGaps: true },
          { label: "failed/s (5xx)", stroke: C.bad, width: 1.5, spanGaps: true },
          { label: "arriving/s (live)", stroke: C.muted, width: 1, spanGaps: true },
        ],
        fmt: rate, range: (u, min, max) => [0, niceCeil(max, 1)],
      },
      latency: {
        data: align([perMinute((m) => num(m.p50_ms) ?? null), perMinute((m) => num(m.p99_ms) ?? null)]),
        series: [
          { label: "p50", stroke: C.accent, width: 1.5 },
          { label: "p99", stroke: C.warn, width: 1.5 },
        ],
        fmt: ms, range: (u, min, max) => [0, niceCeil(max, 10)],
      },
      in_flight: {
        data: align([perMinute((m) => num(m.in_flight)), perSecond(live?.seconds.in_flight || [])]),
        series: [
          { label: "average a minute", stroke: C.accent, width: 1.5, spanGaps: true },
          { label: "each second (live)", stroke: C.muted, width: 1, spanGaps: true },
        ],
        fmt: rate, range: (u, min, max) => [0, niceCeil(max, 1)],
      },
      replicas: {
        data: align([stepSeries("ready"), stepSeries("running"), stepSeries("asked")]),
        series: [
          { label: "ready", stroke: C.ok, width: 2, paths: stepped() },
          { label: "running", stroke: C.accent, width: 1.5, paths: stepped() },
          { label: "asked", stroke: C.warn, width: 1.5, dash: [6, 4], paths: stepped() },
        ].map((s) => ({ ...s, spanGaps: true })),
        fmt: (v) => (v === undefined ? "—" : String(Math.round(v))),
        range: (u, min, max) => [0, Math.max(2, Math.ceil((max ?? 1) + 1))],
        events: (doc.scale_events || []).map((e) => ({ ...e, t: secs(e.at) })),
      },
      gpus: {
        data: align(gpus.map((g) => [
          ...g.minutes.map((p) => [secs(p.minute) + 30, num(p.util)]),
          ...(g.latest ? [[secs(g.latest.at), num(g.latest.util)]] : []),
        ].sort((a, b) => a[0] - b[0]))),
        series: gpus.map((g, i) => ({ label: `${String(g.replica).slice(0, 8)} · ${g.node ?? "?"} ${g.gpu_label ?? ""}`.trim(),
          stroke: gpuColour(i), width: 1.5, spanGaps: true })),
        fmt: (v) => (v === undefined ? "—" : `${Math.round(v)} %`), range: () => [0, 100],
        key: gpus.map((g) => g.replica).join(","),
      },
    };
  }

  function stepped() {
    return typeof uPlot === "function" && uPlot.paths?.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;
  }

  function niceCeil(max, floor) {
    if (max == null || !(max > 0)) return floor;
    const step = 10 ** Math.floor(Math.log10(max * 1.1)) / 2;
    return Math.max(floor, Math.ceil((max * 1.1) / step) * step);
  }

  // --- Charts: made once (again when the set of series changes: replicas' GPUs), then given new data.
  const charts = {};
  let range = [Date.now() / 1000 - 3600, Date.now() / 1000];

  function options(name, spec, width) {
    const axis = { stroke: C.muted, grid: { stroke: C.line, width: 1 }, ticks: { stroke: C.line, width: 1 } };
    return {
      width: Math.max(width, 200),
      height: HEIGHT,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      cursor: { sync: { key: `endpoint-${id}` }, drag: { x: false, y: false } },
      legend: { live: true },
      scales: { x: { time: true, range: () => range }, y: { range: spec.range } },
      axes: [
        { ...axis, values: (u, splits) => splits.map(hhmm) },
        { ...axis, size: 48 },
      ],
      series: [
        { label: "UTC", value: (u, v) => (v == null ? "—" : hhmmss(v)) },
        ...spec.series.map((s) => ({ ...s, value: (u, v) => spec.fmt(v == null ? undefined : v) })),
      ],
      hooks: name === "replicas" ? { draw: [(u) => markEvents(u)] } : {},
    };
  }

  // Scale events on the replicas chart: a dashed line at each, and a label "from→to" whose tooltip says
  // when and why (HTML over the plot, so it can be hovered, read and found by tests).
  let events = [];
  function markEvents(u) {
    const { ctx, bbox } = u;
    ctx.save();
    ctx.strokeStyle = C.warn;
    ctx.setLineDash([3, 3]);
    ctx.lineWidth = Math.max(1, devicePixelRatio);
    for (const e of events) {
      const x = Math.round(u.valToPos(e.t, "x", true));
      if (x < bbox.left || x > bbox.left + bbox.width) continue;
      ctx.beginPath();
      ctx.moveTo(x, bbox.top);
      ctx.lineTo(x, bbox.top + bbox.height);
      ctx.stroke();
    }
    ctx.restore();
    u.over.querySelectorAll(".scale-mark").forEach((el) => el.remove());
    for (const e of events) {
      const left = u.valToPos(e.t, "x");
      if (left < 0 || left > u.over.clientWidth) continue;
      const mark = document.createElement("span");
      mark.className = `scale-mark${e.panic ? " panic" : ""}`;
      mark.dataset.scaleEvent = e.at;
      mark.style.left = `${left}px`;
      mark.textContent = `${e.from_replicas}→${e.to_replicas}`;
      mark.title = `${hhmmss(e.t)} UTC: ${e.from_replicas} → ${e.to_replicas} replicas${e.panic ? " (panic)" : ""}. ${e.reason}`;
      u.over.appendChild(mark);
    }
  }

  function draw(doc) {
    range = [secs(doc.since), secs(doc.now)];
    const specs = chartsOf(doc);
    events = specs.replicas.events;
    for (const [name, spec] of Object.entries(specs)) {
      const figure = root.querySelector(`[data-chart="${name}"]`);
      if (!figure) continue;
      const box = figure.querySelector(".tchart-plot");
      const key = `${spec.series.length}:${spec.key ?? ""}`;
      const chart = charts[name];
      if (typeof uPlot !== "function") continue;
      if (chart && chart.key === key) {
        chart.plot.setData(spec.data);
      } else {
        chart?.plot.destroy();
        box.replaceChildren();
        charts[name] = spec.series.length
          ? { key, plot: new uPlot(options(name, spec, box.clientWidth), spec.data, box) }
          : undefined;
      }
      if (name === "gpus") {
        figure.querySelector("[data-gpus-empty]").hidden = spec.series.length > 0;
        box.hidden = !spec.series.length;
      }
    }
  }

  new ResizeObserver(() => {
    for (const chart of Object.values(charts)) {
      if (chart) chart.plot.setSize({ width: Math.max(chart.plot.root.parentNode.clientWidth, 200), height: HEIGHT });
    }
  }).observe(root.querySelector("[data-metrics-charts]"));

  // --- The numbers of now and the tables.
  let cost = null; // {soFar, perHour, at: performance.now() when fetched}

  function figures(doc) {
    const live = doc.live;
    const minutes = doc.minutes || [];
    const last = minutes[minutes.length - 1];
    setText(now$("requests_per_s"), rate(live ? num(live.requests_per_s) : last && num(last.requests_per_s)));
    setText(now$("in_flight"), live ? rate(num(live.in_flight)) : "—");
    setText(now$("p50"), ms(num(doc.recent?.p50_ms)));
    setText(now$("p99"), `p99 ${ms(num(doc.recent?.p99_ms))} · the last 5 minutes`);
    const t = doc.totals || {};
    const errors = (t.client_errors || 0) + (t.server_errors || 0);
    setText(now$("errors"), t.requests ? `${errors} (${((100 * errors) / t.requests).toFixed(1)} %)` : String(errors));
    setText(now$("errors_detail"), `the last hour: ${t.client_errors || 0} refused · ${t.server_errors || 0} failed of ${t.requests || 0}`);
    const starts = doc.cold_starts || [];
    const done = starts.filter((s) => s.outcome === "ready").map((s) => num(s.seconds)).sort((a, b) => a - b);
    const starting = starts.filter((s) => s.outcome === "starting").length;
    setText(now$("cold_starts"), String(starts.length));
    const median = done.length ? done[Math.floor((done.length - 1) / 2)] : undefined;
    setText(now$("cold_starts_detail"), [done.length ? `median ${took(median)}` : "none answered yet",
      starting ? `${starting} starting` : ""].filter(Boolean).join(" · "));
    cost = { soFar: num(doc.cost?.so_far) ?? 0, perHour: num(doc.cost?.per_hour) ?? 0, at: performance.now() };
    tickCost();
    coldStarts(starts);
    scaleEvents(doc.scale_events || []);
  }

  function tickCost() {
    if (!cost) return;
    const value = cost.soFar + (cost.perHour * (performance.now() - cost.at)) / 3600000;
    document.querySelectorAll("[data-endpoint-cost]").forEach((el) => setText(el, money(value)));
  }

  function rows(table, items, render, empty) {
    const body = table.querySelector("tbody");
    if (!items.length) {
      if (!body.querySelector(".empty-row")) body.replaceChildren(empty);
      return;
    }
    body.replaceChildren(...items.map(render));
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  const coldTable = root.querySelector("[data-cold-starts]");
  const coldEmpty = coldTable.querySelector(".empty-row");
  function coldStarts(starts) {
    rows(coldTable, starts, (s) => {
      const tr = document.createElement("tr");
      tr.dataset.coldStart = s.replica;
      tr.dataset.outcome = s.outcome;
      const code = document.createElement("code");
      code.textContent = String(s.replica).slice(0, 8);
      const first = document.createElement("td");
      first.appendChild(code);
      const answering = s.outcome === "ready" ? hhmmss(secs(s.ready_at))
        : s.outcome === "starting" ? "starting…" : `stopped first${s.reason ? `: ${s.reason}` : ""}`;
      tr.append(first, cell(hhmmss(secs(s.created_at))), cell(answering, s.outcome === "ready" ? "" : "muted"),
        cell(s.outcome === "failed" ? "—" : `${took(num(s.seconds))}${s.outcome === "starting" ? " so far" : ""}`, "num"));
      return tr;
    }, coldEmpty);
  }

  const scaleTable = root.querySelector("[data-scale-events]");
  const scaleEmpty = scaleTable.querySelector(".empty-row");
  function scaleEvents(list) {
    rows(scaleTable, [...list].reverse(), (e) => {
      const tr = document.createElement("tr");
      tr.dataset.scaleRow = e.at;
      const change = cell(`${e.from_replicas} → ${e.to_replicas}`);
      if (e.panic) {
        const pill = document.createElement("span");
        pill.className = "pill state-degraded";
        pill.textContent = "panic";
        change.append(" ", pill);
      }
      tr.append(cell(hhmmss(secs(e.at))), change, cell(e.reason));
      return tr;
    }, scaleEmpty);
  }

  // --- Fetching.
  const status = root.querySelector("[data-metrics-status]");
  let doc = null;
  let loaded = 0;
  let inFlight = false;
  let wanted = false;
  let lastFetch = -Infinity;
  let timer = null;
  let stopped = false;

  function want() {
    if (stopped) return;
    if (inFlight) { wanted = true; return; }
    if (timer) return;
    timer = setTimeout(load, Math.max(0, lastFetch + MIN_GAP_MS - performance.now()));
  }

  async function load() {
    timer = null;
    inFlight = true;
    lastFetch = performance.now();
    try {
      const response = await fetch(root.dataset.metricsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (STOP.has(response.status)) { stopped = true; setText(status, "Not available"); return; }
      if (!response.ok) throw new Error(String(response.status));
      doc = await response.json();
      draw(doc);
      figures(doc);
      root.dataset.metricsLoaded = String(++loaded);
      setText(status, document.body.dataset.live === "on" ? "Live" : `As of ${hhmmss(secs(doc.now))} UTC`);
    } catch {
      setText(status, "Could not load; retrying");
    } finally {
      inFlight = false;
      if (wanted) { wanted = false; want(); }
    }
  }

  document.addEventListener("tenant-event", (e) => {
    const { event, data } = e.detail || {};
    if (!event || !data) return;
    if (event.startsWith("endpoint.") && data.id === id) want();
    else if (event.startsWith("reservation.") && doc?.replicas?.reservations?.includes(data.id)) want();
  });
  setInterval(() => {
    tickCost();
    if (!document.hidden && performance.now() - lastFetch >= POLL_MS) want();
  }, 1000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) want(); });
  setText(status, "Loading…");
  want();
})();
