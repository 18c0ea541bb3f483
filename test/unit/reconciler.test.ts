/**
 * The reconciler's retry policy, over a queue whose rebuild the test makes
 * fail: a real Redis fails a rebuild partway only by bad luck (writes
 * refused after the first chunk put the marker back). Rebuilds against real
 * backends are covered in test/integration/queue-contract and test/fault.
 */
import { afterEach, describe, expect, it, vi } from "vitest";
import { Reconciler } from "../../src/queue/reconciler.js";
import type { PriorityQueue, QueueEntry } from "../../src/queue/priority-queue.js";
import type { TaskRepository } from "../../src/tasks/task-repository.js";
import { createLogger } from "../../src/telemetry/logger.js";
import { taskRecord } from "../support/records.js";

const pending = [taskRecord({ taskId: "t-1", seq: 1 }), taskRecord({ taskId: "t-2", seq: 2 })];

/** A queue that keeps its marker after any rebuild attempt and fails the first `failures` of them. */
function flakyQueue(failures: number) {
  let resetListener: (() => void) | undefined;
  const attempts: QueueEntry[][] = [];
  const queue = {
    intact: async () => attempts.length > 0,
    reconcile: async (entries: readonly QueueEntry[]) => {
      attempts.push([...entries]);
      if (attempts.length <= failures) throw new Error("OOM command not allowed when used memory > 'maxmemory'");
    },
    onReset: (listener: () => void) => {
      resetListener = listener;
      return () => (resetListener = undefined);
    },
  };
  return { queue: queue as unknown as PriorityQueue, attempts, reset: () => resetListener?.() };
}

const tasks = { listRunnable: async () => pending, maxSeq: async () => 2 } as unknown as TaskRepository;

describe("Reconciler", () => {
  afterEach(() => vi.useRealTimers());

  it.each([
    ["a reset", (r: { reset: () => void }) => r.reset()],
    ["the periodic check", () => vi.advanceTimersByTimeAsync(1000)],
  ])("retries a rebuild that failed after %s until one succeeds, though the queue looks intact", async (_, trigger) => {
    vi.useFakeTimers();
    const q = flakyQueue(2);
    const reconciler = new Reconciler({ tasks, queue: q.queue, log: createLogger({ level: "silent" }), checkIntervalMs: 1000 });
    reconciler.start();
    await trigger(q);
    await vi.advanceTimersByTimeAsync(0);
    expect(q.attempts).toHaveLength(1);
    // The queue now says it is intact, so only the reconciler's own retry can run it again.
    await vi.advanceTimersByTimeAsync(10_000);
    expect(q.attempts).toHaveLength(3);
    expect(q.attempts[2]!.map((e) => e.taskId)).toEqual(["t-1", "t-2"]);
    // Succeeded: no more attempts.
    await vi.advanceTimersByTimeAsync(60_000);
    expect(q.attempts).toHaveLength(3);
    reconciler.close();
  });
});
