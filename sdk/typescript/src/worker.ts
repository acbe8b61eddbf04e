/**
 * A worker: serves the steps of flows from NATS, as the Rust worker does
 * (worker-sdk/src/worker.rs): ack before start, heartbeats every second,
 * a de-dup cache of the last 10,000 command ids, answers of a command
 * re-delivered while running going to its latest reply subject, an inquiry
 * subject heard without queue group (re-sent commands and `step.cancel`),
 * `error` replies (malformed, expired, no_handler), deadlines and timeouts,
 * flow registration (KV `{p}_flows`, create-only) and presence (KV
 * `{p}_workers`, per-message TTL, renewed every 2 s).
 */
import { hostname } from "node:os";
import { randomBytes } from "node:crypto";
import { headers as natsHeaders, type Msg, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamClient } from "@nats-io/jetstream";
import { Kvm, type KV } from "@nats-io/kv";
import { canonicalFlowDef, flowDefFromWire, flowDefWire } from "./flowdef.js";
import type { Flow, StepContext } from "./flow.js";
import {
  ACKS_HEADER,
  DEFAULT_MAX_MESSAGE_BYTES,
  KIND_HEADER,
  ProtocolError,
  decodeMessage,
  decodeValue,
  encodeMessage,
  encodeValue,
  peekKind,
  type AckedCommand,
  type Kind,
  type Messages,
  type OutcomeResult,
  type StepCommand,
  type WireError,
  type WorkerPresence,
} from "./protocol.js";
import { openNats, resolveOptions, type ConnectOptions } from "./connection.js";

export const PRESENCE_TTL_MS = 6000;
export const PRESENCE_EVERY_MS = 2000;

export interface WorkerOptions {
  /** The flows to serve (every step of each). */
  flows: Flow<any>[];
  /** An open connection (kept open by `close`), or settings to open one (closed by `close`). */
  connection?: NatsConnection | string | ConnectOptions;
  /** Subject prefix (default: ORCHESTRIX_PREFIX, else "orchestrix"). */
  prefix?: string;
  /** Handlers running at once (default 64); more commands wait for a slot. */
  concurrency?: number;
  heartbeatMs?: number;
  /** Command ids remembered (default 10,000). */
  dedupWindow?: number;
  maxMessageBytes?: number;
  /** How long `close` waits for handlers in flight (default 60 s). */
  drainTimeoutMs?: number;
  /** Register definitions and presence in the flow registry (default true). */
  registry?: boolean;
  /** Called with warnings (default: console.warn). */
  log?: (message: string) => void;
}

type Seen =
  | { state: "running"; reply: { subject: string }; abort: AbortController }
  | { state: "done"; outcome: Uint8Array }
  | { state: "cancelled" };

/** The last `cap` command ids seen, and what became of them. */
export class Dedup {
  private readonly map = new Map<string, Seen>();
  constructor(readonly cap: number) {}
  get(id: string): Seen | undefined {
    return this.map.get(id);
  }
  remember(id: string, seen: Seen): void {
    if (this.map.has(id)) {
      this.map.set(id, seen);
      return;
    }
    this.map.set(id, seen);
    while (this.map.size > this.cap) {
      const oldest = this.map.keys().next();
      if (oldest.done) break;
      this.map.delete(oldest.value);
    }
  }
  /** Lets go of a command admitted but not started, so that a re-delivery may run it. */
  forget(id: string): void {
    if (this.map.get(id)?.state === "running") this.map.delete(id);
  }
  finish(id: string, outcome: Uint8Array): void {
    if (this.map.has(id)) this.map.set(id, { state: "done", outcome });
  }
  get size(): number {
    return this.map.size;
  }
}

class Semaphore {
  private waiting: (() => void)[] = [];
  constructor(private free: number) {}
  async acquire(): Promise<() => void> {
    if (this.free > 0) this.free--;
    else await new Promise<void>((r) => this.waiting.push(r));
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiting.shift();
      if (next) next();
      else this.free++;
    };
  }
}

interface StepReg {
  flow: Flow<any>;
  version: string;
  step: string;
}

/** The worker id: host, pid and a random tag. */
export function workerId(): string {
  const host = (hostname() || process.env.HOSTNAME || "worker").trim() || "worker";
  return `${host}-${process.pid}-${randomBytes(3).toString("hex")}`;
}

/** The KV key of a worker id: anything but letters, digits, `-`, `_` becomes `_`. */
export function workerKey(worker: string): string {
  const k = worker.replace(/[^A-Za-z0-9_-]/g, "_");
  return k.length ? k : "_";
}

function formatMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${ms}ms`;
}

/** The handler's time budget and what to say when it runs out (as budget() in handler.rs). */
export function budget(timeoutMs: number | undefined, deadlineMs: number | undefined, now = Date.now()): { ms: number; why: string } | undefined {
  const left = deadlineMs === undefined ? undefined : Math.max(0, deadlineMs - now);
  const deadline = "the attempt reached its deadline (the run's deadline)";
  if (timeoutMs !== undefined && left !== undefined) {
    if (left + 250 < timeoutMs) return { ms: left, why: deadline };
    return { ms: Math.min(timeoutMs, left), why: `step timed out after ${formatMs(timeoutMs)}` };
  }
  if (timeoutMs !== undefined) return { ms: timeoutMs, why: `step timed out after ${formatMs(timeoutMs)}` };
  if (left !== undefined) return { ms: left, why: deadline };
  return undefined;
}

function errorMessage(e: unknown): string {
  if (e instanceof Error) return e.message || e.name;
  if (typeof e === "string") return e;
  try {
    return JSON.stringify(e) ?? String(e);
  } catch {
    return String(e);
  }
}

function isRetryable(e: unknown): boolean {
  if (e !== null && typeof e === "object" && "retryable" in e) return (e as { retryable: unknown }).retryable !== false;
  return true;
}

/** Opens (or creates) a KV bucket as the Rust registry does. */
async function openBucket(nc: NatsConnection, name: string, markers: boolean): Promise<KV> {
  const kvm = new Kvm(nc);
  const jsm = await jetstreamManager(nc, { timeout: 5000 });
  try {
    await jsm.streams.info(`KV_${name}`);
    return await kvm.open(name);
  } catch {
    try {
      return await kvm.create(name, { history: 1, ...(markers ? { markerTTL: 1000 } : {}) });
    } catch (e) {
      try {
        await jsm.streams.info(`KV_${name}`);
        return await kvm.open(name);
      } catch {
        throw new Error(`flow registry unavailable: cannot open bucket ${name}: ${errorMessage(e)}`, { cause: e });
      }
    }
  }
}

/** A worker process serving flows. Start with `Worker.start`, stop with `close`. */
export class Worker {
  readonly id = workerId();
  private readonly subs: Subscription[] = [];
  private readonly regs: StepReg[] = [];
  private readonly dedup: Dedup;
  private readonly slots: Semaphore;
  private readonly inFlight = new Set<Promise<void>>();
  private presenceTimer: NodeJS.Timeout | undefined;
  private presence: WorkerPresence | undefined;
  private js: JetStreamClient | undefined;
  private workers: KV | undefined;
  private workersBucket = "";
  private closing: Promise<void> | undefined;
  private readonly prefix: string;
  private readonly heartbeatMs: number;
  private readonly maxMessageBytes: number;
  private readonly drainTimeoutMs: number;
  private readonly log: (m: string) => void;

  private constructor(
    readonly nc: NatsConnection,
    private readonly ownsConnection: boolean,
    prefix: string,
    private readonly options: WorkerOptions,
  ) {
    this.prefix = prefix;
    this.dedup = new Dedup(Math.max(1, options.dedupWindow ?? 10_000));
    this.slots = new Semaphore(Math.max(1, options.concurrency ?? 64));
    this.heartbeatMs = Math.max(10, options.heartbeatMs ?? 1000);
    this.maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.drainTimeoutMs = options.drainTimeoutMs ?? 60_000;
    this.log = options.log ?? ((m) => console.warn(`orchestrix worker: ${m}`));
  }

  /** Registers the flows, subscribes their steps, announces presence; resolves once serving. */
  static async start(options: WorkerOptions): Promise<Worker> {
    if (!options.flows || options.flows.length === 0) throw new TypeError("the worker has no flows to serve");
    const settings = resolveOptions(
      typeof options.connection === "string" || (options.connection && !("publish" in options.connection)) ? (options.connection as string | ConnectOptions) : { prefix: options.prefix },
      "orchestrix-worker (ts)",
    );
    const prefix = options.prefix ?? settings.prefix;
    // Definitions validated before anything is opened.
    const flows = options.flows.map((f) => ({ flow: f, def: f.definition(), version: f.version }));
    const seen = new Set<string>();
    for (const f of flows) {
      if (seen.has(f.def.name)) throw new TypeError(`flow \`${f.def.name}\` is given twice`);
      seen.add(f.def.name);
    }
    const given = options.connection && typeof options.connection === "object" && "publish" in options.connection ? (options.connection as NatsConnection) : undefined;
    const nc = given ?? (await openNats(settings));
    const w = new Worker(nc, !given, prefix, options);
    try {
      await w.begin(flows);
    } catch (e) {
      await w.abort();
      throw e;
    }
    return w;
  }

  private async begin(flows: { flow: Flow<any>; def: ReturnType<Flow["definition"]>; version: string }[]): Promise<void> {
    const p = this.prefix;
    const bucketPrefix = p.replace(/\./g, "_");
    if (this.options.registry !== false) {
      const flowsKv = await openBucket(this.nc, `${bucketPrefix}_flows`, false);
      this.workersBucket = `${bucketPrefix}_workers`;
      this.workers = await openBucket(this.nc, this.workersBucket, true);
      this.js = jetstream(this.nc, { timeout: 5000 });
      for (const f of flows) await this.register(flowsKv, f.def, f.version);
    }
    for (const f of flows) {
      for (const step of f.flow.steps) {
        const reg: StepReg = { flow: f.flow, version: f.version, step };
        this.regs.push(reg);
        const subject = `${p}.step.${f.def.name}.${f.version}.${step}`;
        this.subs.push(
          this.nc.subscribe(subject, {
            queue: `${p}.${f.def.name}.${step}`,
            callback: (err, msg) => (err ? this.log(`subscription ${subject}: ${err.message}`) : this.onMessage(msg, reg, "queue")),
          }),
        );
        const inquiries = `${p}.inquire.${f.def.name}.${step}`;
        this.subs.push(
          this.nc.subscribe(inquiries, {
            callback: (err, msg) => (err ? this.log(`subscription ${inquiries}: ${err.message}`) : this.onMessage(msg, reg, "inquiry")),
          }),
        );
      }
    }
    // Subscriptions in force at the server before the worker says it serves.
    await this.nc.flush();
    if (this.workers && this.js) {
      this.presence = {
        worker: this.id,
        host: hostname(),
        startedAtMs: Date.now(),
        flows: flows.map((f) => ({ flow: f.def.name, version: f.version, steps: f.flow.steps })),
      };
      await this.announce();
      this.presenceTimer = setInterval(() => {
        this.announce().catch((e: unknown) => this.log(`cannot renew this worker's presence: ${errorMessage(e)}`));
      }, PRESENCE_EVERY_MS);
    }
  }

  private async register(kv: KV, def: ReturnType<Flow["definition"]>, version: string): Promise<void> {
    const key = `${def.name}.${version}`;
    const bytes = encodeMessage("flow.registration", {
      flow: flowDefWire(def) as unknown as Record<string, unknown>,
      version,
      registeredAtMs: Date.now(),
      registeredBy: this.id,
    });
    try {
      await kv.create(key, bytes);
      return;
    } catch (e) {
      const existing = await kv.get(key).catch(() => null);
      if (!existing || existing.operation !== "PUT") {
        throw new Error(`flow registry unavailable: cannot register ${key}: ${errorMessage(e)}`, { cause: e });
      }
      let theirs: Uint8Array;
      let by = "?";
      try {
        const reg = decodeMessage(existing.value, "flow.registration");
        by = reg.registeredBy;
        theirs = canonicalFlowDef(flowDefFromWire(reg.flow));
      } catch (err) {
        throw new Error(`unreadable registry entry ${key}: ${errorMessage(err)}`);
      }
      const ours = canonicalFlowDef(def);
      if (Buffer.compare(Buffer.from(theirs), Buffer.from(ours)) !== 0) {
        throw new Error(
          `flow \`${def.name}\` version \`${version}\` is already registered with a different definition (registered by ${by}); change the version label or keep the definition`,
        );
      }
    }
  }

  private async announce(): Promise<void> {
    if (!this.js || !this.presence || !this.workers) return;
    const h = natsHeaders();
    h.set(KIND_HEADER, "worker.presence");
    await this.js.publish(`$KV.${this.workersBucket}.${workerKey(this.id)}`, encodeMessage("worker.presence", this.presence), {
      headers: h,
      ttl: `${PRESENCE_TTL_MS / 1000}s`,
    });
  }

  /** Handlers running now. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** Sends a reply; false if the client refused it (logged). */
  private send<K extends Kind>(subject: string, kind: K, body: Messages[K]): boolean {
    return this.sendRaw(subject, kind, encodeMessage(kind, body));
  }

  private sendRaw(subject: string, kind: Kind, bytes: Uint8Array): boolean {
    try {
      const h = natsHeaders();
      h.set(KIND_HEADER, kind);
      this.nc.publish(subject, bytes, { headers: h });
      return true;
    } catch (e) {
      this.log(`cannot send a reply to ${subject}: ${errorMessage(e)}`);
      return false;
    }
  }

  /**
   * Commands admitted and not yet acknowledged: the client delivers every
   * message of one socket read before a microtask runs, so those read
   * together are acknowledged together (one `step.acks` per coordinator
   * that reads them, protocol 5.1 step 5), and only then started.
   */
  private admitted: { reply: string; batch: boolean; acked: AckedCommand; start: () => void }[] = [];

  private admit(reply: string, batch: boolean, acked: AckedCommand, start: () => void): void {
    this.admitted.push({ reply, batch, acked, start });
    if (this.admitted.length === 1) queueMicrotask(() => this.acknowledge());
  }

  private acknowledge(): void {
    const admitted = this.admitted;
    this.admitted = [];
    const sent = new Set<string>();
    const groups = new Map<string, AckedCommand[]>();
    for (const a of admitted) {
      if (!a.batch) {
        if (this.send(a.reply, "step.ack", { ...a.acked, worker: this.id })) sent.add(a.acked.commandId);
        continue;
      }
      const group = groups.get(a.reply);
      if (group) group.push(a.acked);
      else groups.set(a.reply, [a.acked]);
    }
    for (const [reply, all] of groups) {
      // About 100 bytes a command: each message stays far under the limit.
      const per = Math.max(1, Math.floor(this.maxMessageBytes / 256));
      for (let i = 0; i < all.length; i += per) {
        const commands = all.slice(i, i + per);
        const ok =
          commands.length === 1
            ? this.send(reply, "step.ack", { ...commands[0]!, worker: this.id })
            : this.send(reply, "step.acks", { worker: this.id, commands });
        if (ok) for (const c of commands) sent.add(c.commandId);
      }
    }
    // The acks go out before any handler can start: an attempt never acked
    // was never started. One whose ack could not go is not started at all.
    const starts: (() => void)[] = [];
    for (const a of admitted) {
      if (sent.has(a.acked.commandId)) {
        starts.push(a.start);
      } else {
        this.log(`command ${a.acked.commandId} not started: its ack could not be sent`);
        this.dedup.forget(a.acked.commandId);
      }
    }
    // The client writes what it was handed in a microtask queued by the
    // first message; the handlers start in one queued after it, so the acks
    // are written to the socket first: a worker process that dies as a
    // handler starts has still told its coordinator it took the command.
    if (starts.length > 0) queueMicrotask(() => starts.forEach((start) => start()));
  }

  private onMessage(msg: Msg, reg: StepReg, via: "queue" | "inquiry"): void {
    try {
      this.handle(msg, reg, via);
    } catch (e) {
      // Never let one message stop the worker.
      this.log(`message on ${msg.subject} not handled: ${errorMessage(e)}`);
    }
  }

  private handle(msg: Msg, reg: StepReg, via: "queue" | "inquiry"): void {
    if (this.closing && via === "queue") return;
    if (via === "inquiry") {
      let kind: string | undefined;
      try {
        kind = peekKind(msg.data, this.maxMessageBytes).kind;
      } catch {
        kind = undefined;
      }
      if (kind === "step.cancel") return this.cancel(msg);
    }
    const reply = msg.reply;
    if (!reply) {
      this.log(`step command on ${msg.subject} without a reply subject dropped`);
      return;
    }
    let cmd: StepCommand;
    try {
      cmd = decodeMessage(msg.data, "step.command", this.maxMessageBytes);
    } catch (e) {
      const message = `bad step command on ${msg.subject}: ${errorMessage(e)}`;
      this.log(message);
      // Every replica hears an inquiry: answering it would be noise.
      if (via === "inquiry") return;
      const err: WireError = { message, code: "malformed" };
      if (e instanceof ProtocolError && e.ids) {
        err.commandId = e.ids.commandId;
        err.runId = e.ids.runId;
      }
      this.send(reply, "error", err);
      return;
    }
    const flowName = reg.flow.name;
    if (cmd.flow !== flowName || cmd.step !== reg.step) {
      const why = `command for step \`${cmd.step}\` of flow \`${cmd.flow}\` arrived on the subject of \`${reg.step}\` of \`${flowName}\``;
      this.log(why);
      // Nothing ran: an error, not the outcome of an attempt.
      this.send(reply, "error", { message: why, code: "no_handler", commandId: cmd.commandId, runId: cmd.runId });
      return;
    }
    const ack = { commandId: cmd.commandId, runId: cmd.runId, attempt: cmd.attempt, worker: this.id };
    // Seen before (on any subject): answer from what this worker holds, never run again.
    const seen = this.dedup.get(cmd.commandId);
    if (seen) {
      switch (seen.state) {
        case "done":
          this.sendRaw(reply, "step.outcome", seen.outcome);
          return;
        case "cancelled":
          this.send(reply, "error", { message: "the run was cancelled: not started", code: "expired", commandId: cmd.commandId, runId: cmd.runId });
          return;
        case "running":
          // Still at work: ack to whoever asks now; heartbeats and the outcome follow it there.
          seen.reply.subject = reply;
          this.send(reply, "step.ack", ack);
          return;
      }
    }
    if (via === "inquiry") return; // not ours: another replica may hold it
    const now = Date.now();
    if (cmd.startByMs !== undefined && now > cmd.startByMs) {
      this.send(reply, "error", {
        message: `command arrived ${now - cmd.startByMs} ms after its start-by time: not started (the coordinator sends it again)`,
        code: "expired",
        commandId: cmd.commandId,
        runId: cmd.runId,
      });
      return;
    }
    if (cmd.deadlineMs !== undefined && now >= cmd.deadlineMs) {
      this.send(reply, "error", { message: `command arrived ${now - cmd.deadlineMs} ms past its deadline: not started`, code: "expired", commandId: cmd.commandId, runId: cmd.runId });
      return;
    }
    const handler = reg.flow.handler(cmd.step, cmd.kind);
    if (!handler) {
      this.send(reply, "error", {
        message: `worker ${this.id} has no ${cmd.kind} handler for step \`${cmd.step}\` of flow \`${cmd.flow}\``,
        code: "no_handler",
        commandId: cmd.commandId,
        runId: cmd.runId,
      });
      return;
    }
    const target = { subject: reply };
    const abort = new AbortController();
    this.dedup.remember(cmd.commandId, { state: "running", reply: target, abort });
    // Said in the command; coordinators older than its `acks` field said it in a header.
    const batch = cmd.acks === true || msg.headers?.get(ACKS_HEADER) === "batch";
    this.admit(reply, batch, { commandId: cmd.commandId, runId: cmd.runId, attempt: cmd.attempt }, () => {
      const task = this.execute(cmd, reg, handler, target, abort).catch((e: unknown) => this.log(`attempt failed to finish: ${errorMessage(e)}`));
      this.inFlight.add(task);
      void task.finally(() => this.inFlight.delete(task));
    });
  }

  private async execute(
    cmd: StepCommand,
    reg: StepReg,
    handler: (ctx: StepContext<any>) => unknown,
    target: { subject: string },
    abort: AbortController,
  ): Promise<void> {
    const beat = setInterval(() => {
      this.send(target.subject, "step.heartbeat", { commandId: cmd.commandId, runId: cmd.runId, attempt: cmd.attempt, worker: this.id });
    }, this.heartbeatMs);
    let result: OutcomeResult;
    const release = await this.slots.acquire();
    try {
      if (cmd.deadlineMs !== undefined && Date.now() >= cmd.deadlineMs) {
        result = { type: "failed", message: "the attempt's deadline passed while it waited for a free handler slot", retryable: true };
      } else {
        result = await this.runHandler(cmd, reg, handler, abort);
      }
    } finally {
      release();
      clearInterval(beat);
    }
    const limit = Math.min(this.nc.info?.max_payload ?? DEFAULT_MAX_MESSAGE_BYTES, this.maxMessageBytes);
    const outcome = { commandId: cmd.commandId, runId: cmd.runId, attempt: cmd.attempt, kind: cmd.kind, result };
    let bytes = encodeMessage("step.outcome", outcome);
    if (bytes.length > limit) {
      // The handler ran but its answer cannot travel: a permanent failure, maybe done.
      const why = `the step's output makes an outcome of ${bytes.length} bytes, over the ${limit}-byte message limit (keep large data in a store and return a reference)`;
      this.log(why);
      bytes = encodeMessage("step.outcome", { ...outcome, result: { type: "failed", message: why, retryable: false, maybeDone: true } });
    }
    this.dedup.finish(cmd.commandId, bytes);
    this.sendRaw(target.subject, "step.outcome", bytes);
  }

  private async runHandler(cmd: StepCommand, reg: StepReg, handler: (ctx: StepContext<any>) => unknown, abort: AbortController): Promise<OutcomeResult> {
    const started = Date.now();
    const base = { flow: cmd.flow, runId: cmd.runId, step: cmd.step, attempt: cmd.attempt };
    const hooks = reg.flow.hooks;
    if (cmd.kind === "execute") {
      hooks.emit("stepStart", base);
      if (cmd.attempt > 1) hooks.emit("retry", base);
    } else hooks.emit("compensate", base);
    const ended = (r: OutcomeResult): OutcomeResult => {
      const ev = { ...base, durationMs: Date.now() - started, ok: r.type === "completed", ...(r.type === "failed" ? { error: r.message } : {}) };
      hooks.emit(cmd.kind === "execute" ? "stepEnd" : "compensateEnd", ev);
      return r;
    };
    if (abort.signal.aborted) {
      return ended({ type: "failed", message: "cancelled: the run was cancelled while the handler ran", retryable: false, maybeDone: true });
    }
    let input: unknown;
    try {
      input = decodeValue(cmd.input);
    } catch (e) {
      return ended({ type: "failed", message: `run input does not decode: ${errorMessage(e)}`, retryable: false });
    }
    const outputs = new Map(cmd.outputs.map((o) => [o.step, o.output]));
    const ctx: StepContext<unknown> = {
      input,
      runId: cmd.runId,
      commandId: cmd.commandId,
      flow: cmd.flow,
      step: cmd.step,
      stepIndex: cmd.stepIndex,
      attempt: cmd.attempt,
      kind: cmd.kind,
      signal: abort.signal,
      worker: this.id,
      output<T>(step: string): T | undefined {
        const b = outputs.get(step);
        return b === undefined ? undefined : decodeValue<T>(b);
      },
    };
    const b = budget(cmd.timeoutMs, cmd.deadlineMs);
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const stopped = new Promise<OutcomeResult>((resolve) => {
      if (b) {
        timer = setTimeout(() => {
          resolve({ type: "failed", message: b.why, retryable: true, maybeDone: true });
          abort.abort(new Error(b.why));
        }, b.ms);
      }
      onAbort = () => resolve({ type: "failed", message: "cancelled: the run was cancelled while the handler ran", retryable: false, maybeDone: true });
      abort.signal.addEventListener("abort", onAbort, { once: true });
    });
    const work = (async (): Promise<OutcomeResult> => {
      try {
        const out = await handler(ctx);
        try {
          return { type: "completed", output: encodeValue(out) };
        } catch (e) {
          // The handler ran: its effect may have happened (protocol §5.1, rule 6).
          return { type: "failed", message: `the step's output does not encode: ${errorMessage(e)}`, retryable: false, maybeDone: true };
        }
      } catch (e) {
        return { type: "failed", message: errorMessage(e), retryable: isRetryable(e) };
      }
    })();
    try {
      return ended(await Promise.race([work, stopped]));
    } finally {
      if (timer) clearTimeout(timer);
      if (onAbort) abort.signal.removeEventListener("abort", onAbort);
    }
  }

  private cancel(msg: Msg): void {
    let c;
    try {
      c = decodeMessage(msg.data, "step.cancel", this.maxMessageBytes);
    } catch (e) {
      this.log(`bad step cancel on ${msg.subject} ignored: ${errorMessage(e)}`);
      return;
    }
    const seen = this.dedup.get(c.commandId);
    if (!seen) this.dedup.remember(c.commandId, { state: "cancelled" });
    else if (seen.state === "running") seen.abort.abort(new Error("the run was cancelled"));
  }

  /**
   * Stops taking commands, withdraws the presence, waits for the handlers in
   * flight (up to `drainTimeoutMs`) and, if the worker opened its connection,
   * closes it.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    if (this.presenceTimer) clearInterval(this.presenceTimer);
    for (const s of this.subs) {
      try {
        s.unsubscribe();
      } catch {
        /* closed already */
      }
    }
    if (this.workers && !this.nc.isClosed()) {
      await Promise.race([this.workers.delete(workerKey(this.id)).catch(() => undefined), delay(2000)]);
    }
    const drained = Promise.all([...this.inFlight]).then(() => true);
    const ok = await Promise.race([drained, delay(this.drainTimeoutMs).then(() => false)]);
    if (!ok) this.log(`drain timed out after ${this.drainTimeoutMs} ms; outcomes in hand may be lost`);
    if (!this.nc.isClosed()) {
      await this.nc.flush().catch(() => undefined);
      if (this.ownsConnection) await this.nc.drain().catch(() => undefined);
    }
  }

  private async abort(): Promise<void> {
    if (this.presenceTimer) clearInterval(this.presenceTimer);
    for (const s of this.subs) {
      try {
        s.unsubscribe();
      } catch {
        /* ignore */
      }
    }
    if (this.ownsConnection) await this.nc.close().catch(() => undefined);
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => {
    const t = setTimeout(r, ms);
    t.unref();
  });
}
