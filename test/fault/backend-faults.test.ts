/**
 * Fault scenarios on the backends, PostgreSQL + Redis only: Redis FLUSHDB
 * and Redis restart (a private redis-server), and PostgreSQL cut off by a
 * TCP proxy. Each ends by checking the books.
 */
import { describe, expect, it } from "vitest";
import { Redis } from "ioredis";
import { PrivateRedis } from "../support/private-redis.js";
import { TcpProxy } from "../support/tcp-proxy.js";
import type { ChildServer } from "../support/child-server.js";
import {
  Scenario,
  checkBooks,
  eventually,
  getJson,
  postTask,
  postgresTarget,
  privateRedisOk,
  proxiedDatabaseUrl,
  sharedServices,
  summarize,
  taskRpc,
  taskRow,
  scenarioPerTest,
} from "./harness.js";

const scenario = scenarioPerTest();

async function withPrivateRedis(name: string): Promise<{ s: Scenario; redis: PrivateRedis }> {
  const redis = await PrivateRedis.start();
  let s: Scenario;
  try {
    s = await scenario(name, "postgres+redis", { redisUrl: redis.url });
  } catch (e: unknown) {
    await redis.stop();
    throw e;
  }
  s.onCleanup(() => redis.stop());
  return { s, redis };
}

/**
 * A server with no periodic queue check and one task queued, then its Redis
 * flushed: only what the test does next can start the rebuild.
 */
async function flushedWithOneTask(name: string) {
  const { s, redis } = await withPrivateRedis(name);
  const server = await s.startServer({ RECONCILE_INTERVAL_MS: "3600000" });
  const queued = await s.createTask(server, { description: "queued before the flush", priority: 5 });
  expect((await getJson(server, "/health")).status).toBe(200);
  const admin = new Redis(redis.url);
  s.onCleanup(() => admin.disconnect());
  await admin.flushdb();
  return { s, server, queued };
}

/** One agent runs `ids` in that order, and the books check out. */
async function expectRunInOrder(s: Scenario, server: ChildServer, ids: string[]): Promise<void> {
  const agent = await s.agent(server, { autoComplete: () => ({ ok: true }) });
  await agent.waitForFrame("completion_ack", ids.length, 15_000);
  expect(agent.assignments.map((a) => a.taskId)).toEqual(ids);
  await checkBooks(s, { servers: [server] });
  await summarize(s);
}

const queueDepth = async (server: ChildServer) => (await getJson<{ queue_depth: { total: number } }>(server, "/metrics")).body.queue_depth.total;

/** Priorities created in this order; the expected run order is priority desc, then FIFO. */
const PRIORITIES = [3, 7, 3, 9, 7, 1];
function runOrder(ids: string[]): string[] {
  return ids.map((id, i) => ({ id, p: PRIORITIES[i]!, i })).sort((x, y) => y.p - x.p || x.i - y.i).map((x) => x.id);
}

describe("backend faults on postgres+redis", () => {
  it.skipIf(!privateRedisOk)("Redis FLUSHDB mid-run: the queue is rebuilt from the database in priority/FIFO order", { timeout: 60_000 }, async () => {
    const { s, redis } = await withPrivateRedis("Redis FLUSHDB mid-run");
    const server = await s.startServer();
    const agent = await s.agent(server, { maxConcurrency: 1 });
    const running = await s.createTask(server, { description: "running during the flush", priority: 10 });
    await agent.waitForFrame("task_assignment");
    const ids: string[] = [];
    for (const [i, priority] of PRIORITIES.entries()) ids.push(await s.createTask(server, { description: `queued ${i}`, priority }));
    await eventually(async () => (await queueDepth(server)) === PRIORITIES.length, 5000, "six queued");

    const admin = new Redis(redis.url);
    s.onCleanup(() => admin.disconnect());
    await admin.flushdb();
    expect(await admin.dbsize()).toBe(0);
    // The reconciler notices and puts every runnable task back (not the assigned one).
    await eventually(async () => (await queueDepth(server)) === PRIORITIES.length && (await admin.dbsize()) > 0, 10_000, "queue rebuilt");

    agent.complete(running, { ok: "running" });
    await agent.waitForFrame("completion_ack");
    // From now on complete everything, one at a time.
    let seen = 1;
    const timer = setInterval(() => {
      while (seen < agent.assignments.length) agent.complete(agent.assignments[seen++]!.taskId, { ok: true });
    }, 10);
    s.onCleanup(() => clearInterval(timer));
    await agent.waitForFrame("completion_ack", 1 + PRIORITIES.length, 15_000);
    expect(agent.assignments.map((a) => a.taskId)).toEqual([running, ...runOrder(ids)]);
    await checkBooks(s, { servers: [server] });
    await summarize(s);
  });

  it.skipIf(!privateRedisOk)("Redis FLUSHDB: /health says the queue is unusable, and asks for the rebuild itself", { timeout: 60_000 }, async () => {
    // No create after the flush: only /health can start the rebuild.
    const { s, server, queued } = await flushedWithOneTask("Redis FLUSHDB health");
    const h = await getJson<{ status: string; components: { queue: string; database: string } }>(server, "/health");
    expect(h.status).toBe(503);
    expect(h.body.components).toEqual({ database: "ok", queue: expect.stringMatching(/^unavailable: lost its data/) });

    await eventually(async () => (await getJson(server, "/health")).status === 200, 10_000, "/health ok after the rebuild");
    // Healthy means usable: a create right after succeeds and queues behind the older task.
    const after = await s.createTask(server, { description: "created once healthy", priority: 5 });
    await expectRunInOrder(s, server, [queued, after]);
  });

  it.skipIf(!privateRedisOk)("Redis FLUSHDB: a refused create asks for the rebuild, and creates work again once it has begun", { timeout: 60_000 }, async () => {
    // No /health request after the flush: only the refused create can start the rebuild.
    const { s, server, queued } = await flushedWithOneTask("Redis FLUSHDB create");
    const refused = await postTask(server, { description: "refused while the queue is gone" });
    expect(refused.status, JSON.stringify(refused.body)).toBe(503);
    let after: string | undefined;
    await eventually(async () => {
      const res = await postTask(server, { description: "created once rebuilt", priority: 5 });
      if (res.status === 201) after = (res.body as { task_id: string }).task_id;
      else expect(res.status, JSON.stringify(res.body)).toBe(503);
      return after;
    }, 10_000, "a create accepted after the rebuild");
    s.created.push(after!);
    await expectRunInOrder(s, server, [queued, after!]);
  });

  it.skipIf(!privateRedisOk)("Redis refusing writes (maxmemory): creates 503 with nothing written; a retried task the queue refused runs once Redis takes writes again", { timeout: 60_000 }, async () => {
    const { s, redis } = await withPrivateRedis("Redis refusing writes");
    const server = await s.startServer();
    const agent = await s.agent(server);
    const id = await s.createTask(server, { description: "fails, then is retried while Redis refuses writes" });
    await agent.waitForFrame("task_assignment");
    agent.fail(id, "fatal", false);
    await eventually(async () => (await taskRow(s, id))?.status === "failed", 10_000, "task FAILED");

    // Redis stays up and connected but refuses writes: no reconnect will
    // announce that the queue fell behind the database.
    const admin = new Redis(redis.url);
    s.onCleanup(() => admin.disconnect());
    await admin.config("SET", "maxmemory", "1");
    const refused = await postTask(server, { description: "created while Redis refuses writes" });
    expect(refused.status, JSON.stringify(refused.body)).toBe(503);
    expect((await s.backend.books.tasks()).map((t) => t.task_id)).toEqual([id]);
    // /health says so, though Redis answers.
    const h = await getJson<{ components: { queue: string; database: string } }>(server, "/health");
    expect(h.status).toBe(503);
    expect(h.body.components).toEqual({ database: "ok", queue: expect.stringMatching(/^unavailable: OOM/) });
    const retried = await fetch(`${server.url}/tasks/${id}/retry`, { method: "POST" });
    expect(retried.status).toBe(200);
    expect((await taskRow(s, id))?.status).toBe("pending");
    expect(await queueDepth(server)).toBe(0);

    await admin.config("SET", "maxmemory", "0");
    expect((await getJson(server, "/health")).status).toBe(200);
    // Nothing else happens on its own: only the rebuild the refusal asked for can queue it.
    await agent.waitForFrame("task_assignment", 2, 15_000);
    expect(agent.assignments.map((a) => a.taskId)).toEqual([id, id]);
    agent.complete(id, { ok: "after the refusal" });
    await agent.waitForFrame("completion_ack");
    await checkBooks(s, { servers: [server] });
    await summarize(s);
  });

  it.skipIf(!privateRedisOk)("SIGTERM while Redis refuses writes: a handed-back task is left due, and another instance runs it once Redis takes writes", { timeout: 60_000 }, async () => {
    const { s, redis } = await withPrivateRedis("SIGTERM while Redis refuses writes");
    const leaving = await s.startServer({ SHUTDOWN_GRACE_MS: "500" }, "leaving");
    const staying = await s.startServer({}, "staying");
    const holder = await s.agent(leaving);
    const id = await s.createTask(leaving, { description: "held when its instance stops" });
    await holder.waitForFrame("task_assignment");

    const admin = new Redis(redis.url);
    s.onCleanup(() => admin.disconnect());
    await admin.config("SET", "maxmemory", "1");
    // The holder never answers: at the end of the grace period the task is
    // handed back, and the queue refuses it.
    expect(await leaving.terminate()).toEqual({ code: 0, signal: null });
    expect(await taskRow(s, id)).toMatchObject({ status: "pending", attempt: 1, failed_attempts: 0 });
    const worker = await s.agent(staying, { autoComplete: () => ({ by: "staying" }) });
    // Nothing can queue it while Redis refuses writes.
    await new Promise((r) => setTimeout(r, 500));
    expect(worker.assignments).toEqual([]);

    await admin.config("SET", "maxmemory", "0");
    await worker.waitForFrame("completion_ack", 1, 15_000);
    expect(worker.assignments.map((a) => [a.taskId, a.attempt])).toEqual([[id, 2]]);
    expect(await taskRow(s, id)).toMatchObject({ status: "completed", failed_attempts: 0 });
    await checkBooks(s, { servers: [staying], result: { [id]: { by: "staying" } } });
    await summarize(s);
  });

  it.skipIf(!privateRedisOk)("Redis restart: creates 503 with nothing written, reads work, /health says so, then it recovers by itself", { timeout: 60_000 }, async () => {
    const { s, redis } = await withPrivateRedis("Redis restart");
    const server = await s.startServer();
    const before: string[] = [];
    for (const [i, priority] of PRIORITIES.slice(0, 3).entries()) before.push(await s.createTask(server, { description: `before the outage ${i}`, priority }));

    await redis.stop();
    await eventually(async () => {
      const h = await getJson<{ status: string; components: { queue: string; database: string } }>(server, "/health");
      return h.status === 503 && h.body.status === "unhealthy" && h.body.components.queue !== "ok" && h.body.components.database === "ok";
    }, 10_000, "/health reports the queue down");
    for (let i = 0; i < 3; i++) {
      const res = await postTask(server, { description: `during the outage ${i}` });
      expect(res.status, JSON.stringify(res.body)).toBe(503);
    }
    await expect(taskRpc(server, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "during the outage (grpc)" })).rejects.toMatchObject({ code: 14 });
    expect((await s.backend.books.tasks()).length).toBe(before.length);
    // Reads keep working.
    expect((await getJson(server, `/tasks/${before[0]}`)).status).toBe(200);
    const list = await getJson<unknown[]>(server, "/tasks");
    expect(list.status).toBe(200);
    expect(list.body).toHaveLength(before.length);

    await redis.restart(); // empty: no persistence
    await eventually(async () => (await getJson(server, "/health")).status === 200, 15_000, "/health ok again");
    const after: string[] = [];
    for (const [i, priority] of PRIORITIES.slice(3).entries()) after.push(await s.createTask(server, { description: `after the outage ${i}`, priority }));
    await eventually(async () => (await queueDepth(server)) === PRIORITIES.length, 10_000, "all six queued");
    const agent = await s.agent(server, { autoComplete: () => ({ ok: true }) });
    await agent.waitForFrame("completion_ack", PRIORITIES.length, 15_000);
    expect(agent.assignments.map((a) => a.taskId)).toEqual(runOrder([...before, ...after]));
    await checkBooks(s, { servers: [server] });
    await summarize(s);
  });

  it.skipIf(!sharedServices)("PostgreSQL cut off (proxy): 503 / UNAVAILABLE, never a 500, then it recovers by itself", { timeout: 60_000 }, async () => {
    const s = await scenario("PostgreSQL restart (proxy)", "postgres+redis");
    const proxy = await TcpProxy.start(postgresTarget());
    s.onCleanup(() => proxy.close());
    const server = await s.startServer({ DATABASE_URL: proxiedDatabaseUrl(s.backend, proxy.port) });
    const holder = await s.agent(server, { transport: "ws" });
    const held = await s.createTask(server, { description: "held through the outage" });
    await holder.waitForFrame("task_assignment");

    proxy.cut();
    const bodies: string[] = [];
    await eventually(async () => (await getJson(server, "/health")).status === 503, 10_000, "/health reports the database down");
    const health = await getJson<{ components: { database: string } }>(server, "/health");
    expect(health.body.components.database).not.toBe("ok");
    const attempts = [
      () => postTask(server, { description: "during the database outage" }),
      () => getJson(server, `/tasks/${held}`),
      () => getJson(server, "/tasks"),
    ];
    for (const call of attempts) {
      const res = await call();
      bodies.push(JSON.stringify(res.body));
      expect(res.status, JSON.stringify(res.body)).toBe(503);
    }
    await expect(taskRpc(server, "GetTask", { task_id: held })).rejects.toMatchObject({ code: 14 });
    for (const b of bodies) expect(b).not.toMatch(/\n\s+at |stack|ECONNRE/);

    proxy.restore();
    await eventually(async () => (await getJson(server, "/health")).status === 200, 20_000, "/health ok again");
    // The held task: completed by its holder, or (if its lease lapsed in the outage) re-run.
    const helper = await s.agent(server, { maxConcurrency: 2, autoComplete: () => ({ by: "helper" }) });
    // The holder reports now and runs whatever it is given next.
    let seen = 0;
    const timer = setInterval(() => {
      while (seen < holder.assignments.length) holder.complete(holder.assignments[seen++]!.taskId, { by: "holder" });
    }, 10);
    s.onCleanup(() => clearInterval(timer));
    const fresh = [await s.createTask(server, { description: "after the outage 1" }), await s.createTask(server, { description: "after the outage 2" })];
    await eventually(async () => (await s.backend.books.tasks()).every((r) => r.status === "completed"), 15_000, "everything completed");
    expect([...helper.assignments, ...holder.assignments].map((a) => a.taskId)).toEqual(expect.arrayContaining(fresh));
    await checkBooks(s, { servers: [server] });
    await summarize(s);
  });
});
