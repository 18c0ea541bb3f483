/**
 * The protobuf API as real clients see it: grpc-js loaded from the .proto
 * files, the generated Connect clients over Connect (HTTP/1.1 and HTTP/2) and
 * gRPC-Web, raw fetch and raw node:http2. Real server on port 0.
 */
import http2 from "node:http2";
import path from "node:path";
import { randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { GetTaskRequestSchema, GetTaskResponseSchema, TaskService } from "../../gen/aaos/v1/task_service_pb.js";
import { AgentService } from "../../gen/aaos/v1/agent_service_pb.js";
import { TaskStatus, TaskType } from "../../gen/aaos/v1/task_pb.js";
import { BACKENDS, byHand, eventually, startServer, type TestServer } from "../support/server.js";
import { GrpcAgent, fromStruct, grpcClient, toStruct, unary, type TestAgent } from "../support/clients.js";
import { frame, rawRequest } from "../support/raw-http2.js";

const PROTO_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");

/** The promise of a grpc-js call that must fail, resolved to its error. */
async function grpcError(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (e: unknown) {
    return e as grpc.ServiceError;
  }
  throw new Error("expected the call to fail");
}

async function connectError(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (e: unknown) {
    return ConnectError.from(e);
  }
  throw new Error("expected the call to fail");
}

/** A raw grpc-js Session stream that records every response, for protocol-level checks. */
function rawSession(port: number) {
  const client = grpcClient("AgentService", port);
  const call = (client as unknown as { Session(): grpc.ClientDuplexStream<any, any> }).Session();
  const frames: any[] = [];
  let ended = false;
  call.on("data", (m: any) => frames.push({ kind: m.kind, ...m[m.kind] }));
  call.on("error", () => (ended = true));
  call.on("end", () => (ended = true));
  return {
    call,
    frames,
    get ended() {
      return ended;
    },
    waitFor: (n: number, what = `${n} frames`) => eventually(() => frames.length >= n, 5000, what),
    close() {
      call.cancel();
      client.close();
    },
  };
}

describe.each(BACKENDS)("TaskService and AgentService over grpc-js on $name", ({ name, available }) => {
  let s: TestServer;
  let tasks: grpc.Client;
  let agentsClient: grpc.Client;
  let metrics: grpc.Client;
  const agents: TestAgent[] = [];
  const track = <T extends TestAgent>(a: T) => (agents.push(a), a);

  beforeAll(async () => {
    if (!available) return;
    s = await startServer(name);
    tasks = grpcClient("TaskService", s.port);
    agentsClient = grpcClient("AgentService", s.port);
    metrics = grpcClient("MetricsService", s.port);
  });
  afterAll(async () => {
    for (const a of agents) a.kill();
    tasks?.close();
    agentsClient?.close();
    metrics?.close();
    await s?.close();
  });

  const create = (req: Record<string, unknown>) => unary(tasks, "CreateTask", { task_type: "TASK_TYPE_QA", description: "a grpc task", ...req }).then((r) => r.task);
  const queueDepth = async () => (await unary(metrics, "GetMetrics", {})).queue_depth.total as number;

  it.skipIf(!available)("CreateTask: absent priority is 5, an explicit 0 stays 0; GetTask returns the same task", async () => {
    const dflt = await create({ metadata: toStruct({ k: "v", n: 2 }) });
    expect(dflt).toMatchObject({ task_type: "TASK_TYPE_QA", status: "TASK_STATUS_PENDING", priority: 5, attempt: 0, description: "a grpc task" });
    expect(dflt.task_id).toMatch(/^[0-9a-f-]{36}$/);
    expect(fromStruct(dflt.metadata)).toEqual({ k: "v", n: 2 });
    const zero = await create({ priority: 0 });
    expect(zero.priority).toBe(0);
    const got = (await unary(tasks, "GetTask", { task_id: zero.task_id })).task;
    expect(got).toMatchObject({ task_id: zero.task_id, priority: 0, status: "TASK_STATUS_PENDING" });
    for (const t of [dflt, zero]) await unary(tasks, "CancelTask", { task_id: t.task_id });
  });

  it.skipIf(!available)("GetTask: unknown or malformed id is NOT_FOUND", async () => {
    for (const id of ["00000000-0000-4000-8000-000000000000", "nope"]) {
      const e = await grpcError(unary(tasks, "GetTask", { task_id: id }));
      expect(e.code).toBe(grpc.status.NOT_FOUND);
      expect(e.details).toContain("not found");
    }
  });

  it.skipIf(!available)("ListTasks: pages of 2 chain newest first, the last page has no token; filters apply", async () => {
    const made: string[] = [];
    for (let i = 0; i < 5; i++) made.push((await create({ task_type: "TASK_TYPE_TRADING", description: `page ${i}`, priority: i })).task_id);
    const seen: string[] = [];
    let token = "";
    let pages = 0;
    do {
      const page = await unary(tasks, "ListTasks", { page_size: 2, page_token: token, task_type: "TASK_TYPE_TRADING" });
      pages++;
      expect(page.tasks.length).toBeLessThanOrEqual(2);
      seen.push(...page.tasks.map((t: any) => t.task_id));
      token = page.next_page_token;
    } while (token && pages < 10);
    expect(pages).toBe(3);
    expect(token).toBe("");
    expect(seen).toEqual([...made].reverse());

    // Garbage, and well-formed tokens whose time no task could have been created at.
    const zeroId = "00000000-0000-0000-0000-000000000000";
    const tokenAt = (ms: string) => Buffer.from(`${ms}:${zeroId}`).toString("base64url");
    for (const pageToken of ["garbage!!", ...["9007199254740991", "8640000000000001", "8640000000000000", "253402300800000", "-1", "1.5"].map(tokenAt)]) {
      const bad = await grpcError(unary(tasks, "ListTasks", { page_size: 2, page_token: pageToken }));
      expect(bad.code, pageToken).toBe(grpc.status.INVALID_ARGUMENT);
      expect(bad.details).toContain("page_token");
    }
    // The last moment of the year 9999 is a token's latest: the page before it is every task.
    const farthest = await unary(tasks, "ListTasks", { page_size: 1000, page_token: tokenAt(String(Date.UTC(9999, 11, 31, 23, 59, 59, 999))), task_type: "TASK_TYPE_TRADING" });
    expect(farthest.tasks.map((t: any) => t.task_id)).toEqual([...made].reverse());

    await unary(tasks, "CancelTask", { task_id: made[0] });
    const cancelled = await unary(tasks, "ListTasks", { status: "TASK_STATUS_CANCELLED", task_type: "TASK_TYPE_TRADING" });
    expect(cancelled.tasks.map((t: any) => t.task_id)).toEqual([made[0]]);
    const pending = await unary(tasks, "ListTasks", { status: "TASK_STATUS_PENDING", task_type: "TASK_TYPE_TRADING" });
    expect(pending.tasks.map((t: any) => t.task_id)).toEqual(made.slice(1).reverse());
    const none = await unary(tasks, "ListTasks", { task_type: "TASK_TYPE_SYNTHESIS" });
    expect(none.tasks).toEqual([]);
    for (const id of made.slice(1)) await unary(tasks, "CancelTask", { task_id: id });
  });

  it.skipIf(!available)("CancelTask on a pending task removes it from the queue; on a finished task is FAILED_PRECONDITION", async () => {
    const before = await queueDepth();
    const t = await create({ task_type: "TASK_TYPE_RESEARCH" });
    expect(await queueDepth()).toBe(before + 1);
    const cancelled = (await unary(tasks, "CancelTask", { task_id: t.task_id })).task;
    expect(cancelled.status).toBe("TASK_STATUS_CANCELLED");
    expect(await queueDepth()).toBe(before);
    const again = await grpcError(unary(tasks, "CancelTask", { task_id: t.task_id }));
    expect(again.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(again.details).toContain("cancelled");
    const missing = await grpcError(unary(tasks, "CancelTask", { task_id: "00000000-0000-4000-8000-000000000000" }));
    expect(missing.code).toBe(grpc.status.NOT_FOUND);
  });

  it.skipIf(!available)("CancelTask on an assigned task: the agent is told, gets the next task in the freed slot, a late result is refused", async () => {
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["documentation"], maxConcurrency: 1 }));
    const first = await create({ task_type: "TASK_TYPE_DOCUMENTATION", description: "held then cancelled" });
    await a.waitForFrame("task_assignment");
    const second = await create({ task_type: "TASK_TYPE_DOCUMENTATION", description: "waits for the slot" });
    expect((await unary(tasks, "GetTask", { task_id: second.task_id })).task.status).toBe("TASK_STATUS_PENDING");
    const cancelled = (await unary(tasks, "CancelTask", { task_id: first.task_id })).task;
    expect(cancelled.status).toBe("TASK_STATUS_CANCELLED");
    await a.waitForFrame("task_assignment", 2);
    const types = a.frames.map((f) => f.type);
    expect(types).toEqual(["registration_ack", "task_assignment", "task_cancelled", "task_assignment"]);
    expect(a.frames[2]).toMatchObject({ taskId: first.task_id });
    expect(a.assignments[1]!.taskId).toBe(second.task_id);
    a.complete(first.task_id, { late: true });
    await a.waitForFrame("error");
    expect(a.frames.at(-1)).toMatchObject({ type: "error", code: "failed_precondition", taskId: first.task_id });
    expect((await unary(tasks, "GetTask", { task_id: first.task_id })).task.status).toBe("TASK_STATUS_CANCELLED");
    a.complete(second.task_id, { ok: true });
    await a.waitForFrame("completion_ack");
    const done = await grpcError(unary(tasks, "CancelTask", { task_id: second.task_id }));
    expect(done.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(done.details).toContain("completed");
    await a.end();
  });

  it.skipIf(!available)("WatchTask: current state at once, then ASSIGNED, then COMPLETED, then the stream ends", async () => {
    const t = await create({ task_type: "TASK_TYPE_ANALYSIS", description: "watch me" });
    const call = (tasks as unknown as { WatchTask(r: object): grpc.ClientReadableStream<any> }).WatchTask({ task_id: t.task_id });
    const seen: any[] = [];
    let ended = false;
    let failed: unknown;
    call.on("data", (m: any) => seen.push(m.task));
    call.on("end", () => (ended = true));
    call.on("error", (e) => (failed = e));
    await eventually(() => seen.length >= 1, 5000, "initial state");
    expect(seen[0]).toMatchObject({ task_id: t.task_id, status: "TASK_STATUS_PENDING" });
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["analysis"] }));
    await a.waitForFrame("task_assignment");
    await eventually(() => seen.length >= 2, 5000, "assigned");
    expect(seen[1]).toMatchObject({ status: "TASK_STATUS_ASSIGNED", agent_id: a.agentId, attempt: 1 });
    a.complete(t.task_id, { watched: true });
    await eventually(() => ended, 5000, "stream end");
    expect(failed).toBeUndefined();
    expect(seen.map((x) => x.status)).toEqual(["TASK_STATUS_PENDING", "TASK_STATUS_ASSIGNED", "TASK_STATUS_COMPLETED"]);
    expect(fromStruct(seen[2].result)).toEqual({ watched: true });
    // Watching a finished task gives its state and ends at once.
    const again: any[] = [];
    const call2 = (tasks as unknown as { WatchTask(r: object): grpc.ClientReadableStream<any> }).WatchTask({ task_id: t.task_id });
    let ended2 = false;
    call2.on("data", (m: any) => again.push(m.task));
    call2.on("end", () => (ended2 = true));
    await eventually(() => ended2, 5000, "second stream end");
    expect(again.map((x) => x.status)).toEqual(["TASK_STATUS_COMPLETED"]);
    await a.end();
  });

  it.skipIf(!available)("ListAgents shows a live agent with its capabilities and load", async () => {
    const a = track(await GrpcAgent.connect(s.port, { capabilities: ["code", "qa"], maxConcurrency: 3 }));
    const list = await unary(agentsClient, "ListAgents", {});
    const me = list.agents.find((x: any) => x.agent_id === a.agentId);
    expect(me).toMatchObject({ capabilities: ["TASK_TYPE_CODE", "TASK_TYPE_QA"], max_concurrency: 3, status: "AGENT_STATUS_IDLE", active_tasks: 0, transport: "grpc" });
    await a.end();
    await eventually(async () => !(await unary(agentsClient, "ListAgents", {})).agents.some((x: any) => x.agent_id === a.agentId), 5000, "agent gone");
    const all = await unary(agentsClient, "ListAgents", { include_disconnected: true });
    expect(all.agents.find((x: any) => x.agent_id === a.agentId)).toMatchObject({ status: "AGENT_STATUS_DISCONNECTED" });
  });
});

describe("the same API over Connect, gRPC-Web and raw HTTP (embedded)", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startServer("embedded");
  });
  afterAll(async () => {
    await s?.close();
  });

  const transports: Array<[string, () => Transport]> = [
    ["Connect JSON over HTTP/1.1", () => createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "1.1" })],
    ["Connect binary over HTTP/1.1", () => createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "1.1", useBinaryFormat: true })],
    ["Connect over HTTP/2", () => createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "2" })],
    ["gRPC-Web over HTTP/1.1", () => createGrpcWebTransport({ baseUrl: s.baseUrl, httpVersion: "1.1" })],
    ["gRPC-Web over HTTP/2", () => createGrpcWebTransport({ baseUrl: s.baseUrl, httpVersion: "2" })],
  ];

  it("a media type no RPC protocol uses is refused in the service's error shape, with the correlation ID", async () => {
    const res = await fetch(`${s.baseUrl}/aaos.v1.TaskService/GetTask`, { method: "POST", headers: { "content-type": "application/xml", "x-correlation-id": "xml-1" }, body: "<a/>" });
    expect(res.status).toBe(415);
    expect(res.headers.get("x-correlation-id")).toBe("xml-1");
    expect(await res.json()).toEqual({ detail: expect.any(String), code: "invalid_argument" });
  });

  it("a Connect GET is answered from its query; one whose message is not base64 is INVALID_ARGUMENT, not a 500", async () => {
    const tc = createClient(TaskService, createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "1.1" }));
    const { task } = await tc.createTask({ taskType: TaskType.QA, description: "read me by GET" });
    const message = Buffer.from(toBinary(GetTaskRequestSchema, create(GetTaskRequestSchema, { taskId: task!.taskId }))).toString("base64url");
    const ok = await fetch(`${s.baseUrl}/aaos.v1.TaskService/GetTask?connect=v1&encoding=proto&base64=1&message=${message}`);
    expect(ok.status).toBe(200);
    expect(fromBinary(GetTaskResponseSchema, new Uint8Array(await ok.arrayBuffer())).task?.taskId).toBe(task!.taskId);
    for (const garbage of ["!!!", "a%20b", "%00"]) {
      const bad = await fetch(`${s.baseUrl}/aaos.v1.TaskService/GetTask?connect=v1&encoding=proto&base64=1&message=${garbage}`);
      expect(bad.status, garbage).toBe(400);
      expect(await bad.json()).toMatchObject({ code: "invalid_argument" });
    }
  });

  it.each(transports)("%s: create, get, list, watch, cancel and errors", async (_label, make) => {
    const transport = make();
    const tc = createClient(TaskService, transport);
    const ac = createClient(AgentService, transport);
    const created = (await tc.createTask({ taskType: TaskType.CODE, description: "connect task", priority: 0, metadata: { a: [1, "x"] } })).task!;
    expect(created).toMatchObject({ taskType: TaskType.CODE, priority: 0, status: TaskStatus.PENDING, metadata: { a: [1, "x"] } });
    const dflt = (await tc.createTask({ taskType: TaskType.CODE, description: "default priority" })).task!;
    expect(dflt.priority).toBe(5);
    expect((await tc.getTask({ taskId: created.taskId })).task!.taskId).toBe(created.taskId);
    const page = await tc.listTasks({ pageSize: 1, taskType: TaskType.CODE });
    expect(page.tasks.map((t) => t.taskId)).toEqual([dflt.taskId]);
    expect(page.nextPageToken).not.toBe("");
    const page2 = await tc.listTasks({ pageSize: 1, taskType: TaskType.CODE, pageToken: page.nextPageToken });
    expect(page2.tasks.map((t) => t.taskId)).not.toContain(dflt.taskId);

    // A server stream: current state, then the cancellation, then the end.
    const watched: TaskStatus[] = [];
    const watching = (async () => {
      for await (const m of tc.watchTask({ taskId: created.taskId })) {
        watched.push(m.task!.status);
        if (watched.length === 1) await tc.cancelTask({ taskId: created.taskId });
      }
    })();
    await watching;
    expect(watched).toEqual([TaskStatus.PENDING, TaskStatus.CANCELLED]);
    await tc.cancelTask({ taskId: dflt.taskId });

    expect((await connectError(tc.getTask({ taskId: "00000000-0000-4000-8000-000000000000" }))).code).toBe(Code.NotFound);
    const again = await connectError(tc.cancelTask({ taskId: created.taskId }));
    expect(again.code).toBe(Code.FailedPrecondition);
    const invalid = await connectError(tc.createTask({ taskType: TaskType.CODE, description: "x", priority: 11 }));
    expect(invalid.code).toBe(Code.InvalidArgument);
    expect(invalid.rawMessage).toContain("description");
    expect(invalid.rawMessage).toContain("priority");
    expect(Array.isArray((await ac.listAgents({})).agents)).toBe(true);
  });

  it("raw fetch: a Connect JSON POST works and echoes the correlation ID", async () => {
    const res = await fetch(`${s.baseUrl}/aaos.v1.TaskService/CreateTask`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-correlation-id": "raw-fetch-corr-1" },
      body: JSON.stringify({ taskType: "TASK_TYPE_QA", description: "from fetch", priority: 0 }),
    });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-correlation-id")).toBe("raw-fetch-corr-1");
    const body = (await res.json()) as { task: Record<string, unknown> };
    expect(body.task).toMatchObject({ taskType: "TASK_TYPE_QA", description: "from fetch", status: "TASK_STATUS_PENDING", correlationId: "raw-fetch-corr-1" });
    // proto3 JSON leaves out zero values, so priority 0 is simply absent here.
    expect(body.task.priority ?? 0).toBe(0);
    const bad = await fetch(`${s.baseUrl}/aaos.v1.TaskService/CreateTask`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ taskType: "TASK_TYPE_QA", description: "no" }),
    });
    expect(bad.status).toBe(400);
    expect(await bad.json()).toMatchObject({ code: "invalid_argument", message: expect.stringContaining("description") });
    const notJson = await fetch(`${s.baseUrl}/aaos.v1.TaskService/CreateTask`, { method: "POST", headers: { "content-type": "application/json" }, body: "{nope" });
    expect(notJson.status).toBeGreaterThanOrEqual(400);
    expect(notJson.status).toBeLessThan(500);
  });
});

describe("bad input is refused with the right code (embedded)", () => {
  let s: TestServer;
  let tasks: grpc.Client;
  beforeAll(async () => {
    s = await startServer("embedded", { env: { MAX_MESSAGE_BYTES: "65536" } });
    tasks = grpcClient("TaskService", s.port);
  });
  afterAll(async () => {
    tasks?.close();
    await s?.close();
  });

  it("CreateTask validation: task type unspecified or unknown, short description, priority 11, unsupported fields", async () => {
    const cases: Array<[Record<string, unknown>, grpc.status, string]> = [
      [{ task_type: "TASK_TYPE_UNSPECIFIED", description: "valid text" }, grpc.status.INVALID_ARGUMENT, "task_type:"],
      [{ task_type: "TASK_TYPE_CODE", description: "ab" }, grpc.status.INVALID_ARGUMENT, "description: must be at least 3 characters"],
      [{ task_type: "TASK_TYPE_CODE", description: "valid text", priority: 11 }, grpc.status.INVALID_ARGUMENT, "priority: must be between 0 and 10"],
      [{ task_type: "TASK_TYPE_CODE", description: "valid text", priority: -1 }, grpc.status.INVALID_ARGUMENT, "priority"],
      [{ task_type: "TASK_TYPE_CODE", description: "valid text", idempotency_key: "k".repeat(201) }, grpc.status.INVALID_ARGUMENT, "idempotency_key"],
      [{ task_type: "TASK_TYPE_CODE", description: "valid text", timeout_ms: -5 }, grpc.status.INVALID_ARGUMENT, "timeout_ms"],
      [{ task_type: "TASK_TYPE_CODE", description: "valid text", webhook_url: "http://x" }, grpc.status.UNIMPLEMENTED, "webhook_url"],
    ];
    for (const [req, code, text] of cases) {
      const e = await grpcError(unary(tasks, "CreateTask", req));
      expect({ req, code: e.code }).toEqual({ req, code });
      expect(e.details).toContain(text);
      expect(e.details).not.toMatch(/internal/i);
    }
  });

  it("an unknown enum number (task_type 99) over Connect binary is INVALID_ARGUMENT naming the value", async () => {
    const tc = createClient(TaskService, createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "2", useBinaryFormat: true }));
    const e = await connectError(tc.createTask({ taskType: 99 as TaskType, description: "future type" }));
    expect(e.code).toBe(Code.InvalidArgument);
    expect(e.rawMessage).toContain("task_type");
    expect(e.rawMessage).toContain("99");
    const filter = await connectError(tc.listTasks({ taskType: 99 as TaskType }));
    expect(filter.code).toBe(Code.InvalidArgument);
    const status = await connectError(tc.listTasks({ status: 42 as TaskStatus }));
    expect(status.code).toBe(Code.InvalidArgument);
  });

  it("a garbage gRPC body gets a gRPC error status, and the same HTTP/2 connection keeps working", async () => {
    const session = http2.connect(s.baseUrl);
    try {
      const call = async (body: Buffer) => {
        const r = await rawRequest(session, { ":path": "/aaos.v1.TaskService/CreateTask", "content-type": "application/grpc", te: "trailers" }, body);
        const g = r.trailers["grpc-status"] ?? r.headers["grpc-status"];
        const m = r.trailers["grpc-message"] ?? r.headers["grpc-message"];
        return { status: Number(r.headers[":status"]), grpcStatus: g === undefined ? undefined : String(g), message: m === undefined ? undefined : decodeURIComponent(String(m)), data: r.body };
      };
      // Field 1 (varint) with a truncated value, then random bytes: not a CreateTaskRequest.
      const garbage = Buffer.concat([Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]), randomBytes(64)]);
      const bad = await call(frame(garbage));
      expect(bad.status).toBe(200);
      expect(["3", "13"]).toContain(bad.grpcStatus);
      expect(bad.message ?? "").not.toMatch(/at .*\.js/);
      // A length prefix that promises more than is sent.
      const short = Buffer.alloc(5);
      short.writeUInt32BE(100, 1);
      const truncated = await call(Buffer.concat([short, Buffer.from([1, 2, 3])]));
      expect(truncated.grpcStatus).not.toBe("0");
      expect(truncated.grpcStatus).toBeDefined();
      // The next request on the same connection is served normally.
      const ok = await call(frame(Buffer.from([0x08, 0x03, 0x12, 0x05, ...Buffer.from("hello")])));
      expect(ok.grpcStatus).toBe("0");
      expect(ok.data.length).toBeGreaterThan(5);
      expect(session.closed || session.destroyed).toBe(false);
    } finally {
      session.close();
    }
  });

  it("a message over MAX_MESSAGE_BYTES is RESOURCE_EXHAUSTED and the server keeps serving", async () => {
    const big = { task_type: "TASK_TYPE_CODE", description: "big metadata", metadata: toStruct({ blob: "x".repeat(70_000) }) };
    const e = await grpcError(unary(tasks, "CreateTask", big));
    expect(e.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    const ok = await unary(tasks, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "small again" });
    expect(ok.task.status).toBe("TASK_STATUS_PENDING");
    // Connect over HTTP/1.1 is bounded by the same limit.
    const tc = createClient(TaskService, createConnectTransport({ baseUrl: s.baseUrl, httpVersion: "1.1", useBinaryFormat: true }));
    const h1 = await connectError(tc.createTask({ taskType: TaskType.CODE, description: "big", metadata: { blob: "x".repeat(70_000) } }));
    expect([Code.ResourceExhausted]).toContain(h1.code);
  });

  it("Session: an empty message is invalid_argument and the stream keeps working", async () => {
    const r = rawSession(s.port);
    try {
      r.call.write({ register: { agent_name: "raw", capabilities: ["TASK_TYPE_SYNTHESIS"] } });
      await r.waitFor(1);
      expect(r.frames[0]).toMatchObject({ kind: "registration_ack" });
      r.call.write({});
      await r.waitFor(2);
      expect(r.frames[1]).toMatchObject({ kind: "error", code: "invalid_argument" });
      expect(r.frames[1].message).toContain("register");
      r.call.write({ heartbeat: {} });
      await r.waitFor(3);
      expect(r.frames[2]).toMatchObject({ kind: "heartbeat_ack" });
      expect(r.ended).toBe(false);
    } finally {
      r.close();
    }
  });

  it("Session: a first message that is not register is failed_precondition; register may follow", async () => {
    const r = rawSession(s.port);
    try {
      r.call.write({ heartbeat: {} });
      await r.waitFor(1);
      expect(r.frames[0]).toMatchObject({ kind: "error", code: "failed_precondition" });
      expect(r.frames[0].message).toContain("register");
      r.call.write({ task_complete: { task_id: "00000000-0000-4000-8000-000000000000" } });
      await r.waitFor(2);
      expect(r.frames[1]).toMatchObject({ kind: "error", code: "failed_precondition", task_id: "00000000-0000-4000-8000-000000000000" });
      r.call.write({ register: { agent_name: "late" } });
      await r.waitFor(3);
      expect(r.frames[2]).toMatchObject({ kind: "registration_ack" });
    } finally {
      r.close();
    }
  });

  it.each([
    ["TASK_TYPE_UNSPECIFIED", "TASK_TYPE_UNSPECIFIED"],
    [99, "99"],
  ])("Session: register with capability %s is invalid_argument", async (capability, named) => {
    const r = rawSession(s.port);
    try {
      r.call.write({ register: { agent_name: "bad caps", capabilities: ["TASK_TYPE_SYNTHESIS", capability] } });
      await r.waitFor(1);
      expect(r.frames[0]).toMatchObject({ kind: "error", code: "invalid_argument" });
      expect(r.frames[0].message).toContain("capabilities");
      expect(r.frames[0].message).toContain(named);
      // Still unregistered: a valid register is accepted afterwards.
      r.call.write({ register: { agent_name: "good caps", capabilities: ["TASK_TYPE_SYNTHESIS"] } });
      await r.waitFor(2);
      expect(r.frames[1]).toMatchObject({ kind: "registration_ack" });
    } finally {
      r.close();
    }
  });
});

describe("grpc.health.v1 and server reflection over the wire (embedded)", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startServer("embedded");
  });
  afterAll(async () => {
    await s?.close();
  });

  it("Health Check and Watch", async () => {
    const hc = grpcClient("Health", s.port);
    try {
      expect(await unary(hc, "Check", { service: "" })).toMatchObject({ status: "SERVING" });
      const unknown = await grpcError(unary(hc, "Check", { service: "no.such.Service" }));
      expect(unknown.code).toBe(grpc.status.NOT_FOUND);
      const call = (hc as unknown as { Watch(r: object): grpc.ClientReadableStream<any> }).Watch({ service: "" });
      const seen: string[] = [];
      call.on("data", (m: any) => seen.push(m.status));
      call.on("error", () => undefined);
      await eventually(() => seen.length >= 1, 5000, "first health status");
      expect(seen[0]).toBe("SERVING");
      call.cancel();
    } finally {
      hc.close();
    }
  });

  it("reflection v1 lists the services and returns decodable descriptors", async () => {
    const def = protoLoader.loadSync("grpc/reflection/v1/reflection.proto", { includeDirs: [PROTO_DIR], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
    const Reflection = (grpc.loadPackageDefinition(def) as any).grpc.reflection.v1.ServerReflection as new (a: string, c: grpc.ChannelCredentials) => grpc.Client;
    const client = new Reflection(`127.0.0.1:${s.port}`, grpc.credentials.createInsecure());
    const call = (client as unknown as { ServerReflectionInfo(): grpc.ClientDuplexStream<any, any> }).ServerReflectionInfo();
    const answers: any[] = [];
    call.on("data", (m: any) => answers.push(m));
    call.on("error", () => undefined);
    try {
      call.write({ list_services: "*" });
      await eventually(() => answers.length >= 1, 5000, "list_services");
      const names = answers[0].list_services_response.service.map((x: any) => x.name);
      expect(names).toEqual(expect.arrayContaining(["aaos.v1.TaskService", "aaos.v1.AgentService", "aaos.v1.MetricsService", "grpc.health.v1.Health"]));

      call.write({ file_containing_symbol: "aaos.v1.TaskService" });
      await eventually(() => answers.length >= 2, 5000, "file_containing_symbol");
      const protos = (answers[1].file_descriptor_response.file_descriptor_proto as Buffer[]).map((b) => fromBinary(FileDescriptorProtoSchema, new Uint8Array(b)));
      const files = protos.map((p) => p.name);
      expect(files[0]).toBe("aaos/v1/task_service.proto");
      expect(files).toEqual(expect.arrayContaining(["aaos/v1/task.proto", "google/protobuf/struct.proto"]));
      const svc = protos[0]!.service.find((x) => x.name === "TaskService")!;
      expect(svc.method.map((m) => m.name)).toEqual(["CreateTask", "GetTask", "ListTasks", "CancelTask", "RetryTask", "WatchTask"]);

      call.write({ file_containing_symbol: "aaos.v1.SessionRequest" });
      await eventually(() => answers.length >= 3, 5000, "message symbol");
      const p = fromBinary(FileDescriptorProtoSchema, new Uint8Array(answers[2].file_descriptor_response.file_descriptor_proto[0]));
      expect(p.name).toBe("aaos/v1/agent_service.proto");

      call.write({ file_containing_symbol: "no.such.Thing" });
      await eventually(() => answers.length >= 4, 5000, "not found answer");
      expect(answers[3].error_response).toMatchObject({ error_code: grpc.status.NOT_FOUND });
    } finally {
      call.end();
      client.close();
    }
  });
});

describe("a database fault (embedded)", () => {
  it("is INTERNAL to the caller, without its cause, and an error in the log", async () => {
    const s = await startServer("embedded");
    const tasks = grpcClient("TaskService", s.port);
    try {
      const { task } = await unary(tasks, "CreateTask", { task_type: "TASK_TYPE_CODE", description: "read me back" });
      await byHand(s, "alter table tasks rename to tasks_gone");
      const e = await grpcError(unary(tasks, "GetTask", { task_id: task.task_id }));
      expect(e.code).toBe(grpc.status.INTERNAL);
      expect(e.details).toBe("internal error");
      const line = await eventually(() => s.logs.lines.find((l) => l.msg === "request failed"), 5000, "the logged failure");
      expect(line.level).toBe("error");
      expect(String((line.err as { message?: unknown }).message)).toContain("no such table");
      expect(s.logs.lines.filter((l) => l.msg === "request refused by the protocol layer")).toEqual([]);
      await byHand(s, "alter table tasks_gone rename to tasks");
    } finally {
      tasks.close();
      await s.close();
    }
  });
});
