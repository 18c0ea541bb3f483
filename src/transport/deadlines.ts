/** The longest delay a Node timer can wait; a longer one fires at once, with a warning on stderr. */
const MAX_TIMER_MS = 2 ** 31 - 1;
const GRPC_UNIT_MS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 };

/**
 * Deletes a `grpc-timeout` or `connect-timeout-ms` request header that asks
 * for more than a Node timer can wait (about 24.8 days): gRPC libraries and
 * Connect would otherwise end the call at once. Real clients send such
 * deadlines (grpc-go sends 30 days as `2592000S`); one that long is, for any
 * call here, no deadline. Malformed values are left for the protocol to refuse.
 */
export function dropUnusableDeadline(headers: Record<string, string | string[] | undefined>): void {
  const grpc = headers["grpc-timeout"];
  const m = typeof grpc === "string" ? /^(\d{1,8})([HMSmun])$/.exec(grpc) : null;
  if (m && Number(m[1]) * GRPC_UNIT_MS[m[2]!]! > MAX_TIMER_MS) delete headers["grpc-timeout"];
  const connect = headers["connect-timeout-ms"];
  if (typeof connect === "string" && /^\d{1,10}$/.test(connect) && Number(connect) > MAX_TIMER_MS) delete headers["connect-timeout-ms"];
}
