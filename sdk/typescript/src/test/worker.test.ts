/**
 * The worker against a real nats-server, driven by hand-made commands: the
 * rules the Rust worker follows (worker-sdk/src/worker.rs), one by one.
 */
import { execFileSync, spawn } from "node:child_process";
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { connect as natsConnect, createInbox, type Msg, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { create, PermanentError, Worker, type Flow } from "../index.js";
import { decodeMessage, decodeValue, encodeMessage, encodeValue, peekKind, type StepCommand } from "../protocol.js";
import { workerKey } from "../worker.js";
import { freePort, natsServerBin, startNats, waitFor, type Proc } from "./harness.js";
import { Client } from "../index.js";

const skip = !natsServerBin() && process.env.ORCHESTRIX_E2E !== "1" ? "nats-server not found (NATS_SERVER_BIN)" : false;
const P = "wt";

class Inbox {
  readonly subject = createInbox();
  readonly msgs: Msg[] = [];
  constructor(nc: NatsConnection) {
    nc.subscribe(this.subject, { callback: (_e, m) => void this.msgs.push(m) });
  }
  kinds(): string[] {
    return this.msgs.map((m) => peekKind(m.data).kind);
  }
  async next(kind: string, after = 0): Promise<Msg> {
    return waitFor(`a ${kind} on ${this.subject}`, () => this.msgs.slice(after).find((m) => peekKind(m.data).kind === kind));
  }
}

function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((r) => (open = r));
  return { wait, open };
}

function untilAborted(signal: AbortSignal): Promise<void> {
  return new Promise((r) => (signal.aborted ? r() : signal.addEventListener("abort", () => r(), { once: true })));
}

describe("the worker, command by command", { skip }, () => {
  let nats: Proc;
  let url: string;
  let nc: NatsConnection;
  const workers: Worker[] = [];

  const serve = async (flow: Flow<any>, extra: Partial<Parameters<typeof Worker.start>[0]> = {}) => {
    const w = await Worker.start({ flows: [flow], connection: nc, prefix: P, heartbeatMs: 50, log: () => {}, ...extra });
    workers.push(w);
    return w;
  };
  const command = (flow: Flow<any>, step: string, patch: Partial<StepCommand> = {}): StepCommand => ({
    commandId: crypto.randomUUID(),
    runId: crypto.randomUUID(),
    flow: flow.name,
    version: flow.version,
    step,
    stepIndex: flow.steps.indexOf(step),
    kind: "execute",
    attempt: 1,
    input: encodeValue({ n: 1 }),
    outputs: [],
    ...patch,
  });
  const send = (flow: Flow<any>, cmd: StepCommand, reply: Inbox, via: "step" | "inquire" = "step") =>
    nc.publish(via === "step" ? `${P}.step.${flow.name}.${flow.version}.${cmd.step}` : `${P}.inquire.${flow.name}.${cmd.step}`, encodeMessage("step.command", cmd), {
      reply: reply.subject,
    });

  before(async () => {
    const started = await startNats();
    nats = started.nats;
    url = started.url;
    nc = await natsConnect({ servers: url });
  });
  after(async () => {
    for (const w of workers) await w.close();
    await nc?.close();
    await nats?.stop();
  });

  test("ack first, heartbeats, a re-delivery moves the answers to its reply subject, never run twice", async () => {
    const g = gate();
    let runs = 0;
    const flow = create("w-redeliver").step("a", async () => {
      runs++;
      await g.wait;
      return "done";
    });
    await serve(flow);
    const cmd = command(flow, "a");
    const [a, b, c] = [new Inbox(nc), new Inbox(nc), new Inbox(nc)];
    send(flow, cmd, a);
    await a.next("step.heartbeat");
    assert.equal(a.kinds()[0], "step.ack");
    const ack = decodeMessage(a.msgs[0]!.data, "step.ack");
    assert.deepEqual([ack.commandId, ack.runId, ack.attempt], [cmd.commandId, cmd.runId, 1]);
    send(flow, cmd, b); // a coordinator that took over
    await b.next("step.ack");
    await b.next("step.heartbeat");
    g.open();
    const outcome = decodeMessage((await b.next("step.outcome")).data, "step.outcome");
    assert.deepEqual(outcome.result.type === "completed" && decodeValue(outcome.result.output), "done");
    assert.ok(!a.kinds().includes("step.outcome"), "the outcome went to the latest reply subject only");
    send(flow, cmd, c);
    const cached = await c.next("step.outcome");
    assert.deepEqual(Buffer.from(cached.data), Buffer.from(b.msgs.find((m) => peekKind(m.data).kind === "step.outcome")!.data));
    assert.equal(runs, 1);
  });

  test("commands read together are acknowledged in one step.acks when the coordinator reads it, before any starts", async () => {
    const ran: string[] = [];
    const flow = create("w-burst").step("a", async (ctx) => {
      ran.push(ctx.commandId);
      return "done";
    });
    await serve(flow);
    // "field": the command's `acks`; "header": an older coordinator's header.
    const burst = async (batch: "field" | "header" | "no") => {
      const reply = new Inbox(nc);
      await nc.flush();
      const cmds = Array.from({ length: 5 }, () => ({ ...command(flow, "a"), ...(batch === "field" ? { acks: true } : {}) }));
      // Published by another process while this one's event loop is held
      // (execFileSync), and held a little longer: the burst waits in the
      // socket and is read at once.
      const publisher = `
        import { connect, headers } from ${JSON.stringify(import.meta.resolve("@nats-io/transport-node"))};
        const [url, subject, reply, batch, ...bodies] = process.argv.slice(1);
        const nc = await connect({ servers: url });
        for (const body of bodies) {
          const h = headers();
          if (batch === "1") h.set("Orchestrix-Acks", "batch");
          nc.publish(subject, Buffer.from(body, "hex"), { reply, headers: h });
        }
        await nc.flush();
        await nc.close();`;
      const bodies = cmds.map((c) => Buffer.from(encodeMessage("step.command", c)).toString("hex"));
      const subject = `${P}.step.${flow.name}.${flow.version}.a`;
      execFileSync(process.execPath, ["--input-type=module", "-e", publisher, url, subject, reply.subject, batch === "header" ? "1" : "0", ...bodies]);
      const until = Date.now() + 300;
      while (Date.now() < until) {
        /* busy */
      }
      await waitFor("every outcome", () => reply.kinds().filter((k) => k === "step.outcome").length === 5 || undefined);
      // Each command acked once, before its outcome.
      const acked = new Map<string, number>();
      for (const m of reply.msgs) {
        const kind = peekKind(m.data).kind;
        if (kind === "step.ack") acked.set(decodeMessage(m.data, "step.ack").commandId, acked.size);
        if (kind === "step.acks") for (const c of decodeMessage(m.data, "step.acks").commands) acked.set(c.commandId, acked.size);
        if (kind === "step.outcome") assert.ok(acked.has(decodeMessage(m.data, "step.outcome").commandId), "acked before its outcome");
      }
      for (const cmd of cmds) {
        assert.ok(acked.has(cmd.commandId));
        assert.equal(ran.filter((id) => id === cmd.commandId).length, 1, "ran once");
      }
      return reply.kinds().filter((k) => k !== "step.outcome");
    };
    assert.deepEqual(await burst("field"), ["step.acks"]);
    assert.deepEqual(await burst("header"), ["step.acks"]);
    assert.deepEqual(await burst("no"), Array(5).fill("step.ack"));
  });

  test("a worker process that exits as its handler starts has written its ack first", async () => {
    const flow = create("w-exit").step("a", () => "never");
    // The worker in a process of its own, whose handler ends the process at
    // once, before anything it was handed later could be written.
    const child = `
      import { create, Worker } from ${JSON.stringify(new URL("../index.js", import.meta.url).href)};
      import { connect } from ${JSON.stringify(import.meta.resolve("@nats-io/transport-node"))};
      const [url, prefix] = process.argv.slice(1);
      const nc = await connect({ servers: url });
      const flow = create("w-exit").step("a", () => process.exit(70));
      await Worker.start({ flows: [flow], connection: nc, prefix, log: () => {} });
      console.log("ready");`;
    const proc = spawn(process.execPath, ["--input-type=module", "-e", child, url, P], { stdio: ["ignore", "pipe", "inherit"] });
    const exited = new Promise<number | null>((r) => proc.on("exit", (code) => r(code)));
    let out = "";
    proc.stdout.on("data", (d) => (out += d));
    await waitFor("the worker process to serve", () => out.includes("ready"));
    const box = new Inbox(nc);
    await nc.flush();
    send(flow, command(flow, "a"), box);
    assert.equal(await exited, 70, "the handler ended the process");
    await box.next("step.ack");
  });

  test("the inquiry subject: silence about a command not held, the answer about one held", async () => {
    const flow = create("w-inquire").step("a", () => 7);
    await serve(flow);
    const held = command(flow, "a");
    const first = new Inbox(nc);
    send(flow, held, first);
    await first.next("step.outcome");
    const [unknown, known] = [new Inbox(nc), new Inbox(nc)];
    send(flow, command(flow, "a"), unknown, "inquire");
    send(flow, held, known, "inquire");
    await known.next("step.outcome");
    // Answers leave in order: had the first inquiry been answered, it would be in by now.
    await new Promise((r) => nc.flush().then(r));
    assert.equal(unknown.msgs.length, 0);
  });

  test("step.cancel aborts a running handler; a command cancelled before it arrives never starts", async () => {
    let aborted = false;
    const flow = create("w-cancel").step("a", async (ctx) => {
      await untilAborted(ctx.signal);
      aborted = true;
    });
    await serve(flow);
    const cmd = command(flow, "a");
    const box = new Inbox(nc);
    send(flow, cmd, box);
    await box.next("step.ack");
    nc.publish(`${P}.inquire.w-cancel.a`, encodeMessage("step.cancel", { commandId: cmd.commandId, runId: cmd.runId, attempt: 1 }));
    const outcome = decodeMessage((await box.next("step.outcome")).data, "step.outcome");
    assert.deepEqual(outcome.result, { type: "failed", message: "cancelled: the run was cancelled while the handler ran", retryable: false, maybeDone: true });
    await waitFor("the handler to see its signal", () => aborted);

    const later = command(flow, "a");
    nc.publish(`${P}.inquire.w-cancel.a`, encodeMessage("step.cancel", { commandId: later.commandId, runId: later.runId, attempt: 1 }));
    await nc.flush();
    const box2 = new Inbox(nc);
    send(flow, later, box2);
    const err = decodeMessage((await box2.next("error")).data, "error");
    assert.equal(err.code, "expired");
    assert.equal(err.commandId, later.commandId);
    assert.ok(!box2.kinds().includes("step.ack"));
  });

  test("a timeout or a deadline stops the handler: failed, retryable, maybe done", async () => {
    const stopped: string[] = [];
    const flow = create("w-time").step("a", async (ctx) => {
      await untilAborted(ctx.signal);
      stopped.push(ctx.commandId);
    });
    await serve(flow);
    const t = new Inbox(nc);
    send(flow, command(flow, "a", { timeoutMs: 100 }), t);
    const o1 = decodeMessage((await t.next("step.outcome")).data, "step.outcome");
    assert.deepEqual(o1.result, { type: "failed", message: "step timed out after 100ms", retryable: true, maybeDone: true });
    const d = new Inbox(nc);
    send(flow, command(flow, "a", { deadlineMs: Date.now() + 150 }), d);
    const o2 = decodeMessage((await d.next("step.outcome")).data, "step.outcome");
    assert.deepEqual(o2.result, { type: "failed", message: "the attempt reached its deadline (the run's deadline)", retryable: true, maybeDone: true });
    await waitFor("both handlers to see their signal", () => stopped.length === 2);
  });

  test("errors: permanent or retryable, as thrown; an output too large fails for good, maybe done", async () => {
    const flow = create<{ how: string }>("w-errors").step("a", (ctx) => {
      if (ctx.input.how === "permanent") throw new PermanentError("card stolen");
      if (ctx.input.how === "string") throw "plain text";
      if (ctx.input.how === "big") return "x".repeat(10_000);
      if (ctx.input.how === "unencodable") return { f: () => 1 };
      throw new Error("try again");
    });
    await serve(flow, { maxMessageBytes: 4096 });
    const result = async (how: string) => {
      const box = new Inbox(nc);
      send(flow, command(flow, "a", { input: encodeValue({ how }) }), box);
      return decodeMessage((await box.next("step.outcome")).data, "step.outcome").result;
    };
    assert.deepEqual(await result("permanent"), { type: "failed", message: "card stolen", retryable: false, maybeDone: false });
    assert.deepEqual(await result("retry"), { type: "failed", message: "try again", retryable: true, maybeDone: false });
    assert.deepEqual(await result("string"), { type: "failed", message: "plain text", retryable: true, maybeDone: false });
    const odd = await result("unencodable");
    assert.ok(odd.type === "failed" && !odd.retryable && odd.maybeDone && /does not encode/.test(odd.message), JSON.stringify(odd));
    const big = await result("big");
    assert.ok(big.type === "failed" && !big.retryable && big.maybeDone && /over the 4096-byte message limit/.test(big.message), JSON.stringify(big));
  });

  test("at most `concurrency` handlers at once; the others wait for a slot (heartbeating)", async () => {
    const g = gate();
    let active = 0;
    let most = 0;
    const flow = create("w-slots").step("a", async () => {
      active++;
      most = Math.max(most, active);
      await g.wait;
      active--;
    });
    await serve(flow, { concurrency: 2 });
    const boxes = Array.from({ length: 5 }, () => new Inbox(nc));
    for (const b of boxes) send(flow, command(flow, "a"), b);
    for (const b of boxes) await b.next("step.heartbeat");
    assert.equal(most, 2);
    g.open();
    for (const b of boxes) await b.next("step.outcome");
    assert.equal(most, 2);
  });

  test("close drains: no new commands, handlers in flight finish and send their outcome", async () => {
    const g = gate();
    const flow = create("w-drain").step("a", async () => {
      await g.wait;
      return "finished";
    });
    const w = await Worker.start({ flows: [flow], connection: nc, prefix: P, heartbeatMs: 50, log: () => {} });
    const box = new Inbox(nc);
    send(flow, command(flow, "a"), box);
    await box.next("step.ack");
    let closed = false;
    const closing = w.close().then(() => (closed = true));
    // Closing unsubscribes: a command sent now finds no subscriber.
    await waitFor("the step subscription to go", async () => {
      const probe = await nc.request(`${P}.step.w-drain.${flow.version}.a`, encodeMessage("step.command", command(flow, "a")), { timeout: 1000 }).then(
        () => false,
        (e: Error) => /no responders/i.test(e.message) || e.name === "RequestError",
      );
      return probe;
    });
    assert.equal(closed, false, "close waits for the handler in flight");
    g.open();
    await closing;
    const outcome = decodeMessage((await box.next("step.outcome")).data, "step.outcome");
    assert.equal(outcome.result.type, "completed");
    assert.equal(w.inFlightCount, 0);
  });

  test("a connection that fails says where it tried", async () => {
    const port = await freePort();
    await assert.rejects(Client.connect({ url: `nats://127.0.0.1:${port}`, nats: { reconnect: false, timeout: 2000 } }), new RegExp(`cannot connect to NATS at nats://127.0.0.1:${port}`));
    await assert.rejects(Worker.start({ flows: [], connection: nc }), /no flows to serve/);
  });

  test("registration is create-only; presence carries a TTL and is withdrawn on close", async () => {
    const flow = create("w-reg", { version: "one" }).step("a", () => 1);
    const w = await serve(flow);
    const kvm = new Kvm(nc);
    const flows = await kvm.open(`${P}_flows`);
    const reg = decodeMessage((await flows.get("w-reg.one"))!.value, "flow.registration");
    assert.equal(reg.version, "one");
    assert.equal(reg.registeredBy, w.id);
    const presenceKey = workerKey(w.id);
    const jsm = await jetstreamManager(nc);
    const stored = await jsm.streams.getMessage(`KV_${P}_workers`, { last_by_subj: `$KV.${P}_workers.${presenceKey}` });
    assert.equal(stored?.header.get("Nats-TTL"), "6s");
    const presence = decodeMessage(stored!.data, "worker.presence");
    assert.deepEqual(presence.flows, [{ flow: "w-reg", version: "one", steps: ["a"] }]);

    // The same definition again: fine. Another one under the same label: refused.
    await serve(create("w-reg", { version: "one" }).step("a", () => 2));
    await assert.rejects(
      Worker.start({ flows: [create("w-reg", { version: "one" }).step("a", () => 1, { retries: 1 })], connection: nc, prefix: P, log: () => {} }),
      /already registered with a different definition/,
    );
    await w.close();
    const workersKv = await kvm.open(`${P}_workers`);
    const after = await workersKv.get(presenceKey);
    assert.ok(after === null || after.operation !== "PUT", "presence withdrawn");
  });
});
