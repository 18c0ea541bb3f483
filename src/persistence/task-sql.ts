import { isRaw } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/sql";
import { isTaskStatus, isTaskType, type JsonObject, type TaskRecord, type TaskStatus } from "../tasks/task-types.js";
import { uuidv7 } from "../ids.js";
import { AuditLog } from "./entities/audit-log.entity.js";
import { Task } from "./entities/task.entity.js";

/**
 * Hand-written SQL for the hot write paths (state transitions and inserts),
 * written with `?` placeholders and sent through the group commit: on
 * PostgreSQL with the values inlined by the ORM's own formatter, on SQLite
 * through the ORM inside the batch's transaction. It skips the ORM's query
 * building, entity hydration and identity map, which cost more CPU than the
 * database round trips themselves. Column names are those of the migrations;
 * `rowToRecord` maps a raw row in either dialect's value format.
 */

/** Task property → column, as created by the migrations. */
export const TASK_COLUMNS = {
  taskId: "task_id",
  taskType: "task_type",
  description: "description",
  priority: "priority",
  status: "status",
  metadataJson: "metadata_json",
  agentId: "agent_id",
  attempt: "attempt",
  maxAttempts: "max_attempts",
  resultJson: "result_json",
  error: "error",
  correlationId: "correlation_id",
  seq: "seq",
  createdAt: "created_at",
  updatedAt: "updated_at",
  assignedAt: "assigned_at",
  completedAt: "completed_at",
  failedAttempts: "failed_attempts",
  timeoutMs: "timeout_ms",
  leaseExpiresAt: "lease_expires_at",
  runAt: "run_at",
  idempotencyKey: "idempotency_key",
  requestHash: "request_hash",
} as const;

export type TaskProperty = keyof typeof TASK_COLUMNS;
/** Column values by property; a value may be a `raw(...)` SQL expression such as `raw("attempt + 1")`. */
export type TaskValues = Partial<Record<TaskProperty, unknown>>;

const AUDIT_COLUMNS = [
  "log_id",
  "task_id",
  "agent_id",
  "action",
  "from_status",
  "to_status",
  "correlation_id",
  "details_json",
  "created_at",
] as const;

/** A raw row as the driver returns it: snake_case columns, dialect-specific values. */
export type TaskRow = Record<string, unknown>;

/**
 * How task writes reach the database, both group-committed (group-commit.ts):
 * on PostgreSQL as single statements (`batch` takes SQL with `?`
 * placeholders and its params), on SQLite as short units of work sharing one
 * transaction (`transact`).
 */
export type TaskWriter =
  | { dialect: "sqlite"; fork(): EntityManager; transact<T>(work: (em: EntityManager) => Promise<T>): Promise<T> }
  | { dialect: "postgresql"; fork(): EntityManager; batch(sql: string, params: unknown[], taskId: string): Promise<TaskRow[]> };

function parseObject(text: unknown): JsonObject | null {
  if (text == null || text === "") return null;
  const value: unknown = JSON.parse(String(text));
  return value !== null && typeof value === "object" && !Array.isArray(value) ? (value as JsonObject) : null;
}

/**
 * SQLite keeps datetimes as epoch-millisecond integers; PostgreSQL's
 * timestamptz comes back as a string with its offset (the ORM's type parsers
 * keep it raw) or as a Date. Mirrors the ORM's own hydration.
 */
function toDate(value: unknown): Date | null {
  if (value == null) return null;
  if (value instanceof Date) return value;
  if (typeof value === "number" || typeof value === "bigint") return new Date(Number(value));
  return new Date(String(value));
}

function toRequiredDate(value: unknown, column: string, taskId: string): Date {
  const date = toDate(value);
  if (!date) throw new Error(`task ${taskId} has no ${column}`);
  return date;
}

function toNumberOrNull(value: unknown): number | null {
  return value == null ? null : Number(value);
}

function toStringOrNull(value: unknown): string | null {
  return value == null ? null : String(value);
}

/** A raw `tasks` row (e.g. from RETURNING *) as a TaskRecord. */
export function rowToRecord(row: TaskRow): TaskRecord {
  const taskId = String(row.task_id);
  const taskType = row.task_type;
  const status = row.status;
  if (typeof taskType !== "string" || !isTaskType(taskType)) throw new Error(`task ${taskId} has unknown task_type "${String(taskType)}"`);
  if (typeof status !== "string" || !isTaskStatus(status)) throw new Error(`task ${taskId} has unknown status "${String(status)}"`);
  return {
    taskId,
    taskType,
    description: String(row.description),
    priority: Number(row.priority),
    metadata: parseObject(row.metadata_json) ?? {},
    status,
    agentId: toStringOrNull(row.agent_id),
    attempt: Number(row.attempt),
    maxAttempts: Number(row.max_attempts),
    result: parseObject(row.result_json),
    error: toStringOrNull(row.error),
    correlationId: String(row.correlation_id),
    seq: Number(row.seq),
    createdAt: toRequiredDate(row.created_at, "created_at", taskId),
    updatedAt: toRequiredDate(row.updated_at, "updated_at", taskId),
    assignedAt: toDate(row.assigned_at),
    completedAt: toDate(row.completed_at),
    failedAttempts: Number(row.failed_attempts),
    timeoutMs: toNumberOrNull(row.timeout_ms),
    leaseExpiresAt: toDate(row.lease_expires_at),
    runAt: toDate(row.run_at),
    idempotencyKey: toStringOrNull(row.idempotency_key),
    requestHash: toStringOrNull(row.request_hash),
  };
}

/**
 * What the audit row of a change says. The task as it is after the change
 * fills in the rest: its id, its new status, its correlation id when none is
 * given, its attempt when `withAttempt` is set, and its updated_at as the time.
 */
export interface AuditSpec {
  action: string;
  fromStatus: TaskStatus | null;
  agentId: string | null;
  /** null: the task's own correlation id. */
  correlationId: string | null;
  details?: JsonObject;
  /** Adds `attempt` (the task's, after the change) to details. */
  withAttempt?: boolean;
}

interface Tables {
  tasks: string;
  quote(column: string): string;
  auditLogs: string;
  insertAuditSql: string;
}

let cachedTables: WeakMap<object, Tables> | undefined;

/** Quoted, schema-qualified table names for this ORM instance (cached per platform). */
function tables(em: EntityManager): Tables {
  const platform = em.getPlatform();
  cachedTables ??= new WeakMap();
  let found = cachedTables.get(platform);
  if (!found) {
    const quote = (id: string) => platform.quoteIdentifier(id);
    const qualify = (meta: { schema?: string; tableName: string }) => {
      const schema = meta.schema && meta.schema !== "*" ? meta.schema : em.config.getSchema(true);
      const table = quote(meta.tableName);
      return schema && schema !== platform.getDefaultSchemaName() ? `${quote(schema)}.${table}` : table;
    };
    const metadata = em.getMetadata();
    const auditLogs = qualify(metadata.find(AuditLog)!);
    found = {
      tasks: qualify(metadata.find(Task)!),
      quote,
      auditLogs,
      insertAuditSql: `insert into ${auditLogs} (${AUDIT_COLUMNS.map((c) => quote(c)).join(", ")}) values (${AUDIT_COLUMNS.map(() => "?").join(", ")})`,
    };
    cachedTables.set(platform, found);
  }
  return found;
}

/** The quoted, schema-qualified `tasks` table, for hand-written statements elsewhere. */
export function tasksTable(em: EntityManager): string {
  return tables(em).tasks;
}

/** `value` as SQL: a raw() fragment stays an expression (with its own params), anything else becomes a `?`. */
function valueSql(value: unknown, params: unknown[]): string {
  if (isRaw(value)) {
    params.push(...value.params);
    return value.sql;
  }
  params.push(value);
  return "?";
}

/** The audit row for `spec` as JSON-ready values, completed from the task after the change. */
function auditValues(spec: AuditSpec, after: TaskRecord): unknown[] {
  const details = spec.withAttempt ? { attempt: after.attempt, ...spec.details } : spec.details;
  return [
    uuidv7(),
    after.taskId,
    spec.agentId,
    spec.action,
    spec.fromStatus,
    after.status,
    spec.correlationId ?? after.correlationId,
    details === undefined ? null : JSON.stringify(details),
    after.updatedAt,
  ];
}

/**
 * Runs `statement` (an INSERT or UPDATE on tasks ending in `returning *`)
 * and writes the audit row of the change with it, atomically. On PostgreSQL
 * that is ONE statement: the audit INSERT reads the changed row from a
 * data-modifying CTE, so a change costs one round trip and one commit instead
 * of four round trips (BEGIN, UPDATE, INSERT, COMMIT); socket writes to the
 * database were the largest single cost in the service's CPU profile.
 * SQLite has no DML in CTEs, so there the two statements are a unit of work
 * committed with whatever other units arrived meanwhile.
 */
async function withAudit(
  db: TaskWriter,
  em: EntityManager,
  taskId: string,
  statement: string,
  params: unknown[],
  audit: AuditSpec,
): Promise<TaskRecord | null> {
  const t = tables(em);
  if (db.dialect === "postgresql") {
    const q = t.quote;
    const details = audit.withAttempt
      ? `cast(cast(? as jsonb) || jsonb_build_object('attempt', t.${q("attempt")}) as text)`
      : "?";
    const sql =
      `with t as (${statement}), a as (insert into ${t.auditLogs} (${AUDIT_COLUMNS.map((c) => q(c)).join(", ")}) ` +
      `select ?, t.${q("task_id")}, ?, ?, ?, t.${q("status")}, coalesce(?, t.${q("correlation_id")}), ${details}, t.${q("updated_at")} from t) ` +
      "select * from t";
    const detailsParam = audit.withAttempt ? JSON.stringify(audit.details ?? {}) : audit.details === undefined ? null : JSON.stringify(audit.details);
    const rows = await db.batch(sql, [...params, uuidv7(), audit.agentId, audit.action, audit.fromStatus, audit.correlationId, detailsParam], taskId);
    return rows[0] ? rowToRecord(rows[0]) : null;
  }
  return db.transact(async (tx) => {
    const rows = await tx.execute<TaskRow[]>(statement, params, "all");
    if (!rows[0]) return null;
    const after = rowToRecord(rows[0]);
    await tx.execute(t.insertAuditSql, auditValues(audit, after), "run");
    return after;
  });
}

/**
 * `UPDATE tasks SET … WHERE task_id = ? AND <expected> RETURNING *` with its
 * audit row: the compare-and-set, the re-read and the audit in one go. A null
 * in `expected` means IS NULL. Returns the changed task, or null when nothing
 * matched (and then nothing is written).
 */
export async function updateTask(
  db: TaskWriter,
  taskId: string,
  expected: TaskValues,
  set: TaskValues,
  audit: AuditSpec,
): Promise<TaskRecord | null> {
  const em = db.fork();
  const t = tables(em);
  const params: unknown[] = [];
  const assignments: string[] = [];
  for (const [key, value] of Object.entries(set)) {
    if (value === undefined) continue;
    assignments.push(`${t.quote(TASK_COLUMNS[key as TaskProperty])} = ${valueSql(value, params)}`);
  }
  const conditions = [`${t.quote("task_id")} = ?`];
  params.push(taskId);
  for (const [key, value] of Object.entries(expected)) {
    if (value === undefined) continue;
    const column = t.quote(TASK_COLUMNS[key as TaskProperty]);
    if (value === null) {
      conditions.push(`${column} is null`);
    } else {
      conditions.push(`${column} = ${valueSql(value, params)}`);
    }
  }
  const sql = `update ${t.tasks} set ${assignments.join(", ")} where ${conditions.join(" and ")} returning *`;
  return withAudit(db, em, taskId, sql, params, audit);
}

/** `INSERT INTO tasks (…) VALUES (…) RETURNING *` with every column given, and its audit row. */
export async function insertTask(db: TaskWriter, values: Record<TaskProperty, unknown>, audit: AuditSpec): Promise<TaskRecord> {
  const em = db.fork();
  const t = tables(em);
  const columns: string[] = [];
  const placeholders: string[] = [];
  const params: unknown[] = [];
  for (const [key, value] of Object.entries(values)) {
    columns.push(t.quote(TASK_COLUMNS[key as TaskProperty]));
    placeholders.push(valueSql(value === undefined ? null : value, params));
  }
  const sql = `insert into ${t.tasks} (${columns.join(", ")}) values (${placeholders.join(", ")}) returning *`;
  const record = await withAudit(db, em, String(values.taskId), sql, params, audit);
  if (!record) throw new Error("insert into tasks returned no row");
  return record;
}
