//! The SQL layer: schema, connection setup, and the statements of one
//! transaction. Everything here is synchronous and knows nothing of tokio;
//! `queue.rs` runs it on the handle's writer and reader threads (`store.rs`
//! runs scans on blocking threads), `worker.rs` on its own thread.
//!
//! # Schema
//!
//! * `records`: one row per znode. `path` is unique (its index serves
//!   `get` and the ordered range reads of `scan`), `parent` is indexed
//!   with `path` for `children`. `num_children` and `cversion` (ZooKeeper's
//!   child version, which numbers sequential children) are kept on the
//!   parent row. `owner` is the session of an ephemeral record, 0 otherwise.
//! * `sessions`: one row per live client session with its lease
//!   (`expires_ms`, wall-clock epoch ms). `AUTOINCREMENT` so an id is never
//!   reused and an old ephemeral can never be adopted by a new session.
//! * `changes`: the change feed, one row per change, keyed by the global
//!   change id (ZooKeeper's zxid). Ids are dense: every zxid has a row until
//!   it is pruned, so a reader detects missed (pruned) changes as a gap.
//! * `meta`: `schema_version` and `zxid` (the last change id; kept here
//!   rather than derived from `changes` because pruning empties that table).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use nodepool_model::store::{CreateMode, Stat, StoreError, split_path, validate_path};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::options::SqliteOptions;

/// The schema this code reads and writes.
pub(crate) const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL,
    data BLOB NOT NULL,
    version INTEGER NOT NULL,
    czxid INTEGER NOT NULL,
    mzxid INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    owner INTEGER NOT NULL,
    num_children INTEGER NOT NULL,
    cversion INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_parent ON records (parent, path);
CREATE INDEX IF NOT EXISTS records_by_owner ON records (owner) WHERE owner <> 0;
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    expires_ms INTEGER NOT NULL,
    lease_ms INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    started_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    zxid INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    path TEXT NOT NULL
);
";

const COLUMNS: &str =
    "id, path, data, version, czxid, mzxid, ctime, mtime, owner, num_children, cversion";

/// Errors inside the SQL layer; turned into [`StoreError`] at the store's
/// boundary, where the database's name is known.
#[derive(Debug)]
pub(crate) enum DbError {
    /// SQLite failed.
    Sql(rusqlite::Error),
    /// A meaningful store error (not found, conflict, ...).
    Store(StoreError),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sql(e)
    }
}

impl From<StoreError> for DbError {
    fn from(e: StoreError) -> Self {
        DbError::Store(e)
    }
}

impl DbError {
    /// The store error, naming the database (`label`) where SQLite failed.
    pub(crate) fn into_store(self, label: &str) -> StoreError {
        match self {
            DbError::Store(e) => e,
            DbError::Sql(e) => sql_error(label, &e),
        }
    }
}

/// Maps a SQLite error to its meaning.
pub(crate) fn sql_error(label: &str, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Timeout {
            what: format!("{label}: the database stayed locked by another writer ({e})"),
        },
        Some(
            ErrorCode::CannotOpen
            | ErrorCode::NotADatabase
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::PermissionDenied
            | ErrorCode::ReadOnly
            | ErrorCode::NoLargeFileSupport
            | ErrorCode::FileLockingProtocolFailed,
        ) => StoreError::Unavailable {
            store: label.to_owned(),
            reason: e.to_string(),
        },
        _ => StoreError::Other(format!("{label}: {e}")),
    }
}

/// Current wall-clock time, epoch milliseconds. Leases are wall-clock so
/// that every process on the machine agrees on them (a monotonic clock is
/// per boot and cannot be compared with a file that survives reboots).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens one connection with the store's settings.
pub(crate) fn connect(path: &Path, options: &SqliteOptions) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Before anything that may need a lock, so even switching to WAL on a
    // fresh file that another process is creating too waits instead of failing.
    conn.busy_timeout(options.busy_timeout)?;
    conn.pragma_update(None, "synchronous", options.synchronous.pragma_value())?;
    // Bounds the WAL file left behind after checkpoints of a write burst
    // (per connection: whichever connection checkpoints applies it).
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Switches the file to WAL (a persistent property of the file) and
/// creates or checks the schema.
pub(crate) fn init(conn: &mut Connection, busy_timeout: Duration) -> Result<(), DbError> {
    // Before touching the file (switching to WAL changes it): is it ours?
    let (tables, has_meta) = foreign_check(conn)?;
    if tables > 0 && !has_meta {
        return Err(DbError::Store(StoreError::Other(
            "the file is an SQLite database of something else (it has tables but no nodepool schema)"
                .into(),
        )));
    }
    let mode = switch_to_wal(conn, busy_timeout)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DbError::Store(StoreError::Other(format!(
            "cannot switch to WAL journal mode (got {mode:?}); is the file on a filesystem without shared memory?"
        ))));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Again under the write lock: another process may have created it meanwhile.
    let (_, has_meta) = foreign_check(&tx)?;
    let version: Option<i64> = if has_meta {
        tx.query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?
    } else {
        None
    };
    match version {
        Some(v) if v == SCHEMA_VERSION => {}
        Some(v) => {
            return Err(DbError::Store(StoreError::Other(format!(
                "schema version {v}, but this nodepool reads version {SCHEMA_VERSION}"
            ))));
        }
        None => {
            tx.execute_batch(SCHEMA)?;
            tx.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?1), ('zxid', 0)",
                [SCHEMA_VERSION],
            )?;
            let now = now_ms();
            // ZooKeeper's root: always there, parent of top-level records.
            tx.execute(
                "INSERT OR IGNORE INTO records (path, parent, data, version, czxid, mzxid, ctime, mtime,
                     owner, num_children, cversion)
                 VALUES ('/', '', x'', 0, 0, 0, ?1, ?1, 0, 0, 0)",
                [now],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// `PRAGMA journal_mode = WAL`, retried while another process holds the
/// file: switching needs an exclusive lock, and SQLite reports `BUSY` for
/// it at once rather than through the busy handler (it could deadlock with
/// our own shared lock), which happens when several processes open a
/// fresh file together.
fn switch_to_wal(conn: &Connection, busy_timeout: Duration) -> Result<String, rusqlite::Error> {
    let deadline = std::time::Instant::now() + busy_timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(e)
                if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// How many tables the file has and whether one is our `meta`.
fn foreign_check(conn: &Connection) -> Result<(i64, bool), rusqlite::Error> {
    conn.query_row(
        "SELECT count(*), coalesce(sum(name = 'meta'), 0) > 0 FROM sqlite_master
         WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// A record row that could not be decoded (a hand-edited or damaged file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Malformed {
    /// Its path, or `rowid N` when even the path is unreadable.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl Malformed {
    pub(crate) fn into_store(self) -> StoreError {
        StoreError::Malformed {
            path: self.path,
            reason: self.reason,
        }
    }
}

/// One decoded record row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub path: String,
    pub data: Bytes,
    pub stat: Stat,
    /// ZooKeeper's cversion: the next sequence number for a sequential child.
    pub cversion: i64,
}

fn int(row: &rusqlite::Row<'_>, idx: usize, name: &str) -> Result<i64, String> {
    match row.get_ref(idx) {
        Ok(ValueRef::Integer(i)) => Ok(i),
        Ok(v) => Err(format!(
            "column {name} holds {:?}, not an integer",
            v.data_type()
        )),
        Err(e) => Err(format!("column {name}: {e}")),
    }
}

fn int32(row: &rusqlite::Row<'_>, idx: usize, name: &str) -> Result<i32, String> {
    let v = int(row, idx, name)?;
    i32::try_from(v).map_err(|_| format!("column {name} is out of range: {v}"))
}

/// Decodes a row selected with [`COLUMNS`]. A row that does not fit the
/// schema's types is a [`Malformed`] naming the record, never an error for
/// the whole read.
fn decode(row: &rusqlite::Row<'_>) -> Result<Record, Malformed> {
    let rowid = row
        .get_ref(0)
        .ok()
        .and_then(|v| v.as_i64().ok())
        .unwrap_or(0);
    let path = match row.get_ref(1) {
        Ok(ValueRef::Text(t)) => match std::str::from_utf8(t) {
            Ok(p) => p.to_owned(),
            Err(e) => {
                return Err(Malformed {
                    path: format!("rowid {rowid}"),
                    reason: format!("path is not UTF-8: {e}"),
                });
            }
        },
        _ => {
            return Err(Malformed {
                path: format!("rowid {rowid}"),
                reason: "path is not text".into(),
            });
        }
    };
    let fields = || -> Result<Record, String> {
        let data = match row.get_ref(2).map_err(|e| e.to_string())? {
            ValueRef::Blob(b) | ValueRef::Text(b) => Bytes::copy_from_slice(b),
            ValueRef::Null => Bytes::new(),
            v => return Err(format!("column data holds {:?}, not bytes", v.data_type())),
        };
        Ok(Record {
            path: path.clone(),
            data,
            stat: Stat {
                version: int32(row, 3, "version")?,
                czxid: int(row, 4, "czxid")?,
                mzxid: int(row, 5, "mzxid")?,
                ctime: int(row, 6, "ctime")?,
                mtime: int(row, 7, "mtime")?,
                ephemeral_owner: int(row, 8, "owner")?,
                num_children: int32(row, 9, "num_children")?,
            },
            cversion: int(row, 10, "cversion")?,
        })
    };
    fields().map_err(|reason| Malformed {
        path: path.clone(),
        reason,
    })
}

/// Reads one record.
pub(crate) fn get(
    conn: &Connection,
    path: &str,
) -> Result<Option<Result<Record, Malformed>>, rusqlite::Error> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM records WHERE path = ?1"))?;
    let mut rows = stmt.query([path])?;
    match rows.next()? {
        Some(row) => Ok(Some(decode(row))),
        None => Ok(None),
    }
}

/// The names of a record's children, sorted; `None` if it does not exist.
/// Call inside a read transaction so both reads see one snapshot.
pub(crate) fn children(
    conn: &Connection,
    path: &str,
) -> Result<Option<Vec<String>>, rusqlite::Error> {
    let exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM records WHERE path = ?1)")?
        .query_row([path], |r| r.get(0))?;
    if !exists {
        return Ok(None);
    }
    let prefix_len = if path == "/" { 1 } else { path.len() + 1 };
    let mut stmt =
        conn.prepare_cached("SELECT path FROM records WHERE parent = ?1 ORDER BY path")?;
    let names = stmt
        .query_map([path], |r| r.get::<_, String>(0))?
        .filter_map(|p| match p {
            Ok(p) => p.get(prefix_len..).map(str::to_owned).map(Ok),
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(names))
}

/// Bounds of the paths strictly below `prefix`: `[prefix/, prefix0)`, as
/// `0` is the byte after `/` and SQLite compares text bytewise (the same
/// order as Rust's `str`).
fn below(prefix: &str) -> (String, String) {
    if prefix == "/" {
        ("/".into(), "0".into())
    } else {
        (format!("{prefix}/"), format!("{prefix}0"))
    }
}

/// The record at `prefix` and all below it, sorted by path. Malformed rows
/// are returned separately so the caller can log them.
pub(crate) fn scan(
    conn: &Connection,
    prefix: &str,
) -> Result<(Vec<Record>, Vec<Malformed>), rusqlite::Error> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    if prefix != "/" {
        match get(conn, prefix)? {
            Some(Ok(r)) => out.push(r),
            Some(Err(m)) => bad.push(m),
            None => {}
        }
    }
    let (lo, hi) = below(prefix);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM records WHERE path >= ?1 AND path < ?2 ORDER BY path"
    ))?;
    let mut rows = stmt.query([lo, hi])?;
    while let Some(row) = rows.next()? {
        match decode(row) {
            Ok(r) => out.push(r),
            Err(m) => bad.push(m),
        }
    }
    Ok((out, bad))
}

/// The last change id.
pub(crate) fn current_zxid(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = 'zxid'")?
        .query_row([], |r| r.get(0))
}

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Created = 1,
    Changed = 2,
    Deleted = 3,
}

impl ChangeKind {
    fn from_i64(v: i64) -> Option<Self> {
        match v {
            1 => Some(ChangeKind::Created),
            2 => Some(ChangeKind::Changed),
            3 => Some(ChangeKind::Deleted),
            _ => None,
        }
    }
}

/// One entry of the change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub zxid: i64,
    pub kind: ChangeKind,
    pub path: String,
}

/// Changes after `zxid`, oldest first. Rows that do not decode are skipped
/// (they still count for gap detection through their zxid).
pub(crate) fn changes_since(conn: &Connection, zxid: i64) -> Result<Vec<Change>, rusqlite::Error> {
    let mut stmt =
        conn.prepare_cached("SELECT zxid, kind, path FROM changes WHERE zxid > ?1 ORDER BY zxid")?;
    let mut rows = stmt.query([zxid])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let z: i64 = row.get(0)?;
        let kind = row.get::<_, i64>(1).ok().and_then(ChangeKind::from_i64);
        let path = row.get::<_, String>(2).ok();
        match (kind, path) {
            (Some(kind), Some(path)) => out.push(Change {
                zxid: z,
                kind,
                path,
            }),
            _ => tracing::warn!(zxid = z, "skipping malformed change feed entry"),
        }
    }
    Ok(out)
}

/// The first change id still in the feed.
pub(crate) fn oldest_change(conn: &Connection) -> Result<Option<i64>, rusqlite::Error> {
    conn.prepare_cached("SELECT min(zxid) FROM changes")?
        .query_row([], |r| r.get(0))
}

/// `PRAGMA data_version`: changes whenever another connection commits.
pub(crate) fn data_version(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}

/// Whether any session other than `me` has an expired lease.
pub(crate) fn any_expired(conn: &Connection, me: i64, now: i64) -> Result<bool, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM sessions WHERE expires_ms < ?1 AND id <> ?2)",
    )?
    .query_row(params![now, me], |r| r.get(0))
}

/// How our own session looks in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionStatus {
    /// Within its lease.
    Alive,
    /// Still there, but its lease ran out: it must not be used any more.
    Lapsed,
    /// Deleted by another process's sweep.
    Gone,
}

/// Metadata of a record read for a write.
struct Meta {
    stat: Stat,
    cversion: i64,
}

/// One write transaction (`BEGIN IMMEDIATE`: it takes the write lock at
/// once, so it never fails half-way with `SQLITE_BUSY` after reading).
/// Every change is logged to the feed with the next zxid.
pub(crate) struct Txn<'c> {
    tx: rusqlite::Transaction<'c>,
    /// Wall-clock time after the write lock was taken, epoch ms.
    pub now: i64,
    zxid: i64,
    start_zxid: i64,
}

impl<'c> Txn<'c> {
    /// Takes the write lock (waiting up to the busy timeout).
    pub(crate) fn begin(conn: &'c mut Connection) -> Result<Self, rusqlite::Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let zxid = current_zxid(&tx)?;
        // Time is read after the lock is ours: a lease check must not use a
        // time from before a long wait for the lock.
        Ok(Txn {
            tx,
            now: now_ms(),
            zxid,
            start_zxid: zxid,
        })
    }

    /// Commits; returns whether anything was logged to the change feed.
    pub(crate) fn commit(self) -> Result<bool, rusqlite::Error> {
        let changed = self.zxid != self.start_zxid;
        if changed {
            self.tx
                .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'zxid'")?
                .execute([self.zxid])?;
        }
        self.tx.commit()?;
        Ok(changed)
    }

    /// Runs one operation of a batch inside a savepoint: when it fails,
    /// what it wrote is undone (rows and change ids alike) and the other
    /// operations of the transaction stand. The outer error means the
    /// transaction itself is broken (SQLite rolled it back, e.g. after an
    /// I/O error): nothing of it may be committed.
    pub(crate) fn attempt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DbError>,
    ) -> Result<Result<T, DbError>, rusqlite::Error> {
        let zxid = self.zxid;
        self.tx.execute_batch("SAVEPOINT op")?;
        match f(self) {
            Ok(v) => {
                self.tx.execute_batch("RELEASE op")?;
                Ok(Ok(v))
            }
            Err(e) => {
                // Fails when SQLite already rolled the whole transaction
                // back: the savepoint is gone with it.
                self.tx.execute_batch("ROLLBACK TO op; RELEASE op")?;
                self.zxid = zxid;
                Ok(Err(e))
            }
        }
    }

    fn log(&mut self, kind: ChangeKind, path: &str) -> Result<i64, rusqlite::Error> {
        self.zxid += 1;
        self.tx
            .prepare_cached("INSERT INTO changes (zxid, kind, path) VALUES (?1, ?2, ?3)")?
            .execute(params![self.zxid, kind as i64, path])?;
        Ok(self.zxid)
    }

    fn meta(&self, path: &str) -> Result<Option<Meta>, DbError> {
        match get(&self.tx, path)? {
            None => Ok(None),
            Some(Ok(r)) => Ok(Some(Meta {
                stat: r.stat,
                cversion: r.cversion,
            })),
            Some(Err(m)) => Err(DbError::Store(m.into_store())),
        }
    }

    fn touch_parent(&mut self, parent: &str, delta: i64) -> Result<(), rusqlite::Error> {
        self.tx
            .prepare_cached(
                "UPDATE records SET num_children = num_children + ?1, cversion = cversion + 1
                 WHERE path = ?2",
            )?
            .execute(params![delta, parent])?;
        Ok(())
    }

    fn insert(&mut self, path: &str, data: &[u8], owner: i64) -> Result<(), rusqlite::Error> {
        let z = self.log(ChangeKind::Created, path)?;
        let parent = split_path(path).0;
        self.tx
            .prepare_cached(
                "INSERT INTO records (path, parent, data, version, czxid, mzxid, ctime, mtime,
                     owner, num_children, cversion)
                 VALUES (?1, ?2, ?3, 0, ?4, ?4, ?5, ?5, ?6, 0, 0)",
            )?
            .execute(params![path, parent, data, z, self.now, owner])?;
        self.touch_parent(parent, 1)
    }

    fn remove(&mut self, path: &str) -> Result<(), rusqlite::Error> {
        self.log(ChangeKind::Deleted, path)?;
        self.tx
            .prepare_cached("DELETE FROM records WHERE path = ?1")?
            .execute([path])?;
        self.touch_parent(split_path(path).0, -1)
    }

    /// ZooKeeper's create: missing parents are created empty and
    /// persistent; sequential names get the parent's cversion, 10 digits.
    pub(crate) fn create(
        &mut self,
        session: i64,
        path: &str,
        data: &[u8],
        mode: CreateMode,
    ) -> Result<String, DbError> {
        let (parent, name) = split_path(path);
        validate_path(parent)?;
        if !mode.is_sequential() && (name.is_empty() || validate_path(path).is_err()) {
            return Err(StoreError::Other(format!("invalid path {path:?}")).into());
        }
        // Walk up to the nearest existing ancestor.
        let mut missing = Vec::new();
        let mut cur = parent;
        let ancestor = loop {
            match self.meta(cur)? {
                Some(m) => break m,
                None if cur == "/" => {
                    return Err(StoreError::Other("the root record is missing".into()).into());
                }
                None => {
                    missing.push(cur.to_owned());
                    cur = split_path(cur).0;
                }
            }
        };
        if ancestor.stat.ephemeral_owner != 0 {
            return Err(StoreError::Other(format!(
                "{cur}: ephemeral records cannot have children"
            ))
            .into());
        }
        for p in missing.iter().rev() {
            self.insert(p, b"", 0)?;
        }
        let full = if mode.is_sequential() {
            let seq = match self.meta(parent)? {
                Some(m) => m.cversion,
                None => 0,
            };
            format!("{path}{seq:010}")
        } else {
            path.to_owned()
        };
        if self.meta(&full)?.is_some() {
            return Err(StoreError::Conflict {
                path: full,
                reason: "already exists".into(),
            }
            .into());
        }
        let owner = if mode.is_ephemeral() { session } else { 0 };
        self.insert(&full, data, owner)?;
        Ok(full)
    }

    /// ZooKeeper's multi of a persistent `dir` and a sequential child of
    /// it (`child_prefix`, directly below `dir`). `Ok(None)`, writing
    /// nothing, when `dir` exists or its parent does not.
    pub(crate) fn create_dir_with_child(
        &mut self,
        session: i64,
        dir: &str,
        child_prefix: &str,
        data: &[u8],
        mode: CreateMode,
    ) -> Result<Option<String>, DbError> {
        validate_path(dir)?;
        let below = child_prefix.strip_prefix(dir).is_some_and(|rest| {
            rest.len() > 1 && rest.starts_with('/') && !rest[1..].contains('/')
        });
        if !below || !mode.is_sequential() || dir == "/" {
            return Err(StoreError::Other(format!(
                "create_dir_with_child: {child_prefix:?} must be a sequential child of {dir:?}"
            ))
            .into());
        }
        if self.meta(dir)?.is_some() || self.meta(split_path(dir).0)?.is_none() {
            return Ok(None);
        }
        self.create(session, dir, b"", CreateMode::Persistent)?;
        self.create(session, child_prefix, data, mode).map(Some)
    }

    /// Replaces a record's data, optionally only at `version`.
    pub(crate) fn set(
        &mut self,
        path: &str,
        data: &[u8],
        version: Option<i32>,
    ) -> Result<Stat, DbError> {
        let Some(m) = self.meta(path)? else {
            return Err(StoreError::NotFound { path: path.into() }.into());
        };
        if let Some(v) = version
            && m.stat.version != v
        {
            return Err(StoreError::Conflict {
                path: path.into(),
                reason: format!("version is {}, not {v}", m.stat.version),
            }
            .into());
        }
        let z = self.log(ChangeKind::Changed, path)?;
        let stat = Stat {
            version: m.stat.version.wrapping_add(1),
            mzxid: z,
            mtime: self.now,
            ..m.stat
        };
        self.tx
            .prepare_cached(
                "UPDATE records SET data = ?1, version = ?2, mzxid = ?3, mtime = ?4 WHERE path = ?5",
            )?
            .execute(params![data, stat.version, z, self.now, path])?;
        Ok(stat)
    }

    /// Deletes a record without children, optionally only at `version`.
    pub(crate) fn delete(&mut self, path: &str, version: Option<i32>) -> Result<(), DbError> {
        validate_path(path)?;
        if path == "/" {
            return Err(StoreError::Other("the root record cannot be deleted".into()).into());
        }
        let Some(m) = self.meta(path)? else {
            return Err(StoreError::NotFound { path: path.into() }.into());
        };
        if let Some(v) = version
            && m.stat.version != v
        {
            return Err(StoreError::Conflict {
                path: path.into(),
                reason: format!("version is {}, not {v}", m.stat.version),
            }
            .into());
        }
        if m.stat.num_children > 0 {
            return Err(StoreError::NotEmpty { path: path.into() }.into());
        }
        self.remove(path)?;
        Ok(())
    }

    // ----- sessions ------------------------------------------------------

    /// Starts a session with a lease from now.
    pub(crate) fn open_session(&mut self, lease_ms: i64) -> Result<(i64, i64), rusqlite::Error> {
        let expires = self.now.saturating_add(lease_ms);
        self.tx
            .prepare_cached(
                "INSERT INTO sessions (expires_ms, lease_ms, pid, started_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![expires, lease_ms, std::process::id(), self.now])?;
        Ok((self.tx.last_insert_rowid(), expires))
    }

    /// How session `id` looks now.
    pub(crate) fn session_status(&self, id: i64) -> Result<SessionStatus, rusqlite::Error> {
        let expires: Option<i64> = self
            .tx
            .prepare_cached("SELECT expires_ms FROM sessions WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        Ok(match expires {
            None => SessionStatus::Gone,
            Some(e) if e < self.now => SessionStatus::Lapsed,
            Some(_) => SessionStatus::Alive,
        })
    }

    /// Extends the lease of a session that has not lapsed; returns the new
    /// expiry, or `None` if it lapsed or is gone (it must then be expired).
    pub(crate) fn renew(&mut self, id: i64, lease_ms: i64) -> Result<Option<i64>, rusqlite::Error> {
        let expires = self.now.saturating_add(lease_ms);
        let n = self
            .tx
            .prepare_cached(
                "UPDATE sessions SET expires_ms = ?1 WHERE id = ?2 AND expires_ms >= ?3",
            )?
            .execute(params![expires, id, self.now])?;
        Ok((n == 1).then_some(expires))
    }

    /// Ends a session: its ephemeral records go, then the session row.
    /// Returns how many records went.
    pub(crate) fn expire_session(&mut self, id: i64) -> Result<usize, rusqlite::Error> {
        // Deepest first, in case a record was (wrongly) made under an ephemeral.
        let paths: Vec<String> = self
            .tx
            .prepare_cached("SELECT path FROM records WHERE owner = ?1 ORDER BY path DESC")?
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for p in &paths {
            self.remove(p)?;
        }
        self.tx
            .prepare_cached("DELETE FROM sessions WHERE id = ?1")?
            .execute([id])?;
        Ok(paths.len())
    }

    /// Expires every other session whose lease ran out, as ZooKeeper's
    /// server does for a client that stopped pinging. Returns their ids.
    pub(crate) fn sweep_expired(&mut self, me: i64) -> Result<Vec<i64>, rusqlite::Error> {
        let ids: Vec<(i64, i64, i64)> = self
            .tx
            .prepare_cached(
                "SELECT id, pid, expires_ms FROM sessions WHERE expires_ms < ?1 AND id <> ?2",
            )?
            .query_map(params![self.now, me], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, pid, expires) in ids {
            let n = self.expire_session(id)?;
            tracing::info!(
                session = id,
                pid,
                lapsed_ms = self.now - expires,
                ephemerals = n,
                "expired the session of a process that stopped renewing its lease"
            );
            out.push(id);
        }
        Ok(out)
    }

    /// Deletes ephemeral records whose session row is gone (only a
    /// hand-edited file has them; our own code removes both together).
    pub(crate) fn sweep_orphans(&mut self) -> Result<usize, rusqlite::Error> {
        let paths: Vec<String> = self
            .tx
            .prepare_cached(
                "SELECT path FROM records
                 WHERE owner <> 0 AND owner NOT IN (SELECT id FROM sessions)
                 ORDER BY path DESC",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for p in &paths {
            tracing::warn!(path = %p, "deleting an ephemeral record whose session is gone");
            self.remove(p)?;
        }
        Ok(paths.len())
    }

    /// Drops all but the last `keep` change feed entries.
    pub(crate) fn cap_changes(&mut self, keep: i64) -> Result<usize, rusqlite::Error> {
        self.prune_changes(self.zxid - keep)
    }

    /// Drops change feed entries up to `zxid`.
    pub(crate) fn prune_changes(&mut self, zxid: i64) -> Result<usize, rusqlite::Error> {
        self.tx
            .prepare_cached("DELETE FROM changes WHERE zxid <= ?1")?
            .execute([zxid])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = connect(&dir.path().join("t.db"), &SqliteOptions::default()).expect("open");
        init(&mut conn, Duration::from_secs(5)).expect("init");
        (dir, conn)
    }

    #[test]
    fn connections_use_wal_and_the_chosen_durability() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.db");
        for (sync, level) in [
            (crate::Synchronous::Full, 2),
            (crate::Synchronous::Normal, 1),
        ] {
            let mut conn =
                connect(&path, &SqliteOptions::default().with_synchronous(sync)).expect("open");
            init(&mut conn, Duration::from_secs(5)).expect("init");
            let got: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("pragma");
            assert_eq!(got, level, "{sync:?}");
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .expect("pragma");
            assert_eq!(mode, "wal");
        }
    }

    #[test]
    fn bounds_of_a_subtree_follow_byte_order() {
        let (lo, hi) = below("/a/b");
        for inside in ["/a/b/c", "/a/b/c/d", "/a/b/~"] {
            assert!(inside >= lo.as_str() && inside < hi.as_str(), "{inside}");
        }
        for outside in ["/a/b", "/a/b-c", "/a/b.c", "/a/b0", "/a/bc", "/a/c"] {
            assert!(
                !(outside >= lo.as_str() && outside < hi.as_str()),
                "{outside}"
            );
        }
    }

    #[test]
    fn every_change_gets_the_next_zxid_and_a_feed_entry() {
        let (_dir, mut conn) = fresh();
        let mut t = Txn::begin(&mut conn).expect("begin");
        let (session, _) = t.open_session(1000).expect("session");
        t.create(session, "/a/b", b"x", CreateMode::Persistent)
            .expect("create");
        t.set("/a/b", b"y", Some(0)).expect("set");
        t.delete("/a/b", None).expect("delete");
        assert!(t.commit().expect("commit"));
        let feed = changes_since(&conn, 0).expect("feed");
        let got: Vec<(i64, ChangeKind, &str)> = feed
            .iter()
            .map(|c| (c.zxid, c.kind, c.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, ChangeKind::Created, "/a"),
                (2, ChangeKind::Created, "/a/b"),
                (3, ChangeKind::Changed, "/a/b"),
                (4, ChangeKind::Deleted, "/a/b"),
            ]
        );
        assert_eq!(current_zxid(&conn).expect("zxid"), 4);
        let a = get(&conn, "/a")
            .expect("get")
            .expect("exists")
            .expect("decodes");
        assert_eq!(a.stat.num_children, 0);
        assert_eq!(a.cversion, 2, "a create and a delete of a child");
    }

    #[test]
    fn a_failed_write_is_rolled_back_whole() {
        let (_dir, mut conn) = fresh();
        let mut t = Txn::begin(&mut conn).expect("begin");
        let (session, _) = t.open_session(1000).expect("session");
        t.create(session, "/x", b"", CreateMode::Ephemeral)
            .expect("create");
        t.commit().expect("commit");
        let mut t = Txn::begin(&mut conn).expect("begin");
        let r = t.create(session, "/x/y/z", b"", CreateMode::Persistent);
        assert!(
            matches!(r, Err(DbError::Store(StoreError::Other(ref m))) if m.contains("ephemeral")),
            "{r:?}"
        );
        drop(t);
        assert_eq!(get(&conn, "/x/y").expect("get"), None);
        assert_eq!(current_zxid(&conn).expect("zxid"), 1);
    }

    #[test]
    fn a_failed_attempt_is_undone_alone() {
        let (_dir, mut conn) = fresh();
        let mut t = Txn::begin(&mut conn).expect("begin");
        let ok = t
            .attempt(|t| t.create(0, "/a/x", b"", CreateMode::Persistent))
            .expect("transaction intact");
        assert_eq!(ok.expect("created"), "/a/x");
        let failed = t
            .attempt(|t| {
                // Writes (a missing parent, the record, two change ids),
                // then fails.
                t.create(0, "/b/y", b"", CreateMode::Persistent)?;
                t.set("/a/x", b"v", Some(7))
            })
            .expect("transaction intact");
        assert!(
            matches!(failed, Err(DbError::Store(StoreError::Conflict { .. }))),
            "{failed:?}"
        );
        let seq = t
            .attempt(|t| t.create(0, "/a/s-", b"", CreateMode::PersistentSequential))
            .expect("transaction intact");
        assert_eq!(seq.expect("created"), "/a/s-0000000001");
        assert!(t.commit().expect("commit"));
        assert_eq!(
            get(&conn, "/b").expect("get"),
            None,
            "the failed write is gone"
        );
        let feed: Vec<(i64, String)> = changes_since(&conn, 0)
            .expect("feed")
            .into_iter()
            .map(|c| (c.zxid, c.path))
            .collect();
        assert_eq!(
            feed,
            [
                (1, "/a".to_owned()),
                (2, "/a/x".to_owned()),
                (3, "/a/s-0000000001".to_owned())
            ],
            "the failed write's change ids were reused"
        );
        assert_eq!(current_zxid(&conn).expect("zxid"), 3);
    }

    #[test]
    fn rows_with_wrong_types_are_malformed_not_errors() {
        let (_dir, mut conn) = fresh();
        let mut t = Txn::begin(&mut conn).expect("begin");
        t.create(0, "/ok", b"1", CreateMode::Persistent)
            .expect("create");
        t.commit().expect("commit");
        conn.execute(
            "INSERT INTO records (path, parent, data, version, czxid, mzxid, ctime, mtime,
                 owner, num_children, cversion)
             VALUES ('/bad', '/', x'', 'seven', 0, 0, 0, 0, 0, 0, 0)",
            [],
        )
        .expect("insert");
        let (ok, bad) = scan(&conn, "/").expect("scan");
        let paths: Vec<&str> = ok.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/", "/ok"]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].path, "/bad");
        assert!(bad[0].reason.contains("version"), "{:?}", bad[0]);
        let one = get(&conn, "/bad").expect("get").expect("exists");
        assert!(one.is_err());
    }

    #[test]
    fn a_foreign_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("other.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
            .expect("create");
        drop(conn);
        let mut conn = connect(&path, &SqliteOptions::default()).expect("open");
        let r = init(&mut conn, Duration::from_secs(5));
        assert!(
            matches!(r, Err(DbError::Store(StoreError::Other(ref m))) if m.contains("something else")),
            "{r:?}"
        );
    }

    #[test]
    fn several_connections_can_create_a_fresh_file_together() {
        // Switching a fresh file to WAL is the step that fails with BUSY
        // without waiting; a rare race, so several rounds.
        for round in 0..25 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("r.db");
            let openers: Vec<_> = (0..3)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || -> Result<(), String> {
                        let mut c = connect(&path, &SqliteOptions::default())
                            .map_err(|e| format!("connect: {e}"))?;
                        init(&mut c, Duration::from_secs(5)).map_err(|e| format!("init: {e:?}"))
                    })
                })
                .collect();
            for o in openers {
                if let Err(e) = o.join().expect("join") {
                    panic!("round {round}: {e}");
                }
            }
        }
    }
}
