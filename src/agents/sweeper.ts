import type { Logger } from "../telemetry/logger.js";
import type { PriorityQueue } from "../queue/priority-queue.js";
import type { AgentRepository, TaskRepository } from "../tasks/task-repository.js";
import type { TaskEvents } from "../tasks/task-events.js";
import { backoffMs, type RetryPolicy } from "../tasks/retry-policy.js";
import type { TaskRecord } from "../tasks/task-types.js";
import { isDatabaseBusy } from "../errors/errors.js";
import type { Dispatcher } from "./dispatcher.js";
import type { AgentSession } from "./agent-session.js";

export interface SweeperOptions {
  tasks: TaskRepository;
  agents: AgentRepository;
  queue: PriorityQueue;
  events: TaskEvents;
  dispatcher: Dispatcher;
  log: Logger;
  clock: () => Date;
  intervalMs: number;
  leaseTtlMs: number;
  retry: RetryPolicy;
  /** How long finished tasks are kept; undefined keeps them for ever. */
  retentionMs?: number;
  /** The clock other instances' leases are held to (the shared database's); undefined when no other instance can exist. */
  databaseTime?: () => Promise<Date>;
}

/** A lease a live session here holds, as the sweep found it. */
interface Held {
  taskId: string;
  agentId: string;
  attempt: number;
  session: AgentSession;
}

/** Rows handled per kind per sweep, so one sweep never holds the loop for long. */
const BATCH = 500;
/**
 * Finished tasks deleted per statement, and statements per sweep: up to
 * 4,000 per sweep and instance, more than one instance creates in a sweep
 * interval, so the history never grows without bound once retention is on.
 */
const PRUNE_BATCH = 1_000;
const PRUNE_ROUNDS = 4;
/** Longest wait between looks for newly expired history once none was left. */
const PRUNE_IDLE_MAX_MS = 60_000;
/** How often the task counts of ended database sessions are folded together. */
const FOLD_COUNTS_INTERVAL_MS = 60_000;
/** How often this instance's clock is compared with the database's. */
const CLOCK_CHECK_INTERVAL_MS = 60_000;

/**
 * The time-driven side of delivery, one pass every `intervalMs`:
 * - renews the leases of tasks held by this instance's live sessions and
 *   marks those agents as seen (one statement each for all of them), so only
 *   a lease nobody holds runs out and other instances know who is alive;
 * - ends attempts past their execution timeout (the agent is told);
 * - takes back tasks whose lease expired, wherever they were held (an
 *   instance that died), counting a failed attempt;
 * - queues retries whose backoff has passed;
 * - once a minute, folds the task counts kept by database sessions that
 *   have ended, so the metrics read stays a few rows, and compares this
 *   instance's clock with the database's (see `checkClock`);
 * - with a retention period, deletes finished tasks (and their audit rows)
 *   older than it, a bounded number per pass, beside the steps above so
 *   that a slow delete never holds up a lease renewal;
 * - first of all, has the dispatcher ask the queue again for agents it
 *   believes have nothing to do, in case an announcement of work was lost.
 * Changes are announced between instances over pub/sub, which can lose
 * them. So with each renewal, and at the next pass once the events feed
 * says something was missed, it also re-reads the tasks watched here
 * (WatchTask), and any held task whose lease was not renewed: a task no
 * longer leased to its holder (cancelled, or taken back, elsewhere) is
 * cancelled on the agent, which would otherwise work on it, its slot taken,
 * until it finished.
 * Dispatch itself never waits on this: it is event-driven.
 */
export class Sweeper {
  private timer: NodeJS.Timeout | undefined;
  private lastRenewal = 0;
  private nextPruneAt = 0;
  private nextFoldAt = 0;
  /** Where the current round of deletes resumes: rows before it were deleted or are not due. */
  private pruneFrom: Date | undefined;
  private pruning: Promise<void> | undefined;
  private sweeping: Promise<void> | undefined;
  private stopped = false;
  private nextCatchUpAt = 0;
  private nextClockCheckAt = 0;
  /** Announcements reported missed so far: a step under way when one is reported must not push the next look back. */
  private missedReports = 0;
  private stopListening: (() => void) | undefined;

  constructor(private readonly o: SweeperOptions) {}

  start(): void {
    this.stopListening = this.o.events.onMissed(() => {
      this.missedReports++;
      this.nextCatchUpAt = 0;
      // A renewal at once: a lost cancel or take-over shows up as a lease it cannot renew.
      this.lastRenewal = 0;
    });
    this.schedule();
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.sweep().finally(() => this.schedule()), this.o.intervalMs);
    this.timer.unref();
  }

  /** One pass at a time; each step's failure is logged and retried next time. */
  sweep(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    return (this.sweeping ??= this.pass().finally(() => (this.sweeping = undefined)));
  }

  private async pass(): Promise<void> {
    // First, so that work whose announcement was lost (another instance's,
    // over pub/sub) never waits behind the database steps below.
    this.o.dispatcher.recheck();
    const now = this.o.clock();
    const sessions = this.o.dispatcher.list();
    for (const s of sessions) s.expireOverdue(now);
    // Only tasks a live session here really holds are renewed or spared: a
    // lease written for a task that never reached its agent must run out.
    const held = sessions.flatMap((session) => [...session.held.values()].map(({ taskId, attempt }) => ({ taskId, agentId: session.agentId, attempt, session })));
    const reports = this.missedReports;
    let notRenewed: Held[] = [];
    await this.step("renew leases", async () => {
      notRenewed = await this.renew(now, held, sessions.map((s) => s.agentId));
    });
    if (notRenewed.length > 0) {
      await this.step("check the leases it could not renew", async () => {
        try {
          await this.checkHeld(notRenewed);
        } catch (e: unknown) {
          // Renewed, and looked at, again at the next pass.
          this.lastRenewal = 0;
          throw e;
        }
      });
    }
    if (now.getTime() >= this.nextCatchUpAt) {
      await this.step("re-read the tasks watched here", async () => {
        await this.refreshWatched();
        if (this.missedReports === reports) this.nextCatchUpAt = now.getTime() + this.o.leaseTtlMs / 3;
      });
    }
    if (this.missedReports !== reports) this.lastRenewal = 0;
    await this.step("expire leases", () => this.expireLeases(now, new Set(held.map((h) => h.taskId))));
    await this.step("queue due retries", () => this.queueDueRetries(now));
    if (this.o.databaseTime && now.getTime() >= this.nextClockCheckAt) {
      await this.step("compare its clock with the database's", async () => {
        await this.checkClock(this.o.databaseTime!);
        this.nextClockCheckAt = now.getTime() + CLOCK_CHECK_INTERVAL_MS;
      });
    }
    if (now.getTime() >= this.nextFoldAt) {
      await this.step("fold the task counts of ended database sessions", async () => {
        await this.o.tasks.foldStatusCounts();
        this.nextFoldAt = now.getTime() + FOLD_COUNTS_INTERVAL_MS;
      });
    }
    // Not once closed: close() has already answered that no delete runs.
    if (!this.stopped) this.pruning ??= this.step("delete finished tasks past their retention", () => this.prune(now)).finally(() => (this.pruning = undefined));
  }

  private async step(what: string, work: () => Promise<void>): Promise<void> {
    // A pass under way when the sweeper closes ends after its current step:
    // close() waits for it, and the database is about to close.
    if (this.stopped) return;
    try {
      await work();
    } catch (e: unknown) {
      this.o.log.warn({ err: e }, `sweeper could not ${what}; trying again next pass`);
    }
  }

  /**
   * Renewing at a third of the lease leaves two more chances before it
   * lapses. Returns the held tasks it did not renew: rows a writer had
   * locked are skipped too, so that is only a reason to look.
   */
  private async renew(now: Date, held: Held[], agentIds: string[]): Promise<Held[]> {
    if (now.getTime() - this.lastRenewal < this.o.leaseTtlMs / 3) return [];
    const renewed = new Set(await this.o.tasks.renewLeases(held, new Date(now.getTime() + this.o.leaseTtlMs)));
    await this.o.agents.touchHeartbeats(agentIds, now);
    this.lastRenewal = now.getTime();
    return held.filter((h) => !renewed.has(h.taskId));
  }

  /** Tells each session of the tasks it holds that are no longer leased to it for the attempt it holds. */
  private async checkHeld(held: Held[]): Promise<void> {
    const current = new Map((await this.o.tasks.getMany(held.map((h) => h.taskId))).map((t) => [t.taskId, t]));
    for (const h of held) {
      const task = current.get(h.taskId);
      if (task?.status === "assigned" && task.agentId === h.agentId && task.attempt === h.attempt) continue;
      h.session.leaseGone(h.taskId, h.attempt, task);
    }
  }

  /**
   * Whether a lease has run out is judged by the clock of the instance that
   * looks, against an expiry the holder's instance wrote from its own clock.
   * A lease is renewed a third of the way through, so two instances whose
   * clocks differ by two thirds of it (less a sweep interval) would take
   * back live leases and run their tasks twice. Keeping each within a sixth
   * of the database's clock keeps every pair within a third, where a lease
   * still survives one missed renewal. Measured against the middle of the
   * round trip, and reported only beyond what the round trip can explain.
   */
  private async checkClock(databaseTime: () => Promise<Date>): Promise<void> {
    const before = this.o.clock().getTime();
    const theirs = (await databaseTime()).getTime();
    const after = this.o.clock().getTime();
    const offset = (before + after) / 2 - theirs;
    const limit = this.o.leaseTtlMs / 6;
    if (Math.abs(offset) - (after - before) / 2 <= limit) return;
    this.o.log.error(
      { clock_offset_ms: Math.round(offset), limit_ms: Math.round(limit) },
      "this instance's clock is off from the database's: instances may take each other's live leases for expired and run tasks twice; synchronise the clocks (NTP)",
    );
  }

  private async refreshWatched(): Promise<void> {
    const watched = this.o.events.watched();
    if (watched.length === 0) return;
    for (const state of await this.o.tasks.getStates(watched)) this.o.events.refresh(state);
  }

  private async expireLeases(now: Date, heldHere: Set<string>): Promise<void> {
    for (const task of await this.o.tasks.listExpiredLeases(now, BATCH)) {
      // Each take-back is a commit of its own: a closing instance stops
      // between two rather than spend its grace period on a whole batch.
      if (this.stopped) return;
      if (heldHere.has(task.taskId)) {
        // Held by a live session here: the renewal was late (e.g. the
        // database was briefly away), not a dead holder. Renew next pass.
        this.lastRenewal = 0;
        continue;
      }
      const retryAt = new Date(now.getTime() + backoffMs(task.failedAttempts + 1, this.o.retry));
      let after: TaskRecord | null;
      try {
        after = await this.o.tasks.retryOrFail(task.taskId, task.agentId ?? "", task.attempt, "lease expired: the holder stopped renewing it", now, retryAt);
      } catch (e: unknown) {
        // A row held elsewhere past the lock timeout must not keep the other expired leases from being taken back.
        if (!isDatabaseBusy(e)) throw e;
        this.o.log.warn({ err: e, task_id: task.taskId }, "expired lease's task is locked elsewhere; trying again next pass");
        continue;
      }
      if (!after) continue;
      this.o.log.warn({ task_id: task.taskId, agent_id: task.agentId, attempt: task.attempt, status: after.status }, "lease expired; task taken back");
      this.o.events.publish(after);
    }
  }

  private async queueDueRetries(now: Date): Promise<void> {
    const due = await this.o.tasks.listDueRetries(now, BATCH);
    for (const t of due) await this.o.queue.enqueue({ taskId: t.taskId, taskType: t.taskType, priority: t.priority, seq: t.seq });
    await this.o.tasks.markQueued(due.map((t) => t.taskId));
  }

  private async prune(now: Date): Promise<void> {
    const retentionMs = this.o.retentionMs;
    if (retentionMs === undefined || now.getTime() < this.nextPruneAt) return;
    const cutoff = new Date(now.getTime() - retentionMs);
    let deleted = 0;
    let full = true;
    for (let round = 0; round < PRUNE_ROUNDS && full && !this.stopped; round++) {
      // Resuming where the last statement stopped: old tasks that are not
      // due (a backlog nobody takes, a task that finished late) are looked
      // at once per round, not once per statement.
      const batch = await this.o.tasks.deleteFinishedBefore(cutoff, PRUNE_BATCH, this.pruneFrom);
      deleted += batch.deleted;
      full = batch.deleted === PRUNE_BATCH;
      this.pruneFrom = full ? batch.last : undefined;
    }
    if (deleted > 0) this.o.log.info({ deleted, finished_before: cutoff.toISOString() }, "deleted finished tasks past their retention");
    // A short statement reached the end: nothing else is due yet. Looking
    // again after a quarter of the retention, at most a minute, deletes a
    // task at most that late, and spares an idle instance a query every sweep.
    this.nextPruneAt = full ? 0 : now.getTime() + Math.min(PRUNE_IDLE_MAX_MS, retentionMs / 4);
  }

  /**
   * Stops sweeping; resolves once the step under way and a delete still
   * running have ended, so none of them meets a closed database. Safe to
   * call twice.
   */
  async close(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    this.stopListening?.();
    await Promise.allSettled([this.sweeping, this.pruning]);
  }
}
