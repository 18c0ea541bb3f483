import { mkdtempSync, rmSync } from "node:fs";
import { DatabaseSync } from "node:sqlite";
import { tmpdir } from "node:os";
import path from "node:path";
import { Writable } from "node:stream";
import type { AddressInfo } from "node:net";
import pg from "pg";
import { Redis } from "ioredis";
import { buildApp, type App } from "../../src/app.js";
import { loadConfig } from "../../src/config/config.js";
import { createLogger } from "../../src/telemetry/logger.js";
import { createPersistence, type Persistence } from "../../src/persistence/orm.js";
import { createInProcessQueue } from "../../src/queue/in-process-queue.js";
import { createRedisQueue } from "../../src/queue/redis-queue.js";
import { createRedisTaskEvents } from "../../src/queue/redis-events.js";
import { TEST_POSTGRES_URL, TEST_REDIS_URL, postgresAvailable, redisAvailable, uniqueName } from "./services.js";

export type BackendName = "embedded" | "postgres+redis";

/** The backends every end-to-end scenario runs on; shared ones only when reachable. */
export const BACKENDS: Array<{ name: BackendName; available: boolean }> = [
  { name: "embedded", available: true },
  { name: "postgres+redis", available: postgresAvailable && redisAvailable },
];

/** Every JSON log line the server wrote, parsed. */
export class LogCapture extends Writable {
  readonly lines: Array<Record<string, unknown>> = [];
  override _write(chunk: Buffer, _enc: string, done: () => void): void {
    for (const line of chunk.toString().split("\n")) if (line.trim()) this.lines.push(JSON.parse(line) as Record<string, unknown>);
    done();
  }
}

export interface TestServer {
  app: App;
  port: number;
  baseUrl: string;
  persistence: Persistence;
  logs: LogCapture;
  backend: BackendName;
  /** Where the data lives, for {@link StartOptions.shareWith}. */
  data: { sqliteFile?: string; schema?: string; prefix?: string };
  /** Closes the app and removes its database schema / file and Redis keys. */
  close(): Promise<void>;
}

export interface StartOptions {
  env?: Record<string, string>;
  /** Redis URL to use instead of the shared one (e.g. a private server a test kills). */
  redisUrl?: string;
  /**
   * Reuse another server's data (SQLite file, or PostgreSQL schema and Redis
   * prefix) to test restarts and several instances; the data is then left for
   * its owner to clean up.
   */
  shareWith?: TestServer;
  /** The clock the service reads time from. */
  clock?: () => Date;
}

/**
 * Starts the real service on 127.0.0.1:0 with the given backend: a fresh
 * SQLite file and in-process queue, or a private PostgreSQL schema and Redis
 * key prefix on the shared servers.
 */
export async function startServer(backend: BackendName, options: StartOptions = {}): Promise<TestServer> {
  const logs = new LogCapture();
  const log = createLogger({ level: "info", destination: logs });
  // A short grace period keeps suites quick when agents still hold tasks at the end.
  const config = loadConfig({ PORT: "0", HOST: "127.0.0.1", SHUTDOWN_GRACE_MS: "1000", ...options.env });
  const cleanups: Array<() => Promise<void>> = [];
  let persistence: Persistence;
  let queue;
  let events;
  const shared = options.shareWith?.data;
  let data: TestServer["data"];
  if (backend === "embedded") {
    let sqliteFile = shared?.sqliteFile;
    if (!sqliteFile) {
      const dir = mkdtempSync(path.join(tmpdir(), "aaos-test-"));
      cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
      sqliteFile = path.join(dir, "aaos.db");
    }
    data = { sqliteFile };
    persistence = await createPersistence({ url: `sqlite:${sqliteFile}`, log });
    queue = options.redisUrl ? createRedisQueue({ url: options.redisUrl, prefix: uniqueName("t"), log }) : createInProcessQueue();
  } else {
    const schema = shared?.schema ?? uniqueName("aaos");
    const prefix = shared?.prefix ?? uniqueName("t");
    data = { schema, prefix };
    if (!shared) cleanups.push(async () => {
      // Bounded, so a busy server or a lingering lock fails the hook with a
      // reason instead of hanging it.
      const client = new pg.Client({ connectionString: TEST_POSTGRES_URL, connectionTimeoutMillis: 10_000 });
      await client.connect();
      try {
        await client.query("SET lock_timeout = '20s'");
        await client.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      } finally {
        await client.end();
      }
    });
    const redisUrl = options.redisUrl ?? TEST_REDIS_URL;
    if (!shared) cleanups.push(async () => {
      const redis = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 });
      try {
        await redis.connect();
        const keys = await redis.keys(`{${prefix}}*`);
        if (keys.length) await redis.del(...keys);
      } catch {
        // A private Redis the test already stopped has nothing left to clean.
      } finally {
        redis.disconnect();
      }
    });
    persistence = await createPersistence({ url: TEST_POSTGRES_URL, schema, lockTimeoutMs: config.dbLockTimeoutMs, statementTimeoutMs: config.dbStatementTimeoutMs, log });
    queue = createRedisQueue({ url: redisUrl, prefix, log });
    events = createRedisTaskEvents({ url: redisUrl, prefix, log });
  }
  const app = await buildApp({ config, log, persistence, queue, events, version: "test", singleInstance: backend === "embedded", ...(options.clock ? { clock: options.clock } : {}) });
  await app.fastify.listen({ port: 0, host: "127.0.0.1" });
  const port = (app.fastify.server.address() as AddressInfo).port;
  return {
    app,
    port,
    baseUrl: `http://127.0.0.1:${port}`,
    persistence,
    logs,
    backend,
    data,
    async close() {
      await app.close();
      for (const c of cleanups) await c();
    },
  };
}

/**
 * Runs a statement on the server's database from a connection of its own, as
 * an operator would by hand: the service hears nothing of it. Parameters are
 * written `$1`, `$2`, … on both backends. Returns the rows it answered.
 */
export async function byHand(s: TestServer, sql: string, params: Array<string | number> = []): Promise<Array<Record<string, unknown>>> {
  if (s.data.sqliteFile) {
    const db = new DatabaseSync(s.data.sqliteFile, { timeout: 10_000 });
    try {
      // SQLite numbers its parameters ?1, ?2, …
      return db.prepare(sql.replace(/\$(\d+)/g, "?$1")).all(...params) as Array<Record<string, unknown>>;
    } finally {
      db.close();
    }
  }
  const client = new pg.Client({ connectionString: TEST_POSTGRES_URL, connectionTimeoutMillis: 10_000 });
  await client.connect();
  try {
    await client.query(`SET search_path TO "${s.data.schema}"`);
    return (await client.query(sql, params)).rows as Array<Record<string, unknown>>;
  } finally {
    await client.end();
  }
}

/** Polls `check` until it returns a truthy value (tests only; never in the service). */
export async function eventually<T>(check: () => Promise<T> | T, timeoutMs = 10_000, what = "condition"): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v as NonNullable<T>;
    } catch (e: unknown) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ""}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
