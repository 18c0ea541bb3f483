import type { TaskState } from "../../src/tasks/task-events.js";
import type { TaskRecord } from "../../src/tasks/task-types.js";

/** A complete task record for tests of logic over records: a pending task, with `over` applied. */
export function taskRecord(over: Partial<TaskRecord> = {}): TaskRecord {
  return {
    taskId: "01a20d30-9f26-7000-9f2b-34598c713c08",
    taskType: "qa",
    description: "fixed at creation",
    priority: 5,
    metadata: { fixed: "at creation" },
    status: "pending",
    agentId: null,
    attempt: 0,
    maxAttempts: 3,
    result: null,
    error: null,
    correlationId: "corr-1",
    seq: 17,
    createdAt: new Date(1_700_000_000_000),
    updatedAt: new Date(1_700_000_000_000),
    assignedAt: null,
    completedAt: null,
    failedAttempts: 0,
    timeoutMs: null,
    leaseExpiresAt: null,
    runAt: null,
    idempotencyKey: null,
    requestHash: null,
    ...over,
  };
}

/** What a task change from another instance carries: the record less its fields fixed at creation. */
export function stateOf({ description: _description, metadata: _metadata, ...state }: TaskRecord): TaskState {
  return state;
}
