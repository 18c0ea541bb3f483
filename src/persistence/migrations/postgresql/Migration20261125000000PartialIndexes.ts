import { Migration } from "@mikro-orm/migrations";

/**
 * Partial indexes for the tasks the service looks up by state. Every state
 * change rewrites the row (status is indexed, so it cannot be a HOT update)
 * and adds an entry to every index whose predicate the new row satisfies; a
 * full index on (status, …) took an entry on every change, a partial one only
 * when the row is in that state. The lookups (runnable, expired leases, due
 * retries, an agent's leases, idempotency keys) all name the state, so they
 * can still use them. Adds an index for lease renewal, which looks tasks up
 * by holder among the assigned ones.
 */
export class Migration20261125000000PartialIndexes extends Migration {
  override name = "Migration20261125000000PartialIndexes";

  override up(): void {
    this.addSql(`drop index if exists "tasks_runnable_index";`);
    this.addSql(`create index "tasks_runnable_index" on "tasks" ("priority" desc, "seq") where "status" = 'pending';`);
    this.addSql(`drop index if exists "tasks_lease_index";`);
    this.addSql(`create index "tasks_lease_index" on "tasks" ("lease_expires_at") where "status" = 'assigned';`);
    this.addSql(`create index "tasks_holder_index" on "tasks" ("agent_id") where "status" = 'assigned';`);
    this.addSql(`drop index if exists "tasks_run_at_index";`);
    this.addSql(`create index "tasks_run_at_index" on "tasks" ("run_at") where "status" = 'pending' and "run_at" is not null;`);
    this.addSql(`alter table "tasks" drop constraint if exists "tasks_idempotency_key_unique";`);
    this.addSql(`create unique index "tasks_idempotency_key_unique" on "tasks" ("idempotency_key") where "idempotency_key" is not null;`);
  }

  override down(): void {
    this.addSql(`drop index if exists "tasks_idempotency_key_unique";`);
    this.addSql(`alter table "tasks" add constraint "tasks_idempotency_key_unique" unique ("idempotency_key");`);
    this.addSql(`drop index if exists "tasks_run_at_index";`);
    this.addSql(`create index "tasks_run_at_index" on "tasks" ("status", "run_at");`);
    this.addSql(`drop index if exists "tasks_holder_index";`);
    this.addSql(`drop index if exists "tasks_lease_index";`);
    this.addSql(`create index "tasks_lease_index" on "tasks" ("status", "lease_expires_at");`);
    this.addSql(`drop index if exists "tasks_runnable_index";`);
    this.addSql(`create index "tasks_runnable_index" on "tasks" ("status", "priority" desc, "seq");`);
  }
}
