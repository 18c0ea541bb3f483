/**
 * How WatchTask combines changes heard from other instances with what it
 * read: pure logic over a fake repository and a fake event feed, so the
 * order and timing of changes are exact (the multi-instance behaviour itself
 * is in test/integration/agent-lifecycle and test/fault/cluster).
 */
import { describe, expect, it } from "vitest";
import { createTaskService } from "../../src/tasks/task-service.js";
import type { TaskChange, TaskEvents, TaskListener } from "../../src/tasks/task-events.js";
import type { TaskRepository } from "../../src/tasks/task-repository.js";
import type { TaskRecord } from "../../src/tasks/task-types.js";
import { stateOf, taskRecord } from "../support/records.js";

const ID = "01a20d30-9f26-7000-9f2b-34598c713c08";
const at = (ms: number) => new Date(1_700_000_000_000 + ms);
const base = taskRecord({ taskId: ID });
const remote = (t: TaskRecord, withState = true): TaskChange => ({
  taskId: t.taskId, status: t.status, agentId: t.agentId, attempt: t.attempt, updatedAt: t.updatedAt, ...(withState ? { state: stateOf(t) } : {}),
});

/** A watch over a database row the test sets, fed by changes the test delivers. */
function harness(row: TaskRecord) {
  const db = { row };
  let listener: TaskListener | undefined;
  const events = { subscribe: (_id: string, l: TaskListener) => ((listener = l), () => (listener = undefined)) } as unknown as TaskEvents;
  const reads = { count: 0 };
  const tasks = { get: async () => (reads.count++, db.row) } as unknown as TaskRepository;
  const service = createTaskService({
    tasks, events, queue: {} as never, validate: () => { throw new Error("unused"); }, idempotencyTtlMs: 1, accepting: () => true, repairQueue: () => {},
  });
  const seen: TaskRecord[] = [];
  const done = (async () => {
    for await (const t of service.watch(ID, new AbortController().signal)) seen.push(t);
  })();
  const deliver = async (c: TaskChange) => {
    while (!listener) await new Promise((r) => setTimeout(r, 1));
    listener(c);
    await new Promise((r) => setTimeout(r, 5));
  };
  return { db, seen, done, deliver, reads };
}

describe("WatchTask with changes from other instances", () => {
  it("shows a state carried by the change even when the row has already moved on", async () => {
    const h = harness(base);
    await new Promise((r) => setTimeout(r, 5));
    const assigned: TaskRecord = { ...base, status: "assigned", agentId: "a", attempt: 1, assignedAt: at(10), updatedAt: at(10), leaseExpiresAt: at(30_010) };
    const completed: TaskRecord = { ...assigned, status: "completed", result: { ok: true }, completedAt: at(12), updatedAt: at(12), leaseExpiresAt: null };
    h.db.row = completed;
    await h.deliver(remote(assigned));
    await h.deliver(remote(completed, false));
    await h.done;
    expect(h.seen.map((t) => t.status)).toEqual(["pending", "assigned", "completed"]);
    // The fields fixed at creation come from the first read.
    expect(h.seen[1]).toEqual(assigned);
    expect(h.seen[2]).toEqual(completed);
  });

  it("re-reads a remote state stamped with the last state's millisecond instead of going back to it", async () => {
    const assigned: TaskRecord = { ...base, status: "assigned", agentId: "a", attempt: 1, assignedAt: at(10), updatedAt: at(10) };
    const h = harness(assigned);
    await new Promise((r) => setTimeout(r, 5));
    // An older change from another instance, in the same millisecond, arriving late.
    await h.deliver(remote({ ...base, updatedAt: at(10) }));
    const completed: TaskRecord = { ...assigned, status: "completed", result: {}, completedAt: at(11), updatedAt: at(11) };
    h.db.row = completed;
    await h.deliver(remote(completed, false));
    await h.done;
    expect(h.seen.map((t) => t.status)).toEqual(["assigned", "completed"]);
  });

  it("takes a state it has already seen (a periodic re-read that found nothing new) without reading the database", async () => {
    const assigned: TaskRecord = { ...base, status: "assigned", agentId: "a", attempt: 1, assignedAt: at(10), updatedAt: at(10) };
    const h = harness(assigned);
    await new Promise((r) => setTimeout(r, 5));
    await h.deliver(remote(assigned));
    await h.deliver(remote(assigned));
    expect(h.reads.count).toBe(1);
    expect(h.seen.map((t) => t.status)).toEqual(["assigned"]);
    const completed: TaskRecord = { ...assigned, status: "completed", result: {}, completedAt: at(11), updatedAt: at(11) };
    await h.deliver(remote(completed));
    await h.done;
    expect(h.seen.map((t) => t.status)).toEqual(["assigned", "completed"]);
  });

  it("never goes back to an older state heard late", async () => {
    const h = harness(base);
    await new Promise((r) => setTimeout(r, 5));
    const assigned: TaskRecord = { ...base, status: "assigned", agentId: "a", attempt: 1, updatedAt: at(20) };
    await h.deliver(remote(assigned));
    await h.deliver(remote({ ...base, status: "pending", updatedAt: at(15) }));
    const failed: TaskRecord = { ...assigned, status: "failed", error: "x", updatedAt: at(30) };
    h.db.row = failed;
    await h.deliver(remote(failed, false));
    await h.done;
    expect(h.seen.map((t) => t.status)).toEqual(["pending", "assigned", "failed"]);
  });
});
