import { mkdir } from "node:fs/promises";
import path from "node:path";
import { MikroORM, type Options } from "@mikro-orm/core";
import { Migrator } from "@mikro-orm/migrations";
import { PostgreSqlDriver, type PostgreSqlConnection } from "@mikro-orm/postgresql";
import { SqliteDriver, type EntityManager } from "@mikro-orm/sql";
import type { AgentRepository, TaskRepository } from "../tasks/task-repository.js";
import { createAgentRepository } from "./agent-repository.js";
import { ENTITIES } from "./entities/index.js";
import { Migration20260101000000Initial as PostgresInitial } from "./migrations/postgresql/Migration20260101000000Initial.js";
import { Migration20260101000000Initial as SqliteInitial } from "./migrations/sqlite/Migration20260101000000Initial.js";
import { Migration20261124000000Leases as PostgresLeases } from "./migrations/postgresql/Migration20261124000000Leases.js";
import { Migration20261124000000Leases as SqliteLeases } from "./migrations/sqlite/Migration20261124000000Leases.js";
import { Migration20261125000000PartialIndexes as PostgresPartialIndexes } from "./migrations/postgresql/Migration20261125000000PartialIndexes.js";
import { Migration20261125000000PartialIndexes as SqlitePartialIndexes } from "./migrations/sqlite/Migration20261125000000PartialIndexes.js";
import { Migration20261126000000HolderIndex as PostgresHolderIndex } from "./migrations/postgresql/Migration20261126000000HolderIndex.js";
import { Migration20261126000000HolderIndex as SqliteHolderIndex } from "./migrations/sqlite/Migration20261126000000HolderIndex.js";
import { Migration20261127000000StatusCounts as PostgresStatusCounts } from "./migrations/postgresql/Migration20261127000000StatusCounts.js";
import { Migration20261127000000StatusCounts as SqliteStatusCounts } from "./migrations/sqlite/Migration20261127000000StatusCounts.js";
import { KeepingSqliteDialect } from "./sqlite-dialect.js";
import { describeSchemaProblems, expectedSchema, findSchemaProblems } from "./schema-check.js";
import { createGroupCommit } from "./group-commit.js";
import { createStatementBatcher } from "./statement-batcher.js";
import { createTaskRepository } from "./task-repository.js";
import { lockTasksSql, type TaskWriter } from "./task-sql.js";

/** Migrations per dialect, imported (not globbed) so they load the same from src/, dist/ and vitest. */
const MIGRATIONS = {
  sqlite: [SqliteInitial, SqliteLeases, SqlitePartialIndexes, SqliteHolderIndex, SqliteStatusCounts],
  postgresql: [PostgresInitial, PostgresLeases, PostgresPartialIndexes, PostgresHolderIndex, PostgresStatusCounts],
} as const;

/**
 * The counting triggers on `tasks` belong to the migrations, not to any
 * entity: a schema diff made with this setting (a new migration, say) never
 * proposes dropping them. The start-up schema check makes sure they exist.
 */
export const ORM_SCHEMA_GENERATOR = { ignoreTriggers: true } as const;

/** How long to wait for a PostgreSQL connection before calling the database unreachable. */
const CONNECT_TIMEOUT_MS = 5_000;

export type Dialect = "sqlite" | "postgresql";

/**
 * Group commit: the most task writes committed together, and (PostgreSQL)
 * the most such batches in flight. Two in flight keep the database busy
 * while the next batch gathers; more would split batches without adding
 * throughput.
 */
const BATCH_MAX_STATEMENTS = 256;
const BATCH_MAX_IN_FLIGHT = 2;

/** The subset of a pino logger the persistence layer writes to. */
export interface PersistenceLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
}

export interface PersistenceOptions {
  /** `sqlite:<file>` (parent directory created), `sqlite::memory:`, or `postgresql://…` / `postgres://…`. */
  url: string;
  /** PostgreSQL only: schema to create (if missing) and use for every table; tests isolate with it. */
  schema?: string;
  /** PostgreSQL: lock_timeout of every connection; 0 or unset leaves the server's setting. */
  lockTimeoutMs?: number;
  /**
   * PostgreSQL: statement_timeout of the service's connections; 0 or unset
   * leaves the server's setting. Migrations run without it.
   */
  statementTimeoutMs?: number;
  log?: PersistenceLogger;
}

/** The database behind the repositories. Owns one ORM instance and its connections. */
export interface Persistence {
  readonly dialect: Dialect;
  readonly tasks: TaskRepository;
  readonly agents: AgentRepository;
  /** Resolves when the database answers a trivial query; throws when it is unreachable. */
  ping(): Promise<void>;
  /**
   * The database server's clock, which every instance sharing it can be held
   * to (PostgreSQL); undefined for SQLite, which only one instance uses.
   */
  readonly databaseTime?: () => Promise<Date>;
  /** Closes the connections; safe to call twice. */
  close(): Promise<void>;
}

type Target =
  | { dialect: "sqlite"; file: string }
  | { dialect: "postgresql"; url: string };

/** The URL with any password replaced, fit for logs and error messages. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return url.replace(/\/\/([^:/@]*):[^@/]*@/, "//$1:***@");
  }
}

function parseUrl(url: string): Target {
  if (url.startsWith("sqlite:")) {
    let file = url.slice("sqlite:".length);
    // Accept the URL-ish `sqlite:///abs/path.db` and `sqlite://rel.db` spellings as well.
    if (file.startsWith("//")) file = file.slice(2);
    if (file === "") throw new Error(`Database URL "${url}" names no SQLite file; use e.g. sqlite:./data/aaos.db`);
    return { dialect: "sqlite", file };
  }
  if (url.startsWith("postgresql://") || url.startsWith("postgres://")) {
    return { dialect: "postgresql", url };
  }
  throw new Error(
    `Database URL "${redactUrl(url)}" is not supported: use sqlite:<file>, sqlite::memory: or postgresql://user@host:port/db`,
  );
}

interface Timeouts {
  lockTimeoutMs?: number;
  statementTimeoutMs?: number;
}

function ormOptions(target: Target, schema: string | undefined, { lockTimeoutMs, statementTimeoutMs }: Timeouts): Partial<Options> {
  const common = {
    entities: ENTITIES,
    extensions: [Migrator],
    // The ORM must not pick up MIKRO_ORM_* variables or config files: config comes from our caller only.
    preferEnvVars: false,
    debug: false,
    allowGlobalContext: false,
    schemaGenerator: ORM_SCHEMA_GENERATOR,
  } satisfies Partial<Options>;
  const migrations = {
    migrationsList: [...MIGRATIONS[target.dialect]],
    // Snapshots are a development aid that writes files next to the migrations; never at run time.
    snapshot: false,
    silent: true,
    transactional: true,
    allOrNothing: true,
  };
  if (target.dialect === "sqlite") {
    return {
      ...common,
      driver: SqliteDriver,
      dbName: target.file,
      driverOptions: new KeepingSqliteDialect(target.file),
      migrations,
    };
  }
  return {
    ...common,
    driver: PostgreSqlDriver,
    clientUrl: target.url,
    ...(schema ? { schema } : {}),
    // Keepalive: a connection whose peer vanished (host down, network cut)
    // is probed after 10 s of silence, not the kernel's default two hours, so
    // a write batch waiting on it fails and frees its slot.
    // lock_timeout: a row held by a stuck session fails the write waiting on
    // it (and only that one, once its batch is retried alone) instead of
    // holding a write slot for as long as the other session lives.
    // statement_timeout: no statement (a sweep over a large backlog, a
    // write behind a stalled disk) holds a connection for ever.
    driverOptions: {
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
      ...(lockTimeoutMs ? { lock_timeout: lockTimeoutMs } : {}),
      ...(statementTimeoutMs ? { statement_timeout: statementTimeoutMs } : {}),
    },
    migrations: schema ? { ...migrations, schema } : migrations,
  };
}

function quoteIdentifier(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

function describeError(e: unknown): string {
  if (e instanceof AggregateError && e.errors.length > 0) return e.errors.map(describeError).join("; ");
  return e instanceof Error ? e.message || e.name : String(e);
}

/**
 * Opens the database named by `options.url`, applies pending migrations,
 * checks that every table and column the entities need is present, and
 * returns the repositories. Throws a message naming the (redacted) URL when
 * the database is unreachable, and one naming each missing table/column when
 * the schema is damaged.
 */
export async function createPersistence(options: PersistenceOptions): Promise<Persistence> {
  const target = parseUrl(options.url);
  const where = target.dialect === "sqlite" ? `SQLite database ${target.file}` : `PostgreSQL at ${redactUrl(target.url)}`;
  if (target.dialect === "sqlite" && target.file !== ":memory:") {
    await mkdir(path.dirname(path.resolve(target.file)), { recursive: true });
  }

  let orm = await MikroORM.init(ormOptions(target, options.schema, { lockTimeoutMs: options.lockTimeoutMs }));
  try {
    const em = orm.em.fork() as EntityManager;
    try {
      await em.execute("select 1");
    } catch (e: unknown) {
      throw new Error(`Database unreachable: ${where}: ${describeError(e)}`, { cause: e });
    }
    if (target.dialect === "postgresql" && options.schema) {
      await em.execute(`create schema if not exists ${quoteIdentifier(options.schema)}`);
    }
    if (target.dialect === "sqlite" && target.file !== ":memory:") {
      // WAL: a commit is one append and fsync instead of a rollback journal's
      // several, and readers never wait for the writer. synchronous stays FULL
      // so an acknowledged task survives a power cut, not only a crash.
      await em.execute("pragma journal_mode = wal");
      await em.execute("pragma synchronous = full");
    }

    const applied = await orm.migrator.up();
    if (applied.length > 0) {
      options.log?.info({ dialect: target.dialect, migrations: applied.map((m) => m.name) }, "database migrated");
    }

    const problems = await findSchemaProblems(em, target.dialect, options.schema, expectedSchema(em));
    if (problems.length > 0) throw new Error(describeSchemaProblems(problems, where));
  } catch (e: unknown) {
    await orm.close(true).catch(() => undefined);
    throw e;
  }
  if (target.dialect === "postgresql" && options.statementTimeoutMs) {
    // The migrations above ran without the statement timeout: building an
    // index on a large table may rightly take longer than any request.
    await orm.close(true);
    // ensureDatabase off: checked above, and checking again would run under the timeout.
    orm = await MikroORM.init({
      ...ormOptions(target, options.schema, { lockTimeoutMs: options.lockTimeoutMs, statementTimeoutMs: options.statementTimeoutMs }),
      ensureDatabase: false,
    });
  }

  const fork = () => orm.em.fork() as EntityManager;
  let writes: { drain(): Promise<void> };
  let writer: TaskWriter;
  if (target.dialect === "postgresql") {
    const pool = await (orm.em.getConnection() as PostgreSqlConnection).getNativeClient();
    const driver = orm.em.getDriver();
    const batcher = createStatementBatcher({
      pool,
      maxBatch: BATCH_MAX_STATEMENTS,
      maxInFlight: BATCH_MAX_IN_FLIGHT,
      convertError: (e) => driver.convertException(e),
      lockSql: lockTasksSql(fork()),
    });
    writes = batcher;
    writer = {
      dialect: "postgresql",
      fork,
      batch: (template, row, taskId) => batcher.runSet(template, row, taskId),
    };
  } else {
    type Work = (em: EntityManager) => Promise<unknown>;
    // SQLite has one writer: one transaction at a time, each sharing its fsync among the units in it.
    const group = createGroupCommit<Work, unknown>({
      maxBatch: BATCH_MAX_STATEMENTS,
      maxInFlight: 1,
      runBatch: (works) =>
        fork().transactional(async (tx) => {
          const results: unknown[] = [];
          for (const work of works) results.push(await work(tx));
          return results;
        }),
      runOne: (work) => fork().transactional(work),
      // In-process: a failed transaction is known to have rolled back.
      retryAlone: () => true,
    });
    writes = group;
    writer = {
      dialect: "sqlite",
      fork,
      transact: <T>(work: (em: EntityManager) => Promise<T>) => group.run(work) as Promise<T>,
    };
  }
  let closed: Promise<void> | undefined;
  return {
    dialect: target.dialect,
    tasks: createTaskRepository(writer),
    agents: createAgentRepository({ fork }),
    ...(target.dialect === "postgresql"
      ? {
          async databaseTime() {
            const [row] = await fork().execute<Array<{ t: Date | string }>>("select clock_timestamp() as t");
            return new Date(row!.t);
          },
        }
      : {}),
    async ping() {
      try {
        await fork().execute("select 1");
      } catch (e: unknown) {
        throw new Error(`Database unreachable: ${where}: ${describeError(e)}`, { cause: e });
      }
    },
    close() {
      closed ??= (async () => {
        await writes.drain();
        await orm.close(true);
      })();
      return closed;
    },
  };
}
