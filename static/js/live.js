// The tenant's live feed (/ws/tenant/): reservation and endpoint states and provisioning progress, applied to
// whatever the page shows. One small module; pages mark what it may update with data attributes.
// Every event is also dispatched on document as a "tenant-event" ({event, data}) for other scripts.
(function () {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let delay = 1000;

  function setState(id, state) {
    document.querySelectorAll(`[data-state-of="${id}"]`).forEach((pill) => {
      pill.textContent = state;
      pill.className = `pill state-${state}`;
    });
    const page = document.querySelector(`[data-reservation-page="${id}"]`);
    if (page && ["active", "completed", "cancelled", "failed"].includes(state)) {
      // Actions and allocations change with these states: refresh the server-rendered parts.
      setTimeout(() => location.reload(), 600);
    }
  }

  function setProgress(data) {
    const table = document.querySelector(`[data-progress-of="${data.id}"]`);
    if (!table) return;
    let row = table.querySelector(`tr[data-node="${data.node}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.node = data.node;
      row.innerHTML = '<td><code></code></td><td class="kind"></td><td class="step"></td>' +
        '<td><div class="progress"><span></span></div></td><td class="num pct"></td>';
      row.querySelector("code").textContent = data.node;
      table.querySelector("tbody").appendChild(row);
      table.querySelector(".empty-row")?.remove();
    }
    row.querySelector(".kind").textContent = data.kind;
    row.querySelector(".step").textContent = data.step;
    row.querySelector(".progress span").style.width = `${data.percent}%`;
    row.querySelector(".pct").textContent = `${data.percent}%`;
  }

  // An endpoint's page: its state and replicas are server-rendered (sites, nodes, GPUs), so an event of
  // the endpoint, or of one of its replicas' reservations, fetches the page again and swaps that part in.
  let refreshing = null;
  function refreshEndpoint() {
    const live = document.querySelector("[data-endpoint-live]");
    if (!live || refreshing) return;
    refreshing = setTimeout(async () => {
      try {
        const response = await fetch(location.href, { headers: { Accept: "text/html" } });
        if (!response.ok) return;
        const next = new DOMParser().parseFromString(await response.text(), "text/html");
        const part = next.querySelector("[data-endpoint-live]");
        if (part) live.innerHTML = part.innerHTML;
        const pill = next.querySelector("#endpoint-state");
        if (pill) setEndpointState(pill.dataset.stateOf, pill.textContent);
      } finally {
        refreshing = null;
      }
    }, 300);
  }

  function setEndpointState(id, state) {
    document.querySelectorAll(`[data-state-of="${id}"]`).forEach((pill) => {
      pill.textContent = state;
      pill.className = `pill state-${state}`;
    });
  }

  function onEndpointEvent(data) {
    if (data.state) setEndpointState(data.id, data.state);
    if (document.querySelector(`[data-endpoint-page="${data.id}"]`)) refreshEndpoint();
  }

  function connect() {
    const socket = new WebSocket(`${scheme}://${location.host}/ws/tenant/`);
    socket.onopen = () => { delay = 1000; document.body.dataset.live = "on"; };
    socket.onmessage = (message) => {
      const { event, data } = JSON.parse(message.data);
      if (event.startsWith("endpoint.")) onEndpointEvent(data);
      else if (event.startsWith("reservation.") && data.state && document.querySelector(`[data-reservation-of="${data.id}"]`)) {
        refreshEndpoint(); // a replica's slice moved (provisioning, active, released)
      }
      if (event === "reservation.progress") setProgress(data);
      else if (event.startsWith("reservation.") && data.state) setState(data.id, data.state);
      // Other scripts of the page (billing.js) follow the same feed, without a second socket.
      document.dispatchEvent(new CustomEvent("tenant-event", { detail: { event, data } }));
    };
    socket.onclose = (closing) => {
      document.body.dataset.live = "off";
      // 4403: not a member of any organization; 4401: the session or membership ended. Nothing to follow.
      if (closing.code === 4403 || closing.code === 4401) return;
      setTimeout(connect, delay + Math.random() * delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  if (document.querySelector("[data-live]")) connect();
})();
