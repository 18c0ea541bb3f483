import { defineEntity, p } from "@mikro-orm/core";

/** `reasoning_chains` (seed table, not yet used): an agent's recorded steps for a task. */
export const ReasoningChainSchema = defineEntity({
  name: "ReasoningChain",
  tableName: "reasoning_chains",
  properties: {
    chainId: p.string().length(36).primary(),
    taskId: p.string().length(36).nullable().index("reasoning_chains_task_id_index"),
    agentId: p.string().length(128).nullable(),
    stepsJson: p.text(),
    conclusion: p.text().nullable(),
    confidence: p.double().nullable(),
    createdAt: p.datetime(3),
  },
});

export class ReasoningChain extends ReasoningChainSchema.class {}
ReasoningChainSchema.setClass(ReasoningChain);
