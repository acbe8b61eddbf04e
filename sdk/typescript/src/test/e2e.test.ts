/**
 * End to end, against a real nats-server and the real `orchestrix` coordinator
 * (see harness.ts). Skipped when the binaries are not there, unless
 * ORCHESTRIX_E2E=1 (scripts/test-typescript.sh sets it), then they must be.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { connect as natsConnect, createInbox, type Msg, type NatsConnection } from "@nats-io/transport-node";
import { Client, close, connect, create, PermanentError, RejectedError, Worker, type RunResult } from "../index.js";
import { decodeMessage, encodeMessage, encodeValue, peekKind, type StepCommand } from "../protocol.js";
import { natsServerBin, orchestrixBin, REPO_ROOT, start, startStack, tempDir, waitFor, type Stack } from "./harness.js";

const required = process.env.ORCHESTRIX_E2E === "1";
const available = !!natsServerBin() && !!orchestrixBin();
const skip = !available && !required ? "nats-server or the orchestrix binary not found (set NATS_SERVER_BIN / ORCHESTRIX_BIN, or ORCHESTRIX_E2E=1 to require them)" : false;

type PaymentInput = { orderId: string; amount: number; userId: string };

function paymentFlow(counts: Record<string, number>, options: { timeoutMs?: number } = {}) {
  const bump = (k: string) => (counts[k] = (counts[k] ?? 0) + 1);
  return create<PaymentInput>("payment-flow")
    .step("reserve-stock", async () => void bump("reserve"), { compensate: async () => void bump("release") })
    .step(
      "process-payment",
      async (ctx) => {
        bump("pay");
        if (ctx.input.amount > 1000) throw new Error("Payment declined: limit exceeded");
      },
      { retries: 3, retryDelayMs: 1000, ...options },
    )
    .step("send-email", async () => void bump("email"));
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const step = (r: RunResult, name: string) => r.steps.find((s) => s.name === name);

describe("end to end with nats-server and the coordinator", { skip }, () => {
  let stack: Stack;
  let nc: NatsConnection;

  before(async () => {
    stack = await startStack();
    nc = await natsConnect({ servers: stack.url });
    await connect({ url: stack.url, prefix: stack.prefix });
  });

  after(async () => {
    await close();
    await nc?.close();
    await stack?.stop();
  });

  test("the quick start: success, then failure with 4 payment attempts and reserve-stock compensated", async () => {
    const counts: Record<string, number> = {};
    const hooks: string[] = [];
    const ends: string[] = [];
    const flow = paymentFlow(counts)
      .on("retry", (e) => hooks.push(`retry ${e.step} ${e.attempt}`))
      .on("compensate", (e) => hooks.push(`compensate ${e.step}`))
      .on("stepEnd", (e) => void (e.step === "process-payment" && !e.ok && ends.push(e.error ?? "")))
      .on("runEnd", (r) => void ends.push(r.status));
    const ok = await flow.run({ orderId: "order_1", amount: 50, userId: "user_A" });
    assert.equal(ok.status, "completed");
    assert.match(ok.runId, UUID);
    assert.equal(typeof ok.durationMs, "number");
    assert.deepEqual(ok.steps.map((s) => `${s.name}: ${s.status}`), ["reserve-stock: completed", "process-payment: completed", "send-email: completed"]);
    assert.deepEqual(counts, { reserve: 1, pay: 1, email: 1 });

    const failed = await flow.run({ orderId: "order_2", amount: 2000, userId: "user_B" });
    assert.equal(failed.status, "failed");
    const pay = step(failed, "process-payment");
    assert.equal(pay?.status, "failed");
    assert.equal(pay?.attempts, 4);
    assert.equal(pay?.error, "Payment declined: limit exceeded");
    assert.equal(step(failed, "reserve-stock")?.status, "compensated");
    assert.equal(step(failed, "send-email")?.attempts ?? 0, 0);
    assert.equal(failed.failedStep, "process-payment");
    assert.deepEqual(counts, { reserve: 2, pay: 5, email: 1, release: 1 });
    assert.deepEqual(hooks, ["retry process-payment 2", "retry process-payment 3", "retry process-payment 4", "compensate reserve-stock"]);
    assert.deepEqual(ends, ["completed", ...Array(4).fill("Payment declined: limit exceeded"), "failed"]);

    // The same runs as any client sees them.
    const client = new Client(nc, { prefix: stack.prefix });
    assert.equal((await client.status(failed.runId)).status, "failed");
    assert.equal((await client.wait(ok.runId)).status, "completed");
    const listed = await client.list({ flow: "payment-flow", limit: 10 });
    assert.ok(listed.some((r) => r.runId === failed.runId) && listed.some((r) => r.runId === ok.runId));
    await assert.rejects(client.run("no-such-flow", {}), (e: unknown) => e instanceof RejectedError && e.code === "unknown_flow");
  });

  test("a keyed run returns the same run twice, and runs once", async () => {
    // The earlier test's flow (same definition) may still be served from this
    // process: closing the default connection leaves only this flow's worker.
    await close();
    const counts: Record<string, number> = {};
    const flow = paymentFlow(counts);
    const input = { orderId: `order_${Date.now()}`, amount: 50, userId: "user_C" };
    const a = await flow.run(input, { key: `payment:${input.orderId}`, ttlMs: 3_600_000 });
    const b = await flow.run(input, { key: `payment:${input.orderId}`, ttlMs: 3_600_000 });
    assert.equal(a.status, "completed");
    assert.equal(b.runId, a.runId);
    assert.equal(counts.reserve, 1);
  });

  test("a permanent error is not retried; outputs pass to later steps", async () => {
    const seen: unknown[] = [];
    const flow = create<{ n: number }>("ts-outputs")
      .step("first", (ctx) => ({ doubled: ctx.input.n * 2 }), { compensate: () => undefined })
      .step(
        "second",
        (ctx) => {
          seen.push(ctx.output("first"));
          throw new PermanentError(`no ${ctx.attempt}`);
        },
        { retries: 5 },
      );
    const r = await flow.run({ n: 21 });
    assert.equal(r.status, "failed");
    assert.equal(step(r, "second")?.attempts, 1);
    assert.equal(step(r, "second")?.error, "no 1");
    assert.deepEqual(seen, [{ doubled: 42 }]);
    assert.deepEqual(step(r, "first")?.output, { doubled: 42 });
  });

  test("the worker answers bad commands with errors and goes on serving", async () => {
    let runs = 0;
    const flow = create<{ x: number }>("ts-robust").step("a", (ctx) => {
      runs++;
      return ctx.input.x + 1;
    });
    const worker = await Worker.start({ flows: [flow], connection: nc, prefix: stack.prefix });
    try {
      const subject = `${stack.prefix}.step.ts-robust.${flow.version}.a`;
      const inbox = createInbox();
      const got: Msg[] = [];
      const sub = nc.subscribe(inbox, { callback: (_e, m) => void got.push(m) });
      const send = (bytes: Uint8Array) => nc.publish(subject, bytes, { reply: inbox });
      const kinds = () => got.map((m) => peekKind(m.data).kind);

      send(Uint8Array.of(0xc1, 0x00));
      const e1 = await waitFor("an error for garbage", () => got[0]);
      const err1 = decodeMessage(e1.data, "error");
      assert.equal(err1.code, "malformed");
      assert.match(err1.message, /bad step command/);

      const cmd: StepCommand = {
        commandId: crypto.randomUUID(),
        runId: crypto.randomUUID(),
        flow: "ts-robust",
        version: flow.version,
        step: "a",
        stepIndex: 0,
        kind: "execute",
        attempt: 1,
        input: encodeValue({ x: 1 }),
        outputs: [],
      };
      const v1 = encodeMessage("step.command", cmd);
      v1[3] = 1; // the envelope's v
      send(v1);
      await waitFor("an error for version 1", () => got.length >= 2);
      const err2 = decodeMessage(got[1]!.data, "error");
      assert.equal(err2.code, "malformed");
      assert.match(err2.message, /protocol version 1/);
      assert.equal(err2.commandId, cmd.commandId);

      send(encodeMessage("step.command", { ...cmd, commandId: crypto.randomUUID(), startByMs: Date.now() - 1000 }));
      await waitFor("an expired error", () => got.length >= 3);
      assert.equal(decodeMessage(got[2]!.data, "error").code, "expired");

      send(encodeMessage("step.command", { ...cmd, commandId: crypto.randomUUID(), kind: "compensate" }));
      await waitFor("a no_handler error", () => got.length >= 4);
      assert.equal(decodeMessage(got[3]!.data, "error").code, "no_handler");

      // A good command: ack, then outcome; sent again: the same outcome, not run twice.
      send(encodeMessage("step.command", cmd));
      await waitFor("ack and outcome", () => got.length >= 6);
      assert.deepEqual(kinds().slice(4, 6), ["step.ack", "step.outcome"]);
      const outcome = decodeMessage(got[5]!.data, "step.outcome");
      assert.equal(outcome.result.type, "completed");
      send(encodeMessage("step.command", cmd));
      await waitFor("the cached outcome", () => got.length >= 7);
      assert.deepEqual(Buffer.from(got[6]!.data), Buffer.from(got[5]!.data));
      assert.equal(runs, 1);
      assert.equal(kinds().filter((k) => k === "error").length, 4);
      sub.unsubscribe();

      // And the worker still serves runs through the coordinator.
      const client = new Client(nc, { prefix: stack.prefix, retryUnknownForMs: 15_000 });
      const r = await client.run("ts-robust", { x: 41 }, { version: flow.version });
      assert.equal(r.status, "completed");
      assert.equal(step(r, "a")?.output, 42);
    } finally {
      await worker.close();
    }
  });

  test("the quick-start example prints the quick start's lines", { skip: !existsSync(join(REPO_ROOT, "examples/typescript/dist/quick-start.js")) && "examples/typescript is not built" }, async () => {
    const p = start("node", [join(REPO_ROOT, "examples/typescript/dist/quick-start.js")], { NATS_URL: stack.url, ORCHESTRIX_PREFIX: stack.prefix });
    const code = await Promise.race([p.exited, new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 60_000).unref())]);
    if (code === "timeout") await p.stop("SIGKILL");
    assert.equal(code, 0, `the quick start exits by itself with 0; it printed:\n${p.output()}`);
    const lines = p.stdout().split("\n");
    const count = (l: string) => lines.filter((x) => x === l).length;
    assert.equal(count("Reserving stock for order order_1"), 1);
    assert.equal(count("completed"), 1);
    assert.equal(count("failed"), 1);
    assert.equal(count("Processing payment of $2000 for user user_B"), 4, p.stdout());
    assert.equal(count("Releasing stock for order order_2"), 1);
    assert.ok(lines.some((l) => l.includes("'reserve-stock: completed'")), p.stdout());
    assert.ok(count("process-payment") === 1 && count("4") === 1 && count("Payment declined: limit exceeded") === 1, p.stdout());
  });

  test("the conformance worker: retries, permanent failure with rollback, timeout, cancel, SIGTERM", { skip: !existsSync(join(REPO_ROOT, "conformance/workers/typescript/dist/worker.js")) && "the conformance worker is not built" }, async () => {
    const effects = join(tempDir("effects"), "effects.jsonl");
    const w = start("node", [join(REPO_ROOT, "conformance/workers/typescript/dist/worker.js")], {
      NATS_URL: stack.url,
      ORCHESTRIX_PREFIX: stack.prefix,
      CONFORMANCE_EFFECTS: effects,
      CONFORMANCE_WORKER_NAME: "ts-1",
    });
    try {
      await waitFor("ready", () => {
        if (w.child.exitCode !== null) throw new Error(w.output());
        return w.stdout().split("\n").includes("ready");
      });
      const lines = () =>
        existsSync(effects)
          ? readFileSync(effects, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>)
          : [];
      const of = (runId: string) => lines().filter((l) => l.runId === runId);
      const client = new Client(nc, { prefix: stack.prefix, retryUnknownForMs: 15_000 });
      const input = (id: string, o: object = {}) => ({ id, flakyFailures: 0, slowMs: 1, boundedMs: 1, fail: "none", ...o });

      const ok = await client.run("conformance", input("c1", { flakyFailures: 2 }));
      assert.equal(ok.status, "completed", JSON.stringify(ok));
      assert.equal(step(ok, "flaky")?.attempts, 3);
      const flaky = of(ok.runId).filter((l) => l.step === "flaky");
      assert.deepEqual(flaky.map((l) => `${l.attempt} ${l.event}`), ["1 start", "1 end", "2 start", "2 end", "3 start", "3 end"]);
      assert.ok(flaky.every((l) => l.worker === "ts-1" && l.kind === "execute" && typeof l.atMs === "number"));

      const declined = await client.run("conformance", input("c2", { fail: "permanent" }));
      assert.equal(declined.status, "failed");
      assert.equal(step(declined, "decide")?.error, "declined: c2");
      assert.equal(step(declined, "decide")?.attempts, 1);
      assert.equal(step(declined, "record")?.status, "compensated");
      assert.equal(step(declined, "flaky")?.status, "compensated");
      const comp = of(declined.runId).filter((l) => l.kind === "compensate");
      assert.deepEqual(comp.map((l) => `${l.step} ${l.event}`), ["flaky start", "flaky end", "record start", "record end"]);

      const bounded = await client.run("conformance", input("c3", { boundedMs: 30_000 }));
      assert.notEqual(bounded.status, "completed");
      assert.ok(bounded.durationMs < 20_000, `${bounded.durationMs}`);
      assert.ok(of(bounded.runId).some((l) => l.step === "bounded" && l.event === "stopped"));

      const { runId } = await client.start("conformance", input("c4", { slowMs: 60_000 }));
      await waitFor("slow to start", () => of(runId).some((l) => l.step === "slow" && l.event === "start"));
      await client.cancel(runId, { by: "ts-test", reason: "testing" });
      const cancelled = await client.wait(runId, 30_000);
      assert.equal(cancelled.status, "cancelled", JSON.stringify(cancelled));
      await waitFor("slow to stop", () => of(runId).some((l) => l.step === "slow" && l.event === "stopped"));
      assert.ok(!of(runId).some((l) => l.step === "slow" && l.event === "end"));
    } finally {
      const code = await w.stop("SIGTERM");
      assert.equal(code, 0, w.output());
    }
  });

  test("mixed replicas: a Rust worker and a TypeScript worker share one flow version", { skip: !existsSync(process.env.PAYMENT_WORKER_BIN || join(REPO_ROOT, "target/debug/examples/payment_worker")) && "the Rust payment_worker example is not built" }, async () => {
    const bin = process.env.PAYMENT_WORKER_BIN || join(REPO_ROOT, "target/debug/examples/payment_worker");
    const rust = start(bin, [], { NATS_URL: stack.url, ORCHESTRIX_PREFIX: stack.prefix, RUST_LOG: "warn" });
    const counts: Record<string, number> = {};
    // examples/shared/payment.rs: the quick start's flow with a 10 s timeout on the payment.
    const flow = paymentFlow(counts, { timeoutMs: 10_000 });
    const worker = await Worker.start({ flows: [flow], connection: nc, prefix: stack.prefix });
    try {
      const rustVersion = await waitFor("the Rust worker to serve", () => {
        if (rust.child.exitCode !== null) throw new Error(rust.output());
        return /serving payment-flow version ([0-9a-f]{16})/.exec(rust.stdout())?.[1];
      });
      assert.equal(flow.version, rustVersion, "TypeScript and Rust hash the same definition alike");
      const client = new Client(nc, { prefix: stack.prefix, retryUnknownForMs: 15_000 });
      const n = 24;
      const results = await Promise.all(
        Array.from({ length: n }, (_, i) => client.run("payment-flow", { orderId: `mixed-${i}`, amount: 5, userId: "u" }, { version: rustVersion })),
      );
      assert.ok(results.every((r) => r.status === "completed"));
      const rustCount = () => rust.stdout().split("\n").filter((l) => l.startsWith("Reserving stock for order mixed-")).length;
      await waitFor("every reservation accounted for", () => rustCount() + (counts.reserve ?? 0) === n);
      assert.ok((counts.reserve ?? 0) > 0, "the TypeScript worker got commands");
      assert.ok(rustCount() > 0, "the Rust worker got commands");
    } finally {
      await worker.close();
      await rust.stop();
    }
  });
});
