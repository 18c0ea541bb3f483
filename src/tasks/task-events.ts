import type { TaskRecord } from "./task-types.js";

/** A task as committed, less what never changes after it was created (and can be large). */
export type TaskState = Omit<TaskRecord, "description" | "metadata">;

export function stateOf({ description: _description, metadata: _metadata, ...state }: TaskRecord): TaskState {
  return state;
}

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
  /** Tasks with a watcher on this instance. */
  watched(): string[];
  /**
   * Gives the watchers of a task its state as just read from the database,
   * for changes that were never announced to them: lost over pub/sub while a
   * connection to Redis was down, or made by hand. Watchers that have seen it
   * already ignore it. The all-changes listeners do not hear it: what they
   * act on (a cancel reaching a holder) is caught through the holder's lease.
   */
  refresh(state: TaskState): void;
  /**
   * Called when announcements from other instances may have been missed (the
   * subscription was re-established after its connection dropped, or an
   * instance could not announce for a while). Returns an unsubscribe function.
   */
  onMissed(listener: () => void): () => void;
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

  watched(): string[] {
    return [...this.byTask.keys()];
  }

  /** Carried as a state, so a watcher compares it with what it has seen, as it does a remote change. */
  refresh(state: TaskState): void {
    const change: TaskChange = { taskId: state.taskId, status: state.status, agentId: state.agentId, attempt: state.attempt, updatedAt: state.updatedAt, state };
    for (const l of this.byTask.get(state.taskId) ?? []) l(change);
  }
}

/** In-process fan-out: one instance sees the changes it makes itself. */
export function createLocalTaskEvents(): TaskEvents {
  const listeners = new TaskListeners();
  return {
    publish: (task) => listeners.deliver({ ...task, task }),
    subscribe: (taskId, listener) => listeners.subscribe(taskId, listener),
    subscribeAll: (listener) => listeners.subscribeAll(listener),
    watched: () => listeners.watched(),
    refresh: (state) => listeners.refresh(state),
    // Every change is made here and heard at once: nothing can be missed.
    onMissed: () => () => undefined,
    close: async () => undefined,
  };
}
