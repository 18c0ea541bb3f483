/**
 * The real entry point as an operator runs it: `node dist/src/main.js` with
 * only environment variables. Bad configuration and unreachable backends stop
 * the start with a message naming the culprit; SIGTERM exits 0.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const MAIN = path.join(ROOT, "dist/src/main.js");

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(env: Record<string, string>, timeoutMs = 15_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN], { env: { PATH: process.env.PATH ?? "", ...env }, cwd: dir });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d));
    child.stderr.on("data", (d: Buffer) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`still running after ${timeoutMs} ms: ${stdout}${stderr}`));
    }, timeoutMs);
    child.on("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

let dir: string;
beforeAll(() => {
  // `make test` builds first; a bare `vitest run` builds here.
  if (!existsSync(MAIN)) execFileSync("npx", ["tsc", "-p", "tsconfig.json"], { cwd: ROOT, stdio: "inherit" });
  dir = mkdtempSync(path.join(tmpdir(), "aaos-main-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("main process", () => {
  it.each([
    [{ PORT: "eighty" }, /PORT: .*"eighty"/],
    [{ DATABASE_URL: "mysql://db/x" }, /DATABASE_URL: must start with postgresql/],
    [{ HEARTBEAT_INTERVAL_MS: "1000", HEARTBEAT_TIMEOUT_MS: "500" }, /HEARTBEAT_TIMEOUT_MS: must be greater/],
  ])("refuses bad configuration %j", async (env, message) => {
    const r = await run(env);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
  });

  it("names an unreachable PostgreSQL without leaking its password", async () => {
    const r = await run({ PORT: "0", DATABASE_URL: "postgresql://aaos:hunter2@127.0.0.1:1/aaos" });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/start failed/);
    expect(r.stdout).toMatch(/127\.0\.0\.1:1/);
    expect(r.stdout).not.toMatch(/hunter2/);
  });

  it("names an unreachable Redis and exits instead of hanging", async () => {
    const r = await run({ PORT: "0", DATABASE_URL: `sqlite:${path.join(dir, "redis-down.db")}`, REDIS_URL: "redis://127.0.0.1:1" });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/REDIS_URL: cannot reach redis:\/\/127\.0\.0\.1:1/);
  });

  it("serves on the embedded defaults and exits 0 on SIGTERM", async () => {
    const child: ChildProcess = spawn(process.execPath, [MAIN], { env: { PATH: process.env.PATH ?? "", PORT: "0", HOST: "127.0.0.1" }, cwd: dir });
    let out = "";
    const address = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no listening line: ${out}`)), 15_000);
      child.stdout!.on("data", (d: Buffer) => {
        out += d;
        const m = /"address":"(http:\/\/[^"]+)"/.exec(out);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!);
        }
      });
    });
    const health = await fetch(`${address}/health`);
    expect(await health.json()).toMatchObject({ status: "healthy", components: { database: "ok", queue: "ok" } });
    // The default SQLite file lives under the working directory.
    expect(existsSync(path.join(dir, "data/aaos.db"))).toBe(true);
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
    child.kill("SIGTERM");
    expect(await exited).toBe(0);
    expect(out).toMatch(/"msg":"stopped"/);
    for (const line of out.trim().split("\n")) expect(() => JSON.parse(line)).not.toThrow();
  });
});
