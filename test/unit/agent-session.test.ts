/**
 * An agent session's slot accounting around results, with a fake database
 * whose answers the test scripts: cases a real database produces only by bad
 * luck (a commit whose reply is lost). The transports and real databases are
 * covered in test/integration/delivery.
 */
import { describe, expect, it } from "vitest";
import { AgentSession, type SessionDeps } from "../../src/agents/agent-session.js";
import { createAgentMessageParser } from "../../src/agents/agent-messages.js";
import type { ServerMessage } from "../../src/agents/agent-messages.js";
import { createLogger } from "../../src/telemetry/logger.js";
import type { TaskRecord } from "../../src/tasks/task-types.js";
import { taskRecord } from "../support/records.js";

/** A task assigned to the test's agent, attempt 1. */
const task = (id: string, over: Partial<TaskRecord> = {}) => taskRecord({ taskId: id, status: "assigned", agentId: "agent-1", attempt: 1, assignedAt: new Date(1), ...over });

/** A session registered with one slot, over a database the test scripts. */
async function oneSlotSession(db: { complete: () => Promise<TaskRecord | null>; get: () => Promise<TaskRecord | null> }) {
  const sent: ServerMessage[] = [];
  const published: TaskRecord[] = [];
  let freed = 0;
  const deps = {
    tasks: { complete: db.complete, get: db.get },
    agents: { upsertConnected: async () => undefined, setStatus: async () => undefined },
    queue: {},
    events: { publish: (t: TaskRecord) => published.push(t) },
    log: createLogger({ level: "silent" }),
    clock: () => new Date(),
    heartbeatIntervalMs: 1000,
    heartbeatTimeoutMs: 60_000,
    parse: createAgentMessageParser({ descriptionMaxLength: 2000, metadataMaxBytes: 65536, resultMaxBytes: 65536, jsonMaxDepth: 32 }),
    retry: { baseMs: 10, maxMs: 10 },
    taskTimeoutMs: 60_000,
    accepting: () => true,
    repairQueue: () => {},
    registry: { attach: () => {}, detach: () => {}, slotFreed: () => freed++ },
  } as unknown as SessionDeps;
  const session = new AgentSession(deps, "grpc", { send: (m) => sent.push(m), end: () => {} }, "corr");
  await session.receive({ type: "register", agentId: "agent-1", agentType: "t", capabilities: [], maxConcurrency: 1 });
  return { session, sent, published, freed: () => freed };
}

const settled = () => new Promise((r) => setTimeout(r, 10));
const T1 = "01a20d30-9f26-7000-9f2b-000000000001";
const T2 = "01a20d30-9f26-7000-9f2b-000000000002";

describe("agent session: slots around results", () => {
  it("frees the slot when a result arrives, takes it back when recording fails, and frees it for good once the resent result shows it was recorded after all", async () => {
    const row = task(T1);
    let calls = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const s = await oneSlotSession({
      // The first write commits but its reply is lost; the resent one finds the task already completed.
      complete: async () => {
        if (calls++ === 0) {
          await gate;
          row.status = "completed";
          row.completedAt = new Date(2);
          throw Object.assign(new Error("Connection terminated unexpectedly"), { code: "ECONNRESET" });
        }
        return null;
      },
      get: async () => ({ ...row }),
    });
    s.session.deliver(task(T1));
    expect(s.session.freeSlots).toBe(0);

    void s.session.receive({ type: "task_complete", taskId: T1, result: {} });
    await settled();
    // While it is being recorded the agent is not working on it.
    expect(s.session.activeTasks).toBe(0);
    expect(s.session.freeSlots).toBe(1);
    release();
    await settled();
    expect(s.sent.at(-1)).toMatchObject({ type: "error", code: "unavailable", taskId: T1 });
    expect(s.session.freeSlots).toBe(0);
    expect(s.session.held.has(T1)).toBe(true);

    const freedBefore = s.freed();
    await s.session.receive({ type: "task_complete", taskId: T1, result: {} });
    await settled();
    expect(s.sent.at(-1)).toEqual({ type: "completion_ack", taskId: T1 });
    expect(s.session.held.size).toBe(0);
    expect(s.session.freeSlots).toBe(1);
    // Freed once by the resent result, not a second time when it was forgotten.
    expect(s.freed() - freedBefore).toBe(1);
    expect(s.published.map((t) => t.status)).toEqual(["completed"]);
  });

  it("does not count a result twice when the agent sends it twice at once", async () => {
    const row = task(T2);
    const s = await oneSlotSession({
      complete: async () => {
        if (row.status === "completed") return null;
        row.status = "completed";
        return { ...row };
      },
      get: async () => ({ ...row }),
    });
    s.session.deliver(task(T2));
    const freedBefore = s.freed();
    void s.session.receive({ type: "task_complete", taskId: T2, result: {} });
    void s.session.receive({ type: "task_complete", taskId: T2, result: {} });
    await settled();
    expect(s.sent.filter((m) => m.type === "completion_ack")).toHaveLength(2);
    expect(s.session.freeSlots).toBe(1);
    expect(s.session.activeTasks).toBe(0);
    expect(s.freed() - freedBefore).toBe(1);
  });

  it("a lease found gone stops the agent and frees its slot, unless a result is deciding the task or the lease has moved on", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const s = await oneSlotSession({ complete: async () => (await gate, { ...task(T1), status: "completed" }), get: async () => null });
    const cancelled = { ...task(T1), status: "cancelled" as const };

    // A result on its way to the database decides the task.
    s.session.deliver(task(T1));
    void s.session.receive({ type: "task_complete", taskId: T1, result: {} });
    await settled();
    s.session.leaseGone(T1, 1, cancelled);
    expect(s.sent.map((m) => m.type)).not.toContain("task_cancelled");
    release();
    await settled();
    expect(s.sent.at(-1)).toMatchObject({ type: "completion_ack", taskId: T1 });

    // Read for attempt 1, but the session now holds attempt 2.
    s.session.deliver(task(T2, { attempt: 2 }));
    s.session.leaseGone(T2, 1, cancelled);
    expect(s.session.held.has(T2)).toBe(true);
    expect(s.session.freeSlots).toBe(0);

    const freedBefore = s.freed();
    s.session.leaseGone(T2, 2, undefined);
    expect(s.sent.at(-1)).toEqual({ type: "task_cancelled", taskId: T2 });
    expect(s.session.held.has(T2)).toBe(false);
    expect(s.session.freeSlots).toBe(1);
    expect(s.freed() - freedBefore).toBe(1);
  });

  it("a lease found ended by the agent's own completion (its write reported failed, but committed) is acknowledged, not cancelled", async () => {
    const s = await oneSlotSession({ complete: async () => null, get: async () => null });
    s.session.deliver(task(T1));
    const done = { ...task(T1), status: "completed" as const, result: { ok: true } };
    s.session.leaseGone(T1, 1, done);
    expect(s.sent.at(-1)).toEqual({ type: "completion_ack", taskId: T1 });
    expect(s.sent.map((m) => m.type)).not.toContain("task_cancelled");
    // Announced, since nobody had.
    expect(s.published).toEqual([done]);
    expect(s.session.freeSlots).toBe(1);
    // Completed by someone else at a later attempt: the agent is told to stop.
    s.session.deliver(task(T2));
    s.session.leaseGone(T2, 1, { ...task(T2), status: "completed", agentId: "agent-2", attempt: 2 });
    expect(s.sent.at(-1)).toEqual({ type: "task_cancelled", taskId: T2 });
  });
});
