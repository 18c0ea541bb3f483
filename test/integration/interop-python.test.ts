/**
 * Cross-language interoperability: the Python gRPC client in
 * test/interop/python_client.py (grpcio + protoc-generated messages, compiled
 * at run time) drives the real server over h2c. Skipped with a message when
 * Python's grpc or protoc is missing, except under CI or REQUIRE_SERVICES=1.
 */
import { spawnSync, spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startServer, type TestServer } from "../support/server.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const SCRIPT = path.join(ROOT, "test/interop/python_client.py");
const required = process.env.CI === "true" || process.env.REQUIRE_SERVICES === "1";

/**
 * The first Python that can import grpc and protobuf. A pyenv or venv
 * `python3` on PATH often lacks the distribution's python3-grpcio, so the
 * system interpreter is tried too.
 */
function findPython(): { python?: string; why: string } {
  const candidates = [...new Set([process.env.PYTHON, "python3", "/usr/bin/python3"].filter((p): p is string => !!p))];
  const tried: string[] = [];
  for (const candidate of candidates) {
    const r = spawnSync(candidate, ["-c", "import grpc, google.protobuf"], { encoding: "utf8" });
    if (r.status === 0) return { python: candidate, why: "" };
    tried.push(`${candidate}: ${r.error ? r.error.message : (r.stderr.trim().split("\n").at(-1) ?? `exit ${r.status}`)}`);
  }
  return { why: `no Python with grpc and protobuf (${tried.join("; ")})` };
}

function findProtoc(): string {
  const r = spawnSync("protoc", ["--version"], { encoding: "utf8" });
  return r.status === 0 ? "" : `protoc not found (${r.error?.message ?? r.stderr.trim()})`;
}

const { python, why: noPython } = findPython();
const noProtoc = findProtoc();
const missing = [noPython, noProtoc].filter(Boolean).join("; ");
if (missing && !required) console.warn(`[tests] skipping the Python interop test: ${missing}`);

function run(cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (c: string) => (stdout += c));
    child.stderr.setEncoding("utf8").on("data", (c: string) => (stderr += c));
    const timer = setTimeout(() => child.kill("SIGKILL"), 45_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe("Python gRPC client interop (embedded)", () => {
  let s: TestServer | undefined;
  beforeAll(async () => {
    if (!missing) s = await startServer("embedded");
  });
  afterAll(async () => {
    await s?.close();
  });

  it.runIf(required && !!missing)("Python grpc and protoc are installed (required under CI)", () => {
    throw new Error(`the Python interop test cannot run: ${missing}`);
  });

  it.skipIf(!!missing)("CreateTask, GetTask and a full agent Session from Python over h2c", { timeout: 50_000 }, async () => {
    const r = await run(python!, [SCRIPT, "--target", `127.0.0.1:${s!.port}`, "--proto-dir", path.join(ROOT, "proto")]);
    const last = r.stdout.trim().split("\n").at(-1) ?? "";
    let summary: Record<string, any>;
    try {
      summary = JSON.parse(last) as Record<string, any>;
    } catch {
      throw new Error(`no JSON summary (exit ${r.code}); stdout: ${r.stdout}\nstderr: ${r.stderr}`);
    }
    expect(summary.error, r.stderr).toBeUndefined();
    expect(r.code).toBe(0);
    expect(summary).toMatchObject({ ok: true, final_status: "TASK_STATUS_COMPLETED", result: { answer: 42, by: "python" } });
    expect(summary.checks).toEqual(expect.arrayContaining(["Session: completion_ack for the task", "GetTask: COMPLETED after the session"]));
    // What Python saw is what the server stored.
    const stored = await s!.persistence.tasks.get(summary.task_id as string);
    expect(stored).toMatchObject({ status: "completed", agentId: summary.agent_id, result: { answer: 42, by: "python" } });
  });
});
