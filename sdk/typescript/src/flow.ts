/**
 * The quick-start API: `create<Input>(name).step(name, handler, options)…`,
 * and `flow.run(input, options)` through the coordinator.
 */
import {
  compensationDefaultRetry,
  defaultRetry,
  FlowDefError,
  flowDef,
  flowVersion,
  stepDef,
  validateFlowDef,
  validateName,
  type FlowDef,
  type OnExhausted,
  type OnUnknown,
  type RetryPolicy,
  type StepDef,
} from "./flowdef.js";
import type { CommandKind } from "./protocol.js";
import type { RunOptions, RunResult } from "./report.js";

/** What a handler gets. */
export interface StepContext<I = unknown> {
  /** The run's input. */
  readonly input: I;
  readonly runId: string;
  readonly commandId: string;
  readonly flow: string;
  /** This step's name. */
  readonly step: string;
  readonly stepIndex: number;
  /** Attempt number of this kind for this step, from 1. */
  readonly attempt: number;
  /** `execute` for the action, `compensate` for its compensation. */
  readonly kind: CommandKind;
  /** Aborted when the run is cancelled or the attempt reaches its timeout or deadline. */
  readonly signal: AbortSignal;
  /** The worker serving the attempt. */
  readonly worker: string;
  /** The output of an earlier step of this run (`undefined` when it returned nothing or has not run). */
  output<T = unknown>(step: string): T | undefined;
}

export type Handler<I> = (ctx: StepContext<I>) => unknown | Promise<unknown>;

/** An error that is not retried: the step fails for good and the run rolls back. */
export class PermanentError extends Error {
  override name = "PermanentError";
  readonly retryable = false;
}

/** An error that may be retried (what any other thrown value is too). */
export class RetryableError extends Error {
  override name = "RetryableError";
  readonly retryable = true;
}

/** A step's options; every policy maps to a field of the protocol's StepDef. */
export interface StepOptions<I> {
  /** Undoes the step on rollback (makes the step compensable). */
  compensate?: Handler<I>;
  /** Retries after the first attempt (default 0). */
  retries?: number;
  /** Delay before the first retry, ms (default 100). */
  retryDelayMs?: number;
  /** Factor applied to the delay after each retry (default 1: constant). */
  backoff?: number;
  /** Upper bound of any retry delay, ms (default 300000). */
  maxDelayMs?: number;
  /** Random spread of each delay, 0 to 1 (default 0). */
  jitter?: number;
  /** Stop retrying once this long has passed since the first attempt, ms. */
  maxDurationMs?: number;
  /** Time budget of each attempt, ms (default none). Past it the outcome is unknown. */
  timeoutMs?: number;
  /** What an unknown outcome means: "maybe_done" (default: not run again, compensated) or "retry" (idempotent step). */
  onUnknown?: OnUnknown;
  /** When retries run out: "rollback" (default) or "pause" for an operator. */
  onExhausted?: OnExhausted;
  /** The compensation's retry policy (default 3 retries, 100 ms doubling up to 10 s). */
  compensationRetry?: Partial<RetryPolicy>;
  /** Time budget of each compensation attempt, ms. */
  compensationTimeoutMs?: number;
  compensationOnExhausted?: OnExhausted;
  /** How long a paused run waits for an operator before it rolls back, ms. */
  pauseTimeoutMs?: number;
  /** Parallel group: consecutive steps of one group run at the same time. */
  group?: string;
  /** At most this many attempts of the step in flight at once, across all runs. */
  maxInFlight?: number;
}

export interface FlowOptions {
  /** An explicit version label instead of the definition's hash. */
  version?: string;
  /** Runs with one concurrency key that may run at once (default 1). */
  concurrencyPerKey?: number;
  /** A JSON Schema (object or JSON text) every run's input must match. */
  inputSchema?: object | string;
}

/** Hook events, in the order they happen in a worker (and `runEnd` for runs this process started). */
export interface HookEvents {
  /** An attempt of a step's action starts. */
  stepStart: { flow: string; runId: string; step: string; attempt: number };
  /** An attempt of a step's action ended (`error` when it failed). */
  stepEnd: { flow: string; runId: string; step: string; attempt: number; durationMs: number; ok: boolean; error?: string };
  /** A retry attempt starts (attempt 2 onwards; `stepStart` fires too). */
  retry: { flow: string; runId: string; step: string; attempt: number };
  /** A compensation attempt starts. */
  compensate: { flow: string; runId: string; step: string; attempt: number };
  /** A compensation attempt ended. */
  compensateEnd: { flow: string; runId: string; step: string; attempt: number; durationMs: number; ok: boolean; error?: string };
  /** A run started with `flow.run` ended (its result). */
  runEnd: RunResult;
}
export type HookName = keyof HookEvents;

interface StepEntry<I> {
  def: StepDef;
  execute: Handler<I>;
  compensate?: Handler<I>;
}

function retryOf(o: { retries?: number; retryDelayMs?: number; backoff?: number; maxDelayMs?: number; jitter?: number; maxDurationMs?: number | null }, base: RetryPolicy): RetryPolicy {
  return {
    retries: o.retries ?? base.retries,
    retryDelayMs: o.retryDelayMs ?? base.retryDelayMs,
    backoff: o.backoff ?? base.backoff,
    maxDelayMs: o.maxDelayMs ?? base.maxDelayMs,
    jitter: o.jitter ?? base.jitter,
    maxDurationMs: o.maxDurationMs ?? base.maxDurationMs,
  };
}

/** The hook registry a flow carries; errors thrown by hooks are logged, never fail a step. */
export class Hooks {
  private readonly map = new Map<HookName, ((e: never) => unknown)[]>();
  on<K extends HookName>(name: K, fn: (event: HookEvents[K]) => unknown): void {
    const list = this.map.get(name) ?? [];
    list.push(fn as (e: never) => unknown);
    this.map.set(name, list);
  }
  emit<K extends HookName>(name: K, event: HookEvents[K]): void {
    for (const fn of this.map.get(name) ?? []) {
      try {
        const r = (fn as (e: HookEvents[K]) => unknown)(event);
        if (r instanceof Promise) r.catch((e: unknown) => console.warn(`orchestrix: ${name} hook failed:`, e));
      } catch (e) {
        console.warn(`orchestrix: ${name} hook failed:`, e);
      }
    }
  }
}

/** A flow: its definition (what the coordinator runs) and its handlers (what a worker serves). */
export class Flow<I = unknown> {
  private readonly entries: StepEntry<I>[] = [];
  readonly hooks = new Hooks();
  private defCache: { def: FlowDef; version: string } | undefined;

  constructor(
    readonly name: string,
    private readonly options: FlowOptions = {},
  ) {
    validateName("flow", name);
  }

  /** Adds a step at the end. */
  step(name: string, handler: Handler<I>, options: StepOptions<I> = {}): this {
    validateName("step", name);
    if (typeof handler !== "function") throw new TypeError(`step \`${name}\`: the handler must be a function`);
    if (options.compensate !== undefined && typeof options.compensate !== "function") {
      throw new TypeError(`step \`${name}\`: compensate must be a function`);
    }
    if (this.entries.some((e) => e.def.name === name)) throw new FlowDefError(`flow \`${this.name}\` has two steps named \`${name}\``);
    const def = stepDef(name, {
      retry: retryOf(options, defaultRetry()),
      timeoutMs: options.timeoutMs ?? null,
      compensable: options.compensate !== undefined,
      compensationRetry: retryOf(options.compensationRetry ?? {}, compensationDefaultRetry()),
      compensationTimeoutMs: options.compensationTimeoutMs ?? null,
      onUnknown: options.onUnknown ?? "maybe_done",
      onExhausted: options.onExhausted ?? "rollback",
      compensationOnExhausted: options.compensationOnExhausted ?? "rollback",
      pauseTimeoutMs: options.pauseTimeoutMs ?? null,
      group: options.group ?? null,
      maxInFlight: options.maxInFlight ?? null,
    });
    this.entries.push({ def, execute: handler, compensate: options.compensate });
    this.defCache = undefined;
    return this;
  }

  /** Registers a hook ("stepStart", "stepEnd", "retry", "compensate", "compensateEnd", "runEnd"). */
  on<K extends HookName>(name: K, fn: (event: HookEvents[K]) => unknown): this {
    this.hooks.on(name, fn);
    return this;
  }

  /** The definition as the coordinator sees it (validated). */
  definition(): FlowDef {
    return this.resolved().def;
  }

  /** The flow's version: its label, or the hash of its definition. */
  get version(): string {
    return this.resolved().version;
  }

  private resolved(): { def: FlowDef; version: string } {
    if (this.defCache) return this.defCache;
    const schema = this.options.inputSchema;
    const def = flowDef(
      this.name,
      this.entries.map((e) => e.def),
      {
        version: this.options.version ?? null,
        concurrencyPerKey: this.options.concurrencyPerKey ?? null,
        inputSchema: schema === undefined ? null : typeof schema === "string" ? schema : JSON.stringify(schema),
      },
    );
    validateFlowDef(def);
    this.defCache = { def, version: flowVersion(def) };
    return this.defCache;
  }

  /** The handler of a step for a kind of command. */
  handler(step: string, kind: CommandKind): Handler<I> | undefined {
    const e = this.entries.find((x) => x.def.name === step);
    if (!e) return undefined;
    return kind === "execute" ? e.execute : e.compensate;
  }

  /** Step names, in order. */
  get steps(): string[] {
    return this.entries.map((e) => e.def.name);
  }

  /**
   * Runs the flow through the coordinator and resolves to its report. This
   * process serves the flow's steps as a worker while runs are in flight
   * (registered on the first run); see `connect`.
   */
  async run(input: I, options: RunOptions = {}): Promise<RunResult> {
    const { runServed } = await import("./session.js");
    const result = await runServed(this as Flow<unknown>, input, options);
    this.hooks.emit("runEnd", result);
    return result;
  }
}

/** Starts a flow definition: `create<Input>("payment-flow").step(…)`. */
export function create<I = unknown>(name: string, options: FlowOptions = {}): Flow<I> {
  return new Flow<I>(name, options);
}
