import type { FastifyInstance } from "fastify";
import type { WebSocket } from "ws";
import type { ServerMessage } from "../../agents/agent-messages.js";
import { SERVER_SHUTDOWN } from "../../agents/agent-session.js";
import type { AppServices } from "../services.js";

/** Legacy frame (snake_case) → the session's message shape. */
function decodeFrame(frame: Record<string, unknown>): unknown {
  const f = frame;
  switch (f.type) {
    case "register":
      return { type: "register", agentId: f.agent_id ?? undefined, agentName: f.agent_name ?? undefined, agentType: f.agent_type ?? undefined, capabilities: f.capabilities ?? undefined, maxConcurrency: f.max_concurrency ?? undefined };
    case "heartbeat":
      return { type: "heartbeat" };
    case "task_complete":
      return { type: "task_complete", taskId: f.task_id, result: f.result ?? undefined, attempt: f.attempt ?? undefined };
    case "task_failed":
      return { type: "task_failed", taskId: f.task_id, error: f.error ?? undefined, retryable: f.retryable ?? undefined, attempt: f.attempt ?? undefined };
    default:
      return { type: f.type };
  }
}

function encodeFrame(m: ServerMessage): Record<string, unknown> {
  switch (m.type) {
    case "registration_ack":
      return { type: m.type, agent_id: m.agentId, heartbeat_interval_ms: m.heartbeatIntervalMs };
    case "task_assignment":
      return {
        type: m.type,
        task_id: m.task.taskId,
        task_type: m.task.taskType,
        description: m.task.description,
        priority: m.task.priority,
        metadata: m.task.metadata,
        attempt: m.task.attempt,
        correlation_id: m.task.correlationId,
      };
    case "heartbeat_ack":
      return { type: m.type };
    case "completion_ack":
    case "task_cancelled":
      return { type: m.type, task_id: m.taskId };
    case "drain":
      return { type: m.type, grace_ms: m.graceMs };
    case "error":
      return m.taskId ? { type: m.type, code: m.code, message: m.message, task_id: m.taskId } : { type: m.type, code: m.code, message: m.message };
  }
}

/**
 * `/ws`: the legacy agent protocol, JSON frames over the same session state
 * machine as gRPC `Session`. A malformed frame gets an `error` frame and the
 * socket stays open.
 */
export function wsRoute(app: FastifyInstance, services: AppServices): void {
  app.get("/ws", { websocket: true }, (socket: WebSocket, req) => {
    const session = services.openSession(
      "ws",
      {
        send: (m) => {
          if (socket.readyState === socket.OPEN) socket.send(JSON.stringify(encodeFrame(m)));
        },
        end: (reason) => {
          // 1001 "going away" tells a client it may reconnect to another instance.
          if (socket.readyState === socket.OPEN) socket.close(reason === SERVER_SHUTDOWN ? 1001 : 1000, reason.slice(0, 120));
        },
      },
      String(req.id),
    );
    socket.on("message", (data, isBinary) => {
      if (isBinary) return session.reject("binary frames are not supported; send JSON text frames");
      let frame: unknown;
      try {
        frame = JSON.parse(data.toString());
      } catch {
        return session.reject("frame is not valid JSON");
      }
      if (frame === null || typeof frame !== "object" || Array.isArray(frame) || typeof (frame as { type?: unknown }).type !== "string") {
        return session.reject('frame must be a JSON object with a string "type"');
      }
      const type = (frame as { type: string }).type;
      if (!["register", "heartbeat", "task_complete", "task_failed"].includes(type)) {
        return session.reject(`unknown message type "${type.slice(0, 64)}"`);
      }
      void session.receive(decodeFrame(frame as Record<string, unknown>));
    });
    socket.on("close", () => void session.close("socket closed"));
    socket.on("error", (e) => {
      req.log.info({ err: e }, "agent socket error");
      void session.close("socket error");
    });
  });
}
