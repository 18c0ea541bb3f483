import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { compareEntries, createInProcessQueue, type QueueLog } from "../../src/queue/in-process-queue.js";
import type { QueueEntry } from "../../src/queue/priority-queue.js";
import { TASK_TYPES } from "../../src/tasks/task-types.js";

/** Small deterministic PRNG so a failure reproduces. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

describe("in-process queue internals", () => {
  it("matches a sorted-array model under random enqueue, remove and claim", async () => {
    const random = prng(42);
    const q = createInProcessQueue();
    const model = new Map<string, QueueEntry>();
    let seq = 0;
    for (let step = 0; step < 5000; step++) {
      const r = random();
      if (r < 0.5) {
        const e: QueueEntry = {
          taskId: `t${Math.floor(random() * 800)}`,
          taskType: TASK_TYPES[Math.floor(random() * 3)]!,
          priority: Math.floor(random() * 11),
          seq: ++seq,
        };
        await q.enqueue(e);
        if (!model.has(e.taskId)) model.set(e.taskId, e);
      } else if (r < 0.7) {
        const id = `t${Math.floor(random() * 800)}`;
        const present = model.get(id);
        const type = present?.taskType ?? "code";
        expect(await q.remove(id, type)).toBe(present?.taskType === type);
        if (present?.taskType === type) model.delete(id);
      } else {
        const types = TASK_TYPES.filter(() => random() < 0.5);
        const expected = [...model.values()].filter((e) => types.includes(e.taskType)).sort(compareEntries)[0];
        const got = await q.claim(types);
        expect(got).toEqual(expected ?? null);
        if (expected) model.delete(expected.taskId);
      }
      if (step % 500 === 0) expect((await q.depth()).total).toBe(model.size);
    }
  });

  it("stays correct when stale removals trigger compaction", async () => {
    const q = createInProcessQueue();
    for (let i = 0; i < 5000; i++) await q.enqueue({ taskId: `t${i}`, taskType: "code", priority: i % 11, seq: i });
    for (let i = 0; i < 5000; i++) if (i % 5 !== 0) expect(await q.remove(`t${i}`, "code")).toBe(true);
    expect((await q.depth()).total).toBe(1000);
    const out: QueueEntry[] = [];
    for (let e = await q.claim(["code"]); e; e = await q.claim(["code"])) out.push(e);
    expect(out).toHaveLength(1000);
    expect(out.every((e) => Number(e.taskId.slice(1)) % 5 === 0)).toBe(true);
    expect(out).toEqual([...out].sort(compareEntries));
  });

  it("calls listeners from a microtask, not inside enqueue", async () => {
    const q = createInProcessQueue();
    const calls: string[] = [];
    q.onAvailable((t) => calls.push(t));
    const pending = q.enqueue({ taskId: "a", taskType: "qa", priority: 5, seq: 1 });
    expect(calls).toEqual([]);
    await pending;
    await Promise.resolve();
    expect(calls).toEqual(["qa"]);
  });

  it("does not let a caller mutate a queued entry", async () => {
    const q = createInProcessQueue();
    const e: QueueEntry = { taskId: "a", taskType: "code", priority: 1, seq: 1 };
    await q.enqueue(e);
    await q.enqueue({ taskId: "b", taskType: "code", priority: 5, seq: 2 });
    e.priority = 10;
    expect((await q.claim(["code"]))?.taskId).toBe("b");
  });

  it("accepts a pino logger and reports throwing listeners to it", async () => {
    const lines: string[] = [];
    const log: QueueLog = pino({ level: "warn" }, { write: (line: string) => void lines.push(line) });
    const q = createInProcessQueue({ log });
    q.onAvailable(() => {
      throw new Error("boom");
    });
    await q.enqueue({ taskId: "a", taskType: "code", priority: 5, seq: 1 });
    await new Promise((resolve) => setTimeout(resolve, 0));
    expect(lines.join("")).toContain("listener threw");
  });
});
