import { randomUUID } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { MikroORM } from "@mikro-orm/core";
import { PostgreSqlDriver } from "@mikro-orm/postgresql";
import { NodeSqliteDialect, SqliteDriver } from "@mikro-orm/sql";
import pg from "pg";
import { afterAll, describe, expect, it, vi } from "vitest";
import { ENTITIES } from "../../src/persistence/entities/index.js";
import { isDatabaseBusy } from "../../src/errors/errors.js";
import { createPersistence, ORM_SCHEMA_GENERATOR, type Persistence, type PersistenceOptions } from "../../src/persistence/orm.js";
import type { AuditEntry, NewTask } from "../../src/tasks/task-repository.js";
import { TASK_TYPES, type JsonObject, type TaskRecord, type TaskStatus, type TaskType } from "../../src/tasks/task-types.js";
import { STATE_PROPERTIES } from "../../src/persistence/task-sql.js";
import { stateOf } from "../support/records.js";
import { postgresAvailable, TEST_POSTGRES_URL, uniqueName } from "../support/services.js";

/** A place to open databases in: every `fresh()` is a new, empty database cleaned up after the suite. */
interface Backend {
  name: "sqlite" | "postgresql";
  available: boolean;
  /** Options for a brand-new empty database. */
  fresh(): Promise<PersistenceOptions>;
  /** Runs raw SQL against the database behind `options`, bypassing the repositories. */
  exec(options: PersistenceOptions, sql: string): Promise<unknown[]>;
  /** DDL the ORM would still need to make the database match the entities ("" when migrations and entities agree). */
  schemaDiff(options: PersistenceOptions): Promise<string>;
  cleanup(): Promise<void>;
}

function sqliteBackend(): Backend {
  let dir: string | undefined;
  return {
    name: "sqlite",
    available: true,
    async fresh() {
      dir ??= await mkdtemp(path.join(tmpdir(), "aaos-persistence-"));
      // A nested path proves createPersistence makes the parent directory.
      return { url: `sqlite:${path.join(dir, randomUUID(), "data", "aaos.db")}` };
    },
    async exec(options, sql) {
      const file = options.url.slice("sqlite:".length);
      const orm = await MikroORM.init({
        driver: SqliteDriver,
        dbName: file,
        driverOptions: new NodeSqliteDialect(file),
        entities: [],
        discovery: { warnWhenNoEntities: false },
      });
      try {
        return await orm.em.getConnection().execute(sql);
      } finally {
        await orm.close(true);
      }
    },
    async schemaDiff(options) {
      const file = options.url.slice("sqlite:".length);
      const orm = await MikroORM.init({
        driver: SqliteDriver,
        dbName: file,
        driverOptions: new NodeSqliteDialect(file),
        entities: ENTITIES,
        schemaGenerator: ORM_SCHEMA_GENERATOR,
      });
      try {
        const diff = (await orm.schema.getUpdateSchemaSQL({ wrap: false })).trim();
        // MikroORM cannot introspect DESC index columns on SQLite, so it proposes re-creating
        // those indexes. Ignore the pairs whose CREATE is exactly what the database already holds.
        const existing: Array<{ sql: string }> = await orm.em
          .getConnection()
          .execute("select sql from sqlite_master where type = 'index' and sql is not null");
        const normalize = (sql: string) => sql.toLowerCase().replace(/;$/, "");
        const held = new Set(existing.map((row) => normalize(row.sql)));
        const recreated = new Set<string>();
        const lines = diff.split("\n").filter((line) => {
          const name = /^create index `([^`]+)`/.exec(line)?.[1];
          if (name && held.has(normalize(line))) return !recreated.add(name);
          return true;
        });
        return lines.filter((line) => !recreated.has(/^drop index `([^`]+)`/.exec(line)?.[1] ?? "")).join("\n").trim();
      } finally {
        await orm.close(true);
      }
    },
    async cleanup() {
      if (dir) await rm(dir, { recursive: true, force: true });
    },
  };
}

function postgresBackend(): Backend {
  const schemas: string[] = [];
  async function run(sql: string, schema?: string): Promise<unknown[]> {
    const orm = await MikroORM.init({
      driver: PostgreSqlDriver,
      clientUrl: TEST_POSTGRES_URL,
      entities: [],
      discovery: { warnWhenNoEntities: false },
      // Every pooled connection resolves unqualified names in the suite's schema.
      ...(schema ? { driverOptions: { options: `-c search_path=${schema}` } } : {}),
    });
    try {
      return await orm.em.getConnection().execute(sql);
    } finally {
      await orm.close(true);
    }
  }
  return {
    name: "postgresql",
    available: postgresAvailable,
    async fresh() {
      const schema = uniqueName("persist");
      schemas.push(schema);
      return { url: TEST_POSTGRES_URL, schema };
    },
    exec(options, sql) {
      return run(sql, options.schema);
    },
    async schemaDiff(options) {
      const orm = await MikroORM.init({
        driver: PostgreSqlDriver,
        clientUrl: TEST_POSTGRES_URL,
        entities: ENTITIES,
        schemaGenerator: ORM_SCHEMA_GENERATOR,
        ...(options.schema ? { schema: options.schema } : {}),
      });
      try {
        return (await orm.schema.getUpdateSchemaSQL({ wrap: false, schema: options.schema })).trim();
      } finally {
        await orm.close(true);
      }
    },
    async cleanup() {
      for (const schema of schemas) await run(`drop schema if exists "${schema}" cascade`);
    },
  };
}

let seq = 0;
function newTask(overrides: Partial<NewTask> = {}): NewTask {
  seq += 1;
  return {
    taskId: randomUUID(),
    taskType: "code",
    description: `task ${seq}`,
    priority: 5,
    metadata: { n: seq, nested: { ok: true } },
    maxAttempts: 3,
    correlationId: `corr-${seq}`,
    seq,
    createdAt: new Date(Date.UTC(2026, 0, 1, 0, 0, 0, seq)),
    timeoutMs: null,
    idempotencyKey: null,
    requestHash: null,
    ...overrides,
  };
}

function created(task: NewTask): AuditEntry {
  return {
    action: "task.created",
    fromStatus: null,
    toStatus: "pending",
    agentId: null,
    correlationId: task.correlationId,
    details: { priority: task.priority },
  };
}

const backends = [sqliteBackend(), postgresBackend()];

for (const backend of backends) {
  describe.skipIf(!backend.available)(`persistence on ${backend.name}`, () => {
    const open: Persistence[] = [];
    async function openDb(options: PersistenceOptions): Promise<Persistence> {
      const db = await createPersistence(options);
      open.push(db);
      return db;
    }
    async function freshDb(): Promise<Persistence> {
      return openDb(await backend.fresh());
    }
    async function insert(db: Persistence, overrides: Partial<NewTask> = {}) {
      const task = newTask(overrides);
      return db.tasks.insert(task, created(task));
    }
    const t0 = new Date("2026-02-03T04:05:06.789Z");
    const later = (ms: number) => new Date(t0.getTime() + ms);

    afterAll(async () => {
      for (const db of open) await db.close();
      await backend.cleanup();
    });

    it("migrates a new database once, and a second open of the same database is a no-op", async () => {
      const options = await backend.fresh();
      const infos: string[] = [];
      const log = { info: (_o: object, msg?: string) => infos.push(msg ?? ""), warn: () => undefined };
      const first = await createPersistence({ ...options, log });
      expect(first.dialect).toBe(backend.name);
      const task = await insert(first);
      await first.close();
      await first.close(); // safe twice
      expect(infos).toEqual(["database migrated"]);

      const second = await openDb({ ...options, log });
      expect(infos).toEqual(["database migrated"]);
      expect(await second.tasks.get(task.taskId)).toEqual(task);
      const rows = (await backend.exec(options, "select name from mikro_orm_migrations order by id")) as Array<{ name: string }>;
      expect(rows.map((r) => r.name)).toEqual(["Migration20260101000000Initial", "Migration20261124000000Leases", "Migration20261125000000PartialIndexes", "Migration20261126000000HolderIndex", "Migration20261127000000StatusCounts"]);
      await expect(second.ping()).resolves.toBeUndefined();
      // The hand-frozen migration and the entities describe the same schema.
      expect(await backend.schemaDiff(options)).toBe("");
    });

    it("refuses to start on a damaged schema and names what is missing", async () => {
      const options = await backend.fresh();
      await (await createPersistence(options)).close();
      await backend.exec(options, "drop table audit_logs");
      await backend.exec(options, "alter table tasks drop column error");
      await backend.exec(options, `drop trigger tasks_count_update${backend.name === "postgresql" ? " on tasks" : ""}`);
      const failure = createPersistence(options);
      await expect(failure).rejects.toThrow(/table "audit_logs" is missing/);
      await expect(failure).rejects.toThrow(/column "tasks\.error" is missing/);
      // Without it the counts by status would drift from the tasks unnoticed.
      await expect(failure).rejects.toThrow(/trigger "tasks_count_update" on "tasks" is missing/);
      await expect(failure).rejects.toThrow(/Restore the missing objects/);
    });

    it("inserts a task with its creation audit row and reads it back exactly", async () => {
      const db = await freshDb();
      const task = newTask({ priority: 9, taskType: "trading", metadata: { a: [1, "two", null], b: { c: 1.5 } } });
      const record = await db.tasks.insert(task, created(task));
      expect(record).toEqual({
        taskId: task.taskId,
        taskType: "trading",
        description: task.description,
        priority: 9,
        metadata: { a: [1, "two", null], b: { c: 1.5 } },
        status: "pending",
        agentId: null,
        attempt: 0,
        maxAttempts: 3,
        result: null,
        error: null,
        correlationId: task.correlationId,
        seq: task.seq,
        createdAt: task.createdAt,
        updatedAt: task.createdAt,
        assignedAt: null,
        completedAt: null,
        failedAttempts: 0,
        timeoutMs: null,
        leaseExpiresAt: null,
        runAt: null,
        idempotencyKey: null,
        requestHash: null,
      });
      // Millisecond precision survives the round trip on both dialects.
      expect(record.createdAt.getUTCMilliseconds()).toBe(task.createdAt.getUTCMilliseconds());
      expect(await db.tasks.get(task.taskId)).toEqual(record);
      expect(await db.tasks.get(randomUUID())).toBeNull();
      expect(await db.tasks.auditTrail(task.taskId)).toEqual([
        { ...created(task), createdAt: task.createdAt },
      ]);
    });

    it("lists newest first with a keyset cursor, ties broken by task id, and filters", async () => {
      const db = await freshDb();
      const same = new Date("2026-03-01T00:00:00.123Z");
      const tasks = [];
      for (let i = 0; i < 3; i++) tasks.push(await insert(db, { createdAt: later(i * 1000) }));
      for (let i = 0; i < 3; i++) tasks.push(await insert(db, { createdAt: same, taskType: "qa" }));
      const expected = [...tasks]
        .sort((a, b) => b.createdAt.getTime() - a.createdAt.getTime() || (a.taskId < b.taskId ? 1 : -1))
        .map((t) => t.taskId);

      const seen: string[] = [];
      let before: { createdAt: Date; taskId: string } | undefined;
      for (;;) {
        const page = await db.tasks.list({ limit: 4, ...(before ? { before } : {}) });
        seen.push(...page.map((t) => t.taskId));
        if (page.length < 4) break;
        const last = page.at(-1)!;
        before = { createdAt: last.createdAt, taskId: last.taskId };
      }
      expect(seen).toEqual(expected);

      expect((await db.tasks.list({ limit: 10, taskType: "qa" })).map((t) => t.taskId)).toEqual(expected.slice(0, 3));
      await db.tasks.assign(tasks[0]!.taskId, "agent-1", later(10_000), null, later(10_000 + 30_000));
      expect((await db.tasks.list({ limit: 10, status: "assigned" })).map((t) => t.taskId)).toEqual([tasks[0]!.taskId]);
      expect(await db.tasks.list({ limit: 10, status: "assigned", taskType: "qa" })).toEqual([]);
    });

    it("assign → complete records the lease, the result and one audit row per change", async () => {
      const db = await freshDb();
      const task = await insert(db);
      const assigned = await db.tasks.assign(task.taskId, "agent-1", later(1), "corr-assign", later(1 + 30_000));
      expect(assigned).toMatchObject({
        status: "assigned",
        agentId: "agent-1",
        attempt: 1,
        assignedAt: later(1),
        updatedAt: later(1),
        completedAt: null,
        seq: task.seq,
        priority: task.priority,
        correlationId: task.correlationId,
      });
      const done = await db.tasks.complete(task.taskId, "agent-1", 1, { answer: 42, list: ["x"] }, later(2));
      expect(done).toMatchObject({
        status: "completed",
        agentId: "agent-1",
        attempt: 1,
        result: { answer: 42, list: ["x"] },
        completedAt: later(2),
        updatedAt: later(2),
        assignedAt: later(1),
      });
      expect(await db.tasks.get(task.taskId)).toEqual(done);
      expect(await db.tasks.auditTrail(task.taskId)).toEqual([
        {
          action: "task.created",
          fromStatus: null,
          toStatus: "pending",
          agentId: null,
          correlationId: task.correlationId,
          details: { priority: task.priority },
          createdAt: task.createdAt,
        },
        {
          action: "task.assigned",
          fromStatus: "pending",
          toStatus: "assigned",
          agentId: "agent-1",
          correlationId: "corr-assign",
          details: { attempt: 1 },
          createdAt: later(1),
        },
        {
          action: "task.completed",
          fromStatus: "assigned",
          toStatus: "completed",
          agentId: "agent-1",
          correlationId: task.correlationId,
          details: { attempt: 1 },
          createdAt: later(2),
        },
      ]);
      expect(await db.tasks.countCompletedSince(later(2))).toBe(1);
      expect(await db.tasks.countCompletedSince(later(3))).toBe(0);
    });

    it("insertAssigned stores a task already leased, answering and recording what insert then assign would have", async () => {
      const db = await freshDb();
      const twin = newTask({ priority: 8, metadata: { same: ["fields"] }, timeoutMs: 5000, idempotencyKey: "twin", requestHash: "h" });
      const born = { ...twin, taskId: randomUUID(), seq: twin.seq + 1000, idempotencyKey: "born" };
      const lease = { agentId: "agent-1", now: twin.createdAt, correlationId: "corr-lease", leaseExpiresAt: later(30_000) };
      const viaTwoChanges = await db.tasks.insert(twin, created(twin));
      const assignedViaTwo = await db.tasks.assign(twin.taskId, lease.agentId, lease.now, lease.correlationId, lease.leaseExpiresAt);

      const written = await db.tasks.insertAssigned(born, created(born), lease);
      const asTwin = (r: TaskRecord | null) => r && { ...r, taskId: twin.taskId, seq: twin.seq, idempotencyKey: "twin" };
      expect(asTwin(written.created)).toEqual(viaTwoChanges);
      expect(asTwin(written.assigned)).toEqual(assignedViaTwo);
      expect(written.assigned).toMatchObject({ status: "assigned", agentId: "agent-1", attempt: 1, assignedAt: born.createdAt, leaseExpiresAt: later(30_000) });
      expect(await db.tasks.get(born.taskId)).toEqual(written.assigned);
      expect(await db.tasks.auditTrail(born.taskId)).toEqual(await db.tasks.auditTrail(twin.taskId));
      expect(await db.tasks.auditTrail(born.taskId)).toMatchObject([
        { action: "task.created", toStatus: "pending" },
        { action: "task.assigned", fromStatus: "pending", toStatus: "assigned", agentId: "agent-1", correlationId: "corr-lease", details: { attempt: 1 } },
      ]);
      // A leased task runs to completion like any other.
      expect(await db.tasks.complete(born.taskId, "agent-1", 1, { ok: true }, later(1))).toMatchObject({ status: "completed", result: { ok: true } });
      // One idempotency key, one task, whichever way the second one is written.
      await expect(db.tasks.insertAssigned({ ...born, taskId: randomUUID() }, created(born), lease)).rejects.toThrow();
      expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 1, completed: 1, failed: 0, cancelled: 0 });
    });

    it("fail records the error; release requeues at the same place and the next assign is attempt 2", async () => {
      const db = await freshDb();
      const task = await insert(db, { priority: 7 });
      await db.tasks.assign(task.taskId, "agent-1", later(1), null, later(1 + 30_000));
      const released = await db.tasks.release(task.taskId, "agent-1", 1, "agent disconnected", later(2));
      expect(released).toMatchObject({ status: "pending", agentId: null, attempt: 1, priority: 7, seq: task.seq, updatedAt: later(2) });
      expect((await db.tasks.listRunnable(later(1_000_000))).map((t) => t.taskId)).toEqual([task.taskId]);

      const again = await db.tasks.assign(task.taskId, "agent-2", later(3), null, later(3 + 30_000));
      expect(again).toMatchObject({ status: "assigned", agentId: "agent-2", attempt: 2, assignedAt: later(3) });
      const failed = await db.tasks.fail(task.taskId, "agent-2", 2, "boom", later(4));
      expect(failed).toMatchObject({ status: "failed", error: "boom", agentId: "agent-2", attempt: 2, completedAt: later(4) });

      const trail = await db.tasks.auditTrail(task.taskId);
      expect(trail.map((a) => [a.action, a.fromStatus, a.toStatus, a.agentId])).toEqual([
        ["task.created", null, "pending", null],
        ["task.assigned", "pending", "assigned", "agent-1"],
        ["task.requeued", "assigned", "pending", "agent-1"],
        ["task.assigned", "pending", "assigned", "agent-2"],
        ["task.failed", "assigned", "failed", "agent-2"],
      ]);
      expect(trail[2]!.details).toEqual({ attempt: 1, reason: "agent disconnected" });
      expect(trail[4]!.details).toEqual({ attempt: 2, error: "boom" });
    });

    it("queueLater makes a pending task the queue refused a due retry, without moving an existing run_at or touching other states", async () => {
      const db = await freshDb();
      const refused = await insert(db);
      const scheduled = newTask({ maxAttempts: 3 });
      await db.tasks.insert(scheduled, created(scheduled));
      await db.tasks.assign(scheduled.taskId, "agent-1", later(1), null, later(30_000));
      await db.tasks.retryOrFail(scheduled.taskId, "agent-1", 1, "boom", later(2), later(900));
      const held = await insert(db);
      await db.tasks.assign(held.taskId, "agent-1", later(1), null, later(30_000));

      for (const t of [refused, scheduled, held]) await db.tasks.queueLater(t.taskId, later(5));
      expect(await db.tasks.listDueRetries(later(5), 10).then((ts) => ts.map((t) => t.taskId))).toEqual([refused.taskId]);
      expect((await db.tasks.get(scheduled.taskId))!.runAt).toEqual(later(900));
      expect(await db.tasks.get(held.taskId)).toMatchObject({ status: "assigned", runAt: null });
      // Not a state change: no audit row.
      expect((await db.tasks.auditTrail(refused.taskId)).map((a) => a.action)).toEqual(["task.created"]);
    });

    it("cancel works from pending and from assigned, and from nothing else", async () => {
      const db = await freshDb();
      const pending = await insert(db);
      const cancelled = await db.tasks.cancel(pending.taskId, later(1), "corr-cancel");
      expect(cancelled).toMatchObject({ status: "cancelled", completedAt: later(1), agentId: null });
      expect(await db.tasks.cancel(pending.taskId, later(2), null)).toBeNull();

      const held = await insert(db);
      await db.tasks.assign(held.taskId, "agent-1", later(1), null, later(1 + 30_000));
      expect(await db.tasks.cancel(held.taskId, later(2), null)).toMatchObject({ status: "cancelled", agentId: "agent-1" });
      // The lease is gone: the former holder can no longer complete it.
      expect(await db.tasks.complete(held.taskId, "agent-1", 1, {}, later(3))).toBeNull();

      const done = await insert(db);
      await db.tasks.assign(done.taskId, "agent-1", later(1), null, later(1 + 30_000));
      await db.tasks.complete(done.taskId, "agent-1", 1, {}, later(2));
      expect(await db.tasks.cancel(done.taskId, later(3), null)).toBeNull();
      expect(await db.tasks.cancel(randomUUID(), later(3), null)).toBeNull();

      expect((await db.tasks.auditTrail(pending.taskId)).at(-1)).toMatchObject({
        action: "task.cancelled",
        fromStatus: "pending",
        toStatus: "cancelled",
        correlationId: "corr-cancel",
      });
      expect((await db.tasks.auditTrail(held.taskId)).at(-1)).toMatchObject({
        action: "task.cancelled",
        fromStatus: "assigned",
        agentId: "agent-1",
        correlationId: held.correlationId,
      });
    });

    it("refuses changes from the wrong agent, attempt or status and writes nothing", async () => {
      const db = await freshDb();
      const task = await insert(db);
      expect(await db.tasks.complete(task.taskId, "agent-1", 0, {}, later(1))).toBeNull(); // still pending
      expect(await db.tasks.release(task.taskId, "agent-1", 0, "x", later(1))).toBeNull();
      const assigned = await db.tasks.assign(task.taskId, "agent-1", later(1), null, later(1 + 30_000));
      expect(await db.tasks.assign(task.taskId, "agent-2", later(2), null, later(2 + 30_000))).toBeNull(); // already assigned

      expect(await db.tasks.complete(task.taskId, "agent-2", 1, {}, later(2))).toBeNull();
      expect(await db.tasks.complete(task.taskId, "agent-1", 2, {}, later(2))).toBeNull();
      expect(await db.tasks.fail(task.taskId, "agent-2", 1, "no", later(2))).toBeNull();
      expect(await db.tasks.fail(task.taskId, "agent-1", 0, "no", later(2))).toBeNull();
      expect(await db.tasks.release(task.taskId, "agent-2", 1, "no", later(2))).toBeNull();
      expect(await db.tasks.release(task.taskId, "agent-1", 3, "no", later(2))).toBeNull();
      expect(await db.tasks.assign(randomUUID(), "agent-1", later(2), null, later(2 + 30_000))).toBeNull();

      expect(await db.tasks.get(task.taskId)).toEqual(assigned);
      expect((await db.tasks.auditTrail(task.taskId)).map((a) => a.action)).toEqual(["task.created", "task.assigned"]);

      // A result is recorded at most once.
      expect(await db.tasks.complete(task.taskId, "agent-1", 1, { first: true }, later(3))).not.toBeNull();
      expect(await db.tasks.complete(task.taskId, "agent-1", 1, { second: true }, later(4))).toBeNull();
      expect(await db.tasks.fail(task.taskId, "agent-1", 1, "late", later(4))).toBeNull();
      expect((await db.tasks.get(task.taskId))?.result).toEqual({ first: true });
    });

    it("lets exactly one of ten racing assigns win", async () => {
      const db = await freshDb();
      const task = await insert(db);
      const results = await Promise.all(
        Array.from({ length: 10 }, (_, i) => db.tasks.assign(task.taskId, `agent-${i}`, later(1), null, later(1 + 30_000))),
      );
      const winners = results.filter((r) => r !== null);
      expect(winners).toHaveLength(1);
      expect(winners[0]).toMatchObject({ attempt: 1, status: "assigned" });
      expect(await db.tasks.get(task.taskId)).toEqual(winners[0]);
      const assignedRows = (await db.tasks.auditTrail(task.taskId)).filter((a) => a.action === "task.assigned");
      expect(assignedRows).toHaveLength(1);
      expect(assignedRows[0]!.agentId).toBe(winners[0]!.agentId);
    });

    it("lists runnable work by priority desc then seq, counts every status, and knows the highest seq", async () => {
      const db = await freshDb();
      expect(await db.tasks.maxSeq()).toBe(0);
      expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 0, completed: 0, failed: 0, cancelled: 0 });

      const base = 1_000_000 + seq;
      const specs: Array<[number, number, TaskType]> = [
        [base + 5, 1, "code"],
        [base + 1, 10, "qa"],
        [base + 3, 5, "code"],
        [base + 2, 5, "research"],
        [base + 4, 10, "code"],
        [base + 6, 0, "code"],
      ];
      const tasks = [];
      for (const [s, priority, taskType] of specs) tasks.push(await insert(db, { seq: s, priority, taskType }));
      // Big seq values (beyond 32 bits) survive the bigint column.
      const big = await insert(db, { seq: 2 ** 40, priority: 0 });
      const [a, b, c] = [tasks[0]!, tasks[1]!, tasks[2]!];
      await db.tasks.assign(a.taskId, "agent-1", later(1), null, later(1 + 30_000));
      await db.tasks.assign(b.taskId, "agent-1", later(1), null, later(1 + 30_000));
      await db.tasks.complete(b.taskId, "agent-1", 1, {}, later(2));
      await db.tasks.cancel(c.taskId, later(2), null);
      const failing = await insert(db, { seq: base + 7 });
      await db.tasks.assign(failing.taskId, "agent-1", later(1), null, later(1 + 30_000));
      await db.tasks.fail(failing.taskId, "agent-1", 1, "x", later(2));

      expect((await db.tasks.listRunnable(later(1_000_000))).map((t) => t.seq)).toEqual([base + 4, base + 2, base + 6, 2 ** 40]);
      expect((await db.tasks.listAssigned()).map((t) => t.taskId)).toEqual([a.taskId]);
      expect(await db.tasks.countByStatus()).toEqual({ pending: 4, assigned: 1, completed: 1, failed: 1, cancelled: 1 });
      expect(await db.tasks.maxSeq()).toBe(big.seq);
    });

    /** Tasks per status, counted over the table itself. */
    async function countedByHand(options: PersistenceOptions): Promise<Record<TaskStatus, number>> {
      const rows = (await backend.exec(options, "select status, count(*) as n from tasks group by status")) as Array<{ status: TaskStatus; n: number | string }>;
      const counts: Record<TaskStatus, number> = { pending: 0, assigned: 0, completed: 0, failed: 0, cancelled: 0 };
      for (const row of rows) counts[row.status] = Number(row.n);
      return counts;
    }

    it("keeps the counts by status equal to the tasks through every kind of write, by hand included", async () => {
      const options = await backend.fresh();
      const db = await openDb(options);
      const lease = later(30_000);
      const [a, b, c, d, e] = [await insert(db), await insert(db), await insert(db), await insert(db), await insert(db)];
      const handed = newTask();
      await db.tasks.insertAssigned(handed, created(handed), { agentId: "agent-1", now: handed.createdAt, correlationId: null, leaseExpiresAt: lease });
      await db.tasks.assign(a.taskId, "agent-1", later(1), null, lease);
      await db.tasks.complete(a.taskId, "agent-1", 1, { ok: true }, later(2));
      await db.tasks.assign(b.taskId, "agent-1", later(1), null, lease);
      await db.tasks.fail(b.taskId, "agent-1", 1, "boom", later(2));
      expect(await db.tasks.countByStatus()).toEqual({ pending: 3, assigned: 1, completed: 1, failed: 1, cancelled: 0 });
      await db.tasks.retry(b.taskId, later(3), null);
      await db.tasks.assign(c.taskId, "agent-1", later(1), null, lease);
      await db.tasks.retryOrFail(c.taskId, "agent-1", 1, "try again", later(2), later(5_000));
      await db.tasks.assign(d.taskId, "agent-1", later(1), null, lease);
      await db.tasks.release(d.taskId, "agent-1", 1, "handed back", later(2));
      await db.tasks.cancel(e.taskId, later(2), null);
      // A write that changes no status counts nothing.
      expect(await db.tasks.renewLeases([{ taskId: handed.taskId, agentId: "agent-1", attempt: 1 }], later(60_000))).toEqual([handed.taskId]);
      expect(await db.tasks.countByStatus()).toEqual({ pending: 3, assigned: 1, completed: 1, failed: 0, cancelled: 1 });
      expect(await db.tasks.countByStatus()).toEqual(await countedByHand(options));

      // An operator's statement over several rows, from a session of its own.
      await backend.exec(options, "update tasks set status = 'cancelled', completed_at = updated_at where status = 'pending'");
      expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 1, completed: 1, failed: 0, cancelled: 4 });
      // Deletes: a task never queued, and retention.
      const unqueued = await insert(db);
      await db.tasks.deleteUnqueued(unqueued.taskId);
      expect((await db.tasks.deleteFinishedBefore(later(1_000_000_000), 100)).deleted).toBe(5);
      expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 1, completed: 0, failed: 0, cancelled: 0 });
      expect(await db.tasks.countByStatus()).toEqual(await countedByHand(options));
    });

    it("keeps the counts exact through merged batches, two changes to one task at once, and a batch rolled back by one bad write", async () => {
      const options = await backend.fresh();
      const db = await openDb(options);
      const lease = later(30_000);
      const tasks = await Promise.all(Array.from({ length: 20 }, () => insert(db)));
      await insert(db, { idempotencyKey: "only-once" });
      const settled = await Promise.allSettled([
        ...tasks.slice(0, 10).map((t) => db.tasks.assign(t.taskId, "agent-1", later(1), null, lease)),
        ...tasks.slice(10, 15).map((t) => db.tasks.cancel(t.taskId, later(1), null)),
        // Refused: its batch rolls back and the others run again one by one.
        insert(db, { idempotencyKey: "only-once" }),
        ...Array.from({ length: 5 }, () => insert(db)),
        // Both changes queued at once; whichever way they land, the counts must follow.
        db.tasks.assign(tasks[15]!.taskId, "agent-2", later(1), null, lease),
        db.tasks.complete(tasks[15]!.taskId, "agent-2", 1, {}, later(2)),
      ]);
      expect(settled.filter((r) => r.status === "rejected")).toHaveLength(1);
      const counts = await db.tasks.countByStatus();
      expect(counts).toEqual(await countedByHand(options));
      expect(Object.values(counts).reduce((a, b) => a + b, 0)).toBe(26);
      expect(counts.cancelled).toBe(5);
    });

    it("counts the tasks already there when the counting migration runs", async () => {
      const options = await backend.fresh();
      const before = await createPersistence(options);
      try {
        // The schema as it was before the counts: tasks written now are seen by no trigger.
        const on = backend.name === "postgresql" ? " on tasks" : "";
        for (const trigger of ["tasks_count_insert", "tasks_count_update", "tasks_count_delete"]) await backend.exec(options, `drop trigger ${trigger}${on}`);
        if (backend.name === "postgresql") await backend.exec(options, "drop function task_status_counts_apply()");
        await backend.exec(options, "drop table task_status_counts");
        await backend.exec(options, "drop index tasks_completed_index");
        await backend.exec(options, "delete from mikro_orm_migrations where name = 'Migration20261127000000StatusCounts'");
        const assigned = await insert(before);
        const cancelled = await insert(before);
        await insert(before);
        await before.tasks.assign(assigned.taskId, "agent-1", later(1), null, later(30_000));
        await before.tasks.cancel(cancelled.taskId, later(1), null);
      } finally {
        await before.close();
      }
      const db = await openDb(options);
      expect(await db.tasks.countByStatus()).toEqual({ pending: 1, assigned: 1, completed: 0, failed: 0, cancelled: 1 });
      // And counts from there on.
      await insert(db);
      expect(await db.tasks.countByStatus()).toEqual({ pending: 2, assigned: 1, completed: 0, failed: 0, cancelled: 1 });
    });

    it.skipIf(backend.name !== "postgresql")("refuses to add the task counts at any isolation level but read committed, where the first count could miss writes for good", async () => {
      const options = await backend.fresh();
      const role = uniqueName("repeatable").toLowerCase();
      await backend.exec(options, `create role "${role}" login superuser`);
      await backend.exec(options, `alter role "${role}" set default_transaction_isolation = 'repeatable read'`);
      try {
        const url = new URL(TEST_POSTGRES_URL);
        url.username = role;
        await expect(createPersistence({ ...options, url: url.toString() })).rejects.toThrow(/must run at read committed isolation, not repeatable read/);
        // Nothing of it was kept: the migration runs again, and completes, at read committed.
        const db = await openDb(options);
        expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 0, completed: 0, failed: 0, cancelled: 0 });
      } finally {
        await backend.exec(options, `drop owned by "${role}" cascade`);
        await backend.exec(options, `drop role "${role}"`);
      }
    });

    it.skipIf(backend.name !== "postgresql")("folds the counts of ended database sessions into one row per status, and leaves live sessions' rows and the totals alone", async () => {
      const options = await backend.fresh();
      const ended = await createPersistence(options);
      const tasks = [await insert(ended), await insert(ended), await insert(ended)];
      await ended.tasks.cancel(tasks[0]!.taskId, later(1), null);
      await ended.close();
      await backend.exec(options, `update tasks set status = 'cancelled' where task_id = '${tasks[1]!.taskId}'`);
      const db = await openDb(options);
      await insert(db);
      const slots = async () => (await backend.exec(options, "select slot, status, n from task_status_counts order by slot, status")) as Array<{ slot: number; status: string; n: number | string }>;
      const totals = { pending: 2, assigned: 0, completed: 0, failed: 0, cancelled: 2 };
      expect(await db.tasks.countByStatus()).toEqual(totals);
      expect(new Set((await slots()).map((r) => r.slot)).size).toBeGreaterThanOrEqual(3);

      // A closed connection's backend leaves pg_stat_activity a moment after the client goes.
      await vi.waitFor(
        async () => {
          await db.tasks.foldStatusCounts();
          const live = new Set(((await backend.exec(options, "select pid from pg_stat_activity")) as Array<{ pid: number }>).map((p) => p.pid));
          const rows = await slots();
          expect(rows.filter((r) => r.slot !== 0 && !live.has(r.slot))).toEqual([]);
          // Both cancellations, and the pending task of the closed instance, came from ended sessions.
          const folded = Object.fromEntries(rows.filter((r) => r.slot === 0).map((r) => [r.status, Number(r.n)]));
          expect(folded.cancelled).toBe(2);
          expect(folded.pending).toBeGreaterThanOrEqual(1);
        },
        { timeout: 5_000, interval: 50 },
      );
      expect(await db.tasks.countByStatus()).toEqual(totals);
      expect(await db.tasks.countByStatus()).toEqual(await countedByHand(options));
    });

    it("deleteUnqueued removes the task and its audit rows, but never a task that was handed out", async () => {
      const db = await freshDb();
      const task = await insert(db);
      await db.tasks.deleteUnqueued(task.taskId);
      expect(await db.tasks.get(task.taskId)).toBeNull();
      expect(await db.tasks.auditTrail(task.taskId)).toEqual([]);

      const handedOut = await insert(db);
      await db.tasks.assign(handedOut.taskId, "agent-1", later(1), null, later(1 + 30_000));
      await db.tasks.deleteUnqueued(handedOut.taskId);
      expect(await db.tasks.get(handedOut.taskId)).not.toBeNull();
    });

    it("deleteFinishedBefore deletes tasks finished before the cutoff with their audit rows, oldest first, and nothing else", async () => {
      const db = await freshDb();
      const at = (ms: number) => ({ createdAt: later(ms) });
      const lease = later(60_000);
      const doneOld = await insert(db, at(0));
      await db.tasks.assign(doneOld.taskId, "agent-1", later(1), null, lease);
      await db.tasks.complete(doneOld.taskId, "agent-1", 1, { ok: true }, later(2));
      const failedOld = await insert(db, at(3));
      await db.tasks.assign(failedOld.taskId, "agent-1", later(4), null, lease);
      await db.tasks.fail(failedOld.taskId, "agent-1", 1, "boom", later(5));
      const cancelledOld = await insert(db, at(6));
      await db.tasks.cancel(cancelledOld.taskId, later(7), null);
      // Kept: finished after the cutoff, not finished, or revived by a retry.
      const finishedLate = await insert(db, at(8));
      await db.tasks.assign(finishedLate.taskId, "agent-1", later(9), null, lease);
      await db.tasks.complete(finishedLate.taskId, "agent-1", 1, {}, later(20_000));
      const pendingOld = await insert(db, at(1));
      const heldOld = await insert(db, at(2));
      await db.tasks.assign(heldOld.taskId, "agent-1", later(3), null, lease);
      const retried = await insert(db, at(4));
      await db.tasks.assign(retried.taskId, "agent-1", later(5), null, lease);
      await db.tasks.fail(retried.taskId, "agent-1", 1, "boom", later(6));
      await db.tasks.retry(retried.taskId, later(7), null);
      const doneNew = await insert(db, at(11_000));
      await db.tasks.assign(doneNew.taskId, "agent-1", later(11_001), null, lease);
      await db.tasks.complete(doneNew.taskId, "agent-1", 1, {}, later(11_002));
      const kept = [finishedLate, pendingOld, heldOld, retried, doneNew];
      const trails = new Map<string, unknown>();
      for (const t of kept) trails.set(t.taskId, await db.tasks.auditTrail(t.taskId));

      const cutoff = later(10_000);
      // From a given creation time on: nothing older is touched.
      expect(await db.tasks.deleteFinishedBefore(cutoff, 2, later(5))).toEqual({ deleted: 1, last: later(6) });
      expect(await db.tasks.get(cancelledOld.taskId)).toBeNull();
      expect(await db.tasks.get(doneOld.taskId)).not.toBeNull();
      // Oldest created first, a bounded number at a time, saying where to resume.
      expect(await db.tasks.deleteFinishedBefore(cutoff, 1)).toEqual({ deleted: 1, last: later(0) });
      expect(await db.tasks.get(doneOld.taskId)).toBeNull();
      expect(await db.tasks.get(failedOld.taskId)).not.toBeNull();
      expect(await db.tasks.deleteFinishedBefore(cutoff, 1, later(0))).toEqual({ deleted: 1, last: later(3) });
      expect(await db.tasks.deleteFinishedBefore(cutoff, 2)).toEqual({ deleted: 0, last: undefined });
      for (const t of [doneOld, failedOld, cancelledOld]) {
        expect(await db.tasks.get(t.taskId)).toBeNull();
        expect(await db.tasks.auditTrail(t.taskId)).toEqual([]);
      }
      for (const t of kept) {
        expect(await db.tasks.get(t.taskId)).not.toBeNull();
        expect(await db.tasks.auditTrail(t.taskId)).toEqual(trails.get(t.taskId));
      }
      expect(await db.tasks.countByStatus()).toMatchObject({ pending: 2, assigned: 1, completed: 2, failed: 0, cancelled: 0 });
    });

    it.skipIf(backend.name !== "postgresql")("deleteFinishedBefore skips a finished task another session holds, and takes it once released", async () => {
      const options = await backend.fresh();
      const db = await openDb(options);
      const [held, free] = [await insert(db, { createdAt: later(0) }), await insert(db, { createdAt: later(1) })];
      for (const t of [held, free]) await db.tasks.cancel(t.taskId, later(2), null);
      const client = new pg.Client({ connectionString: TEST_POSTGRES_URL });
      await client.connect();
      try {
        await client.query("begin");
        await client.query(`select 1 from "${options.schema}".tasks where task_id = $1 for update`, [held.taskId]);
        expect(await db.tasks.deleteFinishedBefore(later(10), 10)).toMatchObject({ deleted: 1 });
        expect(await db.tasks.get(free.taskId)).toBeNull();
        expect(await db.tasks.get(held.taskId)).not.toBeNull();
        await client.query("rollback");
        expect(await db.tasks.deleteFinishedBefore(later(10), 10)).toMatchObject({ deleted: 1 });
        expect(await db.tasks.get(held.taskId)).toBeNull();
      } finally {
        await client.end();
      }
    });

    it.skipIf(backend.name !== "postgresql")("with a statement timeout, a statement stuck longer fails as busy and the next one works; migrations run without it", async () => {
      // A migration statement held up for longer than the timeout still
      // completes: another session is creating the table it creates.
      const fresh = await backend.fresh();
      const creator = new pg.Client({ connectionString: TEST_POSTGRES_URL });
      await creator.connect();
      try {
        await creator.query(`create schema "${fresh.schema}"`);
        await creator.query("begin");
        await creator.query(`create table "${fresh.schema}".tasks (id int)`);
        const opening = openDb({ ...fresh, statementTimeoutMs: 100 });
        opening.catch(() => undefined); // awaited below
        await new Promise((r) => setTimeout(r, 500));
        await creator.query("rollback");
        await opening;
      } finally {
        await creator.end();
      }
      const options = { ...(await backend.fresh()), statementTimeoutMs: 300, lockTimeoutMs: 0 };
      const db = await openDb(options);
      const task = await insert(db);
      const blocker = new pg.Client({ connectionString: TEST_POSTGRES_URL });
      await blocker.connect();
      try {
        await blocker.query("begin");
        await blocker.query(`lock table "${options.schema}".tasks in access exclusive mode`);
        for (const stuck of [() => db.tasks.countCompletedSince(t0), () => insert(db), () => db.tasks.cancel(task.taskId, later(1), null)]) {
          const started = Date.now();
          const error = await stuck().then(() => undefined, (e: unknown) => e);
          expect(isDatabaseBusy(error)).toBe(true);
          expect(Date.now() - started).toBeGreaterThanOrEqual(250);
        }
        await blocker.query("rollback");
        expect(await db.tasks.countByStatus()).toMatchObject({ pending: 1 });
        expect(await db.tasks.cancel(task.taskId, later(2), null)).toMatchObject({ status: "cancelled" });
      } finally {
        await blocker.end();
      }
    });

    it("keeps agents: upsert, status, heartbeat, and disconnect-all at start-up", async () => {
      const db = await freshDb();
      await db.agents.upsertConnected(
        { agentId: "agent-1", agentName: "one", agentType: "generic", capabilities: ["code", "qa"], maxConcurrency: 2 },
        t0,
      );
      await db.agents.upsertConnected(
        { agentId: "agent-2", agentName: "two", agentType: "llm", capabilities: [], maxConcurrency: 1 },
        later(1),
      );
      expect(await db.agents.list()).toEqual([
        {
          agentId: "agent-1",
          agentName: "one",
          agentType: "generic",
          capabilities: ["code", "qa"],
          maxConcurrency: 2,
          status: "idle",
          isActive: true,
          lastHeartbeat: t0,
          createdAt: t0,
          updatedAt: t0,
        },
        expect.objectContaining({ agentId: "agent-2", capabilities: [], status: "idle" }),
      ]);

      await db.agents.setStatus("agent-1", "busy", later(2));
      await db.agents.touchHeartbeats(["agent-1"], later(3));
      await db.agents.touchHeartbeats([], later(9));
      expect((await db.agents.list()).map((a) => [a.agentId, a.status, a.lastHeartbeat])).toEqual([
        ["agent-1", "busy", later(3)],
        ["agent-2", "idle", later(1)],
      ]);

      await db.agents.markAllDisconnected(later(4));
      expect((await db.agents.list()).map((a) => [a.status, a.isActive])).toEqual([
        ["disconnected", false],
        ["disconnected", false],
      ]);

      // Reconnecting updates what the agent says about itself but keeps when it was first seen.
      await db.agents.upsertConnected(
        { agentId: "agent-1", agentName: "one-b", agentType: "generic", capabilities: ["trading"], maxConcurrency: 4 },
        later(5),
      );
      expect((await db.agents.list())[0]).toMatchObject({
        agentName: "one-b",
        capabilities: ["trading"],
        maxConcurrency: 4,
        status: "idle",
        isActive: true,
        createdAt: t0,
        updatedAt: later(5),
      });
    });

    it("retryOrFail schedules a retry with backoff until max_attempts, then fails for good; retry starts over", async () => {
      const db = await freshDb();
      const task = newTask({ maxAttempts: 2 });
      await db.tasks.insert(task, created(task));
      const first = (await db.tasks.assign(task.taskId, "agent-1", later(1), null, later(30_000)))!;
      expect(first.leaseExpiresAt).toEqual(later(30_000));
      // Only the holder of the current attempt can fail it.
      expect(await db.tasks.retryOrFail(task.taskId, "agent-2", 1, "x", later(2), later(500))).toBeNull();
      expect(await db.tasks.retryOrFail(task.taskId, "agent-1", 2, "x", later(2), later(500))).toBeNull();
      const retrying = (await db.tasks.retryOrFail(task.taskId, "agent-1", 1, "boom", later(2), later(500)))!;
      expect(retrying).toMatchObject({ status: "pending", failedAttempts: 1, error: "boom", agentId: null, runAt: later(500), leaseExpiresAt: null, attempt: 1 });
      // Not runnable before its backoff has passed; due after.
      expect((await db.tasks.listRunnable(later(100))).map((t) => t.taskId)).not.toContain(task.taskId);
      expect(await db.tasks.listDueRetries(later(100), 10)).toEqual([]);
      expect((await db.tasks.listDueRetries(later(600), 10)).map((t) => t.taskId)).toEqual([task.taskId]);
      expect(await db.tasks.countRetryWaiting()).toBe(1);
      await db.tasks.markQueued([task.taskId]);
      expect(await db.tasks.listDueRetries(later(600), 10)).toEqual([]);
      expect(await db.tasks.countRetryWaiting()).toBe(0);
      await db.tasks.assign(task.taskId, "agent-2", later(700), null, later(30_000));
      const dead = (await db.tasks.retryOrFail(task.taskId, "agent-2", 2, "boom again", later(800), later(2000)))!;
      expect(dead).toMatchObject({ status: "failed", failedAttempts: 2, error: "boom again", completedAt: later(800), runAt: null });
      const again = (await db.tasks.retry(task.taskId, later(900), "corr-retry"))!;
      expect(again).toMatchObject({ status: "pending", failedAttempts: 0, completedAt: null, attempt: 2 });
      expect(await db.tasks.retry(task.taskId, later(901), null)).toBeNull(); // only from failed
      expect((await db.tasks.auditTrail(task.taskId)).map((r) => r.action)).toEqual([
        "task.created",
        "task.assigned",
        "task.retry_scheduled",
        "task.assigned",
        "task.failed",
        "task.retried",
      ]);
    });

    it("renews only the given held leases, and lists expired ones", async () => {
      const db = await freshDb();
      const [a, b] = [newTask(), newTask()];
      for (const t of [a, b]) await db.tasks.insert(t, created(t));
      await db.tasks.assign(a.taskId, "agent-a", later(1), null, later(1000));
      await db.tasks.assign(b.taskId, "agent-b", later(1), null, later(1000));
      // Not b's holder, nor a's current attempt: neither is renewed.
      expect(await db.tasks.renewLeases([{ taskId: a.taskId, agentId: "agent-a", attempt: 2 }, { taskId: b.taskId, agentId: "agent-a", attempt: 1 }], later(5000))).toEqual([]);
      expect(await db.tasks.renewLeases([{ taskId: a.taskId, agentId: "agent-a", attempt: 1 }, { taskId: b.taskId, agentId: "agent-a", attempt: 1 }], later(5000))).toEqual([a.taskId]);
      expect(await db.tasks.renewLeases([], later(5000))).toEqual([]);
      expect((await db.tasks.listExpiredLeases(later(2000), 10)).map((t) => t.taskId)).toEqual([b.taskId]);
      expect(await db.tasks.listExpiredLeases(later(500), 10)).toEqual([]);
      // Completing clears the lease.
      const done = (await db.tasks.complete(a.taskId, "agent-a", 1, {}, later(10)))!;
      expect(done.leaseExpiresAt).toBeNull();
    });

    it("getMany reads the tasks that exist, over more ids than one statement takes", async () => {
      const db = await freshDb();
      const stored = await Promise.all(Array.from({ length: 3 }, () => insert(db)));
      const missing = Array.from({ length: 600 }, () => newTask().taskId);
      // The stored ones on both sides of the 500-id statement boundary.
      const ids = [stored[0]!.taskId, ...missing.slice(0, 550), stored[1]!.taskId, stored[2]!.taskId, ...missing.slice(550)];
      const found = await db.tasks.getMany(ids);
      expect(found.map((t) => t.taskId).sort()).toEqual(stored.map((t) => t.taskId).sort());
      expect(found.find((t) => t.taskId === stored[1]!.taskId)).toEqual(stored[1]);
      expect(await db.tasks.getMany([])).toEqual([]);
    });

    it("getStates reads what getMany does but the description and metadata, over more ids than one statement takes", async () => {
      const db = await freshDb();
      const big = { notes: "x".repeat(10_000) };
      const stored = await Promise.all(Array.from({ length: 3 }, () => insert(db, { description: "d".repeat(10_000), metadata: big })));
      await db.tasks.assign(stored[1]!.taskId, "agent-a", later(1), "corr", later(30_000));
      const done = (await db.tasks.complete(stored[1]!.taskId, "agent-a", 1, { answer: 42 }, later(2)))!;
      const missing = Array.from({ length: 600 }, () => newTask().taskId);
      const ids = [stored[0]!.taskId, ...missing.slice(0, 550), stored[1]!.taskId, stored[2]!.taskId, ...missing.slice(550)];
      const states = await db.tasks.getStates(ids);
      expect(states.map((t) => t.taskId).sort()).toEqual(stored.map((t) => t.taskId).sort());
      expect(states.find((t) => t.taskId === done.taskId)).toStrictEqual(stateOf(done));
      // Against the ORM's own hydration too, which shares no code with the raw read.
      expect(states.find((t) => t.taskId === done.taskId)).toStrictEqual(stateOf((await db.tasks.getMany([done.taskId]))[0]!));
      expect(states.find((t) => t.taskId === stored[0]!.taskId)).toStrictEqual(stateOf(stored[0]!));
      expect(await db.tasks.getStates([])).toEqual([]);
      // What makes it lighter than getMany: the two columns it does not read.
      expect(STATE_PROPERTIES).not.toContain("description");
      expect(STATE_PROPERTIES).not.toContain("metadataJson");
    });

    it("finds a task by idempotency key, refuses a second row with the same key, and frees an expired key", async () => {
      const db = await freshDb();
      const first = newTask({ idempotencyKey: "order-42", requestHash: "h1" });
      await db.tasks.insert(first, created(first));
      expect(await db.tasks.findByIdempotencyKey("order-42")).toMatchObject({ taskId: first.taskId, requestHash: "h1" });
      const clash = newTask({ idempotencyKey: "order-42", requestHash: "h2" });
      await expect(db.tasks.insert(clash, created(clash))).rejects.toThrow();
      await db.tasks.releaseIdempotencyKey(first.taskId, "order-42");
      expect(await db.tasks.findByIdempotencyKey("order-42")).toBeNull();
      await db.tasks.insert(clash, created(clash));
      expect((await db.tasks.findByIdempotencyKey("order-42"))!.taskId).toBe(clash.taskId);
    });

    // PostgreSQL merges the writes of one batch into set-based statements
    // whose values travel inside array literals; text that means something in
    // array or string-literal syntax must come back exactly as it went in.
    it.skipIf(backend.name !== "postgresql")("keeps every field exact through merged batches of inserts, assigns and completes", async () => {
      const db = await freshDb();
      const hostile = [
        `single ' double '' escaped \\' dq " escaped dq \\"`,
        "back\\slash \\\\ two, and trailing\\",
        "{braces},{with,commas} and } { alone",
        "NULL",
        "null",
        "",
        " ",
        "emoji 🎉👍🏽 中文 日本語 한국어",
        "line\nbreak\r\ntab\tend",
        "E'\\x41' $1 ? :name ;\n-- not a comment",
        "\u2028\u2029 separators, nbsp\u00a0",
        "\\N",
      ];
      const n = 36;
      const tasks = Array.from({ length: n }, (_, i): NewTask => {
        const h = hostile[i % hostile.length]!;
        return newTask({
          taskType: TASK_TYPES[i % TASK_TYPES.length]!,
          description: i % 5 === 0 ? h.repeat(50) : h,
          priority: i % 11,
          metadata: {
            [h]: h,
            nested: { list: [h, null, 1.5, -0.25, true, { "}{": "\\", '"': "'" }], empty: {} },
            // JSON escapes: the column is text, so they are kept as written.
            nul: "a\u0000b",
            lone: "\ud800",
          },
          maxAttempts: 1 + (i % 4),
          correlationId: `corr ${h} ${i}`,
          seq: 2 ** 40 + i,
          createdAt: later(-1000 + i),
          timeoutMs: i % 2 === 0 ? null : 1000 * i,
          idempotencyKey: i % 3 === 0 ? null : `key ${h} ${i}`,
          requestHash: i % 3 === 0 ? null : `hash ${h}`,
        });
      });
      const agentOf = (i: number) => `agent ${hostile[(i + 3) % hostile.length]!} ${i}`;
      const assignCorrelation = (i: number) => (i % 2 === 0 ? null : `assign ${hostile[(i + 5) % hostile.length]!}`);
      const resultOf = (i: number): JsonObject => ({ echo: hostile[(i + 7) % hostile.length]!, i, deep: { "quote'key": ["\\", '"', "{}", "NULL"] } });
      const createdAudit = (task: NewTask): AuditEntry => ({ ...created(task), details: { priority: task.priority, note: task.description.slice(0, 40) } });

      // Whatever the batcher sends on the pool (the ORM's own queries use checked-out clients).
      const query = vi.spyOn(pg.Pool.prototype, "query");
      /**
       * Checks that the writes since call `from` went in merged statements
       * (a query carrying several of these tasks) that all succeeded: a failed
       * batch is re-run statement by statement as prepared statements, which
       * would hide a value the merged form renders wrongly.
       */
      function expectMergedSince(from: number, written: NewTask[] = tasks): void {
        const sent: unknown[] = query.mock.calls.slice(from).map(([q]) => q);
        expect(sent.filter((q) => typeof q !== "string")).toEqual([]);
        const carried = sent.map((q) => written.filter((t) => String(q).includes(t.taskId)).length);
        expect(Math.max(...carried)).toBeGreaterThan(1);
      }
      try {
        // Each phase is issued in one turn, so it is committed in as few batches as possible.
        const inserted = await Promise.all(tasks.map((task) => db.tasks.insert(task, createdAudit(task))));
        expectMergedSince(0);

        let mark = query.mock.calls.length;
        const rival = "agent rival";
        const assigns = tasks.map((task, i) => db.tasks.assign(task.taskId, agentOf(i), later(i), assignCorrelation(i), later(i + 30_000)));
        // Issued after the real holder's, in the same turn: it finds the task assigned.
        const rivalAssign = db.tasks.assign(tasks[1]!.taskId, rival, later(1), null, later(1 + 30_000));
        const assigned = await Promise.all(assigns);
        expect(await rivalAssign).toBeNull();
        expectMergedSince(mark);

        mark = query.mock.calls.length;
        const completes = tasks.map((task, i) => db.tasks.complete(task.taskId, agentOf(i), 1, resultOf(i), later(1000 + i)));
        // The same completion twice in one turn: a result is recorded once.
        const duplicate = db.tasks.complete(tasks[0]!.taskId, agentOf(0), 1, { duplicate: true }, later(2000));
        const completed = await Promise.all(completes);
        expect([completed[0], await duplicate].filter((r) => r === null)).toHaveLength(1);
        // Changes to one row keep the order they were issued in: the first wins.
        expect(completed[0]).not.toBeNull();
        expectMergedSince(mark);

        for (const [i, task] of tasks.entries()) {
          const expected: TaskRecord = {
            taskId: task.taskId,
            taskType: task.taskType,
            description: task.description,
            priority: task.priority,
            metadata: task.metadata,
            status: "completed",
            agentId: agentOf(i),
            attempt: 1,
            maxAttempts: task.maxAttempts,
            result: resultOf(i),
            error: null,
            correlationId: task.correlationId,
            seq: task.seq,
            createdAt: task.createdAt,
            updatedAt: later(1000 + i),
            assignedAt: later(i),
            completedAt: later(1000 + i),
            failedAttempts: 0,
            timeoutMs: task.timeoutMs,
            leaseExpiresAt: null,
            runAt: null,
            idempotencyKey: task.idempotencyKey,
            requestHash: task.requestHash,
          };
          // What each write answered, and what a later read finds.
          expect(inserted[i]).toEqual({ ...expected, status: "pending", agentId: null, attempt: 0, result: null, updatedAt: task.createdAt, assignedAt: null, completedAt: null });
          expect(assigned[i]).toEqual({ ...expected, status: "assigned", result: null, updatedAt: later(i), completedAt: null, leaseExpiresAt: later(i + 30_000) });
          expect(completed[i]).toEqual(expected);
          expect(await db.tasks.get(task.taskId)).toEqual(expected);
          expect(await db.tasks.auditTrail(task.taskId)).toEqual([
            { ...createdAudit(task), createdAt: task.createdAt },
            {
              action: "task.assigned",
              fromStatus: "pending",
              toStatus: "assigned",
              agentId: agentOf(i),
              correlationId: assignCorrelation(i) ?? task.correlationId,
              details: { attempt: 1 },
              createdAt: later(i),
            },
            {
              action: "task.completed",
              fromStatus: "assigned",
              toStatus: "completed",
              agentId: agentOf(i),
              correlationId: task.correlationId,
              details: { attempt: 1 },
              createdAt: later(1000 + i),
            },
          ]);
        }
        expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 0, completed: n, failed: 0, cancelled: 0 });

        // The same tasks again, each stored already leased, in merged statements that write two audit rows per task.
        const born = tasks.map((task) => ({ ...task, taskId: randomUUID(), idempotencyKey: task.idempotencyKey && `${task.idempotencyKey} born` }));
        mark = query.mock.calls.length;
        const leased = await Promise.all(
          born.map((task, i) =>
            db.tasks.insertAssigned(task, createdAudit(task), { agentId: agentOf(i), now: task.createdAt, correlationId: assignCorrelation(i), leaseExpiresAt: later(i + 30_000) }),
          ),
        );
        expectMergedSince(mark, born);
        for (const [i, task] of born.entries()) {
          const same = { taskId: task.taskId, idempotencyKey: task.idempotencyKey };
          expect(leased[i]!.created).toEqual({ ...inserted[i], ...same });
          expect(leased[i]!.assigned).toEqual({ ...assigned[i], ...same, assignedAt: task.createdAt, updatedAt: task.createdAt });
          expect(await db.tasks.get(task.taskId)).toEqual(leased[i]!.assigned);
          // The first two rows of the trail written change by change, the assignment dated at creation.
          const [createdRow, assignedRow] = await db.tasks.auditTrail(tasks[i]!.taskId);
          expect(await db.tasks.auditTrail(task.taskId)).toEqual([createdRow, { ...assignedRow, createdAt: task.createdAt }]);
        }
      } finally {
        query.mockRestore();
      }
    });

    // A lone write runs as a prepared statement, which each pooled connection
    // keeps. A newer version's migration may add a column while this instance
    // runs (a rolling deploy); its writes must not start failing.
    it.skipIf(backend.name !== "postgresql")("keeps writing after another instance adds a column to tasks", async () => {
      const options = await backend.fresh();
      const db = await openDb(options);
      // One after another: each is a batch of one, and the pool hands out the same idle connection again.
      const before = [];
      for (let i = 0; i < 3; i++) before.push(await insert(db));
      for (const task of before) expect(await db.tasks.assign(task.taskId, "agent-1", later(1), null, later(30_000))).toMatchObject({ status: "assigned" });

      await backend.exec(options, "alter table tasks add column added_later text");
      const after = [];
      for (let i = 0; i < 3; i++) after.push(await insert(db));
      for (const task of [...before, ...after]) {
        const attempt = before.includes(task) ? 1 : 0;
        const changed = attempt === 1 ? await db.tasks.complete(task.taskId, "agent-1", 1, { ok: true }, later(2)) : await db.tasks.assign(task.taskId, "agent-1", later(2), null, later(30_000));
        expect(changed).toEqual(await db.tasks.get(task.taskId));
        expect(changed?.status).toBe(attempt === 1 ? "completed" : "assigned");
      }
    });
  });
}

describe("createPersistence failures", () => {
  it("names an unreachable PostgreSQL without its password, quickly", async () => {
    const started = Date.now();
    const failure = createPersistence({ url: "postgresql://postgres:s3cret@127.0.0.1:1/x" });
    await expect(failure).rejects.toThrow(/Database unreachable: PostgreSQL at postgresql:\/\/postgres:\*\*\*@127\.0\.0\.1:1\/x/);
    await expect(failure).rejects.not.toThrow(/s3cret/);
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  it("rejects a URL it cannot use", async () => {
    await expect(createPersistence({ url: "mysql://localhost/db" })).rejects.toThrow(/not supported/);
  });

  it("opens an in-memory SQLite database", async () => {
    const db = await createPersistence({ url: "sqlite::memory:" });
    try {
      expect(db.dialect).toBe("sqlite");
      expect(await db.tasks.countByStatus()).toEqual({ pending: 0, assigned: 0, completed: 0, failed: 0, cancelled: 0 });
    } finally {
      await db.close();
    }
  });
});
