import { z } from "zod";

const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;

const durationMs = (fallback: number) => z.coerce.number().int().positive().default(fallback);
// A duration a timer waits for: at most what a Node timer takes, since a longer delay fires after 1 ms.
const timerMs = (fallback: number) => z.coerce.number().int().positive().max(2_147_483_647).default(fallback);

/**
 * The environment, validated. Unknown variables are ignored; a bad value stops
 * the start with a message naming the variable (see {@link loadConfig}).
 */
const ConfigSchema = z
  .object({
    PORT: z.coerce.number().int().min(0).max(65535).default(8000),
    HOST: z.string().min(1).default("0.0.0.0"),
    /** `postgresql://…`, or a SQLite file (`sqlite:path`, the seed's `sqlite:///path`). */
    DATABASE_URL: z
      .string()
      .default("sqlite:./data/aaos.db")
      .refine((v) => /^(postgres(ql)?:\/\/|sqlite:)/.test(v), {
        message: "must start with postgresql://, postgres:// or sqlite:",
      }),
    /** Unset: the in-process queue (single instance). */
    REDIS_URL: z
      .string()
      .refine((v) => /^rediss?:\/\//.test(v), { message: "must start with redis:// or rediss://" })
      .optional(),
    /** Hash-tagged key prefix, so several deployments can share one Redis. */
    REDIS_PREFIX: z.string().regex(/^[A-Za-z0-9_.:-]+$/).default("aaos"),
    LOG_LEVEL: z.enum(LOG_LEVELS).default("info"),
    HEARTBEAT_INTERVAL_MS: timerMs(10_000),
    /** An agent silent for longer than this is closed and its tasks re-queued. */
    HEARTBEAT_TIMEOUT_MS: timerMs(30_000),
    /** How long a new connection may take to show whether it speaks HTTP/2 or HTTP/1.1. */
    SNIFF_TIMEOUT_MS: timerMs(10_000),
    /** How long an HTTP/2 connection may stay open with no stream on it. */
    HTTP2_IDLE_TIMEOUT_MS: timerMs(5 * 60_000),
    /** How long an HTTP/2 request may take to send its whole body, as Node's requestTimeout bounds HTTP/1.1; an agent's Session is exempt. */
    HTTP2_BODY_TIMEOUT_MS: timerMs(5 * 60_000),
    /** How long a held task's lease lasts; renewed while its agent's session is alive. Default: HEARTBEAT_TIMEOUT_MS. */
    LEASE_TTL_MS: z.coerce.number().int().positive().optional(),
    /** How often expired leases, execution timeouts and due retries are looked for. */
    SWEEP_INTERVAL_MS: timerMs(1_000),
    /** Execution timeout of one attempt, for tasks that set none. */
    TASK_TIMEOUT_MS: durationMs(60 * 60_000),
    /** First retry delay; doubles per failed attempt, with jitter, up to RETRY_MAX_MS. */
    RETRY_BASE_MS: durationMs(1_000),
    RETRY_MAX_MS: durationMs(60_000),
    /** How long an idempotency key returns its original task. */
    IDEMPOTENCY_TTL_MS: durationMs(24 * 60 * 60_000),
    /**
     * Finished tasks (completed, failed, cancelled) and their audit rows are
     * deleted this long after they finished. Unset: kept for ever.
     */
    TASK_RETENTION_MS: z.coerce.number().int().positive().max(100 * 365 * 24 * 60 * 60_000).optional(),
    MAX_DESCRIPTION_LENGTH: z.coerce.number().int().min(3).max(1_000_000).default(2000),
    MAX_METADATA_BYTES: z.coerce.number().int().min(2).max(64 * 1024 * 1024).default(64 * 1024),
    MAX_RESULT_BYTES: z.coerce.number().int().min(2).max(64 * 1024 * 1024).default(1024 * 1024),
    MAX_JSON_DEPTH: z.coerce.number().int().min(1).max(1000).default(32),
    /** How often to check that the queue (Redis) still holds its data; it is rebuilt from the database if not. */
    RECONCILE_INTERVAL_MS: timerMs(5_000),
    /** How long shutdown waits for in-flight requests before closing them. */
    SHUTDOWN_GRACE_MS: timerMs(10_000),
    /**
     * PostgreSQL: how long a statement waits for a lock (a row another
     * session holds, a migration's table lock) before it fails with
     * UNAVAILABLE; 0 leaves the server's own setting (no limit unless the
     * role or database sets one). It also bounds how long a migration
     * waits for its table locks, so it cannot queue every writer behind it.
     */
    DB_LOCK_TIMEOUT_MS: z.coerce.number().int().min(0).max(2_147_483_647).default(10_000),
    /**
     * PostgreSQL: longest run of one statement before it is cancelled and
     * fails with UNAVAILABLE; 0 leaves the server's own setting. Migrations
     * at start-up run without it.
     */
    DB_STATEMENT_TIMEOUT_MS: z.coerce.number().int().min(0).max(2_147_483_647).default(30_000),
    /** Largest gRPC/Connect message, REST body and WebSocket frame accepted. */
    MAX_MESSAGE_BYTES: z.coerce.number().int().min(1024).max(64 * 1024 * 1024).default(4 * 1024 * 1024),
  })
  .refine((c) => c.HEARTBEAT_TIMEOUT_MS > c.HEARTBEAT_INTERVAL_MS, {
    message: "must be greater than HEARTBEAT_INTERVAL_MS",
    path: ["HEARTBEAT_TIMEOUT_MS"],
  })
  .refine((c) => c.RETRY_MAX_MS >= c.RETRY_BASE_MS, { message: "must be at least RETRY_BASE_MS", path: ["RETRY_MAX_MS"] })
  .refine((c) => c.TASK_RETENTION_MS === undefined || c.TASK_RETENTION_MS >= c.IDEMPOTENCY_TTL_MS, {
    message: "must be at least IDEMPOTENCY_TTL_MS, or a repeated request could create its task a second time",
    path: ["TASK_RETENTION_MS"],
  })
  .refine((c) => c.DB_LOCK_TIMEOUT_MS === 0 || c.DB_STATEMENT_TIMEOUT_MS === 0 || c.DB_LOCK_TIMEOUT_MS < c.DB_STATEMENT_TIMEOUT_MS, {
    message: "must be less than DB_STATEMENT_TIMEOUT_MS, or a lock wait would end as a statement timeout, which fails every write batched with it",
    path: ["DB_LOCK_TIMEOUT_MS"],
  })
  .refine((c) => c.LEASE_TTL_MS === undefined || c.LEASE_TTL_MS > c.HEARTBEAT_INTERVAL_MS, {
    message: "must be greater than HEARTBEAT_INTERVAL_MS, or every lease would lapse between renewals",
    path: ["LEASE_TTL_MS"],
  });

export interface Config {
  readonly port: number;
  readonly host: string;
  readonly databaseUrl: string;
  readonly redisUrl: string | undefined;
  readonly redisPrefix: string;
  readonly logLevel: (typeof LOG_LEVELS)[number];
  readonly heartbeatIntervalMs: number;
  readonly heartbeatTimeoutMs: number;
  readonly sniffTimeoutMs: number;
  readonly http2IdleTimeoutMs: number;
  readonly http2BodyTimeoutMs: number;
  readonly shutdownGraceMs: number;
  readonly maxMessageBytes: number;
  readonly dbLockTimeoutMs: number;
  readonly dbStatementTimeoutMs: number;
  readonly reconcileIntervalMs: number;
  readonly leaseTtlMs: number;
  readonly sweepIntervalMs: number;
  readonly taskTimeoutMs: number;
  readonly retryBaseMs: number;
  readonly retryMaxMs: number;
  readonly idempotencyTtlMs: number;
  /** Unset: finished tasks are kept for ever. */
  readonly taskRetentionMs: number | undefined;
  readonly limits: Limits;
}

/** Bounds on client-supplied data, so one request cannot exhaust memory or the store. */
export interface Limits {
  readonly descriptionMaxLength: number;
  readonly metadataMaxBytes: number;
  readonly resultMaxBytes: number;
  readonly jsonMaxDepth: number;
}


/** Thrown for invalid configuration; its message names every bad variable. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** The seed wrote SQLite URLs as `sqlite:///./aaos.db`; accept that spelling too. */
function normaliseDatabaseUrl(url: string): string {
  return url.startsWith("sqlite:///") ? `sqlite:${url.slice("sqlite:///".length)}` : url;
}

/**
 * Reads the configuration from `env` (the composition root passes
 * `process.env`; tests pass plain objects). Empty strings count as unset.
 */
export function loadConfig(env: Record<string, string | undefined>): Config {
  const present = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v !== ""));
  const parsed = ConfigSchema.safeParse(present);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) => {
      const name = String(i.path[0] ?? "config");
      return `${name}: ${i.message}${present[name] === undefined ? "" : ` (got ${JSON.stringify(present[name])})`}`;
    });
    throw new ConfigError(`invalid configuration:\n  ${problems.join("\n  ")}`);
  }
  const c = parsed.data;
  return Object.freeze({
    port: c.PORT,
    host: c.HOST,
    databaseUrl: normaliseDatabaseUrl(c.DATABASE_URL),
    redisUrl: c.REDIS_URL,
    redisPrefix: c.REDIS_PREFIX,
    logLevel: c.LOG_LEVEL,
    heartbeatIntervalMs: c.HEARTBEAT_INTERVAL_MS,
    heartbeatTimeoutMs: c.HEARTBEAT_TIMEOUT_MS,
    sniffTimeoutMs: c.SNIFF_TIMEOUT_MS,
    http2IdleTimeoutMs: c.HTTP2_IDLE_TIMEOUT_MS,
    http2BodyTimeoutMs: c.HTTP2_BODY_TIMEOUT_MS,
    shutdownGraceMs: c.SHUTDOWN_GRACE_MS,
    maxMessageBytes: c.MAX_MESSAGE_BYTES,
    dbLockTimeoutMs: c.DB_LOCK_TIMEOUT_MS,
    dbStatementTimeoutMs: c.DB_STATEMENT_TIMEOUT_MS,
    reconcileIntervalMs: c.RECONCILE_INTERVAL_MS,
    leaseTtlMs: c.LEASE_TTL_MS ?? c.HEARTBEAT_TIMEOUT_MS,
    sweepIntervalMs: c.SWEEP_INTERVAL_MS,
    taskTimeoutMs: c.TASK_TIMEOUT_MS,
    retryBaseMs: c.RETRY_BASE_MS,
    retryMaxMs: c.RETRY_MAX_MS,
    idempotencyTtlMs: c.IDEMPOTENCY_TTL_MS,
    taskRetentionMs: c.TASK_RETENTION_MS,
    limits: Object.freeze({
      descriptionMaxLength: c.MAX_DESCRIPTION_LENGTH,
      metadataMaxBytes: c.MAX_METADATA_BYTES,
      resultMaxBytes: c.MAX_RESULT_BYTES,
      jsonMaxDepth: c.MAX_JSON_DEPTH,
    }),
  });
}
