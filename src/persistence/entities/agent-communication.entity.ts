import { defineEntity, p } from "@mikro-orm/core";

/** `agent_communications` (seed table, not yet used): messages between agents. */
export const AgentCommunicationSchema = defineEntity({
  name: "AgentCommunication",
  tableName: "agent_communications",
  properties: {
    commId: p.string().length(36).primary(),
    fromAgentId: p.string().length(128).nullable(),
    toAgentId: p.string().length(128).nullable(),
    taskId: p.string().length(36).nullable().index("agent_communications_task_id_index"),
    messageType: p.string().length(50),
    payloadJson: p.text().nullable(),
    createdAt: p.datetime(3),
  },
});

export class AgentCommunication extends AgentCommunicationSchema.class {}
AgentCommunicationSchema.setClass(AgentCommunication);
