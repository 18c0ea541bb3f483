/**
 * Session lifecycle across connections and server lives: an agent id that
 * reconnects, a server that shuts down or restarts, and several instances
 * sharing PostgreSQL + Redis.
 */
import v8 from "node:v8";
import vm from "node:vm";
import { afterEach, describe, expect, it } from "vitest";
import { BACKENDS, byHand, eventually, startServer, type TestServer } from "../support/server.js";
import { TEST_REDIS_URL } from "../support/services.js";
import { TcpProxy } from "../support/tcp-proxy.js";
import { Redis } from "ioredis";
import * as grpc from "@grpc/grpc-js";
import { GrpcAgent, WsAgent, grpcClient, unary, type TestAgent } from "../support/clients.js";

async function postTask(s: TestServer, body: Record<string, unknown>) {
  const res = await fetch(`${s.baseUrl}/tasks`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  expect(res.status).toBe(201);
  return ((await res.json()) as { task_id: string }).task_id;
}

const servers: TestServer[] = [];
const agents: TestAgent[] = [];
afterEach(async () => {
  for (const a of agents.splice(0)) a.kill();
  for (const s of servers.splice(0).reverse()) await s.close();
});
const start = async (...args: Parameters<typeof startServer>) => {
  const s = await startServer(...args);
  servers.push(s);
  return s;
};
const track = <T extends TestAgent>(a: T) => (agents.push(a), a);

/** A WatchTask stream over gRPC: the statuses seen, and whether it ended. */
function watchTask(port: number, taskId: string) {
  const tc = grpcClient("TaskService", port);
  const stream = (tc as unknown as { WatchTask(r: object): grpc.ClientReadableStream<{ task: { status: string } }> }).WatchTask({ task_id: taskId });
  const watch = { seen: [] as string[], ended: false, close: () => tc.close() };
  stream.on("data", (m) => watch.seen.push(m.task.status));
  stream.on("end", () => (watch.ended = true));
  stream.on("error", () => (watch.ended = true));
  return watch;
}

describe.each(BACKENDS)("agent lifecycle on $name", ({ name, available }) => {
  it.skipIf(!available)("an agent id that connects again replaces its old session and gets its task back", async () => {
    const s = await start(name);
    const old = track(await GrpcAgent.connect(s.port, { agentId: "worker-7" }));
    const id = await postTask(s, { task_type: "code", description: "reconnect me", priority: 4 });
    await old.waitForFrame("task_assignment");
    const fresh = track(await WsAgent.connect(s.port, { agentId: "worker-7" }));
    await old.waitFor((a) => a.closed, 5000, "old stream closed");
    await fresh.waitForFrame("task_assignment");
    expect(fresh.assignments[0]).toMatchObject({ taskId: id, attempt: 2, priority: 4 });
    // The old stream's late result for attempt 1 changes nothing.
    fresh.complete(id, { from: "fresh" });
    await fresh.waitForFrame("completion_ack");
    const t = (await s.persistence.tasks.get(id))!;
    expect(t).toMatchObject({ status: "completed", attempt: 2, agentId: "worker-7", result: { from: "fresh" } });
    const agentsNow = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<{ agent_id: string; transport: string }>;
    expect(agentsNow).toEqual([expect.objectContaining({ agent_id: "worker-7", transport: "ws" })]);
  });

  it.skipIf(!available)("shutdown ends agent streams and puts held tasks back in the queue", async () => {
    const s = await start(name);
    const g = track(await GrpcAgent.connect(s.port));
    const w = track(await WsAgent.connect(s.port));
    const ids = [await postTask(s, { task_type: "qa", description: "held by grpc" }), await postTask(s, { task_type: "qa", description: "held by ws" })];
    await g.waitForFrame("task_assignment");
    await w.waitForFrame("task_assignment");
    // With PostgreSQL + Redis a second instance is already running; the
    // embedded backend is single-instance, so it is restarted afterwards.
    const other = name === "embedded" ? undefined : await start(name, { shareWith: s });
    await s.app.close();
    await g.waitFor((a) => a.closed, 5000, "grpc stream ended");
    await w.waitFor((a) => a.closed, 5000, "socket closed");
    expect(w.closeCode).toBe(1001);
    // Both were asked to drain first, with the grace period they had.
    for (const agent of [g, w]) expect(agent.frames.map((f) => f.type)).toContain("drain");
    const restart = other ?? (await start(name, { shareWith: s }));
    for (const id of ids) {
      expect((await restart.persistence.tasks.get(id))!.status).toBe("pending");
      const trail = await restart.persistence.tasks.auditTrail(id);
      // Released by the shutdown itself, not by the next instance's recovery.
      expect(trail.at(-1)).toMatchObject({ toStatus: "pending", details: expect.objectContaining({ reason: "server shutting down" }) });
    }
    // The surviving instance (or the restarted one) runs them.
    const next = track(await WsAgent.connect(restart.port, { maxConcurrency: 2, autoComplete: () => ({}) }));
    await next.waitForFrame("completion_ack", 2);
    expect(next.assignments.map((a) => a.attempt)).toEqual([2, 2]);
  });

  it.skipIf(!available || name !== "embedded")("a restarted single instance re-queues work in priority and FIFO order; an orphaned lease comes back as a failed attempt", async () => {
    const first = await start("embedded");
    const ids: Array<{ id: string; priority: number }> = [];
    for (const [i, priority] of [3, 7, 3, 9, 7].entries()) ids.push({ id: await postTask(first, { task_type: "research", description: `research ${i}`, priority }), priority });
    // A lease held by an agent of the previous life (the process died with it).
    await first.persistence.tasks.assign(ids[1]!.id, "ghost-agent", new Date(), null, new Date(Date.now() + 60_000));
    await first.app.close();
    const second = await start("embedded", { shareWith: first });
    const a = track(await GrpcAgent.connect(second.port, { autoComplete: () => ({}) }));
    await a.waitFor((x) => x.assignments.length === 5, 10_000, "all five");
    // The waiting tasks in priority/FIFO order; the orphan after its retry backoff.
    expect(a.assignments.map((x) => x.taskId)).toEqual([ids[3]!.id, ids[4]!.id, ids[0]!.id, ids[2]!.id, ids[1]!.id]);
    expect(a.assignments[4]).toMatchObject({ attempt: 2, priority: 7 });
    await a.waitForFrame("completion_ack", 5);
    const orphan = (await second.persistence.tasks.get(ids[1]!.id))!;
    expect(orphan).toMatchObject({ status: "completed", failedAttempts: 1, error: "orchestrator restarted while the task was running" });
  });

  it.skipIf(!available)("a change nobody announced (made by hand in the database) reaches the holder and the watchers at the next renewal", async () => {
    // Leases renewed, and watched tasks re-read, every 300 ms.
    const s = await start(name, { env: { LEASE_TTL_MS: "900", HEARTBEAT_INTERVAL_MS: "100", SWEEP_INTERVAL_MS: "50" } });
    const agent = track(await GrpcAgent.connect(s.port, { capabilities: ["qa"] }));
    const id = await postTask(s, { task_type: "qa", description: "cancelled by hand" });
    await agent.waitForFrame("task_assignment");
    const watch = watchTask(s.port, id);
    await eventually(() => watch.seen.length > 0, 5000, "the watch's first state");
    await byHand(s, "update tasks set status = 'cancelled' where task_id = $1", [id]);
    await eventually(() => watch.ended, 5000, "the watch ended");
    expect(watch.seen).toEqual(["TASK_STATUS_ASSIGNED", "TASK_STATUS_CANCELLED"]);
    watch.close();
    // The agent is told to stop, and its one slot takes the next task.
    await agent.waitFor((x) => x.frames.some((f) => f.type === "task_cancelled" && f.taskId === id), 5000, "the holder told");
    const next = await postTask(s, { task_type: "qa", description: "the freed slot takes this" });
    await agent.waitFor((x) => x.assignments.some((t) => t.taskId === next), 5000, "freed slot used");
    expect(s.logs.lines).toContainEqual(expect.objectContaining({ msg: "lease lost without notice; telling the agent to stop", task_id: id, status: "cancelled" }));
  });

  it.skipIf(!available || name === "embedded")("a starting instance folds the task counts of database sessions that have ended, and the metrics stay exact", async () => {
    const a = await start(name);
    const ids = [await postTask(a, { task_type: "qa", description: "counted" }), await postTask(a, { task_type: "qa", description: "cancelled by hand" })];
    // A session of its own adds to a row of its own, left behind when it ends.
    const [{ pid }] = (await byHand(a, "update tasks set status = 'cancelled' where task_id = $1 returning pg_backend_pid() as pid", [ids[1]!])) as [{ pid: number }];
    await eventually(async () => (await byHand(a, "select 1 from pg_stat_activity where pid = $1", [pid])).length === 0, 5000, "the session gone");
    const left = await byHand(a, "select status, n from task_status_counts where slot = $1 order by status", [pid]);
    expect(left.map((r) => [r.status, Number(r.n)])).toEqual([["cancelled", 1], ["pending", -1]]);
    const b = await start(name, { shareWith: a, env: { SWEEP_INTERVAL_MS: "50" } });
    await eventually(async () => (await byHand(b, "select 1 from task_status_counts where slot = $1", [pid])).length === 0, 5000, "its rows folded");
    for (const s of [a, b]) {
      const m = (await (await fetch(`${s.baseUrl}/metrics`)).json()) as { tasks: Record<string, number> };
      expect(m.tasks).toMatchObject({ pending: 1, cancelled: 1 });
    }
  });

  it.skipIf(!available || name === "embedded")("an instance whose clock is off from the database's says so, naming the offset", async () => {
    const warns = (l: Record<string, unknown>) => String(l.msg).startsWith("this instance's clock is off from the database's");
    const env = { SWEEP_INTERVAL_MS: "50" };
    const onTime = await start(name, { env });
    const ahead = await start(name, { env, shareWith: onTime, clock: () => new Date(Date.now() + 60_000) });
    const line = await eventually(() => ahead.logs.lines.find(warns), 5000, "the warning");
    // A sixth of the default lease (30 s).
    expect(line).toMatchObject({ limit_ms: 5000 });
    expect(Math.abs(Number(line.clock_offset_ms) - 60_000)).toBeLessThan(1000);
    // The instance on time, started first, has compared its clock as early in its sweeps, and found nothing to say.
    expect(onTime.logs.lines.filter(warns)).toEqual([]);
  });

  it.skipIf(!available || name === "embedded")("instances sharing PostgreSQL and Redis share the work", async () => {
    const a = await start(name);
    const b = await start(name, { shareWith: a });
    const agentOnB = track(await GrpcAgent.connect(b.port, { capabilities: ["analysis"], autoComplete: () => ({ on: "b" }) }));
    const id = await postTask(a, { task_type: "analysis", description: "created on A" });
    await agentOnB.waitForFrame("completion_ack");
    expect(agentOnB.assignments[0]!.taskId).toBe(id);
    await eventually(async () => (await a.persistence.tasks.get(id))?.status === "completed", 5000, "A sees completion");
    const viaA = (await (await fetch(`${a.baseUrl}/tasks/${id}`)).json()) as { status: string; result: unknown };
    expect(viaA).toMatchObject({ status: "completed", result: { on: "b" } });
  });

  it.skipIf(!available || name === "embedded")("ListAgents and the metrics on any instance cover agents connected to every instance", async () => {
    const env = { LEASE_TTL_MS: "600", HEARTBEAT_INTERVAL_MS: "100", HEARTBEAT_TIMEOUT_MS: "600", SWEEP_INTERVAL_MS: "50" };
    const a = await start(name, { env });
    const b = await start(name, { env, shareWith: a });
    const onA = track(await WsAgent.connect(a.port, { agentId: "agent-on-a" }));
    const onB = track(await GrpcAgent.connect(b.port, { agentId: "agent-on-b", capabilities: ["code"] }));
    const beat = setInterval(() => [onA, onB].forEach((x) => x.heartbeat()), 100);
    try {
      const id = await postTask(a, { task_type: "code", description: "keeps agent-on-b busy" });
      await eventually(async () => onA.assignments.length + onB.assignments.length === 1, 5000, "assigned");
      const holder = onA.assignments.length ? "agent-on-a" : "agent-on-b";
      for (const s of [a, b]) {
        const agentsSeen = (await (await fetch(`${s.baseUrl}/agents`)).json()) as Array<{ agent_id: string; status: string; active_tasks: number }>;
        expect(agentsSeen.map((x) => x.agent_id).sort()).toEqual(["agent-on-a", "agent-on-b"]);
        expect(agentsSeen.find((x) => x.agent_id === holder)).toMatchObject({ status: "busy", active_tasks: 1 });
        const m = (await (await fetch(`${s.baseUrl}/metrics`)).json()) as { agents: unknown };
        expect(m.agents).toEqual({ connected: 2, idle: 1, busy: 1 });
      }
      // An agent whose instance stops marking it alive drops out of the view.
      await b.app.close();
      await eventually(async () => ((await (await fetch(`${a.baseUrl}/agents`)).json()) as unknown[]).length === 1, 5000, "agent-on-b gone");
      void id;
    } finally {
      clearInterval(beat);
    }
  });

  it.skipIf(!available || name === "embedded")("a watch on one instance sees changes made through another, and a cancel reaches the holder's instance", async () => {
    const a = await start(name);
    const b = await start(name, { shareWith: a });
    const agentOnB = track(await GrpcAgent.connect(b.port, { capabilities: ["qa"] }));
    const watched = await postTask(a, { task_type: "qa", description: "watched from A" });
    const watch = watchTask(a.port, watched);
    await agentOnB.waitForFrame("task_assignment");
    agentOnB.complete(watched, {});
    await eventually(() => watch.ended, 10_000, "the watch ended");
    watch.close();
    const { seen } = watch;
    expect(seen).toEqual(["TASK_STATUS_PENDING", "TASK_STATUS_ASSIGNED", "TASK_STATUS_COMPLETED"].slice(seen[0] === "TASK_STATUS_PENDING" ? 0 : 1));
    expect(seen.at(-1)).toBe("TASK_STATUS_COMPLETED");
    const tc = grpcClient("TaskService", a.port);
    // Cancelled through A while B's agent holds it: the agent is told and its slot freed.
    const held = await postTask(a, { task_type: "qa", description: "cancelled from A" });
    await agentOnB.waitFor((x) => x.assignments.some((t) => t.taskId === held), 5000, "second assignment");
    await unary(tc, "CancelTask", { task_id: held });
    await agentOnB.waitFor((x) => x.frames.some((f) => f.type === "task_cancelled" && f.taskId === held), 5000, "task_cancelled on B");
    const next = await postTask(a, { task_type: "qa", description: "the freed slot takes this" });
    await agentOnB.waitFor((x) => x.assignments.some((t) => t.taskId === next), 5000, "freed slot used");
    tc.close();
  });

  for (const cutOff of ["watching", "changing"] as const) {
    it.skipIf(!available || name === "embedded")(`a change announced while the ${cutOff} instance's Redis connection was down reaches the watcher once it is back`, async () => {
      const target = new URL(TEST_REDIS_URL);
      const proxy = await TcpProxy.start({ host: target.hostname, port: Number(target.port || 6379) });
      const viaProxy = new URL(TEST_REDIS_URL);
      viaProxy.hostname = "127.0.0.1";
      viaProxy.port = String(proxy.port);
      // The periodic re-read comes every 20 s: too late to be what the watcher waits for here.
      const env = { LEASE_TTL_MS: "60000", SWEEP_INTERVAL_MS: "50" };
      const direct = await start(name, { env });
      const proxied = await start(name, { env, shareWith: direct, redisUrl: viaProxy.toString() });
      const [watching, changing] = cutOff === "watching" ? [proxied, direct] : [direct, proxied];
      try {
        // Each instance re-reads once its first subscription is made: let that pass, so that
        // from here on only a lost announcement is caught up.
        const redis = new Redis(TEST_REDIS_URL);
        try {
          const subscribers = async () => ((await redis.pubsub("NUMSUB", `{${direct.data.prefix}}:events`)) as [string, number])[1];
          await eventually(async () => (await subscribers()) === 2, 5000, "both instances subscribed");
        } finally {
          redis.disconnect();
        }
        await new Promise((r) => setTimeout(r, 200));
        const agent = track(await GrpcAgent.connect(changing.port, { capabilities: ["qa"] }));
        const id = await postTask(changing, { task_type: "qa", description: "completed while announcements are lost" });
        await agent.waitForFrame("task_assignment");
        const watch = watchTask(watching.port, id);
        await eventually(() => watch.seen.length > 0, 5000, "the watch's first state");
        proxy.cut();
        await eventually(async () => (await fetch(`${proxied.baseUrl}/health`)).status === 503, 5000, "the cut-off instance sees Redis gone");
        agent.complete(id, {});
        await agent.waitForFrame("completion_ack");
        // The announcement was lost on the way (what comes below fails if it was not)...
        await new Promise((r) => setTimeout(r, 300));
        expect(watch.seen).toEqual(["TASK_STATUS_ASSIGNED"]);
        proxy.restore();
        // ...and the watcher catches up once the connection is back.
        await eventually(() => watch.ended, 10_000, "the watch ended");
        expect(watch.seen).toEqual(["TASK_STATUS_ASSIGNED", "TASK_STATUS_COMPLETED"]);
        watch.close();
      } finally {
        proxy.restore();
        // Before the proxy goes, so its Redis connections close cleanly.
        servers.splice(servers.indexOf(proxied), 1);
        await proxied.close();
        await proxy.close();
      }
    });
  }
});

describe("agent sessions that end", () => {
  it("are freed, also while a hand-off has its place among the sessions and no create moves it on", async () => {
    // A full collection on demand, for WeakRefs to tell what is still held.
    v8.setFlagsFromString("--expose-gc");
    const gc = vm.runInNewContext("gc") as () => void;
    const s = await start("embedded");
    const first = track(await WsAgent.connect(s.port, { agentId: "stays", capabilities: ["code"] }));
    // Handed straight to the idle agent: the scan now has its place among the sessions.
    await postTask(s, { task_type: "code", description: "hand me over" });
    await first.waitForFrame("task_assignment");
    // In a function of its own, so that no variable of this test's frame holds a session.
    const refsTo = (prefix: string) => s.app.dispatcher.list().flatMap((session) => (session.agentId.startsWith(prefix) ? [new WeakRef(session)] : []));
    const ended: Array<WeakRef<object>> = [];
    // Enough comings and goings for the sessions' table to grow and shrink several times.
    for (let round = 0; round < 4; round++) {
      const batch = await Promise.all(Array.from({ length: 60 }, (_, i) => WsAgent.connect(s.port, { agentId: `passing-${round}-${i}`, capabilities: ["research"] })));
      ended.push(...refsTo(`passing-${round}-`));
      await Promise.all(batch.map((a) => a.end()));
      await eventually(() => s.app.dispatcher.list().length === 1, 5000, "the sessions closed");
    }
    expect(ended).toHaveLength(240);
    let held = ended.length;
    await eventually(
      async () => {
        // A new job: a WeakRef keeps its target alive until the job that made or read it ends.
        await new Promise((r) => setTimeout(r, 50));
        gc();
        held = ended.filter((r) => r.deref() !== undefined).length;
        return held === 0;
      },
      10_000,
      "ended sessions collected",
    ).catch(() => undefined);
    expect(held).toBe(0);
  });
});

describe("tasks handed straight from their create", () => {
  it("go to idle agents in turn, also after agents come and go", async () => {
    const s = await start("embedded");
    const connect = (agentId: string) => WsAgent.connect(s.port, { agentId, capabilities: ["code"], maxConcurrency: 10 });
    const present = new Map<string, WsAgent>();
    for (const id of ["a", "b", "c"]) present.set(id, track(await connect(id)));
    /** Creates `n` tasks one after another; the agent each was handed to at its create. */
    const createEach = async (n: number) => {
      const to: string[] = [];
      for (let i = 0; i < n; i++) {
        const id = await postTask(s, { task_type: "code", description: `turn ${i}` });
        await eventually(() => [...present.values()].some((a) => a.assignments.some((t) => t.taskId === id)), 5000, "the task assigned");
        const task = (await s.persistence.tasks.get(id))!;
        // Leased in the create's own commit: handed over, not claimed from the queue.
        expect(task.assignedAt).toEqual(task.createdAt);
        to.push(task.agentId!);
      }
      return to;
    };
    const count = (to: string[]) => Object.fromEntries([...new Set(to)].sort().map((id) => [id, to.filter((x) => x === id).length]));
    // Nothing queued for code yet: the agents' first claims find the type dry, and hand-offs begin.
    await eventually(async () => (await createEach(1)).length === 1, 5000, "a first hand-off");
    expect(count(await createEach(6))).toEqual({ a: 2, b: 2, c: 2 });
    // One goes, two come: every agent present still takes its turn.
    await present.get("b")!.end();
    present.delete("b");
    await eventually(() => s.app.dispatcher.list().length === 2, 5000, "b's session closed");
    for (const id of ["d", "e"]) present.set(id, track(await connect(id)));
    expect(count(await createEach(8))).toEqual({ a: 2, c: 2, d: 2, e: 2 });
  });
});
