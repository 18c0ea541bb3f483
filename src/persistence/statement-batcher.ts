import { createGroupCommit } from "./group-commit.js";

/**
 * Group commit for PostgreSQL writes (see group-commit.ts). A batch of
 * statements travels as ONE simple-protocol query: one socket write, one
 * round trip and one commit for the lot. Statements of the same shape (a
 * `SetTemplate`: task-sql.ts makes one per kind of state change) are merged
 * into one set-based statement over arrays of their values, so PostgreSQL
 * parses and plans each shape once per batch instead of once per change.
 *
 * A multi-statement query runs as one implicit transaction, so a statement
 * error (say a duplicate idempotency key) rolled the whole batch back, and
 * each statement is then run alone. Two kinds of failure fail every caller
 * instead. Connection-level failures: whether the batch committed is
 * unknown, exactly as it would be for a single statement. And a statement
 * cancelled (statement_timeout, or an operator): whatever slowed it (a
 * stalled disk, a long lock wait) would most likely slow the others as
 * much, and running them one by one would cost each caller another timeout
 * per statement ahead of it.
 */
export interface StatementBatcher {
  /**
   * Runs one statement (literal SQL, no placeholders) with the next batch;
   * resolves with its rows after the commit. `lockKey` is the row it changes
   * (the task id): see `StatementBatcherOptions.lockSql`.
   */
  run(sql: string, lockKey?: string): Promise<Rows>;
  /**
   * Runs `template` for one input row with the next batch, merged with the
   * batch's other rows of the same template; resolves with the result rows
   * whose `template.keyColumn` equals `lockKey`.
   */
  runSet(template: SetTemplate, row: unknown[], lockKey: string): Promise<Rows>;
  /** Waits for everything queued and in flight. */
  drain(): Promise<void>;
}

/** One shape of statement that can run for many input rows at once. */
export interface SetTemplate {
  /** Statements whose templates have the same key merge. */
  readonly key: string;
  /** Literal SQL running the statement for all these rows (no two with the same lock key). */
  render(rows: readonly unknown[][]): string;
  /** The statement for one row, with the row's values as parameters `$1…`: a batch of one runs it as a named prepared statement. */
  readonly prepared: { name: string; text: string };
  /** The result column that holds each row's lock key. */
  readonly keyColumn: string;
  /** Whether the row behind the lock key already exists and is locked by the statement (false for inserts). */
  readonly locks: boolean;
}

/** A named prepared statement and its parameters, as `pg` takes them. */
export interface PreparedQuery {
  name: string;
  text: string;
  values: unknown[];
}

/** What the batcher needs of a `pg` Pool: a multi-statement query answers with one result per statement. */
export interface QueryPool {
  query(sql: string | PreparedQuery): Promise<unknown>;
}

export interface StatementBatcherOptions {
  pool: QueryPool;
  /** Most statements in one query. */
  maxBatch: number;
  /** Most queries in flight at once, each on its own pooled connection. */
  maxInFlight: number;
  /** Turns a driver error into the error callers see (the ORM's exception classes). */
  convertError: (e: Error) => Error;
  /**
   * A statement that locks the rows of these keys in one fixed order
   * (`select … order by key for update`). A batch that changes several rows
   * runs it first: a set-based statement locks its rows in whatever order its
   * plan visits them, and two batches (on any instance) taking the same rows
   * in different orders would deadlock. So would a batch that changes one
   * row twice: its rounds (see `plan`) leave key order, and a compare-and-set
   * that matched nothing in round 0 took no lock. Statements of one row each,
   * on distinct rows, run in key order and need no such lock.
   */
  lockSql?: (keys: string[]) => string;
}

type Rows = Array<Record<string, unknown>>;

function rowsOf(result: unknown): Rows {
  return (result as { rows?: Rows } | undefined)?.rows ?? [];
}

/**
 * A statement error after which the batch's statements are each run alone:
 * one the server reported while the session lives on (it carries a severity
 * and a SQLSTATE), so the batch is known to have rolled back. Socket errors
 * such as EPIPE look like SQLSTATEs but are not. Classes 08 (connection) and
 * 57 (operator intervention) mostly mean the session is gone, except a query
 * the server refused to parse (08P01, e.g. a NUL in the text), which ran
 * nothing. A cancelled statement (57014) also ran nothing, but fails the
 * whole batch (see the top of this file).
 */
function retriedAlone(e: unknown): boolean {
  const err = e as { code?: unknown; severity?: unknown } | null;
  if (typeof err?.severity !== "string" || typeof err.code !== "string" || !/^[0-9A-Z]{5}$/.test(err.code)) return false;
  return err.code === "08P01" || !/^(08|57)/.test(err.code);
}

/** A batch that failed before anything reached the database. */
class NotSent extends Error {
  constructor(cause: unknown) {
    super("batch not sent", { cause });
  }
}

type Statement = { lockKey: string } & ({ sql: string; template?: undefined; row?: undefined } | { sql?: undefined; template: SetTemplate; row: unknown[] });

/** What one statement of the query carries: a literal, or the merged rows of one template. */
interface Unit {
  members: number[];
  template?: SetTemplate;
  sql?: string;
}

/**
 * The statements of a batch as the units of one query. A statement's round is
 * how many earlier statements of the batch have its lock key: rounds run in
 * order, so changes to one row keep their arrival order and a merged
 * statement never sees the same row twice. Within a round, literals run in
 * key order and each template's rows merge into the unit of its first one.
 */
function plan(statements: Statement[]): Unit[] {
  const round: number[] = [];
  const seen = new Map<string, number>();
  for (const s of statements) {
    const r = s.lockKey ? (seen.get(s.lockKey) ?? 0) : 0;
    if (s.lockKey) seen.set(s.lockKey, r + 1);
    round.push(r);
  }
  const key = (i: number) => statements[i]!.lockKey;
  const order = statements
    .map((_, i) => i)
    .sort((a, b) => round[a]! - round[b]! || (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : a - b));
  const units: Unit[] = [];
  let currentRound = -1;
  let merged = new Map<string, Unit>();
  for (const i of order) {
    if (round[i] !== currentRound) {
      currentRound = round[i]!;
      merged = new Map();
    }
    const s = statements[i]!;
    if (!s.template) {
      units.push({ members: [i], sql: s.sql });
      continue;
    }
    let unit = merged.get(s.template.key);
    if (!unit) {
      unit = { members: [], template: s.template };
      merged.set(s.template.key, unit);
      units.push(unit);
    }
    unit.members.push(i);
  }
  for (const unit of units) {
    if (unit.template) unit.sql = unit.template.render(unit.members.map((i) => statements[i]!.row!));
  }
  return units;
}

export function createStatementBatcher({ pool, maxBatch, maxInFlight, convertError, lockSql }: StatementBatcherOptions): StatementBatcher {
  const generations = new WeakMap<SetTemplate, number>();
  const preparedOf = (template: SetTemplate) => {
    const generation = generations.get(template);
    return generation === undefined ? template.prepared : { name: `${template.prepared.name}_${generation}`, text: template.prepared.text };
  };
  const prepareAgain = (template: SetTemplate) => generations.set(template, (generations.get(template) ?? 0) + 1);
  const converted = (e: unknown) => (e instanceof Error ? convertError(e) : e);
  const group = createGroupCommit<Statement, Rows>({
    maxBatch,
    maxInFlight,
    async runBatch(statements) {
      let units: Unit[];
      try {
        units = plan(statements);
      } catch (e: unknown) {
        // A value the set form cannot render (a bug, not the database's
        // doing): nothing was sent, so each statement runs alone, as a
        // prepared statement with its values as parameters, and any error
        // reaches only its own caller.
        throw new NotSent(e);
      }
      // Units of one row each already run in key order; only a merged
      // statement locks rows in an order of its own choosing.
      const locking = statements.filter((s) => s.lockKey && (!s.template || s.template.locks)).map((s) => s.lockKey);
      const lockKeys = [...new Set(locking)];
      const merged = units.some((u) => u.template?.locks && u.members.length > 1);
      const repeated = locking.length > lockKeys.length;
      const lock = lockSql && lockKeys.length > 1 && (merged || repeated) ? lockSql(lockKeys) : undefined;
      const sqls = units.map((u) => u.sql!);
      let results: unknown;
      try {
        results = await pool.query((lock ? [lock, ...sqls] : sqls).join(";\n"));
      } catch (e: unknown) {
        // Keep the driver's error for a retry: retryAlone needs its
        // SQLSTATE. Callers then get a converted one from runOne.
        throw retriedAlone(e) ? e : converted(e);
      }
      const list = Array.isArray(results) ? results : [results];
      const offset = lock ? 1 : 0;
      const out = new Array<Rows>(statements.length);
      units.forEach((unit, position) => {
        const rows = rowsOf(list[position + offset]);
        if (!unit.template) {
          out[unit.members[0]!] = rows;
          return;
        }
        const byKey = new Map<string, Rows>();
        for (const row of rows) {
          const k = String(row[unit.template.keyColumn]);
          const found = byKey.get(k);
          if (found) found.push(row);
          else byKey.set(k, [row]);
        }
        for (const i of unit.members) out[i] = byKey.get(statements[i]!.lockKey) ?? [];
      });
      return out;
    },
    async runOne(s) {
      try {
        if (!s.template) return rowsOf(await pool.query(s.sql));
        try {
          return rowsOf(await pool.query({ ...preparedOf(s.template), values: s.row }));
        } catch (e: unknown) {
          // 0A000: a migration changed a column's type under the prepared
          // statement, which then fails on every execution on every
          // connection that prepared it. A new name prepares it afresh.
          if ((e as { code?: unknown }).code !== "0A000") throw e;
          prepareAgain(s.template);
          return rowsOf(await pool.query({ ...preparedOf(s.template), values: s.row }));
        }
      } catch (e: unknown) {
        throw converted(e);
      }
    },
    retryAlone: (e) => e instanceof NotSent || retriedAlone(e),
  });
  return {
    run: (sql, lockKey = "") => group.run({ sql, lockKey }),
    runSet: (template, row, lockKey) => group.run({ template, row, lockKey }),
    drain: () => group.drain(),
  };
}
