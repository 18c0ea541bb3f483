import net from "node:net";

/**
 * Where the shared test services live. CI (and `.ci/run`) points these at the
 * machine's PostgreSQL and Redis; each suite makes its own database schema or
 * key prefix and removes it afterwards.
 */
export const TEST_POSTGRES_URL =
  process.env.TEST_POSTGRES_URL ?? "postgresql://postgres@127.0.0.1:5432/test";
export const TEST_REDIS_URL = process.env.TEST_REDIS_URL ?? "redis://127.0.0.1:6379";

/** Under CI an unreachable service fails the run instead of skipping suites. */
const required = process.env.CI === "true" || process.env.REQUIRE_SERVICES === "1";

async function reachable(url: string, defaultPort: number): Promise<boolean> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const socket = net.connect({ host: hostname || "127.0.0.1", port: Number(port || defaultPort) });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.once("connect", () => done(true));
    socket.once("error", () => done(false));
  });
}

async function check(name: string, url: string, port: number): Promise<boolean> {
  if (await reachable(url, port)) return true;
  if (required) throw new Error(`${name} at ${url} is unreachable, and CI requires it`);
  console.warn(`[tests] ${name} at ${url} is unreachable: skipping its suites`);
  return false;
}

/** True when PostgreSQL can be used; throws under CI when it cannot. */
export const postgresAvailable = await check("PostgreSQL", TEST_POSTGRES_URL, 5432);
/** True when Redis can be used; throws under CI when it cannot. */
export const redisAvailable = await check("Redis", TEST_REDIS_URL, 6379);

/** A short unique name for schemas, databases and key prefixes. */
export function uniqueName(prefix: string): string {
  return `${prefix}_${process.pid}_${Date.now().toString(36)}_${Math.random().toString(36).slice(2, 8)}`;
}
