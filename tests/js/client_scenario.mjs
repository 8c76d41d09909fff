// A browser peer's life, in Node, against a real broker with a Python peer "py" on it
// (driven by tests/test_js_client.py). Usage: node client_scenario.mjs URL TOKEN
//
// Prints one line per step ("step NAME") and "done" at the end; any failure prints
// "FAILED: ..." and exits with status 1.

import assert from "node:assert/strict";
import WebSocket from "ws";

import {
  connect,
  decodeSamples,
  HandshakeRejected,
  QueryError,
  QueryTimeout,
  RequestError,
  SUBPROTOCOL,
} from "../../peerkit/static/peerkit.js";

const [url, token] = process.argv.slice(2);
const step = (name) => console.log(`step ${name}`);
const errors = [];

function waitFor(predicate, what, seconds = 10) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), seconds * 1000);
    const poll = () => {
      if (predicate()) {
        clearTimeout(timer);
        resolve();
      } else {
        setTimeout(poll, 5);
      }
    };
    poll();
  });
}

async function main() {
  // a wrong token is refused with the broker's reason
  await assert.rejects(connect(url, { peerId: "js", token: "wrong", WebSocket }), (err) => {
    assert.ok(err instanceof HandshakeRejected, String(err));
    assert.equal(err.reason, "bad_token");
    return true;
  });
  step("bad-token");

  const peer = await connect(url, {
    peerId: "js",
    token,
    WebSocket,
    onError: (err) => errors.push(err),
  });
  assert.equal(peer._ws.protocol, SUBPROTOCOL);
  step("connected");

  // Python → JS: every PySample comes back as a JsEcho with the same fields
  const samples = [];
  await peer.subscribe(
    "jstest.PySample",
    (msg) => {
      samples.push(msg);
      peer.publish("jstest.JsEcho", msg.fields);
    },
    { sender: "py" },
  );
  // Python asks, JS answers (and fails on purpose for "boom")
  await peer.registerQueryHandler("jstest.Reverse", async (msg) => {
    if (msg.fields.text === "boom") throw new RangeError("no boom here");
    return {
      type: "jstest.Reversed",
      fields: { text: [...msg.fields.text].reverse().join(""), data: msg.fields.data.slice().reverse() },
    };
  });
  peer.setState("custom-ready");
  peer.publish("jstest.JsReady", {});
  step("ready");

  // Python publishes, queries and says PyDone when it has checked everything
  let done = false;
  await peer.subscribe("jstest.PyDone", () => {
    done = true;
  });
  await waitFor(() => done, "PyDone from the Python peer", 20);
  assert.ok(samples.length >= 2, `got ${samples.length} PySample messages`);
  const first = samples[0];
  assert.equal(first.sender, "py");
  assert.ok(first.fields.data instanceof Uint8Array);
  assert.deepEqual([...decodeSamples(first.fields.samples, "float32")], [1.5, -2, 0.25]);
  assert.equal(first.fields.big, 2n ** 60n);
  assert.ok(Number.isNaN(first.fields.nan));
  step("python-to-js");

  // JS asks Python
  const doubled = await peer.query("jstest.Double", { value: 21, data: new Uint8Array([1, 2, 3]) });
  assert.equal(doubled.type, "jstest.Doubled");
  assert.equal(doubled.sender, "py");
  assert.equal(doubled.fields.value, 42);
  assert.deepEqual([...doubled.fields.data], [1, 2, 3, 1, 2, 3]);
  const asked = await peer.askPeer("py", "jstest.Double", { value: 0.5, data: new Float32Array([1]) });
  assert.equal(asked.fields.value, 1);
  await assert.rejects(peer.query("jstest.Nobody", {}), (err) => {
    assert.ok(err instanceof QueryError);
    assert.equal(err.code, "no_handler");
    return true;
  });
  await assert.rejects(peer.query("jstest.Double", { value: "not a number", data: new Uint8Array() }), (err) => {
    assert.equal(err.code, "bad_request");
    assert.match(err.message, /invalid message 'jstest.Double' from 'js'.*value/);
    return true;
  });
  await assert.rejects(peer.query("jstest.Fail", {}), (err) => {
    assert.equal(err.code, "remote_error");
    assert.equal(err.errorType, "ValueError");
    assert.equal(err.peerId, "py");
    return true;
  });
  await assert.rejects(peer.query("jstest.Slow", {}, { timeout: 0.2 }), (err) => {
    assert.ok(err instanceof QueryTimeout);
    return true;
  });
  // a second handler for an exclusive type is refused, and leaves nothing behind
  await assert.rejects(peer.registerQueryHandler("jstest.Double", () => ({ type: "x", fields: {} })), (err) => {
    assert.ok(err instanceof RequestError, String(err));
    assert.equal(err.code, "already_registered");
    return true;
  });
  assert.equal(peer._queryHandlers.has("jstest.Double"), false);
  step("js-to-python");

  // the broker's clock, over this connection
  const clock = await peer.syncClock({ samples: 5 });
  assert.ok(clock.rtt > 0 && clock.rtt < 1, `rtt ${clock.rtt}`);
  assert.ok(Math.abs(clock.offset) < 0.5, `offset ${clock.offset}`);
  assert.ok(Math.abs(peer.brokerNow() - Date.now() / 1000) < 1);
  console.log(`clock offset ${clock.offset} rtt ${clock.rtt}`);
  step("clock");

  // the broker's view: its state as reported, the Python peer's handlers
  const info = await peer.info();
  const me = info.peers.find((p) => p.peer_id === "js");
  assert.equal(me.state, "custom-ready");
  assert.ok(info.peers.find((p) => p.peer_id === "py").query_handlers.includes("jstest.Double"));
  step("info");

  // idle for longer than the heartbeat timeout: the heartbeats keep it connected
  const timeout = peer.welcome.heartbeat_timeout;
  await new Promise((resolve) => setTimeout(resolve, timeout * 1500));
  assert.equal((await peer.query("jstest.Double", { value: 1, data: new Uint8Array() })).fields.value, 2);
  step("heartbeats");

  peer.publish("jstest.JsBye", { note: "closing" });
  await peer.close();
  assert.equal(await peer.closed, null);
  assert.deepEqual(errors, []);
  step("closed");
  console.log("done");
}

main().catch((err) => {
  console.log(`FAILED: ${err?.stack ?? err}`);
  process.exit(1);
});
