/**
 * gRPC calls are served stream by stream beside Connect and gRPC-Web on the
 * same port, even on one HTTP/2 session, each answered in its own protocol
 * with the same headers and errors. Real server on port 0, raw node:http2 and
 * grpc-js clients.
 */
import http2 from "node:http2";
import { brotliCompressSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { CreateTaskRequestSchema, CreateTaskResponseSchema, WatchTaskRequestSchema, WatchTaskResponseSchema } from "../../gen/aaos/v1/task_service_pb.js";
import { TaskStatus, TaskType } from "../../gen/aaos/v1/task_pb.js";
import { startServer, type TestServer } from "../support/server.js";
import { grpcClient, toStruct } from "../support/clients.js";
import { frame, frames, rawRequest as request } from "../support/raw-http2.js";

const createRequest = (description: string) => toBinary(CreateTaskRequestSchema, create(CreateTaskRequestSchema, { taskType: TaskType.QA, description, priority: 4 }));

describe("gRPC beside Connect on one port", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startServer("embedded");
  });
  afterAll(async () => {
    await s?.close();
  });

  it("one HTTP/2 session carries gRPC, gRPC+JSON, Connect and gRPC-Web calls at once, each answered in its own protocol", async () => {
    const session = http2.connect(s.baseUrl);
    try {
      const path = { ":path": "/aaos.v1.TaskService/CreateTask" };
      const [grpcReply, grpcJson, connectReply, webReply, brotli, badTimeout] = await Promise.all([
        request(session, { ...path, "content-type": "application/grpc", te: "trailers", "x-correlation-id": "route-grpc" }, frame(createRequest("over grpc"))),
        request(
          session,
          { ...path, "content-type": "application/grpc+json", te: "trailers", "x-correlation-id": "route-grpc-json" },
          frame(Buffer.from(JSON.stringify({ taskType: "TASK_TYPE_QA", description: "over grpc json", priority: 4 }))),
        ),
        request(session, { ...path, "content-type": "application/proto", "connect-protocol-version": "1", "x-correlation-id": "route-connect" }, Buffer.from(createRequest("over connect"))),
        request(session, { ...path, "content-type": "application/grpc-web+proto", "x-correlation-id": "route-web" }, frame(createRequest("over grpc-web"))),
        // A coding grpc-js cannot decode, and a malformed deadline: still answered as before.
        request(session, { ...path, "content-type": "application/grpc", te: "trailers", "grpc-encoding": "br" }, frame(brotliCompressSync(createRequest("over grpc, brotli")), 1)),
        request(session, { ...path, "content-type": "application/grpc", te: "trailers", "grpc-timeout": "soon" }, frame(createRequest("bad deadline"))),
      ]);

      expect(grpcReply.headers[":status"]).toBe(200);
      expect(grpcReply.headers["content-type"]).toMatch(/^application\/grpc(\+proto)?$/);
      expect(grpcReply.headers["x-correlation-id"]).toBe("route-grpc");
      expect(grpcReply.trailers["grpc-status"]).toBe("0");
      // Served by the gRPC host (these are grpc-js's codings): the path that
      // costs a quarter of Connect's CPU per call.
      expect(grpcReply.headers["grpc-accept-encoding"]).toBe("identity,deflate,gzip");
      const viaGrpc = fromBinary(CreateTaskResponseSchema, frames(grpcReply.body)[0]!.payload).task!;
      expect(viaGrpc).toMatchObject({ description: "over grpc", status: TaskStatus.PENDING, priority: 4, correlationId: "route-grpc" });

      expect(grpcJson.headers["content-type"]).toBe("application/grpc+json");
      expect(grpcJson.trailers["grpc-status"]).toBe("0");
      expect(JSON.parse(frames(grpcJson.body)[0]!.payload.toString()).task).toMatchObject({ description: "over grpc json", correlationId: "route-grpc-json" });

      expect(connectReply.headers[":status"]).toBe(200);
      expect(connectReply.headers["content-type"]).toBe("application/proto");
      expect(connectReply.headers["x-correlation-id"]).toBe("route-connect");
      expect(fromBinary(CreateTaskResponseSchema, connectReply.body).task).toMatchObject({ description: "over connect", correlationId: "route-connect" });

      expect(webReply.headers["content-type"]).toBe("application/grpc-web+proto");
      expect(webReply.headers["x-correlation-id"]).toBe("route-web");
      const [message, trailer] = frames(webReply.body);
      expect(fromBinary(CreateTaskResponseSchema, message!.payload).task).toMatchObject({ description: "over grpc-web", correlationId: "route-web" });
      expect(trailer!.flags & 0x80).toBe(0x80);
      expect(trailer!.payload.toString()).toMatch(/grpc-status: ?0/);

      expect(brotli.trailers["grpc-status"]).toBe("0");
      expect(badTimeout.headers["grpc-status"] ?? badTimeout.trailers["grpc-status"]).toBe("3");

      // Five tasks, real and distinct; the malformed deadline created none.
      const ids = new Set([
        viaGrpc.taskId,
        JSON.parse(frames(grpcJson.body)[0]!.payload.toString()).task.taskId,
        fromBinary(CreateTaskResponseSchema, connectReply.body).task!.taskId,
        fromBinary(CreateTaskResponseSchema, message!.payload).task!.taskId,
        fromBinary(CreateTaskResponseSchema, frames(brotli.body)[0]!.payload).task!.taskId,
      ]);
      expect(ids.size).toBe(5);
      const listed = await fetch(`${s.baseUrl}/tasks?status=pending&limit=50`).then((r) => r.json() as Promise<Array<{ description: string }>>);
      const descriptions = listed.map((t) => t.description);
      expect(descriptions).toEqual(expect.arrayContaining(["over connect", "over grpc", "over grpc json", "over grpc-web", "over grpc, brotli"]));
      expect(descriptions).not.toContain("bad deadline");
    } finally {
      session.close();
    }
  });

  it("gRPC answers carry the correlation ID in their headers, on success and on error, given or generated", async () => {
    const tasks = grpcClient("TaskService", s.port);
    try {
      const call = (request: object, correlationId?: string) =>
        new Promise<{ headers: grpc.Metadata; error: grpc.ServiceError | null; task?: { correlation_id: string } }>((resolve) => {
          const md = new grpc.Metadata();
          if (correlationId) md.set("x-correlation-id", correlationId);
          let headers = new grpc.Metadata();
          const c = (tasks as unknown as Record<string, Function>).CreateTask!(request, md, (error: grpc.ServiceError | null, res?: { task: { correlation_id: string } }) =>
            // The callback may run before or after "metadata"; settle on the next turn.
            setImmediate(() => resolve({ headers, error, task: res?.task })),
          ) as grpc.ClientUnaryCall;
          c.on("metadata", (m: grpc.Metadata) => (headers = m));
        });
      const given = await call({ task_type: "TASK_TYPE_QA", description: "with an id", metadata: toStruct({ a: 1 }) }, "corr-grpc-7");
      expect(given.error).toBeNull();
      expect(given.headers.get("x-correlation-id")).toEqual(["corr-grpc-7"]);
      expect(given.task?.correlation_id).toBe("corr-grpc-7");

      const generated = await call({ task_type: "TASK_TYPE_QA", description: "without an id" });
      const id = String(generated.headers.get("x-correlation-id")[0]);
      expect(id).toMatch(/^[0-9a-f-]{36}$/);
      expect(generated.task?.correlation_id).toBe(id);

      const refused = await call({ task_type: "TASK_TYPE_QA", description: "no", priority: 11 }, "corr-grpc-bad");
      expect(refused.error?.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(refused.error?.details).toContain("priority");
      expect(refused.headers.get("x-correlation-id")).toEqual(["corr-grpc-bad"]);
    } finally {
      tasks.close();
    }
  });

  it("a WatchTask past its deadline gets DEADLINE_EXCEEDED from the server after the current state, and the server keeps serving", async () => {
    const created = await fetch(`${s.baseUrl}/tasks`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ task_type: "qa", description: "to watch" }),
    }).then((r) => r.json() as Promise<{ task_id: string }>);
    const session = http2.connect(s.baseUrl);
    try {
      // A raw client enforces no deadline itself: the status is the server's.
      const watch = await request(
        session,
        { ":path": "/aaos.v1.TaskService/WatchTask", "content-type": "application/grpc", te: "trailers", "grpc-timeout": "300m" },
        frame(toBinary(WatchTaskRequestSchema, create(WatchTaskRequestSchema, { taskId: created.task_id }))),
      );
      expect(watch.trailers["grpc-status"]).toBe("4");
      const messages = frames(watch.body).map((f) => fromBinary(WatchTaskResponseSchema, f.payload).task!.status);
      expect(messages).toEqual([TaskStatus.PENDING]);
      // The same over gRPC-Web, which Connect serves.
      const web = await request(
        session,
        { ":path": "/aaos.v1.TaskService/WatchTask", "content-type": "application/grpc-web+proto", "grpc-timeout": "300m" },
        frame(toBinary(WatchTaskRequestSchema, create(WatchTaskRequestSchema, { taskId: created.task_id }))),
      );
      const [first, trailer] = frames(web.body);
      expect(fromBinary(WatchTaskResponseSchema, first!.payload).task!.status).toBe(TaskStatus.PENDING);
      expect(trailer!.payload.toString()).toMatch(/grpc-status: ?4/);
      const again = await request(session, { ":path": "/aaos.v1.TaskService/CreateTask", "content-type": "application/grpc", te: "trailers" }, frame(createRequest("after the deadline")));
      expect(again.trailers["grpc-status"]).toBe("0");
    } finally {
      session.close();
    }
  });

  it("a deadline longer than a timer can wait (grpc-go sends 30 days) is no deadline, on every protocol", async () => {
    const session = http2.connect(s.baseUrl);
    try {
      const path = { ":path": "/aaos.v1.TaskService/CreateTask" };
      const [grpcLong, webLong, grpcShort] = await Promise.all([
        request(session, { ...path, "content-type": "application/grpc", te: "trailers", "grpc-timeout": "2592000S" }, frame(createRequest("thirty days"))),
        request(session, { ...path, "content-type": "application/grpc-web+proto", "grpc-timeout": "99999999H" }, frame(createRequest("forever, on grpc-web"))),
        request(session, { ...path, "content-type": "application/grpc", te: "trailers", "grpc-timeout": "10S" }, frame(createRequest("ten seconds"))),
      ]);
      expect(grpcLong.trailers["grpc-status"]).toBe("0");
      expect(frames(webLong.body)[1]!.payload.toString()).toMatch(/grpc-status: ?0/);
      expect(grpcShort.trailers["grpc-status"]).toBe("0");
    } finally {
      session.close();
    }
    // Connect over HTTP/1.1, with its own header.
    const connect = await fetch(`${s.baseUrl}/aaos.v1.TaskService/CreateTask`, {
      method: "POST",
      headers: { "content-type": "application/json", "connect-timeout-ms": "9999999999" },
      body: JSON.stringify({ taskType: "TASK_TYPE_QA", description: "long connect deadline" }),
    });
    expect(connect.status).toBe(200);
  });
});
