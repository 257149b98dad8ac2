//! The Python binding: converts arguments and results and delegates to the native core. Every
//! blocking wait runs with the GIL released, in slices, checking for signals between slices so
//! Ctrl-C interrupts it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString};

use crate::errors::Error;
use crate::job::{Data, DecodeError, DecodeMode, Job, Kind};
use crate::pool::Processor;
use crate::queue::{Order, Overflow};
use crate::state::StatsSnapshot;
use crate::stream::{Batch, Config, Event, EventHook, Reconnect, Stream, Subscribe};
use crate::ws::{Heartbeat, Outgoing};

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
            Error::Callback(_) => "WspoolError",
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

fn json_to_py<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(PyString::new(py, k), json_to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

fn data_to_py(py: Python<'_>, data: &Data) -> PyResult<Py<PyAny>> {
    Ok(match data {
        Data::Bytes(b) => PyBytes::new(py, b).into_any().unbind(),
        Data::Text(s) => PyString::new(py, s).into_any().unbind(),
        Data::Json(v) => json_to_py(py, v)?.unbind(),
    })
}

/// One received message: what the handler gets and what `Result.job` holds.
#[pyclass(frozen, module = "wspool", name = "Job")]
pub struct PyJob {
    id: u64,
    kind: Kind,
    data: Py<PyAny>,
    received_at: f64,
    connection: u32,
    size: usize,
    metadata: OnceLock<Py<PyDict>>,
}

#[pymethods]
impl PyJob {
    /// Position of the message in the stream: 0, 1, 2, ... in receipt order.
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// The frame type the message arrived in: "text" or "binary".
    #[getter(r#type)]
    fn kind(&self) -> &'static str {
        self.kind.as_str()
    }

    /// The payload after decoding: bytes, str or a JSON value, as `decode=` asked (the raw
    /// bytes when it did not decode).
    #[getter]
    fn data(&self, py: Python<'_>) -> Py<PyAny> {
        self.data.clone_ref(py)
    }

    /// `time.time()` when the message was read from the socket.
    #[getter]
    fn received_at(&self) -> f64 {
        self.received_at
    }

    /// Which connection of the stream delivered the message (0 for the first).
    #[getter]
    fn connection(&self) -> u32 {
        self.connection
    }

    /// A dict about the message: "size" (payload bytes as received).
    #[getter]
    fn metadata(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        if let Some(m) = self.metadata.get() {
            return Ok(m.clone_ref(py));
        }
        let dict = PyDict::new(py);
        dict.set_item("size", self.size)?;
        Ok(self.metadata.get_or_init(|| dict.unbind()).clone_ref(py))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let data = self.data.bind(py).repr()?;
        let data = data.to_cow()?;
        let shown: String = data.chars().take(60).collect();
        let more = if data.chars().count() > 60 { "..." } else { "" };
        Ok(format!(
            "Job(id={}, type={:?}, connection={}, size={}, data={shown}{more})",
            self.id,
            self.kind.as_str(),
            self.connection,
            self.size
        ))
    }
}

/// The outcome of one job: `value` (the handler's return value, or the decoded payload when
/// there is no handler) or `error` (the exception the handler raised, or a `DecodeError`).
#[pyclass(frozen, module = "wspool", name = "Result")]
pub struct PyJobResult {
    job: Py<PyJob>,
    value: Py<PyAny>,
    error: Option<Py<PyAny>>,
}

#[pymethods]
impl PyJobResult {
    /// The job this result belongs to.
    #[getter]
    fn job(&self, py: Python<'_>) -> Py<PyJob> {
        self.job.clone_ref(py)
    }

    /// What the handler returned (the decoded payload without a handler); None on error.
    #[getter]
    fn value(&self, py: Python<'_>) -> Py<PyAny> {
        self.value.clone_ref(py)
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
        let id = self.job.get().id;
        Ok(match &self.error {
            None => format!("Result(id={id}, value={})", self.value.bind(py).repr()?),
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

    /// The counters as a dict.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let s = &self.snap;
        d.set_item("received", s.received)?;
        d.set_item("processed", s.processed)?;
        d.set_item("failed", s.failed)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("reconnects", s.reconnects)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("elapsed", s.elapsed)?;
        d.set_item("workers", self.workers)?;
        d.set_item("threads", s.threads)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let s = &self.snap;
        format!(
            "Stats(received={}, processed={}, failed={}, cancelled={}, dropped={}, in_flight={}, \
             bytes={}, reconnects={}, elapsed={:.3}, workers={}, threads={})",
            s.received,
            s.processed,
            s.failed,
            s.cancelled,
            s.dropped,
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
    Done(Py<PyJobResult>),
    Panicked(Job, Error),
}

struct PyProcessor {
    handler: Option<Py<PyAny>>,
    /// With a journal: describe each result for it while the handler's GIL is held.
    journaled: bool,
}

fn make_job(py: Python<'_>, job: &Job, data: Py<PyAny>) -> PyResult<Py<PyJob>> {
    Py::new(
        py,
        PyJob {
            id: job.id,
            kind: job.kind,
            data,
            received_at: job.received_at,
            connection: job.connection,
            size: job.payload.len(),
            metadata: OnceLock::new(),
        },
    )
}

/// Builds the Python result of a job; the handler (if any) runs here.
fn finish(
    py: Python<'_>,
    handler: Option<&Py<PyAny>>,
    job: &Job,
    decoded: &Result<Data, DecodeError>,
) -> PyResult<(Py<PyJobResult>, bool)> {
    let (data, decode_failure) = match decoded {
        Ok(d) => (data_to_py(py, d)?, None),
        Err(e) => (
            PyBytes::new(py, &job.payload).into_any().unbind(),
            Some(decode_error(py, job, e)?),
        ),
    };
    let job_obj = make_job(py, job, data.clone_ref(py))?;
    let (value, error) = match (decode_failure, handler) {
        (Some(err), _) => (py.None(), Some(err)),
        (None, None) => (data, None),
        (None, Some(h)) => match h.call1(py, (job_obj.clone_ref(py),)) {
            Ok(v) => (v, None),
            Err(e) => (py.None(), Some(e.into_value(py).into_any())),
        },
    };
    let ok = error.is_none();
    let result = PyJobResult {
        job: job_obj,
        value,
        error,
    };
    Ok((Py::new(py, result)?, ok))
}

fn internal_result(py: Python<'_>, job: &Job, error: Error) -> PyResult<Py<PyJobResult>> {
    let data = PyBytes::new(py, &job.payload).into_any().unbind();
    let err = to_pyerr(py, error).into_value(py).into_any();
    Py::new(
        py,
        PyJobResult {
            job: make_job(py, job, data)?,
            value: py.None(),
            error: Some(err),
        },
    )
}

impl Processor for PyProcessor {
    type Output = Out;

    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Out, bool) {
        let Some(handler) = &self.handler else {
            let ok = decoded.is_ok();
            return (Out::Native(job, decoded), ok);
        };
        // try_attach: never attach to an interpreter that is shutting down (the Python side
        // cancels live streams at exit, so this is only a second line of defence).
        let done = Python::try_attach(|py| match finish(py, Some(handler), &job, &decoded) {
            Ok((result, ok)) => {
                if self.journaled {
                    crate::py_journal::remember(result.bind(py).as_any());
                }
                Ok((Out::Done(result), ok))
            }
            Err(e) => Err(format!("cannot build the result of job {}: {e}", job.id)),
        });
        let error = match done {
            Some(Ok(done)) => return done,
            Some(Err(msg)) => msg,
            None => "the Python interpreter is shutting down".to_string(),
        };
        (Out::Panicked(job, Error::Internal(error)), false)
    }

    fn panicked(&self, job: Job, error: Error) -> Out {
        Out::Panicked(job, error)
    }
}

fn out_to_py(py: Python<'_>, out: Out) -> PyResult<Py<PyJobResult>> {
    match out {
        Out::Done(r) => Ok(r),
        Out::Native(job, decoded) => Ok(finish(py, None, &job, &decoded)?.0),
        Out::Panicked(job, error) => internal_result(py, &job, error),
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

/// The native half of `wspool.Stream`; use `wspool.consume()` instead of this class.
#[pyclass(frozen, module = "wspool._native", name = "NativeStream")]
pub struct NativeStream {
    inner: Stream<Out>,
    close_timeout: Duration,
}

impl Drop for NativeStream {
    /// Dropped without `close()` (garbage collection, `del`): cancel, and wait (GIL released,
    /// bounded by close_timeout) for the threads, so none is still inside Python when the
    /// interpreter exits. Not when the last reference goes away on one of the stream's own
    /// threads (a handler holding it): that thread cannot wait for itself.
    fn drop(&mut self) {
        self.inner.cancel();
        if !crate::stream::on_stream_thread() {
            let (inner, wait) = (&self.inner, self.close_timeout);
            Python::try_attach(|py| py.detach(|| inner.join(wait)));
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
                        journal = None, journal_sync = "normal"))]
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
        config.journal = journal
            .map(|path| {
                let sync = journal_sync.parse().map_err(PyValueError::new_err)?;
                Ok::<_, PyErr>(crate::journal::JournalSpec { path, sync })
            })
            .transpose()?;
        let close_timeout = config.close_timeout;
        let processor = PyProcessor {
            handler,
            journaled: config.journal.is_some(),
        };
        let describe = Arc::new(crate::py_journal::describe);
        let inner = py
            .detach(|| Stream::start_journaled(config, processor, describe))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(NativeStream {
            inner,
            close_timeout,
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
    /// (after raising, once, the error that ended it abnormally).
    #[pyo3(signature = (max = 1024))]
    fn next_batch<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Option<Bound<'py, PyList>>> {
        let inner = &self.inner;
        let batch = wait_slices(py, None, |slice| match inner.next_batch(max, slice) {
            Batch::Pending => None,
            other => Some(other),
        })?;
        match batch {
            Some(Batch::Items(items)) => {
                let converted = items
                    .into_iter()
                    .map(|o| out_to_py(py, o))
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(Some(PyList::new(py, converted)?))
            }
            Some(Batch::End(Some(e))) => Err(to_pyerr(py, e)),
            _ => Ok(None),
        }
    }

    /// Stop reading and send a close frame; queued jobs still finish. Returns at once.
    fn close(&self) {
        self.inner.close();
    }

    /// Stop reading, send a close frame, drop queued jobs and undelivered results.
    fn cancel(&self) {
        self.inner.cancel();
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
    m.add_class::<PyStats>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    crate::py_journal::register(m)?;
    Ok(())
}
