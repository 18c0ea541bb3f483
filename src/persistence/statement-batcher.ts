/** What the batcher needs of a `pg` Pool: a multi-statement query answers with one result per statement. */
export interface QueryPool {
  query(sql: string): Promise<unknown>;
}

type Rows = Array<Record<string, unknown>>;

function rowsOf(result: unknown): Rows {
  return (result as { rows?: Rows } | undefined)?.rows ?? [];
}

/**
 * Group commit for PostgreSQL writes. Each task state change is already one
 * self-contained statement (see task-sql.ts); under load, the statements
 * that arrive while earlier batches are in flight travel together as ONE
 * simple-protocol query: one socket write, one round trip and one commit for
 * the lot. A socket write to the database cost the service more CPU than the
 * SQL itself, so throughput grows with batch size while an idle system still
 * sends each statement at once (a batch of one).
 *
 * A multi-statement query runs as one implicit transaction: either every
 * statement commits or none does, and every caller's promise settles only
 * after the commit. If one statement fails (say a duplicate idempotency
 * key), the whole batch rolled back, so each statement is then run on its
 * own and only the failing one reports its error. Connection-level failures
 * are not retried: whether the batch committed is unknown, exactly as it
 * would be for a single statement.
 */
export interface StatementBatcher {
  /** Runs one statement (literal SQL, no placeholders) with the next batch; resolves with its rows after the commit. */
  run(sql: string): Promise<Rows>;
  /** Waits for everything queued and in flight. */
  drain(): Promise<void>;
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

interface Item {
  sql: string;
  resolve: (rows: Rows) => void;
  reject: (e: unknown) => void;
}

/** A SQLSTATE the server reported for one statement; classes 08 (connection) and 57 (operator intervention) are about the session, not the SQL. */
function isStatementError(e: unknown): boolean {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) && !/^(08|57)/.test(code);
}

export function createStatementBatcher({ pool, maxBatch, maxInFlight, convertError }: StatementBatcherOptions): StatementBatcher {
  const queued: Item[] = [];
  let inFlight = 0;
  let scheduled = false;
  const idle = new Set<() => void>();

  const fail = (item: Item, e: unknown) => item.reject(e instanceof Error ? convertError(e) : e);

  async function runAlone(item: Item): Promise<void> {
    try {
      item.resolve(rowsOf(await pool.query(item.sql)));
    } catch (e: unknown) {
      fail(item, e);
    }
  }

  async function flush(batch: Item[]): Promise<void> {
    if (batch.length === 1) return runAlone(batch[0]!);
    let results: unknown;
    try {
      results = await pool.query(batch.map((i) => i.sql).join(";\n"));
    } catch (e: unknown) {
      if (!isStatementError(e)) {
        for (const item of batch) fail(item, e);
        return;
      }
      await Promise.all(batch.map(runAlone));
      return;
    }
    const list = Array.isArray(results) ? results : [results];
    batch.forEach((item, i) => item.resolve(rowsOf(list[i])));
  }

  function pump(): void {
    scheduled = false;
    while (inFlight < maxInFlight && queued.length > 0) {
      const batch = queued.splice(0, maxBatch);
      inFlight++;
      void flush(batch).finally(() => {
        inFlight--;
        pump();
      });
    }
    if (inFlight === 0 && queued.length === 0) {
      for (const done of idle) done();
      idle.clear();
    }
  }

  return {
    run(sql) {
      return new Promise((resolve, reject) => {
        queued.push({ sql, resolve, reject });
        // Statements issued in the same turn of the event loop (one socket
        // read may carry many results) join the same batch.
        if (!scheduled && inFlight < maxInFlight) {
          scheduled = true;
          setImmediate(pump);
        }
      });
    },
    drain() {
      if (inFlight === 0 && queued.length === 0) return Promise.resolve();
      return new Promise((resolve) => idle.add(resolve));
    },
  };
}
