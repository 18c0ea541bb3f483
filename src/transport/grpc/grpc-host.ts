import { EventEmitter, once } from "node:events";
import type http2 from "node:http2";
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, isMessage, toBinary, type DescMessage, type DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError, createHandlerContext, type ContextValues, type HandlerContext } from "@connectrpc/connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { CORRELATION_HEADER, correlationIdFrom } from "../../telemetry/correlation.js";
import type { RpcService } from "../connect/routes.js";

export interface GrpcHostOptions {
  services: RpcService[];
  /** The same mapping Connect's interceptor applies: every error leaves in our vocabulary. */
  mapError(e: unknown): ConnectError;
  contextValues(correlationId: string): ContextValues;
  maxMessageBytes: number;
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

/** A call ended without a client cancel: no DOMException (and stack capture) per call. */
const CALL_ENDED = new ConnectError("call ended", Code.Canceled);

export function createGrpcHost(options: GrpcHostOptions): GrpcHost {
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
      return type === "application/grpc" || type === "application/grpc+proto" || /^application\/grpc(\+proto)?;/.test(type);
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

function headersOf(metadata: grpc.Metadata): Headers {
  const headers = new Headers();
  for (const [key, value] of Object.entries(metadata.getMap())) headers.append(key, typeof value === "string" ? value : value.toString("base64"));
  return headers;
}

function metadataOf(headers: Headers, into = new grpc.Metadata()): grpc.Metadata {
  headers.forEach((value, key) => {
    if (key === "grpc-status" || key === "grpc-message") return;
    if (key.endsWith("-bin")) into.add(key, Buffer.from(value, "base64"));
    else into.add(key, value);
  });
  return into;
}

type AnyCall = grpc.ServerUnaryCall<Buffer, Uint8Array> | grpc.ServerWritableStream<Buffer, Uint8Array> | grpc.ServerDuplexStream<Buffer, Uint8Array>;
type StreamCall = grpc.ServerWritableStream<Buffer, Uint8Array> | grpc.ServerDuplexStream<Buffer, Uint8Array>;

function handlerFor(method: DescMethod, impl: Impl, options: GrpcHostOptions) {
  const begin = (call: AnyCall) => {
    const correlationId = correlationIdFrom(call.metadata.get(CORRELATION_HEADER)[0]?.toString());
    const ctx = createHandlerContext({
      service: method.parent,
      method,
      protocolName: "grpc",
      requestMethod: "POST",
      url: call.getPath(),
      requestHeader: headersOf(call.metadata),
      contextValues: options.contextValues(correlationId),
    });
    (call as EventEmitter).once("cancelled", () => ctx.abort(new ConnectError("the client cancelled the call", Code.Canceled)));
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
      if (ctx.signal.aborted) return; // the client is gone: nobody to tell
      sendHead();
      // grpc-js's way to end a stream with a status.
      call.emit("error", statusOf(e));
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
            callback(statusOf(e));
          } finally {
            ctx.abort(CALL_ENDED);
          }
        })();
      };
    case "server_streaming":
      return (call: grpc.ServerWritableStream<Buffer, Uint8Array>) =>
        void stream(call, (ctx) => impl(decode(method.input, call.request), ctx) as AsyncIterable<unknown>);
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
        });
    default:
      throw new Error(`${method.parent.typeName}.${method.name}: client streaming is not served by the gRPC host`);
  }
}
