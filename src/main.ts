import { readFileSync } from "node:fs";
import { loadConfig, ConfigError, type Config } from "./config/config.js";
import { createLogger, type Logger } from "./telemetry/logger.js";
import { createPersistence } from "./persistence/orm.js";
import { createInProcessQueue } from "./queue/in-process-queue.js";
import { createRedisQueue } from "./queue/redis-queue.js";
import { createRedisTaskEvents } from "./queue/redis-events.js";
import type { PriorityQueue } from "./queue/priority-queue.js";
import { buildApp } from "./app.js";

const version = (JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string }).version;

/** Hides credentials when a URL is logged. */
const redact = (url: string) => url.replace(/\/\/([^:@/]+):[^@/]*@/, "//$1:***@");

async function start(config: Config, log: Logger): Promise<void> {
  const persistence = await createPersistence({ url: config.databaseUrl, lockTimeoutMs: config.dbLockTimeoutMs, statementTimeoutMs: config.dbStatementTimeoutMs, log });
  const queue: PriorityQueue = config.redisUrl
    ? createRedisQueue({ url: config.redisUrl, prefix: config.redisPrefix, log })
    : createInProcessQueue({ log });
  try {
    await queue.ping();
  } catch (e: unknown) {
    // The Redis client reconnects forever; close it or it keeps the process alive.
    await queue.close();
    await persistence.close();
    throw new Error(`REDIS_URL: cannot reach ${redact(config.redisUrl ?? "")}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  const events = config.redisUrl ? createRedisTaskEvents({ url: config.redisUrl, prefix: config.redisPrefix, log }) : undefined;
  const app = await buildApp({ config, log, persistence, queue, events, version, singleInstance: !config.redisUrl });

  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, "shutting down");
    // A second signal, or a shutdown that hangs, must still end the process.
    setTimeout(() => {
      log.error("shutdown took too long; exiting");
      process.exit(1);
    }, config.shutdownGraceMs + 5000).unref();
    app.close().then(
      () => {
        log.info("stopped");
        process.exit(0);
      },
      (e: unknown) => {
        log.error({ err: e }, "error during shutdown");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));

  const address = await app.fastify.listen({ port: config.port, host: config.host });
  log.info(
    {
      address,
      version,
      database: redact(config.databaseUrl),
      queue: config.redisUrl ? `redis ${redact(config.redisUrl)}` : "in-process",
    },
    "AAOS orchestrator listening (gRPC, Connect, gRPC-Web, REST and /ws on one port)",
  );
}

let config: Config;
try {
  config = loadConfig(process.env);
} catch (e: unknown) {
  process.stderr.write(`${e instanceof ConfigError ? e.message : String(e)}\n`);
  process.exit(2);
}
const log = createLogger({ level: config.logLevel });
start(config, log).catch((e: unknown) => {
  log.fatal({ err: e }, `start failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exit(1);
});
