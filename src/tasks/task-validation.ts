import { z } from "zod";
import { ValidationError, type Violation } from "../errors/errors.js";
import {
  DEFAULT_MAX_ATTEMPTS,
  DEFAULT_PRIORITY,
  MAX_PRIORITY,
  MIN_PRIORITY,
  TASK_TYPES,
  type JsonObject,
  type TaskType,
} from "./task-types.js";

/** Bounds on client-supplied data, so one request cannot exhaust the store. */
export const LIMITS = {
  descriptionMin: 3,
  descriptionMax: 2000,
  metadataMaxBytes: 64 * 1024,
  resultMaxBytes: 1024 * 1024,
  jsonMaxDepth: 32,
  maxAttemptsMax: 100,
} as const;

/** Depth of nested objects/arrays; the JSON parsers accept any depth. */
function jsonDepth(value: unknown, depth = 0): number {
  if (depth > LIMITS.jsonMaxDepth) return depth;
  if (value === null || typeof value !== "object") return depth;
  let max = depth + 1;
  for (const child of Object.values(value)) max = Math.max(max, jsonDepth(child, depth + 1));
  return max;
}

/** A JSON object within the size and depth limits. */
export const boundedJsonObject = (maxBytes: number) =>
  z
    .record(z.string(), z.unknown())
    .refine((v) => jsonDepth(v) <= LIMITS.jsonMaxDepth, { message: `must nest at most ${LIMITS.jsonMaxDepth} levels` })
    .refine((v) => Buffer.byteLength(JSON.stringify(v)) <= maxBytes, { message: `must be at most ${maxBytes} bytes as JSON` })
    .transform((v) => v as JsonObject);

const CreateTaskInputSchema = z.object({
  taskType: z.enum(TASK_TYPES, { message: `must be one of: ${TASK_TYPES.join(", ")}` }),
  description: z
    .string({ message: "must be a string" })
    .min(LIMITS.descriptionMin, { message: `must be at least ${LIMITS.descriptionMin} characters` })
    .max(LIMITS.descriptionMax, { message: `must be at most ${LIMITS.descriptionMax} characters` }),
  priority: z
    .number({ message: "must be an integer" })
    .int({ message: "must be an integer" })
    .min(MIN_PRIORITY, { message: `must be between ${MIN_PRIORITY} and ${MAX_PRIORITY}` })
    .max(MAX_PRIORITY, { message: `must be between ${MIN_PRIORITY} and ${MAX_PRIORITY}` })
    .default(DEFAULT_PRIORITY),
  metadata: boundedJsonObject(LIMITS.metadataMaxBytes).default({}),
  maxAttempts: z
    .number()
    .int()
    .min(0)
    .max(LIMITS.maxAttemptsMax, { message: `must be at most ${LIMITS.maxAttemptsMax}` })
    .default(0)
    .transform((n) => (n === 0 ? DEFAULT_MAX_ATTEMPTS : n)),
});

/** What a transport hands the task service; unset fields take their defaults. */
export interface CreateTaskInput {
  taskType: unknown;
  description: unknown;
  priority?: unknown;
  metadata?: unknown;
  maxAttempts?: unknown;
}

export interface ValidCreateTask {
  taskType: TaskType;
  description: string;
  priority: number;
  metadata: JsonObject;
  maxAttempts: number;
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

/** Validates a create request once, for every transport. */
export function validateCreateTask(input: CreateTaskInput): ValidCreateTask {
  const candidate = {
    ...input,
    priority: input.priority ?? undefined,
    metadata: input.metadata ?? undefined,
    maxAttempts: input.maxAttempts ?? undefined,
  };
  const parsed = CreateTaskInputSchema.safeParse(candidate);
  if (!parsed.success) throw new ValidationError(violationsOf(parsed.error, "body", candidate));
  return parsed.data;
}
