import { defineEntity, p } from "@mikro-orm/core";

/**
 * `agents`: the seed's columns plus max_concurrency. agent_id is wider than
 * the seed's 36 characters because agents may choose their own ids.
 * capabilities is a JSON text array of task types (empty = every type).
 */
export const AgentSchema = defineEntity({
  name: "Agent",
  tableName: "agents",
  properties: {
    agentId: p.string().length(128).primary(),
    agentName: p.string().length(100),
    agentType: p.string().length(50),
    status: p.string().length(20).default("idle"),
    capabilities: p.text().nullable(),
    maxConcurrency: p.integer().default(1),
    isActive: p.boolean().default(true),
    lastHeartbeat: p.datetime(3).nullable(),
    createdAt: p.datetime(3),
    updatedAt: p.datetime(3),
  },
});

export class Agent extends AgentSchema.class {}
AgentSchema.setClass(Agent);
