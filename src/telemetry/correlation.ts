import { randomUUID } from "node:crypto";

/** Header (REST, Connect) and metadata key (gRPC) carrying the correlation ID. */
export const CORRELATION_HEADER = "x-correlation-id";

const VALID = /^[A-Za-z0-9._:-]{1,128}$/;

/**
 * The caller's correlation ID when it is a sane token, otherwise a new UUID:
 * an ID is written on every log line, so it must not be able to inject text.
 */
export function correlationIdFrom(value: string | string[] | undefined | null): string {
  const candidate = Array.isArray(value) ? value[0] : value;
  return candidate && VALID.test(candidate) ? candidate : randomUUID();
}
