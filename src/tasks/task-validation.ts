import { z } from "zod";
import { ValidationError, type Violation } from "../errors/errors.js";
import type { Limits } from "../config/config.js";
import {
  DEFAULT_MAX_ATTEMPTS,
  DEFAULT_PRIORITY,
  MAX_PRIORITY,
  MIN_PRIORITY,
  TASK_TYPES,
  type JsonObject,
  type TaskType,
} from "./task-types.js";

export const DESCRIPTION_MIN_LENGTH = 3;
export const MAX_ATTEMPTS_LIMIT = 100;
export const IDEMPOTENCY_KEY_MAX_LENGTH = 200;
/** A week: longer timeouts are almost certainly a unit mistake. */
export const TIMEOUT_MS_LIMIT = 7 * 24 * 60 * 60_000;

/**
 * Why a string cannot be stored faithfully, or null. NUL is refused by
 * PostgreSQL text and truncates SQLite's; a lone UTF-16 surrogate would come
 * back as U+FFFD. Refusing both keeps "what you stored is what you read".
 */
export function textProblem(value: string): string | null {
  if (value.includes("\u0000")) return "must not contain NUL characters";
  if (!value.isWellFormed()) return "must be valid Unicode (no unpaired surrogates)";
  return null;
}

/**
 * Text that round-trips through both databases unchanged. Its message is
 * for a value that is not a string only: a schema-wide message would also
 * replace those of the length checks added to it.
 */
export const safeText = () => z.string({ error: (issue) => (issue.code === "invalid_type" ? "must be a string" : undefined) }).refine((v) => textProblem(v) === null, { message: "must be valid Unicode text without NUL characters" });

/**
 * The first reason a JSON value cannot be stored faithfully within
 * `maxDepth`, in one pass that stops at the first problem (so hostile
 * nesting never reaches a recursive serialiser).
 */
function jsonProblem(value: unknown, maxDepth: number, depth = 0): string | null {
  if (typeof value === "string") return textProblem(value);
  if (typeof value === "number") return Number.isFinite(value) ? null : "must contain only finite numbers";
  if (value === null || typeof value !== "object") return null;
  if (depth + 1 > maxDepth) return `must nest at most ${maxDepth} levels`;
  for (const [key, child] of Object.entries(value)) {
    const problem = textProblem(key) ?? jsonProblem(child, maxDepth, depth + 1);
    if (problem) return problem;
  }
  return null;
}

/** A JSON object that is storable as-is and within the size and depth limits. */
export const boundedJsonObject = (maxBytes: number, maxDepth: number) =>
  z
    .record(z.string(), z.unknown())
    .superRefine((v, ctx) => {
      const problem = jsonProblem(v, maxDepth);
      if (problem) {
        ctx.addIssue({ code: "custom", message: problem });
        return;
      }
      if (Buffer.byteLength(JSON.stringify(v)) > maxBytes) ctx.addIssue({ code: "custom", message: `must be at most ${maxBytes} bytes as JSON` });
    })
    .transform((v) => v as JsonObject);

/** What a transport hands the task service; unset fields take their defaults. */
export interface CreateTaskInput {
  taskType: unknown;
  description: unknown;
  priority?: unknown;
  metadata?: unknown;
  maxAttempts?: unknown;
  timeoutMs?: unknown;
  idempotencyKey?: unknown;
}

export interface ValidCreateTask {
  taskType: TaskType;
  description: string;
  priority: number;
  metadata: JsonObject;
  maxAttempts: number;
  /** null: the server default applies. */
  timeoutMs: number | null;
  idempotencyKey: string | null;
}

const snakeCase = (name: string) => name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

function valueAt(input: unknown, path: readonly PropertyKey[]): unknown {
  let cur = input;
  for (const key of path) cur = cur !== null && typeof cur === "object" ? (cur as Record<PropertyKey, unknown>)[key] : undefined;
  return cur;
}

/**
 * zod issues → FastAPI-style violations with snake_case field names under
 * `root`. A field absent from `input` is reported as FastAPI does: "missing".
 */
export function violationsOf(error: z.ZodError, root: string, input?: unknown): Violation[] {
  return error.issues.map((issue) => {
    const missing = issue.path.length > 0 && valueAt(input, issue.path) === undefined;
    return {
      loc: [root, ...issue.path.map((p) => (typeof p === "string" ? snakeCase(p) : Number(p)))],
      msg: missing ? "Field required" : issue.message,
      type: missing ? "missing" : issue.code,
    };
  });
}

/**
 * Builds the create-request validator for the configured limits. One
 * validation for every transport.
 */
export function createTaskValidator(limits: Limits): (input: CreateTaskInput) => ValidCreateTask {
  const schema = z.object({
    taskType: z.enum(TASK_TYPES, { message: `must be one of: ${TASK_TYPES.join(", ")}` }),
    description: safeText()
      .min(DESCRIPTION_MIN_LENGTH, { message: `must be at least ${DESCRIPTION_MIN_LENGTH} characters` })
      .max(limits.descriptionMaxLength, { message: `must be at most ${limits.descriptionMaxLength} characters` }),
    priority: z
      .number({ message: "must be an integer" })
      .int({ message: "must be an integer" })
      .min(MIN_PRIORITY, { message: `must be between ${MIN_PRIORITY} and ${MAX_PRIORITY}` })
      .max(MAX_PRIORITY, { message: `must be between ${MIN_PRIORITY} and ${MAX_PRIORITY}` })
      .default(DEFAULT_PRIORITY),
    metadata: boundedJsonObject(limits.metadataMaxBytes, limits.jsonMaxDepth).default({}),
    maxAttempts: z
      .number({ message: "must be an integer" })
      .int({ message: "must be an integer" })
      .min(0, { message: "must not be negative" })
      .max(MAX_ATTEMPTS_LIMIT, { message: `must be at most ${MAX_ATTEMPTS_LIMIT}` })
      .default(0)
      .transform((n) => (n === 0 ? DEFAULT_MAX_ATTEMPTS : n)),
    timeoutMs: z
      .number({ message: "must be an integer number of milliseconds" })
      .int({ message: "must be an integer number of milliseconds" })
      .min(0, { message: "must not be negative" })
      .max(TIMEOUT_MS_LIMIT, { message: `must be at most ${TIMEOUT_MS_LIMIT} (a week)` })
      .default(0)
      .transform((n) => (n === 0 ? null : n)),
    idempotencyKey: safeText()
      .max(IDEMPOTENCY_KEY_MAX_LENGTH, { message: `must be at most ${IDEMPOTENCY_KEY_MAX_LENGTH} characters` })
      .default("")
      .transform((k) => (k === "" ? null : k)),
  });
  return (input) => {
    const candidate = {
      ...input,
      priority: input.priority ?? undefined,
      metadata: input.metadata ?? undefined,
      maxAttempts: input.maxAttempts ?? undefined,
      timeoutMs: input.timeoutMs ?? undefined,
      idempotencyKey: input.idempotencyKey ?? undefined,
    };
    const parsed = schema.safeParse(candidate);
    if (!parsed.success) throw new ValidationError(violationsOf(parsed.error, "body", candidate));
    return parsed.data;
  };
}
