import { raw } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/sql";
import type { AuditEntry, Lease, ListTasksFilter, NewTask, TaskRepository } from "../tasks/task-repository.js";
import {
  isTaskStatus,
  isTaskType,
  TASK_STATUSES,
  type JsonObject,
  type TaskRecord,
  type TaskStatus,
} from "../tasks/task-types.js";
import { AuditLog } from "./entities/audit-log.entity.js";
import { TaskStatusCount } from "./entities/task-status-count.entity.js";
import { Task } from "./entities/task.entity.js";
import { foldStatusCountsSql, insertTask, rowToState, STATE_PROPERTIES, tasksTable, updateTask, type AuditSpec, type TaskProperty, type TaskRow, type TaskValues, type TaskWriter } from "./task-sql.js";

/** What the repositories need from the ORM: a fresh EntityManager per call. */
export interface RepositoryDeps {
  fork(): EntityManager;
}

/** How many times `cancel` re-reads a task whose status changed under it before giving up. */
const CANCEL_RETRIES = 3;
/** Ids per statement of `getMany` and `getStates`. */
const GET_MANY_CHUNK = 500;

/** Reads by id in statements of GET_MANY_CHUNK ids: SQLite and PostgreSQL both cap a statement's parameters. */
async function inChunks<T>(taskIds: readonly string[], read: (ids: string[]) => Promise<T[]>): Promise<T[]> {
  const found: T[] = [];
  for (let i = 0; i < taskIds.length; i += GET_MANY_CHUNK) found.push(...(await read(taskIds.slice(i, i + GET_MANY_CHUNK))));
  return found;
}

function parseObject(text: string | null | undefined): JsonObject | null {
  if (text == null || text === "") return null;
  const value: unknown = JSON.parse(text);
  return value !== null && typeof value === "object" && !Array.isArray(value) ? (value as JsonObject) : null;
}

function toRecord(row: Task): TaskRecord {
  if (!isTaskType(row.taskType)) throw new Error(`task ${row.taskId} has unknown task_type "${row.taskType}"`);
  if (!isTaskStatus(row.status)) throw new Error(`task ${row.taskId} has unknown status "${row.status}"`);
  return {
    taskId: row.taskId,
    taskType: row.taskType,
    description: row.description,
    priority: row.priority,
    metadata: parseObject(row.metadataJson) ?? {},
    status: row.status,
    agentId: row.agentId ?? null,
    attempt: row.attempt,
    maxAttempts: row.maxAttempts,
    result: parseObject(row.resultJson),
    error: row.error ?? null,
    correlationId: row.correlationId,
    seq: Number(row.seq),
    createdAt: row.createdAt,
    updatedAt: row.updatedAt,
    assignedAt: row.assignedAt ?? null,
    completedAt: row.completedAt ?? null,
    failedAttempts: row.failedAttempts,
    timeoutMs: row.timeoutMs ?? null,
    leaseExpiresAt: row.leaseExpiresAt ?? null,
    runAt: row.runAt ?? null,
    idempotencyKey: row.idempotencyKey ?? null,
    requestHash: row.requestHash ?? null,
  };
}

/** Every column of a new, PENDING task. */
function newTaskValues(task: NewTask): Record<TaskProperty, unknown> {
  return {
    taskId: task.taskId,
    taskType: task.taskType,
    description: task.description,
    priority: task.priority,
    status: "pending",
    metadataJson: JSON.stringify(task.metadata),
    agentId: null,
    attempt: 0,
    maxAttempts: task.maxAttempts,
    resultJson: null,
    error: null,
    correlationId: task.correlationId,
    seq: task.seq,
    createdAt: task.createdAt,
    updatedAt: task.createdAt,
    assignedAt: null,
    completedAt: null,
    failedAttempts: 0,
    timeoutMs: task.timeoutMs,
    leaseExpiresAt: null,
    runAt: null,
    idempotencyKey: task.idempotencyKey,
    requestHash: task.requestHash,
  };
}

function auditSpec(audit: AuditEntry): AuditSpec {
  const spec: AuditSpec = { action: audit.action, fromStatus: audit.fromStatus, toStatus: audit.toStatus, agentId: audit.agentId, correlationId: audit.correlationId };
  if (audit.details) spec.details = audit.details;
  return spec;
}

/**
 * pending → assigned: the compare-and-set, the change and its audit row.
 * `attempt` is the new attempt number, or SQL computing it from the row.
 */
function assignment(
  { agentId, now, correlationId, leaseExpiresAt }: Lease,
  attempt: unknown = raw("attempt + 1"),
): { expected: TaskValues; set: TaskValues; audit: AuditSpec } {
  return {
    expected: { status: "pending" },
    set: { status: "assigned", agentId, attempt, assignedAt: now, updatedAt: now, leaseExpiresAt, runAt: null },
    audit: { action: "task.assigned", fromStatus: "pending", agentId, correlationId, withAttempt: true },
  };
}

/** The task as `insert` would have stored it, from the same task stored already leased. */
function asCreated(assigned: TaskRecord): TaskRecord {
  return { ...assigned, status: "pending", agentId: null, attempt: 0, updatedAt: assigned.createdAt, assignedAt: null, leaseExpiresAt: null };
}

/**
 * TaskRepository over MikroORM. Each state change is one set-based UPDATE whose
 * WHERE carries the expected state (the compare-and-set), written in the same
 * transaction as its audit row; 0 rows matched means another writer got there
 * first or the caller's view was stale, and nothing is written.
 *
 * `release` clears agent_id (a pending task has no holder; the audit row keeps
 * who released it) and keeps priority, seq and assigned_at. Terminal
 * transitions (complete, fail, cancel) set completed_at.
 */
export function createTaskRepository(deps: TaskWriter): TaskRepository {
  // Sweeper updates of many rows lock them in task id order and skip rows a
  // group commit in flight holds, so they can never deadlock with batched
  // writes (SQLite has a single writer and no row locks).
  const skipLocked = deps.dialect === "postgresql" ? " order by task_id for update skip locked" : "";

  /** Applies `set` to the task only if it still matches `expected`, with the audit row of the change. */
  function transition(taskId: string, expected: TaskValues, set: TaskValues, audit: AuditSpec): Promise<TaskRecord | null> {
    return updateTask(deps, taskId, expected, set, audit);
  }

  return {
    insert(task: NewTask, audit: AuditEntry): Promise<TaskRecord> {
      return insertTask(deps, newTaskValues(task), [auditSpec(audit)]);
    },

    async insertAssigned(task, audit, lease) {
      // Both audit rows take the row's updated_at as their time.
      if (lease.now.getTime() !== task.createdAt.getTime()) throw new RangeError("a task stored already leased is leased when it is created");
      // Born leased: one row version and one statement instead of an insert
      // and an update, with both changes in the audit trail.
      const { set, audit: leased } = assignment(lease, 1);
      const assigned = await insertTask(deps, { ...newTaskValues(task), ...set }, [auditSpec(audit), leased]);
      return { created: asCreated(assigned), assigned };
    },

    async deleteUnqueued(taskId: string): Promise<void> {
      await deps.fork().transactional(async (em) => {
        // Only a task that never left the queue's hands (attempt 0) may vanish without trace.
        const deleted = await em.nativeDelete(Task, { taskId, status: "pending", attempt: 0 });
        if (deleted > 0) await em.nativeDelete(AuditLog, { taskId });
      });
    },

    async get(taskId: string): Promise<TaskRecord | null> {
      const row = await deps.fork().findOne(Task, { taskId });
      return row ? toRecord(row) : null;
    },

    async getMany(taskIds) {
      const em = deps.fork();
      return inChunks(taskIds, async (ids) => (await em.find(Task, { taskId: { $in: ids } })).map(toRecord));
    },

    async getStates(taskIds) {
      const em = deps.fork();
      // Raw rows: hydrating entities cost most of the time of a re-read of 10,000 watched tasks.
      return inChunks(taskIds, async (ids) => {
        const rows: TaskRow[] = await em.createQueryBuilder(Task).select(STATE_PROPERTIES).where({ taskId: { $in: ids } }).execute("all", false);
        return rows.map(rowToState);
      });
    },

    async list(filter: ListTasksFilter): Promise<TaskRecord[]> {
      const { before } = filter;
      const rows = await deps.fork().find(
        Task,
        {
          ...(filter.status ? { status: filter.status } : {}),
          ...(filter.taskType ? { taskType: filter.taskType } : {}),
          ...(before
            ? {
                $or: [
                  { createdAt: { $lt: before.createdAt } },
                  { createdAt: before.createdAt, taskId: { $lt: before.taskId } },
                ],
              }
            : {}),
        },
        { orderBy: [{ createdAt: "desc" }, { taskId: "desc" }], limit: filter.limit },
      );
      return rows.map(toRecord);
    },

    assign(taskId, agentId, now, correlationId, leaseExpiresAt) {
      const { expected, set, audit } = assignment({ agentId, now, correlationId, leaseExpiresAt });
      return transition(taskId, expected, set, audit);
    },

    complete(taskId, agentId, attempt, result, now) {
      return transition(
        taskId,
        { status: "assigned", agentId, attempt },
        { status: "completed", resultJson: JSON.stringify(result), completedAt: now, updatedAt: now, leaseExpiresAt: null },
        { action: "task.completed", fromStatus: "assigned", agentId, correlationId: null, withAttempt: true },
      );
    },

    fail(taskId, agentId, attempt, error, now) {
      return transition(
        taskId,
        { status: "assigned", agentId, attempt },
        { status: "failed", error, completedAt: now, updatedAt: now, leaseExpiresAt: null, failedAttempts: raw("failed_attempts + 1") },
        { action: "task.failed", fromStatus: "assigned", agentId, correlationId: null, details: { error }, withAttempt: true },
      );
    },

    release(taskId, agentId, attempt, reason, now) {
      return transition(
        taskId,
        { status: "assigned", agentId, attempt },
        { status: "pending", agentId: null, updatedAt: now, leaseExpiresAt: null },
        { action: "task.requeued", fromStatus: "assigned", agentId, correlationId: null, details: { reason }, withAttempt: true },
      );
    },

    async cancel(taskId, now, correlationId) {
      // The audit row needs the status we cancelled from, so read it and make
      // it part of the compare-and-set; retry if it changed in between.
      for (let i = 0; i < CANCEL_RETRIES; i++) {
        const current = await deps.fork().findOne(Task, { taskId }, { fields: ["status", "agentId"] });
        const from: string | undefined = current?.status;
        if (from !== "pending" && from !== "assigned") return null;
        const holder = current?.agentId ?? null;
        const after = await transition(
          taskId,
          { status: from, agentId: holder },
          { status: "cancelled", completedAt: now, updatedAt: now, leaseExpiresAt: null, runAt: null },
          { action: "task.cancelled", fromStatus: from, agentId: holder, correlationId },
        );
        if (after) return after;
      }
      return null;
    },

    async listRunnable(now: Date): Promise<TaskRecord[]> {
      return deps.fork().transactional(async (em) => {
        // The queue's rebuild reads the whole backlog at once: however long
        // it is, the read must not end at the statement timeout, or nothing
        // could be dispatched until the backlog shrank.
        if (deps.dialect === "postgresql") await em.execute("set local statement_timeout = 0");
        const rows = await em.find(Task, { status: "pending", $or: [{ runAt: null }, { runAt: { $lte: now } }] }, { orderBy: [{ priority: "desc" }, { seq: "asc" }] });
        return rows.map(toRecord);
      });
    },

    async retryOrFail(taskId, agentId, attempt, error, now, retryAt) {
      // Whether this failure exhausts the attempts decides the new status, and
      // the audit row must say which: read the count, then make it part of the
      // compare-and-set so a concurrent change makes this a no-op.
      const current = await deps.fork().findOne(Task, { taskId, status: "assigned", agentId, attempt }, { fields: ["failedAttempts", "maxAttempts"] });
      if (!current) return null;
      const failedAttempts = current.failedAttempts + 1;
      const exhausted = failedAttempts >= current.maxAttempts;
      return transition(
        taskId,
        { status: "assigned", agentId, attempt, failedAttempts: current.failedAttempts },
        exhausted
          ? { status: "failed", error, failedAttempts, completedAt: now, updatedAt: now, leaseExpiresAt: null }
          : { status: "pending", error, failedAttempts, agentId: null, runAt: retryAt, updatedAt: now, leaseExpiresAt: null },
        {
          action: exhausted ? "task.failed" : "task.retry_scheduled",
          fromStatus: "assigned",
          agentId,
          correlationId: null,
          details: { error, failed_attempts: failedAttempts, ...(exhausted ? {} : { retry_at: retryAt.toISOString() }) },
          withAttempt: true,
        },
      );
    },

    retry(taskId, now, correlationId) {
      return transition(
        taskId,
        { status: "failed" },
        { status: "pending", failedAttempts: 0, agentId: null, runAt: null, completedAt: null, updatedAt: now },
        { action: "task.retried", fromStatus: "failed", agentId: null, correlationId },
      );
    },

    async renewLeases(held, leaseExpiresAt) {
      if (held.length === 0) return [];
      const leases = held.map(() => "(?, ?, cast(? as integer))").join(", ");
      const params = held.flatMap((h) => [h.taskId, h.agentId, h.attempt]);
      const em = deps.fork();
      const tasks = tasksTable(em);
      const rows = await em.execute<Array<{ task_id: string }>>(
        `update ${tasks} set lease_expires_at = ? where task_id in (select task_id from ${tasks} where status = 'assigned' and (task_id, agent_id, attempt) in (values ${leases})${skipLocked}) returning task_id`,
        [leaseExpiresAt, ...params],
        "all",
      );
      return rows.map((r) => r.task_id);
    },

    async listExpiredLeases(now, limit) {
      const rows = await deps
        .fork()
        .find(Task, { status: "assigned", leaseExpiresAt: { $lt: now } }, { orderBy: { leaseExpiresAt: "asc" }, limit });
      return rows.map(toRecord);
    },

    async listDueRetries(now, limit) {
      const rows = await deps
        .fork()
        .find(Task, { status: "pending", runAt: { $lte: now } }, { orderBy: [{ priority: "desc" }, { seq: "asc" }], limit });
      return rows.map(toRecord);
    },

    async queueLater(taskId, at) {
      await deps.fork().nativeUpdate(Task, { taskId, status: "pending", runAt: null }, { runAt: at });
    },

    async markQueued(taskIds) {
      if (taskIds.length === 0) return;
      // A row locked by a write in flight is skipped: the next sweep finds it
      // still due, queues it again (a no-op) and marks it then.
      const em = deps.fork();
      const tasks = tasksTable(em);
      await em.execute(
        `update ${tasks} set run_at = null where task_id in (select task_id from ${tasks} where status = 'pending' and task_id in (${taskIds.map(() => "?").join(", ")})${skipLocked})`,
        [...taskIds],
        "run",
      );
    },

    async findByIdempotencyKey(key) {
      const row = await deps.fork().findOne(Task, { idempotencyKey: key });
      return row ? toRecord(row) : null;
    },

    async releaseIdempotencyKey(taskId, key) {
      await deps.fork().nativeUpdate(Task, { taskId, idempotencyKey: key }, { idempotencyKey: null });
    },

    async deleteFinishedBefore(cutoff, limit, from) {
      return deps.fork().transactional(async (em) => {
        // Oldest first along the listing index; a task may finish long after
        // it was created, so both times must be past the cutoff. Locking the
        // rows (PostgreSQL) keeps an operator's retry of a failed task from
        // reviving one being deleted, and lets instances prune side by side.
        const rows: Array<{ task_id: string; created_at: Date | number | string }> = await em.execute(
          `select task_id, created_at from ${tasksTable(em)} where created_at >= ? and created_at < ? and completed_at < ? and status in ('completed', 'failed', 'cancelled') order by created_at limit ?${deps.dialect === "postgresql" ? " for update skip locked" : ""}`,
          [from ?? new Date(0), cutoff, cutoff, limit],
        );
        if (rows.length === 0) return { deleted: 0, last: undefined };
        const taskIds = rows.map((r) => r.task_id);
        await em.nativeDelete(AuditLog, { taskId: { $in: taskIds } });
        const deleted = await em.nativeDelete(Task, { taskId: { $in: taskIds } });
        return { deleted, last: new Date(rows[rows.length - 1]!.created_at) };
      });
    },

    async listAssigned(): Promise<TaskRecord[]> {
      const rows = await deps.fork().find(Task, { status: "assigned" }, { orderBy: { seq: "asc" } });
      return rows.map(toRecord);
    },

    async maxSeq(): Promise<number> {
      const [row] = await deps.fork().find(Task, {}, { orderBy: { seq: "desc" }, fields: ["seq"], limit: 1 });
      return row ? Number(row.seq) : 0;
    },

    async countByStatus(): Promise<Record<TaskStatus, number>> {
      // Kept by triggers on tasks (see the StatusCounts migrations): a few rows, whatever the history.
      const rows: Array<{ status: string; n: number | string }> = await deps
        .fork()
        .createQueryBuilder(TaskStatusCount)
        .select(["status", raw("sum(n) as n")])
        .groupBy("status")
        .execute("all", false);
      const counts = Object.fromEntries(TASK_STATUSES.map((s) => [s, 0])) as Record<TaskStatus, number>;
      for (const row of rows) {
        if (isTaskStatus(row.status)) counts[row.status] = Number(row.n);
      }
      return counts;
    },

    async foldStatusCounts(): Promise<void> {
      if (deps.dialect !== "postgresql") return;
      const em = deps.fork();
      await em.execute(foldStatusCountsSql(em));
    },

    async countAssignedByAgent(): Promise<Map<string, number>> {
      const rows: Array<{ agent_id: string | null; n: number | string }> = await deps
        .fork()
        .createQueryBuilder(Task)
        .select(["agentId", raw("count(*) as n")])
        .where({ status: "assigned" })
        .groupBy("agentId")
        .execute("all", false);
      return new Map(rows.filter((r) => r.agent_id).map((r) => [r.agent_id!, Number(r.n)]));
    },

    async countRetryWaiting(): Promise<number> {
      return deps.fork().count(Task, { status: "pending", runAt: { $ne: null } });
    },

    async countCompletedSince(since: Date): Promise<number> {
      return deps.fork().count(Task, { status: "completed", completedAt: { $gte: since } });
    },

    async auditTrail(taskId: string): Promise<Array<AuditEntry & { createdAt: Date }>> {
      const rows = await deps
        .fork()
        .find(AuditLog, { taskId }, { orderBy: [{ createdAt: "asc" }, { logId: "asc" }] });
      return rows.map((row) => {
        const entry: AuditEntry & { createdAt: Date } = {
          action: row.action,
          fromStatus: isTaskStatus(row.fromStatus) ? row.fromStatus : null,
          toStatus: isTaskStatus(row.toStatus) ? row.toStatus : "pending",
          agentId: row.agentId ?? null,
          correlationId: row.correlationId ?? null,
          createdAt: row.createdAt,
        };
        const details = parseObject(row.detailsJson);
        if (details) entry.details = details;
        return entry;
      });
    },
  };
}
