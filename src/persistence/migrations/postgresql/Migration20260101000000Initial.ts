import { Migration } from "@mikro-orm/migrations";

/**
 * Creates the seven seed tables for PostgreSQL. Generated from the entities with
 * the schema generator, then frozen: later schema changes get a new migration.
 */
export class Migration20260101000000Initial extends Migration {
  override name = "Migration20260101000000Initial";

  override up(): void {
    this.addSql(`create table "agents" ("agent_id" varchar(128) not null, "agent_name" varchar(100) not null, "agent_type" varchar(50) not null, "status" varchar(20) not null default 'idle', "capabilities" text null, "max_concurrency" int not null default 1, "is_active" boolean not null default true, "last_heartbeat" timestamptz(3) null, "created_at" timestamptz(3) not null, "updated_at" timestamptz(3) not null, primary key ("agent_id"));`);
    this.addSql(`create table "agent_communications" ("comm_id" varchar(36) not null, "from_agent_id" varchar(128) null, "to_agent_id" varchar(128) null, "task_id" varchar(36) null, "message_type" varchar(50) not null, "payload_json" text null, "created_at" timestamptz(3) not null, primary key ("comm_id"));`);
    this.addSql(`create index "agent_communications_task_id_index" on "agent_communications" ("task_id");`);
    this.addSql(`create table "audit_logs" ("log_id" varchar(36) not null, "task_id" varchar(36) null, "agent_id" varchar(128) null, "action" varchar(64) not null, "from_status" varchar(20) null, "to_status" varchar(20) null, "correlation_id" varchar(128) null, "details_json" text null, "created_at" timestamptz(3) not null, primary key ("log_id"));`);
    this.addSql(`create index "audit_logs_task_id_index" on "audit_logs" ("task_id");`);
    this.addSql(`create table "consciousness_snapshots" ("snapshot_id" varchar(36) not null, "agent_id" varchar(128) null, "state_json" text not null, "awareness_level" double precision null, "created_at" timestamptz(3) not null, primary key ("snapshot_id"));`);
    this.addSql(`create index "consciousness_snapshots_agent_id_index" on "consciousness_snapshots" ("agent_id");`);
    this.addSql(`create table "reasoning_chains" ("chain_id" varchar(36) not null, "task_id" varchar(36) null, "agent_id" varchar(128) null, "steps_json" text not null, "conclusion" text null, "confidence" double precision null, "created_at" timestamptz(3) not null, primary key ("chain_id"));`);
    this.addSql(`create index "reasoning_chains_task_id_index" on "reasoning_chains" ("task_id");`);
    this.addSql(`create table "system_metrics" ("metric_id" varchar(36) not null, "metric_name" varchar(100) not null, "metric_value" double precision not null, "labels_json" text null, "recorded_at" timestamptz(3) not null, primary key ("metric_id"));`);
    this.addSql(`create index "system_metrics_name_recorded_at_index" on "system_metrics" ("metric_name", "recorded_at");`);
    this.addSql(`create table "tasks" ("task_id" varchar(36) not null, "task_type" varchar(50) not null, "description" text not null, "priority" int not null default 5, "status" varchar(20) not null default 'pending', "metadata_json" text null, "agent_id" varchar(128) null, "attempt" int not null default 0, "max_attempts" int not null default 3, "result_json" text null, "error" text null, "correlation_id" varchar(128) not null, "seq" bigint not null, "created_at" timestamptz(3) not null, "updated_at" timestamptz(3) not null, "assigned_at" timestamptz(3) null, "completed_at" timestamptz(3) null, primary key ("task_id"));`);
    this.addSql(`create index "tasks_seq_index" on "tasks" ("seq");`);
    this.addSql(`create index "tasks_runnable_index" on "tasks" ("status", "priority" DESC, "seq");`);
    this.addSql(`create index "tasks_listing_index" on "tasks" ("created_at" DESC, "task_id");`);
  }

  override down(): void {
    this.addSql(`drop table if exists "agents";`);
    this.addSql(`drop table if exists "agent_communications";`);
    this.addSql(`drop table if exists "audit_logs";`);
    this.addSql(`drop table if exists "consciousness_snapshots";`);
    this.addSql(`drop table if exists "reasoning_chains";`);
    this.addSql(`drop table if exists "system_metrics";`);
    this.addSql(`drop table if exists "tasks";`);
  }
}
