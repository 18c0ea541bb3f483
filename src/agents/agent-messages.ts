import { z } from "zod";
import { canonicalTaskId } from "../ids.js";
import { boundedJsonObject, safeText, violationsOf } from "../tasks/task-validation.js";
import type { Limits } from "../config/config.js";
import { TASK_TYPES, type JsonObject, type TaskRecord, type TaskType } from "../tasks/task-types.js";

/** Agent → server, after transport decoding (proto oneof or WS JSON frame). */
export type AgentMessage =
  | {
      type: "register";
      agentId?: string;
      agentName?: string;
      agentType?: string;
      capabilities?: TaskType[];
      maxConcurrency?: number;
    }
  | { type: "heartbeat" }
  | { type: "task_complete"; taskId: string; result: JsonObject; attempt?: number }
  | { type: "task_failed"; taskId: string; error: string; retryable?: boolean; attempt?: number };

/** Server → agent, before transport encoding. */
export type ServerMessage =
  | { type: "registration_ack"; agentId: string; heartbeatIntervalMs: number }
  | { type: "task_assignment"; task: TaskRecord }
  | { type: "heartbeat_ack" }
  | { type: "completion_ack"; taskId: string }
  | { type: "task_cancelled"; taskId: string }
  | { type: "drain"; graceMs: number }
  | { type: "error"; code: string; message: string; taskId?: string };

export const MAX_CONCURRENCY_LIMIT = 1000;

const agentIdSchema = z
  .string()
  .max(128, { message: "must be at most 128 characters" })
  .regex(/^[A-Za-z0-9._:-]*$/, { message: "may contain only letters, digits and . _ : -" });
const taskId = z
  .string()
  .uuid({ message: "must be a task UUID" })
  .transform((id) => canonicalTaskId(id));
// int32 on the wire (gRPC) and in the database; /ws JSON could send more.
const attempt = z.number().int().min(0).max(2_147_483_647).optional();

function agentMessageSchema(limits: Limits) {
  return z.discriminatedUnion("type", [
    z.object({
      type: z.literal("register"),
      agentId: agentIdSchema.optional(),
      agentName: safeText().max(100, { message: "must be at most 100 characters" }).optional(),
      agentType: safeText().max(50, { message: "must be at most 50 characters" }).optional(),
      capabilities: z.array(z.enum(TASK_TYPES, { message: `must be one of: ${TASK_TYPES.join(", ")}` })).max(TASK_TYPES.length * 2).optional(),
      maxConcurrency: z.number().int().min(0).max(MAX_CONCURRENCY_LIMIT).optional(),
    }),
    z.object({ type: z.literal("heartbeat") }),
    z.object({
      type: z.literal("task_complete"),
      taskId,
      result: boundedJsonObject(limits.resultMaxBytes, limits.jsonMaxDepth).default({}),
      attempt,
    }),
    z.object({
      type: z.literal("task_failed"),
      taskId,
      error: safeText().max(10_000, { message: "must be at most 10000 characters" }).default(""),
      retryable: z.boolean().optional(),
      attempt,
    }),
  ]);
}

export type AgentMessageParser = (input: unknown) => { ok: true; message: AgentMessage } | { ok: false; reason: string };

/**
 * Builds the agent-message validator for the configured limits. It returns
 * the message, or a readable reason naming the bad fields (snake_case, as
 * agents spell them).
 */
export function createAgentMessageParser(limits: Limits): AgentMessageParser {
  const schema = agentMessageSchema(limits);
  return (input) => {
    const parsed = schema.safeParse(input);
    if (parsed.success) return { ok: true, message: parsed.data as AgentMessage };
    const reason = violationsOf(parsed.error, "message", input)
      .map((v) => `${v.loc.slice(1).join(".") || "message"}: ${v.msg}`)
      .join("; ");
    return { ok: false, reason };
  };
}
