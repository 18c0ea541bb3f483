import { create } from "@bufbuild/protobuf";
import { SessionResponseSchema, type SessionRequest, type SessionResponse } from "../../../gen/aaos/v1/agent_service_pb.js";
import { TaskType as PbTaskType } from "../../../gen/aaos/v1/task_pb.js";
import type { ServerMessage } from "../../agents/agent-messages.js";
import { PB_TASK_TYPE_NAMES, taskToPb, taskTypeFromPb } from "./mappers.js";

/**
 * SessionRequest → the shape the session validates, or a reason it is not a
 * valid message. Capabilities that are UNSPECIFIED or a number this build does
 * not know are refused here, by name: after mapping to domain strings the
 * session's validation could no longer say which value was wrong.
 */
export function decodeSessionRequest(req: SessionRequest): { ok: true; message: unknown } | { ok: false; reason: string } {
  const k = req.kind;
  switch (k.case) {
    case "register": {
      const capabilities: string[] = [];
      for (const [i, c] of k.value.capabilities.entries()) {
        const type = taskTypeFromPb(c);
        if (type) {
          capabilities.push(type);
          continue;
        }
        const what = c === PbTaskType.UNSPECIFIED ? "TASK_TYPE_UNSPECIFIED is not a task type" : `unknown task type ${c}`;
        return { ok: false, reason: `capabilities.${i}: ${what}; must be one of: ${PB_TASK_TYPE_NAMES}` };
      }
      return {
        ok: true,
        message: {
          type: "register",
          agentId: k.value.agentId,
          agentName: k.value.agentName,
          agentType: k.value.agentType,
          capabilities,
          maxConcurrency: k.value.maxConcurrency,
        },
      };
    }
    case "heartbeat":
      return { ok: true, message: { type: "heartbeat" } };
    case "taskComplete":
      return { ok: true, message: { type: "task_complete", taskId: k.value.taskId, result: k.value.result ?? {}, attempt: k.value.attempt } };
    case "taskFailed":
      return {
        ok: true,
        message: { type: "task_failed", taskId: k.value.taskId, error: k.value.error, retryable: k.value.retryable, attempt: k.value.attempt },
      };
    default:
      return { ok: false, reason: "empty message: set one of register, heartbeat, task_complete, task_failed" };
  }
}

export function encodeSessionResponse(m: ServerMessage): SessionResponse {
  switch (m.type) {
    case "registration_ack":
      return create(SessionResponseSchema, { kind: { case: "registrationAck", value: { agentId: m.agentId, heartbeatIntervalMs: m.heartbeatIntervalMs } } });
    case "task_assignment":
      return create(SessionResponseSchema, { kind: { case: "taskAssignment", value: { task: taskToPb(m.task) } } });
    case "heartbeat_ack":
      return create(SessionResponseSchema, { kind: { case: "heartbeatAck", value: {} } });
    case "completion_ack":
      return create(SessionResponseSchema, { kind: { case: "completionAck", value: { taskId: m.taskId } } });
    case "task_cancelled":
      return create(SessionResponseSchema, { kind: { case: "taskCancelled", value: { taskId: m.taskId } } });
    case "drain":
      return create(SessionResponseSchema, { kind: { case: "drain", value: { graceMs: m.graceMs } } });
    case "error":
      return create(SessionResponseSchema, { kind: { case: "error", value: { code: m.code, message: m.message, taskId: m.taskId ?? "" } } });
  }
}
