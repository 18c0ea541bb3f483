import type { AgentRepository, TaskRepository } from "../tasks/task-repository.js";
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
 * Read side of agents, cluster-wide: this instance's live sessions (with
 * their transport and held tasks) plus agents other instances keep marking as
 * seen within `presenceWindowMs`; on request, also agents not connected.
 */
export function createAgentService({
  agents,
  tasks,
  dispatcher,
  presenceWindowMs,
  clock = () => new Date(),
}: {
  agents: AgentRepository;
  tasks: TaskRepository;
  dispatcher: Dispatcher;
  presenceWindowMs: number;
  clock?: () => Date;
}) {
  return {
    async list(includeDisconnected: boolean): Promise<AgentView[]> {
      const local = new Map<string, AgentView>(
        dispatcher.list().map((s) => [
          s.agentId,
          {
            agentId: s.agentId,
            agentName: s.agentName,
            agentType: s.agentType,
            capabilities: [...s.declaredCapabilities],
            maxConcurrency: s.maxConcurrency,
            status: s.activeTasks > 0 ? "busy" : "idle",
            activeTasks: s.activeTasks,
            lastHeartbeat: s.lastSeen,
            createdAt: s.connectedAt,
            transport: s.transport,
          },
        ]),
      );
      const [stored, held] = await Promise.all([agents.list(), tasks.countAssignedByAgent()]).catch((e: unknown) => Promise.reject(toConnectError(e)));
      const seenSince = clock().getTime() - presenceWindowMs;
      const views: AgentView[] = [];
      for (const a of stored) {
        const mine = local.get(a.agentId);
        if (mine) {
          views.push(mine);
          local.delete(a.agentId);
          continue;
        }
        const alive = a.status !== "disconnected" && (a.lastHeartbeat?.getTime() ?? 0) >= seenSince;
        if (!alive && !includeDisconnected) continue;
        const activeTasks = alive ? (held.get(a.agentId) ?? 0) : 0;
        views.push({
          agentId: a.agentId,
          agentName: a.agentName,
          agentType: a.agentType,
          capabilities: a.capabilities,
          maxConcurrency: a.maxConcurrency,
          status: !alive ? "disconnected" : activeTasks > 0 ? "busy" : "idle",
          activeTasks,
          lastHeartbeat: a.lastHeartbeat,
          createdAt: a.createdAt,
          transport: "",
        });
      }
      // Sessions whose row is still being written.
      return [...views, ...local.values()];
    },
  };
}
