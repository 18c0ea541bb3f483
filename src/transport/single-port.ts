import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import type { Logger } from "../telemetry/logger.js";
import { useSpecGrpcMessageEncoding } from "./connect/grpc-message.js";
import type { GrpcHost } from "./grpc/grpc-host.js";
import { dropUnusableDeadline } from "./deadlines.js";

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

export interface SinglePortServer {
  /** The listening server handed to Fastify. */
  server: net.Server;
  /** Ends idle HTTP/1.1 connections and sends GOAWAY on HTTP/2 sessions. */
  drain(): void;
  /** Destroys every remaining connection. */
  destroyAll(): void;
}

/**
 * One port for HTTP/2 cleartext (gRPC, Connect, gRPC-Web) and HTTP/1.1
 * (REST, /ws, Connect, gRPC-Web): the first bytes decide. Node's h2c server
 * has no HTTP/1.1 fallback, so we read just enough to compare with the
 * HTTP/2 connection preface, put the bytes back, and hand the socket over. A
 * client that sends nothing within `sniffTimeoutMs` is dropped, and at most
 * 24 bytes are ever buffered. An HTTP/2 connection with no stream open for
 * `http2IdleTimeoutMs` is closed (GOAWAY): a client may hold connections
 * for reuse, but not keep sockets for ever by opening them and going quiet.
 * A long-lived stream (an agent's session, a watch) keeps its connection.
 * A request whose body is not finished within `http2BodyTimeoutMs` is
 * cancelled (RST_STREAM), as Node's requestTimeout ends a slow HTTP/1.1
 * request; only the RPCs in `streamingRequests` (an agent's Session),
 * whose request lasts as long as the call, are exempt.
 *
 * On HTTP/2, each stream goes its own way: gRPC calls to `grpc` when it
 * serves them, everything else to the handler (Fastify, Connect).
 */
export function createSinglePortServer(
  handler: http.RequestListener,
  options: { sniffTimeoutMs: number; http2IdleTimeoutMs: number; http2BodyTimeoutMs: number; streamingRequests: ReadonlySet<string>; log: Logger; grpc?: GrpcHost },
): SinglePortServer {
  const h1 = http.createServer(handler);
  const h2Handler = handler as unknown as (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void;
  // Never listens: it only turns the streams it is given into Node's
  // request/response objects (the compatibility API) for the handler.
  const compat = http2.createServer({}, (req, res) => {
    useSpecGrpcMessageEncoding(res);
    h2Handler(req, res);
  });
  const h2 = http2.createServer({});
  const grpc = options.grpc;
  h2.on("stream", (stream, headers, flags, rawHeaders) => {
    dropUnusableDeadline(headers);
    const path = headers[":path"] ?? "";
    if (!options.streamingRequests.has(path)) bodyDeadline(stream, path);
    if (grpc?.accepts(headers)) grpc.serve(stream, headers);
    else compat.emit("stream", stream, headers, flags, rawHeaders);
  });
  const bodyDeadline = (stream: http2.ServerHttp2Stream, path: string) => {
    const timer = setTimeout(() => {
      // A request whose body has all arrived is left alone, however long its handler or response takes.
      if (stream.closed || stream.destroyed || stream.state.remoteClose) return;
      options.log.debug({ path }, "http/2 request body not finished in time; stream cancelled");
      stream.close(http2.constants.NGHTTP2_CANCEL);
    }, options.http2BodyTimeoutMs);
    timer.unref();
    stream.once("close", () => clearTimeout(timer));
  };
  const sockets = new Set<net.Socket>();
  const sessions = new Set<http2.Http2Session>();
  h2.on("session", (s) => {
    sessions.add(s);
    let open = 0;
    let idle: NodeJS.Timeout | undefined;
    const idleFromNow = () => {
      idle = setTimeout(() => s.close(), options.http2IdleTimeoutMs);
      idle.unref();
    };
    idleFromNow();
    s.on("stream", (stream) => {
      open++;
      clearTimeout(idle);
      stream.once("close", () => {
        if (--open === 0 && !s.closed && !s.destroyed) idleFromNow();
      });
    });
    s.once("close", () => {
      clearTimeout(idle);
      sessions.delete(s);
    });
  });
  h2.on("sessionError", (e) => options.log.debug({ err: e }, "http/2 session error"));
  h1.on("clientError", (e, socket) => {
    options.log.debug({ err: e }, "http/1.1 client error");
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
    else socket.destroy();
  });

  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => socket.destroy());
    let seen = Buffer.alloc(0);
    const timer = setTimeout(() => socket.destroy(), options.sniffTimeoutMs);
    const onData = (chunk: Buffer) => {
      seen = Buffer.concat([seen, chunk]);
      const n = Math.min(seen.length, PREFACE.length);
      const matches = seen.subarray(0, n).equals(PREFACE.subarray(0, n));
      if (matches && n < PREFACE.length) return; // need more bytes to decide
      clearTimeout(timer);
      socket.removeListener("data", onData);
      socket.pause();
      socket.unshift(seen);
      if (matches) {
        // HTTP/2 reads what is already buffered on the socket itself;
        // resuming here would drop the preface on the floor.
        h2.emit("connection", socket);
      } else {
        h1.emit("connection", socket);
        socket.resume();
      }
    };
    socket.on("data", onData);
  });
  // Node tracks HTTP/1.1 connections (for closeIdleConnections and the
  // headers/request timeouts that stop slow-loris clients) only once its
  // server emits "listening"; ours never listens itself, the TCP server does.
  server.once("listening", () => h1.emit("listening"));
  server.once("close", () => h1.close());
  // @fastify/websocket listens for upgrades on the server Fastify knows.
  h1.on("upgrade", (req, socket, head) => server.emit("upgrade", req, socket, head));

  return {
    server,
    drain() {
      h1.closeIdleConnections();
      for (const s of sessions) if (!s.closed) s.close();
    },
    destroyAll() {
      for (const s of sockets) s.destroy();
    },
  };
}
