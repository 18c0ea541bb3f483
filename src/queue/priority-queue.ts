import type { TaskType } from "../tasks/task-types.js";

/**
 * An entry in the queue. Higher `priority` first; equal priorities by
 * ascending `seq` (first in, first out). `seq` is allocated once by the queue
 * at creation and reused when a task goes back, so it keeps its place.
 */
export interface QueueEntry {
  taskId: string;
  taskType: TaskType;
  priority: number;
  seq: number;
}

export interface QueueDepth {
  total: number;
  /** Priority (0–10) → count; priorities with no entry are left out. */
  byPriority: Record<number, number>;
}

/**
 * The index of runnable work. It can always be rebuilt from the database,
 * which stays the source of truth. Both implementations (in-process and Redis)
 * pass the same contract suite.
 */
export interface PriorityQueue {
  /**
   * Next place in line. Strictly increasing across every producer sharing the
   * queue. A shared backend refuses (and signals {@link onReset}) until it has
   * been rebuilt by {@link reconcile} after losing its data, so new tasks can
   * never be numbered ahead of older ones.
   */
  allocateSeq(): Promise<number>;
  /**
   * {@link allocateSeq}, and in the same step whether an entry with that seq
   * and `priority` would be the next that `claim(types)` returns: nothing is
   * queued among `types` at `priority` or above. A create uses it to hand a
   * task straight to a waiting agent without overtaking queued work.
   */
  allocateSeqFirst(types: readonly TaskType[], priority: number): Promise<{ seq: number; first: boolean }>;
  /** Adds an entry; adding a task already queued is a no-op. */
  enqueue(entry: QueueEntry): Promise<void>;
  /**
   * Atomically removes and returns the best entry (highest priority, then
   * lowest seq) whose type is in `types`, or null. One call picks across all
   * the given types, so two consumers never receive the same entry.
   */
  claim(types: readonly TaskType[]): Promise<QueueEntry | null>;
  /**
   * Up to `max` entries at once, in the order `claim` would have returned
   * them one by one: one round trip for a batch of free slots.
   */
  claimBatch(types: readonly TaskType[], max: number): Promise<QueueEntry[]>;
  /** Removes a task (e.g. cancelled while pending). Returns whether it was queued. */
  remove(taskId: string, taskType: TaskType): Promise<boolean>;
  depth(): Promise<QueueDepth>;
  /**
   * Re-adds the given entries that are missing (no-op for present ones) and
   * makes sure future seqs are above `minSeq`. Used at start-up to rebuild the
   * index from the database.
   */
  reconcile(entries: readonly QueueEntry[], minSeq: number): Promise<void>;
  /** Throws when the backend cannot be reached or refuses writes. */
  ping(): Promise<void>;
  /**
   * False when the backend has lost its data since the last reconcile (e.g.
   * Redis was flushed or restarted without persistence). Throws when unreachable.
   */
  intact(): Promise<boolean>;
  /**
   * Subscribes to "the index may have lost entries": a reconnect after an
   * outage, or a lost-data refusal. Listeners rebuild it from the database.
   */
  onReset(listener: () => void): () => void;
  /**
   * Subscribes to "work may be available" signals, including those raised by
   * other instances sharing the queue. Returns an unsubscribe function.
   */
  onAvailable(listener: (taskType: TaskType) => void): () => void;
  /** Safe to call twice. */
  close(): Promise<void>;
}
