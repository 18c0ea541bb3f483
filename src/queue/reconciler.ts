import type { Logger } from "../telemetry/logger.js";
import type { TaskRepository } from "../tasks/task-repository.js";
import type { PriorityQueue } from "./priority-queue.js";

export interface ReconcilerOptions {
  tasks: TaskRepository;
  queue: PriorityQueue;
  log: Logger;
  /** How often to check that the queue still holds its data. */
  checkIntervalMs: number;
  clock?: () => Date;
}

/** First and longest wait between attempts of a requested repair. */
const REPAIR_FIRST_DELAY_MS = 500;
const REPAIR_MAX_DELAY_MS = 30_000;

/**
 * Keeps the queue a faithful index of the database: rebuilds it at start,
 * when the queue signals it may have lost entries (a Redis reconnect, or a
 * refused numbering after a flush), when a periodic check finds its data
 * gone, and when a write may have left a PENDING task the queue does not
 * know (`repairSoon`). Every PENDING task is re-added with its original
 * priority and seq, so order is preserved; entries already present are left
 * alone.
 */
export class Reconciler {
  private running: Promise<void> | undefined;
  private again = false;
  private timer: NodeJS.Timeout | undefined;
  private repairTimer: NodeJS.Timeout | undefined;
  private repairWanted = false;
  private closed = false;
  private readonly unsubscribe: () => void;

  constructor(private readonly o: ReconcilerOptions) {
    this.unsubscribe = o.queue.onReset(() => this.rebuild("queue reset"));
  }

  /** Starts the periodic check. */
  start(): void {
    this.timer = setInterval(() => void this.check(), this.o.checkIntervalMs);
    this.timer.unref();
  }

  private async check(): Promise<void> {
    let intact: boolean;
    try {
      intact = await this.o.queue.intact();
    } catch (e: unknown) {
      // Unreachable right now; the reconnect will signal a reset.
      this.o.log.debug({ err: e }, "queue check failed");
      return;
    }
    if (!intact) this.rebuild("queue lost its data");
  }

  /**
   * A rebuild that fails partway (Redis refusing writes after the first
   * chunk) has already put the queue's marker back, so neither the check
   * nor a reconnect would ever run it again: keep retrying until one succeeds.
   */
  private rebuild(reason: string): void {
    this.run(reason).catch(() => this.repairSoon(`${reason}; the last rebuild failed`));
  }

  /** Rebuilds the queue from the database. Concurrent calls share one pass, plus one more if asked meanwhile. */
  run(reason: string): Promise<void> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    this.running = (async () => {
      try {
        do {
          this.again = false;
          const runnable = await this.o.tasks.listRunnable((this.o.clock ?? (() => new Date()))());
          await this.o.queue.reconcile(
            runnable.map((t) => ({ taskId: t.taskId, taskType: t.taskType, priority: t.priority, seq: t.seq })),
            await this.o.tasks.maxSeq(),
          );
          this.o.log.info({ reason, runnable: runnable.length }, "queue rebuilt from the database");
        } while (this.again);
      } catch (e: unknown) {
        this.o.log.warn({ err: e, reason }, "queue rebuild failed; will retry on the next signal or check");
        throw e;
      } finally {
        this.running = undefined;
      }
    })();
    return this.running;
  }

  /**
   * Rebuilds shortly, and keeps trying (with growing waits) until a rebuild
   * succeeds. For writes whose outcome left the queue behind the database:
   * a task made PENDING whose queue entry was refused (Redis up but refusing
   * writes, which no reconnect will announce), or an insert whose commit is
   * unknown because the connection failed. Requests while one is pending
   * share it.
   */
  repairSoon(reason: string): void {
    if (this.closed) return;
    // A request during a rebuild may be about a row that rebuild already
    // missed, so it asks for one more.
    this.repairWanted = true;
    if (!this.repairTimer) this.scheduleRepair(reason, REPAIR_FIRST_DELAY_MS);
  }

  private scheduleRepair(reason: string, delayMs: number): void {
    this.repairTimer = setTimeout(() => {
      this.repairWanted = false;
      this.run(reason).then(
        () => this.afterRepair(reason, REPAIR_FIRST_DELAY_MS),
        () => {
          this.repairWanted = true;
          this.afterRepair(reason, Math.min(delayMs * 2, REPAIR_MAX_DELAY_MS));
        },
      );
    }, delayMs);
    this.repairTimer.unref();
  }

  private afterRepair(reason: string, nextDelayMs: number): void {
    this.repairTimer = undefined;
    if (this.repairWanted && !this.closed) this.scheduleRepair(reason, nextDelayMs);
  }

  /** Safe to call twice. */
  close(): void {
    this.closed = true;
    clearTimeout(this.repairTimer);
    clearInterval(this.timer);
    this.unsubscribe();
  }
}
