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
use crate::queue::{JobQueue, Key, Popped};
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

    /// Runs `work`, which processes one batch of jobs one by one (for a processor that is not
    /// [`batchable`](Processor::batchable): a run of jobs taken one at a time, each result
    /// handed on as soon as it is made). An implementation may set up once per batch what
    /// every job needs (the Python layer takes the GIL here). `work` never waits for anything
    /// but the jobs themselves.
    fn batch(&self, work: &mut dyn FnMut()) {
        work();
    }

    /// Runs `wait`, something that may block, from inside a batch: without what
    /// [`batch`](Processor::batch) set up for it (the Python layer lets the GIL go).
    fn unlocked(&self, wait: &mut (dyn FnMut() + Send)) {
        wait();
    }

    /// The result for a job whose processing panicked; the worker goes on.
    fn panicked(&self, job: Job, error: Error) -> Self::Output;

    /// For a processor with nothing to do under `mode` (the job itself is the result, as the
    /// payloads of `decode="bytes"` without a handler), what turns a job into its result; None
    /// (the default) when jobs need processing. A stream of one worker then starts none: its
    /// consumer takes jobs from the queue and makes their results itself, which saves a thread
    /// and a hand-over per batch (see [`crate::stream::Stream::start`]).
    fn passthrough(&self, mode: DecodeMode) -> Option<fn(Job) -> Self::Output> {
        let _ = mode;
        None
    }
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
        let alive = match &self.reorder {
            Some(r) => r.put(outputs, &self.results, self.shared),
            None => {
                let batch: Vec<O> = outputs.into_iter().filter_map(|(_, o)| o).collect();
                batch.is_empty() || self.results.send(batch).is_ok()
            }
        };
        self.shared.bell.ring();
        alive
    }

    /// Hands one job's result on if that needs no waiting: `Ok(false)` once nobody takes
    /// results. `Err` gives the result back when handing it on would wait: the result queue is
    /// full, or with `ordered=True` (the window may wait for another worker's result).
    fn try_put(&self, output: Option<O>) -> Result<bool, Option<O>> {
        if self.reorder.is_some() {
            return Err(output);
        }
        let Some(output) = output else {
            return Ok(true);
        };
        match self.results.try_send(vec![output]) {
            Ok(()) => {
                self.shared.bell.ring();
                Ok(true)
            }
            Err(flume::TrySendError::Full(mut back)) => Err(back.pop()),
            Err(flume::TrySendError::Disconnected(_)) => Ok(false),
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
    if !processor.batchable() {
        return work_one_by_one(processor, mode, queue, outlet, shared);
    }
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
            let mut tally = Tally::start(shared, n);
            for Popped { job, slot, key } in popped.drain(..) {
                tally.left -= 1;
                let output = if consumer_gone || shared.is_cancelled() {
                    tally.cancelled += 1;
                    None
                } else {
                    tally.in_hand = true;
                    let (output, ok) = run_job(processor, mode, job);
                    tally.in_hand = false;
                    if ok {
                        tally.ok += 1;
                    } else {
                        tally.failed += 1;
                    }
                    Some(output)
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

/// The loop of a processor that is not batchable (user code, which may block for long): jobs
/// are taken one at a time and each result is handed on as soon as it is made, so a job that
/// hangs holds back only itself. While another job is ready and the hand-over needs no
/// waiting, the worker goes on to it within the same `batch` (the Python layer keeps the GIL):
/// letting the GIL go after every job handed it to another waiting thread each time, two
/// context switches per job. A run ends after [`MAX_BATCH`] jobs or [`BATCH_BUDGET`], so the
/// worker never keeps the GIL long from the thread that takes the results.
fn work_one_by_one<P: Processor>(
    processor: &P,
    mode: DecodeMode,
    queue: &JobQueue,
    outlet: &Outlet<'_, P::Output>,
    shared: &Shared,
) {
    let mut consumer_gone = false;
    while let Some(first) = queue.pop() {
        let mut next = Some(first);
        // The result that could not be handed on without waiting: it ends the run and is
        // handed on after it (outside `batch`: without the GIL).
        let mut held: Option<(u64, Option<P::Output>, Option<Key>)> = None;
        processor.batch(&mut || {
            let started = std::time::Instant::now();
            let mut ran = 0;
            while let Some(Popped { job, slot, key }) = next.take() {
                let output = if consumer_gone || shared.is_cancelled() {
                    shared.on_cancelled();
                    None
                } else {
                    Some(run_one(processor, mode, job, shared))
                };
                match outlet.try_put(output) {
                    Ok(alive) => consumer_gone |= !alive,
                    Err(output) => {
                        held = Some((slot, output, key));
                        return;
                    }
                }
                // After the result is out, so results of one key keep their order.
                if let Some(key) = key {
                    queue.done(key);
                }
                ran += 1;
                if ran < MAX_BATCH && started.elapsed() < BATCH_BUDGET {
                    next = queue.try_pop();
                }
            }
        });
        if let Some((slot, output, key)) = held {
            consumer_gone |= !outlet.put(vec![(slot, output)]);
            if let Some(key) = key {
                queue.done(key);
            }
        }
    }
}

/// A batch's jobs, counted as running together when it starts and by outcome when it ends:
/// per job, the three updates of counters that every worker shares (running, then processed
/// or failed) were ~80 % of the worker's own time in `run_one` on `json` (perf annotate). The
/// owner giving up meanwhile counts the whole batch as abandoned. Should the worker die of a
/// bug (a panic outside the per-job guard), this counts as it unwinds: the jobs that ran, the
/// one in hand as abandoned and those not run yet as cancelled, so that every received job
/// stays accounted for.
struct Tally<'a> {
    shared: &'a Shared,
    n: u64,
    left: u64,
    ok: u64,
    failed: u64,
    cancelled: u64,
    in_hand: bool,
}

impl<'a> Tally<'a> {
    fn start(shared: &'a Shared, n: u64) -> Self {
        shared.on_batch_started(n);
        Tally {
            shared,
            n,
            left: n,
            ok: 0,
            failed: 0,
            cancelled: 0,
            in_hand: false,
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        let lost = u64::from(self.in_hand);
        let cancelled = self.cancelled + self.left;
        let (n, ok, failed) = (self.n, self.ok, self.failed);
        self.shared.on_batch_done(n, ok, failed, cancelled, lost);
    }
}

/// Runs one job of a processor that may block (one at a time), counted as running meanwhile so
/// that a handler the owner gives up on is counted as abandoned.
fn run_one<P: Processor>(processor: &P, mode: DecodeMode, job: Job, shared: &Shared) -> P::Output {
    shared.on_started();
    let (output, ok) = run_job(processor, mode, job);
    shared.on_finished(ok);
    output
}

/// Decodes a job and runs the processor on it, with a guard that turns a panic into the
/// processor's result for it. Counts nothing: see [`run_one`] and [`Tally`].
fn run_job<P: Processor>(processor: &P, mode: DecodeMode, job: Job) -> (P::Output, bool) {
    // Kept to describe the job if it panics (a wspool bug): all but its payload. A payload
    // clone is cheap, but it and its drop are two atomic updates of the read block's count,
    // shared with every other message of the block on the other threads; leaving them out made
    // `wspool-native cpu` 5-10% faster (bench_clients.py, 500k x 120 B, five runs each).
    let copy = job.without_payload();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let decoded = decode(job.kind, &job.payload, mode);
        processor.process(job, decoded)
    }));
    match outcome {
        Ok(done) => done,
        Err(payload) => {
            let msg = panic_message(payload.as_ref());
            let error = Error::Internal(format!("job {} panicked: {msg}", copy.id));
            (processor.panicked(copy, error), false)
        }
    }
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
    /// Workers waiting for room in the window.
    waiting: usize,
}

impl<O> Reorder<O> {
    pub fn new(window: usize) -> Self {
        Reorder {
            state: Mutex::new(Window {
                next: 0,
                pending: VecDeque::new(),
                flushing: false,
                waiting: 0,
            }),
            space: Condvar::new(),
            window: window.max(1) as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Window<O>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts the results of a batch by slot (under one lock) and hands on what is then ready;
    /// false once nobody takes results (or the stream was cancelled while this one waited for
    /// room).
    fn put(
        &self,
        outputs: Vec<(u64, Option<O>)>,
        results: &flume::Sender<Vec<O>>,
        shared: &Shared,
    ) -> bool {
        let mut alive = true;
        let mut st = self.lock();
        for (slot, output) in outputs {
            while slot >= st.next + self.window {
                if shared.is_cancelled() {
                    return false;
                }
                if !st.flushing && Self::ready(&st) {
                    // The results deposited here may be the oldest: hand them on first, or
                    // the window would wait for itself.
                    let (back, ok) = self.flush(st, results);
                    st = back;
                    alive &= ok;
                    continue;
                }
                st.waiting += 1;
                st = self
                    .space
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                st.waiting -= 1;
            }
            let i = (slot - st.next) as usize;
            while st.pending.len() <= i {
                st.pending.push_back(Slot::Empty);
            }
            st.pending[i] = output.map_or(Slot::Skip, Slot::Ready);
        }
        if !st.flushing {
            alive &= self.flush(st, results).1;
        }
        alive
    }

    fn ready(st: &Window<O>) -> bool {
        matches!(st.pending.front(), Some(Slot::Ready(_) | Slot::Skip))
    }

    /// Hands on the runs of results that are ready from the oldest slot, until none is; the
    /// others meanwhile only deposit theirs. Returns the lock, and false once nobody takes
    /// results.
    fn flush<'a>(
        &'a self,
        mut st: MutexGuard<'a, Window<O>>,
        results: &flume::Sender<Vec<O>>,
    ) -> (MutexGuard<'a, Window<O>>, bool) {
        st.flushing = true;
        let mut alive = true;
        loop {
            let mut run = Vec::new();
            while Self::ready(&st) {
                if let Some(Slot::Ready(o)) = st.pending.pop_front() {
                    run.push(o);
                }
                st.next += 1;
            }
            if run.is_empty() {
                st.flushing = false;
                return (st, alive);
            }
            // Waking costs a system call: only when a worker waits for room.
            if st.waiting > 0 {
                self.space.notify_all();
            }
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

    /// Echo taking jobs one at a time (as user code does), counting its `batch` calls; a job
    /// whose payload is "hang" waits until `release` is dropped.
    struct OneByOne {
        batches: std::sync::atomic::AtomicUsize,
        hang: Option<flume::Receiver<()>>,
    }
    impl Processor for OneByOne {
        type Output = Out;
        fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Out, bool) {
            if let (b"hang", Some(rx)) = (job.payload.as_ref(), &self.hang) {
                let _ = rx.recv();
            }
            Echo.process(job, decoded)
        }
        fn batchable(&self) -> bool {
            false
        }
        fn batch(&self, work: &mut dyn FnMut()) {
            self.batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            work();
        }
        fn panicked(&self, job: Job, error: Error) -> Out {
            Echo.panicked(job, error)
        }
    }

    fn one_by_one(hang: Option<flume::Receiver<()>>) -> Arc<OneByOne> {
        Arc::new(OneByOne {
            batches: Default::default(),
            hang,
        })
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
        pool_of(Arc::new(Echo), workers, capacity, order, mode, shared)
    }

    fn pool_of<P: Processor<Output = Out>>(
        processor: Arc<P>,
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
        let handles = spawn(workers, processor, mode, pipes, shared.clone()).unwrap();
        (queue, rrx, handles)
    }

    /// Feeds `jobs` from another thread as the read loop does, then closes the queue; returns
    /// the ids of the (successful) results in the order they came, once every worker ended.
    fn run_all(
        queue: Arc<JobQueue>,
        rrx: flume::Receiver<Vec<Out>>,
        handles: Vec<JoinHandle<()>>,
        jobs: Vec<(Job, Option<Key>)>,
    ) -> Vec<u64> {
        let feeder = std::thread::spawn(move || {
            for (job, key) in jobs {
                push(&queue, job, key);
            }
            queue.close();
        });
        let ids = rrx.iter().flatten().map(|r| r.unwrap().0).collect();
        feeder.join().unwrap();
        handles.into_iter().for_each(|h| h.join().unwrap());
        ids
    }

    /// 200 jobs on 3 keys (id % 3), every fifth one slow.
    fn keyed_jobs() -> Vec<(Job, Option<Key>)> {
        (0..200u64)
            .map(|i| {
                let payload: &'static [u8] = if i % 5 == 0 { b"slow" } else { b"x" };
                (job(i, payload), Some((i % 3).to_string().into()))
            })
            .collect()
    }

    /// All of [`keyed_jobs`] came, each key's in receipt order.
    fn assert_per_key_order(ids: &[u64]) {
        assert_eq!(ids.len(), 200);
        for k in 0..3 {
            let of_key: Vec<u64> = ids.iter().copied().filter(|i| i % 3 == k).collect();
            assert!(
                of_key.windows(2).all(|w| w[0] < w[1]),
                "key {k}: {of_key:?}"
            );
        }
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
    fn the_reorder_window_hands_on_its_own_results_before_waiting_for_room() {
        // One call with more results than the window holds: the oldest are its own, so it
        // must hand them on rather than wait for room that only it can make.
        let shared = Shared::new();
        let window: Reorder<u64> = Reorder::new(4);
        let (tx, rx) = flume::bounded(64);
        assert!(window.put((0..10).map(|i| (i, Some(i))).collect(), &tx, &shared));
        // Then out of order from several threads, a skipped slot among them.
        std::thread::scope(|s| {
            for part in [vec![13, 11], vec![10, 12, 14], vec![15]] {
                let (window, tx, shared) = (&window, &tx, &shared);
                s.spawn(move || {
                    let outputs = part.into_iter().map(|i| (i, (i != 12).then_some(i)));
                    assert!(window.put(outputs.collect(), tx, shared));
                });
            }
        });
        drop(tx);
        let got: Vec<u64> = rx.iter().flatten().collect();
        let want: Vec<u64> = (0..16).filter(|&i| i != 12).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn per_key_order_holds_within_each_key() {
        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool(4, 16, Order::Key, DecodeMode::Bytes, &shared);
        assert_per_key_order(&run_all(queue, rrx, handles, keyed_jobs()));
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

    #[test]
    fn one_by_one_a_hung_job_holds_back_only_itself() {
        // Two workers, job 3 hangs: every other result comes out meanwhile, including those
        // its worker made earlier in the same run.
        let (release, hang) = flume::bounded::<()>(0);
        let shared = Arc::new(Shared::new());
        let processor = one_by_one(Some(hang));
        let (queue, rrx, handles) = pool_of(
            processor,
            2,
            64,
            Order::Completion,
            DecodeMode::Bytes,
            &shared,
        );
        for i in 0..20 {
            push(&queue, job(i, if i == 3 { b"hang" } else { b"x" }), None);
        }
        queue.close();
        let mut ids: Vec<u64> = Vec::new();
        while ids.len() < 19 {
            let batch = rrx
                .recv_timeout(Duration::from_secs(5))
                .expect("the other results while one job hangs");
            ids.extend(batch.into_iter().map(|r| r.unwrap().0));
        }
        assert!(rrx.recv_timeout(Duration::from_millis(50)).is_err());
        drop(release);
        ids.extend(rrx.iter().flatten().map(|r| r.unwrap().0));
        handles.into_iter().for_each(|h| h.join().unwrap());
        ids.sort_unstable();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn one_by_one_runs_ready_jobs_in_one_batch_call() {
        // 200 jobs already queued, results drained as they come: the worker goes from one job
        // to the next within one `batch` (one GIL acquisition in the Python layer) rather than
        // one per job.
        let shared = Arc::new(Shared::new());
        let processor = one_by_one(None);
        let queue = Arc::new(JobQueue::new(256, Overflow::Block, Order::Completion));
        for i in 0..200 {
            push(&queue, job(i, b"x"), None);
        }
        queue.close();
        let (rtx, rrx) = flume::bounded(256);
        let pipes = Pipes {
            queue: queue.clone(),
            results: rtx,
            reorder: None,
        };
        let handles = spawn(
            1,
            processor.clone(),
            DecodeMode::Bytes,
            pipes,
            shared.clone(),
        )
        .unwrap();
        // Every result handed over on its own, in order (one worker).
        let batches: Vec<Vec<Out>> = rrx.iter().collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert!(batches.iter().all(|b| b.len() == 1));
        let ids: Vec<u64> = batches
            .into_iter()
            .flatten()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(ids, (0..200).collect::<Vec<_>>());
        let calls = processor.batches.load(std::sync::atomic::Ordering::Relaxed);
        assert!(calls <= 100, "{calls} batch calls for 200 jobs");
    }

    #[test]
    fn one_by_one_keeps_every_order_and_count() {
        // The hand-over that would wait (full result queue, reorder window) ends a run and
        // happens outside it: results in receipt order, per key, and cancelled jobs counted.
        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool_of(
            one_by_one(None),
            3,
            8,
            Order::Receipt,
            DecodeMode::Bytes,
            &shared,
        );
        let jobs = (0..300)
            .map(|i| (job(i, if i % 7 == 0 { b"slow" } else { b"x" }), None))
            .collect();
        let ids = run_all(queue, rrx, handles, jobs);
        assert_eq!(ids, (0..300).collect::<Vec<_>>());

        let shared = Arc::new(Shared::new());
        let (queue, rrx, handles) = pool_of(
            one_by_one(None),
            3,
            16,
            Order::Key,
            DecodeMode::Bytes,
            &shared,
        );
        assert_per_key_order(&run_all(queue, rrx, handles, keyed_jobs()));

        let shared = Arc::new(Shared::new());
        shared.set_cancelled();
        let (queue, rrx, handles) = pool_of(
            one_by_one(None),
            2,
            10,
            Order::Completion,
            DecodeMode::Bytes,
            &shared,
        );
        for i in 0..10 {
            push(&queue, job(i, b"1"), None);
        }
        queue.close();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(rrx.iter().flatten().count(), 0);
        assert_eq!(shared.snapshot().cancelled, 10);
    }
}
