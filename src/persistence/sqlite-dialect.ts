import { DatabaseSync, type SQLInputValue, type StatementSync } from "node:sqlite";
import { SqliteDialect, type SqliteDatabase } from "kysely";

/** Prepared statements kept per database: the hot path's task writes come in a few dozen shapes. */
const KEPT_STATEMENTS = 128;

const READER = /^\s*(select|pragma|explain|with)|\breturning\b/i;

/**
 * Kysely's SQLite dialect over `node:sqlite`, as `@mikro-orm/sql`'s
 * `NodeSqliteDialect`, except that it keeps the compiled form of statements
 * that bind their values. The ORM writes every value into its SQL text, so
 * its statements rarely repeat and are compiled each time; the task writes
 * (task-sql.ts) bind theirs instead, and compiling each of their shapes
 * once saves most of the embedded backend's time in SQLite.
 */
export class KeepingSqliteDialect extends SqliteDialect {
  constructor(file: string) {
    super({ database: async () => keeping(new DatabaseSync(file)) });
  }
}

/** The `better-sqlite3`-shaped database Kysely's driver calls: `prepare(sql)`, then `all`, `run` or `iterate` with the values. */
function keeping(db: DatabaseSync): SqliteDatabase {
  const kept = new Map<string, { statement: StatementSync; reader: boolean }>();
  const compile = (sql: string, values: readonly unknown[]): StatementSync => {
    if (values.length === 0) return db.prepare(sql);
    const found = kept.get(sql);
    if (found) {
      // Most recently used last, so the first entry is the one to drop.
      kept.delete(sql);
      kept.set(sql, found);
      return found.statement;
    }
    const statement = db.prepare(sql);
    kept.set(sql, { statement, reader: READER.test(sql) });
    if (kept.size > KEPT_STATEMENTS) kept.delete(kept.keys().next().value!);
    return statement;
  };
  return {
    prepare(sql: string) {
      return {
        reader: kept.get(sql)?.reader ?? READER.test(sql),
        all: (values: readonly unknown[]) => compile(sql, values).all(...values.map(bindable)),
        run: (values: readonly unknown[]) => compile(sql, values).run(...values.map(bindable)),
        // Never a kept statement: running it again while this iteration is open would end the iteration.
        iterate: (values: readonly unknown[]) => db.prepare(sql).iterate(...values.map(bindable)),
      };
    },
    close() {
      kept.clear();
      db.close();
    },
  };
}

/**
 * A value as the ORM would have written it into SQL text
 * (`SqlitePlatform.quoteValue`), so both paths store the same whatever the
 * column's type. node:sqlite binds every JavaScript number as a REAL, where
 * the ORM wrote whole numbers, dates and booleans as INTEGER literals: a
 * TEXT column would then keep '7.0' instead of '7'.
 */
export function bindable(value: unknown): SQLInputValue {
  if (value === undefined || value === null) return null;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new TypeError(`cannot bind ${value} as an SQLite value`);
    return Number.isSafeInteger(value) ? BigInt(value) : value;
  }
  if (value instanceof Date) {
    if (Number.isNaN(value.getTime())) throw new TypeError("cannot bind an invalid date as an SQLite value");
    return BigInt(value.getTime());
  }
  if (typeof value === "boolean") return value ? 1n : 0n;
  if (typeof value === "string" || typeof value === "bigint" || value instanceof Uint8Array) return value;
  if (typeof value === "object" && !Array.isArray(value)) return JSON.stringify(value);
  throw new TypeError(`cannot bind a ${Array.isArray(value) ? "list" : typeof value} as one SQLite value`);
}
