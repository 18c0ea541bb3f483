import type http2 from "node:http2";

/**
 * Percent-encodes a `grpc-message` value the way the gRPC HTTP/2 spec asks:
 * only bytes outside printable ASCII, and `%` itself. Every gRPC decoder
 * reads this form back exactly.
 */
export function encodeGrpcMessage(text: string): string {
  let out = "";
  for (const b of Buffer.from(text, "utf8")) {
    out += b >= 0x20 && b <= 0x7e && b !== 0x25 ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/** Re-encodes a value written with `encodeURIComponent`; leaves anything else as it is. */
function reencode(value: unknown): unknown {
  if (typeof value !== "string") return value;
  try {
    return encodeGrpcMessage(decodeURIComponent(value));
  } catch {
    return value;
  }
}

function fixHeaders(headers: unknown): void {
  if (!headers || typeof headers !== "object" || Array.isArray(headers)) return;
  const h = headers as Record<string, unknown>;
  for (const key of Object.keys(h)) if (key.toLowerCase() === "grpc-message") h[key] = reencode(h[key]);
}

/**
 * Connect writes `grpc-message` with `encodeURIComponent`, which also escapes
 * `:`, `,`, `;` and `/`; grpc-js decodes it with `decodeURI`, which leaves
 * those escaped, so its users would read "description%3A must be…". Rewriting
 * the value in the spec's minimal form on the way out is read correctly by
 * grpc-js, grpc-go, the C core and Connect alike.
 */
export function useSpecGrpcMessageEncoding(res: http2.Http2ServerResponse): void {
  const { writeHead, addTrailers } = res;
  res.writeHead = function (this: http2.Http2ServerResponse, ...args: unknown[]) {
    for (const a of args) fixHeaders(a);
    return (writeHead as (...a: unknown[]) => http2.Http2ServerResponse).apply(this, args);
  } as typeof res.writeHead;
  res.addTrailers = function (this: http2.Http2ServerResponse, trailers: http2.OutgoingHttpHeaders) {
    fixHeaders(trailers);
    return addTrailers.call(this, trailers);
  };
}
