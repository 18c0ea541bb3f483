/**
 * The SQLite dialect that keeps compiled statements, on a real in-memory
 * `node:sqlite` database. That the task writes store what the ORM reads
 * back is covered by the persistence and delivery tests on SQLite.
 */
import { DatabaseSync } from "node:sqlite";
import { SqlitePlatform } from "@mikro-orm/sql";
import { CompiledQuery, Kysely } from "kysely";
import { afterEach, describe, expect, it, vi } from "vitest";
import { KeepingSqliteDialect } from "../../src/persistence/sqlite-dialect.js";

let db: Kysely<unknown> | undefined;
afterEach(async () => {
  vi.restoreAllMocks();
  await db?.destroy();
  db = undefined;
});

async function open(): Promise<Kysely<unknown>> {
  db = new Kysely<unknown>({ dialect: new KeepingSqliteDialect(":memory:") });
  return db;
}

async function rows(k: Kysely<unknown>, sql: string, values: unknown[] = []): Promise<Array<Record<string, unknown>>> {
  return (await k.executeQuery<Record<string, unknown>>(CompiledQuery.raw(sql, values))).rows;
}

describe("SQLite dialect keeping compiled statements", () => {
  it("stores a bound value as the ORM's SQL text stores it, in a column of any type", async () => {
    const k = await open();
    const platform = new SqlitePlatform();
    await rows(k, "create table t (n integer, r real, s text, d datetime, j json, u)");
    const values = [7, -3, 0, 1.5, true, false, new Date(1764000000123), "it's", "", null, { a: "b" }, 2n ** 40n];
    for (const value of values) {
      await rows(k, "delete from t");
      // Bound by the dialect, and written into the text the way the ORM writes it.
      await rows(k, "insert into t values (?, ?, ?, ?, ?, ?)", Array(6).fill(value));
      await rows(k, platform.formatQuery("insert into t values (?, ?, ?, ?, ?, ?)", Array(6).fill(value)));
      const [bound, written] = await rows(
        k,
        "select typeof(n) || ' ' || quote(n) || ', ' || typeof(r) || ' ' || quote(r) || ', ' || typeof(s) || ' ' || quote(s) || ', ' || typeof(d) || ' ' || quote(d) || ', ' || typeof(j) || ' ' || quote(j) || ', ' || typeof(u) || ' ' || quote(u) as stored from t order by rowid",
      );
      expect(bound, String(value)).toEqual(written);
    }
  });

  it("refuses what the ORM could not have written: a list, a number that is not finite, an invalid date", async () => {
    const k = await open();
    await expect(rows(k, "select ? as v", [[1, 2]])).rejects.toThrow(/cannot bind a list as one SQLite value/);
    await expect(rows(k, "select ? as v", [Number.NaN])).rejects.toThrow(/cannot bind NaN/);
    await expect(rows(k, "select ? as v", [Infinity])).rejects.toThrow(/cannot bind Infinity/);
    await expect(rows(k, "select ? as v", [new Date(Number.NaN)])).rejects.toThrow(/invalid date/);
  });

  it("compiles a statement with values once while it is kept, and answers each call with its own values", async () => {
    const k = await open();
    const compile = vi.spyOn(DatabaseSync.prototype, "prepare");
    for (let round = 0; round < 3; round++) expect(await rows(k, "select ? + 1 as v", [round])).toEqual([{ v: round + 1 }]);
    expect(compile.mock.calls.filter(([sql]) => sql === "select ? + 1 as v")).toHaveLength(1);
    // Without values (as the ORM sends its statements) each call compiles.
    for (let round = 0; round < 2; round++) await rows(k, "select 1 as v");
    expect(compile.mock.calls.filter(([sql]) => sql === "select 1 as v")).toHaveLength(2);
  });

  it("drops the least recently used statement past the number it keeps, and still answers right", async () => {
    const k = await open();
    const compile = vi.spyOn(DatabaseSync.prototype, "prepare");
    const compiled = (sql: string) => compile.mock.calls.filter(([s]) => s === sql).length;
    for (let round = 0; round < 2; round++) {
      for (let shape = 0; shape < 300; shape++) expect(await rows(k, `select ? + ${shape} as v`, [round])).toEqual([{ v: round + shape }]);
    }
    // 300 shapes through a smaller store: each was dropped before its turn came again.
    expect(compiled("select ? + 0 as v")).toBe(2);
    // One used again at once is still kept.
    await rows(k, "select ? + 299 as v", [5]);
    expect(compiled("select ? + 299 as v")).toBe(2);
    // A statement with a RETURNING clause is read as rows, kept or not.
    await rows(k, "create table u (id integer primary key, v text)");
    for (const v of ["a", "b"]) expect(await rows(k, "insert into u (v) values (?) returning v", [v])).toEqual([{ v }]);
  });
});
