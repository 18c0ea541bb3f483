/**
 * Domain vocabulary for tasks. These lower-case strings are what the database
 * stores and what the legacy REST/WS contract speaks; the proto enums are
 * mapped to and from them at the transport edge only.
 */
export const TASK_TYPES = [
  "code",
  "research",
  "qa",
  "documentation",
  "analysis",
  "synthesis",
  "trading",
] as const;
export type TaskType = (typeof TASK_TYPES)[number];

export const TASK_STATUSES = ["pending", "assigned", "completed", "failed", "cancelled"] as const;
export type TaskStatus = (typeof TASK_STATUSES)[number];

export const MIN_PRIORITY = 0;
export const MAX_PRIORITY = 10;
export const DEFAULT_PRIORITY = 5;
export const DEFAULT_MAX_ATTEMPTS = 3;

/** A JSON object as stored in metadata and result columns. */
export type JsonObject = { [key: string]: JsonValue };
export type JsonValue = null | boolean | number | string | JsonValue[] | JsonObject;

/**
 * One task as the domain sees it. The database row is the source of truth;
 * `seq` is the task's place in line (assigned once at creation), so a task that
 * goes back to the queue keeps its original position among equal priorities.
 */
export interface TaskRecord {
  taskId: string;
  taskType: TaskType;
  description: string;
  priority: number;
  metadata: JsonObject;
  status: TaskStatus;
  agentId: string | null;
  attempt: number;
  maxAttempts: number;
  result: JsonObject | null;
  error: string | null;
  correlationId: string;
  seq: number;
  createdAt: Date;
  updatedAt: Date;
  assignedAt: Date | null;
  completedAt: Date | null;
  /** Attempts that ended in failure; retries stop when it reaches maxAttempts. */
  failedAttempts: number;
  /** Execution timeout for one attempt; null means the server default. */
  timeoutMs: number | null;
  /** When the holder's lease runs out unless its heartbeats renew it. */
  leaseExpiresAt: Date | null;
  /** A retry waiting out its backoff is queued once this time passes. */
  runAt: Date | null;
  idempotencyKey: string | null;
  /** Fingerprint of the create request, to tell a repeat from a conflicting reuse of its key. */
  requestHash: string | null;
}

export function isTaskType(value: unknown): value is TaskType {
  return typeof value === "string" && (TASK_TYPES as readonly string[]).includes(value);
}

export function isTaskStatus(value: unknown): value is TaskStatus {
  return typeof value === "string" && (TASK_STATUSES as readonly string[]).includes(value);
}
