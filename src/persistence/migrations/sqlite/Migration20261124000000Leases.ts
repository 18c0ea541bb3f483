import { Migration } from "@mikro-orm/migrations";

/**
 * Leases, per-task timeouts, delayed retries and idempotent creates. Every
 * new column is nullable or has a default, so existing rows stay valid.
 */
export class Migration20261124000000Leases extends Migration {
  override name = "Migration20261124000000Leases";

  override up(): void {
    this.addSql("alter table `tasks` add column `failed_attempts` integer not null default 0;");
    this.addSql("alter table `tasks` add column `timeout_ms` integer null;");
    this.addSql("alter table `tasks` add column `lease_expires_at` datetime null;");
    this.addSql("alter table `tasks` add column `run_at` datetime null;");
    this.addSql("alter table `tasks` add column `idempotency_key` text null;");
    this.addSql("alter table `tasks` add column `request_hash` text null;");
    this.addSql("create index `tasks_lease_index` on `tasks` (`status`, `lease_expires_at`);");
    this.addSql("create index `tasks_run_at_index` on `tasks` (`status`, `run_at`);");
    this.addSql("create unique index `tasks_idempotency_key_unique` on `tasks` (`idempotency_key`);");
  }

  override down(): void {
    this.addSql("drop index if exists `tasks_idempotency_key_unique`;");
    this.addSql("drop index if exists `tasks_run_at_index`;");
    this.addSql("drop index if exists `tasks_lease_index`;");
    for (const column of ["request_hash", "idempotency_key", "run_at", "lease_expires_at", "timeout_ms", "failed_attempts"]) {
      this.addSql(`alter table \`tasks\` drop column \`${column}\`;`);
    }
  }
}
