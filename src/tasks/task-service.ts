import { uuidv7 } from "../ids.js";
import type { Logger } from "../telemetry/logger.js";
import type { PriorityQueue } from "../queue/priority-queue.js";
import { failedPrecondition, invalidArgument, notFound, toConnectError, unavailable } from "../errors/errors.js";
import type { TaskEvents } from "./task-events.js";
import type { TaskRepository } from "./task-repository.js";
import { isTerminal } from "./task-state.js";
import type { TaskRecord, TaskStatus, TaskType } from "./task-types.js";
import { validateCreateTask, type CreateTaskInput } from "./task-validation.js";

export interface TaskServiceOptions {
  tasks: TaskRepository;
  queue: PriorityQueue;
  events: TaskEvents;
  log: Logger;
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

function decodePageToken(token: string): { createdAt: Date; taskId: string } {
  const [ms, taskId] = Buffer.from(token, "base64url").toString().split(":");
  const when = Number(ms);
  if (!taskId || !UUID.test(taskId) || !Number.isSafeInteger(when)) {
    throw invalidArgument(["query", "page_token"], "is not a token returned by a previous call");
  }
  return { createdAt: new Date(when), taskId };
}

export type TaskService = ReturnType<typeof createTaskService>;

/**
 * Task use cases shared by every transport. The database row is written first
 * and is the source of truth; the queue is only an index of runnable work.
 */
export function createTaskService({ tasks, queue, events, log, clock = () => new Date() }: TaskServiceOptions) {
  async function getOrThrow(taskId: string): Promise<TaskRecord> {
    if (!UUID.test(taskId)) throw notFound("task", taskId);
    const task = await tasks.get(taskId).catch((e: unknown) => Promise.reject(toConnectError(e)));
    if (!task) throw notFound("task", taskId);
    return task;
  }

  return {
    /**
     * Stores a PENDING task and queues it. If the queue cannot take it, the
     * row is removed again and the caller gets UNAVAILABLE: no task exists
     * that the queue does not know about.
     */
    async create(input: CreateTaskInput, ctx: RequestContext): Promise<TaskRecord> {
      const valid = validateCreateTask(input);
      let seq: number;
      try {
        seq = await queue.allocateSeq();
      } catch (e: unknown) {
        ctx.log.warn({ err: e }, "queue unavailable; task not created");
        throw unavailable("the task queue is unavailable; the task was not created", e);
      }
      // Time-ordered ids keep "newest first" stable for tasks created in the same millisecond.
      const taskId = uuidv7();
      const task = await tasks
        .insert(
          { taskId, ...valid, correlationId: ctx.correlationId, seq, createdAt: clock() },
          { action: "task.created", fromStatus: null, toStatus: "pending", agentId: null, correlationId: ctx.correlationId },
        )
        .catch((e: unknown) => Promise.reject(toConnectError(e)));
      try {
        await queue.enqueue({ taskId, taskType: task.taskType, priority: task.priority, seq });
      } catch (e: unknown) {
        ctx.log.warn({ err: e, task_id: taskId }, "queue refused the task; removing it");
        await tasks.deleteUnqueued(taskId).catch((err: unknown) => {
          // The row stays PENDING; the start-up rebuild will queue it.
          ctx.log.error({ err, task_id: taskId }, "could not remove unqueued task");
        });
        throw unavailable("the task queue is unavailable; the task was not created", e);
      }
      ctx.log.info(
        { task_id: taskId, task_type: task.taskType, priority: task.priority },
        "task created",
      );
      events.publish(task);
      return task;
    },

    get: getOrThrow,

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

    /**
     * The task's current state, then every change, ending after a terminal
     * state or when `signal` aborts. Subscribes before reading, so no change
     * between the read and the subscription can be missed.
     */
    async *watch(taskId: string, signal: AbortSignal): AsyncGenerator<TaskRecord> {
      const pending: TaskRecord[] = [];
      let wake: (() => void) | undefined;
      const unsubscribe = events.subscribe(taskId, (t) => {
        pending.push(t);
        wake?.();
      });
      const onAbort = () => wake?.();
      signal.addEventListener("abort", onAbort);
      try {
        let last = await getOrThrow(taskId);
        yield last;
        while (!isTerminal(last.status) && !signal.aborted) {
          const next = pending.shift();
          if (!next) {
            await new Promise<void>((resolve) => (wake = resolve));
            wake = undefined;
            continue;
          }
          if (next.updatedAt < last.updatedAt || (next.status === last.status && next.updatedAt.getTime() === last.updatedAt.getTime() && next.attempt === last.attempt)) continue;
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
