/**
 * Group commit against the real PostgreSQL: what a caller of `run()` sees
 * (its own statement's rows, its own error, settled only after the commit)
 * and what the database sees (how many queries, how many at once, and every
 * statement applied exactly once). Each test works in its own table of a
 * schema private to this run.
 */
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createStatementBatcher, type QueryPool, type StatementBatcher } from "../../src/persistence/statement-batcher.js";
import { postgresAvailable, TEST_POSTGRES_URL, uniqueName } from "../support/services.js";

const schema = uniqueName("batcher");
let pool: pg.Pool;
let tableCount = 0;

/** A pool wrapper that records every query the batcher sends and the most it had outstanding at once. */
interface WatchedPool extends QueryPool {
  readonly queries: string[];
  readonly peak: number;
}

function watched(inner: QueryPool, before?: (sql: string, n: number) => Promise<void> | void): WatchedPool {
  let outstanding = 0;
  const w = {
    queries: [] as string[],
    peak: 0,
    async query(sql: string): Promise<unknown> {
      w.queries.push(sql);
      outstanding++;
      w.peak = Math.max(w.peak, outstanding);
      try {
        await before?.(sql, w.queries.length);
        return await inner.query(sql);
      } finally {
        outstanding--;
      }
    },
  };
  return w;
}

/** How many statements one query sent by the batcher carried (statements here never contain ";\n"). */
const statementsIn = (sql: string) => sql.split(";\n").length;

const identity = (e: Error) => e;

function batcher(db: QueryPool, options: { maxBatch?: number; maxInFlight?: number; convertError?: (e: Error) => Error } = {}): StatementBatcher {
  return createStatementBatcher({ pool: db, maxBatch: options.maxBatch ?? 256, maxInFlight: options.maxInFlight ?? 2, convertError: options.convertError ?? identity });
}

/** A fresh `(id serial, k text unique, v int)` table; returns its qualified name. */
async function itemsTable(): Promise<string> {
  const name = `"${schema}"."items_${++tableCount}"`;
  await pool.query(`create table ${name} (id serial primary key, k text not null unique, v int not null check (v >= 0))`);
  return name;
}

/** A one-row counter `n`, for statements whose effect shows how many times they ran. */
async function counterTable(): Promise<string> {
  const name = `"${schema}"."counter_${++tableCount}"`;
  await pool.query(`create table ${name} (id int primary key, n int not null)`);
  await pool.query(`insert into ${name} values (1, 0)`);
  return name;
}

const increment = (counter: string) => `update ${counter} set n = n + 1 where id = 1 returning n`;
const counterValue = async (counter: string) => (await pool.query<{ n: number }>(`select n from ${counter} where id = 1`)).rows[0]!.n;
const contents = async (table: string) =>
  (await pool.query<{ k: string; v: number }>(`select k, v from ${table} order by k`)).rows.map((r) => [r.k, r.v] as const);

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

describe.skipIf(!postgresAvailable)("statement batcher on PostgreSQL", () => {
  beforeAll(async () => {
    pool = new pg.Pool({ connectionString: TEST_POSTGRES_URL, max: 12 });
    // A backend terminated on purpose (below) must not crash the test process via an idle client's error.
    pool.on("error", () => undefined);
    await pool.query(`create schema "${schema}"`);
  });

  afterAll(async () => {
    if (!pool) return;
    try {
      await pool.query("set lock_timeout = '20s'");
      await pool.query(`drop schema if exists "${schema}" cascade`);
    } finally {
      await pool.end();
    }
  });

  it("answers many statements issued in one turn with their own rows, sent together as one query", async () => {
    const items = await itemsTable();
    const db = watched(pool);
    const b = batcher(db);
    const inserts = Array.from({ length: 40 }, (_, i) => b.run(`insert into ${items} (k, v) values ('k${i}', ${i}) returning k, v`));
    // Statements with other row counts in the same batch keep their results aligned.
    const three = b.run("select generate_series(1, 3) as n");
    const none = b.run(`select k from ${items} where false`);
    const update = b.run(`update ${items} set v = v where k = 'no such key'`);

    const rows = await Promise.all(inserts);
    rows.forEach((r, i) => expect(r).toEqual([{ k: `k${i}`, v: i }]));
    expect(await three).toEqual([{ n: 1 }, { n: 2 }, { n: 3 }]);
    expect(await none).toEqual([]);
    expect(await update).toEqual([]);

    expect(db.queries).toHaveLength(1);
    expect(statementsIn(db.queries[0]!)).toBe(43);
    // Settled means committed: another connection sees every row, applied in the order issued.
    const seen = await pool.query<{ k: string }>(`select k from ${items} order by id`);
    expect(seen.rows.map((r) => r.k)).toEqual(Array.from({ length: 40 }, (_, i) => `k${i}`));
  });

  it("runs a batch in lock-key order, so two batches locking the same rows wait instead of deadlocking", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 0), ('b', 0)`);
    const db = watched(pool);
    const b = batcher(db, { maxInFlight: 2 });
    // Two batches in flight at once, each touching both rows, issued in opposite orders.
    const bump = (k: string) => `update ${items} set v = v + 1 where k = '${k}' returning k, v, pg_sleep(0.1) is null as slept`;
    const first = [b.run(bump("b"), "b"), b.run(bump("a"), "a")];
    await nextTurn();
    const second = [b.run(bump("a"), "a"), b.run(bump("b"), "b")];
    const rows = await Promise.all([...first, ...second]);
    // Each caller still gets its own row back, whatever order the batch ran in.
    expect(rows.map((r) => r[0]!.k)).toEqual(["b", "a", "a", "b"]);
    expect(await contents(items)).toEqual([["a", 2], ["b", 2]]);
    expect(db.queries).toHaveLength(2);
    for (const q of db.queries) expect(q.indexOf("k = 'a'")).toBeLessThan(q.indexOf("k = 'b'"));
  });

  it("sends a statement on an idle connection at once, and groups those that arrive while a batch is in flight", async () => {
    const items = await itemsTable();
    const db = watched(pool);
    const b = batcher(db, { maxInFlight: 1 });
    const first = b.run(`insert into ${items} (k, v) select 'first', 0 from pg_sleep(0.2) returning k`);
    await nextTurn();
    expect(db.queries).toHaveLength(1);
    // Issued over several turns while the only connection is busy: they wait, then travel together.
    const later: Array<Promise<unknown>> = [];
    for (let turn = 0; turn < 5; turn++) {
      for (let i = 0; i < 4; i++) later.push(b.run(`insert into ${items} (k, v) values ('t${turn}-${i}', ${turn}) returning k`));
      await nextTurn();
    }
    expect(db.queries).toHaveLength(1);
    expect(await first).toEqual([{ k: "first" }]);
    const rows = await Promise.all(later);
    expect(rows.flat()).toHaveLength(20);
    expect(db.queries.map(statementsIn)).toEqual([1, 20]);
    expect(await contents(items)).toHaveLength(21);
  });

  it("splits a burst into queries of at most maxBatch statements, keeping arrival order", async () => {
    const items = await itemsTable();
    const db = watched(pool);
    const b = batcher(db, { maxBatch: 6, maxInFlight: 1 });
    const rows = await Promise.all(Array.from({ length: 20 }, (_, i) => b.run(`insert into ${items} (k, v) values ('k${String(i).padStart(2, "0")}', ${i}) returning v`)));
    expect(rows).toEqual(Array.from({ length: 20 }, (_, i) => [{ v: i }]));
    expect(db.queries.map(statementsIn)).toEqual([6, 6, 6, 2]);
    const byId = await pool.query<{ v: number }>(`select v from ${items} order by id`);
    expect(byId.rows.map((r) => r.v)).toEqual(Array.from({ length: 20 }, (_, i) => i));
  });

  it("rejects only the caller whose statement failed; the rest of its batch is committed exactly once", async () => {
    const items = await itemsTable();
    const counter = await counterTable();
    await pool.query(`insert into ${items} (k, v) values ('taken', 0)`);
    const db = watched(pool);
    const b = batcher(db, { convertError: (e) => new Error(`converted: ${e.message}`, { cause: e }) });
    const outcomes = await Promise.allSettled([
      b.run(`insert into ${items} (k, v) values ('a', 1) returning k`),
      b.run(increment(counter)),
      b.run(`insert into ${items} (k, v) values ('taken', 2) returning k`),
      b.run(`insert into ${items} (k, v) values ('b', 3) returning k`),
      b.run(increment(counter)),
      b.run(increment(counter)),
    ]);
    // The failure really happened inside a batch of all six.
    expect(statementsIn(db.queries[0]!)).toBe(6);

    expect(outcomes.map((o) => o.status)).toEqual(["fulfilled", "fulfilled", "rejected", "fulfilled", "fulfilled", "fulfilled"]);
    const failure = (outcomes[2] as PromiseRejectedResult).reason as Error;
    // The caller sees its own error, through convertError.
    expect(failure.message).toMatch(/^converted: duplicate key value/);
    expect(failure.cause).toMatchObject({ code: "23505" });
    const value = (i: number) => (outcomes[i] as PromiseFulfilledResult<unknown>).value;
    expect(value(0)).toEqual([{ k: "a" }]);
    expect(value(3)).toEqual([{ k: "b" }]);
    // Each increment saw its own commit: three distinct values, and the counter moved by exactly three.
    expect([value(1), value(4), value(5)].map((r) => (r as Array<{ n: number }>)[0]!.n).sort()).toEqual([1, 2, 3]);
    expect(await counterValue(counter)).toBe(3);
    expect(await contents(items)).toEqual([["a", 1], ["b", 3], ["taken", 0]]);
  });

  it("reports several different statement errors of one batch each to its own caller", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('taken', 0)`);
    const db = watched(pool);
    const b = batcher(db);
    const outcomes = await Promise.allSettled([
      b.run(`insert into ${items} (k, v) values ('taken', 1)`), // unique_violation
      b.run(`insert into ${items} (k, v) values ('ok-1', 1) returning k`),
      b.run("select 1 / 0 as x"), // division_by_zero
      b.run(`insert into ${items} (k, v) values ('negative', -1)`), // check_violation
      b.run(`insert into ${items} (k, v) values ('ok-2', 2) returning k`),
      b.run("selec 1"), // syntax_error: fails the whole query string before anything runs
    ]);
    expect(statementsIn(db.queries[0]!)).toBe(6);
    const codes = outcomes.map((o) => (o.status === "rejected" ? (o.reason as { code?: string }).code : "ok"));
    expect(codes).toEqual(["23505", "ok", "22012", "23514", "ok", "42601"]);
    expect((outcomes[1] as PromiseFulfilledResult<unknown>).value).toEqual([{ k: "ok-1" }]);
    expect((outcomes[4] as PromiseFulfilledResult<unknown>).value).toEqual([{ k: "ok-2" }]);
    expect(await contents(items)).toEqual([["ok-1", 1], ["ok-2", 2], ["taken", 0]]);
  });

  // A connection-level failure leaves it unknown whether the batch committed.
  // Here it did commit (the reply is what got lost), so running the
  // statements again one by one would apply them twice.
  const connectionFailures: Array<{ what: string; error: () => Error }> = [
    { what: "no SQLSTATE (e.g. 'Connection terminated unexpectedly')", error: () => new Error("Connection terminated unexpectedly") },
    { what: "a socket error code (ECONNRESET)", error: () => Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" }) },
    { what: "a socket error code (EPIPE)", error: () => Object.assign(new Error("write EPIPE"), { code: "EPIPE" }) },
    { what: "SQLSTATE class 08 (connection_failure)", error: () => Object.assign(new Error("connection failure"), { code: "08006" }) },
    { what: "SQLSTATE class 57 (admin_shutdown)", error: () => Object.assign(new Error("terminating connection due to administrator command"), { code: "57P01" }) },
  ];
  for (const { what, error } of connectionFailures) {
    it(`rejects every caller of a batch that failed with ${what}, and does not retry its statements`, async () => {
      const counter = await counterTable();
      const items = await itemsTable();
      const lost = error();
      // The first query reaches the database and commits; its answer is replaced by the failure.
      let sent = 0;
      const db = watched({
        query: async (sql) => {
          const result = await pool.query(sql);
          if (++sent === 1) throw lost;
          return result;
        },
      });
      const b = batcher(db);
      const outcomes = await Promise.allSettled([
        b.run(increment(counter)),
        b.run(`insert into ${items} (k, v) values ('x', 1) returning k`),
        b.run(increment(counter)),
      ]);
      expect(outcomes.map((o) => o.status)).toEqual(["rejected", "rejected", "rejected"]);
      for (const o of outcomes) expect((o as PromiseRejectedResult).reason).toBe(lost);
      expect(db.queries).toHaveLength(1);
      expect(await counterValue(counter)).toBe(2);
      expect(await contents(items)).toEqual([["x", 1]]);
      await b.drain();
    });
  }

  it("rejects every caller, without retrying, when the server ends the connection in the middle of a batch", async () => {
    const items = await itemsTable();
    const db = watched(pool);
    const b = batcher(db);
    const outcomes = await Promise.allSettled([
      b.run(`insert into ${items} (k, v) values ('before', 1) returning k`),
      b.run("select pg_terminate_backend(pg_backend_pid())"),
      b.run(`insert into ${items} (k, v) values ('after', 2) returning k`),
    ]);
    expect(outcomes.map((o) => o.status)).toEqual(["rejected", "rejected", "rejected"]);
    const reasons = outcomes.map((o) => (o as PromiseRejectedResult).reason as Error);
    expect(new Set(reasons).size).toBe(1);
    expect(db.queries).toHaveLength(1);
    // The implicit transaction never committed, and nothing was run again.
    expect(await contents(items)).toEqual([]);
    // The pool replaced the dead connection: the batcher keeps working.
    expect(await b.run(`insert into ${items} (k, v) values ('next', 3) returning k`)).toEqual([{ k: "next" }]);
  });

  it("drain() resolves at once when idle, and otherwise only after everything queued has settled", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('taken', 0)`);
    const b = batcher(watched(pool), { maxBatch: 3, maxInFlight: 1 });
    await b.drain();

    const settled: string[] = [];
    const note = (name: string, p: Promise<unknown>) => p.then(() => settled.push(name), () => settled.push(`${name} (rejected)`));
    const all: Array<Promise<unknown>> = [];
    for (let i = 0; i < 8; i++) all.push(note(`slow-${i}`, b.run(`select pg_sleep(0.02), ${i} as i`)));
    // A failing statement sends its batch down the one-by-one path, which drain must wait for too.
    all.push(note("duplicate", b.run(`insert into ${items} (k, v) values ('taken', 1)`)));
    all.push(note("insert", b.run(`insert into ${items} (k, v) values ('new', 1)`)));
    await b.drain();
    settled.push("drained");

    expect(settled).toHaveLength(11);
    expect(settled.at(-1)).toBe("drained");
    expect(settled).toContain("duplicate (rejected)");
    expect(await contents(items)).toEqual([["new", 1], ["taken", 0]]);
    // Several callers may wait at once; all are released.
    let moreSettled = 0;
    const more = [b.run("select pg_sleep(0.05)"), b.run("select 1")].map((p) => p.then(() => moreSettled++));
    await Promise.all([b.drain(), b.drain()]);
    expect(moreSettled).toBe(2);
    await Promise.all([...all, ...more]);
  });

  it("never has more than maxInFlight queries outstanding, and uses them all under load", async () => {
    const db = watched(pool);
    const b = batcher(db, { maxBatch: 3, maxInFlight: 2 });
    const runs: Array<Promise<unknown>> = [];
    for (let turn = 0; turn < 10; turn++) {
      for (let i = 0; i < 3; i++) runs.push(b.run(`select ${turn * 3 + i} as i from pg_sleep(0.01)`));
      await nextTurn();
    }
    const rows = await Promise.all(runs);
    expect(rows).toEqual(Array.from({ length: 30 }, (_, i) => [{ i }]));
    expect(db.peak).toBe(2);
    expect(db.queries.length).toBeLessThan(30);
    expect(Math.max(...db.queries.map(statementsIn))).toBeLessThanOrEqual(3);
  });

  it("keeps to maxInFlight when a failed batch is re-run statement by statement", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('taken', 0)`);
    const db = watched(pool);
    const b = batcher(db, { maxBatch: 256, maxInFlight: 1 });
    const outcomes = await Promise.allSettled([
      ...Array.from({ length: 8 }, (_, i) => b.run(`insert into ${items} (k, v) select 'k${i}', ${i} from pg_sleep(0.01)`)),
      b.run(`insert into ${items} (k, v) values ('taken', 1)`),
    ]);
    expect(outcomes.filter((o) => o.status === "rejected")).toHaveLength(1);
    expect(await contents(items)).toHaveLength(9);
    expect(db.peak).toBe(1);
  });
});
