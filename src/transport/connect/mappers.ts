import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { TaskSchema, TaskStatus as PbTaskStatus, TaskType as PbTaskType, type Task } from "../../../gen/aaos/v1/task_pb.js";
import { AgentSchema, AgentStatus as PbAgentStatus, type Agent } from "../../../gen/aaos/v1/agent_service_pb.js";
import { GetMetricsResponseSchema, type GetMetricsResponse } from "../../../gen/aaos/v1/metrics_service_pb.js";
import type { TaskRecord, TaskStatus, TaskType } from "../../tasks/task-types.js";
import type { AgentView } from "../../agents/agent-service.js";
import type { MetricsSnapshot } from "../../metrics/metrics-service.js";

const TYPE_TO_PB: Record<TaskType, PbTaskType> = {
  code: PbTaskType.CODE,
  research: PbTaskType.RESEARCH,
  qa: PbTaskType.QA,
  documentation: PbTaskType.DOCUMENTATION,
  analysis: PbTaskType.ANALYSIS,
  synthesis: PbTaskType.SYNTHESIS,
  trading: PbTaskType.TRADING,
};
const STATUS_TO_PB: Record<TaskStatus, PbTaskStatus> = {
  pending: PbTaskStatus.PENDING,
  assigned: PbTaskStatus.ASSIGNED,
  completed: PbTaskStatus.COMPLETED,
  failed: PbTaskStatus.FAILED,
  cancelled: PbTaskStatus.CANCELLED,
};
const PB_TO_TYPE = new Map(Object.entries(TYPE_TO_PB).map(([k, v]) => [v, k as TaskType]));
const PB_TO_STATUS = new Map(Object.entries(STATUS_TO_PB).map(([k, v]) => [v, k as TaskStatus]));

export const taskTypeToPb = (t: TaskType): PbTaskType => TYPE_TO_PB[t];

/** The domain types as their proto names, for messages that list what is accepted. */
export const PB_TASK_TYPE_NAMES = Object.values(TYPE_TO_PB).map((v) => `TASK_TYPE_${PbTaskType[v]}`).join(", ");

/**
 * Proto enum → domain string; UNSPECIFIED is `undefined` (validation reports it
 * as missing). A number this build does not know (a newer client) is `null`:
 * the caller refuses it with {@link unknownTaskTypeMessage}, which names the value.
 */
export function taskTypeFromPb(value: PbTaskType): TaskType | undefined | null {
  if (value === PbTaskType.UNSPECIFIED) return undefined;
  return PB_TO_TYPE.get(value) ?? null;
}

/** Why an enum number is refused, naming it: the validator's own message cannot. */
export const unknownTaskTypeMessage = (value: number) => `unknown task type ${value}; must be one of: ${PB_TASK_TYPE_NAMES}`;

export function taskStatusFromPb(value: PbTaskStatus): TaskStatus | undefined | null {
  if (value === PbTaskStatus.UNSPECIFIED) return undefined;
  return PB_TO_STATUS.get(value) ?? null;
}

/** Filters: UNSPECIFIED means any; an unknown number is null (no such type). */
export function taskTypeFilterFromPb(value: PbTaskType): TaskType | undefined | null {
  if (value === PbTaskType.UNSPECIFIED) return undefined;
  return PB_TO_TYPE.get(value) ?? null;
}

const ts = (d: Date | null) => (d ? timestampFromDate(d) : undefined);

/** The one mapping of a stored task to its proto view. */
export function taskToPb(t: TaskRecord): Task {
  return create(TaskSchema, {
    taskId: t.taskId,
    taskType: TYPE_TO_PB[t.taskType],
    description: t.description,
    priority: t.priority,
    metadata: t.metadata,
    status: STATUS_TO_PB[t.status],
    agentId: t.agentId ?? "",
    attempt: t.attempt,
    maxAttempts: t.maxAttempts,
    result: t.result ?? undefined,
    error: t.error ?? "",
    createTime: ts(t.createdAt),
    updateTime: ts(t.updatedAt),
    assignTime: ts(t.assignedAt),
    completeTime: ts(t.completedAt),
    correlationId: t.correlationId,
    failedAttempts: t.failedAttempts,
    timeoutMs: t.timeoutMs ?? 0,
    leaseExpireTime: ts(t.leaseExpiresAt),
    nextAttemptTime: t.status === "pending" ? ts(t.runAt) : undefined,
  });
}

const AGENT_STATUS_TO_PB = {
  idle: PbAgentStatus.IDLE,
  busy: PbAgentStatus.BUSY,
  disconnected: PbAgentStatus.DISCONNECTED,
} as const;

export function agentToPb(a: AgentView): Agent {
  return create(AgentSchema, {
    agentId: a.agentId,
    agentName: a.agentName,
    agentType: a.agentType,
    capabilities: a.capabilities.map((c) => TYPE_TO_PB[c]),
    maxConcurrency: a.maxConcurrency,
    status: AGENT_STATUS_TO_PB[a.status],
    activeTasks: a.activeTasks,
    lastHeartbeatTime: ts(a.lastHeartbeat),
    createTime: ts(a.createdAt),
    transport: a.transport,
  });
}

export function metricsToPb(m: MetricsSnapshot): GetMetricsResponse {
  return create(GetMetricsResponseSchema, {
    tasks: {
      pending: BigInt(m.tasks.pending),
      assigned: BigInt(m.tasks.assigned),
      completed: BigInt(m.tasks.completed),
      failed: BigInt(m.tasks.failed),
      cancelled: BigInt(m.tasks.cancelled),
      total: BigInt(m.tasks.total),
      retryWaiting: BigInt(m.tasks.retryWaiting),
    },
    queueDepth: {
      total: BigInt(m.queueDepth.total),
      byPriority: Object.fromEntries(Object.entries(m.queueDepth.byPriority).map(([p, n]) => [p, BigInt(n)])),
    },
    agents: { connected: BigInt(m.agents.connected), idle: BigInt(m.agents.idle), busy: BigInt(m.agents.busy) },
    completedPerMinute: m.completedPerMinute,
    dispatchLatency: {
      p50Ms: m.dispatchLatency.p50Ms,
      p90Ms: m.dispatchLatency.p90Ms,
      p99Ms: m.dispatchLatency.p99Ms,
      samples: BigInt(m.dispatchLatency.samples),
    },
    uptimeSeconds: m.uptimeSeconds,
  });
}
