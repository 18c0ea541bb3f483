import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { stateOf, TaskListeners, type TaskEvents, type TaskState } from "../tasks/task-events.js";
import { isTaskStatus, type TaskRecord } from "../tasks/task-types.js";
import type { QueueLog } from "./in-process-queue.js";
import { subscribeOnEveryConnect } from "./redis-subscription.js";

type DateKey = { [K in keyof TaskState]: TaskState[K] extends Date | null ? K : never }[keyof TaskState];
/** Every date field of a task state; the type makes a new one impossible to miss. */
const DATE_KEYS = Object.keys({ createdAt: 1, updatedAt: 1, assignedAt: 1, completedAt: 1, leaseExpiresAt: 1, runAt: 1 } satisfies Record<DateKey, 1>) as DateKey[];
type WireState = Omit<TaskState, DateKey> & { [K in DateKey]: number | null };

/**
 * One change on the wire: origin instance, task id, status, agent, attempt,
 * updated_at (epoch ms), and the state as committed (dates as epoch ms).
 * Instances that predate `t` read the rest and re-read the task.
 *
 * `t` goes only with PENDING and ASSIGNED changes whose error text is short:
 * a terminal state is final, so a watcher re-reading it sees it exactly,
 * and results (up to MAX_RESULT_BYTES) must not make every instance receive
 * and parse megabytes per batch.
 */
interface WireChange {
  o: string;
  i: string;
  s: string;
  a: string | null;
  n: number;
  u: number;
  t?: WireState;
}

/** The body of a message saying that some of its sender's announcements were dropped. */
const MISSED = "missed";

/** Longest error text sent with a state; a longer one is left for the re-read. */
const MAX_WIRE_ERROR = 1024;

function toWire(task: TaskRecord): WireState | undefined {
  if ((task.status !== "pending" && task.status !== "assigned") || (task.error?.length ?? 0) > MAX_WIRE_ERROR) return undefined;
  const wire = stateOf(task) as unknown as Record<string, unknown>;
  for (const k of DATE_KEYS) wire[k] = task[k]?.getTime() ?? null;
  return wire as WireState;
}

const REQUIRED_DATES = new Set<DateKey>(["createdAt", "updatedAt"]);

/**
 * The state a change carries, or undefined when it has none we can trust
 * (the watcher then re-reads): it must agree with the change it came with,
 * and its dates must be real.
 */
function fromWire(m: WireChange): TaskState | undefined {
  const t = m.t;
  if (typeof t !== "object" || t === null) return undefined;
  if (t.taskId !== m.i || t.status !== m.s || t.agentId !== m.a || t.attempt !== m.n || t.updatedAt !== m.u) return undefined;
  const state = { ...t } as unknown as Record<string, unknown>;
  for (const k of DATE_KEYS) {
    const ms: unknown = t[k];
    if (ms === null && !REQUIRED_DATES.has(k)) {
      state[k] = null;
      continue;
    }
    if (typeof ms !== "number" || !Number.isFinite(ms)) return undefined;
    state[k] = new Date(ms);
  }
  return state as TaskState;
}

/**
 * Task changes fanned out to every instance through Redis pub/sub on
 * `{prefix}:events` (same hash tag as the queue). Local listeners hear local
 * changes at once; other instances' changes arrive through the subscription.
 * Publishing never waits: a change that cannot be announced (Redis down) is
 * still committed, and remote watchers catch up on their next event. The
 * changes of one turn of the event loop go out as one message,
 * `<origin>|<JSON array>`. A bare JSON object (one change, as earlier
 * versions sent) is still understood, but earlier versions cannot read the
 * batches: during a rolling upgrade, watchers and cancellations on
 * not-yet-upgraded instances miss changes made on upgraded ones.
 *
 * Pub/sub keeps nothing for a subscriber that is away, so changes can be
 * missed. Two moments are known, and both call the `onMissed` listeners (the
 * sweeper then re-reads what this instance watches and holds): this
 * instance's subscription is made again after its connection dropped, or
 * another instance, whose announcements were dropped while its own
 * connection was down, sends `<origin>|"missed"` once it is back. Earlier
 * versions skip that message. Anything missed otherwise (an instance killed
 * between its commit and its announcement) is caught by the sweeper's
 * periodic re-read.
 */
export function createRedisTaskEvents(options: { url: string; prefix?: string; log?: QueueLog }): TaskEvents {
  const channel = `{${options.prefix ?? "aaos"}}:events`;
  const origin = randomUUID();
  const ownPrefix = `${origin}|`;
  const listeners = new TaskListeners();
  const common = { maxRetriesPerRequest: 0, enableOfflineQueue: false, retryStrategy: (n: number) => Math.min(100 * 2 ** Math.min(n, 5), 2000) };
  const pub = new Redis(options.url, { ...common, lazyConnect: false, enableAutoPipelining: true });
  // The subscriber waits for Redis as long as it takes.
  const sub = new Redis(options.url, { enableOfflineQueue: true, maxRetriesPerRequest: null, retryStrategy: common.retryStrategy });
  let warnedAt = 0;
  const warn = (e: unknown, msg: string) => {
    if (Date.now() - warnedAt < 30_000) return;
    warnedAt = Date.now();
    options.log?.warn({ err: e }, msg);
  };
  pub.on("error", (e) => warn(e, "task event publisher: redis error"));
  sub.on("error", (e) => warn(e, "task event subscriber: redis error"));
  let closing: Promise<void> | undefined;
  const missedListeners = new Set<() => void>();
  const missed = () => {
    for (const l of missedListeners) l();
  };
  // What was published while there was no subscription (Redis away at
  // start-up, or a reconnect) can only be read from the database.
  subscribeOnEveryConnect(sub, channel, {
    closing: () => closing !== undefined,
    subscribed: missed,
    failed: (e) => warn(e, "task event subscriber could not subscribe"),
  });
  sub.on("message", (_channel: string, message: string) => {
    // Our own batches come back too; the origin prefix skips them unparsed.
    if (message.startsWith(ownPrefix)) return;
    try {
      const body: unknown = JSON.parse(message.startsWith("{") ? message : message.slice(message.indexOf("|") + 1));
      if (body === MISSED) return missed();
      for (const m of (Array.isArray(body) ? body : [body]) as WireChange[]) {
        if (m.o === origin || !isTaskStatus(m.s)) continue;
        const state = fromWire(m);
        listeners.deliver({ taskId: m.i, status: m.s, agentId: m.a, attempt: m.n, updatedAt: new Date(m.u), ...(state ? { state } : {}) });
      }
    } catch (e: unknown) {
      warn(e, "ignored a malformed task event");
    }
  });
  /** Changes made in this turn of the event loop, announced together in one PUBLISH. */
  let outgoing: WireChange[] = [];
  /** Some announcement was dropped: once Redis takes writes again, every instance is told to re-read. */
  let dropped = false;
  const drop = (e?: unknown) => {
    dropped = true;
    if (e !== undefined) warn(e, "could not announce task changes");
  };
  const flush = () => {
    const batch = outgoing;
    outgoing = [];
    if (closing) return;
    if (pub.status !== "ready") return drop();
    pub.publish(channel, ownPrefix + JSON.stringify(batch)).catch(drop);
  };
  pub.on("ready", () => {
    if (!dropped || closing) return;
    dropped = false;
    pub.publish(channel, ownPrefix + JSON.stringify(MISSED)).catch(drop);
  });
  return {
    publish(change: TaskRecord) {
      listeners.deliver({ ...change, task: change });
      if (closing) return;
      if (pub.status !== "ready") return drop();
      if (outgoing.length === 0) setImmediate(flush);
      const t = toWire(change);
      outgoing.push({ o: origin, i: change.taskId, s: change.status, a: change.agentId, n: change.attempt, u: change.updatedAt.getTime(), ...(t ? { t } : {}) });
    },
    subscribe: (taskId, listener) => listeners.subscribe(taskId, listener),
    subscribeAll: (listener) => listeners.subscribeAll(listener),
    watched: () => listeners.watched(),
    refresh: (state) => listeners.refresh(state),
    onMissed(listener) {
      missedListeners.add(listener);
      return () => missedListeners.delete(listener);
    },
    close() {
      closing ??= Promise.all([pub.quit().catch(() => pub.disconnect()), sub.quit().catch(() => sub.disconnect())]).then(() => undefined);
      return closing;
    },
  };
}
