import { Migration } from "@mikro-orm/migrations";

/**
 * Leases, per-task timeouts, delayed retries and idempotent creates. Every
 * new column is nullable or has a default, so existing rows stay valid and
 * the ALTER does not rewrite the table.
 */
export class Migration20261124000000Leases extends Migration {
  override name = "Migration20261124000000Leases";

  override up(): void {
    this.addSql(
      `alter table "tasks" add column "failed_attempts" int not null default 0, add column "timeout_ms" int null, add column "lease_expires_at" timestamptz(3) null, add column "run_at" timestamptz(3) null, add column "idempotency_key" varchar(200) null, add column "request_hash" varchar(64) null;`,
    );
    this.addSql(`create index "tasks_lease_index" on "tasks" ("status", "lease_expires_at");`);
    this.addSql(`create index "tasks_run_at_index" on "tasks" ("status", "run_at");`);
    this.addSql(`alter table "tasks" add constraint "tasks_idempotency_key_unique" unique ("idempotency_key");`);
  }

  override down(): void {
    this.addSql(`alter table "tasks" drop constraint if exists "tasks_idempotency_key_unique";`);
    this.addSql(`drop index if exists "tasks_run_at_index";`);
    this.addSql(`drop index if exists "tasks_lease_index";`);
    this.addSql(
      `alter table "tasks" drop column "request_hash", drop column "idempotency_key", drop column "run_at", drop column "lease_expires_at", drop column "timeout_ms", drop column "failed_attempts";`,
    );
  }
}
