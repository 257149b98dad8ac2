//! The Python binding of the journal: `wspool._native.Journal` (open a journal file, read and
//! retry jobs), `StreamJournal` (a running stream's view of its journal) and how a job's
//! result is described for the journal (its value as JSON, else its repr; or its error's type
//! and message). Converts and delegates to `crate::journal`; every query runs with the GIL
//! released.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyString};

use crate::errors::Error;
use crate::journal::{Journal, Link, Outcome, Record, Status, StoredValue, SyncMode};
use crate::json::{self, Node};
use crate::py::{to_pyerr, Leaves, Out, Picks, PyJobResult};

/// How long a status query waits for the stream's journal writer.
const QUERY_WAIT: Duration = Duration::from_secs(10);

/// What the journal records about a job from its result: called on the worker, once per job
/// (with a Python handler, inside the batch that holds the GIL, so attaching is only a check).
pub(crate) fn describe(out: &Out, ok: bool) -> Outcome {
    match out {
        // No handler: the value is the payload, which the journal has already.
        Out::Native(_, Ok(_)) | Out::Payload(_) => Outcome::Done { value: None },
        Out::Native(_, Err(e)) => Outcome::Failed {
            error_type: "DecodeError".into(),
            message: e.message.clone(),
        },
        // `Select`: the picked fields as JSON, natively (a missing field is null).
        Out::Picked(job, leaves) => selected_done(&leaves_json(leaves, &job.payload)),
        Out::Selected(selected) => {
            let value = match (&selected.picks, selected.tree()) {
                (Picks::Leaves(leaves), _) => leaves_json(leaves, &selected.job.payload),
                (_, Some((doc, picks))) => {
                    let pick =
                        |p: &Option<usize>| p.map_or(serde_json::Value::Null, |i| doc.value_at(i));
                    one_or_array(picks, pick)
                }
                (_, None) => return Outcome::Done { value: None },
            };
            selected_done(&value)
        }
        Out::Panicked(_, e) => Outcome::Failed {
            error_type: "InternalError".into(),
            message: e.to_string(),
        },
        Out::Done(result) => Python::try_attach(|py| describe_result(py, result.get()))
            .unwrap_or_else(|| Outcome::plain(ok)),
    }
}

/// A `Select` job done, its value stored as JSON.
fn selected_done(value: &serde_json::Value) -> Outcome {
    Outcome::Done {
        value: Some(StoredValue {
            text: value.to_string(),
            json: true,
        }),
    }
}

/// A `Select` value from its leaves, as JSON, their strings read from `payload`.
fn leaves_json(leaves: &Leaves, payload: &[u8]) -> serde_json::Value {
    let pick =
        |l: &Option<Node>| l.map_or(serde_json::Value::Null, |n| json::leaf_value(payload, n));
    one_or_array(leaves.nodes(), pick)
}

/// A `Select` value as JSON: the one field alone, or the array of them.
fn one_or_array<T>(fields: &[T], pick: impl Fn(&T) -> serde_json::Value) -> serde_json::Value {
    match fields {
        [one] => pick(one),
        many => serde_json::Value::Array(many.iter().map(pick).collect()),
    }
}

fn describe_result(py: Python<'_>, result: &PyJobResult) -> Outcome {
    let described = || -> PyResult<Outcome> {
        if let Some(error) = &result.error {
            let error = error.bind(py);
            return Ok(Outcome::Failed {
                error_type: error.get_type().name()?.to_string(),
                message: error.str().map(|s| s.to_string()).unwrap_or_default(),
            });
        }
        let value = match &result.value {
            Some(v) => v.bind(py).clone(),
            None => py.None().into_bound(py),
        };
        Ok(Outcome::Done {
            value: Some(stored_value(&value)),
        })
    };
    described().unwrap_or_else(|e| Outcome::Failed {
        error_type: "InternalError".into(),
        message: format!("cannot read the result for the journal: {e}"),
    })
}

/// The JSON text of None, a bool, an int that fits 64 bits or a str, without calling into
/// `json` (the values handlers return most); None for anything else.
fn simple_json(value: &Bound<'_, PyAny>) -> Option<String> {
    if value.is_none() {
        return Some("null".into());
    }
    if let Ok(b) = value.cast_exact::<PyBool>() {
        return Some(if b.is_true() { "true" } else { "false" }.into());
    }
    if let Ok(i) = value.cast_exact::<PyInt>() {
        return i.extract::<i64>().ok().map(|n| n.to_string());
    }
    if let Ok(s) = value.cast_exact::<PyString>() {
        return serde_json::to_string(&s.to_cow().ok()?).ok();
    }
    None
}

/// The value as JSON (`json.dumps`), or its repr when it does not serialise.
fn stored_value(value: &Bound<'_, PyAny>) -> StoredValue {
    static DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    if let Some(text) = simple_json(value) {
        return StoredValue { text, json: true };
    }
    let py = value.py();
    let dumps = DUMPS.get_or_try_init(py, || {
        py.import("json")?.getattr("dumps").map(Bound::unbind)
    });
    if let Ok(dumps) = dumps {
        if let Ok(text) = dumps
            .call1(py, (value,))
            .and_then(|s| s.extract::<String>(py))
        {
            return StoredValue { text, json: true };
        }
    }
    let text = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unrepresentable value>".into());
    StoredValue { text, json: false }
}

fn record_to_py<'py>(py: Python<'py>, r: &Record) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", r.id)?;
    d.set_item("status", r.status.as_str())?;
    d.set_item("connection", r.connection)?;
    d.set_item("type", r.kind.as_str())?;
    d.set_item("received_at", r.received_at)?;
    d.set_item("payload", PyBytes::new(py, &r.payload))?;
    d.set_item("attempts", r.attempts)?;
    d.set_item("started_at", r.started_at)?;
    d.set_item("finished_at", r.finished_at)?;
    let (value, format) = match &r.value {
        Some(v) => (
            Some(v.text.as_str()),
            Some(if v.json { "json" } else { "repr" }),
        ),
        None => (None, None),
    };
    d.set_item("value", value)?;
    d.set_item("value_format", format)?;
    d.set_item("error_type", r.error_type.as_deref())?;
    d.set_item("error_message", r.error_message.as_deref())?;
    Ok(d)
}

fn journal_error(path: &str, message: &str) -> Error {
    Error::Journal {
        path: path.to_string(),
        message: message.to_string(),
    }
}

/// An existing wspool journal, opened to read and retry its jobs (use `wspool.Journal`).
/// Reading works while a consumer writes to the same file.
#[pyclass(frozen, module = "wspool._native", name = "Journal")]
pub struct PyJournal {
    inner: Mutex<Option<Journal>>,
    path: String,
}

impl PyJournal {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Journal) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        let done = py.detach(|| {
            let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_ref() {
                Some(j) => f(j),
                None => Err(journal_error(&self.path, "the journal is closed")),
            }
        });
        done.map_err(|e| to_pyerr(py, e))
    }
}

#[pymethods]
impl PyJournal {
    /// Opens the journal at `path`; raises JournalError if there is none, or if the file is
    /// not a wspool journal or was written by a newer wspool.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let shown = path.display().to_string();
        let journal = py
            .detach(|| Journal::open(&path, false, SyncMode::Normal))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyJournal {
            inner: Mutex::new(Some(journal)),
            path: shown,
        })
    }

    /// The journal's path.
    #[getter]
    fn path(&self) -> String {
        self.path.clone()
    }

    /// The job `id` as a dict, or None if the journal has no such job.
    fn get<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Option<Bound<'py, PyDict>>> {
        let found = self.with(py, |j| j.get(id))?;
        found.map(|r| record_to_py(py, &r)).transpose()
    }

    /// The newest `limit` jobs (largest id first) as dicts, of one status or of all.
    #[pyo3(signature = (status = None, limit = 100))]
    fn list<'py>(
        &self,
        py: Python<'py>,
        status: Option<&str>,
        limit: usize,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let status = status
            .map(|s| s.parse::<Status>())
            .transpose()
            .map_err(pyo3::exceptions::PyValueError::new_err)?;
        let rows = self.with(py, |j| j.list(status, limit))?;
        rows.iter().map(|r| record_to_py(py, r)).collect()
    }

    /// Puts job `id` back to "received" so that the next consumer started on this journal runs
    /// it again; returns the status it had, or None if there is no such job.
    fn retry(&self, py: Python<'_>, id: u64) -> PyResult<Option<&'static str>> {
        Ok(self.with(py, |j| j.retry(id))?.map(Status::as_str))
    }

    /// Jobs per status ("received", "running", "done", "failed"), "total", "rerun" (jobs run
    /// more than once) and "duplicates" (runs beyond the first, summed).
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.with(py, |j| j.counts())?;
        let d = PyDict::new(py);
        d.set_item("received", c.received)?;
        d.set_item("running", c.running)?;
        d.set_item("done", c.done)?;
        d.set_item("failed", c.failed)?;
        d.set_item("total", c.total)?;
        d.set_item("rerun", c.rerun)?;
        d.set_item("duplicates", c.duplicates)?;
        Ok(d)
    }

    /// Closes the file; later calls raise JournalError.
    fn close(&self, py: Python<'_>) {
        let journal = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        py.detach(|| drop(journal));
    }
}

/// A running stream's view of its journal (from `NativeStream.journal()`).
#[pyclass(frozen, module = "wspool._native", name = "StreamJournal")]
pub struct PyStreamJournal {
    link: Link,
}

pub(crate) fn stream_journal(link: &Link) -> PyStreamJournal {
    PyStreamJournal { link: link.clone() }
}

#[pymethods]
impl PyStreamJournal {
    /// The journal's path.
    #[getter]
    fn path(&self) -> String {
        self.link.path().display().to_string()
    }

    /// Jobs an earlier run left unfinished, that this stream runs first.
    #[getter]
    fn to_recover(&self) -> u64 {
        self.link.to_recover()
    }

    /// Of those, the ones already handed to the pool.
    #[getter]
    fn recovered(&self) -> u64 {
        self.link.recovered()
    }

    /// The job `id` as a dict, including every status change made so far; None if unknown.
    fn get<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Option<Bound<'py, PyDict>>> {
        let link = &self.link;
        let found = py
            .detach(|| link.get(id, QUERY_WAIT))
            .map_err(|e| to_pyerr(py, e))?;
        found.map(|r| record_to_py(py, &r)).transpose()
    }

    /// The status of job `id`: "received", "running", "done" or "failed"; None if unknown.
    fn status(&self, py: Python<'_>, id: u64) -> PyResult<Option<&'static str>> {
        let link = &self.link;
        let found = py
            .detach(|| link.get(id, QUERY_WAIT))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(found.map(|r| r.status.as_str()))
    }
}

/// Adds the journal classes to the native module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyJournal>()?;
    m.add_class::<PyStreamJournal>()?;
    Ok(())
}
