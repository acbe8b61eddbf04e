import { test } from "node:test";
import assert from "node:assert/strict";
import { encode as mpEncode } from "@msgpack/msgpack";
import {
  decodeMessage,
  encodeMessage,
  encodeValue,
  decodeValue,
  peekKind,
  ProtocolError,
  NIL_VALUE,
  type StepCommand,
} from "../protocol.js";
import { encodeCanonical, F64, fnv1a64Hex } from "../msgpack.js";
import { budget, Dedup } from "../worker.js";

const CMD: StepCommand = {
  commandId: "6f1c2a9e-8a4b-4c1e-9d7e-0123456789ab",
  runId: "0b8e4c7a-1d2f-4e3a-8b9c-fedcba987654",
  flow: "payment-flow",
  version: "3340338af5419f68",
  step: "reserve-stock",
  stepIndex: 0,
  kind: "execute",
  attempt: 1,
  input: encodeValue({ orderId: "order_1", amount: 50, userId: "user_A" }),
  outputs: [{ step: "a", output: NIL_VALUE }],
  timeoutMs: 10000,
};

function envelope(v: unknown, kind: unknown, body: unknown): Uint8Array {
  return mpEncode({ v, kind, body });
}

function rejects(fn: () => unknown, reason: string, includes: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ProtocolError, `a ProtocolError, got ${String(e)}`);
    assert.equal(e.reason, reason);
    assert.ok(e.message.includes(includes), `"${e.message}" should mention "${includes}"`);
    return true;
  });
}

test("a step command round-trips, with the envelope's keys in order", () => {
  const bytes = encodeMessage("step.command", CMD);
  assert.deepEqual(peekKind(bytes), { v: 2, kind: "step.command" });
  // {v, kind, body} in that order: fixmap of 3, then "v" 2, then "kind".
  assert.deepEqual([...bytes.slice(0, 4)], [0x83, 0xa1, 0x76, 0x02]);
  assert.deepEqual([...bytes.slice(4, 9)], [0xa4, ...Buffer.from("kind")]);
  const back = decodeMessage(bytes, "step.command");
  assert.deepEqual({ ...back, startByMs: undefined, deadlineMs: undefined }, { ...CMD, startByMs: undefined, deadlineMs: undefined });
  assert.deepEqual(decodeValue(back.input), { orderId: "order_1", amount: 50, userId: "user_A" });
});

test("every message kind this SDK sends decodes back", () => {
  const ids = { commandId: CMD.commandId, runId: CMD.runId };
  const samples = [
    ["step.ack", { ...ids, attempt: 1, worker: "w" }],
    ["step.heartbeat", { ...ids, attempt: 2, worker: "w" }],
    ["step.outcome", { ...ids, attempt: 1, kind: "execute", result: { type: "completed", output: NIL_VALUE } }],
    ["step.outcome", { ...ids, attempt: 1, kind: "compensate", result: { type: "failed", message: "no", retryable: true, maybeDone: true } }],
    ["error", { message: "bad", code: "malformed", ...ids }],
    ["step.cancel", { ...ids, attempt: 3 }],
    ["run.request", { flow: "f", input: NIL_VALUE, key: "k", ttlMs: 5, wait: true }],
    ["run.status", { runId: CMD.runId, wait: false }],
    ["run.list", { limit: 10, flow: "f", status: "failed" }],
    ["run.control", { runId: CMD.runId, action: "cancel", by: "me" }],
    ["run.reply", { type: "accepted", runId: CMD.runId, duplicate: true }],
    ["run.reply", { type: "rejected", error: "no", code: "unknown_flow", retryable: false }],
  ] as const;
  for (const [kind, body] of samples) {
    const back = decodeMessage(encodeMessage(kind, body as never), kind) as unknown as Record<string, unknown>;
    for (const [k, v] of Object.entries(body)) assert.deepEqual(back[k], v, `${kind}.${k}`);
  }
});

test("uppercase ids are accepted and read lowercase; unknown keys and nil optionals are ignored", () => {
  const body = {
    commandId: CMD.commandId.toUpperCase(),
    runId: CMD.runId,
    attempt: 1,
    worker: "w",
    somethingNew: [1, 2, 3],
  };
  const ack = decodeMessage(envelope(2, "step.ack", body), "step.ack");
  assert.equal(ack.commandId, CMD.commandId);
  const cmd = { ...CMD, timeoutMs: null, startByMs: null, deadlineMs: null, extra: "x" };
  const back = decodeMessage(envelope(2, "step.command", cmd), "step.command");
  assert.equal(back.timeoutMs, undefined);
});

test("a step command's traceparent is advisory: anything but a string reads as absent", () => {
  const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const read = (traceparent: unknown) =>
    decodeMessage(envelope(2, "step.command", { ...CMD, traceparent }), "step.command").traceparent;
  assert.equal(read(tp), tp);
  for (const odd of [42, [1, 2], { a: 1 }, new Uint8Array([0xff]), null, true]) {
    assert.equal(read(odd), undefined, String(odd));
  }
  const back = decodeMessage(encodeMessage("step.command", { ...CMD, traceparent: tp }), "step.command");
  assert.equal(back.traceparent, tp);
});

test("bad messages are clear errors, never crashes", () => {
  rejects(() => decodeMessage(Uint8Array.of(0xc1), "step.command"), "malformed", "not one MessagePack value");
  rejects(() => decodeMessage(Buffer.from("hello"), "step.command"), "malformed", "step.command");
  rejects(() => decodeMessage(encodeMessage("step.command", CMD).slice(0, 30), "step.command"), "malformed", "MessagePack");
  rejects(() => decodeMessage(mpEncode([1, 2]), "step.command"), "malformed", "must be a map");
  rejects(() => decodeMessage(envelope(1, "step.command", CMD), "step.command"), "unsupported_version", "unsupported protocol version 1");
  rejects(() => decodeMessage(envelope(3, "step.command", CMD), "step.command"), "unsupported_version", "version 3");
  rejects(() => decodeMessage(envelope("2", "step.command", CMD), "step.command"), "malformed", "`v`");
  rejects(() => decodeMessage(encodeMessage("step.cancel", { ...CMD }), "step.command"), "wrong_kind", "expected a `step.command` message, got `step.cancel`");
  rejects(() => decodeMessage(new Uint8Array(2000), "step.command", 1000), "too_large", "2000 bytes exceeds the limit of 1000");
  // A user value must be a bin holding exactly one value.
  rejects(() => decodeMessage(envelope(2, "step.command", { ...CMD, input: "ok" }), "step.command"), "malformed", "body.input must be a bin");
  rejects(() => decodeMessage(envelope(2, "step.command", { ...CMD, input: Uint8Array.of(0x01, 0x02) }), "step.command"), "malformed", "exactly one MessagePack value");
  rejects(() => decodeMessage(envelope(2, "step.command", { ...CMD, input: new Uint8Array(0) }), "step.command"), "malformed", "exactly one MessagePack value");
  rejects(() => decodeMessage(envelope(2, "step.command", { ...CMD, commandId: "nope" }), "step.command"), "malformed", "body.commandId must be a hyphenated UUID");
  rejects(() => decodeMessage(envelope(2, "step.command", { ...CMD, kind: "run" }), "step.command"), "malformed", 'body.kind must be one of "execute", "compensate"');
  rejects(() => decodeMessage(envelope(2, "step.command", { ...CMD, attempt: -1 }), "step.command"), "malformed", "body.attempt must be an unsigned integer");
  const { step: _s, ...noStep } = CMD;
  rejects(() => decodeMessage(envelope(2, "step.command", noStep), "step.command"), "malformed", "body.step is missing");
  // The ids of a malformed command are read when they can be, to answer about it.
  try {
    decodeMessage(envelope(2, "step.command", { ...CMD, input: "ok" }), "step.command");
  } catch (e) {
    assert.deepEqual((e as ProtocolError).ids, { commandId: CMD.commandId, runId: CMD.runId });
  }
});

test("user values: undefined is nil, values round-trip", () => {
  assert.deepEqual([...encodeValue(undefined)], [0xc0]);
  assert.equal(decodeValue(NIL_VALUE), undefined);
  assert.deepEqual(decodeValue(encodeValue({ a: [1, "x", true], b: 2.5 })), { a: [1, "x", true], b: 2.5 });
});

test("canonical writer: smallest integers, float64 when asked, keys in order, undefined omitted", () => {
  const hex = (v: Parameters<typeof encodeCanonical>[0]) => Buffer.from(encodeCanonical(v)).toString("hex");
  assert.equal(hex(0), "00");
  assert.equal(hex(127), "7f");
  assert.equal(hex(128), "cc80");
  assert.equal(hex(256), "cd0100");
  assert.equal(hex(65536), "ce00010000");
  assert.equal(hex(2 ** 32), "cf0000000100000000");
  assert.equal(hex(-1), "ff");
  assert.equal(hex(-33), "d0df");
  assert.equal(hex(new F64(2)), "cb4000000000000000");
  assert.equal(hex(1.5), "cb3ff8000000000000");
  assert.equal(hex({ b: 1, a: undefined, c: null }), "82a16201a163c0");
  assert.equal(hex("x".repeat(32)), "d920" + "78".repeat(32));
  assert.equal(hex(Uint8Array.of(0xc0)), "c401c0");
});

test("FNV-1a 64", () => {
  assert.equal(fnv1a64Hex(new Uint8Array(0)), "cbf29ce484222325");
  assert.equal(fnv1a64Hex(Buffer.from("a")), "af63dc4c8601ec8c");
});

test("the hash algorithm reproduces the Rust v1 version of the quick start's flow", () => {
  // The same writer fed v1's snake_case names gives the hash the v1 README
  // printed for examples/shared/payment.rs: the algorithm (key order,
  // integer widths, float64 backoff/jitter, FNV-1a) matches rmp-serde's.
  const r = (retries: number, d: number, b: number, max: number) => ({ retries, retry_delay_ms: d, backoff: new F64(b), max_delay_ms: max, jitter: new F64(0), max_duration_ms: null });
  const step = (name: string, o: { retry?: ReturnType<typeof r>; timeout?: number; comp?: boolean } = {}) => ({
    name,
    retry: o.retry ?? r(0, 100, 1, 300000),
    timeout_ms: o.timeout ?? null,
    compensable: !!o.comp,
    compensation_retry: r(3, 100, 2, 10000),
    compensation_timeout_ms: null,
    on_unknown: "maybe_done",
  });
  const def = { name: "payment-flow", steps: [step("reserve-stock", { comp: true }), step("process-payment", { retry: r(3, 1000, 1, 300000), timeout: 10000 }), step("send-email")] };
  assert.equal(fnv1a64Hex(encodeCanonical(def)), "3340338af5419f68");
});

test("a handler's budget: timeout, deadline, whichever comes first", () => {
  assert.equal(budget(undefined, undefined), undefined);
  assert.deepEqual(budget(1000, undefined, 0), { ms: 1000, why: "step timed out after 1s" });
  assert.deepEqual(budget(undefined, 500, 0), { ms: 500, why: "the attempt reached its deadline (the run's deadline)" });
  assert.equal(budget(5000, 1000, 0)?.why, "the attempt reached its deadline (the run's deadline)");
  assert.deepEqual(budget(1000, 1100, 0), { ms: 1000, why: "step timed out after 1s" });
});

test("the de-dup cache keeps the last N command ids", () => {
  const d = new Dedup(2);
  d.remember("a", { state: "cancelled" });
  d.remember("b", { state: "cancelled" });
  d.remember("c", { state: "cancelled" });
  assert.equal(d.get("a"), undefined);
  assert.ok(d.get("b") && d.get("c"));
  d.finish("c", Uint8Array.of(1));
  assert.equal(d.get("c")?.state, "done");
  assert.equal(d.size, 2);
});
