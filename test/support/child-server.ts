import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmdirSync, statSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
/** The real entry point, as an operator runs it. */
export const MAIN = path.join(ROOT, "dist/src/main.js");

function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(p) : statSync(p).mtimeMs);
  }
  return newest;
}

/**
 * Compiles `src/` to `dist/` when `dist/src/main.js` is missing or older than
 * a source file (`make test` builds first; a bare `vitest run` builds here).
 * A lock directory keeps two test workers from compiling at once.
 */
export function ensureBuilt(): void {
  const stale = () => !existsSync(MAIN) || statSync(MAIN).mtimeMs < Math.max(newestMtime(path.join(ROOT, "src")), newestMtime(path.join(ROOT, "gen")));
  if (!stale()) return;
  const lock = path.join(ROOT, "dist", ".fault-build.lock");
  mkdirSync(path.dirname(lock), { recursive: true });
  const deadline = Date.now() + 120_000;
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      if (Date.now() > deadline) throw new Error(`build lock ${lock} held for too long`);
      execFileSync("sleep", ["0.2"]);
    }
  }
  try {
    if (stale()) execFileSync("npx", ["tsc", "-p", "tsconfig.json"], { cwd: ROOT, stdio: "inherit" });
  } finally {
    rmdirSync(lock);
  }
}

/** Every child still running, killed when the test process exits so none outlives a timed-out test. */
const live = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of live) child.kill("SIGKILL");
});

export interface ChildServerOptions {
  /** Environment on top of PATH, PORT=0, HOST=127.0.0.1, LOG_LEVEL=info. */
  env: Record<string, string>;
  cwd?: string;
  /** How long to wait for the listening line. */
  startTimeoutMs?: number;
  /** A name for messages. */
  name?: string;
}

/**
 * The real server (`node dist/src/main.js`) as a child process. Its JSON log
 * lines are collected; the URL comes from the line that carries "address".
 */
export class ChildServer {
  /** Every stdout line, parsed when it is JSON (else `{ raw }`). */
  readonly logs: Array<Record<string, unknown>> = [];
  stderr = "";
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  url = "";
  private partial = "";

  private constructor(
    readonly child: ChildProcess,
    readonly name: string,
  ) {
    this.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
    child.stdout!.on("data", (d: Buffer) => {
      this.partial += d.toString();
      const lines = this.partial.split("\n");
      this.partial = lines.pop() ?? "";
      for (const line of lines) {
        if (!line.trim()) continue;
        try {
          this.logs.push(JSON.parse(line) as Record<string, unknown>);
        } catch {
          this.logs.push({ raw: line });
        }
      }
    });
    child.stderr!.on("data", (d: Buffer) => (this.stderr += d.toString()));
  }

  /**
   * Spawns the server and waits for its listening line. `onSpawn` sees the
   * child at once, so a caller can stop it even if the start never finishes.
   */
  static async start(options: ChildServerOptions, onSpawn?: (server: ChildServer) => void): Promise<ChildServer> {
    ensureBuilt();
    const child = spawn(process.execPath, [MAIN], {
      env: { PATH: process.env.PATH ?? "", PORT: "0", HOST: "127.0.0.1", LOG_LEVEL: "info", ...options.env },
      cwd: options.cwd ?? ROOT,
      stdio: ["ignore", "pipe", "pipe"],
    });
    live.add(child);
    child.once("exit", () => live.delete(child));
    const server = new ChildServer(child, options.name ?? "server");
    onSpawn?.(server);
    const timeoutMs = options.startTimeoutMs ?? 20_000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = server.logs.find((l) => typeof l.address === "string");
      if (line) {
        server.url = line.address as string;
        return server;
      }
      if (!server.running) throw new Error(`${server.name} exited before listening: ${server.output()}`);
      if (Date.now() > deadline) {
        child.kill("SIGKILL");
        throw new Error(`${server.name} not listening after ${timeoutMs} ms: ${server.output()}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  get port(): number {
    return Number(new URL(this.url).port);
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The collected output, for failure messages. */
  output(): string {
    return `${this.logs.map((l) => JSON.stringify(l)).join("\n")}\n${this.partial}\n${this.stderr}`.slice(-8000);
  }

  /** Log lines whose `msg` matches. */
  lines(msg: RegExp): Array<Record<string, unknown>> {
    return this.logs.filter((l) => typeof l.msg === "string" && msg.test(l.msg));
  }

  /** `kill -9`: the process dies at once, with no chance to clean up. */
  async kill9(): Promise<void> {
    if (!this.running) return;
    this.child.kill("SIGKILL");
    await this.exited;
  }

  /** Freezes the process (SIGSTOP), like a long GC pause or a hung VM. */
  pause(): void {
    this.child.kill("SIGSTOP");
  }

  /** Thaws a paused process (SIGCONT). */
  resume(): void {
    this.child.kill("SIGCONT");
  }

  /** Sends SIGTERM; resolves with the exit when it comes. */
  async terminate(timeoutMs = 30_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (!this.running) return this.exited;
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Clean-up for afterEach: resumes a paused child and kills it. Safe twice. */
  async stop(): Promise<void> {
    if (!this.running) return;
    this.resume();
    await this.kill9();
  }
}
