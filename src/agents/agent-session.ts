import { randomUUID } from "node:crypto";
import type { Logger } from "../telemetry/logger.js";
import type { AgentRepository, TaskRepository } from "../tasks/task-repository.js";
import type { TaskEvents } from "../tasks/task-events.js";
import type { PriorityQueue } from "../queue/priority-queue.js";
import { TASK_TYPES, type TaskRecord, type TaskType } from "../tasks/task-types.js";
import { toConnectError, wsCodeOf } from "../errors/errors.js";
import type { AgentMessage, AgentMessageParser, ServerMessage } from "./agent-messages.js";
import { backoffMs, type RetryPolicy } from "../tasks/retry-policy.js";
import { sessionStep, type SessionState } from "./session-state.js";

/** Reason given to agents whose session ends because the server stops. */
export const SERVER_SHUTDOWN = "server shutting down";

/** How a transport delivers to its agent; the session never sees proto or JSON. */
export interface SessionOutlet {
  send(message: ServerMessage): void;
  /** Ends the underlying stream/socket. Called once, after the session closed. */
  end(reason: string): void;
}

/** What a session needs from the rest of the service. */
export interface SessionDeps {
  tasks: TaskRepository;
  agents: AgentRepository;
  queue: PriorityQueue;
  events: TaskEvents;
  log: Logger;
  clock: () => Date;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  parse: AgentMessageParser;
  retry: RetryPolicy;
  /** Execution timeout for tasks that set none. */
  taskTimeoutMs: number;
  /** False once shutdown has begun: no new sessions. */
  accepting: () => boolean;
  /** Asks for the queue to be rebuilt from the database: a write may have left a PENDING task it does not hold. */
  repairQueue: (reason: string) => void;
  /** Called when the session registers or closes, and when it frees a slot. */
  registry: {
    attach(session: AgentSession): void;
    detach(session: AgentSession): void;
    slotFreed(): void;
  };
}

/**
 * One connected agent, whatever its transport. Messages are handled in
 * arrival order, except results, which are recorded concurrently. Every task it holds is a lease for one attempt; when
 * the session closes for any reason, its leases are given up and the tasks go
 * back to the queue at their original priority and place.
 */
export class AgentSession {
  state: SessionState = "awaiting_register";
  agentId = "";
  agentName = "";
  agentType = "";
  /** Task types this agent takes; every type when it registered none. */
  capabilities: readonly TaskType[] = TASK_TYPES;
  declaredCapabilities: readonly TaskType[] = [];
  maxConcurrency = 1;
  /** Held leases: task id → the task as assigned (its attempt is the fencing token). */
  readonly held = new Map<string, TaskRecord>();
  /**
   * Held tasks whose result is being recorded. The agent is done with them,
   * so they no longer take a slot: its next task is claimed and leased while
   * the result commits, instead of one commit later. They stay in `held`
   * (their leases are still renewed and given up on close) until the result
   * is recorded; if recording fails they take their slot again.
   */
  private readonly settling = new Set<string>();
  lastSeen: Date;
  readonly connectedAt: Date;
  private chain: Promise<void> = Promise.resolve();
  private heartbeatTimer: NodeJS.Timeout | undefined;
  private log: Logger;

  constructor(
    private readonly deps: SessionDeps,
    readonly transport: "grpc" | "ws",
    private readonly outlet: SessionOutlet,
    readonly correlationId: string,
  ) {
    this.connectedAt = this.lastSeen = deps.clock();
    this.log = deps.log.child({ correlation_id: correlationId, transport });
    // An agent that never registers is a silent connection: time it out too.
    this.heartbeatTimer = setTimeout(() => this.expire(), deps.heartbeatTimeoutMs);
    this.heartbeatTimer.unref();
  }

  /** Tasks the agent is working on: held, less those whose result is being recorded. */
  get activeTasks(): number {
    return this.held.size - this.settling.size;
  }

  /**
   * Slots promised to tasks whose leases are being written (by a dispatch
   * pass or a hand-off, see Dispatcher): taken until delivered or given up,
   * so two writers never fill the same slot.
   */
  reserved = 0;

  get freeSlots(): number {
    return this.state === "active" ? this.maxConcurrency - this.activeTasks - this.reserved : 0;
  }

  /**
   * Accepts a raw decoded message (already shaped like {@link AgentMessage}).
   * Results (task_complete / task_failed) of an active session are handled
   * concurrently, up to max_concurrency at a time: each waits for its own
   * database commit, and handling them one by one capped a many-slot agent
   * at one commit round trip per task. Everything else is handled in arrival
   * order. The promise settles when the message has been taken on, so a
   * transport that awaits it (gRPC) reads no faster than results are
   * recorded; WS does not wait, and its results queue here as they always did.
   */
  receive(input: unknown): Promise<void> {
    const parsed = this.parse(input);
    if (parsed.ok && this.state === "active" && (parsed.message.type === "task_complete" || parsed.message.type === "task_failed")) {
      return this.startResult(parsed.message);
    }
    this.chain = this.chain.then(() => this.handle(parsed)).catch((e: unknown) => this.reportFailure(e));
    return this.chain;
  }

  /** Results received and not yet recorded, admitted or waiting for a place (created on first use: 10,000 idle sessions must stay small). */
  private results: Set<Promise<void>> | undefined;
  private recording = 0;
  private waitingForPlace: Array<() => void> | undefined;

  private parse(input: unknown): ReturnType<AgentMessageParser> {
    try {
      return this.deps.parse(input);
    } catch (e: unknown) {
      // A parser bug must cost this message, never the transport's read loop.
      this.log.error({ err: e }, "agent message parser failed");
      return { ok: false, reason: "malformed message" };
    }
  }

  /**
   * A result received while the session was active is recorded even if the
   * session closes meanwhile: the agent sent it before going away, and close
   * waits for it before giving up the leases still held.
   */
  private startResult(message: Extract<AgentMessage, { type: "task_complete" | "task_failed" }>): Promise<void> {
    this.lastSeen = this.deps.clock();
    this.heartbeatTimer?.refresh();
    let admitted: Promise<void>;
    if (this.recording < Math.max(1, this.maxConcurrency)) {
      this.recording++;
      admitted = Promise.resolve();
    } else {
      admitted = new Promise<void>((resolve) =>
        (this.waitingForPlace ??= []).push(() => {
          this.recording++;
          resolve();
        }),
      );
    }
    let settled = false;
    const recorded: Promise<void> = admitted
      .then(() => {
        settled = this.settle(message.taskId, message.attempt ?? 0);
        return message.type === "task_complete" ? this.complete(message) : this.fail(message);
      })
      // Named, so the agent knows which result to send again.
      .catch((e: unknown) => this.reportFailure(e, message.taskId))
      .finally(() => {
        if (settled) this.settling.delete(message.taskId);
        this.recording--;
        this.results?.delete(recorded);
        this.waitingForPlace?.shift()?.();
      });
    (this.results ??= new Set()).add(recorded);
    return admitted;
  }

  /** Frees the slot of a held task whose result for the current attempt is about to be recorded. */
  private settle(taskId: string, attempt: number): boolean {
    const lease = this.held.get(taskId);
    if (!lease || (attempt !== 0 && attempt !== lease.attempt) || this.settling.has(taskId) || this.state !== "active") return false;
    this.settling.add(taskId);
    this.slotFreed();
    return true;
  }

  /** The task is no longer held; frees its slot unless settling already did. */
  private forget(taskId: string): void {
    if (!this.held.delete(taskId)) return;
    if (!this.settling.delete(taskId)) this.slotFreed();
  }

  private reportFailure(e: unknown, taskId?: string): void {
    const err = toConnectError(e);
    this.log.error({ err: e, agent_id: this.agentId, task_id: taskId }, "agent message failed");
    this.send({ type: "error", code: wsCodeOf(err.code), message: err.rawMessage, ...(taskId ? { taskId } : {}) });
  }

  /** Refuses a frame the transport could not decode at all. */
  reject(reason: string): void {
    this.send({ type: "error", code: "invalid_argument", message: reason });
  }

  private async handle(parsed: ReturnType<AgentMessageParser>): Promise<void> {
    if (!parsed.ok) {
      this.reject(parsed.reason);
      return;
    }
    const message = parsed.message;
    const step = sessionStep(this.state, message.type);
    if (!step.ok) {
      // A refused result names its task, so the agent knows which one was not recorded.
      const taskId = message.type === "task_complete" || message.type === "task_failed" ? message.taskId : undefined;
      this.send({ type: "error", code: step.code, message: step.message, ...(taskId ? { taskId } : {}) });
      return;
    }
    this.lastSeen = this.deps.clock();
    this.heartbeatTimer?.refresh();
    switch (message.type) {
      case "register":
        return this.register(message);
      case "heartbeat":
        // Recorded in the database in batches by the sweeper, not per beat.
        this.send({ type: "heartbeat_ack" });
        return;
      case "task_complete":
        return this.complete(message);
      case "task_failed":
        return this.fail(message);
    }
  }

  private async register(message: Extract<AgentMessage, { type: "register" }>): Promise<void> {
    if (!this.deps.accepting()) {
      this.send({ type: "error", code: "unavailable", message: "the service is shutting down; connect to another instance" });
      void this.close("refused: shutting down");
      return;
    }
    this.agentId = message.agentId || randomUUID();
    this.agentName = message.agentName || this.agentId;
    this.agentType = message.agentType || "generic";
    this.declaredCapabilities = [...new Set(message.capabilities ?? [])];
    this.capabilities = this.declaredCapabilities.length > 0 ? this.declaredCapabilities : TASK_TYPES;
    this.maxConcurrency = message.maxConcurrency || 1;
    this.log = this.log.child({ agent_id: this.agentId });
    await this.deps.agents.upsertConnected(
      {
        agentId: this.agentId,
        agentName: this.agentName,
        agentType: this.agentType,
        capabilities: [...this.declaredCapabilities],
        maxConcurrency: this.maxConcurrency,
      },
      this.lastSeen,
    );
    this.state = "active";
    this.send({ type: "registration_ack", agentId: this.agentId, heartbeatIntervalMs: this.deps.heartbeatIntervalMs });
    this.log.info({ capabilities: this.declaredCapabilities, max_concurrency: this.maxConcurrency }, "agent registered");
    this.deps.registry.attach(this);
  }

  /** Called by the dispatcher after the task was assigned to this agent in the database. */
  deliver(task: TaskRecord): void {
    this.held.set(task.taskId, task);
    this.send({ type: "task_assignment", task });
    this.log.info({ task_id: task.taskId, attempt: task.attempt, correlation_id: task.correlationId }, "task assigned");
  }

  /**
   * The sweeper read that a task this session holds is no longer leased to
   * it for `attempt` (`now`: the task as read, undefined if deleted): a cancel
   * or a take-over this instance never heard of, or a change by hand. The
   * agent is told to stop and the slot is freed. A result being recorded
   * decides the task instead, and a lease that moved on meanwhile is left
   * alone. Completed by this agent at this attempt, the task holds the
   * agent's own result, whose write was reported as failed but committed.
   */
  leaseGone(taskId: string, attempt: number, now: TaskRecord | undefined): void {
    if (this.state !== "active" || this.held.get(taskId)?.attempt !== attempt || this.settling.has(taskId)) return;
    if (now?.status === "completed" && now.agentId === this.agentId && now.attempt === attempt) return this.recordedAfterAll(now);
    this.log.warn({ task_id: taskId, attempt, status: now?.status ?? "deleted", holder: now?.agentId, holder_attempt: now?.attempt }, "lease lost without notice; telling the agent to stop");
    this.forget(taskId);
    this.send({ type: "task_cancelled", taskId });
  }

  /** The task was cancelled elsewhere: tell the agent and free the slot. */
  cancelled(taskId: string): void {
    if (!this.held.has(taskId)) return;
    this.forget(taskId);
    this.send({ type: "task_cancelled", taskId });
  }

  private async complete(message: Extract<AgentMessage, { type: "task_complete" }>): Promise<void> {
    const lease = this.held.get(message.taskId);
    const attempt = message.attempt || lease?.attempt || 0;
    const done = lease
      ? await this.deps.tasks.complete(message.taskId, this.agentId, attempt, message.result, this.deps.clock())
      : null;
    if (done) {
      this.send({ type: "completion_ack", taskId: message.taskId });
      this.log.info({ task_id: message.taskId, attempt, correlation_id: done.correlationId }, "task completed");
      this.deps.events.publish(done);
      this.forget(message.taskId);
      return;
    }
    await this.refuseResult(message.taskId, attempt, "completed");
  }

  private async fail(message: Extract<AgentMessage, { type: "task_failed" }>): Promise<void> {
    const lease = this.held.get(message.taskId);
    const attempt = message.attempt || lease?.attempt || 0;
    const error = message.error || "task failed";
    const now = this.deps.clock();
    const failed = !lease
      ? null
      : message.retryable === false
        ? await this.deps.tasks.fail(message.taskId, this.agentId, attempt, error, now)
        : await this.deps.tasks.retryOrFail(message.taskId, this.agentId, attempt, error, now, this.retryAt(lease, now));
    if (failed) {
      this.send({ type: "completion_ack", taskId: message.taskId });
      this.log.info(
        { task_id: message.taskId, attempt, error, retryable: message.retryable !== false, status: failed.status, correlation_id: failed.correlationId },
        failed.status === "failed" ? "task failed" : "task attempt failed; retry scheduled",
      );
      this.deps.events.publish(failed);
      this.forget(message.taskId);
      return;
    }
    // A repeat of a failure we recorded: the task has moved on (retry or FAILED).
    const task = await this.deps.tasks.get(message.taskId);
    if (task && task.attempt === attempt && (task.status === "failed" || task.status === "pending") && task.error === error) {
      if (!lease) {
        this.send({ type: "completion_ack", taskId: message.taskId });
        return;
      }
      if (lease.attempt === task.attempt) {
        this.recordedAfterAll(task);
        return;
      }
    }
    await this.refuseResult(message.taskId, attempt, "failed");
  }

  /**
   * The agent sent a result again, and the database shows the first one was
   * recorded after all: its write committed but was reported as failed (a
   * connection lost after the commit). The lease is over, so free its slot
   * and announce the change that went unannounced.
   */
  private recordedAfterAll(task: TaskRecord): void {
    this.send({ type: "completion_ack", taskId: task.taskId });
    this.deps.events.publish(task);
    this.forget(task.taskId);
  }

  /** When the next attempt may start, after this attempt of `task` failed. */
  private retryAt(task: TaskRecord, now: Date): Date {
    return new Date(now.getTime() + backoffMs(task.failedAttempts + 1, this.deps.retry));
  }

  /** When the attempt the agent holds for `task` runs out of time. */
  deadlineOf(task: TaskRecord): number {
    return (task.assignedAt ?? this.connectedAt).getTime() + (task.timeoutMs ?? this.deps.taskTimeoutMs);
  }

  /**
   * Ends attempts past their execution timeout: the agent is told to stop
   * (task_cancelled), its slot is freed, and the attempt counts as failed.
   * Heartbeats keep a lease alive but never move this deadline.
   */
  expireOverdue(now: Date): void {
    for (const task of this.held.values()) {
      // A result on its way to the database decides this attempt, not the clock.
      if (this.deadlineOf(task) > now.getTime() || this.settling.has(task.taskId)) continue;
      this.held.delete(task.taskId);
      this.send({ type: "task_cancelled", taskId: task.taskId });
      const limit = task.timeoutMs ?? this.deps.taskTimeoutMs;
      this.chain = this.chain.then(() => this.giveUp(task, `execution timeout after ${limit} ms`, now)).then(() => this.slotFreed());
    }
  }

  /** Records a lost attempt (retry with backoff, or FAILED once exhausted), unless the lease already moved on. */
  private async giveUp(task: TaskRecord, error: string, now: Date): Promise<void> {
    try {
      const after = await this.deps.tasks.retryOrFail(task.taskId, this.agentId, task.attempt, error, now, this.retryAt(task, now));
      if (!after) return;
      this.log.info({ task_id: task.taskId, attempt: task.attempt, status: after.status, error }, after.status === "failed" ? "task failed" : "task attempt lost; retry scheduled");
      this.deps.events.publish(after);
    } catch (e: unknown) {
      // The lease stays in the database and expires; the sweeper retries it then.
      this.log.error({ err: e, task_id: task.taskId }, "could not record the lost attempt");
    }
  }

  /** Shutdown: asks the agent to finish what it holds within `graceMs`. */
  drain(graceMs: number): void {
    this.send({ type: "drain", graceMs });
  }

  /**
   * A result from anyone but the current lease holder changes nothing. A
   * repeat of a result this agent already recorded is acknowledged again.
   */
  private async refuseResult(taskId: string, attempt: number, outcome: "completed" | "failed"): Promise<void> {
    const task = await this.deps.tasks.get(taskId);
    if (task && task.status === outcome && task.agentId === this.agentId && (attempt === 0 || attempt === task.attempt)) {
      if (this.held.get(taskId)?.attempt === task.attempt) this.recordedAfterAll(task);
      else this.send({ type: "completion_ack", taskId });
      return;
    }
    const lease = this.held.get(taskId);
    if (lease && !(task && task.status === "assigned" && task.agentId === this.agentId && task.attempt === lease.attempt)) {
      // The lease this session holds is really gone (e.g. cancelled in the
      // same instant): forget it. A stale result for an older attempt must
      // not cost the current lease.
      this.forget(taskId);
    }
    const why = !task
      ? `task ${taskId} does not exist`
      : task.agentId !== this.agentId || task.status === "pending"
        ? `task ${taskId} is not assigned to this agent`
        : attempt !== 0 && attempt !== task.attempt
          ? `attempt ${attempt} of task ${taskId} is not the current attempt (${task.attempt})`
          : `task ${taskId} is ${task.status}`;
    this.log.warn({ task_id: taskId, attempt, status: task?.status }, `result refused: ${why}`);
    this.send({ type: "error", code: "failed_precondition", message: `result refused: ${why}`, taskId });
  }

  /**
   * Busy or idle is never written to the agents table: it is derived from the
   * tasks an agent holds. Writing it raced the disconnect write (and cost two
   * writes per task on the hot path).
   */
  private slotFreed(): void {
    this.deps.registry.slotFreed();
  }

  private expire(): void {
    this.log.warn({ agent_id: this.agentId, last_seen: this.lastSeen.toISOString() }, "agent missed its heartbeats; closing");
    this.send({ type: "error", code: "deadline_exceeded", message: `no heartbeat for ${this.deps.heartbeatTimeoutMs} ms; session closed` });
    void this.close("heartbeat timeout");
  }

  /**
   * Ends the session: stops dispatch to it and ends the stream. Its tasks go
   * back to the queue with their original priority and place: at once on a
   * shutdown (not a failure), or after a backoff as a failed attempt when the
   * agent was lost. Safe to call more than once; settles when done.
   */
  close(reason: string): Promise<void> {
    if (this.state === "closed") return this.chain;
    const wasActive = this.state === "active";
    this.state = "closed";
    clearTimeout(this.heartbeatTimer);
    this.deps.registry.detach(this);
    this.outlet.end(reason);
    this.chain = this.chain.then(async () => {
      if (!wasActive) return;
      // Results already on their way to the database decide their tasks first.
      if (this.results) await Promise.allSettled([...this.results]);
      const now = this.deps.clock();
      for (const task of this.held.values()) {
        if (reason === SERVER_SHUTDOWN) await this.handBack(task, now);
        else await this.giveUp(task, `agent lost: ${reason}`, now);
      }
      this.held.clear();
      this.settling.clear();
      await this.deps.agents.setStatus(this.agentId, "disconnected", now).catch((e: unknown) => this.log.warn({ err: e }, "could not mark agent disconnected"));
      this.log.info({ reason }, "agent session closed");
    });
    return this.chain;
  }

  /** A clean hand-back (shutdown): straight back to the queue, not counted as a failure. */
  private async handBack(task: TaskRecord, now: Date): Promise<void> {
    try {
      const released = await this.deps.tasks.release(task.taskId, this.agentId, task.attempt, SERVER_SHUTDOWN, now);
      if (!released) return;
      this.deps.events.publish(released);
      try {
        await this.deps.queue.enqueue({ taskId: released.taskId, taskType: released.taskType, priority: released.priority, seq: released.seq });
      } catch (e: unknown) {
        // This instance is going away, so a rebuild here would come too
        // late: mark it due, and any instance's sweeper queues it.
        this.log.error({ err: e, task_id: task.taskId }, "the queue refused a handed-back task; leaving it to the sweepers");
        await this.deps.tasks.queueLater(released.taskId, now);
        return;
      }
      this.log.info({ task_id: task.taskId, attempt: task.attempt }, "task handed back to the queue");
    } catch (e: unknown) {
      // Not released: its lease, never renewed, expires. Released but not
      // marked due: only a rebuild (a restart, a Redis reset) queues it.
      this.log.error({ err: e, task_id: task.taskId }, "could not hand the task back");
      this.deps.repairQueue("a handed-back task may not be queued");
    }
  }

  private send(message: ServerMessage): void {
    if (this.state === "closed" && message.type !== "error") return;
    this.outlet.send(message);
  }
}
