import { EventEmitter, once } from "node:events";
import type http2 from "node:http2";
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, isMessage, toBinary, type DescMessage, type DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError, createHandlerContext, type ContextValues, type HandlerContext } from "@connectrpc/connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { CORRELATION_HEADER, correlationIdFrom } from "../../telemetry/correlation.js";
import type { Logger } from "../../telemetry/logger.js";
import type { RpcService } from "../connect/routes.js";

export interface GrpcHostOptions {
  services: RpcService[];
  /** The same mapping Connect's interceptor applies: every error leaves in our vocabulary. */
  mapError(e: unknown): ConnectError;
  contextValues(correlationId: string): ContextValues;
  maxMessageBytes: number;
  log: Logger;
}

/**
 * Serves the gRPC protocol (application/grpc, application/grpc+proto) with
 * grpc-js, stream by stream, on the HTTP/2 sessions of our single port; every
 * other protocol on the same session stays with Connect. The handlers are the
 * very Connect implementations (`RpcService`), so both paths share one
 * validation and one error vocabulary.
 *
 * Why: for the same empty call grpc-js spends about a quarter of Connect's
 * server CPU (bench `transport` section), and gRPC carries every create and
 * every agent message of our heaviest users. grpc-js only takes whole
 * connections through its public API, while one HTTP/2 session may mix
 * protocols, so its stream handler is attached to an emitter of our own
 * through `_setupHandlers`, a private method of the pinned version. `create`
 * checks it is there, and the gRPC tests exercise it.
 */
export interface GrpcHost {
  /** True for a stream this host serves. */
  accepts(headers: http2.IncomingHttpHeaders): boolean;
  serve(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): void;
}

type Impl = (req: unknown, ctx: HandlerContext) => unknown;
type Status = { code: number; details: string; metadata: grpc.Metadata };

/** Abort reasons made once: no error object (and stack capture) per call. */
const CALL_ENDED = new ConnectError("call ended", Code.Canceled);
const CLIENT_CANCELLED = new ConnectError("the client cancelled the call", Code.Canceled);

/** Codings grpc-js decodes; a request in another (e.g. br) is left to Connect, which decodes it. */
const GRPC_JS_CODINGS = new Set(["identity", "gzip", "deflate"]);
/** The spec's form; grpc-js answers a malformed value INTERNAL, Connect INVALID_ARGUMENT, so Connect gets it. */
const GRPC_TIMEOUT = /^\d{1,8}[HMSmun]$/;

export function createGrpcHost(options: GrpcHostOptions): GrpcHost {
  // grpc-js logs on its own (for instance a client header value it cannot
  // carry); those lines belong in our log, not on stderr. Process-wide, as
  // grpc-js's logger is.
  grpc.setLogger({ error: (...args: unknown[]) => options.log.info({ component: "grpc-js" }, args.map(String).join(" ")) });
  // GRPC_VERBOSITY / GRPC_TRACE, when set, still turn on grpc-js's debugging.
  if (process.env.GRPC_VERBOSITY === undefined) grpc.setLogVerbosity(grpc.logVerbosity.ERROR);
  const server = new grpc.Server({
    "grpc.max_receive_message_length": options.maxMessageBytes,
    // Channelz would track every call and session for a service we do not expose.
    "grpc.enable_channelz": 0,
  });
  const paths = new Set<string>();
  for (const { service, impl } of options.services) {
    const definition: Record<string, grpc.MethodDefinition<Buffer, Uint8Array>> = {};
    const handlers: grpc.UntypedServiceImplementation = {};
    for (const method of service.methods) {
      const fn = (impl as Record<string, Impl | undefined>)[method.localName];
      if (!fn) continue;
      const path = `/${service.typeName}/${method.name}`;
      paths.add(path);
      definition[method.localName] = {
        path,
        requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
        responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
        // Decoding happens in the handler, so an undecodable message gets the
        // same status and message as on Connect.
        requestDeserialize: (b: Buffer) => b,
        requestSerialize: (b: Buffer) => b,
        responseSerialize: (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength),
        responseDeserialize: (b: Buffer) => b,
        originalName: method.localName,
      };
      handlers[method.localName] = handlerFor(method, fn.bind(impl), options);
    }
    server.addService(definition, handlers);
  }
  const setup = (server as unknown as { _setupHandlers?: (s: unknown, interceptors: unknown[]) => void })._setupHandlers;
  if (typeof setup !== "function") throw new Error("@grpc/grpc-js no longer has Server._setupHandlers; the gRPC host needs updating for this version");
  const streams = Object.assign(new EventEmitter(), { address: () => null });
  setup.call(server, streams, []);

  return {
    accepts(headers) {
      if (headers[":method"] !== "POST" || !paths.has(headers[":path"] ?? "")) return false;
      const type = headers["content-type"] ?? "";
      if (!(type === "application/grpc" || type === "application/grpc+proto" || /^application\/grpc(\+proto)?;/.test(type))) return false;
      const coding = headers["grpc-encoding"];
      const timeout = headers["grpc-timeout"];
      return (coding === undefined || GRPC_JS_CODINGS.has(String(coding))) && (timeout === undefined || GRPC_TIMEOUT.test(String(timeout)));
    },
    serve(stream, headers) {
      streams.emit("stream", stream, headers);
    },
  };
}

function decode(schema: DescMessage, bytes: Buffer): unknown {
  try {
    return fromBinary(schema, bytes);
  } catch (e: unknown) {
    // Connect's wording, so clients and tests see one answer whichever library served the call.
    throw new ConnectError(`parse binary: ${e instanceof Error ? e.message : String(e)}`, Code.Internal);
  }
}

function encode(schema: DescMessage, res: unknown): Uint8Array {
  return toBinary(schema, isMessage(res, schema) ? res : create(schema, res as never));
}

/** Request metadata as header pairs: `createHandlerContext` makes the one `Headers` object from them. */
function headersOf(metadata: grpc.Metadata): Array<[string, string]> {
  return Object.entries(metadata.getMap()).map(([key, value]) => [key, typeof value === "string" ? value : value.toString("base64")]);
}

function metadataOf(headers: Headers, into = new grpc.Metadata()): grpc.Metadata {
  headers.forEach((value, key) => {
    if (key === "grpc-status" || key === "grpc-message") return;
    try {
      if (key.endsWith("-bin")) into.add(key, Buffer.from(value, "base64"));
      else into.add(key, value);
    } catch {
      // A value gRPC metadata cannot carry is left out rather than failing the call.
    }
  });
  return into;
}

type AnyCall = grpc.ServerUnaryCall<Buffer, Uint8Array> | grpc.ServerWritableStream<Buffer, Uint8Array> | grpc.ServerDuplexStream<Buffer, Uint8Array>;
type StreamCall = grpc.ServerWritableStream<Buffer, Uint8Array> | grpc.ServerDuplexStream<Buffer, Uint8Array>;

function handlerFor(method: DescMethod, impl: Impl, options: GrpcHostOptions) {
  const begin = (call: AnyCall) => {
    const correlationId = correlationIdFrom(call.metadata.get(CORRELATION_HEADER)[0]?.toString());
    const deadline = Number(call.getDeadline());
    const ctx = createHandlerContext({
      service: method.parent,
      method,
      protocolName: "grpc",
      requestMethod: "POST",
      url: call.getPath(),
      requestHeader: headersOf(call.metadata),
      contextValues: options.contextValues(correlationId),
      // Handlers see the deadline, and a DEADLINE_EXCEEDED abort reason, as on Connect.
      timeoutMs: Number.isFinite(deadline) ? Math.max(0, deadline - Date.now()) : undefined,
    });
    // grpc-js reports every closed stream as cancelled, finished calls too.
    (call as EventEmitter).once("cancelled", () => ctx.signal.aborted || ctx.abort(CLIENT_CANCELLED));
    let headSent = false;
    /** Response headers go out once, before the first message or the status. */
    const sendHead = () => {
      if (headSent) return;
      headSent = true;
      const head = metadataOf(ctx.responseHeader);
      head.set(CORRELATION_HEADER, correlationId);
      call.sendMetadata(head);
    };
    const statusOf = (e: unknown): Status => {
      const err = options.mapError(e);
      return { code: err.code, details: err.rawMessage, metadata: metadataOf(setTrailerStatus(new Headers(ctx.responseTrailer), err)) };
    };
    return { ctx, sendHead, statusOf };
  };

  /**
   * Writes each response with backpressure, then the status. `ended()` turns
   * true once the status is on its way; the call's context is aborted when it
   * has gone out (as Connect does), which also releases a request stream the
   * client never closed.
   */
  const stream = async (call: StreamCall, run: (ctx: HandlerContext, ended: () => boolean) => AsyncIterable<unknown>) => {
    const { ctx, sendHead, statusOf } = begin(call);
    let over = false;
    call.once("finish", () => ctx.abort(CALL_ENDED));
    try {
      for await (const res of run(ctx, () => over)) {
        sendHead();
        if (!call.write(encode(method.output, res))) await once(call, "drain", { signal: ctx.signal });
      }
      over = true;
      sendHead();
      call.end(metadataOf(ctx.responseTrailer));
    } catch (e: unknown) {
      over = true;
      if (ctx.signal.reason === CLIENT_CANCELLED) return; // nobody to tell
      sendHead();
      // grpc-js's way to end a stream with a status. A wait cut short by the
      // deadline rejects with a bare AbortError; the reason says what happened.
      call.emit("error", statusOf(ctx.signal.aborted ? ctx.signal.reason : e));
    }
  };

  switch (method.methodKind) {
    case "unary":
      return (call: grpc.ServerUnaryCall<Buffer, Uint8Array>, callback: grpc.sendUnaryData<Uint8Array>) => {
        const { ctx, sendHead, statusOf } = begin(call);
        void (async () => {
          try {
            const res = encode(method.output, await impl(decode(method.input, call.request), ctx));
            sendHead();
            callback(null, res, metadataOf(ctx.responseTrailer));
          } catch (e: unknown) {
            sendHead();
            callback(statusOf(ctx.signal.aborted ? ctx.signal.reason : e));
          } finally {
            ctx.abort(CALL_ENDED);
          }
        })().catch((e: unknown) => {
          options.log.error({ err: e }, "gRPC call failed outside its handler");
          callback({ code: grpc.status.INTERNAL, details: "internal error" });
        });
      };
    case "server_streaming":
      return (call: grpc.ServerWritableStream<Buffer, Uint8Array>) =>
        void stream(call, (ctx) => impl(decode(method.input, call.request), ctx) as AsyncIterable<unknown>).catch(lastResort(call, options.log));
    case "bidi_streaming":
      return (call: grpc.ServerDuplexStream<Buffer, Uint8Array>) =>
        void stream(call, (ctx, ended) => {
          ctx.signal.addEventListener("abort", () => call.destroy(), { once: true });
          const requests = async function* () {
            try {
              // Not destroyed when the handler stops reading: the status has yet to go out.
              for await (const bytes of call.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>) yield decode(method.input, bytes);
            } catch (e: unknown) {
              // Once the call is over its readable side is destroyed (or
              // carries the status just sent): the requests simply end.
              if (!ended() && !ctx.signal.aborted) throw e;
            }
          };
          return impl(requests(), ctx) as AsyncIterable<unknown>;
        }).catch(lastResort(call, options.log));
    default:
      throw new Error(`${method.parent.typeName}.${method.name}: client streaming is not served by the gRPC host`);
  }
}

/** For a defect in this file: logged, and the call ends INTERNAL instead of the process on an unhandled rejection. */
function lastResort(call: StreamCall, log: Logger) {
  return (e: unknown) => {
    log.error({ err: e }, "gRPC call failed outside its handler");
    call.emit("error", { code: grpc.status.INTERNAL, details: "internal error" });
  };
}
