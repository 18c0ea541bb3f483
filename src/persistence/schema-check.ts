import type { EntityManager } from "@mikro-orm/sql";

/** What the entities say must exist: table name → column names. */
export type ExpectedSchema = ReadonlyMap<string, readonly string[]>;

/** One missing piece of the schema, as found by {@link findSchemaProblems}. */
/** A whole table when neither a column nor a trigger is named. */
export interface SchemaProblem {
  table: string;
  column?: string;
  trigger?: string;
}

/**
 * Triggers the migrations create that no entity describes: without them the
 * task counts (task_status_counts) would silently drift from the tasks.
 */
const REQUIRED_TRIGGERS: ReadonlyArray<{ table: string; trigger: string }> = ["tasks_count_insert", "tasks_count_update", "tasks_count_delete"].map(
  (trigger) => ({ table: "tasks", trigger }),
);

/** Table → columns the ORM's entity metadata maps to. */
export function expectedSchema(em: EntityManager): ExpectedSchema {
  const expected = new Map<string, string[]>();
  for (const meta of em.getMetadata().getAll().values()) {
    if (!meta.tableName || meta.embeddable || meta.virtual) continue;
    const columns = meta.props.flatMap((prop) => prop.fieldNames ?? []);
    expected.set(meta.tableName, columns);
  }
  return expected;
}

/**
 * Compares the live database with `expected` and lists what is missing.
 * Reads the catalog directly (not the ORM's schema diff) so the answer is
 * cheap, dialect-neutral in shape, and immune to cosmetic type differences.
 */
export async function findSchemaProblems(
  em: EntityManager,
  dialect: "sqlite" | "postgresql",
  schema: string | undefined,
  expected: ExpectedSchema,
): Promise<SchemaProblem[]> {
  const rows: Array<{ table_name: string; column_name: string }> =
    dialect === "sqlite"
      ? await em.execute(
          "select m.name as table_name, c.name as column_name from sqlite_master m join pragma_table_info(m.name) c where m.type = 'table'",
        )
      : await em.execute(
          "select table_name, column_name from information_schema.columns where table_schema = coalesce(?, current_schema())",
          [schema ?? null],
        );
  const actual = new Map<string, Set<string>>();
  for (const row of rows) {
    let columns = actual.get(row.table_name);
    if (!columns) actual.set(row.table_name, (columns = new Set()));
    columns.add(row.column_name);
  }
  const triggerRows: Array<{ table_name: string; trigger_name: string }> =
    dialect === "sqlite"
      ? await em.execute("select tbl_name as table_name, name as trigger_name from sqlite_master where type = 'trigger'")
      : await em.execute(
          "select c.relname as table_name, t.tgname as trigger_name from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace where n.nspname = coalesce(?, current_schema()) and not t.tgisinternal and t.tgenabled <> 'D'",
          [schema ?? null],
        );
  const triggers = new Set(triggerRows.map((row) => `${row.table_name}.${row.trigger_name}`));
  const problems: SchemaProblem[] = [];
  for (const [table, columns] of expected) {
    const present = actual.get(table);
    if (!present) {
      problems.push({ table });
      continue;
    }
    for (const column of columns) {
      if (!present.has(column)) problems.push({ table, column });
    }
  }
  for (const required of REQUIRED_TRIGGERS) {
    if (actual.has(required.table) && !triggers.has(`${required.table}.${required.trigger}`)) problems.push(required);
  }
  return problems;
}

/** A message that names every missing table, column or trigger and says how to recover. */
export function describeSchemaProblems(problems: readonly SchemaProblem[], where: string): string {
  const items = problems.map((p) =>
    p.trigger !== undefined
      ? `trigger "${p.trigger}" on "${p.table}" is missing`
      : p.column === undefined
        ? `table "${p.table}" is missing`
        : `column "${p.table}.${p.column}" is missing`,
  );
  return (
    `Database schema check failed for ${where}: ${items.join("; ")}. ` +
    "The migrations are recorded as applied (table mikro_orm_migrations) but the schema no longer matches them, " +
    "so the database was changed by hand. Restore the missing objects (e.g. from a backup), or point DATABASE_URL at " +
    "a fresh database (for SQLite: move the file away) so the migrations create the schema from scratch."
  );
}
