import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus } from "../../../gen/grpc/health/v1/health_pb.js";

/** The standard health service plus the handles the composition root uses to drive it. */
export interface HealthService {
  /** The `grpc.health.v1.Health` implementation to register on the Connect router. */
  readonly impl: ServiceImpl<typeof Health>;
  /**
   * Sets the status of `service` ("" is the server as a whole) and tells every watcher of it.
   * Ignored after {@link HealthService.shutdown}, so a late component can't report SERVING
   * on a server that is going away.
   */
  setStatus(service: string, status: HealthCheckResponse_ServingStatus): void;
  /**
   * Marks every service NOT_SERVING, delivers that to the watchers, then ends their streams.
   * Called first on SIGTERM so load balancers drain before the listener closes. Safe to call twice.
   */
  shutdown(): void;
}

/** Called when a service's status changes, or with `undefined` when the service shuts down. */
type Watcher = (service: string | undefined) => void;

/**
 * Creates the `grpc.health.v1.Health` service (Check, List, Watch) as the gRPC health checking
 * protocol specifies. The overall server ("") starts SERVING, as in grpc-go; other services are
 * unknown until {@link HealthService.setStatus} names them.
 */
export function createHealthService(): HealthService {
  const statuses = new Map<string, HealthCheckResponse_ServingStatus>([
    ["", HealthCheckResponse_ServingStatus.SERVING],
  ]);
  const watchers = new Set<Watcher>();
  let shutDown = false;

  const notify = (service: string | undefined): void => {
    for (const watcher of watchers) watcher(service);
  };

  const impl: ServiceImpl<typeof Health> = {
    check(request) {
      const status = statuses.get(request.service);
      if (status === undefined) {
        throw new ConnectError(`unknown service "${request.service}"`, Code.NotFound);
      }
      return { status };
    },

    list() {
      return {
        statuses: Object.fromEntries([...statuses].map(([name, status]) => [name, { status }])),
      };
    },

    async *watch(request, ctx) {
      const current = () =>
        statuses.get(request.service) ?? HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN;
      // One pending wake-up per watcher instead of a queue: a client only needs the latest
      // status, so changes that arrive while it reads slowly are coalesced (as grpc-go does)
      // and memory stays bounded however often a status flaps.
      let wake: (() => void) | undefined;
      const onChange: Watcher = (service) => {
        if (service === undefined || service === request.service) wake?.();
      };
      const onAbort = () => wake?.();
      watchers.add(onChange);
      ctx.signal.addEventListener("abort", onAbort);
      try {
        let sent = current();
        yield { status: sent };
        while (!shutDown && !ctx.signal.aborted) {
          const changed = new Promise<void>((resolve) => (wake = resolve));
          // Re-check after arming: a change between the yield and here must not be missed.
          if (current() === sent) await changed;
          wake = undefined;
          if (ctx.signal.aborted) break;
          if (current() !== sent) {
            sent = current();
            yield { status: sent };
          }
        }
      } finally {
        watchers.delete(onChange);
        ctx.signal.removeEventListener("abort", onAbort);
      }
    },
  };

  return {
    impl,
    setStatus(service, status) {
      if (shutDown || statuses.get(service) === status) return;
      statuses.set(service, status);
      notify(service);
    },
    shutdown() {
      if (shutDown) return;
      for (const service of statuses.keys()) {
        statuses.set(service, HealthCheckResponse_ServingStatus.NOT_SERVING);
      }
      shutDown = true;
      // Watchers wake, send NOT_SERVING (their status changed) and then see shutDown and end.
      notify(undefined);
    },
  };
}
