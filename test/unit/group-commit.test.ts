import { describe, expect, it } from "vitest";
import { createGroupCommit } from "../../src/persistence/group-commit.js";

/** A group commit over an in-memory "database" that records each batch it commits. */
function recorder(options: { maxBatch: number; failBatchesWith?: string } = { maxBatch: 3 }) {
  const batches: string[][] = [];
  const alone: string[] = [];
  const group = createGroupCommit<string, string>({
    maxBatch: options.maxBatch,
    maxInFlight: 1,
    async runBatch(items) {
      if (options.failBatchesWith && items.includes(options.failBatchesWith)) throw new Error("statement error: batch rolled back");
      batches.push([...items]);
      return items.map((i) => `done ${i}`);
    },
    async runOne(item) {
      if (item === options.failBatchesWith) throw new Error(`${item} fails on its own`);
      alone.push(item);
      return `done ${item}`;
    },
    retryAlone: () => true,
  });
  return { group, batches, alone };
}

describe("group commit: runAll", () => {
  it("keeps the units of one runAll in one batch, in order, even across the batch size", async () => {
    const { group, batches, alone } = recorder({ maxBatch: 3 });
    const before = [group.run("a"), group.run("b")];
    const together = group.runAll(["insert x", "assign x"]);
    const after = group.run("c");
    expect(await Promise.all([...before, ...together, after])).toEqual(["done a", "done b", "done insert x", "done assign x", "done c"]);
    // "assign x" would have been the first of the second batch; it went with its partner instead.
    expect(batches).toEqual([["a", "b", "insert x", "assign x"]]);
    expect(alone).toEqual(["c"]);
  });

  it("settles each unit on its own when the batch is retried alone, still in order", async () => {
    const { group, alone } = recorder({ maxBatch: 10, failBatchesWith: "bad" });
    const [first, second] = group.runAll(["insert x", "assign x"]);
    const other = group.run("bad");
    expect(await first).toBe("done insert x");
    expect(await second).toBe("done assign x");
    await expect(other).rejects.toThrow("bad fails on its own");
    expect(alone).toEqual(["insert x", "assign x"]);
  });
});
