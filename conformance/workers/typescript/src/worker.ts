/**
 * The TypeScript conformance worker: serves flow `conformance` (see README.md)
 * and appends one JSON line per handler event to CONFORMANCE_EFFECTS.
 *
 * Environment: NATS_URL, ORCHESTRIX_PREFIX (default "orchestrix"),
 * CONFORMANCE_EFFECTS (file path), CONFORMANCE_WORKER_NAME.
 * Prints `ready` once registered and subscribed; drains and exits 0 on SIGTERM/SIGINT.
 */
import { appendFileSync } from "node:fs";
import { create, PermanentError, RetryableError, Worker, type StepContext } from "@orchestrix/sdk";

export type ConformanceInput = {
  id: string;
  flakyFailures: number;
  slowMs: number;
  boundedMs: number;
  fail: "none" | "permanent" | "retryable";
};

const effectsPath = process.env.CONFORMANCE_EFFECTS;
const workerName = process.env.CONFORMANCE_WORKER_NAME || `ts-${process.pid}`;

function effect(ctx: StepContext<ConformanceInput>, event: "start" | "end" | "stopped"): void {
  if (!effectsPath) return;
  const line = JSON.stringify({
    runId: ctx.runId,
    step: ctx.step,
    kind: ctx.kind,
    attempt: ctx.attempt,
    event,
    worker: workerName,
    atMs: Date.now(),
  });
  appendFileSync(effectsPath, line + "\n");
}

/** Wraps a handler: `start` first, then `end` when it returns or throws, or `stopped` when it was aborted. */
function recorded<T>(fn: (ctx: StepContext<ConformanceInput>) => Promise<T> | T) {
  return async (ctx: StepContext<ConformanceInput>): Promise<T> => {
    effect(ctx, "start");
    try {
      return await fn(ctx);
    } finally {
      effect(ctx, ctx.signal.aborted ? "stopped" : "end");
    }
  };
}

/** Sleeps `ms`, or less when `signal` aborts (then throws the abort reason). */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason ?? new Error("aborted"));
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    const onAbort = () => {
      clearTimeout(t);
      reject(signal.reason ?? new Error("aborted"));
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

const nothing = recorded(async () => undefined);

export const conformanceFlow = create<ConformanceInput>("conformance")
  .step("record", nothing, { compensate: nothing })
  .step(
    "flaky",
    recorded(async (ctx) => {
      if (ctx.attempt <= ctx.input.flakyFailures) throw new RetryableError(`flaky failure ${ctx.attempt}`);
    }),
    { retries: 3, retryDelayMs: 200, compensate: nothing },
  )
  .step("slow", recorded(async (ctx) => sleep(ctx.input.slowMs, ctx.signal)))
  .step("bounded", recorded(async (ctx) => sleep(ctx.input.boundedMs, ctx.signal)), { timeoutMs: 1000 })
  .step(
    "decide",
    recorded(async (ctx) => {
      if (ctx.input.fail === "permanent") throw new PermanentError(`declined: ${ctx.input.id}`);
      if (ctx.input.fail === "retryable") throw new RetryableError(`retryable failure: ${ctx.input.id}`);
    }),
  );

async function main(): Promise<void> {
  const worker = await Worker.start({ flows: [conformanceFlow] });
  process.stdout.write("ready\n");
  let stopping = false;
  const stop = () => {
    if (stopping) process.exit(1); // a second signal: stop at once
    stopping = true;
    worker.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e: unknown) => {
  process.stderr.write(`error: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(2);
});
