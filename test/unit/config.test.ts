import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../../src/config/config.js";

describe("loadConfig", () => {
  it("uses the embedded defaults when nothing is set", () => {
    const c = loadConfig({});
    expect(c).toMatchObject({
      port: 8000,
      host: "0.0.0.0",
      databaseUrl: "sqlite:./data/aaos.db",
      redisUrl: undefined,
      logLevel: "info",
      heartbeatIntervalMs: 10_000,
      heartbeatTimeoutMs: 30_000,
      dbLockTimeoutMs: 10_000,
      dbStatementTimeoutMs: 30_000,
      taskRetentionMs: undefined,
    });
    expect(Object.isFrozen(c)).toBe(true);
  });

  it("reads every variable, treating empty strings as unset", () => {
    const c = loadConfig({
      PORT: "9001",
      HOST: "127.0.0.1",
      DATABASE_URL: "postgresql://u:p@db:5432/aaos",
      REDIS_URL: "redis://cache:6379/2",
      LOG_LEVEL: "debug",
      HEARTBEAT_INTERVAL_MS: "500",
      HEARTBEAT_TIMEOUT_MS: "",
      MAX_MESSAGE_BYTES: "65536",
      DB_LOCK_TIMEOUT_MS: "0",
      TASK_RETENTION_MS: "604800000",
    });
    expect(c).toMatchObject({ taskRetentionMs: 604_800_000, port: 9001, host: "127.0.0.1", redisUrl: "redis://cache:6379/2", logLevel: "debug", heartbeatIntervalMs: 500, heartbeatTimeoutMs: 30_000, maxMessageBytes: 65536, dbLockTimeoutMs: 0 });
  });

  it("accepts the seed's sqlite:/// spelling", () => {
    expect(loadConfig({ DATABASE_URL: "sqlite:///./aaos.db" }).databaseUrl).toBe("sqlite:./aaos.db");
  });

  it.each([
    [{ PORT: "eighty" }, "PORT"],
    [{ PORT: "70000" }, "PORT"],
    [{ DATABASE_URL: "mysql://x" }, "DATABASE_URL"],
    [{ REDIS_URL: "localhost:6379" }, "REDIS_URL"],
    [{ LOG_LEVEL: "loud" }, "LOG_LEVEL"],
    [{ HEARTBEAT_INTERVAL_MS: "-5" }, "HEARTBEAT_INTERVAL_MS"],
    [{ HEARTBEAT_INTERVAL_MS: "5000", HEARTBEAT_TIMEOUT_MS: "4000" }, "HEARTBEAT_TIMEOUT_MS"],
    [{ REDIS_PREFIX: "a{b}" }, "REDIS_PREFIX"],
    // Longer than a Node timer can wait: it would fire at once.
    [{ HTTP2_IDLE_TIMEOUT_MS: "2147483648" }, "HTTP2_IDLE_TIMEOUT_MS"],
    [{ SNIFF_TIMEOUT_MS: "3000000000" }, "SNIFF_TIMEOUT_MS"],
    [{ DB_LOCK_TIMEOUT_MS: "-1" }, "DB_LOCK_TIMEOUT_MS"],
    [{ DB_LOCK_TIMEOUT_MS: "3000000000" }, "DB_LOCK_TIMEOUT_MS"],
    [{ DB_STATEMENT_TIMEOUT_MS: "soon" }, "DB_STATEMENT_TIMEOUT_MS"],
    // A lock wait would otherwise end as a statement timeout, failing its whole batch.
    [{ DB_LOCK_TIMEOUT_MS: "30000", DB_STATEMENT_TIMEOUT_MS: "30000" }, "DB_LOCK_TIMEOUT_MS"],
    [{ TASK_RETENTION_MS: "9000000000000000" }, "TASK_RETENTION_MS"],
    [{ TASK_RETENTION_MS: "0" }, "TASK_RETENTION_MS"],
    // A task deleted while its idempotency key still holds would let a repeat create it again.
    [{ TASK_RETENTION_MS: "3600000" }, "TASK_RETENTION_MS"],
  ])("refuses %j naming %s", (env, name) => {
    expect(() => loadConfig(env)).toThrow(ConfigError);
    expect(() => loadConfig(env)).toThrow(new RegExp(`${name}:`));
  });

  it("names every bad variable at once", () => {
    try {
      loadConfig({ PORT: "x", LOG_LEVEL: "y" });
      expect.unreachable();
    } catch (e: unknown) {
      expect(String(e)).toMatch(/PORT/);
      expect(String(e)).toMatch(/LOG_LEVEL/);
    }
  });
});
