import { test } from "node:test";
import assert from "node:assert/strict";
import { create, PermanentError } from "../index.js";
import { canonicalFlowDef, flowDefFromWire, flowVersion, validateFlowDef, flowDef, stepDef, FlowDefError } from "../flowdef.js";
import { decode } from "@msgpack/msgpack";

const quickStart = () =>
  create<{ orderId: string; amount: number; userId: string }>("payment-flow")
    .step("reserve-stock", async () => {}, { compensate: async () => {} })
    .step("process-payment", async () => {}, { retries: 3, retryDelayMs: 1000 })
    .step("send-email", async () => {});

test("the quick start's definition: policies, canonical keys, a stable 16-hex version", () => {
  const f = quickStart();
  const def = f.definition();
  assert.equal(def.steps[0]?.compensable, true);
  assert.equal(def.steps[1]?.retry.retries, 3);
  assert.equal(def.steps[1]?.retry.retryDelayMs, 1000);
  assert.match(f.version, /^[0-9a-f]{16}$/);
  assert.equal(quickStart().version, f.version, "the same definition makes the same version");
  const wire = decode(canonicalFlowDef(def)) as Record<string, unknown>;
  assert.deepEqual(Object.keys(wire), ["name", "steps"]);
  const step = (wire.steps as Record<string, unknown>[])[0]!;
  assert.deepEqual(Object.keys(step), ["name", "retry", "timeoutMs", "compensable", "compensationRetry", "compensationTimeoutMs", "onUnknown"]);
  assert.deepEqual(Object.keys(step.retry as object), ["retries", "retryDelayMs", "backoff", "maxDelayMs", "jitter", "maxDurationMs"]);
  // Handlers are not part of the definition; hooks neither.
  const g = quickStart().on("stepStart", () => {});
  assert.equal(g.version, f.version);
});

test("any change of policy makes another version; a label replaces the hash", () => {
  const base = quickStart().version;
  const timed = create("payment-flow")
    .step("reserve-stock", async () => {}, { compensate: async () => {} })
    .step("process-payment", async () => {}, { retries: 3, retryDelayMs: 1000, timeoutMs: 10000 })
    .step("send-email", async () => {});
  assert.notEqual(timed.version, base);
  assert.equal(create("x", { version: "v2" }).step("a", () => {}).version, "v2");
  const grouped = create("x").step("a", () => {}, { group: "g" }).step("b", () => {}, { group: "g", maxInFlight: 2 });
  const keys = decode(canonicalFlowDef(grouped.definition())) as { steps: Record<string, unknown>[] };
  assert.deepEqual(Object.keys(keys.steps[1]!).slice(-2), ["group", "maxInFlight"]);
});

test("a definition read back from the wire is the same definition", () => {
  const f = create("x", { concurrencyPerKey: 2, inputSchema: { type: "object" } })
    .step("a", () => {}, { retries: 2, backoff: 2, jitter: 0.25, maxDelayMs: 5000, onUnknown: "retry", compensate: () => {}, compensationRetry: { retries: 5 } })
    .step("b", () => {}, { onExhausted: "pause", pauseTimeoutMs: 60000, timeoutMs: 3000 });
  const def = f.definition();
  const back = flowDefFromWire(decode(canonicalFlowDef(def)));
  assert.deepEqual(back, def);
  assert.equal(flowVersion(back), f.version);
});

test("bad definitions are refused with the Rust reasons", () => {
  assert.throws(() => create("a.b"), /may only hold ASCII letters/);
  assert.throws(() => create("x").step("a", () => {}).step("a", () => {}), /two steps named `a`/);
  assert.throws(() => create("x").definition(), /has no steps/);
  assert.throws(() => create("x").step("a", () => {}, { timeoutMs: 0 }).definition(), /a timeout of 0 is no time at all/);
  assert.throws(() => create("x").step("a", () => {}, { retries: 100001 }).definition(), /retries are at most 100000/);
  assert.throws(() => create("x").step("a", () => {}, { backoff: 0.5 }).definition(), /backoff must be a number of at least 1/);
  assert.throws(() => create("x").step("a", () => {}, { retryDelayMs: 10, maxDelayMs: 5 }).definition(), /over the max delay/);
  assert.throws(() => create("x", { version: "0123456789abcdef" }).step("a", () => {}).definition(), /looks like a definition hash/);
  assert.throws(
    () => validateFlowDef(flowDef("x", [stepDef("a", { group: "g" }), stepDef("b"), stepDef("c", { group: "g" })])),
    (e: unknown) => e instanceof FlowDefError && /next to each other/.test(e.message),
  );
  assert.ok(new PermanentError("x").retryable === false);
});
