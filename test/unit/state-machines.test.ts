import { describe, expect, it } from "vitest";
import { canTransition, isTerminal } from "../../src/tasks/task-state.js";
import { sessionStep } from "../../src/agents/session-state.js";
import { TASK_STATUSES } from "../../src/tasks/task-types.js";

describe("task status transitions", () => {
  it("allows exactly the documented transitions", () => {
    const allowed = TASK_STATUSES.flatMap((from) => TASK_STATUSES.filter((to) => canTransition(from, to)).map((to) => `${from}->${to}`));
    expect(allowed.sort()).toEqual(
      ["pending->assigned", "pending->cancelled", "assigned->pending", "assigned->completed", "assigned->failed", "assigned->cancelled"].sort(),
    );
  });

  it("treats completed, failed and cancelled as terminal", () => {
    expect(TASK_STATUSES.filter(isTerminal)).toEqual(["completed", "failed", "cancelled"]);
  });
});

describe("agent session states", () => {
  it("requires register first, once", () => {
    expect(sessionStep("awaiting_register", "register")).toEqual({ ok: true, next: "active" });
    for (const m of ["heartbeat", "task_complete", "task_failed"] as const) {
      expect(sessionStep("awaiting_register", m)).toMatchObject({ ok: false, code: "failed_precondition", fatal: false });
    }
    expect(sessionStep("active", "register")).toMatchObject({ ok: false, fatal: false });
  });

  it("accepts work messages while active and nothing once closed", () => {
    for (const m of ["heartbeat", "task_complete", "task_failed"] as const) expect(sessionStep("active", m)).toEqual({ ok: true, next: "active" });
    for (const m of ["register", "heartbeat", "task_complete", "task_failed"] as const) {
      expect(sessionStep("closed", m)).toMatchObject({ ok: false, fatal: true });
    }
  });
});
