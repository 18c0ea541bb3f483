/**
 * The service under test as an operator runs it: `node dist/src/main.js` in a
 * child process, configured only by environment variables. Reads its CPU time
 * and memory from /proc.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { readdirSync as readdir, readFileSync, readlinkSync as readlink } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const DEFAULT_MAIN = path.join(ROOT, "dist/src/main.js");

export interface ServiceOptions {
  databaseUrl: string;
  redisUrl?: string;
  redisPrefix?: string;
  /** Directory for a V8 CPU profile (`--cpu-prof`), written when the service exits. */
  cpuProfDir?: string;
  env?: Record<string, string>;
  /** The compiled entry point; default dist/src/main.js of this checkout. */
  main?: string;
}

/** Clock ticks per second for /proc/<pid>/stat; 100 on every Linux we run on. */
const CLK_TCK = 100;

export interface ProcSample {
  /** user + system CPU time, ms. */
  cpuMs: number;
  rssMb: number;
  /** Peak RSS so far (VmHWM), MB. */
  peakRssMb: number;
}

export class Service {
  readonly address: string;
  private exited: Promise<number | null>;
  private stderr = "";

  private constructor(
    private readonly child: ChildProcess,
    address: string,
  ) {
    this.address = address;
    this.exited = new Promise((resolve) => {
      if (child.exitCode !== null) resolve(child.exitCode);
      else child.once("exit", (code) => resolve(code));
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  static async start(o: ServiceOptions): Promise<Service> {
    const main = path.resolve(o.main || DEFAULT_MAIN);
    const args = o.cpuProfDir ? ["--cpu-prof", `--cpu-prof-dir=${o.cpuProfDir}`, main] : [main];
    const env: Record<string, string> = {
      PATH: process.env.PATH ?? "",
      PORT: "0",
      HOST: "127.0.0.1",
      DATABASE_URL: o.databaseUrl,
      LOG_LEVEL: "warn",
      HEARTBEAT_INTERVAL_MS: "10000",
      HEARTBEAT_TIMEOUT_MS: "3600000",
      ...(o.redisUrl ? { REDIS_URL: o.redisUrl, REDIS_PREFIX: o.redisPrefix ?? "aaosbench" } : {}),
      ...o.env,
    };
    // LOG_LEVEL=warn hides the "listening" line (info logs every assignment,
    // which would cost the service CPU), so the port comes from /proc instead.
    const child = spawn(process.execPath, args, { env, cwd: path.resolve(path.dirname(main), "../.."), stdio: ["ignore", "pipe", "pipe"] });
    live.add(child);
    child.once("exit", () => live.delete(child));
    let out = "";
    let err = "";
    child.stdout!.on("data", (d: Buffer) => {
      if (out.length < 65536) out += d.toString();
    });
    child.stderr!.on("data", (d: Buffer) => {
      if (err.length < 65536) err += d.toString();
    });
    const started = Date.now();
    for (;;) {
      if (child.exitCode !== null) throw new Error(`service exited with ${child.exitCode} at start:\n${out}${err}`);
      const port = listeningPort(child.pid!);
      if (port) {
        const address = `127.0.0.1:${port}`;
        if (await healthy(address)) {
          const s = new Service(child, address);
          s.stderr = err;
          return s;
        }
      }
      if (Date.now() - started > 60_000) {
        child.kill("SIGKILL");
        throw new Error(`service did not start within 60 s:\n${out}${err}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  sample(): ProcSample {
    return procSample(this.pid);
  }

  /** SIGTERM and wait (graceful, so a CPU profile gets written); SIGKILL after `graceMs`. */
  async stop(graceMs = 15_000): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill("SIGTERM");
    const t = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(t);
  }
}

/** Every service child still running, for emergency clean-up. */
export const live = new Set<ChildProcess>();

export function killAll(): void {
  for (const c of live) c.kill("SIGKILL");
}

export function procSample(pid: number): ProcSample {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  // Fields after "(comm)": state is field 3, utime 14, stime 15.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(rest[11]) + Number(rest[12]);
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(status)?.[1] ?? 0);
  return { cpuMs: (ticks * 1000) / CLK_TCK, rssMb: kb("VmRSS") / 1024, peakRssMb: kb("VmHWM") / 1024 };
}

/** The TCP port a process listens on, from /proc/net/tcp and its socket inodes. */
function listeningPort(pid: number): number | undefined {
  let inodes: Set<string>;
  try {
    const fdDir = `/proc/${pid}/fd`;
    inodes = new Set();
    for (const fd of readdir(fdDir)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlink(`${fdDir}/${fd}`));
        if (m) inodes.add(m[1]!);
      } catch {
        // fd closed meanwhile
      }
    }
  } catch {
    return undefined;
  }
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      // st 0A = LISTEN
      if (f[3] === "0A" && inodes.has(f[9]!)) return parseInt(f[1]!.split(":")[1]!, 16);
    }
  }
  return undefined;
}

async function healthy(address: string): Promise<boolean> {
  try {
    const r = await fetch(`http://${address}/health`, { signal: AbortSignal.timeout(2000) });
    return r.ok;
  } catch {
    return false;
  }
}
