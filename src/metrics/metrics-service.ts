import type { PriorityQueue, QueueDepth } from "../queue/priority-queue.js";
import type { TaskRepository } from "../tasks/task-repository.js";
import type { TaskStatus } from "../tasks/task-types.js";
import type { AgentService } from "../agents/agent-service.js";
import { toConnectError } from "../errors/errors.js";
import type { LatencyWindow } from "./latency-window.js";

export interface MetricsSnapshot {
  tasks: Record<TaskStatus, number> & { total: number; retryWaiting: number };
  queueDepth: QueueDepth;
  agents: { connected: number; idle: number; busy: number };
  completedPerMinute: number;
  dispatchLatency: { p50Ms: number; p90Ms: number; p99Ms: number; samples: number };
  uptimeSeconds: number;
}

export interface HealthReport {
  healthy: boolean;
  components: { database: string; queue: string };
}

export type MetricsService = ReturnType<typeof createMetricsService>;

const HEALTH_TIMEOUT_MS = 2000;

/** Resolves "ok", or the reason the check failed or took too long. */
async function probe(check: () => Promise<void>): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve(`no answer within ${HEALTH_TIMEOUT_MS} ms`), HEALTH_TIMEOUT_MS);
  });
  try {
    return await Promise.race([
      check().then(
        () => "ok",
        (e: unknown) => `unavailable: ${e instanceof Error ? e.message : String(e)}`,
      ),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The figures behind GET /metrics and GetMetrics, and the health report.
 * Task, queue and agent figures cover the whole cluster; dispatch latency
 * and uptime are this instance's.
 */
export function createMetricsService(o: {
  tasks: TaskRepository;
  queue: PriorityQueue;
  agents: AgentService;
  latency: LatencyWindow;
  pingDatabase: () => Promise<void>;
  /** Asks for the queue to be rebuilt from the database. */
  repairQueue: (reason: string) => void;
  clock: () => Date;
  startedAt: Date;
}) {
  const read = (now: Date) =>
    Promise.all([
      o.tasks.countByStatus(),
      o.queue.depth(),
      o.tasks.countCompletedSince(new Date(now.getTime() - 60_000)),
      o.tasks.countRetryWaiting(),
      o.agents.list(false),
    ]);
  // Callers that arrive while a read is under way share it: a read per
  // caller would pile up on a slow database, each holding one of the
  // connections the hot path needs.
  let reading: ReturnType<typeof read> | undefined;

  return {
    async snapshot(): Promise<MetricsSnapshot> {
      const now = o.clock();
      reading ??= read(now).finally(() => (reading = undefined));
      const [counts, queueDepth, completedLastMinute, retryWaiting, agents] = await reading.catch((e: unknown) => Promise.reject(toConnectError(e)));
      const busy = agents.filter((a) => a.status === "busy").length;
      const p = o.latency.percentiles();
      const total = Object.values(counts).reduce((a, b) => a + b, 0);
      return {
        tasks: { ...counts, total, retryWaiting },
        queueDepth,
        agents: { connected: agents.length, idle: agents.length - busy, busy },
        completedPerMinute: completedLastMinute,
        dispatchLatency: { p50Ms: p.p50, p90Ms: p.p90, p99Ms: p.p99, samples: p.samples },
        uptimeSeconds: (now.getTime() - o.startedAt.getTime()) / 1000,
      };
    },

    async health(): Promise<HealthReport> {
      // Reachable is not enough: a queue that refuses writes, or lost its
      // data and refuses new tasks until the rebuild, would send creates
      // into 503s while this said "ok".
      const queueUsable = async () => {
        await o.queue.ping();
        if (await o.queue.intact()) return;
        // Found here first (a flush with no reconnect): the rebuild need not wait for the periodic check.
        o.repairQueue("the health check found the queue without its data");
        throw new Error("lost its data; being rebuilt from the database");
      };
      const [database, queue] = await Promise.all([probe(o.pingDatabase), probe(queueUsable)]);
      return { healthy: database === "ok" && queue === "ok", components: { database, queue } };
    },
  };
}
