//! The durable journal (`journal=`): every received message is written to an embedded SQLite
//! database with its job id, connection, receipt time and payload before the pool sees it, and
//! its status then moves `received` -> `running` -> `done` | `failed`. At start, the jobs left
//! `received` or `running` by an earlier process (killed, crashed, cut off) run again first
//! (at-least-once), and job ids go on from the largest one written. No PyO3 here.
//!
//! ```text
//!  read loop ──runs of jobs──▶ bounded inserts channel ──▶ writer thread: one transaction per
//!                                                           group, commit, then push the group
//!  workers ──a batch's starts/ends──▶ bounded updates ──▶   into the job queue
//! ```
//!
//! Group commit: the writer takes everything waiting (up to [`MAX_BATCH`] jobs and changes)
//! and writes it in one transaction, so a busy stream pays one commit per group, not per
//! message; a quiet one commits each message at once. Status changes ride along with the next
//! jobs, or wait at most `UPDATE_DELAY`. While the job queue is full the writer keeps applying
//! the workers' changes now and then.
//!
//! Storage is shaped for that path (see `SCHEMA`): jobs are packed by group into chunk blobs,
//! jobs that end `done` on their first run are kept as runs of ids (their values packed with
//! them), and only the other states get rows; the writer remembers what it needs (open chunks,
//! jobs with a row, recent runs).
//!
//! Durability: WAL with `synchronous=NORMAL` (default) survives the process being killed at
//! any point, since a commit is in the OS before the job is released; a power loss may lose the
//! last commits. `SyncMode::Full` fsyncs every commit and survives that too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::config::DbConfig;
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
/// Longest that status changes wait to be written while no new job comes (see `Writer::wait`).
const UPDATE_DELAY: Duration = Duration::from_millis(5);

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
    /// The writer's: what it knows of the jobs it wrote and has not seen finish.
    tracker: Tracker,
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    jobs BLOB NOT NULL
);
CREATE TABLE open_chunks (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE done_runs (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL,
    finished_at REAL NOT NULL,
    vals BLOB
);
CREATE TABLE states (
    id INTEGER PRIMARY KEY,
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
";

// How the journal stores jobs (the file format, schema 1):
// - `chunks`: the received messages, written in the runs the writer commits together: ids
//   `first_id..=last_id`, each job's connection, type, receipt time and payload packed in `jobs`
//   (see `pack`). A message costs a few bytes in a blob, not a row: that is most of the speed.
// - `open_chunks`: the chunks with jobs still unfinished; recovery reads only those. Apart from
//   `chunks`, so that closing one does not rewrite its blob.
// - `done_runs`: runs of ids that ended `done` on their first run. With nothing to store (no
//   handler's value), a run is just its ids (`vals` NULL) and grows as neighbours finish. Jobs
//   with values that finished in one commit make runs whose `vals` packs, per job, its times
//   and value (see `pack_values`), so a value costs a few bytes in a blob, not a row.
// - `states`: every other state a job is in: `running`, `done` with a value, `failed`, and
//   `received` again (recovered, retried). A job is in at most one of `done_runs` and `states`;
//   in neither, it is `received`.

/// Most jobs packed in one chunk: a status query reads the job's chunk whole.
const CHUNK_JOBS: usize = 256;
/// Per job in a chunk: connection (u32), type (u8), receipt time (f64), payload length (u32).
const PACKED_HEAD: usize = 4 + 1 + 8 + 4;

fn pack(jobs: &[(Job, Option<Key>)]) -> Vec<u8> {
    let size = jobs
        .iter()
        .map(|(j, _)| PACKED_HEAD + j.payload.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for (job, _) in jobs {
        out.extend_from_slice(&job.connection.to_le_bytes());
        out.push(u8::from(job.kind == Kind::Binary));
        out.extend_from_slice(&job.received_at.to_le_bytes());
        out.extend_from_slice(&(job.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&job.payload);
    }
    out
}

/// The jobs of a chunk that `keep` wants (by id), in id order from `first_id`; None if the blob
/// is damaged. Only their payloads are copied.
fn unpack(first_id: u64, blob: &[u8], mut keep: impl FnMut(u64) -> bool) -> Option<Vec<Job>> {
    let mut jobs = Vec::new();
    let mut at = 0;
    let mut id = first_id;
    while at < blob.len() {
        let head = blob.get(at..at + PACKED_HEAD)?;
        let len = u32::from_le_bytes(head[13..17].try_into().ok()?) as usize;
        let payload = blob.get(at + PACKED_HEAD..at + PACKED_HEAD + len)?;
        if keep(id) {
            jobs.push(Job {
                id,
                connection: u32::from_le_bytes(head[0..4].try_into().ok()?),
                kind: if head[4] == 1 {
                    Kind::Binary
                } else {
                    Kind::Text
                },
                received_at: f64::from_le_bytes(head[5..13].try_into().ok()?),
                payload: Bytes::copy_from_slice(payload),
            });
        }
        at += PACKED_HEAD + len;
        id += 1;
    }
    Some(jobs)
}

/// Per job of a done run with values: started at (f64), finished at (f64), format (u8: 1 for
/// JSON, 0 for a repr), text length (u32), then the text.
const VALUE_HEAD: usize = 8 + 8 + 1 + 4;

/// A job that ended `done` with a value on its first run, as a done run keeps it.
#[derive(Debug, Clone, PartialEq)]
struct DoneValue {
    started_at: f64,
    finished_at: f64,
    value: StoredValue,
}

fn pack_values<'a>(values: impl Iterator<Item = &'a DoneValue> + Clone) -> Vec<u8> {
    let size = values
        .clone()
        .map(|v| VALUE_HEAD + v.value.text.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for v in values {
        out.extend_from_slice(&v.started_at.to_le_bytes());
        out.extend_from_slice(&v.finished_at.to_le_bytes());
        out.push(u8::from(v.value.json));
        out.extend_from_slice(&(v.value.text.len() as u32).to_le_bytes());
        out.extend_from_slice(v.value.text.as_bytes());
    }
    out
}

/// The values of a done run, in id order; None if the blob is damaged.
fn unpack_values(blob: &[u8]) -> Option<Vec<DoneValue>> {
    let mut values = Vec::new();
    let mut at = 0;
    while at < blob.len() {
        let head = blob.get(at..at + VALUE_HEAD)?;
        let len = u32::from_le_bytes(head[17..21].try_into().ok()?) as usize;
        let text = blob.get(at + VALUE_HEAD..at + VALUE_HEAD + len)?;
        values.push(DoneValue {
            started_at: f64::from_le_bytes(head[0..8].try_into().ok()?),
            finished_at: f64::from_le_bytes(head[8..16].try_into().ok()?),
            value: StoredValue {
                text: String::from_utf8(text.to_vec()).ok()?,
                json: head[16] == 1,
            },
        });
        at += VALUE_HEAD + len;
    }
    Some(values)
}

/// A row of `done_runs`.
struct DoneRun {
    first: u64,
    last: u64,
    finished_at: f64,
    /// Packed values (`pack_values`), one per id; None for a run with nothing stored.
    vals: Option<Vec<u8>>,
}

/// Splits `items` (in id order) into runs of consecutive ids of at most `CHUNK_JOBS` each:
/// (first id, last id, the run).
fn consecutive_runs<'a, T>(
    items: &'a [T],
    id: impl Fn(&T) -> u64 + 'a,
) -> impl Iterator<Item = (u64, u64, &'a [T])> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        let head = id(rest.first()?);
        let n = rest
            .iter()
            .take(CHUNK_JOBS)
            .enumerate()
            .take_while(|(i, item)| id(item) == head + *i as u64)
            .count();
        let (these, after) = rest.split_at(n);
        rest = after;
        Some((head, head + n as u64 - 1, these))
    })
}

/// Whether a done run covers `id`.
fn covered(runs: &[(u64, u64)], id: u64) -> bool {
    runs.iter().any(|&(f, l)| (f..=l).contains(&id))
}

/// A job's row in `states`.
struct StateRow {
    status: Status,
    attempts: u32,
    started_at: Option<f64>,
    finished_at: Option<f64>,
    value: Option<StoredValue>,
    error_type: Option<String>,
    error_message: Option<String>,
}

const STATE_COLUMNS: &str = "status, attempts, started_at, finished_at, value, value_format, \
                             error_type, error_message";

fn state_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StateRow> {
    let value = match (
        r.get::<_, Option<String>>(4)?,
        r.get::<_, Option<String>>(5)?,
    ) {
        (Some(text), format) => Some(StoredValue {
            text,
            json: format.as_deref() != Some("repr"),
        }),
        (None, _) => None,
    };
    Ok(StateRow {
        status: r.get::<_, String>(0)?.parse().unwrap_or(Status::Received),
        attempts: r.get(1)?,
        started_at: r.get(2)?,
        finished_at: r.get(3)?,
        value,
        error_type: r.get(6)?,
        error_message: r.get(7)?,
    })
}

/// The open chunk that recovery re-runs next: its range, and its jobs still to finish.
pub struct Unfinished {
    pub first: u64,
    pub last: u64,
    pub jobs: Vec<Job>,
    /// Those of `jobs` that have a `states` row (their next state updates it).
    pub stated: Vec<u64>,
}

/// What the writer keeps in memory about the jobs it has not seen finish.
#[derive(Default)]
struct Tracker {
    /// Open chunks: first id -> (last id, jobs not finished).
    open: BTreeMap<u64, (u64, u64)>,
    /// Unfinished jobs with a `states` row (started by user code, or recovered with one).
    stated: IdSet,
    /// The latest done runs (first id -> last id), which new runs are merged with.
    runs: BTreeMap<u64, u64>,
}

/// Hashes a job id with one multiplication: ids are distinct integers, not chosen by anyone
/// hostile, and the writer hashes a few per message.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;
type IdSet = HashSet<u64, std::hash::BuildHasherDefault<IdHasher>>;

/// Done runs remembered for merging; older ones stay as they are.
const RECENT_RUNS: usize = 256;

impl Tracker {
    /// Jobs `first..=last` of open chunks finished; a chunk is closed once all of its jobs
    /// have.
    fn finished_range(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        first: u64,
        last: u64,
    ) -> rusqlite::Result<()> {
        let mut closed = Vec::new();
        for (&cf, (cl, left)) in self.open.range_mut(..=last).rev() {
            if *cl < first {
                break;
            }
            let overlap = (*cl).min(last) - cf.max(first) + 1;
            *left = left.saturating_sub(overlap);
            if *left == 0 {
                closed.push(cf);
            }
        }
        for cf in closed {
            self.open.remove(&cf);
            tx.prepare_cached("DELETE FROM open_chunks WHERE first_id = ?1")?
                .execute([cf as i64])?;
        }
        Ok(())
    }

    /// Records `first..=last` as done, merged with an adjacent recent run on either side. A
    /// run changed meanwhile by another connection (a retry splits runs) is not merged with.
    fn add_run(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        first: u64,
        last: u64,
        at: f64,
    ) -> rusqlite::Result<()> {
        let mut to = last;
        if let Some(after) = self.runs.remove(&(last + 1)) {
            let gone = tx
                .prepare_cached("DELETE FROM done_runs WHERE first_id = ?1 AND last_id = ?2")?
                .execute([(last + 1) as i64, after as i64])?;
            if gone == 1 {
                to = after;
            }
        }
        let before = self
            .runs
            .range(..first)
            .next_back()
            .filter(|(_, &l)| l + 1 == first)
            .map(|(&f, &l)| (f, l));
        if let Some((f, l)) = before {
            let grown = tx
                .prepare_cached(
                    "UPDATE done_runs SET last_id = ?3, finished_at = ?4 \
                     WHERE first_id = ?1 AND last_id = ?2",
                )?
                .execute(params![f as i64, l as i64, to as i64, at])?;
            if grown == 1 {
                self.runs.insert(f, to);
                return Ok(());
            }
            self.runs.remove(&f);
        }
        tx.prepare_cached(
            "INSERT INTO done_runs (first_id, last_id, finished_at) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![first as i64, to as i64, at])?;
        self.runs.insert(first, to);
        while self.runs.len() > RECENT_RUNS {
            self.runs.pop_first();
        }
        Ok(())
    }
}

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
            tracker: Tracker::default(),
        };
        journal
            .conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(|e| journal.sql(e))?;
        // Before the check: creating the schema is then synced as the user asked, not fully.
        let sync = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        match journal.conn.pragma_update(None, "synchronous", sync) {
            Err(e) if is_not_a_database(&e) => {}
            other => other.map_err(|e| journal.sql(e))?,
        }
        journal.check(create)?;
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
                 AND name IN ('chunks', 'open_chunks', 'done_runs', 'states', 'meta')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        if has_jobs != 5 {
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
            .query_row("SELECT max(last_id) FROM chunks", [], |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        Ok(max.map_or(0, |m| m as u64 + 1))
    }

    /// Jobs left `received` or `running`: the ones a start re-runs.
    pub fn pending_count(&self) -> Result<u64, Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT first_id, last_id FROM open_chunks")
            .map_err(|e| self.sql(e))?;
        let chunks = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.sql(e))?;
        let mut count = 0;
        for chunk in chunks {
            let (first, last) = chunk.map_err(|e| self.sql(e))?;
            count += self.unfinished_in(first, last)?.0.len() as u64;
        }
        Ok(count)
    }

    /// The ids of `first..=last` left `received` or `running`, and those of them that have a
    /// `states` row.
    fn unfinished_in(&self, first: u64, last: u64) -> Result<(Vec<u64>, Vec<u64>), Error> {
        let states = self.statuses(first, last)?;
        let runs = self.runs_within(first, last)?;
        let mut ids = Vec::new();
        let mut stated = Vec::new();
        for id in first..=last {
            match states.get(&id) {
                Some(Status::Received | Status::Running) => {
                    ids.push(id);
                    stated.push(id);
                }
                Some(_) => {}
                None if !covered(&runs, id) => ids.push(id),
                None => {}
            }
        }
        Ok((ids, stated))
    }

    /// The first open chunk after `after` (by first id), with its jobs left `received` or
    /// `running`, in id order; None when there is no more.
    pub fn unfinished_after(&self, after: Option<u64>) -> Result<Option<Unfinished>, Error> {
        let after = after.map_or(-1, |a| a as i64);
        let chunk = self
            .conn
            .prepare_cached(
                "SELECT c.first_id, c.last_id, c.jobs FROM open_chunks o \
                 JOIN chunks c ON c.first_id = o.first_id \
                 WHERE o.first_id > ?1 ORDER BY o.first_id LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row([after], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .optional()
            })
            .map_err(|e| self.sql(e))?;
        let Some((first, last, blob)) = chunk else {
            return Ok(None);
        };
        let (ids, stated) = self.unfinished_in(first, last)?;
        // Only the unfinished jobs' payloads are copied out of the chunk.
        let jobs = self.unpacked(first, &blob, |id| ids.binary_search(&id).is_ok())?;
        Ok(Some(Unfinished {
            first,
            last,
            jobs,
            stated,
        }))
    }

    /// Marks a chunk as having no unfinished job (recovery skips it).
    pub fn close_chunk(&self, first: u64) -> Result<(), Error> {
        self.conn
            .execute(
                "DELETE FROM open_chunks WHERE first_id = ?1",
                [first as i64],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    fn unpacked(
        &self,
        first: u64,
        blob: &[u8],
        keep: impl FnMut(u64) -> bool,
    ) -> Result<Vec<Job>, Error> {
        unpack(first, blob, keep).ok_or_else(|| {
            self.refuse(format!(
                "damaged wspool journal (the chunk of job {first} cannot be read)"
            ))
        })
    }

    /// The `states` statuses of the ids `first..=last`.
    fn statuses(&self, first: u64, last: u64) -> Result<HashMap<u64, Status>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, status FROM states WHERE id BETWEEN ?1 AND ?2")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([first as i64, last as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?.parse().unwrap_or(Status::Received),
                ))
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// The done runs that overlap `first..=last`.
    fn runs_within(&self, first: u64, last: u64) -> Result<Vec<(u64, u64)>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT first_id, last_id FROM done_runs WHERE first_id <= ?2 AND last_id >= ?1",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([first as i64, last as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// The done run holding `id`.
    fn run_of(&self, id: u64) -> Result<Option<DoneRun>, Error> {
        let run = self.range_holding("finished_at, vals FROM done_runs", id, |r| {
            Ok((r.get::<_, f64>(2)?, r.get::<_, Option<Vec<u8>>>(3)?))
        })?;
        Ok(run.map(|(first, last, (finished_at, vals))| DoneRun {
            first,
            last,
            finished_at,
            vals,
        }))
    }

    /// The chunk holding `id`: (first, last, packed jobs).
    fn chunk_of(&self, id: u64) -> Result<Option<(u64, u64, Vec<u8>)>, Error> {
        self.range_holding("jobs FROM chunks", id, |r| r.get(2))
    }

    /// The row of a table of id ranges whose range holds `id`: the one starting last at or
    /// before it, if it reaches that far. `rest` names the columns after first_id and last_id
    /// and the table (`"x FROM t"`); `read` reads them (from column 2 on).
    fn range_holding<T>(
        &self,
        rest: &str,
        id: u64,
        read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<(u64, u64, T)>, Error> {
        self.conn
            .prepare_cached(&format!(
                "SELECT first_id, last_id, {rest} WHERE first_id <= ?1 \
                 ORDER BY first_id DESC LIMIT 1"
            ))
            .and_then(|mut s| {
                s.query_row([id as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        read(r)?,
                    ))
                })
                .optional()
            })
            .map(|row| row.filter(|(_, last, _)| id <= *last))
            .map_err(|e| self.sql(e))
    }

    /// The values of a done run (`vals`), or an error naming the damage.
    fn done_values(&self, first: u64, vals: &[u8]) -> Result<Vec<DoneValue>, Error> {
        unpack_values(vals).ok_or_else(|| self.damaged_values(first))
    }

    fn damaged_values(&self, first: u64) -> Error {
        self.refuse(format!(
            "damaged wspool journal (the values of the done run from job {first} cannot be read)"
        ))
    }

    fn state_of(&self, id: u64) -> Result<Option<StateRow>, Error> {
        self.conn
            .prepare_cached(&format!("SELECT {STATE_COLUMNS} FROM states WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id as i64], state_row).optional())
            .map_err(|e| self.sql(e))
    }

    pub fn get(&self, id: u64) -> Result<Option<Record>, Error> {
        if i64::try_from(id).is_err() {
            return Ok(None);
        }
        let Some((first, _, blob)) = self.chunk_of(id)? else {
            return Ok(None);
        };
        let Some(job) = self.unpacked(first, &blob, |i| i == id)?.pop() else {
            return Ok(None);
        };
        let state = match self.state_of(id)? {
            Some(s) => s,
            None => match self.run_of(id)? {
                Some(run) => {
                    let done = match &run.vals {
                        Some(vals) => Some(
                            self.done_values(run.first, vals)?
                                .into_iter()
                                .nth((id - run.first) as usize)
                                .ok_or_else(|| self.damaged_values(run.first))?,
                        ),
                        None => None,
                    };
                    StateRow {
                        status: Status::Done,
                        attempts: 1,
                        started_at: done.as_ref().map(|d| d.started_at),
                        finished_at: Some(done.as_ref().map_or(run.finished_at, |d| d.finished_at)),
                        value: done.map(|d| d.value),
                        error_type: None,
                        error_message: None,
                    }
                }
                None => StateRow {
                    status: Status::Received,
                    attempts: 0,
                    started_at: None,
                    finished_at: None,
                    value: None,
                    error_type: None,
                    error_message: None,
                },
            },
        };
        Ok(Some(Record {
            id,
            connection: job.connection,
            kind: job.kind,
            received_at: job.received_at,
            payload: job.payload.to_vec(),
            status: state.status,
            attempts: state.attempts,
            started_at: state.started_at,
            finished_at: state.finished_at,
            value: state.value,
            error_type: state.error_type,
            error_message: state.error_message,
        }))
    }

    /// Ids from a query that yields them largest first, at most `limit`.
    fn ids(&self, sql: &str, args: impl rusqlite::Params, limit: usize) -> Result<Vec<u64>, Error> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.sql(e))?;
        let mut rows = stmt.query(args).map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        while out.len() < limit {
            match rows.next().map_err(|e| self.sql(e))? {
                Some(r) => out.push(r.get::<_, i64>(0).map_err(|e| self.sql(e))? as u64),
                None => break,
            }
        }
        Ok(out)
    }

    /// The ids of up to `limit` ranges (first, last) from a query that yields them largest
    /// first, `keep`ing some, largest ids first.
    fn ids_in_ranges(
        &self,
        sql: &str,
        limit: usize,
        mut keep: impl FnMut(u64, u64) -> Result<Vec<u64>, Error>,
    ) -> Result<Vec<u64>, Error> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.sql(e))?;
        let ranges = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for range in ranges {
            let (first, last) = range.map_err(|e| self.sql(e))?;
            for id in keep(first, last)? {
                if out.len() == limit {
                    return Ok(out);
                }
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The newest `limit` jobs (largest ids first), of one status or all.
    pub fn list(&self, status: Option<Status>, limit: usize) -> Result<Vec<Record>, Error> {
        let all = |first: u64, last: u64| Ok((first..=last).rev().collect());
        let stated = |status: &str| {
            self.ids(
                "SELECT id FROM states WHERE status = ?1 ORDER BY id DESC",
                [status],
                limit,
            )
        };
        let mut ids = match status {
            None => self.ids_in_ranges(
                "SELECT first_id, last_id FROM chunks ORDER BY first_id DESC",
                limit,
                all,
            )?,
            Some(s @ (Status::Running | Status::Failed)) => stated(s.as_str())?,
            Some(Status::Done) => {
                let mut ids = stated("done")?;
                ids.extend(self.ids_in_ranges(
                    "SELECT first_id, last_id FROM done_runs ORDER BY first_id DESC",
                    limit,
                    all,
                )?);
                ids
            }
            Some(Status::Received) => {
                let mut ids = stated("received")?;
                // In neither table: received. Only open chunks have such jobs.
                ids.extend(self.ids_in_ranges(
                    "SELECT first_id, last_id FROM open_chunks ORDER BY first_id DESC",
                    limit,
                    |first, last| {
                        let (unfinished, stated) = self.unfinished_in(first, last)?;
                        Ok(unfinished
                            .into_iter()
                            .rev()
                            .filter(|id| stated.binary_search(id).is_err())
                            .collect())
                    },
                )?);
                ids
            }
        };
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.dedup();
        ids.truncate(limit);
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            records.extend(self.get(id)?);
        }
        Ok(records)
    }

    /// Puts a job back to `received` (its result and error cleared) so that the next start of
    /// a consumer on this journal runs it again. None if there is no such job; else the status
    /// it had.
    pub fn retry(&self, id: u64) -> Result<Option<Status>, Error> {
        let Some(before) = self.get(id)?.map(|r| r.status) else {
            return Ok(None);
        };
        let run = self.run_of(id)?;
        let Some((chunk, chunk_last, _)) = self.chunk_of(id)? else {
            return Ok(None);
        };
        let path = self.path.display().to_string();
        let sql = |e: rusqlite::Error| Error::Journal {
            path: path.clone(),
            message: format!("cannot write: {e}"),
        };
        let tx = self.conn.unchecked_transaction().map_err(sql)?;
        if let Some(run) = run {
            // Out of its done run (split in two, values with their jobs), into a row of its own.
            let values = match &run.vals {
                Some(vals) => Some(self.done_values(run.first, vals)?),
                None => None,
            };
            tx.execute(
                "DELETE FROM done_runs WHERE first_id = ?1",
                [run.first as i64],
            )
            .map_err(sql)?;
            for (f, l) in [(run.first, id.wrapping_sub(1)), (id + 1, run.last)] {
                if f <= l && l != u64::MAX {
                    let vals = match &values {
                        Some(v) => Some(pack_values(
                            v.get((f - run.first) as usize..=(l - run.first) as usize)
                                .ok_or_else(|| self.damaged_values(run.first))?
                                .iter(),
                        )),
                        None => None,
                    };
                    tx.execute(
                        "INSERT INTO done_runs (first_id, last_id, finished_at, vals) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![f as i64, l as i64, run.finished_at, vals],
                    )
                    .map_err(sql)?;
                }
            }
            tx.execute(
                "INSERT INTO states (id, status, attempts) VALUES (?1, 'received', 1)",
                [id as i64],
            )
            .map_err(sql)?;
        } else {
            tx.execute(
                "UPDATE states SET status = 'received', finished_at = NULL, value = NULL, \
                 value_format = NULL, error_type = NULL, error_message = NULL WHERE id = ?1",
                [id as i64],
            )
            .map_err(sql)?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO open_chunks (first_id, last_id) VALUES (?1, ?2)",
            [chunk as i64, chunk_last as i64],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(Some(before))
    }

    pub fn counts(&self) -> Result<Counts, Error> {
        let sum = |sql: &str| -> Result<u64, Error> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
                .map(|n| n.unwrap_or(0) as u64)
                .map_err(|e| self.sql(e))
        };
        let mut counts = Counts {
            total: sum("SELECT sum(last_id - first_id + 1) FROM chunks")?,
            done: sum("SELECT sum(last_id - first_id + 1) FROM done_runs")?,
            ..Counts::default()
        };
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
                Ok(Status::Running) => counts.running += n,
                Ok(Status::Done) => counts.done += n,
                Ok(Status::Failed) => counts.failed += n,
                Ok(Status::Received) | Err(_) => {}
            }
            counts.rerun += rerun;
            counts.duplicates += extra;
        }
        // Received: every job neither running nor finished (with a row of its own or not).
        counts.received = counts
            .total
            .saturating_sub(counts.running + counts.done + counts.failed);
        Ok(counts)
    }

    /// Writes one batch in one transaction: new jobs packed in chunks (as `received`), then
    /// the status changes. The writer's own: it keeps track of what it wrote (`tracker`).
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
        let tracker = &mut self.tracker;
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut chunk = tx
                .prepare_cached("INSERT INTO chunks (first_id, last_id, jobs) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            let mut open = tx
                .prepare_cached("INSERT INTO open_chunks (first_id, last_id) VALUES (?1, ?2)")
                .map_err(sql)?;
            // A chunk holds consecutive ids (the read loop numbers messages in order).
            for (first, last, these) in consecutive_runs(inserts, |(job, _)| job.id) {
                chunk
                    .execute(params![first as i64, last as i64, pack(these)])
                    .map_err(sql)?;
                open.execute([first as i64, last as i64]).map_err(sql)?;
                tracker.open.insert(first, (last, these.len() as u64));
            }
            let mut start = tx
                .prepare_cached(
                    "INSERT INTO states (id, status, attempts, started_at) \
                     VALUES (?1, 'running', 1, ?2) ON CONFLICT (id) DO UPDATE SET \
                     status = 'running', attempts = attempts + 1, started_at = ?2",
                )
                .map_err(sql)?;
            let mut finish = tx
                .prepare_cached(
                    "INSERT INTO states (id, status, attempts, started_at, finished_at, value, \
                     value_format, error_type, error_message) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO UPDATE SET \
                     status = ?2, attempts = attempts + ?3, \
                     started_at = coalesce(?4, started_at), finished_at = ?5, value = ?6, \
                     value_format = ?7, error_type = ?8, error_message = ?9",
                )
                .map_err(sql)?;
            // Done runs to record: (first, last).
            let mut done: Vec<(u64, u64)> = Vec::new();
            let mut done_at = 0.0;
            let mut valued = Vec::new();
            for (first, last, at) in updates.plain.drain(..) {
                // A job that has a row (a re-run) gets it updated: as a change of its own.
                let mut from = first;
                if !tracker.stated.is_empty() {
                    for id in first..=last {
                        if tracker.stated.contains(&id) {
                            let change = Change {
                                started_at: Some(at),
                                finished: Some((at, Outcome::plain(true))),
                            };
                            updates.order.push((id, change));
                            if from < id {
                                done.push((from, id - 1));
                            }
                            from = id + 1;
                        }
                    }
                }
                if from <= last {
                    tracker.finished_range(&tx, from, last).map_err(sql)?;
                    done.push((from, last));
                }
                done_at = at;
            }
            for (id, change) in updates.order.drain(..) {
                let Some((at, outcome)) = change.finished else {
                    start
                        .execute(params![id as i64, change.started_at])
                        .map_err(sql)?;
                    tracker.stated.insert(id);
                    continue;
                };
                let stated = tracker.stated.remove(&id);
                tracker.finished_range(&tx, id, id).map_err(sql)?;
                // Done on a first run: into a done run (with its value, if any).
                let outcome = match (stated, change.started_at, outcome) {
                    (false, Some(_), Outcome::Done { value: None }) => {
                        done.push((id, id));
                        done_at = at;
                        continue;
                    }
                    (false, Some(started_at), Outcome::Done { value: Some(value) }) => {
                        valued.push((
                            id,
                            DoneValue {
                                started_at,
                                finished_at: at,
                                value,
                            },
                        ));
                        continue;
                    }
                    (_, _, outcome) => outcome,
                };
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
            updates.index.clear();
            done.sort_unstable();
            let mut ranges = done.into_iter();
            if let Some((mut first, mut last)) = ranges.next() {
                for (f, l) in ranges {
                    if f == last + 1 {
                        last = l;
                        continue;
                    }
                    tracker.add_run(&tx, first, last, done_at).map_err(sql)?;
                    (first, last) = (f, l);
                }
                tracker.add_run(&tx, first, last, done_at).map_err(sql)?;
            }
            // Values: a run per stretch of consecutive ids (they are never merged later).
            valued.sort_unstable_by_key(|(id, _)| *id);
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO done_runs (first_id, last_id, finished_at, vals) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?;
            for (first, last, these) in consecutive_runs(&valued, |(id, _)| *id) {
                let values = these.iter().map(|(_, v)| v);
                let finished_at = values.clone().map(|v| v.finished_at).fold(0.0, f64::max);
                insert
                    .execute(params![
                        first as i64,
                        last as i64,
                        finished_at,
                        pack_values(values)
                    ])
                    .map_err(sql)?;
            }
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

/// A status change sent by a worker.
#[derive(Debug)]
pub enum Update {
    Started {
        id: u64,
        at: f64,
    },
    Finished {
        id: u64,
        at: f64,
        outcome: Outcome,
    },
    /// Consecutive jobs of one batch of native work that all ended `done` with nothing to
    /// store: one change for the lot.
    RanPlain {
        first: u64,
        last: u64,
        finished_at: f64,
    },
    /// Started and finished in one batch of native work: one change, nothing to merge with.
    Ran {
        id: u64,
        started_at: f64,
        finished_at: f64,
        outcome: Outcome,
    },
}

/// The status changes of one batch, one entry per job in arrival order (a start and a finish
/// of the same job become one row update).
#[derive(Default)]
struct Updates {
    order: Vec<(u64, Change)>,
    index: IdMap<usize>,
    /// `Update::RanPlain` ranges: (first, last, finished at).
    plain: Vec<(u64, u64, f64)>,
}

#[derive(Default)]
struct Change {
    started_at: Option<f64>,
    finished: Option<(f64, Outcome)>,
}

impl Updates {
    fn is_empty(&self) -> bool {
        self.order.is_empty() && self.plain.is_empty()
    }

    fn len(&self) -> usize {
        self.order.len() + self.plain.len()
    }

    fn add(&mut self, update: Update) {
        let (id, started_at, finished) = match update {
            Update::Started { id, at } => (id, Some(at), None),
            Update::Finished { id, at, outcome } => (id, None, Some((at, outcome))),
            Update::RanPlain {
                first,
                last,
                finished_at,
            } => {
                self.plain.push((first, last, finished_at));
                return;
            }
            Update::Ran {
                id,
                started_at,
                finished_at,
                outcome,
            } => {
                let change = Change {
                    started_at: Some(started_at),
                    finished: Some((finished_at, outcome)),
                };
                // Unindexed (the hot path without user code): no other change of the job
                // comes after it, and none came before unless the index holds one.
                match self.index.get(&id) {
                    Some(&i) => self.order[i].1 = change,
                    None => self.order.push((id, change)),
                }
                return;
            }
        };
        let i = *self.index.entry(id).or_insert_with(|| {
            self.order.push((id, Change::default()));
            self.order.len() - 1
        });
        let change = &mut self.order[i].1;
        if started_at.is_some() {
            change.started_at = started_at;
        }
        if finished.is_some() {
            change.finished = finished;
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
    /// Sends a change at once (user code: its result is handed on right after the job, and the
    /// change must be on its way first), or keeps it for the end of the batch (native work).
    fn note(&self, update: Update) {
        if self.inner.batchable() {
            BATCH_UPDATES.with(|b| b.borrow_mut().push(update));
        } else if let Err(flume::TrySendError::Full(updates)) = self.updates.try_send(vec![update])
        {
            // The writer is behind: wait for it, without the GIL.
            let mut updates = Some(updates);
            self.inner.unlocked(&mut || {
                if let Some(u) = updates.take() {
                    // Fails only once the writer is gone (a journal error, reported already).
                    let _ = self.updates.send(u);
                }
            });
        }
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
        // Native work, done in microseconds, gets `running` written with `done`; user code,
        // which may take long, gets it written on its own.
        if self.inner.batchable() {
            let started_at = unix_now();
            let (output, ok) = self.inner.process(job, decoded);
            let outcome = (self.describe)(&output, ok);
            let finished_at = unix_now();
            BATCH_UPDATES.with(|b| {
                let mut b = b.borrow_mut();
                if outcome != (Outcome::Done { value: None }) {
                    b.push(Update::Ran {
                        id,
                        started_at,
                        finished_at,
                        outcome,
                    });
                    return;
                }
                // Plain successes of a run of ids (a worker's share of the queue) go as one.
                if let Some(Update::RanPlain {
                    last,
                    finished_at: at,
                    ..
                }) = b.last_mut()
                {
                    if *last + 1 == id {
                        *last = id;
                        *at = finished_at;
                        return;
                    }
                }
                b.push(Update::RanPlain {
                    first: id,
                    last: id,
                    finished_at,
                });
            });
            return (output, ok);
        }
        self.note(Update::Started { id, at: unix_now() });
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

    fn unlocked(&self, wait: &mut (dyn FnMut() + Send)) {
        self.inner.unlocked(wait)
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
/// The jobs of a run dropped before the writer took them (the writer failed, or a send
/// failed) are counted as cancelled, wherever that happens: a run sent just before the writer
/// let go of its channel stays in the channel until the read loop drops its end, and would
/// otherwise be lost uncounted.
pub struct Received {
    jobs: Vec<(Job, Option<Key>)>,
    shared: Arc<Shared>,
}

impl Received {
    pub fn new(jobs: Vec<(Job, Option<Key>)>, shared: Arc<Shared>) -> Self {
        Received { jobs, shared }
    }

    /// The jobs, taken by the writer (no longer counted on drop).
    fn take(mut self) -> Vec<(Job, Option<Key>)> {
        std::mem::take(&mut self.jobs)
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if !self.jobs.is_empty() {
            self.shared.on_cancelled_n(self.jobs.len() as u64);
        }
    }
}

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
        // The helper thread checkpoints as the stream goes; closing does not (it would copy
        // and fsync what is left before the stream may end). The WAL holds it meanwhile,
        // as safely (it is part of the database), and the next checkpoint copies it.
        for j in [&journal, &checkpointer] {
            j.conn
                .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                .map_err(|e| j.sql(e))?;
        }
        let next_id = journal.next_id()?;
        let to_recover = journal.pending_count()?;
        // In batches: a worker sends one per batch it runs (up to 64 jobs, two changes each),
        // or with a Python handler one or two per job; the writer lets them wait up to
        // UPDATE_DELAY while the channel is less than half full.
        let (updates_tx, updates_rx) = flume::bounded(capacity.max(256));
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
        let room = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the journal writer: {e}")))?;
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
            room,
            written: std::time::Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("{}journal", crate::stream::THREAD_PREFIX))
            .spawn(move || {
                let _guard = guard;
                let queue = writer.queue.clone();
                std::thread::scope(|scope| {
                    // Without the helper (it could not start), the WAL only grows until the
                    // next start's first checkpoint.
                    let _helper = std::thread::Builder::new()
                        .name(format!("{}checkpoint", crate::stream::THREAD_PREFIX))
                        .spawn_scoped(scope, move || {
                            let _guard = checkpoint_guard;
                            checkpoints(&checkpointer, &kicks);
                        });
                    // When the writer (and its kick sender) is gone, the helper ends.
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run()));
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
                    // Whatever happened, the workers may finish what they have (without
                    // waiting for a checkpoint under way).
                    queue.close();
                });
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
        // At most one checkpoint every 20 ms; ends at once when the writer does.
        let next = std::time::Instant::now() + Duration::from_millis(20);
        loop {
            match kicks.recv_deadline(next) {
                Ok(()) => {}
                Err(flume::RecvTimeoutError::Timeout) => break,
                Err(flume::RecvTimeoutError::Disconnected) => return,
            }
        }
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
    /// Waits for room in the job queue (its signal is async).
    room: tokio::runtime::Runtime,
    /// When status changes were last written.
    written: std::time::Instant,
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
                rx.drain().for_each(drop);
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
            let event = self.wait();
            self.take(event, &mut batch);
            self.gather(&mut batch);
            // Status changes alone wait (see `wait`) unless many are pending or it is time.
            let due = !batch.is_empty()
                || self.inserts.is_none()
                || self.updates.is_none()
                || self.changes_due();
            if !due {
                continue;
            }
            if let Err(e) = self.write(&batch).and_then(|()| self.answer()) {
                // Not run (not written, or written but not handed to the pool): counted as
                // cancelled; the stream ends with `e`.
                self.shared.on_cancelled_n(batch.len() as u64);
                return Err(e);
            }
            self.release_all(&mut batch)?;
        }
        self.write(&[])?;
        // Questions asked meanwhile are answered; later ones read the file (see `Link::get`).
        if let Some(rx) = self.queries.take() {
            self.asked.extend(rx.drain());
        }
        self.answer()
    }

    /// Waits for the next event. While status changes wait in their channel (up to half full)
    /// and new jobs may still come, only new jobs and questions wake the writer, or
    /// [`UPDATE_DELAY`]: a busy stream's changes are written with the next jobs, or a few
    /// hundred commits a second at most, not one commit per change.
    fn wait(&self) -> Event {
        // Not once the channel is half full: workers would soon wait on it.
        let defer = self.inserts.is_some()
            && self.updates.as_ref().is_some_and(|rx| {
                (!rx.is_empty() || !self.pending.is_empty())
                    && rx.len() < rx.capacity().unwrap_or(usize::MAX) / 2
            });
        let mut selector = flume::Selector::new();
        if let Some(rx) = &self.inserts {
            selector = selector.recv(rx, Event::Insert);
        }
        if let Some(rx) = self.updates.as_ref().filter(|_| !defer) {
            selector = selector.recv(rx, Event::Update);
        }
        if let Some(rx) = &self.queries {
            selector = selector.recv(rx, Event::Query);
        }
        if defer {
            let left = UPDATE_DELAY.saturating_sub(self.written.elapsed());
            selector.wait_timeout(left).unwrap_or(Event::Idle)
        } else if self.inserts.is_none() && self.updates.is_none() && self.queries.is_none() {
            Event::Idle
        } else {
            selector.wait()
        }
    }

    fn take(&mut self, event: Event, batch: &mut Vec<(Job, Option<Key>)>) {
        match event {
            Event::Insert(Ok(items)) => batch.extend(items.take()),
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
                    Ok(items) => batch.extend(items.take()),
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
        self.write(&[])?;
        for q in std::mem::take(&mut self.asked) {
            let _ = q.reply.send(self.journal.get(q.id));
        }
        Ok(())
    }

    /// Hands written jobs to the pool in order, under one lock per run, waiting while the
    /// queue is full. Meanwhile questions are answered and the workers' status changes are
    /// written now and then (every [`UPDATE_DELAY`], or once many wait), not one by one.
    fn release_all(&mut self, batch: &mut Vec<(Job, Option<Key>)>) -> Result<(), Error> {
        let mut rest = batch.drain(..);
        let mut waiting = None;
        loop {
            if self.shared.is_cancelled() {
                // They stay `received` in the journal: the next start runs them.
                let left = waiting.take().into_iter().chain(rest.by_ref()).count() as u64;
                self.shared.on_cancelled_n(left);
                return Ok(());
            }
            let mut dropped = 0;
            {
                let mut pusher = self.queue.pusher();
                for (job, key) in waiting.take().into_iter().chain(rest.by_ref()) {
                    match pusher.try_push(job, key) {
                        Push::Done { dropped: d } => dropped += d,
                        // Journaled streams block on a full queue; counted if one ever says so.
                        Push::Overflow => dropped += 1,
                        Push::Full(job, key) => {
                            waiting = Some((job, key));
                            break;
                        }
                    }
                }
            }
            if dropped > 0 {
                self.shared.on_dropped(dropped);
            }
            if waiting.is_none() {
                return Ok(());
            }
            // Workers signal room once an eighth of the queue is free.
            let queue = &self.queue;
            let _ = self.room.block_on(async {
                tokio::time::timeout(Duration::from_millis(2), queue.space()).await
            });
            self.gather_updates();
            if self.changes_due() {
                if let Err(e) = self.write(&[]).and_then(|()| self.answer()) {
                    // Written, but never run here: they stay `received` for the next start.
                    let left = waiting.take().into_iter().chain(rest.by_ref()).count() as u64;
                    self.shared.on_cancelled_n(left);
                    return Err(e);
                }
            }
        }
    }

    /// Whether the status changes gathered so far must be written now, with no new job to
    /// write them with: a question waits for them, many are pending, or it is time.
    fn changes_due(&self) -> bool {
        !self.asked.is_empty()
            || self.pending.len() >= MAX_BATCH / 2
            || self.written.elapsed() >= UPDATE_DELAY
    }

    /// Writes `inserts` and the status changes gathered so far, in one transaction.
    fn write(&mut self, inserts: &[(Job, Option<Key>)]) -> Result<(), Error> {
        self.written = std::time::Instant::now();
        self.journal.write(inserts, &mut self.pending)
    }

    /// Re-runs what an earlier run left `received` or `running`, before any new job.
    fn recover(&mut self) -> Result<(), Error> {
        let mut after = None;
        while let Some(chunk) = self.journal.unfinished_after(after)? {
            after = Some(chunk.first);
            if chunk.jobs.is_empty() {
                // Every job finished, but the process ended before the chunk was closed.
                self.journal.close_chunk(chunk.first)?;
                continue;
            }
            let tracker = &mut self.journal.tracker;
            tracker
                .open
                .insert(chunk.first, (chunk.last, chunk.jobs.len() as u64));
            tracker.stated.extend(chunk.stated);
            let mut jobs: Vec<_> = chunk
                .jobs
                .into_iter()
                .map(|job| {
                    self.shared.on_received(job.payload.len());
                    let key = self
                        .key
                        .as_deref()
                        .and_then(|field| extract_key(&job.payload, field));
                    (job, key)
                })
                .collect();
            let n = jobs.len() as u64;
            self.release_all(&mut jobs)?;
            self.recovered.fetch_add(n, Relaxed);
        }
        Ok(())
    }
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
        /// A run of received jobs, as the read loop sends them.
        fn received(&self, jobs: Vec<(Job, Option<Key>)>) -> Received {
            Received::new(jobs, self.shared.clone())
        }

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
        tx.send(h.received(vec![(job(0, b"ok"), None)])).unwrap();
        tx.send(h.received(vec![(job(1, b"bad"), None)])).unwrap();
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
            tx.send(h.received(vec![(job(i, b"x"), None)])).unwrap();
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
            .send(h.received(vec![(job(6, b"x"), None)]))
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
        // Runs of two, as the read loop sends runs: each job must be counted, not each run.
        let mut sent = 0;
        for i in 0..32 {
            let run = vec![(job(2 * i, &BIG), None), (job(2 * i + 1, &BIG), None)];
            // Received, as the read loop counts them, whether or not the writer takes them
            // (a failed send hands the run back; dropped, it counts its jobs as cancelled).
            sent += 2;
            if tx.send(Received::new(run, shared.clone())).is_err() {
                break;
            }
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
        // Every job sent is accounted for: it ran, or it was counted as cancelled.
        assert_eq!(
            ran + shared.snapshot().cancelled,
            sent,
            "{:?}",
            shared.snapshot()
        );
    }

    fn received(ids: std::ops::Range<u64>) -> Vec<(Job, Option<Key>)> {
        ids.map(|id| (job(id, b"p"), None)).collect()
    }

    /// Runs `ids` to the end in one batch: started and finished, with `outcome`.
    fn finish(j: &mut Journal, ids: &[u64], outcome: &Outcome) {
        let mut u = Updates::default();
        for &id in ids {
            u.add(Update::Started { id, at: 2.0 });
            u.add(Update::Finished {
                id,
                at: 3.0,
                outcome: outcome.clone(),
            });
        }
        j.write(&[], &mut u).unwrap();
    }

    fn runs(j: &Journal) -> Vec<(u64, u64)> {
        let mut stmt = j
            .conn
            .prepare("SELECT first_id, last_id FROM done_runs ORDER BY first_id")
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[test]
    fn chunks_keep_each_job_as_received() {
        let jobs = vec![
            (job(7, b""), None),
            (
                Job {
                    kind: Kind::Binary,
                    connection: 3,
                    received_at: 12.25,
                    ..job(8, &[0, 255, 1])
                },
                None,
            ),
        ];
        let back = unpack(7, &pack(&jobs), |_| true).unwrap();
        assert_eq!(back.len(), 2);
        for ((want, _), got) in jobs.iter().zip(&back) {
            assert_eq!(
                (
                    want.id,
                    want.kind,
                    want.connection,
                    want.received_at,
                    &want.payload
                ),
                (
                    got.id,
                    got.kind,
                    got.connection,
                    got.received_at,
                    &got.payload
                )
            );
        }
        assert!(
            unpack(0, &pack(&jobs)[..20], |_| true).is_none(),
            "a cut blob is refused"
        );
        let one = unpack(7, &pack(&jobs), |id| id == 8).unwrap();
        assert_eq!(
            (one.len(), one[0].id, &one[0].payload[..]),
            (1, 8, &[0, 255, 1][..])
        );
    }

    #[test]
    fn plain_done_jobs_become_few_runs_and_a_retry_splits_one() {
        let path = temp("runs");
        let mut j = Journal::open(&path, true, SyncMode::Normal).unwrap();
        // 600 jobs over three chunks, finished out of order in four batches.
        j.write(&received(0..600), &mut Updates::default()).unwrap();
        let done = Outcome::plain(true);
        finish(&mut j, &(64..128).collect::<Vec<_>>(), &done);
        finish(&mut j, &(0..64).collect::<Vec<_>>(), &done);
        finish(&mut j, &(128..590).collect::<Vec<_>>(), &done);
        let failed = Outcome::Failed {
            error_type: "ValueError".into(),
            message: "no".into(),
        };
        finish(&mut j, &[590], &failed);
        assert_eq!(runs(&j), vec![(0, 589)], "adjacent runs are merged");
        let c = j.counts().unwrap();
        assert_eq!(
            (c.total, c.done, c.failed, c.received, c.running),
            (600, 590, 1, 9, 0)
        );
        let r = j.get(300).unwrap().unwrap();
        assert_eq!(
            (r.status, r.attempts, r.payload.as_slice()),
            (Status::Done, 1, &b"p"[..])
        );
        assert_eq!(j.get(595).unwrap().unwrap().status, Status::Received);
        assert_eq!(j.get(590).unwrap().unwrap().status, Status::Failed);
        assert_eq!(j.get(600).unwrap(), None);
        // Two chunks are all finished, the third is not: only it is read at the next start.
        assert_eq!(j.pending_count().unwrap(), 9);
        assert_eq!(j.unfinished_after(None).unwrap().unwrap().first, 512);

        assert_eq!(j.retry(100).unwrap(), Some(Status::Done));
        assert_eq!(runs(&j), vec![(0, 99), (101, 589)]);
        let again = j.get(100).unwrap().unwrap();
        assert_eq!((again.status, again.attempts), (Status::Received, 1));
        assert_eq!(j.pending_count().unwrap(), 10, "its chunk is open again");
        let ids = |status| {
            j.list(Some(status), 4)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(Status::Received), vec![599, 598, 597, 596]);
        assert_eq!(ids(Status::Done), vec![589, 588, 587, 586]);
        assert_eq!(ids(Status::Failed), vec![590]);
        assert_eq!(j.list(Some(Status::Received), 20).unwrap().len(), 10);
        assert_eq!(j.list(None, 2).unwrap()[0].id, 599);
        let c = j.counts().unwrap();
        assert_eq!((c.done, c.received, c.total), (589, 10, 600));
        // The next start (a new writer) runs it again: it keeps its own row and counts its
        // second attempt.
        drop(j);
        let mut j = Journal::open(&path, false, SyncMode::Normal).unwrap();
        let first = j.unfinished_after(None).unwrap().unwrap();
        assert_eq!((first.first, first.stated.as_slice()), (0, &[100][..]));
        assert_eq!(
            first.jobs.iter().map(|job| job.id).collect::<Vec<_>>(),
            vec![100]
        );
        j.tracker.open.insert(first.first, (first.last, 1));
        j.tracker.stated.extend(first.stated);
        finish(&mut j, &[100], &done);
        assert_eq!(
            j.unfinished_after(None).unwrap().unwrap().first,
            512,
            "closed again"
        );
        let r = j.get(100).unwrap().unwrap();
        assert_eq!((r.status, r.attempts), (Status::Done, 2));
        let c = j.counts().unwrap();
        assert_eq!((c.done, c.rerun, c.duplicates), (590, 1, 1));
    }

    #[test]
    fn values_of_jobs_done_together_are_packed_in_runs_and_a_retry_splits_one() {
        let path = temp("values");
        let mut j = Journal::open(&path, true, SyncMode::Normal).unwrap();
        j.write(&received(0..300), &mut Updates::default()).unwrap();
        let mut u = Updates::default();
        // One commit: 0..=9 and 20..=279 with values (two stretches, the second longer than a
        // chunk), 10 plain, 11 failed; 12..20 and 280.. still to finish.
        for id in (0..10).chain(20..280) {
            u.add(Update::Started { id, at: 2.0 });
            u.add(Update::Finished {
                id,
                at: 3.0 + id as f64,
                outcome: Outcome::Done {
                    value: Some(StoredValue {
                        text: format!("{{\"n\": {id}}}"),
                        json: id != 5,
                    }),
                },
            });
        }
        j.write(&[], &mut u).unwrap();
        finish(&mut j, &[10], &Outcome::plain(true));
        finish(
            &mut j,
            &[11],
            &Outcome::Failed {
                error_type: "E".into(),
                message: String::new(),
            },
        );
        assert_eq!(runs(&j), vec![(0, 9), (10, 10), (20, 275), (276, 279)]);
        let states: i64 = j
            .conn
            .query_row("SELECT count(*) FROM states", [], |r| r.get(0))
            .unwrap();
        assert_eq!(states, 1, "only the failed job has a row");
        let r = j.get(250).unwrap().unwrap();
        assert_eq!(
            (r.status, r.attempts, r.started_at, r.finished_at),
            (Status::Done, 1, Some(2.0), Some(253.0))
        );
        assert_eq!(r.value.unwrap().text, "{\"n\": 250}");
        assert!(!j.get(5).unwrap().unwrap().value.unwrap().json, "a repr");
        let c = j.counts().unwrap();
        assert_eq!((c.done, c.failed, c.received, c.total), (271, 1, 28, 300));
        assert_eq!(j.pending_count().unwrap(), 28);
        assert_eq!(j.list(Some(Status::Done), 1).unwrap()[0].id, 279);

        assert_eq!(j.retry(100).unwrap(), Some(Status::Done));
        assert_eq!(
            runs(&j),
            vec![(0, 9), (10, 10), (20, 99), (101, 275), (276, 279)]
        );
        for (id, n) in [(99, 99), (101, 101), (275, 275)] {
            let v = j.get(id).unwrap().unwrap().value.unwrap();
            assert_eq!(
                v.text,
                format!("{{\"n\": {n}}}"),
                "job {id} keeps its value"
            );
        }
        let again = j.get(100).unwrap().unwrap();
        assert_eq!((again.status, again.value), (Status::Received, None));
        assert_eq!(j.counts().unwrap().done, 270);

        let damaged = pack_values(
            [DoneValue {
                started_at: 1.0,
                finished_at: 2.0,
                value: StoredValue {
                    text: "1".into(),
                    json: true,
                },
            }]
            .iter(),
        );
        assert!(unpack_values(&damaged[..damaged.len() - 1]).is_none());
    }

    #[test]
    fn ranges_of_plain_successes_close_chunks_and_merge_into_runs() {
        let path = temp("ranges");
        let mut j = Journal::open(&path, true, SyncMode::Normal).unwrap();
        j.write(&received(0..600), &mut Updates::default()).unwrap();
        let ran = |first, last| Update::RanPlain {
            first,
            last,
            finished_at: 4.0,
        };
        let mut u = Updates::default();
        for update in [ran(350, 599), ran(0, 99), ran(100, 300)] {
            u.add(update);
        }
        j.write(&[], &mut u).unwrap();
        assert_eq!(runs(&j), vec![(0, 300), (350, 599)]);
        assert_eq!(j.pending_count().unwrap(), 49, "301..=349");
        assert_eq!(j.unfinished_after(None).unwrap().unwrap().first, 256);
        assert!(
            j.unfinished_after(Some(256)).unwrap().is_none(),
            "512.. closed"
        );
        let r = j.get(599).unwrap().unwrap();
        assert_eq!((r.status, r.finished_at), (Status::Done, Some(4.0)));

        // A re-run job inside a range keeps its own row and counts the attempt.
        assert_eq!(j.retry(550).unwrap(), Some(Status::Done));
        drop(j);
        let mut j = Journal::open(&path, false, SyncMode::Normal).unwrap();
        let chunk = j.unfinished_after(Some(256)).unwrap().unwrap();
        assert_eq!(chunk.stated, vec![550]);
        j.tracker.open.insert(chunk.first, (chunk.last, 1));
        j.tracker.stated.extend(chunk.stated);
        let mut u = Updates::default();
        u.add(ran(550, 550));
        j.write(&[], &mut u).unwrap();
        let r = j.get(550).unwrap().unwrap();
        assert_eq!((r.status, r.attempts), (Status::Done, 2));
        assert!(j.unfinished_after(Some(256)).unwrap().is_none());
        let c = j.counts().unwrap();
        assert_eq!((c.done, c.received, c.duplicates), (551, 49, 1));
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
        u.add(Update::Ran {
            id: 9,
            started_at: 1.0,
            finished_at: 1.5,
            outcome: Outcome::plain(true),
        });
        assert_eq!(u.len(), 3);
        assert!(!u.index.contains_key(&9), "native work is not indexed");
        assert_eq!(u.order[2].1.started_at, Some(1.0));
        assert_eq!(u.order[0].0, 3);
        assert!(u.order[0].1.started_at.is_some() && u.order[0].1.finished.is_some());
        assert!(u.order[1].1.finished.is_none());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// The writer's SQLite work alone, 1,000 jobs per transaction (received, then done with
    /// nothing to store, as without a handler):
    /// `cargo test --release --lib journal::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn write_speed() {
        let dir = std::env::temp_dir().join(format!("wspool-speed-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut j = Journal::open(&dir.join("j.db"), true, SyncMode::Normal).unwrap();
        // As the stream's writer: checkpoints are a helper thread's work, not timed here.
        j.conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
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
