//! The worker pool: N plain OS threads pulling jobs from one bounded queue, decoding them and
//! running the processor, then pushing results into one bounded queue. No PyO3 here: the Python
//! layer plugs in through [`Processor`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::errors::{panic_message, Error};
use crate::job::{decode, Data, DecodeError, DecodeMode, Job};
use crate::state::Shared;

/// What the pool runs on each job. `process` is called on a worker thread, never on the thread
/// that reads the socket, and may block (the pool is sized for it).
pub trait Processor: Send + Sync + 'static {
    type Output: Send + 'static;

    /// Turns a job, with its payload already decoded (or the reason it did not decode), into a
    /// result, and says whether that result is a success.
    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Self::Output, bool);

    /// The result for a job whose processing panicked; the worker goes on.
    fn panicked(&self, job: Job, error: Error) -> Self::Output;
}

/// Starts `workers` threads. Each ends when the job queue is closed (the read loop is done) and
/// empty; after `Shared::set_cancelled`, or once the result queue has no receiver, the jobs still
/// queued are counted as cancelled instead of processed.
pub fn spawn<P: Processor>(
    workers: usize,
    processor: Arc<P>,
    mode: DecodeMode,
    jobs: flume::Receiver<Job>,
    results: flume::Sender<P::Output>,
    shared: Arc<Shared>,
) -> Result<Vec<JoinHandle<()>>, Error> {
    (0..workers)
        .map(|i| {
            let (processor, jobs, results) = (processor.clone(), jobs.clone(), results.clone());
            let guard = shared.thread_guard();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{}worker-{i}", crate::stream::THREAD_PREFIX))
                .spawn(move || {
                    let _guard = guard;
                    work(&*processor, mode, &jobs, &results, &shared);
                })
                .map_err(|e| Error::Internal(format!("cannot start a worker thread: {e}")))
        })
        .collect()
}

fn work<P: Processor>(
    processor: &P,
    mode: DecodeMode,
    jobs: &flume::Receiver<Job>,
    results: &flume::Sender<P::Output>,
    shared: &Shared,
) {
    // Runs until the read loop has stopped and the queue is empty, so that the read loop is
    // never left blocked on a full queue; after a cancel, or once nobody reads results, the jobs
    // still queued are only counted.
    let mut consumer_gone = false;
    while let Ok(job) = jobs.recv() {
        if consumer_gone || shared.is_cancelled() {
            shared.on_cancelled();
            continue;
        }
        // Cheap: the payload is reference-counted. Kept to describe the job if it panics.
        let copy = job.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let decoded = decode(job.kind, &job.payload, mode);
            processor.process(job, decoded)
        }));
        let (output, ok) = match outcome {
            Ok(done) => done,
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                let error = Error::Internal(format!("job {} panicked: {msg}", copy.id));
                (processor.panicked(copy, error), false)
            }
        };
        shared.on_finished(ok);
        consumer_gone = results.send(output).is_err();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Kind;
    use bytes::Bytes;

    struct Echo;
    impl Processor for Echo {
        type Output = Result<(u64, Data), String>;
        fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Self::Output, bool) {
            if job.payload.as_ref() == b"panic" {
                panic!("asked to");
            }
            match decoded {
                Ok(d) => (Ok((job.id, d)), true),
                Err(e) => (Err(e.message), false),
            }
        }
        fn panicked(&self, job: Job, error: Error) -> Self::Output {
            Err(format!("{}: {error}", job.id))
        }
    }

    fn job(id: u64, payload: &'static [u8]) -> Job {
        Job {
            id,
            kind: Kind::Text,
            payload: Bytes::from_static(payload),
            received_at: 0.0,
            connection: 0,
        }
    }

    #[test]
    fn every_job_yields_one_result_even_on_panic() {
        let shared = Arc::new(Shared::new());
        let (jtx, jrx) = flume::bounded(4);
        let (rtx, rrx) = flume::bounded(4);
        let handles = spawn(
            3,
            Arc::new(Echo),
            DecodeMode::Json,
            jrx,
            rtx,
            shared.clone(),
        )
        .unwrap();
        let feeder = std::thread::spawn(move || {
            for i in 0..100 {
                let payload: &'static [u8] = match i {
                    7 => b"panic",
                    8 => b"{bad",
                    _ => b"[1]",
                };
                shared_received(&jtx, job(i, payload));
            }
        });
        let mut ids: Vec<u64> = Vec::new();
        let mut errors = Vec::new();
        for r in rrx.iter() {
            match r {
                Ok((id, d)) => {
                    assert_eq!(d, Data::Json(serde_json::json!([1])));
                    ids.push(id);
                }
                Err(e) => errors.push(e),
            }
        }
        feeder.join().unwrap();
        handles.into_iter().for_each(|h| h.join().unwrap());
        ids.sort_unstable();
        assert_eq!(ids.len(), 98);
        errors.sort();
        assert!(errors[0].starts_with("7: internal error in wspool: job 7 panicked: asked to"));
        assert!(errors[1].starts_with("payload is not valid JSON"));
        let s = shared.snapshot();
        assert_eq!((s.processed, s.failed, s.threads), (98, 2, 0));
    }

    fn shared_received(tx: &flume::Sender<Job>, j: Job) {
        tx.send(j).unwrap();
    }

    #[test]
    fn cancel_drops_queued_jobs_and_counts_them() {
        let shared = Arc::new(Shared::new());
        let (jtx, jrx) = flume::bounded(10);
        let (rtx, rrx) = flume::bounded(10);
        for i in 0..10 {
            jtx.send(job(i, b"1")).unwrap();
        }
        drop(jtx);
        shared.set_cancelled();
        let handles = spawn(
            2,
            Arc::new(Echo),
            DecodeMode::Text,
            jrx,
            rtx,
            shared.clone(),
        )
        .unwrap();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(rrx.iter().count(), 0);
        assert_eq!(shared.snapshot().cancelled, 10);
    }

    #[test]
    fn workers_stop_when_the_consumer_is_gone() {
        let shared = Arc::new(Shared::new());
        let (jtx, jrx) = flume::bounded(10);
        let (rtx, rrx) = flume::bounded(1);
        drop(rrx);
        let handles = spawn(
            2,
            Arc::new(Echo),
            DecodeMode::Text,
            jrx,
            rtx,
            shared.clone(),
        )
        .unwrap();
        for i in 0..5 {
            jtx.send(job(i, b"1")).unwrap();
        }
        drop(jtx);
        handles.into_iter().for_each(|h| h.join().unwrap());
        let s = shared.snapshot();
        assert_eq!(s.processed + s.cancelled, 5);
        assert_eq!(s.threads, 0);
    }
}
