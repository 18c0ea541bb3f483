/**
 * The one listening port: HTTP/2 cleartext and HTTP/1.1 told apart by the
 * first bytes, misbehaving clients dropped, and a shutdown that does not wait
 * on idle connections. Raw sockets and real clients against the real server.
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { Duplex } from "node:stream";
import { afterEach, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import { eventually, startServer, type TestServer } from "../support/server.js";
import { GrpcAgent, grpcClient, unary } from "../support/clients.js";

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/** A raw TCP connection that records what the server sends and when it closes. */
function rawSocket(port: number) {
  const socket = net.connect({ host: "127.0.0.1", port });
  const state = { data: Buffer.alloc(0), closed: false, closedAt: 0, connectedAt: 0 };
  socket.on("connect", () => (state.connectedAt = Date.now()));
  socket.on("data", (d: Buffer) => (state.data = Buffer.concat([state.data, d])));
  socket.on("error", () => undefined);
  socket.on("close", () => {
    state.closed = true;
    state.closedAt = Date.now();
  });
  return { socket, state, connected: new Promise<void>((r) => socket.once("connect", () => r())) };
}

/** A Duplex over a TCP socket that sends the first `slowBytes` bytes one per write, a few ms apart. */
class DribbleSocket extends Duplex {
  private sent = 0;
  constructor(
    private readonly socket: net.Socket,
    private readonly slowBytes: number,
  ) {
    super();
    socket.on("data", (d: Buffer) => this.push(d));
    socket.on("end", () => this.push(null));
    socket.on("error", (e) => this.destroy(e));
    socket.on("close", () => this.destroy());
  }
  override _read(): void {}
  override _write(chunk: Buffer, _enc: BufferEncoding, done: (e?: Error | null) => void): void {
    void (async () => {
      let i = 0;
      while (this.sent < this.slowBytes && i < chunk.length) {
        this.socket.write(chunk.subarray(i, i + 1));
        this.sent++;
        i++;
        await new Promise((r) => setTimeout(r, 5));
      }
      if (i < chunk.length) this.socket.write(chunk.subarray(i));
      done();
    })().catch(done);
  }
  override _final(done: () => void): void {
    this.socket.end(done);
  }
  override _destroy(err: Error | null, done: (e: Error | null) => void): void {
    this.socket.destroy();
    done(err);
  }
}

/** One HTTP/2 request on a session; resolves to status and body. */
function h2Request(session: http2.ClientHttp2Session, path: string, body?: string, headers: http2.OutgoingHttpHeaders = {}) {
  return new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = session.request({ ":method": body === undefined ? "GET" : "POST", ":path": path, ...(body === undefined ? {} : { "content-type": "application/json" }), ...headers });
    let status = 0;
    let data = "";
    req.setEncoding("utf8");
    req.on("response", (h) => (status = Number(h[":status"])));
    req.on("data", (c: string) => (data += c));
    req.on("end", () => resolve({ status, body: data }));
    req.on("error", reject);
    req.end(body);
  });
}

/** One HTTP/1.1 request with the given agent; resolves to status, body and whether the socket was reused. */
function h1Request(port: number, agent: http.Agent, path: string) {
  return new Promise<{ status: number; body: string; reused: boolean }>((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, agent }, (res) => {
      let data = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => (data += c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: data, reused: req.reusedSocket }));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("single port: sniffing HTTP/2 and HTTP/1.1", () => {
  let s: TestServer | undefined;
  afterEach(async () => {
    await s?.close();
    s = undefined;
  });

  it("a client that sends nothing is disconnected after SNIFF_TIMEOUT_MS; the server keeps serving", async () => {
    s = await startServer("embedded", { env: { SNIFF_TIMEOUT_MS: "200" } });
    const silent = rawSocket(s.port);
    await silent.connected;
    await eventually(() => silent.state.closed, 5000, "silent client dropped");
    expect(silent.state.closedAt - silent.state.connectedAt).toBeGreaterThanOrEqual(150);
    expect(silent.state.data.length).toBe(0);
    expect((await fetch(`${s.baseUrl}/health`)).status).toBe(200);
  });

  it("an HTTP/2 connection with no stream is closed after HTTP2_IDLE_TIMEOUT_MS; one with a quiet stream open is not", async () => {
    s = await startServer("embedded", { env: { HTTP2_IDLE_TIMEOUT_MS: "300" } });
    // The preface and an empty SETTINGS frame, then nothing.
    const quiet = rawSocket(s.port);
    await quiet.connected;
    quiet.socket.write(Buffer.concat([PREFACE, Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0])]));
    await eventually(() => quiet.state.closed, 5000, "the idle connection closed");
    expect(quiet.state.closedAt - quiet.state.connectedAt).toBeGreaterThanOrEqual(250);
    // A GOAWAY frame (type 7) before the close.
    expect(quiet.state.data.includes(Buffer.from([7, 0, 0, 0, 0, 0]))).toBe(true);
    // A connection with a stream open stays usable however long the stream is quiet.
    const session = http2.connect(s.baseUrl);
    let goaway = false;
    session.on("goaway", () => (goaway = true));
    session.on("error", () => undefined);
    try {
      const pending = session.request({ ":method": "POST", ":path": "/aaos.v1.TaskService/ListTasks", "content-type": "application/json" });
      pending.on("error", () => undefined);
      await new Promise((r) => setTimeout(r, 1000));
      expect(goaway).toBe(false);
      const res = await h2Request(session, "/aaos.v1.TaskService/ListTasks", "{}");
      expect(res.status).toBe(200);
      pending.end("{}");
    } finally {
      session.close();
    }
    // So does an agent's session stream.
    const agent = await GrpcAgent.connect(s.port, { capabilities: ["code"] });
    try {
      await new Promise((r) => setTimeout(r, 1000));
      const created = await fetch(`${s.baseUrl}/tasks`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ task_type: "code", description: "after a quiet while" }) });
      expect(created.status).toBe(201);
      await agent.waitForFrame("task_assignment");
    } finally {
      agent.kill();
    }
    // A gRPC client whose connection was closed while idle calls again on a new one.
    const hc = grpcClient("Health", s.port);
    expect(await unary(hc, "Check", { service: "" })).toMatchObject({ status: "SERVING" });
    await new Promise((r) => setTimeout(r, 800));
    expect(await unary(hc, "Check", { service: "" })).toMatchObject({ status: "SERVING" });
    hc.close();
  });

  it("an HTTP/2 request whose body is not finished within HTTP2_BODY_TIMEOUT_MS is cancelled; an agent's Session is not", async () => {
    s = await startServer("embedded", { env: { HTTP2_BODY_TIMEOUT_MS: "300" } });
    const session = http2.connect(s.baseUrl);
    session.on("error", () => undefined);
    try {
      // Over gRPC (to grpc-js) and over Connect (to Fastify): half a message, then nothing.
      const stalled = [
        { ":path": "/aaos.v1.TaskService/ListTasks", "content-type": "application/grpc" },
        { ":path": "/aaos.v1.TaskService/ListTasks", "content-type": "application/json" },
      ].map((headers) => {
        const req = session.request({ ":method": "POST", ...headers });
        req.on("error", () => undefined);
        req.write(headers["content-type"] === "application/json" ? "{" : Buffer.from([0, 0, 0, 0, 9, 8]));
        const startedAt = Date.now();
        return new Promise<{ rstCode: number; after: number }>((resolve) => req.on("close", () => resolve({ rstCode: req.rstCode, after: Date.now() - startedAt })));
      });
      for (const closed of await Promise.all(stalled)) {
        expect(closed.rstCode).toBe(http2.constants.NGHTTP2_CANCEL);
        expect(closed.after).toBeGreaterThanOrEqual(250);
      }
      // The connection goes on serving complete requests.
      const res = await h2Request(session, "/aaos.v1.TaskService/ListTasks", "{}");
      expect(res.status).toBe(200);
    } finally {
      session.close();
    }
    // An agent's Session sends messages for as long as it lasts; a watch's
    // request is complete at once, and its answer goes on past the deadline.
    const agent = await GrpcAgent.connect(s.port, { capabilities: ["code"] });
    const tc = grpcClient("TaskService", s.port);
    try {
      const created = await fetch(`${s.baseUrl}/tasks`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ task_type: "code", description: "outlasts the body deadline" }) });
      const id = ((await created.json()) as { task_id: string }).task_id;
      await agent.waitForFrame("task_assignment");
      const seen: string[] = [];
      const watch = (tc as unknown as { WatchTask(r: object): grpc.ClientReadableStream<{ task: { status: string } }> }).WatchTask({ task_id: id });
      watch.on("data", (m) => seen.push(m.task.status));
      watch.on("error", () => undefined);
      await eventually(() => seen.length > 0, 5000, "the watch's first state");
      await new Promise((r) => setTimeout(r, 1000));
      agent.complete(id, {});
      await agent.waitForFrame("completion_ack");
      await eventually(() => seen.includes("TASK_STATUS_COMPLETED"), 5000, "the watch saw the completion");
    } finally {
      agent.kill();
      tc.close();
    }
  });

  it("garbage bytes get an HTTP/1.1 400 or a closed connection, and the server keeps serving both protocols", async () => {
    s = await startServer("embedded", { env: { SNIFF_TIMEOUT_MS: "200" } });
    for (const garbage of [Buffer.from([0x00, 0xff, 0x13, 0x37, 0x0d, 0x0a, 0x0d, 0x0a]), Buffer.from("PRI * HTTP/1.9\r\n\r\nXX\r\n\r\n"), Buffer.from("GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")]) {
      const raw = rawSocket(s.port);
      await raw.connected;
      raw.socket.write(garbage);
      await eventually(() => raw.state.closed || raw.state.data.includes("\r\n\r\n"), 5000, "an answer to garbage");
      if (raw.state.data.length > 0) expect(raw.state.data.toString("latin1")).toMatch(/^HTTP\/1\.1 400 /);
      raw.socket.destroy();
    }
    expect((await fetch(`${s.baseUrl}/health`)).status).toBe(200);
    const hc = grpcClient("Health", s.port);
    expect(await unary(hc, "Check", { service: "" })).toMatchObject({ status: "SERVING" });
    hc.close();
  });

  it("a client that sends the HTTP/2 preface byte by byte is still served over HTTP/2", async () => {
    s = await startServer("embedded", { env: { SNIFF_TIMEOUT_MS: "2000" } });
    const port = s.port;
    const session = http2.connect(s.baseUrl, {
      createConnection: () => new DribbleSocket(net.connect({ host: "127.0.0.1", port }), PREFACE.length + 9),
    });
    session.on("error", () => undefined);
    try {
      const res = await h2Request(session, "/aaos.v1.TaskService/ListTasks", "{}");
      expect(res.status).toBe(200);
      expect(JSON.parse(res.body)).toEqual({});
      const health = await h2Request(session, "/health");
      expect(health.status).toBe(200);
    } finally {
      session.close();
    }
  });

  it("HTTP/1.1 keep-alive and HTTP/2 sessions are served at the same time", async () => {
    s = await startServer("embedded");
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const session = http2.connect(s.baseUrl);
    session.on("error", () => undefined);
    try {
      const h1 = (async () => {
        const out = [];
        for (let i = 0; i < 10; i++) out.push(await h1Request(s!.port, agent, `/tasks?limit=1`));
        return out;
      })();
      const h2 = Promise.all(Array.from({ length: 10 }, () => h2Request(session, "/aaos.v1.TaskService/ListTasks", "{}")));
      const tasks = grpcClient("TaskService", s.port);
      const viaGrpc = Promise.all(Array.from({ length: 5 }, (_, i) => unary(tasks, "CreateTask", { task_type: "TASK_TYPE_QA", description: `concurrent ${i}` })));
      const [r1, r2, r3] = await Promise.all([h1, h2, viaGrpc]);
      tasks.close();
      expect(r1.every((r) => r.status === 200)).toBe(true);
      expect(r1.slice(1).every((r) => r.reused)).toBe(true);
      expect(r2.every((r) => r.status === 200)).toBe(true);
      expect(r3.map((r) => r.task.status)).toEqual(Array(5).fill("TASK_STATUS_PENDING"));
    } finally {
      agent.destroy();
      session.close();
    }
  });

  it("close() with idle keep-alive and HTTP/2 connections and open streams finishes well within SHUTDOWN_GRACE_MS", async () => {
    const graceMs = 20_000;
    s = await startServer("embedded", { env: { SHUTDOWN_GRACE_MS: String(graceMs) } });
    const server = s;
    // Idle HTTP/1.1 keep-alive connection.
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    expect((await h1Request(s.port, agent, "/health")).status).toBe(200);
    const h1Socket = Object.values(agent.freeSockets).flat()[0]!;
    let h1Closed = false;
    h1Socket.once("close", () => (h1Closed = true));
    // Idle HTTP/2 session.
    const session = http2.connect(s.baseUrl);
    session.on("error", () => undefined);
    let h2Closed = false;
    session.once("close", () => (h2Closed = true));
    expect((await h2Request(session, "/health")).status).toBe(200);
    // Open streams: a health watch and an agent session.
    const hc = grpcClient("Health", s.port);
    const watch = (hc as unknown as { Watch(r: object): grpc.ClientReadableStream<any> }).Watch({ service: "" });
    const healthSeen: string[] = [];
    let watchEnded = false;
    watch.on("data", (m: any) => healthSeen.push(m.status));
    watch.on("error", () => (watchEnded = true));
    watch.on("end", () => (watchEnded = true));
    await eventually(() => healthSeen.length >= 1, 5000, "health watch started");
    const agentClient = await GrpcAgent.connect(s.port, { capabilities: ["code"] });

    const started = Date.now();
    await server.close();
    s = undefined;
    const elapsed = Date.now() - started;
    expect(elapsed).toBeLessThan(graceMs / 2);
    await eventually(() => h1Closed && h2Closed, 5000, "idle connections closed");
    await eventually(() => watchEnded && agentClient.closed, 5000, "streams ended");
    expect(healthSeen).toEqual(["SERVING", "NOT_SERVING"]);
    expect(agentClient.frames.some((f) => f.type === "error" || f.type === "registration_ack")).toBe(true);
    agent.destroy();
    hc.close();
    agentClient.kill();
  });

  // Ends after SHUTDOWN_GRACE_MS today; with connectRoutes' `shutdown` signal wired in app.ts it ends at once with UNAVAILABLE.
  it("close() ends an open WatchTask stream instead of hanging on it", async () => {
    // A grace period longer than the test's timeout: close() must not wait for it.
    s = await startServer("embedded", { env: { SHUTDOWN_GRACE_MS: "120000" } });
    const server = s;
    const tasks = grpcClient("TaskService", s.port);
    const created = await unary(tasks, "CreateTask", { task_type: "TASK_TYPE_QA", description: "watched at shutdown" });
    const watch = (tasks as unknown as { WatchTask(r: object): grpc.ClientReadableStream<any> }).WatchTask({ task_id: created.task.task_id });
    const seen: string[] = [];
    let ended: string | undefined;
    watch.on("data", (m: any) => seen.push(m.task.status));
    watch.on("error", (e: grpc.ServiceError) => (ended = `error ${e.code}`));
    watch.on("end", () => (ended ??= "end"));
    await eventually(() => seen.length >= 1, 5000, "watch started");
    await server.close();
    s = undefined;
    await eventually(() => ended, 5000, "watch ended");
    expect(seen).toEqual(["TASK_STATUS_PENDING"]);
    // UNAVAILABLE tells the client to watch again elsewhere.
    expect(ended).toBe(`error ${grpc.status.UNAVAILABLE}`);
    tasks.close();
  });
});
