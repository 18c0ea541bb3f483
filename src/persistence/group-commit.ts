/**
 * Group commit: units of write work that arrive while earlier batches are in
 * flight are committed together, in one transaction, and every caller's
 * promise settles only after that commit. An idle system still commits each
 * unit at once (a batch of one); under load, batches grow by themselves and
 * the per-commit costs (a round trip and socket writes on PostgreSQL, an
 * fsync on SQLite) are shared.
 *
 * If a batch fails and the database is known to have rolled all of it back
 * (`retryAlone`), each unit is run again on its own, so only the unit at
 * fault reports an error. Otherwise (a lost connection: whether the commit
 * happened is unknown) every caller gets the error, exactly as a lone unit
 * would.
 */
export interface GroupCommit<I, R> {
  /** Runs one unit with the next batch; resolves with its result after the commit. */
  run(item: I): Promise<R>;
  /** Waits for everything queued and in flight. */
  drain(): Promise<void>;
}

export interface GroupCommitOptions<I, R> {
  /** Most units in one batch. */
  maxBatch: number;
  /** Most batches in flight at once. */
  maxInFlight: number;
  /** Commits several units atomically; one result per unit, in order. */
  runBatch(items: I[]): Promise<R[]>;
  /** Commits one unit. */
  runOne(item: I): Promise<R>;
  /** Whether `runBatch`'s error means the whole batch rolled back (so each unit may be retried alone). */
  retryAlone(e: unknown): boolean;
}

interface Pending<I, R> {
  item: I;
  resolve: (result: R) => void;
  reject: (e: unknown) => void;
}

export function createGroupCommit<I, R>({ maxBatch, maxInFlight, runBatch, runOne, retryAlone }: GroupCommitOptions<I, R>): GroupCommit<I, R> {
  const queued: Array<Pending<I, R>> = [];
  let inFlight = 0;
  let scheduled = false;
  const idle = new Set<() => void>();

  async function alone(p: Pending<I, R>): Promise<void> {
    try {
      p.resolve(await runOne(p.item));
    } catch (e: unknown) {
      p.reject(e);
    }
  }

  async function flush(batch: Array<Pending<I, R>>): Promise<void> {
    if (batch.length === 1) return alone(batch[0]!);
    let results: R[];
    try {
      results = await runBatch(batch.map((p) => p.item));
    } catch (e: unknown) {
      if (!retryAlone(e)) {
        for (const p of batch) p.reject(e);
        return;
      }
      // Sequentially: the units of one batch may touch the same rows.
      for (const p of batch) await alone(p);
      return;
    }
    batch.forEach((p, i) => p.resolve(results[i]!));
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
    run(item) {
      return new Promise<R>((resolve, reject) => {
        queued.push({ item, resolve, reject });
        // Units issued in the same turn of the event loop (one socket read
        // may carry many results) join the same batch.
        if (!scheduled && inFlight < maxInFlight) {
          scheduled = true;
          setImmediate(pump);
        }
      });
    },
    drain() {
      if (inFlight === 0 && queued.length === 0) return Promise.resolve();
      return new Promise<void>((resolve) => idle.add(resolve));
    },
  };
}
