/**
 * The legacy `/ws` agent protocol (DESIGN.md §4 and §5): JSON frames over the
 * same session state machine as gRPC `Session`. Real `ws` sockets against the
 * real server on port 0, on the embedded backend and on PostgreSQL + Redis.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { BACKENDS, eventually, startServer, type BackendName, type TestServer } from "../support/server.js";
import { GrpcAgent, WsAgent, grpcClient, unary, type TestAgent } from "../support/clients.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const MAX_MESSAGE_BYTES = 4096;

type Frame = Record<string, any>;

/** A bare `/ws` socket that records every frame verbatim, for field-exact checks. */
class RawWs {
  readonly frames: Frame[] = [];
  close: { code: number; reason: string } | undefined;

  private constructor(readonly socket: WebSocket) {
    socket.on("message", (data) => this.frames.push(JSON.parse(data.toString()) as Frame));
    socket.on("close", (code, reason) => (this.close = { code, reason: reason.toString() }));
    socket.on("error", () => {});
  }

  static async open(port: number, headers: Record<string, string> = {}): Promise<RawWs> {
    const socket = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers });
    await new Promise<void>((resolve, reject) => {
      socket.once("open", resolve);
      socket.once("error", reject);
    });
    return new RawWs(socket);
  }

  send(frame: object | string | Buffer): void {
    this.socket.send(typeof frame === "string" || Buffer.isBuffer(frame) ? frame : JSON.stringify(frame));
  }

  /** Waits until `count` frames have arrived in total; returns the last of them. */
  async frame(count: number, what = `frame #${count}`): Promise<Frame> {
    await eventually(() => this.frames.length >= count || this.close !== undefined, 5000, what);
    if (this.frames.length < count) throw new Error(`socket closed (${JSON.stringify(this.close)}) before ${what}; frames: ${JSON.stringify(this.frames)}`);
    return this.frames[count - 1]!;
  }

  /** Sends and returns the one frame the server answers with. */
  async roundTrip(frame: object | string | Buffer): Promise<Frame> {
    const n = this.frames.length;
    this.send(frame);
    return this.frame(n + 1, `answer to ${String(typeof frame === "object" && !Buffer.isBuffer(frame) ? JSON.stringify(frame) : frame).slice(0, 80)}`);
  }

  async register(fields: Record<string, unknown> = {}): Promise<Frame> {
    const ack = await this.roundTrip({ type: "register", agent_type: "raw", ...fields });
    expect(ack).toMatchObject({ type: "registration_ack" });
    return ack;
  }

  terminate(): void {
    this.socket.terminate();
  }
}

async function postTask(s: TestServer, body: Record<string, unknown>, headers: Record<string, string> = {}) {
  const res = await fetch(`${s.baseUrl}/tasks`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  const json = (await res.json()) as Record<string, any>;
  expect(res.status, JSON.stringify(json)).toBe(201);
  return json.task_id as string;
}

async function getTask(s: TestServer, id: string): Promise<Record<string, any>> {
  const res = await fetch(`${s.baseUrl}/tasks/${id}`);
  expect(res.status).toBe(200);
  return (await res.json()) as Record<string, any>;
}

describe.each(BACKENDS)("/ws protocol on $name", ({ name, available }) => {
  let s: TestServer;
  const sockets: RawWs[] = [];
  const agents: TestAgent[] = [];
  const raw = async (headers?: Record<string, string>) => {
    const r = await RawWs.open(s.port, headers);
    sockets.push(r);
    return r;
  };
  const track = <T extends TestAgent>(a: T) => (agents.push(a), a);

  beforeAll(async () => {
    if (available) s = await startServer(name, { env: { MAX_MESSAGE_BYTES: String(MAX_MESSAGE_BYTES) } });
  });
  afterEach(() => {
    for (const r of sockets.splice(0)) r.terminate();
    for (const a of agents.splice(0)) a.kill();
  });
  afterAll(async () => {
    await s?.close();
  });

  it.skipIf(!available)("register without agent_id: the server assigns a UUID; registration_ack has exactly agent_id and heartbeat_interval_ms", async () => {
    const r = await raw();
    const ack = await r.register({ agent_name: "anon" });
    expect(ack).toEqual({ type: "registration_ack", agent_id: expect.stringMatching(UUID), heartbeat_interval_ms: 10_000 });
    // A null agent_id is the same as none.
    const r2 = await raw();
    const ack2 = await r2.register({ agent_id: null });
    expect(ack2.agent_id).toMatch(UUID);
    expect(ack2.agent_id).not.toBe(ack.agent_id);
    const listed = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<Record<string, unknown>>;
    expect(listed.map((a) => a.agent_id)).toEqual(expect.arrayContaining([ack.agent_id, ack2.agent_id]));
  });

  it.skipIf(!available)("register with agent_id keeps it; agent_name/type/capabilities/max_concurrency are recorded", async () => {
    const id = `ws-agent-${name.replace(/\W/g, "")}-${Date.now()}`;
    const r = await raw();
    const ack = await r.register({ agent_id: id, agent_name: "named", agent_type: "worker", capabilities: ["qa", "code"], max_concurrency: 4 });
    expect(ack).toEqual({ type: "registration_ack", agent_id: id, heartbeat_interval_ms: 10_000 });
    const listed = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<Record<string, unknown>>;
    expect(listed.find((a) => a.agent_id === id)).toMatchObject({ agent_name: "named", agent_type: "worker", capabilities: ["qa", "code"], max_concurrency: 4, transport: "ws" });
  });

  it.skipIf(!available)("a message before register is refused with failed_precondition; the socket stays open and register then works", async () => {
    const r = await raw();
    const id = "00000000-0000-4000-8000-000000000000";
    expect(await r.roundTrip({ type: "heartbeat" })).toEqual({ type: "error", code: "failed_precondition", message: expect.any(String) });
    // A refused result names its task.
    for (const frame of [{ type: "task_complete", task_id: id, result: {} }, { type: "task_failed", task_id: id, error: "x" }]) {
      const answer = await r.roundTrip(frame);
      expect(answer).toEqual({ type: "error", code: "failed_precondition", message: expect.any(String), task_id: id });
    }
    expect(r.close).toBeUndefined();
    const ack = await r.register();
    expect(ack.agent_id).toMatch(UUID);
    expect(await r.roundTrip({ type: "heartbeat" })).toEqual({ type: "heartbeat_ack" });
  });

  it.skipIf(!available)("a second register is refused with failed_precondition and the first registration stands", async () => {
    const r = await raw();
    const ack = await r.register({ agent_id: "first-registration" });
    const again = await r.roundTrip({ type: "register", agent_id: "second-registration" });
    expect(again).toEqual({ type: "error", code: "failed_precondition", message: expect.stringMatching(/already registered/) });
    expect(await r.roundTrip({ type: "heartbeat" })).toEqual({ type: "heartbeat_ack" });
    const listed = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<Record<string, unknown>>;
    expect(listed.map((a) => a.agent_id)).toContain(ack.agent_id);
    expect(listed.map((a) => a.agent_id)).not.toContain("second-registration");
  });

  const malformed: Array<[string, object | string | Buffer]> = [
    ["not JSON", "{not json"],
    ["empty text", ""],
    ["JSON array", "[1,2,3]"],
    ["JSON null", "null"],
    ["JSON string", '"heartbeat"'],
    ["JSON number", "42"],
    ["missing type", { task_id: "x" }],
    ["non-string type", { type: 7 }],
    ["unknown type", { type: "take_over_the_world" }],
    ["server-side type", { type: "registration_ack", agent_id: "x" }],
    ["binary frame", Buffer.from(JSON.stringify({ type: "heartbeat" }))],
    ["task_complete without task_id", { type: "task_complete", result: {} }],
    ["task_complete with a non-UUID task_id", { type: "task_complete", task_id: "not-a-uuid", result: {} }],
    ["task_complete with a numeric task_id", { type: "task_complete", task_id: 123, result: {} }],
    ["task_complete with a string result", { type: "task_complete", task_id: "00000000-0000-4000-8000-000000000000", result: "done" }],
    ["task_complete with an array result", { type: "task_complete", task_id: "00000000-0000-4000-8000-000000000000", result: [1, 2] }],
    ["task_complete with a negative attempt", { type: "task_complete", task_id: "00000000-0000-4000-8000-000000000000", result: {}, attempt: -1 }],
    ["task_failed without task_id", { type: "task_failed", error: "boom" }],
    ["task_failed with a non-string error", { type: "task_failed", task_id: "00000000-0000-4000-8000-000000000000", error: { nested: true } }],
    ["task_failed with a non-boolean retryable", { type: "task_failed", task_id: "00000000-0000-4000-8000-000000000000", error: "x", retryable: "yes" }],
  ];

  it.skipIf(!available)("every malformed frame gets exactly one invalid_argument error and the registered socket stays usable", async () => {
    const r = await raw();
    await r.register();
    for (const [what, frame] of malformed) {
      const answer = await r.roundTrip(frame);
      expect(answer, what).toEqual({ type: "error", code: "invalid_argument", message: expect.any(String) });
      expect(answer.message.length, what).toBeGreaterThan(0);
      // Exactly one error: the heartbeat's ack is the very next frame.
      expect(await r.roundTrip({ type: "heartbeat" }), what).toEqual({ type: "heartbeat_ack" });
      expect(r.close, what).toBeUndefined();
    }
  });

  it.skipIf(!available)("malformed registers are invalid_argument and leave the socket able to register properly", async () => {
    const r = await raw();
    const bad: Array<[string, object]> = [
      ["capabilities with an unknown type", { type: "register", capabilities: ["code", "cooking"] }],
      ["upper-case capability", { type: "register", capabilities: ["CODE"] }],
      ["capabilities not a list", { type: "register", capabilities: "code" }],
      ["negative max_concurrency", { type: "register", max_concurrency: -1 }],
      ["fractional max_concurrency", { type: "register", max_concurrency: 1.5 }],
      ["huge max_concurrency", { type: "register", max_concurrency: 1_000_000 }],
      ["agent_id with spaces", { type: "register", agent_id: "a b" }],
      ["agent_id too long", { type: "register", agent_id: "a".repeat(200) }],
      ["agent_id not a string", { type: "register", agent_id: 5 }],
    ];
    for (const [what, frame] of bad) {
      expect(await r.roundTrip(frame), what).toEqual({ type: "error", code: "invalid_argument", message: expect.any(String) });
    }
    expect(r.close).toBeUndefined();
    const ack = await r.register({ capabilities: ["code"] });
    expect(ack.agent_id).toMatch(UUID);
  });

  it.skipIf(!available)("a frame over MAX_MESSAGE_BYTES closes the socket with 1009; the server keeps serving", async () => {
    const r = await raw();
    await r.register();
    r.send({ type: "heartbeat", padding: "x".repeat(MAX_MESSAGE_BYTES + 10) });
    await eventually(() => r.close, 5000, "socket close");
    expect(r.close!.code).toBe(1009);
    const health = await fetch(`${s.baseUrl}/health`);
    expect(health.status).toBe(200);
    const other = await raw();
    await other.register();
    expect(await other.roundTrip({ type: "heartbeat" })).toEqual({ type: "heartbeat_ack" });
  });

  it.skipIf(!available)("task_assignment carries exactly task_id, task_type, description, priority, metadata, attempt and correlation_id", async () => {
    const r = await raw();
    await r.register({ capabilities: ["synthesis"] });
    const cid = `ws-assign-${Date.now()}`;
    const id = await postTask(s, { task_type: "synthesis", description: "assemble it", priority: 9, metadata: { k: [1, { v: "w" }] } }, { "x-correlation-id": cid });
    const assignment = await r.frame(2, "task_assignment");
    expect(assignment).toEqual({
      type: "task_assignment",
      task_id: id,
      task_type: "synthesis",
      description: "assemble it",
      priority: 9,
      metadata: { k: [1, { v: "w" }] },
      attempt: 1,
      correlation_id: cid,
    });
    expect(await getTask(s, id)).toMatchObject({ status: "assigned", attempt: 1 });
    expect(await r.roundTrip({ type: "task_complete", task_id: id, result: { out: "ok" } })).toEqual({ type: "completion_ack", task_id: id });
    expect(await getTask(s, id)).toMatchObject({ status: "completed", result: { out: "ok" }, error: null, attempt: 1 });
  });

  it.skipIf(!available)("a completion from an agent that does not hold the task is refused; the task is unchanged", async () => {
    const holder = await raw();
    const holderAck = await holder.register({ capabilities: ["documentation"] });
    const other = await raw();
    await other.register({ capabilities: ["trading"] });
    const id = await postTask(s, { task_type: "documentation", description: "not yours" });
    await holder.frame(2, "assignment");
    const before = await getTask(s, id);
    expect(before).toMatchObject({ status: "assigned", agent_id: holderAck.agent_id });

    const refused = await other.roundTrip({ type: "task_complete", task_id: id, result: { stolen: true } });
    expect(refused).toEqual({ type: "error", code: "failed_precondition", message: expect.any(String), task_id: id });
    const refusedFail = await other.roundTrip({ type: "task_failed", task_id: id, error: "sabotage" });
    expect(refusedFail).toEqual({ type: "error", code: "failed_precondition", message: expect.any(String), task_id: id });
    // A task that does not exist at all.
    const ghost = "00000000-0000-4000-8000-00000000dead";
    expect(await other.roundTrip({ type: "task_complete", task_id: ghost, result: {} })).toEqual({ type: "error", code: "failed_precondition", message: expect.any(String), task_id: ghost });
    expect(await getTask(s, id)).toEqual(before);
    expect(other.close).toBeUndefined();

    // The holder still completes it.
    expect(await holder.roundTrip({ type: "task_complete", task_id: id, result: { mine: true } })).toEqual({ type: "completion_ack", task_id: id });
    // ...after which the other agent's late completion is still refused and changes nothing.
    const late = await other.roundTrip({ type: "task_complete", task_id: id, result: { stolen: true } });
    expect(late).toMatchObject({ type: "error", code: "failed_precondition", task_id: id });
    expect(await getTask(s, id)).toMatchObject({ status: "completed", result: { mine: true }, agent_id: holderAck.agent_id });
  });

  it.skipIf(!available)("a repeated completion by the holder is acknowledged again and the result is unchanged", async () => {
    const r = await raw();
    await r.register({ capabilities: ["research"] });
    const id = await postTask(s, { task_type: "research", description: "twice" });
    await r.frame(2, "assignment");
    expect(await r.roundTrip({ type: "task_complete", task_id: id, result: { n: 1 } })).toEqual({ type: "completion_ack", task_id: id });
    const first = await getTask(s, id);
    expect(await r.roundTrip({ type: "task_complete", task_id: id, result: { n: 2 } })).toEqual({ type: "completion_ack", task_id: id });
    expect(await r.roundTrip({ type: "task_complete", task_id: id, result: { n: 3 }, attempt: 1 })).toEqual({ type: "completion_ack", task_id: id });
    expect(await getTask(s, id)).toEqual(first);
    expect(first).toMatchObject({ status: "completed", result: { n: 1 } });
    // A failure report after the completion cannot turn it into a failure.
    const after = await r.roundTrip({ type: "task_failed", task_id: id, error: "changed my mind" });
    expect(after).toMatchObject({ type: "error", code: "failed_precondition", task_id: id });
    expect(await getTask(s, id)).toEqual(first);
  });

  it.skipIf(!available)("a task id in upper case names the same task (UUIDs ignore case)", async () => {
    const r = await raw();
    await r.register({ capabilities: ["qa"] });
    const id = await postTask(s, { task_type: "qa", description: "shouted back" });
    await r.frame(2, "assignment");
    expect(await r.roundTrip({ type: "task_complete", task_id: id.toUpperCase(), result: { ok: true } })).toEqual({ type: "completion_ack", task_id: id });
    expect(await getTask(s, id)).toMatchObject({ status: "completed", result: { ok: true } });
    expect((await (await fetch(`${s.baseUrl}/tasks/${id.toUpperCase()}`)).json()) as object).toMatchObject({ task_id: id, status: "completed" });
  });

  it.skipIf(!available)("task_failed records the failure with the error text", async () => {
    const r = await raw();
    await r.register({ capabilities: ["analysis"] });
    const id = await postTask(s, { task_type: "analysis", description: "will fail" });
    await r.frame(2, "assignment");
    expect(await r.roundTrip({ type: "task_failed", task_id: id, error: "division by zero", retryable: false })).toEqual({ type: "completion_ack", task_id: id });
    expect(await getTask(s, id)).toMatchObject({ status: "failed", error: "division by zero", result: null, attempt: 1 });
    // Repeating the same failure is acknowledged again.
    expect(await r.roundTrip({ type: "task_failed", task_id: id, error: "division by zero" })).toEqual({ type: "completion_ack", task_id: id });
    // The agent is free for the next task (whose assignment may arrive before the create's answer).
    const seen = r.frames.length;
    const next = await postTask(s, { task_type: "analysis", description: "next one" });
    expect(await r.frame(seen + 1, "next assignment")).toMatchObject({ type: "task_assignment", task_id: next });
    r.send({ type: "task_complete", task_id: next, result: {} });
  });

  it.skipIf(!available)("capabilities are honoured: a task only reaches an agent that declared its type", async () => {
    const qa = track(await WsAgent.connect(s.port, { capabilities: ["qa"] }));
    const qaId = await postTask(s, { task_type: "qa", description: "for qa", priority: 1 });
    const tradingId = await postTask(s, { task_type: "trading", description: "for trading", priority: 10 });
    await qa.waitFor((a) => a.assignments.length >= 1, 5000, "qa assignment");
    // A trading agent arrives and takes the higher-priority trading task; qa never sees it.
    const trading = track(await WsAgent.connect(s.port, { capabilities: ["trading"] }));
    await trading.waitFor((a) => a.assignments.length >= 1, 5000, "trading assignment");
    expect(qa.assignments.map((a) => a.taskId)).toEqual([qaId]);
    expect(trading.assignments.map((a) => a.taskId)).toEqual([tradingId]);
    qa.complete(qaId, {});
    trading.complete(tradingId, {});
    await qa.waitForFrame("completion_ack");
    await trading.waitForFrame("completion_ack");
    expect(qa.assignments).toHaveLength(1);
    expect(trading.assignments).toHaveLength(1);
  });

  it.skipIf(!available)("max_concurrency is honoured: an agent with 2 never holds more than 2 tasks", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 7; i++) ids.push(await postTask(s, { task_type: "documentation", description: `mc ${i}`, priority: 3 }));
    let completionsSent = 0;
    let maxHeld = 0;
    const a = track(await WsAgent.connect(s.port, { capabilities: ["documentation"], maxConcurrency: 2 }));
    const check = () => {
      maxHeld = Math.max(maxHeld, a.assignments.length - completionsSent);
      expect(a.assignments.length - completionsSent).toBeLessThanOrEqual(2);
    };
    while (completionsSent < ids.length) {
      const want = Math.min(completionsSent + 2, ids.length);
      await a.waitFor((x) => x.assignments.length >= want, 5000, `${want} assignments`);
      check();
      if (a.assignments.length - completionsSent === 2) {
        // While it holds two, the database agrees and nothing more is pushed.
        const agents = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<Record<string, unknown>>;
        expect(agents.find((x) => x.agent_id === a.agentId)).toMatchObject({ active_tasks: 2 });
      }
      const t = a.assignments[completionsSent]!;
      a.complete(t.taskId, { i: completionsSent });
      completionsSent++;
      await a.waitForFrame("completion_ack", completionsSent);
      check();
    }
    expect(maxHeld).toBe(2);
    expect(new Set(a.assignments.map((x) => x.taskId))).toEqual(new Set(ids));
    expect(a.assignments).toHaveLength(ids.length);
  });

  it.skipIf(!available)("a gRPC agent and a WS agent work side by side on tasks created over REST and gRPC", async () => {
    const wsAgent = track(await WsAgent.connect(s.port, { capabilities: ["code"], autoComplete: (t) => ({ by: "ws", id: t.taskId }) }));
    const grpcAgent = track(await GrpcAgent.connect(s.port, { capabilities: ["research"], autoComplete: (t) => ({ by: "grpc", id: t.taskId }) }));
    const tc = grpcClient("TaskService", s.port);
    try {
      const created: Array<{ id: string; type: string }> = [];
      for (let i = 0; i < 3; i++) {
        created.push({ id: await postTask(s, { task_type: "code", description: `rest code ${i}` }), type: "code" });
        created.push({ id: await postTask(s, { task_type: "research", description: `rest research ${i}` }), type: "research" });
        const g1 = await unary(tc, "CreateTask", { task_type: "TASK_TYPE_CODE", description: `grpc code ${i}` });
        created.push({ id: g1.task.task_id, type: "code" });
        const g2 = await unary(tc, "CreateTask", { task_type: "TASK_TYPE_RESEARCH", description: `grpc research ${i}` });
        created.push({ id: g2.task.task_id, type: "research" });
      }
      await wsAgent.waitForFrame("completion_ack", 6);
      await grpcAgent.waitForFrame("completion_ack", 6);
      for (const c of created) {
        const t = await getTask(s, c.id);
        const by = c.type === "code" ? "ws" : "grpc";
        expect(t).toMatchObject({ status: "completed", agent_id: by === "ws" ? wsAgent.agentId : grpcAgent.agentId, result: { by, id: c.id } });
      }
      // gRPC sees the result the WS agent recorded.
      const viaGrpc = await unary(tc, "GetTask", { task_id: created[0]!.id });
      expect(viaGrpc.task.status).toBe("TASK_STATUS_COMPLETED");
    } finally {
      tc.close();
    }
  });

  it.skipIf(!available)("an agent that disconnects gives its task back; another agent gets it as attempt 2", async () => {
    const first = await raw();
    await first.register({ capabilities: ["code"] });
    const id = await postTask(s, { task_type: "code", description: "dropped", priority: 6 });
    expect(await first.frame(2)).toMatchObject({ type: "task_assignment", task_id: id, attempt: 1 });
    first.terminate();
    await eventually(async () => (await getTask(s, id)).status === "pending", 5000, "task pending again");
    expect(await getTask(s, id)).toMatchObject({ priority: 6, attempt: 1 });
    const second = await raw();
    await second.register({ capabilities: ["code"] });
    expect(await second.frame(2)).toMatchObject({ type: "task_assignment", task_id: id, attempt: 2, priority: 6 });
    expect(await second.roundTrip({ type: "task_complete", task_id: id, result: {} })).toEqual({ type: "completion_ack", task_id: id });
  });
});

describe.each(BACKENDS)("/ws heartbeats on $name", ({ name, available }) => {
  let s: TestServer;
  const agents: TestAgent[] = [];
  const timers: NodeJS.Timeout[] = [];

  beforeAll(async () => {
    if (available) s = await startServer(name as BackendName, { env: { HEARTBEAT_INTERVAL_MS: "100", HEARTBEAT_TIMEOUT_MS: "400" } });
  });
  afterAll(async () => {
    for (const t of timers) clearInterval(t);
    for (const a of agents) a.kill();
    await s?.close();
  });

  const keepAlive = (a: TestAgent) => timers.push(setInterval(() => a.heartbeat(), 100));

  it.skipIf(!available)("a silent agent holding a task gets deadline_exceeded and is closed; the task goes back at its priority and reaches another agent as attempt 2", async () => {
    const silent = await WsAgent.connect(s.port, { capabilities: ["qa"] });
    agents.push(silent);
    expect(silent.frames[0]).toMatchObject({ type: "registration_ack" });
    const id = await postTask(s, { task_type: "qa", description: "held then dropped", priority: 8, metadata: { keep: true } });
    await silent.waitForFrame("task_assignment");
    expect(silent.assignments[0]).toMatchObject({ taskId: id, attempt: 1, priority: 8 });

    await silent.waitFor((a) => a.closed, 5000, "silent agent closed");
    expect(silent.frames.find((f) => f.type === "error")).toMatchObject({ type: "error", code: "deadline_exceeded" });
    await eventually(async () => (await getTask(s, id)).status === "pending", 5000, "task pending again");
    expect(await getTask(s, id)).toMatchObject({ status: "pending", priority: 8, metadata: { keep: true }, attempt: 1, result: null });
    const agentsNow = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<Record<string, unknown>>;
    expect(agentsNow.map((a) => a.agent_id)).not.toContain(silent.agentId);

    const next = await WsAgent.connect(s.port, { capabilities: ["qa"] });
    agents.push(next);
    keepAlive(next);
    await next.waitForFrame("task_assignment");
    expect(next.assignments[0]).toMatchObject({ taskId: id, attempt: 2, priority: 8, metadata: { keep: true } });
    next.complete(id, { second: true });
    await next.waitForFrame("completion_ack");
    expect(await getTask(s, id)).toMatchObject({ status: "completed", attempt: 2, agent_id: next.agentId, result: { second: true } });
  });

  it.skipIf(!available)("an agent that never registers is timed out too", async () => {
    const idle = await WsAgent.connect(s.port, {}, { register: false });
    agents.push(idle);
    await idle.waitFor((a) => a.closed, 5000, "unregistered socket closed");
    expect(idle.frames).toEqual([expect.objectContaining({ type: "error", code: "deadline_exceeded" })]);
  });

  it.skipIf(!available)("an agent that keeps heartbeating stays connected well past the timeout", async () => {
    const a = await WsAgent.connect(s.port, { capabilities: ["trading"] });
    agents.push(a);
    expect(a.frames[0]).toMatchObject({ type: "registration_ack", agentId: expect.any(String) });
    keepAlive(a);
    // 15 acks at 100 ms each span more than three timeouts (400 ms).
    const started = Date.now();
    await a.waitForFrame("heartbeat_ack", 15);
    expect(Date.now() - started).toBeGreaterThan(3 * 400);
    expect(a.closed).toBe(false);
    expect(a.frames.filter((f) => f.type === "error")).toEqual([]);
    // And it still gets work.
    const id = await postTask(s, { task_type: "trading", description: "still alive" });
    await a.waitForFrame("task_assignment");
    expect(a.assignments[0]!.taskId).toBe(id);
  });
});
