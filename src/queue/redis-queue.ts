import { randomUUID } from "node:crypto";
import { Redis, ReplyError, type RedisOptions } from "ioredis";
import {
  assertValidEntry,
  assertValidSeq,
  MAX_SEQ,
  notifyListeners,
  type QueueLog,
} from "./in-process-queue.js";
import type { PriorityQueue, QueueDepth, QueueEntry } from "./priority-queue.js";
import { subscribeOnEveryConnect } from "./redis-subscription.js";
import { isTaskType, MAX_PRIORITY, MIN_PRIORITY, TASK_TYPES, type TaskType } from "../tasks/task-types.js";

export interface RedisQueueOptions {
  /** `redis://[user:pass@]host:port[/db]` (or `rediss://`). */
  url: string;
  /**
   * Namespace shared by every instance that should share the work. It becomes
   * the hash tag of every key (`{aaos}:q:code`, `{aaos}:seq`), so all keys
   * live in one Redis Cluster slot and the Lua scripts may touch them together.
   */
  prefix?: string;
  log?: QueueLog;
  /** TCP connect timeout. */
  connectTimeoutMs?: number;
  /** A command without a reply after this long rejects, so a stalled server cannot hang callers. */
  commandTimeoutMs?: number;
  /** Reconnect backoff cap; reconnecting itself never stops until close(). */
  reconnectMaxDelayMs?: number;
}

/** Score = (10 - priority) * 2^40 + seq: ascending score is priority desc, then FIFO; exact in a double. */
const SEQ_SPAN = 2 ** 40;

function scoreOf(entry: QueueEntry): string {
  return String((MAX_PRIORITY - entry.priority) * SEQ_SPAN + entry.seq);
}

function decodeScore(score: string): { priority: number; seq: number } {
  const n = Number(score);
  return { priority: MAX_PRIORITY - Math.floor(n / SEQ_SPAN), seq: n % SEQ_SPAN };
}

/** Connection errors repeat on every reconnect attempt; log one line per window per connection. */
const ERROR_LOG_WINDOW_MS = 30_000;

/** Entries per reconcile script call, so a large rebuild never builds one huge Lua argument list. */
const RECONCILE_CHUNK = 500;

/**
 * KEYS[1] type key. ARGV: score, taskId, channel, message.
 * Returns 1 when added (and published), 0 when the task was already queued.
 */
const ENQUEUE_LUA = `
if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2]) == 1 then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
return 0
`;

/**
 * KEYS: the type keys; ARGV[1]: how many. Merges the heads of the type
 * queues, removing up to that many best entries in order. Returns flat
 * triples (key index, member, score).
 */
const CLAIM_BATCH_LUA = `
local max = tonumber(ARGV[1])
local heads, pos = {}, {}
for i = 1, #KEYS do
  heads[i] = redis.call('ZRANGE', KEYS[i], 0, max - 1, 'WITHSCORES')
  pos[i] = 1
end
local out = {}
for n = 1, max do
  local best, bestScore
  for i = 1, #KEYS do
    local h = heads[i]
    if h[pos[i]] then
      local score = tonumber(h[pos[i] + 1])
      if bestScore == nil or score < bestScore then best, bestScore = i, score end
    end
  end
  if best == nil then break end
  local p = pos[best]
  redis.call('ZREM', KEYS[best], heads[best][p])
  out[#out + 1] = best
  out[#out + 1] = heads[best][p]
  out[#out + 1] = heads[best][p + 1]
  pos[best] = p + 2
end
return out
`;

/**
 * KEYS[1] seq key, KEYS[2..n+1] type keys.
 * ARGV: minSeq, channel, origin, n type names, then triples (type index 1..n, score, taskId).
 * Adds missing members only, raises the seq counter to at least minSeq, and
 * publishes once per type that gained entries. Returns the number added.
 */
const RECONCILE_LUA = `
redis.call('SET', KEYS[1] .. ':rebuilt', '1')
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
local typeCount = #KEYS - 1
local gained = {}
local added = 0
for i = 4 + typeCount, #ARGV, 3 do
  local t = tonumber(ARGV[i])
  if redis.call('ZADD', KEYS[t + 1], 'NX', ARGV[i + 1], ARGV[i + 2]) == 1 then
    gained[t] = true
    added = added + 1
  end
end
for t = 1, typeCount do
  if gained[t] then redis.call('PUBLISH', ARGV[2], ARGV[3 + t] .. '|' .. ARGV[3]) end
end
return added
`;

/**
 * KEYS[1] seq key. The marker "<seq key>:rebuilt" is written by every
 * reconcile; without it Redis has lost its data since, and numbering must wait
 * for the rebuild or new tasks would be placed ahead of older ones.
 */
const ALLOCATE_LUA = `
if redis.call('EXISTS', KEYS[1] .. ':rebuilt') == 0 then
  return redis.error_reply('AAOSRESET the queue lost its data and is being rebuilt from the database')
end
return redis.call('INCR', KEYS[1])
`;

/**
 * ALLOCATE_LUA, then KEYS[2..]: type keys; ARGV[1]: the score bound of the
 * priority asked about ((11 - priority) * 2^40, exclusive). Returns {seq, 1}
 * when no entry of those types has that priority or a higher one, else {seq, 0}.
 */
const ALLOCATE_FIRST_LUA = `
if redis.call('EXISTS', KEYS[1] .. ':rebuilt') == 0 then
  return redis.error_reply('AAOSRESET the queue lost its data and is being rebuilt from the database')
end
local seq = redis.call('INCR', KEYS[1])
for i = 2, #KEYS do
  if redis.call('ZCOUNT', KEYS[i], '-inf', '(' .. ARGV[1]) > 0 then return {seq, 0} end
end
return {seq, 1}
`;

/**
 * KEYS: every type key. ARGV: 12 band bounds, bound[i] = i * 2^40.
 * Returns {total, count of priority 10, 9, ..., 0} from one consistent snapshot.
 */
const DEPTH_LUA = `
local result = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
for k = 1, #KEYS do
  result[1] = result[1] + redis.call('ZCARD', KEYS[k])
  for band = 1, 11 do
    result[band + 1] = result[band + 1] + redis.call('ZCOUNT', KEYS[k], ARGV[band], '(' .. ARGV[band + 1])
  end
end
return result
`;

type ScriptArg = string | number;
/** The commands `defineCommand` adds; ioredis cannot type them itself. */
interface QueueScripts {
  aaosEnqueue(numKeys: number, ...args: ScriptArg[]): Promise<number>;
  aaosClaimBatch(numKeys: number, ...args: ScriptArg[]): Promise<Array<number | string>>;
  aaosReconcile(numKeys: number, ...args: ScriptArg[]): Promise<number>;
  aaosDepth(numKeys: number, ...args: ScriptArg[]): Promise<number[]>;
  aaosAllocate(numKeys: number, ...args: ScriptArg[]): Promise<number>;
  aaosAllocateFirst(numKeys: number, ...args: ScriptArg[]): Promise<[number, number]>;
}

/**
 * Redis-backed queue shared by every instance using the same `prefix`.
 *
 * Keys (one hash tag, so it also runs on Redis Cluster): one sorted set per
 * task type `{prefix}:q:<type>`, the seq counter `{prefix}:seq`, and the
 * pub/sub channel `{prefix}:available`. Enqueue, claim, reconcile and depth are
 * Lua scripts (EVALSHA with fallback), hence atomic.
 *
 * Failure behaviour: while Redis is unreachable every call rejects quickly
 * (no offline queue once connected; during the very first connect attempt a
 * call waits at most `connectTimeoutMs`). Reconnection
 * never stops, with capped backoff, so the same object works again when Redis
 * returns. Commands cut off by a lost connection are not resent (a resent
 * claim could remove a second entry): they reject, and the database stays the
 * source of truth. Connection errors are logged at warn, rate-limited.
 *
 * onAvailable: this instance's own signals are delivered locally (microtask);
 * other instances' arrive over a subscriber connection opened on the first
 * onAvailable call. After that connection recovers from an outage every
 * listener gets a signal for every type, since signals sent meanwhile were lost.
 */
export function createRedisQueue(options: RedisQueueOptions): PriorityQueue {
  const prefix = options.prefix ?? "aaos";
  if (prefix.length === 0 || /[{}]/.test(prefix)) {
    // A brace inside the prefix would change the hash tag and split the keys over slots.
    throw new RangeError(`redis queue prefix must be non-empty without braces, got "${prefix}"`);
  }
  const log = options.log;
  const tag = `{${prefix}}`;
  const seqKey = `${tag}:seq`;
  const channel = `${tag}:available`;
  const typeKey = (type: TaskType) => `${tag}:q:${type}`;
  /** Marks this instance's publications, so it ignores their echo and delivers them locally instead. */
  const origin = randomUUID();
  const reconnectMaxDelayMs = options.reconnectMaxDelayMs ?? 2000;
  const listeners = new Set<(taskType: TaskType) => void>();
  let subscriber: Redis | undefined;
  let closing: Promise<void> | undefined;

  const redisOptions: RedisOptions = {
    connectTimeout: options.connectTimeoutMs ?? 2000,
    commandTimeout: options.commandTimeoutMs ?? 2000,
    // Commands issued during the very first connect attempt wait for it (a
    // start-up race is not an outage); the first 'ready' or 'close' turns the
    // offline queue off for good, after which an unwritable connection rejects at once.
    enableOfflineQueue: true,
    // 0: every lost connection rejects the commands waiting on it instead of
    // carrying them over to the next attempt.
    maxRetriesPerRequest: 0,
    // Never resend a command cut off mid-flight: a resent claim could remove a
    // second entry while the first reply was lost.
    autoResendUnfulfilledCommands: false,
    retryStrategy: (times) => Math.min(100 * 2 ** Math.min(times - 1, 10), reconnectMaxDelayMs),
    // Commands issued in the same tick go out as one pipeline (one socket
    // write); every write to Redis cost the service far more CPU than the command.
    enableAutoPipelining: true,
  };
  const client = new Redis(options.url, redisOptions) as Redis & QueueScripts;
  const isClosing = () => closing !== undefined;
  watchConnection(client, "command", log, isClosing);
  const endStartup = () => {
    client.options.enableOfflineQueue = false;
  };
  client.once("ready", endStartup);
  client.once("close", endStartup);
  client.defineCommand("aaosEnqueue", { lua: ENQUEUE_LUA });
  client.defineCommand("aaosClaimBatch", { lua: CLAIM_BATCH_LUA });
  client.defineCommand("aaosReconcile", { lua: RECONCILE_LUA });
  client.defineCommand("aaosDepth", { lua: DEPTH_LUA });
  client.defineCommand("aaosAllocate", { lua: ALLOCATE_LUA });
  client.defineCommand("aaosAllocateFirst", { lua: ALLOCATE_FIRST_LUA });
  const resetListeners = new Set<() => void>();
  const signalReset = () => {
    for (const l of resetListeners) queueMicrotask(l);
  };
  let commandReadyCount = 0;
  client.on("ready", () => {
    // A reconnect: the server may have restarted empty.
    if (++commandReadyCount > 1) signalReset();
  });

  function subscribe(): void {
    if (subscriber) return;
    // The subscriber may wait for Redis as long as it takes (no command
    // timeout, unlimited retries): nobody awaits it.
    const sub = client.duplicate({
      enableOfflineQueue: true,
      enableAutoPipelining: false,
      commandTimeout: undefined,
      maxRetriesPerRequest: null,
      // The next connect subscribes anyway.
      autoResendUnfulfilledCommands: false,
    });
    subscriber = sub;
    watchConnection(sub, "subscriber", log, isClosing);
    subscribeOnEveryConnect(sub, channel, {
      closing: isClosing,
      // Signals may have been missed while the connection was down. Announced
      // once subscribed again, so no signal falls in between.
      subscribed: (reconnect) => {
        if (reconnect) for (const type of TASK_TYPES) notifyListeners(listeners, type, log);
      },
      failed: (e) => log?.warn({ err: e, channel }, "redis queue could not subscribe"),
    });
    sub.on("message", (_channel: string, message: string) => {
      const [type, from] = message.split("|");
      if (from === origin || !isTaskType(type)) return;
      notifyListeners(listeners, type, log);
    });
  }

  async function claimBatch(types: readonly TaskType[], max: number): Promise<QueueEntry[]> {
    const wanted = [...new Set(types)];
    const limit = Math.floor(max);
    if (wanted.length === 0 || !(limit >= 1)) return [];
    let reply: Array<number | string>;
    try {
      reply = await client.aaosClaimBatch(wanted.length, ...wanted.map(typeKey), String(limit));
    } catch (e: unknown) {
      // A timeout or a connection lost after the script ran loses its reply,
      // and with it up to `limit` entries the script removed. Their tasks are
      // still PENDING in the database: have the index rebuilt from it (a
      // duplicate entry costs nothing; the lease's compare-and-set drops it).
      if (!(e instanceof ReplyError)) signalReset();
      throw e;
    }
    const out: QueueEntry[] = [];
    for (let i = 0; i + 2 < reply.length; i += 3) {
      out.push({ taskId: String(reply[i + 1]), taskType: wanted[Number(reply[i]) - 1]!, ...decodeScore(String(reply[i + 2])) });
    }
    return out;
  }

  /** Runs an allocation script; a lost-data refusal asks for a rebuild. */
  async function allocating<T>(script: () => Promise<T>): Promise<T> {
    try {
      return await script();
    } catch (e: unknown) {
      if (e instanceof Error && e.message.startsWith("AAOSRESET")) signalReset();
      throw e;
    }
  }

  return {
    async allocateSeq() {
      const seq = await allocating(() => client.aaosAllocate(1, seqKey));
      if (seq > MAX_SEQ) throw new RangeError("queue seq space exhausted");
      return seq;
    },

    async allocateSeqFirst(types, priority) {
      const wanted = [...new Set(types)];
      const bound = String((MAX_PRIORITY + 1 - priority) * SEQ_SPAN);
      const [seq, first] = await allocating(() => client.aaosAllocateFirst(1 + wanted.length, seqKey, ...wanted.map(typeKey), bound));
      if (seq > MAX_SEQ) throw new RangeError("queue seq space exhausted");
      return { seq, first: first === 1 };
    },

    async enqueue(entry) {
      assertValidEntry(entry);
      let added: number;
      try {
        added = await client.aaosEnqueue(1, typeKey(entry.taskType), scoreOf(entry), entry.taskId, channel, `${entry.taskType}|${origin}`);
      } catch (e: unknown) {
        // The entry may be in even though the reply was lost, and this
        // instance ignores its own announcement coming back: say so here.
        notifyListeners(listeners, entry.taskType, log);
        throw e;
      }
      if (added === 1) notifyListeners(listeners, entry.taskType, log);
    },

    async claim(types) {
      return (await claimBatch(types, 1))[0] ?? null;
    },

    claimBatch,

    async remove(taskId, taskType) {
      return (await client.zrem(typeKey(taskType), taskId)) === 1;
    },

    async depth(): Promise<QueueDepth> {
      const bounds = Array.from({ length: 12 }, (_, i) => String(i * SEQ_SPAN));
      const counts = await client.aaosDepth(TASK_TYPES.length, ...TASK_TYPES.map(typeKey), ...bounds);
      const byPriority: Record<number, number> = {};
      // counts[1] is band 0 of the score, i.e. priority 10.
      for (let p = MAX_PRIORITY; p >= MIN_PRIORITY; p--) {
        const n = counts[1 + MAX_PRIORITY - p]!;
        if (n > 0) byPriority[p] = n;
      }
      return { total: counts[0]!, byPriority };
    },

    async reconcile(entries, minSeq) {
      assertValidSeq(minSeq, "minSeq");
      for (const entry of entries) assertValidEntry(entry);
      // Each chunk raises the seq counter again; harmless, and an empty
      // reconcile still raises it.
      for (let start = 0; start === 0 || start < entries.length; start += RECONCILE_CHUNK) {
        const chunk = entries.slice(start, start + RECONCILE_CHUNK);
        const types = [...new Set(chunk.map((e) => e.taskType))];
        const triples = chunk.flatMap((e) => [types.indexOf(e.taskType) + 1, scoreOf(e), e.taskId]);
        await client.aaosReconcile(
          1 + types.length,
          seqKey,
          ...types.map(typeKey),
          minSeq,
          channel,
          origin,
          ...types,
          ...triples,
        );
        // Signal local listeners per type; may be spurious if every entry was present, which the contract allows.
        for (const type of types) notifyListeners(listeners, type, log);
      }
    },

    async ping() {
      // A write, not PING: a Redis that answers but refuses writes (maxmemory
      // without eviction, a read-only replica) refuses every new task too.
      await client.set(`${tag}:alive`, origin, "PX", 60_000);
    },

    async intact() {
      return (await client.exists(`${seqKey}:rebuilt`)) === 1;
    },

    onReset(listener) {
      resetListeners.add(listener);
      return () => {
        resetListeners.delete(listener);
      };
    },

    onAvailable(listener) {
      if (closing) return () => {};
      const wrapped = (taskType: TaskType) => listener(taskType);
      listeners.add(wrapped);
      subscribe();
      return () => {
        listeners.delete(wrapped);
      };
    },

    close() {
      closing ??= (async () => {
        listeners.clear();
        resetListeners.clear();
        await Promise.all([shutdown(client), subscriber ? shutdown(subscriber) : undefined]);
      })();
      return closing;
    },
  };
}

/** QUIT when connected (lets pending replies arrive); otherwise, or if QUIT fails, drop the socket and stop reconnecting. */
async function shutdown(connection: Redis): Promise<void> {
  if (connection.status === "ready") {
    try {
      await connection.quit();
      return;
    } catch {
      // Fall through: the connection broke while quitting.
    }
  }
  connection.disconnect(false);
}

/**
 * Keeps connection errors from crashing the process (an 'error' event without a
 * listener throws) and logs a lost connection and its errors at warn, at most
 * once per window with how many were suppressed; logs the recovery at info.
 */
function watchConnection(connection: Redis, role: string, log: QueueLog | undefined, isClosing: () => boolean): void {
  let lastLoggedAt = -Infinity;
  let suppressed = 0;
  let failing = false;
  const report = (fields: object, msg: string) => {
    failing = true;
    const now = Date.now();
    if (now - lastLoggedAt < ERROR_LOG_WINDOW_MS) {
      suppressed++;
      return;
    }
    lastLoggedAt = now;
    log?.warn({ ...fields, role, suppressed }, msg);
    suppressed = 0;
  };
  let wasReady = false;
  connection.on("error", (e: unknown) => report({ err: e }, "redis queue connection error"));
  connection.on("close", () => {
    // A close after 'ready' that we did not ask for is an outage, even when no error event comes with it.
    if (wasReady && !isClosing()) report({}, "redis queue connection lost");
    wasReady = false;
  });
  connection.on("ready", () => {
    wasReady = true;
    if (!failing) return;
    failing = false;
    log?.info({ role }, "redis queue connection restored");
  });
}
