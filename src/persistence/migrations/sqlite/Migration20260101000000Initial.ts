import { Migration } from "@mikro-orm/migrations";

/**
 * Creates the seven seed tables for SQLite. Generated from the entities with
 * the schema generator, then frozen: later schema changes get a new migration.
 */
export class Migration20260101000000Initial extends Migration {
  override name = "Migration20260101000000Initial";

  override up(): void {
    this.addSql("create table `agents` (`agent_id` text not null primary key, `agent_name` text not null, `agent_type` text not null, `status` text not null default 'idle', `capabilities` text null, `max_concurrency` integer not null default 1, `is_active` integer not null default true, `last_heartbeat` datetime null, `created_at` datetime not null, `updated_at` datetime not null);");
    this.addSql("create table `agent_communications` (`comm_id` text not null primary key, `from_agent_id` text null, `to_agent_id` text null, `task_id` text null, `message_type` text not null, `payload_json` text null, `created_at` datetime not null);");
    this.addSql("create index `agent_communications_task_id_index` on `agent_communications` (`task_id`);");
    this.addSql("create table `audit_logs` (`log_id` text not null primary key, `task_id` text null, `agent_id` text null, `action` text not null, `from_status` text null, `to_status` text null, `correlation_id` text null, `details_json` text null, `created_at` datetime not null);");
    this.addSql("create index `audit_logs_task_id_index` on `audit_logs` (`task_id`);");
    this.addSql("create table `consciousness_snapshots` (`snapshot_id` text not null primary key, `agent_id` text null, `state_json` text not null, `awareness_level` double null, `created_at` datetime not null);");
    this.addSql("create index `consciousness_snapshots_agent_id_index` on `consciousness_snapshots` (`agent_id`);");
    this.addSql("create table `reasoning_chains` (`chain_id` text not null primary key, `task_id` text null, `agent_id` text null, `steps_json` text not null, `conclusion` text null, `confidence` double null, `created_at` datetime not null);");
    this.addSql("create index `reasoning_chains_task_id_index` on `reasoning_chains` (`task_id`);");
    this.addSql("create table `system_metrics` (`metric_id` text not null primary key, `metric_name` text not null, `metric_value` double not null, `labels_json` text null, `recorded_at` datetime not null);");
    this.addSql("create index `system_metrics_name_recorded_at_index` on `system_metrics` (`metric_name`, `recorded_at`);");
    this.addSql("create table `tasks` (`task_id` text not null primary key, `task_type` text not null, `description` text not null, `priority` integer not null default 5, `status` text not null default 'pending', `metadata_json` text null, `agent_id` text null, `attempt` integer not null default 0, `max_attempts` integer not null default 3, `result_json` text null, `error` text null, `correlation_id` text not null, `seq` bigint not null, `created_at` datetime not null, `updated_at` datetime not null, `assigned_at` datetime null, `completed_at` datetime null);");
    this.addSql("create index `tasks_seq_index` on `tasks` (`seq`);");
    this.addSql("create index `tasks_runnable_index` on `tasks` (`status`, `priority` DESC, `seq`);");
    this.addSql("create index `tasks_listing_index` on `tasks` (`created_at` DESC, `task_id`);");
  }

  override down(): void {
    this.addSql("drop table if exists `agents`;");
    this.addSql("drop table if exists `agent_communications`;");
    this.addSql("drop table if exists `audit_logs`;");
    this.addSql("drop table if exists `consciousness_snapshots`;");
    this.addSql("drop table if exists `reasoning_chains`;");
    this.addSql("drop table if exists `system_metrics`;");
    this.addSql("drop table if exists `tasks`;");
  }
}
