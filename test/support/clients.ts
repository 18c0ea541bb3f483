import path from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import WebSocket from "ws";

const PROTO_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");

/** grpc-js service constructors loaded from the .proto files, as a non-Connect client would. */
const definition = protoLoader.loadSync(
  ["aaos/v1/task_service.proto", "aaos/v1/agent_service.proto", "aaos/v1/metrics_service.proto", "grpc/health/v1/health.proto"],
  { includeDirs: [PROTO_DIR], keepCase: true, enums: String, longs: Number, defaults: true, oneofs: true },
);
// eslint-disable-next-line @typescript-eslint/no-explicit-any
const loaded = grpc.loadPackageDefinition(definition) as any;

type GrpcCtor = new (address: string, creds: grpc.ChannelCredentials) => grpc.Client & Record<string, Function>;
export const grpcServices = {
  TaskService: loaded.aaos.v1.TaskService as GrpcCtor,
  AgentService: loaded.aaos.v1.AgentService as GrpcCtor,
  MetricsService: loaded.aaos.v1.MetricsService as GrpcCtor,
  Health: loaded.grpc.health.v1.Health as GrpcCtor,
};

export function grpcClient(name: keyof typeof grpcServices, port: number) {
  return new grpcServices[name](`127.0.0.1:${port}`, grpc.credentials.createInsecure());
}

/** Promisified unary call on a grpc-js client. */
export function unary<T = any>(client: grpc.Client, method: string, request: object, metadata = new grpc.Metadata()): Promise<T> {
  return new Promise((resolve, reject) => {
    (client as unknown as Record<string, Function>)[method]!(request, metadata, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

// google.protobuf.Struct in proto-loader's object form.
type PbValue = { nullValue?: string; numberValue?: number; stringValue?: string; boolValue?: boolean; structValue?: PbStruct; listValue?: { values: PbValue[] }; kind?: string };
type PbStruct = { fields: Record<string, PbValue> };

export function toStruct(obj: Record<string, unknown>): PbStruct {
  const value = (v: unknown): PbValue => {
    if (v === null) return { nullValue: "NULL_VALUE" };
    if (typeof v === "number") return { numberValue: v };
    if (typeof v === "string") return { stringValue: v };
    if (typeof v === "boolean") return { boolValue: v };
    if (Array.isArray(v)) return { listValue: { values: v.map(value) } };
    return { structValue: toStruct(v as Record<string, unknown>) };
  };
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, value(v)])) };
}

export function fromStruct(s: PbStruct | null | undefined): Record<string, unknown> {
  const value = (v: PbValue): unknown => {
    switch (v.kind) {
      case "nullValue":
        return null;
      case "numberValue":
        return v.numberValue;
      case "stringValue":
        return v.stringValue;
      case "boolValue":
        return v.boolValue;
      case "listValue":
        return (v.listValue?.values ?? []).map(value);
      default:
        return fromStruct(v.structValue);
    }
  };
  return Object.fromEntries(Object.entries(s?.fields ?? {}).map(([k, v]) => [k, value(v)]));
}

/** What a test agent was given, the same whatever its transport. */
export interface Assignment {
  taskId: string;
  taskType: string;
  priority: number;
  attempt: number;
  correlationId: string;
  metadata: Record<string, unknown>;
  description: string;
}

/** Any server message, normalised: `type` plus the fields tests look at. */
export interface ServerFrame {
  type: string;
  taskId?: string;
  code?: string;
  message?: string;
  agentId?: string;
}

export interface AgentOptions {
  agentId?: string;
  /** Lower-case task types; empty = every type. */
  capabilities?: string[];
  maxConcurrency?: number;
  /** Complete every assignment at once with this result (default: hold tasks). */
  autoComplete?: (a: Assignment) => Record<string, unknown>;
}

/**
 * A worker agent driven by a test, over gRPC (grpc-js bidi `Session`) or the
 * legacy `/ws` JSON protocol. Records everything the server sends.
 */
export abstract class TestAgent {
  readonly frames: ServerFrame[] = [];
  readonly assignments: Assignment[] = [];
  agentId = "";
  closed = false;
  /** WebSocket close code, when the server closed a WS agent. */
  closeCode: number | undefined;
  private waiters: Array<() => void> = [];

  constructor(protected readonly options: AgentOptions) {}

  protected onFrame(frame: ServerFrame, assignment?: Assignment): void {
    this.frames.push(frame);
    if (frame.type === "registration_ack") this.agentId = frame.agentId ?? "";
    if (assignment) {
      this.assignments.push(assignment);
      if (this.options.autoComplete) this.complete(assignment.taskId, this.options.autoComplete(assignment));
    }
    for (const w of this.waiters.splice(0)) w();
  }

  protected onClosed(): void {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves when `pred` holds over what was received so far. */
  async waitFor(pred: (agent: this) => boolean, timeoutMs = 10_000, what = "agent condition"): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred(this)) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.frames.slice(-5))}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 200));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  waitForFrame(type: string, count = 1, timeoutMs?: number): Promise<void> {
    return this.waitFor((a) => a.frames.filter((f) => f.type === type).length >= count, timeoutMs, `${count} × ${type}`);
  }

  abstract register(): void;
  abstract heartbeat(): void;
  abstract complete(taskId: string, result: Record<string, unknown>, attempt?: number): void;
  abstract fail(taskId: string, error: string, retryable?: boolean): void;
  /** Ends the stream cleanly. */
  abstract end(): Promise<void>;
  /** Drops the connection without a goodbye, like a crashed process. */
  abstract kill(): void;
}

const pbType = (t: string) => `TASK_TYPE_${t.toUpperCase()}`;
const plainType = (t: string) => t.replace(/^TASK_TYPE_/, "").toLowerCase();

export class GrpcAgent extends TestAgent {
  private readonly client: grpc.Client;
  private readonly call: grpc.ClientDuplexStream<any, any>;

  private constructor(port: number, options: AgentOptions, metadata: grpc.Metadata) {
    super(options);
    this.client = grpcClient("AgentService", port);
    this.call = (this.client as unknown as { Session(m: grpc.Metadata): grpc.ClientDuplexStream<any, any> }).Session(metadata);
    this.call.on("data", (m: any) => {
      const kind = m.kind as string;
      const v = m[kind] ?? {};
      const type = kind.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
      if (kind === "task_assignment") {
        const t = v.task;
        this.onFrame(
          { type: "task_assignment", taskId: t.task_id },
          { taskId: t.task_id, taskType: plainType(t.task_type), priority: t.priority, attempt: t.attempt, correlationId: t.correlation_id, metadata: fromStruct(t.metadata), description: t.description },
        );
      } else {
        this.onFrame({ type, taskId: v.task_id || undefined, code: v.code, message: v.message, agentId: v.agent_id });
      }
    });
    this.call.on("error", () => this.onClosed());
    this.call.on("end", () => this.onClosed());
  }

  /** Opens a session and registers; resolves after registration_ack. */
  static async connect(port: number, options: AgentOptions = {}, metadata = new grpc.Metadata()): Promise<GrpcAgent> {
    const agent = new GrpcAgent(port, options, metadata);
    agent.register();
    await agent.waitForFrame("registration_ack");
    return agent;
  }

  send(message: object): void {
    if (!this.closed) this.call.write(message);
  }
  register(): void {
    this.send({ register: { agent_id: this.options.agentId ?? "", agent_name: "test-grpc", agent_type: "test", capabilities: (this.options.capabilities ?? []).map(pbType), max_concurrency: this.options.maxConcurrency ?? 1 } });
  }
  heartbeat(): void {
    this.send({ heartbeat: {} });
  }
  complete(taskId: string, result: Record<string, unknown>, attempt = 0): void {
    this.send({ task_complete: { task_id: taskId, result: toStruct(result), attempt } });
  }
  fail(taskId: string, error: string, retryable = true): void {
    this.send({ task_failed: { task_id: taskId, error, retryable } });
  }
  async end(): Promise<void> {
    if (this.closed) return;
    this.call.end();
    await this.waitFor((a) => a.closed, 5000, "stream end");
    this.client.close();
  }
  kill(): void {
    this.call.cancel();
    this.client.close();
    this.onClosed();
  }
}

export class WsAgent extends TestAgent {
  private constructor(
    private readonly socket: WebSocket,
    options: AgentOptions,
  ) {
    super(options);
    socket.on("message", (data) => {
      const f = JSON.parse(data.toString()) as Record<string, any>;
      if (f.type === "task_assignment") {
        this.onFrame(
          { type: f.type, taskId: f.task_id },
          { taskId: f.task_id, taskType: f.task_type, priority: f.priority, attempt: f.attempt, correlationId: f.correlation_id, metadata: f.metadata, description: f.description },
        );
      } else {
        this.onFrame({ type: f.type, taskId: f.task_id, code: f.code, message: f.message, agentId: f.agent_id });
      }
    });
    socket.on("close", (code) => {
      this.closeCode = code;
      this.onClosed();
    });
    socket.on("error", () => this.onClosed());
  }

  /** Opens /ws and, unless `register` is false, registers and waits for the ack. */
  static async connect(port: number, options: AgentOptions = {}, { register = true, headers = {} as Record<string, string> } = {}): Promise<WsAgent> {
    const socket = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers });
    await new Promise<void>((resolve, reject) => {
      socket.once("open", resolve);
      socket.once("error", reject);
    });
    const agent = new WsAgent(socket, options);
    if (register) {
      agent.register();
      await agent.waitForFrame("registration_ack");
    }
    return agent;
  }

  sendRaw(data: string | Buffer): void {
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(data);
  }
  send(frame: object): void {
    this.sendRaw(JSON.stringify(frame));
  }
  register(): void {
    this.send({ type: "register", agent_id: this.options.agentId, agent_name: "test-ws", agent_type: "test", capabilities: this.options.capabilities ?? [], max_concurrency: this.options.maxConcurrency ?? 1 });
  }
  heartbeat(): void {
    this.send({ type: "heartbeat" });
  }
  complete(taskId: string, result: Record<string, unknown>, attempt?: number): void {
    this.send({ type: "task_complete", task_id: taskId, result, ...(attempt ? { attempt } : {}) });
  }
  fail(taskId: string, error: string, retryable = true): void {
    this.send({ type: "task_failed", task_id: taskId, error, retryable });
  }
  async end(): Promise<void> {
    if (this.closed) return;
    this.socket.close(1000);
    await this.waitFor((a) => a.closed, 5000, "socket close");
  }
  kill(): void {
    this.socket.terminate();
    this.onClosed();
  }
}
