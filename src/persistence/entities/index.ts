import { AgentCommunication } from "./agent-communication.entity.js";
import { Agent } from "./agent.entity.js";
import { AuditLog } from "./audit-log.entity.js";
import { ConsciousnessSnapshot } from "./consciousness-snapshot.entity.js";
import { ReasoningChain } from "./reasoning-chain.entity.js";
import { SystemMetric } from "./system-metric.entity.js";
import { TaskStatusCount } from "./task-status-count.entity.js";
import { Task } from "./task.entity.js";

export { AgentCommunication, Agent, AuditLog, ConsciousnessSnapshot, ReasoningChain, SystemMetric, Task, TaskStatusCount };

/** Every entity: one per seed table, and the task counts; the ORM is configured with exactly these. */
export const ENTITIES = [Task, Agent, ReasoningChain, ConsciousnessSnapshot, AuditLog, AgentCommunication, SystemMetric, TaskStatusCount];
