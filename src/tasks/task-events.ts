import type { TaskRecord } from "./task-types.js";

export type TaskListener = (task: TaskRecord) => void;

/**
 * Fan-out of task changes to watchers (WatchTask) and to the agent registry
 * (which tells a holder its task was cancelled). Publishers call `publish`
 * after the change is committed.
 */
export interface TaskEvents {
  publish(task: TaskRecord): void;
  /** Changes of one task. Returns an unsubscribe function. */
  subscribe(taskId: string, listener: TaskListener): () => void;
  /** Every change. Returns an unsubscribe function. */
  subscribeAll(listener: TaskListener): () => void;
}

/** In-process fan-out: one instance sees the changes it makes itself. */
export function createLocalTaskEvents(): TaskEvents {
  const byTask = new Map<string, Set<TaskListener>>();
  const all = new Set<TaskListener>();
  return {
    publish(task) {
      for (const l of byTask.get(task.taskId) ?? []) l(task);
      for (const l of all) l(task);
    },
    subscribe(taskId, listener) {
      let set = byTask.get(taskId);
      if (!set) byTask.set(taskId, (set = new Set()));
      set.add(listener);
      return () => {
        set.delete(listener);
        if (set.size === 0) byTask.delete(taskId);
      };
    },
    subscribeAll(listener) {
      all.add(listener);
      return () => all.delete(listener);
    },
  };
}
