/**
 * Fault scenarios on the agent side, against the real server process: an
 * agent killed mid-task, a zombie, a reconnect under the same id, an
 * execution timeout with a late result, cancellation during execution, and
 * retries up to dead-letter and back. Each ends by checking the books.
 */
import { describe, expect, it } from "vitest";
import { GrpcAgent, WsAgent, type Assignment, type TestAgent } from "../support/clients.js";
import {
  Scenario,
  auditOf,
  checkBooks,
  eventually,
  expectRefused,
  getJson,
  summarize,
  taskRow,
  taskRpc,
  waitAgent,
  FAULT_BACKENDS,
  scenarioPerTest,
} from "./harness.js";

const BACKENDS = FAULT_BACKENDS;
const scenario = scenarioPerTest();

/** Calls `handler` once for every assignment the agent receives, in order. */
function serve(s: Scenario, agent: TestAgent, handler: (a: Assignment) => void): () => void {
  let seen = 0;
  const timer = setInterval(() => {
    while (seen < agent.assignments.length) handler(agent.assignments[seen++]!);
  }, 10);
  const stop = () => clearInterval(timer);
  s.onCleanup(stop);
  return stop;
}

const acks = (a: TestAgent, taskId: string) => a.frames.filter((f) => f.type === "completion_ack" && f.taskId === taskId).length;

describe.each(BACKENDS)("agent faults on $backend", ({ backend, available }) => {
  it.skipIf(!available)("agent killed mid-task: its tasks are retried elsewhere and complete once", { timeout: 60_000 }, async () => {
    const s = await scenario("agent killed mid-task", backend);
    const server = await s.startServer();
    const doomed = await s.agent(server, { maxConcurrency: 2 });
    const held = [await s.createTask(server, { description: "held by the doomed agent 1" }), await s.createTask(server, { description: "held by the doomed agent 2" })];
    await doomed.waitFor((a) => a.assignments.length === 2, 10_000, "both tasks held");
    s.killAgent(doomed);
    const worker = await s.agent(server, { transport: "ws", autoComplete: (a) => ({ done: a.taskId, attempt: a.attempt }) });
    const fresh = [await s.createTask(server), await s.createTask(server)];
    await worker.waitFor((a) => [...held, ...fresh].every((id) => acks(a, id) >= 1), 15_000, "all four completed");
    // A repeat completion by the holder is acknowledged again and records nothing new.
    const first = worker.assignments.find((x) => x.taskId === held[0])!;
    worker.complete(held[0]!, { done: "again" });
    await worker.waitFor((a) => acks(a, held[0]!) === 2, 5000, "second completion_ack");
    s.duplicatesPrevented++;
    for (const id of held) {
      const row = (await taskRow(s, id))!;
      expect(row).toMatchObject({ attempt: 2, failed_attempts: 1 });
      expect((await auditOf(s, id)).filter((a) => a.action === "task.retry_scheduled")).toHaveLength(1);
    }
    await checkBooks(s, { servers: [server], result: { [held[0]!]: { done: held[0], attempt: first.attempt } } });
    await summarize(s);
  });

  it.skipIf(!available)("zombie agent (open connection, no heartbeats): closed with deadline_exceeded, its tasks re-run", { timeout: 60_000 }, async () => {
    const s = await scenario("zombie agent", backend);
    const server = await s.startServer();
    const zombies = [await s.agent(server, { transport: "ws", heartbeat: false }), await s.agent(server, { transport: "grpc", heartbeat: false })];
    const ids = [await s.createTask(server, { description: "zombie task 1" }), await s.createTask(server, { description: "zombie task 2" })];
    for (const z of zombies) await z.waitForFrame("task_assignment");
    for (const z of zombies) {
      await z.waitFor((a) => a.closed, 10_000, "zombie closed by the server");
      expect(z.frames.find((f) => f.type === "error"), JSON.stringify(z.frames)).toMatchObject({ code: "deadline_exceeded" });
    }
    const healthy = await s.agent(server, { maxConcurrency: 2, autoComplete: () => ({ ok: true }) });
    await healthy.waitFor((a) => ids.every((id) => acks(a, id) === 1), 15_000, "zombie tasks completed");
    for (const id of ids) expect(await taskRow(s, id)).toMatchObject({ attempt: 2, failed_attempts: 1 });
    await checkBooks(s, { servers: [server] });
    await summarize(s);
  });

  it.skipIf(!available)("same agent id reconnects while its old stream lingers: old session replaced, stale result refused", { timeout: 60_000 }, async () => {
    const s = await scenario("reconnect with same id", backend);
    const server = await s.startServer();
    const old = await s.agent(server, { agentId: "worker-same", transport: "grpc" });
    const id = await s.createTask(server, { description: "held across a reconnect", priority: 6 });
    await old.waitForFrame("task_assignment");
    expect(old.assignments[0]!.attempt).toBe(1);
    const fresh = await s.agent(server, { agentId: "worker-same", transport: "ws" });
    await old.waitFor((a) => a.closed, 5000, "old stream closed by the server");
    await fresh.waitForFrame("task_assignment", 1, 10_000);
    expect(fresh.assignments[0]).toMatchObject({ taskId: id, attempt: 2, priority: 6 });
    // The result of attempt 1 arrives late, through the new connection.
    await expectRefused(s, fresh, () => fresh.complete(id, { from: "attempt 1" }, 1));
    fresh.complete(id, { from: "attempt 2" }, 2);
    await waitAgent(fresh, (a) => acks(a, id) === 1, 5000, "completion_ack for attempt 2");
    expect(await taskRow(s, id)).toMatchObject({ attempt: 2, failed_attempts: 1, agent_id: "worker-same" });
    const agents = await getJson<Array<{ agent_id: string }>>(server, "/agents");
    expect(agents.body.filter((a) => a.agent_id === "worker-same")).toHaveLength(1);
    await checkBooks(s, { servers: [server], result: { [id]: { from: "attempt 2" } } });
    await summarize(s);
  });

  it.skipIf(!available)("execution timeout: holder told task_cancelled despite heartbeats, late result refused, retried", { timeout: 60_000 }, async () => {
    const s = await scenario("execution timeout + late result", backend);
    const server = await s.startServer({ TASK_TIMEOUT_MS: "1200" });
    const agent = await s.agent(server, { maxConcurrency: 2 });
    // First attempts are held past their timeout; later ones complete at once.
    serve(s, agent, (a) => {
      if (a.attempt > 1) agent.complete(a.taskId, { attempt: a.attempt }, a.attempt);
    });
    const own = await s.createTask(server, { description: "own timeout", timeout_ms: 500 });
    const byDefault = await s.createTask(server, { description: "server default timeout" });
    await agent.waitFor((a) => a.assignments.length >= 2, 10_000, "both held");
    // Heartbeats keep flowing (every 100 ms) and must not extend the timeout.
    for (const id of [own, byDefault]) {
      await agent.waitFor((a) => a.frames.some((f) => f.type === "task_cancelled" && f.taskId === id), 10_000, `task_cancelled for ${id}`);
      await expectRefused(s, agent, () => agent.complete(id, { late: true }, 1));
    }
    // Both come back as attempt 2 to the same agent, whose slots were freed, and complete.
    await waitAgent(agent, (a) => acks(a, own) === 1 && acks(a, byDefault) === 1, 10_000, "completed");
    for (const id of [own, byDefault]) expect(await taskRow(s, id)).toMatchObject({ attempt: 2, failed_attempts: 1 });
    await checkBooks(s, { servers: [server], result: { [own]: { attempt: 2 }, [byDefault]: { attempt: 2 } } });
    await summarize(s);
  });

  it.skipIf(!available)("cancellation during execution: holder told, slot freed, later result refused", { timeout: 60_000 }, async () => {
    const s = await scenario("cancellation during execution", backend);
    const server = await s.startServer();
    const agent = await s.agent(server, { maxConcurrency: 1 });
    const running = await s.createTask(server, { description: "cancelled while running", priority: 9 });
    await agent.waitForFrame("task_assignment");
    const next = await s.createTask(server, { description: "runs after the cancel", priority: 5 });
    const pending = await s.createTask(server, { description: "cancelled while pending", priority: 1 });
    const p = await taskRpc(server, "CancelTask", { task_id: pending });
    expect(p.task.status).toBe("TASK_STATUS_CANCELLED");
    const r = await taskRpc(server, "CancelTask", { task_id: running });
    expect(r.task.status).toBe("TASK_STATUS_CANCELLED");
    await agent.waitFor((a) => a.frames.some((f) => f.type === "task_cancelled" && f.taskId === running), 5000, "task_cancelled");
    await expectRefused(s, agent, () => agent.complete(running, { too: "late" }));
    // The freed slot takes the next task; the cancelled pending one never runs.
    await agent.waitFor((a) => a.assignments.some((x) => x.taskId === next), 5000, "next task assigned");
    agent.complete(next, { ok: 1 });
    await agent.waitFor((a) => acks(a, next) === 1, 5000, "next completed");
    expect(agent.assignments.map((x) => x.taskId)).toEqual([running, next]);
    await checkBooks(s, { servers: [server], status: { [running]: "cancelled", [pending]: "cancelled" } });
    await summarize(s);
  });

  it.skipIf(!available)("retries up to dead-letter, then RetryTask / POST /retry run them again", { timeout: 60_000 }, async () => {
    const s = await scenario("retries to dead-letter", backend);
    const server = await s.startServer();
    const agent = await s.agent(server, { maxConcurrency: 3 });
    let mode: "fail" | "complete" = "fail";
    const failures = new Map<string, number>();
    serve(s, agent, (a) => {
      if (mode === "complete") return agent.complete(a.taskId, { attempt: a.attempt });
      const n = (failures.get(a.taskId) ?? 0) + 1;
      failures.set(a.taskId, n);
      if (a.description === "non-retryable") return agent.fail(a.taskId, "fatal", false);
      // `retryable` absent must mean retryable.
      if (n > 1) return agent.fail(a.taskId, `boom ${n}`, true);
      if (agent instanceof GrpcAgent) agent.send({ task_failed: { task_id: a.taskId, error: `boom ${n}` } });
      else (agent as WsAgent).send({ type: "task_failed", task_id: a.taskId, error: `boom ${n}` });
    });
    const threeTimes = await s.createTask(server, { description: "default max_attempts" });
    const twice = await s.createTask(server, { description: "max_attempts 2", max_attempts: 2 });
    const fatal = await s.createTask(server, { description: "non-retryable" });
    await eventually(async () => {
      const rows = await s.backend.books.tasks();
      return rows.length === 3 && rows.every((r) => r.status === "failed");
    }, 15_000, "all three FAILED");
    expect(await taskRow(s, threeTimes)).toMatchObject({ status: "failed", failed_attempts: 3, attempt: 3, error: "boom 3" });
    expect(await taskRow(s, twice)).toMatchObject({ status: "failed", failed_attempts: 2, attempt: 2, error: "boom 2" });
    expect(await taskRow(s, fatal)).toMatchObject({ status: "failed", attempt: 1, error: "fatal" });
    const retryRows = async (id: string) => (await auditOf(s, id)).filter((a) => a.action === "task.retry_scheduled").length;
    expect([await retryRows(threeTimes), await retryRows(twice), await retryRows(fatal)]).toEqual([2, 1, 0]);
    const rest = await getJson(server, `/tasks/${threeTimes}`);
    expect(rest.body).toMatchObject({ status: "failed", failed_attempts: 3 });

    mode = "complete";
    const viaRpc = await taskRpc(server, "RetryTask", { task_id: threeTimes });
    expect(viaRpc.task.status).toBe("TASK_STATUS_PENDING");
    for (const id of [twice, fatal]) {
      const res = await fetch(`${server.url}/tasks/${id}/retry`, { method: "POST" });
      expect(res.status).toBe(200);
    }
    await eventually(async () => (await s.backend.books.tasks()).every((r) => r.status === "completed"), 15_000, "all completed after retry");
    // Retrying a task that is not FAILED is refused.
    await expect(taskRpc(server, "RetryTask", { task_id: threeTimes })).rejects.toMatchObject({ code: 9 });
    for (const id of [threeTimes, twice, fatal]) expect((await auditOf(s, id)).filter((a) => a.action === "task.retried")).toHaveLength(1);
    await checkBooks(s, { servers: [server] });
    await summarize(s);
  });
});
