/** How long to wait before the next attempt of a task that failed. */
export interface RetryPolicy {
  baseMs: number;
  maxMs: number;
}

/**
 * Exponential backoff with "equal jitter": the delay doubles with every
 * failed attempt up to `maxMs`, and half of it is random, so tasks that
 * failed together (an agent crash) do not all come back in the same instant.
 */
export function backoffMs(failedAttempts: number, policy: RetryPolicy, random: () => number = Math.random): number {
  const exponent = Math.max(0, Math.min(failedAttempts - 1, 30));
  const ceiling = Math.min(policy.maxMs, policy.baseMs * 2 ** exponent);
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
