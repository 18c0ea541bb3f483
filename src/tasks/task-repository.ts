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
  /** Removes a task that was never queued (used when enqueue fails). */
  deleteUnqueued(taskId: string): Promise<void>;
  get(taskId: string): Promise<TaskRecord | null>;
  list(filter: ListTasksFilter): Promise<TaskRecord[]>;
  /** pending → assigned to `agentId`, attempt + 1. */
  assign(taskId: string, agentId: string, now: Date, correlationId: string | null): Promise<TaskRecord | null>;
  /** assigned(agentId, attempt) → completed with result. */
  complete(taskId: string, agentId: string, attempt: number, result: JsonObject, now: Date): Promise<TaskRecord | null>;
  /** assigned(agentId, attempt) → failed with error. */
  fail(taskId: string, agentId: string, attempt: number, error: string, now: Date): Promise<TaskRecord | null>;
  /** assigned(agentId, attempt) → pending (lease given up; keeps seq and priority). */
  release(taskId: string, agentId: string, attempt: number, reason: string, now: Date): Promise<TaskRecord | null>;
  /** pending|assigned → cancelled. */
  cancel(taskId: string, now: Date, correlationId: string | null): Promise<TaskRecord | null>;
  /** Every runnable (pending) task, in queue order: priority desc, seq asc. */
  listRunnable(): Promise<TaskRecord[]>;
  /** Every assigned task, for start-up recovery. */
  listAssigned(): Promise<TaskRecord[]>;
  /** Highest seq ever handed out, 0 if none. */
  maxSeq(): Promise<number>;
  countByStatus(): Promise<Record<TaskStatus, number>>;
  countCompletedSince(since: Date): Promise<number>;
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
  touchHeartbeat(agentId: string, now: Date): Promise<void>;
  list(): Promise<AgentRecord[]>;
  /** Start-up: no agent is connected to a fresh single instance. */
  markAllDisconnected(now: Date): Promise<void>;
}
