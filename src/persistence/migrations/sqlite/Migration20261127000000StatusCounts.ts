import { Migration } from "@mikro-orm/migrations";

/**
 * Task counts by status kept by triggers; see the PostgreSQL migration of the
 * same name. SQLite has row-level triggers only, and one writer, so every
 * change goes to slot 0.
 */
export class Migration20261127000000StatusCounts extends Migration {
  override name = "Migration20261127000000StatusCounts";

  override up(): void {
    this.addSql("create table `task_status_counts` (`slot` integer not null, `status` text not null, `n` bigint not null, primary key (`slot`, `status`));");
    this.addSql("insert into `task_status_counts` (`slot`, `status`, `n`) select 0, `status`, count(*) from `tasks` group by `status`;");
    this.addSql(`create trigger \`tasks_count_insert\` after insert on \`tasks\` begin
  insert into task_status_counts (slot, status, n) values (0, new.status, 1) on conflict (slot, status) do update set n = n + 1;
end;`);
    this.addSql(`create trigger \`tasks_count_update\` after update of \`status\` on \`tasks\` when old.status is not new.status begin
  insert into task_status_counts (slot, status, n) values (0, old.status, -1) on conflict (slot, status) do update set n = n - 1;
  insert into task_status_counts (slot, status, n) values (0, new.status, 1) on conflict (slot, status) do update set n = n + 1;
end;`);
    this.addSql(`create trigger \`tasks_count_delete\` after delete on \`tasks\` begin
  insert into task_status_counts (slot, status, n) values (0, old.status, -1) on conflict (slot, status) do update set n = n - 1;
end;`);
    this.addSql("create index `tasks_completed_index` on `tasks` (`completed_at`) where `status` = 'completed';");
  }

  override down(): void {
    this.addSql("drop index if exists `tasks_completed_index`;");
    this.addSql("drop trigger if exists `tasks_count_delete`;");
    this.addSql("drop trigger if exists `tasks_count_update`;");
    this.addSql("drop trigger if exists `tasks_count_insert`;");
    this.addSql("drop table if exists `task_status_counts`;");
  }
}
