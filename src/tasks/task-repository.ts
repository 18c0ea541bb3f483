import type { TaskState } from "./task-events.js";
import type { JsonObject, TaskRecord, TaskStatus, TaskType } from "./task-types.js";

/** What a state change is recorded as in `audit_logs`. */
export interface AuditEntry {
  /** e.g. "task.created", "task.assigned", "task.completed", "task.requeued". */
  action: string;
  fromStatus: TaskStatus | null;
  toStatus: TaskStatus;
  agentId: string | null;
  correlationId: string | null;
  details?: JsonObject;
}

export interface NewTask {
  taskId: string;
  taskType: TaskType;
  description: string;
  priority: number;
  metadata: JsonObject;
  maxAttempts: number;
  correlationId: string;
  seq: number;
  createdAt: Date;
  timeoutMs: number | null;
  idempotencyKey: string | null;
  requestHash: string | null;
}

/** Who holds a task, from when, and until when unless renewed. */
export interface Lease {
  agentId: string;
  now: Date;
  correlationId: string | null;
  leaseExpiresAt: Date;
}

export interface ListTasksFilter {
  status?: TaskStatus;
  taskType?: TaskType;
  limit: number;
  /** Keyset cursor: return tasks strictly older than this (createdAt, taskId). */
  before?: { createdAt: Date; taskId: string };
}

/**
 * Every state change is a conditional update (compare-and-set on the expected
 * status, and for lease-holder changes on agent and attempt) written in one
 * transaction with its audit row, so two racing writers can never both win.
 * Each method returns the task after the change, or null when the condition
 * did not hold (nothing was written).
 */
export interface TaskRepository {
  insert(task: NewTask, audit: AuditEntry): Promise<TaskRecord>;
  /**
   * A new task stored already leased to `lease.agentId`: a task handed
   * straight to a waiting agent. `lease.now` must be `task.createdAt`. Its
   * audit trail is `audit`, then the assignment, as if `insert` and
   * `assign` had run. `created` is the task as `insert` would have returned
   * it (PENDING), `assigned` as stored.
   */
  insertAssigned(task: NewTask, audit: AuditEntry, lease: Lease): Promise<{ created: TaskRecord; assigned: TaskRecord }>;
  /** Removes a task that was never queued (used when enqueue fails). */
  deleteUnqueued(taskId: string): Promise<void>;
  get(taskId: string): Promise<TaskRecord | null>;
  /** The tasks of these ids that exist, in no particular order. */
  getMany(taskIds: readonly string[]): Promise<TaskRecord[]>;
  /** As `getMany`, without the description and metadata, which never change and can be large. */
  getStates(taskIds: readonly string[]): Promise<TaskState[]>;
  list(filter: ListTasksFilter): Promise<TaskRecord[]>;
  /** pending → assigned to `agentId`, attempt + 1, leased until `leaseExpiresAt`. */
  assign(taskId: string, agentId: string, now: Date, correlationId: string | null, leaseExpiresAt: Date): Promise<TaskRecord | null>;
  /** assigned(agentId, attempt) → completed with result. */
  complete(taskId: string, agentId: string, attempt: number, result: JsonObject, now: Date): Promise<TaskRecord | null>;
  /** assigned(agentId, attempt) → failed with error, at once (a non-retryable failure). */
  fail(taskId: string, agentId: string, attempt: number, error: string, now: Date): Promise<TaskRecord | null>;
  /**
   * assigned(agentId, attempt) → the attempt failed: pending again, to run
   * from `retryAt` on, or failed for good once failed attempts reach
   * max_attempts. Keeps seq and priority.
   */
  retryOrFail(taskId: string, agentId: string, attempt: number, error: string, now: Date, retryAt: Date): Promise<TaskRecord | null>;
  /** assigned(agentId, attempt) → pending at once, not counted as a failure (the holder handed it back cleanly). */
  release(taskId: string, agentId: string, attempt: number, reason: string, now: Date): Promise<TaskRecord | null>;
  /** pending|assigned → cancelled. */
  cancel(taskId: string, now: Date, correlationId: string | null): Promise<TaskRecord | null>;
  /** failed → pending with a fresh set of attempts (operator re-queue). */
  retry(taskId: string, now: Date, correlationId: string | null): Promise<TaskRecord | null>;
  /**
   * Extends the leases of these held tasks, each only while it is still
   * assigned to the given holder for the given attempt (the same agent id
   * may hold a later attempt through another instance). Returns the ids of
   * those renewed. Rows another writer has locked are skipped: they are
   * changing anyway, and the next renewal catches any that stay assigned.
   */
  renewLeases(held: ReadonlyArray<{ taskId: string; agentId: string; attempt: number }>, leaseExpiresAt: Date): Promise<string[]>;
  /** Assigned tasks whose lease ran out before `now` (their holder is gone), oldest lease first. */
  listExpiredLeases(now: Date, limit: number): Promise<TaskRecord[]>;
  /** Pending retries whose backoff has passed, in queue order. */
  listDueRetries(now: Date, limit: number): Promise<TaskRecord[]>;
  /** Marks due retries as queued (clears run_at) so later sweeps skip them. */
  markQueued(taskIds: readonly string[]): Promise<void>;
  /**
   * Leaves a PENDING task the queue refused to any instance's sweeper: sets
   * run_at to `at` (so it is a due retry) unless it already has one.
   */
  queueLater(taskId: string, at: Date): Promise<void>;
  findByIdempotencyKey(key: string): Promise<TaskRecord | null>;
  /** Frees a key whose retention window has passed, so it can be used again. */
  releaseIdempotencyKey(taskId: string, key: string): Promise<void>;
  /**
   * Deletes up to `limit` tasks created and finished (completed, failed or
   * cancelled) before `cutoff`, oldest created first, from those created at
   * or after `from`, with their audit rows. Returns how many, and the
   * creation time of the last, where the next call may resume. Rows another
   * writer holds are left for a later call.
   */
  deleteFinishedBefore(cutoff: Date, limit: number, from?: Date): Promise<{ deleted: number; last: Date | undefined }>;
  /** Every pending task ready to run at `now` (no backoff left), in queue order: priority desc, seq asc. */
  listRunnable(now: Date): Promise<TaskRecord[]>;
  /** Every assigned task, for start-up recovery. */
  listAssigned(): Promise<TaskRecord[]>;
  /** Highest seq ever handed out, 0 if none. */
  maxSeq(): Promise<number>;
  /** Tasks in each status, from the counts the database keeps (not a scan of the history). */
  countByStatus(): Promise<Record<TaskStatus, number>>;
  /** Folds the counts kept by database sessions that have ended into one row per status; the totals stay the same. */
  foldStatusCounts(): Promise<void>;
  countCompletedSince(since: Date): Promise<number>;
  /** ASSIGNED tasks per holding agent. */
  countAssignedByAgent(): Promise<Map<string, number>>;
  /** PENDING tasks waiting out a retry backoff (not in the queue yet). */
  countRetryWaiting(): Promise<number>;
  /** Audit rows of one task, oldest first. */
  auditTrail(taskId: string): Promise<Array<AuditEntry & { createdAt: Date }>>;
}

export interface AgentRecord {
  agentId: string;
  agentName: string;
  agentType: string;
  capabilities: TaskType[];
  maxConcurrency: number;
  status: "idle" | "busy" | "disconnected";
  isActive: boolean;
  lastHeartbeat: Date | null;
  createdAt: Date;
  updatedAt: Date;
}

export interface AgentRepository {
  /** Insert or update the agent as connected (idle). */
  upsertConnected(agent: Omit<AgentRecord, "status" | "isActive" | "createdAt" | "updatedAt" | "lastHeartbeat">, now: Date): Promise<void>;
  setStatus(agentId: string, status: AgentRecord["status"], now: Date): Promise<void>;
  /** Records that these agents' sessions are alive (one statement for an instance's agents). */
  touchHeartbeats(agentIds: readonly string[], now: Date): Promise<void>;
  list(): Promise<AgentRecord[]>;
  /** Start-up: no agent is connected to a fresh single instance. */
  markAllDisconnected(now: Date): Promise<void>;
}
