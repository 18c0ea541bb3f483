/**
 * Three real instances (child processes) on one PostgreSQL + Redis behave as
 * one orchestrator: work created on one reaches an agent on another, watches
 * and agent views span instances, priorities and FIFO hold across them, and
 * killing one loses nothing.
 */
import { describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import { checkBooks, getJson, scenarioPerTest, sharedServices, summarize, taskRow } from "./harness.js";
import { grpcClient } from "../support/clients.js";

const scenario = scenarioPerTest();

describe.skipIf(!sharedServices)("a cluster of three instances", () => {
  it("shares work, watches, agents and order across instances, and survives losing one", { timeout: 90_000 }, async () => {
    const s = await scenario("three instances", "postgres+redis");
    const [a, b, c] = [await s.startServer({}, "A"), await s.startServer({}, "B"), await s.startServer({}, "C")];

    // Producers on A and C, alternating, before any agent is connected.
    const plan = [3, 8, 3, 10, 8, 0, 10, 3];
    const created: Array<{ id: string; priority: number; i: number }> = [];
    for (const [i, priority] of plan.entries()) {
      created.push({ id: await s.createTask(i % 2 ? c : a, { task_type: "code", description: `cluster ${i}`, priority }), priority, i });
    }

    // A watch on A of a task created on C.
    const watchedId = created[3]!.id;
    const tasks = grpcClient("TaskService", a.port);
    const watch = (tasks as unknown as { WatchTask(r: object): grpc.ClientReadableStream<{ task: { status: string } }> }).WatchTask({ task_id: watchedId });
    const watched: string[] = [];
    const watchEnded = new Promise<void>((resolve) => watch.on("end", resolve));
    watch.on("data", (m) => watched.push(m.task.status));

    // One agent on B takes everything, one task at a time.
    const onB = await s.agent(b, { capabilities: ["code"], agentId: "agent-b", autoComplete: (t) => ({ by: "B", priority: t.priority }) });
    await onB.waitFor((x) => x.assignments.length === plan.length, 20_000, "all tasks on B");
    const expected = [...created].sort((x, y) => y.priority - x.priority || x.i - y.i).map((x) => x.id);
    expect(onB.assignments.map((t) => t.taskId)).toEqual(expected);
    await watchEnded;
    expect(watched.at(0)).toBe("TASK_STATUS_PENDING");
    expect(watched.at(-1)).toBe("TASK_STATUS_COMPLETED");
    tasks.close();

    // Every instance sees every instance's agents.
    await s.agent(a, { transport: "ws", agentId: "agent-a", capabilities: ["research"] });
    for (const server of [a, b, c]) {
      const { body } = await getJson<Array<{ agent_id: string }>>(server, "/agents");
      expect(body.map((x) => x.agent_id).sort()).toEqual(["agent-a", "agent-b"]);
      expect((await getJson<{ agents: { connected: number } }>(server, "/metrics")).body.agents.connected).toBe(2);
    }

    // B dies holding work: its task runs on A once the lease has expired.
    const onBQa = await s.agent(b, { capabilities: ["qa"], agentId: "agent-b-qa" });
    const doomed = await s.createTask(c, { task_type: "qa", description: "held when B dies", priority: 5 });
    await onBQa.waitFor((x) => x.assignments.some((t) => t.taskId === doomed), 10_000, "B holds the qa task");
    await b.kill9();
    s.stopHeartbeats(onBQa);
    s.stopHeartbeats(onB);
    const rescuer = await s.agent(a, { capabilities: ["qa"], agentId: "agent-a-qa", autoComplete: () => ({ by: "A" }) });
    await rescuer.waitFor((x) => x.frames.some((f) => f.type === "completion_ack" && f.taskId === doomed), 20_000, "survivor completes B's task");
    expect(await taskRow(s, doomed)).toMatchObject({ status: "completed", attempt: 2, failed_attempts: 1 });
    await checkBooks(s, { servers: [a, c] });
    await summarize(s);
  });
});
