/** The queue module: the interface and its two implementations. Only this module imports ioredis. */
export type { PriorityQueue, QueueDepth, QueueEntry } from "./priority-queue.js";
export { createInProcessQueue, type InProcessQueueOptions, type QueueLog } from "./in-process-queue.js";
export { createRedisQueue, type RedisQueueOptions } from "./redis-queue.js";
