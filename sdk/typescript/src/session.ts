/**
 * The default connection behind `connect()` and `flow.run()`: opened on the
 * first run, serving each flow run through it as a worker, and closed once no
 * run is in flight (unless `keepAlive`), so a script exits when it is done.
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { Client } from "./client.js";
import { openNats, resolveOptions, type ConnectOptions, type ResolvedOptions } from "./connection.js";
import type { Flow } from "./flow.js";
import type { RunOptions, RunResult } from "./report.js";
import { Worker } from "./worker.js";

class Session {
  private nc: Promise<NatsConnection> | undefined;
  /** The worker serving each flow, by the version it serves (a flow given a step later is another version). */
  private readonly workers = new Map<Flow<unknown>, { version: string; worker: Promise<Worker> }>();
  private users = 0;
  private idle: NodeJS.Timeout | undefined;
  private closing: Promise<void> | undefined;

  constructor(readonly settings: ResolvedOptions) {}

  private open(): Promise<NatsConnection> {
    this.nc ??= openNats(this.settings).catch((e: unknown) => {
      this.nc = undefined;
      throw e;
    });
    return this.nc;
  }

  async acquire(): Promise<NatsConnection> {
    if (this.closing) await this.closing;
    this.users++;
    if (this.idle) clearTimeout(this.idle);
    this.idle = undefined;
    try {
      return await this.open();
    } catch (e) {
      this.release();
      throw e;
    }
  }

  release(): void {
    this.users--;
    if (this.users > 0 || this.settings.keepAlive) return;
    // Closed at the next idle moment: a run started right after reuses it.
    this.idle = setTimeout(() => {
      this.idle = undefined;
      if (this.users === 0) void this.close();
    }, 50);
  }

  async serve(flow: Flow<unknown>, nc: NatsConnection): Promise<Worker> {
    const version = flow.version;
    const current = this.workers.get(flow);
    if (current && current.version === version) return current.worker;
    if (current) {
      // The flow changed since it was first served: serve the new version instead.
      this.workers.delete(flow);
      await current.worker.then((w) => w.close()).catch(() => undefined);
    }
    const worker = Worker.start({ flows: [flow], connection: nc, prefix: this.settings.prefix });
    const entry = { version, worker };
    worker.catch(() => {
      if (this.workers.get(flow) === entry) this.workers.delete(flow);
    });
    this.workers.set(flow, entry);
    return worker;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      const workers = [...this.workers.values()];
      this.workers.clear();
      for (const w of workers) await w.worker.then((x) => x.close()).catch(() => undefined);
      const nc = this.nc;
      this.nc = undefined;
      if (nc) await nc.then((c) => c.drain()).catch(() => undefined);
    })().finally(() => {
      this.closing = undefined;
    });
    return this.closing;
  }
}

let current: Session | undefined;

function session(): Session {
  current ??= new Session(resolveOptions(undefined, "orchestrix (ts)"));
  return current;
}

/**
 * Sets the default connection of `flow.run` (a URL, or options; NATS_URL and
 * ORCHESTRIX_PREFIX otherwise) and checks that NATS answers. The connection
 * closes by itself when no run is in flight (unless `keepAlive`).
 */
export async function connect(options?: string | ConnectOptions): Promise<void> {
  const previous = current;
  current = new Session(resolveOptions(options, "orchestrix (ts)"));
  if (previous) await previous.close();
  await current.acquire();
  current.release();
}

/** Closes the default connection (and the workers of `flow.run`); the next run opens it again. */
export async function close(): Promise<void> {
  if (current) await current.close();
}

/** Runs `flow` through the coordinator, serving it from this process meanwhile. */
export async function runServed(flow: Flow<unknown>, input: unknown, options: RunOptions): Promise<RunResult> {
  const s = session();
  const nc = await s.acquire();
  try {
    await s.serve(flow, nc);
    const client = new Client(nc, { prefix: s.settings.prefix, retryUnknownForMs: 15_000 });
    return await client.run(flow.name, input, { ...options, version: options.version ?? flow.version });
  } finally {
    s.release();
  }
}
