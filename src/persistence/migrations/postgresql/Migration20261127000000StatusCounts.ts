import { Migration } from "@mikro-orm/migrations";

/**
 * Task counts by status kept by triggers, so the metrics no longer count the
 * whole history (at a day of 800 tasks/s that took about 9 s per read).
 *
 * One statement-level trigger per kind of write adds the statement's net
 * change per status, read from its transition tables: a set-based write of a
 * batch pays once, not once per row, and a write that changes no status
 * (a lease renewal) adds nothing. Every session adds to rows of its own,
 * keyed by its backend pid, so two write batches never wait on each other's
 * counts nor deadlock on them; the sweeper folds the rows of ended sessions
 * into slot 0. The function keeps the migration's search_path, since the
 * service's connections qualify table names instead of setting one.
 *
 * The triggers come before the initial count: creating them locks `tasks`
 * against writes until this migration commits, so no change made meanwhile
 * (by an instance still on the previous version) is missed or counted twice.
 * Writes wait for the count and the index build (see the README for how
 * long that takes on a large table).
 *
 * Also indexes completed tasks by completion time, for the metrics'
 * completions of the last minute.
 */
export class Migration20261127000000StatusCounts extends Migration {
  override name = "Migration20261127000000StatusCounts";

  override up(): void {
    // Under repeatable read the initial count would read a snapshot taken
    // before the triggers' lock, and miss what older instances committed in
    // between, for good.
    this.addSql(`do $$ begin if current_setting('transaction_isolation') <> 'read committed' then raise exception 'the task counts migration must run at read committed isolation, not %', current_setting('transaction_isolation'); end if; end $$;`);
    this.addSql(`create table "task_status_counts" ("slot" int not null, "status" varchar(20) not null, "n" bigint not null, constraint "task_status_counts_pkey" primary key ("slot", "status"));`);
    this.addSql(`create function "task_status_counts_apply"() returns trigger language plpgsql set search_path from current as $$
begin
  if tg_op = 'INSERT' then
    insert into task_status_counts as c (slot, status, n)
      select pg_backend_pid(), status, count(*) from new_rows group by status order by status
      on conflict (slot, status) do update set n = c.n + excluded.n;
  elsif tg_op = 'UPDATE' then
    insert into task_status_counts as c (slot, status, n)
      select pg_backend_pid(), status, sum(d) from (select status, 1 as d from new_rows union all select status, -1 from old_rows) changed
      group by status having sum(d) <> 0 order by status
      on conflict (slot, status) do update set n = c.n + excluded.n;
  else
    insert into task_status_counts as c (slot, status, n)
      select pg_backend_pid(), status, -count(*) from old_rows group by status order by status
      on conflict (slot, status) do update set n = c.n + excluded.n;
  end if;
  return null;
end
$$;`);
    this.addSql(`create trigger "tasks_count_insert" after insert on "tasks" referencing new table as new_rows for each statement execute function "task_status_counts_apply"();`);
    this.addSql(`create trigger "tasks_count_update" after update on "tasks" referencing old table as old_rows new table as new_rows for each statement execute function "task_status_counts_apply"();`);
    this.addSql(`create trigger "tasks_count_delete" after delete on "tasks" referencing old table as old_rows for each statement execute function "task_status_counts_apply"();`);
    this.addSql(`insert into "task_status_counts" ("slot", "status", "n") select 0, "status", count(*) from "tasks" group by "status";`);
    this.addSql(`create index "tasks_completed_index" on "tasks" ("completed_at") where "status" = 'completed';`);
  }

  override down(): void {
    this.addSql(`drop index if exists "tasks_completed_index";`);
    this.addSql(`drop trigger if exists "tasks_count_delete" on "tasks";`);
    this.addSql(`drop trigger if exists "tasks_count_update" on "tasks";`);
    this.addSql(`drop trigger if exists "tasks_count_insert" on "tasks";`);
    this.addSql(`drop function if exists "task_status_counts_apply"();`);
    this.addSql(`drop table if exists "task_status_counts";`);
  }
}
