/** NATS connection settings, read like the Rust CLI and workers read them. */
import { connect as natsConnect, type NatsConnection, type NodeConnectionOptions } from "@nats-io/transport-node";
import { validateName } from "./flowdef.js";

export const DEFAULT_NATS_URL = "nats://127.0.0.1:4222";
export const DEFAULT_PREFIX = "orchestrix";

export interface ConnectOptions {
  /** NATS URL(s), comma-separated (default: NATS_URL, else nats://127.0.0.1:4222). */
  url?: string;
  /** Subject prefix (default: ORCHESTRIX_PREFIX, else "orchestrix"). */
  prefix?: string;
  /** Credentials (default: NATS_USER / NATS_PASSWORD, NATS_TOKEN). */
  user?: string;
  pass?: string;
  token?: string;
  /** Connection name shown by the server. */
  name?: string;
  /**
   * Keep the default connection open between runs (then call `close()` to
   * let the process exit). Default false: it closes once no run is in flight,
   * and reopens on the next run.
   */
  keepAlive?: boolean;
  /** Extra nats.js options. */
  nats?: Partial<NodeConnectionOptions>;
}

export interface ResolvedOptions {
  url: string;
  prefix: string;
  keepAlive: boolean;
  natsOptions: NodeConnectionOptions;
}

/** Settings from `options`, then the environment, then defaults. */
export function resolveOptions(options: string | ConnectOptions | undefined, name: string): ResolvedOptions {
  const o: ConnectOptions = typeof options === "string" ? { url: options } : { ...(options ?? {}) };
  const env = process.env;
  const url = o.url ?? (env.NATS_URL || DEFAULT_NATS_URL);
  const prefix = o.prefix ?? (env.ORCHESTRIX_PREFIX || DEFAULT_PREFIX);
  if (prefix.length === 0) throw new TypeError("the subject prefix is empty");
  for (const token of prefix.split(".")) validateName("prefix", token);
  const natsOptions: NodeConnectionOptions = {
    servers: url.split(",").map((s) => s.trim()).filter(Boolean),
    name: o.name ?? name,
    ...(o.user ?? env.NATS_USER ? { user: o.user ?? env.NATS_USER } : {}),
    ...(o.pass ?? env.NATS_PASSWORD ? { pass: o.pass ?? env.NATS_PASSWORD } : {}),
    ...(o.token ?? env.NATS_TOKEN ? { token: o.token ?? env.NATS_TOKEN } : {}),
    ...(o.nats ?? {}),
  };
  return { url, prefix, keepAlive: o.keepAlive ?? false, natsOptions };
}

/** Opens a NATS connection, with an error that names the URL. */
export async function openNats(opts: ResolvedOptions): Promise<NatsConnection> {
  try {
    return await natsConnect(opts.natsOptions);
  } catch (e) {
    throw new Error(`cannot connect to NATS at ${redactUrl(opts.url)}: ${(e as Error).message}`, { cause: e });
  }
}

/** A URL with any password replaced by `***`. */
export function redactUrl(url: string): string {
  return url.replace(/\/\/([^:@/]+):([^@/]+)@/g, "//$1:***@");
}
