import type { PriorityQueue, QueueDepth, QueueEntry } from "./priority-queue.js";
import { isTaskType, MAX_PRIORITY, MIN_PRIORITY, type TaskType } from "../tasks/task-types.js";

/**
 * The part of a pino logger the queue uses. Queues log at most at `warn`: a
 * queue problem is reported to the caller as a rejected promise, the log line
 * is only context for operators.
 */
export interface QueueLog {
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
}

/**
 * Seqs must stay below 2^40 so the Redis score `(10 - priority) * 2^40 + seq`
 * is an exact integer in a double. Both implementations enforce the same
 * bound so they accept exactly the same entries.
 */
export const MAX_SEQ = 2 ** 40 - 1;

/** Throws a RangeError for an entry neither implementation could order correctly. */
export function assertValidEntry(entry: QueueEntry): void {
  if (typeof entry.taskId !== "string" || entry.taskId.length === 0) {
    throw new RangeError("queue entry needs a non-empty taskId");
  }
  if (!isTaskType(entry.taskType)) {
    throw new RangeError(`unknown task type: ${String(entry.taskType)}`);
  }
  if (!Number.isInteger(entry.priority) || entry.priority < MIN_PRIORITY || entry.priority > MAX_PRIORITY) {
    throw new RangeError(`priority must be an integer ${MIN_PRIORITY}–${MAX_PRIORITY}, got ${entry.priority}`);
  }
  assertValidSeq(entry.seq, "seq");
}

/** Throws a RangeError unless `seq` is an integer in [0, MAX_SEQ]. */
export function assertValidSeq(seq: number, name: string): void {
  if (!Number.isInteger(seq) || seq < 0 || seq > MAX_SEQ) {
    throw new RangeError(`${name} must be an integer 0–${MAX_SEQ}, got ${seq}`);
  }
}

/** Queue order: negative when `a` runs before `b` (higher priority, then lower seq). */
export function compareEntries(a: QueueEntry, b: QueueEntry): number {
  return b.priority - a.priority || a.seq - b.seq;
}

/**
 * Calls every listener in a microtask, so a listener never runs inside the
 * queue operation that raised the signal, and one that throws neither breaks
 * that operation nor the other listeners.
 */
export function notifyListeners(
  listeners: ReadonlySet<(taskType: TaskType) => void>,
  taskType: TaskType,
  log: QueueLog | undefined,
): void {
  for (const listener of listeners) {
    queueMicrotask(() => {
      // The listener may have unsubscribed between scheduling and now.
      if (!listeners.has(listener)) return;
      try {
        listener(taskType);
      } catch (e: unknown) {
        log?.warn({ err: e, taskType }, "queue onAvailable listener threw");
      }
    });
  }
}

/** Binary min-heap under `compareEntries`. */
class EntryHeap {
  readonly items: QueueEntry[] = [];

  get size(): number {
    return this.items.length;
  }

  peek(): QueueEntry | undefined {
    return this.items[0];
  }

  push(entry: QueueEntry): void {
    const items = this.items;
    items.push(entry);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (compareEntries(items[i]!, items[parent]!) >= 0) break;
      [items[i], items[parent]] = [items[parent]!, items[i]!];
      i = parent;
    }
  }

  pop(): QueueEntry | undefined {
    const items = this.items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      items[0] = last;
      this.siftDown(0);
    }
    return top;
  }

  /** Replaces the content in O(n). */
  rebuild(entries: QueueEntry[]): void {
    this.items.length = 0;
    this.items.push(...entries);
    for (let i = (this.items.length >> 1) - 1; i >= 0; i--) this.siftDown(i);
  }

  private siftDown(i: number): void {
    const items = this.items;
    const n = items.length;
    for (;;) {
      const left = 2 * i + 1;
      const right = left + 1;
      let best = i;
      if (left < n && compareEntries(items[left]!, items[best]!) < 0) best = left;
      if (right < n && compareEntries(items[right]!, items[best]!) < 0) best = right;
      if (best === i) return;
      [items[i], items[best]] = [items[best]!, items[i]!];
      i = best;
    }
  }
}

/** Per task type: the heap plus how many of its items are stale (removed by `remove`). */
interface TypeHeap {
  heap: EntryHeap;
  stale: number;
}

/** Below this many stale items a heap is never compacted; compaction would cost more than it saves. */
const COMPACT_MIN_STALE = 1024;

export interface InProcessQueueOptions {
  /** Where a throwing onAvailable listener is reported. */
  log?: QueueLog;
}

/**
 * The embedded (single-instance) queue: per task type a binary heap ordered by
 * (priority desc, seq asc), plus a Map taskId → entry for O(1) membership and
 * removal. `remove` deletes lazily: the heap item stays until it reaches the
 * top (or the heap is compacted), and is recognised as stale because the Map
 * no longer points at that exact object.
 *
 * onAvailable listeners are called from a microtask (never synchronously
 * inside enqueue/reconcile), once per call and task type that gained entries.
 * Operations after `close()` reject.
 */
export function createInProcessQueue(options: InProcessQueueOptions = {}): PriorityQueue {
  const heaps = new Map<TaskType, TypeHeap>();
  const live = new Map<string, QueueEntry>();
  const byPriority = new Map<number, number>();
  const listeners = new Set<(taskType: TaskType) => void>();
  let lastSeq = 0;
  let closed = false;

  function assertOpen(): void {
    if (closed) throw new Error("queue is closed");
  }

  function heapFor(type: TaskType): TypeHeap {
    let h = heaps.get(type);
    if (!h) {
      h = { heap: new EntryHeap(), stale: 0 };
      heaps.set(type, h);
    }
    return h;
  }

  function isLive(entry: QueueEntry): boolean {
    return live.get(entry.taskId) === entry;
  }

  function count(priority: number, delta: number): void {
    const n = (byPriority.get(priority) ?? 0) + delta;
    if (n === 0) byPriority.delete(priority);
    else byPriority.set(priority, n);
  }

  /** Adds unless present; returns whether it was added. */
  function add(entry: QueueEntry): boolean {
    if (live.has(entry.taskId)) return false;
    // Copy so a caller mutating its object cannot reorder the heap.
    const own: QueueEntry = { taskId: entry.taskId, taskType: entry.taskType, priority: entry.priority, seq: entry.seq };
    live.set(own.taskId, own);
    heapFor(own.taskType).heap.push(own);
    count(own.priority, 1);
    return true;
  }

  /** The best live entry of a type, discarding stale items on top. */
  function peekLive(type: TaskType): QueueEntry | undefined {
    const h = heaps.get(type);
    if (!h) return undefined;
    for (;;) {
      const top = h.heap.peek();
      if (top === undefined || isLive(top)) return top;
      h.heap.pop();
      h.stale--;
    }
  }

  /** Removes and returns the best live entry among `types`, or null. */
  function claimBest(types: readonly TaskType[]): QueueEntry | null {
    let best: QueueEntry | undefined;
    for (const type of new Set(types)) {
      const top = peekLive(type);
      if (top !== undefined && (best === undefined || compareEntries(top, best) < 0)) best = top;
    }
    if (best === undefined) return null;
    // `best` is the live top of its heap (peekLive just checked), so pop removes exactly it.
    heaps.get(best.taskType)!.heap.pop();
    live.delete(best.taskId);
    count(best.priority, -1);
    return { ...best };
  }

  function nextSeq(): number {
    assertOpen();
    if (lastSeq >= MAX_SEQ) throw new RangeError("queue seq space exhausted");
    return ++lastSeq;
  }

  return {
    async allocateSeq() {
      return nextSeq();
    },

    async allocateSeqFirst(types, priority) {
      const seq = nextSeq();
      return { seq, first: [...new Set(types)].every((type) => (peekLive(type)?.priority ?? -1) < priority) };
    },

    async enqueue(entry) {
      assertOpen();
      assertValidEntry(entry);
      if (add(entry)) notifyListeners(listeners, entry.taskType, options.log);
    },

    async claim(types) {
      assertOpen();
      return claimBest(types);
    },

    async claimBatch(types, max) {
      assertOpen();
      const out: QueueEntry[] = [];
      const limit = Math.floor(max);
      while (out.length < limit) {
        const entry = claimBest(types);
        if (entry === null) break;
        out.push(entry);
      }
      return out;
    },

    async remove(taskId, taskType) {
      assertOpen();
      const entry = live.get(taskId);
      if (entry === undefined || entry.taskType !== taskType) return false;
      live.delete(taskId);
      count(entry.priority, -1);
      const h = heapFor(taskType);
      h.stale++;
      // Compact when stale items dominate, so cancelled-but-never-claimed work cannot grow memory without bound.
      if (h.stale >= COMPACT_MIN_STALE && h.stale * 2 > h.heap.size) {
        h.heap.rebuild(h.heap.items.filter(isLive));
        h.stale = 0;
      }
      return true;
    },

    async depth(): Promise<QueueDepth> {
      assertOpen();
      return { total: live.size, byPriority: Object.fromEntries(byPriority) };
    },

    async reconcile(entries, minSeq) {
      assertOpen();
      assertValidSeq(minSeq, "minSeq");
      // Validate everything first so a bad entry leaves the queue untouched.
      for (const entry of entries) assertValidEntry(entry);
      const added = new Set<TaskType>();
      for (const entry of entries) if (add(entry)) added.add(entry.taskType);
      lastSeq = Math.max(lastSeq, minSeq);
      for (const type of added) notifyListeners(listeners, type, options.log);
    },

    async ping() {
      assertOpen();
    },

    // It lives and dies with the process, so it never loses entries on its own.
    async intact() {
      assertOpen();
      return true;
    },

    onReset() {
      return () => {};
    },

    onAvailable(listener) {
      if (closed) return () => {};
      // Wrap so the same function registered twice gets two independent subscriptions.
      const wrapped = (taskType: TaskType) => listener(taskType);
      listeners.add(wrapped);
      return () => {
        listeners.delete(wrapped);
      };
    },

    async close() {
      closed = true;
      listeners.clear();
      heaps.clear();
      live.clear();
      byPriority.clear();
    },
  };
}
