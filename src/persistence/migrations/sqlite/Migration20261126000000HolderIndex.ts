import { Migration } from "@mikro-orm/migrations";

/** The holder index gains task_id; see the PostgreSQL migration of the same name. */
export class Migration20261126000000HolderIndex extends Migration {
  override name = "Migration20261126000000HolderIndex";

  override up(): void {
    this.addSql("drop index if exists `tasks_holder_index`;");
    this.addSql("create index `tasks_holder_index` on `tasks` (`agent_id`, `task_id`) where `status` = 'assigned';");
  }

  override down(): void {
    this.addSql("drop index if exists `tasks_holder_index`;");
    this.addSql("create index `tasks_holder_index` on `tasks` (`agent_id`) where `status` = 'assigned';");
  }
}
