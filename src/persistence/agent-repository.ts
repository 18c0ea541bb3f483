import type { AgentRecord, AgentRepository } from "../tasks/task-repository.js";
import { isTaskType, type TaskType } from "../tasks/task-types.js";
import { Agent } from "./entities/agent.entity.js";
import type { RepositoryDeps } from "./task-repository.js";

function parseCapabilities(text: string | null | undefined): TaskType[] {
  if (!text) return [];
  const value: unknown = JSON.parse(text);
  return Array.isArray(value) ? value.filter(isTaskType) : [];
}

function toStatus(status: string): AgentRecord["status"] {
  return status === "busy" || status === "disconnected" ? status : "idle";
}

function toRecord(row: Agent): AgentRecord {
  return {
    agentId: row.agentId,
    agentName: row.agentName,
    agentType: row.agentType,
    capabilities: parseCapabilities(row.capabilities),
    maxConcurrency: row.maxConcurrency,
    status: toStatus(row.status),
    isActive: row.isActive,
    lastHeartbeat: row.lastHeartbeat ?? null,
    createdAt: row.createdAt,
    updatedAt: row.updatedAt,
  };
}

/**
 * AgentRepository over MikroORM. `is_active` mirrors "connected": true unless
 * the status is disconnected. Capabilities are stored as a JSON text array.
 */
export function createAgentRepository(deps: RepositoryDeps): AgentRepository {
  return {
    async upsertConnected(agent, now) {
      await deps.fork().upsert(
        Agent,
        {
          agentId: agent.agentId,
          agentName: agent.agentName,
          agentType: agent.agentType,
          capabilities: JSON.stringify(agent.capabilities),
          maxConcurrency: agent.maxConcurrency,
          status: "idle",
          isActive: true,
          lastHeartbeat: now,
          createdAt: now,
          updatedAt: now,
        },
        // A reconnecting agent keeps its original created_at.
        { onConflictFields: ["agentId"], onConflictExcludeFields: ["createdAt"] },
      );
    },

    async setStatus(agentId, status, now) {
      await deps
        .fork()
        .nativeUpdate(Agent, { agentId }, { status, isActive: status !== "disconnected", updatedAt: now });
    },

    async touchHeartbeats(agentIds, now) {
      if (agentIds.length === 0) return;
      await deps.fork().nativeUpdate(Agent, { agentId: { $in: [...agentIds] } }, { lastHeartbeat: now });
    },

    async list() {
      const rows = await deps.fork().find(Agent, {}, { orderBy: [{ createdAt: "asc" }, { agentId: "asc" }] });
      return rows.map(toRecord);
    },

    async markAllDisconnected(now) {
      await deps
        .fork()
        .nativeUpdate(
          Agent,
          { status: { $ne: "disconnected" } },
          { status: "disconnected", isActive: false, updatedAt: now },
        );
    },
  };
}
