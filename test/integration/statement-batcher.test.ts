/**
 * Group commit against the real PostgreSQL: what a caller of `run()` or `runSet()` sees
 * (its own statement's rows, its own error, settled only after the commit)
 * and what the database sees (how many queries, how many at once, and every
 * statement applied exactly once). Each test works in its own table of a
 * schema private to this run.
 */
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createStatementBatcher, type PreparedQuery, type QueryPool, type SetTemplate, type StatementBatcher } from "../../src/persistence/statement-batcher.js";
import { pgArray } from "../../src/persistence/task-sql.js";
import { postgresAvailable, TEST_POSTGRES_URL, uniqueName } from "../support/services.js";

const schema = uniqueName("batcher");
let pool: pg.Pool;
let tableCount = 0;

/** A pool wrapper that records every query the batcher sends and the most it had outstanding at once. */
interface WatchedPool extends QueryPool {
  /** The SQL text of each query (a prepared statement's text). */
  readonly queries: string[];
  /** Each query exactly as sent: literal SQL, or a named prepared statement with its values. */
  readonly sent: Array<string | PreparedQuery>;
  readonly peak: number;
}

function watched(inner: QueryPool, before?: (sql: string, n: number) => Promise<void> | void): WatchedPool {
  let outstanding = 0;
  const w = {
    queries: [] as string[],
    sent: [] as Array<string | PreparedQuery>,
    peak: 0,
    async query(query: string | PreparedQuery): Promise<unknown> {
      const sql = typeof query === "string" ? query : query.text;
      w.queries.push(sql);
      // A copy: pg adds a callback to the query object it is given.
      w.sent.push(typeof query === "string" ? query : { name: query.name, text: query.text, values: [...query.values] });
      outstanding++;
      w.peak = Math.max(w.peak, outstanding);
      try {
        await before?.(sql, w.queries.length);
        return await inner.query(query);
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

function batcher(
  db: QueryPool,
  options: { maxBatch?: number; maxInFlight?: number; convertError?: (e: Error) => Error; lockSql?: (keys: string[]) => string } = {},
): StatementBatcher {
  return createStatementBatcher({
    pool: db,
    maxBatch: options.maxBatch ?? 256,
    maxInFlight: options.maxInFlight ?? 2,
    convertError: options.convertError ?? identity,
    lockSql: options.lockSql,
  });
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

let templateCount = 0;

/** Input rows `[k, n]` as a relation `u(k, n)`, the way task-sql.ts feeds a merged statement. */
const unnested = (rows: readonly unknown[][]) =>
  `unnest(${pgArray(rows.map((r) => r[0]), "text")}, ${pgArray(rows.map((r) => r[1]), "int4")}) as u(k, n)`;

/**
 * Small SetTemplates over an items table, shaped like those of task-sql.ts:
 * merged, a set-based statement over arrays; alone, a prepared statement
 * with the row's values as parameters. Input rows are `[k, n]`.
 */
const templates = {
  /** v = v + n for the existing row k. */
  add: (items: string): SetTemplate => ({
    key: `add ${items}`,
    keyColumn: "k",
    locks: true,
    prepared: { name: `test_add_${++templateCount}`, text: `update ${items} set v = v + $2::int4 where k = $1::text returning k, v` },
    render: (rows) => `update ${items} as x set v = x.v + u.n from ${unnested(rows)} where x.k = u.k returning x.k, x.v`,
  }),
  /** v = n for the existing row k. */
  set: (items: string): SetTemplate => ({
    key: `set ${items}`,
    keyColumn: "k",
    locks: true,
    prepared: { name: `test_set_${++templateCount}`, text: `update ${items} set v = $2::int4 where k = $1::text returning k, v` },
    render: (rows) => `update ${items} as x set v = u.n from ${unnested(rows)} where x.k = u.k returning x.k, x.v`,
  }),
  /** A new row (k, n): nothing to lock beforehand. */
  insert: (items: string): SetTemplate => ({
    key: `insert ${items}`,
    keyColumn: "k",
    locks: false,
    prepared: { name: `test_insert_${++templateCount}`, text: `insert into ${items} (k, v) values ($1::text, $2::int4) returning k, v` },
    render: (rows) => `insert into ${items} (k, v) select u.k, u.n from ${unnested(rows)} returning k, v`,
  }),
  /** n result rows for input row k (none for 0), to show each caller gets all of its rows and only its rows. */
  series: (): SetTemplate => ({
    key: "series",
    keyColumn: "k",
    locks: false,
    prepared: { name: `test_series_${++templateCount}`, text: "select $1::text as k, g from generate_series(1, $2::int4) as g" },
    render: (rows) => `select u.k, g from ${unnested(rows)}, generate_series(1, u.n) as g`,
  }),
};

/** The lockSql option for an items table: every row of these keys, locked in key order. */
function lockItems(items: string, calls: string[][] = []): (keys: string[]) => string {
  return (keys) => {
    calls.push(keys);
    return `select 1 from ${items} where k = any(${pgArray(keys, "text")}) order by k collate "C" for update`;
  };
}

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

  it("rejects every caller of a batch whose statement ran past statement_timeout, once, without running the others again", async () => {
    const counter = await counterTable();
    const timed = new pg.Pool({ connectionString: TEST_POSTGRES_URL, statement_timeout: 300 });
    try {
      const db = watched(timed);
      const b = batcher(db, { convertError: (e) => new Error(`converted: ${e.message}`, { cause: e }) });
      const outcomes = await Promise.allSettled([b.run(increment(counter)), b.run("select pg_sleep(2)"), b.run(increment(counter)), b.run(increment(counter))]);
      // One query, and one timeout: not one more per statement, run alone.
      expect(db.queries).toHaveLength(1);
      expect(statementsIn(db.queries[0]!)).toBe(4);
      for (const o of outcomes) {
        expect(o.status).toBe("rejected");
        const reason = (o as PromiseRejectedResult).reason as Error;
        expect(reason.message).toMatch(/^converted: canceling statement due to statement timeout/);
        expect(reason.cause).toMatchObject({ code: "57014" });
      }
      // Rolled back as a whole.
      expect(await counterValue(counter)).toBe(0);
      await b.drain();
    } finally {
      await timed.end();
    }
  });

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

  it("merges the rows of one template issued in one turn into one statement, and answers each caller with its own rows", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) select 'k' || i, i from generate_series(0, 29) as i`);
    const db = watched(pool);
    const b = batcher(db);
    const add = templates.add(items);
    const calls = Array.from({ length: 30 }, (_, i) => b.runSet(add, [`k${i}`, 100], `k${i}`));
    // Its row matches nothing: the statement returns no row with its key.
    const ghost = b.runSet(add, ["ghost", 100], "ghost");

    const rows = await Promise.all(calls);
    rows.forEach((r, i) => expect(r).toEqual([{ k: `k${i}`, v: i + 100 }]));
    expect(await ghost).toEqual([]);
    expect(db.sent).toHaveLength(1);
    expect(typeof db.sent[0]).toBe("string");
    expect(statementsIn(db.queries[0]!)).toBe(1);
    expect(db.queries[0]!.match(/unnest\(/g)).toHaveLength(1);
    // Settled means committed, each row changed exactly once.
    expect(new Map(await contents(items))).toEqual(new Map(Array.from({ length: 30 }, (_, i) => [`k${i}`, i + 100])));
    expect(await contents(items)).toHaveLength(30);
  });

  it("gives each caller all of its result rows and no one else's, with one statement per template in one query", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 0), ('b', 0)`);
    const db = watched(pool);
    const b = batcher(db);
    const series = templates.series();
    const add = templates.add(items);
    const outcomes = [
      b.runSet(series, ["three", 3], "three"),
      b.runSet(add, ["a", 1], "a"),
      b.runSet(series, ["zero", 0], "zero"),
      b.run("select 'literal' as k"),
      b.runSet(series, ["one", 1], "one"),
      b.runSet(add, ["b", 2], "b"),
      // A key that looks like another's prefix or a number must not collect their rows.
      b.runSet(series, ["t", 2], "t"),
      b.runSet(series, ["07", 1], "07"),
      b.runSet(series, ["7", 2], "7"),
    ];
    const rows = await Promise.all(outcomes);
    expect(rows).toEqual([
      [{ k: "three", g: 1 }, { k: "three", g: 2 }, { k: "three", g: 3 }],
      [{ k: "a", v: 1 }],
      [],
      [{ k: "literal" }],
      [{ k: "one", g: 1 }],
      [{ k: "b", v: 2 }],
      [{ k: "t", g: 1 }, { k: "t", g: 2 }],
      [{ k: "07", g: 1 }],
      [{ k: "7", g: 1 }, { k: "7", g: 2 }],
    ]);
    expect(db.sent).toHaveLength(1);
    expect(statementsIn(db.queries[0]!)).toBe(3);
  });

  it("runs a lone statement of a template as a named prepared statement with the row's values", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 1)`);
    // One dedicated connection, so the server's list of its prepared statements can be read.
    const client = await pool.connect();
    try {
      const db = watched(client);
      const b = batcher(db, { convertError: (e) => new Error(`converted: ${e.message}`, { cause: e }) });
      const add = templates.add(items);
      expect(await b.runSet(add, ["a", 5], "a")).toEqual([{ k: "a", v: 6 }]);
      expect(db.sent).toEqual([{ name: add.prepared.name, text: add.prepared.text, values: ["a", 5] }]);
      // Prepared once, run again by name.
      expect(await b.runSet(add, ["a", 5], "a")).toEqual([{ k: "a", v: 11 }]);
      expect(await b.runSet(add, ["nobody", 5], "nobody")).toEqual([]);
      const failure = b.runSet(add, ["a", -100], "a");
      await expect(failure).rejects.toThrow(/^converted: new row for relation "items_\d+" violates check constraint/);
      await expect(failure).rejects.toMatchObject({ cause: { code: "23514" } });

      expect(db.sent).toHaveLength(4);
      for (const q of db.sent) expect(q).toMatchObject({ name: add.prepared.name, text: add.prepared.text });
      const prepared = await client.query<{ name: string; statement: string }>("select name, statement from pg_prepared_statements");
      expect(prepared.rows).toEqual([{ name: add.prepared.name, statement: add.prepared.text }]);
      expect(await contents(items)).toEqual([["a", 11]]);
    } finally {
      // Not back into the shared pool with a prepared statement on it.
      client.release(true);
    }
  });

  it("prepares a lone statement afresh when a migration changed a column's type under it", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 1)`);
    const client = await pool.connect();
    try {
      const db = watched(client);
      const b = batcher(db);
      const add = templates.add(items);
      expect(await b.runSet(add, ["a", 1], "a")).toEqual([{ k: "a", v: 2 }]);
      // Another instance's migration: the statement's result type changes,
      // and PostgreSQL refuses the cached plan on every later execution.
      await pool.query(`alter table ${items} alter column v type bigint`);
      expect(await b.runSet(add, ["a", 1], "a")).toEqual([{ k: "a", v: "3" }]);
      expect(await b.runSet(add, ["a", 1], "a")).toEqual([{ k: "a", v: "4" }]);
      const names = db.sent.map((q) => (typeof q === "string" ? q : q.name));
      expect(names).toEqual([add.prepared.name, add.prepared.name, `${add.prepared.name}_1`, `${add.prepared.name}_1`]);
      expect(await contents(items)).toEqual([["a", "4"]]);
    } finally {
      client.release(true);
    }
  });

  it("applies several changes to one row of one batch, each once and in the order issued", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 0), ('b', 0), ('c', 0)`);
    const db = watched(pool);
    const b = batcher(db);
    const set = templates.set(items);
    const add = templates.add(items);
    const rows = await Promise.all([
      b.runSet(set, ["a", 1], "a"),
      b.runSet(set, ["b", 7], "b"),
      b.runSet(set, ["a", 2], "a"),
      b.runSet(add, ["a", 10], "a"),
      b.runSet(add, ["b", 1], "b"),
      b.runSet(add, ["c", 5], "c"),
      b.runSet(add, ["b", 1], "b"),
      b.runSet(set, ["c", 3], "c"),
    ]);
    // Each caller sees the row as its own change left it.
    expect(rows).toEqual([
      [{ k: "a", v: 1 }],
      [{ k: "b", v: 7 }],
      [{ k: "a", v: 2 }],
      [{ k: "a", v: 12 }],
      [{ k: "b", v: 8 }],
      [{ k: "c", v: 5 }],
      [{ k: "b", v: 9 }],
      [{ k: "c", v: 3 }],
    ]);
    expect(await contents(items)).toEqual([["a", 12], ["b", 9], ["c", 3]]);
    // All of it in one query: nothing failed and was run again.
    expect(db.sent).toHaveLength(1);
  });

  it("starts a batch with lockSql only when a merged statement changes several existing rows", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 0), ('b', 0), ('c', 0)`);
    const locked: string[][] = [];
    const lockSql = lockItems(items, locked);
    const db = watched(pool);
    const b = batcher(db, { lockSql });
    const add = templates.add(items);
    const set = templates.set(items);
    const insert = templates.insert(items);
    /** The queries sent for statements issued together in one turn. */
    async function queriesFor(...statements: Array<Promise<unknown>>): Promise<Array<string | PreparedQuery>> {
      const from = db.sent.length;
      await Promise.all(statements);
      return db.sent.slice(from);
    }
    /** How many statements each of these queries carried. */
    const sizes = (queries: Array<string | PreparedQuery>) => queries.map((q) => (typeof q === "string" ? statementsIn(q) : "prepared"));

    // Merged rows of a locking template, with a literal and an insert alongside.
    const merged = [b.runSet(add, ["b", 1], "b"), b.run(`update ${items} set v = v + 1 where k = 'c' returning k, v`, "c"), b.runSet(add, ["a", 1], "a"), b.runSet(insert, ["z", 9], "z")];
    const [sql, ...others] = await queriesFor(...merged);
    expect(others).toEqual([]);
    expect(typeof sql).toBe("string");
    const first = String(sql).split(";\n");
    expect(first).toHaveLength(4);
    expect(locked).toHaveLength(1);
    // The rows the batch changes, and not the one it creates.
    expect([...locked[0]!].sort()).toEqual(["a", "b", "c"]);
    expect(first[0]).toBe(lockItems(items)(locked[0]!));
    // The lock statement's own rows go to no caller.
    expect(await Promise.all(merged)).toEqual([[{ k: "b", v: 1 }], [{ k: "c", v: 1 }], [{ k: "a", v: 1 }], [{ k: "z", v: 9 }]]);

    // Merged rows of a template that locks nothing beforehand (inserts).
    expect(sizes(await queriesFor(b.runSet(insert, ["x", 1], "x"), b.runSet(insert, ["y", 1], "y")))).toEqual([1]);
    // One row per statement: each locks its own row, in key order.
    expect(sizes(await queriesFor(b.runSet(add, ["b", 1], "b"), b.runSet(set, ["a", 5], "a")))).toEqual([2]);
    // Two changes to one row run one after the other, never merged.
    expect(sizes(await queriesFor(b.runSet(add, ["a", 1], "a"), b.runSet(add, ["a", 1], "a")))).toEqual([2]);
    // Alone: the prepared statement.
    expect(await queriesFor(b.runSet(add, ["c", 1], "c"))).toEqual([{ name: add.prepared.name, text: add.prepared.text, values: ["c", 1] }]);
    // Only the first batch asked for the lock.
    expect(locked).toHaveLength(1);
    // One row changed twice beside another: the second round leaves key
    // order (a, b, then a again), so the batch locks both rows first.
    expect(sizes(await queriesFor(b.runSet(add, ["a", 1], "a"), b.runSet(add, ["b", 1], "b"), b.runSet(set, ["a", 7], "a")))).toEqual([3]);
    expect(locked).toHaveLength(2);
    expect([...locked[1]!].sort()).toEqual(["a", "b"]);
    expect(await contents(items)).toEqual([["a", 7], ["b", 3], ["c", 2], ["x", 1], ["y", 1], ["z", 9]]);
  });

  it("with lockSql, two batches whose merged statements take the same rows in opposite orders do not deadlock", async () => {
    const items = await itemsTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 0), ('b', 0)`);
    /** Input rows `[k]`. Locks its rows one by one in the given key order, pausing after each: a plan may visit rows in any order. */
    const lockingIn = (direction: "asc" | "desc"): SetTemplate => ({
      key: `lock ${direction}`,
      keyColumn: "k",
      locks: true,
      prepared: { name: `test_lock_${++templateCount}`, text: `select k, v from ${items} where k = $1::text for update` },
      render(rows) {
        const keys = rows.map((r) => String(r[0])).sort();
        if (direction === "desc") keys.reverse();
        return `select u.k, (select x.v from ${items} as x where x.k = u.k for update) as v, pg_sleep(0.2) is null as slept from unnest(${pgArray(keys, "text")}) as u(k)`;
      },
    });
    const [asc, desc] = [lockingIn("asc"), lockingIn("desc")];
    async function race(lockSql?: (keys: string[]) => string): Promise<WatchedPool> {
      const db = watched(pool);
      const b = batcher(db, { maxInFlight: 2, lockSql });
      const first = [b.runSet(asc, ["a"], "a"), b.runSet(asc, ["b"], "b")];
      await nextTurn();
      const second = [b.runSet(desc, ["a"], "a"), b.runSet(desc, ["b"], "b")];
      const rows = await Promise.all([...first, ...second]);
      expect(rows.map((r) => r.map((row) => row.k))).toEqual([["a"], ["b"], ["a"], ["b"]]);
      return db;
    }

    const locked = await race(lockItems(items));
    // Both batches went through as sent: neither failed and was re-run.
    expect(locked.sent).toHaveLength(2);
    for (const q of locked.queries) expect(q.startsWith(`select 1 from ${items} where k = any(`)).toBe(true);

    // The control: without the lock, the same two batches deadlock; the server
    // aborts one, and its statements are run again one by one.
    const unlocked = await race();
    expect(unlocked.sent).toHaveLength(4);
    const retried = unlocked.sent.slice(2) as PreparedQuery[];
    expect(retried.map((q) => q.values)).toEqual([["a"], ["b"]]);
    expect([asc.prepared.name, desc.prepared.name]).toContain(retried[0]!.name);
    expect(retried[1]!.name).toBe(retried[0]!.name);
  });

  it("rejects only the caller whose row broke a merged statement; the others are committed exactly once", async () => {
    const items = await itemsTable();
    const counter = await counterTable();
    await pool.query(`insert into ${items} (k, v) values ('a', 1), ('b', 1), ('c', 1), ('d', 1)`);
    const db = watched(pool);
    const b = batcher(db, { convertError: (e) => new Error(`converted: ${e.message}`, { cause: e }), lockSql: lockItems(items) });
    const add = templates.add(items);
    const outcomes = await Promise.allSettled([
      b.runSet(add, ["a", 1], "a"),
      b.runSet(add, ["b", 1], "b"),
      b.runSet(add, ["c", -5], "c"), // check_violation: v would be -4
      b.run(increment(counter)),
      b.runSet(add, ["d", 1], "d"),
    ]);
    expect(outcomes.map((o) => o.status)).toEqual(["fulfilled", "fulfilled", "rejected", "fulfilled", "fulfilled"]);
    const failure = (outcomes[2] as PromiseRejectedResult).reason as Error;
    expect(failure.message).toMatch(/^converted: new row for relation "items_\d+" violates check constraint/);
    expect(failure.cause).toMatchObject({ code: "23514" });
    const value = (i: number) => (outcomes[i] as PromiseFulfilledResult<unknown>).value;
    expect([value(0), value(1), value(3), value(4)]).toEqual([[{ k: "a", v: 2 }], [{ k: "b", v: 2 }], [{ n: 1 }], [{ k: "d", v: 2 }]]);
    expect(await contents(items)).toEqual([["a", 2], ["b", 2], ["c", 1], ["d", 2]]);
    expect(await counterValue(counter)).toBe(1);

    // The merged batch rolled back as a whole, then every statement ran alone, in the order issued.
    expect(typeof db.sent[0]).toBe("string");
    const prepared = (k: string, n: number) => ({ name: add.prepared.name, text: add.prepared.text, values: [k, n] });
    expect(db.sent.slice(1)).toEqual([prepared("a", 1), prepared("b", 1), prepared("c", -5), increment(counter), prepared("d", 1)]);
  });

  describe("pgArray", () => {
    /** Text that array syntax, string literals or a careless splitter could take for something else. */
    const hostile = [
      'say "hi"',
      "back\\slash",
      "trailing backslash\\",
      "\\",
      '\\"',
      "it's",
      "''",
      "a,b",
      "{x}",
      "}{",
      "{",
      "}",
      " padded ",
      " ",
      "NULL",
      "null",
      "",
      "emoji 🎉👍🏽",
      "中文テキスト",
      "line\nbreak\r\n",
      "tab\there",
      "E'\\x41'",
      "$1 ? :name",
      ";\nselect 1; --",
      "\\N",
      "\u00a0nbsp",
      "e\u0301 decomposed",
    ];
    const cases: Array<{ type: "text" | "int4" | "int8" | "timestamptz"; values: unknown[]; expected: unknown[]; column: string }> = [
      { type: "text", values: [...hostile, null], expected: [...hostile, null], column: "v" },
      { type: "int4", values: [0, 1, -1, 2147483647, -2147483648, null], expected: [0, 1, -1, 2147483647, -2147483648, null], column: "v" },
      {
        type: "int8",
        values: [0, -1, 2 ** 40, Number.MAX_SAFE_INTEGER, -Number.MAX_SAFE_INTEGER, 9223372036854775807n, -9223372036854775808n, null],
        expected: ["0", "-1", String(2 ** 40), String(Number.MAX_SAFE_INTEGER), String(-Number.MAX_SAFE_INTEGER), "9223372036854775807", "-9223372036854775808", null],
        column: "v::text",
      },
      {
        type: "timestamptz",
        values: [new Date(0), new Date("2026-02-03T04:05:06.789Z"), new Date("1969-12-31T23:59:59.999Z"), new Date("0001-01-01T00:00:00.001Z"), new Date("9999-12-31T23:59:59.999Z"), null],
        expected: [0, Date.parse("2026-02-03T04:05:06.789Z"), -1, Date.parse("0001-01-01T00:00:00.001Z"), Date.parse("9999-12-31T23:59:59.999Z"), null].map((ms) => (ms === null ? null : String(ms))),
        // Milliseconds since the epoch, exactly: independent of the session's time zone and of the driver's date parsing.
        column: "(extract(epoch from v) * 1000)::int8::text",
      },
    ];

    async function roundTrip(db: QueryPool): Promise<void> {
      for (const { type, values, expected, column } of cases) {
        const result = (await db.query(`select ${column} as v from unnest(${pgArray(values, type)}) with ordinality as u(v, i) order by i`)) as pg.QueryResult<{ v: unknown }>;
        expect(result.rows.map((r) => r.v), type).toEqual(expected);
        // One element at a time too: each is the whole array, next to both braces.
        for (const [i, value] of values.entries()) {
          const one = (await db.query(`select ${column} as v from unnest(${pgArray([value], type)}) as u(v)`)) as pg.QueryResult<{ v: unknown }>;
          expect(one.rows, `${type} ${JSON.stringify(String(value))}`).toEqual([{ v: expected[i] }]);
        }
        const empty = (await db.query(`select cardinality(${pgArray([], type)}) as n`)) as pg.QueryResult<{ n: number }>;
        expect(empty.rows).toEqual([{ n: 0 }]);
      }
    }

    it("round-trips hostile text, nulls, int4, int8 and timestamptz values exactly", async () => {
      await roundTrip(pool);
    });

    it("means the same with standard_conforming_strings off, in any time zone", async () => {
      const client = await pool.connect();
      try {
        await client.query("set standard_conforming_strings = off");
        await client.query("set escape_string_warning = off");
        await client.query("set timezone = 'America/St_Johns'");
        // The session really reads plain literals the old way: a backslash escapes.
        expect((await client.query<{ v: string }>("select 'x\\\\y' as v")).rows).toEqual([{ v: "x\\y" }]);
        await roundTrip(client);
      } finally {
        // Not back into the shared pool with these settings.
        client.release(true);
      }
    });
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
