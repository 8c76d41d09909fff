// peerkit.js: the peerkit JavaScript client. One ES module, no build step, no dependencies.
//
// A browser (or Node) becomes a peer like any other: it connects to the broker over a
// WebSocket that negotiates the JSON subprotocol, says hello, publishes, subscribes, queries
// and answers queries, sends heartbeats, reports its state and says goodbye. Messages keep
// their type and field names; bytes fields are Uint8Array here and `bytes` in Python.
//
//   import { connect } from "./peerkit.js";
//   const peer = await connect("ws://127.0.0.1:8765", { peerId: "stimulus" });
//   await peer.subscribe("SignalChunk", (msg) => console.log(msg.sender, msg.fields.seq));
//   peer.publish("Marker", { label: "go", time: peer.brokerNow() });
//   const answer = await peer.query("Double", { value: 21 }, { timeout: 2 });
//   await peer.close();
//
// The wire format is described in docs/browser.rst (and peerkit/jsonwire.py).

/** Protocol version said in the hello (peerkit.protocol.PROTOCOL_VERSION). */
export const PROTOCOL_VERSION = 2;
/** The WebSocket subprotocol of the JSON wire. */
export const SUBPROTOCOL = `peerkit.json.v${PROTOCOL_VERSION}`;

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const BROKER_TIME_TYPE = "peerkit.BrokerTime";
const CONTROL_TYPE = "PeerControlMessage";

// ----------------------------------------------------------------------------- errors

/** Base class of every error this client raises on purpose. */
export class PeerkitError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The broker refused the hello (`reason`: duplicate_id, bad_token, bad_version, ...). */
export class HandshakeRejected extends PeerkitError {
  constructor(reason, detail) {
    super(detail);
    this.reason = reason;
  }
}

/** The connection to the broker was lost, or the peer was closed meanwhile. */
export class BrokerLostError extends PeerkitError {}

/** The broker refused a request (a subscription, a handler registration). */
export class RequestError extends PeerkitError {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.code = code;
    this.detail = detail;
  }
}

/** A query got no response: `code` says why (no_handler, handler_gone, remote_error,
 * multiple, timeout, ...); for remote_error, `peerId` and `errorType` name the culprit. */
export class QueryError extends PeerkitError {
  constructor(code, detail, { peerId = "", errorType = "", peers = [] } = {}) {
    super(code === "remote_error" ? `peer '${peerId}' raised ${errorType}: ${detail}` : detail);
    this.code = code;
    this.detail = detail;
    this.peerId = peerId;
    this.errorType = errorType;
    this.peers = peers;
  }
}

/** No answer arrived within the query's timeout. */
export class QueryTimeout extends QueryError {}

// ----------------------------------------------------------------------------- values

/** Seconds since the epoch, with the resolution of performance.now(). */
export function localNow() {
  return (performance.timeOrigin + performance.now()) / 1000;
}

function b64encode(bytes) {
  if (typeof bytes.toBase64 === "function") return bytes.toBase64();
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function b64decode(text) {
  if (typeof text !== "string") throw new PeerkitError("$bytes holds a base64 string");
  if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(text);
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function setOwn(target, key, value) {
  if (key === "__proto__") {
    Object.defineProperty(target, key, { value, enumerable: true, writable: true });
  } else {
    target[key] = value;
  }
}

/**
 * A JavaScript value as it travels in JSON: Uint8Array, ArrayBuffer and typed arrays
 * become {"$bytes": base64}, NaN and ±Infinity {"$float": ...}, BigInt beyond
 * Number.MAX_SAFE_INTEGER {"$int": digits}, an object whose only key starts with "$"
 * {"$map": {...}}. Fields that are `undefined` are left out.
 */
export function toWire(value) {
  if (value === null || value === undefined) return null;
  switch (typeof value) {
    case "string":
    case "boolean":
      return value;
    case "number":
      if (Number.isFinite(value)) return value;
      return { $float: Number.isNaN(value) ? "NaN" : value > 0 ? "Infinity" : "-Infinity" };
    case "bigint":
      return value >= -MAX_SAFE && value <= MAX_SAFE ? Number(value) : { $int: value.toString() };
    case "object": {
      if (value instanceof Uint8Array) return { $bytes: b64encode(value) };
      if (ArrayBuffer.isView(value)) {
        return { $bytes: b64encode(new Uint8Array(value.buffer, value.byteOffset, value.byteLength)) };
      }
      if (value instanceof ArrayBuffer) return { $bytes: b64encode(new Uint8Array(value)) };
      if (Array.isArray(value)) return value.map(toWire);
      const out = {};
      let count = 0;
      let last = "";
      for (const [key, item] of Object.entries(value)) {
        if (item === undefined) continue;
        setOwn(out, key, toWire(item));
        count += 1;
        last = key;
      }
      return count === 1 && last.startsWith("$") ? { $map: out } : out;
    }
    default:
      throw new PeerkitError(
        `cannot send a ${typeof value} value: use numbers, strings, booleans, null, arrays, ` +
          "objects, BigInt or Uint8Array (bytes)",
      );
  }
}

/** The JavaScript value of JSON from the wire: the tags of toWire() resolved. */
export function fromWire(value) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(fromWire);
  const keys = Object.keys(value);
  if (keys.length === 1 && keys[0].startsWith("$")) {
    const inner = value[keys[0]];
    switch (keys[0]) {
      case "$bytes":
        return b64decode(inner);
      case "$float":
        return Number(inner);
      case "$int":
        return BigInt(inner);
      case "$map": {
        const out = {};
        for (const key of Object.keys(inner)) setOwn(out, key, fromWire(inner[key]));
        return out;
      }
      default:
        throw new PeerkitError(`unknown tag ${keys[0]} (tags are $bytes, $float, $int, $map)`);
    }
  }
  const out = {};
  for (const key of keys) setOwn(out, key, fromWire(value[key]));
  return out;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * The numbers packed in a bytes field, little-endian: `dtype` is "float32" (the demo's
 * SignalChunk), "float64", "int16" or "int32". Returns a typed array.
 */
export function decodeSamples(bytes, dtype = "float32") {
  const types = {
    float32: Float32Array,
    float64: Float64Array,
    int16: Int16Array,
    int32: Int32Array,
  };
  const Type = types[dtype];
  if (!Type) throw new PeerkitError(`dtype must be one of ${Object.keys(types).join(", ")}`);
  const size = Type.BYTES_PER_ELEMENT;
  const count = Math.floor(bytes.byteLength / size);
  if (LITTLE_ENDIAN && bytes.byteOffset % size === 0) {
    return new Type(bytes.buffer, bytes.byteOffset, count);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Type(count);
  const get = {
    float32: (i) => view.getFloat32(i, true),
    float64: (i) => view.getFloat64(i, true),
    int16: (i) => view.getInt16(i, true),
    int32: (i) => view.getInt32(i, true),
  }[dtype];
  for (let i = 0; i < count; i++) out[i] = get(i * size);
  return out;
}

// ----------------------------------------------------------------------------- the peer

/**
 * Connect to the broker at `url` (ws:// or wss://) and say hello; resolves to a Peer once
 * the broker welcomed it.
 *
 * Options: `peerId` (required, unique on the broker), `token` (the broker's shared secret,
 * if it has one), `connectTimeout` (seconds, default 10), `requestTimeout` (seconds a
 * subscription or registration may take, default 10), `queryTimeout` (default for
 * query(), 5 s), `WebSocket` (an implementation, for Node before 22: the `ws` package's),
 * `onError(err)` (a handler failed or the broker refused something; default:
 * console.error), `onDropped(count)`, `onShutdown()`, `onClose(err|null)`, `onControl(action,
 * msg)` (answer PeerControlMessage start/stop/close yourself).
 */
export async function connect(url, options = {}) {
  const { peerId, token = "", connectTimeout = 10 } = options;
  if (typeof peerId !== "string" || peerId === "") {
    throw new PeerkitError(
      "connect(url, {peerId}) needs a peerId: a non-empty string no other peer uses",
    );
  }
  const Impl = options.WebSocket ?? globalThis.WebSocket;
  if (typeof Impl !== "function") {
    throw new PeerkitError(
      "no WebSocket implementation here: in Node before 22, pass {WebSocket} from the 'ws' package",
    );
  }
  let ws;
  try {
    ws = new Impl(url, [SUBPROTOCOL]);
  } catch (err) {
    throw new PeerkitError(`not a usable WebSocket address ${JSON.stringify(url)}: ${err.message}`);
  }
  const first = await new Promise((resolve, reject) => {
    const fail = (text) => {
      clearTimeout(timer);
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close();
      } catch {
        // already closing
      }
      reject(typeof text === "string" ? new BrokerLostError(text) : text);
    };
    const timer = setTimeout(
      () => fail(`the broker at ${url} did not welcome '${peerId}' within ${connectTimeout} s`),
      connectTimeout * 1000,
    );
    ws.onerror = () => {}; // the close event that follows says it
    ws.onclose = (ev) =>
      fail(
        `could not connect to the broker at ${url} (WebSocket closed, code ${ev.code}` +
          `${ev.reason ? `: ${ev.reason}` : ""}); is it running, and does it speak ${SUBPROTOCOL}?`,
      );
    ws.onopen = () => {
      if (ws.protocol !== SUBPROTOCOL) {
        fail(
          `the server at ${url} did not accept the ${SUBPROTOCOL} subprotocol ` +
            `(it answered ${JSON.stringify(ws.protocol)}): it is not a peerkit broker with ` +
            "browser support, or a different version",
        );
        return;
      }
      ws.send(
        JSON.stringify({
          kind: "HELLO",
          body: { peer_id: peerId, protocol_version: PROTOCOL_VERSION, token },
        }),
      );
    };
    ws.onmessage = (ev) => {
      let objects;
      try {
        objects = JSON.parse(ev.data);
      } catch {
        fail(`the broker at ${url} answered the hello with something that is not JSON`);
        return;
      }
      objects = Array.isArray(objects) ? objects : [objects];
      const answer = objects[0] ?? {};
      if (answer.kind === "REJECT") {
        const body = answer.body ?? {};
        fail(new HandshakeRejected(body.reason, `the broker rejected '${peerId}': ${body.detail}`));
      } else if (answer.kind === "WELCOME") {
        clearTimeout(timer);
        resolve(objects);
      } else {
        fail(`unexpected answer to the hello: ${JSON.stringify(answer.kind)}`);
      }
    };
  });
  const peer = new Peer(ws, url, peerId, first[0].body, options);
  for (const obj of first.slice(1)) peer._handle(obj);
  return peer;
}

/** A connected peer; made by connect(). */
export class Peer {
  constructor(ws, url, peerId, welcome, options) {
    this.url = url;
    this.peerId = peerId;
    /** What the broker said in its welcome: heartbeat_interval, heartbeat_timeout,
     * max_message_size. */
    this.welcome = welcome;
    /** The state last reported to the broker (the broker starts at "connected"). */
    this.state = "connected";
    /** Counters: published, received, dropped (told by the broker), decodeErrors,
     * queriesSent, queriesAnswered, handlerErrors. */
    this.stats = {
      published: 0,
      received: 0,
      dropped: 0,
      decodeErrors: 0,
      queriesSent: 0,
      queriesAnswered: 0,
      handlerErrors: 0,
    };
    /** Broker time minus local time, in seconds (see syncClock). */
    this.clockOffset = 0;
    /** Round trip of the best clock sample, in seconds (null before syncClock). */
    this.clockRtt = null;

    this._ws = ws;
    this._options = options;
    this._queryTimeout = options.queryTimeout ?? 5;
    this._requestTimeout = options.requestTimeout ?? 10;
    this._nextCorr = 1;
    this._pending = new Map(); // corr -> {resolve, reject, timer}
    this._subs = new Map(); // "type\0sender" -> {type, sender, handlers: Set, ready}
    this._queryHandlers = new Map();
    this._outbox = [];
    this._flushQueued = false;
    this._closing = false;
    this._lastSent = localNow();
    this._lastHeard = this._lastSent;
    this._error = null;
    let settle;
    /** Resolves once the connection has ended: to null after close(), to the Error that
     * ended it otherwise. Never rejects. */
    this.closed = new Promise((resolve) => {
      settle = resolve;
    });
    this._settle = settle;

    ws.onmessage = (ev) => this._receive(ev.data);
    ws.onclose = (ev) =>
      this._ended(
        this._closing
          ? null
          : new BrokerLostError(
              `the connection to the broker closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`,
            ),
      );
    ws.onerror = () => {};
    const interval = welcome.heartbeat_interval;
    this._beat = setInterval(() => this._heartbeat(), (interval * 1000) / 2);
    if (options.state) this.setState(options.state);
  }

  // ------------------------------------------------------------------------ publishing

  /** Publish a message of `type` with `fields` (an object). Sent with the other messages of
   * this turn of the event loop, in order. */
  publish(type, fields = {}) {
    this._check("publish");
    this._send({ kind: "PUB", type, body: toWire(fields) });
    this.stats.published += 1;
  }

  /**
   * Receive every message of `type` (from `sender` only, if given): `handler(msg)` with
   * msg = {type, sender, fields}. Resolves once the broker has the subscription, to an
   * object with unsubscribe().
   */
  async subscribe(type, handler, { sender = "" } = {}) {
    this._check("subscribe");
    if (typeof handler !== "function") throw new PeerkitError("subscribe(type, handler): handler must be a function");
    const key = `${type}\u0000${sender}`;
    let entry = this._subs.get(key);
    if (entry === undefined) {
      entry = { type, sender, handlers: new Set(), ready: null };
      this._subs.set(key, entry);
      entry.ready = this._request({ kind: "SUB", type, target: sender }, `subscription to ${type}`).catch(
        (err) => {
          if (this._subs.get(key) === entry) this._subs.delete(key);
          throw err;
        },
      );
    }
    entry.handlers.add(handler);
    try {
      await entry.ready;
    } catch (err) {
      entry.handlers.delete(handler);
      throw err;
    }
    return { unsubscribe: () => this.unsubscribe(type, handler, { sender }) };
  }

  /** Stop calling `handler` for `type`; the broker is told when no handler is left. */
  async unsubscribe(type, handler, { sender = "" } = {}) {
    const key = `${type}\u0000${sender}`;
    const entry = this._subs.get(key);
    if (entry === undefined || !entry.handlers.delete(handler)) return;
    if (entry.handlers.size === 0) {
      this._subs.delete(key);
      if (!this._closing) await this._request({ kind: "UNSUB", type, target: sender }, `unsubscribe ${type}`);
    }
  }

  // ------------------------------------------------------------------------ queries

  /**
   * Ask the peer that handles `type` queries (or the peer `peer`, as ask_peer does) and
   * resolve to its response {type, sender, fields}. Rejects with QueryError (code
   * no_handler, handler_gone, remote_error, multiple, ...) or QueryTimeout.
   */
  query(type, fields = {}, { timeout = this._queryTimeout, peer = "" } = {}) {
    this._check("query");
    this.stats.queriesSent += 1;
    const what = `query '${type}'${peer ? ` to '${peer}'` : ""}`;
    return this._request({ kind: "QUERY", type, target: peer, body: toWire(fields) }, what, timeout, true).then(
      (reply) => {
        if (reply.kind === "QERR") {
          const body = fromWire(reply.body ?? {});
          throw new QueryError(body.code, body.detail, {
            peerId: body.peer_id ?? "",
            errorType: body.error_type ?? "",
            peers: body.peers ?? [],
          });
        }
        if (reply.error !== undefined) throw new QueryError("bad_reply", `${what}: ${reply.error}`);
        return { type: reply.type, sender: reply.sender, fields: fromWire(reply.body) };
      },
    );
  }

  /** query() sent to one named peer. */
  askPeer(peerId, type, fields = {}, options = {}) {
    return this.query(type, fields, { ...options, peer: peerId });
  }

  /**
   * Answer `type` queries: `handler(msg)` returns (or resolves to) the response
   * {type, fields}. A handler that throws answers the asker with a remote_error naming
   * the error's name and message. `policy`: "exclusive" (default), "round_robin" or
   * "explicit", as in Python.
   */
  async registerQueryHandler(type, handler, { policy = "exclusive" } = {}) {
    this._check("registerQueryHandler");
    if (typeof handler !== "function") {
      throw new PeerkitError("registerQueryHandler(type, handler): handler must be a function");
    }
    // in place before the broker's answer: a query may arrive in the same message as it
    const previous = this._queryHandlers.get(type);
    this._queryHandlers.set(type, handler);
    try {
      await this._request({ kind: "REG", body: { msg_type: type, policy } }, `register ${type} handler`);
    } catch (err) {
      if (this._queryHandlers.get(type) === handler) {
        if (previous === undefined) this._queryHandlers.delete(type);
        else this._queryHandlers.set(type, previous);
      }
      throw err;
    }
  }

  /** Stop answering `type` queries. */
  async unregisterQueryHandler(type) {
    this._queryHandlers.delete(type);
    await this._request({ kind: "UNREG", type }, `unregister ${type} handler`);
  }

  // ------------------------------------------------------------------------ broker

  /** The broker's view of every peer: {peers: [{peer_id, state, msgs_in, msgs_out,
   * dropped, queued, subscriptions, query_handlers}, ...]}. */
  async info() {
    this._check("info");
    const reply = await this._request({ kind: "INFO" }, "broker info");
    return fromWire(reply.body);
  }

  /**
   * Measure the offset of the broker's clock, NTP style: `samples` round trips of a TIME
   * request over this connection; the one with the shortest round trip wins (its delay is
   * the most symmetric). Sets and returns {offset, rtt} in seconds; brokerNow() uses it.
   */
  async syncClock({ samples = 8, timeout = 2 } = {}) {
    this._check("syncClock");
    let best = null;
    for (let i = 0; i < samples; i++) {
      const sent = localNow();
      const reply = await this._request({ kind: "TIME" }, "clock request", timeout);
      const received = localNow();
      const time = fromWire(reply.body ?? {}).time;
      if (reply.type !== BROKER_TIME_TYPE || typeof time !== "number") {
        throw new PeerkitError(`unexpected answer to a clock request: ${JSON.stringify(reply)}`);
      }
      const rtt = received - sent;
      if (best === null || rtt < best.rtt) best = { offset: time - (sent + received) / 2, rtt };
    }
    this.clockOffset = best.offset;
    this.clockRtt = best.rtt;
    return best;
  }

  /** Now in the broker's time (seconds since the epoch): for stimulus markers. */
  brokerNow() {
    return localNow() + this.clockOffset;
  }

  /** Report a lifecycle state (any string: "ready", "running", or your own). */
  setState(state) {
    if (typeof state !== "string" || state === "") throw new PeerkitError("a state is a non-empty string");
    this._check("setState");
    this.state = state;
    this._send({ kind: "STATE", body: { state } });
  }

  /**
   * Say goodbye and close (idempotent). `error`: a text telling the other peers that this
   * peer ends because of an error. Resolves once the connection has closed.
   */
  async close({ error = null, timeout = 2 } = {}) {
    if (!this._closing && this._error === null) {
      this._closing = true;
      this._send({ kind: "GOODBYE", body: { error_msg: error } });
      this._flush();
      this._failPending(new BrokerLostError(`peer '${this.peerId}' was closed`));
      const timer = setTimeout(() => this._ended(null), timeout * 1000);
      this.closed.then(() => clearTimeout(timer));
      try {
        this._ws.close(1000, "goodbye");
      } catch {
        this._ended(null);
      }
    }
    await this.closed;
  }

  // ------------------------------------------------------------------------ internals

  _check(what) {
    if (this._error !== null) throw new BrokerLostError(`${what}: ${this._error.message}`);
    if (this._closing) throw new BrokerLostError(`${what}: peer '${this.peerId}' is closed`);
  }

  _send(obj) {
    this._outbox.push(obj);
    if (!this._flushQueued) {
      this._flushQueued = true;
      queueMicrotask(() => this._flush());
    }
  }

  _flush() {
    this._flushQueued = false;
    if (this._outbox.length === 0 || this._error !== null) return;
    const batch = this._outbox.length === 1 ? this._outbox[0] : this._outbox;
    this._outbox = [];
    this._ws.send(JSON.stringify(batch));
    this._lastSent = localNow();
  }

  _request(obj, what, timeout = this._requestTimeout, isQuery = false) {
    const corr = this._nextCorr++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(corr);
        if (isQuery && !this._closing && this._error === null) this._send({ kind: "QCANCEL", corr });
        reject(
          isQuery
            ? new QueryTimeout("timeout", `${what}: no answer within ${timeout} s`)
            : new BrokerLostError(`${what}: the broker did not answer within ${timeout} s`),
        );
      }, timeout * 1000);
      this._pending.set(corr, { resolve, reject, timer, what });
      this._send({ ...obj, corr });
    });
  }

  _answered(obj) {
    const pending = this._pending.get(obj.corr);
    if (pending === undefined) return; // late: the asker gave up
    this._pending.delete(obj.corr);
    clearTimeout(pending.timer);
    if (obj.kind === "NACK") {
      const body = obj.body ?? {};
      pending.reject(new RequestError(body.code, `${pending.what}: ${body.detail}`));
    } else {
      pending.resolve(obj);
    }
  }

  _receive(data) {
    this._lastHeard = localNow();
    let objects;
    try {
      objects = JSON.parse(data);
    } catch {
      this._report(new PeerkitError("the broker sent something that is not JSON"));
      return;
    }
    for (const obj of Array.isArray(objects) ? objects : [objects]) {
      try {
        this._handle(obj);
      } catch (err) {
        this._report(err);
      }
    }
    // answer the broker's timing from here too: message events are not throttled in a
    // background tab as timers are
    if (this._lastHeard - this._lastSent >= this.welcome.heartbeat_interval) this._heartbeat();
  }

  _handle(obj) {
    switch (obj.kind) {
      case "PUB":
        this._deliver(obj);
        break;
      case "ACK":
      case "NACK":
      case "REPLY":
      case "QERR":
        this._answered(obj);
        break;
      case "QUERY":
        this._answer(obj);
        break;
      case "HEARTBEAT":
        break;
      case "DROPPED": {
        const count = obj.body?.count ?? 0;
        this.stats.dropped += count;
        this._options.onDropped?.(count);
        break;
      }
      case "SHUTDOWN":
        this._options.onShutdown?.();
        this.close();
        break;
      case "ERROR": {
        const body = obj.body ?? {};
        this._report(new RequestError(body.code, `the broker refused something we sent: ${body.detail}`));
        break;
      }
      default:
        this._report(new PeerkitError(`unexpected envelope ${obj.kind} from the broker`));
    }
  }

  _deliver(obj) {
    this.stats.received += 1;
    if (obj.error !== undefined) {
      this.stats.decodeErrors += 1;
      this._report(new PeerkitError(`a '${obj.type}' message from '${obj.sender}' could not be read: ${obj.error}`));
      return;
    }
    const all = this._subs.get(`${obj.type}\u0000`);
    const one = this._subs.get(`${obj.type}\u0000${obj.sender}`);
    if (all === undefined && one === undefined) return;
    const msg = { type: obj.type, sender: obj.sender, fields: fromWire(obj.body) };
    for (const entry of [all, one]) {
      if (entry === undefined) continue;
      for (const handler of entry.handlers) {
        try {
          const result = handler(msg);
          if (result && typeof result.then === "function") result.then(undefined, (err) => this._handlerFailed(err));
        } catch (err) {
          this._handlerFailed(err);
        }
      }
    }
  }

  _handlerFailed(err) {
    this.stats.handlerErrors += 1;
    this._report(err);
  }

  async _answer(obj) {
    const reply = (kind, type, body) => {
      if (!this._closing && this._error === null) this._send({ kind, type, corr: obj.corr, body });
    };
    const fail = (code, detail, errorType = "") =>
      reply("QERR", "", { code, detail, peer_id: this.peerId, error_type: errorType, peers: [] });
    let handler = this._queryHandlers.get(obj.type);
    if (handler === undefined && obj.type === CONTROL_TYPE) handler = (msg) => this._control(msg);
    if (handler === undefined) {
      fail("no_handler", `peer '${this.peerId}' has no handler for '${obj.type}' queries`);
      return;
    }
    if (obj.error !== undefined) {
      fail("bad_request", obj.error);
      return;
    }
    let result;
    try {
      result = await handler({ type: obj.type, sender: obj.sender, fields: fromWire(obj.body) });
    } catch (err) {
      this.stats.handlerErrors += 1;
      fail("remote_error", String(err?.message ?? err), err?.name ?? "Error");
      return;
    }
    if (result === null || typeof result !== "object" || typeof result.type !== "string") {
      fail(
        "bad_reply",
        `the '${obj.type}' handler of '${this.peerId}' returned ${JSON.stringify(result)}, ` +
          "not a response {type, fields}",
      );
      return;
    }
    let body;
    try {
      body = toWire(result.fields ?? {});
    } catch (err) {
      fail("bad_reply", String(err.message));
      return;
    }
    this.stats.queriesAnswered += 1;
    reply("REPLY", result.type, body);
  }

  async _control(msg) {
    const { peer_id: target, action } = msg.fields;
    if (target !== this.peerId) {
      throw new PeerkitError(`control message for '${target}' sent to '${this.peerId}'`);
    }
    if (this._options.onControl) {
      await this._options.onControl(action, msg);
    } else if (action === "start") {
      this.setState("running");
    } else if (action === "stop") {
      this.setState("ready");
    } else if (action === "close") {
      setTimeout(() => this.close(), 0); // after the answer has gone
    }
    return { type: "OkMsg", fields: { detail: `${this.peerId} ${action}: ${this.state}` } };
  }

  _heartbeat() {
    if (this._closing || this._error !== null) return;
    const now = localNow();
    const { heartbeat_interval: interval, heartbeat_timeout: timeout } = this.welcome;
    if (now - this._lastHeard >= timeout) {
      this._ended(new BrokerLostError(`no word from the broker at ${this.url} for ${timeout} s`));
      try {
        this._ws.close(1000, "no heartbeat");
      } catch {
        // closing already
      }
      return;
    }
    if (now - this._lastSent >= interval * 0.9) {
      this._send({ kind: "HEARTBEAT" });
      this._flush();
    }
  }

  _failPending(err) {
    for (const pending of this._pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(err);
    }
    this._pending.clear();
  }

  _ended(err) {
    if (this._beat === null) return;
    clearInterval(this._beat);
    this._beat = null;
    if (err !== null) this._error = err;
    this._closing = true;
    this._failPending(err ?? new BrokerLostError(`peer '${this.peerId}' was closed`));
    this._options.onClose?.(err);
    this._settle(err);
  }

  _report(err) {
    if (this._options.onError) this._options.onError(err);
    else console.error(`peerkit peer '${this.peerId}':`, err);
  }
}
