export { create, Flow, PermanentError, RetryableError, Hooks } from "./flow.js";
export type { StepContext, StepOptions, FlowOptions, Handler, HookEvents, HookName } from "./flow.js";
export { connect, close } from "./session.js";
export type { ConnectOptions } from "./connection.js";
export { Worker, type WorkerOptions } from "./worker.js";
export { Client, type ClientOptions } from "./client.js";
export { RejectedError, NoCoordinatorError, type RunOptions, type RunResult, type StepResult } from "./report.js";
export * as protocol from "./protocol.js";
export { ProtocolError, PROTOCOL_VERSION } from "./protocol.js";
export {
  flowVersion,
  canonicalFlowDef,
  flowDefFromWire,
  stepDef,
  flowDef,
  defaultRetry,
  compensationDefaultRetry,
  validateFlowDef,
  FlowDefError,
  type FlowDef,
  type StepDef,
  type RetryPolicy,
  type OnUnknown,
  type OnExhausted,
} from "./flowdef.js";
