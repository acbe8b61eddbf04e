/** Start, wait for, inspect and cancel runs of flows served anywhere, by name. */
import { headers as natsHeaders, RequestError, type NatsConnection } from "@nats-io/transport-node";
import { openNats, resolveOptions, type ConnectOptions } from "./connection.js";
import { validateName } from "./flowdef.js";
import { encodeMessage, encodeValue, decodeMessage, KIND_HEADER, type Kind, type Messages, type RunReply, type RunStatus } from "./protocol.js";
import { NoCoordinatorError, RejectedError, toResult, type RunOptions, type RunResult } from "./report.js";

export interface ClientOptions {
  /** Subject prefix (default: ORCHESTRIX_PREFIX, else "orchestrix"). */
  prefix?: string;
  /** Timeout of requests that do not wait for a run (default 5 s). */
  requestTimeoutMs?: number;
  /**
   * How long a start **with an idempotency key** is sent again while no
   * coordinator answers or the answer is a retryable refusal (default 30 s).
   * Without a key a start is sent once: the run may have started.
   */
  startRetryForMs?: number;
  /**
   * How long a start is sent again while the coordinator does not know the
   * flow yet or nobody listens on its subject (default 0: once). `flow.run`
   * uses 15 s: its worker has just registered the flow.
   */
  retryUnknownForMs?: number;
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export class Client {
  readonly prefix: string;
  private readonly requestTimeoutMs: number;
  private readonly retryUnknownForMs: number;
  private readonly startRetryForMs: number;

  constructor(
    readonly nc: NatsConnection,
    options: ClientOptions = {},
    private readonly ownsConnection = false,
  ) {
    this.prefix = options.prefix ?? resolveOptions({}, "").prefix;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 5000;
    this.retryUnknownForMs = options.retryUnknownForMs ?? 0;
    this.startRetryForMs = options.startRetryForMs ?? 30_000;
  }

  /** Opens its own connection (closed by `close`). */
  static async connect(connection?: string | ConnectOptions, options: ClientOptions = {}): Promise<Client> {
    const settings = resolveOptions(connection, "orchestrix-client (ts)");
    const nc = await openNats(settings);
    return new Client(nc, { prefix: settings.prefix, ...options }, true);
  }

  private async ask<K extends Kind>(subject: string, kind: K, body: Messages[K], timeoutMs: number): Promise<RunReply> {
    const h = natsHeaders();
    h.set(KIND_HEADER, kind);
    let msg;
    try {
      msg = await this.nc.request(subject, encodeMessage(kind, body), { timeout: timeoutMs, headers: h });
    } catch (e) {
      if (e instanceof RequestError && e.isNoResponders()) throw new NoCoordinatorError(`no coordinator is listening on ${subject}`);
      if (e instanceof Error && e.name === "TimeoutError") throw new NoCoordinatorError(`no coordinator answered on ${subject} within ${timeoutMs} ms`);
      throw e;
    }
    const reply = decodeMessage(msg.data, "run.reply");
    if (reply.type === "rejected") throw new RejectedError(reply.error, reply.code, reply.retryable);
    return reply;
  }

  private request(flow: string, input: unknown, options: RunOptions, wait: boolean): Messages["run.request"] {
    validateName("flow", flow);
    return {
      flow,
      version: options.version,
      input: encodeValue(input),
      key: options.key,
      ttlMs: options.ttlMs,
      timeoutMs: options.timeoutMs,
      wait,
      concurrencyKey: options.concurrencyKey,
    };
  }

  /** Sends a start, again while the flow is not known yet (within `retryUnknownForMs`). */
  private async submit(flow: string, input: unknown, options: RunOptions, wait: boolean, timeoutMs: number): Promise<RunReply> {
    const req = this.request(flow, input, options, wait);
    const began = Date.now();
    const giveUp = began + this.retryUnknownForMs;
    const keyedGiveUp = began + (options.key !== undefined ? this.startRetryForMs : 0);
    let pause = 50;
    for (;;) {
      // Each try expires with its wait: a coordinator that only gets it later refuses it.
      req.startByMs = Date.now() + Math.min(timeoutMs, this.requestTimeoutMs);
      try {
        return await this.ask(`${this.prefix}.run.${flow}`, "run.request", req, timeoutMs);
      } catch (e) {
        const unknown =
          (e instanceof RejectedError && (e.code === "unknown_flow" || e.code === "unknown_version")) ||
          (e instanceof NoCoordinatorError && e.message.startsWith("no coordinator is listening"));
        // With a key a start is safe to send again: it starts the run or finds it.
        const again = (e instanceof RejectedError && e.retryable) || (e instanceof NoCoordinatorError && !unknown);
        if ((unknown && Date.now() + pause < giveUp) || (again && Date.now() + pause < keyedGiveUp)) {
          await delay(pause);
          pause = Math.min(pause * 2, unknown ? 500 : 2000);
          continue;
        }
        if (e instanceof NoCoordinatorError && e.message.startsWith("no coordinator is listening")) {
          throw new RejectedError(`no coordinator serves flow \`${flow}\` (no worker registered it, or no coordinator is running)`, "unknown_flow", false);
        }
        throw e;
      }
    }
  }

  /** Starts a run and returns its id at once (`duplicate`: the key named an earlier run). */
  async start(flow: string, input: unknown, options: RunOptions = {}): Promise<{ runId: string; duplicate: boolean }> {
    const reply = await this.submit(flow, input, options, false, this.requestTimeoutMs);
    if (reply.type !== "accepted") throw new Error(`unexpected answer to a start: ${reply.type}`);
    return { runId: reply.runId, duplicate: reply.duplicate };
  }

  /** Starts a run and waits for its final report (`run.request` with `wait: true`). */
  async run(flow: string, input: unknown, options: RunOptions = {}): Promise<RunResult> {
    const waitMs = options.waitTimeoutMs ?? (options.timeoutMs !== undefined ? options.timeoutMs + 30_000 : 600_000);
    const reply = await this.submit(flow, input, options, true, waitMs);
    if (reply.type === "report") return toResult(reply.report);
    if (reply.type === "accepted") return this.wait(reply.runId, waitMs);
    throw new Error(`unexpected answer to a run: ${reply.type}`);
  }

  /** The report of a run so far. */
  async status(runId: string): Promise<RunResult> {
    const reply = await this.ask(`${this.prefix}.status`, "run.status", { runId, wait: false }, this.requestTimeoutMs);
    if (reply.type !== "report") throw new Error(`unexpected answer to a status request: ${reply.type}`);
    return toResult(reply.report);
  }

  /** Waits for the final report of a run (asks again every 30 s while it runs). */
  async wait(runId: string, timeoutMs = 600_000): Promise<RunResult> {
    const giveUp = Date.now() + timeoutMs;
    for (;;) {
      const left = giveUp - Date.now();
      if (left <= 0) throw new NoCoordinatorError(`run ${runId} did not end within ${timeoutMs} ms`);
      try {
        const reply = await this.ask(`${this.prefix}.status`, "run.status", { runId, wait: true }, Math.min(30_000, left));
        if (reply.type !== "report") throw new Error(`unexpected answer to a status request: ${reply.type}`);
        return toResult(reply.report);
      } catch (e) {
        if (e instanceof NoCoordinatorError) {
          await delay(200);
          continue;
        }
        throw e;
      }
    }
  }

  /** Cancels a live run: its rollback starts. */
  async cancel(runId: string, options: { by?: string; reason?: string } = {}): Promise<void> {
    await this.ask(`${this.prefix}.control`, "run.control", { runId, action: "cancel", by: options.by ?? "ts-client", reason: options.reason }, this.requestTimeoutMs);
  }

  /** Recent runs, newest first. */
  async list(filter: { status?: RunStatus; flow?: string; limit?: number; before?: string } = {}): Promise<RunResult[]> {
    const reply = await this.ask(
      `${this.prefix}.list`,
      "run.list",
      { status: filter.status, flow: filter.flow, limit: filter.limit ?? 100, before: filter.before },
      this.requestTimeoutMs,
    );
    if (reply.type !== "list") throw new Error(`unexpected answer to a list request: ${reply.type}`);
    return reply.runs.map(toResult);
  }

  /** Closes the connection if the client opened it. */
  async close(): Promise<void> {
    if (this.ownsConnection && !this.nc.isClosed()) await this.nc.drain().catch(() => undefined);
  }
}
