import { Migration } from "@mikro-orm/migrations";

/** Partial indexes for the tasks looked up by state; see the PostgreSQL migration of the same name. */
export class Migration20261125000000PartialIndexes extends Migration {
  override name = "Migration20261125000000PartialIndexes";

  override up(): void {
    this.addSql("drop index if exists `tasks_runnable_index`;");
    this.addSql("create index `tasks_runnable_index` on `tasks` (`priority` DESC, `seq`) where `status` = 'pending';");
    this.addSql("drop index if exists `tasks_lease_index`;");
    this.addSql("create index `tasks_lease_index` on `tasks` (`lease_expires_at`) where `status` = 'assigned';");
    this.addSql("create index `tasks_holder_index` on `tasks` (`agent_id`) where `status` = 'assigned';");
    this.addSql("drop index if exists `tasks_run_at_index`;");
    this.addSql("create index `tasks_run_at_index` on `tasks` (`run_at`) where `status` = 'pending' and `run_at` is not null;");
    this.addSql("drop index if exists `tasks_idempotency_key_unique`;");
    this.addSql("create unique index `tasks_idempotency_key_unique` on `tasks` (`idempotency_key`) where `idempotency_key` is not null;");
  }

  override down(): void {
    this.addSql("drop index if exists `tasks_idempotency_key_unique`;");
    this.addSql("create unique index `tasks_idempotency_key_unique` on `tasks` (`idempotency_key`);");
    this.addSql("drop index if exists `tasks_run_at_index`;");
    this.addSql("create index `tasks_run_at_index` on `tasks` (`status`, `run_at`);");
    this.addSql("drop index if exists `tasks_holder_index`;");
    this.addSql("drop index if exists `tasks_lease_index`;");
    this.addSql("create index `tasks_lease_index` on `tasks` (`status`, `lease_expires_at`);");
    this.addSql("drop index if exists `tasks_runnable_index`;");
    this.addSql("create index `tasks_runnable_index` on `tasks` (`status`, `priority` DESC, `seq`);");
  }
}
