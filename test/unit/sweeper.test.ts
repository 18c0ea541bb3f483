/**
 * The sweeper's bookkeeping of when to look again, over fakes that let the
 * test report missed announcements at an exact moment: a race a real Redis
 * produces only by chance. The looks themselves, on real databases, are in
 * test/integration/agent-lifecycle.
 */
import { describe, expect, it } from "vitest";
import { Sweeper, type SweeperOptions } from "../../src/agents/sweeper.js";
import { createLogger } from "../../src/telemetry/logger.js";

function harness(tasks: Record<string, unknown> = {}) {
  let reportMissed: () => void = () => {};
  let duringRenewal: () => unknown = () => {};
  const calls = { renewals: 0, reads: 0 };
  let passes = 0;
  const options = {
    tasks: {
      renewLeases: async () => {
        calls.renewals++;
        await duringRenewal();
        return [];
      },
      getStates: async () => {
        calls.reads++;
        return [];
      },
      listExpiredLeases: async () => [],
      listDueRetries: async () => [],
      markQueued: async () => undefined,
      foldStatusCounts: async () => undefined,
      ...tasks,
    },
    agents: { touchHeartbeats: async () => undefined },
    queue: {},
    events: { publish: () => undefined, onMissed: (l: () => void) => ((reportMissed = l), () => undefined), watched: () => ["watched-task"], refresh: () => undefined },
    dispatcher: { recheck: () => void passes++, list: () => [] },
    log: createLogger({ level: "silent" }),
    clock: () => new Date(),
    // Sweeps run only when the test calls them.
    intervalMs: 3_600_000,
    leaseTtlMs: 30_000,
    retry: { baseMs: 1, maxMs: 1 },
  } as unknown as SweeperOptions;
  const sweeper = new Sweeper(options);
  sweeper.start();
  return { sweeper, calls, passes: () => passes, reportMissed: () => reportMissed(), during: (f: () => unknown) => (duringRenewal = f) };
}

describe("sweeper: looking again after missed announcements", () => {
  it("renews and re-reads at the next pass once told announcements were missed, and not before the interval otherwise", async () => {
    const h = harness();
    await h.sweeper.sweep();
    expect(h.calls).toEqual({ renewals: 1, reads: 1 });
    await h.sweeper.sweep();
    expect(h.calls).toEqual({ renewals: 1, reads: 1 });
    h.reportMissed();
    await h.sweeper.sweep();
    expect(h.calls).toEqual({ renewals: 2, reads: 2 });
    await h.sweeper.close();
  });

  it("keeps a report that arrives while a renewal is under way for the next pass", async () => {
    const h = harness();
    h.during(() => h.reportMissed());
    await h.sweeper.sweep();
    h.during(() => undefined);
    expect(h.calls).toEqual({ renewals: 1, reads: 1 });
    // The renewal and the re-read of that pass may have run before the report: both happen again.
    await h.sweeper.sweep();
    expect(h.calls).toEqual({ renewals: 2, reads: 2 });
    await h.sweeper.sweep();
    expect(h.calls).toEqual({ renewals: 2, reads: 2 });
    await h.sweeper.close();
  });
});

describe("sweeper: closing", () => {
  it("waits for the step under way and runs none after it", async () => {
    const h = harness();
    let finishRenewal = () => {};
    const renewing = new Promise<void>((started) => h.during(() => new Promise<void>((r) => ((finishRenewal = r), started()))));
    const pass = h.sweeper.sweep();
    await renewing;
    let closed = false;
    const closing = h.sweeper.close().then(() => (closed = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(closed).toBe(false);
    finishRenewal();
    await closing;
    await pass;
    // The re-read of watched tasks comes after the renewal in a pass.
    expect(h.calls).toEqual({ renewals: 1, reads: 0 });
  });
});

describe("sweeper: closing while taking back expired leases", () => {
  it("stops between two take-backs, and a pass asked for once closed does nothing", async () => {
    const expired = ["a", "b", "c"].map((taskId) => ({ taskId, agentId: "gone", attempt: 1, failedAttempts: 0 }));
    let tookBack = 0;
    let started = () => {};
    let finish = () => {};
    const firstStarted = new Promise<void>((r) => (started = r));
    const h = harness({
      listExpiredLeases: async () => expired,
      retryOrFail: async (taskId: string) => {
        tookBack++;
        started();
        await new Promise<void>((r) => (finish = r));
        return { taskId, status: "pending" };
      },
    });
    const pass = h.sweeper.sweep();
    await firstStarted;
    const closing = h.sweeper.close();
    finish();
    await closing;
    await pass;
    expect(tookBack).toBe(1);
    await h.sweeper.sweep();
    expect(h.passes()).toBe(1);
  });
});
