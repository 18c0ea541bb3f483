import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { Code, ConnectError } from "@connectrpc/connect";
import { z } from "zod";
import { httpStatusOf, toConnectError, ValidationError } from "../../errors/errors.js";
import { violationsOf } from "../../tasks/task-validation.js";
import { TASK_STATUSES, TASK_TYPES } from "../../tasks/task-types.js";
import type { RequestContext } from "../../tasks/task-service.js";
import type { AppServices } from "../services.js";
import { CORRELATION_HEADER } from "../../telemetry/correlation.js";
import { agentToJson, metricsToJson, taskToJson } from "./json-views.js";

const ListQuery = z.object({
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  status: z.enum(TASK_STATUSES).optional(),
  task_type: z.enum(TASK_TYPES).optional(),
});

const AgentsQuery = z.object({ include_disconnected: z.enum(["true", "false"]).default("false") });

function requestContext(req: FastifyRequest): RequestContext {
  return { correlationId: String(req.id), log: req.log };
}

/**
 * Errors in FastAPI's shapes: `{"detail": ...}` plus a machine-readable
 * `code`. Request-shape problems are 422 with a detail list; a missing task
 * is `{"detail": "Task not found"}`; internal causes are logged, never sent.
 */
export function sendError(reply: FastifyReply, e: unknown): FastifyReply {
  // Errors raised before the onRequest hook (router/framework errors) still echo the ID.
  if (!reply.hasHeader(CORRELATION_HEADER)) reply.header(CORRELATION_HEADER, String(reply.request.id));
  const fe = e as FastifyError;
  if (!(e instanceof ConnectError) && typeof fe?.statusCode === "number" && fe.statusCode < 500) {
    // Fastify's own refusals: body parsing, size limits, media types.
    if (fe.code === "FST_ERR_CTP_INVALID_JSON_BODY" || fe.code === "FST_ERR_CTP_EMPTY_JSON_BODY" || e instanceof SyntaxError) {
      return reply.code(422).send({ detail: [{ loc: ["body"], msg: "JSON decode error", type: "json_invalid" }], code: "invalid_argument" });
    }
    const code = fe.statusCode === 413 ? "resource_exhausted" : "invalid_argument";
    return reply.code(fe.statusCode).send({ detail: fe.message, code });
  }
  const err = toConnectError(e);
  if (err.code === Code.Internal || err.code === Code.Unknown) reply.request.log.error({ err: e }, "request failed");
  else if (err.code === Code.Unavailable) reply.request.log.warn({ err: err.cause ?? e }, "backing service unavailable");
  const status = httpStatusOf(err.code);
  // Not `instanceof ValidationError`: ConnectError's static Symbol.hasInstance
  // (inherited by subclasses) says true for every ConnectError.
  const violations = (err as Partial<ValidationError>).violations;
  if (Array.isArray(violations)) return reply.code(status).send({ detail: violations, code: "invalid_argument" });
  if (err.code === Code.NotFound && /^task /.test(err.rawMessage)) return reply.code(404).send({ detail: "Task not found", code: "not_found" });
  const code = Code[err.code].replace(/[A-Z]/g, (c, i: number) => (i ? "_" : "") + c.toLowerCase());
  return reply.code(status).send({ detail: err.rawMessage, code });
}

function parseQuery<T>(schema: z.ZodType<T>, query: unknown): T {
  const parsed = schema.safeParse(query);
  if (!parsed.success) throw new ValidationError(violationsOf(parsed.error, "query", query));
  return parsed.data;
}

/** The legacy JSON REST contract (DESIGN.md §4). Translation only. */
export function restRoutes(app: FastifyInstance, services: AppServices, version: string): void {
  app.setNotFoundHandler((_req, reply) => reply.code(404).send({ detail: "Not Found", code: "not_found" }));

  app.get("/health", async (_req, reply) => {
    const report = await services.metrics.health();
    return reply
      .code(report.healthy ? 200 : 503)
      .send({ status: report.healthy ? "healthy" : "unhealthy", components: report.components, version });
  });

  app.post("/tasks", async (req, reply) => {
    const key = req.headers["idempotency-key"];
    if (Array.isArray(key)) throw new ValidationError([{ loc: ["header", "idempotency-key"], msg: "must be sent once", type: "value_error" }]);
    const body = req.body;
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
      throw new ValidationError([{ loc: ["body"], msg: "Input should be a valid dictionary", type: "dict_type" }]);
    }
    const b = body as Record<string, unknown>;
    const task = await services.tasks.create(
      {
        taskType: b.task_type,
        description: b.description,
        priority: b.priority,
        metadata: b.metadata,
        maxAttempts: b.max_attempts,
        timeoutMs: b.timeout_ms,
        idempotencyKey: key,
      },
      requestContext(req),
    );
    return reply.code(201).send({
      task_id: task.taskId,
      status: task.status,
      message: "Task queued successfully",
      queued_at: task.createdAt.toISOString(),
    });
  });

  app.post<{ Params: { task_id: string } }>("/tasks/:task_id/retry", async (req) =>
    taskToJson(await services.tasks.retry(req.params.task_id, requestContext(req))),
  );

  app.get<{ Params: { task_id: string } }>("/tasks/:task_id", async (req) => taskToJson(await services.tasks.get(req.params.task_id)));

  app.get("/tasks", async (req) => {
    const q = parseQuery(ListQuery, req.query);
    const page = await services.tasks.list({ status: q.status, taskType: q.task_type, pageSize: q.limit });
    return page.tasks.map(taskToJson);
  });

  app.get("/agents", async (req) => {
    const q = parseQuery(AgentsQuery, req.query);
    return (await services.agents.list(q.include_disconnected === "true")).map(agentToJson);
  });

  app.get("/metrics", async () => metricsToJson(await services.metrics.snapshot()));
}
