import { isRaw } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/sql";
import { CompiledQuery } from "kysely";
import type { TaskState } from "../tasks/task-events.js";
import { isTaskStatus, isTaskType, type JsonObject, type TaskRecord, type TaskStatus } from "../tasks/task-types.js";
import { uuidv7 } from "../ids.js";
import { AuditLog } from "./entities/audit-log.entity.js";
import { TaskStatusCount } from "./entities/task-status-count.entity.js";
import { Task } from "./entities/task.entity.js";
import type { SetTemplate } from "./statement-batcher.js";

/**
 * Hand-written SQL for the hot write paths (state transitions and inserts).
 * It skips the ORM's query building, entity hydration and identity map,
 * which cost more CPU than the database round trips themselves. Every write
 * goes through a group commit. On PostgreSQL each kind of change is a
 * set-based `SetTemplate` over arrays of values: the changes of one batch
 * that have the same shape become ONE statement, parsed and planned once.
 * On SQLite a change is a short unit of work with bound `?` placeholders
 * inside the batch's transaction, each shape compiled once. Column names
 * are those of the migrations; `rowToRecord` maps a raw row in either
 * dialect's value format.
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
 * on PostgreSQL as one input row of a set-based template (`batch`, see
 * statement-batcher.ts), on SQLite as short units of work sharing one
 * transaction (`transact`).
 */
export type TaskWriter =
  | {
      dialect: "sqlite";
      fork(): EntityManager;
      transact<T>(work: (em: EntityManager) => Promise<T>): Promise<T>;
    }
  | {
      dialect: "postgresql";
      fork(): EntityManager;
      batch(template: SetTemplate, row: unknown[], taskId: string): Promise<TaskRow[]>;
    };

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
  // Completed in place: this runs for every write on the hot path.
  const record = rowToState(row) as TaskRecord;
  record.description = String(row.description);
  record.metadata = parseObject(row.metadata_json) ?? {};
  return record;
}

/** The properties of a `TaskState`: every column but the two a task is created with and that can be large. */
export const STATE_PROPERTIES = (Object.keys(TASK_COLUMNS) as TaskProperty[]).filter((p) => p !== "description" && p !== "metadataJson");

/** A raw `tasks` row, with or without `description` and `metadata_json`, as a TaskState. */
export function rowToState(row: TaskRow): TaskState {
  const taskId = String(row.task_id);
  const taskType = row.task_type;
  const status = row.status;
  if (typeof taskType !== "string" || !isTaskType(taskType)) throw new Error(`task ${taskId} has unknown task_type "${String(taskType)}"`);
  if (typeof status !== "string" || !isTaskStatus(status)) throw new Error(`task ${taskId} has unknown status "${String(status)}"`);
  return {
    taskId,
    taskType,
    priority: Number(row.priority),
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
  /** The status the row records; by default the task's after the change. Set when one statement makes two changes (`insertTask`). */
  toStatus?: TaskStatus;
}

interface Tables {
  tasks: string;
  statusCounts: string;
  quote(column: string): string;
  auditLogs: string;
  insertAuditSql: string;
  /** PostgreSQL set-based templates by shape (see `templateKey`). */
  templates: Map<string, SetTemplate>;
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
      statusCounts: qualify(metadata.find(TaskStatusCount)!),
      quote,
      auditLogs,
      insertAuditSql: `insert into ${auditLogs} (${AUDIT_COLUMNS.map((c) => quote(c)).join(", ")}) values (${AUDIT_COLUMNS.map(() => "?").join(", ")})`,
      templates: new Map(),
    };
    cachedTables.set(platform, found);
  }
  return found;
}

const tablesByWriter = new WeakMap<TaskWriter, Tables>();

/** `tables` for a writer, without forking an EntityManager on every write. */
function tablesOf(db: TaskWriter): Tables {
  let found = tablesByWriter.get(db);
  if (!found) {
    found = tables(db.fork());
    tablesByWriter.set(db, found);
  }
  return found;
}

/** The quoted, schema-qualified `tasks` table, for hand-written statements elsewhere. */
export function tasksTable(em: EntityManager): string {
  return tables(em).tasks;
}

/**
 * Folds the count rows of PostgreSQL sessions that have ended into slot 0
 * (see the TaskStatusCount entity), so the rows read for the counts stay few
 * however many connections came and went. The totals never change: a
 * session that reuses an ended one's pid while this runs either wrote first
 * (its change is folded with the rest) or waits and writes a fresh row. A
 * row locked by a writer (a pid already reused) or by another instance's
 * fold is skipped, left for the next fold, so a fold never waits and never
 * deadlocks; writers never touch slot 0.
 */
export function foldStatusCountsSql(em: EntityManager): string {
  const t = tables(em).statusCounts;
  return `with doomed as (select slot, status from ${t} where slot <> 0 and slot not in (select pid from pg_stat_activity where pid is not null) order by slot, status for update skip locked),
gone as (delete from ${t} c using doomed where c.slot = doomed.slot and c.status = doomed.status returning c.status, c.n)
insert into ${t} as c (slot, status, n) select 0, status, sum(n) from gone group by status order by status
on conflict (slot, status) do update set n = c.n + excluded.n`;
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
    spec.toStatus ?? after.status,
    spec.correlationId ?? after.correlationId,
    details === undefined ? null : JSON.stringify(details),
    after.updatedAt,
  ];
}

/** PostgreSQL element types of the task columns, for the arrays of set-based statements. */
type ArrayType = "text" | "int4" | "int8" | "timestamptz";

const TASK_COLUMN_TYPES: Record<TaskProperty, ArrayType> = {
  taskId: "text",
  taskType: "text",
  description: "text",
  priority: "int4",
  status: "text",
  metadataJson: "text",
  agentId: "text",
  attempt: "int4",
  maxAttempts: "int4",
  resultJson: "text",
  error: "text",
  correlationId: "text",
  seq: "int8",
  createdAt: "timestamptz",
  updatedAt: "timestamptz",
  assignedAt: "timestamptz",
  completedAt: "timestamptz",
  failedAttempts: "int4",
  timeoutMs: "int4",
  leaseExpiresAt: "timestamptz",
  runAt: "timestamptz",
  idempotencyKey: "text",
  requestHash: "text",
};

/**
 * Both escapings of a character inside a double-quoted element of an array
 * constant written as an E'' string: the array's (`\` and `"` take a `\`),
 * then the string's (`\` and `'` are doubled).
 */
const ESCAPED: Record<string, string> = { "\\": "\\\\\\\\", '"': '\\\\"', "'": "''" };

function arrayElement(value: unknown): string {
  if (value === null || value === undefined) return "NULL";
  let text: string;
  if (value instanceof Date) text = value.toISOString();
  else if (typeof value === "string") text = value;
  else if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new TypeError(`cannot store the number ${value}`);
    text = String(value);
  } else if (typeof value === "bigint" || typeof value === "boolean") text = String(value);
  else throw new TypeError(`cannot store a ${typeof value} in a task column`);
  // Most values (ids, dates, numbers, plain words) need no escaping: skip the replace.
  return `"${/[\\"']/.test(text) ? text.replace(/[\\"']/g, (c) => ESCAPED[c]!) : text}"`;
}

/**
 * `values` as a typed PostgreSQL array constant, e.g. `E'{"a",NULL}'::text[]`.
 * Elements are double-quoted and escaped for the array syntax and for the
 * E'' string at once (see `ESCAPED`), so the text means the same whatever
 * `standard_conforming_strings` says. It is built on the hot path of every
 * batched write, hence the single pass.
 */
export function pgArray(values: readonly unknown[], type: ArrayType): string {
  return `E'{${values.map(arrayElement).join(",")}}'::${type}[]`;
}

/**
 * The statement that locks these tasks' rows in task id order; a batch runs
 * it before set-based statements that change several rows (see
 * statement-batcher.ts).
 */
export function lockTasksSql(em: EntityManager): (taskIds: string[]) => string {
  const t = tables(em);
  const id = t.quote("task_id");
  // Byte order (collate "C"), the order in which the batcher sorts keys too.
  return (taskIds) => `select 1 from ${t.tasks} where ${id} = any(${pgArray(taskIds, "text")}) order by ${id} collate "C" for update`;
}

/**
 * The input columns of each audit row a template writes, after the task id
 * `k`: the audit row's own id, agent, action, from-status, to-status (null:
 * the task's), correlation id (null: the task's own) and details (JSON text).
 */
const AUDIT_INPUT = ["log", "agent", "action", "from", "to", "corr", "details"] as const;

/** The input row's leading columns: `k`, then AUDIT_INPUT for each audit row in turn. */
function auditInput(taskId: string, audits: readonly AuditSpec[]): unknown[] {
  const row: unknown[] = [taskId];
  for (const audit of audits) {
    const details = audit.withAttempt ? JSON.stringify(audit.details ?? {}) : audit.details === undefined ? null : JSON.stringify(audit.details);
    row.push(uuidv7(), audit.agentId, audit.action, audit.fromStatus, audit.toStatus ?? null, audit.correlationId, details);
  }
  return row;
}

/** Input columns before the values: k and those of the audit rows. */
const valuesFrom = (audits: readonly AuditSpec[]) => 1 + AUDIT_INPUT.length * audits.length;

/** The part of a template's shape its audit rows decide. */
const auditShape = (audits: readonly AuditSpec[]) => audits.map((a) => (a.withAttempt ? "a" : "-")).join("");

/** Column n of a template's input row, as SQL: `i.<name>` in the set-based form, `$<n+1>::<type>` in the one-row form. */
type InputRef = (n: number) => string;

let templateNames = 0;

/**
 * A statement over input rows `(k, <audit columns>…, v0, v1, …)`: `body` (an
 * INSERT or UPDATE on tasks, `returning` the whole row) with its audit rows
 * (one per entry of `withAttempt`, usually one) in the same statement, read
 * from the data-modifying CTE. Rendered set-based for a batch (input from
 * arrays; one statement, one plan, however many changes) and as a named
 * prepared statement for a lone change, which PostgreSQL parses and plans
 * once per connection.
 */
function setTemplate(
  t: Tables,
  key: string,
  valueTypes: ArrayType[],
  body: (ref: InputRef, from: string) => string,
  withAttempt: readonly boolean[],
  locks: boolean,
): SetTemplate {
  const q = t.quote;
  const names = ["k", ...withAttempt.flatMap((_, j) => AUDIT_INPUT.map((c) => `a${j}_${c}`)), ...valueTypes.map((_, n) => `v${n}`)];
  const types: ArrayType[] = ["text", ...withAttempt.flatMap(() => AUDIT_INPUT.map(() => "text" as const)), ...valueTypes];
  const audit = (ref: InputRef, from: string) => {
    const selects = withAttempt.map((attempt, j) => {
      const col = (c: number) => ref(1 + AUDIT_INPUT.length * j + c);
      const details = attempt ? `cast(cast(${col(6)} as jsonb) || jsonb_build_object('attempt', t.${q("attempt")}) as text)` : col(6);
      return (
        `select ${col(0)}, t.${q("task_id")}, ${col(1)}, ${col(2)}, ${col(3)}, coalesce(${col(4)}, t.${q("status")}), ` +
        `coalesce(${col(5)}, t.${q("correlation_id")}), ${details}, t.${q("updated_at")} ${from}`
      );
    });
    return `insert into ${t.auditLogs} (${AUDIT_COLUMNS.map((c) => q(c)).join(", ")}) ${selects.join(" union all ")}`;
  };
  const setRef: InputRef = (n) => `i.${names[n]}`;
  const setBody = body(setRef, " from i");
  const setAudit = audit(setRef, `from t join i on i.k = t.${q("task_id")}`);
  const oneRef: InputRef = (n) => `$${n + 1}::${types[n]}`;
  return {
    key,
    keyColumn: "task_id",
    locks,
    prepared: { name: `aaos_task_${++templateNames}`, text: `with t as (${body(oneRef, "")}), a as (${audit(oneRef, `from t where t.${q("task_id")} = ${oneRef(0)}`)}) select * from t` },
    render(rows) {
      const arrays = types.map((type, c) => pgArray(rows.map((row) => row[c]), type));
      return `with i as (select * from unnest(${arrays.join(", ")}) as u(${names.join(", ")})), t as (${setBody}), a as (${setAudit}) select * from t`;
    },
  };
}

function rawSql(value: unknown): string | undefined {
  if (!isRaw(value)) return undefined;
  // Templates are shared by every change of one shape; values belong in the input rows.
  if (value.params.length > 0) throw new Error(`raw SQL with parameters cannot be part of a statement template: ${value.sql}`);
  return value.sql;
}

/**
 * The task columns by name, not `*`: a prepared statement whose result
 * columns change (a later migration adding one, applied while this instance
 * runs) fails with "cached plan must not change result type" on every
 * execution until it is prepared again.
 */
function returning(t: Tables, alias: string): string {
  return Object.values(TASK_COLUMNS)
    .map((column) => alias + t.quote(column))
    .join(", ");
}

/** The PostgreSQL template and input row for an UPDATE of one task (see `updateTask`). */
function updateStatement(t: Tables, taskId: string, expected: TaskValues, set: TaskValues, audit: AuditSpec): { template: SetTemplate; row: unknown[] } {
  const row = auditInput(taskId, [audit]);
  const first = valuesFrom([audit]);
  const valueTypes: ArrayType[] = [];
  const shape: string[] = ["u", auditShape([audit])];
  // Each part is SQL text or the index of its value among the input columns.
  const assignments: Array<[column: string, value: string | number]> = [];
  const conditions: Array<[column: string, value: number | null]> = [];
  for (const [key, value] of Object.entries(set)) {
    if (value === undefined) continue;
    const property = key as TaskProperty;
    const raw = rawSql(value);
    shape.push(raw === undefined ? `s:${key}` : `s:${key}=${raw}`);
    if (raw === undefined) {
      assignments.push([TASK_COLUMNS[property], first + valueTypes.length]);
      valueTypes.push(TASK_COLUMN_TYPES[property]);
      row.push(value);
    } else {
      assignments.push([TASK_COLUMNS[property], raw]);
    }
  }
  for (const [key, value] of Object.entries(expected)) {
    if (value === undefined) continue;
    const property = key as TaskProperty;
    if (value === null) {
      shape.push(`e:${key}=null`);
      conditions.push([TASK_COLUMNS[property], null]);
    } else {
      if (isRaw(value)) throw new Error(`an expected value must be a value, not SQL: ${key}`);
      shape.push(`e:${key}`);
      conditions.push([TASK_COLUMNS[property], first + valueTypes.length]);
      valueTypes.push(TASK_COLUMN_TYPES[property]);
      row.push(value);
    }
  }
  const key = shape.join("|");
  let template = t.templates.get(key);
  if (!template) {
    const q = t.quote;
    const body = (ref: InputRef, from: string) => {
      const setSql = assignments.map(([column, value]) => `${q(column)} = ${typeof value === "number" ? ref(value) : value}`);
      const where = [`x.${q("task_id")} = ${ref(0)}`, ...conditions.map(([column, value]) => (value === null ? `x.${q(column)} is null` : `x.${q(column)} = ${ref(value)}`))];
      return `update ${t.tasks} as x set ${setSql.join(", ")}${from} where ${where.join(" and ")} returning ${returning(t, "x.")}`;
    };
    template = setTemplate(t, key, valueTypes, body, [audit.withAttempt === true], true);
    t.templates.set(key, template);
  }
  return { template, row };
}

/** The PostgreSQL template and input row for an INSERT of one task (see `insertTask`). */
function insertStatement(t: Tables, values: Record<TaskProperty, unknown>, audits: readonly AuditSpec[]): { template: SetTemplate; row: unknown[] } {
  const row = auditInput(String(values.taskId), audits);
  const first = valuesFrom(audits);
  const valueTypes: ArrayType[] = [];
  const shape: string[] = ["i", auditShape(audits)];
  const columns: Array<[column: string, value: string | number]> = [];
  for (const [key, value] of Object.entries(values)) {
    const property = key as TaskProperty;
    const raw = rawSql(value);
    shape.push(raw === undefined ? key : `${key}=${raw}`);
    if (raw === undefined) {
      columns.push([TASK_COLUMNS[property], first + valueTypes.length]);
      valueTypes.push(TASK_COLUMN_TYPES[property]);
      row.push(value === undefined ? null : value);
    } else {
      columns.push([TASK_COLUMNS[property], raw]);
    }
  }
  const key = shape.join("|");
  let template = t.templates.get(key);
  if (!template) {
    const q = t.quote;
    const body = (ref: InputRef, from: string) => {
      const selected = columns.map(([, value]) => (typeof value === "number" ? ref(value) : value));
      return `insert into ${t.tasks} (${columns.map(([column]) => q(column)).join(", ")}) select ${selected.join(", ")}${from} returning ${returning(t, "")}`;
    };
    template = setTemplate(
      t,
      key,
      valueTypes,
      body,
      audits.map((a) => a.withAttempt === true),
      false,
    );
    t.templates.set(key, template);
  }
  return { template, row };
}

/**
 * SQLite: `statement` (an INSERT or UPDATE on tasks ending in `returning *`)
 * and its audit rows, as one unit of work for a group commit (`transact`),
 * which commits it with whatever other units arrived meanwhile.
 */
function withAudit(t: Tables, statement: { sql: string; params: unknown[] }, audits: readonly AuditSpec[]): (tx: EntityManager) => Promise<TaskRecord | null> {
  return async (tx) => {
    const rows = await bound(tx, statement.sql, statement.params);
    if (!rows[0]) return null;
    const after = rowToRecord(rows[0]);
    for (const audit of audits) await bound(tx, t.insertAuditSql, auditValues(audit, after));
    return after;
  };
}

/**
 * SQLite: runs `sql` in `tx`'s transaction with its values bound, not
 * written into the text as `tx.execute` does, so the dialect compiles each
 * shape once (see sqlite-dialect.ts). Errors are the ORM's, as from
 * `execute`; the ORM's query log and slow-query log do not see these
 * statements, as they never saw the PostgreSQL batches.
 */
async function bound(tx: EntityManager, sql: string, params: unknown[]): Promise<TaskRow[]> {
  try {
    return (await tx.getKysely().executeQuery<TaskRow>(CompiledQuery.raw(sql, params))).rows;
  } catch (e: unknown) {
    throw e instanceof Error ? tx.getDriver().convertException(e) : e;
  }
}

/** SQLite: `UPDATE tasks SET … WHERE task_id = ? AND <expected> RETURNING *`. */
function sqliteUpdate(t: Tables, taskId: string, expected: TaskValues, set: TaskValues): { sql: string; params: unknown[] } {
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
  return { sql: `update ${t.tasks} set ${assignments.join(", ")} where ${conditions.join(" and ")} returning *`, params };
}

/** SQLite: `INSERT INTO tasks (…) VALUES (…) RETURNING *` with every column given. */
function sqliteInsert(t: Tables, values: Record<TaskProperty, unknown>): { sql: string; params: unknown[] } {
  const columns: string[] = [];
  const placeholders: string[] = [];
  const params: unknown[] = [];
  for (const [key, value] of Object.entries(values)) {
    columns.push(t.quote(TASK_COLUMNS[key as TaskProperty]));
    placeholders.push(valueSql(value === undefined ? null : value, params));
  }
  return { sql: `insert into ${t.tasks} (${columns.join(", ")}) values (${placeholders.join(", ")}) returning *`, params };
}

const firstRecord = (rows: TaskRow[]) => (rows[0] ? rowToRecord(rows[0]) : null);

function inserted(record: TaskRecord | null): TaskRecord {
  if (!record) throw new Error("insert into tasks returned no row");
  return record;
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
  const t = tablesOf(db);
  if (db.dialect === "postgresql") {
    const { template, row } = updateStatement(t, taskId, expected, set, audit);
    return firstRecord(await db.batch(template, row, taskId));
  }
  return db.transact(withAudit(t, sqliteUpdate(t, taskId, expected, set), [audit]));
}

/**
 * `INSERT INTO tasks (…) VALUES (…) RETURNING *` with every column given, and
 * its audit rows in order. Several rows record a task born past its first
 * state (one `toStatus` each): inserting it as it ends up writes one row
 * version instead of one per change.
 */
export async function insertTask(db: TaskWriter, values: Record<TaskProperty, unknown>, audits: readonly AuditSpec[]): Promise<TaskRecord> {
  const t = tablesOf(db);
  if (db.dialect === "postgresql") {
    const { template, row } = insertStatement(t, values, audits);
    return inserted(firstRecord(await db.batch(template, row, String(values.taskId))));
  }
  return inserted(await db.transact(withAudit(t, sqliteInsert(t, values), audits)));
}
