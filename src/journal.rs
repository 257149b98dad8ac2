//! The durable journal (`journal=`): every received message is written to an embedded SQLite
//! database with its job id, connection, receipt time and payload before the pool sees it, and
//! its status then moves `received` -> `running` -> `done` | `failed`. At start, the jobs left
//! `received` or `running` by an earlier process (killed, crashed, cut off) run again first
//! (at-least-once), and job ids go on from the largest one written. No PyO3 here.
//!
//! ```text
//!  read loop ──(job, key)──▶ bounded inserts channel ──▶ writer thread: one transaction per
//!                                                          batch, commit, then push the batch
//!  workers ──Started/Finished──▶ bounded updates channel ─▶   into the job queue
//! ```
//!
//! Group commit: the writer takes everything waiting (up to [`MAX_BATCH`] inserts and updates)
//! and writes it in one transaction, so a busy stream pays one commit per batch, not per
//! message; a quiet one commits each message at once. A `Started` and a `Finished` of the same
//! job in one batch become one row update. While the job queue is full the writer keeps
//! applying the workers' updates (they would otherwise wait on it and never free the queue).
//!
//! Durability: WAL with `synchronous=NORMAL` (default) survives the process being killed at
//! any point, since a commit is in the OS before the job is released; a power loss may lose the
//! last commits. `SyncMode::Full` fsyncs every commit and survives that too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::errors::Error;
use crate::job::{extract_key, Job, Kind};
use crate::pool::Processor;
use crate::queue::{JobQueue, Key, Push};
use crate::state::{unix_now, Shared};

/// `PRAGMA application_id` of a wspool journal ("wspl").
pub const APPLICATION_ID: i32 = 0x7773_706c;
/// The schema this version writes; a journal with a larger `user_version` is refused.
pub const SCHEMA_VERSION: i32 = 1;
/// Most inserts (and, separately, updates) written in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Recovered jobs are read from the journal this many at a time.
const RECOVERY_CHUNK: usize = 512;

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// `synchronous=NORMAL`: survives a killed process, not a power loss.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is fsynced; survives a power loss.
    Full,
}

impl std::str::FromStr for SyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(SyncMode::Normal),
            "full" => Ok(SyncMode::Full),
            other => Err(format!(
                "journal_sync must be \"normal\" or \"full\", not {other:?}"
            )),
        }
    }
}

/// Where the journal of a stream lives (`Config::journal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSpec {
    pub path: PathBuf,
    pub sync: SyncMode,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Written, waiting for a worker (or left by a process that ended before running it).
    Received,
    /// A worker started it; no result written yet.
    Running,
    /// The handler returned a value.
    Done,
    /// The handler raised (after its retries), the payload did not decode, or wspool failed.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Received => "received",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "received" => Status::Received,
            "running" => Status::Running,
            "done" => Status::Done,
            "failed" => Status::Failed,
            other => {
                return Err(format!(
                    "status must be \"received\", \"running\", \"done\" or \"failed\", not \
                     {other:?}"
                ))
            }
        })
    }
}

/// A handler's value as stored: JSON when it serialises, else its repr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    pub text: String,
    pub json: bool,
}

/// How a job ended, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `value` is None when there is nothing to store beyond the payload (no handler).
    Done {
        value: Option<StoredValue>,
    },
    Failed {
        error_type: String,
        message: String,
    },
}

impl Outcome {
    /// What is known without looking into a result: success or an unnamed failure.
    pub fn plain(ok: bool) -> Self {
        if ok {
            Outcome::Done { value: None }
        } else {
            Outcome::Failed {
                error_type: "Error".into(),
                message: String::new(),
            }
        }
    }
}

/// Tells the journal how a job ended from the processor's output and its success flag.
pub type Describe<O> = Arc<dyn Fn(&O, bool) -> Outcome + Send + Sync>;

/// One row of the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: u64,
    pub connection: u32,
    pub kind: Kind,
    pub received_at: f64,
    pub payload: Vec<u8>,
    pub status: Status,
    /// Times a worker started the job: more than 1 means it ran again after a restart.
    pub attempts: u32,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub value: Option<StoredValue>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
}

/// Jobs per status, and how many extra runs the at-least-once recovery caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub received: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub total: u64,
    /// Jobs started more than once.
    pub rerun: u64,
    /// Runs beyond the first, summed over all jobs: sum(attempts - 1).
    pub duplicates: u64,
}

/// An open journal: checks the file, creates the schema, reads and changes rows. The stream's
/// writer thread owns one; `wspool.Journal` and the CLI open their own (SQLite's WAL lets them
/// read while a consumer writes).
pub struct Journal {
    conn: Connection,
    path: PathBuf,
    /// The writer's: told after each commit, so that the checkpoints happen on another thread.
    checkpoints: Option<flume::Sender<()>>,
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    connection INTEGER NOT NULL,
    kind TEXT NOT NULL,
    received_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE states (
    id INTEGER PRIMARY KEY REFERENCES jobs (id),
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    value TEXT,
    value_format TEXT,
    error_type TEXT,
    error_message TEXT
);
CREATE INDEX states_pending ON states (id) WHERE status IN ('received', 'running');
CREATE INDEX states_failed ON states (id) WHERE status = 'failed';
CREATE VIEW job_status AS SELECT * FROM jobs JOIN states USING (id);
";

// A job's row never changes after it is written; its state lives in a small row of its own, so
// that the updates of a busy stream rewrite little (a grown row would split full pages).
const COLUMNS: &str =
    "j.id, j.connection, j.kind, j.received_at, j.payload, s.status, s.attempts, \
                       s.started_at, s.finished_at, s.value, s.value_format, s.error_type, \
                       s.error_message FROM jobs j JOIN states s ON s.id = j.id";

impl Journal {
    /// Opens the journal at `path`. `create`: make it (and its schema) if the file is missing
    /// or empty; else a missing file is an error. Anything that is not a wspool journal of a
    /// schema this version knows is refused with `Error::Journal`, naming the path.
    pub fn open(path: &Path, create: bool, sync: SyncMode) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let err = |message: String| Error::Journal {
            path: shown.clone(),
            message,
        };
        if !create && !path.exists() {
            return Err(err("no such file".into()));
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let mut journal = Journal {
            conn,
            path: path.to_path_buf(),
            checkpoints: None,
        };
        journal
            .conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(|e| journal.sql(e))?;
        journal.check(create)?;
        let sync = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        journal
            .conn
            .pragma_update(None, "synchronous", sync)
            .map_err(|e| journal.sql(e))?;
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, e: rusqlite::Error) -> Error {
        Error::Journal {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn refuse(&self, why: String) -> Error {
        Error::Journal {
            path: self.path.display().to_string(),
            message: why,
        }
    }

    fn check(&mut self, create: bool) -> Result<(), Error> {
        let app_id: i32 = match self
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
        {
            Ok(id) => id,
            Err(e) if is_not_a_database(&e) => {
                return Err(
                    self.refuse("not a wspool journal (the file is not an SQLite database)".into())
                )
            }
            Err(e) => return Err(self.sql(e)),
        };
        if app_id == 0 {
            let tables: i64 = self
                .conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(|e| self.sql(e))?;
            if tables > 0 {
                return Err(self.refuse(
                    "not a wspool journal (an SQLite database of another application)".into(),
                ));
            }
            if !create {
                return Err(self.refuse("not a wspool journal (an empty database)".into()));
            }
            return self.create();
        }
        if app_id != APPLICATION_ID {
            return Err(self.refuse(format!(
                "not a wspool journal (SQLite application_id {app_id:#x}, wspool's is \
                 {APPLICATION_ID:#x})"
            )));
        }
        let version: i32 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        if version > SCHEMA_VERSION {
            return Err(self.refuse(format!(
                "written by a newer wspool (journal schema {version}; this version reads up to \
                 {SCHEMA_VERSION})"
            )));
        }
        let has_jobs: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
                 AND name IN ('jobs', 'states', 'meta')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        if has_jobs != 3 {
            return Err(self.refuse("damaged wspool journal (tables missing)".into()));
        }
        Ok(())
    }

    fn create(&mut self) -> Result<(), Error> {
        // Set before the first table. 16 KiB pages made the writer's status updates about twice
        // as cheap as the default 4 KiB (benchmarked: 8 KiB to 64 KiB; 16 KiB was the best).
        self.conn
            .pragma_update(None, "page_size", 16384)
            .map_err(|e| self.sql(e))?;
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(self.refuse(format!("cannot use WAL mode (got {mode})")));
        }
        let path = self.path.display().to_string();
        let sql = |e: rusqlite::Error| Error::Journal {
            path: path.clone(),
            message: e.to_string(),
        };
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute_batch(SCHEMA).map_err(sql)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1), ('created_by', ?2), \
             ('created_at', ?3)",
            params![
                SCHEMA_VERSION.to_string(),
                concat!("wspool ", env!("CARGO_PKG_VERSION")),
                unix_now().to_string()
            ],
        )
        .map_err(sql)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(sql)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// The id the next received message gets: one more than the largest written.
    pub fn next_id(&self) -> Result<u64, Error> {
        let max: Option<i64> = self
            .conn
            .query_row("SELECT max(id) FROM jobs", [], |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        Ok(max.map_or(0, |m| m as u64 + 1))
    }

    /// Jobs left `received` or `running`: the ones a start re-runs.
    pub fn pending_count(&self) -> Result<u64, Error> {
        self.conn
            .query_row(
                "SELECT count(*) FROM states WHERE status IN ('received', 'running')",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.sql(e))
    }

    /// Up to `limit` jobs left `received` or `running` with an id above `after`, by id.
    pub fn pending_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<Job>, Error> {
        let after = after.map_or(-1, |a| a as i64);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT j.id, j.kind, j.payload, j.received_at, j.connection \
                 FROM states s JOIN jobs j ON j.id = s.id \
                 WHERE s.status IN ('received', 'running') AND s.id > ?1 ORDER BY s.id LIMIT ?2",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok(Job {
                    id: r.get::<_, i64>(0)? as u64,
                    kind: kind_of(&r.get::<_, String>(1)?),
                    payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    received_at: r.get(3)?,
                    connection: r.get(4)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    pub fn get(&self, id: u64) -> Result<Option<Record>, Error> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        self.conn
            .query_row(&format!("SELECT {COLUMNS} WHERE s.id = ?1"), [id], record)
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// The newest `limit` jobs (largest ids first), of one status or all.
    pub fn list(&self, status: Option<Status>, limit: usize) -> Result<Vec<Record>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (filter, arg) = match status {
            // Spelled as the partial indexes are, so that SQLite uses them.
            Some(Status::Received | Status::Running) => (
                "WHERE s.status IN ('received', 'running') AND s.status = ?2",
                status,
            ),
            Some(Status::Failed) => ("WHERE s.status = 'failed' AND s.status = ?2", status),
            Some(Status::Done) => ("WHERE s.status = ?2", status),
            None => ("WHERE ?2 IS NULL", None),
        };
        let sql = format!("SELECT {COLUMNS} {filter} ORDER BY s.id DESC LIMIT ?1");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![limit, arg.map(Status::as_str)], record)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Puts a job back to `received` (its result and error cleared) so that the next start of
    /// a consumer on this journal runs it again. None if there is no such job; else the status
    /// it had.
    pub fn retry(&self, id: u64) -> Result<Option<Status>, Error> {
        let Some(before) = self.get(id)?.map(|r| r.status) else {
            return Ok(None);
        };
        self.conn
            .execute(
                "UPDATE states SET status = 'received', finished_at = NULL, value = NULL, \
                 value_format = NULL, error_type = NULL, error_message = NULL WHERE id = ?1",
                [id as i64],
            )
            .map_err(|e| self.sql(e))?;
        Ok(Some(before))
    }

    pub fn counts(&self) -> Result<Counts, Error> {
        let mut counts = Counts::default();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT status, count(*), sum(attempts > 1), sum(max(attempts - 1, 0)) \
                 FROM states GROUP BY status",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                    r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                ))
            })
            .map_err(|e| self.sql(e))?;
        for row in rows {
            let (status, n, rerun, extra) = row.map_err(|e| self.sql(e))?;
            match status.parse::<Status>() {
                Ok(Status::Received) => counts.received += n,
                Ok(Status::Running) => counts.running += n,
                Ok(Status::Done) => counts.done += n,
                Ok(Status::Failed) => counts.failed += n,
                Err(_) => {}
            }
            counts.total += n;
            counts.rerun += rerun;
            counts.duplicates += extra;
        }
        Ok(counts)
    }

    /// Writes one batch in one transaction: new jobs as `received`, then the status changes.
    fn write(
        &mut self,
        inserts: &[(Job, Option<Key>)],
        updates: &mut Updates,
    ) -> Result<(), Error> {
        if inserts.is_empty() && updates.is_empty() {
            return Ok(());
        }
        let path = self.path.display().to_string();
        let sql = |e: rusqlite::Error| Error::Journal {
            path: path.clone(),
            message: format!("cannot write: {e}"),
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, connection, kind, received_at, payload) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            let mut received = tx
                .prepare_cached("INSERT INTO states (id, status) VALUES (?1, 'received')")
                .map_err(sql)?;
            for (job, _) in inserts {
                insert
                    .execute(params![
                        job.id as i64,
                        job.connection,
                        job.kind.as_str(),
                        job.received_at,
                        &job.payload[..]
                    ])
                    .map_err(sql)?;
                received.execute([job.id as i64]).map_err(sql)?;
            }
            let mut start = tx
                .prepare_cached(
                    "UPDATE states SET status = 'running', attempts = attempts + 1, \
                     started_at = ?2 WHERE id = ?1",
                )
                .map_err(sql)?;
            let mut finish = tx
                .prepare_cached(
                    "UPDATE states SET status = ?2, attempts = attempts + ?3, \
                     started_at = coalesce(?4, started_at), finished_at = ?5, value = ?6, \
                     value_format = ?7, error_type = ?8, error_message = ?9 WHERE id = ?1",
                )
                .map_err(sql)?;
            for (id, change) in updates.order.drain(..) {
                match change.finished {
                    None => {
                        start
                            .execute(params![id as i64, change.started_at])
                            .map_err(sql)?;
                    }
                    Some((at, outcome)) => {
                        let (status, value, error) = match outcome {
                            Outcome::Done { value } => (Status::Done, value, None),
                            Outcome::Failed {
                                error_type,
                                message,
                            } => (Status::Failed, None, Some((error_type, message))),
                        };
                        let (text, format) = match value {
                            Some(v) => (Some(v.text), Some(if v.json { "json" } else { "repr" })),
                            None => (None, None),
                        };
                        let (etype, emsg) = error.unzip();
                        finish
                            .execute(params![
                                id as i64,
                                status.as_str(),
                                i64::from(change.started_at.is_some()),
                                change.started_at,
                                at,
                                text,
                                format,
                                etype,
                                emsg
                            ])
                            .map_err(sql)?;
                    }
                }
            }
            updates.index.clear();
        }
        tx.commit().map_err(sql)?;
        if let Some(kick) = &self.checkpoints {
            let _ = kick.try_send(());
        }
        Ok(())
    }

    #[cfg(test)]
    fn limit_pages(&self, pages: i64) {
        self.conn
            .pragma_update(None, "max_page_count", pages)
            .expect("max_page_count");
    }
}

fn is_not_a_database(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase
    )
}

fn kind_of(s: &str) -> Kind {
    if s == "binary" {
        Kind::Binary
    } else {
        Kind::Text
    }
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let value = match (
        r.get::<_, Option<String>>(9)?,
        r.get::<_, Option<String>>(10)?,
    ) {
        (Some(text), format) => Some(StoredValue {
            text,
            json: format.as_deref() != Some("repr"),
        }),
        (None, _) => None,
    };
    Ok(Record {
        id: r.get::<_, i64>(0)? as u64,
        connection: r.get(1)?,
        kind: kind_of(&r.get::<_, String>(2)?),
        received_at: r.get(3)?,
        payload: r.get(4)?,
        status: r.get::<_, String>(5)?.parse().unwrap_or(Status::Received),
        attempts: r.get(6)?,
        started_at: r.get(7)?,
        finished_at: r.get(8)?,
        value,
        error_type: r.get(11)?,
        error_message: r.get(12)?,
    })
}

/// A status change sent by a worker.
#[derive(Debug)]
pub enum Update {
    Started { id: u64, at: f64 },
    Finished { id: u64, at: f64, outcome: Outcome },
}

/// The status changes of one batch, one entry per job in arrival order (a start and a finish
/// of the same job become one row update).
#[derive(Default)]
struct Updates {
    order: Vec<(u64, Change)>,
    index: HashMap<u64, usize>,
}

#[derive(Default)]
struct Change {
    started_at: Option<f64>,
    finished: Option<(f64, Outcome)>,
}

impl Updates {
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn add(&mut self, update: Update) {
        let id = match &update {
            Update::Started { id, .. } | Update::Finished { id, .. } => *id,
        };
        let i = *self.index.entry(id).or_insert_with(|| {
            self.order.push((id, Change::default()));
            self.order.len() - 1
        });
        let change = &mut self.order[i].1;
        match update {
            Update::Started { at, .. } => change.started_at = Some(at),
            Update::Finished { at, outcome, .. } => change.finished = Some((at, outcome)),
        }
    }
}

/// A question to the writer, answered after it has written every update sent before it.
struct Query {
    id: u64,
    reply: flume::Sender<Result<Option<Record>, Error>>,
}

/// What a stream keeps of its journal: status queries (through the writer while it runs, so
/// they see every update already sent) and the count of recovered jobs.
#[derive(Clone)]
pub struct Link {
    path: PathBuf,
    queries: flume::Sender<Query>,
    recovered: Arc<AtomicU64>,
    to_recover: u64,
}

impl Link {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Jobs left unfinished by an earlier run that this stream re-runs (found at start).
    pub fn to_recover(&self) -> u64 {
        self.to_recover
    }

    /// Of those, the ones already handed to the pool.
    pub fn recovered(&self) -> u64 {
        self.recovered.load(Relaxed)
    }

    /// The journal's row for job `id`, with every status change made so far (waits up to
    /// `wait` for the writer; after the stream, reads the file).
    pub fn get(&self, id: u64, wait: Duration) -> Result<Option<Record>, Error> {
        let (tx, rx) = flume::bounded(1);
        let deadline = std::time::Instant::now() + wait;
        let sent = self.queries.send_timeout(Query { id, reply: tx }, wait);
        if sent.is_ok() {
            loop {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(answer) => return answer,
                    // The writer ended (a question it did not take stays unanswered in the
                    // channel): read the file.
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                    Err(_) if self.queries.is_disconnected() => break,
                    Err(_) if std::time::Instant::now() >= deadline => {
                        return Err(Error::Journal {
                            path: self.path.display().to_string(),
                            message: "the journal writer did not answer in time".into(),
                        })
                    }
                    Err(_) => {}
                }
            }
        }
        Journal::open(&self.path, false, SyncMode::Normal)?.get(id)
    }
}

/// The processor wrapper of a journaled stream: reports each job's start and end to the
/// writer, around the real processor. A job the pool never runs (cancelled) keeps its status.
pub struct Journaled<P: Processor> {
    inner: P,
    updates: flume::Sender<Vec<Update>>,
    describe: Describe<P::Output>,
}

thread_local! {
    /// The updates of the batch a worker is running, sent to the writer together once the
    /// batch is done (and whatever it held, the GIL, is let go).
    static BATCH_UPDATES: std::cell::RefCell<Vec<Update>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<P: Processor> Journaled<P> {
    fn note(&self, update: Update) {
        BATCH_UPDATES.with(|b| b.borrow_mut().push(update));
    }
}

impl<P: Processor> Processor for Journaled<P> {
    type Output = P::Output;

    fn process(
        &self,
        job: Job,
        decoded: Result<crate::job::Data, crate::job::DecodeError>,
    ) -> (Self::Output, bool) {
        let id = job.id;
        let started = Update::Started { id, at: unix_now() };
        if self.inner.batchable() {
            // Native work, done in microseconds: `running` is written with `done`.
            self.note(started);
        } else if let Err(flume::TrySendError::Full(mut u)) = self.updates.try_send(vec![started]) {
            // User code, which may take long: `running` goes out at once, unless the writer is
            // behind (then with the rest of the batch; nothing here may wait, the GIL is held).
            self.note(u.remove(0));
        }
        let (output, ok) = self.inner.process(job, decoded);
        let outcome = (self.describe)(&output, ok);
        self.note(Update::Finished {
            id,
            at: unix_now(),
            outcome,
        });
        (output, ok)
    }

    fn batchable(&self) -> bool {
        self.inner.batchable()
    }

    fn worker(&self, work: &mut (dyn FnMut() + Send)) {
        self.inner.worker(work)
    }

    fn batch(&self, work: &mut dyn FnMut()) {
        self.inner.batch(work);
        let updates = BATCH_UPDATES.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if !updates.is_empty() {
            // Fails only once the writer is gone (a journal error, reported already).
            let _ = self.updates.send(updates);
        }
    }

    fn panicked(&self, job: Job, error: Error) -> Self::Output {
        let (id, message) = (job.id, error.to_string());
        let output = self.inner.panicked(job, error);
        self.note(Update::Finished {
            id,
            at: unix_now(),
            outcome: Outcome::Failed {
                error_type: "InternalError".into(),
                message,
            },
        });
        output
    }
}

/// An opened journal, ready to start its writer: `Stream::start` opens it before any thread
/// starts, so a bad file is refused at once.
pub struct Setup {
    journal: Journal,
    /// A second connection, for the checkpoint thread.
    checkpointer: Journal,
    next_id: u64,
    to_recover: u64,
    updates_tx: flume::Sender<Vec<Update>>,
    updates_rx: flume::Receiver<Vec<Update>>,
    capacity: usize,
}

/// A run of messages the read loop read, with their keys: it sends each run as one batch.
pub type Received = Vec<(Job, Option<Key>)>;
/// The channel a stream's read loop hands received jobs to the writer on.
pub type Inserts = flume::Sender<Received>;

impl Setup {
    pub fn open(spec: &JournalSpec, capacity: usize) -> Result<Self, Error> {
        let journal = Journal::open(&spec.path, true, spec.sync)?;
        // Copying the WAL back into the database (with its fsyncs) costs more than the writes:
        // a helper thread does it, so the writer's commits never wait for it.
        journal
            .conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| journal.sql(e))?;
        let checkpointer = Journal::open(&spec.path, false, spec.sync)?;
        let next_id = journal.next_id()?;
        let to_recover = journal.pending_count()?;
        // In batches (a worker's batch, up to 64 jobs, sends one): about `capacity` jobs.
        let (updates_tx, updates_rx) = flume::bounded(capacity.div_ceil(64).max(8));
        Ok(Setup {
            journal,
            checkpointer,
            next_id,
            to_recover,
            updates_tx,
            updates_rx,
            capacity: capacity.max(1),
        })
    }

    /// The id of the first message this run receives.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Wraps the pool's processor so that workers report to this journal.
    pub fn wrap<P: Processor>(&self, inner: P, describe: Describe<P::Output>) -> Journaled<P> {
        Journaled {
            inner,
            updates: self.updates_tx.clone(),
            describe,
        }
    }

    /// Starts the writer thread: it re-runs the recovered jobs first, then writes and releases
    /// what the read loop sends until that channel closes; then it closes `queue` and keeps
    /// writing the workers' updates until they are all gone.
    pub fn spawn(
        self,
        queue: Arc<JobQueue>,
        shared: Arc<Shared>,
        key: Option<String>,
    ) -> Result<(JoinHandle<()>, Link, Inserts), Error> {
        // Bounded in batches of up to 64 messages (the read loop's runs): about `capacity` jobs.
        let (inserts_tx, inserts_rx) = flume::bounded(self.capacity.div_ceil(64).max(4));
        let (queries_tx, queries_rx) = flume::bounded(16);
        let recovered = Arc::new(AtomicU64::new(0));
        let link = Link {
            path: self.journal.path.clone(),
            queries: queries_tx,
            recovered: recovered.clone(),
            to_recover: self.to_recover,
        };
        let Setup {
            mut journal,
            checkpointer,
            updates_tx,
            updates_rx,
            ..
        } = self;
        let (kick, kicks) = flume::bounded(1);
        journal.checkpoints = Some(kick);
        let checkpoint_guard = shared.thread_guard();
        // Only the workers may keep the updates channel open.
        drop(updates_tx);
        let guard = shared.thread_guard();
        let writer = Writer {
            journal,
            inserts: Some(inserts_rx),
            updates: Some(updates_rx),
            queries: Some(queries_rx),
            queue: queue.clone(),
            shared: shared.clone(),
            key,
            pending: Updates::default(),
            asked: Vec::new(),
            recovered,
        };
        let handle = std::thread::Builder::new()
            .name(format!("{}journal", crate::stream::THREAD_PREFIX))
            .spawn(move || {
                let _guard = guard;
                let queue = writer.queue.clone();
                let ran = std::thread::scope(|scope| {
                    // Without the helper (it could not start), SQLite checkpoints when the
                    // journal is closed: the WAL only grows meanwhile.
                    let _helper = std::thread::Builder::new()
                        .name(format!("{}checkpoint", crate::stream::THREAD_PREFIX))
                        .spawn_scoped(scope, move || {
                            let _guard = checkpoint_guard;
                            checkpoints(&checkpointer, &kicks);
                        });
                    // When the writer (and its kick sender) is gone, the helper ends.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run()))
                });
                let error = match ran {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(payload) => Some(Error::Internal(format!(
                        "the journal writer panicked: {}",
                        crate::errors::panic_message(payload.as_ref())
                    ))),
                };
                if let Some(e) = error {
                    shared.set_error(e);
                }
                // Whatever happened, the workers may finish what they have.
                queue.close();
            })
            .map_err(|e| Error::Internal(format!("cannot start the journal thread: {e}")))?;
        Ok((handle, link, inserts_tx))
    }
}

/// The checkpoint thread: after commits (at most every 20 ms), copies what the WAL holds back
/// into the database without blocking the writer (PASSIVE), so the WAL stays small.
fn checkpoints(journal: &Journal, kicks: &flume::Receiver<()>) {
    while kicks.recv().is_ok() {
        // A failure here (a full disk) shows up in the writer's next commit.
        let _ = journal
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        std::thread::sleep(Duration::from_millis(20));
    }
}

enum Event {
    Insert(Result<Received, flume::RecvError>),
    Update(Result<Vec<Update>, flume::RecvError>),
    Query(Result<Query, flume::RecvError>),
    Idle,
}

struct Writer {
    journal: Journal,
    inserts: Option<flume::Receiver<Received>>,
    updates: Option<flume::Receiver<Vec<Update>>>,
    queries: Option<flume::Receiver<Query>>,
    queue: Arc<JobQueue>,
    shared: Arc<Shared>,
    key: Option<String>,
    pending: Updates,
    asked: Vec<Query>,
    recovered: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self) -> Result<(), Error> {
        let result = self.serve();
        if let Err(e) = &result {
            // Nobody gets an answer from a writer that failed: say why.
            for q in self.asked.drain(..) {
                let _ = q.reply.send(Err(e.clone()));
            }
            // Jobs still on their way are not journaled, so they are not run (nor lost
            // silently: the stream ends with this error, and they are counted as cancelled).
            if let Some(rx) = self.inserts.take() {
                for _ in rx.drain() {
                    self.shared.on_cancelled();
                }
            }
        }
        result
    }

    fn serve(&mut self) -> Result<(), Error> {
        self.recover()?;
        let mut batch: Vec<(Job, Option<Key>)> = Vec::new();
        loop {
            if self.inserts.is_none() {
                // Every received job is in the queue: the workers may end once it is empty.
                self.queue.close();
                if self.updates.is_none() {
                    break;
                }
            }
            let event = self.wait(None);
            self.take(event, &mut batch);
            self.gather(&mut batch);
            self.journal.write(&batch, &mut self.pending)?;
            self.answer()?;
            for (job, key) in batch.drain(..) {
                self.release(job, key)?;
            }
        }
        self.journal.write(&[], &mut self.pending)?;
        // Questions asked meanwhile are answered; later ones read the file (see `Link::get`).
        if let Some(rx) = self.queries.take() {
            self.asked.extend(rx.drain());
        }
        self.answer()
    }

    /// Waits for the next event on any open channel (`timeout` None: until one comes).
    fn wait(&self, timeout: Option<Duration>) -> Event {
        let mut selector = flume::Selector::new();
        if let Some(rx) = &self.inserts {
            selector = selector.recv(rx, Event::Insert);
        }
        if let Some(rx) = &self.updates {
            selector = selector.recv(rx, Event::Update);
        }
        if let Some(rx) = &self.queries {
            selector = selector.recv(rx, Event::Query);
        }
        match timeout {
            Some(t) => selector.wait_timeout(t).unwrap_or(Event::Idle),
            None if self.inserts.is_none() && self.updates.is_none() && self.queries.is_none() => {
                Event::Idle
            }
            None => selector.wait(),
        }
    }

    fn take(&mut self, event: Event, batch: &mut Vec<(Job, Option<Key>)>) {
        match event {
            Event::Insert(Ok(items)) => batch.extend(items),
            Event::Insert(Err(_)) => self.inserts = None,
            Event::Update(Ok(us)) => us.into_iter().for_each(|u| self.pending.add(u)),
            Event::Update(Err(_)) => self.updates = None,
            Event::Query(Ok(q)) => self.asked.push(q),
            Event::Query(Err(_)) => self.queries = None,
            Event::Idle => {}
        }
    }

    /// Takes what else is waiting, without waiting: the group of the group commit.
    fn gather(&mut self, batch: &mut Vec<(Job, Option<Key>)>) {
        if let Some(rx) = &self.inserts {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(items) => batch.extend(items),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        self.inserts = None;
                        break;
                    }
                }
            }
        }
        self.gather_updates();
    }

    fn gather_updates(&mut self) {
        if let Some(rx) = &self.updates {
            while self.pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(us) => us.into_iter().for_each(|u| self.pending.add(u)),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        self.updates = None;
                        break;
                    }
                }
            }
        }
        if let Some(rx) = &self.queries {
            self.asked.extend(rx.try_iter());
        }
    }

    /// Answers the status queries, after writing every update received before them.
    fn answer(&mut self) -> Result<(), Error> {
        if self.asked.is_empty() {
            return Ok(());
        }
        // Updates sent before the question may still be in the channel: take them all.
        loop {
            let before = self.pending.len();
            self.gather_updates();
            if self.pending.len() == before || self.pending.len() >= MAX_BATCH {
                break;
            }
        }
        self.journal.write(&[], &mut self.pending)?;
        for q in std::mem::take(&mut self.asked) {
            let _ = q.reply.send(self.journal.get(q.id));
        }
        Ok(())
    }

    /// Hands a written job to the pool, waiting while the queue is full. Meanwhile the workers'
    /// updates keep being written: each job a worker takes sends one, which also wakes this.
    fn release(&mut self, mut job: Job, mut key: Option<Key>) -> Result<(), Error> {
        loop {
            if self.shared.is_cancelled() {
                // Stays `received` in the journal: the next start runs it.
                self.shared.on_cancelled();
                return Ok(());
            }
            match self.queue.try_push(job, key) {
                Push::Done { dropped } => {
                    if dropped > 0 {
                        self.shared.on_dropped(dropped);
                    }
                    return Ok(());
                }
                // Journaled streams block on a full queue; count it if a policy ever says so.
                Push::Overflow => {
                    self.shared.on_dropped(1);
                    return Ok(());
                }
                Push::Full(j, k) => (job, key) = (j, k),
            }
            let event = match (&self.updates, &self.queries) {
                (None, None) => {
                    std::thread::sleep(Duration::from_millis(2));
                    Event::Idle
                }
                _ => self.wait_updates(Duration::from_millis(5)),
            };
            if let Event::Insert(_) = event {
                unreachable_insert();
            }
            self.take(event, &mut Vec::new());
            self.gather_updates();
            self.journal.write(&[], &mut self.pending)?;
            self.answer()?;
        }
    }

    /// Like `wait`, on the updates and the queries only.
    fn wait_updates(&self, timeout: Duration) -> Event {
        let mut selector = flume::Selector::new();
        if let Some(rx) = &self.updates {
            selector = selector.recv(rx, Event::Update);
        }
        if let Some(rx) = &self.queries {
            selector = selector.recv(rx, Event::Query);
        }
        selector.wait_timeout(timeout).unwrap_or(Event::Idle)
    }

    /// Re-runs what an earlier run left `received` or `running`, before any new job.
    fn recover(&mut self) -> Result<(), Error> {
        let mut after = None;
        loop {
            let chunk = self.journal.pending_after(after, RECOVERY_CHUNK)?;
            let Some(last) = chunk.last() else {
                return Ok(());
            };
            after = Some(last.id);
            for job in chunk {
                self.shared.on_received(job.payload.len());
                let key = self
                    .key
                    .as_deref()
                    .and_then(|field| extract_key(&job.payload, field));
                self.release(job, key)?;
                self.recovered.fetch_add(1, Relaxed);
            }
        }
    }
}

#[inline]
fn unreachable_insert() {
    debug_assert!(false, "wait_updates never selects the inserts channel");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Data, DecodeError};
    use crate::queue::{Order, Overflow};

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wspool-journal-{}-{}-{}",
            std::process::id(),
            name,
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("jobs.db")
    }

    fn job(id: u64, payload: &'static [u8]) -> Job {
        Job {
            id,
            kind: Kind::Text,
            payload: Bytes::from_static(payload),
            received_at: 1.5,
            connection: 0,
        }
    }

    fn message(r: Result<Journal, Error>) -> String {
        match r {
            Err(Error::Journal { message, .. }) => message,
            Err(other) => panic!("not a journal error: {other:?}"),
            Ok(_) => panic!("opened"),
        }
    }

    #[test]
    fn creates_reopens_and_refuses_what_is_not_a_journal() {
        let path = temp("open");
        assert!(message(Journal::open(&path, false, SyncMode::Normal)).contains("no such file"));
        let j = Journal::open(&path, true, SyncMode::Normal).unwrap();
        assert_eq!(j.next_id().unwrap(), 0);
        drop(j);
        let j = Journal::open(&path, false, SyncMode::Full).unwrap();
        assert_eq!(j.counts().unwrap(), Counts::default());
        drop(j);

        let garbage = temp("garbage");
        std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
        assert!(message(Journal::open(&garbage, true, SyncMode::Normal))
            .contains("not an SQLite database"));

        let other = temp("other");
        let c = Connection::open(&other).unwrap();
        c.execute_batch("CREATE TABLE t (x)").unwrap();
        drop(c);
        assert!(
            message(Journal::open(&other, true, SyncMode::Normal)).contains("another application")
        );

        let newer = temp("newer");
        drop(Journal::open(&newer, true, SyncMode::Normal).unwrap());
        let c = Connection::open(&newer).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        let m = message(Journal::open(&newer, false, SyncMode::Normal));
        assert!(m.contains("newer wspool"), "{m}");
        match Journal::open(&newer, false, SyncMode::Normal) {
            Err(e) => assert!(e.to_string().contains(&newer.display().to_string())),
            Ok(_) => panic!("opened"),
        }
    }

    /// A processor that fails on b"bad" and echoes the payload otherwise.
    struct Echo;
    impl Processor for Echo {
        type Output = (u64, bool);
        fn process(&self, job: Job, _d: Result<Data, DecodeError>) -> ((u64, bool), bool) {
            let ok = job.payload.as_ref() != b"bad";
            ((job.id, ok), ok)
        }
        fn panicked(&self, job: Job, _e: Error) -> (u64, bool) {
            (job.id, false)
        }
    }

    fn describe() -> Describe<(u64, bool)> {
        Arc::new(|out: &(u64, bool), ok| {
            if ok {
                Outcome::Done {
                    value: Some(StoredValue {
                        text: out.0.to_string(),
                        json: true,
                    }),
                }
            } else {
                Outcome::Failed {
                    error_type: "ValueError".into(),
                    message: format!("bad {}", out.0),
                }
            }
        })
    }

    struct Harness {
        queue: Arc<JobQueue>,
        shared: Arc<Shared>,
        processor: Journaled<Echo>,
        writer: JoinHandle<()>,
        link: Link,
        inserts: Option<Inserts>,
    }

    fn start(path: &Path, capacity: usize) -> Result<(Harness, u64), Error> {
        let spec = JournalSpec {
            path: path.to_path_buf(),
            sync: SyncMode::Normal,
        };
        let setup = Setup::open(&spec, capacity)?;
        let next = setup.next_id();
        let queue = Arc::new(JobQueue::new(capacity, Overflow::Block, Order::Completion));
        let shared = Arc::new(Shared::new());
        let processor = setup.wrap(Echo, describe());
        let (writer, link, inserts) = setup.spawn(queue.clone(), shared.clone(), None)?;
        let h = Harness {
            queue,
            shared,
            processor,
            writer,
            link,
            inserts: Some(inserts),
        };
        Ok((h, next))
    }

    impl Harness {
        /// Runs one job the way a worker does.
        fn work_one(&self) -> Option<u64> {
            let popped = self.queue.pop()?;
            if self.shared.is_cancelled() {
                self.shared.on_cancelled();
                return Some(u64::MAX);
            }
            Some(self.run(popped.job))
        }

        /// Runs a job as a worker does: in a batch, whose end sends its updates.
        fn run(&self, job: Job) -> u64 {
            let mut id = None;
            let mut job = Some(job);
            self.processor.batch(&mut || {
                let job = job.take().expect("one job");
                let decoded = Ok(Data::Bytes(job.payload.clone()));
                id = Some(self.processor.process(job, decoded).0 .0);
            });
            id.expect("ran")
        }

        fn finish(mut self) -> Arc<Shared> {
            drop(self.inserts.take());
            while self.work_one().is_some() {}
            drop(self.processor);
            self.writer.join().unwrap();
            self.shared
        }
    }

    #[test]
    fn writes_before_releasing_and_records_each_outcome() {
        let path = temp("outcomes");
        let (h, next) = start(&path, 8).unwrap();
        assert_eq!(next, 0);
        let tx = h.inserts.clone().unwrap();
        tx.send(vec![(job(0, b"ok"), None)]).unwrap();
        tx.send(vec![(job(1, b"bad"), None)]).unwrap();
        // A job reaches the pool only once its row is committed: a second connection sees it.
        let popped = h.queue.pop().unwrap();
        let reader = Journal::open(&path, false, SyncMode::Normal).unwrap();
        let row = reader.get(popped.job.id).unwrap().unwrap();
        assert_eq!(row.status, Status::Received);
        assert_eq!(row.payload, b"ok");
        assert_eq!(row.attempts, 0);
        h.run(popped.job);
        // The link's answer includes every update sent before the question.
        let seen = h.link.get(0, Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(seen.status, Status::Done);
        assert_eq!(seen.attempts, 1);
        assert_eq!(
            seen.value,
            Some(StoredValue {
                text: "0".into(),
                json: true
            })
        );
        assert_eq!(h.work_one(), Some(1));
        let bad = h.link.get(1, Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(bad.status, Status::Failed);
        assert_eq!(bad.error_type.as_deref(), Some("ValueError"));
        assert_eq!(bad.error_message.as_deref(), Some("bad 1"));
        assert_eq!(h.link.get(7, Duration::from_secs(5)).unwrap(), None);
        drop(tx);
        let shared = h.finish();
        assert_eq!(shared.snapshot().cancelled, 0);
        let counts = reader.counts().unwrap();
        assert_eq!((counts.done, counts.failed, counts.total), (1, 1, 2));
        assert_eq!(reader.list(Some(Status::Failed), 10).unwrap()[0].id, 1);
        assert_eq!(reader.list(None, 1).unwrap()[0].id, 1);
        assert_eq!(reader.retry(1).unwrap(), Some(Status::Failed));
        assert_eq!(reader.retry(99).unwrap(), None);
        let again = reader.get(1).unwrap().unwrap();
        assert_eq!((again.status, again.error_type), (Status::Received, None));
        // After the stream, the link reads the file.
        assert_eq!(
            h_link_status(&h_link(&path)),
            Some(Status::Received),
            "a retried job is received again"
        );
    }

    fn h_link(path: &Path) -> Link {
        let (tx, _rx) = flume::bounded(1);
        drop(_rx);
        Link {
            path: path.to_path_buf(),
            queries: tx,
            recovered: Arc::default(),
            to_recover: 0,
        }
    }

    fn h_link_status(link: &Link) -> Option<Status> {
        link.get(1, Duration::from_secs(1))
            .unwrap()
            .map(|r| r.status)
    }

    #[test]
    fn a_restart_reruns_unfinished_jobs_first_and_ids_go_on() {
        let path = temp("recover");
        let (h, _) = start(&path, 4).unwrap();
        let tx = h.inserts.clone().unwrap();
        for i in 0..6 {
            tx.send(vec![(job(i, b"x"), None)]).unwrap();
        }
        // Two run to the end, one is left running, three received: then the process "dies".
        assert_eq!(h.work_one(), Some(0));
        assert_eq!(h.work_one(), Some(1));
        let running = h.queue.pop().unwrap();
        h.processor
            .updates
            .send(vec![Update::Started {
                id: running.job.id,
                at: 2.0,
            }])
            .unwrap();
        assert_eq!(
            h.link
                .get(2, Duration::from_secs(5))
                .unwrap()
                .unwrap()
                .status,
            Status::Running
        );
        drop(tx);
        h.shared.set_cancelled();
        h.finish();

        let (h, next) = start(&path, 2).unwrap();
        assert_eq!(next, 6, "ids go on after the largest written");
        assert_eq!(h.link.to_recover(), 4);
        h.inserts
            .clone()
            .unwrap()
            .send(vec![(job(6, b"x"), None)])
            .unwrap();
        let order: Vec<u64> = (0..5).filter_map(|_| h.work_one()).collect();
        assert_eq!(order, vec![2, 3, 4, 5, 6], "recovered jobs come first");
        assert_eq!(h.link.recovered(), 4);
        let shared = h.finish();
        assert_eq!(
            shared.snapshot().received,
            4,
            "recovered jobs count as received"
        );
        let j = Journal::open(&path, false, SyncMode::Normal).unwrap();
        let c = j.counts().unwrap();
        assert_eq!((c.done, c.total), (7, 7));
        assert_eq!((c.rerun, c.duplicates), (1, 1), "job 2 ran twice");
        assert_eq!(j.get(2).unwrap().unwrap().attempts, 2);
    }

    #[test]
    fn a_full_disk_ends_the_stream_with_an_error_and_runs_nothing_unwritten() {
        let path = temp("full");
        let (h, _) = start(&path, 64).unwrap();
        drop(h.finish());
        // The writer's connection is private: make the file tiny through a second writer
        // harness whose journal is limited before it writes.
        let spec = JournalSpec {
            path: path.clone(),
            sync: SyncMode::Normal,
        };
        let setup = Setup::open(&spec, 64).unwrap();
        let pages: i64 = setup
            .journal
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        setup.journal.limit_pages(pages);
        let queue = Arc::new(JobQueue::new(64, Overflow::Block, Order::Completion));
        let shared = Arc::new(Shared::new());
        let processor = setup.wrap(Echo, describe());
        let (writer, _link, tx) = setup.spawn(queue.clone(), shared.clone(), None).unwrap();
        static BIG: [u8; 4096] = [b'x'; 4096];
        let mut sent = 0;
        for i in 0..64 {
            if tx.send(vec![(job(i, &BIG), None)]).is_err() {
                break;
            }
            sent += 1;
        }
        drop(tx);
        let mut ran = 0;
        while queue.pop().is_some() {
            ran += 1;
        }
        drop(processor);
        writer.join().unwrap();
        match shared.error() {
            Some(Error::Journal { message, path: p }) => {
                assert!(message.contains("full"), "{message}");
                assert_eq!(p, path.display().to_string());
            }
            other => panic!("expected a journal error, got {other:?}"),
        }
        assert!(ran < sent, "unwritten jobs must not run ({ran} of {sent})");
        let written = Journal::open(&path, false, SyncMode::Normal)
            .unwrap()
            .counts()
            .unwrap()
            .total;
        assert_eq!(ran, written, "exactly the written jobs ran");
    }

    #[test]
    fn a_start_and_a_finish_in_one_batch_are_one_update() {
        let mut u = Updates::default();
        u.add(Update::Started { id: 3, at: 1.0 });
        u.add(Update::Started { id: 4, at: 1.0 });
        u.add(Update::Finished {
            id: 3,
            at: 2.0,
            outcome: Outcome::plain(true),
        });
        assert_eq!(u.len(), 2);
        assert_eq!(u.order[0].0, 3);
        assert!(u.order[0].1.started_at.is_some() && u.order[0].1.finished.is_some());
        assert!(u.order[1].1.finished.is_none());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// The writer's SQLite work alone, 1,000 jobs per transaction (received, then done):
    /// `cargo test --release --lib journal::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn write_speed() {
        let dir = std::env::temp_dir().join(format!("wspool-speed-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut j = Journal::open(&dir.join("j.db"), true, SyncMode::Normal).unwrap();
        if std::env::var("NOCKPT").is_ok() {
            j.conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        }
        if let Ok(v) = std::env::var("CKPT") {
            j.conn
                .pragma_update(None, "wal_autocheckpoint", v.parse::<i64>().unwrap())
                .unwrap();
        }
        if std::env::var("NOUPD").is_ok() {
            j.conn
                .execute_batch("CREATE TABLE IF NOT EXISTS x (id INTEGER PRIMARY KEY)")
                .unwrap();
        }
        let payload = Bytes::from(vec![b'x'; 120]);
        let n = 100_000u64;
        let batch = 1000u64;
        let t = std::time::Instant::now();
        let mut ins_t = Duration::ZERO;
        for b in 0..n / batch {
            let jobs: Vec<(Job, Option<Key>)> = (b * batch..(b + 1) * batch)
                .map(|id| {
                    let job = Job {
                        id,
                        kind: Kind::Text,
                        payload: payload.clone(),
                        received_at: 1.0,
                        connection: 0,
                    };
                    (job, None)
                })
                .collect();
            let t0 = std::time::Instant::now();
            j.write(&jobs, &mut Updates::default()).unwrap();
            ins_t += t0.elapsed();
            let mut u = Updates::default();
            for (job, _) in &jobs {
                u.add(Update::Started {
                    id: job.id,
                    at: 2.0,
                });
                u.add(Update::Finished {
                    id: job.id,
                    at: 3.0,
                    outcome: Outcome::plain(true),
                });
            }
            j.write(&[], &mut u).unwrap();
        }
        let all = t.elapsed();
        eprintln!(
            "{n} jobs: {:.0} jobs/s; inserts {:.2} s, updates {:.2} s",
            n as f64 / all.as_secs_f64(),
            ins_t.as_secs_f64(),
            (all - ins_t).as_secs_f64()
        );
    }
}
