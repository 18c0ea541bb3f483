import type { TaskRecord } from "../../tasks/task-types.js";
import type { AgentView } from "../../agents/agent-service.js";
import type { MetricsSnapshot } from "../../metrics/metrics-service.js";

const iso = (d: Date | null) => (d ? d.toISOString() : null);

/** The legacy (FastAPI-compatible) JSON view of a task: snake_case, lower-case enums. */
export function taskToJson(t: TaskRecord) {
  return {
    task_id: t.taskId,
    task_type: t.taskType,
    description: t.description,
    priority: t.priority,
    status: t.status,
    metadata: t.metadata,
    result: t.result,
    error: t.error,
    agent_id: t.agentId,
    attempt: t.attempt,
    max_attempts: t.maxAttempts,
    correlation_id: t.correlationId,
    created_at: iso(t.createdAt),
    updated_at: iso(t.updatedAt),
    assigned_at: iso(t.assignedAt),
    completed_at: iso(t.completedAt),
    failed_attempts: t.failedAttempts,
    timeout_ms: t.timeoutMs,
    lease_expires_at: iso(t.leaseExpiresAt),
    next_attempt_at: t.status === "pending" ? iso(t.runAt) : null,
  };
}

export function agentToJson(a: AgentView) {
  return {
    agent_id: a.agentId,
    agent_name: a.agentName,
    agent_type: a.agentType,
    capabilities: a.capabilities,
    max_concurrency: a.maxConcurrency,
    status: a.status,
    active_tasks: a.activeTasks,
    last_heartbeat: iso(a.lastHeartbeat),
    created_at: iso(a.createdAt),
    transport: a.transport || null,
  };
}

export function metricsToJson(m: MetricsSnapshot) {
  return {
    tasks: {
      pending: m.tasks.pending,
      assigned: m.tasks.assigned,
      completed: m.tasks.completed,
      failed: m.tasks.failed,
      cancelled: m.tasks.cancelled,
      total: m.tasks.total,
      retry_waiting: m.tasks.retryWaiting,
    },
    queue_depth: { total: m.queueDepth.total, by_priority: m.queueDepth.byPriority },
    agents: m.agents,
    completed_per_minute: m.completedPerMinute,
    dispatch_latency_ms: {
      p50: m.dispatchLatency.p50Ms,
      p90: m.dispatchLatency.p90Ms,
      p99: m.dispatchLatency.p99Ms,
      samples: m.dispatchLatency.samples,
    },
    uptime_seconds: m.uptimeSeconds,
  };
}
