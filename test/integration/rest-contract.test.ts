/**
 * The legacy JSON REST contract (DESIGN.md §4), field for field, with real
 * `fetch` against the real server on port 0: the embedded backend, and
 * PostgreSQL + Redis where the backing services change the behaviour.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BACKENDS, eventually, startServer, type TestServer } from "../support/server.js";
import { WsAgent, type TestAgent } from "../support/clients.js";
import { hasRedisServer, PrivateRedis } from "../support/private-redis.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const MAX_MESSAGE_BYTES = 4096;

interface JsonResponse {
  status: number;
  headers: Headers;
  body: any;
}

async function request(s: TestServer, method: string, path: string, init: { body?: string | Buffer; headers?: Record<string, string> } = {}): Promise<JsonResponse> {
  const res = await fetch(`${s.baseUrl}${path}`, { method, headers: init.headers, body: init.body });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    // Left as text: the assertion that follows shows it.
  }
  return { status: res.status, headers: res.headers, body };
}

const postTask = (s: TestServer, body: unknown, headers: Record<string, string> = {}) =>
  request(s, "POST", "/tasks", { body: JSON.stringify(body), headers: { "content-type": "application/json", ...headers } });

const get = (s: TestServer, path: string) => request(s, "GET", path);

/** An error response: FastAPI's `detail`, a machine `code`, and the correlation ID. */
function expectError(res: JsonResponse, status: number, code: string): void {
  expect(res.status, JSON.stringify(res.body)).toBe(status);
  expect(res.body).toEqual(expect.objectContaining({ detail: expect.anything(), code }));
  expect(res.headers.get("x-correlation-id")).toMatch(/.+/);
  expect(res.headers.get("content-type")).toMatch(/^application\/json/);
}

/** A 422 whose detail list has one entry at `loc` of kind `type` (when given). */
function expect422(res: JsonResponse, loc: Array<string | number>, type?: string): void {
  expectError(res, 422, "invalid_argument");
  expect(Array.isArray(res.body.detail)).toBe(true);
  for (const v of res.body.detail) {
    expect(Object.keys(v).sort()).toEqual(["loc", "msg", "type"]);
    expect(typeof v.msg).toBe("string");
    expect(typeof v.type).toBe("string");
  }
  expect(res.body.detail).toEqual(expect.arrayContaining([expect.objectContaining({ loc, ...(type ? { type } : {}) })]));
}

describe.each(BACKENDS)("REST contract on $name", ({ name, available }) => {
  let s: TestServer;
  const agents: TestAgent[] = [];

  beforeAll(async () => {
    if (available) s = await startServer(name, { env: { MAX_MESSAGE_BYTES: String(MAX_MESSAGE_BYTES) } });
  });
  afterAll(async () => {
    for (const a of agents) a.kill();
    await s?.close();
  });

  it.skipIf(!available)("GET /health: 200 with both components ok and the version", async () => {
    const res = await get(s, "/health");
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ status: "healthy", components: { database: "ok", queue: "ok" }, version: "test" });
    expect(res.headers.get("x-correlation-id")).toMatch(UUID);
  });

  it.skipIf(!available)("POST /tasks: 201 with exactly task_id, status, message and queued_at; defaults applied", async () => {
    const before = Date.now();
    const res = await postTask(s, { task_type: "research", description: "find the answer" });
    expect(res.status).toBe(201);
    expect(Object.keys(res.body).sort()).toEqual(["message", "queued_at", "status", "task_id"]);
    expect(res.body).toEqual({ task_id: expect.stringMatching(UUID), status: "pending", message: "Task queued successfully", queued_at: expect.stringMatching(ISO) });
    expect(Date.parse(res.body.queued_at)).toBeGreaterThanOrEqual(before - 1000);
    expect(res.headers.get("content-type")).toMatch(/^application\/json/);

    const task = await get(s, `/tasks/${res.body.task_id}`);
    expect(task.status).toBe(200);
    for (const field of ["task_id", "task_type", "description", "priority", "status", "metadata", "result", "error", "agent_id", "attempt", "created_at", "updated_at"]) {
      expect(task.body, field).toHaveProperty(field);
    }
    expect(task.body).toMatchObject({
      task_id: res.body.task_id,
      task_type: "research",
      description: "find the answer",
      priority: 5,
      status: "pending",
      metadata: {},
      result: null,
      error: null,
      agent_id: null,
      attempt: 0,
      created_at: res.body.queued_at,
      updated_at: expect.stringMatching(ISO),
    });
  });

  it.skipIf(!available)("POST /tasks keeps every accepted value: types, priorities 0 and 10, nested metadata, boundary lengths", async () => {
    const cases = [
      { task_type: "code", description: "abc", priority: 0, metadata: {} },
      { task_type: "trading", description: "x".repeat(2000), priority: 10, metadata: { a: { b: [1, "two", null, true] }, "ünï": "çødé" } },
      { task_type: "qa", description: "  spaced  ", priority: 7, metadata: { n: 1.5 } },
      { task_type: "documentation", description: "null priority and metadata", priority: null, metadata: null },
    ];
    for (const body of cases) {
      const res = await postTask(s, body);
      expect(res.status, JSON.stringify(res.body)).toBe(201);
      const task = (await get(s, `/tasks/${res.body.task_id}`)).body;
      expect(task).toMatchObject({ task_type: body.task_type, description: body.description, priority: body.priority ?? 5, metadata: body.metadata ?? {} });
    }
  });

  it.skipIf(!available)("GET /tasks/{id}: 404 Task not found for unknown and non-UUID ids", async () => {
    for (const id of ["00000000-0000-4000-8000-000000000000", "not-a-uuid", "1", "%27%20OR%201%3D1", "..%2F..%2Fetc", "a".repeat(99)]) {
      const res = await get(s, `/tasks/${id}`);
      expectError(res, 404, "not_found");
      expect(res.body).toEqual({ detail: "Task not found", code: "not_found" });
    }
  });

  it.skipIf(!available)("an id longer than the router's parameter limit still gets a JSON error with detail and code", async () => {
    const res = await request(s, "GET", `/tasks/${"0".repeat(300)}`, { headers: { "x-correlation-id": "long-id" } });
    expect([404, 414]).toContain(res.status);
    expect(res.body).toEqual(expect.objectContaining({ detail: expect.anything(), code: expect.any(String) }));
    expect(res.headers.get("x-correlation-id")).toBe("long-id");
    // A malformed percent-encoding is refused in the same shape.
    const badUrl = await request(s, "GET", "/tasks/%E0%A4%A", { headers: { "x-correlation-id": "bad-url" } });
    expect(badUrl.status).toBeGreaterThanOrEqual(400);
    expect(badUrl.status).toBeLessThan(500);
    expect(badUrl.body).toEqual(expect.objectContaining({ detail: expect.anything(), code: expect.any(String) }));
    expect(badUrl.headers.get("x-correlation-id")).toBe("bad-url");
  });

  it.skipIf(!available)("unknown routes and methods answer in the same error shape", async () => {
    expectError(await get(s, "/nope"), 404, "not_found");
    const del = await request(s, "DELETE", "/tasks");
    expect(del.status).toBeGreaterThanOrEqual(400);
    expect(del.status).toBeLessThan(500);
    expect(del.body).toEqual(expect.objectContaining({ detail: expect.anything(), code: expect.any(String) }));
  });

  it.skipIf(!available)("POST /tasks: 422 with a {loc,msg,type} detail list for every invalid body", async () => {
    const base = { task_type: "code", description: "valid description" };
    const deep: Record<string, unknown> = {};
    let cur = deep;
    for (let i = 0; i < 40; i++) cur = (cur.x = {}) as Record<string, unknown>;
    const cases: Array<[string, unknown, Array<string | number>, string?]> = [
      ["missing task_type", { description: "no type here" }, ["body", "task_type"], "missing"],
      ["unknown task_type", { ...base, task_type: "cooking" }, ["body", "task_type"]],
      ["upper-case task_type", { ...base, task_type: "CODE" }, ["body", "task_type"]],
      ["proto spelling of task_type", { ...base, task_type: "TASK_TYPE_CODE" }, ["body", "task_type"]],
      ["task_type not a string", { ...base, task_type: 1 }, ["body", "task_type"]],
      ["missing description", { task_type: "code" }, ["body", "description"], "missing"],
      ["description too short", { ...base, description: "ab" }, ["body", "description"]],
      ["description too long", { ...base, description: "x".repeat(2001) }, ["body", "description"]],
      ["description not a string", { ...base, description: 12345 }, ["body", "description"]],
      ["priority -1", { ...base, priority: -1 }, ["body", "priority"]],
      ["priority 11", { ...base, priority: 11 }, ["body", "priority"]],
      ["priority 5.5", { ...base, priority: 5.5 }, ["body", "priority"]],
      ['priority "5"', { ...base, priority: "5" }, ["body", "priority"]],
      ["priority true", { ...base, priority: true }, ["body", "priority"]],
      ["metadata a string", { ...base, metadata: "x" }, ["body", "metadata"]],
      ["metadata an array", { ...base, metadata: [1, 2] }, ["body", "metadata"]],
      ["metadata a number", { ...base, metadata: 3 }, ["body", "metadata"]],
      ["metadata too deep", { ...base, metadata: deep }, ["body", "metadata"]],
    ];
    for (const [what, body, loc, type] of cases) {
      const res = await postTask(s, body);
      try {
        expect422(res, loc, type);
      } catch (e: unknown) {
        throw new Error(`${what}: ${String(e)}`, { cause: e });
      }
    }
    // Several problems are reported together.
    const many = await postTask(s, { task_type: "nope", description: "", priority: 99 });
    expect422(many, ["body", "task_type"]);
    expect(many.body.detail.map((v: { loc: string[] }) => v.loc.join("."))).toEqual(expect.arrayContaining(["body.task_type", "body.description", "body.priority"]));
  });

  it.skipIf(!available)("GET /tasks and /agents: 422 naming the query parameter that was sent wrong, not as missing", async () => {
    const cases: Array<[string, string]> = [
      ["/tasks?limit=-1", "limit"],
      ["/tasks?limit=1e309", "limit"],
      ["/tasks?limit=ten", "limit"],
      ["/tasks?status=PENDING", "status"],
      ["/tasks?task_type=cooking", "task_type"],
      ["/agents?include_disconnected=1", "include_disconnected"],
    ];
    for (const [path, param] of cases) {
      const res = await get(s, path);
      expect422(res, ["query", param]);
      const [violation] = (res.body as { detail: Array<{ msg: string; type: string }> }).detail;
      expect(violation!.type, path).not.toBe("missing");
      expect(violation!.msg, path).not.toBe("Field required");
    }
  });

  it.skipIf(!available)("POST /tasks: metadata over 64 KiB is refused with 422 (server with a large body limit)", async () => {
    const big = await startServer("embedded");
    try {
      const res = await postTask(big, { task_type: "code", description: "large metadata", metadata: { blob: "x".repeat(70 * 1024) } });
      expect422(res, ["body", "metadata"]);
      expect((await get(big, "/tasks")).body).toEqual([]);
    } finally {
      await big.close();
    }
  });

  it.skipIf(!available)("POST /tasks: non-JSON, empty, array and scalar bodies are 422; wrong content types are 4xx", async () => {
    const raw = (body: string, contentType = "application/json") => request(s, "POST", "/tasks", { body, headers: { "content-type": contentType } });

    const notJson = await raw("{not json");
    expect422(notJson, ["body"], "json_invalid");
    const empty = await raw("");
    expect(empty.status).toBe(422);
    expect(empty.body.code).toBe("invalid_argument");
    for (const body of ["[]", '[{"task_type":"code","description":"in an array"}]', "42", '"text"', "null", "true"]) {
      const res = await raw(body);
      expect422(res, ["body"]);
    }
    for (const contentType of ["text/plain", "application/x-www-form-urlencoded", "application/xml"]) {
      const res = await raw("task_type=code&description=hello", contentType);
      expect(res.status, contentType).toBeGreaterThanOrEqual(400);
      expect(res.status, contentType).toBeLessThan(500);
      expect(res.body).toEqual(expect.objectContaining({ detail: expect.anything(), code: expect.any(String) }));
      expect(res.headers.get("x-correlation-id")).toMatch(/.+/);
    }
    const noType = await request(s, "POST", "/tasks", { body: JSON.stringify({ task_type: "code", description: "no content type" }) });
    expect(noType.status).toBeGreaterThanOrEqual(400);
    expect(noType.status).toBeLessThan(500);
    expect(noType.body).toEqual(expect.objectContaining({ detail: expect.anything(), code: expect.any(String) }));
  });

  it.skipIf(!available)("POST /tasks: a body over MAX_MESSAGE_BYTES is 413 and creates nothing", async () => {
    const before = (await get(s, "/tasks?limit=1000")).body.length;
    const res = await postTask(s, { task_type: "code", description: "too big", metadata: { blob: "x".repeat(MAX_MESSAGE_BYTES) } });
    expectError(res, 413, "resource_exhausted");
    expect((await get(s, "/tasks?limit=1000")).body.length).toBe(before);
    // The server is fine afterwards.
    expect((await get(s, "/health")).status).toBe(200);
  });

  it.skipIf(!available)("the correlation ID is echoed on success and on every error", async () => {
    const cid = `rest-${Date.now()}`;
    const ok = await postTask(s, { task_type: "code", description: "echo me" }, { "x-correlation-id": cid });
    expect(ok.headers.get("x-correlation-id")).toBe(cid);
    const bad = await postTask(s, { task_type: "CODE", description: "echo me" }, { "x-correlation-id": `${cid}-bad` });
    expect(bad.status).toBe(422);
    expect(bad.headers.get("x-correlation-id")).toBe(`${cid}-bad`);
    const missing = await request(s, "GET", "/tasks/nope", { headers: { "x-correlation-id": `${cid}-404` } });
    expect(missing.headers.get("x-correlation-id")).toBe(`${cid}-404`);
  });

  describe("GET /tasks", () => {
    it.skipIf(!available)("newest first, default limit 100, limit/status/task_type filters", async () => {
      // A server of its own, so the listing holds exactly what this test made.
      const own = await startServer(name);
      const ids: string[] = [];
      try {
        expect((await get(own, "/tasks")).body).toEqual([]);
        const types = ["code", "qa", "analysis"];
        for (let i = 0; i < 105; i++) {
          const res = await postTask(own, { task_type: types[i % 3], description: `listing ${i}`, priority: i % 11 });
          expect(res.status).toBe(201);
          ids.push(res.body.task_id);
        }
        const all = await get(own, "/tasks");
        expect(all.status).toBe(200);
        expect(all.body).toHaveLength(100);
        expect(all.body.map((t: { task_id: string }) => t.task_id)).toEqual(ids.slice(5).reverse());
        expect(all.body[0]).toMatchObject({ task_id: ids[104], task_type: "analysis", description: "listing 104", status: "pending" });
        for (let i = 1; i < all.body.length; i++) expect(all.body[i - 1].created_at >= all.body[i].created_at).toBe(true);

        const limited = await get(own, "/tasks?limit=3");
        expect(limited.body.map((t: { task_id: string }) => t.task_id)).toEqual(ids.slice(-3).reverse());
        expect((await get(own, "/tasks?limit=1000")).body).toHaveLength(105);

        const qa = await get(own, "/tasks?task_type=qa&limit=1000");
        expect(qa.body).toHaveLength(35);
        expect(qa.body.every((t: { task_type: string }) => t.task_type === "qa")).toBe(true);

        // Complete one task so the status filter has something to tell apart.
        const agent = await WsAgent.connect(own.port, { capabilities: ["analysis"] });
        agents.push(agent);
        await agent.waitForFrame("task_assignment");
        const done = agent.assignments[0]!.taskId;
        agent.complete(done, { ok: true });
        await agent.waitForFrame("completion_ack");
        await agent.end();

        const completed = await get(own, "/tasks?status=completed");
        expect(completed.body.map((t: { task_id: string }) => t.task_id)).toEqual([done]);
        expect(completed.body[0]).toMatchObject({ status: "completed", result: { ok: true }, attempt: 1, task_type: "analysis" });
        // The agent may have been handed the next task before it left (its
        // slot frees when its result arrives); that one goes back to pending.
        await eventually(
          async () =>
            (await get(own, "/tasks?status=pending&task_type=analysis&limit=1000")).body.length === 34 &&
            (await get(own, "/tasks?status=assigned")).body.length === 0,
          5000,
          "34 pending analysis tasks and none assigned",
        );
        expect((await get(own, "/tasks?status=cancelled")).body).toEqual([]);
      } finally {
        await own.close();
      }
    });

    it.skipIf(!available)("422 with a detail list naming the bad query parameter", async () => {
      const cases: Array<[string, Array<string | number>]> = [
        ["limit=0", ["query", "limit"]],
        ["limit=-1", ["query", "limit"]],
        ["limit=1001", ["query", "limit"]],
        ["limit=abc", ["query", "limit"]],
        ["limit=2.5", ["query", "limit"]],
        ["status=PENDING", ["query", "status"]],
        ["status=done", ["query", "status"]],
        ["task_type=CODE", ["query", "task_type"]],
        ["task_type=cooking", ["query", "task_type"]],
      ];
      for (const [query, loc] of cases) {
        const res = await get(s, `/tasks?${query}`);
        try {
          expect422(res, loc);
        } catch (e: unknown) {
          throw new Error(`${query}: ${String(e)}`, { cause: e });
        }
      }
    });
  });

  it.skipIf(!available)("GET /agents: a JSON array of snake_case agents", async () => {
    const a = await WsAgent.connect(s.port, { agentId: `rest-agent-${name.replace(/\W/g, "")}`, capabilities: ["code", "qa"], maxConcurrency: 3 });
    agents.push(a);
    const res = await get(s, "/agents");
    expect(res.status).toBe(200);
    expect(Array.isArray(res.body)).toBe(true);
    const mine = res.body.find((x: { agent_id: string }) => x.agent_id === a.agentId);
    expect(mine).toEqual({
      agent_id: a.agentId,
      agent_name: "test-ws",
      agent_type: "test",
      capabilities: ["code", "qa"],
      max_concurrency: 3,
      status: expect.any(String),
      active_tasks: expect.any(Number),
      last_heartbeat: expect.stringMatching(ISO),
      created_at: expect.stringMatching(ISO),
      transport: "ws",
    });
    for (const agent of res.body) for (const key of Object.keys(agent)) expect(key).toMatch(/^[a-z_]+$/);
    await a.end();
    await eventually(async () => !(await get(s, "/agents")).body.some((x: { agent_id: string }) => x.agent_id === a.agentId), 5000, "agent gone from /agents");
    const withOld = await get(s, "/agents?include_disconnected=true");
    expect(withOld.body.find((x: { agent_id: string }) => x.agent_id === a.agentId)).toMatchObject({ status: "disconnected" });
    expect422(await get(s, "/agents?include_disconnected=yes"), ["query", "include_disconnected"]);
  });

  it.skipIf(!available)("GET /metrics: task counts, queue depth, agents, throughput, latency and uptime", async () => {
    const res = await get(s, "/metrics");
    expect(res.status).toBe(200);
    expect(res.body).toEqual({
      tasks: {
        pending: expect.any(Number),
        assigned: expect.any(Number),
        completed: expect.any(Number),
        failed: expect.any(Number),
        cancelled: expect.any(Number),
        total: expect.any(Number),
        retry_waiting: expect.any(Number),
      },
      queue_depth: { total: expect.any(Number), by_priority: expect.any(Object) },
      agents: { connected: expect.any(Number), idle: expect.any(Number), busy: expect.any(Number) },
      completed_per_minute: expect.any(Number),
      dispatch_latency_ms: { p50: expect.any(Number), p90: expect.any(Number), p99: expect.any(Number), samples: expect.any(Number) },
      uptime_seconds: expect.any(Number),
    });
    const t = res.body.tasks;
    expect(t.total).toBe(t.pending + t.assigned + t.completed + t.failed + t.cancelled);
    expect(res.body.queue_depth.total).toBe(Object.values(res.body.queue_depth.by_priority as Record<string, number>).reduce((a, b) => a + b, 0));
    // Pending work is either in the queue or waiting out a retry backoff. The
    // counts come from the database and the depth from the queue, so a task
    // handed back by the agent the previous test disconnected may sit between
    // the two for a moment: the books must balance once it has settled.
    await eventually(async () => {
      const m = (await get(s, "/metrics")).body;
      return m.queue_depth.total === m.tasks.pending - m.tasks.retry_waiting;
    }, 5000, "queue depth = pending - retry_waiting");
  });
});

describe.skipIf(!hasRedisServer && process.env.CI !== "true")("REST when the queue's Redis goes away (embedded DB, private Redis)", () => {
  let redis: PrivateRedis;
  let s: TestServer;

  beforeAll(async () => {
    redis = await PrivateRedis.start();
    s = await startServer("embedded", { redisUrl: redis.url });
  });
  afterAll(async () => {
    await s?.close();
    await redis?.stop();
  });

  it("503 unavailable on create with no row left, unhealthy /health, reads still work; recovers when Redis returns", async () => {
    const first = await postTask(s, { task_type: "code", description: "before the outage" });
    expect(first.status).toBe(201);
    const countBefore = (await s.persistence.tasks.countByStatus()) as Record<string, number>;

    await redis.stop();

    const refused = await postTask(s, { task_type: "code", description: "during the outage" }, { "x-correlation-id": "outage-1" });
    expectError(refused, 503, "unavailable");
    expect(typeof refused.body.detail).toBe("string");
    expect(refused.body.detail).not.toMatch(/ECONNREFUSED|127\.0\.0\.1|stack/i);
    expect(refused.headers.get("x-correlation-id")).toBe("outage-1");

    const health = await get(s, "/health");
    expect(health.status).toBe(503);
    expect(health.body).toMatchObject({ status: "unhealthy", components: { database: "ok" }, version: "test" });
    expect(health.body.components.queue).not.toBe("ok");
    expect(typeof health.body.components.queue).toBe("string");

    const list = await get(s, "/tasks");
    expect(list.status).toBe(200);
    expect(list.body.map((t: { task_id: string }) => t.task_id)).toEqual([first.body.task_id]);
    expect((await get(s, `/tasks/${first.body.task_id}`)).status).toBe(200);
    expect(await s.persistence.tasks.countByStatus()).toEqual(countBefore);

    // A few more refusals leave nothing behind either.
    for (let i = 0; i < 3; i++) expect((await postTask(s, { task_type: "qa", description: `refused ${i}` })).status).toBe(503);
    expect(await s.persistence.tasks.countByStatus()).toEqual(countBefore);

    await redis.restart();
    const again = await eventually(
      async () => {
        const res = await postTask(s, { task_type: "code", description: "after the outage" });
        return res.status === 201 ? res : undefined;
      },
      15_000,
      "create to succeed after Redis returns",
    );
    expect(again.body).toMatchObject({ status: "pending", message: "Task queued successfully" });
    await eventually(async () => (await get(s, "/health")).status === 200, 10_000, "healthy again");
    expect((await get(s, "/health")).body).toEqual({ status: "healthy", components: { database: "ok", queue: "ok" }, version: "test" });

    // The queue was rebuilt from the database: the task from before the outage
    // still runs, and first (same priority, created earlier), then the new one.
    const a = await WsAgent.connect(s.port, { capabilities: ["code"], autoComplete: () => ({}) });
    try {
      await a.waitFor((x) => x.assignments.length >= 2, 10_000, "both tasks assigned");
      expect(a.assignments.map((t) => t.taskId)).toEqual([first.body.task_id, again.body.task_id]);
    } finally {
      a.kill();
    }
  });

  it("a task queued before Redis lost its data is still dispatched after Redis returns (the queue is rebuilt from the database)", async () => {
    const before = await postTask(s, { task_type: "trading", description: "queued before the crash", priority: 9 });
    expect(before.status).toBe(201);
    await redis.stop();
    await redis.restart();
    await eventually(async () => (await get(s, "/health")).status === 200, 15_000, "healthy again");
    const a = await WsAgent.connect(s.port, { capabilities: ["trading"] });
    try {
      await a.waitFor((x) => x.assignments.some((t) => t.taskId === before.body.task_id), 10_000, "pre-outage task assigned");
    } finally {
      a.kill();
    }
  });
});
