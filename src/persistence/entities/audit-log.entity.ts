import { defineEntity, p } from "@mikro-orm/core";

/**
 * `audit_logs`: one row per task state change. log_id is a time-ordered UUID
 * (v7) so rows written in the same millisecond still read back in order.
 */
export const AuditLogSchema = defineEntity({
  name: "AuditLog",
  tableName: "audit_logs",
  properties: {
    logId: p.string().length(36).primary(),
    taskId: p.string().length(36).nullable().index("audit_logs_task_id_index"),
    agentId: p.string().length(128).nullable(),
    action: p.string().length(64),
    fromStatus: p.string().length(20).nullable(),
    toStatus: p.string().length(20).nullable(),
    correlationId: p.string().length(128).nullable(),
    detailsJson: p.text().nullable(),
    createdAt: p.datetime(3),
  },
});

export class AuditLog extends AuditLogSchema.class {}
AuditLogSchema.setClass(AuditLog);
