import { Code, ConnectError } from "@connectrpc/connect";

/** One field-level problem, in FastAPI's 422 vocabulary. */
export interface Violation {
  /** Path to the bad value, e.g. ["body", "priority"]. */
  loc: Array<string | number>;
  msg: string;
  /** Machine-readable kind, e.g. "value_error", "missing", "enum". */
  type: string;
}

/**
 * INVALID_ARGUMENT carrying field violations, so REST can answer FastAPI's
 * `{"detail": [{loc, msg, type}]}` while gRPC/Connect/WS get one readable message.
 */
export class ValidationError extends ConnectError {
  /**
   * ConnectError's own `Symbol.hasInstance` accepts any ConnectError-shaped
   * value, which subclasses inherit; restore the ordinary prototype check.
   */
  static override [Symbol.hasInstance](value: unknown): boolean {
    return Function.prototype[Symbol.hasInstance].call(this, value);
  }

  constructor(readonly violations: Violation[]) {
    super(violations.map((v) => `${v.loc.filter((p) => p !== "body").join(".")}: ${v.msg}`).join("; "), Code.InvalidArgument);
  }
}

export const invalidArgument = (loc: Array<string | number>, msg: string, type = "value_error") =>
  new ValidationError([{ loc, msg, type }]);
export const notFound = (kind: string, id: string) => new ConnectError(`${kind} ${id} not found`, Code.NotFound);
export const failedPrecondition = (message: string) => new ConnectError(message, Code.FailedPrecondition);
export const unavailable = (message: string, cause?: unknown) =>
  new ConnectError(message, Code.Unavailable, undefined, undefined, cause);
export const unimplemented = (message: string) => new ConnectError(message, Code.Unimplemented);

/** Connect code → HTTP status for REST, and → `error.code` for WS frames. One table. */
const TABLE: Record<Code, { http: number; ws: string }> = {
  [Code.Canceled]: { http: 499, ws: "cancelled" },
  [Code.Unknown]: { http: 500, ws: "internal" },
  [Code.InvalidArgument]: { http: 422, ws: "invalid_argument" },
  [Code.DeadlineExceeded]: { http: 504, ws: "deadline_exceeded" },
  [Code.NotFound]: { http: 404, ws: "not_found" },
  [Code.AlreadyExists]: { http: 409, ws: "already_exists" },
  [Code.PermissionDenied]: { http: 403, ws: "permission_denied" },
  [Code.ResourceExhausted]: { http: 429, ws: "resource_exhausted" },
  [Code.FailedPrecondition]: { http: 409, ws: "failed_precondition" },
  [Code.Aborted]: { http: 409, ws: "aborted" },
  [Code.OutOfRange]: { http: 400, ws: "out_of_range" },
  [Code.Unimplemented]: { http: 501, ws: "unimplemented" },
  [Code.Internal]: { http: 500, ws: "internal" },
  [Code.Unavailable]: { http: 503, ws: "unavailable" },
  [Code.DataLoss]: { http: 500, ws: "internal" },
  [Code.Unauthenticated]: { http: 401, ws: "unauthenticated" },
};

export const httpStatusOf = (code: Code): number => TABLE[code].http;
export const wsCodeOf = (code: Code): string => TABLE[code].ws;

const UNAVAILABLE_ERRNOS = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EHOSTUNREACH", "EAI_AGAIN"]);
/** PostgreSQL: lock_not_available (lock_timeout) and query_canceled (statement timeout or cancel): the same request may succeed later. */
const TRANSIENT_SQLSTATES = new Set(["55P03", "57014"]);

type ErrorLike = { code?: unknown; name?: unknown; message?: unknown; cause?: unknown };

/** `e` and its causes (drivers wrap each other's errors), at most five deep. */
function* causeChain(e: unknown): Generator<ErrorLike> {
  for (let cur: unknown = e, depth = 0; cur && typeof cur === "object" && depth < 5; depth++) {
    yield cur as ErrorLike;
    cur = (cur as ErrorLike).cause;
  }
}

/** The database refused one statement for now (it rolled back, so nothing is half-done). */
export function isDatabaseBusy(e: unknown): boolean {
  for (const err of causeChain(e)) if (typeof err.code === "string" && TRANSIENT_SQLSTATES.has(err.code)) return true;
  return false;
}

/** Recognises "the database or Redis cannot be reached" across drivers. */
function isUnavailable(e: unknown): boolean {
  for (const err of causeChain(e)) {
    if (typeof err.code === "string" && (UNAVAILABLE_ERRNOS.has(err.code) || /^(08|57P)/.test(err.code))) return true;
    if (err.name === "ConnectionException" || err.name === "MaxRetriesPerRequestError") return true;
    if (typeof err.message === "string" && /Connection is closed|Stream isn't writeable|connect ECONNREFUSED|Connection terminated|timeout exceeded when trying to connect|Cannot use a pool after calling end/i.test(err.message)) return true;
  }
  return false;
}

function isUniqueViolation(e: unknown): boolean {
  const err = e as { name?: unknown; code?: unknown };
  return err?.name === "UniqueConstraintViolationException" || err?.code === "23505";
}

/**
 * The INTERNAL errors `toConnectError` made of an exception it did not know:
 * a defect or a database fault, never the client's doing. A service converts
 * some before they leave it, so the handlers' error mapper cannot tell them
 * by their class.
 */
const unexpected = new WeakSet<ConnectError>();

export function isUnexpected(e: ConnectError): boolean {
  return unexpected.has(e);
}

/**
 * The one place infrastructure exceptions become API errors. Anything
 * unrecognised becomes INTERNAL with a fixed message: the cause is logged by
 * the caller, never sent.
 */
export function toConnectError(e: unknown): ConnectError {
  if (e instanceof ConnectError) return e;
  if (isUnavailable(e)) return unavailable("a backing service is unavailable; retry later", e);
  if (isDatabaseBusy(e)) return unavailable("the database is busy (a lock or statement timed out); retry later", e);
  if (isUniqueViolation(e)) return new ConnectError("already exists", Code.AlreadyExists, undefined, undefined, e);
  const internal = new ConnectError("internal error", Code.Internal, undefined, undefined, e);
  unexpected.add(internal);
  return internal;
}
