import { defineEntity, p } from "@mikro-orm/core";

/** `consciousness_snapshots` (seed table, stubbed there and unused here): an agent's state at a moment. */
export const ConsciousnessSnapshotSchema = defineEntity({
  name: "ConsciousnessSnapshot",
  tableName: "consciousness_snapshots",
  properties: {
    snapshotId: p.string().length(36).primary(),
    agentId: p.string().length(128).nullable().index("consciousness_snapshots_agent_id_index"),
    stateJson: p.text(),
    awarenessLevel: p.double().nullable(),
    createdAt: p.datetime(3),
  },
});

export class ConsciousnessSnapshot extends ConsciousnessSnapshotSchema.class {}
ConsciousnessSnapshotSchema.setClass(ConsciousnessSnapshot);
