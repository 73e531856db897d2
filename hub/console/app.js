// telemetry-hub web console: plain JavaScript over the hub's /api/v1.
// Pages: fleet (#/, with the out-of-sync count, fleet filters and alarm
// badges), device (#/devices/ID, with its twin and open alarms), alarms
// (#/alarms), jobs (#/jobs), commands (#/commands), hub (#/hub).
// Everything shown comes from the API; every failure shows as a message.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "telemetry-hub-token";

// ---- small helpers ----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmtTime(ms) {
  if (!ms) return "—";
  return new Date(ms).toLocaleString();
}

function fmtAgo(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function fmtNum(n) {
  return typeof n === "number" ? n.toLocaleString() : String(n);
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// ---- errors and the connection indicator ----

const errorBox = document.getElementById("error");
const conn = document.getElementById("conn");
const errors = new Map(); // source -> message

function setError(source, message) {
  if (message) errors.set(source, message);
  else errors.delete(source);
  errorBox.hidden = errors.size === 0;
  errorBox.textContent = [...errors.values()].join(" ");
}

function setLive(state) {
  conn.className = "conn " + state;
  conn.title = state === "live" ? "live updates" : "not connected";
}

// ---- the API ----

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = Object.assign({ Accept: "application/json" }, authHeaders(), opts.headers || {});
  let res;
  try {
    res = await fetch(API + path, opts);
  } catch (e) {
    setError("hub", "The hub is not answering: " + (e.message || e) + ". Retrying…");
    setLive("down");
    throw new ApiError(0, "unreachable", "the hub is not answering");
  }
  setError("hub", null);
  let body = null;
  try {
    body = await res.json();
  } catch (e) {
    body = null;
  }
  if (res.status === 401) showLogin();
  if (!res.ok) {
    const err = body && body.error ? body.error : { code: "http_" + res.status, message: res.statusText };
    throw new ApiError(res.status, err.code, err.message);
  }
  return body;
}

function showLogin() {
  const form = document.getElementById("login");
  form.hidden = false;
  setError("auth", "This hub asks for an operator token.");
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = document.getElementById("token").value.trim();
  if (token) localStorage.setItem(TOKEN_KEY, token);
  document.getElementById("login").hidden = true;
  setError("auth", null);
  route();
});

// ---- live events: Server-Sent Events read with fetch (so the token goes
// in a header), reconnecting after a pause when the stream ends ----

function openEvents(query, handlers) {
  const controller = new AbortController();
  let closed = false;
  async function run() {
    while (!closed) {
      try {
        const res = await fetch(API + "/events?" + query, {
          headers: Object.assign({ Accept: "text/event-stream" }, authHeaders()),
          signal: controller.signal,
        });
        if (!res.ok) {
          let msg = res.statusText;
          try { msg = (await res.json()).error.message; } catch (e) { /* keep statusText */ }
          if (res.status === 401) showLogin();
          throw new Error(msg);
        }
        setLive("live");
        setError("events", null);
        if (handlers.open) handlers.open();
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (data.length && handlers[name]) {
              try {
                handlers[name](JSON.parse(data.join("\n")));
              } catch (e) {
                console.error("event", name, e);
              }
            }
          }
        }
        throw new Error("the stream ended");
      } catch (e) {
        if (closed) return;
        setLive("down");
        setError("events", "Lost the live connection to the hub (" + (e.message || e) + "). Reconnecting…");
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  run();
  return () => {
    closed = true;
    controller.abort();
  };
}

// ---- charts (uPlot) ----

// A chart in `el`, as wide as it; `spanMs` fixes the x axis to the last
// spanMs up to now.
function makeChart(el, title, seriesNames, withBand, spanMs) {
  const fg = cssVar("--fg");
  const line = cssVar("--line");
  const accent = cssVar("--accent");
  const series = [{}];
  series.push({ label: seriesNames[0], stroke: accent, width: 1.5, spanGaps: false });
  if (withBand) {
    series.push({ label: "min", stroke: "transparent", points: { show: false } });
    series.push({ label: "max", stroke: "transparent", points: { show: false } });
  }
  const axis = { stroke: fg, grid: { stroke: line, width: 1 }, ticks: { stroke: line } };
  const opts = {
    title,
    width: Math.max(280, el.clientWidth || 500),
    height: 220,
    scales: {
      x: spanMs
        ? { time: true, range: () => [(Date.now() - spanMs) / 1000, Date.now() / 1000] }
        : { time: true },
    },
    series,
    axes: [axis, Object.assign({ size: 60 }, axis)],
    legend: { show: true },
  };
  if (withBand) opts.bands = [{ series: [3, 2], fill: cssVar("--band") }];
  const empty = series.map(() => []);
  const chart = new uPlot(opts, empty, el);
  // Follows its box as the grid or the window changes.
  const fit = new ResizeObserver(() => {
    const width = Math.max(280, el.clientWidth);
    if (Math.abs(width - chart.width) > 1) chart.setSize({ width, height: 220 });
  });
  fit.observe(el);
  const destroy = chart.destroy.bind(chart);
  chart.destroy = () => {
    fit.disconnect();
    destroy();
  };
  return chart;
}

const charts = new Set();

// ---- pages ----

let leave = () => {};
const view = document.getElementById("view");

function route() {
  leave();
  leave = () => {};
  for (const c of charts) c.destroy();
  charts.clear();
  setError("page", null);
  const hash = location.hash || "#/";
  let nav = "fleet";
  let m;
  if ((m = hash.match(/^#\/devices\/(.+)$/))) {
    nav = "fleet";
    leave = devicePage(decodeURIComponent(m[1]));
  } else if (hash.startsWith("#/alarms")) {
    nav = "alarms";
    leave = alarmsPage();
  } else if (hash.startsWith("#/jobs")) {
    nav = "jobs";
    leave = jobsPage();
  } else if (hash.startsWith("#/commands")) {
    nav = "commands";
    leave = commandsPage();
  } else if (hash.startsWith("#/hub")) {
    nav = "hub";
    leave = hubPage();
  } else {
    leave = fleetPage();
  }
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === nav);
  }
}

window.addEventListener("hashchange", route);

function pageError(e) {
  if (e && e.code === "unreachable") return; // already shown
  setError("page", (e && e.message) || String(e));
}

// Fleet: counts, readings/s, the device table.
function fleetPage() {
  const online = h("div", { class: "value", id: "online-count" }, "…");
  const total = h("div", { class: "value", id: "device-count" }, "…");
  const rate = h("div", { class: "value", id: "readings-rate" }, "…");
  const stored = h("div", { class: "value", id: "readings-stored" }, "…");
  const unsynced = h("div", { class: "value", id: "out-of-sync-count" }, "…");
  const alarmed = h("div", { class: "value", id: "alarmed-count" }, "…");
  const rateChartEl = h("div", { class: "chart", id: "rate-chart" });
  const search = h("input", { type: "search", placeholder: "Search id, firmware or tag", id: "device-search" });
  // A fleet filter, answered by the hub (README "Fleet filters").
  const where = h("input", { type: "search", id: "device-where",
    placeholder: "Filter: tags.site = plant-7 and reported.battery < 20" });
  const onlyUnsynced = h("input", { type: "checkbox", id: "only-out-of-sync" });
  const tbody = h("tbody", { id: "device-rows" });
  const columns = [
    ["device_id", "Device"],
    ["online", "Online"],
    ["last_seen_ms", "Last seen"],
    ["readings", "Readings", "num"],
    ["in_sync", "Twin"],
    ["alarms", "Alarms"],
    ["firmware", "Firmware", "hide-narrow"],
    ["tags", "Tags", "hide-narrow"],
  ];
  let sortKey = "device_id";
  let sortDir = 1;
  const heads = columns.map(([key, label, cls]) =>
    h("th", {
      class: "sortable " + (cls || ""),
      "data-key": key,
      onclick: () => {
        sortDir = sortKey === key ? -sortDir : 1;
        sortKey = key;
        draw();
      },
    }, label),
  );
  view.replaceChildren(
    h("div", { class: "cards" },
      h("div", { class: "card" }, online, h("div", { class: "label" }, "devices online")),
      h("div", { class: "card" }, total, h("div", { class: "label" }, "devices")),
      h("div", { class: "card" }, rate, h("div", { class: "label" }, "readings/s")),
      h("div", { class: "card" }, stored, h("div", { class: "label" }, "readings stored")),
      h("div", { class: "card" }, unsynced, h("div", { class: "label" }, "out of sync")),
      h("div", { class: "card" }, alarmed, h("div", { class: "label" }, h("a", { href: "#/alarms" }, "devices with open alarms")))),
    h("div", { class: "panel" }, h("h2", {}, "Readings per second"), rateChartEl),
    h("div", { class: "panel" },
      h("div", { class: "toolbar" }, search, where,
        h("label", { class: "check" }, onlyUnsynced, " out of sync only")),
      h("table", {}, h("thead", {}, h("tr", {}, heads)), tbody)),
  );
  search.addEventListener("input", () => draw());
  where.addEventListener("change", () => load());
  onlyUnsynced.addEventListener("change", () => load());

  let devices = [];
  let alarmsOf = new Map(); // device -> {open, severity}
  async function loadAlarms() {
    try {
      const res = await api("/alarms/summary");
      alarmsOf = new Map(res.devices.map((d) => [d.device, d]));
      alarmed.textContent = fmtNum(alarmsOf.size);
      for (const d of devices) d.alarms = alarmsOf.has(d.device_id) ? alarmsOf.get(d.device_id).open : 0;
      draw();
    } catch (e) {
      pageError(e);
    }
  }
  const rateChart = makeChart(rateChartEl, "", ["readings/s"], false, 600e3);
  charts.add(rateChart);
  const xs = [];
  const ys = [];
  let lastCommitted = null;
  let lastAt = null;

  function draw() {
    const q = search.value.trim().toLowerCase();
    const rows = devices.filter((d) => {
      if (!q) return true;
      const tags = Object.entries(d.tags).map(([k, v]) => k + "=" + v).join(" ");
      return (d.device_id + " " + d.firmware + " " + tags).toLowerCase().includes(q);
    });
    rows.sort((a, b) => {
      let x = a[sortKey];
      let y = b[sortKey];
      if (sortKey === "tags") {
        x = JSON.stringify(x);
        y = JSON.stringify(y);
      }
      return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
    });
    for (const th of heads) {
      th.classList.toggle("sorted-asc", th.dataset.key === sortKey && sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDir < 0);
    }
    tbody.replaceChildren(...rows.slice(0, 2000).map((d) =>
      h("tr", { "data-device": d.device_id },
        h("td", {}, h("a", { href: "#/devices/" + encodeURIComponent(d.device_id) }, d.device_id)),
        h("td", {}, h("span", { class: "badge " + (d.online ? "online" : "offline") }, d.online ? "online" : "offline")),
        h("td", { title: fmtTime(d.last_seen_ms) }, d.online ? "now" : fmtAgo(d.last_seen_ms)),
        h("td", { class: "num" }, fmtNum(d.readings)),
        h("td", {}, h("span", { class: "badge " + (d.in_sync ? "in-sync" : "out-of-sync") }, d.in_sync ? "in sync" : "out of sync")),
        h("td", {}, alarmBadge(alarmsOf.get(d.device_id))),
        h("td", { class: "hide-narrow" }, d.firmware),
        h("td", { class: "hide-narrow" }, Object.entries(d.tags).map(([k, v]) => h("span", { class: "label-chip" }, k + "=" + v))))));
    if (!filtered()) {
      online.textContent = fmtNum(devices.filter((d) => d.online).length);
      total.textContent = fmtNum(devices.length);
      unsynced.textContent = fmtNum(devices.filter((d) => !d.in_sync).length);
    }
  }

  function filtered() {
    return where.value.trim() !== "" || onlyUnsynced.checked;
  }

  function filterText() {
    const clauses = [];
    if (where.value.trim()) clauses.push(where.value.trim());
    if (onlyUnsynced.checked) clauses.push("in_sync = false");
    return clauses.join(" and ");
  }

  async function load() {
    try {
      const all = [];
      let after = "";
      const filter = filterText();
      for (let page = 0; page < 10; page++) {
        const res = await api("/devices?limit=10000&after=" + encodeURIComponent(after) +
          (filter ? "&where=" + encodeURIComponent(filter) : ""));
        all.push(...res.devices);
        if (!res.next_after) break;
        after = res.next_after;
      }
      devices = all;
      for (const d of devices) d.alarms = alarmsOf.has(d.device_id) ? alarmsOf.get(d.device_id).open : 0;
      draw();
    } catch (e) {
      pageError(e);
    }
  }
  load();
  loadAlarms();
  const refresh = setInterval(load, 10000);
  // Devices never seen before reload the list, at most once a second.
  let reloadSoon = null;
  function reloadLater() {
    if (!reloadSoon) {
      reloadSoon = setTimeout(() => {
        reloadSoon = null;
        load();
      }, 1000);
    }
  }
  let alarmsSoon = null;
  const stop = openEvents("kinds=presence,stats,alarm", {
    open: load,
    alarm: () => {
      if (!alarmsSoon) alarmsSoon = setTimeout(() => { alarmsSoon = null; loadAlarms(); }, 300);
    },
    presence: (p) => {
      const d = devices.find((x) => x.device_id === p.device_id);
      if (d) {
        d.online = p.online;
        if (!p.online) d.last_seen_ms = p.since_ms;
        draw();
      } else {
        reloadLater();
      }
    },
    resync: reloadLater,
    stats: (s) => {
      const now = Date.now() / 1000;
      if (lastCommitted !== null && now > lastAt) {
        const r = Math.max(0, (s.readings_committed - lastCommitted) / (now - lastAt));
        rate.textContent = fmtNum(Math.round(r));
        xs.push(now);
        ys.push(r);
        while (xs.length && xs[0] < now - 600) {
          xs.shift();
          ys.shift();
        }
        rateChart.setData([xs, ys]);
      }
      lastCommitted = s.readings_committed;
      lastAt = now;
      stored.textContent = fmtNum(s.readings_stored);
      online.textContent = fmtNum(s.live_sessions);
    },
  });
  return () => {
    clearInterval(refresh);
    clearTimeout(reloadSoon);
    clearTimeout(alarmsSoon);
    stop();
  };
}

const SEVERITY_RANK = { critical: 0, major: 1, minor: 2, warning: 3 };

function alarmBadge(summary) {
  if (!summary) return h("span", { class: "muted" }, "—");
  return h("a", { href: "#/alarms?device=" + encodeURIComponent(summary.device) },
    h("span", { class: "badge sev-" + summary.severity, "data-alarms": summary.open },
      summary.open + " " + summary.severity));
}

// The open-alarm count in the navigation, kept up to date on every page.
async function refreshAlarmCount() {
  const el = document.getElementById("alarm-count");
  try {
    const res = await api("/alarms/summary");
    const n = res.devices.reduce((a, d) => a + d.open, 0);
    el.textContent = n;
    el.hidden = n === 0;
  } catch (e) {
    /* shown by the page */
  }
}
setInterval(refreshAlarmCount, 5000);
refreshAlarmCount();

// Alarms: filterable, live; acknowledge and clear with a note.
function alarmsPage() {
  const params = new URLSearchParams((location.hash.split("?")[1]) || "");
  const stateSel = h("select", { id: "alarm-state" },
    [["open", "open"], ["active", "active"], ["acknowledged", "acknowledged"], ["cleared", "cleared"], ["", "any state"]]
      .map(([v, l]) => h("option", { value: v }, l)));
  const sevSel = h("select", { id: "alarm-severity" }, h("option", { value: "" }, "any severity"),
    ["critical", "major", "minor", "warning"].map((s) => h("option", { value: s }, s)));
  const deviceIn = h("input", { type: "search", id: "alarm-device", placeholder: "Device id", value: params.get("device") || "" });
  const ruleIn = h("input", { type: "search", id: "alarm-rule", placeholder: "Rule" });
  const tbody = h("tbody", { id: "alarm-rows" });
  const rulesBody = h("tbody", { id: "rule-rows" });
  const ruleSpecIn = h("textarea", { id: "rule-spec", rows: 4,
    placeholder: '{"name": "hot", "severity": "major", "target": {"tags": {"site": "plant-7"}},\n "threshold": {"sensor": "temperature", "raise": "> 30", "raise_for": "1m", "clear": "< 28", "clear_for": "1m"}}' });
  async function saveRule() {
    let rule;
    try {
      rule = JSON.parse(ruleSpecIn.value);
    } catch (e) {
      setError("page", "The rule is not JSON: " + e.message);
      return;
    }
    try {
      await api("/alarm-rules/" + encodeURIComponent(rule.name || ""), {
        method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(rule),
      });
      ruleSpecIn.value = "";
      setError("page", null);
      loadRules();
    } catch (e) {
      pageError(e);
    }
  }
  async function deleteRule(name) {
    if (!confirm("Delete rule " + name + "? Its open alarms are cleared.")) return;
    try {
      await api("/alarm-rules/" + encodeURIComponent(name), { method: "DELETE" });
      loadRules();
      load();
    } catch (e) {
      pageError(e);
    }
  }
  view.replaceChildren(
    h("div", { class: "panel" }, h("h2", {}, "Alarms"),
      h("div", { class: "toolbar" }, stateSel, sevSel, deviceIn, ruleIn),
      h("table", {}, h("thead", {}, h("tr", {},
        h("th", {}, "Severity"), h("th", {}, "Device"), h("th", {}, "Rule"), h("th", {}, "State"),
        h("th", { class: "num" }, "Value"), h("th", {}, "Since"), h("th", { class: "num hide-narrow" }, "Count"),
        h("th", { class: "hide-narrow" }, "Note"), h("th", {}, ""))), tbody)),
    h("div", { class: "panel" }, h("h2", {}, "Rules"),
      h("table", {}, h("thead", {}, h("tr", {},
        h("th", {}, "Rule"), h("th", {}, "Severity"), h("th", {}, "Watches"), h("th", { class: "hide-narrow" }, "Target"),
        h("th", { class: "num" }, "Version"), h("th", {}, ""))), rulesBody),
      h("div", { class: "twin-edit" }, h("label", {}, "A rule (JSON; README \"Alarms\"): a new name creates it, an existing one replaces it", ruleSpecIn,
        h("button", { type: "button", id: "rule-save", onclick: () => saveRule() }, "Save rule")))),
  );
  let rows = [];
  function watches(r) {
    if (r.threshold) return r.threshold.sensor + " " + r.threshold.raise + (r.threshold.raise_for ? " for " + r.threshold.raise_for : "");
    if (r.rate) return r.rate.sensor + " change/min " + r.rate.raise + " over " + r.rate.window;
    if (r.inactivity) return "silent " + r.inactivity.after + (r.inactivity.sensor ? " (" + r.inactivity.sensor + ")" : "");
    return "";
  }
  async function act(a, what) {
    const note = prompt((what === "ack" ? "Acknowledge" : "Clear") + " alarm " + a.id + " (" + a.rule + " on " + a.device + "). Note:", "");
    if (note === null) return;
    try {
      await api("/alarms/" + a.id + "/" + what, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ note }),
      });
      load();
    } catch (e) {
      pageError(e);
    }
  }
  function draw() {
    tbody.replaceChildren(...rows.map((a) => h("tr", { "data-alarm": a.id },
      h("td", {}, h("span", { class: "badge sev-" + a.severity }, a.severity)),
      h("td", {}, h("a", { href: "#/devices/" + encodeURIComponent(a.device) }, a.device)),
      h("td", { title: a.sensor ? "sensor " + a.sensor : "" }, a.rule),
      h("td", {}, h("span", { class: "badge alarm-" + a.state }, a.state)),
      h("td", { class: "num" }, a.value === null || a.value === undefined ? "—" : fmtNum(a.value)),
      h("td", { title: fmtTime(a.started_ms) }, fmtAgo(a.started_ms)),
      h("td", { class: "num hide-narrow" }, a.count),
      h("td", { class: "hide-narrow" }, a.clear_note || a.ack_note || ""),
      h("td", {},
        a.state === "active" ? h("button", { type: "button", class: "secondary", "data-act": "ack", onclick: () => act(a, "ack") }, "Ack") : null,
        a.state !== "cleared" ? h("button", { type: "button", class: "secondary", "data-act": "clear", onclick: () => act(a, "clear") }, "Clear") : null))));
  }
  async function load() {
    const q = new URLSearchParams({ limit: "500" });
    if (stateSel.value) q.set("state", stateSel.value);
    if (sevSel.value) q.set("severity", sevSel.value);
    if (deviceIn.value.trim()) q.set("device", deviceIn.value.trim());
    if (ruleIn.value.trim()) q.set("rule", ruleIn.value.trim());
    try {
      rows = (await api("/alarms?" + q)).alarms;
      draw();
      refreshAlarmCount();
    } catch (e) {
      pageError(e);
    }
  }
  async function loadRules() {
    try {
      const rules = (await api("/alarm-rules")).rules;
      rulesBody.replaceChildren(...rules.map((r) => h("tr", { "data-rule": r.name },
        h("td", { title: r.description || "" }, r.name),
        h("td", {}, h("span", { class: "badge sev-" + r.severity }, r.severity)),
        h("td", {}, watches(r)),
        h("td", { class: "hide-narrow" }, r.target && r.target.device ? r.target.device
          : Object.entries((r.target && r.target.tags) || {}).map(([k, v]) => k + "=" + v).join(" ") || "every device"),
        h("td", { class: "num" }, r.version),
        h("td", {},
          h("button", { type: "button", class: "secondary", "data-edit": r.name, onclick: () => {
            const copy = Object.assign({}, r);
            for (const k of ["id", "version", "created_ms", "updated_ms"]) delete copy[k];
            ruleSpecIn.value = JSON.stringify(copy, null, 1);
          } }, "Edit"),
          h("button", { type: "button", class: "secondary", "data-delete": r.name, onclick: () => deleteRule(r.name) }, "Delete")))));
    } catch (e) {
      pageError(e);
    }
  }
  for (const el of [stateSel, sevSel, deviceIn, ruleIn]) el.addEventListener("change", load);
  load();
  loadRules();
  let soon = null;
  const stop = openEvents("kinds=alarm", {
    open: load,
    alarm: () => {
      if (!soon) soon = setTimeout(() => { soon = null; load(); }, 200);
    },
    resync: load,
  });
  return () => {
    clearTimeout(soon);
    stop();
  };
}

// Jobs: progress bars, pause / resume / cancel, and a new job from JSON.
function jobsPage() {
  const list = h("div", { id: "job-list" });
  const specIn = h("textarea", { id: "job-spec", rows: 6,
    placeholder: '{"name": "fw-1.4", "target": {"tags": {"site": "plant-7"}}, "desired": {"firmware": "1.4"},\n "rollout": {"per_minute": 60}, "concurrency": 10, "abort": {"failed_percent": 10}}' });
  view.replaceChildren(
    h("div", { class: "panel" }, h("h2", {}, "Jobs"), list),
    h("div", { class: "panel" }, h("h2", {}, "New job"),
      h("div", { class: "twin-edit" }, h("label", {}, "The job (JSON; README \"Jobs\")", specIn,
        h("button", { type: "button", id: "job-create", onclick: () => create() }, "Create")))),
  );
  async function create() {
    try {
      await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: specIn.value });
      specIn.value = "";
      load();
    } catch (e) {
      pageError(e);
    }
  }
  async function act(job, what) {
    if (what === "cancel" && !confirm("Cancel job " + job.id + " (" + job.name + ")?")) return;
    try {
      await api("/jobs/" + job.id + "/" + what, { method: "POST" });
      load();
    } catch (e) {
      pageError(e);
    }
  }
  function draw(jobs) {
    if (!jobs.length) {
      list.replaceChildren(h("p", { class: "muted" }, "No jobs yet."));
      return;
    }
    list.replaceChildren(...jobs.map((j) => {
      const c = j.counts;
      const done = c.succeeded + c.failed + c.timed_out + c.cancelled;
      const pct = (n) => (j.total ? (100 * n / j.total) : 0).toFixed(1) + "%";
      const active = j.state === "in_progress" || j.state === "paused";
      return h("div", { class: "job", "data-job": j.id },
        h("div", { class: "job-head" },
          h("strong", {}, "#" + j.id + " " + j.name), " ",
          h("span", { class: "badge job-" + j.state }, j.state.replace("_", " ")), " ",
          h("span", { class: "muted" }, done + " / " + j.total + " done · " + c.succeeded + " succeeded · " +
            (c.failed + c.timed_out) + " failed · " + c.in_progress + " in progress"),
          j.reason ? h("span", { class: "muted" }, " — " + j.reason) : null,
          h("span", { class: "job-actions" },
            j.state === "in_progress" ? h("button", { type: "button", class: "secondary", onclick: () => act(j, "pause") }, "Pause") : null,
            j.state === "paused" ? h("button", { type: "button", class: "secondary", onclick: () => act(j, "resume") }, "Resume") : null,
            active ? h("button", { type: "button", class: "secondary", onclick: () => act(j, "cancel") }, "Cancel") : null)),
        h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": j.total, "aria-valuenow": done },
          h("span", { class: "ok", style: "width:" + pct(c.succeeded) }),
          h("span", { class: "bad", style: "width:" + pct(c.failed + c.timed_out) }),
          h("span", { class: "cancelled", style: "width:" + pct(c.cancelled) }),
          h("span", { class: "running", style: "width:" + pct(c.in_progress) })));
    }));
  }
  async function load() {
    try {
      draw((await api("/jobs?limit=50")).jobs);
    } catch (e) {
      pageError(e);
    }
  }
  load();
  const timer = setInterval(load, 1000);
  return () => clearInterval(timer);
}

// Device: one chart per sensor (live last hour, or a longer bucketed
// range), and its commands.
const RANGES = {
  "1h": { ms: 3600e3, bucket: 10e3, live: true },
  "6h": { ms: 6 * 3600e3, bucket: 60e3 },
  "1d": { ms: 86400e3, bucket: 300e3 },
  "7d": { ms: 7 * 86400e3, bucket: 1800e3 },
};
const FINAL = new Set(["SUCCEEDED", "FAILED", "REJECTED", "EXPIRED", "CANCELLED"]);
const ORDER = { QUEUED: 0, SENT: 1, RECEIVED: 2 };
function rank(state) {
  return state in ORDER ? ORDER[state] : 3;
}

function devicePage(id) {
  const enc = encodeURIComponent(id);
  const head = h("div", { class: "panel", id: "device-head" }, h("h2", {}, id), h("p", { class: "muted" }, "Loading…"));
  const rangeBar = h("div", { class: "toolbar", id: "ranges" });
  const chartsEl = h("div", { class: "charts", id: "charts" });
  const cmdRows = h("tbody", { id: "command-rows" });
  const nameIn = h("input", { id: "cmd-name", value: "ping", list: "cmd-names", required: true });
  const paramsIn = h("input", { id: "cmd-params", value: "{}", placeholder: "{}" });
  const ttlIn = h("input", { id: "cmd-ttl", value: "", placeholder: "default" });
  const sendBtn = h("button", { type: "submit", id: "cmd-send" }, "Send");
  const form = h("form", { class: "send-form", id: "send-form" },
    h("label", {}, "Command", nameIn),
    h("label", {}, "Params (JSON)", paramsIn),
    h("label", {}, "TTL", ttlIn),
    sendBtn,
    h("datalist", { id: "cmd-names" }, ["ping", "set_rate", "set_batch", "reboot"].map((n) => h("option", { value: n }))));
  // The twin: desired, reported and delta side by side, desired and tags
  // editable (a desired change is conditional on the version shown).
  const twinDocs = h("div", { class: "twin-docs", id: "twin-docs" });
  const patchIn = h("textarea", { id: "desired-patch", rows: 3, placeholder: '{"sample_rate_hz": 2}' });
  const tagsIn = h("textarea", { id: "tags-edit", rows: 3, placeholder: "site=plant-7" });
  const twinForm = h("div", { class: "twin-edit" },
    h("label", {}, "Desired change (JSON merge patch; null deletes a key)", patchIn,
      h("button", { type: "button", id: "desired-apply", onclick: () => applyDesired() }, "Apply")),
    h("label", {}, "Tags (one key=value per line)", tagsIn,
      h("button", { type: "button", id: "tags-apply", class: "secondary", onclick: () => applyTags() }, "Save tags")));
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← Fleet")),
    head,
    h("div", { class: "panel", id: "twin" }, h("h2", {}, "Twin"), twinDocs, twinForm),
    h("div", { class: "panel" }, rangeBar, chartsEl),
    h("div", { class: "panel" }, h("h2", {}, "Commands"), form,
      h("table", {}, h("thead", {}, h("tr", {},
        h("th", {}, "Command"), h("th", {}, "State"), h("th", {}, "Progress"), h("th", { class: "hide-narrow" }, "Created"), h("th", {}, ""))), cmdRows)),
  );

  let range = "1h";
  let sensors = [];
  const series = new Map(); // sensor -> { chart, el, xs, avg, min, max, count }
  const commands = new Map(); // command_id -> { rec, trail: [] }
  let stopEvents = () => {};

  for (const name of Object.keys(RANGES)) {
    rangeBar.append(h("button", {
      type: "button", class: "secondary" + (name === range ? " active" : ""), "data-range": name,
      onclick: (ev) => {
        range = name;
        for (const b of rangeBar.children) b.classList.toggle("active", b === ev.target);
        loadCharts();
      },
    }, name === "1h" ? "1 h (live)" : name));
  }

  async function loadHead() {
    try {
      const d = await api("/devices/" + enc);
      const open = (await api("/alarms?state=open&limit=50&device=" + enc)).alarms;
      head.replaceChildren(
        h("h2", {}, d.device_id, " ", h("span", { class: "badge " + (d.online ? "online" : "offline"), id: "device-online" }, d.online ? "online" : "offline"),
          h("span", { id: "device-alarms" }, open.flatMap((a) => [" ", h("a", { href: "#/alarms?device=" + enc },
            h("span", { class: "badge sev-" + a.severity, title: a.state + " since " + fmtTime(a.started_ms) }, a.rule + (a.sensor ? " (" + a.sensor + ")" : "")))]))),
        h("dl", { class: "kv" },
          h("dt", {}, "Firmware"), h("dd", {}, d.firmware || "—"),
          h("dt", {}, "Tags"), h("dd", {}, Object.entries(d.tags).map(([k, v]) => h("span", { class: "label-chip" }, k + "=" + v))),
          h("dt", {}, "Last seen"), h("dd", {}, d.online ? "now (since " + fmtTime(d.online_since_ms) + ")" : fmtTime(d.last_seen_ms)),
          h("dt", {}, "Readings"), h("dd", {}, fmtNum(d.readings))));
    } catch (e) {
      pageError(e);
    }
  }

  let twin = null;
  function drawTwin(t) {
    // Events and answers may come in any order: keep the newest.
    if (twin && (t.desired_version < twin.desired_version || t.reported_version < twin.reported_version)) return;
    const tagsChanged = !twin || JSON.stringify(twin.tags) !== JSON.stringify(t.tags);
    twin = t;
    const doc = (title, id, version, value) => h("div", { class: "twin-doc" },
      h("h3", {}, title, version === null ? "" : h("span", { class: "muted" }, " v" + version)),
      h("pre", { id }, JSON.stringify(value, null, 2)));
    const inSync = Object.keys(t.delta).length === 0;
    twinDocs.replaceChildren(
      doc("Desired", "twin-desired", t.desired_version, t.desired),
      doc("Reported", "twin-reported", t.reported_version, t.reported),
      h("div", { class: "twin-doc" },
        h("h3", {}, "Delta ", h("span", { class: "badge " + (inSync ? "in-sync" : "out-of-sync"), id: "twin-sync" }, inSync ? "in sync" : "out of sync")),
        h("pre", { id: "twin-delta" }, JSON.stringify(t.delta, null, 2))));
    if (tagsChanged && document.activeElement !== tagsIn) {
      tagsIn.value = Object.entries(t.tags).map(([k, v]) => k + "=" + v).join("\n");
    }
  }

  async function loadTwin() {
    try {
      drawTwin(await api("/devices/" + enc + "/twin"));
    } catch (e) {
      pageError(e);
    }
  }

  async function patchTwin(body, ifMatch) {
    const headers = { "Content-Type": "application/merge-patch+json" };
    if (ifMatch !== undefined) headers["If-Match"] = '"' + ifMatch + '"';
    const t = await api("/devices/" + enc + "/twin", { method: "PATCH", headers, body: JSON.stringify(body) });
    setError("page", null);
    drawTwin(t);
  }

  async function applyDesired() {
    let patch;
    try {
      patch = JSON.parse(patchIn.value);
    } catch (e) {
      setError("page", "The desired change is not JSON: " + e.message);
      return;
    }
    try {
      await patchTwin({ desired: patch }, twin ? twin.desired_version : undefined);
      patchIn.value = "";
    } catch (e) {
      if (e.status === 412) {
        setError("page", "The desired state changed meanwhile; it is shown again. Apply once more to change it.");
        loadTwin();
      } else {
        pageError(e);
      }
    }
  }

  async function applyTags() {
    const wanted = {};
    for (const line of tagsIn.value.split("\n").map((l) => l.trim()).filter(Boolean)) {
      const at = line.indexOf("=");
      if (at <= 0) {
        setError("page", "A tag is key=value, not " + JSON.stringify(line));
        return;
      }
      wanted[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    const change = Object.assign({}, wanted);
    for (const k of Object.keys((twin && twin.tags) || {})) if (!(k in wanted)) change[k] = null;
    try {
      await patchTwin({ tags: change });
    } catch (e) {
      pageError(e);
    }
  }

  function setChartData(s) {
    const band = s.count.map((c) => c > 1);
    s.chart.setData([s.xs, s.avg, s.min.map((v, i) => (band[i] ? v : null)), s.max.map((v, i) => (band[i] ? v : null))]);
    s.el.dataset.points = String(s.xs.length);
    s.el.dataset.readings = String(s.count.reduce((a, b) => a + b, 0));
    s.el.dataset.lastTs = s.xs.length ? String(s.xs[s.xs.length - 1]) : "";
    s.el.dataset.live = String(s.live);
  }

  // One load at a time; a request during one runs once after it.
  let loading = null;
  let retry = null;
  let again = false;
  function loadCharts() {
    if (loading) {
      again = true;
      return loading;
    }
    loading = drawCharts().finally(() => {
      loading = null;
      if (again) {
        again = false;
        loadCharts();
      }
    });
    return loading;
  }

  async function drawCharts() {
    for (const s of series.values()) {
      charts.delete(s.chart);
      s.chart.destroy();
    }
    series.clear();
    chartsEl.replaceChildren();
    try {
      sensors = (await api("/devices/" + enc + "/sensors")).sensors;
    } catch (e) {
      pageError(e);
      chartsEl.append(h("p", { class: "muted" }, "Charts could not be loaded; trying again…"));
      retry = setTimeout(loadCharts, 5000);
      return;
    }
    if (!sensors.length) chartsEl.append(h("p", { class: "muted" }, "No readings stored for this device yet."));
    const r = RANGES[range];
    const since = Date.now() - r.ms;
    const boxes = sensors.map((sensor) => h("div", { class: "chart", "data-sensor": sensor }));
    chartsEl.append(...boxes);
    for (const [i, sensor] of sensors.entries()) {
      const el = boxes[i];
      const chart = makeChart(el, sensor, ["avg"], true, r.ms);
      charts.add(chart);
      // live: readings that arrived as events since the chart loaded.
      const s = { chart, el, xs: [], avg: [], min: [], max: [], count: [], sum: [], live: 0 };
      try {
        const res = await api("/devices/" + enc + "/readings?sensor=" + encodeURIComponent(sensor) +
          "&since=" + Math.floor(since) + "&bucket=" + r.bucket + "ms&agg=avg,min,max,count,sum");
        for (const b of res.buckets) {
          s.xs.push(b.start_ms / 1000);
          s.avg.push(b.avg);
          s.min.push(b.min);
          s.max.push(b.max);
          s.count.push(b.count);
          s.sum.push(b.sum);
        }
        setChartData(s);
      } catch (e) {
        pageError(e);
      }
      // Live readings fold in only after the history, in time order.
      series.set(sensor, s);
    }
  }

  // A live reading folds into its bucket of the 1 h chart.
  function addReading(rd) {
    if (!RANGES[range].live) return;
    const s = series.get(rd.sensor);
    if (!s) {
      // A sensor without a chart: load them again (once the current load
      // is done, if one runs).
      if (!sensors.includes(rd.sensor)) loadCharts();
      return;
    }
    const width = RANGES[range].bucket;
    const start = Math.floor(rd.ts_ms / width) * width / 1000;
    const last = s.xs.length - 1;
    if (last >= 0 && s.xs[last] === start) {
      s.count[last] += 1;
      s.sum[last] += rd.value;
      s.avg[last] = s.sum[last] / s.count[last];
      s.min[last] = Math.min(s.min[last], rd.value);
      s.max[last] = Math.max(s.max[last], rd.value);
    } else if (last < 0 || start > s.xs[last]) {
      s.xs.push(start);
      s.avg.push(rd.value);
      s.min.push(rd.value);
      s.max.push(rd.value);
      s.count.push(1);
      s.sum.push(rd.value);
    } else {
      return; // older than the newest bucket: the next reload has it
    }
    s.live += 1;
    const cutoff = (Date.now() - RANGES[range].ms) / 1000;
    while (s.xs.length && s.xs[0] < cutoff) {
      for (const a of [s.xs, s.avg, s.min, s.max, s.count, s.sum]) a.shift();
    }
    s.dirty = true;
  }
  const redraw = setInterval(() => {
    for (const s of series.values()) {
      if (s.dirty) {
        s.dirty = false;
        setChartData(s);
      }
    }
  }, 500);

  function drawCommands() {
    const list = [...commands.values()].sort((a, b) => b.rec.created_at_ms - a.rec.created_at_ms).slice(0, 50);
    cmdRows.replaceChildren(...list.map(({ rec, trail }) =>
      h("tr", { "data-command": rec.command_id },
        h("td", { title: rec.command_id }, rec.name, " ", h("span", { class: "muted" }, JSON.stringify(rec.params))),
        h("td", {}, h("span", { class: "badge " + rec.state, "data-state": rec.state }, rec.state)),
        h("td", { class: "trail" }, trail.join(" → "), rec.detail ? h("span", { class: "muted" }, " (" + rec.detail + ")") : null,
          rec.result !== null && rec.result !== undefined ? h("span", { class: "muted" }, " " + JSON.stringify(rec.result)) : null),
        h("td", { class: "hide-narrow" }, fmtTime(rec.created_at_ms)),
        h("td", {}, FINAL.has(rec.state) ? "" : h("button", {
          type: "button", class: "secondary",
          onclick: async () => {
            try {
              noteCommand(await api("/commands/" + encodeURIComponent(rec.command_id) + "/cancel", { method: "POST" }));
            } catch (e) {
              pageError(e);
            }
          },
        }, "Cancel")))));
  }

  // Keeps the newest state of each command and the states it went
  // through; events and answers may arrive in any order.
  function noteCommand(rec, history) {
    let c = commands.get(rec.command_id);
    if (!c) {
      c = { rec, trail: [] };
      commands.set(rec.command_id, c);
    }
    if (history) {
      for (const t of history) if (!c.trail.includes(t.state)) c.trail.push(t.state);
    }
    const newer = rec.updated_at_ms > c.rec.updated_at_ms ||
      (rec.updated_at_ms === c.rec.updated_at_ms && rank(rec.state) >= rank(c.rec.state));
    if (newer) c.rec = rec;
    if (!c.trail.includes(rec.state)) {
      c.trail.push(rec.state);
      c.trail.sort((a, b) => rank(a) - rank(b));
    }
    drawCommands();
  }

  async function loadCommands() {
    try {
      const res = await api("/commands?limit=20&device=" + enc);
      for (const rec of res.commands) {
        if (!commands.has(rec.command_id)) noteCommand(rec, [{ state: rec.state }]);
      }
      drawCommands();
    } catch (e) {
      pageError(e);
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let params;
    try {
      params = paramsIn.value.trim() ? JSON.parse(paramsIn.value) : {};
    } catch (e) {
      setError("page", "Params are not JSON: " + e.message);
      return;
    }
    const body = { device_id: id, name: nameIn.value.trim(), params };
    if (ttlIn.value.trim()) body.ttl = ttlIn.value.trim();
    sendBtn.disabled = true;
    try {
      const res = await api("/commands", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      setError("page", null);
      for (const rec of res.commands) noteCommand(rec);
    } catch (e) {
      pageError(e);
    } finally {
      sendBtn.disabled = false;
    }
  });

  loadHead();
  loadTwin();
  loadCharts().then(() => {
    stopEvents = openEvents("kinds=readings,commands,presence,twin,alarm&device=" + enc, {
      alarm: () => loadHead(),
      open: () => {
        loadHead();
        loadTwin();
        loadCommands();
      },
      twin: (ev) => {
        drawTwin(ev.twin);
        if (ev.part === "tags") loadHead();
      },
      readings: (ev) => ev.readings.forEach(addReading),
      skipped: () => {},
      command: (rec) => noteCommand(rec),
      presence: () => loadHead(),
      resync: () => {
        loadHead();
        loadTwin();
        loadCommands();
      },
    });
  });
  return () => {
    clearInterval(redraw);
    clearTimeout(retry);
    stopEvents();
  };
}

// Commands: the list, filterable by device and state, live.
function commandsPage() {
  const device = h("input", { type: "search", placeholder: "Device id", id: "filter-device" });
  const state = h("select", { id: "filter-state" }, h("option", { value: "" }, "any state"),
    ["QUEUED", "SENT", "RECEIVED", "SUCCEEDED", "FAILED", "REJECTED", "EXPIRED", "CANCELLED"].map((s) => h("option", { value: s }, s)));
  const tbody = h("tbody", { id: "commands-rows" });
  view.replaceChildren(h("div", { class: "panel" }, h("h2", {}, "Commands"),
    h("div", { class: "toolbar" }, device, state),
    h("table", {}, h("thead", {}, h("tr", {},
      h("th", {}, "Created"), h("th", {}, "Device"), h("th", {}, "Command"), h("th", {}, "State"),
      h("th", { class: "hide-narrow" }, "Attempts"), h("th", { class: "hide-narrow" }, "Detail"))), tbody)));
  let rows = [];
  function draw() {
    tbody.replaceChildren(...rows.map((c) => h("tr", { "data-command": c.command_id },
      h("td", {}, fmtTime(c.created_at_ms)),
      h("td", {}, h("a", { href: "#/devices/" + encodeURIComponent(c.device_id) }, c.device_id)),
      h("td", { title: c.command_id }, c.name),
      h("td", {}, h("span", { class: "badge " + c.state }, c.state)),
      h("td", { class: "num hide-narrow" }, c.attempts),
      h("td", { class: "hide-narrow" }, c.detail))));
  }
  async function load() {
    const q = new URLSearchParams({ limit: "200" });
    if (device.value.trim()) q.set("device", device.value.trim());
    if (state.value) q.set("state", state.value);
    try {
      rows = (await api("/commands?" + q)).commands;
      draw();
    } catch (e) {
      pageError(e);
    }
  }
  device.addEventListener("change", load);
  state.addEventListener("change", load);
  load();
  const stop = openEvents("kinds=commands", {
    command: (rec) => {
      const i = rows.findIndex((c) => c.command_id === rec.command_id);
      const wanted = (!device.value.trim() || rec.device_id === device.value.trim()) && (!state.value || rec.state === state.value);
      if (i >= 0) {
        if (wanted) rows[i] = rec;
        else rows.splice(i, 1);
      } else if (wanted) {
        rows.unshift(rec);
      }
      draw();
    },
    resync: load,
  });
  return stop;
}

// Hub: the live counters.
function hubPage() {
  const dl = h("dl", { class: "kv", id: "hub-stats" });
  const grafana = h("p", { id: "grafana" },
    "Grafana: add a Prometheus data source with this hub's URL (and an operator token as ",
    h("code", {}, "Authorization: Bearer …"), "), then import the ",
    h("a", { href: "/assets/grafana/telemetry-hub-fleet.json", download: "telemetry-hub-fleet.json" }, "fleet dashboard"),
    ".");
  view.replaceChildren(h("div", { class: "panel" }, h("h2", {}, "Hub"), dl, grafana));
  function draw(s) {
    dl.replaceChildren(...Object.entries(s).flatMap(([k, v]) => [
      h("dt", {}, k.replaceAll("_", " ")),
      h("dd", { "data-stat": k }, typeof v === "boolean" ? (v ? "yes" : "no") : fmtNum(v)),
    ]));
  }
  api("/stats").then(draw, pageError);
  return openEvents("kinds=stats", { stats: draw });
}

route();
