/**
 * Seeded random inputs for the hostile-input fuzz test. Everything derives
 * from one printed seed (`FUZZ_SEED`), and every case from its own sub-seed,
 * so a failure reproduces whatever order the concurrent requests ran in.
 */

/** A small deterministic PRNG (mulberry32) with the helpers the generators need. */
export interface Rng {
  /** Uniform in [0, 1). */
  next(): number;
  /** Integer in [lo, hi], both inclusive. */
  int(lo: number, hi: number): number;
  bool(p?: number): boolean;
  pick<T>(items: readonly T[]): T;
  bytes(n: number): Buffer;
}

export function createRng(seed: number): Rng {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1));
  return {
    next,
    int,
    bool: (p = 0.5) => next() < p,
    pick: <T>(items: readonly T[]) => items[Math.floor(next() * items.length)]!,
    bytes: (n: number) => {
      const b = Buffer.alloc(n);
      for (let i = 0; i < n; i++) b[i] = int(0, 255);
      return b;
    },
  };
}

/** The sub-seed of case `index` of `stream` ("rest", "ws", ...) under the run's seed. */
export function caseSeed(seed: number, stream: string, index: number): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  for (const c of `${stream}#${index}`) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0;
  return h;
}

/** The run's seed: `FUZZ_SEED` when set, otherwise a fresh one (printed by the test). */
export function runSeed(env: Record<string, string | undefined> = process.env): number {
  const raw = env.FUZZ_SEED;
  if (raw !== undefined && raw !== "") {
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new Error(`FUZZ_SEED must be an integer in [0, 2^32): ${raw}`);
    return n;
  }
  return Math.floor(Math.random() * 0xffffffff) >>> 0;
}

/** `FUZZ_ITERATIONS` (total inputs per backend run), or the default. */
export function runIterations(fallback: number, env: Record<string, string | undefined> = process.env): number {
  const raw = env.FUZZ_ITERATIONS;
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new Error(`FUZZ_ITERATIONS must be a positive integer: ${raw}`);
  return n;
}

export const TASK_TYPES = ["code", "research", "qa", "documentation", "analysis", "synthesis", "trading"] as const;
export const TASK_STATUSES = ["pending", "assigned", "completed", "failed", "cancelled"] as const;

/** Pieces that tend to break parsers, encoders and databases. */
const NASTY = [
  "\u0000",
  "a\u0000b",
  "\u0001\u0002\u001f\u007f",
  "\ud800",
  "\udfff",
  "x\ud83dy",
  "\ud83d\ude00",
  "\ufeff",
  "\uffff\ufffe",
  "\u2028\u2029",
  "\u202e\u202d",
  "e\u0301\u0301\u0301",
  "漢字かな",
  "مرحبا",
  "𝕳𝖊𝖑𝖑𝖔",
  "'; DROP TABLE tasks; --",
  "\" OR 1=1 --",
  "%s%n%x%d",
  "${jndi:ldap://x}",
  "{{7*7}}",
  "<script>alert(1)</script>",
  "../../etc/passwd",
  "\\",
  '"',
  "\\u0000",
  "null",
  "undefined",
  "__proto__",
  "constructor",
  "\r\n\t",
  " ",
  "",
];

/** A random string: plain text, hostile pieces, or both. Length roughly up to `maxLen`. */
export function randomString(rng: Rng, maxLen = 40): string {
  const parts: string[] = [];
  const target = rng.int(0, maxLen);
  let len = 0;
  while (len < target) {
    let p: string;
    switch (rng.int(0, 4)) {
      case 0:
        p = rng.pick(NASTY);
        break;
      case 1:
        p = String.fromCharCode(rng.int(0, 0xffff));
        break;
      case 2:
        p = String.fromCodePoint(rng.int(0x10000, 0x10ffff));
        break;
      default:
        p = Array.from({ length: rng.int(1, 12) }, () => String.fromCharCode(rng.int(0x20, 0x7e))).join("");
    }
    parts.push(p);
    len += p.length || 1;
  }
  return parts.join("");
}

/** A random JSON value (what `JSON.parse` could give), at most `depth` levels deep. */
export function randomJson(rng: Rng, depth = 3): unknown {
  const kind = depth <= 0 ? rng.int(0, 4) : rng.int(0, 6);
  switch (kind) {
    case 0:
      return null;
    case 1:
      return rng.bool();
    case 2:
      return rng.pick([0, 1, -1, 0.5, 1e21, -1e-7, 2 ** 53 + 2, -(2 ** 31), 2 ** 31, Number.MAX_VALUE, Number.MIN_VALUE, rng.int(-1e6, 1e6), rng.next() * 1e6]);
    case 3:
    case 4:
      return randomString(rng, 20);
    case 5:
      return Array.from({ length: rng.int(0, 4) }, () => randomJson(rng, depth - 1));
    default:
      return randomObject(rng, depth - 1);
  }
}

export function randomObject(rng: Rng, depth = 2): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  for (let i = rng.int(0, 4); i > 0; i--) {
    const key = rng.bool(0.3) ? randomString(rng, 10) : rng.pick(["k", "n", "list", "nested", "id", "a b", "ünï", "x.y", "$where"]);
    // JSON.parse makes "__proto__" an own key; an object literal would not.
    if (key === "__proto__") continue;
    o[key] = randomJson(rng, depth);
  }
  return o;
}

/** `{"x":{"x":...}}` or `[[...]]`, `depth` levels, as JSON text (no recursion limits in the way). */
export function deepJsonText(depth: number, asArray: boolean, leaf = "1"): string {
  return asArray ? "[".repeat(depth) + leaf + "]".repeat(depth) : '{"x":'.repeat(depth) + leaf + "}".repeat(depth);
}

/** A description the contract accepts: 3..2000 UTF-16 units of plain or unicode text. */
export function validDescription(rng: Rng): string {
  const base = rng.bool(0.7) ? Array.from({ length: rng.int(3, 60) }, () => String.fromCharCode(rng.int(0x20, 0x7e))).join("") : `fuzz ${rng.pick(["漢字かな", "مرحبا", "𝕳𝖊𝖑𝖑𝖔", "e\u0301", "tab\tnew\nline"])}`;
  const s = rng.bool(0.05) ? "d".repeat(rng.int(1990, 2000)) : base;
  return s.length < 3 ? `${s}abc` : s.slice(0, 2000);
}

/** A valid `POST /tasks` body, with optional fields sometimes present. */
export function validRestBody(rng: Rng): Record<string, unknown> {
  const body: Record<string, unknown> = { task_type: rng.pick(TASK_TYPES), description: validDescription(rng) };
  if (rng.bool()) body.priority = rng.bool(0.1) ? null : rng.int(0, 10);
  if (rng.bool()) body.metadata = rng.bool(0.1) ? null : randomObject(rng, 3);
  return body;
}

/** Numbers and number-like tokens spelled as raw JSON text (some are not JSON at all). */
export const NUMBER_TOKENS = ["1e309", "-1e309", "-0", "0.0", "5.0", "5e0", "1e-400", "10.0000000000000001", "9007199254740993", "-9223372036854775809", "NaN", "Infinity", "-Infinity", "0x5", "05", "+5", ".5", "5.", "1_000", '"NaN"', '"5"', "true", "[]", "{}"];

/** JSON text of `value` with one key's value replaced by a raw token. */
export function withRawField(value: Record<string, unknown>, key: string, raw: string): string {
  const marker = `__RAW_${Math.random().toString(36).slice(2)}__`;
  return JSON.stringify({ ...value, [key]: marker }).replace(JSON.stringify(marker), raw);
}

export interface RestInput {
  /** What the case is, for the failure report. */
  label: string;
  body: Buffer;
  headers: Record<string, string>;
}

const CONTENT_TYPES = [
  "application/json; charset=utf-8",
  "APPLICATION/JSON",
  "application/json; charset=utf-16",
  "application/json; charset=latin1",
  "application/json;;;",
  "application/vnd.api+json",
  "text/plain",
  "text/json",
  "application/x-www-form-urlencoded",
  "multipart/form-data; boundary=xyz",
  "application/xml",
  "application/octet-stream",
  "*/*",
  "json",
  "",
];

/** One `POST /tasks` request: a valid body, a mutation of one, or garbage, with hostile headers now and then. */
export function restCreateInput(rng: Rng): RestInput {
  const headers: Record<string, string> = { "content-type": "application/json" };
  let label: string;
  let text: string | undefined;
  let body: Buffer | undefined;
  const base = validRestBody(rng);
  const field = rng.pick(["task_type", "description", "priority", "metadata"]);
  switch (rng.int(0, 13)) {
    case 0:
    case 1:
    case 2:
      label = "valid";
      text = JSON.stringify(base);
      break;
    case 3: {
      label = `drop ${field}`;
      delete base[field];
      text = JSON.stringify(base);
      break;
    }
    case 4: {
      label = `retype ${field}`;
      base[field] = randomJson(rng, 2);
      text = JSON.stringify(base);
      break;
    }
    case 5: {
      label = `duplicate ${field}`;
      const dup = JSON.stringify(randomJson(rng, 1));
      text = JSON.stringify(base).replace(/^\{/, `{"${field}":${dup},`);
      if (rng.bool()) text = text.replace(/\}$/, `,"${field}":${dup}}`);
      break;
    }
    case 6: {
      const size = rng.pick([2001, 5000, 70 * 1024, 140 * 1024, rng.int(1, 200_000)]);
      const s = rng.pick(["x", "é", "😀", "\u0000", "\\"]).repeat(size);
      if (rng.bool()) {
        label = `huge description (${size})`;
        base.description = s;
      } else {
        label = `huge metadata string (${size})`;
        base.metadata = { blob: s };
      }
      text = JSON.stringify(base);
      break;
    }
    case 7: {
      label = `unicode ${field}`;
      if (field === "metadata") base.metadata = { [randomString(rng, 8)]: randomString(rng, 30), nested: { [randomString(rng, 4)]: [randomString(rng, 5)] } };
      else base[field] = randomString(rng, rng.int(3, 80));
      text = JSON.stringify(base);
      break;
    }
    case 8: {
      const depth = rng.pick([20, 31, 32, 33, 64, 200, 1000, 5000]);
      label = `deep metadata (${depth})`;
      const deep = deepJsonText(depth, rng.bool(), rng.pick(["1", '"s"', "null", "{}", "[]"]));
      text = withRawField(base, rng.bool(0.8) ? "metadata" : field, rng.bool() ? `{"d":${deep}}` : deep);
      break;
    }
    case 9: {
      const token = rng.pick(NUMBER_TOKENS);
      const where = rng.pick(["priority", "metadata.n", "description", "task_type"]);
      label = `number token ${token} at ${where}`;
      text = where === "metadata.n" ? withRawField(base, "metadata", `{"n":${token}}`) : withRawField(base, where, token);
      break;
    }
    case 10: {
      const extra = rng.pick(['"__proto__":{"polluted":true}', '"constructor":{"prototype":{"x":1}}', '"status":"completed"', '"task_id":"00000000-0000-4000-8000-000000000000"', '"result":{"r":1}', '"attempt":99', '"agent_id":"me"']);
      label = `extra field ${extra}`;
      text = JSON.stringify(base).replace(/^\{/, `{${extra},`);
      break;
    }
    case 11: {
      label = "non-object JSON";
      text = rng.pick(["[]", "null", "true", "0", '"text"', "[" + JSON.stringify(base) + "]", "[[[[[[]]]]]]", JSON.stringify(randomJson(rng, 2))]);
      break;
    }
    case 12: {
      const full = JSON.stringify(base);
      const kind = rng.int(0, 4);
      if (kind === 0) {
        label = "truncated JSON";
        text = full.slice(0, rng.int(0, full.length - 1));
      } else if (kind === 1) {
        label = "random bytes";
        body = rng.bytes(rng.int(0, 300));
      } else if (kind === 2) {
        label = "BOM + JSON";
        text = `\ufeff${full}`;
      } else if (kind === 3) {
        label = "invalid UTF-8 inside a string";
        const b = Buffer.from(full);
        const at = full.indexOf('"description":"') + '"description":"'.length;
        body = Buffer.concat([b.subarray(0, at), Buffer.from([rng.pick([0xc0, 0xff, 0xed, 0xf8, 0x80])]), b.subarray(at)]);
      } else {
        label = "trailing garbage";
        text = full + rng.pick(["}", ",", " x", "\u0000", "{}", "\n\n"]);
      }
      break;
    }
    default: {
      label = "JSON with hostile whitespace";
      text = JSON.stringify(base, null, rng.pick(["\t", " ".repeat(10), "\r\n"]));
    }
  }
  // Transport-level mutations on top of some bodies.
  if (rng.bool(0.12)) {
    const ct = rng.pick(CONTENT_TYPES);
    label += `; content-type ${JSON.stringify(ct)}`;
    if (ct === "") delete headers["content-type"];
    else headers["content-type"] = ct;
  }
  if (rng.bool(0.05)) {
    const enc = rng.pick(["gzip", "deflate", "br", "identity", "x-garbage"]);
    label += `; content-encoding ${enc}`;
    headers["content-encoding"] = enc;
  }
  if (rng.bool(0.03)) {
    headers["x-correlation-id"] = rng.pick(["", " ", "a".repeat(2000), "\u00e9t\u00e9", "id\twith\ttabs", randomAsciiHeader(rng)]);
    label += `; correlation id ${JSON.stringify(headers["x-correlation-id"].slice(0, 40))}`;
  }
  return { label, body: body ?? Buffer.from(text ?? ""), headers };
}

/** A header-safe (latin-1, no CR/LF) random string. */
function randomAsciiHeader(rng: Rng): string {
  return Array.from({ length: rng.int(1, 100) }, () => String.fromCharCode(rng.pick([rng.int(0x20, 0x7e), rng.int(0xa0, 0xff), 0x09]))).join("");
}

/** A random version-4 UUID drawn from `rng` (reproducible, unlike crypto.randomUUID). */
export function randomUuid(rng: Rng): string {
  const h = rng.bytes(16);
  h[6] = (h[6]! & 0x0f) | 0x40;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const x = h.toString("hex");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

/** Percent-encodes a string into a path segment, sometimes leaving malformed or raw pieces. */
function hostileSegment(rng: Rng): string {
  switch (rng.int(0, 9)) {
    case 0:
      return "00000000-0000-4000-8000-000000000000";
    case 1:
      return encodeURIComponent(randomString(rng, 40).replace(/[\ud800-\udfff]/g, "x"));
    case 2:
      return rng.pick(["%E0%A4%A", "%zz", "%", "%00", "%2F", "..%2F..%2Fetc", "%c0%ae%c0%ae", "%ED%A0%80", "%FF%FE", "%u0041"]);
    case 3:
      return "0".repeat(rng.int(100, 8000));
    case 4:
      return encodeURIComponent("'; DROP TABLE tasks; --");
    case 5:
      return randomUuid(rng).toUpperCase();
    case 6:
      return `${randomUuid(rng)}${rng.pick(["x", "%20", "/", "/..", "?", "#", "%0A", ";"])}`;
    case 7:
      return rng.pick(["..", ".", "", "tasks", "%2e%2e", "a/b/c"]);
    case 8:
      return Array.from({ length: rng.int(1, 64) }, () => rng.pick("0123456789abcdef-ABCDEF".split(""))).join("");
    default:
      return encodeURIComponent(String.fromCharCode(rng.int(1, 0xd7ff)));
  }
}

/** A `GET /tasks/{id}` path; `knownIds` are sometimes used as they are or slightly mangled. */
export function taskPathInput(rng: Rng, knownIds: readonly string[]): { label: string; path: string; known?: string } {
  if (knownIds.length && rng.bool(0.25)) {
    const id = rng.pick(knownIds);
    if (rng.bool()) return { label: "known id", path: `/tasks/${id}`, known: id };
    const mangled = rng.pick([id.toUpperCase(), id.slice(0, -1), `${id}0`, id.replace(/-/g, ""), ` ${id}`, `${id}%00`, encodeURIComponent(`{${id}}`)]);
    return { label: `mangled known id ${JSON.stringify(mangled)}`, path: `/tasks/${mangled.replace(/ /g, "%20")}` };
  }
  const seg = hostileSegment(rng);
  return { label: `id ${JSON.stringify(seg.slice(0, 120))}${seg.length > 120 ? `… (${seg.length} chars)` : ""}`, path: `/tasks/${seg}` };
}

/** A `GET /tasks?...` query string with random, repeated and hostile parameters. */
export function listQueryInput(rng: Rng): string {
  const parts: string[] = [];
  for (let i = rng.int(0, 4); i > 0; i--) {
    const key = rng.pick(["limit", "limit", "status", "task_type", "page_token", "offset", "__proto__", "limit[]", "status[0]", encodeURIComponent(randomString(rng, 6).replace(/[\ud800-\udfff]/g, "x"))]);
    const value = rng.pick([
      String(rng.int(-5, 1200)),
      rng.pick(["0", "1", "1000", "1001", "-1", "1.5", "1e3", "0x10", "NaN", "Infinity", "", " 5", "99999999999999999999", "%00", "%E0%A4%A"]),
      rng.pick(TASK_STATUSES),
      rng.pick(TASK_TYPES),
      rng.pick(["PENDING", "TASK_TYPE_CODE", "code,qa", "'--", "%27%20OR%201%3D1"]),
      encodeURIComponent(randomString(rng, 20).replace(/[\ud800-\udfff]/g, "x")),
      "x".repeat(rng.int(100, 4000)),
    ]);
    parts.push(rng.bool(0.1) ? key : `${key}=${value}`);
  }
  return parts.length ? `?${parts.join(rng.bool(0.9) ? "&" : rng.pick([";", "&&", "&=&"]))}` : rng.pick(["", "?", "?&", "?=", "?limit"]);
}

/** Mutations of a byte string: flip, insert, delete, truncate, duplicate or splice random bytes. */
export function mutateBytes(rng: Rng, input: Uint8Array): { bytes: Buffer; how: string } {
  let b = Buffer.from(input);
  const steps: string[] = [];
  for (let n = rng.int(1, 4); n > 0; n--) {
    const at = b.length ? rng.int(0, b.length - 1) : 0;
    switch (rng.int(0, 6)) {
      case 0:
        if (b.length) {
          const bit = 1 << rng.int(0, 7);
          b[at] = b[at]! ^ bit;
          steps.push(`flip bit ${bit} at ${at}`);
        }
        break;
      case 1: {
        const ins = rng.bytes(rng.int(1, 8));
        b = Buffer.concat([b.subarray(0, at), ins, b.subarray(at)]);
        steps.push(`insert ${ins.toString("hex")} at ${at}`);
        break;
      }
      case 2: {
        const len = rng.int(1, 8);
        b = Buffer.concat([b.subarray(0, at), b.subarray(at + len)]);
        steps.push(`delete ${len} at ${at}`);
        break;
      }
      case 3:
        b = b.subarray(0, at);
        steps.push(`truncate to ${at}`);
        break;
      case 4:
        b[at] = rng.pick([0x00, 0xff, 0x7f, 0x80]);
        steps.push(`set byte ${at} to ${b[at]}`);
        break;
      case 5: {
        // A length-delimited field that promises a huge or negative (10-byte varint) length.
        const tag = rng.pick([0x12, 0x22, 0x3a, 0x0a]);
        const lens = [Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]), Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), Buffer.from([0x80])];
        const extra = Buffer.concat([Buffer.from([tag]), rng.pick(lens)]);
        b = Buffer.concat([b, extra]);
        steps.push(`append ${extra.toString("hex")}`);
        break;
      }
      default: {
        // Repeat a field / splice the message into itself.
        const from = rng.int(0, Math.max(0, b.length - 1));
        b = Buffer.concat([b, b.subarray(from)]);
        steps.push(`append copy from ${from}`);
      }
    }
  }
  return { bytes: b, how: steps.join(", ") };
}

/** A gRPC length-prefixed message; `lie` makes the prefix disagree with the payload. */
export function grpcEnvelope(payload: Uint8Array, options: { flags?: number; length?: number } = {}): Buffer {
  const head = Buffer.alloc(5);
  head[0] = options.flags ?? 0;
  head.writeUInt32BE(options.length ?? payload.length, 1);
  return Buffer.concat([head, payload]);
}

/** Short text for a failure report. */
export function show(value: unknown, max = 400): string {
  let s: string;
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    const b = Buffer.from(value);
    s = b.length <= max / 2 ? `hex:${b.toString("hex")}` : `hex:${b.subarray(0, max / 2).toString("hex")}… (${b.length} bytes)`;
    return s;
  }
  s = typeof value === "string" ? JSON.stringify(value) : JSON.stringify(value, (_k, v: unknown) => (typeof v === "bigint" ? `${v}n` : v));
  if (s === undefined) s = String(value);
  return s.length > max ? `${s.slice(0, max)}… (${s.length} chars)` : s;
}
