// Live money: the tenant's balance and the running cost of its reservations. The tenant feed that
// live.js follows (it re-dispatches each event as a "tenant-event" DOM event) carries billing.cost
// every few seconds (balance less what is not yet rated, total and per-reservation $/h and cost so
// far), billing.balance when the ledger changes, and billing.notice. Between pushes the figures move
// each second at the rate they accrue; each push snaps them to the server's values. The server
// renders the first values (#billing-tick, the shape of billing.cost), so the page is right before
// the first push. On the billing page it also draws this month's spend per day (uPlot).
// For tests, <body> carries data-billing-ticks (billing.cost pushes applied) and data-billing-balances.
(function () {
  "use strict";
  const seed = document.getElementById("billing-tick");
  if (!seed) return;

  const COAST = 30; // seconds the figures keep moving after a push when no new one comes
  const usd = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
  const num = (v) => (v === null || v === undefined || v === "" || !Number.isFinite(+v) ? 0 : +v);
  const money = (v) => {
    const c = Math.round(v * 100) / 100;
    return usd.format(c === 0 ? 0 : c); // no "-$0.00"
  };
  const setText = (el, text) => { if (el.textContent !== text) el.textContent = text; };
  const each = (selector, fn) => document.querySelectorAll(selector).forEach(fn);

  // The server's last values and when they came (this browser's clock: no skew with the server's).
  let state = null;
  let ticks = 0;
  let balances = 0;

  // Time accrued since the figures were anchored, up to COAST seconds after the last billing.cost.
  const hoursSince = () => Math.max(Math.min(performance.now(), state.pushedAt + COAST * 1000) - state.at, 0) / 3600000;
  const costNow = (r) => r.cost + r.perHour * hoursSince();

  function snap(tick) {
    const reservations = new Map();
    for (const [id, r] of Object.entries(tick.reservations || {})) {
      reservations.set(id, { cost: num(r.cost), perHour: num(r.per_hour) });
    }
    // Shown but no longer in the ticker (it left active): stays at what it last showed.
    if (state) {
      for (const [id, r] of state.reservations) {
        if (!reservations.has(id)) reservations.set(id, { cost: costNow(r), perHour: 0 });
      }
    }
    const now = performance.now();
    state = { at: now, pushedAt: now, balance: num(tick.balance), unrated: num(tick.unrated), perHour: num(tick.per_hour), reservations };
    render();
  }

  // Re-anchor at now (keeping what is shown), to change one figure without a jump in the others.
  function rebase() {
    const hours = hoursSince();
    for (const r of state.reservations.values()) r.cost += r.perHour * hours;
    state.balance -= state.perHour * hours;
    state.unrated += state.perHour * hours;
    state.at = performance.now();
  }

  function render() {
    const hours = hoursSince();
    const balance = state.balance - state.perHour * hours;
    each("[data-live-balance]", (el) => {
      setText(el, money(balance));
      el.classList.toggle("negative", Math.round(balance * 100) < 0);
    });
    // What runs and is not yet rated grows as the balance falls: the billing page's figures add up.
    each("[data-live-unrated]", (el) => setText(el, money(state.unrated + state.perHour * hours)));
    each("[data-live-burn]", (el) => setText(el, money(state.perHour)));
    each("[data-live-cost]", (el) => {
      const r = state.reservations.get(el.dataset.liveCost);
      if (r) setText(el, money(r.cost + r.perHour * hours));
    });
    each("[data-live-rate]", (el) => {
      const r = state.reservations.get(el.dataset.liveRate);
      if (r) setText(el, money(r.perHour));
    });
  }

  // billing.balance: the ledger changed (a rating, a grant, a hold).
  function applyBalance(b) {
    rebase();
    // The ledger's balance (available + held): shown with nothing unrated until the next
    // billing.cost says what runs unrated, so the figures on the page still add up.
    state.balance = num(b.balance);
    state.unrated = 0;
    const fields = { ...b, spendable: num(b.available) + num(b.credit_limit) };
    each("[data-balance-field]", (el) => {
      const value = fields[el.dataset.balanceField];
      if (value !== undefined && value !== null) setText(el, money(num(value)));
    });
    render();
    document.body.dataset.billingBalances = String(++balances);
  }

  // A reservation left active: its cost stops growing now, not at the next push.
  function stopped(id) {
    const r = state.reservations.get(id);
    if (!r || !r.perHour) return;
    rebase();
    state.perHour = Math.max(state.perHour - r.perHour, 0);
    r.perHour = 0;
    render();
  }

  function notice(n) {
    const kind = String(n.kind || "").replace(/[^a-z_]/g, "");
    const box = document.querySelector("[data-notice-banner]");
    if (box) {
      const banner = document.createElement("div");
      banner.className = `notice-banner notice-${kind}`;
      banner.setAttribute("role", "alert");
      banner.textContent = `${n.message} `;
      const close = document.createElement("button");
      close.type = "button";
      close.className = "link";
      close.setAttribute("aria-label", "Dismiss");
      close.textContent = "×";
      close.addEventListener("click", () => banner.remove());
      banner.appendChild(close);
      box.prepend(banner);
    }
    each("[data-notice-list]", (list) => {
      const item = document.createElement("li");
      item.className = `notice-${kind}`;
      const time = document.createElement("time");
      time.dateTime = n.at || "";
      time.textContent = n.at ? `${n.at.slice(0, 10)} ${n.at.slice(11, 16)}` : "now";
      item.append(time, ` ${n.message}`);
      list.querySelector(".empty-row")?.remove();
      list.prepend(item);
    });
  }

  try {
    snap(JSON.parse(seed.textContent));
  } catch {
    return; // no first values: the server-rendered figures stay
  }
  document.addEventListener("tenant-event", (e) => {
    const { event, data } = e.detail || {};
    if (!data) return;
    if (event === "billing.cost") {
      snap(data);
      document.body.dataset.billingTicks = String(++ticks);
    } else if (event === "billing.balance") applyBalance(data);
    else if (event === "billing.notice") notice(data);
    else if (event && event.startsWith("reservation.") && data.id && data.state && data.state !== "active") stopped(data.id);
  });

  setInterval(render, 1000);

  // --- This month's spend per day (billing page): bars per UTC day, a line for the month to date.
  const chartBox = document.querySelector("[data-spend-chart]");
  const chartData = document.getElementById("spend-chart-data");
  if (!chartBox || !chartData || typeof uPlot !== "function") return;
  const { days, amounts } = JSON.parse(chartData.textContent);
  if (!days.length) return;
  const xs = days.map((d) => Date.parse(`${d}T00:00:00Z`) / 1000);
  const daily = amounts.map(num);
  let sum = 0;
  const toDate = daily.map((v) => (sum += v));
  const css = getComputedStyle(document.documentElement);
  const colour = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const muted = colour("--muted", "#8b93a7");
  const line = colour("--line", "#2a2f3a");
  const accent = colour("--accent", "#7c9cff");
  const ok = colour("--ok", "#3ecf8e");
  const ceil = (max) => {
    if (!max || max <= 0) return 1;
    const step = 10 ** Math.floor(Math.log10(max * 1.15)) / 2;
    return Math.ceil((max * 1.15) / step) * step;
  };
  const short = (v) => (v >= 1e6 ? `$${+(v / 1e6).toFixed(1)}M` : v >= 1e4 ? `$${+(v / 1e3).toFixed(1)}k` : `$${+v.toFixed(2)}`);
  const axis = { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
  const HEIGHT = 240;
  const chart = new uPlot(
    {
      width: Math.max(chartBox.clientWidth, 240),
      height: HEIGHT,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: () => [xs[0] - 43200, xs[xs.length - 1] + 43200] },
        day: { range: (u, min, max) => [0, ceil(max)] },
        total: { range: (u, min, max) => [0, ceil(max)] },
      },
      axes: [
        { ...axis, grid: { show: false }, incrs: [86400, 2 * 86400, 7 * 86400], space: 28,
          values: (u, splits) => splits.map((v) => String(new Date(v * 1000).getUTCDate())) },
        { ...axis, scale: "day", size: 64, values: (u, splits) => splits.map(short) },
        { ...axis, scale: "total", side: 1, size: 64, grid: { show: false }, values: (u, splits) => splits.map(short) },
      ],
      series: [
        { label: "Day (UTC)", value: (u, v) => (v == null ? "—" : new Date(v * 1000).toISOString().slice(0, 10)) },
        { label: "Per day", scale: "day", stroke: accent, fill: `${accent}88`, width: 1,
          paths: uPlot.paths.bars({ size: [0.7, 36] }), points: { show: false },
          value: (u, v) => (v == null ? "—" : money(v)) },
        { label: "Month to date", scale: "total", stroke: ok, width: 2, points: { show: xs.length < 3 },
          value: (u, v) => (v == null ? "—" : money(v)) },
      ],
    },
    [xs, daily, toDate],
    chartBox,
  );
  new ResizeObserver(() => {
    const width = Math.max(chartBox.clientWidth, 240);
    if (width !== chart.width) chart.setSize({ width, height: HEIGHT });
  }).observe(chartBox);
})();
