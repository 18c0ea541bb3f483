import { Redis } from "ioredis";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { createInProcessQueue, createRedisQueue, type PriorityQueue, type QueueEntry, type QueueLog } from "../../src/queue/index.js";
import { createRedisTaskEvents } from "../../src/queue/redis-events.js";
import type { TaskChange } from "../../src/tasks/task-events.js";
import { TASK_TYPES, type TaskRecord, type TaskType } from "../../src/tasks/task-types.js";
import { stateOf, taskRecord } from "../support/records.js";
import { redisAvailable, TEST_REDIS_URL, uniqueName } from "../support/services.js";
import { freePort, hasRedisServer, PrivateRedis } from "../support/private-redis.js";
import { TcpProxy } from "../support/tcp-proxy.js";

/** Every Redis prefix this file used, so afterAll can delete exactly its keys. */
const usedPrefixes: string[] = [];
const filePrefix = uniqueName("queue_contract");
let prefixCount = 0;

function newPrefix(): string {
  const prefix = `${filePrefix}_${++prefixCount}`;
  usedPrefixes.push(prefix);
  return prefix;
}

function keysOf(prefix: string): string[] {
  // ":seq:rebuilt" is the marker a reconcile leaves; without it every run would leave one key per prefix behind.
  return [`{${prefix}}:seq`, `{${prefix}}:seq:rebuilt`, ...TASK_TYPES.map((t) => `{${prefix}}:q:${t}`)];
}

/** Queues opened by the current test; closed after it. */
const open: PriorityQueue[] = [];
function track(queue: PriorityQueue): PriorityQueue {
  open.push(queue);
  return queue;
}

afterEach(async () => {
  await Promise.all(open.splice(0).map((q) => q.close()));
});

afterAll(async () => {
  if (!redisAvailable || usedPrefixes.length === 0) return;
  const admin = new Redis(TEST_REDIS_URL);
  try {
    await admin.del(...usedPrefixes.flatMap(keysOf));
    const db3 = admin.duplicate({ db: otherDb() });
    await db3.del(...usedPrefixes.flatMap(keysOf));
    await db3.quit();
  } finally {
    await admin.quit();
  }
});

/** A db number different from the one TEST_REDIS_URL selects. */
function otherDb(): number {
  const base = Number(new URL(TEST_REDIS_URL).pathname.slice(1) || 0);
  return base === 3 ? 4 : 3;
}

function entry(taskId: string, priority: number, seq: number, taskType: TaskType = "code"): QueueEntry {
  return { taskId, taskType, priority, seq };
}

/** `total` entries t0…, cycling priorities 0–10 over three types; returns those types. */
async function fillMixed(queue: PriorityQueue, total: number) {
  const types = ["code", "research", "analysis"] as const;
  await queue.reconcile(
    Array.from({ length: total }, (_, i) => entry(`t${i}`, i % 11, i + 1, types[i % 3])),
    total,
  );
  return types;
}

async function drain(queue: PriorityQueue, types: readonly TaskType[] = TASK_TYPES): Promise<QueueEntry[]> {
  const out: QueueEntry[] = [];
  for (let e = await queue.claim(types); e !== null; e = await queue.claim(types)) out.push(e);
  return out;
}

const factories = [
  { name: "in-process", available: true, make: () => createInProcessQueue() },
  {
    name: "redis",
    available: redisAvailable,
    make: () => {
      const q = createRedisQueue({ url: TEST_REDIS_URL, prefix: newPrefix() });
      // A fresh shared queue numbers tasks only after its first rebuild. Commands
      // on one connection run in order, so this precedes everything a test sends.
      void q.reconcile([], 0);
      return q;
    },
  },
];

for (const factory of factories) {
  describe.skipIf(!factory.available)(`${factory.name} queue: PriorityQueue contract`, () => {
    const make = () => track(factory.make());

    it("claims higher priority first", async () => {
      const q = make();
      for (const [i, p] of [5, 0, 10, 3, 7].entries()) await q.enqueue(entry(`t${i}`, p, i + 1));
      expect((await drain(q)).map((e) => e.priority)).toEqual([10, 7, 5, 3, 0]);
      expect(await q.claim(TASK_TYPES)).toBeNull();
    });

    it("claims equal priorities by ascending seq, whatever the enqueue order", async () => {
      const q = make();
      await q.enqueue(entry("b", 5, 20));
      await q.enqueue(entry("c", 5, 30));
      // A task going back to the queue keeps its original (earlier) place.
      await q.enqueue(entry("a", 5, 10));
      expect(await drain(q)).toEqual([entry("a", 5, 10), entry("b", 5, 20), entry("c", 5, 30)]);
    });

    it("returns only requested types and picks the best across them", async () => {
      const q = make();
      await q.enqueue(entry("code-5", 5, 1, "code"));
      await q.enqueue(entry("research-8", 8, 2, "research"));
      await q.enqueue(entry("qa-9", 9, 3, "qa"));
      await q.enqueue(entry("research-5-later", 5, 4, "research"));

      expect(await q.claim(["code", "research"])).toEqual(entry("research-8", 8, 2, "research"));
      // Equal priority across types: the lower seq wins.
      expect(await q.claim(["research", "code"])).toEqual(entry("code-5", 5, 1, "code"));
      expect(await q.claim(["code", "research"])).toEqual(entry("research-5-later", 5, 4, "research"));
      expect(await q.claim(["code", "research"])).toBeNull();
      expect(await q.claim([])).toBeNull();
      expect(await q.claim(["qa", "qa"])).toEqual(entry("qa-9", 9, 3, "qa"));
    });

    it("ignores an enqueue of a task already queued", async () => {
      const q = make();
      await q.enqueue(entry("x", 5, 1));
      await q.enqueue(entry("x", 9, 2));
      expect(await q.depth()).toEqual({ total: 1, byPriority: { 5: 1 } });
      expect(await q.claim(["code"])).toEqual(entry("x", 5, 1));
      expect(await q.claim(["code"])).toBeNull();
    });

    it("removes a queued task and reports whether it was there", async () => {
      const q = make();
      await q.enqueue(entry("a", 5, 1));
      await q.enqueue(entry("b", 5, 2));
      expect(await q.remove("a", "research")).toBe(false);
      expect(await q.remove("a", "code")).toBe(true);
      expect(await q.remove("a", "code")).toBe(false);
      expect(await q.remove("never", "code")).toBe(false);
      expect(await q.depth()).toEqual({ total: 1, byPriority: { 5: 1 } });
      // A removed task can be queued again, and comes out once.
      await q.enqueue(entry("a", 5, 1));
      expect((await drain(q)).map((e) => e.taskId)).toEqual(["a", "b"]);
    });

    it("reports depth in total and by priority", async () => {
      const q = make();
      expect(await q.depth()).toEqual({ total: 0, byPriority: {} });
      await q.enqueue(entry("a", 10, 1, "code"));
      await q.enqueue(entry("b", 10, 2, "research"));
      await q.enqueue(entry("c", 5, 3, "trading"));
      await q.enqueue(entry("d", 0, 4, "qa"));
      expect(await q.depth()).toEqual({ total: 4, byPriority: { 10: 2, 5: 1, 0: 1 } });
      await q.claim(["code"]);
      await q.remove("d", "qa");
      expect(await q.depth()).toEqual({ total: 2, byPriority: { 10: 1, 5: 1 } });
    });

    it("reconciles: adds only missing entries and raises the seq counter", async () => {
      const q = make();
      const first = await q.allocateSeq();
      await q.enqueue(entry("present", 5, first));
      await q.reconcile(
        [entry("present", 9, 1), entry("missing-1", 7, 500, "qa"), entry("missing-2", 5, 400)],
        1000,
      );
      expect(await q.depth()).toEqual({ total: 3, byPriority: { 7: 1, 5: 2 } });
      expect(await q.allocateSeq()).toBeGreaterThan(1000);
      // A lower minSeq never moves the counter back.
      await q.reconcile([], 10);
      expect(await q.allocateSeq()).toBeGreaterThan(1001);
      expect(await drain(q)).toEqual([
        entry("missing-1", 7, 500, "qa"),
        entry("present", 5, first),
        entry("missing-2", 5, 400),
      ]);
    });

    it("allocates strictly increasing seqs, also under concurrency", async () => {
      const q = make();
      let previous = 0;
      for (let i = 0; i < 20; i++) {
        const seq = await q.allocateSeq();
        expect(seq).toBeGreaterThan(previous);
        previous = seq;
      }
      const concurrent = await Promise.all(Array.from({ length: 200 }, () => q.allocateSeq()));
      expect(new Set(concurrent).size).toBe(200);
      expect(Math.min(...concurrent)).toBeGreaterThan(previous);
    });

    it("tells with a new seq whether an entry of that priority would be claimed first for the given types", async () => {
      const q = make();
      expect(await q.allocateSeqFirst(["code", "qa"], 0)).toEqual({ seq: expect.any(Number), first: true });
      await q.enqueue(entry("qa-5", 5, await q.allocateSeq(), "qa"));
      await q.enqueue(entry("research-9", 9, await q.allocateSeq(), "research"));
      // Queued work of the same or a higher priority among the types comes first.
      expect((await q.allocateSeqFirst(["code", "qa"], 5)).first).toBe(false);
      expect((await q.allocateSeqFirst(["code", "qa"], 4)).first).toBe(false);
      // Lower priorities, and types outside the set, do not.
      expect((await q.allocateSeqFirst(["code", "qa"], 6)).first).toBe(true);
      expect((await q.allocateSeqFirst(["code"], 0)).first).toBe(true);
      expect((await q.allocateSeqFirst(["research"], 9)).first).toBe(false);
      expect((await q.allocateSeqFirst(["research"], 10)).first).toBe(true);
      // The seq is a real allocation: strictly above the last one.
      const last = await q.allocateSeq();
      expect((await q.allocateSeqFirst(["code"], 3)).seq).toBeGreaterThan(last);
      await q.claim(["qa"]);
      expect((await q.allocateSeqFirst(["code", "qa"], 0)).first).toBe(true);
    });

    it("keeps order with many concurrent producers", async () => {
      const q = make();
      const producers = 20;
      const perProducer = 50;
      await Promise.all(
        Array.from({ length: producers }, async (_, p) => {
          for (let i = 0; i < perProducer; i++) {
            const seq = await q.allocateSeq();
            await q.enqueue(entry(`p${p}-${i}`, (p + i) % 3 === 0 ? 9 : 4, seq, i % 2 ? "code" : "research"));
          }
        }),
      );
      expect((await q.depth()).total).toBe(producers * perProducer);

      const out = await drain(q);
      expect(out).toHaveLength(producers * perProducer);
      const sorted = [...out].sort((a, b) => b.priority - a.priority || a.seq - b.seq);
      expect(out).toEqual(sorted);
      // Within one priority, each producer's entries come out in the order it produced them.
      for (let p = 0; p < producers; p++) {
        for (const priority of [9, 4]) {
          const mine = out.filter((e) => e.taskId.startsWith(`p${p}-`) && e.priority === priority);
          const indexes = mine.map((e) => Number(e.taskId.split("-")[1]));
          expect(indexes).toEqual([...indexes].sort((a, b) => a - b));
        }
      }
    });

    it("hands each entry to exactly one of many concurrent claimers", async () => {
      const q = make();
      const total = 1000;
      const types = await fillMixed(q, total);
      const claimed = await Promise.all(Array.from({ length: 20 }, () => drain(q, types)));
      const ids = claimed.flat().map((e) => e.taskId);
      expect(ids).toHaveLength(total);
      expect(new Set(ids).size).toBe(total);
      expect(await q.depth()).toEqual({ total: 0, byPriority: {} });
    });

    /** 60 entries over four types, priorities and seqs scattered, enqueued out of order. */
    function mixedEntries(): QueueEntry[] {
      const types = ["code", "research", "qa", "analysis"] as const;
      return Array.from({ length: 60 }, (_, i) => entry(`m${i}`, (i * 7) % 11, ((i * 37) % 60) + 1, types[(i * 5) % 4]));
    }

    it("claimBatch returns entries in exactly the order repeated claim would, across several types", async () => {
      const batched = make();
      const oneByOne = make();
      const all = mixedEntries();
      for (const e of all) {
        await batched.enqueue(e);
        await oneByOne.enqueue(e);
      }
      // "analysis" is left out, and a repeated type changes nothing.
      const types = ["qa", "code", "research", "qa"] as const;
      const wanted = all.filter((e) => e.taskType !== "analysis");
      const expected = [...wanted].sort((a, b) => b.priority - a.priority || a.seq - b.seq);

      const batch = await batched.claimBatch(types, 100);
      expect(batch).toEqual(expected);
      expect(batch).toEqual(await drain(oneByOne, types));
      // Equal priorities from different types really were merged by seq.
      expect(new Set(batch.filter((e) => e.priority === batch[0]!.priority).map((e) => e.taskType)).size).toBeGreaterThan(1);
      expect(await batched.depth()).toEqual(await oneByOne.depth());
      expect((await batched.depth()).total).toBe(all.length - wanted.length);
    });

    it("claimBatch honours max and removes exactly what it returned", async () => {
      const q = make();
      const all = mixedEntries();
      for (const e of all) await q.enqueue(e);
      // A removed entry is never handed out.
      const removed = all.find((e) => e.taskType === "code")!;
      expect(await q.remove(removed.taskId, removed.taskType)).toBe(true);
      const types = ["code", "research"] as const;
      const expected = all
        .filter((e) => e !== removed && (types as readonly string[]).includes(e.taskType))
        .sort((a, b) => b.priority - a.priority || a.seq - b.seq);

      const first = await q.claimBatch(types, 7);
      expect(first).toEqual(expected.slice(0, 7));
      expect((await q.depth()).total).toBe(all.length - 1 - 7);
      // A following claim continues right after the batch, and so does the next batch.
      expect(await q.claim(types)).toEqual(expected[7]);
      expect(await q.claimBatch(types, 5)).toEqual(expected.slice(8, 13));
      // Asking for more than is left returns what is left.
      expect(await q.claimBatch(types, 1000)).toEqual(expected.slice(13));
      expect(await q.claimBatch(types, 3)).toEqual([]);
      expect(await q.claim(types)).toBeNull();
      // Other types were not touched.
      const rest = all.filter((e) => e !== removed && !(types as readonly string[]).includes(e.taskType));
      expect(await drain(q)).toEqual([...rest].sort((a, b) => b.priority - a.priority || a.seq - b.seq));
    });

    it("claimBatch of one is claim", async () => {
      const q = make();
      await q.enqueue(entry("low", 2, 1, "qa"));
      await q.enqueue(entry("high", 8, 2, "code"));
      expect(await q.claimBatch(["qa", "code"], 1)).toEqual([entry("high", 8, 2, "code")]);
      expect(await q.claimBatch(["qa", "code"], 1)).toEqual([entry("low", 2, 1, "qa")]);
      expect(await q.claimBatch(["qa", "code"], 1)).toEqual([]);
    });

    it("claimBatch returns [] and removes nothing for no types, max 0 or below, other types, or an empty queue", async () => {
      const q = make();
      expect(await q.claimBatch(TASK_TYPES, 10)).toEqual([]);
      await q.enqueue(entry("a", 5, 1, "code"));
      await q.enqueue(entry("b", 9, 2, "research"));
      expect(await q.claimBatch([], 10)).toEqual([]);
      expect(await q.claimBatch(TASK_TYPES, 0)).toEqual([]);
      expect(await q.claimBatch(TASK_TYPES, -1)).toEqual([]);
      expect(await q.claimBatch(["trading", "qa"], 10)).toEqual([]);
      expect(await q.depth()).toEqual({ total: 2, byPriority: { 5: 1, 9: 1 } });
      expect(await drain(q)).toEqual([entry("b", 9, 2, "research"), entry("a", 5, 1, "code")]);
    });

    it("never hands the same entry to two concurrent claimBatch calls", async () => {
      const q = make();
      const total = 600;
      const types = await fillMixed(q, total);
      // Two large batches at once: disjoint, each in queue order, together everything.
      const [a, b] = await Promise.all([q.claimBatch(types, 250), q.claimBatch(types, 250)]);
      expect(a).toHaveLength(250);
      expect(b).toHaveLength(250);
      for (const batch of [a, b]) expect(batch).toEqual([...batch].sort((x, y) => y.priority - x.priority || x.seq - y.seq));
      const ids = [...a, ...b].map((e) => e.taskId);
      expect(new Set(ids).size).toBe(500);
      // Many small batches racing over the rest, mixed with single claims.
      const claimers = Array.from({ length: 12 }, async (_, n) => {
        const got: QueueEntry[] = [];
        for (;;) {
          const batch = n % 3 === 0 ? [await q.claim(types)].filter((e) => e !== null) : await q.claimBatch(types, 1 + (n % 5));
          if (batch.length === 0) return got;
          got.push(...batch);
        }
      });
      const restIds = (await Promise.all(claimers)).flat().map((e) => e.taskId);
      const everything = [...ids, ...restIds];
      expect(everything).toHaveLength(total);
      expect(new Set(everything).size).toBe(total);
      expect(await q.depth()).toEqual({ total: 0, byPriority: {} });
    });

    it("signals onAvailable when enqueue or reconcile adds work, until unsubscribed", async () => {
      const q = make();
      const seen: TaskType[] = [];
      const unsubscribe = q.onAvailable((t) => seen.push(t));
      await q.enqueue(entry("a", 5, 1, "research"));
      await vi.waitFor(() => expect(seen).toContain("research"));
      await q.reconcile([entry("b", 5, 2, "trading")], 2);
      await vi.waitFor(() => expect(seen).toContain("trading"));

      unsubscribe();
      const count = seen.length;
      await q.enqueue(entry("c", 5, 3, "qa"));
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(seen).toHaveLength(count);
    });

    it("survives a throwing listener", async () => {
      const q = make();
      const seen: TaskType[] = [];
      q.onAvailable(() => {
        throw new Error("listener bug");
      });
      q.onAvailable((t) => seen.push(t));
      await q.enqueue(entry("a", 5, 1));
      await vi.waitFor(() => expect(seen).toEqual(["code"]));
      expect(await q.claim(["code"])).toEqual(entry("a", 5, 1));
    });

    it("rejects entries it cannot order", async () => {
      const q = make();
      await expect(q.enqueue(entry("a", 11, 1))).rejects.toThrow(RangeError);
      await expect(q.enqueue(entry("a", 2.5, 1))).rejects.toThrow(RangeError);
      await expect(q.enqueue(entry("a", 5, -1))).rejects.toThrow(RangeError);
      await expect(q.enqueue(entry("a", 5, 2 ** 40))).rejects.toThrow(RangeError);
      await expect(q.enqueue({ ...entry("a", 5, 1), taskType: "nope" as TaskType })).rejects.toThrow(RangeError);
      await expect(q.reconcile([entry("ok", 5, 1), entry("bad", 12, 2)], 0)).rejects.toThrow(RangeError);
      expect(await q.depth()).toEqual({ total: 0, byPriority: {} });
    });

    it("answers ping, and close is safe to call twice", async () => {
      const q = factory.make();
      await q.ping();
      q.onAvailable(() => {});
      await q.close();
      await q.close();
      await expect(q.claim(["code"])).rejects.toThrow();
      await expect(q.ping()).rejects.toThrow();
    });
  });
}

describe.skipIf(!redisAvailable)("redis queue: shared between instances", () => {
  it("shares work, seqs and onAvailable signals across instances with one prefix", async () => {
    const prefix = newPrefix();
    const a = track(createRedisQueue({ url: TEST_REDIS_URL, prefix }));
    const b = track(createRedisQueue({ url: TEST_REDIS_URL, prefix }));
    await a.reconcile([], 0);

    const seqs = [await a.allocateSeq(), await b.allocateSeq(), await a.allocateSeq(), await b.allocateSeq()];
    expect(seqs).toEqual([...seqs].sort((x, y) => x - y));
    expect(new Set(seqs).size).toBe(4);

    await a.enqueue(entry("from-a", 5, seqs[0]!));
    await b.enqueue(entry("from-b", 7, seqs[1]!));
    expect(await b.claim(["code"])).toEqual(entry("from-b", 7, seqs[1]!));
    expect(await b.claim(["code"])).toEqual(entry("from-a", 5, seqs[0]!));
    expect((await a.depth()).total).toBe(0);

    // B subscribes lazily; keep producing on A until B's subscription is live and a signal arrives.
    const seenByB: TaskType[] = [];
    b.onAvailable((t) => seenByB.push(t));
    let n = 0;
    await vi.waitFor(
      async () => {
        await a.enqueue(entry(`signal-${n++}`, 5, await a.allocateSeq(), "synthesis"));
        expect(seenByB).toContain("synthesis");
      },
      { timeout: 5000, interval: 50 },
    );
    expect(await drain(b, ["synthesis"])).toHaveLength(n);
  });

  it("honours a db number in the URL", async () => {
    const prefix = newPrefix();
    const url = new URL(TEST_REDIS_URL);
    url.pathname = `/${otherDb()}`;
    const q = track(createRedisQueue({ url: url.toString(), prefix }));
    await q.enqueue(entry("in-other-db", 5, 1));

    const admin = new Redis(TEST_REDIS_URL);
    const other = admin.duplicate({ db: otherDb() });
    try {
      expect(await other.zcard(`{${prefix}}:q:code`)).toBe(1);
      expect(await admin.zcard(`{${prefix}}:q:code`)).toBe(0);
    } finally {
      await Promise.all([admin.quit(), other.quit()]);
    }
  });
});

function recordingLog(): QueueLog & { warns: string[] } {
  const warns: string[] = [];
  return { warns, warn: (_obj, msg) => warns.push(msg), info: () => {} };
}

describe("redis queue: failure behaviour", () => {
  it("rejects quickly instead of hanging when Redis is unreachable", async () => {
    const port = await freePort();
    const log = recordingLog();
    const q = track(createRedisQueue({ url: `redis://127.0.0.1:${port}`, prefix: "unreachable", log }));
    q.onAvailable(() => {});
    const started = Date.now();
    await expect(q.ping()).rejects.toThrow();
    await expect(q.enqueue(entry("a", 5, 1))).rejects.toThrow();
    await expect(q.claim(["code"])).rejects.toThrow();
    await expect(q.allocateSeq()).rejects.toThrow();
    expect(Date.now() - started).toBeLessThan(2500);
    // Many failed connection attempts, but repetitive errors are rate-limited (one line per connection).
    expect(log.warns.length).toBeGreaterThanOrEqual(1);
    expect(log.warns.length).toBeLessThanOrEqual(2);
  });

  const servers: PrivateRedis[] = [];
  afterAll(async () => {
    for (const r of servers) await r.stop();
  });

  it.skipIf(!redisAvailable)("refuses to number tasks after losing its data, signals a reset, and resumes above the rebuilt seq", async () => {
    const prefix = newPrefix();
    const q = track(createRedisQueue({ url: TEST_REDIS_URL, prefix }));
    await expect(q.allocateSeq()).rejects.toThrow(/rebuilt/);
    await q.reconcile([entry("old", 5, 41)], 41);
    expect(await q.intact()).toBe(true);
    expect(await q.allocateSeq()).toBe(42);
    let resets = 0;
    q.onReset(() => resets++);
    // What FLUSHDB does to this prefix, without flushing the shared server.
    const raw = new Redis(TEST_REDIS_URL);
    await raw.del(...(await raw.keys(`{${prefix}}*`)));
    raw.disconnect();
    expect(await q.intact()).toBe(false);
    await expect(q.allocateSeq()).rejects.toThrow(/rebuilt/);
    await expect(q.allocateSeqFirst(["code"], 5)).rejects.toThrow(/rebuilt/);
    // Each refusal asks for the rebuild.
    await vi.waitFor(() => expect(resets).toBe(2));
    await q.reconcile([entry("old", 5, 41)], 42);
    expect(await q.allocateSeq()).toBe(43);
    expect(await q.claim(["code"])).toEqual(entry("old", 5, 41));
  });

  it.skipIf(!hasRedisServer && process.env.CI !== "true")(
    "reports errors while Redis is down and recovers by itself when it returns",
    async () => {
      const server = await PrivateRedis.start();
      servers.push(server);
      const url = server.url;
      const log = recordingLog();
      const q = track(createRedisQueue({ url, prefix: "restart", log, reconnectMaxDelayMs: 300 }));
      const seen: TaskType[] = [];
      q.onAvailable((t) => seen.push(t));
      let resets = 0;
      q.onReset(() => resets++);
      await q.reconcile([], 0);
      await q.enqueue(entry("before", 5, await q.allocateSeq()));
      expect(await q.claim(["code"])).toMatchObject({ taskId: "before" });

      await server.stop();
      const started = Date.now();
      await expect(q.enqueue(entry("while-down", 5, 2))).rejects.toThrow();
      await expect(q.claim(["code"])).rejects.toThrow();
      await expect(q.ping()).rejects.toThrow();
      expect(Date.now() - started).toBeLessThan(2500);
      // The outage is logged (the socket may be noticed as unwritable a moment before it is closed).
      await vi.waitFor(() => expect(log.warns).toContain("redis queue connection lost"));

      await server.restart();
      await vi.waitFor(() => q.ping(), { timeout: 10_000, interval: 100 });
      // The reconnect is announced, and numbering waits for the rebuild: a
      // fresh server lost the data, and seqs must not restart below old tasks.
      await vi.waitFor(() => expect(resets).toBeGreaterThan(0));
      await expect(q.allocateSeq()).rejects.toThrow(/rebuilt/);
      await q.reconcile([], 1);
      // The scripts are reloaded by themselves.
      await q.enqueue(entry("after", 5, await q.allocateSeq()));
      expect(await q.claim(["code"])).toMatchObject({ taskId: "after" });

      // The subscriber reconnected too: it announces possibly missed work for every type...
      await vi.waitFor(() => expect(seen).toEqual(expect.arrayContaining([...TASK_TYPES])), { timeout: 10_000 });
      // ...and receives other instances' signals again.
      seen.length = 0;
      const other = track(createRedisQueue({ url, prefix: "restart" }));
      await other.reconcile([], 0);
      let n = 0;
      await vi.waitFor(
        async () => {
          await other.enqueue(entry(`other-${n++}`, 5, await other.allocateSeq(), "documentation"));
          expect(seen).toContain("documentation");
        },
        { timeout: 10_000, interval: 100 },
      );
      await server.stop();
    },
  );
});

describe("redis task events", () => {
  const record = (over: Partial<TaskRecord>) => taskRecord({ taskId: "00000000-0000-7000-8000-000000000001", idempotencyKey: "key-1", requestHash: "hash-1", ...over });

  it.skipIf(!redisAvailable)("another instance hears every change, with its state as committed while the task is still in flight", async () => {
    const prefix = newPrefix();
    const a = createRedisTaskEvents({ url: TEST_REDIS_URL, prefix });
    const b = createRedisTaskEvents({ url: TEST_REDIS_URL, prefix });
    const raw = new Redis(TEST_REDIS_URL);
    try {
      const heard: TaskChange[] = [];
      a.subscribeAll((c) => heard.push(c));
      // Subscriptions are set up in the background: announce probes until one arrives.
      for (let i = 0; !heard.some((c) => c.taskId === "probe"); i++) {
        if (i > 100) throw new Error("instance a never heard instance b");
        b.publish(record({ taskId: "probe" }));
        await new Promise((r) => setTimeout(r, 50));
      }
      heard.length = 0;
      const assigned = record({ status: "assigned", agentId: "agent-1", attempt: 1, assignedAt: new Date(1_700_000_001_000), updatedAt: new Date(1_700_000_001_000), leaseExpiresAt: new Date(1_700_000_031_000) });
      const completed = record({ ...assigned, status: "completed", result: { answer: 42, nested: ["x"] }, completedAt: new Date(1_700_000_001_005), updatedAt: new Date(1_700_000_001_005), leaseExpiresAt: null });
      const retrying = record({ taskId: "t-retry", status: "pending", attempt: 1, failedAttempts: 1, error: "x".repeat(5000), runAt: new Date(1_700_000_002_000) });
      b.publish(assigned);
      b.publish(completed);
      b.publish(retrying);
      // An instance of an earlier version sends no state; a state that does not match its change is not trusted.
      await raw.publish(`{${prefix}}:events`, `old-origin|${JSON.stringify([{ o: "old-origin", i: "t-old", s: "failed", a: null, n: 2, u: 5 }])}`);
      const odd = (i: string, over: Record<string, unknown>) => ({ o: "odd-origin", i, s: "pending", a: null, n: 0, u: 5, t: { ...stateOf(record({ taskId: i })), updatedAt: 5, createdAt: 1, ...over } });
      await raw.publish(
        `{${prefix}}:events`,
        `odd-origin|${JSON.stringify([odd("t-odd", { createdAt: "yesterday" }), odd("t-null", { updatedAt: null }), odd("t-other", { attempt: 7 }), odd("t-fine", {})])}`,
      );
      await vi.waitFor(() => expect(heard).toHaveLength(8), { timeout: 5000 });
      // Publishers do not order among themselves; each one's changes arrive in order.
      const of = (taskId: string) => heard.filter((c) => c.taskId === taskId);
      const [heardAssigned, heardCompleted] = of(assigned.taskId);
      expect(heardAssigned).toMatchObject({ status: "assigned", agentId: "agent-1", attempt: 1, updatedAt: assigned.updatedAt });
      expect(heardAssigned!.state).toEqual(stateOf(assigned));
      expect(heardAssigned!.state).not.toHaveProperty("description");
      // A final state, and a long error, are left for the watcher to read: results can be large.
      expect(heardCompleted).toMatchObject({ status: "completed", updatedAt: completed.updatedAt });
      expect(heardCompleted!.state).toBeUndefined();
      expect(of("t-retry")).toMatchObject([{ status: "pending", attempt: 1 }]);
      expect(of("t-retry")[0]!.state).toBeUndefined();
      expect(of("t-old")).toMatchObject([{ status: "failed", attempt: 2 }]);
      expect(["t-old", "t-odd", "t-null", "t-other"].map((id) => of(id)[0]!.state)).toEqual([undefined, undefined, undefined, undefined]);
      expect(of("t-fine")[0]!.state).toMatchObject({ taskId: "t-fine", status: "pending", updatedAt: new Date(5), createdAt: new Date(1) });
    } finally {
      raw.disconnect();
      await Promise.all([a.close(), b.close()]);
    }
  });
});

describe.skipIf(!redisAvailable)("redis subscriptions closed while being made again after a reconnect", () => {
  /**
   * ioredis (5.11) re-subscribes by itself after a reconnect without handling
   * the reply, so a close before that reply rejected a promise nobody held:
   * an unhandled rejection, which ends a Node process.
   */
  async function closeWhileResubscribing(connect: (url: string) => { subscribed: () => Promise<unknown>; close: () => Promise<void> }) {
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown) => unhandled.push(e);
    process.on("unhandledRejection", onUnhandled);
    const target = new URL(TEST_REDIS_URL);
    const proxy = await TcpProxy.start({ host: target.hostname, port: Number(target.port || 6379) });
    try {
      const viaProxy = new URL(TEST_REDIS_URL);
      viaProxy.hostname = "127.0.0.1";
      viaProxy.port = String(proxy.port);
      const client = connect(viaProxy.toString());
      await client.subscribed();
      proxy.cut();
      proxy.holdRepliesAfter("subscribe");
      proxy.restore();
      await vi.waitFor(() => expect(proxy.holdingReplies).toBe(true), { timeout: 10_000, interval: 20 });
      // Closing sends QUIT; its reply is held too, so the connection is dropped as the server would drop it.
      const closed = client.close();
      await new Promise((r) => setTimeout(r, 50));
      proxy.cut();
      await closed;
      // Rejections are reported once the microtask queue has run dry.
      await new Promise((r) => setTimeout(r, 100));
      expect(unhandled).toEqual([]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
      await proxy.close();
    }
  }

  it("task events", async () => {
    await closeWhileResubscribing((url) => {
      const events = createRedisTaskEvents({ url, prefix: newPrefix() });
      // The first subscription's catch-up call says it is made.
      const made = new Promise<void>((resolve) => events.onMissed(resolve));
      return { subscribed: () => made, close: () => events.close() };
    });
  });

  it("the queue's availability signals", async () => {
    const admin = new Redis(TEST_REDIS_URL);
    try {
      await closeWhileResubscribing((url) => {
        const prefix = newPrefix();
        const q = createRedisQueue({ url, prefix });
        q.onAvailable(() => {});
        const subscribed = () => vi.waitFor(async () => expect((await admin.pubsub("NUMSUB", `{${prefix}}:available`))[1]).toBe(1), { timeout: 5000, interval: 20 });
        return { subscribed, close: () => q.close() };
      });
    } finally {
      admin.disconnect();
    }
  });
});
