/**
 * The seed's eleven end-to-end scenarios (test_e2e_flow.py), expressed
 * against this service and run on the embedded backend and on
 * PostgreSQL + Redis. Real server on port 0; real clients only.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { TaskService } from "../../gen/aaos/v1/task_service_pb.js";
import { TaskType } from "../../gen/aaos/v1/task_pb.js";
import { BACKENDS, eventually, startServer, type TestServer } from "../support/server.js";
import { GrpcAgent, WsAgent, grpcClient, toStruct, unary, type TestAgent } from "../support/clients.js";

const TYPES = ["code", "research", "qa", "documentation", "analysis", "synthesis", "trading"];

async function postTask(s: TestServer, body: Record<string, unknown>, headers: Record<string, string> = {}) {
  const res = await fetch(`${s.baseUrl}/tasks`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  return { status: res.status, headers: res.headers, body: (await res.json()) as Record<string, any> };
}

async function getJson(s: TestServer, path: string) {
  const res = await fetch(`${s.baseUrl}${path}`);
  return { status: res.status, body: (await res.json()) as any };
}

describe.each(BACKENDS)("seed e2e scenarios on $name", ({ name, available }) => {
  let s: TestServer;
  const agents: TestAgent[] = [];
  const track = <T extends TestAgent>(a: T) => (agents.push(a), a);

  beforeAll(async () => {
    if (available) s = await startServer(name);
  });
  afterAll(async () => {
    for (const a of agents) a.kill();
    await s?.close();
  });

  it.skipIf(!available)("prerequisites: health, gRPC health and both protocols answer on one port", async () => {
    const health = await getJson(s, "/health");
    expect(health.status).toBe(200);
    expect(health.body).toMatchObject({ status: "healthy", components: { database: "ok", queue: "ok" }, version: "test" });
    const hc = grpcClient("Health", s.port);
    expect(await unary(hc, "Check", { service: "" })).toMatchObject({ status: "SERVING" });
    hc.close();
    const connect = createClient(TaskService, createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "1.1" }));
    const page = await connect.listTasks({ pageSize: 1 });
    expect(page.tasks).toEqual([]);
  });

  it.skipIf(!available)("system metrics: REST and gRPC report the same figures", async () => {
    const created = await postTask(s, { task_type: "qa", description: "metrics probe", priority: 3 });
    expect(created.status).toBe(201);
    const rest = (await getJson(s, "/metrics")).body;
    const mc = grpcClient("MetricsService", s.port);
    const pb = await unary(mc, "GetMetrics", {});
    mc.close();
    expect(rest.tasks.pending).toBe(1);
    expect(rest.queue_depth.total).toBe(1);
    expect(rest.queue_depth.by_priority).toEqual({ "3": 1 });
    expect(pb.tasks).toMatchObject({ pending: rest.tasks.pending, total: rest.tasks.total });
    expect(pb.queue_depth.total).toBe(1);
    expect(pb.queue_depth.by_priority).toEqual({ 3: 1 });
    expect(pb.uptime_seconds).toBeGreaterThan(0);
    expect(rest.agents).toEqual({ connected: 0, idle: 0, busy: 0 });
    // Drain it so later scenarios start from an empty queue.
    const a = track(await WsAgent.connect(s.port, { autoComplete: () => ({ ok: true }) }));
    await a.waitForFrame("completion_ack");
    await a.end();
  });

  it.skipIf(!available)("websocket message ordering: ack first, then assignments, acks in order", async () => {
    const a = track(await WsAgent.connect(s.port, { capabilities: ["code"] }));
    expect(a.frames[0]).toMatchObject({ type: "registration_ack" });
    a.heartbeat();
    await a.waitForFrame("heartbeat_ack");
    const { body } = await postTask(s, { task_type: "code", description: "ordering check", priority: 7, metadata: { n: 1 } });
    await a.waitForFrame("task_assignment");
    expect(a.assignments[0]).toMatchObject({ taskId: body.task_id, taskType: "code", priority: 7, attempt: 1, metadata: { n: 1 } });
    a.sendRaw("{not json");
    await a.waitForFrame("error");
    expect(a.frames.at(-1)).toMatchObject({ type: "error", code: "invalid_argument" });
    a.complete(body.task_id, { answer: 42 });
    await a.waitForFrame("completion_ack");
    expect(a.frames.map((f) => f.type)).toEqual(["registration_ack", "heartbeat_ack", "task_assignment", "error", "completion_ack"]);
    const task = (await getJson(s, `/tasks/${body.task_id}`)).body;
    expect(task).toMatchObject({ status: "completed", result: { answer: 42 }, agent_id: a.agentId, attempt: 1 });
    await a.end();
  });

  it.skipIf(!available)("logging integrity: the correlation ID is echoed, stored, logged and passed to the agent", async () => {
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["documentation"] }));
    const cid = `corr-${name.replace(/\W/g, "")}-${Date.now()}`;
    const res = await postTask(s, { task_type: "documentation", description: "log me" }, { "X-Correlation-ID": cid });
    expect(res.headers.get("x-correlation-id")).toBe(cid);
    await a.waitForFrame("task_assignment");
    expect(a.assignments[0]!.correlationId).toBe(cid);
    a.complete(a.assignments[0]!.taskId, {});
    await a.waitForFrame("completion_ack");
    expect((await getJson(s, `/tasks/${res.body.task_id}`)).body.correlation_id).toBe(cid);
    const mine = s.logs.lines.filter((l) => l.correlation_id === cid);
    expect(mine.map((l) => l.msg)).toEqual(expect.arrayContaining(["task created", "task assigned", "task completed"]));
    for (const line of s.logs.lines) {
      expect(typeof line.time).toBe("string");
      expect(new Date(line.time as string).toISOString()).toBe(line.time);
      expect(line.level).toMatch(/^(trace|debug|info|warn|error|fatal)$/);
    }
    // A request without an ID gets a fresh one.
    const anon = await fetch(`${s.baseUrl}/tasks?limit=1`);
    expect(anon.headers.get("x-correlation-id")).toMatch(/^[0-9a-f-]{36}$/);
    // gRPC metadata works the same way.
    const md = new grpc.Metadata();
    md.set("x-correlation-id", `${cid}-grpc`);
    const tc = grpcClient("TaskService", s.port);
    const created = await unary(tc, "CreateTask", { task_type: "TASK_TYPE_DOCUMENTATION", description: "via grpc", priority: 5 }, md);
    tc.close();
    expect(created.task.correlation_id).toBe(`${cid}-grpc`);
    await a.waitForFrame("task_assignment", 2);
    a.complete(created.task.task_id, {});
    await a.waitForFrame("completion_ack", 2);
    await a.end();
  });

  it.skipIf(!available)("performance summary: the metrics add up after a batch", async () => {
    const before = (await getJson(s, "/metrics")).body;
    const n = 60;
    const ids = await Promise.all(Array.from({ length: n }, (_, i) => postTask(s, { task_type: TYPES[i % TYPES.length], description: `batch ${i}`, priority: i % 11 }).then((r) => r.body.task_id as string)));
    const a = track(await WsAgent.connect(s.port, { maxConcurrency: 8, autoComplete: (t) => ({ done: t.taskId }) }));
    await a.waitFor((x) => x.frames.filter((f) => f.type === "completion_ack").length >= n, 20_000, "batch done");
    const after = (await getJson(s, "/metrics")).body;
    expect(after.tasks.completed - before.tasks.completed).toBe(n);
    expect(after.tasks.total).toBe(after.tasks.pending + after.tasks.assigned + after.tasks.completed + after.tasks.failed + after.tasks.cancelled);
    expect(after.completed_per_minute).toBeGreaterThanOrEqual(n);
    expect(after.dispatch_latency_ms.samples - before.dispatch_latency_ms.samples).toBe(n);
    expect(after.dispatch_latency_ms.p50).toBeLessThanOrEqual(after.dispatch_latency_ms.p90);
    expect(after.dispatch_latency_ms.p90).toBeLessThanOrEqual(after.dispatch_latency_ms.p99);
    expect(after.queue_depth.total).toBe(0);
    expect(new Set(a.assignments.map((x) => x.taskId))).toEqual(new Set(ids));
    await a.end();
  });

  it.skipIf(!available)("task prioritization: higher first, FIFO within a priority", async () => {
    const plan = [2, 9, 5, 9, 0, 5, 10, 2, 9, 10, 0, 5];
    const created: Array<{ id: string; priority: number; i: number }> = [];
    for (const [i, priority] of plan.entries()) {
      const r = await postTask(s, { task_type: "analysis", description: `prio ${i}`, priority });
      created.push({ id: r.body.task_id, priority, i });
    }
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["analysis"], autoComplete: () => ({}) }));
    await a.waitFor((x) => x.assignments.length >= plan.length, 10_000, "all prioritised tasks");
    const expected = [...created].sort((x, y) => y.priority - x.priority || x.i - y.i).map((x) => x.id);
    expect(a.assignments.map((x) => x.taskId)).toEqual(expected);
    await a.waitForFrame("completion_ack", plan.length);
    await a.end();
  });

  it.skipIf(!available)("concurrent processing: several agents, hundreds of tasks, each completed exactly once", { timeout: 90_000 }, async () => {
    const pool = [
      track(await GrpcAgent.connect(s.port, { maxConcurrency: 5, autoComplete: (t) => ({ by: "g1", id: t.taskId }) })),
      track(await GrpcAgent.connect(s.port, { maxConcurrency: 5, capabilities: ["code", "qa"], autoComplete: (t) => ({ by: "g2", id: t.taskId }) })),
      track(await WsAgent.connect(s.port, { maxConcurrency: 5, autoComplete: (t) => ({ by: "w1", id: t.taskId }) })),
      track(await WsAgent.connect(s.port, { maxConcurrency: 3, capabilities: ["research", "trading"], autoComplete: (t) => ({ by: "w2", id: t.taskId }) })),
    ];
    const tc = createClient(TaskService, createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "2" }));
    const n = 300;
    const ids = await Promise.all(
      Array.from({ length: n }, (_, i) =>
        i % 2
          ? postTask(s, { task_type: TYPES[i % TYPES.length], description: `rest ${i}`, priority: i % 11 }).then((r) => r.body.task_id as string)
          : tc.createTask({ taskType: (i % TYPES.length) + 1, description: `grpc ${i}`, priority: i % 11 }).then((r) => r.task!.taskId),
      ),
    );
    await eventually(async () => (await getJson(s, "/metrics")).body.tasks.completed >= n + 1 + 1 + 2 + 60 + 12, 30_000, "all completed");
    const received = pool.flatMap((a) => a.assignments.map((x) => x.taskId)).filter((id) => ids.includes(id));
    expect(received.length).toBe(n);
    expect(new Set(received).size).toBe(n);
    // Capability routing held.
    for (const [i, a] of pool.entries()) {
      const caps = [[], [], [], []][i]!;
      void caps;
      if (i === 1) expect(a.assignments.every((x) => ["code", "qa"].includes(x.taskType))).toBe(true);
      if (i === 3) expect(a.assignments.every((x) => ["research", "trading"].includes(x.taskType))).toBe(true);
    }
    const agentsNow = (await getJson(s, "/agents")).body as any[];
    expect(agentsNow.length).toBe(4);
    for (const a of pool) await a.end();
  });

  it.skipIf(!available)("queue contention: many concurrent producers lose nothing and keep order", { timeout: 90_000 }, async () => {
    const producers = 20;
    const perProducer = 15;
    const created: Array<{ id: string; producer: number; k: number; priority: number }> = [];
    await Promise.all(
      Array.from({ length: producers }, async (_, p) => {
        for (let k = 0; k < perProducer; k++) {
          const priority = (p + k) % 3 === 0 ? 8 : 4;
          const r = await postTask(s, { task_type: "synthesis", description: `p${p} k${k}`, priority });
          expect(r.status).toBe(201);
          created.push({ id: r.body.task_id, producer: p, k, priority });
        }
      }),
    );
    const depth = (await getJson(s, "/metrics")).body.queue_depth;
    expect(depth.total).toBe(producers * perProducer);
    const a = track(await WsAgent.connect(s.port, { capabilities: ["synthesis"], autoComplete: () => ({}) }));
    await a.waitFor((x) => x.assignments.length >= created.length, 20_000, "all contention tasks");
    const order = a.assignments.map((x) => x.taskId);
    expect(new Set(order).size).toBe(created.length);
    const pos = new Map(order.map((id, i) => [id, i]));
    const byId = new Map(created.map((c) => [c.id, c]));
    // Every priority-8 task before every priority-4 task.
    const lastHigh = Math.max(...created.filter((c) => c.priority === 8).map((c) => pos.get(c.id)!));
    const firstLow = Math.min(...created.filter((c) => c.priority === 4).map((c) => pos.get(c.id)!));
    expect(lastHigh).toBeLessThan(firstLow);
    // Within a priority, each producer's tasks come out in the order it created them.
    for (let p = 0; p < producers; p++) {
      for (const prio of [8, 4]) {
        const mine = order.map((id) => byId.get(id)!).filter((c) => c.producer === p && c.priority === prio);
        expect(mine.map((c) => c.k)).toEqual([...mine.map((c) => c.k)].sort((x, y) => x - y));
      }
    }
    await a.waitForFrame("completion_ack", created.length, 20_000);
    await a.end();
  });

  it.skipIf(!available)("database consistency: the store agrees with what agents did", async () => {
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["trading"], maxConcurrency: 4 }));
    const ids: string[] = [];
    for (let i = 0; i < 8; i++) ids.push((await postTask(s, { task_type: "trading", description: `trade ${i}`, metadata: { i } })).body.task_id);
    await a.waitFor((x) => x.assignments.length >= 4, 10_000, "four leases");
    // Four held (max_concurrency), four still pending.
    const mid = await Promise.all(ids.map((id) => s.persistence.tasks.get(id)));
    expect(mid.filter((t) => t!.status === "assigned").length).toBe(4);
    expect(mid.filter((t) => t!.status === "pending").length).toBe(4);
    for (let done = 0; done < 8; done++) {
      await a.waitFor((x) => x.assignments.length > done, 10_000, `assignment ${done}`);
      const t = a.assignments[done]!;
      t.attempt % 2 ? a.complete(t.taskId, { echo: t.metadata.i as number }) : a.fail(t.taskId, "nope");
      await a.waitForFrame("completion_ack", done + 1);
    }
    for (const id of ids) {
      const t = (await s.persistence.tasks.get(id))!;
      expect(t.status).toBe("completed");
      expect(t.agentId).toBe(a.agentId);
      expect(t.result).toEqual({ echo: t.metadata.i });
      const trail = await s.persistence.tasks.auditTrail(id);
      expect(trail.map((r) => r.toStatus)).toEqual(["pending", "assigned", "completed"]);
    }
    await a.end();
  });

  it.skipIf(!available)("error recovery: an agent drops mid-task and the task completes elsewhere", async () => {
    const first = track(await WsAgent.connect(s.port, { capabilities: ["research"] }));
    const { body } = await postTask(s, { task_type: "research", description: "survive a crash", priority: 6 });
    await first.waitForFrame("task_assignment");
    first.kill();
    await eventually(async () => (await s.persistence.tasks.get(body.task_id))?.status === "pending", 10_000, "task re-queued");
    const second = track(await GrpcAgent.connect(s.port, { capabilities: ["research"] }));
    await second.waitForFrame("task_assignment");
    expect(second.assignments[0]).toMatchObject({ taskId: body.task_id, attempt: 2, priority: 6 });
    second.complete(body.task_id, { recovered: true });
    await second.waitForFrame("completion_ack");
    const t = (await getJson(s, `/tasks/${body.task_id}`)).body;
    expect(t).toMatchObject({ status: "completed", attempt: 2, agent_id: second.agentId, result: { recovered: true } });
    const trail = await s.persistence.tasks.auditTrail(body.task_id);
    expect(trail.map((r) => r.toStatus)).toEqual(["pending", "assigned", "pending", "assigned", "completed"]);
    await second.end();
  });

  it.skipIf(!available)("cleanup and state reset: nothing pending or assigned, no agent left connected", async () => {
    for (const a of agents) if (!a.closed) await a.end();
    await eventually(async () => (await getJson(s, "/metrics")).body.agents.connected === 0, 5000, "agents gone");
    const m = (await getJson(s, "/metrics")).body;
    expect(m.tasks.pending).toBe(0);
    expect(m.tasks.assigned).toBe(0);
    expect(m.queue_depth.total).toBe(0);
    const stuck = [...(await getJson(s, "/tasks?status=pending")).body, ...(await getJson(s, "/tasks?status=assigned")).body];
    expect(stuck).toEqual([]);
    const all = (await getJson(s, "/agents?include_disconnected=true")).body as any[];
    expect(all.length).toBeGreaterThan(0);
    expect(all.every((x) => x.status === "disconnected")).toBe(true);
  });
});
