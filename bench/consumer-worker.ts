/**
 * Worker thread that plays the consuming side — our gRPC agents or a BullMQ
 * Worker — on its own event loop, so the producer's work never delays the
 * moment an assignment is seen. Driven by {@link ConsumerCommand} messages.
 */
import { parentPort } from "node:worker_threads";
import { Worker as BullWorker, type Job } from "bullmq";
import { AgentPool, emptyStats, nowMs, type AgentPoolOptions, type AgentStats } from "./grpc-clients.js";

export interface RedisTarget {
  host: string;
  port: number;
  db: number;
}

export type ConsumerCommand =
  | { op: "agents"; id: number; pool: AgentPoolOptions }
  | { op: "bullmq"; id: number; redis: RedisTarget; prefix: string; queue: string; concurrency: number }
  | { op: "stats"; id: number; reset: boolean }
  /** Just the completed count, cheap enough to poll. */
  | { op: "count"; id: number }
  /** Resolves once `completed` reaches `count` (or `timeoutMs` passes). */
  | { op: "await"; id: number; count: number; timeoutMs: number }
  | { op: "close"; id: number };

export interface ConsumerReply {
  id: number;
  ok: boolean;
  error?: string;
  stats?: AgentStats & { lost: number; retries: number; failed: number; connected: number; lastError: string };
  completed?: number;
}

const port = parentPort;
if (!port) throw new Error("consumer-worker must run in a worker thread");

let pools: AgentPool[] = [];
let bull: BullWorker | undefined;
let bullStats: AgentStats = emptyStats();

function currentStats(reset: boolean): NonNullable<ConsumerReply["stats"]> {
  const all = [...pools.map((p) => p.stats), bullStats];
  const merged: AgentStats = emptyStats();
  for (const s of all) {
    merged.received += s.received;
    merged.completed += s.completed;
    if (s.firstReceiveMs && (!merged.firstReceiveMs || s.firstReceiveMs < merged.firstReceiveMs)) merged.firstReceiveMs = s.firstReceiveMs;
    merged.lastCompletionMs = Math.max(merged.lastCompletionMs, s.lastCompletionMs);
    for (const l of s.latencies) merged.latencies.push(l);
  }
  const lost = pools.reduce((n, p) => n + p.lost, 0);
  const retries = pools.reduce((n, p) => n + p.retries, 0);
  const failed = pools.reduce((n, p) => n + p.failed, 0);
  const connected = pools.reduce((n, p) => n + p.opened - p.failed - p.lost, 0);
  const lastError = pools.map((p) => p.lastError).find(Boolean) ?? "";
  if (reset) {
    for (const p of pools) p.stats = emptyStats();
    bullStats = emptyStats();
  }
  return { ...merged, lost, retries, failed, connected, lastError };
}

const completedCount = () => pools.reduce((n, p) => n + p.stats.completed, 0) + bullStats.completed;

async function handle(c: ConsumerCommand): Promise<ConsumerReply> {
  switch (c.op) {
    case "agents": {
      const pool = new AgentPool(c.pool);
      pools.push(pool);
      await pool.connect();
      return { id: c.id, ok: true };
    }
    case "bullmq": {
      bullStats = emptyStats();
      const worker = new BullWorker(
        c.queue,
        async (job: Job<{ t: number }>) => {
          const now = nowMs();
          if (bullStats.received++ === 0) bullStats.firstReceiveMs = now;
          bullStats.latencies.push(now - job.data.t);
          return {};
        },
        { connection: { ...c.redis, maxRetriesPerRequest: null }, prefix: c.prefix, concurrency: c.concurrency, autorun: false },
      );
      worker.on("completed", () => {
        bullStats.completed++;
        bullStats.lastCompletionMs = nowMs();
      });
      worker.on("error", () => undefined);
      void worker.run();
      await worker.waitUntilReady();
      bull = worker;
      return { id: c.id, ok: true };
    }
    case "stats":
      return { id: c.id, ok: true, stats: currentStats(c.reset) };
    case "count":
      return { id: c.id, ok: true, completed: completedCount() };
    case "await": {
      const deadline = Date.now() + c.timeoutMs;
      const done = completedCount;
      while (done() < c.count && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
      return { id: c.id, ok: done() >= c.count, stats: currentStats(false), ...(done() < c.count ? { error: `only ${done()} of ${c.count} completed` } : {}) };
    }
    case "close": {
      await Promise.all(pools.map((p) => p.close()));
      pools = [];
      if (bull) await bull.close(true);
      bull = undefined;
      return { id: c.id, ok: true };
    }
  }
}

port.on("message", (c: ConsumerCommand) => {
  handle(c).then(
    (r) => port.postMessage(r),
    (e: unknown) => port.postMessage({ id: c.id, ok: false, error: e instanceof Error ? e.message : String(e) } satisfies ConsumerReply),
  );
});
