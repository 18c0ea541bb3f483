import { describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { createTaskValidator } from "../../src/tasks/task-validation.js";
import { loadConfig } from "../../src/config/config.js";
import { ValidationError, httpStatusOf, toConnectError, wsCodeOf } from "../../src/errors/errors.js";
import { createAgentMessageParser } from "../../src/agents/agent-messages.js";
import { backoffMs } from "../../src/tasks/retry-policy.js";

// The defaults an unconfigured service runs with.
const DEFAULT_LIMITS = loadConfig({}).limits;
const LIMITS = DEFAULT_LIMITS;
const validateCreateTask = createTaskValidator(DEFAULT_LIMITS);
const parseAgentMessage = createAgentMessageParser(DEFAULT_LIMITS);
import { LatencyWindow } from "../../src/metrics/latency-window.js";

function violations(input: Parameters<typeof validateCreateTask>[0]) {
  try {
    validateCreateTask(input);
  } catch (e: unknown) {
    if (e instanceof ValidationError) return e.violations;
    throw e;
  }
  return [];
}

describe("validateCreateTask", () => {
  it("fills defaults", () => {
    expect(validateCreateTask({ taskType: "code", description: "abc" })).toEqual({
      taskType: "code",
      description: "abc",
      priority: 5,
      metadata: {},
      maxAttempts: 3,
      timeoutMs: null,
      idempotencyKey: null,
    });
  });

  it("reports FastAPI-style locations in snake_case", () => {
    expect(violations({ taskType: "CODE", description: "ab", priority: 11 }).map((v) => v.loc)).toEqual([
      ["body", "task_type"],
      ["body", "description"],
      ["body", "priority"],
    ]);
    expect(violations({ taskType: undefined, description: "abc" })[0]).toMatchObject({ loc: ["body", "task_type"], type: "missing" });
  });

  it("counts a description's length in characters (code points), as the seed did, not UTF-16 units", () => {
    const max = DEFAULT_LIMITS.descriptionMaxLength;
    expect(validateCreateTask({ taskType: "qa", description: "😀".repeat(max) }).description).toHaveLength(2 * max);
    expect(violations({ taskType: "qa", description: "😀".repeat(max + 1) })[0]!.loc).toEqual(["body", "description"]);
    expect(violations({ taskType: "qa", description: "😀😀" })[0]!.loc).toEqual(["body", "description"]);
    expect(validateCreateTask({ taskType: "qa", description: "😀😀😀" }).description).toBe("😀😀😀");
  });

  it("bounds metadata by size and depth", () => {
    let deep: Record<string, unknown> = {};
    for (let i = 0; i < LIMITS.jsonMaxDepth + 2; i++) deep = { d: deep };
    expect(violations({ taskType: "qa", description: "abc", metadata: deep })[0]!.loc).toEqual(["body", "metadata"]);
    const big = { blob: "x".repeat(LIMITS.metadataMaxBytes) };
    expect(violations({ taskType: "qa", description: "abc", metadata: big })[0]!.msg).toMatch(/bytes/);
    expect(violations({ taskType: "qa", description: "abc", metadata: [1, 2] })[0]!.loc).toEqual(["body", "metadata"]);
  });

  it("rejects non-integer and out-of-range priorities", () => {
    for (const priority of [-1, 11, 5.5, "5", null as unknown]) {
      if (priority === null) continue;
      expect(violations({ taskType: "qa", description: "abc", priority })).toHaveLength(1);
    }
    expect(validateCreateTask({ taskType: "qa", description: "abc", priority: 0 }).priority).toBe(0);
  });
});

describe("configurable limits", () => {
  it("applies the limits it was built with", () => {
    const strict = createTaskValidator({ descriptionMaxLength: 10, metadataMaxBytes: 20, resultMaxBytes: 20, jsonMaxDepth: 2 });
    expect(() => strict({ taskType: "qa", description: "x".repeat(11) })).toThrow(/at most 10 characters/);
    expect(() => strict({ taskType: "qa", description: "abc", metadata: { a: { b: { c: 1 } } } })).toThrow(/nest at most 2/);
    expect(() => strict({ taskType: "qa", description: "abc", metadata: { blob: "x".repeat(30) } })).toThrow(/at most 20 bytes/);
    const parse = createAgentMessageParser({ descriptionMaxLength: 10, metadataMaxBytes: 20, resultMaxBytes: 20, jsonMaxDepth: 2 });
    const r = parse({ type: "task_complete", taskId: "0195f0a4-5b6c-7d8e-9f01-23456789abcd", result: { blob: "x".repeat(30) } });
    expect(r).toMatchObject({ ok: false, reason: expect.stringMatching(/result: must be at most 20 bytes/) });
  });

  it("refuses a result's attempt number beyond int32, which no task can have", () => {
    const r = parseAgentMessage({ type: "task_complete", taskId: "0195f0a4-5b6c-7d8e-9f01-23456789abcd", result: {}, attempt: 2 ** 31 });
    expect(r).toMatchObject({ ok: false, reason: expect.stringMatching(/attempt/) });
    expect(parseAgentMessage({ type: "task_failed", taskId: "0195f0a4-5b6c-7d8e-9f01-23456789abcd", error: "e", attempt: 2 ** 31 - 1 })).toMatchObject({ ok: true });
  });

  it("refuses idempotency keys and timeouts out of range", () => {
    expect(() => validateCreateTask({ taskType: "qa", description: "abc", idempotencyKey: "k".repeat(201) })).toThrow(/idempotency_key/);
    expect(() => validateCreateTask({ taskType: "qa", description: "abc", timeoutMs: -1 })).toThrow(/timeout_ms/);
    expect(validateCreateTask({ taskType: "qa", description: "abc", timeoutMs: 1500, idempotencyKey: "k1" })).toMatchObject({ timeoutMs: 1500, idempotencyKey: "k1" });
  });
});

describe("retry backoff", () => {
  it("doubles per failed attempt up to the cap, with half of it random", () => {
    const policy = { baseMs: 100, maxMs: 1000 };
    expect([1, 2, 3, 4, 5, 6].map((n) => backoffMs(n, policy, () => 0))).toEqual([50, 100, 200, 400, 500, 500]);
    expect([1, 2, 3, 4, 5, 6].map((n) => backoffMs(n, policy, () => 1))).toEqual([100, 200, 400, 800, 1000, 1000]);
    for (let i = 0; i < 100; i++) {
      const d = backoffMs(3, policy);
      expect(d).toBeGreaterThanOrEqual(200);
      expect(d).toBeLessThanOrEqual(400);
    }
  });
});

describe("agent message validation", () => {
  it("names bad fields the way agents spell them", () => {
    const r = parseAgentMessage({ type: "register", capabilities: ["cooking"], maxConcurrency: -1 });
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.reason).toMatch(/capabilities\.0/);
      expect(r.reason).toMatch(/max_concurrency/);
    }
    expect(parseAgentMessage({ type: "task_complete", taskId: "nope", result: {} })).toMatchObject({ ok: false });
    expect(parseAgentMessage({ type: "heartbeat" })).toEqual({ ok: true, message: { type: "heartbeat" } });
  });

  it("says a text is too long when it is, and not a string only when it is not one", () => {
    const taskId = "00000000-0000-4000-8000-000000000000";
    const reasons = [
      parseAgentMessage({ type: "register", agentName: "n".repeat(101), agentType: "t".repeat(51) }),
      parseAgentMessage({ type: "task_failed", taskId, error: "e".repeat(10_001) }),
      parseAgentMessage({ type: "task_failed", taskId, error: 42 }),
    ].map((r) => (r.ok ? "accepted" : r.reason));
    expect(reasons[0]).toMatch(/agent_name: must be at most 100 characters/);
    expect(reasons[0]).toMatch(/agent_type: must be at most 50 characters/);
    expect(reasons[1]).toMatch(/error: must be at most 10000 characters/);
    expect(reasons[2]).toMatch(/error: must be a string/);
    expect(violations({ taskType: "code", description: "x".repeat(2001) })).toEqual([expect.objectContaining({ msg: "must be at most 2000 characters" })]);
  });
});

describe("error vocabulary", () => {
  it("maps codes to HTTP statuses and WS codes from one table", () => {
    expect([Code.InvalidArgument, Code.NotFound, Code.FailedPrecondition, Code.Unavailable, Code.Internal].map(httpStatusOf)).toEqual([422, 404, 409, 503, 500]);
    expect(wsCodeOf(Code.FailedPrecondition)).toBe("failed_precondition");
  });

  it("turns driver connection failures into UNAVAILABLE and hides unknown causes", () => {
    expect(toConnectError(Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:5432"), { code: "ECONNREFUSED" })).code).toBe(Code.Unavailable);
    expect(toConnectError(Object.assign(new Error("terminating connection"), { code: "57P01" })).code).toBe(Code.Unavailable);
    const hidden = toConnectError(new Error("secret table layout"));
    expect(hidden.code).toBe(Code.Internal);
    expect(hidden.rawMessage).toBe("internal error");
  });
});

describe("LatencyWindow", () => {
  it("reports nearest-rank percentiles of the most recent samples", () => {
    const w = new LatencyWindow(100);
    expect(w.percentiles()).toEqual({ p50: 0, p90: 0, p99: 0, samples: 0 });
    for (let i = 1; i <= 100; i++) w.record(i);
    expect(w.percentiles()).toEqual({ p50: 50, p90: 90, p99: 99, samples: 100 });
    for (let i = 0; i < 100; i++) w.record(1000);
    expect(w.percentiles().p50).toBe(1000);
  });
});
