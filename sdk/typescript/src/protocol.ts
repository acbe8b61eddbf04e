/**
 * Orchestrix wire protocol v2: the messages as TypeScript types, and the
 * envelope `{ v: 2, kind, body }` encoded and decoded with validation.
 *
 * Every decode error is a {@link ProtocolError} that says what was expected
 * and where the bytes went wrong; nothing here throws anything else on bad
 * input.
 */
import { decode as mpDecode, encode as mpEncode } from "@msgpack/msgpack";
import { encodeCanonical, type Encodable } from "./msgpack.js";

/** The protocol version this SDK speaks. */
export const PROTOCOL_VERSION = 2;
/** Messages above this size are refused before decoding (NATS' default max_payload). */
export const DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024;
/** The header naming the kind of every message. */
export const KIND_HEADER = "Orchestrix-Kind";
/** On a step command: its sender reads `step.acks` (value `batch`). */
export const ACKS_HEADER = "Orchestrix-Acks";
/** `bin` of the single byte `0xc0`: no value. */
export const NIL_VALUE: Uint8Array = Uint8Array.of(0xc0);

export type CommandKind = "execute" | "compensate";
export type RunStatus =
  | "queued"
  | "running"
  | "paused"
  | "completed"
  | "failed"
  | "compensation_failed"
  | "cancelled"
  | "quarantined";
export type StepStatus =
  | "not_run"
  | "pending"
  | "running"
  | "waiting"
  | "completed"
  | "failed"
  | "compensating"
  | "compensated"
  | "compensation_failed"
  | "unknown"
  | "cancelled"
  | "paused"
  | (string & {});

export interface StepOutputWire {
  step: string;
  output: Uint8Array;
}

export interface StepCommand {
  commandId: string;
  runId: string;
  flow: string;
  version: string;
  step: string;
  stepIndex: number;
  kind: CommandKind;
  attempt: number;
  input: Uint8Array;
  outputs: StepOutputWire[];
  timeoutMs?: number;
  startByMs?: number;
  deadlineMs?: number;
  /** The sender reads `step.acks` (older coordinators said it with the header `Orchestrix-Acks: batch`). Present only when true. */
  acks?: boolean;
  /** `false`: the run was left out by the coordinator's trace sampler (make no spans for it). Absent: see `traceparent`. */
  sampled?: boolean;
  /** The run's W3C trace context for this command (the coordinator's attempt span), when the run is sampled; older coordinators sent it as a `traceparent` header. */
  traceparent?: string;
}

export interface Ack {
  commandId: string;
  runId: string;
  attempt: number;
  worker: string;
}
export type Heartbeat = Ack;

/** One command of a `step.acks`. */
export interface AckedCommand {
  commandId: string;
  runId: string;
  attempt: number;
}

/**
 * Several commands acknowledged in one message (protocol 5.1, step 5): sent
 * only for commands that carried the header `Orchestrix-Acks: batch`, and
 * sent by this SDK's worker for the commands one socket read delivers.
 */
export interface Acks {
  worker: string;
  commands: AckedCommand[];
}

export type OutcomeResult =
  | { type: "completed"; output: Uint8Array }
  | { type: "failed"; message: string; retryable: boolean; maybeDone?: boolean };

export interface StepOutcome {
  commandId: string;
  runId: string;
  attempt: number;
  kind: CommandKind;
  result: OutcomeResult;
}

export type WireErrorCode = "malformed" | "expired" | "no_handler" | "unknown_command" | (string & {});
export interface WireError {
  message: string;
  code: WireErrorCode;
  commandId?: string;
  runId?: string;
}

export interface StepCancel {
  commandId: string;
  runId: string;
  attempt: number;
}

export interface RunRequest {
  flow: string;
  version?: string;
  input: Uint8Array;
  key?: string;
  ttlMs?: number;
  timeoutMs?: number;
  wait: boolean;
  startByMs?: number;
  concurrencyKey?: string;
}

export interface StatusRequest {
  runId: string;
  wait: boolean;
}

export interface ListRequest {
  status?: RunStatus;
  flow?: string;
  limit: number;
  before?: string;
}

export type ControlAction = "cancel" | "resume" | "rollback";
export interface ControlRequest {
  runId: string;
  action: ControlAction;
  by: string;
  reason?: string;
}

export interface CompensationReportWire {
  attempts: number;
  error?: string;
  durationMs?: number;
}

export interface StepReportWire {
  name: string;
  status: StepStatus;
  attempts: number;
  error?: string;
  output?: Uint8Array;
  startedAtMs?: number;
  durationMs?: number;
  compensation?: CompensationReportWire;
  waiting?: string;
  group?: string;
}

export interface RunReportWire {
  runId: string;
  flow: string;
  version?: string;
  status: RunStatus;
  durationMs: number;
  startedAtMs?: number;
  error?: string;
  failedStep?: string;
  steps: StepReportWire[];
  late?: string[];
  actions?: { action: ControlAction; by: string; reason?: string; atMs: number }[];
  paused?: { step: string; kind: CommandKind; sinceMs: number; untilMs?: number };
}

export type RejectionCode =
  | "unknown_flow"
  | "unknown_version"
  | "unknown_run"
  | "bad_request"
  | "bad_input"
  | "refused"
  | "unavailable"
  | "other"
  | (string & {});

export type RunReply =
  | { type: "accepted"; runId: string; duplicate: boolean }
  | { type: "report"; report: RunReportWire }
  | { type: "list"; runs: RunReportWire[] }
  | { type: "rejected"; error: string; code: RejectionCode; retryable: boolean };

export interface RunEvent {
  runId: string;
  flow: string;
  atMs: number;
  event: { type: string; [field: string]: unknown };
}

export interface ServedFlow {
  flow: string;
  version: string | null;
  steps: string[];
}

export interface WorkerPresence {
  worker: string;
  host: string;
  startedAtMs: number;
  flows: ServedFlow[];
}

export interface FlowRegistrationWire {
  /** The definition as decoded (see `flowdef.ts` for the typed form). */
  flow: Record<string, unknown>;
  version: string;
  registeredAtMs: number;
  registeredBy: string;
}

/** Every message kind and its body type. */
export interface Messages {
  "step.command": StepCommand;
  "step.ack": Ack;
  "step.acks": Acks;
  "step.heartbeat": Heartbeat;
  "step.outcome": StepOutcome;
  error: WireError;
  "step.cancel": StepCancel;
  "run.request": RunRequest;
  "run.status": StatusRequest;
  "run.list": ListRequest;
  "run.control": ControlRequest;
  "run.reply": RunReply;
  "run.event": RunEvent;
  "flow.registration": FlowRegistrationWire;
  "worker.presence": WorkerPresence;
}
export type Kind = keyof Messages;

export type ProtocolErrorReason = "malformed" | "unsupported_version" | "wrong_kind" | "too_large";

/** A message that cannot be used, and why. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
  constructor(
    readonly reason: ProtocolErrorReason,
    message: string,
    /** The ids the message carried, when they could be read. */
    readonly ids?: { commandId?: string; runId?: string },
  ) {
    super(message);
  }
}

// ---------------------------------------------------------------- reading

type Obj = Record<string, unknown>;
const UUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

function describe(v: unknown): string {
  if (v === null) return "nil";
  if (v instanceof Uint8Array) return `bin of ${v.length} bytes`;
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") return `the string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + "…" : v)}`;
  if (typeof v === "object") return "a map";
  return `${typeof v} ${String(v)}`;
}

/** Reads typed fields out of a decoded map, naming the field that is wrong. */
class Fields {
  constructor(
    readonly obj: Obj,
    readonly path: string,
  ) {}

  static of(v: unknown, path: string): Fields {
    if (v === null || typeof v !== "object" || Array.isArray(v) || v instanceof Uint8Array) {
      throw new FieldError(`${path} must be a map, found ${describe(v)}`);
    }
    return new Fields(v as Obj, path);
  }

  private at(k: string): string {
    return this.path ? `${this.path}.${k}` : k;
  }
  private present(k: string): boolean {
    const v = this.obj[k];
    return v !== undefined && v !== null;
  }
  private required(k: string): unknown {
    if (!this.present(k)) throw new FieldError(`${this.at(k)} is missing`);
    return this.obj[k];
  }

  str(k: string): string {
    const v = this.required(k);
    if (typeof v !== "string") throw new FieldError(`${this.at(k)} must be a string, found ${describe(v)}`);
    return v;
  }
  optStr(k: string): string | undefined {
    return this.present(k) ? this.str(k) : undefined;
  }
  uuid(k: string): string {
    const v = this.required(k);
    // Records stored before v2 hold the 16 raw bytes.
    if (v instanceof Uint8Array && v.length === 16) {
      const h = Buffer.from(v).toString("hex");
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    }
    if (typeof v !== "string" || !UUID_RE.test(v)) {
      throw new FieldError(`${this.at(k)} must be a hyphenated UUID string, found ${describe(v)}`);
    }
    return v.toLowerCase();
  }
  optUuid(k: string): string | undefined {
    return this.present(k) ? this.uuid(k) : undefined;
  }
  uint(k: string, max = Number.MAX_SAFE_INTEGER): number {
    let v = this.required(k);
    if (typeof v === "bigint" && v >= 0n && v <= BigInt(Number.MAX_SAFE_INTEGER)) v = Number(v);
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > max) {
      throw new FieldError(`${this.at(k)} must be an unsigned integer${max < Number.MAX_SAFE_INTEGER ? ` up to ${max}` : ""}, found ${describe(v)}`);
    }
    return v;
  }
  optUint(k: string): number | undefined {
    return this.present(k) ? this.uint(k) : undefined;
  }
  u32(k: string): number {
    return this.uint(k, 0xffffffff);
  }
  bool(k: string, dflt?: boolean): boolean {
    if (!this.present(k) && dflt !== undefined) return dflt;
    const v = this.required(k);
    if (typeof v !== "boolean") throw new FieldError(`${this.at(k)} must be a boolean, found ${describe(v)}`);
    return v;
  }
  optBool(k: string): boolean | undefined {
    return this.present(k) ? this.bool(k) : undefined;
  }
  bin(k: string): Uint8Array {
    const v = this.required(k);
    if (!(v instanceof Uint8Array)) {
      throw new FieldError(`${this.at(k)} must be a bin holding one MessagePack value, found ${describe(v)}`);
    }
    checkOneValue(v, this.at(k));
    return v;
  }
  optBin(k: string): Uint8Array | undefined {
    return this.present(k) ? this.bin(k) : undefined;
  }
  oneOf<T extends string>(k: string, values: readonly T[]): T {
    const v = this.str(k);
    if (!(values as readonly string[]).includes(v)) {
      throw new FieldError(`${this.at(k)} must be one of ${values.map((x) => `"${x}"`).join(", ")}, found ${describe(v)}`);
    }
    return v as T;
  }
  map(k: string): Fields {
    return Fields.of(this.required(k), this.at(k));
  }
  optMap(k: string): Fields | undefined {
    return this.present(k) ? this.map(k) : undefined;
  }
  array<T>(k: string, item: (f: unknown, path: string) => T, dflt?: T[]): T[] {
    if (!this.present(k) && dflt !== undefined) return dflt;
    const v = this.required(k);
    if (!Array.isArray(v)) throw new FieldError(`${this.at(k)} must be an array, found ${describe(v)}`);
    return v.map((x, i) => item(x, `${this.at(k)}[${i}]`));
  }
  raw(k: string): unknown {
    return this.obj[k];
  }
}

class FieldError extends Error {}

function checkOneValue(bytes: Uint8Array, path: string): void {
  try {
    mpDecode(bytes);
  } catch (e) {
    throw new FieldError(`${path} does not hold exactly one MessagePack value: ${(e as Error).message}`);
  }
}

const COMMAND_KINDS = ["execute", "compensate"] as const;
const RUN_STATUSES = [
  "queued",
  "running",
  "paused",
  "completed",
  "failed",
  "compensation_failed",
  "cancelled",
  "quarantined",
] as const;

function readStepCommand(f: Fields): StepCommand {
  return {
    commandId: f.uuid("commandId"),
    runId: f.uuid("runId"),
    flow: f.str("flow"),
    version: f.optStr("version") ?? "",
    step: f.str("step"),
    stepIndex: f.u32("stepIndex"),
    kind: f.oneOf("kind", COMMAND_KINDS),
    attempt: f.u32("attempt"),
    input: f.bin("input"),
    outputs: f.array("outputs", (x, p) => {
      const o = Fields.of(x, p);
      return { step: o.str("step"), output: o.bin("output") };
    }),
    timeoutMs: f.optUint("timeoutMs"),
    startByMs: f.optUint("startByMs"),
    deadlineMs: f.optUint("deadlineMs"),
    ...(f.bool("acks", false) ? { acks: true } : {}),
    ...(f.optBool("sampled") !== undefined ? { sampled: f.optBool("sampled") } : {}),
    // Advisory, as W3C trace context is: anything but a string reads as absent.
    ...(typeof f.obj.traceparent === "string" ? { traceparent: f.obj.traceparent } : {}),
  };
}

function readAck(f: Fields): Ack {
  return { commandId: f.uuid("commandId"), runId: f.uuid("runId"), attempt: f.u32("attempt"), worker: f.str("worker") };
}

function readAcks(f: Fields): Acks {
  return {
    worker: f.str("worker"),
    commands: f.array("commands", (x, p) => {
      const c = Fields.of(x, p);
      return { commandId: c.uuid("commandId"), runId: c.uuid("runId"), attempt: c.u32("attempt") };
    }),
  };
}

function readOutcome(f: Fields): StepOutcome {
  const r = f.map("result");
  const type = r.oneOf("type", ["completed", "failed"] as const);
  const result: OutcomeResult =
    type === "completed"
      ? { type, output: r.bin("output") }
      : { type, message: r.str("message"), retryable: r.bool("retryable"), maybeDone: r.bool("maybeDone", false) };
  return { commandId: f.uuid("commandId"), runId: f.uuid("runId"), attempt: f.u32("attempt"), kind: f.oneOf("kind", COMMAND_KINDS), result };
}

function readWireError(f: Fields): WireError {
  return { message: f.str("message"), code: f.optStr("code") ?? "", commandId: f.optUuid("commandId"), runId: f.optUuid("runId") };
}

function readCancel(f: Fields): StepCancel {
  return { commandId: f.uuid("commandId"), runId: f.uuid("runId"), attempt: f.u32("attempt") };
}

function readRunRequest(f: Fields): RunRequest {
  return {
    flow: f.str("flow"),
    version: f.optStr("version"),
    input: f.bin("input"),
    key: f.optStr("key"),
    ttlMs: f.optUint("ttlMs"),
    timeoutMs: f.optUint("timeoutMs"),
    wait: f.bool("wait", false),
    startByMs: f.optUint("startByMs"),
    concurrencyKey: f.optStr("concurrencyKey"),
  };
}

function readStatusRequest(f: Fields): StatusRequest {
  return { runId: f.uuid("runId"), wait: f.bool("wait", false) };
}

function readListRequest(f: Fields): ListRequest {
  const status = f.raw("status") == null ? undefined : f.oneOf("status", RUN_STATUSES);
  return { status, flow: f.optStr("flow"), limit: f.u32("limit"), before: f.optUuid("before") };
}

function readControl(f: Fields): ControlRequest {
  return {
    runId: f.uuid("runId"),
    action: f.oneOf("action", ["cancel", "resume", "rollback"] as const),
    by: f.str("by"),
    reason: f.optStr("reason"),
  };
}

export function readReport(f: Fields): RunReportWire {
  const steps = f.array("steps", (x, p) => {
    const s = Fields.of(x, p);
    const c = s.optMap("compensation");
    const step: StepReportWire = {
      name: s.str("name"),
      status: s.str("status"),
      attempts: s.u32("attempts"),
      error: s.optStr("error"),
      output: s.optBin("output"),
      startedAtMs: s.optUint("startedAtMs"),
      durationMs: s.optUint("durationMs"),
      compensation: c && { attempts: c.u32("attempts"), error: c.optStr("error"), durationMs: c.optUint("durationMs") },
      waiting: s.optStr("waiting"),
      group: s.optStr("group"),
    };
    return step;
  });
  const paused = f.optMap("paused");
  return {
    runId: f.uuid("runId"),
    flow: f.str("flow"),
    version: f.optStr("version"),
    status: f.oneOf("status", RUN_STATUSES),
    durationMs: f.uint("durationMs"),
    startedAtMs: f.optUint("startedAtMs"),
    error: f.optStr("error"),
    failedStep: f.optStr("failedStep"),
    steps,
    late: f.array("late", (x, p) => {
      if (typeof x !== "string") throw new FieldError(`${p} must be a string`);
      return x;
    }, []),
    actions: f.array("actions", (x, p) => {
      const a = Fields.of(x, p);
      return { action: a.oneOf("action", ["cancel", "resume", "rollback"] as const), by: a.str("by"), reason: a.optStr("reason"), atMs: a.uint("atMs") };
    }, []),
    paused: paused && {
      step: paused.str("step"),
      kind: paused.oneOf("kind", COMMAND_KINDS),
      sinceMs: paused.uint("sinceMs"),
      untilMs: paused.optUint("untilMs"),
    },
  };
}

function readRunReply(f: Fields): RunReply {
  const type = f.oneOf("type", ["accepted", "report", "list", "rejected"] as const);
  switch (type) {
    case "accepted":
      return { type, runId: f.uuid("runId"), duplicate: f.bool("duplicate", false) };
    case "report":
      return { type, report: readReport(f.map("report")) };
    case "list":
      return { type, runs: f.array("runs", (x, p) => readReport(Fields.of(x, p))) };
    case "rejected":
      return { type, error: f.str("error"), code: f.optStr("code") ?? "", retryable: f.bool("retryable", false) };
  }
}

function readRunEvent(f: Fields): RunEvent {
  const ev = f.map("event");
  const type = ev.str("type");
  const event: RunEvent["event"] = { ...ev.obj, type };
  if (type === "run_ended") event.report = readReport(ev.map("report"));
  return { runId: f.uuid("runId"), flow: f.str("flow"), atMs: f.uint("atMs"), event };
}

function readRegistration(f: Fields): FlowRegistrationWire {
  return {
    flow: f.map("flow").obj,
    version: f.str("version"),
    registeredAtMs: f.uint("registeredAtMs"),
    registeredBy: f.str("registeredBy"),
  };
}

function readPresence(f: Fields): WorkerPresence {
  return {
    worker: f.str("worker"),
    host: f.optStr("host") ?? "",
    startedAtMs: f.uint("startedAtMs"),
    flows: f.array("flows", (x, p) => {
      const s = Fields.of(x, p);
      return {
        flow: s.str("flow"),
        version: s.optStr("version") ?? null,
        steps: s.array("steps", (y, q) => {
          if (typeof y !== "string") throw new FieldError(`${q} must be a string`);
          return y;
        }),
      };
    }),
  };
}

const READERS: { [K in Kind]: (f: Fields) => Messages[K] } = {
  "step.command": readStepCommand,
  "step.ack": readAck,
  "step.acks": readAcks,
  "step.heartbeat": readAck,
  "step.outcome": readOutcome,
  error: readWireError,
  "step.cancel": readCancel,
  "run.request": readRunRequest,
  "run.status": readStatusRequest,
  "run.list": readListRequest,
  "run.control": readControl,
  "run.reply": readRunReply,
  "run.event": readRunEvent,
  "flow.registration": readRegistration,
  "worker.presence": readPresence,
};

/** Every kind this SDK knows. */
export const KINDS = Object.keys(READERS) as Kind[];

interface Envelope {
  v: number;
  kind: string;
  body: unknown;
}

function readEnvelope(bytes: Uint8Array, expected: string, limit: number): Envelope {
  if (!(bytes instanceof Uint8Array)) {
    throw new ProtocolError("malformed", `malformed \`${expected}\` message: not bytes`);
  }
  if (bytes.length > limit) {
    throw new ProtocolError("too_large", `message of ${bytes.length} bytes exceeds the limit of ${limit} bytes`);
  }
  let raw: unknown;
  try {
    raw = mpDecode(bytes);
  } catch (e) {
    throw new ProtocolError("malformed", `malformed \`${expected}\` message: not one MessagePack value (${(e as Error).message})`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw) || raw instanceof Uint8Array) {
    throw new ProtocolError("malformed", `malformed \`${expected}\` message: the envelope must be a map {v, kind, body}, found ${describe(raw)}`);
  }
  const env = raw as Obj;
  const v = env.v;
  if (typeof v !== "number" || !Number.isInteger(v)) {
    throw new ProtocolError("malformed", `malformed \`${expected}\` message: the envelope's \`v\` must be an integer, found ${describe(v)}`);
  }
  if (v !== PROTOCOL_VERSION) {
    throw new ProtocolError("unsupported_version", `unsupported protocol version ${v} (this SDK speaks version ${PROTOCOL_VERSION})`, idsOf(env.body));
  }
  if (typeof env.kind !== "string") {
    throw new ProtocolError("malformed", `malformed \`${expected}\` message: the envelope's \`kind\` must be a string, found ${describe(env.kind)}`);
  }
  return { v, kind: env.kind, body: env.body };
}

function idsOf(body: unknown): { commandId?: string; runId?: string } | undefined {
  if (body === null || typeof body !== "object" || Array.isArray(body)) return undefined;
  const b = body as Obj;
  const id = (x: unknown) => (typeof x === "string" && UUID_RE.test(x) ? x.toLowerCase() : undefined);
  const ids = { commandId: id(b.commandId), runId: id(b.runId) };
  return ids.commandId || ids.runId ? ids : undefined;
}

/** The version and kind of an envelope, without reading its body. */
export function peekKind(bytes: Uint8Array, limit = DEFAULT_MAX_MESSAGE_BYTES): { v: number; kind: string } {
  const env = readEnvelope(bytes, "envelope", limit);
  return { v: env.v, kind: env.kind };
}

/**
 * Decodes a message of kind `kind`. Throws a {@link ProtocolError}: `too_large`,
 * `malformed` (naming the field), `unsupported_version` or `wrong_kind`.
 */
export function decodeMessage<K extends Kind>(bytes: Uint8Array, kind: K, limit = DEFAULT_MAX_MESSAGE_BYTES): Messages[K] {
  const env = readEnvelope(bytes, kind, limit);
  if (env.kind !== kind) {
    throw new ProtocolError("wrong_kind", `expected a \`${kind}\` message, got \`${env.kind}\``, idsOf(env.body));
  }
  try {
    return READERS[kind](Fields.of(env.body, "body"));
  } catch (e) {
    if (e instanceof FieldError) {
      throw new ProtocolError("malformed", `malformed \`${kind}\` message: ${e.message}`, idsOf(env.body));
    }
    throw new ProtocolError("malformed", `malformed \`${kind}\` message: ${(e as Error).message}`, idsOf(env.body));
  }
}

/** Decodes any known message: its kind and body. */
export function decodeAny(bytes: Uint8Array, limit = DEFAULT_MAX_MESSAGE_BYTES): { [K in Kind]: { kind: K; body: Messages[K] } }[Kind] {
  const { kind } = peekKind(bytes, limit);
  if (!(kind in READERS)) throw new ProtocolError("wrong_kind", `unknown message kind \`${kind}\``);
  const k = kind as Kind;
  return { kind: k, body: decodeMessage(bytes, k, limit) } as never;
}

// ---------------------------------------------------------------- writing

const nil = <T>(v: T | undefined): T | null => (v === undefined ? null : v);

function reportBody(r: RunReportWire): Encodable {
  return {
    runId: r.runId,
    flow: r.flow,
    version: r.version,
    status: r.status,
    durationMs: r.durationMs,
    startedAtMs: nil(r.startedAtMs),
    error: nil(r.error),
    failedStep: nil(r.failedStep),
    steps: r.steps.map((s) => ({
      name: s.name,
      status: s.status,
      attempts: s.attempts,
      error: nil(s.error),
      output: nil(s.output),
      startedAtMs: nil(s.startedAtMs),
      durationMs: nil(s.durationMs),
      compensation: s.compensation ? { attempts: s.compensation.attempts, error: nil(s.compensation.error), durationMs: nil(s.compensation.durationMs) } : null,
      waiting: s.waiting,
      group: s.group,
    })),
    late: r.late && r.late.length ? r.late : undefined,
    actions: r.actions && r.actions.length ? r.actions.map((a) => ({ action: a.action, by: a.by, reason: nil(a.reason), atMs: a.atMs })) : undefined,
    paused: r.paused && { step: r.paused.step, kind: r.paused.kind, sinceMs: r.paused.sinceMs, untilMs: nil(r.paused.untilMs) },
  };
}

/**
 * The body as the Rust types write it: the same key order, `nil` for an
 * absent optional the Rust side always writes, omitted where it omits it
 * (so the SDK's messages are byte for byte the golden vectors).
 */
function bodyOf<K extends Kind>(kind: K, body: Messages[K]): Encodable {
  const m = body as Messages[Kind];
  switch (kind) {
    case "step.command": {
      const c = m as StepCommand;
      return {
        commandId: c.commandId,
        runId: c.runId,
        flow: c.flow,
        version: c.version,
        step: c.step,
        stepIndex: c.stepIndex,
        kind: c.kind,
        attempt: c.attempt,
        input: c.input,
        outputs: c.outputs.map((o) => ({ step: o.step, output: o.output })),
        timeoutMs: nil(c.timeoutMs),
        startByMs: nil(c.startByMs),
        deadlineMs: nil(c.deadlineMs),
        ...(c.acks ? { acks: true } : {}),
        ...(c.sampled !== undefined ? { sampled: c.sampled } : {}),
        ...(c.traceparent !== undefined ? { traceparent: c.traceparent } : {}),
      };
    }
    case "step.ack":
    case "step.heartbeat": {
      const a = m as Ack;
      return { commandId: a.commandId, runId: a.runId, attempt: a.attempt, worker: a.worker };
    }
    case "step.acks": {
      const a = m as Acks;
      return {
        worker: a.worker,
        commands: a.commands.map((c) => ({ commandId: c.commandId, runId: c.runId, attempt: c.attempt })),
      };
    }
    case "step.outcome": {
      const o = m as StepOutcome;
      const r = o.result;
      const result: Encodable =
        r.type === "completed"
          ? { type: "completed", output: r.output }
          : { type: "failed", message: r.message, retryable: r.retryable, maybeDone: r.maybeDone ? true : undefined };
      return { commandId: o.commandId, runId: o.runId, attempt: o.attempt, kind: o.kind, result };
    }
    case "error": {
      const e = m as WireError;
      return { message: e.message, code: e.code, commandId: nil(e.commandId), runId: nil(e.runId) };
    }
    case "step.cancel": {
      const c = m as StepCancel;
      return { commandId: c.commandId, runId: c.runId, attempt: c.attempt };
    }
    case "run.request": {
      const r = m as RunRequest;
      return {
        flow: r.flow,
        version: nil(r.version),
        input: r.input,
        key: nil(r.key),
        ttlMs: nil(r.ttlMs),
        timeoutMs: nil(r.timeoutMs),
        wait: r.wait,
        startByMs: nil(r.startByMs),
        concurrencyKey: r.concurrencyKey,
      };
    }
    case "run.status": {
      const r = m as StatusRequest;
      return { runId: r.runId, wait: r.wait };
    }
    case "run.list": {
      const r = m as ListRequest;
      return { status: nil(r.status), flow: nil(r.flow), limit: r.limit, before: r.before };
    }
    case "run.control": {
      const r = m as ControlRequest;
      return { runId: r.runId, action: r.action, by: r.by, reason: nil(r.reason) };
    }
    case "run.reply": {
      const r = m as RunReply;
      switch (r.type) {
        case "accepted":
          return { type: r.type, runId: r.runId, duplicate: r.duplicate ? true : undefined };
        case "report":
          return { type: r.type, report: reportBody(r.report) };
        case "list":
          return { type: r.type, runs: r.runs.map(reportBody) };
        case "rejected":
          return { type: r.type, error: r.error, code: r.code || undefined, retryable: r.retryable };
      }
      break;
    }
    case "flow.registration": {
      const r = m as FlowRegistrationWire;
      return { flow: r.flow as Encodable, version: r.version, registeredAtMs: r.registeredAtMs, registeredBy: r.registeredBy };
    }
    case "worker.presence": {
      const p = m as WorkerPresence;
      return {
        worker: p.worker,
        host: p.host,
        startedAtMs: p.startedAtMs,
        flows: p.flows.map((f) => ({ flow: f.flow, version: f.version, steps: f.steps })),
      };
    }
  }
  return body as unknown as Encodable;
}

/** Encodes a message in its v2 envelope (`v`, `kind`, `body`, in that order). */
export function encodeMessage<K extends Kind>(kind: K, body: Messages[K]): Uint8Array {
  return encodeCanonical({ v: PROTOCOL_VERSION, kind, body: bodyOf(kind, body) });
}

// ---------------------------------------------------------------- user values

/** Encodes a user value as the bytes a `bin` carries: `undefined` is nil. */
export function encodeValue(value: unknown): Uint8Array {
  if (value === undefined) return NIL_VALUE;
  try {
    return mpEncode(value, { ignoreUndefined: true });
  } catch (e) {
    throw new ProtocolError("malformed", `the value cannot be encoded as MessagePack: ${(e as Error).message}`);
  }
}

/** Decodes the bytes of a `bin` user value: nil is `undefined`. */
export function decodeValue<T = unknown>(bytes: Uint8Array): T {
  try {
    const v = mpDecode(bytes);
    return (v === null ? undefined : v) as T;
  } catch (e) {
    throw new ProtocolError("malformed", `the value is not one MessagePack value: ${(e as Error).message}`);
  }
}
