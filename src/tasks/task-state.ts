import type { TaskStatus } from "./task-types.js";

/**
 * Every legal task status transition, in one place. Repositories enforce the
 * same table with conditional updates; everything else asks {@link canTransition}.
 *
 * - pending → assigned: dispatched to an agent (a new lease, attempt + 1)
 * - assigned → pending: the lease was given up (agent lost) and the task re-queued
 * - assigned → completed | failed: the lease holder reported
 * - pending | assigned → cancelled: a client cancelled
 */
const TRANSITIONS: Record<TaskStatus, readonly TaskStatus[]> = {
  pending: ["assigned", "cancelled"],
  assigned: ["pending", "completed", "failed", "cancelled"],
  completed: [],
  failed: [],
  cancelled: [],
};

export function canTransition(from: TaskStatus, to: TaskStatus): boolean {
  return TRANSITIONS[from].includes(to);
}

/** Terminal tasks never change again; watchers stop after one. */
export function isTerminal(status: TaskStatus): boolean {
  return TRANSITIONS[status].length === 0;
}
