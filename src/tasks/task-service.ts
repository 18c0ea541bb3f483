import { createHash } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { canonicalTaskId, uuidv7 } from "../ids.js";
import type { Logger } from "../telemetry/logger.js";
import type { HandOff } from "../agents/dispatcher.js";
import type { PriorityQueue } from "../queue/priority-queue.js";
import { failedPrecondition, invalidArgument, isDatabaseBusy, notFound, toConnectError, unavailable } from "../errors/errors.js";
import type { TaskChange, TaskEvents } from "./task-events.js";
import type { TaskRepository } from "./task-repository.js";
import { isTerminal } from "./task-state.js";
import type { JsonValue, TaskRecord, TaskStatus, TaskType } from "./task-types.js";
import type { ValidCreateTask, CreateTaskInput } from "./task-validation.js";

export interface TaskServiceOptions {
  tasks: TaskRepository;
  queue: PriorityQueue;
  events: TaskEvents;
  validate: (input: CreateTaskInput) => ValidCreateTask;
  /** How long an idempotency key returns its original task. */
  idempotencyTtlMs: number;
  /** False once shutdown has begun: new work is refused so it can land on a live instance. */
  accepting: () => boolean;
  /** Asks for the queue to be rebuilt from the database: a write may have left a PENDING task it does not hold. */
  repairQueue: (reason: string) => void;
  /** A local agent's slot for a new task of this type, if one is free (Dispatcher.reserve). */
  reserveAgent?: (taskType: TaskType) => HandOff | undefined;
  clock?: () => Date;
}

/** Per-request context every transport supplies. */
export interface RequestContext {
  correlationId: string;
  log: Logger;
  signal?: AbortSignal;
}

export interface ListTasksQuery {
  status?: TaskStatus;
  taskType?: TaskType;
  pageSize: number;
  pageToken?: string;
}

export const DEFAULT_PAGE_SIZE = 100;
export const MAX_PAGE_SIZE = 1000;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Opaque keyset cursor: base64url of "createdAtMs:taskId". */
function encodePageToken(task: TaskRecord): string {
  return Buffer.from(`${task.createdAt.getTime()}:${task.taskId}`).toString("base64url");
}

/** JSON with object keys sorted, so equal requests hash equally whatever their key order. */
function canonical(value: JsonValue): string {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k]!)}`).join(",")}}`;
}

/** Fingerprint of what a create asks for, to tell a repeat from a different request reusing its key. */
function requestHash(v: ValidCreateTask): string {
  const body = canonical({ t: v.taskType, d: v.description, p: v.priority, m: v.metadata, a: v.maxAttempts, o: v.timeoutMs });
  return createHash("sha256").update(body).digest("hex");
}

const keyConflict = (key: string) =>
  new ConnectError(`idempotency key "${key}" was already used for a different request`, Code.AlreadyExists);

const LAST_PAGE_TOKEN_TIME = Date.UTC(9999, 11, 31, 23, 59, 59, 999);

function decodePageToken(token: string): { createdAt: Date; taskId: string } {
  const [ms, taskId] = Buffer.from(token, "base64url").toString().split(":");
  const createdAt = new Date(Number(ms));
  // Up to the year 9999, which both databases store: a token decoding to a
  // date beyond would otherwise reach the database as NaN or be refused by it.
  if (!taskId || !UUID.test(taskId) || !/^\d+$/.test(ms ?? "") || !(createdAt.getTime() <= LAST_PAGE_TOKEN_TIME)) {
    throw invalidArgument(["query", "page_token"], "is not a token returned by a previous call");
  }
  return { createdAt, taskId };
}

export type TaskService = ReturnType<typeof createTaskService>;

/**
 * Task use cases shared by every transport. The database row is written first
 * and is the source of truth; the queue is only an index of runnable work.
 */
export function createTaskService({ tasks, queue, events, validate, idempotencyTtlMs, accepting, repairQueue, reserveAgent, clock = () => new Date() }: TaskServiceOptions) {
  async function getOrThrow(taskId: string): Promise<TaskRecord> {
    if (!UUID.test(taskId)) throw notFound("task", taskId);
    const task = await tasks.get(taskId).catch((e: unknown) => Promise.reject(toConnectError(e)));
    if (!task) throw notFound("task", taskId);
    return task;
  }

  /**
   * The task an idempotency key already stands for: the original for a
   * repeat of the same request within the retention window, ALREADY_EXISTS
   * for a different request, and nothing (the key is freed) once it expired.
   */
  async function replayOf(key: string, hash: string): Promise<TaskRecord | null> {
    const existing = await tasks.findByIdempotencyKey(key);
    if (!existing) return null;
    if (clock().getTime() - existing.createdAt.getTime() > idempotencyTtlMs) {
      await tasks.releaseIdempotencyKey(existing.taskId, key);
      return null;
    }
    if (existing.requestHash !== hash) throw keyConflict(key);
    return existing;
  }

  return {
    /**
     * Stores a PENDING task and queues it. If the queue cannot take it, the
     * row is removed again and the caller gets UNAVAILABLE: no task exists
     * that the queue does not know about. With an idempotency key, a repeat
     * returns the original task instead.
     *
     * When an agent on this instance has a free slot for the type and
     * nothing it would take first is queued, the task is stored already
     * leased to it and skips the queue: one statement, one commit and one
     * queue round trip instead of two, two and three. The answer is the task
     * as created either way.
     */
    async create(input: CreateTaskInput, ctx: RequestContext): Promise<TaskRecord> {
      if (!accepting()) throw unavailable("the service is shutting down; send the task to another instance");
      const valid = validate(input);
      const hash = valid.idempotencyKey ? requestHash(valid) : null;
      if (valid.idempotencyKey) {
        const original = await replayOf(valid.idempotencyKey, hash!).catch((e: unknown) => Promise.reject(toConnectError(e)));
        if (original) {
          ctx.log.info({ task_id: original.taskId, idempotency_key: valid.idempotencyKey }, "idempotent repeat; returning the original task");
          return original;
        }
      }
      let handOff = reserveAgent?.(valid.taskType);
      let seq: number;
      try {
        if (handOff) {
          const allocated = await queue.allocateSeqFirst(handOff.capabilities, valid.priority);
          seq = allocated.seq;
          if (!allocated.first) {
            handOff.release(true);
            handOff = undefined;
          }
        } else {
          seq = await queue.allocateSeq();
        }
      } catch (e: unknown) {
        handOff?.release();
        ctx.log.warn({ err: e }, "queue unavailable; task not created");
        throw unavailable("the task queue is unavailable; the task was not created", e);
      }
      // Time-ordered ids keep "newest first" stable for tasks created in the same millisecond.
      const taskId = uuidv7();
      const now = clock();
      const row = { taskId, ...valid, requestHash: hash, correlationId: ctx.correlationId, seq, createdAt: now };
      const audit = { action: "task.created", fromStatus: null, toStatus: "pending", agentId: null, correlationId: ctx.correlationId } as const;
      let task: TaskRecord;
      let assigned: TaskRecord | undefined;
      try {
        if (handOff) {
          ({ created: task, assigned } = await tasks.insertAssigned(row, audit, handOff.begin(taskId, now)));
        } else {
          task = await tasks.insert(row, audit);
        }
      } catch (e: unknown) {
        handOff?.release();
        const err = toConnectError(e);
        // Two creates with one key raced and the other won: answer as its repeat.
        if (err.code === Code.AlreadyExists && valid.idempotencyKey) {
          const original = await replayOf(valid.idempotencyKey, hash!);
          if (original) return original;
        }
        // A lost connection (or a failure we cannot classify) leaves the
        // commit unknown: if the row made it, it must still reach the queue.
        if ((err.code === Code.Unavailable || err.code === Code.Internal) && !isDatabaseBusy(e)) repairQueue("a task insert failed; it may have committed");
        throw err;
      }
      const logCreated = () => ctx.log.info({ task_id: taskId, task_type: task.taskType, priority: task.priority }, "task created");
      if (handOff && assigned) {
        logCreated();
        events.publish(task);
        await handOff.deliver(assigned);
        return task;
      }
      try {
        await queue.enqueue({ taskId, taskType: task.taskType, priority: task.priority, seq });
      } catch (e: unknown) {
        ctx.log.warn({ err: e, task_id: taskId }, "queue refused the task; removing it");
        await tasks.deleteUnqueued(taskId).catch((err: unknown) => {
          // The row stays PENDING: it runs once a rebuild queues it.
          ctx.log.error({ err, task_id: taskId }, "could not remove unqueued task");
          repairQueue("a task the queue refused could not be removed");
        });
        throw unavailable("the task queue is unavailable; the task was not created", e);
      }
      logCreated();
      events.publish(task);
      return task;
    },

    get: (taskId: string) => getOrThrow(canonicalTaskId(taskId)),

    /** Newest first, keyset-paged. */
    async list(query: ListTasksQuery): Promise<{ tasks: TaskRecord[]; nextPageToken: string }> {
      const limit = Math.min(query.pageSize > 0 ? query.pageSize : DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
      const before = query.pageToken ? decodePageToken(query.pageToken) : undefined;
      const page = await tasks
        .list({ status: query.status, taskType: query.taskType, limit: limit + 1, before })
        .catch((e: unknown) => Promise.reject(toConnectError(e)));
      const more = page.length > limit;
      const items = more ? page.slice(0, limit) : page;
      return { tasks: items, nextPageToken: more ? encodePageToken(items[items.length - 1]!) : "" };
    },

    /**
     * Cancels a PENDING or ASSIGNED task. Subscribers to task events (the
     * agent registry) tell the holding agent and free its slot.
     */
    async cancel(taskId: string, ctx: RequestContext): Promise<TaskRecord> {
      taskId = canonicalTaskId(taskId);
      const before = await getOrThrow(taskId);
      if (isTerminal(before.status)) {
        throw failedPrecondition(`task ${taskId} is already ${before.status} and cannot be cancelled`);
      }
      const task = await tasks.cancel(taskId, clock(), ctx.correlationId).catch((e: unknown) => Promise.reject(toConnectError(e)));
      if (!task) {
        const now = await getOrThrow(taskId);
        throw failedPrecondition(`task ${taskId} is already ${now.status} and cannot be cancelled`);
      }
      if (before.status === "pending") {
        // Best effort: a stale queue entry is dropped at claim time anyway,
        // because assignment is a compare-and-set on PENDING.
        await queue.remove(taskId, task.taskType).catch((e: unknown) => ctx.log.warn({ err: e, task_id: taskId }, "could not unqueue cancelled task"));
      }
      ctx.log.info({ task_id: taskId, agent_id: before.agentId }, "task cancelled");
      events.publish(task);
      return task;
    },

    /** Puts a FAILED task back in the queue with a fresh set of attempts. */
    async retry(taskId: string, ctx: RequestContext): Promise<TaskRecord> {
      taskId = canonicalTaskId(taskId);
      if (!accepting()) throw unavailable("the service is shutting down; send the request to another instance");
      const before = await getOrThrow(taskId);
      const task = before.status === "failed" ? await tasks.retry(taskId, clock(), ctx.correlationId).catch((e: unknown) => Promise.reject(toConnectError(e))) : null;
      if (!task) throw failedPrecondition(`task ${taskId} is ${(await getOrThrow(taskId)).status}; only a failed task can be retried`);
      await queue.enqueue({ taskId, taskType: task.taskType, priority: task.priority, seq: task.seq }).catch((e: unknown) => {
        // The row is PENDING; a rebuild queues it once the queue takes writes again.
        ctx.log.warn({ err: e, task_id: taskId }, "could not queue the retried task yet");
        repairQueue("the queue refused a retried task");
      });
      ctx.log.info({ task_id: taskId }, "task retried");
      events.publish(task);
      return task;
    },

    /**
     * The task's current state, then every change, ending after a terminal
     * state or when `signal` aborts. Subscribes before reading, so no change
     * between the read and the subscription can be missed.
     */
    async *watch(taskId: string, signal: AbortSignal): AsyncGenerator<TaskRecord> {
      taskId = canonicalTaskId(taskId);
      // A change carries the task as committed (whole from this instance, less
      // its fixed fields from another), so every state is seen. One without a
      // state is re-read from the database, and so is a remote one stamped
      // with the same millisecond as the last state seen: instances do not
      // order their announcements among themselves, so it may be older.
      const changes: TaskChange[] = [];
      let wake: (() => void) | undefined;
      const unsubscribe = events.subscribe(taskId, (change) => {
        changes.push(change);
        wake?.();
      });
      const onAbort = () => wake?.();
      signal.addEventListener("abort", onAbort);
      try {
        let last = await getOrThrow(taskId);
        yield last;
        while (!isTerminal(last.status) && !signal.aborted) {
          const change = changes.shift();
          if (!change) {
            await new Promise<void>((resolve) => (wake = resolve));
            wake = undefined;
            continue;
          }
          const sameMs = change.state?.updatedAt.getTime() === last.updatedAt.getTime();
          // What was last seen, heard again (a re-read that found no change): no news, and no read.
          if (change.state && sameMs && change.state.status === last.status && change.state.attempt === last.attempt) continue;
          const remote = change.state && !sameMs ? { ...last, ...change.state } : undefined;
          const next = change.task ?? remote ?? (await getOrThrow(taskId));
          const newer =
            next.updatedAt > last.updatedAt ||
            (next.updatedAt.getTime() === last.updatedAt.getTime() && (next.status !== last.status || next.attempt !== last.attempt));
          if (!newer) continue;
          last = next;
          yield last;
        }
      } finally {
        signal.removeEventListener("abort", onAbort);
        unsubscribe();
      }
    },
  };
}
