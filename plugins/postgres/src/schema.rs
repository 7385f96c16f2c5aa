//! The SQL the plugin runs: the definitions of the events and watermark tables (as README.md documents them),
//! the staging table each connection copies into, and the statements of one batch's transaction. Table names
//! come from [`TableName`], which admits only names that are safe inside double quotes; values always travel as
//! parameters or COPY data, never inside the SQL text.

use crate::config::TableName;

/// The columns of the events table that the plugin fills, in COPY order.
pub const COLUMNS: &str = "id, seq, host, type, occurred_at, received_at, actor_id, target_type, target_id, outcome, severity, record, hash";

/// The staging table: per connection, emptied at every commit (so a transaction that fails leaves nothing).
/// Qualified with `pg_temp` so that no table of the same name elsewhere on the search path is used.
pub const STAGING: &str = "pg_temp.trail_staging";

/// Creates the staging table of a new connection.
pub const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS trail_staging (
    id uuid, seq bigint, host text, type text, occurred_at timestamptz, received_at timestamptz,
    actor_id text, target_type text, target_id text, outcome text, severity text, record jsonb, hash text
) ON COMMIT DELETE ROWS";

/// Serialises table creation between hosts that start at once (a constant advisory lock key: "trail" in ASCII).
pub const CREATE_LOCK: &str = "SELECT pg_advisory_xact_lock(495873878380)";

/// Which of the two tables exist: `SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL`.
pub const TABLES_EXIST: &str = "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL";

/// The statements that create the events table and its indexes.
pub fn create_events(table: &TableName) -> String {
    let t = table.sql();
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    id uuid PRIMARY KEY,
    seq bigint NOT NULL,
    host text NOT NULL,
    type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    actor_id text,
    target_type text,
    target_id text,
    outcome text,
    severity text NOT NULL,
    record jsonb NOT NULL,
    hash text
);
CREATE INDEX IF NOT EXISTS \"{time}\" ON {t} (received_at);
CREATE INDEX IF NOT EXISTS \"{ty}\" ON {t} (type, received_at);
CREATE INDEX IF NOT EXISTS \"{actor}\" ON {t} (actor_id, received_at) WHERE actor_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS \"{host_seq}\" ON {t} (host, seq);",
        time = table.derived("time"),
        ty = table.derived("type"),
        actor = table.derived("actor"),
        host_seq = table.derived("host_seq"),
    )
}

/// The statement that creates the watermark table.
pub fn create_watermarks(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
    host text PRIMARY KEY,
    last_seq bigint NOT NULL,
    last_hash text,
    updated_at timestamptz NOT NULL DEFAULT now()
)",
        table.sql()
    )
}

/// `COPY` of one batch into the staging table, in PostgreSQL's text format.
pub fn copy() -> String {
    format!("COPY {STAGING} ({COLUMNS}) FROM STDIN")
}

/// `COPY` of one batch straight into the events table, for a batch none of whose ids can be there yet.
pub fn copy_direct(table: &TableName) -> String {
    format!("COPY {} ({COLUMNS}) FROM STDIN", table.sql())
}

/// Moves the staged rows into the events table; an `id` already there is skipped (delivery is at least once).
pub fn insert(table: &TableName) -> String {
    format!(
        "INSERT INTO {} ({COLUMNS}) SELECT {COLUMNS} FROM {STAGING} ON CONFLICT (id) DO NOTHING",
        table.sql()
    )
}

/// The server's durability settings: `fsync`, `synchronous_commit`.
pub const DURABILITY: &str =
    "SELECT current_setting('fsync'), current_setting('synchronous_commit')";

/// Moves a host's watermark forward to `$2` (with `$3`, the hash of that record); never backwards, so that a
/// replay of old dead letters does not hide newer records.
pub fn advance_watermark(table: &TableName) -> String {
    format!(
        "INSERT INTO {} AS w (host, last_seq, last_hash, updated_at) VALUES ($1, $2, $3, now())
ON CONFLICT (host) DO UPDATE SET last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash, updated_at = EXCLUDED.updated_at
WHERE w.last_seq < EXCLUDED.last_seq",
        table.sql()
    )
}
