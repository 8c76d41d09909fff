// The client's values on the wire (toWire / fromWire / decodeSamples), without a broker.
// Run by tests/test_js_client.py with `node --test`.

import assert from "node:assert/strict";
import { test } from "node:test";

import { decodeSamples, fromWire, PeerkitError, toWire } from "../../peerkit/static/peerkit.js";

const through = (value) => fromWire(JSON.parse(JSON.stringify(toWire(value))));

test("plain values travel as they are", () => {
  const value = { a: 1, b: -2.5, c: "text ✓", d: true, e: null, f: [1, [2, { g: "h" }]] };
  assert.deepEqual(toWire(value), value);
  assert.deepEqual(through(value), value);
});

test("bytes, typed arrays and buffers travel as $bytes and come back as Uint8Array", () => {
  assert.deepEqual(toWire(new Uint8Array([0, 255])), { $bytes: "AP8=" });
  assert.deepEqual(toWire(new Float32Array([1.5])), { $bytes: "AADAPw==" });
  assert.deepEqual(toWire(new Uint8Array([1, 2, 3]).subarray(1)), { $bytes: "AgM=" });
  assert.deepEqual(toWire(new Uint8Array([9]).buffer), { $bytes: "CQ==" });
  const big = new Uint8Array(100_000).map((_, i) => i % 251);
  assert.deepEqual(through({ data: big }).data, big);
  assert.deepEqual(fromWire({ $bytes: "" }), new Uint8Array());
});

test("non-finite numbers and big integers are tagged", () => {
  assert.deepEqual(toWire([NaN, Infinity, -Infinity]), [
    { $float: "NaN" },
    { $float: "Infinity" },
    { $float: "-Infinity" },
  ]);
  const [nan, inf, minf] = through([NaN, Infinity, -Infinity]);
  assert.ok(Number.isNaN(nan) && inf === Infinity && minf === -Infinity);
  assert.equal(toWire(5n), 5);
  assert.deepEqual(toWire(2n ** 60n), { $int: "1152921504606846976" });
  assert.equal(through(-(2n ** 63n)), -(2n ** 63n));
});

test("a map that looks like a tag is wrapped, and unknown tags are refused", () => {
  assert.deepEqual(toWire({ $bytes: "x" }), { $map: { $bytes: "x" } });
  assert.deepEqual(through({ $bytes: "x" }), { $bytes: "x" });
  assert.deepEqual(toWire({ $bytes: "x", other: 1 }), { $bytes: "x", other: 1 });
  assert.throws(() => fromWire({ $nope: 1 }), PeerkitError);
});

test("undefined fields are left out; functions are refused", () => {
  assert.deepEqual(toWire({ a: undefined, b: 1 }), { b: 1 });
  assert.throws(() => toWire({ f: () => 1 }), /cannot send a function value/);
});

test("a __proto__ key stays a plain field", () => {
  const value = fromWire(JSON.parse('{"__proto__": {"polluted": true}, "x": 1}'));
  assert.equal(value.polluted, undefined);
  assert.deepEqual(Object.keys(value), ["__proto__", "x"]);
  assert.equal({}.polluted, undefined);
});

test("decodeSamples reads little-endian numbers, aligned or not", () => {
  const bytes = new Uint8Array([0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]); // 1.5, -2
  assert.deepEqual([...decodeSamples(bytes)], [1.5, -2]);
  const shifted = new Uint8Array(9);
  shifted.set(bytes, 1);
  assert.deepEqual([...decodeSamples(shifted.subarray(1), "float32")], [1.5, -2]);
  assert.deepEqual([...decodeSamples(new Uint8Array([1, 0, 0xff, 0xff]), "int16")], [1, -1]);
  assert.throws(() => decodeSamples(bytes, "uint7"), /dtype must be one of/);
});
