import type { TaskRecord } from "./task-types.js";

/** A task as committed, less what never changes after it was created (and can be large). */
export type TaskState = Omit<TaskRecord, "description" | "metadata">;

/**
 * What changed: enough to route the news (which task, which holder, which
 * state), and, where the publisher sent it, the state as committed, so a
 * watcher sees every state even when the task has already moved on.
 */
export type TaskChange = Pick<TaskRecord, "taskId" | "status" | "agentId" | "attempt" | "updatedAt"> & {
  /** The whole task as committed, when the change happened on this instance. */
  task?: TaskRecord;
  /** The task's state as committed, when the change came from another instance that sent it. */
  state?: TaskState;
};

export type TaskListener = (change: TaskChange) => void;

/**
 * Fan-out of task changes to watchers (WatchTask) and to the agent registry
 * (which tells a holder its task was cancelled). Publishers call `publish`
 * after the change is committed; with a shared backend, every instance's
 * listeners hear it.
 */
export interface TaskEvents {
  publish(task: TaskRecord): void;
  /** Changes of one task. Returns an unsubscribe function. */
  subscribe(taskId: string, listener: TaskListener): () => void;
  /** Every change. Returns an unsubscribe function. */
  subscribeAll(listener: TaskListener): () => void;
  /** Safe to call twice. */
  close(): Promise<void>;
}

/** Listener bookkeeping shared by the local and the Redis fan-out. */
export class TaskListeners {
  private readonly byTask = new Map<string, Set<TaskListener>>();
  private readonly all = new Set<TaskListener>();

  deliver(change: TaskChange): void {
    for (const l of this.byTask.get(change.taskId) ?? []) l(change);
    for (const l of this.all) l(change);
  }

  subscribe(taskId: string, listener: TaskListener): () => void {
    let set = this.byTask.get(taskId);
    if (!set) this.byTask.set(taskId, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0) this.byTask.delete(taskId);
    };
  }

  subscribeAll(listener: TaskListener): () => void {
    this.all.add(listener);
    return () => this.all.delete(listener);
  }
}

/** In-process fan-out: one instance sees the changes it makes itself. */
export function createLocalTaskEvents(): TaskEvents {
  const listeners = new TaskListeners();
  return {
    publish: (task) => listeners.deliver({ ...task, task }),
    subscribe: (taskId, listener) => listeners.subscribe(taskId, listener),
    subscribeAll: (listener) => listeners.subscribeAll(listener),
    close: async () => undefined,
  };
}
