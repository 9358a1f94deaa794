// The operators' fleet heatmap (templates/portal/fleet.html), live from /ws/fleet/: a "node" frame
// per node about once a second (1,250 nodes on a large fleet) and a "node_state" frame on each
// lifecycle move. Frames only record the latest values per node; once per animation frame the
// changed cells get their attributes (colour bucket, state, health, stale, title) rewritten: no
// DOM reads, no innerHTML, cells of fixed size, so a frame costs style and paint of those cells only.
// The root carries data-fleet-live="on" while the socket is open and data-frames (frames applied).
(function () {
  "use strict";
  const root = document.querySelector("[data-fleet]");
  if (!root) return;

  const STALE = 30; // seconds without a reading before a cell is shown faded
  const STOP_CODES = new Set([4401, 4403]); // not allowed: do not retry
  const OTHER_STATES = ["draining", "maintenance", "enrolling"]; // listed in site counts when present

  const num = (v) => (v === null || v === undefined || v === "" || !Number.isFinite(+v) ? undefined : +v);
  const parseAt = (v) => num(v) ?? (v ? Date.parse(String(v).replace(" ", "T")) / 1000 || undefined : undefined);
  const hhmmss = (t) => new Date(t * 1000).toISOString().slice(11, 19);
  const show = (v, unit) => (v === undefined ? "—" : `${Math.round(v)} ${unit}`);
  const kw = (w) => String(+(w / 1000).toFixed(1));

  // --- Index the server-rendered page once: each node's cell, rack and site.
  const nodes = new Map();
  const sites = [];
  const racks = [];
  for (const siteEl of root.querySelectorAll(".fleet-site")) {
    const site = { countsEl: siteEl.querySelector("[data-site-counts]"), racks: 0, nodes: [] };
    sites.push(site);
    for (const rackEl of siteEl.querySelectorAll(".rack")) {
      const budget = num(rackEl.dataset.budgetKw);
      const rack = { el: rackEl, bar: rackEl.querySelector("[data-rack-bar]"), text: rackEl.querySelector("[data-rack-power]"),
        budgetW: budget === undefined ? undefined : budget * 1000, budgetLabel: budget === undefined ? "—" : kw(budget * 1000),
        nodes: [], shown: {} };
      site.racks += 1;
      racks.push(rack);
      for (const el of rackEl.querySelectorAll(".cell[data-node]")) {
        const d = el.dataset;
        const n = { el, rack, site, gpus: num(d.gpus) ?? 0, state: d.state, health: d.health || "",
          util: num(d.util), power: num(d.power), temp: num(d.temp), at: parseAt(d.at), stale: false,
          head: el.title.split("\n")[0], next: null, nextState: null,
          shown: { u: d.u, state: d.state, health: d.health || "", stale: "", title: el.title } };
        nodes.set(d.node, n);
        rack.nodes.push(n);
        site.nodes.push(n);
      }
    }
  }

  // --- Rendering helpers: each writes an attribute only when its value changes.
  function set(n, key, attr, value) {
    if (n.shown[key] === value) return;
    n.shown[key] = value;
    if (value === "") n.el.removeAttribute(attr);
    else n.el.setAttribute(attr, value);
  }

  function titleOf(n) {
    const lines = [n.head, n.state + (n.health ? ` · health ${n.health}` : "")];
    if (n.util === undefined && n.power === undefined && n.temp === undefined) lines.push("no reading");
    else lines.push(`util ${show(n.util, "%")} · power ${show(n.power, "W")} · temp ${show(n.temp, "°C")}`);
    if (n.stale && n.at !== undefined) lines.push(`last reading ${hhmmss(n.at)} UTC`);
    return lines.join("\n");
  }

  function paint(n) {
    set(n, "u", "data-u", n.util === undefined ? "" : String(Math.round(Math.min(100, Math.max(0, n.util)) / 10)));
    set(n, "state", "data-state", n.state);
    set(n, "health", "data-health", n.health);
    set(n, "stale", "data-stale", n.stale ? "1" : "");
    const title = titleOf(n);
    if (n.shown.title !== title) n.el.title = n.shown.title = title;
  }

  function drawRack(rack) {
    let watts = 0;
    let counted = 0;
    for (const n of rack.nodes) if (!n.stale && n.power !== undefined) { watts += n.power; counted += 1; }
    const text = `${counted ? kw(watts) : "—"} / ${rack.budgetLabel} kW`;
    if (rack.shown.text !== text) rack.text.textContent = rack.shown.text = text;
    const pct = rack.budgetW ? Math.min(100, (watts / rack.budgetW) * 100).toFixed(1) : "0";
    if (rack.shown.pct !== pct) rack.bar.style.width = `${(rack.shown.pct = pct)}%`;
    const over = rack.budgetW !== undefined && watts > rack.budgetW;
    if (rack.shown.over !== over) rack.el.classList.toggle("over-budget", (rack.shown.over = over));
  }

  function tally(list) {
    const counts = { nodes: list.length, gpus: 0, available: 0, offline: 0, draining: 0, maintenance: 0, enrolling: 0 };
    for (const n of list) { counts.gpus += n.gpus; if (n.state in counts) counts[n.state] += 1; }
    return counts;
  }

  function drawSite(site) {
    const c = tally(site.nodes);
    const parts = [`${site.racks} rack${site.racks === 1 ? "" : "s"}`, `${c.nodes} node${c.nodes === 1 ? "" : "s"}`,
      `${c.gpus} GPUs`, `${c.available} available`, ...OTHER_STATES.filter((s) => c[s]).map((s) => `${c[s]} ${s}`),
      `${c.offline} offline`];
    if (site.countsEl) site.countsEl.textContent = parts.join(" · ");
  }

  function drawTotals() {
    const c = tally([...nodes.values()]);
    for (const el of root.querySelectorAll("[data-total]")) if (el.dataset.total in c) el.textContent = String(c[el.dataset.total]);
  }

  // --- Detail line for the cell under the pointer or focus (the title tooltip is slow to appear).
  const detail = root.querySelector("[data-fleet-detail]");
  let detailNode = null;
  function showDetail(n) {
    detailNode = n;
    if (!detail) return;
    detail.hidden = !n;
    if (n) detail.textContent = titleOf(n).replaceAll("\n", " · ");
  }
  const cellNode = (target) => nodes.get(target.closest?.(".cell[data-node]")?.dataset.node);
  root.addEventListener("pointerover", (e) => showDetail(cellNode(e.target) ?? null));
  root.addEventListener("focusin", (e) => showDetail(cellNode(e.target) ?? null));
  root.addEventListener("pointerleave", () => showDetail(null));

  // --- Live frames: recorded per node, applied in the next animation frame.
  const dirty = new Set();
  const dirtyRacks = new Set();
  let statesChanged = false;
  let scheduled = false;
  let received = 0;
  let offset = null; // browser clock minus the agents' clock (s): smallest seen

  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(flush);
  }

  function onFrame(f) {
    const n = nodes.get(f?.node);
    if (!n) return; // a node enrolled after the page was rendered: shown on reload
    if (f.type === "node") {
      n.next = f;
      const at = num(f.at);
      if (at !== undefined) offset = Math.min(offset ?? Infinity, Date.now() / 1000 - at);
    } else if (f.type === "node_state" && f.state) n.nextState = String(f.state);
    else return;
    received += 1;
    dirty.add(n);
    schedule();
  }

  function flush() {
    scheduled = false;
    for (const n of dirty) {
      if (n.nextState !== null) {
        statesChanged ||= n.nextState !== n.state;
        n.state = n.nextState;
        n.nextState = null;
      }
      if (n.next !== null) {
        const f = n.next;
        n.next = null;
        Object.assign(n, { util: num(f.util), power: num(f.power), temp: num(f.temp), health: f.health || "",
          at: num(f.at), stale: false });
        dirtyRacks.add(n.rack);
      }
      paint(n);
      if (n === detailNode) showDetail(n);
    }
    dirty.clear();
    dirtyRacks.forEach(drawRack);
    dirtyRacks.clear();
    if (statesChanged) {
      statesChanged = false;
      sites.forEach(drawSite);
      drawTotals();
    }
    root.dataset.frames = String(received);
  }

  // Every few seconds: fade the cells of nodes that stopped reporting (agent clock, estimated).
  setInterval(() => {
    if (offset === null) return;
    const now = Date.now() / 1000 - offset;
    for (const n of nodes.values()) {
      const stale = n.at !== undefined && now - n.at > STALE;
      if (stale === n.stale) continue;
      n.stale = stale;
      dirty.add(n);
      dirtyRacks.add(n.rack);
    }
    if (dirty.size) schedule();
  }, 5000);

  const status = root.querySelector("[data-fleet-status]");
  const setStatus = (text) => { if (status) status.textContent = text; };
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let delay = 1000;
  function connect() {
    const socket = new WebSocket(`${scheme}://${location.host}${root.dataset.fleetWs}`);
    socket.onopen = () => {
      delay = 1000;
      root.dataset.fleetLive = "on";
      setStatus("Live");
    };
    socket.onmessage = (message) => {
      let frame;
      try { frame = JSON.parse(message.data); } catch { return; }
      onFrame(frame);
    };
    socket.onclose = (closing) => {
      root.dataset.fleetLive = "off";
      if (STOP_CODES.has(closing.code)) { setStatus("Live updates are for operators only"); return; }
      setStatus("Reconnecting…");
      setTimeout(connect, delay + Math.random() * delay); // jittered exponential backoff
      delay = Math.min(delay * 2, 30000);
    };
  }

  // Counts and rack power from what the server rendered, then live.
  sites.forEach(drawSite);
  racks.forEach(drawRack);
  setStatus("Connecting…");
  connect();
})();
