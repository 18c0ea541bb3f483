import type { AgentRepository } from "../tasks/task-repository.js";
import type { TaskType } from "../tasks/task-types.js";
import { toConnectError } from "../errors/errors.js";
import type { Dispatcher } from "./dispatcher.js";

/** One agent as ListAgents and GET /agents show it. */
export interface AgentView {
  agentId: string;
  agentName: string;
  agentType: string;
  capabilities: TaskType[];
  maxConcurrency: number;
  status: "idle" | "busy" | "disconnected";
  activeTasks: number;
  lastHeartbeat: Date | null;
  createdAt: Date;
  transport: "grpc" | "ws" | "";
}

export type AgentService = ReturnType<typeof createAgentService>;

/**
 * Read side of agents: live sessions of this instance, plus (on request)
 * agents the database remembers that are not connected.
 */
export function createAgentService({ agents, dispatcher }: { agents: AgentRepository; dispatcher: Dispatcher }) {
  return {
    async list(includeDisconnected: boolean): Promise<AgentView[]> {
      const live: AgentView[] = dispatcher.list().map((s) => ({
        agentId: s.agentId,
        agentName: s.agentName,
        agentType: s.agentType,
        capabilities: [...s.declaredCapabilities],
        maxConcurrency: s.maxConcurrency,
        status: s.held.size > 0 ? "busy" : "idle",
        activeTasks: s.held.size,
        lastHeartbeat: s.lastSeen,
        createdAt: s.connectedAt,
        transport: s.transport,
      }));
      if (!includeDisconnected) return live;
      const liveIds = new Set(live.map((a) => a.agentId));
      const stored = await agents.list().catch((e: unknown) => Promise.reject(toConnectError(e)));
      const gone: AgentView[] = stored
        .filter((a) => !liveIds.has(a.agentId))
        .map((a) => ({
          agentId: a.agentId,
          agentName: a.agentName,
          agentType: a.agentType,
          capabilities: a.capabilities,
          maxConcurrency: a.maxConcurrency,
          status: "disconnected",
          activeTasks: 0,
          lastHeartbeat: a.lastHeartbeat,
          createdAt: a.createdAt,
          transport: "",
        }));
      return [...live, ...gone];
    },
  };
}
