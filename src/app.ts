import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from "fastify";
import fastifyWebsocket from "@fastify/websocket";
import { fastifyConnectPlugin } from "@connectrpc/connect-fastify";
import { createContextValues } from "@connectrpc/connect";
import { file_aaos_v1_task_service } from "../gen/aaos/v1/task_service_pb.js";
import { file_aaos_v1_agent_service } from "../gen/aaos/v1/agent_service_pb.js";
import { file_aaos_v1_metrics_service } from "../gen/aaos/v1/metrics_service_pb.js";
import { file_grpc_health_v1_health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import type { Config } from "./config/config.js";
import type { Logger } from "./telemetry/logger.js";
import { CORRELATION_HEADER, correlationIdFrom } from "./telemetry/correlation.js";
import type { Persistence } from "./persistence/orm.js";
import type { PriorityQueue } from "./queue/priority-queue.js";
import { Reconciler } from "./queue/reconciler.js";
import { Sweeper } from "./agents/sweeper.js";
import { backoffMs, type RetryPolicy } from "./tasks/retry-policy.js";
import { createTaskValidator } from "./tasks/task-validation.js";
import { createAgentMessageParser } from "./agents/agent-messages.js";
import { createLocalTaskEvents, type TaskEvents } from "./tasks/task-events.js";
import { createTaskService } from "./tasks/task-service.js";
import { AgentSession, SERVER_SHUTDOWN } from "./agents/agent-session.js";
import { Dispatcher } from "./agents/dispatcher.js";
import { createAgentService } from "./agents/agent-service.js";
import { LatencyWindow } from "./metrics/latency-window.js";
import { createMetricsService } from "./metrics/metrics-service.js";
import { createSinglePortServer, type SinglePortServer } from "./transport/single-port.js";
import { dropUnusableDeadline } from "./transport/deadlines.js";
import { connectRoutes, errorInterceptor, handlerErrorMapper, requestContextKey, rpcServices, undecodableConnectGet } from "./transport/connect/routes.js";
import { createGrpcHost } from "./transport/grpc/grpc-host.js";
import { createHealthService } from "./transport/connect/health-service.js";
import { restRoutes, sendError } from "./transport/rest/routes.js";
import { wsRoute } from "./transport/ws/ws-route.js";
import type { AppServices } from "./transport/services.js";

export interface AppDeps {
  config: Config;
  log: Logger;
  /** Owned by the app from here on: closed when the app closes. */
  persistence: Persistence;
  /** Owned by the app from here on: closed when the app closes. */
  queue: PriorityQueue;
  /** Fan-out of task changes; shared through Redis when instances share work. Default: this process only. Owned by the app. */
  events?: TaskEvents;
  version: string;
  /** True when this instance is the only one (in-process queue): it may reclaim every orphaned lease at start. */
  singleInstance: boolean;
  clock?: () => Date;
}

export interface App {
  fastify: FastifyInstance;
  services: AppServices;
  dispatcher: Dispatcher;
  /**
   * Graceful shutdown: refuses new work, asks agents to drain and waits up to
   * SHUTDOWN_GRACE_MS for their results, hands back what is still held, then
   * closes connections and backends. Safe to call twice.
   */
  close(): Promise<void>;
}

/** Waits for `work` up to `ms`; true if it settled (either way) in time. */
async function settleWithin(ms: number, work: Promise<unknown>): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([work.then(() => true, () => true), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A single instance takes back leases held by agents of its previous life at
 * once, since none of them can be connected any more. Like an expired lease,
 * each counts as a failed attempt: a task that keeps killing the process must
 * not be retried forever.
 */
async function takeBackOrphans(deps: AppDeps, clock: () => Date, retry: RetryPolicy): Promise<void> {
  const { persistence } = deps;
  const now = clock();
  await persistence.agents.markAllDisconnected(now);
  for (const t of await persistence.tasks.listAssigned()) {
    const retryAt = new Date(now.getTime() + backoffMs(t.failedAttempts + 1, retry));
    await persistence.tasks.retryOrFail(t.taskId, t.agentId ?? "", t.attempt, "orchestrator restarted while the task was running", now, retryAt);
  }
}

/**
 * Resolves when no session holds a task any more, re-checking whenever a
 * slot is freed; or after `ms`.
 */
function heldTasksDrained(dispatcher: Dispatcher, ms: number): Promise<boolean> {
  // A slot still reserved may yet be filled by a hand-off committing now.
  const idle = () => dispatcher.list().every((s) => s.held.size === 0 && s.reserved === 0);
  if (idle()) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      stop();
      resolve(false);
    }, ms);
    const stop = dispatcher.onSlotFreed(() => {
      if (!idle()) return;
      clearTimeout(timer);
      stop();
      resolve(true);
    });
  });
}

/**
 * Builds the whole service on one Fastify instance without listening, so
 * tests run exactly what `main` runs on port 0.
 */
export async function buildApp(deps: AppDeps): Promise<App> {
  const { config, log, persistence, queue } = deps;
  const clock = deps.clock ?? (() => new Date());
  const retry: RetryPolicy = { baseMs: config.retryBaseMs, maxMs: config.retryMaxMs };
  if (deps.singleInstance) await takeBackOrphans(deps, clock, retry);
  // The database is the source of truth: the queue is rebuilt from it now,
  // and again whenever it may have lost entries.
  const reconciler = new Reconciler({ tasks: persistence.tasks, queue, log, clock, checkIntervalMs: config.reconcileIntervalMs });
  await reconciler.run("start-up");
  reconciler.start();

  const events = deps.events ?? createLocalTaskEvents();
  const latency = new LatencyWindow();
  const repairQueue = (reason: string) => reconciler.repairSoon(reason);
  const dispatcher = new Dispatcher({ tasks: persistence.tasks, queue, events, log, clock, latency, leaseTtlMs: config.leaseTtlMs, repairQueue });
  const sweeper = new Sweeper({ tasks: persistence.tasks, agents: persistence.agents, queue, events, dispatcher, log, clock, intervalMs: config.sweepIntervalMs, leaseTtlMs: config.leaseTtlMs, retry, retentionMs: config.taskRetentionMs, databaseTime: persistence.databaseTime });
  sweeper.start();
  // Cleared when shutdown begins: new tasks and agents are refused so they
  // go to an instance that will still be there.
  let accepting = true;
  const sessionDeps = {
    tasks: persistence.tasks,
    agents: persistence.agents,
    queue,
    events,
    log,
    clock,
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    heartbeatTimeoutMs: config.heartbeatTimeoutMs,
    parse: createAgentMessageParser(config.limits),
    retry,
    taskTimeoutMs: config.taskTimeoutMs,
    accepting: () => accepting,
    repairQueue,
    registry: dispatcher,
  };
  // Other instances mark their agents as seen every third of a lease.
  const agentService = createAgentService({
    agents: persistence.agents,
    tasks: persistence.tasks,
    dispatcher,
    presenceWindowMs: config.leaseTtlMs + config.sweepIntervalMs,
    clock,
  });
  const services: AppServices = {
    tasks: createTaskService({
      tasks: persistence.tasks,
      queue,
      events,
      clock,
      validate: createTaskValidator(config.limits),
      idempotencyTtlMs: config.idempotencyTtlMs,
      accepting: () => accepting,
      repairQueue,
      reserveAgent: (taskType) => dispatcher.reserve(taskType),
    }),
    agents: agentService,
    metrics: createMetricsService({
      tasks: persistence.tasks,
      queue,
      agents: agentService,
      latency,
      pingDatabase: () => persistence.ping(),
      repairQueue,
      clock,
      startedAt: clock(),
    }),
    openSession: (transport, outlet, correlationId) => new AgentSession(sessionDeps, transport, outlet, correlationId),
  };
  const health = createHealthService();
  // Fired first thing on close, so open watches end at once instead of
  // holding shutdown for the whole grace period.
  const shutdown = new AbortController();

  const rpc = rpcServices({
    services,
    log,
    health,
    shutdown: shutdown.signal,
    reflectionFiles: [file_aaos_v1_task_service, file_aaos_v1_agent_service, file_aaos_v1_metrics_service, file_grpc_health_v1_health],
  });
  const grpc = createGrpcHost({
    services: rpc,
    mapError: handlerErrorMapper(log),
    contextValues: (correlationId) => createContextValues().set(requestContextKey, { correlationId, log: log.child({ correlation_id: correlationId }) }),
    maxMessageBytes: config.maxMessageBytes,
    log,
  });

  // RPCs whose request is a stream of messages for as long as the call lasts: no deadline on their body.
  const streamingRequests = new Set(
    rpc.flatMap(({ service }) => service.methods.filter((m) => m.methodKind === "client_streaming" || m.methodKind === "bidi_streaming").map((m) => `/${service.typeName}/${m.name}`)),
  );
  let ports: SinglePortServer | undefined;
  const fastify = Fastify({
    loggerInstance: log as FastifyBaseLogger,
    // Request-scoped log lines carry the correlation ID under one name; the
    // per-request access lines are left out (the domain logs what happened).
    logController: new LogController({ disableRequestLogging: true, requestIdLogLabel: "correlation_id" }),
    genReqId: (req) => correlationIdFrom(req.headers[CORRELATION_HEADER]),
    bodyLimit: config.maxMessageBytes,
    // Router-level refusals (over-long ids, malformed URLs) in our error shape too.
    frameworkErrors: (e, _req, reply) => void sendError(reply, e),
    serverFactory: (handler) => {
      ports = createSinglePortServer(handler, {
        sniffTimeoutMs: config.sniffTimeoutMs,
        http2IdleTimeoutMs: config.http2IdleTimeoutMs,
        http2BodyTimeoutMs: config.http2BodyTimeoutMs,
        streamingRequests,
        log,
        grpc,
      });
      return ports.server as unknown as ReturnType<typeof import("node:http").createServer>;
    },
  });
  // Before any route is registered: a plugin's routes keep the error handler
  // of the moment they were added, and Fastify's own refusals on the RPC
  // paths (an unsupported media type, a body over the limit) should answer
  // in the same shape as everywhere else.
  fastify.setErrorHandler((e, _req, reply) => sendError(reply, e));
  // Echo the correlation ID on every response, whatever the protocol.
  fastify.addHook("onRequest", async (req, reply) => {
    reply.raw.setHeader(CORRELATION_HEADER, String(req.id));
    // HTTP/2 streams had this done when they were routed (single-port.ts).
    if (req.raw.httpVersionMajor === 1) dropUnusableDeadline(req.raw.headers);
    const refused = undecodableConnectGet(req.method, req.routeOptions.url, req.query);
    if (refused) return reply.code(refused.status).header("content-type", "application/json").send(refused.body);
  });

  let forceTimer: NodeJS.Timeout | undefined;
  /** Idempotent: refuse new tasks and agents, stop dispatching and the background loops. */
  const stopTakingWork = () => {
    accepting = false;
    health.shutdown();
    shutdown.abort();
    reconciler.close();
    dispatcher.close();
  };
  /**
   * Graceful shutdown, before the HTTP layer closes: agents are asked to
   * drain and given the grace period to report what they hold; what is
   * still held then is handed back to the queue (not counted as a failure).
   * Kept outside Fastify's close hooks, which have their own time limit.
   */
  const drain = async () => {
    stopTakingWork();
    const sessions = dispatcher.list();
    for (const s of sessions) s.drain(config.shutdownGraceMs);
    if (!(await heldTasksDrained(dispatcher, config.shutdownGraceMs))) log.info("grace period over; handing back the tasks still held");
    void sweeper.close();
    const ended = await settleWithin(config.shutdownGraceMs, Promise.all(sessions.map((s) => s.close(SERVER_SHUTDOWN))));
    if (!ended) log.warn("agent sessions did not finish closing in time; their leases stay until they expire");
  };
  // Registered before the WebSocket plugin, whose own preClose would close
  // sockets without a status code: ours ends sessions first (1001, leases
  // released while the database is still open).
  fastify.addHook("preClose", async () => {
    // Armed first: whatever below waits on a slow backend, connections are
    // cut when the grace period ends, so close() always finishes.
    forceTimer = setTimeout(() => ports?.destroyAll(), config.shutdownGraceMs);
    forceTimer.unref();
    stopTakingWork();
    // Normally already done by drain(); kept here for a bare fastify.close().
    const ended = await settleWithin(config.shutdownGraceMs, Promise.all(dispatcher.list().map((s) => s.close(SERVER_SHUTDOWN))));
    if (!ended) log.warn("agent sessions did not finish closing in time; their leases stay until they expire");
    ports?.drain();
  });
  await fastify.register(fastifyWebsocket, {
    options: { maxPayload: config.maxMessageBytes },
    // Socket errors are the client's doing (an oversize or malformed frame,
    // an unclean disconnect): ws has already sent the close code; log calmly.
    errorHandler: (error, socket, request) => {
      request.log.info({ err: error }, "agent socket closed on a client error");
      socket.terminate();
    },
  });
  await fastify.register(fastifyConnectPlugin, {
    routes: connectRoutes(rpc),
    interceptors: [errorInterceptor(log)],
    readMaxBytes: config.maxMessageBytes,
    shutdownTimeoutMs: config.shutdownGraceMs,
    contextValues: (req) =>
      createContextValues().set(requestContextKey, { correlationId: String(req.id), log: req.log }),
  });
  restRoutes(fastify, services, deps.version);
  wsRoute(fastify, services);

  fastify.addHook("onClose", async () => {
    clearTimeout(forceTimer);
    // Before the database closes under it.
    if (!(await settleWithin(config.shutdownGraceMs, sweeper.close()))) log.warn("the sweeper did not finish its step under way in time");
    // A backend that stopped answering must not keep the process from exiting.
    if (!(await settleWithin(config.shutdownGraceMs, Promise.all([queue.close(), events.close()])))) log.warn("queue did not close in time");
    if (!(await settleWithin(config.shutdownGraceMs, persistence.close()))) log.warn("database did not close in time");
  });

  health.setStatus("", HealthCheckResponse_ServingStatus.SERVING);
  let closing: Promise<void> | undefined;
  return {
    fastify,
    services,
    dispatcher,
    close: () =>
      (closing ??= (async () => {
        await drain();
        await fastify.close();
      })()),
  };
}
