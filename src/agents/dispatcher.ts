import type { Logger } from "../telemetry/logger.js";
import type { PriorityQueue, QueueEntry } from "../queue/priority-queue.js";
import type { Lease, TaskRepository } from "../tasks/task-repository.js";
import type { TaskRecord, TaskType } from "../tasks/task-types.js";
import type { TaskEvents } from "../tasks/task-events.js";
import type { LatencyWindow } from "../metrics/latency-window.js";
import type { AgentSession } from "./agent-session.js";

/** Most tasks one session claims per round: bounds a queue call and a batch of lease writes. */
const MAX_CLAIM = 64;

/** Most sessions a create looks at for a free slot, so its cost stays flat with 10,000 busy agents. */
const HAND_OFF_SCAN = 64;

/**
 * A slot of a local agent held for one task being created: the create stores
 * the task already leased to the agent, and the task never enters the queue.
 * Ends with `deliver` or `release`, once.
 */
export interface HandOff {
  /** Queued work of these types would reach the agent first: the create must not overtake it. */
  readonly capabilities: readonly TaskType[];
  /**
   * Names the task before its lease is written, so that a cancel arriving
   * between that commit and `deliver` is not missed, and returns the lease.
   */
  begin(taskId: string, now: Date): Lease;
  /** Gives the leased task to the agent, or back to the queue if the agent left or the instance is stopping. */
  deliver(task: TaskRecord): Promise<void>;
  /**
   * The task was not leased: the write failed, or (`workQueued`) the queue
   * had work the agent would take first, which proves its types are not
   * empty whatever this instance was told.
   */
  release(workQueued?: boolean): void;
}

export interface DispatcherOptions {
  tasks: TaskRepository;
  queue: PriorityQueue;
  events: TaskEvents;
  log: Logger;
  clock: () => Date;
  latency: LatencyWindow;
  /** Length of a lease; the sweeper renews it while the agent's session lives. */
  leaseTtlMs: number;
  /** Asks for the queue to be rebuilt from the database: a write may have left a PENDING task it does not hold. */
  repairQueue: (reason: string) => void;
  /** Back-off before retrying a dispatch pass that failed on the database or queue. */
  retryDelayMs?: number;
}

/**
 * Owns this instance's live agent sessions and pushes queued work to them.
 *
 * Dispatch is event-driven: a pass runs when work is signalled (a task was
 * queued here or on another instance), when an agent registers, and when a
 * slot is freed. There is no polling interval on the dispatch path. Passes
 * never overlap; a signal during a pass makes it run once more.
 */
export class Dispatcher {
  private readonly sessions = new Map<string, AgentSession>();
  private running = false;
  private rotation = 0;
  private again = false;
  private stopped = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly unsubscribe: Array<() => void>;
  /**
   * Tasks whose leases are being written, by a pass or a hand-off (task id →
   * whether a cancel went by): such a cancel found no holder to tell, so the
   * task must never be delivered.
   */
  private readonly leasing = new Map<string, { cancelled: boolean }>();
  /**
   * Types a claim found nothing queued for, with nothing announced since.
   * A pass skips agents whose types are all here, so a slot freed while the
   * queue is empty costs no queue call. A hand-off is offered only to such
   * agents: under a backlog it would hold a freed slot while asking the
   * queue, and delay the pass that fills that slot; the queue has the final
   * word. Each sweep forgets them all, so a lost announcement strands work
   * for one sweep interval at most.
   */
  private readonly dryTypes = new Set<TaskType>();
  /** Announcements received, by type: a claim that saw one arrive meanwhile proves nothing dry. */
  private readonly announced = new Map<TaskType, number>();
  /** `recheck` calls so far: a claim that saw one meanwhile proves nothing dry either. */
  private rechecks = 0;
  /**
   * Sessions a claim is on its way for. A hand-off to one of them could
   * overtake what that claim removed from the queue, where the create's
   * check cannot see it.
   */
  private readonly claimingFor = new Set<AgentSession>();
  /**
   * The sessions in the order the hand-off scan visits them, so agents take
   * turns; `scanAt` is the next to look at. An array rather than an
   * iterator over `sessions`: a live Map iterator keeps every table the map
   * has outgrown, and every session in them, until it moves on, and an
   * instance that hosts agents but takes no creates never moves it. A
   * session that goes is replaced by the last one, so coming and going
   * costs O(1) however many agents there are.
   */
  private readonly ring: AgentSession[] = [];
  private readonly ringIndex = new Map<AgentSession, number>();
  private scanAt = 0;

  constructor(private readonly o: DispatcherOptions) {
    this.unsubscribe = [
      o.queue.onAvailable((taskType) => {
        this.announced.set(taskType, (this.announced.get(taskType) ?? 0) + 1);
        this.dryTypes.delete(taskType);
        this.kick();
      }),
      // A task cancelled while held here: tell its agent and free the slot.
      o.events.subscribeAll((task) => {
        if (task.status !== "cancelled") return;
        const leasing = this.leasing.get(task.taskId);
        if (leasing) leasing.cancelled = true;
        if (task.agentId) this.sessions.get(task.agentId)?.cancelled(task.taskId);
      }),
    ];
  }

  /** Live sessions on this instance. */
  list(): AgentSession[] {
    return [...this.sessions.values()];
  }

  attach(session: AgentSession): void {
    const previous = this.sessions.get(session.agentId);
    if (previous !== session) {
      this.sessions.set(session.agentId, session);
      if (!previous) {
        this.ringIndex.set(session, this.ring.length);
        this.ring.push(session);
      } else {
        this.replaceInRing(previous, session);
        // The same agent id connected again: the newest stream wins and the
        // old one's leases go back to the queue.
        this.o.log.warn({ agent_id: session.agentId }, "agent reconnected; closing its previous session");
        void previous.close("replaced by a new session");
      }
    }
    this.kick();
  }

  detach(session: AgentSession): void {
    if (this.sessions.get(session.agentId) !== session) return;
    this.sessions.delete(session.agentId);
    const last = this.ring.pop()!;
    if (last !== session) this.replaceInRing(session, last);
    else this.ringIndex.delete(session);
  }

  private replaceInRing(gone: AgentSession, by: AgentSession): void {
    const at = this.ringIndex.get(gone)!;
    this.ringIndex.delete(gone);
    this.ring[at] = by;
    this.ringIndex.set(by, at);
  }

  private readonly slotListeners = new Set<() => void>();

  slotFreed(): void {
    for (const l of this.slotListeners) l();
    this.kick();
  }

  /** Subscribes to freed slots (shutdown waits on these). Returns an unsubscribe function. */
  onSlotFreed(listener: () => void): () => void {
    this.slotListeners.add(listener);
    return () => this.slotListeners.delete(listener);
  }

  /**
   * A local session that can take a task of `taskType` now, with a slot held
   * for it (see {@link HandOff}); agents take turns. Undefined when none of
   * the sessions looked at has a free slot for the type.
   */
  reserve(taskType: TaskType): HandOff | undefined {
    if (this.stopped) return undefined;
    for (let looked = 0; looked < Math.min(HAND_OFF_SCAN, this.sessions.size); looked++) {
      const session = this.nextToScan();
      if (!session) return undefined;
      const eligible = session.freeSlots > 0 && session.capabilities.includes(taskType) && !this.claimingFor.has(session);
      if (eligible && session.capabilities.every((t) => this.dryTypes.has(t))) {
        return this.handOffTo(session);
      }
    }
    return undefined;
  }

  private nextToScan(): AgentSession | undefined {
    if (this.ring.length === 0) return undefined;
    if (this.scanAt >= this.ring.length) this.scanAt = 0;
    return this.ring[this.scanAt++];
  }

  private handOffTo(session: AgentSession): HandOff {
    session.reserved++;
    let taskId: string | undefined;
    let settled = false;
    /** Gives the slot up; false if it already was. */
    const settle = () => {
      if (settled) return false;
      settled = true;
      session.reserved--;
      if (taskId) this.leasing.delete(taskId);
      return true;
    };
    return {
      capabilities: session.capabilities,
      begin: (id, now) => {
        taskId = id;
        this.leasing.set(id, { cancelled: false });
        return { agentId: session.agentId, now, correlationId: session.correlationId, leaseExpiresAt: new Date(now.getTime() + this.o.leaseTtlMs) };
      },
      deliver: async (task) => {
        const cancelled = this.leasing.get(task.taskId)?.cancelled === true;
        if (!settle()) return;
        // Its cancel found no holder to tell, so it must never reach the agent.
        if (cancelled) return this.slotFreed();
        if (this.stopped || session.freeSlots <= 0) {
          // The agent left (or is being drained) while the lease was written.
          this.slotFreed();
          return this.giveBack(task, session.agentId, this.o.clock());
        }
        if (task.attempt === 1) this.o.latency.record(this.o.clock().getTime() - task.createdAt.getTime());
        session.deliver(task);
        this.o.events.publish(task);
      },
      release: (workQueued = false) => {
        if (workQueued) for (const type of session.capabilities) this.dryTypes.delete(type);
        // A pass may have passed this slot over while it was held.
        if (settle()) this.slotFreed();
      },
    };
  }

  /** Hands back a lease its agent cannot take any more, keeping the task's place in line; never throws. */
  private async giveBack(task: TaskRecord, agentId: string, now: Date): Promise<void> {
    let back: TaskRecord | null;
    try {
      back = await this.o.tasks.release(task.taskId, agentId, task.attempt, "agent went away during assignment", now);
    } catch (e: unknown) {
      // Not released: the lease, never renewed, expires. Released with the
      // answer lost: the task is PENDING and only a rebuild queues it.
      this.o.log.warn({ err: e, task_id: task.taskId }, "could not hand back a lease its agent left");
      this.o.repairQueue("a released task may not be queued");
      return;
    }
    if (!back) return;
    this.o.events.publish(back);
    try {
      await this.o.queue.enqueue({ taskId: back.taskId, taskType: back.taskType, priority: back.priority, seq: back.seq });
    } catch (e: unknown) {
      // A rebuild comes too late if this instance is stopping: mark the task
      // due as well, and any instance's sweeper queues it.
      this.o.log.warn({ err: e, task_id: task.taskId }, "the queue refused a handed-back task; leaving it to the sweepers");
      await this.o.tasks.queueLater(back.taskId, now).catch(() => undefined);
      this.o.repairQueue("a released task may not be queued");
    }
  }

  /** Forgets which types were found empty and runs a pass that asks the queue again (see `dryTypes`). */
  recheck(): void {
    this.rechecks++;
    this.dryTypes.clear();
    this.kick();
  }

  /** Requests a dispatch pass. */
  kick(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    void this.run();
  }

  private async run(): Promise<void> {
    try {
      do {
        this.again = false;
        await this.pass();
      } while (this.again && !this.stopped);
    } catch (e: unknown) {
      this.o.log.warn({ err: e }, "dispatch pass failed; retrying shortly");
      this.retryTimer ??= setTimeout(() => {
        this.retryTimer = undefined;
        this.kick();
      }, this.o.retryDelayMs ?? 1000);
    } finally {
      this.running = false;
    }
  }

  /**
   * Round-robin over sessions with free slots until a round hands out
   * nothing. Each round a session claims its share of its free slots in one
   * queue call, and the leases of that batch are written together (one
   * group-committed database round trip), so an agent with many slots fills
   * in one step instead of one task per round trip. The share (free slots
   * divided by the sessions still hungry) keeps a burst spread over agents.
   * A claim that finds nothing for a set of task types answers for every
   * session whose capabilities fall within it (`dryTypes`), in this pass and
   * later ones until work of one of those types is announced, so a pass
   * costs one claim per distinct capability set rather than one per idle
   * session, and none for a slot freed while the queue is empty.
   */
  private async pass(): Promise<void> {
    const sessions = [...this.sessions.values()];
    // Start each pass somewhere else, so no agent is always served first.
    const offset = sessions.length ? this.rotation++ % sessions.length : 0;
    let candidates = [...sessions.slice(offset), ...sessions.slice(0, offset)].filter((s) => s.freeSlots > 0);
    const hasNoWork = (s: AgentSession) => s.capabilities.every((t) => this.dryTypes.has(t));
    const announcedFor = (s: AgentSession) => s.capabilities.reduce((sum, t) => sum + (this.announced.get(t) ?? 0), this.rechecks);
    while (candidates.length > 0 && !this.stopped) {
      const stillHungry: AgentSession[] = [];
      for (const session of candidates) {
        if (session.freeSlots <= 0 || hasNoWork(session)) continue;
        const want = Math.min(MAX_CLAIM, Math.max(1, Math.floor(session.freeSlots / candidates.length)));
        const before = announcedFor(session);
        const { claimed, dry } = await this.assignSome(session, want);
        if (!dry) {
          for (const type of session.capabilities) this.dryTypes.delete(type);
          if (claimed > 0 && session.freeSlots > 0) stillHungry.push(session);
        } else if (announcedFor(session) === before) {
          // Work announced (or a recheck asked for) while the claim was on
          // its way may not have been seen by it; either asked for another pass.
          for (const type of session.capabilities) this.dryTypes.add(type);
        }
      }
      candidates = stillHungry;
    }
  }

  /**
   * Claims up to `want` of the best tasks this session can take, leases them
   * all at once and delivers them in queue order. `dry` means the queue had
   * fewer than asked for these types.
   */
  private async assignSome(session: AgentSession, want: number): Promise<{ claimed: number; dry: boolean }> {
    const now = this.o.clock();
    const leaseExpiresAt = new Date(now.getTime() + this.o.leaseTtlMs);
    let entries: QueueEntry[];
    this.claimingFor.add(session);
    try {
      entries = await this.o.queue.claimBatch(session.capabilities, want);
    } finally {
      this.claimingFor.delete(session);
    }
    const claimed = entries.length;
    // The session may have closed, or filled with hand-offs that were already
    // under way, while the claim ran: what no longer fits goes back, keeping
    // its place.
    const surplus = entries.splice(Math.max(0, session.freeSlots));
    // Each claimed task's slot is held until that task is delivered or
    // dropped, so no create hands a task to it meanwhile.
    session.reserved += entries.length;
    let held = entries.length;
    for (const entry of entries) this.leasing.set(entry.taskId, { cancelled: false });
    let failure: unknown;
    try {
      if (surplus.length > 0) {
        await Promise.all(surplus.map((entry) => this.o.queue.enqueue(entry))).catch(() => this.o.repairQueue("claimed tasks could not be put back"));
      }
      const outcomes = await Promise.allSettled(
        entries.map((entry) => this.o.tasks.assign(entry.taskId, session.agentId, now, session.correlationId, leaseExpiresAt)),
      );
      for (const [i, outcome] of outcomes.entries()) {
        const entry = entries[i]!;
        const cancelled = this.leasing.get(entry.taskId)?.cancelled === true;
        this.leasing.delete(entry.taskId);
        session.reserved--;
        held--;
        if (outcome.status === "rejected") {
          // Put the entry back before giving up the pass, or it would be lost
          // from the index until the next rebuild.
          failure ??= outcome.reason;
          await this.o.queue.enqueue(entry).catch(() => this.o.repairQueue("a claimed task could not be put back"));
          continue;
        }
        const task = outcome.value;
        // Not PENDING any more (cancelled, or a stale entry): drop it.
        if (!task) continue;
        // Cancelled while its lease was being written: the cancel found no holder to tell, so never deliver it.
        if (cancelled) continue;
        if (session.freeSlots <= 0) {
          // The session closed while we were assigning: give the lease
          // straight back, without stranding the rest of the batch.
          await this.giveBack(task, session.agentId, now);
          continue;
        }
        if (task.attempt === 1) this.o.latency.record(now.getTime() - task.createdAt.getTime());
        session.deliver(task);
        this.o.events.publish(task);
      }
    } finally {
      session.reserved -= held;
      for (const entry of entries) this.leasing.delete(entry.taskId);
    }
    if (failure !== undefined) throw failure;
    return { claimed, dry: claimed < want };
  }

  /** Stops dispatching; sessions are closed by their transports. Safe twice. */
  close(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    for (const u of this.unsubscribe.splice(0)) u();
  }
}
