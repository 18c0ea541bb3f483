/**
 * The benchmark's view of the service: plain grpc-js clients over the
 * `.proto` files, exactly as a third-party client would be built. grpc-js with
 * proto-loader (protobufjs codegen'd codecs) costs less client CPU per call than
 * Connect's reflection-based codec, so the client side stays out of the way.
 */
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTO_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");

const definition = protoLoader.loadSync(["aaos/v1/task_service.proto", "aaos/v1/agent_service.proto"], {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: false,
  oneofs: true,
});
const loaded = grpc.loadPackageDefinition(definition) as unknown as {
  aaos: { v1: { TaskService: grpc.ServiceClientConstructor; AgentService: grpc.ServiceClientConstructor } };
};

/** Epoch milliseconds with sub-millisecond precision, comparable across threads of one machine. */
export const nowMs = (): number => performance.timeOrigin + performance.now();

/** Channel options: a private subchannel pool, so every client gets its own HTTP/2 connection. */
const channelOptions = (): grpc.ChannelOptions => ({
  "grpc.use_local_subchannel_pool": 1,
  "grpc.max_receive_message_length": 16 * 1024 * 1024,
  "grpc.keepalive_time_ms": 3_600_000,
});

/** Lower-case task type → proto enum name. */
export const pbTaskType = (t: string): string => `TASK_TYPE_${t.toUpperCase()}`;

export interface CreateOptions {
  taskType: string;
  priority: number;
}

/** A CreateTask producer on one HTTP/2 connection; many calls may be in flight. */
export class Producer {
  private readonly client: grpc.Client & { CreateTask: Function };

  constructor(address: string) {
    const Ctor = loaded.aaos.v1.TaskService;
    this.client = new Ctor(address, grpc.credentials.createInsecure(), channelOptions()) as unknown as grpc.Client & { CreateTask: Function };
  }

  async ready(timeoutMs = 10_000): Promise<void> {
    await new Promise<void>((resolve, reject) => this.client.waitForReady(Date.now() + timeoutMs, (e) => (e ? reject(e) : resolve())));
  }

  /** Creates one task stamped with its send time in `metadata.t` (epoch ms). */
  create(o: CreateOptions): Promise<void> {
    const request = {
      task_type: pbTaskType(o.taskType),
      description: "benchmark task",
      priority: o.priority,
      metadata: { fields: { t: { numberValue: nowMs() } } },
    };
    return new Promise((resolve, reject) => {
      this.client.CreateTask(request, (err: grpc.ServiceError | null) => (err ? reject(err) : resolve()));
    });
  }

  close(): void {
    this.client.close();
  }
}

/** One agent session's counters, shared by all agents of a pool. */
export interface AgentStats {
  received: number;
  completed: number;
  firstReceiveMs: number;
  lastCompletionMs: number;
  /** create (metadata.t) → assignment received, ms. */
  latencies: number[];
}

export const emptyStats = (): AgentStats => ({ received: 0, completed: 0, firstReceiveMs: 0, lastCompletionMs: 0, latencies: [] });

export interface AgentPoolOptions {
  address: string;
  count: number;
  maxConcurrency: number;
  /** Lower-case task types; empty = every type. */
  capabilities: string[];
  /** Sessions multiplexed on one HTTP/2 connection. */
  streamsPerChannel: number;
  /** 0 = never heartbeat (the service must run with a long HEARTBEAT_TIMEOUT_MS). */
  heartbeatMs: number;
  /** Sessions opened concurrently while connecting. */
  connectConcurrency?: number;
  /** Times a refused or dropped registration is retried, like a reconnecting agent. */
  registerRetries?: number;
  /** Stop opening new sessions after this long (the pool then holds fewer than `count`). */
  connectBudgetMs?: number;
}

interface SessionCall {
  write(message: object): boolean;
  on(event: string, listener: (...args: any[]) => void): void;
  end(): void;
  cancel(): void;
}

type AgentClient = grpc.Client & { Session(): SessionCall };

/**
 * `count` agents on `ceil(count / streamsPerChannel)` connections. Each agent
 * completes every assignment at once; the pool records create→received
 * latency and completion times.
 */
export class AgentPool {
  stats: AgentStats = emptyStats();
  private readonly clients: AgentClient[] = [];
  private readonly calls: SessionCall[] = [];
  private readonly timers: NodeJS.Timeout[] = [];
  private closing = false;
  /** Sessions that ended unexpectedly (the service closed them). */
  lost = 0;
  /** Registrations that had to be retried. */
  retries = 0;
  /** Agents that could not register at all (after every retry). */
  failed = 0;
  lastError = "";

  constructor(private readonly o: AgentPoolOptions) {}

  async connect(): Promise<void> {
    const Ctor = loaded.aaos.v1.AgentService;
    const channels = Math.ceil(this.o.count / this.o.streamsPerChannel);
    for (let i = 0; i < channels; i++) {
      this.clients.push(new Ctor(this.o.address, grpc.credentials.createInsecure(), channelOptions()) as unknown as AgentClient);
    }
    const register = {
      register: {
        agent_name: "bench",
        agent_type: "bench",
        capabilities: this.o.capabilities.map(pbTaskType),
        max_concurrency: this.o.maxConcurrency,
      },
    };
    let next = 0;
    const openOne = (i: number) =>
      new Promise<void>((resolve, reject) => {
        const call = this.clients[Math.floor(i / this.o.streamsPerChannel)]!.Session();
        this.calls.push(call);
        let registered = false;
        call.on("data", (m: Record<string, any>) => {
          switch (m.kind) {
            case "task_assignment": {
              const t = m.task_assignment.task;
              const now = nowMs();
              const s = this.stats;
              if (s.received++ === 0) s.firstReceiveMs = now;
              const sent = t.metadata?.fields?.t?.numberValue;
              if (typeof sent === "number") s.latencies.push(now - sent);
              call.write({ task_complete: { task_id: t.task_id, result: { fields: {} } } });
              break;
            }
            case "completion_ack":
              this.stats.completed++;
              this.stats.lastCompletionMs = nowMs();
              break;
            case "registration_ack":
              registered = true;
              this.startHeartbeat(call);
              resolve();
              break;
            case "error":
              this.lastError = `${m.error.code}: ${m.error.message}`;
              if (!registered) {
                call.cancel();
                reject(new Error(`register refused: ${this.lastError}`));
              }
              break;
          }
        });
        const ended = (e?: Error) => {
          if (!registered) reject(e ?? new Error("session ended before registration_ack"));
          else if (!this.closing) {
            this.lost++;
            if (e) this.lastError = e.message;
          }
        };
        call.on("error", ended);
        call.on("end", () => ended());
        call.write(register);
      });
    const openWithRetry = async (i: number) => {
      for (let attempt = 0; ; attempt++) {
        try {
          return await openOne(i);
        } catch (e: unknown) {
          if (attempt >= (this.o.registerRetries ?? 6)) {
            this.failed++;
            this.lastError = e instanceof Error ? e.message : String(e);
            return;
          }
          this.retries++;
          await new Promise((r) => setTimeout(r, 250 * 2 ** attempt));
        }
      }
    };
    const deadline = Date.now() + (this.o.connectBudgetMs ?? Infinity);
    const workers = Array.from({ length: Math.min(this.o.connectConcurrency ?? 32, this.o.count) }, async () => {
      while (next < this.o.count && Date.now() < deadline) await openWithRetry(next++);
    });
    await Promise.all(workers);
    this.opened = next;
  }

  /** Sessions attempted (registered or failed); less than `count` when the connect budget ran out. */
  opened = 0;

  private startHeartbeat(call: SessionCall): void {
    if (this.o.heartbeatMs <= 0) return;
    // Random phase, so a large pool does not heartbeat in bursts.
    const start = setTimeout(() => {
      const t = setInterval(() => call.write({ heartbeat: {} }), this.o.heartbeatMs);
      this.timers.push(t);
    }, Math.random() * this.o.heartbeatMs);
    this.timers.push(start);
  }

  /** Ends every session and closes every connection. Safe to call twice. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    for (const t of this.timers) {
      clearTimeout(t);
      clearInterval(t);
    }
    for (const c of this.calls) c.end();
    // Give the service a moment to see the half-closes before the connections drop.
    await new Promise((r) => setTimeout(r, Math.min(2000, 50 + this.calls.length / 10)));
    for (const c of this.clients) c.close();
  }
}
