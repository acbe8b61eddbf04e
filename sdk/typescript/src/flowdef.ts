/**
 * A flow's definition as pure data (the same model as the Rust
 * `orchestrix_proto::FlowDef`), its canonical MessagePack encoding and its
 * version hash: FNV-1a 64 over that encoding, 16 lowercase hex digits.
 * Replicas in Rust and TypeScript serving one flow agree on its version only
 * if both encode the definition byte for byte alike.
 */
import { encodeCanonical, F64, fnv1a64Hex, type Encodable } from "./msgpack.js";

export type OnUnknown = "maybe_done" | "retry";
export type OnExhausted = "rollback" | "pause";

export interface RetryPolicy {
  /** Retries after the first attempt (at most retries + 1 attempts). */
  retries: number;
  retryDelayMs: number;
  /** Factor applied to the delay after each retry (1: constant). */
  backoff: number;
  maxDelayMs: number;
  /** Random spread of each delay, 0 to 1. */
  jitter: number;
  /** Give up once this long has passed since the first attempt (null: none). */
  maxDurationMs: number | null;
}

export interface StepDef {
  name: string;
  retry: RetryPolicy;
  timeoutMs: number | null;
  compensable: boolean;
  compensationRetry: RetryPolicy;
  compensationTimeoutMs: number | null;
  onUnknown: OnUnknown;
  onExhausted: OnExhausted;
  compensationOnExhausted: OnExhausted;
  pauseTimeoutMs: number | null;
  group: string | null;
  maxInFlight: number | null;
}

export interface FlowDef {
  name: string;
  /** An explicit version label instead of the hash. */
  version: string | null;
  steps: StepDef[];
  concurrencyPerKey: number | null;
  /** A JSON Schema (JSON text) run inputs must match. */
  inputSchema: string | null;
}

export const MAX_RETRIES = 100_000;
export const MAX_NAME_LEN = 128;

/** The default policy of an action: one attempt; 100 ms constant if retries are set. */
export function defaultRetry(): RetryPolicy {
  return { retries: 0, retryDelayMs: 100, backoff: 1, maxDelayMs: 300_000, jitter: 0, maxDurationMs: null };
}

/** The default policy of a compensation: 3 retries, 100 ms doubling up to 10 s. */
export function compensationDefaultRetry(): RetryPolicy {
  return { retries: 3, retryDelayMs: 100, backoff: 2, maxDelayMs: 10_000, jitter: 0, maxDurationMs: null };
}

/** A step with default policies and no compensation. */
export function stepDef(name: string, patch: Partial<StepDef> = {}): StepDef {
  return {
    name,
    retry: defaultRetry(),
    timeoutMs: null,
    compensable: false,
    compensationRetry: compensationDefaultRetry(),
    compensationTimeoutMs: null,
    onUnknown: "maybe_done",
    onExhausted: "rollback",
    compensationOnExhausted: "rollback",
    pauseTimeoutMs: null,
    group: null,
    maxInFlight: null,
    ...patch,
  };
}

export function flowDef(name: string, steps: StepDef[], patch: Partial<FlowDef> = {}): FlowDef {
  return { name, version: null, steps, concurrencyPerKey: null, inputSchema: null, ...patch };
}

function retryWire(p: RetryPolicy): Encodable {
  return {
    retries: p.retries,
    retryDelayMs: p.retryDelayMs,
    backoff: new F64(p.backoff),
    maxDelayMs: p.maxDelayMs,
    jitter: new F64(p.jitter),
    maxDurationMs: p.maxDurationMs,
  };
}

function stepWire(s: StepDef): Encodable {
  return {
    name: s.name,
    retry: retryWire(s.retry),
    timeoutMs: s.timeoutMs,
    compensable: s.compensable,
    compensationRetry: retryWire(s.compensationRetry),
    compensationTimeoutMs: s.compensationTimeoutMs,
    onUnknown: s.onUnknown,
    onExhausted: s.onExhausted === "rollback" ? undefined : s.onExhausted,
    compensationOnExhausted: s.compensationOnExhausted === "rollback" ? undefined : s.compensationOnExhausted,
    pauseTimeoutMs: s.pauseTimeoutMs ?? undefined,
    group: s.group ?? undefined,
    maxInFlight: s.maxInFlight ?? undefined,
  };
}

/** The definition as the map the wire carries, keys in the canonical order. */
export function flowDefWire(def: FlowDef): Encodable {
  return {
    name: def.name,
    version: def.version ?? undefined,
    steps: def.steps.map(stepWire),
    concurrencyPerKey: def.concurrencyPerKey ?? undefined,
    inputSchema: def.inputSchema ?? undefined,
  };
}

/** The canonical MessagePack encoding the version hash is computed over. */
export function canonicalFlowDef(def: FlowDef): Uint8Array {
  return encodeCanonical(flowDefWire(def));
}

/** The flow's version: its explicit label, or else the hash of its definition. */
export function flowVersion(def: FlowDef): string {
  if (def.version != null) return def.version;
  return fnv1a64Hex(canonicalFlowDef(def));
}

// ---------------------------------------------------------------- reading a definition

export class FlowDefError extends Error {
  override name = "FlowDefError";
}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array);
}

function num(o: Obj, k: string, dflt: number, path: string): number {
  const v = o[k];
  if (v === undefined || v === null) return dflt;
  if (typeof v !== "number") throw new FlowDefError(`${path}.${k} must be a number`);
  return v;
}
function optNum(o: Obj, k: string, path: string): number | null {
  const v = o[k];
  if (v === undefined || v === null) return null;
  if (typeof v !== "number") throw new FlowDefError(`${path}.${k} must be a number`);
  return v;
}
function optStr(o: Obj, k: string, path: string): string | null {
  const v = o[k];
  if (v === undefined || v === null) return null;
  if (typeof v !== "string") throw new FlowDefError(`${path}.${k} must be a string`);
  return v;
}

function readRetry(v: unknown, dflt: RetryPolicy, path: string): RetryPolicy {
  if (v === undefined || v === null) return dflt;
  if (!isObj(v)) throw new FlowDefError(`${path} must be a map`);
  return {
    retries: num(v, "retries", dflt.retries, path),
    retryDelayMs: num(v, "retryDelayMs", dflt.retryDelayMs, path),
    backoff: num(v, "backoff", dflt.backoff, path),
    maxDelayMs: num(v, "maxDelayMs", dflt.maxDelayMs, path),
    jitter: num(v, "jitter", dflt.jitter, path),
    maxDurationMs: optNum(v, "maxDurationMs", path),
  };
}

/** Reads a definition from its decoded wire map (a registration's `flow`). */
export function flowDefFromWire(v: unknown): FlowDef {
  if (!isObj(v)) throw new FlowDefError("a flow definition must be a map");
  const name = optStr(v, "name", "flow");
  if (name === null) throw new FlowDefError("flow.name is missing");
  if (!Array.isArray(v.steps)) throw new FlowDefError("flow.steps must be an array");
  const steps = v.steps.map((s, i): StepDef => {
    const path = `flow.steps[${i}]`;
    if (!isObj(s)) throw new FlowDefError(`${path} must be a map`);
    const n = optStr(s, "name", path);
    if (n === null) throw new FlowDefError(`${path}.name is missing`);
    return stepDef(n, {
      retry: readRetry(s.retry, defaultRetry(), `${path}.retry`),
      timeoutMs: optNum(s, "timeoutMs", path),
      compensable: s.compensable === true,
      compensationRetry: readRetry(s.compensationRetry, compensationDefaultRetry(), `${path}.compensationRetry`),
      compensationTimeoutMs: optNum(s, "compensationTimeoutMs", path),
      onUnknown: (optStr(s, "onUnknown", path) ?? "maybe_done") as OnUnknown,
      onExhausted: (optStr(s, "onExhausted", path) ?? "rollback") as OnExhausted,
      compensationOnExhausted: (optStr(s, "compensationOnExhausted", path) ?? "rollback") as OnExhausted,
      pauseTimeoutMs: optNum(s, "pauseTimeoutMs", path),
      group: optStr(s, "group", path),
      maxInFlight: optNum(s, "maxInFlight", path),
    });
  });
  return flowDef(name, steps, {
    version: optStr(v, "version", "flow"),
    concurrencyPerKey: optNum(v, "concurrencyPerKey", "flow"),
    inputSchema: optStr(v, "inputSchema", "flow"),
  });
}

// ---------------------------------------------------------------- validation

const NAME_RE = /^[A-Za-z0-9_-]+$/;

/** Checks a flow, step or version name: usable as a NATS subject token. */
export function validateName(what: string, name: string): void {
  if (typeof name !== "string" || name.length === 0) throw new FlowDefError(`${what} name is empty`);
  if (name.length > MAX_NAME_LEN) throw new FlowDefError(`${what} name \`${name}\` is longer than ${MAX_NAME_LEN} characters`);
  const bad = [...name].find((c) => !NAME_RE.test(c));
  if (bad !== undefined) {
    throw new FlowDefError(`${what} name \`${name}\` may only hold ASCII letters, digits, \`-\` and \`_\` (found ${JSON.stringify(bad)})`);
  }
}

function isUint(n: number | null, max = 2 ** 53): boolean {
  return n === null || (Number.isInteger(n) && n >= 0 && n <= max);
}

/** The checks `FlowDef::validate` makes in Rust, with the same reasons. */
export function validateFlowDef(def: FlowDef): void {
  validateName("flow", def.name);
  if (def.version != null) {
    validateName("version", def.version);
    if (/^[0-9a-fA-F]{16}$/.test(def.version)) {
      throw new FlowDefError(`version label \`${def.version}\` looks like a definition hash (16 hex digits), which only a definition itself may have; choose another label`);
    }
  }
  if (def.steps.length === 0) throw new FlowDefError(`flow \`${def.name}\` has no steps`);
  if (def.concurrencyPerKey === 0) throw new FlowDefError(`flow \`${def.name}\`: the concurrency limit per key must be at least 1`);
  const seen = new Set<string>();
  def.steps.forEach((s, i) => {
    validateName("step", s.name);
    const bad = (reason: string) => new FlowDefError(`flow \`${def.name}\`, step \`${s.name}\`: ${reason}`);
    for (const [what, p] of [["", s.retry], ["compensation ", s.compensationRetry]] as const) {
      if (!(Number.isFinite(p.backoff) && p.backoff >= 1)) throw bad(`${what}backoff must be a number of at least 1, not ${p.backoff}`);
      if (!(p.jitter >= 0 && p.jitter <= 1)) throw bad(`${what}jitter must be between 0 and 1, not ${p.jitter}`);
      if (!isUint(p.retries, 0xffffffff) || !isUint(p.retryDelayMs) || !isUint(p.maxDelayMs) || !isUint(p.maxDurationMs)) {
        throw bad(`${what}retries and delays must be whole non-negative numbers (milliseconds)`);
      }
    }
    for (const [what, d] of [
      ["timeout", s.timeoutMs],
      ["compensation timeout", s.compensationTimeoutMs],
      ["pause timeout", s.pauseTimeoutMs],
      ["max duration", s.retry.maxDurationMs],
      ["compensation max duration", s.compensationRetry.maxDurationMs],
    ] as const) {
      if (!isUint(d)) throw bad(`the ${what} must be a whole number of milliseconds`);
      if (d === 0) throw bad(`a ${what} of 0 is no time at all; leave it out for none`);
    }
    for (const [what, p] of [["retries", s.retry], ["compensation retries", s.compensationRetry]] as const) {
      if (p.retries > MAX_RETRIES) throw bad(`${what} are at most ${MAX_RETRIES}`);
    }
    for (const [what, p] of [["", s.retry], ["compensation ", s.compensationRetry]] as const) {
      if (p.retryDelayMs > p.maxDelayMs) throw bad(`the ${what}retry delay (${p.retryDelayMs}ms) is over the max delay (${p.maxDelayMs}ms)`);
    }
    if (s.maxInFlight === 0) throw bad("max_in_flight must be at least 1");
    if (s.group != null) {
      validateName("group", s.group);
      const prev = def.steps[i - 1];
      if (i > 0 && prev && prev.group !== s.group && def.steps.slice(0, i).some((x) => x.group === s.group)) {
        throw bad(`the steps of parallel group \`${s.group}\` must be next to each other`);
      }
      if (s.onExhausted === "pause" || s.compensationOnExhausted === "pause") {
        throw bad(`a step of parallel group \`${s.group}\` cannot pause when its retries run out (it rolls back)`);
      }
    }
    if (seen.has(s.name)) throw new FlowDefError(`flow \`${def.name}\` has two steps named \`${s.name}\``);
    seen.add(s.name);
  });
}
