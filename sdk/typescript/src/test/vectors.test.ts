/**
 * The golden vectors of proto/tests/vectors (written by the Rust types):
 * every message decodes to its JSON model and through the typed decoder,
 * encodes back to the same bytes, and every flow definition hashes to its
 * version.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { decode as mpDecode } from "@msgpack/msgpack";
import { canonicalFlowDef, flowDefFromWire, flowDefWire, flowVersion } from "../flowdef.js";
import { fnv1a64Hex } from "../msgpack.js";
import { decodeMessage, encodeMessage, KINDS, type Kind } from "../protocol.js";
import { REPO_ROOT } from "./harness.js";

const DIR = process.env.ORCHESTRIX_VECTORS || join(REPO_ROOT, "proto/tests/vectors");
const names = existsSync(DIR)
  ? readdirSync(DIR)
      .filter((f) => f.endsWith(".msgpack"))
      .map((f) => f.slice(0, -".msgpack".length))
      .sort()
  : [];

/** The MessagePack data model as the vectors' JSON writes it: bin as {"$bin": hex}. */
function model(v: unknown): unknown {
  if (v instanceof Uint8Array) return { $bin: Buffer.from(v).toString("hex") };
  if (Array.isArray(v)) return v.map(model);
  if (v !== null && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, model(x)]));
  return v;
}

const bytesOf = (name: string) => new Uint8Array(readFileSync(join(DIR, `${name}.msgpack`)));
const jsonOf = (name: string) => JSON.parse(readFileSync(join(DIR, `${name}.json`), "utf8")) as Record<string, unknown>;

test("the golden vectors are there", { skip: process.env.ORCHESTRIX_E2E !== "1" && names.length === 0 && `no vectors in ${DIR}` }, () => {
  assert.ok(names.length > 20, `vectors in ${DIR}`);
  assert.ok(names.some((n) => n.startsWith("flow-")));
});

for (const name of names.filter((n) => !n.startsWith("flow-"))) {
  test(`vector ${name}: decodes to its model, through its type, and encodes back to the same bytes`, () => {
    const bytes = bytesOf(name);
    const json = jsonOf(name);
    assert.deepEqual(model(mpDecode(bytes)), json);
    const kind = json.kind as Kind;
    assert.ok(KINDS.includes(kind), `known kind ${kind}`);
    let msg = decodeMessage(bytes, kind);
    if (kind === "flow.registration") {
      // The definition read back into its typed form, so its floats are floats again.
      const reg = msg as ReturnType<typeof decodeMessage<"flow.registration">>;
      msg = { ...reg, flow: flowDefWire(flowDefFromWire(reg.flow)) as Record<string, unknown> };
    }
    if (kind === "run.event") return; // events are only read by this SDK
    const again = encodeMessage(kind, msg as never);
    assert.equal(Buffer.from(again).toString("hex"), Buffer.from(bytes).toString("hex"));
  });
}

for (const name of names.filter((n) => n.startsWith("flow-"))) {
  test(`vector ${name}: the canonical encoding and the version hash`, () => {
    const bytes = bytesOf(name);
    const json = jsonOf(name) as { version: string; definition: unknown };
    assert.deepEqual(model(mpDecode(bytes)), json.definition);
    const def = flowDefFromWire(mpDecode(bytes));
    assert.equal(Buffer.from(canonicalFlowDef(def)).toString("hex"), Buffer.from(bytes).toString("hex"));
    assert.equal(flowVersion(def), json.version);
    if (def.version == null) assert.equal(fnv1a64Hex(bytes), json.version);
  });
}

test("the conformance flow of the TypeScript worker hashes as the vector says", { skip: !names.includes("flow-conformance") && "no conformance vector" }, async () => {
  const json = jsonOf("flow-conformance") as { version: string };
  const { create } = await import("../index.js");
  const nothing = () => undefined;
  const flow = create("conformance")
    .step("record", nothing, { compensate: nothing })
    .step("flaky", nothing, { retries: 3, retryDelayMs: 200, compensate: nothing })
    .step("slow", nothing)
    .step("bounded", nothing, { timeoutMs: 1000 })
    .step("decide", nothing);
  assert.equal(flow.version, json.version);
  // And the quick start's flow as the TypeScript quick start writes it.
  const pay = jsonOf("flow-payment-flow") as { version: string };
  const qs = create("payment-flow")
    .step("reserve-stock", nothing, { compensate: nothing })
    .step("process-payment", nothing, { retries: 3, retryDelayMs: 1000 })
    .step("send-email", nothing);
  assert.equal(qs.version, pay.version);
});
