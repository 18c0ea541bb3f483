import { pino, type DestinationStream, type LogFn } from "pino";

/**
 * The logger every module receives: pino's, or a child of it (Fastify's
 * request loggers satisfy it too, so request-scoped lines keep their
 * `correlation_id`).
 */
export interface Logger {
  level: string;
  fatal: LogFn;
  error: LogFn;
  warn: LogFn;
  info: LogFn;
  debug: LogFn;
  trace: LogFn;
  child(bindings: Record<string, unknown>): Logger;
}

/**
 * Structured JSON lines with ISO-8601 timestamps and textual levels, the
 * shape log shippers expect.
 */
export function createLogger(options: { level: string; destination?: DestinationStream }): pino.Logger {
  return pino(
    {
      level: options.level,
      base: { service: "aaos-orchestrator" },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    options.destination,
  );
}
