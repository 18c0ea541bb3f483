/**
 * Shared machinery of the fault scenarios: a private database per scenario
 * (a PostgreSQL database, or a SQLite file), the real server as a child
 * process, agents that heartbeat like real ones, the books check, and the
 * one-line summary every scenario prints.
 */
import { appendFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { expect, afterEach } from "vitest";
import pg from "pg";
import { Redis } from "ioredis";
import { ChildServer } from "../support/child-server.js";
import { GrpcAgent, WsAgent, grpcClient, unary, type AgentOptions, type TestAgent } from "../support/clients.js";
import { TEST_POSTGRES_URL, TEST_REDIS_URL, postgresAvailable, redisAvailable, uniqueName } from "../support/services.js";
import { hasRedisServer } from "../support/private-redis.js";
import { eventually } from "../support/server.js";

export { eventually };

export type FaultBackend = "postgres+redis" | "embedded";

/** PostgreSQL + Redis scenarios need both shared services. */
export const sharedServices = postgresAvailable && redisAvailable;
/** Both backends, and whether each can run here. */
export const FAULT_BACKENDS: Array<{ backend: FaultBackend; available: boolean }> = [
  { backend: "postgres+redis", available: postgresAvailable && redisAvailable },
  { backend: "embedded", available: true },
];

/**
 * For a test file: every test gets a fresh scenario from the returned
 * function, closed (servers, agents, data) after the test whatever happened.
 */
export function scenarioPerTest(): (name: string, backend: FaultBackend, options?: BackendOptions) => Promise<Scenario> {
  let current: Scenario | undefined;
  afterEach(async () => {
    await current?.close();
    current = undefined;
  });
  return async (name, backend, options) => (current = new Scenario(name, await createBackend(backend, options)));
}

/** Scenarios that kill or flush Redis need a private redis-server as well. */
export const privateRedisOk = sharedServices && hasRedisServer;

/** Small timings so every fault shows within a second or two. */
export const FAST_ENV: Record<string, string> = {
  HEARTBEAT_INTERVAL_MS: "200",
  HEARTBEAT_TIMEOUT_MS: "1500",
  LEASE_TTL_MS: "1500",
  SWEEP_INTERVAL_MS: "100",
  RETRY_BASE_MS: "50",
  RETRY_MAX_MS: "200",
  RECONCILE_INTERVAL_MS: "300",
  SHUTDOWN_GRACE_MS: "1500",
  SNIFF_TIMEOUT_MS: "5000",
};

export interface TaskRow {
  task_id: string;
  status: string;
  priority: number;
  attempt: number;
  failed_attempts: number;
  agent_id: string | null;
  result_json: string | null;
  error: string | null;
  /** Set while a retry waits out its backoff; cleared once the task is back in the queue. */
  run_at: unknown;
}

export interface AuditRow {
  task_id: string | null;
  action: string;
  agent_id: string | null;
  details_json: string | null;
}

/** Reads the tables straight from the database, not through the service. */
export interface Books {
  tasks(): Promise<TaskRow[]>;
  audit(): Promise<AuditRow[]>;
  close(): Promise<void>;
}

const TASK_COLUMNS = "task_id, status, priority, attempt, failed_attempts, agent_id, result_json, error, run_at";
const AUDIT_COLUMNS = "task_id, action, agent_id, details_json";

/** A scenario's own data: what the server is started with, and how to read and remove it. */
export interface Backend {
  name: FaultBackend;
  /** DATABASE_URL, REDIS_URL, REDIS_PREFIX. */
  env: Record<string, string>;
  books: Books;
  /** The PostgreSQL database name (postgres+redis only). */
  database?: string;
  /** The SQLite file (embedded only). */
  sqliteFile?: string;
  cleanup(): Promise<void>;
}

async function adminQuery(sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: TEST_POSTGRES_URL, connectionTimeoutMillis: 10_000 });
  await client.connect();
  try {
    await client.query("SET lock_timeout = '20s'");
    await client.query(sql);
  } finally {
    await client.end();
  }
}

function databaseUrl(database: string, via?: { port: number }): string {
  const url = new URL(TEST_POSTGRES_URL);
  url.pathname = `/${database}`;
  if (via) {
    url.hostname = "127.0.0.1";
    url.port = String(via.port);
  }
  return url.toString();
}

export interface BackendOptions {
  /** A private Redis to use instead of the shared one. */
  redisUrl?: string;
}

/**
 * A fresh PostgreSQL database (`aaos_fault_<unique>`) and Redis key prefix,
 * or a fresh SQLite file; `cleanup` drops it all.
 */
export async function createBackend(name: FaultBackend, options: BackendOptions = {}): Promise<Backend> {
  if (name === "embedded") {
    const dir = mkdtempSync(path.join(tmpdir(), "aaos-fault-"));
    const sqliteFile = path.join(dir, "a.db");
    const read = <T>(sql: string): T[] => {
      // The server writes while we read: wait for its locks instead of failing.
      const db = new DatabaseSync(sqliteFile, { readOnly: true, timeout: 10_000 });
      try {
        return db.prepare(sql).all() as T[];
      } finally {
        db.close();
      }
    };
    return {
      name,
      env: { DATABASE_URL: `sqlite:${sqliteFile}` },
      sqliteFile,
      books: {
        tasks: async () => read<TaskRow>(`select ${TASK_COLUMNS} from tasks`),
        audit: async () => read<AuditRow>(`select ${AUDIT_COLUMNS} from audit_logs order by created_at`),
        close: async () => {},
      },
      async cleanup() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  const database = uniqueName("aaos_fault").toLowerCase();
  const prefix = uniqueName("fault");
  const redisUrl = options.redisUrl ?? TEST_REDIS_URL;
  await adminQuery(`CREATE DATABASE "${database}"`);
  const pool = new pg.Pool({ connectionString: databaseUrl(database), max: 2, connectionTimeoutMillis: 10_000 });
  pool.on("error", () => {});
  return {
    name,
    env: { DATABASE_URL: databaseUrl(database), REDIS_URL: redisUrl, REDIS_PREFIX: prefix },
    database,
    books: {
      tasks: async () => (await pool.query<TaskRow>(`select ${TASK_COLUMNS} from tasks`)).rows,
      audit: async () => (await pool.query<AuditRow>(`select ${AUDIT_COLUMNS} from audit_logs order by created_at`)).rows,
      close: async () => pool.end(),
    },
    async cleanup() {
      await pool.end().catch(() => {});
      await adminQuery(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`);
      if (options.redisUrl) return; // a private Redis goes away with its process
      const redis = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 });
      try {
        await redis.connect();
        let cursor = "0";
        do {
          const [next, keys] = await redis.scan(cursor, "MATCH", `{${prefix}}*`, "COUNT", 500);
          cursor = next;
          if (keys.length) await redis.del(...keys);
        } while (cursor !== "0");
      } finally {
        redis.disconnect();
      }
    },
  };
}

/** DATABASE_URL of a backend's database reached through a proxy on `port`. */
export function proxiedDatabaseUrl(backend: Backend, port: number): string {
  return databaseUrl(backend.database!, { port });
}

export const postgresTarget = (): { host: string; port: number } => {
  const url = new URL(TEST_POSTGRES_URL);
  return { host: url.hostname || "127.0.0.1", port: Number(url.port || 5432) };
};

/** Everything a scenario starts, so one afterEach can stop it all. */
export class Scenario {
  readonly servers: ChildServer[] = [];
  readonly agents: TestAgent[] = [];
  private readonly heartbeats = new Map<TestAgent, NodeJS.Timeout>();
  private readonly cleanups: Array<() => Promise<void> | void> = [];
  /** Late or repeated results the server refused or acknowledged without recording. */
  duplicatesPrevented = 0;
  /** Every task id a create call was answered for with 201 / OK. */
  readonly created: string[] = [];

  constructor(
    readonly name: string,
    readonly backend: Backend,
  ) {}

  onCleanup(fn: () => Promise<void> | void): void {
    this.cleanups.push(fn);
  }

  async startServer(env: Record<string, string> = {}, name = "server"): Promise<ChildServer> {
    return ChildServer.start({ env: { ...FAST_ENV, ...this.backend.env, ...env }, name }, (s) => this.servers.push(s));
  }

  /**
   * Connects an agent that heartbeats every 100 ms (unless `heartbeat` is
   * false, i.e. a zombie), over gRPC or /ws.
   */
  async agent(server: ChildServer | number, options: AgentOptions & { transport?: "grpc" | "ws"; heartbeat?: boolean } = {}): Promise<TestAgent> {
    const port = typeof server === "number" ? server : server.port;
    const a = options.transport === "ws" ? await WsAgent.connect(port, options) : await GrpcAgent.connect(port, options);
    this.agents.push(a);
    if (options.heartbeat !== false) {
      const timer = setInterval(() => {
        if (a.closed) this.stopHeartbeats(a);
        else a.heartbeat();
      }, 100);
      this.heartbeats.set(a, timer);
    }
    return a;
  }

  stopHeartbeats(a: TestAgent): void {
    clearInterval(this.heartbeats.get(a));
    this.heartbeats.delete(a);
  }

  /** Drops an agent's connection without a goodbye. */
  killAgent(a: TestAgent): void {
    this.stopHeartbeats(a);
    a.kill();
  }

  /** POST /tasks; records the id. Fails the test on anything but 201. */
  async createTask(server: ChildServer, body: Record<string, unknown> = {}): Promise<string> {
    const res = await postTask(server, body);
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    const id = (res.body as { task_id: string }).task_id;
    this.created.push(id);
    return id;
  }

  /** Stops everything the scenario started, then removes its data. */
  async close(): Promise<void> {
    for (const t of this.heartbeats.values()) clearInterval(t);
    this.heartbeats.clear();
    for (const a of this.agents.splice(0)) a.kill();
    for (const s of this.servers.splice(0)) await s.stop();
    for (const c of this.cleanups.splice(0).reverse()) await c();
    await this.backend.books.close();
    await this.backend.cleanup();
  }
}

/** POST /tasks without judging the answer. */
export async function postTask(server: ChildServer, body: Record<string, unknown> = {}, headers: Record<string, string> = {}): Promise<{ status: number; body: unknown }> {
  const res = await fetch(`${server.url}/tasks`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify({ task_type: "code", description: "fault test task", ...body }),
  });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // left as text
  }
  return { status: res.status, body: parsed };
}

export async function getJson<T = any>(server: ChildServer, route: string): Promise<{ status: number; body: T }> {
  const res = await fetch(`${server.url}${route}`);
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    // left as text
  }
  return { status: res.status, body: body as T };
}

/** A gRPC TaskService call on a child server. */
export async function taskRpc<T = any>(server: ChildServer, method: string, request: object): Promise<T> {
  const client = grpcClient("TaskService", server.port);
  try {
    return await unary<T>(client, method, request);
  } finally {
    client.close();
  }
}

/** `agent.waitFor`, failing with every non-heartbeat frame the agent got (for diagnosis). */
export async function waitAgent(agent: TestAgent, pred: (a: TestAgent) => boolean, timeoutMs: number, what: string): Promise<void> {
  try {
    await agent.waitFor(pred, timeoutMs, what);
  } catch (e: unknown) {
    throw new Error(`${e instanceof Error ? e.message : String(e)}\nall frames: ${JSON.stringify(agent.frames.filter((f) => f.type !== "heartbeat_ack"))}`);
  }
}

/** Waits for the agent's next error frame after `index` and returns it. */
export async function nextError(agent: TestAgent, fromIndex: number, timeoutMs = 5000) {
  await agent.waitFor((a) => a.frames.slice(fromIndex).some((f) => f.type === "error"), timeoutMs, "an error frame");
  return agent.frames.slice(fromIndex).find((f) => f.type === "error")!;
}

/**
 * Sends a result the server must not record (late attempt, after
 * cancellation, repeat) and waits for the refusal: an `error` frame with
 * `code`. Counts it as a duplicate prevented.
 */
export async function expectRefused(s: Scenario, agent: TestAgent, send: () => void, code = "failed_precondition"): Promise<void> {
  const from = agent.frames.length;
  send();
  const err = await nextError(agent, from);
  expect(err.code, err.message).toBe(code);
  s.duplicatesPrevented++;
}

export interface Expectation {
  /** Final status per task id; tasks not named must be COMPLETED. */
  status?: Record<string, string>;
  /** The recorded result per task id. */
  result?: Record<string, Record<string, unknown>>;
  /** Servers whose agent slots must all be free at the end. */
  servers: ChildServer[];
}

/**
 * Checks the books, straight from the database: every created task is there
 * and in its expected final state, nothing else appeared, no task is left
 * ASSIGNED, no task has more than one task.completed audit row (exactly one
 * when COMPLETED), and no agent slot is leaked on the live servers.
 */
export async function checkBooks(s: Scenario, expectation: Expectation): Promise<void> {
  const want = (id: string) => expectation.status?.[id] ?? "completed";
  // Wait for the final states first (retries and re-queues take a moment).
  await eventually(
    async () => {
      const rows = await s.backend.books.tasks();
      const byId = new Map(rows.map((r) => [r.task_id, r]));
      return s.created.every((id) => byId.get(id)?.status === want(id));
    },
    15_000,
    "every task in its expected final state",
  ).catch(async (e: unknown) => {
    const rows = await s.backend.books.tasks();
    throw new Error(`${String(e)}\n${JSON.stringify(rows.filter((r) => r.status !== want(r.task_id)), null, 1)}`);
  });
  const rows = await s.backend.books.tasks();
  const audit = await s.backend.books.audit();
  // None lost, none invented.
  expect(rows.map((r) => r.task_id).sort()).toEqual([...s.created].sort());
  expect(rows.filter((r) => r.status === "assigned")).toEqual([]);
  // Nothing half-written: no audit row for a task that does not exist.
  const known = new Set(s.created);
  expect(audit.filter((a) => a.task_id !== null && !known.has(a.task_id))).toEqual([]);
  for (const r of rows) {
    expect(r.status, `task ${r.task_id}`).toBe(want(r.task_id));
    const trail = audit.filter((a) => a.task_id === r.task_id);
    expect(trail.filter((a) => a.action === "task.created").length, `task.created rows of ${r.task_id}`).toBe(1);
    const completions = trail.filter((a) => a.action === "task.completed").length;
    expect(completions, `task.completed rows of ${r.task_id}`).toBe(r.status === "completed" ? 1 : 0);
    const result = expectation.result?.[r.task_id];
    if (result) expect(JSON.parse(r.result_json ?? "null"), `result of ${r.task_id}`).toEqual(result);
  }
  for (const server of expectation.servers) {
    await eventually(
      async () => {
        const agents = await getJson<Array<{ agent_id: string; active_tasks: number }>>(server, "/agents");
        const metrics = await getJson<{ agents?: { busy?: number } }>(server, "/metrics");
        return agents.status === 200 && agents.body.every((a) => a.active_tasks === 0) && metrics.body.agents?.busy === 0;
      },
      10_000,
      `no busy agent slot on ${server.name}`,
    );
  }
}

export interface Summary {
  scenario: string;
  backend: FaultBackend;
  created: number;
  completed: number;
  retried: number;
  failed: number;
  cancelled: number;
  duplicatesPrevented: number;
  /** task.failed audit rows: times a task reached FAILED (dead-letter), even if retried since. */
  deadLettered: number;
}

/** Prints the scenario's one summary line and appends it (JSON Lines) to $FAULT_SUMMARY_FILE. */
export async function summarize(s: Scenario): Promise<Summary> {
  const rows = await s.backend.books.tasks();
  const audit = await s.backend.books.audit();
  const count = (status: string) => rows.filter((r) => r.status === status).length;
  const summary: Summary = {
    scenario: s.name,
    backend: s.backend.name,
    created: audit.filter((a) => a.action === "task.created").length,
    completed: count("completed"),
    retried: audit.filter((a) => a.action === "task.retry_scheduled").length,
    failed: count("failed"),
    cancelled: count("cancelled"),
    duplicatesPrevented: s.duplicatesPrevented,
    deadLettered: audit.filter((a) => a.action === "task.failed").length,
  };
  console.log(
    `[fault] ${summary.scenario} | ${summary.backend} | created=${summary.created} completed=${summary.completed} retried=${summary.retried} failed=${summary.failed} cancelled=${summary.cancelled} duplicates_prevented=${summary.duplicatesPrevented} dead_lettered=${summary.deadLettered}`,
  );
  if (process.env.FAULT_SUMMARY_FILE) appendFileSync(process.env.FAULT_SUMMARY_FILE, `${JSON.stringify(summary)}\n`);
  return summary;
}

/** The audit rows of one task, oldest first is not guaranteed: filter by action. */
export async function auditOf(s: Scenario, taskId: string): Promise<AuditRow[]> {
  return (await s.backend.books.audit()).filter((a) => a.task_id === taskId);
}

export async function taskRow(s: Scenario, taskId: string): Promise<TaskRow | undefined> {
  return (await s.backend.books.tasks()).find((r) => r.task_id === taskId);
}
