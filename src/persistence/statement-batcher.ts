import { createGroupCommit } from "./group-commit.js";

/**
 * Group commit for PostgreSQL writes (see group-commit.ts). Each task state
 * change is already one self-contained statement (see task-sql.ts); a batch
 * of them travels as ONE simple-protocol query: one socket write, one round
 * trip and one commit for the lot. A multi-statement query runs as one
 * implicit transaction, so a statement error (say a duplicate idempotency
 * key) rolled the whole batch back and each statement is then run alone.
 * Connection-level failures are not retried: whether the batch committed is
 * unknown, exactly as it would be for a single statement.
 */
export interface StatementBatcher {
  /**
   * Runs one statement (literal SQL, no placeholders) with the next batch;
   * resolves with its rows after the commit. `lockKey` is the row it changes
   * (the task id): a batch runs its statements in key order, so two batches
   * (on any instance) lock rows in the same order and cannot deadlock.
   */
  run(sql: string, lockKey?: string): Promise<Rows>;
  /** Waits for everything queued and in flight. */
  drain(): Promise<void>;
}

/** What the batcher needs of a `pg` Pool: a multi-statement query answers with one result per statement. */
export interface QueryPool {
  query(sql: string): Promise<unknown>;
}

export interface StatementBatcherOptions {
  pool: QueryPool;
  /** Most statements in one query. */
  maxBatch: number;
  /** Most queries in flight at once, each on its own pooled connection. */
  maxInFlight: number;
  /** Turns a driver error into the error callers see (the ORM's exception classes). */
  convertError: (e: Error) => Error;
}

type Rows = Array<Record<string, unknown>>;

function rowsOf(result: unknown): Rows {
  return (result as { rows?: Rows } | undefined)?.rows ?? [];
}

/**
 * An error the server reported while the session lives on (it carries a
 * severity and a SQLSTATE), so the batch is known to have rolled back.
 * Socket errors such as EPIPE look like SQLSTATEs but are not. Classes 08
 * (connection) and 57 (operator intervention) mostly mean the session is
 * gone, except a query the server refused to parse (08P01, e.g. a NUL in the
 * text) and a cancelled statement (57014): both ran nothing.
 */
function isStatementError(e: unknown): boolean {
  const err = e as { code?: unknown; severity?: unknown } | null;
  if (typeof err?.severity !== "string" || typeof err.code !== "string" || !/^[0-9A-Z]{5}$/.test(err.code)) return false;
  return err.code === "08P01" || err.code === "57014" || !/^(08|57)/.test(err.code);
}

interface Statement {
  sql: string;
  lockKey: string;
}

export function createStatementBatcher({ pool, maxBatch, maxInFlight, convertError }: StatementBatcherOptions): StatementBatcher {
  const converted = (e: unknown) => (e instanceof Error ? convertError(e) : e);
  const group = createGroupCommit<Statement, Rows>({
    maxBatch,
    maxInFlight,
    async runBatch(statements) {
      // Key order (stable, so one row's changes keep their arrival order);
      // the statements were issued concurrently, so any order is a valid one.
      const key = (i: number) => statements[i]!.lockKey;
      const order = statements.map((_, i) => i).sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : a - b));
      let results: unknown;
      try {
        results = await pool.query(order.map((i) => statements[i]!.sql).join(";\n"));
      } catch (e: unknown) {
        // Keep the driver's error: retryAlone needs its SQLSTATE. Callers
        // get a converted one from runOne, or from the rejection below.
        throw isStatementError(e) ? e : converted(e);
      }
      const list = Array.isArray(results) ? results : [results];
      const rows: Rows[] = new Array<Rows>(statements.length);
      order.forEach((original, position) => (rows[original] = rowsOf(list[position])));
      return rows;
    },
    async runOne({ sql }) {
      try {
        return rowsOf(await pool.query(sql));
      } catch (e: unknown) {
        throw converted(e);
      }
    },
    retryAlone: isStatementError,
  });
  return {
    run: (sql, lockKey = "") => group.run({ sql, lockKey }),
    drain: () => group.drain(),
  };
}
