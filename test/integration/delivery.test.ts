/**
 * Delivery guarantees as a client and an agent observe them: retries with
 * backoff up to max_attempts, dead-letter and RetryTask, execution timeouts,
 * idempotent creates, expired leases taken back, and a draining shutdown.
 * (Process-level faults — kill -9, Redis and PostgreSQL outages — are in test/fault.)
 */
import { afterEach, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import pg from "pg";
import { Redis } from "ioredis";
import { uuidv7 } from "../../src/ids.js";
import { TEST_POSTGRES_URL, TEST_REDIS_URL } from "../support/services.js";
import { BACKENDS, eventually, startServer, type TestServer } from "../support/server.js";
import { GrpcAgent, WsAgent, grpcClient, unary, type TestAgent } from "../support/clients.js";
import { TcpProxy } from "../support/tcp-proxy.js";

const FAST = { RETRY_BASE_MS: "50", RETRY_MAX_MS: "200", SWEEP_INTERVAL_MS: "50" };

async function post(s: TestServer, path: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${s.baseUrl}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  return { status: res.status, body: (await res.json()) as Record<string, any> };
}
const getTask = async (s: TestServer, id: string) => (await (await fetch(`${s.baseUrl}/tasks/${id}`)).json()) as Record<string, any>;

const servers: TestServer[] = [];
const agents: TestAgent[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) a.kill();
  for (const s of servers.splice(0)) await s.close();
});
const start = async (...args: Parameters<typeof startServer>) => {
  const s = await startServer(...args);
  servers.push(s);
  return s;
};
const track = <T extends TestAgent>(a: T) => (agents.push(a), a);

describe.each(BACKENDS)("delivery guarantees on $name", ({ name, available }) => {
  /** An agent with one slot, three queued tasks in priority order, and the first of them assigned. */
  async function oneSlotThreeTasks(env: Record<string, string> = {}) {
    const s = await start(name, { env });
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["analysis"], maxConcurrency: 1 }));
    const ids: string[] = [];
    for (const p of [9, 8, 7]) ids.push((await post(s, "/tasks", { task_type: "analysis", description: `in order ${p}`, priority: p })).body.task_id);
    await a.waitForFrame("task_assignment");
    return { s, a, ids };
  }

  /** Runs `sql` in a transaction left open, on a connection of the test's own; the caller ends it. */
  async function holding(sql: string, params: unknown[] = []): Promise<pg.Client> {
    const blocker = new pg.Client({ connectionString: TEST_POSTGRES_URL });
    await blocker.connect();
    try {
      await blocker.query("BEGIN");
      await blocker.query(sql, params);
      return blocker;
    } catch (e: unknown) {
      await blocker.end();
      throw e;
    }
  }
  /** Holds one task's row lock. */
  const lockRow = (s: TestServer, taskId: string) => holding(`SELECT 1 FROM "${s.data.schema}".tasks WHERE task_id = $1 FOR UPDATE`, [taskId]);
  /** Holds a whole table: every statement that reads or writes it waits. */
  const lockTable = (s: TestServer, table: "tasks" | "audit_logs") => holding(`LOCK TABLE "${s.data.schema}".${table} IN ACCESS EXCLUSIVE MODE`);

  /**
   * Runs tasks of `taskType` through `agent`, one at a time, until one is
   * handed to it straight from its create (leased in the insert's commit, so
   * assigned_at equals created_at). From then on, with nothing else queued,
   * the next create for that agent may be handed over too.
   */
  async function warmUp(s: TestServer, agent: TestAgent, taskType: string): Promise<void> {
    for (let round = 0; round < 10; round++) {
      const before = agent.assignments.length;
      const acks = agent.frames.filter((f) => f.type === "completion_ack").length;
      const id = (await post(s, "/tasks", { task_type: taskType, description: "warm-up" })).body.task_id as string;
      await agent.waitForFrame("task_assignment", before + 1);
      agent.complete(id, {});
      await agent.waitForFrame("completion_ack", acks + 1);
      const task = await getTask(s, id);
      if (task.assigned_at === task.created_at) return;
    }
    throw new Error("no warm-up task was handed straight to the agent");
  }

  /**
   * A PENDING code task of priority 5, in the database and in the Redis
   * queue, as another instance queues one, but without its "work queued"
   * announcement: this instance is not told.
   */
  async function queueUnannounced(s: TestServer, description: string): Promise<string> {
    const redis = new Redis(TEST_REDIS_URL);
    const taskId = uuidv7();
    try {
      const seq = await redis.incr(`{${s.data.prefix}}:seq`);
      await s.persistence.tasks.insert(
        { taskId, taskType: "code", description, priority: 5, metadata: {}, maxAttempts: 3, correlationId: "other-instance", seq, createdAt: new Date(), timeoutMs: null, idempotencyKey: null, requestHash: null },
        { action: "task.created", fromStatus: null, toStatus: "pending", agentId: null, correlationId: "other-instance" },
      );
      await redis.zadd(`{${s.data.prefix}}:q:code`, String(5 * 2 ** 40 + seq), taskId);
    } finally {
      redis.disconnect();
    }
    return taskId;
  }

  /** Sessions waiting on a lock the test's own connection holds. */
  async function lockWaiters(client: pg.Client): Promise<number[]> {
    // Inside a transaction, pg_stat_activity is a snapshot taken at its first read.
    await client.query("SELECT pg_stat_clear_snapshot()");
    const r = await client.query("SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))");
    return r.rows.map((row: { pid: number }) => row.pid);
  }

  /**
   * A new code agent on `s` gets the task as attempt 2, after `first` was
   * leased it and handed it back, with no failure counted.
   */
  async function expectRunAfterHandBack(s: TestServer, taskId: string, first: TestAgent): Promise<void> {
    const next = track(await GrpcAgent.connect(s.port, { capabilities: ["code"] }));
    await next.waitForFrame("task_assignment");
    expect(next.assignments[0]).toMatchObject({ taskId, attempt: 2 });
    const trail = await s.persistence.tasks.auditTrail(taskId);
    expect(trail.map((r) => [r.action, r.agentId])).toEqual([
      ["task.created", null],
      ["task.assigned", first.agentId],
      ["task.requeued", first.agentId],
      ["task.assigned", next.agentId],
    ]);
    expect(await getTask(s, taskId)).toMatchObject({ status: "assigned", failed_attempts: 0 });
  }

  /**
   * Starts a create (idempotency key "held-key") whose insert waits on the
   * key's unique index, behind a twin of a committed task that holds the
   * same key in a transaction the test keeps open. The blocker's ROLLBACK
   * lets the insert go; the caller ends the blocker.
   */
  async function createBehindHeldKey(s: TestServer, body: object): Promise<{ created: ReturnType<typeof post>; blocker: pg.Client }> {
    const tasks = `"${s.data.schema}".tasks`;
    const template = (await post(s, "/tasks", { task_type: "trading", description: "template" })).body.task_id as string;
    const blocker = new pg.Client({ connectionString: TEST_POSTGRES_URL });
    await blocker.connect();
    try {
      await blocker.query("BEGIN");
      await blocker.query(
        `INSERT INTO ${tasks} SELECT (jsonb_populate_record(null::${tasks}, to_jsonb(t) || jsonb_build_object('task_id', gen_random_uuid()::text, 'idempotency_key', 'held-key'))).* FROM ${tasks} t WHERE task_id = $1`,
        [template],
      );
      const created = post(s, "/tasks", body, { "Idempotency-Key": "held-key" });
      await eventually(async () => (await lockWaiters(blocker)).length === 1, 5000, "the create's insert waiting on the key");
      return { created, blocker };
    } catch (e: unknown) {
      await blocker.end();
      throw e;
    }
  }

  it.skipIf(!available)("a retryable failure comes back after a backoff at its priority; the next attempt completes", async () => {
    const s = await start(name, { env: FAST });
    const a = track(await WsAgent.connect(s.port, { capabilities: ["qa"] }));
    const { body } = await post(s, "/tasks", { task_type: "qa", description: "flaky", priority: 7 });
    await a.waitForFrame("task_assignment");
    a.fail(body.task_id, "transient glitch"); // retryable by default
    await a.waitFor((x) => x.assignments.length === 2, 5000, "second attempt");
    expect(a.assignments[1]).toMatchObject({ taskId: body.task_id, attempt: 2, priority: 7 });
    a.complete(body.task_id, { ok: true });
    await a.waitForFrame("completion_ack", 2);
    expect(await getTask(s, body.task_id)).toMatchObject({ status: "completed", attempt: 2, failed_attempts: 1, result: { ok: true } });
    const actions = (await s.persistence.tasks.auditTrail(body.task_id)).map((r) => r.action);
    expect(actions).toEqual(["task.created", "task.assigned", "task.retry_scheduled", "task.assigned", "task.completed"]);
  });

  it.skipIf(!available)("a non-retryable failure ends the task at once", async () => {
    const s = await start(name, { env: FAST });
    const a = track(await GrpcAgent.connect(s.port));
    const { body } = await post(s, "/tasks", { task_type: "code", description: "hopeless" });
    await a.waitForFrame("task_assignment");
    a.fail(body.task_id, "bad input, will never work", false);
    await a.waitForFrame("completion_ack");
    expect(await getTask(s, body.task_id)).toMatchObject({ status: "failed", attempt: 1, failed_attempts: 1, error: "bad input, will never work" });
  });

  it.skipIf(!available)("retries stop at max_attempts with the last error; RetryTask runs it again", async () => {
    const s = await start(name, { env: FAST });
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["analysis"] }));
    const { body } = await post(s, "/tasks", { task_type: "analysis", description: "always fails", max_attempts: 2 });
    await a.waitForFrame("task_assignment");
    a.fail(body.task_id, "first");
    await a.waitFor((x) => x.assignments.length === 2, 5000, "second attempt");
    a.fail(body.task_id, "second");
    await a.waitForFrame("completion_ack", 2);
    expect(await getTask(s, body.task_id)).toMatchObject({ status: "failed", attempt: 2, failed_attempts: 2, error: "second", next_attempt_at: null });
    // Only a failed task can be retried.
    const notFailed = await post(s, "/tasks", { task_type: "qa", description: "still pending" });
    expect((await post(s, `/tasks/${notFailed.body.task_id}/retry`, {})).status).toBe(409);
    const tc = grpcClient("TaskService", s.port);
    const retried = await unary(tc, "RetryTask", { task_id: body.task_id });
    tc.close();
    expect(retried.task).toMatchObject({ status: "TASK_STATUS_PENDING", failed_attempts: 0 });
    await a.waitFor((x) => x.assignments.filter((t) => t.taskId === body.task_id).length === 3, 5000, "third attempt");
    a.complete(body.task_id, { finally: true });
    await eventually(async () => (await getTask(s, body.task_id)).status === "completed", 5000, "completed after retry");
  });

  it.skipIf(!available)("an execution timeout cancels the attempt at the agent and retries it elsewhere; heartbeats do not extend it", async () => {
    const s = await start(name, { env: { ...FAST, HEARTBEAT_INTERVAL_MS: "50", HEARTBEAT_TIMEOUT_MS: "2000" } });
    const slow = track(await GrpcAgent.connect(s.port, { capabilities: ["research"] }));
    const beat = setInterval(() => slow.heartbeat(), 50);
    try {
      const { body } = await post(s, "/tasks", { task_type: "research", description: "takes forever", timeout_ms: 300 });
      await slow.waitForFrame("task_assignment");
      await slow.waitFor((x) => x.frames.some((f) => f.type === "task_cancelled" && f.taskId === body.task_id), 5000, "task_cancelled");
      // The slot was freed: the retry comes back to the same (only) agent as attempt 2.
      await slow.waitFor((x) => x.assignments.length === 2, 5000, "retry");
      expect(slow.assignments[1]).toMatchObject({ taskId: body.task_id, attempt: 2 });
      // A late result for the timed-out attempt changes nothing.
      slow.complete(body.task_id, { late: true }, 1);
      await slow.waitFor((x) => x.frames.some((f) => f.type === "error" && f.taskId === body.task_id), 5000, "late result refused");
      const t = await getTask(s, body.task_id);
      expect(t).toMatchObject({ status: "assigned", attempt: 2, failed_attempts: 1, timeout_ms: 300 });
      expect(t.error).toMatch(/execution timeout after 300 ms/);
    } finally {
      clearInterval(beat);
    }
  });

  it.skipIf(!available)("a task created while an agent has a free slot is leased to it in the create's own commit", async () => {
    const s = await start(name);
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["documentation", "qa"], maxConcurrency: 2 }));
    await warmUp(s, a, "qa");
    const seen = a.assignments.length;
    const acked = a.frames.filter((f) => f.type === "completion_ack").length;
    const { status, body } = await post(s, "/tasks", { task_type: "documentation", description: "straight through", priority: 4 });
    // The answer is the task as created, whoever holds it by now.
    expect(status).toBe(201);
    expect(body).toMatchObject({ status: "pending", message: "Task queued successfully" });
    await a.waitForFrame("task_assignment", seen + 1);
    expect(a.assignments[seen]).toMatchObject({ taskId: body.task_id, attempt: 1, priority: 4 });
    const task = await getTask(s, body.task_id);
    expect(task).toMatchObject({ status: "assigned", attempt: 1, agent_id: a.agentId });
    // Stored already leased: it never waited in the queue.
    expect(task.assigned_at).toBe(task.created_at);
    const trail = await s.persistence.tasks.auditTrail(body.task_id);
    expect(trail).toMatchObject([
      { action: "task.created", fromStatus: null, toStatus: "pending", agentId: null },
      { action: "task.assigned", fromStatus: "pending", toStatus: "assigned", agentId: a.agentId, details: { attempt: 1 } },
    ]);
    a.complete(body.task_id, { done: true });
    await a.waitForFrame("completion_ack", acked + 1);
    expect(await getTask(s, body.task_id)).toMatchObject({ status: "completed", result: { done: true } });
  });

  it.skipIf(!available || name === "embedded")("a new task is never handed past queued work its agent would take first, even before that work is announced", async () => {
    const s = await start(name);
    const coder = track(await GrpcAgent.connect(s.port, { capabilities: ["code"], maxConcurrency: 1 }));
    await warmUp(s, coder, "code");
    const seen = coder.assignments.length;
    // What another instance leaves when its "work queued" announcement is
    // still on the way: this instance still believes the queue is empty.
    const older = await queueUnannounced(s, "older");
    const newer = (await post(s, "/tasks", { task_type: "code", description: "newer", priority: 5 })).body.task_id as string;
    await coder.waitForFrame("task_assignment", seen + 1);
    expect(coder.assignments.slice(seen).map((x) => x.taskId)).toEqual([older]);
    coder.complete(older, {});
    await coder.waitForFrame("task_assignment", seen + 2);
    expect(coder.assignments.slice(seen).map((x) => x.taskId)).toEqual([older, newer]);
  });

  it.skipIf(!available || name === "embedded")("an idle agent gets work whose announcement was lost, within a sweep interval", async () => {
    const s = await start(name, { env: { SWEEP_INTERVAL_MS: "300" } });
    const coder = track(await GrpcAgent.connect(s.port, { capabilities: ["code"], maxConcurrency: 1 }));
    // The instance has found the queue empty for the agent, and the agent is idle.
    await warmUp(s, coder, "code");
    const seen = coder.assignments.length;
    // Another instance queued a task, and its "work queued" message never
    // arrived: nothing on this instance will ask the queue again on its own.
    const lost = await queueUnannounced(s, "unannounced");
    const queuedAt = Date.now();
    await coder.waitForFrame("task_assignment", seen + 1);
    expect(coder.assignments[seen]).toMatchObject({ taskId: lost, attempt: 1 });
    // Within about one sweep interval (300 ms), with room for a slow machine.
    expect(Date.now() - queuedAt).toBeLessThan(3000);
  });

  it.skipIf(!available || name === "embedded")("an agent that leaves while a task is being handed to it loses nothing: the task runs on the next agent", async () => {
    const s = await start(name);
    const leaving = track(await GrpcAgent.connect(s.port, { capabilities: ["code"], maxConcurrency: 1 }));
    await warmUp(s, leaving, "code");
    const { created, blocker } = await createBehindHeldKey(s, { task_type: "code", description: "handed over" });
    try {
      leaving.kill();
      await eventually(async () => (await s.persistence.agents.list()).find((x) => x.agentId === leaving.agentId)?.status === "disconnected", 5000, "the agent's session closed");
      await blocker.query("ROLLBACK");
    } finally {
      await blocker.end();
    }
    const { status, body } = await created;
    expect(status).toBe(201);
    expect(leaving.assignments.some((x) => x.taskId === body.task_id)).toBe(false);
    await expectRunAfterHandBack(s, body.task_id, leaving);
  });

  it.skipIf(!available || name === "embedded")("a task whose hand-off commits after shutdown began goes back to the queue, not to the draining agent", async () => {
    const s = await start(name, { env: { SHUTDOWN_GRACE_MS: "5000" } });
    const draining = track(await GrpcAgent.connect(s.port, { capabilities: ["code"], maxConcurrency: 1 }));
    await warmUp(s, draining, "code");
    const seen = draining.assignments.length;
    const { created, blocker } = await createBehindHeldKey(s, { task_type: "code", description: "handed over late" });
    let closing: Promise<void>;
    try {
      closing = s.app.close();
      await draining.waitForFrame("drain");
      await blocker.query("ROLLBACK");
    } finally {
      await blocker.end();
    }
    const { status, body } = await created;
    expect(status).toBe(201);
    await closing!;
    expect(draining.assignments.length).toBe(seen);
    // Another instance on the same database and Redis runs it.
    await expectRunAfterHandBack(await start(name, { shareWith: s }), body.task_id, draining);
  });

  it.skipIf(!available || name === "embedded")("a task claimed for an agent that left before the claim's reply arrived goes back to the queue in its place", async () => {
    const redisTarget = new URL(TEST_REDIS_URL);
    const proxy = await TcpProxy.start({ host: redisTarget.hostname, port: Number(redisTarget.port || 6379) });
    let opened: TestServer | undefined;
    try {
      const viaProxy = new URL(TEST_REDIS_URL);
      viaProxy.hostname = "127.0.0.1";
      viaProxy.port = String(proxy.port);
      const s = (opened = await start(name, { redisUrl: viaProxy.toString() }));
      const leaving = track(await GrpcAgent.connect(s.port, { capabilities: ["code"], maxConcurrency: 1 }));
      const ids: string[] = [];
      for (let i = 0; i < 4; i++) ids.push((await post(s, "/tasks", { task_type: "code", description: `in line ${i}` })).body.task_id);
      await leaving.waitForFrame("task_assignment");
      const [running, ...queued] = ids;
      expect(leaving.assignments.map((a) => a.taskId)).toEqual([running]);
      const redis = new Redis(TEST_REDIS_URL);
      const queueKey = `{${s.data.prefix}}:q:code`;
      try {
        await eventually(async () => (await redis.zcard(queueKey)) === 3, 5000, "three queued");
        // The freed slot's claim runs in Redis, but its reply is held...
        proxy.holdReplies();
        leaving.complete(running!, {});
        await eventually(async () => (await redis.zcard(queueKey)) === 2, 1000, "the claim ran");
        // ...until the agent has gone.
        leaving.kill();
        await eventually(async () => s.app.dispatcher.list().length === 0, 1000, "the session closed");
        proxy.releaseReplies();
        await eventually(async () => (await redis.zcard(queueKey)) === 3, 5000, "the claimed task put back");
      } finally {
        proxy.releaseReplies();
        redis.disconnect();
      }
      const next = track(await GrpcAgent.connect(s.port, { capabilities: ["code"], maxConcurrency: 1, autoComplete: () => ({}) }));
      await next.waitForFrame("completion_ack", 3);
      // In its place, never leased, no attempt lost.
      expect(next.assignments.map((a) => [a.taskId, a.attempt])).toEqual(queued.map((id) => [id, 1]));
      for (const id of queued) expect(await getTask(s, id)).toMatchObject({ status: "completed", failed_attempts: 0 });
    } finally {
      // Before the proxy goes, so the server can still remove its Redis keys.
      if (opened) {
        servers.splice(servers.indexOf(opened), 1);
        await opened.close();
      }
      await proxy.close();
    }
  });

  it.skipIf(!available)("an idempotency key returns the original task for a repeat and refuses a different request", async () => {
    const s = await start(name);
    const body = { task_type: "trading", description: "buy the dip", priority: 9, metadata: { b: 1, a: [1, 2] } };
    const first = await post(s, "/tasks", body, { "Idempotency-Key": "order-1" });
    expect(first.status).toBe(201);
    // Same request, keys in another order: the same task, not a second one.
    const repeat = await post(s, "/tasks", { ...body, metadata: { a: [1, 2], b: 1 } }, { "Idempotency-Key": "order-1" });
    expect(repeat).toMatchObject({ status: 201, body: { task_id: first.body.task_id } });
    const clash = await post(s, "/tasks", { ...body, priority: 1 }, { "Idempotency-Key": "order-1" });
    expect(clash).toMatchObject({ status: 409, body: { code: "already_exists" } });
    const tc = grpcClient("TaskService", s.port);
    const viaGrpc = await unary(tc, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "compile", idempotency_key: "build-7" });
    const again = await unary(tc, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "compile", idempotency_key: "build-7" });
    expect(again.task.task_id).toBe(viaGrpc.task.task_id);
    await expect(unary(tc, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "other", idempotency_key: "build-7" })).rejects.toMatchObject({ code: grpc.status.ALREADY_EXISTS });
    // Concurrent repeats still make one task.
    const racers = await Promise.all(Array.from({ length: 8 }, () => post(s, "/tasks", { task_type: "qa", description: "racing" }, { "Idempotency-Key": "race-1" })));
    expect(new Set(racers.map((r) => r.body.task_id)).size).toBe(1);
    tc.close();
    const counts = await s.persistence.tasks.countByStatus();
    expect(counts.pending).toBe(3);
  });

  it.skipIf(!available)("with TASK_RETENTION_MS, a finished task and its audit rows go once the period has passed; unfinished work stays", async () => {
    const s = await start(name, { env: { TASK_RETENTION_MS: "800", IDEMPOTENCY_TTL_MS: "800", SWEEP_INTERVAL_MS: "50" } });
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["qa"], maxConcurrency: 1 }));
    const done = (await post(s, "/tasks", { task_type: "qa", description: "finished" })).body.task_id as string;
    const waiting = (await post(s, "/tasks", { task_type: "research", description: "nobody takes this" })).body.task_id as string;
    await a.waitForFrame("task_assignment");
    a.complete(done, { ok: true });
    await a.waitForFrame("completion_ack");
    const finished = await getTask(s, done);
    expect(finished).toMatchObject({ status: "completed" });

    const gone = await eventually(async () => ((await fetch(`${s.baseUrl}/tasks/${done}`)).status === 404 ? Date.now() : 0), 10_000, "the finished task to be deleted");
    expect(gone - Date.parse(finished.completed_at)).toBeGreaterThanOrEqual(800);
    expect(await s.persistence.tasks.auditTrail(done)).toEqual([]);
    const tc = grpcClient("TaskService", s.port);
    await expect(unary(tc, "GetTask", { task_id: done })).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    tc.close();
    expect(await getTask(s, waiting)).toMatchObject({ status: "pending" });
    const metrics = (await (await fetch(`${s.baseUrl}/metrics`)).json()) as Record<string, any>;
    expect(metrics.tasks).toMatchObject({ total: 1, pending: 1, completed: 0 });
    expect(s.logs.lines.some((l) => l.msg === "deleted finished tasks past their retention" && l.deleted === 1)).toBe(true);
  });

  it.skipIf(!available || name === "embedded")("an agent's next task is leased while its last result commits, never past max_concurrency", async () => {
    const { s, a, ids } = await oneSlotThreeTasks();
    expect(a.assignments.map((x) => x.taskId)).toEqual([ids[0]]);
    // Hold the first task's row, so recording its result has to wait.
    const blocker = await lockRow(s, ids[0]!);
    try {
      a.complete(ids[0]!, { first: true });
      await a.waitForFrame("task_assignment", 2);
      expect(a.assignments.map((x) => x.taskId)).toEqual([ids[0], ids[1]]);
      expect(a.frames.some((f) => f.type === "completion_ack")).toBe(false);
      expect((await getTask(s, ids[0]!)).status).toBe("assigned");
      // The first task no longer takes the slot, the second does: no third.
      await new Promise((r) => setTimeout(r, 300));
      expect(a.assignments).toHaveLength(2);
      await blocker.query("COMMIT");
    } finally {
      await blocker.end();
    }
    await a.waitForFrame("completion_ack");
    expect(await getTask(s, ids[0]!)).toMatchObject({ status: "completed", result: { first: true } });
    expect(a.assignments).toHaveLength(2);
    a.complete(ids[1]!, {});
    await a.waitForFrame("task_assignment", 3);
    expect(a.assignments[2]!.taskId).toBe(ids[2]);
  });

  it.skipIf(!available || name === "embedded")("a result that could not be recorded takes its slot back until the agent sends it again", async () => {
    const { s, a, ids } = await oneSlotThreeTasks();
    const blocker = new pg.Client({ connectionString: TEST_POSTGRES_URL });
    await blocker.connect();
    try {
      await blocker.query("BEGIN");
      await blocker.query(`SELECT 1 FROM "${s.data.schema}".tasks WHERE task_id = $1 FOR UPDATE`, [ids[0]]);
      a.complete(ids[0]!, { first: true });
      await a.waitForFrame("task_assignment", 2);
      // The connection recording the result dies: whether it committed is unknown to the service.
      const waiting = await eventually(async () => {
        const pids = await lockWaiters(blocker);
        return pids.length === 1 ? pids[0] : null;
      }, 5000, "the result's statement waiting on the row lock");
      await blocker.query("SELECT pg_terminate_backend($1)", [waiting]);
      await a.waitFor((x) => x.frames.some((f) => f.type === "error"), 5000, "the result refused");
      await blocker.query("ROLLBACK");
    } finally {
      await blocker.end();
    }
    expect((await getTask(s, ids[0]!)).status).toBe("assigned");
    // The agent still holds the first task as far as the service knows, so
    // finishing the second frees no slot for the third.
    a.complete(ids[1]!, {});
    await a.waitForFrame("completion_ack");
    await new Promise((r) => setTimeout(r, 300));
    expect(a.assignments).toHaveLength(2);
    a.complete(ids[0]!, { first: true });
    await a.waitForFrame("completion_ack", 2);
    await a.waitForFrame("task_assignment", 3);
    expect(a.assignments[2]!.taskId).toBe(ids[2]);
    expect(await getTask(s, ids[0]!)).toMatchObject({ status: "completed", result: { first: true } });
  });

  it.skipIf(!available || name === "embedded")("a row another session holds past DB_LOCK_TIMEOUT_MS fails only the result waiting on it, as unavailable", async () => {
    const { s, a, ids } = await oneSlotThreeTasks({ DB_LOCK_TIMEOUT_MS: "300" });
    const blocker = await lockRow(s, ids[0]!);
    try {
      a.complete(ids[0]!, { first: true });
      await a.waitForFrame("task_assignment", 2);
      // Other writes go on meanwhile.
      a.complete(ids[1]!, { second: true });
      await a.waitFor((x) => x.frames.some((f) => f.type === "completion_ack" && f.taskId === ids[1]), 5000, "the second result recorded");
      await a.waitFor((x) => x.frames.some((f) => f.type === "error"), 5000, "the first result refused");
      expect(a.frames.find((f) => f.type === "error")).toMatchObject({ code: "unavailable", taskId: ids[0] });
      expect((await getTask(s, ids[0]!)).status).toBe("assigned");
    } finally {
      await blocker.query("ROLLBACK");
      await blocker.end();
    }
    a.complete(ids[0]!, { first: true });
    await a.waitFor((x) => x.frames.some((f) => f.type === "completion_ack" && f.taskId === ids[0]), 5000, "the first result recorded");
    expect(await getTask(s, ids[0]!)).toMatchObject({ status: "completed", result: { first: true } });
  });

  it.skipIf(!available || name === "embedded")("a delete of expired history that is stuck never holds up the renewal of live leases", async () => {
    const s = await start(name, {
      env: { TASK_RETENTION_MS: "300", IDEMPOTENCY_TTL_MS: "300", SWEEP_INTERVAL_MS: "50", LEASE_TTL_MS: "600", HEARTBEAT_INTERVAL_MS: "100", HEARTBEAT_TIMEOUT_MS: "10000", DB_STATEMENT_TIMEOUT_MS: "20000", DB_LOCK_TIMEOUT_MS: "0" },
    });
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["qa"], maxConcurrency: 2 }));
    const held = (await post(s, "/tasks", { task_type: "qa", description: "long job" })).body.task_id as string;
    const done = (await post(s, "/tasks", { task_type: "qa", description: "finished" })).body.task_id as string;
    await a.waitForFrame("task_assignment", 2);
    a.complete(done, {});
    await a.waitForFrame("completion_ack");
    // The delete of the finished task's audit rows, once it is due, waits on this lock.
    const blocker = await lockTable(s, "audit_logs");
    try {
      await eventually(async () => (await lockWaiters(blocker)).length > 0, 5000, "the delete waiting on the audit rows");
      const leases = new Set<string>();
      await eventually(async () => {
        const t = await getTask(s, held);
        expect(t).toMatchObject({ status: "assigned", attempt: 1 });
        leases.add(t.lease_expires_at);
        return leases.size >= 3;
      }, 5000, "the held task's lease renewed while the delete waits");
      expect(await getTask(s, done)).toMatchObject({ status: "completed" });
    } finally {
      await blocker.query("ROLLBACK");
      await blocker.end();
    }
    await eventually(async () => (await fetch(`${s.baseUrl}/tasks/${done}`)).status === 404, 5000, "the finished task deleted once the lock is gone");
  });

  it.skipIf(!available || name === "embedded")("metrics requests that arrive while the task counts are being read share that read", async () => {
    // No sweep meanwhile: its reads of the table would wait on the lock too.
    const s = await start(name, { env: { SWEEP_INTERVAL_MS: "600000" } });
    await post(s, "/tasks", { task_type: "research", description: "counted" });
    const blocker = await lockTable(s, "tasks");
    const mc = grpcClient("MetricsService", s.port);
    try {
      const viaRest = Array.from({ length: 3 }, async () => {
        const res = await fetch(`${s.baseUrl}/metrics`);
        return { status: res.status, body: (await res.json()) as { tasks: { pending: number; total: number } } };
      });
      const viaGrpc = Array.from({ length: 3 }, () => unary(mc, "GetMetrics", {}) as Promise<{ tasks: { pending: number; total: number } }>);
      await eventually(async () => (await lockWaiters(blocker)).length > 0, 5000, "a read waiting on the lock");
      await new Promise((r) => setTimeout(r, 300));
      // One read (its three statements on the table side by side: the counts
      // of retries waiting, of recent completions, of tasks per agent; the
      // counts by status are kept in a table of their own), not one per request.
      expect((await lockWaiters(blocker)).length).toBe(3);
      await blocker.query("ROLLBACK");
      for (const r of await Promise.all(viaRest)) expect(r).toMatchObject({ status: 200, body: { tasks: { pending: 1, total: 1 } } });
      for (const r of await Promise.all(viaGrpc)) expect(r.tasks).toMatchObject({ pending: 1, total: 1 });
      // Once it is over, the next request reads afresh.
      await post(s, "/tasks", { task_type: "research", description: "counted later" });
      expect(((await (await fetch(`${s.baseUrl}/metrics`)).json()) as { tasks: unknown }).tasks).toMatchObject({ pending: 2, total: 2 });
    } finally {
      mc.close();
      await blocker.end();
    }
  });

  it.skipIf(!available || name === "embedded")("a statement stuck past DB_STATEMENT_TIMEOUT_MS fails its request as unavailable, and nothing is left half-done", async () => {
    const s = await start(name, { env: { DB_STATEMENT_TIMEOUT_MS: "300", DB_LOCK_TIMEOUT_MS: "0" } });
    const blocker = await lockTable(s, "tasks");
    const tc = grpcClient("TaskService", s.port);
    try {
      const metrics = await fetch(`${s.baseUrl}/metrics`);
      expect(metrics.status).toBe(503);
      const created = await post(s, "/tasks", { task_type: "code", description: "while the table is locked" });
      expect(created).toMatchObject({ status: 503, body: { code: "unavailable" } });
      await expect(unary(tc, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "also refused" })).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
    } finally {
      await blocker.query("ROLLBACK");
      await blocker.end();
      tc.close();
    }
    // The refused creates left nothing behind; the service carries on.
    expect(await s.persistence.tasks.countByStatus()).toMatchObject({ pending: 0 });
    expect((await post(s, "/tasks", { task_type: "code", description: "after" })).status).toBe(201);
    expect((await fetch(`${s.baseUrl}/metrics`)).status).toBe(200);
  });

  it.skipIf(!available)("a lease nobody renews (its holder's instance died) expires and the task runs elsewhere", async () => {
    const s = await start(name, { env: { ...FAST, LEASE_TTL_MS: "400", HEARTBEAT_INTERVAL_MS: "100", HEARTBEAT_TIMEOUT_MS: "5000" } });
    const { body } = await post(s, "/tasks", { task_type: "synthesis", description: "held by a ghost", priority: 3 });
    // What an instance that crashed leaves behind: an assignment to an agent no live instance serves.
    expect(await s.persistence.tasks.assign(body.task_id, "ghost", new Date(), null, new Date(Date.now() + 400))).not.toBeNull();
    const live = track(await GrpcAgent.connect(s.port, { capabilities: ["synthesis"], autoComplete: () => ({ by: "live" }) }));
    await live.waitForFrame("completion_ack", 1, 10_000);
    expect(await getTask(s, body.task_id)).toMatchObject({ status: "completed", attempt: 2, failed_attempts: 1, agent_id: live.agentId });
    expect((await getTask(s, body.task_id)).error).toMatch(/lease expired/);
  });

  it.skipIf(!available)("a live agent's leases are renewed for as long as its session lives", async () => {
    const s = await start(name, { env: { ...FAST, LEASE_TTL_MS: "300", HEARTBEAT_INTERVAL_MS: "50", HEARTBEAT_TIMEOUT_MS: "300" } });
    const a = track(await WsAgent.connect(s.port));
    const beat = setInterval(() => a.heartbeat(), 50);
    try {
      const { body } = await post(s, "/tasks", { task_type: "code", description: "long job" });
      await a.waitForFrame("task_assignment");
      // Many lease lengths later, still the same attempt, never re-queued.
      const seen = new Set<string>();
      await eventually(async () => {
        const t = await getTask(s, body.task_id);
        expect(t).toMatchObject({ status: "assigned", attempt: 1 });
        seen.add(t.lease_expires_at);
        return seen.size >= 4;
      }, 10_000, "several renewals");
      a.complete(body.task_id, {});
      await a.waitForFrame("completion_ack");
      expect(await getTask(s, body.task_id)).toMatchObject({ status: "completed", attempt: 1, failed_attempts: 0 });
    } finally {
      clearInterval(beat);
    }
  });

  const connectAgent = (transport: "grpc" | "ws", port: number, options: Parameters<typeof GrpcAgent.connect>[1]) =>
    transport === "grpc" ? GrpcAgent.connect(port, options) : WsAgent.connect(port, options);

  /** An agent of `transport` holding `n` code tasks, one per slot. */
  async function agentHolding(s: TestServer, transport: "grpc" | "ws", n: number) {
    const agent = track(await connectAgent(transport, s.port, { capabilities: ["code"], maxConcurrency: n }));
    for (let i = 0; i < n; i++) await post(s, "/tasks", { task_type: "code", description: `slot ${i}` });
    await agent.waitForFrame("task_assignment", n);
    return { agent, ids: agent.assignments.map((a) => a.taskId) };
  }

  /** Every task completed by `agent` in its first attempt, recorded exactly once. */
  async function expectCompletedOnce(s: TestServer, agent: TestAgent, ids: string[]) {
    for (const [i, id] of ids.entries()) {
      expect(await getTask(s, id)).toMatchObject({ status: "completed", attempt: 1, failed_attempts: 0, agent_id: agent.agentId, result: { n: i } });
      const actions = (await s.persistence.tasks.auditTrail(id)).map((r) => r.action);
      expect(actions).toEqual(["task.created", "task.assigned", "task.completed"]);
    }
  }

  /** Waits until the server has finished closing `agent`'s session (its leases decided). */
  const sessionClosed = (s: TestServer, agent: TestAgent) =>
    eventually(() => s.logs.lines.some((l) => l.msg === "agent session closed" && l.agent_id === agent.agentId), 10_000, "session closed on the server");

  for (const transport of ["grpc", "ws"] as const) {
    it.skipIf(!available)(`results sent back-to-back over ${transport} are all acknowledged and recorded once, a repeat in the same burst included`, async () => {
      const s = await start(name);
      const n = 5;
      const { agent, ids } = await agentHolding(s, transport, n);
      for (const [i, id] of ids.entries()) {
        agent.complete(id, { n: i });
        // The repeat arrives while the original may still be on its way to the database.
        if (i === 1) agent.complete(id, { n: i });
      }
      await agent.waitForFrame("completion_ack", n + 1);
      const acked = agent.frames.filter((f) => f.type === "completion_ack").map((f) => f.taskId);
      expect([...acked].sort()).toEqual([...ids, ids[1]!].sort());
      expect(agent.frames.filter((f) => f.type === "error")).toEqual([]);
      await expectCompletedOnce(s, agent, ids);
      // The slots are free again: new work reaches the same agent.
      const { body } = await post(s, "/tasks", { task_type: "code", description: "after the burst" });
      await agent.waitFor((a) => a.assignments.some((x) => x.taskId === body.task_id), 5000, "next assignment");
      agent.complete(body.task_id, {});
      await agent.waitForFrame("completion_ack", n + 2);
    });

    it.skipIf(!available)(`closing the ${transport} stream right after sending results leaves those tasks completed, not retried`, async () => {
      const s = await start(name, { env: FAST });
      const n = 4;
      const { agent, ids } = await agentHolding(s, transport, n);
      for (const [i, id] of ids.entries()) agent.complete(id, { n: i });
      await agent.end();
      await sessionClosed(s, agent);
      await expectCompletedOnce(s, agent, ids);
    });

    it.skipIf(!available)(`closing the ${transport} stream right after a burst with a repeated result still records every result`, async () => {
      const s = await start(name, { env: FAST });
      const n = 4;
      const { agent, ids } = await agentHolding(s, transport, n);
      // One result more than the agent has slots: the repeat takes a place among the results in flight.
      agent.complete(ids[0]!, { n: 0 });
      for (const [i, id] of ids.entries()) agent.complete(id, { n: i });
      await agent.end();
      await sessionClosed(s, agent);
      await expectCompletedOnce(s, agent, ids);
    });
  }

  it.skipIf(!available)("shutdown drains: new work is refused, agents are told, results in the grace period count", async () => {
    const s = await start(name, { env: { SHUTDOWN_GRACE_MS: "5000" } });
    const a = track(await GrpcAgent.connect(s.port, { maxConcurrency: 2 }));
    const [t1, t2] = [
      (await post(s, "/tasks", { task_type: "qa", description: "finish me" })).body.task_id as string,
      (await post(s, "/tasks", { task_type: "qa", description: "me too" })).body.task_id as string,
    ];
    await a.waitForFrame("task_assignment", 2);
    const closing = s.app.close();
    await a.waitForFrame("drain");
    expect((await post(s, "/tasks", { task_type: "qa", description: "too late" })).status).toBe(503);
    a.complete(t1, { in: "grace" });
    a.complete(t2, { in: "grace" });
    await closing;
    const db = await start(name, { shareWith: s });
    for (const id of [t1, t2]) expect(await db.persistence.tasks.get(id)).toMatchObject({ status: "completed", result: { in: "grace" }, failedAttempts: 0 });
  });
});
