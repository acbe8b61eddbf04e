/** What runs return: the coordinator's report with user values decoded. */
import { decodeValue, type RejectionCode, type RunReportWire, type StepStatus } from "./protocol.js";

export interface RunOptions {
  /** Idempotency key: a second run with the same key gets the first run. */
  key?: string;
  /** How long the key is remembered after its run ended, ms. */
  ttlMs?: number;
  /** Deadline of the whole run, relative to its start, ms. */
  timeoutMs?: number;
  /** Concurrency key: runs with one key run at most the flow's limit at a time. */
  concurrencyKey?: string;
  /** The version to run (a flow run through `flow.run` pins its own). */
  version?: string;
  /** How long to wait for the report before giving up (default 10 minutes, or the run's timeout plus 30 s). */
  waitTimeoutMs?: number;
}

export interface StepResult {
  name: string;
  status: StepStatus;
  attempts: number;
  error?: string;
  /** The step's output, decoded. */
  output?: unknown;
  startedAtMs?: number;
  durationMs?: number;
  compensation?: { attempts: number; error?: string; durationMs?: number };
  waiting?: string;
  group?: string;
}

/** A run's report, as `flow.run` and `Client` give it: the wire report with the steps' outputs decoded. */
export interface RunResult extends Omit<RunReportWire, "steps"> {
  steps: StepResult[];
}

function clean<T extends object>(o: T): T {
  for (const k of Object.keys(o) as (keyof T)[]) if (o[k] === undefined) delete o[k];
  return o;
}

/** The report as returned to users: outputs decoded, absent fields left out. */
export function toResult(r: RunReportWire): RunResult {
  return clean({
    runId: r.runId,
    flow: r.flow,
    version: r.version,
    status: r.status,
    durationMs: r.durationMs,
    startedAtMs: r.startedAtMs,
    error: r.error,
    failedStep: r.failedStep,
    steps: r.steps.map((s) =>
      clean({
        name: s.name,
        status: s.status,
        attempts: s.attempts,
        error: s.error,
        output: s.output && decodeValue(s.output),
        startedAtMs: s.startedAtMs,
        durationMs: s.durationMs,
        compensation: s.compensation && clean({ ...s.compensation }),
        waiting: s.waiting,
        group: s.group,
      }),
    ),
    late: r.late && r.late.length ? r.late : undefined,
    actions: r.actions && r.actions.length ? r.actions : undefined,
    paused: r.paused,
  });
}

/** The coordinator refused a request (nothing started). */
export class RejectedError extends Error {
  override name = "RejectedError";
  constructor(
    message: string,
    /** unknown_flow, unknown_version, unknown_run, bad_request, bad_input, refused, unavailable, other. */
    readonly code: RejectionCode,
    readonly retryable: boolean,
  ) {
    super(message);
  }
}

/** No coordinator answered. */
export class NoCoordinatorError extends Error {
  override name = "NoCoordinatorError";
}
