import { defineEntity, p } from "@mikro-orm/core";

/**
 * `task_status_counts`: how many tasks are in each status, kept by triggers
 * on `tasks` (see the StatusCounts migrations), so the metrics read a few
 * rows instead of counting the whole history. The count of a status is the
 * sum of its rows. On PostgreSQL each database session adds its changes to
 * rows of its own (`slot` = its backend pid), so concurrent writers never
 * wait on one another's counts; the rows of sessions that have ended are
 * folded into slot 0. SQLite has one writer and uses slot 0 only.
 */
export const TaskStatusCountSchema = defineEntity({
  name: "TaskStatusCount",
  tableName: "task_status_counts",
  properties: {
    slot: p.integer().primary(),
    status: p.string().length(20).primary(),
    n: p.bigint("number"),
  },
});

export class TaskStatusCount extends TaskStatusCountSchema.class {}
TaskStatusCountSchema.setClass(TaskStatusCount);
