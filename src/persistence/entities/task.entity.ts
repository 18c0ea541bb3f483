import { defineEntity, p } from "@mikro-orm/core";

/**
 * `tasks`: the seed's columns (task_id … updated_at) plus the lease and result
 * fields the orchestrator needs. JSON lives in text columns so SQLite and
 * PostgreSQL store and compare it the same way.
 */
export const TaskSchema = defineEntity({
  name: "Task",
  tableName: "tasks",
  properties: {
    taskId: p.string().length(36).primary(),
    taskType: p.string().length(50),
    description: p.text(),
    priority: p.integer().default(5),
    status: p.string().length(20).default("pending"),
    metadataJson: p.text().nullable(),
    agentId: p.string().length(128).nullable(),
    attempt: p.integer().default(0),
    maxAttempts: p.integer().default(3),
    resultJson: p.text().nullable(),
    error: p.text().nullable(),
    correlationId: p.string().length(128),
    // Place in line, fixed at creation so a requeued task keeps its position.
    seq: p.bigint("number").index("tasks_seq_index"),
    createdAt: p.datetime(3),
    updatedAt: p.datetime(3),
    assignedAt: p.datetime(3).nullable(),
    completedAt: p.datetime(3).nullable(),
    // Attempts that ended in failure (reported, lost agent, expired lease or
    // timeout); `attempt` also counts clean hand-backs, so it is the fencing
    // token while this decides when retries are exhausted.
    failedAttempts: p.integer().default(0),
    // Per-task execution timeout; null means the server default.
    timeoutMs: p.integer().nullable(),
    // The holder's lease; renewed by its heartbeats, expired by lost holders.
    leaseExpiresAt: p.datetime(3).nullable(),
    // A retry waiting for its backoff; the task is queued once this passes.
    runAt: p.datetime(3).nullable(),
    idempotencyKey: p.string().length(200).nullable(),
    requestHash: p.string().length(64).nullable(),
  },
  // Partial where a lookup names the state: a state change then adds entries
  // only to the indexes of the state the task enters (see the migrations).
  indexes: [
    {
      name: "tasks_runnable_index",
      columns: [{ name: "priority", sort: "DESC" }, { name: "seq" }],
      where: { status: "pending" },
    },
    {
      name: "tasks_listing_index",
      columns: [{ name: "created_at", sort: "DESC" }, { name: "task_id" }],
    },
    { name: "tasks_lease_index", properties: ["leaseExpiresAt"], where: { status: "assigned" } },
    { name: "tasks_holder_index", properties: ["agentId", "taskId"], where: { status: "assigned" } },
    { name: "tasks_run_at_index", properties: ["runAt"], where: { status: "pending", runAt: { $ne: null } } },
    // The metrics' completions of the last minute, without walking the whole history.
    { name: "tasks_completed_index", properties: ["completedAt"], where: { status: "completed" } },
  ],
  uniques: [{ name: "tasks_idempotency_key_unique", properties: ["idempotencyKey"], where: { idempotencyKey: { $ne: null } } }],
});

export class Task extends TaskSchema.class {}
TaskSchema.setClass(Task);
