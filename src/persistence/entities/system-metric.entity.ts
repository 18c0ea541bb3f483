import { defineEntity, p } from "@mikro-orm/core";

/** `system_metrics` (seed table): point-in-time figures, e.g. for trend charts. */
export const SystemMetricSchema = defineEntity({
  name: "SystemMetric",
  tableName: "system_metrics",
  properties: {
    metricId: p.string().length(36).primary(),
    metricName: p.string().length(100),
    metricValue: p.double(),
    labelsJson: p.text().nullable(),
    recordedAt: p.datetime(3),
  },
  indexes: [{ name: "system_metrics_name_recorded_at_index", properties: ["metricName", "recordedAt"] }],
});

export class SystemMetric extends SystemMetricSchema.class {}
SystemMetricSchema.setClass(SystemMetric);
