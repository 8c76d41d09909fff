// The peerkit dashboard page: built on the JavaScript client (peerkit.js), plots with the
// vendored uPlot (loaded before this module as the global `uPlot`).
//
// Address options (query string): token (the broker's), broker (a ws:// URL of a broker
// that speaks JSON itself; default: this dashboard's bridge), id (this page's peer id),
// trace, sender, field, dtype, show, window (the signal to plot), poll (seconds).

import { connect, decodeSamples, localNow } from "./peerkit.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = params.get("token") ?? "";
const scheme = location.protocol === "https:" ? "wss" : "ws";
const brokerUrl =
  params.get("broker") ??
  `${scheme}://${location.host}/ws${token ? `?token=${encodeURIComponent(token)}` : ""}`;
const pollMs = Number(params.get("poll") ?? 1) * 1000;
const GONE_ROWS_KEPT = 30; // seconds a peer that left stays in the table
const KNOWN_STATES = new Set(["connected", "ready", "running", "shutting_down", "finished", "left"]);

/** The page's state, also for tests and the curious: window.peerkitDashboard. */
const dash = {
  peerId: params.get("id") ?? `dashboard-${Math.random().toString(36).slice(2, 8)}`,
  peer: null,
  status: "connecting",
  peers: new Map(), // id -> {info, firstSeen, prev, rateIn, rateOut, gone, goneAt}
  polls: 0,
  rtt: null,
  trace: null,
  draws: 0,
  control,
};
window.peerkitDashboard = dash;

// ----------------------------------------------------------------------------- helpers

function event(text, kind = "") {
  const li = document.createElement("li");
  const time = new Date().toLocaleTimeString();
  li.textContent = `${time}  ${text}`;
  if (kind) li.className = kind;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

function setStatus(status, text) {
  dash.status = status;
  const el = $("status");
  el.className = `status ${status}`;
  el.textContent = text;
}

function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

function formatRate(rate) {
  if (!Number.isFinite(rate)) return "–";
  if (rate >= 10000) return `${(rate / 1000).toFixed(0)} k`;
  if (rate >= 100) return rate.toFixed(0);
  return rate.toFixed(1);
}

function formatMs(seconds) {
  if (seconds === null || !Number.isFinite(seconds)) return "–";
  return `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
}

function cell(row, text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function quantile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

// ----------------------------------------------------------------------------- peers

async function poll() {
  const started = performance.now();
  try {
    const info = await dash.peer.info();
    dash.rtt = (performance.now() - started) / 1000;
    render(info);
  } catch (err) {
    if (dash.status === "connected") event(`broker info failed: ${err.message}`, "bad");
  }
  if (dash.status === "connected") dash.pollTimer = setTimeout(poll, pollMs);
}

function pollSoon() {
  clearTimeout(dash.pollTimer);
  dash.pollTimer = setTimeout(poll, 100);
}

function render(info) {
  const now = localNow();
  const seen = new Set();
  let rateIn = 0;
  let rateOut = 0;
  let queued = 0;
  let dropped = 0;
  for (const p of info.peers) {
    seen.add(p.peer_id);
    let rec = dash.peers.get(p.peer_id);
    if (rec === undefined || rec.gone) {
      rec = { firstSeen: now, prev: null, rateIn: 0, rateOut: 0, gone: false, info: null };
      dash.peers.set(p.peer_id, rec);
      if (dash.polls > 0) event(`${p.peer_id} joined`);
    } else if (rec.info.state !== p.state) {
      event(`${p.peer_id}: ${rec.info.state} → ${p.state}`);
    }
    if (rec.prev !== null) {
      const dt = Math.max(now - rec.prev.t, 1e-3);
      rec.rateOut = Math.max(0, (p.msgs_in - rec.prev.msgs_in) / dt);
      rec.rateIn = Math.max(0, (p.msgs_out - rec.prev.msgs_out) / dt);
    }
    rec.prev = { t: now, msgs_in: p.msgs_in, msgs_out: p.msgs_out };
    rec.info = p;
    rateOut += rec.rateOut;
    rateIn += rec.rateIn;
    queued += p.queued;
    dropped += p.dropped;
  }
  for (const [id, rec] of dash.peers) {
    if (!seen.has(id) && !rec.gone) {
      rec.gone = true;
      rec.goneAt = now;
      rec.info = { ...rec.info, state: "left" };
      event(`${id} left`);
    } else if (rec.gone && now - rec.goneAt > GONE_ROWS_KEPT) {
      dash.peers.delete(id);
    }
  }
  dash.polls += 1;
  renderTable(now);
  renderTypes(info.types || [], now);
  $("fig-peers").textContent = String(seen.size);
  $("fig-in").textContent = formatRate(rateOut);
  $("fig-out").textContent = formatRate(rateIn);
  $("fig-queued").textContent = String(queued);
  $("fig-dropped").textContent = String(dropped);
  $("fig-rtt").textContent = formatMs(dash.rtt);
  $("fig-decode").textContent = String(dash.peer.stats.decodeErrors);
  updateTraceChoices(info);
}

/** The broker's traffic per message type, with rates from the previous poll. */
function renderTypes(types, now) {
  const prev = dash.typesPrev || new Map();
  const next = new Map();
  const body = $("types").tBodies[0];
  const rows = [];
  for (const t of types) {
    const before = prev.get(t.msg_type);
    const dt = before ? Math.max(now - before.t, 1e-3) : null;
    const rate = (key) => (dt === null ? 0 : Math.max(0, (t[key] - before[key]) / dt));
    next.set(t.msg_type, { t: now, published: t.published, routed: t.routed, queries: t.queries });
    const tr = document.createElement("tr");
    tr.dataset.type = t.msg_type;
    for (const text of [
      t.msg_type,
      formatRate(rate("published")),
      formatRate(rate("routed")),
      formatRate(rate("queries")),
      String(t.published),
      String(t.routed),
      String(t.queries),
      t.answered ? Number(t.answer_ms).toFixed(3) : "–",
    ]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    rows.push(tr);
  }
  dash.typesPrev = next;
  body.replaceChildren(...rows);
}

function renderTable(now) {
  const body = $("peers").tBodies[0];
  const rows = [];
  const ids = [...dash.peers.keys()].sort();
  for (const id of ids) {
    const rec = dash.peers.get(id);
    const p = rec.info;
    const tr = document.createElement("tr");
    tr.dataset.peer = id;
    if (rec.gone) tr.className = "gone";
    cell(tr, id, "peer");
    const known = KNOWN_STATES.has(p.state);
    cell(tr, p.state, `state state-${known ? p.state : "custom"}`);
    const since = typeof p.connected_at === "number" ? dash.peer.brokerNow() - p.connected_at : now - rec.firstSeen;
    cell(tr, rec.gone ? "–" : formatDuration(since), "num");
    cell(tr, formatRate(rec.rateOut), "num");
    cell(tr, formatRate(rec.rateIn), "num");
    cell(tr, String(p.msgs_in), "num");
    cell(tr, String(p.msgs_out), "num");
    cell(tr, String(p.queued), "num");
    cell(tr, String(p.dropped), "num");
    cell(tr, (p.subscriptions ?? []).join(", "), "small");
    cell(tr, (p.query_handlers ?? []).join(", "), "small");
    const actions = cell(tr, "");
    if (!rec.gone && id !== dash.peerId) {
      for (const action of ["start", "stop", "close"]) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = action;
        button.dataset.peer = id;
        button.dataset.action = action;
        actions.append(button);
      }
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

async function control(id, action) {
  event(`${action} ${id}…`);
  try {
    const answer = await dash.peer.askPeer(id, "PeerControlMessage", { peer_id: id, action }, { timeout: 10 });
    event(`${id}: ${answer.fields.detail || "ok"}`);
    return answer;
  } catch (err) {
    event(`${action} ${id} failed: ${err.message}`, "bad");
    return null;
  } finally {
    pollSoon();
  }
}

// ----------------------------------------------------------------------------- signal

function updateTraceChoices(info) {
  const types = new Set();
  for (const p of info.peers) {
    for (const sub of p.subscriptions ?? []) types.add(sub.split("@")[0]);
  }
  const list = $("trace-types");
  const current = [...list.options].map((o) => o.value).join("\n");
  const sorted = [...types].sort();
  if (current !== sorted.join("\n")) {
    list.replaceChildren(...sorted.map((t) => Object.assign(document.createElement("option"), { value: t })));
  }
  const select = $("trace-sender");
  const senders = info.peers.map((p) => p.peer_id).filter((id) => id !== dash.peerId);
  const have = [...select.options].slice(1).map((o) => o.value);
  const chosen = select.value;
  if (have.join("\n") !== senders.join("\n")) {
    const options = senders.map((id) => Object.assign(document.createElement("option"), { value: id, textContent: id }));
    select.replaceChildren(Object.assign(document.createElement("option"), { value: "", textContent: "every peer" }), ...options);
    select.value = senders.includes(chosen) ? chosen : "";
  }
}

const COLORS = (n) => Array.from({ length: n }, (_, i) => `hsl(${(i * 137.5) % 360}, 65%, 42%)`);

class Trace {
  constructor(type, sender) {
    this.type = type;
    this.sender = sender;
    this.field = params.get("field") ?? "";
    this.fields = [];
    this.received = 0;
    this.chunks = []; // {t0, dt, n, channels, data}
    this.lastSampleTime = null;
    this.latencies = []; // [arrival, seconds]
    this.arrivals = [];
    this.plot = null;
    this.plotKey = "";
    this.spacing = 1;
    this.dtEstimate = null;
    this.lastArrival = null;
    this.subscription = null;
  }

  async start() {
    this.subscription = await dash.peer.subscribe(this.type, (msg) => this.take(msg), { sender: this.sender });
  }

  stop() {
    this.subscription?.unsubscribe().catch(() => {});
    this.plot?.destroy();
    this.plot = null;
  }

  take(msg) {
    const arrival = dash.peer.brokerNow();
    this.received += 1;
    this.arrivals.push(arrival);
    const f = msg.fields;
    if (this.fields.length === 0) this.learnFields(f);
    const value = f[this.field];
    if (value === undefined) return;
    const stamp = typeof f.timestamp === "number" ? f.timestamp : null;
    let chunk;
    if (value instanceof Uint8Array) {
      const channels = Number.isInteger(f.channel_count) && f.channel_count > 0 ? f.channel_count : Number($("trace-channels").value) || 1;
      if (Number.isInteger(f.channel_count)) $("trace-channels").value = String(channels);
      const data = decodeSamples(value, $("trace-dtype").value);
      const n = Math.floor(data.length / channels);
      let dt;
      if (typeof f.sampling_rate === "number" && f.sampling_rate > 0) {
        dt = 1 / f.sampling_rate;
      } else {
        if (this.lastArrival !== null && n > 0) {
          const guess = (arrival - this.lastArrival) / n;
          this.dtEstimate = this.dtEstimate === null ? guess : 0.9 * this.dtEstimate + 0.1 * guess;
        }
        dt = this.dtEstimate ?? 1e-3;
      }
      // a chunk's timestamp is when it was complete (its last sample's time)
      const t0 = (stamp ?? arrival) - n * dt;
      chunk = { t0, dt, n, channels, data };
      if (stamp !== null) this.latencies.push([arrival, arrival - stamp]);
    } else {
      const number = Number(value);
      if (!Number.isFinite(number)) return;
      const t0 = stamp ?? arrival;
      chunk = { t0, dt: 0, n: 1, channels: 1, data: [number] };
      if (stamp !== null) this.latencies.push([arrival, arrival - stamp]);
    }
    this.lastArrival = arrival;
    this.chunks.push(chunk);
    this.lastSampleTime = chunk.t0 + (chunk.n - 1) * chunk.dt;
  }

  learnFields(fields) {
    this.fields = Object.entries(fields)
      .filter(([, v]) => v instanceof Uint8Array || typeof v === "number" || typeof v === "bigint")
      .map(([k, v]) => ({ name: k, bytes: v instanceof Uint8Array }));
    if (!this.fields.some((f) => f.name === this.field)) {
      const pick =
        this.fields.find((f) => f.name === "samples") ??
        this.fields.find((f) => f.bytes) ??
        this.fields.find((f) => !["seq", "timestamp"].includes(f.name)) ??
        this.fields[0];
      this.field = pick?.name ?? "";
    }
    const select = $("trace-field");
    select.replaceChildren(
      ...this.fields.map((f) =>
        Object.assign(document.createElement("option"), { value: f.name, textContent: f.bytes ? `${f.name} (bytes)` : f.name }),
      ),
    );
    select.value = this.field;
  }

  draw() {
    const now = dash.peer.brokerNow();
    const windowSec = Math.max(1, Number($("trace-window").value) || 5);
    const from = now - windowSec;
    while (this.chunks.length > 0) {
      const c = this.chunks[0];
      if (c.t0 + c.n * c.dt >= from - 1) break;
      this.chunks.shift();
    }
    const channels = this.chunks.length ? this.chunks[this.chunks.length - 1].channels : 1;
    const show = Math.max(1, Math.min(channels, Number($("trace-show").value) || 1));
    const key = `${this.type}|${this.field}|${show}`;
    if (this.plot === null || this.plotKey !== key) this.makePlot(show, key);
    let total = 0;
    for (const c of this.chunks) total += c.n;
    const xs = new Float64Array(total);
    const ys = Array.from({ length: show }, () => new Float64Array(total));
    let k = 0;
    let peak = 0;
    for (const c of this.chunks) {
      const use = Math.min(show, c.channels);
      for (let i = 0; i < c.n; i++, k++) {
        xs[k] = c.t0 + i * c.dt;
        for (let ch = 0; ch < use; ch++) {
          const v = c.data[i * c.channels + ch];
          ys[ch][k] = v;
          const a = Math.abs(v);
          if (a > peak) peak = a;
        }
      }
    }
    if (show > 1) {
      // stack the channels, channel 0 on top, each 2.2 peaks below the one before
      this.spacing = peak > 0 ? 0.8 * this.spacing + 0.2 * 2.2 * peak : this.spacing;
      for (let ch = 0; ch < show; ch++) {
        const offset = -ch * this.spacing;
        const y = ys[ch];
        for (let i = 0; i < y.length; i++) y[i] += offset;
      }
    }
    this.plot.batch(() => {
      this.plot.setData([xs, ...ys], false);
      this.plot.setScale("x", { min: from, max: now });
    });
    dash.draws += 1;
    this.updateStats(now);
  }

  makePlot(show, key) {
    this.plot?.destroy();
    const el = $("plot");
    el.replaceChildren();
    const colors = COLORS(show);
    this.plot = new uPlot(
      {
        width: Math.max(300, el.clientWidth - 2),
        height: 320,
        scales: { x: { time: true }, y: { auto: true } },
        legend: { show: show <= 8 },
        cursor: { drag: { x: false, y: false } },
        series: [
          {},
          ...colors.map((stroke, ch) => ({ label: show > 1 ? `ch ${ch}` : this.field, stroke, width: 1, points: { show: false } })),
        ],
      },
      [[], ...colors.map(() => [])],
      el,
    );
    this.plotKey = key;
  }

  updateStats(now) {
    if (now - (this.statsAt ?? 0) < 1) return;
    this.statsAt = now;
    this.arrivals = this.arrivals.filter((t) => t >= now - 5);
    this.latencies = this.latencies.filter(([t]) => t >= now - 10);
    const rate = this.arrivals.length / 5;
    const sorted = this.latencies.map(([, l]) => l).sort((a, b) => a - b);
    const last = this.chunks[this.chunks.length - 1];
    const what = last
      ? last.n > 1 || last.channels > 1
        ? `${last.channels} channels × ${last.n} samples (${$("trace-dtype").value})`
        : "a number per message"
      : "nothing yet";
    let text = `${this.type}${this.sender ? ` from ${this.sender}` : ""}: ${formatRate(rate)} msgs/s · ${this.field || "?"}: ${what}`;
    if (sorted.length > 0) {
      this.latency = { median: quantile(sorted, 0.5), p99: quantile(sorted, 0.99), count: sorted.length };
      text += ` · latency (sample time → this page) median ${formatMs(this.latency.median)}, p99 ${formatMs(this.latency.p99)}`;
    }
    $("trace-stats").textContent = text;
  }
}

async function setTrace() {
  const type = $("trace-type").value.trim();
  const sender = $("trace-sender").value;
  if (dash.trace !== null && dash.trace.type === type && dash.trace.sender === sender) return;
  dash.trace?.stop();
  dash.trace = null;
  if (!type || dash.status !== "connected") return;
  const trace = new Trace(type, sender);
  dash.trace = trace;
  try {
    await trace.start();
    event(`plotting ${type}${sender ? ` from ${sender}` : ""}`);
  } catch (err) {
    event(`cannot subscribe to ${type}: ${err.message}`, "bad");
  }
}

function frame() {
  const trace = dash.trace;
  const now = performance.now();
  if (trace !== null && dash.status === "connected" && now - (dash.lastDraw ?? 0) >= 50) {
    dash.lastDraw = now;
    try {
      trace.draw();
    } catch (err) {
      event(`plot: ${err.message}`, "bad");
      trace.stop();
      dash.trace = null;
    }
  }
  requestAnimationFrame(frame);
}

// ----------------------------------------------------------------------------- start

async function syncClock() {
  try {
    const { offset, rtt } = await dash.peer.syncClock();
    $("fig-offset").textContent = `${formatMs(offset)} ± ${formatMs(rtt / 2)}`;
  } catch (err) {
    event(`clock: ${err.message}`, "bad");
  }
}

async function main() {
  $("broker-url").textContent = params.has("broker") ? brokerUrl : `${location.host} → broker`;
  for (const [param, id] of [
    ["trace", "trace-type"],
    ["dtype", "trace-dtype"],
    ["show", "trace-show"],
    ["window", "trace-window"],
  ]) {
    if (params.has(param)) $(id).value = params.get(param);
  }
  try {
    dash.peer = await connect(brokerUrl, {
      peerId: dash.peerId,
      token,
      state: "running",
      onError: (err) => event(`error: ${err.message}`, "bad"),
      onDropped: (count) => event(`the broker dropped ${count} messages for this page`, "bad"),
      onClose: (err) => {
        setStatus("lost", err ? `disconnected: ${err.message}` : "closed");
        event(err ? `disconnected: ${err.message}` : "closed", "bad");
      },
    });
  } catch (err) {
    setStatus("lost", `not connected: ${err.message}`);
    event(`could not connect: ${err.message}`, "bad");
    return;
  }
  setStatus("connected", `connected as ${dash.peerId}`);
  await dash.peer.subscribe("PanickMsg", (m) => event(`${m.sender} failed: ${m.fields.error_type}: ${m.fields.message}`, "bad"));
  await dash.peer.subscribe("PeerLeft", (m) => event(`${m.sender} left: ${m.fields.reason}`));
  await syncClock();
  setInterval(syncClock, 30000);
  $("peers").tBodies[0].addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (button) control(button.dataset.peer, button.dataset.action);
  });
  $("trace-form").addEventListener("change", (ev) => {
    if (ev.target.id === "trace-field" && dash.trace) {
      dash.trace.field = ev.target.value;
      dash.trace.chunks = [];
    } else if (ev.target.id === "trace-dtype" && dash.trace) {
      dash.trace.chunks = [];
    } else {
      setTrace();
    }
  });
  $("trace-form").addEventListener("submit", (ev) => ev.preventDefault());
  if (params.has("sender")) {
    const option = Object.assign(document.createElement("option"), { value: params.get("sender"), textContent: params.get("sender") });
    $("trace-sender").append(option);
    $("trace-sender").value = params.get("sender");
  }
  await poll();
  await setTrace();
  requestAnimationFrame(frame);
}

main();
