/**
 * The cost of the gRPC server library alone: a unary call to a handler that
 * does nothing (grpc.health.v1 Health/Check), served by Connect (connect-node,
 * as our service serves Connect and gRPC-Web) and by grpc-js (as it serves
 * gRPC), each in a child process of its own, called by the same grpc-js client. It prints the server's CPU per call,
 * the floor under what any service built on that library pays per request.
 */
import { fork, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import http2 from "node:http2";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";

const HERE = fileURLToPath(import.meta.url);
const PROTO = path.resolve(path.dirname(HERE), "../../proto/grpc/health/v1/health.proto");
type HealthClient = grpc.Client & { Check(req: object, cb: (e: grpc.ServiceError | null) => void): void };
const healthCtor = () =>
  (grpc.loadPackageDefinition(protoLoader.loadSync(PROTO)) as unknown as { grpc: { health: { v1: { Health: grpc.ServiceClientConstructor } } } }).grpc.health.v1.Health;

export const FLOOR_SERVERS = ["connect", "grpc-js"] as const;
export type FloorServer = (typeof FLOOR_SERVERS)[number];

async function serve(kind: FloorServer): Promise<number> {
  if (kind === "connect") {
    const handler = connectNodeAdapter({
      routes: (r) => r.service(Health, { check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }), async *watch() {}, list: () => ({}) }),
    });
    const server = http2.createServer({}, handler);
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    return (server.address() as { port: number }).port;
  }
  const server = new grpc.Server();
  server.addService(healthCtor().service, { Check: (_call: unknown, cb: (e: null, r: object) => void) => cb(null, { status: 1 }) });
  return new Promise((resolve, reject) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, port) => (e ? reject(e) : resolve(port))));
}

export interface FloorResult {
  server: FloorServer;
  calls: number;
  cpuUsPerCall: number;
  callsPerSecond: number;
}

/** Runs `calls` Health/Check calls, `inFlight` at a time, against a fresh child server of each kind. */
export async function transportFloor(calls: number, inFlight: number): Promise<FloorResult[]> {
  const results: FloorResult[] = [];
  for (const kind of FLOOR_SERVERS) {
    const child: ChildProcess = fork(HERE, ["serve", kind], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
    try {
      const [{ port }] = (await once(child, "message")) as [{ port: number }];
      const client = new (healthCtor())(`127.0.0.1:${port}`, grpc.credentials.createInsecure()) as unknown as HealthClient;
      const call = () => new Promise<void>((resolve, reject) => client.Check({ service: "" }, (e) => (e ? reject(e) : resolve())));
      const cpu = async (): Promise<number> => {
        child.send("cpu");
        const [u] = (await once(child, "message")) as [NodeJS.CpuUsage];
        return u.user + u.system;
      };
      const run = async (n: number) => {
        let next = 0;
        await Promise.all(Array.from({ length: inFlight }, async () => {
          while (next++ < n) await call();
        }));
      };
      await run(Math.min(2000, calls));
      const before = await cpu();
      const started = performance.now();
      await run(calls);
      const seconds = (performance.now() - started) / 1000;
      results.push({ server: kind, calls, cpuUsPerCall: ((await cpu()) - before) / calls, callsPerSecond: calls / seconds });
      client.close();
    } finally {
      child.kill();
    }
  }
  return results;
}

if (process.argv[2] === "serve") {
  const port = await serve(process.argv[3] as FloorServer);
  process.on("message", (m) => m === "cpu" && process.send!(process.cpuUsage()));
  process.send!({ port });
}
