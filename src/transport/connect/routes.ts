import { Code, ConnectError, createContextKey, type ConnectRouter, type HandlerContext, type Interceptor, type ServiceImpl } from "@connectrpc/connect";
import { TaskService } from "../../../gen/aaos/v1/task_service_pb.js";
import { AgentService } from "../../../gen/aaos/v1/agent_service_pb.js";
import { MetricsService } from "../../../gen/aaos/v1/metrics_service_pb.js";
import { Health } from "../../../gen/grpc/health/v1/health_pb.js";
import { ServerReflection as ReflectionV1 } from "../../../gen/grpc/reflection/v1/reflection_pb.js";
import { ServerReflection as ReflectionV1alpha } from "../../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import type { DescFile, DescService } from "@bufbuild/protobuf";
import type { Logger } from "../../telemetry/logger.js";
import type { RequestContext } from "../../tasks/task-service.js";
import { isTerminal } from "../../tasks/task-state.js";
import type { TaskStatus } from "../../tasks/task-types.js";
import { invalidArgument, isUnexpected, toConnectError, unimplemented } from "../../errors/errors.js";
import type { AppServices } from "../services.js";
import { Channel } from "../channel.js";
import { agentToPb, metricsToPb, taskStatusFromPb, taskToPb, taskTypeFilterFromPb, taskTypeFromPb, unknownTaskTypeMessage } from "./mappers.js";
import { decodeSessionRequest, encodeSessionResponse } from "./session-codec.js";
import { createHealthService } from "./health-service.js";
import { createReflectionServices } from "./reflection-service.js";

/** Correlation ID and request logger, put in place by the HTTP layer. */
export const requestContextKey = createContextKey<RequestContext | undefined>(undefined, { description: "aaos request context" });

function requestContext(ctx: HandlerContext, fallback: Logger): RequestContext {
  return ctx.values.get(requestContextKey) ?? { correlationId: "", log: fallback, signal: ctx.signal };
}

/**
 * Maps every error leaving a handler to the shared vocabulary: infrastructure
 * failures become UNAVAILABLE, and anything unexpected INTERNAL with its cause
 * logged, never sent. Used by Connect's interceptor and by the gRPC host.
 */
export function handlerErrorMapper(log: Logger): (e: unknown) => ConnectError {
  return (e) => {
    const err = toConnectError(e);
    // Other ConnectErrors were raised on purpose (by us, or by the protocol
    // layer for bytes that do not decode); only these are our defects or faults.
    if (isUnexpected(err)) log.error({ err: err.cause ?? e }, "request failed");
    else if (err.code === Code.Internal) log.info({ err: e }, "request refused by the protocol layer");
    return err;
  };
}

/** `handlerErrorMapper` as a Connect interceptor; covers streams that fail mid-way too. */
export function errorInterceptor(log: Logger): Interceptor {
  const map = handlerErrorMapper(log);
  return (next) => async (req) => {
    try {
      const res = await next(req);
      if (!res.stream) return res;
      const source = res.message;
      return {
        ...res,
        message: (async function* () {
          try {
            yield* source;
          } catch (e: unknown) {
            throw map(e);
          }
        })(),
      };
    } catch (e: unknown) {
      throw map(e);
    }
  };
}

/** Files served by gRPC reflection, so tools work without our proto files. */
export interface ConnectRoutesOptions {
  services: AppServices;
  log: Logger;
  reflectionFiles: DescFile[];
  health: ReturnType<typeof createHealthService>;
  /**
   * Aborted when the server starts to stop: open WatchTask streams then end
   * at once with UNAVAILABLE (watch again elsewhere) instead of holding the
   * shutdown for the whole grace period.
   */
  shutdown?: AbortSignal;
}

/** A service and its handlers, served by Connect and, for the gRPC protocol, by the gRPC host. */
export interface RpcService {
  service: DescService;
  impl: object;
}

const rpc = <T extends DescService>(service: T, impl: Partial<ServiceImpl<T>>): RpcService => ({ service, impl });

/** Every RPC service with its handlers. Handlers only translate. */
export function rpcServices({ services, log, reflectionFiles, health, shutdown }: ConnectRoutesOptions): RpcService[] {
  const reflection = createReflectionServices(reflectionFiles);
  return [
    rpc(TaskService, {
      async createTask(req, ctx) {
        if (req.webhookUrl) throw unimplemented("webhook_url is not supported yet");
        const taskType = taskTypeFromPb(req.taskType);
        if (taskType === null) throw invalidArgument(["body", "task_type"], unknownTaskTypeMessage(req.taskType), "enum");
        const task = await services.tasks.create(
          {
            taskType,
            description: req.description,
            priority: req.priority,
            metadata: req.metadata,
            maxAttempts: req.maxAttempts,
            timeoutMs: req.timeoutMs,
            idempotencyKey: req.idempotencyKey,
          },
          requestContext(ctx, log),
        );
        return { task: taskToPb(task) };
      },
      async retryTask(req, ctx) {
        return { task: taskToPb(await services.tasks.retry(req.taskId, requestContext(ctx, log))) };
      },
      async getTask(req) {
        return { task: taskToPb(await services.tasks.get(req.taskId)) };
      },
      async listTasks(req) {
        const status = taskStatusFromPb(req.status);
        const taskType = taskTypeFilterFromPb(req.taskType);
        if (status === null) throw invalidArgument(["status"], `unknown status value ${req.status}`);
        if (taskType === null) throw invalidArgument(["task_type"], unknownTaskTypeMessage(req.taskType), "enum");
        if (req.pageSize < 0) throw invalidArgument(["page_size"], "must not be negative");
        const page = await services.tasks.list({ status, taskType, pageSize: req.pageSize, pageToken: req.pageToken || undefined });
        return { tasks: page.tasks.map(taskToPb), nextPageToken: page.nextPageToken };
      },
      async cancelTask(req, ctx) {
        return { task: taskToPb(await services.tasks.cancel(req.taskId, requestContext(ctx, log))) };
      },
      async *watchTask(req, ctx) {
        const signal = shutdown ? AbortSignal.any([ctx.signal, shutdown]) : ctx.signal;
        let last: TaskStatus | undefined;
        for await (const task of services.tasks.watch(req.taskId, signal)) {
          last = task.status;
          yield { task: taskToPb(task) };
        }
        if (shutdown?.aborted && !ctx.signal.aborted && last && !isTerminal(last)) {
          throw new ConnectError("server shutting down; watch the task again", Code.Unavailable);
        }
        // Stopped by the deadline (or a cancel nobody hears): say so, rather than end as if the task were done.
        if (ctx.signal.aborted && last && !isTerminal(last)) throw ConnectError.from(ctx.signal.reason);
      },
    }),

    rpc(AgentService, {
      async *session(requests, ctx) {
        const rc = requestContext(ctx, log);
        const out = new Channel<ReturnType<typeof encodeSessionResponse>>();
        const session = services.openSession("grpc", { send: (m) => out.push(encodeSessionResponse(m)), end: () => out.end() }, rc.correlationId);
        const onAbort = () => void session.close("stream aborted");
        ctx.signal.addEventListener("abort", onAbort);
        // A request stream that breaks (e.g. an undecodable message) ends the
        // response with that error rather than a clean OK.
        let broken: unknown;
        void (async () => {
          try {
            for await (const req of requests) {
              const decoded = decodeSessionRequest(req);
              if (decoded.ok) await session.receive(decoded.message);
              else session.reject(decoded.reason);
            }
            await session.close("agent ended the stream");
          } catch (e: unknown) {
            rc.log.info({ err: e }, "agent stream broke");
            broken = e;
            await session.close("stream broke");
          } finally {
            ctx.signal.removeEventListener("abort", onAbort);
          }
        })();
        yield* out;
        if (broken !== undefined && !ctx.signal.aborted) throw broken;
      },
      async listAgents(req) {
        return { agents: (await services.agents.list(req.includeDisconnected)).map(agentToPb) };
      },
    }),

    rpc(MetricsService, {
      async getMetrics() {
        return metricsToPb(await services.metrics.snapshot());
      },
    }),
    rpc(Health, health.impl),
    rpc(ReflectionV1, reflection.v1),
    rpc(ReflectionV1alpha, reflection.v1alpha),
  ];
}

/** An RPC's path, `/<package>.<Service>/<Method>`, as Connect serves it. */
const RPC_PATH = /^\/[\w.]+\.\w+\/\w+$/;
/** Both base64 alphabets, as Connect's decoder takes them, with optional padding. */
const BASE64 = /^[A-Za-z0-9+/_-]*={0,2}$/;

/**
 * A Connect GET (an RPC with no side effects, its message in the query)
 * whose `message` is not base64 although `base64=1` says it is. connect-es
 * decodes it before any interceptor runs and answers the failure as INTERNAL
 * (HTTP 500) without a trace; it is the client's fault, so it is answered
 * first, as INVALID_ARGUMENT in Connect's error shape.
 */
export function undecodableConnectGet(method: string, routePath: string | undefined, query: unknown): { status: number; body: { code: string; message: string } } | undefined {
  if (method !== "GET" || !routePath || !RPC_PATH.test(routePath)) return undefined;
  const { base64, message } = query as Record<string, unknown>;
  if (base64 !== "1" || typeof message !== "string" || BASE64.test(message)) return undefined;
  return { status: 400, body: { code: "invalid_argument", message: "the message query parameter is not base64" } };
}

/** Registers every RPC service on a Connect router. */
export function connectRoutes(list: RpcService[]) {
  return (router: ConnectRouter) => {
    for (const { service, impl } of list) router.service(service, impl as Partial<ServiceImpl<typeof service>>);
  };
}
