import { describe, expect, it } from "vitest";
import { uuidv7 } from "../../src/ids.js";

describe("uuidv7", () => {
  it("is a version 7, variant 10 UUID", () => {
    expect(uuidv7()).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  });

  it("sorts in creation order even within one millisecond and when the clock steps back", () => {
    const ids = [
      ...Array.from({ length: 5000 }, () => uuidv7(1_700_000_000_000)),
      ...Array.from({ length: 10 }, () => uuidv7(1_600_000_000_000)),
    ];
    expect(new Set(ids).size).toBe(ids.length);
    expect([...ids].sort()).toEqual(ids);
  });
});
