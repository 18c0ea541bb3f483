/**
 * The sweeper's bookkeeping of when to look again, over fakes that let the
 * test report missed announcements at an exact moment: a race a real Redis
 * produces only by chance. The looks themselves, on real databases, are in
 * test/integration/agent-lifecycle.
 */
import { describe, expect, it } from "vitest";
import { Sweeper, type SweeperOptions } from "../../src/agents/sweeper.js";
import { createLogger } from "../../src/telemetry/logger.js";

function harness() {
  let reportMissed: () => void = () => {};
  let duringRenewal: () => void = () => {};
  const calls = { renewals: 0, reads: 0 };
  const options = {
    tasks: {
      renewLeases: async () => {
        calls.renewals++;
        duringRenewal();
        return [];
      },
      getMany: async () => {
        calls.reads++;
        return [];
      },
      listExpiredLeases: async () => [],
      listDueRetries: async () => [],
      markQueued: async () => undefined,
      foldStatusCounts: async () => undefined,
    },
    agents: { touchHeartbeats: async () => undefined },
    queue: {},
    events: { onMissed: (l: () => void) => ((reportMissed = l), () => undefined), watched: () => ["watched-task"], refresh: () => undefined },
    dispatcher: { recheck: () => undefined, list: () => [] },
    log: createLogger({ level: "silent" }),
    clock: () => new Date(),
    // Sweeps run only when the test calls them.
    intervalMs: 3_600_000,
    leaseTtlMs: 30_000,
    retry: { baseMs: 1, maxMs: 1 },
  } as unknown as SweeperOptions;
  const sweeper = new Sweeper(options);
  sweeper.start();
  return { sweeper, calls, reportMissed: () => reportMissed(), during: (f: () => void) => (duringRenewal = f) };
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
