/**
 * Hostile input (issue 3, "Input limits and hostile input"): thousands of
 * random and mutated inputs against a real server, over JSON REST, `/ws`
 * frames and gRPC (grpc-js and raw HTTP/2). The process must survive, every
 * reply must be a proper error in its protocol's vocabulary (never a 500 /
 * INTERNAL / UNKNOWN), an accepted task must come back exactly as sent, and
 * no task row may end up malformed.
 *
 * Reproducible: every case draws from its own sub-seed of the printed run
 * seed. `FUZZ_SEED=<n>` replays a run; `FUZZ_ITERATIONS=<n>` sets the total
 * number of inputs on the embedded backend (PostgreSQL + Redis runs a third).
 */
import http from "node:http";
import http2 from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary, type JsonObject } from "@bufbuild/protobuf";
import { CreateTaskRequestSchema, CreateTaskResponseSchema, GetTaskRequestSchema, ListTasksRequestSchema } from "../../gen/aaos/v1/task_service_pb.js";
import { SessionRequestSchema, SessionResponseSchema, type SessionRequest, type SessionResponse } from "../../gen/aaos/v1/agent_service_pb.js";
import { BACKENDS, startServer, type TestServer } from "../support/server.js";
import { fromStruct, grpcClient, toStruct, unary } from "../support/clients.js";
import {
  TASK_STATUSES,
  TASK_TYPES,
  caseSeed,
  createRng,
  deepJsonText,
  grpcEnvelope,
  listQueryInput,
  mutateBytes,
  randomJson,
  randomObject,
  randomString,
  randomUuid,
  restCreateInput,
  runIterations,
  runSeed,
  show,
  taskPathInput,
  validDescription,
  type Rng,
} from "./generators.js";

const SEED = runSeed();
const ITERATIONS = runIterations(3000);
/** Large enough that the result limit (1 MiB by default) is reachable over /ws and gRPC. */
const MAX_MESSAGE_BYTES = 1536 * 1024;
/** The server's default description limit (MAX_DESCRIPTION_LENGTH is not set here). */
const DESCRIPTION_MAX = 2000;
const CONCURRENCY = 16;
const REPLY_TIMEOUT_MS = 10_000;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
/** 414: an id past the router's length limit (the REST contract test accepts it too). */
const REST_STATUSES = new Set([200, 201, 400, 404, 405, 409, 413, 414, 415, 422, 501, 503]);
/** WS `error.code`s a client may see for bad input (STYLE.md error table); never "internal". */
const WS_CODES = new Set(["invalid_argument", "failed_precondition", "not_found", "already_exists", "aborted", "resource_exhausted", "out_of_range", "unimplemented", "unavailable"]);
/** gRPC codes a bad request may get: never UNKNOWN (2), and INTERNAL (13) only as below. */
const GRPC_ERROR_CODES = new Set([3, 5, 6, 8, 9, 11, 12, 14]);
/**
 * Bytes that are not a protobuf message at all (or a compressed frame with no
 * encoding) get INTERNAL with the decoder's reason, as grpc-go and grpc-java
 * answer too; Connect assigns that code before any handler runs. Anything
 * else that is INTERNAL is a server defect.
 */
const isDecodeFailure = (code: number | undefined, message: string) =>
  code === 13 && /^(parse binary|protocol error|received compressed envelope)/.test(message);
/** Frames the server pushes on its own, not in answer to one of ours. */
const UNSOLICITED = new Set(["task_assignment", "task_cancelled", "drain"]);

// eslint-disable-next-line no-console
console.log(`[fuzz] seed ${SEED} (replay with FUZZ_SEED=${SEED}), ${ITERATIONS} inputs on the embedded backend`);

/** One thing that went wrong, with what it takes to reproduce it. */
interface Finding {
  protocol: string;
  caseId: string;
  input: string;
  observed: string;
}

/** What an accepted create must read back as. */
interface ExpectedTask {
  taskType: string;
  description: string;
  priority: number;
  metadata: string;
  via: string;
}

/** Stable JSON (sorted keys), so -0/0 and key order do not matter but values do. */
function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) =>
    x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) : x,
  );
}

/** Numbers JSON cannot carry: a server that accepts them cannot store them intact. */
function hasNonFinite(v: unknown): boolean {
  if (typeof v === "number") return !Number.isFinite(v);
  if (v && typeof v === "object") return Object.values(v).some(hasNonFinite);
  return false;
}

/** Why `t` is not a well-formed task in the REST view; empty when it is. */
function taskProblems(t: unknown): string[] {
  if (!t || typeof t !== "object" || Array.isArray(t)) return ["not an object"];
  const x = t as Record<string, unknown>;
  const p: string[] = [];
  if (typeof x.task_id !== "string" || !UUID.test(x.task_id)) p.push(`task_id ${show(x.task_id)}`);
  if (!TASK_TYPES.includes(x.task_type as never)) p.push(`task_type ${show(x.task_type)}`);
  if (!TASK_STATUSES.includes(x.status as never)) p.push(`status ${show(x.status)}`);
  if (!Number.isInteger(x.priority) || (x.priority as number) < 0 || (x.priority as number) > 10) p.push(`priority ${show(x.priority)}`);
  // Characters are code points, as the seed's Python counted them: 2,000 emoji are 4,000 UTF-16 units.
  const chars = typeof x.description === "string" ? [...x.description].length : -1;
  if (chars < 3 || chars > DESCRIPTION_MAX) p.push(`description ${show(x.description, 80)}`);
  if (!x.metadata || typeof x.metadata !== "object" || Array.isArray(x.metadata)) p.push(`metadata ${show(x.metadata, 80)}`);
  if (x.result !== null && (typeof x.result !== "object" || Array.isArray(x.result))) p.push(`result ${show(x.result, 80)}`);
  if (x.error !== null && typeof x.error !== "string") p.push(`error ${show(x.error, 80)}`);
  if (!Number.isInteger(x.attempt) || (x.attempt as number) < 0) p.push(`attempt ${show(x.attempt)}`);
  if (typeof x.created_at !== "string" || !ISO.test(x.created_at)) p.push(`created_at ${show(x.created_at)}`);
  return p;
}

/** Differences between a stored task and what its create asked for. */
function intactProblems(t: Record<string, unknown>, e: ExpectedTask): string[] {
  const p: string[] = [];
  if (t.task_type !== e.taskType) p.push(`task_type ${show(t.task_type)} != sent ${show(e.taskType)}`);
  if (t.description !== e.description) p.push(`description ${show(t.description, 120)} != sent ${show(e.description, 120)}`);
  if (t.priority !== e.priority) p.push(`priority ${show(t.priority)} != sent ${show(e.priority)}`);
  if (canonical(t.metadata) !== e.metadata) p.push(`metadata ${show(canonical(t.metadata), 200)} != sent ${show(e.metadata, 200)}`);
  return p;
}

/** Runs `count` cases with at most `concurrency` in flight. */
async function pool(count: number, concurrency: number, run: (i: number) => Promise<void>): Promise<void> {
  let nextIndex = 0;
  const worker = async () => {
    while (nextIndex < count) await run(nextIndex++);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
}

interface HttpResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  json: unknown;
  isJson: boolean;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY });

/** A raw HTTP/1.1 request (node:http lets us send any bytes and headers fetch would refuse). */
function httpRequest(s: TestServer, method: string, path: string, body?: Buffer, headers: Record<string, string> = {}): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port: s.port, method, path, headers: body ? { ...headers, "content-length": String(body.length) } : headers, agent, timeout: REPLY_TIMEOUT_MS }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("error", reject);
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        let json: unknown;
        let isJson = false;
        try {
          json = JSON.parse(text);
          isJson = true;
        } catch {
          // Reported by the caller.
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json, isJson });
      });
    });
    req.on("timeout", () => req.destroy(new Error(`no answer within ${REPLY_TIMEOUT_MS} ms`)));
    req.on("error", reject);
    req.end(body);
  });
}

/** What is wrong with a REST response as a response (status, JSON, error shape, correlation ID). */
function restResponseProblems(r: HttpResult): string[] {
  const p: string[] = [];
  if (!REST_STATUSES.has(r.status)) p.push(`status ${r.status}`);
  if (!r.isJson) p.push(`body is not JSON: ${show(r.text, 200)}`);
  else if (!/^application\/json/.test(String(r.headers["content-type"]))) p.push(`content-type ${show(r.headers["content-type"])}`);
  if (r.status >= 300) {
    const b = r.json as Record<string, unknown> | undefined;
    if (!b || typeof b !== "object" || Array.isArray(b) || b.detail === undefined || typeof b.code !== "string" || !b.code) p.push(`error body lacks detail/code: ${show(r.text, 200)}`);
  }
  if (!r.headers["x-correlation-id"]) p.push("no x-correlation-id header");
  return p;
}

// ---------------------------------------------------------------------------
// Raw HTTP/2 gRPC

interface GrpcReply {
  httpStatus: number;
  grpcStatus: number | undefined;
  grpcMessage: string;
  messages: Buffer[];
}

/** Splits gRPC length-prefixed messages off the front of `buf`; returns the rest. */
function takeEnvelopes(buf: Buffer, out: Buffer[]): Buffer {
  while (buf.length >= 5) {
    const len = buf.readUInt32BE(1);
    if (buf.length < 5 + len) break;
    out.push(buf.subarray(5, 5 + len));
    buf = buf.subarray(5 + len);
  }
  return buf;
}

const statusOf = (v: unknown) => (v === undefined ? undefined : Number(v));

/** One HTTP/2 connection for raw gRPC calls, re-opened if the server closes it. */

/**
 * Resolves once `pred` holds (true), the connection is gone or the time is up
 * (then `pred()` as it stands). Wakes on each pushed waiter, or every 200 ms.
 */
async function waitUntil(pred: () => boolean, timeoutMs: number, gone: () => boolean, waiters: Array<() => void>): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    const left = deadline - Date.now();
    if (left <= 0 || gone()) return pred();
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, Math.min(left, 200));
      waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
  return true;
}

class H2 {
  private session: http2.ClientHttp2Session | undefined;
  constructor(private readonly url: string) {}

  get(): http2.ClientHttp2Session {
    if (!this.session || this.session.closed || this.session.destroyed) {
      this.session = http2.connect(this.url);
      this.session.on("error", () => {});
    }
    return this.session;
  }

  /** A unary call with `body` as the whole request stream (any bytes, any prefix). */
  unary(path: string, body: Buffer): Promise<GrpcReply> {
    return new Promise((resolve, reject) => {
      const req = this.get().request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" });
      let httpStatus = 0;
      let headers: http2.IncomingHttpHeaders = {};
      let trailers: http2.IncomingHttpHeaders = {};
      let buf: Buffer = Buffer.alloc(0);
      const messages: Buffer[] = [];
      const timer = setTimeout(() => {
        req.close(http2.constants.NGHTTP2_CANCEL);
        reject(new Error(`no answer within ${REPLY_TIMEOUT_MS} ms`));
      }, REPLY_TIMEOUT_MS);
      req.on("response", (h) => {
        headers = h;
        httpStatus = Number(h[":status"]);
      });
      req.on("trailers", (t) => (trailers = t));
      req.on("data", (c: Buffer) => (buf = takeEnvelopes(Buffer.concat([buf, c]), messages)));
      req.on("end", () => {
        clearTimeout(timer);
        const m = trailers["grpc-message"] ?? headers["grpc-message"];
        resolve({ httpStatus, grpcStatus: statusOf(trailers["grpc-status"] ?? headers["grpc-status"]), grpcMessage: m === undefined ? "" : decodeURIComponent(String(m)), messages });
      });
      req.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      req.end(body);
    });
  }

  /** An open bidi stream (AgentService.Session) that collects response messages. */
  stream(path: string): H2Stream {
    return new H2Stream(this.get().request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" }));
  }

  close(): void {
    this.session?.close();
  }
}

class H2Stream {
  readonly messages: Buffer[] = [];
  ended = false;
  grpcStatus: number | undefined;
  grpcMessage = "";
  error: Error | undefined;
  private buf: Buffer = Buffer.alloc(0);
  private headers: http2.IncomingHttpHeaders = {};
  private waiters: Array<() => void> = [];

  constructor(private readonly req: http2.ClientHttp2Stream) {
    req.on("response", (h) => (this.headers = h));
    req.on("trailers", (t) => {
      this.grpcStatus = statusOf(t["grpc-status"]);
      this.grpcMessage = t["grpc-message"] === undefined ? "" : decodeURIComponent(String(t["grpc-message"]));
    });
    req.on("data", (c: Buffer) => {
      this.buf = takeEnvelopes(Buffer.concat([this.buf, c]), this.messages);
      this.wake();
    });
    req.on("end", () => {
      this.ended = true;
      this.grpcStatus ??= statusOf(this.headers["grpc-status"]);
      if (!this.grpcMessage && this.headers["grpc-message"] !== undefined) this.grpcMessage = decodeURIComponent(String(this.headers["grpc-message"]));
      this.wake();
    });
    req.on("close", () => {
      this.ended = true;
      this.wake();
    });
    req.on("error", (e) => {
      this.error = e;
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(payload: Uint8Array, raw = false): void {
    if (!this.ended) this.req.write(raw ? Buffer.from(payload) : grpcEnvelope(payload));
  }

  /** Waits until `pred` holds or the stream ends; false on timeout. */
  async until(pred: () => boolean, timeoutMs = REPLY_TIMEOUT_MS): Promise<boolean> {
    return waitUntil(pred, timeoutMs, () => this.ended, this.waiters);
  }

  halfClose(): void {
    if (!this.ended) this.req.end();
  }

  cancel(): void {
    if (!this.req.closed) this.req.close(http2.constants.NGHTTP2_CANCEL);
  }
}

// ---------------------------------------------------------------------------
// Random protobuf inputs

const ENUM_NUMBERS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 99, -1, 2 ** 31 - 1, -(2 ** 31)];
const INT32_SPECIAL = [0, 1, -1, 10, 11, 100, 101, 2 ** 31 - 1, -(2 ** 31), 604_800_000, 604_800_001];

/** A random CreateTaskRequest with well-typed but hostile field values. */
function randomCreateTaskRequest(rng: Rng) {
  const taskType = rng.bool(0.7) ? rng.int(1, 7) : rng.pick(ENUM_NUMBERS);
  const description = rng.pick([validDescription(rng), validDescription(rng), randomString(rng, 60), "", "ab", "x".repeat(rng.pick([2000, 2001, 70_000]))]);
  const priority = rng.pick([undefined, rng.int(0, 10), rng.int(0, 10), rng.pick(INT32_SPECIAL)]);
  let metadata: JsonObject | undefined;
  switch (rng.int(0, 5)) {
    case 0:
      metadata = undefined;
      break;
    case 1:
      metadata = JSON.parse(deepJsonText(rng.pick([20, 32, 33, 80]), false)) as JsonObject;
      break;
    case 2:
      metadata = { blob: "m".repeat(rng.pick([1000, 66_000, 1_200_000])) };
      break;
    case 3:
      metadata = { n: rng.pick([Number.NaN, Number.POSITIVE_INFINITY, -0, 1e308]) };
      break;
    default:
      metadata = randomObject(rng, 3) as JsonObject;
  }
  return create(CreateTaskRequestSchema, {
    taskType,
    description,
    priority,
    metadata,
    maxAttempts: rng.bool(0.8) ? 0 : rng.pick(INT32_SPECIAL),
    timeoutMs: rng.bool(0.8) ? 0 : rng.pick(INT32_SPECIAL),
    // Unique keys, so a server that honours them never folds two creates into one.
    idempotencyKey: rng.bool(0.9) ? "" : rng.pick([`fuzz-${rng.bytes(12).toString("hex")}`, "k".repeat(201), randomString(rng, 30)]),
    webhookUrl: rng.bool(0.95) ? "" : rng.pick(["http://127.0.0.1:1/hook", "not a url", randomString(rng, 30)]),
  });
}

/** What an accepted CreateTaskRequest must read back as. */
function expectedFromRequest(req: ReturnType<typeof randomCreateTaskRequest>, via: string): ExpectedTask {
  return {
    taskType: TASK_TYPES[req.taskType - 1] ?? `enum ${req.taskType}`,
    description: req.description,
    priority: req.priority ?? 5,
    metadata: canonical(req.metadata ?? {}),
    via,
  };
}

/** A random SessionRequest; `held` are task ids the session currently holds. */
function randomSessionRequest(rng: Rng, held: readonly string[]): SessionRequest {
  const taskId = () => (held.length && rng.bool(0.4) ? rng.pick(held) : rng.pick([randomUuid(rng), "", "not-a-uuid", randomString(rng, 40), "0".repeat(rng.int(37, 5000))]));
  const attempt = () => (rng.bool(0.6) ? 0 : rng.pick(INT32_SPECIAL));
  const result = (): JsonObject | undefined =>
    rng.pick([undefined, randomObject(rng, 3) as JsonObject, { big: "r".repeat(rng.pick([1000, 1_100_000])) }, JSON.parse(deepJsonText(rng.pick([10, 40]), false)) as JsonObject, { n: Number.NaN }]);
  switch (rng.int(0, 5)) {
    case 0:
      return create(SessionRequestSchema, {
        kind: {
          case: "register",
          value: {
            agentId: rng.pick(["", randomString(rng, 20), "a".repeat(300), "ok-id"]),
            agentName: randomString(rng, 30),
            agentType: randomString(rng, 10),
            capabilities: Array.from({ length: rng.int(0, 3) }, () => rng.pick(ENUM_NUMBERS)),
            maxConcurrency: rng.pick(INT32_SPECIAL),
          },
        },
      });
    case 1:
      return create(SessionRequestSchema, { kind: { case: "heartbeat", value: {} } });
    case 2:
    case 3:
      return create(SessionRequestSchema, { kind: { case: "taskComplete", value: { taskId: taskId(), result: result(), attempt: attempt() } } });
    case 4:
      return create(SessionRequestSchema, {
        kind: { case: "taskFailed", value: { taskId: taskId(), error: rng.pick([randomString(rng, 50), "", "e".repeat(rng.pick([5000, 1_100_000]))]), retryable: rng.pick([undefined, true, false]), attempt: attempt() } },
      });
    default:
      return create(SessionRequestSchema, {});
  }
}

// ---------------------------------------------------------------------------
// /ws frames

interface WsFrameInput {
  label: string;
  data: string | Buffer;
  binary: boolean;
  /** Malformed at the frame level: must get exactly invalid_argument. */
  malformed: boolean;
  oversize: boolean;
  /** For a task_complete with an object result: what would be stored. */
  completes?: { taskId: string; result: string };
}

function randomWsFrame(rng: Rng, held: readonly string[]): WsFrameInput {
  const taskId = () => (held.length && rng.bool(0.4) ? rng.pick(held) : rng.pick<unknown>([randomUuid(rng), "", "not-a-uuid", 123, null, randomString(rng, 40), "0".repeat(rng.int(37, 3000)), [randomUuid(rng)], {}]));
  const attempt = () => rng.pick<unknown>([undefined, undefined, 0, 1, 2, -1, 1.5, "1", 2 ** 31, 1e309, null]);
  const frame = (label: string, f: Record<string, unknown>, extra: Partial<WsFrameInput> = {}): WsFrameInput => ({ label, data: JSON.stringify(f), binary: false, malformed: false, oversize: false, ...extra });
  const garbage = (label: string, data: string | Buffer, binary = false): WsFrameInput => ({ label, data, binary, malformed: true, oversize: false });
  switch (rng.int(0, 11)) {
    case 0:
      return frame("heartbeat with extra fields", { type: "heartbeat", ...randomObject(rng, 2) });
    case 1:
      return frame("register (mutated)", {
        type: "register",
        agent_id: rng.pick<unknown>([undefined, null, randomString(rng, 20), 5, "a".repeat(300)]),
        agent_name: rng.pick<unknown>([undefined, randomString(rng, 30), 7, {}]),
        agent_type: rng.pick<unknown>([undefined, randomString(rng, 10), []]),
        capabilities: rng.pick<unknown>([undefined, [], ["code"], ["CODE"], ["code", "cooking"], "code", [1, 2], null, TASK_TYPES.slice()]),
        max_concurrency: rng.pick<unknown>([undefined, 0, 1, 2, -1, 1.5, 1e9, "2", null]),
      });
    case 2:
    case 3:
    case 4: {
      const id = taskId();
      const result = rng.pick<unknown>([{}, randomObject(rng, 3), randomJson(rng, 2), undefined, { big: "r".repeat(rng.pick([100, 1_100_000])) }, JSON.parse(deepJsonText(rng.pick([10, 33, 200]), false)), "done", [1]]);
      const f: Record<string, unknown> = { type: "task_complete", task_id: id, result, attempt: attempt() };
      // An absent (or null) result is stored as {}: the protocol's default.
      const stored = result === undefined || result === null ? {} : result;
      const completes = typeof id === "string" && typeof stored === "object" && !Array.isArray(stored) ? { taskId: id, result: canonical(stored) } : undefined;
      return frame(`task_complete ${show(id, 60)}`, f, { completes });
    }
    case 5:
      return frame("task_failed (mutated)", {
        type: "task_failed",
        task_id: taskId(),
        error: rng.pick<unknown>([randomString(rng, 50), "", 5, null, { nested: true }, "e".repeat(rng.pick([5000, 1_100_000]))]),
        retryable: rng.pick<unknown>([undefined, true, false, "yes", 1, null]),
        attempt: attempt(),
      });
    case 6:
      return garbage("not JSON", rng.pick(["{not json", "", " ", "{", "}", "nul", "\u0000", randomString(rng, 40)]));
    case 7:
      return garbage("JSON that is not an object with a string type", rng.pick(["[1,2]", "null", "42", '"heartbeat"', '{"type":7}', '{"type":null}', '{"type":["heartbeat"]}', '{"no":"type"}', deepJsonText(rng.pick([100, 5000]), rng.bool())]));
    case 8:
      return garbage("unknown type", JSON.stringify({ type: rng.pick(["registration_ack", "task_assignment", "error", "HEARTBEAT", "heartbeat ", "", "__proto__", "constructor", randomString(rng, 20)]), task_id: randomUuid(rng) }));
    case 9:
      return garbage("binary frame", rng.bool() ? Buffer.from(JSON.stringify({ type: "heartbeat" })) : rng.bytes(rng.int(0, 200)), true);
    case 10: {
      // Byte-level mutation of a valid frame's text; may or may not still parse.
      const valid = JSON.stringify({ type: rng.pick(["heartbeat", "task_complete", "task_failed"]), task_id: randomUuid(rng), result: { a: 1 }, error: "x" });
      const { bytes, how } = mutateBytes(rng, Buffer.from(valid));
      const text = bytes.toString("utf8");
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = undefined;
      }
      const wellShaped = parsed !== null && typeof parsed === "object" && !Array.isArray(parsed) && ["register", "heartbeat", "task_complete", "task_failed"].includes((parsed as { type?: unknown }).type as string);
      return { label: `mutated frame (${how})`, data: text, binary: false, malformed: !wellShaped, oversize: false };
    }
    default: {
      const size = MAX_MESSAGE_BYTES + rng.int(1, 4096);
      return { label: `oversize frame (${size} bytes)`, data: JSON.stringify({ type: "heartbeat", pad: "x".repeat(size) }), binary: false, malformed: false, oversize: true };
    }
  }
}

/** A `/ws` socket that separates answers from frames the server pushes on its own. */
class FuzzSocket {
  readonly replies: Array<Record<string, unknown>> = [];
  readonly held: string[] = [];
  readonly problems: string[] = [];
  closed: { code: number } | undefined;
  private waiters: Array<() => void> = [];

  private constructor(readonly socket: WebSocket) {
    socket.on("message", (data) => {
      let f: unknown;
      try {
        f = JSON.parse(data.toString());
      } catch {
        this.problems.push(`server sent a non-JSON frame: ${show(data.toString(), 200)}`);
        return;
      }
      const frame = f as Record<string, unknown>;
      if (frame.type === "task_assignment") this.held.push(String(frame.task_id));
      else if (frame.type === "task_cancelled") this.held.splice(this.held.indexOf(String(frame.task_id)) >>> 0, 1);
      if (!UNSOLICITED.has(String(frame.type))) this.replies.push(frame);
      this.wake();
    });
    socket.on("close", (code) => {
      this.closed = { code };
      this.wake();
    });
    socket.on("error", () => {});
  }

  static async open(port: number): Promise<FuzzSocket> {
    const socket = new WebSocket(`ws://127.0.0.1:${port}/ws`, { maxPayload: 4 * MAX_MESSAGE_BYTES });
    await new Promise<void>((resolve, reject) => {
      socket.once("open", resolve);
      socket.once("error", reject);
    });
    return new FuzzSocket(socket);
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  async until(pred: () => boolean, timeoutMs = REPLY_TIMEOUT_MS): Promise<boolean> {
    return waitUntil(pred, timeoutMs, () => !!this.closed, this.waiters);
  }

  /** Sends and returns the next answer, or a description of why none came. */
  async exchange(data: string | Buffer, binary = false): Promise<Record<string, unknown> | string> {
    const n = this.replies.length;
    if (this.socket.readyState !== WebSocket.OPEN) return `socket not open (closed ${show(this.closed)})`;
    this.socket.send(data, { binary });
    if (!(await this.until(() => this.replies.length > n))) return this.closed ? `socket closed with ${this.closed.code} instead of answering` : `no answer within ${REPLY_TIMEOUT_MS} ms`;
    return this.replies[n]!;
  }

  close(): void {
    this.socket.terminate();
  }
}

// ---------------------------------------------------------------------------

describe.each(BACKENDS)("hostile input on $name", ({ name, available }) => {
  const total = name === "embedded" ? ITERATIONS : Math.max(30, Math.ceil(ITERATIONS / 3));
  const restCount = Math.round(total * 0.5);
  const wsCount = Math.round(total * 0.25);
  const grpcCount = total - restCount - wsCount;
  let s: TestServer;
  let h2: H2;
  /** Every task id a create answered 201/OK with, and what it must read back as. */
  const created = new Map<string, ExpectedTask>();
  /** Results an agent had acknowledged, per task: a completed task must hold one of them. */
  const ackedResults = new Map<string, Set<string>>();
  const findings: Finding[] = [];
  const counts = { rest: 0, ws: 0, grpc: 0 };
  const seedOf = (stream: string, i: number) => `${stream}#${i} (FUZZ_SEED=${SEED})`;

  /** Fails the phase with its findings, grouped by kind, each with a case to replay. */
  const report = (phase: string) => {
    const mine = findings.filter((f) => f.protocol.startsWith(phase));
    const groups = new Map<string, Finding[]>();
    for (const f of mine) {
      const kind = `[${f.protocol}] ${f.observed.replace(/"(?:[^"\\]|\\.)*"/g, '"…"').replace(/\b\d+\b/g, "N").slice(0, 140)}`;
      groups.set(kind, [...(groups.get(kind) ?? []), f]);
    }
    if (mine.length) {
      const text = [...groups.entries()]
        .map(([kind, fs]) => `${fs.length}× ${kind}\n${fs.slice(0, 3).map((f) => `    case ${f.caseId}\n      input:    ${f.input}\n      observed: ${f.observed}`).join("\n")}`)
        .join("\n");
      // eslint-disable-next-line no-console
      console.error(`[fuzz] ${name}: ${mine.length} finding(s) of ${groups.size} kind(s) in ${phase}, seed ${SEED}:\n${text}`);
    }
    expect([...groups.entries()].map(([kind, fs]) => `${fs.length}× ${kind} — e.g. ${fs[0]!.caseId}: ${fs[0]!.input.slice(0, 300)}`), `findings (seed ${SEED})`).toEqual([]);
  };

  const noteCreated = (id: string, e: ExpectedTask, protocol: string, caseId: string, input: string) => {
    if (!UUID.test(id)) findings.push({ protocol, caseId, input, observed: `created task id ${show(id)} is not a UUID` });
    else if (!created.has(id)) created.set(id, e);
  };

  const noteAck = (taskId: string, result: string) => {
    const set = ackedResults.get(taskId) ?? new Set<string>();
    set.add(result);
    ackedResults.set(taskId, set);
  };

  beforeAll(async () => {
    if (!available) return;
    s = await startServer(name, { env: { MAX_MESSAGE_BYTES: String(MAX_MESSAGE_BYTES) } });
    h2 = new H2(s.baseUrl);
  });
  afterAll(async () => {
    h2?.close();
    await s?.close();
  });

  it.skipIf(!available)(`REST: POST /tasks bodies, GET /tasks queries and GET /tasks/{id} paths (${restCount} inputs)`, { timeout: 120_000 }, async () => {
    const started = Date.now();
    await pool(restCount, CONCURRENCY, async (i) => {
      const rng = createRng(caseSeed(SEED, `${name}/rest`, i));
      const caseId = seedOf(`${name}/rest`, i);
      const kind = rng.int(0, 9);
      counts.rest++;
      if (kind < 6) {
        const input = restCreateInput(rng);
        const inputText = `${input.label}: POST /tasks ${show(input.headers)} ${show(input.body.toString("utf8"), 600)}`;
        let r: HttpResult;
        try {
          r = await httpRequest(s, "POST", "/tasks", input.body, input.headers);
        } catch (e: unknown) {
          findings.push({ protocol: "rest POST /tasks", caseId, input: inputText, observed: `request failed: ${String(e)}` });
          return;
        }
        const problems = restResponseProblems(r);
        if (r.status === 201) {
          const b = r.json as Record<string, unknown>;
          let sent: unknown;
          try {
            sent = JSON.parse(input.body.toString("utf8").replace(/^\ufeff/, ""));
          } catch {
            problems.push("201 for a body that is not JSON");
          }
          if (sent !== undefined) {
            const o = sent as Record<string, unknown>;
            const e: ExpectedTask = { taskType: String(o.task_type), description: String(o.description), priority: (o.priority as number | null | undefined) ?? 5, metadata: canonical(o.metadata ?? {}), via: "rest" };
            if (hasNonFinite(o.metadata)) problems.push("accepted metadata holding a number JSON cannot store (1e309 / -1e309): it cannot be read back as sent");
            if (typeof b?.task_id !== "string") problems.push(`201 without task_id: ${show(r.text)}`);
            else {
              noteCreated(b.task_id, e, "rest POST /tasks", caseId, inputText);
              const got = await httpRequest(s, "GET", `/tasks/${b.task_id}`);
              if (got.status !== 200) problems.push(`GET of the created task answered ${got.status}: ${show(got.text, 200)}`);
              else problems.push(...taskProblems(got.json).map((p) => `stored task malformed: ${p}`), ...intactProblems(got.json as Record<string, unknown>, e).map((p) => `stored task differs: ${p}`));
            }
          }
        }
        if (problems.length) findings.push({ protocol: "rest POST /tasks", caseId, input: inputText, observed: `${r.status} ${show(r.text, 300)} — ${problems.join("; ")}` });
      } else if (kind < 8) {
        const input = taskPathInput(rng, [...created.keys()]);
        const inputText = `${input.label}: GET ${show(input.path, 300)}`;
        let r: HttpResult;
        try {
          r = await httpRequest(s, "GET", input.path);
        } catch (e: unknown) {
          // node:http refuses some paths before sending; only a server failure counts.
          if ((e as { code?: string }).code === "ERR_UNESCAPED_CHARACTERS") return;
          findings.push({ protocol: "rest GET /tasks/{id}", caseId, input: inputText, observed: `request failed: ${String(e)}` });
          return;
        }
        const problems = restResponseProblems(r);
        if (r.status === 200) {
          problems.push(...taskProblems(r.json));
          const e = input.known ? created.get(input.known) : undefined;
          if (e) problems.push(...intactProblems(r.json as Record<string, unknown>, e));
        } else if (input.known) problems.push(`a created task answered ${r.status}`);
        if (problems.length) findings.push({ protocol: "rest GET /tasks/{id}", caseId, input: inputText, observed: `${r.status} ${show(r.text, 300)} — ${problems.join("; ")}` });
      } else {
        const query = listQueryInput(rng);
        const inputText = `GET /tasks${show(query, 600)}`;
        let r: HttpResult;
        try {
          r = await httpRequest(s, "GET", `/tasks${query}`);
        } catch (e: unknown) {
          if ((e as { code?: string }).code === "ERR_UNESCAPED_CHARACTERS") return;
          findings.push({ protocol: "rest GET /tasks", caseId, input: inputText, observed: `request failed: ${String(e)}` });
          return;
        }
        const problems = restResponseProblems(r);
        if (r.status === 200) {
          if (!Array.isArray(r.json)) problems.push("200 but not a JSON array");
          else for (const t of r.json) problems.push(...taskProblems(t));
        }
        if (problems.length) findings.push({ protocol: "rest GET /tasks", caseId, input: inputText, observed: `${r.status} ${show(r.text, 300)} — ${problems.join("; ")}` });
      }
    });
    // eslint-disable-next-line no-console
    console.log(`[fuzz] ${name}: REST ${counts.rest} inputs in ${Date.now() - started} ms, ${created.size} tasks created`);
    report("rest");
  });

  it.skipIf(!available)(`/ws: random and mutated frames, one socket per batch (${wsCount} frames)`, { timeout: 120_000 }, async () => {
    const started = Date.now();
    const perBatch = 10;
    const batches = Math.ceil(wsCount / perBatch);
    await pool(batches, CONCURRENCY, async (b) => {
      const rng = createRng(caseSeed(SEED, `${name}/ws`, b));
      const frames = Math.min(perBatch, wsCount - b * perBatch);
      let sock: FuzzSocket;
      try {
        sock = await FuzzSocket.open(s.port);
      } catch (e: unknown) {
        findings.push({ protocol: "ws", caseId: seedOf(`${name}/ws`, b), input: "open /ws", observed: `could not connect: ${String(e)}` });
        return;
      }
      try {
        let registered = false;
        if (rng.bool(0.85)) {
          const register = { type: "register", agent_type: "fuzz", agent_name: `fuzz-${b}`, capabilities: TASK_TYPES.filter(() => rng.bool(0.3)), max_concurrency: rng.int(1, 2) };
          const ack = await sock.exchange(JSON.stringify(register));
          if (typeof ack === "string" || ack.type !== "registration_ack") {
            findings.push({ protocol: "ws", caseId: seedOf(`${name}/ws`, b), input: show(register), observed: `valid register answered ${show(ack)}` });
            return;
          }
          registered = true;
        }
        for (let k = 0; k < frames; k++) {
          counts.ws++;
          const caseId = `${seedOf(`${name}/ws`, b)} frame ${k}${registered ? "" : " (unregistered socket)"}`;
          const f = randomWsFrame(rng, sock.held);
          const inputText = `${f.label}: ${f.binary ? "binary " : ""}${show(f.data, 500)}`;
          if (f.oversize) {
            sock.socket.send(f.data);
            await sock.until(() => sock.closed !== undefined);
            if (sock.closed?.code !== 1009) findings.push({ protocol: "ws", caseId, input: inputText, observed: `expected close 1009, got ${show(sock.closed)}; answers ${show(sock.replies.slice(-2))}` });
            break;
          }
          const reply = await sock.exchange(f.data, f.binary);
          const problems: string[] = [];
          if (typeof reply === "string") problems.push(reply);
          else if (reply.type === "error") {
            if (!WS_CODES.has(String(reply.code))) problems.push(`error code ${show(reply.code)}`);
            if (typeof reply.message !== "string" || !reply.message) problems.push("error without a message");
            if (f.malformed && reply.code !== "invalid_argument") problems.push(`malformed frame answered ${show(reply.code)}, not invalid_argument`);
          } else if (f.malformed) problems.push(`malformed frame answered ${show(reply)}`);
          else if (reply.type === "registration_ack") registered = true;
          else if (reply.type === "completion_ack") {
            if (f.completes && f.completes.taskId === reply.task_id) noteAck(f.completes.taskId, f.completes.result);
          } else if (reply.type !== "heartbeat_ack") problems.push(`unexpected answer ${show(reply)}`);
          if (problems.length) {
            findings.push({ protocol: "ws", caseId, input: inputText, observed: `${show(reply, 300)} — ${problems.join("; ")}` });
            if (typeof reply === "string") break;
          }
          // Exactly one answer, and the socket still works: the next answer is the heartbeat's.
          const probe = await sock.exchange(JSON.stringify({ type: "heartbeat" }));
          const want = registered ? "heartbeat_ack" : "error";
          if (typeof probe === "string" || probe.type !== want || (!registered && probe.code !== "failed_precondition")) {
            findings.push({ protocol: "ws", caseId, input: inputText, observed: `heartbeat after it answered ${show(probe)} (wanted ${want}${registered ? "" : " failed_precondition"}); a second answer or an unusable socket` });
            break;
          }
          for (const p of sock.problems.splice(0)) findings.push({ protocol: "ws", caseId, input: inputText, observed: p });
        }
      } finally {
        sock.close();
      }
    });
    // eslint-disable-next-line no-console
    console.log(`[fuzz] ${name}: /ws ${counts.ws} frames in ${Date.now() - started} ms`);
    report("ws");
  });

  it.skipIf(!available)(`gRPC: CreateTask fields, mutated and random message bytes, GetTask/ListTasks, Session streams (${grpcCount} inputs)`, { timeout: 120_000 }, async () => {
    const started = Date.now();
    const tasks = grpcClient("TaskService", s.port);
    const sessionBatch = 8;
    const sessionInputs = Math.round(grpcCount * 0.25);
    const sessionBatches = Math.ceil(sessionInputs / sessionBatch);
    const unaryCount = grpcCount - sessionInputs;

    const checkReply = (protocol: string, caseId: string, inputText: string, r: GrpcReply): boolean => {
      const problems: string[] = [];
      if (r.httpStatus !== 200) problems.push(`HTTP status ${r.httpStatus}`);
      if (r.grpcStatus === undefined) problems.push("no grpc-status");
      else if (r.grpcStatus !== 0 && !GRPC_ERROR_CODES.has(r.grpcStatus) && !isDecodeFailure(r.grpcStatus, r.grpcMessage)) problems.push(`grpc-status ${r.grpcStatus} (${grpc.status[r.grpcStatus] ?? "?"})`);
      if (/\bat .*\.(js|ts):\d+/.test(r.grpcMessage)) problems.push("stack trace in grpc-message");
      if (problems.length) findings.push({ protocol, caseId, input: inputText, observed: `grpc-status ${r.grpcStatus} ${show(r.grpcMessage, 200)} — ${problems.join("; ")}` });
      return problems.length === 0;
    };

    /** An OK CreateTask: the response and the stored row must both match the decoded request. */
    const checkCreated = async (protocol: string, caseId: string, inputText: string, payload: Uint8Array, r: GrpcReply) => {
      const problems: string[] = [];
      let req: ReturnType<typeof randomCreateTaskRequest> | undefined;
      try {
        req = fromBinary(CreateTaskRequestSchema, payload);
      } catch (e: unknown) {
        problems.push(`OK for a message that does not decode: ${String(e)}`);
      }
      const res = r.messages.length === 1 ? fromBinary(CreateTaskResponseSchema, r.messages[0]!) : undefined;
      if (!res?.task) problems.push(`OK with ${r.messages.length} messages and no task`);
      if (req && res?.task) {
        const e = expectedFromRequest(req, "grpc");
        if (hasNonFinite(req.metadata)) problems.push("accepted a metadata number JSON cannot store (NaN/Infinity): it cannot be read back as sent");
        noteCreated(res.task.taskId, e, protocol, caseId, inputText);
        const got = await httpRequest(s, "GET", `/tasks/${res.task.taskId}`);
        if (got.status !== 200) problems.push(`GET of the created task answered ${got.status}`);
        else problems.push(...taskProblems(got.json).map((p) => `stored task malformed: ${p}`), ...intactProblems(got.json as Record<string, unknown>, e).map((p) => `stored task differs: ${p}`));
      }
      if (problems.length) findings.push({ protocol, caseId, input: inputText, observed: problems.join("; ") });
    };

    try {
      await pool(unaryCount, CONCURRENCY, async (i) => {
        const rng = createRng(caseSeed(SEED, `${name}/grpc`, i));
        const caseId = seedOf(`${name}/grpc`, i);
        const kind = rng.int(0, 9);
        counts.grpc++;
        try {
          if (kind <= 3) {
            const req = randomCreateTaskRequest(rng);
            const payload = toBinary(CreateTaskRequestSchema, req);
            const inputText = `CreateTask ${show({ ...req, $typeName: undefined, metadata: req.metadata === undefined ? undefined : show(req.metadata, 200), description: show(req.description, 200) })}`;
            const r = await h2.unary("/aaos.v1.TaskService/CreateTask", grpcEnvelope(payload));
            if (checkReply("grpc CreateTask fields", caseId, inputText, r) && r.grpcStatus === 0) await checkCreated("grpc CreateTask fields", caseId, inputText, payload, r);
          } else if (kind <= 5) {
            const valid = toBinary(CreateTaskRequestSchema, create(CreateTaskRequestSchema, { taskType: rng.int(1, 7), description: validDescription(rng), priority: rng.bool() ? rng.int(0, 10) : undefined, metadata: rng.bool() ? (randomObject(rng, 2) as JsonObject) : undefined }));
            const { bytes, how } = mutateBytes(rng, valid);
            const inputText = `CreateTask bytes ${show(valid)} mutated (${how}) → ${show(bytes)}`;
            const r = await h2.unary("/aaos.v1.TaskService/CreateTask", grpcEnvelope(bytes));
            if (checkReply("grpc CreateTask mutated bytes", caseId, inputText, r) && r.grpcStatus === 0) await checkCreated("grpc CreateTask mutated bytes", caseId, inputText, bytes, r);
          } else if (kind === 6) {
            const payload = rng.bytes(rng.pick([0, 1, 5, 64, 512, rng.int(0, 2000)]));
            const prefix = rng.pick(["valid", "valid", "longer", "shorter", "huge", "none", "compressed-flag", "flag-ff", "two-messages"]);
            let body: Buffer;
            if (prefix === "valid") body = grpcEnvelope(payload);
            else if (prefix === "longer") body = grpcEnvelope(payload, { length: payload.length + rng.int(1, 100) });
            else if (prefix === "shorter") body = grpcEnvelope(payload, { length: Math.max(0, payload.length - rng.int(1, 5)) });
            else if (prefix === "huge") body = grpcEnvelope(payload, { length: rng.pick([MAX_MESSAGE_BYTES + 1, 0xffffffff, 0x7fffffff]) });
            else if (prefix === "none") body = payload;
            else if (prefix === "compressed-flag") body = grpcEnvelope(payload, { flags: 1 });
            else if (prefix === "flag-ff") body = grpcEnvelope(payload, { flags: 0xff });
            else body = Buffer.concat([grpcEnvelope(payload), grpcEnvelope(payload)]);
            const path = rng.pick(["/aaos.v1.TaskService/CreateTask", "/aaos.v1.TaskService/GetTask", "/aaos.v1.TaskService/ListTasks", "/aaos.v1.TaskService/CancelTask"]);
            const inputText = `${path} with random bytes, prefix ${prefix}: ${show(body)}`;
            const r = await h2.unary(path, body);
            if (checkReply(`grpc random bytes (${prefix})`, caseId, inputText, r) && r.grpcStatus === 0 && path.endsWith("CreateTask")) await checkCreated(`grpc random bytes (${prefix})`, caseId, inputText, payload, r);
          } else if (kind === 7) {
            const meta = randomObject(rng, 3);
            const req: Record<string, unknown> = {
              task_type: rng.pick(["TASK_TYPE_CODE", "TASK_TYPE_QA", "TASK_TYPE_TRADING", "TASK_TYPE_UNSPECIFIED", 0, 7, 8, 42]),
              description: rng.pick([validDescription(rng), randomString(rng, 50), "", "y".repeat(2001)]),
              metadata: toStruct(meta),
            };
            if (rng.bool()) req.priority = rng.pick(INT32_SPECIAL);
            const inputText = `grpc-js CreateTask ${show(req, 500)}`;
            try {
              const res = await unary(tasks, "CreateTask", req);
              const t = res.task as Record<string, unknown>;
              // The client encodes strings as UTF-8, so lone surrogates arrive as U+FFFD.
              const e: ExpectedTask = { taskType: String(t.task_type).replace(/^TASK_TYPE_/, "").toLowerCase(), description: utf8RoundTrip(req.description) as string, priority: (req.priority as number | undefined) ?? 5, metadata: canonical(utf8RoundTrip(meta)), via: "grpc-js" };
              noteCreated(String(t.task_id), e, "grpc-js CreateTask", caseId, inputText);
              const answered = { ...t, task_type: e.taskType, metadata: fromStruct(t.metadata as Parameters<typeof fromStruct>[0]) };
              for (const p of intactProblems(answered, e)) findings.push({ protocol: "grpc-js CreateTask", caseId, input: inputText, observed: `answer differs: ${p}` });
              const typeOk = typeof req.task_type === "number" ? Number(req.task_type) >= 1 && Number(req.task_type) <= 7 : req.task_type !== "TASK_TYPE_UNSPECIFIED";
              if (!typeOk) findings.push({ protocol: "grpc-js CreateTask", caseId, input: inputText, observed: `OK for task_type ${show(req.task_type)}: ${show(t, 300)}` });
            } catch (e: unknown) {
              const err = e as grpc.ServiceError;
              if (!GRPC_ERROR_CODES.has(err.code) && !isDecodeFailure(err.code, err.details)) findings.push({ protocol: "grpc-js CreateTask", caseId, input: inputText, observed: `status ${err.code} (${grpc.status[err.code] ?? "?"}): ${err.details}` });
            }
          } else {
            const get = kind === 8;
            const payload = get
              ? toBinary(GetTaskRequestSchema, create(GetTaskRequestSchema, { taskId: rng.pick([randomUuid(rng), randomString(rng, 40), "", "0".repeat(5000), ...[...created.keys()].slice(0, 1)]) }))
              : toBinary(ListTasksRequestSchema, create(ListTasksRequestSchema, { pageSize: rng.pick(INT32_SPECIAL), pageToken: rng.pick(["", randomString(rng, 40), "garbage!!", Buffer.from(randomString(rng, 20)).toString("base64"), Buffer.from(JSON.stringify({ offset: -1 })).toString("base64url")]), status: rng.pick(ENUM_NUMBERS), taskType: rng.pick(ENUM_NUMBERS) }));
            const path = get ? "/aaos.v1.TaskService/GetTask" : "/aaos.v1.TaskService/ListTasks";
            const inputText = `${path} ${show(get ? fromBinary(GetTaskRequestSchema, payload) : fromBinary(ListTasksRequestSchema, payload), 400)}`;
            const r = await h2.unary(path, grpcEnvelope(payload));
            checkReply(`grpc ${get ? "GetTask" : "ListTasks"}`, caseId, inputText, r);
          }
        } catch (e: unknown) {
          findings.push({ protocol: "grpc", caseId, input: `case kind ${kind}`, observed: `call failed: ${String(e)}` });
        }
      });

      await pool(sessionBatches, CONCURRENCY, async (b) => {
        const rng = createRng(caseSeed(SEED, `${name}/session`, b));
        const stream = h2.stream("/aaos.v1.AgentService/Session");
        const held: string[] = [];
        let replies: SessionResponse[] = [];
        let seen = 0;
        const decodeNew = () => {
          for (; seen < stream.messages.length; seen++) {
            const m = fromBinary(SessionResponseSchema, stream.messages[seen]!);
            if (m.kind.case === "taskAssignment") held.push(m.kind.value.task?.taskId ?? "");
            else if (m.kind.case === "taskCancelled" || m.kind.case === "drain") continue;
            else replies.push(m);
          }
        };
        const exchange = async (payload: Uint8Array, raw = false): Promise<SessionResponse | string> => {
          const n = replies.length;
          stream.send(payload, raw);
          await stream.until(() => (decodeNew(), replies.length > n));
          decodeNew();
          if (replies.length > n) return replies[n]!;
          return stream.ended ? `stream ended (grpc-status ${stream.grpcStatus} ${show(stream.grpcMessage)}) instead of answering` : `no answer within ${REPLY_TIMEOUT_MS} ms`;
        };
        const caseBase = seedOf(`${name}/session`, b);
        try {
          const register = create(SessionRequestSchema, { kind: { case: "register", value: { agentName: `fuzz-grpc-${b}`, agentType: "fuzz", capabilities: [1, 2, 3, 4, 5, 6, 7].filter(() => rng.bool(0.3)), maxConcurrency: rng.int(1, 2) } } });
          const ack = await exchange(toBinary(SessionRequestSchema, register));
          if (typeof ack === "string" || ack.kind.case !== "registrationAck") {
            findings.push({ protocol: "grpc Session", caseId: caseBase, input: "valid register", observed: `answered ${typeof ack === "string" ? ack : show(ack.kind)}` });
            return;
          }
          const count = Math.min(sessionBatch, sessionInputs - b * sessionBatch);
          for (let k = 0; k < count; k++) {
            counts.grpc++;
            const caseId = `${caseBase} message ${k}`;
            const mutate = rng.bool(0.08);
            const msg = randomSessionRequest(rng, held);
            let payload: Uint8Array = toBinary(SessionRequestSchema, msg);
            let inputText = `SessionRequest ${show(msg.kind.case)} ${show({ ...msg.kind.value, $typeName: undefined }, 400)}`;
            if (mutate) {
              const m = mutateBytes(rng, payload);
              payload = m.bytes;
              inputText = `SessionRequest bytes mutated (${m.how}): ${show(payload)}`;
            }
            const reply = await exchange(payload);
            if (typeof reply === "string") {
              // Undecodable bytes may end the stream, but only with a proper status.
              const ok = mutate && stream.ended && stream.grpcStatus !== undefined && (GRPC_ERROR_CODES.has(stream.grpcStatus) || isDecodeFailure(stream.grpcStatus, stream.grpcMessage ?? ""));
              if (!ok) findings.push({ protocol: "grpc Session", caseId, input: inputText, observed: reply });
              return;
            }
            const problems: string[] = [];
            if (reply.kind.case === "error") {
              if (!WS_CODES.has(reply.kind.value.code)) problems.push(`error code ${show(reply.kind.value.code)}`);
            } else if (reply.kind.case === "completionAck") {
              if (msg.kind.case === "taskComplete" && !mutate && msg.kind.value.taskId === reply.kind.value.taskId) noteAck(reply.kind.value.taskId, canonical(utf8RoundTrip(msg.kind.value.result ?? {})));
            } else if (reply.kind.case !== "heartbeatAck" && reply.kind.case !== "registrationAck") problems.push(`unexpected answer ${show(reply.kind.case)}`);
            if (problems.length) findings.push({ protocol: "grpc Session", caseId, input: inputText, observed: problems.join("; ") });
            const probe = await exchange(toBinary(SessionRequestSchema, create(SessionRequestSchema, { kind: { case: "heartbeat", value: {} } })));
            if (typeof probe === "string" || probe.kind.case !== "heartbeatAck") {
              findings.push({ protocol: "grpc Session", caseId, input: inputText, observed: `heartbeat after it answered ${typeof probe === "string" ? probe : show(probe.kind)}; a second answer or a dead stream` });
              return;
            }
            replies = replies.slice(-4);
          }
          stream.halfClose();
          await stream.until(() => stream.ended);
          if (!stream.ended || stream.grpcStatus === undefined || (stream.grpcStatus !== 0 && !GRPC_ERROR_CODES.has(stream.grpcStatus) && !isDecodeFailure(stream.grpcStatus, stream.grpcMessage ?? ""))) {
            findings.push({ protocol: "grpc Session", caseId: caseBase, input: "half-close after the batch", observed: `ended ${stream.ended}, grpc-status ${stream.grpcStatus} ${show(stream.grpcMessage)}` });
          }
        } catch (e: unknown) {
          findings.push({ protocol: "grpc Session", caseId: caseBase, input: "session batch", observed: `failed: ${String(e)}` });
        } finally {
          stream.cancel();
        }
      });
    } finally {
      tasks.close();
    }
    // eslint-disable-next-line no-console
    console.log(`[fuzz] ${name}: gRPC ${counts.grpc} inputs in ${Date.now() - started} ms`);
    report("grpc");
  });

  it.skipIf(!available)("afterwards: the server is alive, no task row is corrupted, the count matches the creates, no error was logged", { timeout: 120_000 }, async () => {
    const problems: string[] = [];
    const health = await httpRequest(s, "GET", "/health");
    expect(health.status, health.text).toBe(200);

    // Every task, through the listing (newest first, up to 1000) and through gRPC paging.
    const listed = await httpRequest(s, "GET", "/tasks?limit=1000");
    expect(listed.status, listed.text).toBe(200);
    const list = listed.json as Array<Record<string, unknown>>;
    for (const t of list) for (const p of taskProblems(t)) problems.push(`GET /tasks: ${show(t.task_id)}: ${p}`);
    expect(list.length).toBe(Math.min(1000, created.size));
    const tasks = grpcClient("TaskService", s.port);
    const allIds = new Set<string>();
    try {
      let token = "";
      do {
        const page = await unary(tasks, "ListTasks", { page_size: 500, page_token: token });
        for (const t of page.tasks as Array<{ task_id: string }>) allIds.add(t.task_id);
        token = page.next_page_token as string;
      } while (token);
    } finally {
      tasks.close();
    }
    for (const id of allIds) if (!created.has(id)) problems.push(`task ${id} exists but no create answered 201/OK for it`);
    for (const id of created.keys()) if (!allIds.has(id)) problems.push(`task ${id} was created (${created.get(id)!.via}) but is not listed`);

    // Each one read back on its own: well-formed, still what was sent, a completed one holds an acknowledged result.
    await pool(created.size, CONCURRENCY, async (i) => {
      const [id, e] = [...created.entries()][i]!;
      const r = await httpRequest(s, "GET", `/tasks/${id}`);
      if (r.status !== 200) return void problems.push(`GET /tasks/${id}: ${r.status} ${show(r.text, 200)}`);
      const t = r.json as Record<string, unknown>;
      for (const p of [...taskProblems(t), ...intactProblems(t, e)]) problems.push(`GET /tasks/${id} (created via ${e.via}): ${p}`);
      const acked = ackedResults.get(id);
      if (t.status === "completed" && acked && !acked.has(canonical(t.result))) problems.push(`task ${id} completed with result ${show(canonical(t.result), 200)}, which no acknowledged completion sent (${show([...acked], 300)})`);
    });
    expect(allIds.size, `tasks in the store vs creates answered 201/OK (seed ${SEED})`).toBe(created.size);

    // An error or fatal log line means an exception nobody expected.
    const bad = s.logs.lines.filter((l) => l.level === "error" || l.level === "fatal");
    for (const l of bad) problems.push(`log ${l.level}: ${show(l, 1500)}`);
    if (problems.length) {
      // eslint-disable-next-line no-console
      console.error(`[fuzz] ${name}: ${problems.length} problem(s) after the run, seed ${SEED}:\n${problems.map((p) => `- ${p}`).join("\n")}`);
    }
    // eslint-disable-next-line no-console
    console.log(`[fuzz] ${name}: ${counts.rest + counts.ws + counts.grpc} inputs in total (REST ${counts.rest}, /ws ${counts.ws}, gRPC ${counts.grpc}); ${created.size} tasks created; ${s.logs.lines.length} log lines`);
    expect(problems, `after-run checks (seed ${SEED})`).toEqual([]);
  });
});

/** What a string (or the strings in a JSON value) become after a UTF-8 encode/decode. */
function utf8RoundTrip(v: unknown): unknown {
  if (typeof v === "string") return Buffer.from(v, "utf8").toString("utf8");
  if (Array.isArray(v)) return v.map(utf8RoundTrip);
  if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [utf8RoundTrip(k) as string, utf8RoundTrip(x)]));
  return v;
}

/** proto-loader's Struct object form → plain JSON (a local copy tolerant of missing `kind`). */
