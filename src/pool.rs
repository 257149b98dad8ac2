//! The worker pool: N plain OS threads pulling jobs from one bounded queue, decoding them and
//! running the processor, then pushing results into one bounded queue. No PyO3 here: the Python
//! layer plugs in through [`Processor`].

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::errors::{panic_message, Error};
use crate::job::{decode, Data, DecodeError, DecodeMode, Job};
use crate::queue::{JobQueue, Popped};
use crate::state::Shared;

/// What the pool runs on each job. `process` is called on a worker thread, never on the thread
/// that reads the socket, and may block (the pool is sized for it).
pub trait Processor: Send + Sync + 'static {
    type Output: Send + 'static;

    /// Turns a job, with its payload already decoded (or the reason it did not decode), into a
    /// result, and says whether that result is a success.
    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Self::Output, bool);

    /// Whether jobs may be taken several at a time. A processor whose jobs may block for long
    /// (user code) says no: a job stuck in a batch would hold back the jobs taken with it
    /// (and their results), which another worker could have run.
    fn batchable(&self) -> bool {
        true
    }

    /// Runs `work`, a worker thread's whole loop. An implementation may set up once per thread
    /// what its jobs need (the Python layer keeps the thread's interpreter state alive here).
    fn worker(&self, work: &mut (dyn FnMut() + Send)) {
        work();
    }

    /// Runs `work`, which processes one batch of jobs one by one. An implementation may set up
    /// once per batch what every job needs (the Python layer takes the GIL here).
    fn batch(&self, work: &mut dyn FnMut()) {
        work();
    }

    /// The result for a job whose processing panicked; the worker goes on.
    fn panicked(&self, job: Job, error: Error) -> Self::Output;
}

/// Most jobs a worker takes at once (when that many wait for each worker): a flood costs one
/// lock and one hand-over per batch rather than per message.
pub const MAX_BATCH: usize = 64;

/// About how long one batch may take: a worker takes as many jobs as its recent jobs show fit
/// in it, so slow handlers go one job at a time (results are not held back, work stays spread
/// over the workers) while cheap jobs go by [`MAX_BATCH`].
const BATCH_BUDGET: Duration = Duration::from_micros(100);

/// Where the workers take jobs from and put results (in batches, one `Vec` per hand-over).
pub struct Pipes<O> {
    pub queue: Arc<JobQueue>,
    pub results: flume::Sender<Vec<O>>,
    /// With `ordered=True`: results go through this window, in slot order.
    pub reorder: Option<Arc<Reorder<O>>>,
}

/// Starts `workers` threads. Each ends when the job queue is closed (the read loop is done) and
/// empty; after `Shared::set_cancelled`, or once the result queue has no receiver, the jobs still
/// queued are counted as cancelled instead of processed.
pub fn spawn<P: Processor>(
    workers: usize,
    processor: Arc<P>,
    mode: DecodeMode,
    pipes: Pipes<P::Output>,
    shared: Arc<Shared>,
) -> Result<Vec<JoinHandle<()>>, Error> {
    (0..workers)
        .map(|i| {
            let processor = processor.clone();
            let queue = pipes.queue.clone();
            let results = pipes.results.clone();
            let reorder = pipes.reorder.clone();
            let guard = shared.thread_guard();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{}worker-{i}", crate::stream::THREAD_PREFIX))
                .spawn(move || {
                    let _guard = guard;
                    let outlet = Outlet {
                        results,
                        reorder,
                        shared: &shared,
                    };
                    processor.worker(&mut || work(&*processor, mode, &queue, &outlet, &shared));
                })
                .map_err(|e| Error::Internal(format!("cannot start a worker thread: {e}")))
        })
        .collect()
}

struct Outlet<'a, O> {
    results: flume::Sender<Vec<O>>,
    reorder: Option<Arc<Reorder<O>>>,
    shared: &'a Shared,
}

impl<O> Outlet<'_, O> {
    /// Hands a batch's results (None: that job left none), with their slots, on; false once
    /// nobody takes results.
    fn put(&self, outputs: Vec<(u64, Option<O>)>) -> bool {
        match &self.reorder {
            Some(r) => outputs.into_iter().fold(true, |alive, (slot, o)| {
                r.put(slot, o, &self.results, self.shared) && alive
            }),
            None => {
                let batch: Vec<O> = outputs.into_iter().filter_map(|(_, o)| o).collect();
                batch.is_empty() || self.results.send(batch).is_ok()
            }
        }
    }
}

fn work<P: Processor>(
    processor: &P,
    mode: DecodeMode,
    queue: &JobQueue,
    outlet: &Outlet<'_, P::Output>,
    shared: &Shared,
) {
    // Runs until the read loop has stopped and the queue is empty, so that the read loop is
    // never left blocked on a full queue; after a cancel, or once nobody reads results, the jobs
    // still queued are only counted.
    let mut consumer_gone = false;
    let mut popped = Vec::with_capacity(MAX_BATCH);
    // Recent time per job, in nanoseconds (a moving average over batches); starts pessimistic
    // so that the first jobs of a slow handler are not taken in a batch.
    let mut per_job_ns = BATCH_BUDGET.as_nanos() as u64;
    let mut max = 1;
    while queue.pop_many(max, &mut popped) {
        let n = popped.len() as u64;
        let mut outputs = Vec::with_capacity(popped.len());
        let mut keys = Vec::new();
        let mut took = Duration::ZERO;
        processor.batch(&mut || {
            // Timed inside the batch: what the batch set up (the GIL) is not the jobs' cost.
            let started = std::time::Instant::now();
            for Popped { job, slot, key } in popped.drain(..) {
                let output = if consumer_gone || shared.is_cancelled() {
                    shared.on_cancelled();
                    None
                } else {
                    Some(run_one(processor, mode, job, shared))
                };
                outputs.push((slot, output));
                keys.extend(key);
            }
            took = started.elapsed();
        });
        let took = took.as_nanos() as u64 / n;
        per_job_ns = (per_job_ns * 3 + took) / 4;
        if processor.batchable() {
            max = (BATCH_BUDGET.as_nanos() as u64 / per_job_ns.max(1)).clamp(1, MAX_BATCH as u64)
                as usize;
        }
        consumer_gone |= !outlet.put(outputs);
        // After the results are out, so results of one key keep their order.
        for key in keys {
            queue.done(key);
        }
    }
}

fn run_one<P: Processor>(processor: &P, mode: DecodeMode, job: Job, shared: &Shared) -> P::Output {
    // Counted as running, so that a handler the owner gives up on is counted as abandoned.
    shared.on_started();
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
    output
}

/// The reorder window of `ordered=True`: workers put results by slot (the order jobs left the
/// queue); they go out to the result queue in slot order. A result more than `window` slots
/// ahead of the oldest missing one waits (its worker blocks), so a slow job holds back the jobs
/// behind it, never memory: at most `window` results wait here, plus one run being handed on.
pub struct Reorder<O> {
    state: Mutex<Window<O>>,
    space: Condvar,
    window: u64,
}

enum Slot<O> {
    Empty,
    Skip,
    Ready(O),
}

struct Window<O> {
    /// The oldest slot not handed on yet.
    next: u64,
    pending: VecDeque<Slot<O>>,
    /// A worker is handing a run of results on; the others only deposit theirs.
    flushing: bool,
}

impl<O> Reorder<O> {
    pub fn new(window: usize) -> Self {
        Reorder {
            state: Mutex::new(Window {
                next: 0,
                pending: VecDeque::new(),
                flushing: false,
            }),
            space: Condvar::new(),
            window: window.max(1) as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Window<O>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts the result of `slot`; false once nobody takes results (or the stream was
    /// cancelled while this one waited for room).
    fn put(
        &self,
        slot: u64,
        output: Option<O>,
        results: &flume::Sender<Vec<O>>,
        shared: &Shared,
    ) -> bool {
        let mut st = self.lock();
        while slot >= st.next + self.window {
            if shared.is_cancelled() {
                return false;
            }
            st = self
                .space
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let i = (slot - st.next) as usize;
        while st.pending.len() <= i {
            st.pending.push_back(Slot::Empty);
        }
        st.pending[i] = output.map_or(Slot::Skip, Slot::Ready);
        if st.flushing {
            return true;
        }
        st.flushing = true;
        let mut alive = true;
        loop {
            let mut run = Vec::new();
            while matches!(st.pending.front(), Some(Slot::Ready(_) | Slot::Skip)) {
                if let Some(Slot::Ready(o)) = st.pending.pop_front() {
                    run.push(o);
                }
                st.next += 1;
            }
            if run.is_empty() {
                st.flushing = false;
                return alive;
            }
            self.space.notify_all();
            drop(st);
            // Blocks while the consumer is behind: backpressure, as without the window.
            alive &= results.send(run).is_ok();
            st = self.lock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Kind;
    use crate::queue::{Key, Order, Overflow, Push};
    use bytes::Bytes;

    struct Echo;
    impl Processor for Echo {
        type Output = Result<(u64, Data), String>;
        fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Self::Output, bool) {
            match job.payload.as_ref() {
                b"panic" => panic!("asked to"),
                b"slow" => std::thread::sleep(Duration::from_millis(5)),
                _ => {}
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

    type Out = <Echo as Processor>::Output;

    /// A pool of `workers` Echo workers with a queue of `capacity` and a result queue of 4.
    fn pool(
        workers: usize,
        capacity: usize,
        order: Order,
        mode: DecodeMode,
        shared: &Arc<Shared>,
    ) -> (
        Arc<JobQueue>,
        flume::Receiver<Vec<Out>>,
        Vec<JoinHandle<()>>,
    ) {
        let queue = Arc::new(JobQueue::new(capacity, Overflow::Block, order));
        let (rtx, rrx) = flume::bounded(4);
        let pipes = Pipes {
            queue: queue.clone(),
            results: rtx,
            reorder: (order == Order::Receipt).then(|| Arc::new(Reorder::new(capacity))),
        };
        let handles = spawn(workers, Arc::new(Echo), mode, pipes, shared.clone()).unwrap();
        (queue, rrx, handles)
    }

    /// Pushes, waiting while the queue is full, as the read loop does.
    fn push(queue: &JobQueue, mut job: Job, mut key: Option<Key>) {
        loop {
            match queue.try_push(job, key) {
                Push::Done { .. } => return,
                Push::Full(j, k) => (job, key) = (j, k),
                Push::Overflow => panic!("overflow"),
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    #[test]
    fn every_job_yields_one_result_even_on_panic() {
        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool(3, 4, Order::Completion, DecodeMode::Json, &shared);
        let feeder = std::thread::spawn(move || {
            for i in 0..100 {
                let payload: &'static [u8] = match i {
                    7 => b"panic",
                    8 => b"{bad",
                    _ => b"[1]",
                };
                push(&queue, job(i, payload), None);
            }
            queue.close();
        });
        let mut ids: Vec<u64> = Vec::new();
        let mut errors = Vec::new();
        for r in rrx.iter().flatten() {
            match r {
                Ok((id, d)) => {
                    let Data::Json(doc) = d else {
                        panic!("not JSON: {d:?}")
                    };
                    assert_eq!(doc.to_value(), serde_json::json!([1]));
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

    #[test]
    fn ordered_results_come_out_in_receipt_order() {
        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool(4, 8, Order::Receipt, DecodeMode::Bytes, &shared);
        let feeder = std::thread::spawn(move || {
            for i in 0..300 {
                let payload: &'static [u8] = match i % 7 {
                    0 => b"slow",
                    3 => b"panic",
                    _ => b"x",
                };
                push(&queue, job(i, payload), None);
            }
            queue.close();
        });
        let ids: Vec<u64> = rrx
            .iter()
            .flatten()
            .map(|r| match r {
                Ok((id, _)) => id,
                Err(e) => e.split(':').next().unwrap().parse().unwrap(),
            })
            .collect();
        feeder.join().unwrap();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(ids, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn per_key_order_holds_within_each_key() {
        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool(4, 16, Order::Key, DecodeMode::Bytes, &shared);
        let feeder = std::thread::spawn(move || {
            for i in 0..200u64 {
                let payload: &'static [u8] = if i % 5 == 0 { b"slow" } else { b"x" };
                push(&queue, job(i, payload), Some((i % 3).to_string().into()));
            }
            queue.close();
        });
        let ids: Vec<u64> = rrx.iter().flatten().map(|r| r.unwrap().0).collect();
        feeder.join().unwrap();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(ids.len(), 200);
        for k in 0..3 {
            let of_key: Vec<u64> = ids.iter().copied().filter(|i| i % 3 == k).collect();
            assert!(
                of_key.windows(2).all(|w| w[0] < w[1]),
                "key {k}: {of_key:?}"
            );
        }
    }

    #[test]
    fn cancel_drops_queued_jobs_and_counts_them() {
        for order in [Order::Completion, Order::Receipt] {
            let shared = Arc::new(Shared::new());
            shared.set_cancelled();
            let (queue, rrx, handles) = pool(2, 10, order, DecodeMode::Text, &shared);
            for i in 0..10 {
                push(&queue, job(i, b"1"), None);
            }
            queue.close();
            handles.into_iter().for_each(|h| h.join().unwrap());
            assert_eq!(rrx.iter().flatten().count(), 0);
            assert_eq!(shared.snapshot().cancelled, 10);
        }
    }

    #[test]
    fn workers_stop_when_the_consumer_is_gone() {
        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool(2, 10, Order::Completion, DecodeMode::Text, &shared);
        drop(rrx);
        for i in 0..5 {
            push(&queue, job(i, b"1"), None);
        }
        queue.close();
        handles.into_iter().for_each(|h| h.join().unwrap());
        let s = shared.snapshot();
        assert_eq!(s.processed + s.cancelled, 5);
        assert_eq!(s.threads, 0);
    }
}
