/**
 * `make bench`: holds the orchestrator against BullMQ on the same machine, in
 * the same run, through public APIs only. Prints a table; no pass/fail.
 *
 * Every knob is a flag (`--tasks=20000`) or an env var (`BENCH_TASKS=20000`);
 * `--help` lists them. See bench/README.md.
 */
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { Worker } from "node:worker_threads";
import { Queue } from "bullmq";
import { Redis } from "ioredis";
import pg from "pg";
import type { ConsumerCommand, ConsumerReply, RedisTarget } from "./consumer-worker.js";
import { nowMs, Producer } from "./grpc-clients.js";
import { killAll, Service, type ProcSample } from "./service.js";
import { summariseFile } from "./cpuprofile-summary.js";
import { transportFloor } from "./transport-floor.js";
import type { AgentPoolOptions } from "./grpc-clients.js";

// ─── configuration ──────────────────────────────────────────────────────────

interface Knob {
  flag: string;
  env: string;
  def: string;
  help: string;
}
const KNOBS = {
  tasks: { flag: "tasks", env: "BENCH_TASKS", def: "10000", help: "at most this many tasks per throughput run (BullMQ then runs as many as ours did)" },
  runBudget: { flag: "run-budget", env: "BENCH_RUN_BUDGET_S", def: "20", help: "stop creating early when ours would not finish a throughput run within this many s" },
  concurrency: { flag: "concurrency", env: "BENCH_CONCURRENCY", def: "1,10,50", help: "agent max_concurrency / BullMQ worker concurrency, one run each" },
  inFlight: { flag: "in-flight", env: "BENCH_IN_FLIGHT", def: "64", help: "CreateTask calls / add() calls in flight" },
  warmup: { flag: "warmup", env: "BENCH_WARMUP", def: "200", help: "tasks run (and discarded) before each measured run" },
  rate: { flag: "rate", env: "BENCH_RATE", def: "1000", help: "offered rate of the latency run, tasks/s" },
  duration: { flag: "duration", env: "BENCH_DURATION_S", def: "10", help: "length of the latency run, s" },
  drain: { flag: "drain", env: "BENCH_DRAIN_S", def: "30", help: "latency run: how long to wait after offering for the backlog; tasks not received by then count as infinitely late" },
  latencyConcurrency: { flag: "latency-concurrency", env: "BENCH_LATENCY_CONCURRENCY", def: "50", help: "agent slots / worker concurrency in the latency run" },
  idle: { flag: "idle", env: "BENCH_IDLE_AGENTS", def: "1000,10000", help: "idle agent stream counts (cumulative, one instance)" },
  streamsPerChannel: { flag: "streams-per-channel", env: "BENCH_STREAMS_PER_CHANNEL", def: "100", help: "agent streams per HTTP/2 connection" },
  idleHeartbeatMs: { flag: "idle-heartbeat-ms", env: "BENCH_IDLE_HEARTBEAT_MS", def: "10000", help: "heartbeat interval of idle agents (0 = none)" },
  connectBudget: { flag: "connect-budget", env: "BENCH_CONNECT_BUDGET_S", def: "60", help: "idle section: stop connecting more agents after this many s per level" },
  probes: { flag: "probes", env: "BENCH_PROBES", def: "200", help: "tasks sent one at a time to measure dispatch latency" },
  probeRate: { flag: "probe-rate", env: "BENCH_PROBE_RATE", def: "20", help: "probe tasks per second" },
  queued: { flag: "queued", env: "BENCH_QUEUED", def: "100000", help: "tasks queued (of a type no agent takes) before the deep-queue probes" },
  queueBudget: { flag: "queue-budget", env: "BENCH_QUEUE_BUDGET_S", def: "150", help: "stop queueing early after this many s (the count reached is printed)" },
  floorCalls: { flag: "floor-calls", env: "BENCH_FLOOR_CALLS", def: "20000", help: "transport section: empty unary calls per server library" },
  sections: { flag: "sections", env: "BENCH_SECTIONS", def: "throughput,latency,embedded,idle,deep,transport", help: "which parts to run" },
  bullmq: { flag: "bullmq", env: "BENCH_BULLMQ", def: "1", help: "run the BullMQ side (0 to skip)" },
  profile: { flag: "profile", env: "BENCH_PROFILE", def: "0", help: "1: extra throughput runs under --cpu-prof, summarised" },
  profileDir: { flag: "profile-dir", env: "BENCH_PROFILE_DIR", def: "", help: "with --profile=1: also keep the raw .cpuprofile files here (open them in Chrome DevTools)" },
  profileConcurrency: { flag: "profile-concurrency", env: "BENCH_PROFILE_CONCURRENCY", def: "10", help: "concurrency of the profiled runs" },
  service: { flag: "service", env: "BENCH_SERVICE_MAIN", def: "dist/src/main.js", help: "the service entry point to run (e.g. a build of another commit)" },
  postgres: { flag: "postgres", env: "BENCH_POSTGRES_URL", def: "postgresql://postgres@127.0.0.1:5432/test", help: "PostgreSQL to create the bench database in" },
  redis: { flag: "redis", env: "BENCH_REDIS_URL", def: "redis://127.0.0.1:6379/9", help: "Redis (db number in the path) for our queue and BullMQ" },
} satisfies Record<string, Knob>;

type Config = { [K in keyof typeof KNOBS]: string };

function readConfig(argv: string[]): Config {
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write("make bench [ARGS='--flag=value …']  or env vars:\n");
    for (const k of Object.values(KNOBS)) process.stdout.write(`  --${k.flag.padEnd(22)} ${k.env.padEnd(28)} default ${k.def}: ${k.help}\n`);
    process.exit(0);
  }
  const flags = new Map<string, string>();
  for (const a of argv) {
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(a);
    if (!m) throw new Error(`unknown argument ${a} (try --help)`);
    if (!Object.values(KNOBS).some((k) => k.flag === m[1])) throw new Error(`unknown flag --${m[1]} (try --help)`);
    flags.set(m[1]!, m[2] ?? "1");
  }
  return Object.fromEntries(Object.entries(KNOBS).map(([name, k]) => [name, flags.get(k.flag) ?? process.env[k.env] ?? k.def])) as Config;
}

const ints = (s: string) => s.split(",").filter(Boolean).map((x) => parseInt(x, 10));

// ─── clean-up ───────────────────────────────────────────────────────────────

const cleanups: Array<() => Promise<void> | void> = [];
let cleaningUp: Promise<void> | undefined;
function cleanup(): Promise<void> {
  cleaningUp ??= (async () => {
    killAll();
    for (const c of cleanups.splice(0).reverse()) {
      try {
        await c();
      } catch (e: unknown) {
        process.stderr.write(`clean-up: ${e instanceof Error ? e.message : String(e)}\n`);
      }
    }
  })();
  return cleaningUp;
}
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(sig, () => {
    process.stderr.write(`\n${sig}: cleaning up…\n`);
    void cleanup().finally(() => process.exit(130));
  });
}

// ─── helpers ────────────────────────────────────────────────────────────────

const RUN_ID = `${process.pid}${Date.now().toString(36).slice(-4)}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const log = (s: string) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);

function pct(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const s = Float64Array.from(values).sort();
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

type WithoutId<T> = T extends unknown ? Omit<T, "id"> : never;

/** The consuming side on its own thread (see consumer-worker.ts). */
class Consumer {
  private readonly worker: Worker;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (r: ConsumerReply) => void; reject: (e: Error) => void }>();

  constructor() {
    this.worker = new Worker(new URL("./consumer-worker.js", import.meta.url));
    this.worker.on("message", (r: ConsumerReply) => {
      const p = this.pending.get(r.id);
      this.pending.delete(r.id);
      p?.resolve(r);
    });
    this.worker.on("error", (e) => {
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
    });
  }

  request(c: WithoutId<ConsumerCommand>, allowFailure = false): Promise<ConsumerReply> {
    const id = this.nextId++;
    return new Promise<ConsumerReply>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...c, id });
    }).then((r) => {
      if (!r.ok && !allowFailure) throw new Error(`consumer ${c.op}: ${r.error}`);
      return r;
    });
  }

  async close(): Promise<void> {
    await Promise.race([this.request({ op: "close" }, true).catch(() => undefined), sleep(15_000)]);
    await this.worker.terminate();
  }
}

/** Runs up to `n` calls of `fn` with at most `inFlight` outstanding; returns how many were made. */
async function closedLoop(n: number, inFlight: number, fn: (i: number) => Promise<void>, shouldStop: () => boolean = () => false): Promise<number> {
  let next = 0;
  let failure: unknown;
  await Promise.all(
    Array.from({ length: Math.min(inFlight, n) }, async () => {
      while (next < n && failure === undefined && !shouldStop()) {
        const i = next++;
        try {
          await fn(i);
        } catch (e: unknown) {
          failure = e;
        }
      }
    }),
  );
  if (failure !== undefined) throw failure;
  return next;
}

/**
 * Offers `rate` calls/s for `durationMs`, open loop: never waits for answers
 * before sending the next. Resolves when the last call was sent; `settled`
 * resolves when every call has answered.
 */
async function openLoop(
  rate: number,
  durationMs: number,
  fn: (i: number) => Promise<void>,
): Promise<{ sent: number; errors: () => number; firstError: () => string; settled: Promise<unknown> }> {
  const start = nowMs();
  const total = Math.round((rate * durationMs) / 1000);
  let sent = 0;
  let errors = 0;
  let firstError = "";
  const calls: Array<Promise<void>> = [];
  while (sent < total) {
    const due = Math.min(total, Math.floor(((nowMs() - start) * rate) / 1000) + 1);
    while (sent < due) {
      calls.push(
        fn(sent++).catch((e: unknown) => {
          errors++;
          firstError ||= e instanceof Error ? e.message : String(e);
        }),
      );
    }
    await sleep(1);
  }
  return { sent, errors: () => errors, firstError: () => firstError, settled: Promise.all(calls) };
}

/**
 * Stops a closed-loop producer once the consumer, at the completion rate seen
 * so far, would not finish the backlog within `budgetMs` of `t0`. Completions
 * run slower while creates are still pouring in, so the estimate is pessimistic;
 * it is not trusted before 15% of the budget has passed.
 */
function budgetGuard(consumer: Consumer, t0: number, budgetMs: number, created: () => number): { stop: () => boolean; dispose: () => void } {
  let stopNow = false;
  const timer = setInterval(() => {
    void consumer.request({ op: "count" }).then((r) => {
      const elapsed = nowMs() - t0;
      if (elapsed < Math.max(2000, 0.15 * budgetMs)) return;
      const done = r.completed ?? 0;
      const rate = done / elapsed;
      const backlog = created() - done;
      if (elapsed + (rate > 0 ? backlog / rate : Infinity) > budgetMs) stopNow = true;
    });
  }, 250);
  return { stop: () => stopNow, dispose: () => clearInterval(timer) };
}

// Priorities 0..10 in a fixed shuffled order, the same sequence for both systems.
const priorityOf = (i: number) => (i * 7) % 11;
/** Ours: 0..10, higher first. BullMQ: 1 is highest, 0 = no priority. So ours p → BullMQ 11 − p (1..11). */
const bullPriority = (p: number) => 11 - p;

interface Measured {
  tasks: number;
  elapsedMs: number;
  createMs: number;
  latencies: number[];
  service?: { cpu: number; rssMb: number; peakRssMb: number };
  redisCpu?: number;
  pgCpu?: number;
  /** PostgreSQL transactions committed per task (pg_stat_database.xact_commit). */
  pgCommits?: number;
  /** Redis commands per task (INFO stats, whole server). */
  redisCommands?: number;
  /** CPU ms per task of this benchmark process (producer and consumer threads): the client side's share of the machine. */
  clientCpu: number;
}

/** CPU time of this whole process (every thread), ms. */
const clientCpuMs = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

// ─── backends ───────────────────────────────────────────────────────────────

class Env {
  readonly pgAdmin: pg.Client;
  readonly redis: Redis;
  readonly redisTarget: RedisTarget;
  readonly redisUrl: string;
  readonly tmp: string;
  private dbSeq = 0;
  private redisPid = 0;

  private constructor(readonly cfg: Config, pgAdmin: pg.Client, redis: Redis) {
    this.pgAdmin = pgAdmin;
    this.redis = redis;
    const u = new URL(cfg.redis);
    this.redisTarget = { host: u.hostname, port: Number(u.port || 6379), db: Number(u.pathname.slice(1) || 0) };
    this.redisUrl = cfg.redis;
    this.tmp = mkdtempSync(path.join(tmpdir(), "aaos-bench-"));
    cleanups.push(() => rmSync(this.tmp, { recursive: true, force: true }));
  }

  static async open(cfg: Config): Promise<Env> {
    const admin = new pg.Client({ connectionString: cfg.postgres });
    await admin.connect();
    cleanups.push(() => admin.end());
    const u = new URL(cfg.redis);
    const redis = new Redis({ host: u.hostname, port: Number(u.port || 6379), db: Number(u.pathname.slice(1) || 0), lazyConnect: true, maxRetriesPerRequest: 1 });
    await redis.connect();
    cleanups.push(async () => {
      await redis.quit();
    });
    const env = new Env(cfg, admin, redis);
    const info = await redis.info("server");
    env.redisPid = Number(/process_id:(\d+)/.exec(info)?.[1] ?? 0);
    return env;
  }

  /** A fresh PostgreSQL database, dropped at the end (or on Ctrl-C). */
  async database(): Promise<{ name: string; url: string; drop: () => Promise<void> }> {
    const name = `aaos_bench_${RUN_ID}_${++this.dbSeq}`;
    await this.pgAdmin.query(`CREATE DATABASE ${name}`);
    let dropped = false;
    const drop = async () => {
      if (dropped) return;
      dropped = true;
      await this.pgAdmin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
    };
    cleanups.push(drop);
    const u = new URL(this.cfg.postgres);
    u.pathname = `/${name}`;
    return { name, url: u.toString(), drop };
  }

  /** Deletes every key containing `prefix` in our Redis db (never FLUSHDB). */
  async dropKeys(prefix: string): Promise<number> {
    let cursor = "0";
    let n = 0;
    do {
      const [next, keys] = await this.redis.scan(cursor, "MATCH", `*${prefix}*`, "COUNT", 1000);
      cursor = next;
      if (keys.length) n += await this.redis.unlink(...keys);
    } while (cursor !== "0");
    return n;
  }

  async commits(db: string): Promise<number> {
    const r = await this.pgAdmin.query<{ n: string }>("select xact_commit as n from pg_stat_database where datname = $1", [db]);
    return Number(r.rows[0]?.n ?? NaN);
  }

  async redisCommands(): Promise<number> {
    return Number(/total_commands_processed:(\d+)/.exec(await this.redis.info("stats"))?.[1] ?? NaN);
  }

  redisCpuMs(): number {
    return this.redisPid ? cpuOf(this.redisPid) : NaN;
  }

  /** CPU of every `postgres` process on the machine (the server and its backends). */
  postgresCpuMs(): number {
    let total = 0;
    for (const p of readdirSync("/proc")) {
      if (!/^\d+$/.test(p)) continue;
      try {
        const stat = readFileSync(`/proc/${p}/stat`, "utf8");
        if (!stat.includes("(postgres)")) continue;
        total += cpuOf(Number(p), stat);
      } catch {
        // exited meanwhile
      }
    }
    return total;
  }
}

function cpuOf(pid: number, stat = readFileSync(`/proc/${pid}/stat`, "utf8")): number {
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(rest[11]) + Number(rest[12])) * 1000) / 100;
}

type Backend = "pg+redis" | "embedded";

/** A fresh service on a fresh database (and Redis prefix), torn down by `stop`. */
/** The single "code" agent every throughput, latency and deep-queue run measures against. */
function oneCodeAgent(consumer: Consumer, address: string, maxConcurrency: number): Promise<unknown> {
  return consumer.request({
    op: "agents",
    pool: { address, count: 1, maxConcurrency, capabilities: ["code"], streamsPerChannel: 1, heartbeatMs: 5000 },
  });
}

async function freshService(env: Env, backend: Backend, cpuProfDir?: string): Promise<{ svc: Service; stop: () => Promise<void>; db: string | undefined }> {
  const prefix = `aaosbench${RUN_ID}x${Math.random().toString(36).slice(2, 7)}`;
  let databaseUrl: string;
  let drop = async () => {};
  let dbName: string | undefined;
  if (backend === "pg+redis") {
    const db = await env.database();
    databaseUrl = db.url;
    drop = db.drop;
    dbName = db.name;
  } else {
    databaseUrl = `sqlite:${path.join(env.tmp, `${prefix}.db`)}`;
  }
  if (backend === "pg+redis") cleanups.push(() => env.dropKeys(prefix).then(() => undefined));
  const svc = await Service.start({
    main: env.cfg.service,
    databaseUrl,
    ...(backend === "pg+redis" ? { redisUrl: env.redisUrl, redisPrefix: prefix } : {}),
    ...(cpuProfDir ? { cpuProfDir } : {}),
  });
  return {
    svc,
    db: dbName,
    stop: async () => {
      await svc.stop();
      await drop();
      if (backend === "pg+redis") await env.dropKeys(prefix);
    },
  };
}

// ─── runs ───────────────────────────────────────────────────────────────────

interface RunShape {
  tasks: number;
  inFlight: number;
  warmup: number;
  concurrency: number;
  budgetMs: number;
}

async function oursThroughput(env: Env, backend: Backend, shape: RunShape, cpuProfDir?: string): Promise<Measured> {
  const { svc, stop, db } = await freshService(env, backend, cpuProfDir);
  const consumer = new Consumer();
  const producer = new Producer(svc.address);
  try {
    await producer.ready();
    await oneCodeAgent(consumer, svc.address, shape.concurrency);
    if (shape.warmup > 0) {
      await closedLoop(shape.warmup, shape.inFlight, (i) => producer.create({ taskType: "code", priority: priorityOf(i) }));
      await consumer.request({ op: "await", count: shape.warmup, timeoutMs: 120_000 });
      await consumer.request({ op: "stats", reset: true });
    }
    await sleep(1100); // PostgreSQL flushes its statistics at most once a second
    const x0 = db ? await env.commits(db) : 0;
    const c0 = await env.redisCommands();
    const s0 = svc.sample();
    const r0 = env.redisCpuMs();
    const p0 = backend === "pg+redis" ? env.postgresCpuMs() : 0;
    const k0 = clientCpuMs();
    const t0 = nowMs();
    let created = 0;
    const guard = budgetGuard(consumer, t0, shape.budgetMs, () => created);
    const tasks = await closedLoop(
      shape.tasks,
      shape.inFlight,
      async (i) => {
        await producer.create({ taskType: "code", priority: priorityOf(i) });
        created++;
      },
      guard.stop,
    );
    guard.dispose();
    const createMs = nowMs() - t0;
    const done = await consumer.request({ op: "await", count: tasks, timeoutMs: 600_000 });
    const k1 = clientCpuMs();
    const s1 = svc.sample();
    const r1 = env.redisCpuMs();
    const p1 = backend === "pg+redis" ? env.postgresCpuMs() : 0;
    const c1 = await env.redisCommands();
    await sleep(1100);
    const x1 = db ? await env.commits(db) : 0;
    const st = done.stats!;
    return {
      tasks,
      elapsedMs: st.lastCompletionMs - t0,
      createMs,
      latencies: st.latencies,
      service: perTask(s0, s1, tasks),
      redisCpu: backend === "pg+redis" ? (r1 - r0) / tasks : NaN,
      pgCpu: backend === "pg+redis" ? (p1 - p0) / tasks : NaN,
      pgCommits: db ? (x1 - x0) / tasks : NaN,
      redisCommands: backend === "pg+redis" ? (c1 - c0) / tasks : NaN,
      clientCpu: (k1 - k0) / tasks,
    };
  } finally {
    producer.close();
    await consumer.close();
    await stop();
  }
}

function perTask(s0: ProcSample, s1: ProcSample, tasks: number) {
  return { cpu: (s1.cpuMs - s0.cpuMs) / tasks, rssMb: s1.rssMb, peakRssMb: s1.peakRssMb };
}

async function bullQueue(env: Env, name: string): Promise<{ queue: Queue; prefix: string; stop: () => Promise<void> }> {
  const prefix = `bullbench${RUN_ID}`;
  const queue = new Queue(name, { connection: { ...env.redisTarget, maxRetriesPerRequest: null }, prefix });
  await queue.waitUntilReady();
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await queue.close();
    await env.dropKeys(prefix);
  };
  cleanups.push(stop);
  return { queue, prefix, stop };
}

async function bullThroughput(env: Env, shape: RunShape): Promise<Measured> {
  const { queue, prefix, stop } = await bullQueue(env, `tp${shape.concurrency}`);
  const consumer = new Consumer();
  try {
    await consumer.request({ op: "bullmq", redis: env.redisTarget, prefix, queue: queue.name, concurrency: shape.concurrency });
    const add = (i: number) => queue.add("code", { t: nowMs() }, { priority: bullPriority(priorityOf(i)) }).then(() => undefined);
    if (shape.warmup > 0) {
      await closedLoop(shape.warmup, shape.inFlight, add);
      await consumer.request({ op: "await", count: shape.warmup, timeoutMs: 120_000 });
      await consumer.request({ op: "stats", reset: true });
    }
    const c0 = await env.redisCommands();
    const r0 = env.redisCpuMs();
    const k0 = clientCpuMs();
    const t0 = nowMs();
    await closedLoop(shape.tasks, shape.inFlight, add);
    const createMs = nowMs() - t0;
    const done = await consumer.request({ op: "await", count: shape.tasks, timeoutMs: 600_000 });
    const k1 = clientCpuMs();
    const r1 = env.redisCpuMs();
    const c1 = await env.redisCommands();
    const st = done.stats!;
    return { tasks: shape.tasks, elapsedMs: st.lastCompletionMs - t0, createMs, latencies: st.latencies, redisCpu: (r1 - r0) / shape.tasks, redisCommands: (c1 - c0) / shape.tasks, clientCpu: (k1 - k0) / shape.tasks };
  } finally {
    await consumer.close();
    await stop();
  }
}

interface RateShape {
  rate: number;
  durationMs: number;
  concurrency: number;
  warmup: number;
  inFlight: number;
  drainMs: number;
}

interface RateResult {
  sent: number;
  errors: number;
  firstError: string;
  received: number;
  /** One entry per task sent; a task never received within the drain time counts as Infinity. */
  latencies: number[];
  doneRate: number;
  service?: { cpu: number; rssMb: number; peakRssMb: number };
  /** CPU ms per task received, of all postgres processes. */
  pgCpu?: number;
}

/**
 * Offers `rate`/s for the duration through `send`, then waits up to `drainMs`
 * for the consumer to receive them all. `sample` and `pgCpuMs` measure the
 * service's and PostgreSQL's share over the same span.
 */
async function rateRun(
  consumer: Consumer,
  shape: RateShape,
  send: (i: number) => Promise<void>,
  sample?: () => ProcSample,
  pgCpuMs?: () => number,
): Promise<RateResult> {
  if (shape.warmup > 0) {
    await closedLoop(shape.warmup, shape.inFlight, send);
    await consumer.request({ op: "await", count: shape.warmup, timeoutMs: 120_000 });
    await consumer.request({ op: "stats", reset: true });
  }
  const s0 = sample?.();
  const p0 = pgCpuMs?.();
  const t0 = nowMs();
  const { sent, errors, firstError, settled } = await openLoop(shape.rate, shape.durationMs, send);
  const offeredMs = nowMs() - t0;
  const done = await consumer.request({ op: "await", count: sent, timeoutMs: shape.drainMs }, true);
  const s1 = sample?.();
  const p1 = pgCpuMs?.();
  const st = done.stats!;
  // Do not wait for creates still queued in the service beyond the drain time.
  await Promise.race([settled, sleep(100)]);
  const latencies = [...st.latencies, ...Array.from({ length: Math.max(0, sent - st.latencies.length) }, () => Infinity)];
  return {
    sent,
    errors: errors(),
    firstError: firstError(),
    received: st.received,
    latencies,
    doneRate: (st.received * 1000) / Math.max(offeredMs, (st.lastCompletionMs || nowMs()) - t0),
    ...(s0 && s1 ? { service: perTask(s0, s1, Math.max(1, st.received)) } : {}),
    ...(p0 !== undefined && p1 !== undefined ? { pgCpu: (p1 - p0) / Math.max(1, st.received) } : {}),
  };
}

async function oursLatency(env: Env, shape: RateShape, cpuProfDir?: string): Promise<RateResult> {
  const { svc, stop } = await freshService(env, "pg+redis", cpuProfDir);
  const consumer = new Consumer();
  const producer = new Producer(svc.address);
  try {
    await producer.ready();
    await oneCodeAgent(consumer, svc.address, shape.concurrency);
    return await rateRun(
      consumer,
      shape,
      (i) => producer.create({ taskType: "code", priority: priorityOf(i) }),
      () => svc.sample(),
      () => env.postgresCpuMs(),
    );
  } finally {
    producer.close();
    await consumer.close();
    await stop();
  }
}

async function bullLatency(env: Env, shape: RateShape): Promise<RateResult> {
  const { queue, prefix, stop } = await bullQueue(env, "lat");
  const consumer = new Consumer();
  try {
    await consumer.request({ op: "bullmq", redis: env.redisTarget, prefix, queue: queue.name, concurrency: shape.concurrency });
    return await rateRun(consumer, shape, (i) => queue.add("code", { t: nowMs() }, { priority: bullPriority(priorityOf(i)) }).then(() => undefined));
  } finally {
    await consumer.close();
    await stop();
  }
}

/** `n` tasks one at a time at `rate`/s; returns create→received latencies of those tasks. */
async function probe(producer: Producer, consumer: Consumer, n: number, rate: number): Promise<number[]> {
  await consumer.request({ op: "stats", reset: true });
  const { sent, settled } = await openLoop(rate, (n * 1000) / rate, (i) => producer.create({ taskType: "code", priority: priorityOf(i) }));
  await settled;
  const done = await consumer.request({ op: "await", count: sent, timeoutMs: 60_000 }, true);
  if (!done.ok) log(`probe: ${done.error}`);
  const got = done.stats!.latencies;
  return [...got, ...Array.from({ length: Math.max(0, sent - got.length) }, () => Infinity)];
}

interface IdleRow {
  agents: number;
  connectS: number;
  rssMb: number;
  lost: number;
  retries: number;
  failed: number;
  connected: number;
  lastError: string;
  latencies: number[];
}

async function idleStreams(env: Env, levels: number[], cfg: Config): Promise<{ baselineRssMb: number; rows: IdleRow[] }> {
  const { svc, stop } = await freshService(env, "pg+redis");
  const consumer = new Consumer();
  const producer = new Producer(svc.address);
  const rows: IdleRow[] = [];
  try {
    await producer.ready();
    await sleep(1000);
    const baselineRssMb = svc.sample().rssMb;
    let have = 0;
    for (const level of levels) {
      const add = level - have;
      if (add <= 0) continue;
      log(`connecting ${add} more idle agents (→ ${level})`);
      const t0 = nowMs();
      const pool: AgentPoolOptions = {
        address: svc.address,
        count: add,
        maxConcurrency: 1,
        capabilities: ["code"],
        streamsPerChannel: Number(cfg.streamsPerChannel),
        heartbeatMs: Number(cfg.idleHeartbeatMs),
        connectBudgetMs: Number(cfg.connectBudget) * 1000,
      };
      await consumer.request({ op: "agents", pool });
      const connectS = (nowMs() - t0) / 1000;
      have = level;
      await sleep(3000); // let registration writes and GC settle
      const rssMb = svc.sample().rssMb;
      const latencies = await probe(producer, consumer, Number(cfg.probes), Number(cfg.probeRate));
      const st = (await consumer.request({ op: "stats", reset: false })).stats!;
      rows.push({ agents: level, connectS, rssMb: Math.max(rssMb, svc.sample().rssMb), lost: st.lost, retries: st.retries, failed: st.failed, connected: st.connected, lastError: st.lastError, latencies });
    }
    return { baselineRssMb, rows };
  } finally {
    producer.close();
    await consumer.close();
    await stop();
  }
}

async function deepQueue(env: Env, cfg: Config): Promise<{ empty: number[]; deep: number[]; queued: number; queueRate: number; rssMb: number }> {
  const { svc, stop } = await freshService(env, "pg+redis");
  const consumer = new Consumer();
  const producer = new Producer(svc.address);
  try {
    await producer.ready();
    await oneCodeAgent(consumer, svc.address, 1);
    // Warm up the path, then measure on an empty queue.
    await probe(producer, consumer, 100, Number(cfg.probeRate) * 2);
    const empty = await probe(producer, consumer, Number(cfg.probes), Number(cfg.probeRate));
    const queued = Number(cfg.queued);
    log(`queueing ${queued} documentation tasks (no agent takes them)`);
    const t0 = nowMs();
    const budgetMs = Number(cfg.queueBudget) * 1000;
    let last = t0;
    let made = 0;
    const n = await closedLoop(
      queued,
      Number(cfg.inFlight),
      async (i) => {
        await producer.create({ taskType: "documentation", priority: priorityOf(i) });
        made++;
        if (nowMs() - last > 10_000) {
          last = nowMs();
          log(`  … ${made} queued (${Math.round(made / ((last - t0) / 1000))}/s)`);
        }
      },
      () => nowMs() - t0 > budgetMs,
    );
    const queueRate = n / ((nowMs() - t0) / 1000);
    await sleep(1000);
    const deep = await probe(producer, consumer, Number(cfg.probes), Number(cfg.probeRate));
    return { empty, deep, queued: n, queueRate, rssMb: svc.sample().rssMb };
  } finally {
    producer.close();
    await consumer.close();
    await stop();
  }
}

// ─── output ─────────────────────────────────────────────────────────────────

function table(title: string, head: string[], rows: Array<Array<string | number>>): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === "number" ? fmt(c) : c)));
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((r) => (r[i] ?? "").length)));
  const line = (r: string[]) => `  ${r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ")}`;
  return [``, title, line(head), `  ${widths.map((w) => "-".repeat(w)).join("  ")}`, ...cells.map(line)].join("\n");
}

function fmt(n: number): string {
  if (n === Infinity) return "inf";
  if (!Number.isFinite(n)) return "-";
  if (Number.isInteger(n)) return String(n);
  if (Math.abs(n) >= 100) return n.toFixed(0);
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

const out: string[] = [];
function emit(s: string): void {
  out.push(s);
  process.stdout.write(`${s}\n`);
}

// ─── main ───────────────────────────────────────────────────────────────────

async function main(): Promise<void> {
  const cfg = readConfig(process.argv.slice(2));
  const sections = new Set(cfg.sections.split(","));
  const withBull = cfg.bullmq !== "0";
  const shape = (concurrency: number): RunShape => ({
    tasks: Number(cfg.tasks),
    inFlight: Number(cfg.inFlight),
    warmup: Number(cfg.warmup),
    concurrency,
    budgetMs: Number(cfg.runBudget) * 1000,
  });
  const started = Date.now();

  emit(`AAOS benchmark — ${new Date().toISOString()}, Node ${process.versions.node}, ${(await import("node:os")).cpus().length} CPUs`);
  emit("config:");
  for (const [name, k] of Object.entries(KNOBS)) emit(`  ${k.flag.padEnd(22)} = ${cfg[name as keyof Config]}`);
  emit(
    [
      "notes: client = @grpc/grpc-js + proto-loader (producer on the main thread, agents / BullMQ Worker on a worker thread);",
      "       ours: one agent with max_concurrency C; BullMQ 5: one Worker with concurrency C; processors complete at once;",
      "       priorities cycle 0..10; ours p → BullMQ priority 11−p (1 = highest); BullMQ keeps completed jobs (default);",
      "       throughput = first create → last completion (ours: completion_ack received; BullMQ: 'completed' event).",
    ].join("\n"),
  );

  const env = await Env.open(cfg);

  if (sections.has("throughput")) {
    const rows: Array<Array<string | number>> = [];
    for (const c of ints(cfg.concurrency)) {
      log(`throughput pg+redis, concurrency ${c}`);
      const o = await oursThroughput(env, "pg+redis", shape(c));
      let b: Measured | undefined;
      if (withBull) {
        log(`throughput bullmq, concurrency ${c}, ${o.tasks} tasks`);
        b = await bullThroughput(env, { ...shape(c), tasks: o.tasks });
      }
      const ot = (o.tasks * 1000) / o.elapsedMs;
      const bt = b ? (b.tasks * 1000) / b.elapsedMs : NaN;
      rows.push([
        String(c),
        o.tasks,
        ot,
        bt,
        b ? `${(ot / bt).toFixed(2)}×` : "-",
        (o.tasks * 1000) / o.createMs,
        b ? (b.tasks * 1000) / b.createMs : NaN,
        o.service!.cpu,
        o.pgCpu!,
        o.redisCpu!,
        o.clientCpu,
        b?.redisCpu ?? NaN,
        b?.clientCpu ?? NaN,
        o.pgCommits!,
        o.redisCommands!,
        b?.redisCommands ?? NaN,
        o.service!.rssMb,
        o.service!.peakRssMb,
      ]);
    }
    emit(
      table(
        "End-to-end throughput, PostgreSQL + Redis vs BullMQ (tasks/s; CPU ms per task of our service process, of all postgres processes, of redis-server and of the benchmark client (producer + agents, or BullMQ Queue + Worker); RSS MB of our service)",
        ["conc", "tasks", "ours/s", "bullmq/s", "ratio", "ours create/s", "bull add/s", "svc cpu", "pg cpu", "redis cpu", "client cpu", "bull redis cpu", "bull client cpu", "pg commits", "redis cmds", "bull redis cmds", "svc rss", "svc peak"],
        rows,
      ),
    );
  }

  const rs: RateShape = {
      rate: Number(cfg.rate),
      durationMs: Number(cfg.duration) * 1000,
      concurrency: Number(cfg.latencyConcurrency),
      warmup: Number(cfg.warmup),
      inFlight: Number(cfg.inFlight),
      drainMs: Number(cfg.drain) * 1000,
  };
  if (sections.has("latency")) {
    log(`latency pg+redis at ${rs.rate}/s for ${rs.durationMs / 1000} s`);
    const o = await oursLatency(env, rs);
    const b = withBull ? (log(`latency bullmq at ${rs.rate}/s`), await bullLatency(env, rs)) : undefined;
    const row = (name: string, m: RateResult) => [
      name,
      m.sent,
      m.received,
      m.errors,
      m.doneRate,
      pct(m.latencies, 50),
      pct(m.latencies, 90),
      pct(m.latencies, 99),
      Math.max(...m.latencies),
      m.service ? m.service.cpu : NaN,
      m.pgCpu ?? NaN,
      m.service ? m.service.rssMb : NaN,
    ];
    emit(
      table(
        `Latency at a fixed offered rate of ${rs.rate}/s for ${rs.durationMs / 1000} s, ${rs.concurrency} slots (ms; ours create→agent received, BullMQ add→processor start; "inf" = not received within ${cfg.drain} s after offering ended)`,
        ["system", "offered", "received", "errors", "received/s", "p50", "p90", "p99", "max", "svc cpu/task", "pg cpu/task", "svc rss"],
        [row("ours (pg+redis)", o), ...(b ? [row("bullmq", b)] : [])],
      ),
    );
    for (const [name, m] of [["ours", o], ["bullmq", b]] as const) if (m?.firstError) emit(`  ${name}: ${m.errors} calls failed; first error: ${m.firstError}`);
  }

  if (sections.has("embedded")) {
    const rows: Array<Array<string | number>> = [];
    for (const c of ints(cfg.concurrency)) {
      log(`throughput embedded, concurrency ${c}`);
      const o = await oursThroughput(env, "embedded", shape(c));
      rows.push([String(c), o.tasks, (o.tasks * 1000) / o.elapsedMs, (o.tasks * 1000) / o.createMs, pct(o.latencies, 50), pct(o.latencies, 99), o.service!.cpu, o.service!.rssMb, o.service!.peakRssMb]);
    }
    emit(
      table(
        "End-to-end throughput, embedded backend (SQLite + in-process queue), same workload",
        ["conc", "tasks", "ours/s", "create/s", "lat p50", "lat p99", "svc cpu/task", "svc rss", "svc peak"],
        rows,
      ),
    );
  }

  if (sections.has("idle")) {
    log("idle agent streams");
    const r = await idleStreams(env, ints(cfg.idle), cfg);
    emit(
      table(
        `Idle agent streams on one instance (pg+redis; ${cfg.streamsPerChannel} streams per HTTP/2 connection; idle heartbeat ${cfg.idleHeartbeatMs} ms); ${cfg.probes} probe tasks at ${cfg.probeRate}/s; baseline RSS ${fmt(r.baselineRssMb)} MB`,
        ["agents", "connected", "connect s", "svc rss MB", "probe p50", "probe p90", "probe p99", "max", "register retries", "never registered", "sessions lost"],
        r.rows.map((x) => [String(x.agents), x.connected, x.connectS, x.rssMb, pct(x.latencies, 50), pct(x.latencies, 90), pct(x.latencies, 99), Math.max(...x.latencies), x.retries, x.failed, x.lost]),
      ),
    );
    const err = r.rows.map((x) => x.lastError).find(Boolean);
    if (err) emit(`  last error an agent saw: ${err}`);
  }

  if (sections.has("deep")) {
    log("deep queue");
    const r = await deepQueue(env, cfg);
    emit(
      table(
        `Dispatch latency with ${r.queued} documentation tasks queued (no agent takes them; queued at ${fmt(r.queueRate)}/s) vs an empty queue; ${cfg.probes} code tasks at ${cfg.probeRate}/s to one code agent (ms)`,
        ["queue", "p50", "p90", "p99", "max"],
        [
          ["empty", pct(r.empty, 50), pct(r.empty, 90), pct(r.empty, 99), Math.max(...r.empty)],
          [`${r.queued} queued`, pct(r.deep, 50), pct(r.deep, 90), pct(r.deep, 99), Math.max(...r.deep)],
        ],
      ),
    );
  }

  if (sections.has("transport")) {
    log("transport floor: Connect vs grpc-js");
    const rows = await transportFloor(Number(cfg.floorCalls), Number(cfg.inFlight));
    emit(
      table(
        `Transport floor: an empty unary call (grpc.health.v1 Health/Check) served by each library alone, ${cfg.inFlight} in flight, same grpc-js client (server CPU µs per call)`,
        ["server", "calls", "calls/s", "cpu µs/call"],
        rows.map((r) => [r.server, r.calls, fmt(r.callsPerSecond), r.cpuUsPerCall.toFixed(0)]),
      ),
    );
  }

  if (cfg.profile !== "0") {
    const keepProfile = (dir: string, name: string): string | undefined => {
      const file = readdirSync(dir).find((f) => f.endsWith(".cpuprofile"));
      if (file && cfg.profileDir) {
        mkdirSync(cfg.profileDir, { recursive: true });
        copyFileSync(path.join(dir, file), path.join(cfg.profileDir, `${name}-${RUN_ID}.cpuprofile`));
      }
      return file;
    };
    for (const backend of ["pg+redis", "embedded"] as const) {
      const dir = mkdtempSync(path.join(env.tmp, "prof-"));
      log(`profiling ${backend}, concurrency ${cfg.profileConcurrency}`);
      const o = await oursThroughput(env, backend, shape(Number(cfg.profileConcurrency)), dir);
      const file = keepProfile(dir, `throughput-${backend}`);
      emit(`\nCPU profile of the service, ${backend} throughput run (concurrency ${cfg.profileConcurrency}, ${o.tasks} tasks, ${fmt((o.tasks * 1000) / o.elapsedMs)}/s under the profiler):`);
      emit(file ? summariseFile(path.join(dir, file), 40) : "  (no profile written)");
    }
    const dir = mkdtempSync(path.join(env.tmp, "prof-"));
    log(`profiling pg+redis at ${rs.rate}/s`);
    const o = await oursLatency(env, rs, dir);
    const file = keepProfile(dir, `latency-${rs.rate}`);
    emit(`\nCPU profile of the service, pg+redis at ${rs.rate} tasks/s offered for ${rs.durationMs / 1000} s (${fmt(o.doneRate)}/s received under the profiler):`);
    emit(file ? summariseFile(path.join(dir, file), 40) : "  (no profile written)");
  }

  emit(`\ntotal bench time ${((Date.now() - started) / 1000).toFixed(0)} s`);
}

main()
  .then(
    () => cleanup(),
    async (e: unknown) => {
      process.stderr.write(`bench failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
      await cleanup();
      process.exitCode = 1;
    },
  )
  .finally(() => {
    // Lingering client handles (grpc-js timers) must not keep us alive.
    setTimeout(() => process.exit(process.exitCode ?? 0), 500).unref();
  });
