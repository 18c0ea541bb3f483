import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it, vi } from "vitest";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import { createHealthService } from "../../src/transport/connect/health-service.js";

/** A health service behind an in-memory Connect transport, as a client would see it. */
function setup() {
  const health = createHealthService();
  const transport = createRouterTransport((router) => router.service(Health, health.impl));
  return { health, client: createClient(Health, transport) };
}

describe("health service", () => {
  it("reports the whole server as SERVING by default", async () => {
    const { client } = setup();
    expect((await client.check({ service: "" })).status).toBe(Status.SERVING);
  });

  it("answers NotFound for a service it does not know", async () => {
    const { client } = setup();
    const error = await client.check({ service: "aaos.v1.Nope" }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ConnectError);
    expect((error as ConnectError).code).toBe(Code.NotFound);
  });

  it("reports statuses that were set, and lists them all", async () => {
    const { health, client } = setup();
    health.setStatus("aaos.v1.TaskService", Status.SERVING);
    health.setStatus("aaos.v1.AgentService", Status.NOT_SERVING);

    expect((await client.check({ service: "aaos.v1.AgentService" })).status).toBe(Status.NOT_SERVING);
    const { statuses } = await client.list({});
    expect(Object.fromEntries(Object.entries(statuses).map(([name, s]) => [name, s.status]))).toEqual({
      "": Status.SERVING,
      "aaos.v1.TaskService": Status.SERVING,
      "aaos.v1.AgentService": Status.NOT_SERVING,
    });
  });

  it("streams the current status, then each change", async () => {
    const { health, client } = setup();
    const abort = new AbortController();
    const stream = client.watch({ service: "" }, { signal: abort.signal })[Symbol.asyncIterator]();

    expect((await stream.next()).value?.status).toBe(Status.SERVING);
    health.setStatus("", Status.NOT_SERVING);
    expect((await stream.next()).value?.status).toBe(Status.NOT_SERVING);
    health.setStatus("", Status.SERVING);
    expect((await stream.next()).value?.status).toBe(Status.SERVING);
    abort.abort();
  });

  it("answers SERVICE_UNKNOWN for an unknown service and keeps watching until it appears", async () => {
    const { health, client } = setup();
    const abort = new AbortController();
    const stream = client.watch({ service: "aaos.v1.TaskService" }, { signal: abort.signal })[Symbol.asyncIterator]();

    expect((await stream.next()).value?.status).toBe(Status.SERVICE_UNKNOWN);
    health.setStatus("aaos.v1.MetricsService", Status.SERVING); // another service: no message
    health.setStatus("aaos.v1.TaskService", Status.SERVING);
    expect((await stream.next()).value?.status).toBe(Status.SERVING);
    abort.abort();
  });

  it("ends the watch when the client cancels", async () => {
    const { client } = setup();
    const abort = new AbortController();
    const stream = client.watch({ service: "" }, { signal: abort.signal })[Symbol.asyncIterator]();
    await stream.next();

    const next = stream.next();
    abort.abort();
    const error = await next.catch((e: unknown) => e);
    expect(ConnectError.from(error).code).toBe(Code.Canceled);
  });

  it("on shutdown sends NOT_SERVING, ends every watch and ignores later updates", async () => {
    const { health, client } = setup();
    health.setStatus("aaos.v1.TaskService", Status.SERVING);
    const received: Status[] = [];
    const watching = (async () => {
      for await (const { status } of client.watch({ service: "aaos.v1.TaskService" })) received.push(status);
    })();
    await vi.waitFor(() => expect(received).toHaveLength(1));

    health.shutdown();
    health.shutdown(); // safe twice
    await watching; // the stream ends instead of hanging
    expect(received).toEqual([Status.SERVING, Status.NOT_SERVING]);

    health.setStatus("", Status.SERVING);
    expect((await client.check({ service: "" })).status).toBe(Status.NOT_SERVING);
  });
});
