/**
 * The agent-session state machine shared by gRPC `Session` and `/ws`:
 *
 *   awaiting_register --register--> active --close--> closed
 *
 * Pure: it only says whether a message is acceptable in a state, and what the
 * refusal is. Refusals are non-fatal (the stream stays open) except in
 * `closed`, where nothing more is accepted.
 */
export type SessionState = "awaiting_register" | "active" | "closed";
export type AgentMessageType = "register" | "heartbeat" | "task_complete" | "task_failed";

export type SessionStep =
  | { ok: true; next: SessionState }
  | { ok: false; code: "failed_precondition"; message: string; fatal: boolean };

export function sessionStep(state: SessionState, message: AgentMessageType): SessionStep {
  switch (state) {
    case "awaiting_register":
      return message === "register"
        ? { ok: true, next: "active" }
        : { ok: false, code: "failed_precondition", message: "the first message must be register", fatal: false };
    case "active":
      return message === "register"
        ? { ok: false, code: "failed_precondition", message: "already registered on this stream", fatal: false }
        : { ok: true, next: "active" };
    case "closed":
      return { ok: false, code: "failed_precondition", message: "the session is closed", fatal: true };
  }
}
