//! The Python binding: converts arguments and results and delegates to the native core. Every
//! blocking wait runs with the GIL released, in slices, checking for signals between slices so
//! Ctrl-C interrupts it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::errors::Error;
use bytes::Bytes;

use crate::job::{Data, DecodeError, DecodeMode, Job, Kind};
use crate::json::{self, Json, Node};
use crate::pool::Processor;
use crate::queue::{Order, Overflow};
use crate::state::StatsSnapshot;
use crate::stream::{Batch, Config, Event, EventHook, Reconnect, Stream, Subscribe};
use crate::ws::{Heartbeat, Outgoing, Replies, TlsOptions};

/// How long one GIL-free wait lasts before signals are checked again.
const SLICE: Duration = Duration::from_millis(50);

/// Maps a native error to its `wspool.exceptions` class, with the fields the class carries.
pub(crate) fn to_pyerr(py: Python<'_>, error: Error) -> PyErr {
    let message = error.to_string();
    let build = || -> PyResult<PyErr> {
        let kwargs = PyDict::new(py);
        let name = match error {
            Error::InvalidUrl { .. } | Error::InvalidArgument(_) => {
                return Ok(PyValueError::new_err(message.clone()))
            }
            Error::Connect { url, .. } => {
                kwargs.set_item("url", url)?;
                "ConnectError"
            }
            Error::Handshake { url, status, body } => {
                kwargs.set_item("url", url)?;
                kwargs.set_item("status", status)?;
                kwargs.set_item("body", body)?;
                "HandshakeError"
            }
            Error::Timeout { url, .. } => {
                kwargs.set_item("url", url)?;
                "Timeout"
            }
            Error::Closed { code, reason } => {
                kwargs.set_item("code", code)?;
                kwargs.set_item("reason", reason)?;
                "ConnectionClosed"
            }
            Error::Protocol(_) => "ProtocolError",
            Error::MessageTooBig { size, limit } => {
                kwargs.set_item("size", size)?;
                kwargs.set_item("limit", limit)?;
                "MessageTooBig"
            }
            Error::Overflow { capacity, job_id } => {
                kwargs.set_item("capacity", capacity)?;
                kwargs.set_item("job_id", job_id)?;
                "Overflow"
            }
            Error::Callback(_) | Error::Forked { .. } => "WspoolError",
            Error::Journal { path, .. } => {
                kwargs.set_item("path", path)?;
                "JournalError"
            }
            Error::Internal(_) => "InternalError",
        };
        let class = py.import("wspool.exceptions")?.getattr(name)?;
        Ok(PyErr::from_value(class.call((&message,), Some(&kwargs))?))
    };
    build().unwrap_or_else(|e| e)
}

fn decode_error(py: Python<'_>, job: &Job, e: &DecodeError) -> PyResult<Py<PyAny>> {
    let kwargs = PyDict::new(py);
    kwargs.set_item("job_id", job.id)?;
    kwargs.set_item("payload", PyBytes::new(py, &job.payload))?;
    let class = py.import("wspool.exceptions")?.getattr("DecodeError")?;
    let message = format!("job {}: {}", job.id, e.message);
    Ok(class.call((message,), Some(&kwargs))?.unbind())
}

/// Python `str` objects for the keys of decoded JSON objects, shared by a stream's
/// conversions: feeds repeat the same few keys, and a cached key costs a lookup, not a new
/// string. Bounded: keys up to 64 bytes, 4,096 of them.
#[derive(Default)]
pub struct KeyCache(Mutex<KeyMap>);

/// Hashed with foldhash rather than the standard SipHash: each key of each decoded object is
/// looked up here, and SipHash alone was ~1.3 % of the client's samples on the `json` benchmark
/// (perf, `bench_clients.py wspool json`). Its seed is random, as SipHash's is, so a server
/// cannot pick keys that all collide.
type KeyMap = HashMap<Box<[u8]>, Py<PyString>, foldhash::fast::RandomState>;

const KEY_CACHE_ENTRIES: usize = 4096;
const KEY_CACHE_KEY_BYTES: usize = 64;

impl KeyCache {
    /// The cache, or an empty stand-in when another thread holds it. Never waits: the holder
    /// may itself be waiting for the GIL this thread holds (building Python objects can run a
    /// garbage collection, and through it Python code, which lets the GIL go), and waiting
    /// here would then deadlock both. The stand-in only costs the keys of this one conversion
    /// their cache.
    fn borrow(&self) -> Keys<'_> {
        match self.0.try_lock() {
            Ok(map) => Keys::Shared(map),
            Err(TryLockError::Poisoned(p)) => Keys::Shared(p.into_inner()),
            Err(TryLockError::WouldBlock) => Keys::Own(KeyMap::default()),
        }
    }
}

/// What [`KeyCache::borrow`] gives.
enum Keys<'a> {
    Shared(std::sync::MutexGuard<'a, KeyMap>),
    Own(KeyMap),
}

impl std::ops::Deref for Keys<'_> {
    type Target = KeyMap;
    fn deref(&self) -> &KeyMap {
        match self {
            Keys::Shared(map) => map,
            Keys::Own(map) => map,
        }
    }
}

impl std::ops::DerefMut for Keys<'_> {
    fn deref_mut(&mut self) -> &mut KeyMap {
        match self {
            Keys::Shared(map) => map,
            Keys::Own(map) => map,
        }
    }
}

/// The Python `str` of a string node: made from its bytes as they are (they were checked as
/// UTF-8 by the parser; CPython checks them again as it decodes, so no second pass here).
fn json_str<'py>(py: Python<'py>, doc: &Json, node: Node) -> PyResult<Bound<'py, PyString>> {
    PyString::from_bytes(py, doc.str_bytes_at(node).unwrap_or_default())
}

fn json_key<'py>(
    py: Python<'py>,
    doc: &Json,
    node: Node,
    keys: &mut KeyMap,
) -> PyResult<Bound<'py, PyString>> {
    let text = doc.str_bytes_at(node).unwrap_or_default();
    if let Some(k) = keys.get(text) {
        return Ok(k.bind(py).clone());
    }
    let key = json_str(py, doc, node)?;
    if text.len() <= KEY_CACHE_KEY_BYTES && keys.len() < KEY_CACHE_ENTRIES {
        keys.insert(text.into(), key.clone().unbind());
    }
    Ok(key)
}

/// Builds the Python value of the tape node at `*at` (and its descendants), moving `*at` past
/// it. Nesting is bounded by the parser (128 levels).
fn json_node<'py>(
    py: Python<'py>,
    doc: &Json,
    at: &mut usize,
    keys: &mut KeyMap,
) -> PyResult<Bound<'py, PyAny>> {
    let node = doc.nodes()[*at];
    *at += 1;
    Ok(match node {
        Node::Owned(_) => json_str(py, doc, node)?.into_any(),
        Node::Array { len, .. } => {
            let items = (0..len)
                .map(|_| json_node(py, doc, at, keys))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Node::Object { len, .. } => {
            let dict = PyDict::new(py);
            for _ in 0..len {
                let key = json_key(py, doc, doc.nodes()[*at], keys)?;
                *at += 1;
                dict.set_item(key, json_node(py, doc, at, keys)?)?;
            }
            dict.into_any()
        }
        leaf => leaf_to_py(py, leaf, doc.payload())?,
    })
}

fn json_to_py<'py>(py: Python<'py>, doc: &Json, keys: &KeyCache) -> PyResult<Bound<'py, PyAny>> {
    json_node(py, doc, &mut 0, &mut keys.borrow())
}

fn data_to_py(py: Python<'_>, data: &Data, keys: &KeyCache) -> PyResult<Py<PyAny>> {
    Ok(match data {
        Data::Bytes(b) => PyBytes::new(py, b).into_any().unbind(),
        Data::Text(s) => PyString::new(py, s).into_any().unbind(),
        Data::Json(doc) => json_to_py(py, doc, keys)?.unbind(),
    })
}

/// What a job's Python objects are made from, shared by its `Job` and `Result` (both built
/// only when asked for): the message as read and decoded, and `data` once converted.
struct Native {
    id: u64,
    kind: Kind,
    received_at: f64,
    connection: u32,
    payload: Bytes,
    /// The decoded payload; None when it did not decode (`data` is then the raw bytes).
    decoded: Option<Data>,
    keys: Arc<KeyCache>,
    data: OnceLock<Py<PyAny>>,
}

impl Native {
    fn new(job: Job, decoded: Option<Data>, keys: &Arc<KeyCache>) -> Arc<Native> {
        Arc::new(Native {
            id: job.id,
            kind: job.kind,
            received_at: job.received_at,
            connection: job.connection,
            payload: job.payload,
            decoded,
            keys: keys.clone(),
            data: OnceLock::new(),
        })
    }

    fn data(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if let Some(d) = self.data.get() {
            return Ok(d.clone_ref(py));
        }
        let made = match &self.decoded {
            Some(d) => data_to_py(py, d, &self.keys)?,
            None => PyBytes::new(py, &self.payload).into_any().unbind(),
        };
        Ok(self.data.get_or_init(|| made).clone_ref(py))
    }
}

/// One received message: what the handler gets and what `Result.job` holds.
#[pyclass(frozen, module = "wspool", name = "Job")]
pub struct PyJob {
    native: Arc<Native>,
    metadata: OnceLock<Py<PyDict>>,
}

impl PyJob {
    fn new(native: Arc<Native>) -> PyJob {
        PyJob {
            native,
            metadata: OnceLock::new(),
        }
    }
}

#[pymethods]
impl PyJob {
    /// Position of the message in the stream: 0, 1, 2, ... in receipt order.
    #[getter]
    fn id(&self) -> u64 {
        self.native.id
    }

    /// The frame type the message arrived in: "text" or "binary".
    #[getter(r#type)]
    fn kind(&self) -> &'static str {
        self.native.kind.as_str()
    }

    /// The payload after decoding: bytes, str or a JSON value, as `decode=` asked (the raw
    /// bytes when it did not decode).
    #[getter]
    fn data(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.native.data(py)
    }

    /// `time.time()` when the message was read from the socket.
    #[getter]
    fn received_at(&self) -> f64 {
        self.native.received_at
    }

    /// Which connection of the stream delivered the message (0 for the first).
    #[getter]
    fn connection(&self) -> u32 {
        self.native.connection
    }

    /// A dict about the message: "size" (payload bytes as received).
    #[getter]
    fn metadata(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        if let Some(m) = self.metadata.get() {
            return Ok(m.clone_ref(py));
        }
        let dict = PyDict::new(py);
        dict.set_item("size", self.native.payload.len())?;
        Ok(self.metadata.get_or_init(|| dict.unbind()).clone_ref(py))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let data = self.native.data(py)?;
        let data = data.bind(py).repr()?;
        let data = data.to_cow()?;
        let shown: String = data.chars().take(60).collect();
        let more = if data.chars().count() > 60 { "..." } else { "" };
        let n = &self.native;
        Ok(format!(
            "Job(id={}, type={:?}, connection={}, size={}, data={shown}{more})",
            n.id,
            n.kind.as_str(),
            n.connection,
            n.payload.len()
        ))
    }
}

/// The outcome of one job: `value` (the handler's return value, or the decoded payload when
/// there is no handler) or `error` (the exception the handler raised, or a `DecodeError`).
#[pyclass(frozen, module = "wspool", name = "Result")]
pub struct PyJobResult {
    native: Arc<Native>,
    job: OnceLock<Py<PyJob>>,
    /// The handler's return value; None: the value is the job's data (no handler), or there
    /// is none (an error).
    pub(crate) value: Option<Py<PyAny>>,
    pub(crate) error: Option<Py<PyAny>>,
}

impl PyJobResult {
    fn job_obj(&self, py: Python<'_>) -> PyResult<Py<PyJob>> {
        if let Some(j) = self.job.get() {
            return Ok(j.clone_ref(py));
        }
        let made = Py::new(py, PyJob::new(self.native.clone()))?;
        Ok(self.job.get_or_init(|| made).clone_ref(py))
    }
}

#[pymethods]
impl PyJobResult {
    /// The job this result belongs to.
    #[getter]
    fn job(&self, py: Python<'_>) -> PyResult<Py<PyJob>> {
        self.job_obj(py)
    }

    /// The job's id: `result.job.id` without making the `Job` object.
    #[getter]
    fn id(&self) -> u64 {
        self.native.id
    }

    /// What the handler returned (the decoded payload without a handler); None on error.
    #[getter]
    fn value(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match (&self.value, &self.error) {
            (Some(v), _) => Ok(v.clone_ref(py)),
            (None, Some(_)) => Ok(py.None()),
            (None, None) => self.native.data(py),
        }
    }

    /// The exception object (traceback kept) when the job failed, else None.
    #[getter]
    fn error(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.error.as_ref().map(|e| e.clone_ref(py))
    }

    /// True when the job produced a value, False when it failed.
    #[getter]
    fn ok(&self) -> bool {
        self.error.is_none()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let id = self.native.id;
        Ok(match &self.error {
            None => format!(
                "Result(id={id}, value={})",
                self.value(py)?.bind(py).repr()?
            ),
            Some(e) => format!("Result(id={id}, error={})", e.bind(py).repr()?),
        })
    }
}

/// A snapshot of a stream's counters.
#[pyclass(frozen, module = "wspool", name = "Stats")]
pub struct PyStats {
    snap: StatsSnapshot,
    workers: usize,
}

#[pymethods]
impl PyStats {
    /// Messages read from the socket (each became a job).
    #[getter]
    fn received(&self) -> u64 {
        self.snap.received
    }
    /// Jobs whose result is a value.
    #[getter]
    fn processed(&self) -> u64 {
        self.snap.processed
    }
    /// Jobs whose result is an error.
    #[getter]
    fn failed(&self) -> u64 {
        self.snap.failed
    }
    /// Jobs dropped unprocessed by `cancel()` (or by leaving the stream on an interrupt).
    #[getter]
    fn cancelled(&self) -> u64 {
        self.snap.cancelled
    }
    /// Messages dropped by the overflow policy (drop_oldest, drop_newest, conflate, and the
    /// one that overflowed with "error").
    #[getter]
    fn dropped(&self) -> u64 {
        self.snap.dropped
    }
    /// Jobs whose handler was still running when close(), cancel() or the interpreter's exit
    /// gave up waiting (after close_timeout); their results are never delivered.
    #[getter]
    fn abandoned(&self) -> u64 {
        self.snap.abandoned
    }
    /// Successful reconnections (connections after the first).
    #[getter]
    fn reconnects(&self) -> u64 {
        self.snap.reconnects
    }
    /// Jobs received but not finished (nor dropped) yet.
    #[getter]
    fn in_flight(&self) -> u64 {
        self.snap.in_flight
    }
    /// Payload bytes received.
    #[getter]
    fn bytes(&self) -> u64 {
        self.snap.bytes
    }
    /// Seconds since the stream started, frozen when it ends.
    #[getter]
    fn elapsed(&self) -> f64 {
        self.snap.elapsed
    }
    /// Size of the worker pool.
    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }
    /// Native threads of the stream still running (0 once it is closed).
    #[getter]
    fn threads(&self) -> usize {
        self.snap.threads
    }
    /// With `reply=True`: replies sent back to the server.
    #[getter]
    fn replies(&self) -> u64 {
        self.snap.replies
    }
    /// With `reply=True`: replies dropped because their connection had ended first.
    #[getter]
    fn replies_dropped(&self) -> u64 {
        self.snap.replies_dropped
    }

    /// The counters as a dict.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let s = &self.snap;
        d.set_item("received", s.received)?;
        d.set_item("processed", s.processed)?;
        d.set_item("failed", s.failed)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("abandoned", s.abandoned)?;
        d.set_item("reconnects", s.reconnects)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("elapsed", s.elapsed)?;
        d.set_item("workers", self.workers)?;
        d.set_item("threads", s.threads)?;
        d.set_item("replies", s.replies)?;
        d.set_item("replies_dropped", s.replies_dropped)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let s = &self.snap;
        format!(
            "Stats(received={}, processed={}, failed={}, cancelled={}, dropped={}, abandoned={}, \
             in_flight={}, bytes={}, reconnects={}, elapsed={:.3}, workers={}, threads={})",
            s.received,
            s.processed,
            s.failed,
            s.cancelled,
            s.dropped,
            s.abandoned,
            s.in_flight,
            s.bytes,
            s.reconnects,
            s.elapsed,
            self.workers,
            s.threads
        )
    }
}

/// What a worker hands back: finished Python results when there is a handler (built on the
/// worker, which holds the GIL only for that), or native data converted later in batches.
pub(crate) enum Out {
    Native(Job, Result<Data, DecodeError>),
    /// No handler and `decode="bytes"`: the value is the job's payload. Its decoded copy (a
    /// second handle on the payload) is dropped on the worker, right after it was made, so
    /// that the consuming thread updates the read block's shared count once per message,
    /// not twice.
    Payload(Job),
    /// A `Select` processor's picks, all leaves, from a payload not otherwise decoded
    /// (`decode="bytes"`): not boxed, so that nothing the worker allocated per message is
    /// freed on the consuming thread (a free into another thread's malloc arena takes that
    /// arena's lock).
    Picked(Job, Leaves),
    /// A `Select` processor's picks, any other. Boxed: outcomes are moved several times on
    /// their way to Python, and this one would make every outcome (all variants are as big as
    /// the biggest) about 250 bytes instead of about 140.
    Selected(Box<Selected>),
    Done(Py<PyJobResult>),
    Panicked(Job, Error),
}

// Outcomes are moved several times on their way to Python: the unboxed variants must not make
// every one of them larger (136 bytes on x86-64 with `Out::Picked`, as before it).
const _: () = assert!(std::mem::size_of::<Out>() <= 136);

pub(crate) struct Selected {
    pub(crate) job: Job,
    /// The decoded payload; None for `decode="bytes"`, whose data is the payload itself (a
    /// second handle on it would be one more update of its read block's shared count, on the
    /// consuming thread, when it goes).
    pub(crate) data: Option<Data>,
    pub(crate) picks: Picks,
}

impl Selected {
    /// For [`Picks::Tree`]: the tape its indexes point into (the processor's own parse, or the
    /// decoded JSON) and the indexes. None for leaves, or with no tape at all.
    pub(crate) fn tree(&self) -> Option<(&Json, &[Option<usize>])> {
        match (&self.picks, &self.data) {
            (
                Picks::Tree {
                    own: Some(doc),
                    picks,
                },
                _,
            )
            | (Picks::Tree { own: None, picks }, Some(Data::Json(doc))) => Some((doc, picks)),
            _ => None,
        }
    }
}

/// At most this many fields are kept as [`Leaves`].
const LEAVES: usize = 4;

/// Picked fields, each absent (None), a scalar or a string without escapes (a range of the
/// job's payload): their nodes alone, readable without the tape.
#[derive(Clone, Copy)]
pub(crate) struct Leaves {
    nodes: [Option<Node>; LEAVES],
    len: u8,
}

impl Leaves {
    pub(crate) fn nodes(&self) -> &[Option<Node>] {
        &self.nodes[..self.len as usize]
    }
}

/// The fields a `Select` picked from one message.
pub(crate) enum Picks {
    /// Leaves only: the tape of a parse of its own is freed on the worker that made it, not
    /// on the consuming thread (on which, with the picks' list, the frees of memory from the
    /// workers' arenas were about a third of its time).
    Leaves(Leaves),
    /// Any other: node indexes into the decoded JSON, or into `own`, the processor's own parse
    /// when `decode=` was not "json".
    Tree {
        own: Option<Json>,
        picks: Vec<Option<usize>>,
    },
}

impl Leaves {
    /// The picks of `paths` in `doc` as leaves, or, where any is not one (or there are more
    /// than `LEAVES`), as node indexes into `doc`.
    fn of(doc: &Json, paths: &[Vec<String>]) -> Result<Leaves, Vec<Option<usize>>> {
        let picks = doc.select(paths);
        let mut leaves = [None; LEAVES];
        let leaf = |(slot, pick): (&mut Option<Node>, &Option<usize>)| match pick {
            Some(at) => doc.leaf(*at).map(|node| *slot = Some(node)).is_some(),
            None => true,
        };
        if picks.len() <= LEAVES && leaves.iter_mut().zip(&picks).all(leaf) {
            let len = picks.len() as u8;
            return Ok(Leaves { nodes: leaves, len });
        }
        Err(picks)
    }
}

impl Out {
    /// The payload bytes of the job this came from.
    fn size(&self) -> usize {
        match self {
            Out::Native(job, _)
            | Out::Payload(job)
            | Out::Picked(job, _)
            | Out::Panicked(job, _) => job.payload.len(),
            Out::Selected(s) => s.job.payload.len(),
            Out::Done(result) => result.get().native.payload.len(),
        }
    }
}

/// Payload bytes handed to Python in one batch at most (beyond its first result): a batch of
/// large messages made into Python objects all at once would leave the cache, and freeing it
/// whole hands its memory back to the system, to be faulted in again for the next.
/// `python benches/bench_clients.py wspool large --count 100000 --size 16384` against a
/// `stream_server.py` stream: 1024 results of 16 KiB per batch took 1.0-1.2 s of CPU, 16 of
/// them (256 KiB) 0.6 s.
const HANDOVER_BYTES: usize = 256 * 1024;

/// What the workers run on each job.
enum Mode {
    /// No handler: the result's value is the decoded payload.
    Decode,
    /// A Python callable, called with the GIL held (taken once per batch).
    Python(Py<PyAny>),
    /// A `wspool.Select`: fields picked from the JSON natively, without the GIL.
    Select(Arc<Vec<Vec<String>>>),
}

/// What `reply=True` sends for a decoded payload (no handler): the value as it is.
fn native_reply(job: &Job, decoded: &Result<Data, DecodeError>) -> Option<Outgoing> {
    match decoded {
        Ok(Data::Text(t)) => Some(Outgoing::Text(t.clone())),
        Ok(Data::Bytes(b)) => Some(Outgoing::Binary(b.to_vec())),
        // The payload parsed as JSON, so it is UTF-8: send it back as the text it was.
        Ok(Data::Json(_)) => Some(Outgoing::Text(
            String::from_utf8_lossy(&job.payload).into_owned(),
        )),
        Err(_) => None,
    }
}

/// What `reply=True` sends for a handler's value: str as text, bytes as binary, None nothing.
/// Any other value makes the job fail with a TypeError (nothing is sent).
fn handler_reply(
    py: Python<'_>,
    result: Py<PyJobResult>,
    ok: bool,
) -> PyResult<(Py<PyJobResult>, bool, Option<Outgoing>)> {
    let r = result.get();
    let value = match &r.value {
        Some(v) if ok => v.bind(py).clone(),
        _ => return Ok((result, ok, None)),
    };
    if value.is_none() {
        return Ok((result, ok, None));
    }
    let message = if let Ok(s) = value.cast::<PyString>() {
        Some(Outgoing::Text(s.to_cow()?.into_owned()))
    } else if let Ok(b) = value.cast::<PyBytes>() {
        Some(Outgoing::Binary(b.as_bytes().to_vec()))
    } else {
        None
    };
    if message.is_some() {
        return Ok((result, ok, message));
    }
    let error = pyo3::exceptions::PyTypeError::new_err(format!(
        "reply=True: the handler returned {}; return str (sent as text), bytes (binary) or None",
        value.get_type().name()?
    ));
    let job = OnceLock::new();
    if let Some(j) = r.job.get() {
        let _ = job.set(j.clone_ref(py));
    }
    let failed = PyJobResult {
        native: r.native.clone(),
        job,
        value: None,
        error: Some(error.into_value(py).into_any()),
    };
    Ok((Py::new(py, failed)?, false, None))
}

struct PyProcessor {
    mode: Mode,
    keys: Arc<KeyCache>,
    /// `reply=True`: each value (str, bytes) goes back on the job's connection.
    replies: Option<Replies>,
}

impl PyProcessor {
    /// Hands a reply to the read loop, without the GIL (the channel may be full): a batch of
    /// handler calls holds it here.
    fn reply(&self, connection: u32, message: Option<Outgoing>) {
        if let (Some(replies), Some(message)) = (&self.replies, message) {
            let mut message = Some(message);
            let mut send = || {
                if let Some(m) = message.take() {
                    replies.send(connection, m);
                }
            };
            if Python::try_attach(|py| py.detach(&mut send)).is_none() {
                send();
            }
        }
    }
}

/// Builds the Python result of a job; the handler (if any) runs here.
fn finish(
    py: Python<'_>,
    handler: Option<&Py<PyAny>>,
    keys: &Arc<KeyCache>,
    job: Job,
    decoded: Result<Data, DecodeError>,
) -> PyResult<(Py<PyJobResult>, bool)> {
    let decode_failure = match &decoded {
        Err(e) => Some(decode_error(py, &job, e)?),
        Ok(_) => None,
    };
    let native = Native::new(job, decoded.ok(), keys);
    let job_obj = OnceLock::new();
    let (value, error) = match (decode_failure, handler) {
        (Some(err), _) => (None, Some(err)),
        (None, None) => (None, None),
        (None, Some(h)) => {
            let made = Py::new(py, PyJob::new(native.clone()))?;
            let returned = h.call1(py, (made.clone_ref(py),));
            let _ = job_obj.set(made);
            match returned {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e.into_value(py).into_any())),
            }
        }
    };
    let ok = error.is_none();
    let result = PyJobResult {
        native,
        job: job_obj,
        value,
        error,
    };
    Ok((Py::new(py, result)?, ok))
}

fn internal_result(
    py: Python<'_>,
    keys: &Arc<KeyCache>,
    job: Job,
    error: Error,
) -> PyResult<Py<PyJobResult>> {
    let err = to_pyerr(py, error).into_value(py).into_any();
    Py::new(
        py,
        PyJobResult {
            native: Native::new(job, None, keys),
            job: OnceLock::new(),
            value: None,
            error: Some(err),
        },
    )
}

impl Processor for PyProcessor {
    type Output = Out;

    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Out, bool) {
        let handler = match &self.mode {
            Mode::Python(handler) => handler,
            Mode::Decode => {
                let ok = decoded.is_ok();
                if self.replies.is_some() {
                    self.reply(job.connection, native_reply(&job, &decoded));
                }
                if let Ok(Data::Bytes(_)) = decoded {
                    return (Out::Payload(job), true);
                }
                return (Out::Native(job, decoded), ok);
            }
            Mode::Select(paths) => return select(job, decoded, paths),
        };
        // Cheap (the payload is shared): kept to describe the job if its result cannot be made.
        let copy = job.clone();
        // try_attach: never attach to an interpreter that is shutting down (the Python side
        // cancels live streams at exit, so this is only a second line of defence). Within a
        // batch the GIL is held already and this is only a check.
        let done = Python::try_attach(|py| {
            let built =
                finish(py, Some(handler), &self.keys, job, decoded).and_then(|(result, ok)| {
                    match self.replies {
                        Some(_) => handler_reply(py, result, ok),
                        None => Ok((result, ok, None)),
                    }
                });
            match built {
                Ok((result, ok, reply)) => Ok((Out::Done(result), ok, reply)),
                Err(e) => Err(format!("cannot build the result of job {}: {e}", copy.id)),
            }
        });
        let error = match done {
            Some(Ok((out, ok, reply))) => {
                self.reply(copy.connection, reply);
                return (out, ok);
            }
            Some(Err(msg)) => msg,
            None => "the Python interpreter is shutting down".to_string(),
        };
        (Out::Panicked(copy, Error::Internal(error)), false)
    }

    fn batchable(&self) -> bool {
        // A Python handler may block for as long as it likes: one job at a time.
        !matches!(self.mode, Mode::Python(_))
    }

    fn worker(&self, work: &mut (dyn FnMut() + Send)) {
        // A thread unknown to Python gets a new interpreter thread state each time it takes
        // the GIL, freed when it lets go (with its frame stack, mapped and unmapped): that was
        // most of a handler call's cost. Keep one for the worker's life, GIL released, so each
        // batch only takes the GIL. The stream's threads end before the interpreter finalizes
        // (the exit hook waits for them), so taking it back at the end is safe.
        if !matches!(self.mode, Mode::Python(_))
            || Python::try_attach(|py| py.detach(&mut *work)).is_none()
        {
            work();
        }
    }

    fn batch(&self, work: &mut dyn FnMut()) {
        // One GIL acquisition per batch of handler calls, not one per job: each acquisition
        // may wait for the thread that holds it (up to the interpreter's switch interval).
        if !matches!(self.mode, Mode::Python(_)) || Python::try_attach(|_| work()).is_none() {
            work();
        }
    }

    fn unlocked(&self, wait: &mut (dyn FnMut() + Send)) {
        if Python::try_attach(|py| py.detach(&mut *wait)).is_none() {
            wait();
        }
    }

    fn panicked(&self, job: Job, error: Error) -> Out {
        Out::Panicked(job, error)
    }

    fn passthrough(&self, mode: DecodeMode) -> Option<fn(Job) -> Out> {
        // Bytes without a handler: the value is the payload (what `process` makes of it, with
        // nothing to decode). Not with replies, which `process` sends.
        match (&self.mode, mode, &self.replies) {
            (Mode::Decode, DecodeMode::Bytes, None) => Some(Out::Payload),
            _ => None,
        }
    }
}

fn selected(job: Job, data: Data, picks: Picks) -> Out {
    let data = match data {
        Data::Bytes(_) => None,
        other => Some(other),
    };
    match (data, picks) {
        (None, Picks::Leaves(leaves)) => Out::Picked(job, leaves),
        (data, picks) => Out::Selected(Box::new(Selected { job, data, picks })),
    }
}

/// Runs a `Select` on a job, natively.
fn select(mut job: Job, decoded: Result<Data, DecodeError>, paths: &[Vec<String>]) -> (Out, bool) {
    match decoded {
        Ok(Data::Json(doc)) => {
            let picks = match Leaves::of(&doc, paths) {
                Ok(leaves) => Picks::Leaves(leaves),
                Err(picks) => Picks::Tree { own: None, picks },
            };
            (selected(job, Data::Json(doc), picks), true)
        }
        // A parse of its own, which takes the payload (its handle's count is shared with the
        // other messages of its read block; each clone is an update other threads contend on)
        // and gives it back unless the picks need the tape.
        Ok(other) => match Json::parse_owned(std::mem::take(&mut job.payload)) {
            Ok(doc) => {
                let picks = match Leaves::of(&doc, paths) {
                    Ok(leaves) => {
                        job.payload = doc.into_payload();
                        Picks::Leaves(leaves)
                    }
                    Err(picks) => {
                        job.payload = doc.payload().clone();
                        Picks::Tree {
                            own: Some(doc),
                            picks,
                        }
                    }
                };
                (selected(job, other, picks), true)
            }
            Err((payload, e)) => {
                job.payload = payload;
                let e = DecodeError {
                    message: format!("payload is not valid JSON: {e}"),
                };
                (Out::Native(job, Err(e)), false)
            }
        },
        Err(e) => (Out::Native(job, Err(e)), false),
    }
}

/// The value of a `Select` result: the one field, or a tuple of them (None where absent).
fn picked(
    py: Python<'_>,
    doc: &Json,
    picks: &[Option<usize>],
    keys: &KeyCache,
) -> PyResult<Py<PyAny>> {
    let mut keys = keys.borrow();
    let one = |pick: &Option<usize>| match *pick {
        Some(mut at) => json_node(py, doc, &mut at, &mut keys),
        None => Ok(py.None().into_bound(py)),
    };
    one_or_tuple(py, picks, one)
}

/// A `Select` value: the one field alone, or the tuple of them. Up to 8 fields, the items are
/// gathered on the stack (a `Vec` per message was a measurable share of the consuming thread).
fn one_or_tuple<'py, T>(
    py: Python<'py>,
    fields: &[T],
    mut value: impl FnMut(&T) -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Py<PyAny>> {
    Ok(match fields {
        [single] => value(single)?.unbind(),
        few if few.len() <= 8 => {
            let mut items: [Option<Bound<'py, PyAny>>; 8] = Default::default();
            for (item, field) in items.iter_mut().zip(few) {
                *item = Some(value(field)?);
            }
            let items = items[..few.len()]
                .iter()
                .map(|i| i.as_ref().expect("set above"));
            PyTuple::new(py, items)?.into_any().unbind()
        }
        many => PyTuple::new(py, many.iter().map(value).collect::<PyResult<Vec<_>>>()?)?
            .into_any()
            .unbind(),
    })
}

/// A leaf of a JSON tape (see `Json::leaf`) as a Python object, its string read from `payload`.
fn leaf_to_py<'py>(py: Python<'py>, node: Node, payload: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    Ok(match node {
        Node::Bool(b) => PyBool::new(py, b).to_owned().into_any(),
        Node::Int(i) => i.into_pyobject(py)?.into_any(),
        Node::UInt(u) => u.into_pyobject(py)?.into_any(),
        Node::Float(f) => f.into_pyobject(py)?.into_any(),
        Node::Str { .. } => {
            PyString::from_bytes(py, json::leaf_str(payload, node).unwrap_or_default())?.into_any()
        }
        Node::Null | Node::Owned(_) | Node::Array { .. } | Node::Object { .. } => {
            py.None().into_bound(py)
        }
    })
}

/// The value of a `Select` result from its leaves, their strings read from `payload`.
fn leaves_value(py: Python<'_>, leaves: &Leaves, payload: &[u8]) -> PyResult<Py<PyAny>> {
    one_or_tuple(py, leaves.nodes(), |leaf| {
        leaf.map_or_else(
            || Ok(py.None().into_bound(py)),
            |node| leaf_to_py(py, node, payload),
        )
    })
}

/// The value of a `Select` result: from its leaves, or from the processor's own parse or the
/// decoded JSON.
fn selected_value(py: Python<'_>, keys: &KeyCache, s: &Selected) -> PyResult<Py<PyAny>> {
    if let Picks::Leaves(leaves) = &s.picks {
        return leaves_value(py, leaves, &s.job.payload);
    }
    match s.tree() {
        Some((doc, picks)) => picked(py, doc, picks, keys),
        None => Ok(py.None()),
    }
}

/// Whether a job's outcome is a value (not an error).
fn out_ok(out: &Out) -> bool {
    match out {
        Out::Native(_, decoded) => decoded.is_ok(),
        Out::Payload(_) | Out::Picked(..) | Out::Selected(..) => true,
        Out::Done(result) => result.get().error.is_none(),
        Out::Panicked(..) => false,
    }
}

/// The value of a job that succeeded (see `out_ok`), made without a `Result` object. Borrows
/// the outcome: moving one (a few hundred bytes) per message was a measurable share of the
/// consuming thread.
fn out_value(py: Python<'_>, keys: &Arc<KeyCache>, out: &Out) -> PyResult<Py<PyAny>> {
    match out {
        Out::Native(_, Ok(data)) => data_to_py(py, data, keys),
        Out::Payload(job) => Ok(PyBytes::new(py, &job.payload).into_any().unbind()),
        Out::Picked(job, leaves) => leaves_value(py, leaves, &job.payload),
        Out::Selected(s) => selected_value(py, keys, s),
        Out::Done(result) => result.get().value(py),
        Out::Native(_, Err(_)) | Out::Panicked(..) => Err(to_pyerr(
            py,
            Error::Internal("a failed job was taken for a value".into()),
        )),
    }
}

/// The `Result` of a job that succeeded with no handler to call: `value` None is `job.data`.
fn made_result(
    py: Python<'_>,
    native: Arc<Native>,
    value: Option<Py<PyAny>>,
) -> PyResult<Py<PyJobResult>> {
    let result = PyJobResult {
        native,
        job: OnceLock::new(),
        value,
        error: None,
    };
    Py::new(py, result)
}

fn out_to_py(py: Python<'_>, keys: &Arc<KeyCache>, out: Out) -> PyResult<Py<PyJobResult>> {
    match out {
        Out::Selected(s) => {
            let value = selected_value(py, keys, &s)?;
            made_result(py, Native::new(s.job, s.data, keys), Some(value))
        }
        Out::Done(r) => Ok(r),
        Out::Native(job, decoded) => Ok(finish(py, None, keys, job, decoded)?.0),
        Out::Picked(job, leaves) => {
            let value = leaves_value(py, &leaves, &job.payload)?;
            made_result(py, Native::new(job, None, keys), Some(value))
        }
        // Not decoded: `job.data`, and so the value, is the payload as bytes.
        Out::Payload(job) => made_result(py, Native::new(job, None, keys), None),
        Out::Panicked(job, error) => internal_result(py, keys, job, error),
    }
}

fn wait_slices<T>(
    py: Python<'_>,
    timeout: Option<f64>,
    mut step: impl FnMut(Duration) -> Option<T> + Send,
) -> PyResult<Option<T>>
where
    T: Send,
{
    let deadline = timeout.map(|t| std::time::Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    loop {
        let slice = match deadline {
            Some(d) => d
                .saturating_duration_since(std::time::Instant::now())
                .min(SLICE),
            None => SLICE,
        };
        if let Some(v) = py.detach(|| step(slice)) {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(None);
        }
    }
}

/// A native processor: pass it as the handler to pick fields out of each JSON message on the
/// worker threads, without the GIL. `Select("sym", "px.bid")` makes each result's value the
/// tuple `(msg["sym"], msg["px"]["bid"])`; with one field the value is that field alone. A
/// field that is absent (or not reached through objects) gives None; a payload that is not JSON
/// gives a `DecodeError`. Works whatever `decode=` is (`job.data` follows `decode=`). Calling
/// it on a `Job` does the same in Python.
#[pyclass(frozen, module = "wspool", name = "Select")]
pub struct PySelect {
    fields: Vec<String>,
    paths: Arc<Vec<Vec<String>>>,
}

#[pymethods]
impl PySelect {
    #[new]
    #[pyo3(signature = (*fields))]
    fn new(fields: Vec<String>) -> PyResult<Self> {
        if fields.is_empty() {
            return Err(PyValueError::new_err("Select needs at least one field"));
        }
        let paths = fields
            .iter()
            .map(|f| {
                let path: Vec<String> = f.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    Err(PyValueError::new_err(format!(
                        "invalid field {f:?}: use names joined by dots, like \"px.bid\""
                    )))
                } else {
                    Ok(path)
                }
            })
            .collect::<PyResult<_>>()?;
        Ok(PySelect {
            fields,
            paths: Arc::new(paths),
        })
    }

    /// The fields, as given.
    #[getter]
    fn fields(&self) -> Vec<String> {
        self.fields.clone()
    }

    /// The same selection in Python, on `job.data` (a dict, as `decode="json"` gives).
    fn __call__(&self, py: Python<'_>, job: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let data = job.getattr("data")?;
        let pick = |path: &Vec<String>| -> PyResult<Bound<'_, PyAny>> {
            let mut at = data.clone();
            for name in path {
                match at
                    .cast::<PyDict>()
                    .ok()
                    .map(|d| d.get_item(name))
                    .transpose()?
                {
                    Some(Some(v)) => at = v,
                    _ => return Ok(py.None().into_bound(py)),
                }
            }
            Ok(at)
        };
        one_or_tuple(py, &self.paths, pick)
    }

    fn __repr__(&self) -> String {
        let fields: Vec<String> = self.fields.iter().map(|f| format!("{f:?}")).collect();
        format!("Select({})", fields.join(", "))
    }
}

/// The native half of `wspool.Stream`; use `wspool.consume()` instead of this class.
#[pyclass(frozen, module = "wspool._native", name = "NativeStream")]
pub struct NativeStream {
    inner: Stream<Out>,
    keys: Arc<KeyCache>,
    close_timeout: Duration,
    /// The read end of the socket pair `bell_fd` hands out; the ringer holds the write end.
    #[cfg(unix)]
    bell: std::sync::OnceLock<std::os::unix::net::UnixStream>,
}

impl Drop for NativeStream {
    /// Dropped without `close()` (garbage collection, `del`): cancel (close code 1001), and
    /// wait (GIL released, bounded by close_timeout) for the threads, so none is still inside
    /// Python when the interpreter exits; handlers still running then are counted as abandoned.
    /// Not when the last reference goes away on one of the stream's own threads (a handler
    /// holding it): that thread cannot wait for itself. In a forked child nothing is waited for
    /// (the threads are the parent's).
    fn drop(&mut self) {
        self.inner.cancel_going_away();
        if !crate::stream::on_stream_thread() {
            let (inner, wait) = (&self.inner, self.close_timeout);
            let joined = Python::try_attach(|py| py.detach(|| inner.join(wait)));
            if joined == Some(false) {
                inner.abandon();
            }
        }
    }
}

fn outgoing(item: &Bound<'_, PyAny>) -> PyResult<Outgoing> {
    if let Ok(s) = item.cast::<PyString>() {
        Ok(Outgoing::Text(s.to_cow()?.into_owned()))
    } else if let Ok(b) = item.cast::<PyBytes>() {
        Ok(Outgoing::Binary(b.as_bytes().to_vec()))
    } else {
        Err(PyValueError::new_err(format!(
            "subscribe messages must be str or bytes, not {}",
            item.get_type().name()?
        )))
    }
}

fn subscriptions(subscribe: &Bound<'_, PyAny>) -> PyResult<Subscribe> {
    if subscribe.is_none() {
        return Ok(Subscribe::None);
    }
    if subscribe.is_callable() {
        let make = subscribe.clone().unbind();
        return Ok(Subscribe::Dynamic(Arc::new(move |connection| {
            Python::try_attach(|py| {
                let messages = make
                    .call1(py, (connection,))
                    .map_err(|e| Error::Callback(format!("the subscribe callable raised {e}")))?;
                let messages = messages.bind(py);
                messages
                    .try_iter()
                    .and_then(|items| items.map(|item| outgoing(&item?)).collect())
                    .map_err(|e| Error::Callback(format!("subscribe: {e}")))
            })
            .unwrap_or_else(|| {
                Err(Error::Callback(
                    "the Python interpreter is shutting down".into(),
                ))
            })
        })));
    }
    let messages: Vec<Bound<'_, PyAny>> = subscribe.extract()?;
    Ok(Subscribe::Messages(
        messages.iter().map(outgoing).collect::<PyResult<_>>()?,
    ))
}

/// Calls the Python `on_event(kind, connection, attempt, delay, cause)` for each event; an
/// exception it raises is reported as unraisable (the stream goes on).
fn event_hook(callback: Py<PyAny>) -> EventHook {
    EventHook(Arc::new(move |event: &Event| {
        Python::try_attach(|py| {
            let (kind, connection, attempt, delay, cause) = match event {
                Event::Connected { connection } => ("connected", *connection, 0, None, None),
                Event::Disconnected { connection, cause } => {
                    ("disconnected", *connection, 0, None, cause.clone())
                }
                Event::Retrying {
                    connection,
                    attempt,
                    delay,
                    cause,
                } => (
                    "retrying",
                    *connection,
                    *attempt,
                    Some(delay.as_secs_f64()),
                    Some(cause.clone()),
                ),
            };
            let cause = cause.map(|e| to_pyerr(py, e).into_value(py));
            if let Err(e) = callback.call1(py, (kind, connection, attempt, delay, cause)) {
                e.write_unraisable(py, Some(callback.bind(py)));
            }
        });
    }))
}

/// What `next_values` returns: the leading values, and the rest as `Result`s from the first
/// failed one on.
type ValuesAndRest<'py> = (Bound<'py, PyList>, Option<Bound<'py, PyList>>);

impl NativeStream {
    /// Waits (GIL released, signals checked) for up to `max` results: Some(items), or
    /// Some(empty) when `timeout` seconds passed without one; None when the stream is over;
    /// the error that ended it abnormally, once.
    fn wait_items(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Option<Vec<Out>>> {
        let inner = &self.inner;
        let batch = wait_slices(py, timeout, |slice| {
            match inner.next_batch_within(max, HANDOVER_BYTES, Out::size, slice) {
                Batch::Pending => None,
                other => Some(other),
            }
        })?;
        match batch {
            Some(Batch::Items(items)) => Ok(Some(items)),
            Some(Batch::End(Some(e))) => Err(to_pyerr(py, e)),
            Some(_) => Ok(None),
            None => Ok(Some(Vec::new())),
        }
    }
}

#[pymethods]
impl NativeStream {
    /// Checks the arguments and starts the threads; the connection opens in the background
    /// (see `wait_connected`). Raises ValueError for an unusable URL or argument.
    ///
    /// `subscribe` is a list of str/bytes, or a callable taking the connection number and
    /// returning one (called on the I/O thread before each subscription). `on_event` is called
    /// on the I/O thread as `on_event(kind, connection, attempt, delay, cause)`.
    #[new]
    #[pyo3(signature = (url, handler, *, workers, decode, subscribe, headers, timeout,
                        queue_size, open_timeout, close_timeout, overflow, key, ordered,
                        ping_interval, ping_timeout, max_message_size, reconnect, on_event,
                        ca, reply, journal = None, journal_sync = "normal"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: String,
        handler: Option<Py<PyAny>>,
        workers: usize,
        decode: &str,
        subscribe: Bound<'_, PyAny>,
        headers: Vec<(String, String)>,
        timeout: Option<f64>,
        queue_size: usize,
        open_timeout: f64,
        close_timeout: f64,
        overflow: &str,
        key: Option<String>,
        ordered: &str,
        ping_interval: Option<f64>,
        ping_timeout: Option<f64>,
        max_message_size: usize,
        reconnect: Option<(Option<u32>, f64, f64, bool)>,
        on_event: Option<Py<PyAny>>,
        ca: Option<std::path::PathBuf>,
        reply: bool,
        journal: Option<std::path::PathBuf>,
        journal_sync: &str,
    ) -> PyResult<Self> {
        let seconds = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v).map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} must be a non-negative, finite number of seconds, not {v}"
                ))
            })
        };
        let positive = |name: &str, v: f64| match seconds(name, v)? {
            d if d.is_zero() => Err(PyValueError::new_err(format!("{name} must be > 0"))),
            d => Ok(d),
        };
        let mut config = Config::new(url);
        config.workers = workers;
        config.decode = decode
            .parse::<DecodeMode>()
            .map_err(PyValueError::new_err)?;
        config.subscribe = subscriptions(&subscribe)?;
        config.headers = headers;
        config.timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        config.queue_size = queue_size;
        config.open_timeout = seconds("open_timeout", open_timeout)?;
        config.close_timeout = seconds("close_timeout", close_timeout)?;
        config.overflow = overflow
            .parse::<Overflow>()
            .map_err(PyValueError::new_err)?;
        config.key = key;
        config.order = match ordered {
            "completion" => Order::Completion,
            "receipt" => Order::Receipt,
            "key" => Order::Key,
            other => {
                return Err(PyValueError::new_err(format!(
                    "ordered must be False, True or \"key\", not {other:?}"
                )))
            }
        };
        config.heartbeat = Heartbeat {
            interval: ping_interval
                .map(|t| positive("ping_interval", t))
                .transpose()?,
            timeout: ping_timeout
                .map(|t| positive("ping_timeout", t))
                .transpose()?,
        };
        config.max_message_size = max_message_size;
        config.reconnect = reconnect
            .map(|(max_attempts, initial, maximum, jitter)| {
                Ok::<_, PyErr>(Reconnect {
                    max_attempts,
                    initial: positive("reconnect initial", initial)?,
                    maximum: positive("reconnect maximum", maximum)?,
                    jitter,
                })
            })
            .transpose()?;
        config.on_event = on_event.map(event_hook);
        config.tls = TlsOptions { ca_file: ca };
        config.replies = reply.then(|| Replies::new(config.queue_size));
        config.journal = journal
            .map(|path| {
                let sync = journal_sync.parse().map_err(PyValueError::new_err)?;
                Ok::<_, PyErr>(crate::journal::JournalSpec { path, sync })
            })
            .transpose()?;
        let close_timeout = config.close_timeout;
        let keys = Arc::new(KeyCache::default());
        let mode = match handler {
            None => Mode::Decode,
            Some(h) => match h.bind(py).cast::<PySelect>() {
                Ok(select) => Mode::Select(select.get().paths.clone()),
                Err(_) => Mode::Python(h),
            },
        };
        let processor = PyProcessor {
            mode,
            keys: keys.clone(),
            replies: config.replies.clone(),
        };
        let describe = Arc::new(crate::py_journal::describe);
        // Opening a journal reads (and may create) a file: without the GIL.
        let inner = py
            .detach(|| Stream::start_journaled(config, processor, describe))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(NativeStream {
            inner,
            keys,
            close_timeout,
            #[cfg(unix)]
            bell: std::sync::OnceLock::new(),
        })
    }

    /// Blocks until the handshake is done; raises ConnectError, HandshakeError or Timeout.
    fn wait_connected(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        match wait_slices(py, None, |slice| inner.wait_connected(slice))? {
            Some(Err(e)) => Err(to_pyerr(py, e)),
            _ => Ok(()),
        }
    }

    /// Up to `max` results as a list, waiting for the first; None when the stream is over
    /// (after raising, once, the error that ended it abnormally); an empty list when `timeout`
    /// seconds passed without a result (None: no limit).
    #[pyo3(signature = (max = 1024, timeout = None))]
    fn next_batch<'py>(
        &self,
        py: Python<'py>,
        max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let Some(items) = self.wait_items(py, max, timeout)? else {
            return Ok(None);
        };
        let converted = items
            .into_iter()
            .map(|o| out_to_py(py, &self.keys, o))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Some(PyList::new(py, converted)?))
    }

    /// Like `next_batch`, but the results' values without `Result` objects: `(values, rest)`,
    /// the values of the leading successful results and, from the first failed one on, the
    /// rest of the batch as `Result`s (None when every one succeeded); `([], None)` when
    /// `timeout` seconds passed without a result; None when the stream is over.
    #[pyo3(signature = (max = 1024, timeout = None))]
    fn next_values<'py>(
        &self,
        py: Python<'py>,
        max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Option<ValuesAndRest<'py>>> {
        let Some(mut items) = self.wait_items(py, max, timeout)? else {
            return Ok(None);
        };
        let rest = match items.iter().position(|o| !out_ok(o)) {
            Some(at) => {
                let rest = items
                    .drain(at..)
                    .map(|o| out_to_py(py, &self.keys, o))
                    .collect::<PyResult<Vec<_>>>()?;
                Some(PyList::new(py, rest)?)
            }
            None => None,
        };
        let values = items
            .iter()
            .map(|o| out_value(py, &self.keys, o))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Some((PyList::new(py, values)?, rest)))
    }

    /// A file descriptor that becomes readable when, after `arm()`, results may have come or
    /// the stream may have ended: an event loop watches it instead of a thread waiting in
    /// `next_batch`. Read it empty (non-blocking) after each wake-up. None where there is none
    /// (not Unix).
    fn bell_fd(&self) -> PyResult<Option<i64>> {
        #[cfg(unix)]
        {
            use std::io::Write;
            use std::os::fd::AsRawFd;
            if self.bell.get().is_none() {
                let (reader, writer) = std::os::unix::net::UnixStream::pair()
                    .and_then(|(r, w)| {
                        r.set_nonblocking(true)?;
                        w.set_nonblocking(true)?;
                        Ok((r, w))
                    })
                    .map_err(|e| {
                        pyo3::exceptions::PyOSError::new_err(format!("cannot make the bell: {e}"))
                    })?;
                if self.bell.set(reader).is_ok() {
                    // A full socket already holds a wake-up: a failed write loses nothing.
                    self.inner.set_ringer(Box::new(move || {
                        let _ = (&writer).write(&[1]);
                    }));
                }
            }
            Ok(self.bell.get().map(|r| i64::from(r.as_raw_fd())))
        }
        #[cfg(not(unix))]
        Ok(None)
    }

    /// After finding nothing (`next_batch` with timeout 0): True if the caller should wait
    /// for `bell_fd` to become readable, False if results (or the end) are there already.
    fn arm(&self, py: Python<'_>) -> bool {
        // It may wait for a consumer on another thread (the stream's locks): without the GIL.
        py.detach(|| self.inner.arm())
    }

    /// Stop reading and send a close frame; queued jobs still finish. Returns at once.
    fn close(&self) {
        self.inner.close();
    }

    /// Stop reading, send a close frame (1000, or 1001 with `going_away`: interrupted or
    /// exiting), drop queued jobs and undelivered results.
    #[pyo3(signature = (going_away = false))]
    fn cancel(&self, going_away: bool) {
        if going_away {
            self.inner.cancel_going_away();
        } else {
            self.inner.cancel();
        }
    }

    /// Stop waiting for the stream after a join timed out: queued jobs count as cancelled and
    /// running ones as abandoned. Returns how many were abandoned.
    fn abandon(&self) -> u64 {
        self.inner.abandon()
    }

    /// Waits (GIL released, Ctrl-C honoured) for every native thread to end; True if they did
    /// within `timeout` seconds (None: no limit).
    #[pyo3(signature = (timeout = None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let inner = &self.inner;
        let done = wait_slices(py, timeout, |slice| inner.join(slice).then_some(()))?;
        Ok(done.is_some())
    }

    /// The stream's journal (status queries, recovered jobs); None without `journal=`.
    fn journal(&self) -> Option<crate::py_journal::PyStreamJournal> {
        self.inner.journal().map(crate::py_journal::stream_journal)
    }

    /// A snapshot of the counters.
    #[getter]
    fn stats(&self) -> PyStats {
        PyStats {
            snap: self.inner.stats(),
            workers: self.inner.workers(),
        }
    }
}

/// True when called on one of a stream's native threads (a worker running a handler): there,
/// `close()` and `cancel()` only ask, since the thread cannot wait for its own stream.
#[pyfunction]
fn on_stream_thread() -> bool {
    crate::stream::on_stream_thread()
}

/// The native core of wspool (read loop, worker pool, queues). Use the `wspool` package.
#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeStream>()?;
    m.add_function(wrap_pyfunction!(on_stream_thread, m)?)?;
    m.add_class::<PyJob>()?;
    m.add_class::<PyJobResult>()?;
    m.add_class::<PySelect>()?;
    m.add_class::<PyStats>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    crate::py_journal::register(m)?;
    // Cargo features compiled in that tests look for ("test-panic": see stream::test_panic).
    let features: &[&str] = if cfg!(feature = "test-panic") {
        &["test-panic"]
    } else {
        &[]
    };
    m.add("__features__", pyo3::types::PyTuple::new(m.py(), features)?)?;
    Ok(())
}
