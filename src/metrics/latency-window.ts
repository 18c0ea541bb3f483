/**
 * The most recent N latency samples in a ring buffer, for percentiles of
 * recent dispatches without unbounded memory.
 */
export class LatencyWindow {
  private readonly samples: Float64Array;
  private count = 0;
  private next = 0;

  constructor(capacity = 4096) {
    this.samples = new Float64Array(capacity);
  }

  record(ms: number): void {
    this.samples[this.next] = ms;
    this.next = (this.next + 1) % this.samples.length;
    this.count = Math.min(this.count + 1, this.samples.length);
  }

  /** Nearest-rank percentiles; zeros when there are no samples. */
  percentiles(): { p50: number; p90: number; p99: number; samples: number } {
    if (this.count === 0) return { p50: 0, p90: 0, p99: 0, samples: 0 };
    const sorted = Array.from(this.samples.subarray(0, this.count)).sort((a, b) => a - b);
    const at = (p: number) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
    return { p50: at(50), p90: at(90), p99: at(99), samples: this.count };
  }
}
