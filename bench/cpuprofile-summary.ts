/**
 * Summarises a V8 `.cpuprofile` (from `node --cpu-prof`): self time per
 * function (callFrame functionName + url) and per area (our src/, each
 * node_modules package, Node internals, GC, idle).
 *
 *   node dist/bench/cpuprofile-summary.js <file.cpuprofile> [top]
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileSummary {
  totalMs: number;
  idleMs: number;
  functions: Array<{ name: string; where: string; selfMs: number }>;
  areas: Array<{ area: string; selfMs: number }>;
  /** Native/builtin self time (e.g. socket writes) charged to the nearest JavaScript caller, which says whose syscalls they are. */
  nativeCallers: Array<{ name: string; caller: string; selfMs: number }>;
}

/** A short, stable location: `src/x.ts`-relative for ours, `pkg/file` for dependencies. */
function shortUrl(url: string): string {
  if (!url) return "";
  const u = url.replace(/^file:\/\//, "");
  const nm = u.lastIndexOf("/node_modules/");
  if (nm >= 0) return u.slice(nm + "/node_modules/".length);
  const dist = u.indexOf("/dist/");
  if (dist >= 0) return u.slice(dist + "/dist/".length);
  return u;
}

/** Which bucket a frame's self time goes to. */
function areaOf(cf: CallFrame): string {
  const url = cf.url;
  if (!url) {
    if (cf.functionName.startsWith("(")) return cf.functionName; // (garbage collector), (idle), (program)
    return "(native / builtins)";
  }
  if (url.startsWith("node:")) {
    const m = /^node:(?:internal\/)?([a-z_0-9]+)/.exec(url);
    return `node:${m?.[1] ?? "?"}`;
  }
  const s = shortUrl(url);
  if (url.includes("/node_modules/")) {
    const parts = s.split("/");
    return parts[0]!.startsWith("@") ? `${parts[0]}/${parts[1]}` : parts[0]!;
  }
  if (s.startsWith("src/") || s.startsWith("gen/")) return s.split("/").slice(0, 2).join("/");
  return s;
}

export function summarise(profile: CpuProfile, top = 30): ProfileSummary {
  const byId = new Map<number, ProfileNode>();
  for (const n of profile.nodes) byId.set(n.id, n);
  const selfUs = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i]!;
    selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
  }
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const nativeCallers = new Map<string, { name: string; caller: string; us: number }>();
  const fns = new Map<string, { name: string; where: string; us: number }>();
  const areas = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (const [id, us] of selfUs) {
    const cf = byId.get(id)!.callFrame;
    total += us;
    if (cf.functionName === "(idle)") idle += us;
    const where = cf.url ? `${shortUrl(cf.url)}:${cf.lineNumber + 1}` : "";
    const key = `${cf.functionName}\u0000${cf.url}`;
    const f = fns.get(key) ?? { name: cf.functionName || "(anonymous)", where, us: 0 };
    f.us += us;
    fns.set(key, f);
    const a = areaOf(cf);
    areas.set(a, (areas.get(a) ?? 0) + us);
    if (a === "(native / builtins)") {
      let up = parent.get(id);
      // Skip Node internals too: the interesting caller is the package or our code behind them.
      const internal = (u: string) => !u || u.startsWith("node:");
      while (up !== undefined && internal(byId.get(up)!.callFrame.url)) up = parent.get(up);
      const caller = up === undefined ? "?" : areaOf(byId.get(up)!.callFrame);
      const nk = `${cf.functionName}\u0000${caller}`;
      const n = nativeCallers.get(nk) ?? { name: cf.functionName || "(anonymous)", caller, us: 0 };
      n.us += us;
      nativeCallers.set(nk, n);
    }
  }
  return {
    totalMs: total / 1000,
    idleMs: idle / 1000,
    functions: [...fns.values()]
      .sort((a, b) => b.us - a.us)
      .slice(0, top)
      .map((f) => ({ name: f.name, where: f.where, selfMs: f.us / 1000 })),
    areas: [...areas.entries()]
      .sort((a, b) => b[1] - a[1])
      .map(([area, us]) => ({ area, selfMs: us / 1000 })),
    nativeCallers: [...nativeCallers.values()]
      .sort((a, b) => b.us - a.us)
      .slice(0, 12)
      .map((n) => ({ name: n.name, caller: n.caller, selfMs: n.us / 1000 })),
  };
}

export function formatSummary(s: ProfileSummary, topAreas = 20): string {
  const busy = s.totalMs - s.idleMs;
  const pct = (ms: number) => `${((100 * ms) / Math.max(busy, 1e-9)).toFixed(1).padStart(5)}%`;
  const lines: string[] = [];
  lines.push(`profiled ${(s.totalMs / 1000).toFixed(1)} s, of which idle ${(s.idleMs / 1000).toFixed(1)} s; percentages are of non-idle time (${(busy / 1000).toFixed(1)} s)`);
  lines.push("", "self time by area:");
  for (const a of s.areas.filter((x) => x.area !== "(idle)").slice(0, topAreas)) lines.push(`  ${pct(a.selfMs)}  ${a.selfMs.toFixed(0).padStart(7)} ms  ${a.area}`);
  lines.push("", "native self time by nearest JavaScript caller:");
  for (const n of s.nativeCallers) lines.push(`  ${pct(n.selfMs)}  ${n.selfMs.toFixed(0).padStart(7)} ms  ${n.name}  ← ${n.caller}`);
  lines.push("", "top functions by self time:");
  for (const f of s.functions.filter((x) => x.name !== "(idle)")) lines.push(`  ${pct(f.selfMs)}  ${f.selfMs.toFixed(0).padStart(7)} ms  ${f.name}  ${f.where}`);
  return lines.join("\n");
}

export function summariseFile(file: string, top = 30): string {
  return formatSummary(summarise(JSON.parse(readFileSync(file, "utf8")) as CpuProfile, top));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write("usage: cpuprofile-summary <file.cpuprofile> [top]\n");
    process.exit(2);
  }
  process.stdout.write(`${summariseFile(file, Number(process.argv[3] ?? 30))}\n`);
}
