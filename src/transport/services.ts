import type { TaskService } from "../tasks/task-service.js";
import type { AgentService } from "../agents/agent-service.js";
import type { MetricsService } from "../metrics/metrics-service.js";
import type { AgentSession, SessionOutlet } from "../agents/agent-session.js";

/** The domain services every transport translates to. */
export interface AppServices {
  tasks: TaskService;
  agents: AgentService;
  metrics: MetricsService;
  /** Starts an agent session for a new stream or socket. */
  openSession(transport: "grpc" | "ws", outlet: SessionOutlet, correlationId: string): AgentSession;
}
