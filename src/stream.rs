//! One stream: a read-loop thread running its own single-threaded tokio runtime, N workers (or
//! none, when there is nothing to run: see [`Stream::start`]), and the bounded queues between
//! them. The owner (the Python layer, or a Rust caller) waits for the connection, pulls result
//! batches, and closes, cancels or joins. Every wait here takes a timeout, so the Python layer
//! can wait in slices and check for Ctrl-C in between.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::errors::Error;
use crate::job::{DecodeMode, Job};
use crate::journal::{self, Describe, JournalSpec, Outcome};
use crate::pool::{self, Pipes, Processor, Reorder};
use crate::queue::{JobQueue, Order, Overflow, Took};
use crate::state::{Shared, StatsSnapshot};
use crate::ws::{self, Control, Ended, Heartbeat, Outgoing, Reader, TlsOptions};

/// How to open and run a stream.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// Sent in order right after each handshake.
    pub subscribe: Subscribe,
    pub workers: usize,
    /// Capacity of the job queue, of the result queue and of the reorder window (messages).
    pub queue_size: usize,
    /// What a message does when `queue_size` jobs are waiting.
    pub overflow: Overflow,
    /// A top-level JSON field keying each message, for `Overflow::Conflate` and `Order::Key`.
    pub key: Option<String>,
    pub order: Order,
    pub decode: DecodeMode,
    /// Overall deadline, then a graceful close.
    pub timeout: Option<Duration>,
    pub open_timeout: Duration,
    pub close_timeout: Duration,
    pub heartbeat: Heartbeat,
    /// Larger messages end the connection with `Error::MessageTooBig` (close code 1009).
    pub max_message_size: usize,
    /// None: the first failure ends the stream.
    pub reconnect: Option<Reconnect>,
    pub on_event: Option<EventHook>,
    /// Root certificates for `wss://`.
    pub tls: TlsOptions,
    /// `reply=True`: the channel the processor sends replies on (see [`ws::Replies`]).
    pub replies: Option<ws::Replies>,
    /// Write every job to this SQLite journal before the pool sees it (see `journal`).
    pub journal: Option<JournalSpec>,
}

impl Config {
    pub fn new(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            headers: Vec::new(),
            subscribe: Subscribe::default(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            queue_size: 1024,
            overflow: Overflow::Block,
            key: None,
            order: Order::Completion,
            decode: DecodeMode::Text,
            timeout: None,
            open_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            heartbeat: Heartbeat {
                interval: Some(Duration::from_secs(20)),
                timeout: Some(Duration::from_secs(20)),
            },
            max_message_size: 16 << 20,
            reconnect: None,
            on_event: None,
            tls: TlsOptions::default(),
            replies: None,
            journal: None,
        }
    }

    /// The checks `Stream::start` makes before any thread starts.
    fn check(&self) -> Result<(), Error> {
        let invalid = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        if self.workers == 0 || self.queue_size == 0 {
            return invalid("workers and queue_size must be at least 1");
        }
        if self.max_message_size == 0 {
            return invalid("max_message_size must be at least 1");
        }
        let needs_key = self.overflow == Overflow::Conflate || self.order == Order::Key;
        match (&self.key, needs_key) {
            (None, true) => invalid(
                "overflow=\"conflate\" and ordered=\"key\" need key= (the JSON field that keys \
                 each message)",
            ),
            (Some(_), false) => invalid(
                "key= is used by overflow=\"conflate\" or ordered=\"key\"; give one of them",
            ),
            (Some(k), true) if k.is_empty() => invalid("key must be a non-empty field name"),
            _ => Ok(()),
        }?;
        if self.journal.is_some() && self.overflow != Overflow::Block {
            return invalid(
                "a journal keeps every message: it needs overflow=\"block\" (a dropped message \
                 would stay unfinished in the journal)",
            );
        }
        if let Some(r) = &self.reconnect {
            if r.initial.is_zero() || r.maximum < r.initial {
                return invalid("reconnect needs 0 < initial <= maximum");
            }
        }
        Ok(())
    }
}

/// What to send after each connect.
#[derive(Clone, Default)]
pub enum Subscribe {
    #[default]
    None,
    /// The same messages every time.
    Messages(Vec<Outgoing>),
    /// Called with the connection number (0, 1, ...) before each subscription, e.g. to ask
    /// the server to replay from the last message delivered.
    Dynamic(Arc<SubscribeFn>),
}

pub type SubscribeFn = dyn Fn(u32) -> Result<Vec<Outgoing>, Error> + Send + Sync;

impl std::fmt::Debug for Subscribe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subscribe::None => f.write_str("None"),
            Subscribe::Messages(m) => f.debug_tuple("Messages").field(m).finish(),
            Subscribe::Dynamic(_) => f.write_str("Dynamic(..)"),
        }
    }
}

/// Reconnect policy: exponential backoff from `initial` to `maximum`, with jitter.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconnect {
    /// Failed attempts in a row before giving up; None: never give up.
    pub max_attempts: Option<u32>,
    pub initial: Duration,
    pub maximum: Duration,
    /// Wait a random 50-100 % of each delay, so that many clients do not retry in step.
    pub jitter: bool,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            max_attempts: None,
            initial: Duration::from_millis(100),
            maximum: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl Reconnect {
    /// The wait before attempt `attempt` (1, 2, ...): initial, 2x, 4x... capped at maximum.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        let full = self
            .initial
            .saturating_mul(1 << doublings)
            .min(self.maximum);
        if self.jitter {
            full.mul_f64(0.5 + fastrand::f64() / 2.0)
        } else {
            full
        }
    }
}

/// What `on_event` hears about the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Connection `connection` (0, 1, ...) is open and subscribed.
    Connected { connection: u32 },
    /// Connection `connection` ended; `cause` is None for a normal end.
    Disconnected {
        connection: u32,
        cause: Option<Error>,
    },
    /// Waiting `delay` before attempt `attempt` to open connection `connection`.
    Retrying {
        connection: u32,
        attempt: u32,
        delay: Duration,
        cause: Error,
    },
}

/// Called on the I/O thread for each event: keep it short.
#[derive(Clone)]
pub struct EventHook(pub Arc<dyn Fn(&Event) + Send + Sync>);

impl std::fmt::Debug for EventHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHook(..)")
    }
}

/// What one wait for results gave.
#[derive(Debug)]
pub enum Batch<O> {
    /// One or more results.
    Items(Vec<O>),
    /// Nothing arrived within the wait; call again.
    Pending,
    /// The stream is over and every result has been handed out; the error, if it ended
    /// abnormally.
    End(Option<Error>),
}

/// How much one `next_batch_within` may still take.
struct Limit {
    max: usize,
    max_bytes: usize,
    /// Results taken so far, and their bytes.
    taken: usize,
    bytes: usize,
}

impl Limit {
    fn full(&self) -> bool {
        self.taken >= self.max || self.bytes >= self.max_bytes
    }

    /// Takes results from `more` (the ones after those already taken) until full; returns how
    /// many are taken in all.
    fn take<'a, O: 'a>(
        &mut self,
        more: impl Iterator<Item = &'a O>,
        size: &impl Fn(&O) -> usize,
    ) -> usize {
        for item in more {
            if self.full() {
                break;
            }
            self.taken += 1;
            self.bytes = self.bytes.saturating_add(size(item));
        }
        self.taken
    }
}

/// Where [`Stream::next_batch`] takes results from.
enum Feed<O> {
    /// The workers' result queue.
    Pool(flume::Receiver<Vec<O>>),
    /// No workers (see [`Processor::passthrough`]): jobs straight from the stream's job
    /// queue, each made into its result by the function.
    Direct(fn(Job) -> O),
}

impl<O> Clone for Feed<O> {
    fn clone(&self) -> Self {
        match self {
            Feed::Pool(rx) => Feed::Pool(rx.clone()),
            Feed::Direct(make) => Feed::Direct(*make),
        }
    }
}

/// A running stream. Dropping it cancels it; its threads then end on their own.
pub struct Stream<O> {
    shared: Arc<Shared>,
    control: watch::Sender<Control>,
    connected: flume::Receiver<Result<(), Error>>,
    /// Set once the handshake has succeeded, so later waits keep saying so.
    was_connected: std::sync::atomic::AtomicBool,
    results: Mutex<Option<Feed<O>>>,
    /// The rest of a batch that `next_batch` could not hand out whole (`max`).
    leftover: Mutex<std::collections::VecDeque<O>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The job queue: what waits there is discarded when the owner gives up on stuck workers,
    /// and with no workers ([`Feed::Direct`]) `next_batch` takes the jobs from it.
    queue: Arc<JobQueue>,
    workers: usize,
    /// The process that started the stream. After `fork()` the child has a copy of this value
    /// but none of the threads: there it must neither wait for them nor touch their handles.
    pid: u32,
    replies: Option<ws::Replies>,
    journal: Option<journal::Link>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<O: Send + 'static> Stream<O> {
    /// Checks the configuration, then starts the workers and the read-loop thread, which
    /// connects in the background: see [`Stream::wait_connected`]. With one worker, no
    /// journal and a processor that has nothing to run ([`Processor::passthrough`]), no worker
    /// starts: [`Stream::next_batch`] takes the jobs from the queue itself.
    pub fn start<P: Processor<Output = O>>(config: Config, processor: P) -> Result<Self, Error> {
        Self::start_journaled(config, processor, Arc::new(|_: &O, ok| Outcome::plain(ok)))
    }

    /// [`Stream::start`], with `describe` telling the journal (if `config.journal`) what each
    /// job's output was: its value, or its error's type and message.
    pub fn start_journaled<P: Processor<Output = O>>(
        config: Config,
        processor: P,
        describe: Describe<O>,
    ) -> Result<Self, Error> {
        #[cfg(feature = "test-panic")]
        let processor = test_panic::Worker::new(processor);
        ws::prepare_request(&config.url, &config.headers)?;
        config.check()?;
        let tls = ws::tls_config(&config.tls)?;
        // Opened (and checked) before any thread starts, so a bad file is refused at once.
        let journal_setup = config
            .journal
            .as_ref()
            .map(|spec| journal::Setup::open(spec, config.queue_size))
            .transpose()?;
        let workers = config.workers;
        let replies = config.replies.clone();
        let shared = Arc::new(Shared::new());
        // One worker with nothing to run: the consumer is that worker (no thread, no hand-over).
        // Not with a journal, whose writer marks each job done as its worker finishes it.
        let passthrough = match &journal_setup {
            None if config.workers == 1 => processor.passthrough(config.decode),
            _ => None,
        };
        let mut queue = JobQueue::new(config.queue_size, config.overflow, config.order)
            .with_consumers(config.workers);
        if passthrough.is_some() {
            // The consumer takes the jobs itself: a push is what it may be waiting for.
            queue = queue.with_bell(shared.bell.clone());
        }
        let queue = Arc::new(queue);
        let (feed, mut threads) = match passthrough {
            Some(make) => (Feed::Direct(make), Vec::new()),
            None => Self::spawn_pool(
                &config,
                processor,
                describe,
                journal_setup.as_ref(),
                &queue,
                &shared,
            )?,
        };
        let direct = matches!(feed, Feed::Direct(..));
        let (control, control_rx) = watch::channel(Control::Run);
        let (connected_tx, connected) = flume::bounded(1);

        // With a journal, the read loop hands jobs to its writer, which releases them to the
        // queue once written and closes the queue after the last one.
        let mut journal_link = None;
        let mut inserts = None;
        let mut first_id = 0;
        if let Some(setup) = journal_setup {
            first_id = setup.next_id();
            let key = match (config.overflow, config.order) {
                (Overflow::Conflate, _) | (_, Order::Key) => config.key.clone(),
                _ => None,
            };
            match setup.spawn(queue.clone(), shared.clone(), key) {
                Ok((handle, link, tx)) => {
                    threads.push(handle);
                    journal_link = Some(link);
                    inserts = Some(tx);
                }
                Err(e) => {
                    queue.close();
                    return Err(e);
                }
            }
        }
        let io_shared = shared.clone();
        let spawn_queue = queue.clone();
        let stream_queue = queue.clone();
        let guard = shared.thread_guard();
        let io = std::thread::Builder::new()
            .name(format!("{THREAD_PREFIX}io"))
            .spawn(move || {
                let _guard = guard;
                let shared = io_shared.clone();
                let io_queue = queue.clone();
                // Kept until the end is recorded: the journal writer closes the queue once
                // every sender of jobs is gone.
                let journaled = inserts.clone();
                // A panic here must not leave the consumer believing the stream ended normally.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    io_main(
                        config,
                        tls,
                        io_queue,
                        control_rx,
                        io_shared,
                        connected_tx,
                        inserts.map(|tx| (tx, first_id)),
                    )
                }));
                if let Err(payload) = ran {
                    let msg = crate::errors::panic_message(payload.as_ref());
                    shared.set_error(Error::Internal(format!("the I/O thread panicked: {msg}")));
                }
                // The owner gave up on stuck workers meanwhile, or (with no workers) cancelled:
                // what the read loop queued since will never run.
                if shared.gave_up() || (direct && shared.is_cancelled()) {
                    shared.on_cancelled_n(queue.discard_all());
                }
                // The end (and its error) is recorded: the workers may finish the queue.
                match journaled {
                    None => queue.close(),
                    Some(tx) => drop(tx),
                }
            });
        match io {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                // The workers are waiting on the queue: let them end.
                spawn_queue.close();
                return Err(Error::Internal(format!("cannot start the I/O thread: {e}")));
            }
        }
        Ok(Stream {
            shared,
            control,
            connected,
            was_connected: std::sync::atomic::AtomicBool::new(false),
            results: Mutex::new(Some(feed)),
            leftover: Mutex::new(std::collections::VecDeque::new()),
            threads: Mutex::new(threads),
            queue: stream_queue,
            workers,
            pid: std::process::id(),
            replies,
            journal: journal_link,
        })
    }

    /// Starts the workers, and the result queue they hand results to.
    fn spawn_pool<P: Processor<Output = O>>(
        config: &Config,
        processor: P,
        describe: Describe<O>,
        journal: Option<&journal::Setup>,
        queue: &Arc<JobQueue>,
        shared: &Arc<Shared>,
    ) -> Result<(Feed<O>, Vec<JoinHandle<()>>), Error> {
        // In batches (one per worker hand-over) of at most min(MAX_BATCH, queue_size) results:
        // about queue_size results for cheap jobs, and room for each worker to hand one over.
        // A processor that is not batchable hands results over one by one: queue_size of them.
        let per_batch = if processor.batchable() {
            pool::MAX_BATCH
        } else {
            1
        };
        let result_batches = config
            .queue_size
            .div_ceil(per_batch)
            .max(config.workers)
            .max(2);
        let (results_tx, results_rx) = flume::bounded::<Vec<O>>(result_batches);
        let pipes = Pipes {
            queue: queue.clone(),
            results: results_tx,
            reorder: (config.order == Order::Receipt)
                .then(|| Arc::new(Reorder::new(config.queue_size))),
        };
        let threads = match journal {
            None => pool::spawn(
                config.workers,
                Arc::new(processor),
                config.decode,
                pipes,
                shared.clone(),
            )?,
            Some(setup) => pool::spawn(
                config.workers,
                Arc::new(setup.wrap(processor, describe)),
                config.decode,
                pipes,
                shared.clone(),
            )?,
        };
        Ok((Feed::Pool(results_rx), threads))
    }

    /// Waits up to `wait` for the handshake. `None`: still connecting. `Some(Ok)`: connected
    /// (and stays `Some(Ok)` on later calls). `Some(Err)`: the connection could not be opened.
    pub fn wait_connected(&self, wait: Duration) -> Option<Result<(), Error>> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.forked() {
            return Some(Err(self.forked_error()));
        }
        if self.was_connected.load(SeqCst) {
            return Some(Ok(()));
        }
        match self.connected.recv_timeout(wait) {
            Ok(Ok(())) => {
                self.was_connected.store(true, SeqCst);
                Some(Ok(()))
            }
            Ok(Err(e)) => Some(Err(e)),
            Err(flume::RecvTimeoutError::Timeout) => None,
            // The failure was reported already, the stream was closed before it connected, or
            // the I/O thread ended without a word (a bug: say so rather than pretend).
            Err(flume::RecvTimeoutError::Disconnected) => Some(match self.shared.error() {
                Some(e) => Err(e),
                None if *self.control.borrow() != Control::Run => Ok(()),
                None => Err(Error::Internal(
                    "the I/O thread ended before the connection opened".into(),
                )),
            }),
        }
    }

    /// Waits up to `wait` for at least one result, then takes up to `max` (at least 1) without
    /// waiting more.
    pub fn next_batch(&self, max: usize, wait: Duration) -> Batch<O> {
        self.next_batch_within(max, usize::MAX, |_| 0, wait)
    }

    /// `next_batch`, also stopping once the results taken hold `max_bytes` (`size` of each;
    /// at least one result is taken): a batch of large messages then stays small enough to be
    /// made into Python objects, used and freed while its memory is still in the cache.
    pub fn next_batch_within(
        &self,
        max: usize,
        max_bytes: usize,
        size: impl Fn(&O) -> usize,
        wait: Duration,
    ) -> Batch<O> {
        let max = max.max(1);
        if self.forked() {
            return Batch::End(Some(self.forked_error()));
        }
        let mut leftover = lock(&self.leftover);
        // Cloned out first: a guard in the match's scrutinee would be held through the whole
        // match, so through the direct feed's wait, and `cancel` (GIL held) would wait on it.
        let feed = lock(&self.results).clone();
        let rx = match feed {
            None => {
                drop(leftover);
                self.drop_leftover();
                return self.end();
            }
            Some(Feed::Pool(rx)) => rx,
            Some(Feed::Direct(make)) => {
                drop(leftover);
                return self.take_direct(make, max, max_bytes, wait);
            }
        };
        if self.shared.is_fatal() && !self.shared.is_cancelled() {
            // A worker died (a bug, recorded as the stream's error): end the stream rather
            // than wait on a pool that is short of a thread. Results already made still come.
            self.shared.set_cancelled();
            self.control.send_replace(Control::Cancel);
        }
        let mut limit = Limit {
            max,
            max_bytes,
            taken: 0,
            bytes: 0,
        };
        let mut items: Vec<O> = if leftover.is_empty() {
            match rx.recv_timeout(wait) {
                Ok(first) => first,
                Err(flume::RecvTimeoutError::Timeout) => return Batch::Pending,
                Err(flume::RecvTimeoutError::Disconnected) => return self.end(),
            }
        } else {
            let n = limit.take(leftover.iter(), &size);
            let taken = leftover.drain(..n).collect();
            if !leftover.is_empty() {
                return Batch::Items(taken);
            }
            taken
        };
        loop {
            let n = limit.take(items[limit.taken..].iter(), &size);
            if n < items.len() {
                leftover.extend(items.drain(n..));
                break;
            }
            if limit.full() {
                break;
            }
            let Ok(more) = rx.try_recv() else { break };
            items.extend(more);
        }
        Batch::Items(items)
    }

    /// `next_batch_within` with no workers: takes the jobs from the queue and makes their
    /// results here. Jobs are sized by their payloads.
    fn take_direct(
        &self,
        make: fn(Job) -> O,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Batch<O> {
        let mut popped = Vec::with_capacity(max.min(pool::MAX_BATCH * 4));
        match self.queue.pop_within(max, max_bytes, wait, &mut popped) {
            Took::Nothing => return Batch::Pending,
            Took::Closed => return self.end(),
            Took::Jobs => {}
        }
        self.shared.on_passed(popped.len() as u64);
        let mut keys = Vec::new();
        let items = popped
            .into_iter()
            .map(|p| {
                keys.extend(p.key);
                make(p.job)
            })
            .collect();
        // Their results are out (per-key order: the next job of each key may go).
        for key in keys {
            self.queue.done(key);
        }
        Batch::Items(items)
    }

    fn end(&self) -> Batch<O> {
        if self.shared.is_fatal() {
            // The job a dead worker was running will never finish.
            self.shared.abandon();
        }
        self.shared.mark_ended();
        Batch::End(self.shared.error())
    }

    /// Graceful close: stop reading, send a close frame; queued and running jobs still finish
    /// and their results stay available through `next_batch`. Returns at once.
    pub fn close(&self) {
        if self.forked() {
            return;
        }
        self.control.send_if_modified(|c| {
            let run = *c == Control::Run;
            if run {
                *c = Control::Close;
            }
            run
        });
    }

    /// Abort: stop reading, send a close frame, drop queued jobs and every result not yet taken.
    /// Running jobs still end (a thread cannot be interrupted). Returns at once.
    pub fn cancel(&self) {
        if self.forked() {
            return;
        }
        self.shared.set_cancelled();
        self.control.send_replace(Control::Cancel);
        self.drop_feed();
        self.drop_leftover();
        self.shared.mark_ended();
    }

    /// [`Stream::cancel`] for a consumer that is going away (interrupted, exiting, or dropping
    /// the stream unclosed): the server gets close code 1001 instead of 1000.
    pub fn cancel_going_away(&self) {
        self.shared.set_going_away();
        self.cancel();
    }

    /// Frees the results taken but not handed over, after letting go of the lock: a result's
    /// drop may run Python code (a `__del__`) that calls back into this stream.
    fn drop_leftover(&self) {
        let gone = std::mem::take(&mut *lock(&self.leftover));
        drop(gone);
    }

    /// For a consumer that waits outside [`Stream::next_batch`] (an event loop): `ring` is
    /// called (from any thread) when, after [`Stream::arm`], results may have come or the
    /// stream may have ended. Set once; false if it was set already.
    pub fn set_ringer(&self, ring: Box<dyn Fn() + Send + Sync>) -> bool {
        self.shared.bell.set_ringer(ring)
    }

    /// Arms the ringer (see [`Stream::set_ringer`]): true if the consumer should wait for the
    /// ring, false if `next_batch` has something at once (results, or the end). The bell stays
    /// armed either way: another consumer may be waiting on it (a ring then may find nothing,
    /// and the consumer looks and waits again).
    pub fn arm(&self) -> bool {
        self.shared.bell.arm();
        !self.ready()
    }

    /// Whether `next_batch` would return at once with results or the end.
    fn ready(&self) -> bool {
        // Not `is_fatal`: `next_batch` then cancels, and the end comes (and rings) once the
        // other threads are gone.
        if self.forked() || !lock(&self.leftover).is_empty() {
            return true;
        }
        match &*lock(&self.results) {
            None => true,
            Some(Feed::Pool(rx)) => !rx.is_empty() || rx.is_disconnected(),
            Some(Feed::Direct(_)) => self.queue.has_jobs_or_closed(),
        }
    }

    /// The owner stops waiting for this stream (after [`Stream::close`] or [`Stream::cancel`]
    /// and a join that timed out): the jobs still queued are counted as cancelled and the ones
    /// still running as abandoned, so that every received job is accounted for. Their threads
    /// end when the handlers return. Returns how many jobs were abandoned.
    pub fn abandon(&self) -> u64 {
        if self.forked() {
            return 0;
        }
        self.shared.set_cancelled();
        self.control.send_replace(Control::Cancel);
        let abandoned = self.shared.abandon();
        self.shared.on_cancelled_n(self.queue.discard_all());
        self.drop_feed();
        self.shared.mark_ended();
        abandoned
    }

    /// True in a child process forked after the stream started: its threads, its runtime and
    /// its connection stayed in the parent.
    pub fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    fn forked_error(&self) -> Error {
        Error::Forked {
            pid: self.pid,
            child: std::process::id(),
        }
    }

    /// Forgets the handles of threads that exist only in the parent process (joining or
    /// detaching them in the child would act on threads of another process).
    fn forget_threads(&self) {
        std::mem::forget(std::mem::take(&mut *lock(&self.threads)));
    }

    /// Waits up to `wait` for every thread of the stream to end; true when they all have (in a
    /// forked child at once: none of them is there).
    pub fn join(&self, wait: Duration) -> bool {
        if self.forked() {
            self.forget_threads();
            return true;
        }
        let deadline = Instant::now() + wait;
        loop {
            let mut threads = lock(&self.threads);
            if threads.iter().all(JoinHandle::is_finished) {
                for t in threads.drain(..) {
                    // A panic on these threads is caught where it happens; nothing to report.
                    let _ = t.join();
                }
                self.shared.mark_ended();
                return true;
            }
            drop(threads);
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut snap = self.shared.snapshot();
        if let Some(r) = &self.replies {
            snap.replies = r.sent();
            snap.replies_dropped = r.dropped();
        }
        snap
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The stream's journal, when it has one: status queries and the recovered jobs.
    pub fn journal(&self) -> Option<&journal::Link> {
        self.journal.as_ref()
    }
}

/// Every thread a stream starts is named with this prefix.
pub(crate) const THREAD_PREFIX: &str = "wspool-";

/// True on one of the threads a stream runs (its read loop or a worker): such a thread must
/// never wait for its own stream to end.
pub fn on_stream_thread() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with(THREAD_PREFIX))
}

impl<O> Stream<O> {
    /// No more results will be taken. With no workers, the jobs still queued are counted as
    /// cancelled here (the ones the read loop queues after, as it ends), as workers would.
    fn drop_feed(&self) {
        // Taken out under the lock and freed after it: a result's drop may run Python code
        // that calls back into this stream (the results still in the channel go once the
        // workers' ends are gone too).
        let feed = lock(&self.results).take();
        if let Some(Feed::Direct(_)) = feed {
            self.shared.on_cancelled_n(self.queue.discard_all());
        }
        drop(feed);
        // A consumer waiting outside `next_batch` must look: the stream is over.
        self.shared.bell.ring();
    }
}

impl<O> Drop for Stream<O> {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A forked child's copy: the threads are the parent's; leave their handles alone.
            std::mem::forget(std::mem::take(&mut *lock(&self.threads)));
            return;
        }
        self.shared.set_cancelled();
        self.control.send_replace(Control::Cancel);
        self.drop_feed();
    }
}

/// Body of the I/O thread: one single-threaded runtime for this stream's connections.
fn io_main(
    config: Config,
    tls: Arc<rustls::ClientConfig>,
    queue: Arc<JobQueue>,
    control: watch::Receiver<Control>,
    shared: Arc<Shared>,
    connected: flume::Sender<Result<(), Error>>,
    // With a journal: its writer's channel, and the id of the first new message.
    journal: Option<(journal::Inserts, u64)>,
) {
    let (journal, next_id) = journal.map_or((None, 0), |(tx, first)| (Some(tx), first));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = Error::Internal(format!("cannot start the I/O runtime: {e}"));
            shared.set_error(e.clone());
            let _ = connected.send(Err(e));
            return;
        }
    };
    // An absurdly far deadline (overflow) is no deadline.
    let deadline = config
        .timeout
        .and_then(|t| tokio::time::Instant::now().checked_add(t));
    let key = match (config.overflow, config.order) {
        (Overflow::Conflate, _) | (_, Order::Key) => config.key.clone(),
        _ => None,
    };
    let reader = Reader {
        queue,
        key,
        control,
        shared,
        deadline,
        close_timeout: config.close_timeout,
        heartbeat: config.heartbeat,
        connection: 0,
        next_id,
        replies: config.replies.clone(),
        journal,
        max_message_size: config.max_message_size,
    };
    runtime.block_on(connections(config, tls, reader, connected));
}

/// Opens connection after connection (with the reconnect policy) until the stream is over. An
/// abnormal end is recorded in `Shared` before this returns (the caller then closes the queue).
async fn connections(
    config: Config,
    tls: Arc<rustls::ClientConfig>,
    mut reader: Reader,
    connected: flume::Sender<Result<(), Error>>,
) {
    let emit = |event: Event| {
        if let Some(hook) = &config.on_event {
            (hook.0)(&event);
        }
    };
    let mut connected = Some(connected);
    let mut connection: u32 = 0;
    // Failed attempts in a row.
    let mut attempt: u32 = 0;
    loop {
        let opened = tokio::select! {
            biased;
            _ = wait_while_running(&mut reader.control) => return,
            _ = ws::sleep_until(reader.deadline) => {
                if connected.is_some() {
                    // The deadline ran out before the first connection opened.
                    let e = Error::Timeout {
                        url: ws::display_url(&config.url),
                        after: config.timeout.unwrap_or_default(),
                    };
                    fail(&reader, &mut connected, e);
                }
                return;
            }
            opened = open(&config, &tls, connection, reader.deadline) => opened,
        };
        let cause = match opened {
            Ok(ws) => {
                attempt = 0;
                match connected.take() {
                    Some(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    None => reader.shared.on_reconnected(),
                }
                emit(Event::Connected { connection });
                #[cfg(feature = "test-panic")]
                test_panic::io(&config.url);
                reader.connection = connection;
                let ended = reader.run(ws).await;
                let cause = match ended {
                    Ended::Finished => None,
                    Ended::Failed(e) => Some(e),
                };
                emit(Event::Disconnected {
                    connection,
                    cause: cause.clone(),
                });
                connection += 1;
                match cause {
                    None => return,
                    Some(e) => e,
                }
            }
            Err(e) => e,
        };
        let policy = match &config.reconnect {
            Some(p) if cause.is_retryable() && *reader.control.borrow() == Control::Run => p,
            _ => return fail(&reader, &mut connected, cause),
        };
        attempt += 1;
        if policy.max_attempts.is_some_and(|max| attempt > max) {
            return fail(&reader, &mut connected, cause);
        }
        let delay = policy.delay(attempt);
        emit(Event::Retrying {
            connection,
            attempt,
            delay,
            cause: cause.clone(),
        });
        tokio::select! {
            biased;
            _ = wait_while_running(&mut reader.control) => return,
            _ = ws::sleep_until(reader.deadline) => {
                if connected.is_some() {
                    fail(&reader, &mut connected, cause);
                }
                return;
            }
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Records the error that ends the stream, and reports it to a consumer still waiting for the
/// first connection.
fn fail(reader: &Reader, connected: &mut Option<flume::Sender<Result<(), Error>>>, e: Error) {
    reader.shared.set_error(e.clone());
    if let Some(tx) = connected.take() {
        let _ = tx.send(Err(e));
    }
}

async fn open(
    config: &Config,
    tls: &Arc<rustls::ClientConfig>,
    connection: u32,
    deadline: Option<tokio::time::Instant>,
) -> Result<ws::WsStream, Error> {
    let request = ws::prepare_request(&config.url, &config.headers)?;
    // The overall deadline bounds the opening too.
    let open_timeout = match deadline {
        Some(d) => d
            .saturating_duration_since(tokio::time::Instant::now())
            .min(config.open_timeout),
        None => config.open_timeout,
    };
    let mut ws = ws::connect(request, open_timeout, config.max_message_size, tls).await?;
    match &config.subscribe {
        Subscribe::None => {}
        Subscribe::Messages(messages) => ws::subscribe(&mut ws, messages).await?,
        Subscribe::Dynamic(make) => ws::subscribe(&mut ws, &make(connection)?).await?,
    }
    Ok(ws)
}

async fn wait_while_running(control: &mut watch::Receiver<Control>) {
    while *control.borrow_and_update() == Control::Run {
        if control.changed().await.is_err() {
            return;
        }
    }
}

/// Test-only panic triggers (cargo feature `test-panic`), to check that a panic on a native
/// thread outside the per-job guard surfaces as an error and ends the stream cleanly. The
/// feature is compiled into the development build (`make dev`) and into `make test-rust`, never
/// into a release wheel; even when compiled in, nothing panics unless a test asks:
/// - the I/O thread panics right after connecting when the URL contains
///   `wspool_test_panic=io` (a query parameter any server ignores);
/// - a worker dies (the panic escapes the per-job guard) on a message whose payload is
///   exactly `wspool_test_panic=worker`.
///
/// A feature rather than a separate wheel: building a second extension for one test is too
/// slow, and a trigger on the URL or the payload needs no global state, so Rust tests running
/// in parallel and Python tests in one process do not affect each other.
#[cfg(feature = "test-panic")]
mod test_panic {
    use crate::errors::Error;
    use crate::job::{Data, DecodeError, DecodeMode, Job};
    use crate::pool::Processor;

    const WORKER: &[u8] = b"wspool_test_panic=worker";

    pub(super) fn io(url: &str) {
        if url.contains("wspool_test_panic=io") {
            panic!("test-panic: the I/O thread panics on purpose");
        }
    }

    /// Wraps the real processor: the trigger panics in `process` (caught by the per-job guard)
    /// and again in `panicked`, which runs outside it, so the worker thread dies. `panicked`
    /// gets the job without its payload: the id of the trigger's job is kept to know it.
    pub(super) struct Worker<P>(pub P, pub std::sync::atomic::AtomicU64);

    impl<P> Worker<P> {
        pub(super) fn new(processor: P) -> Self {
            Worker(processor, std::sync::atomic::AtomicU64::new(u64::MAX))
        }
    }

    impl<P: Processor> Processor for Worker<P> {
        type Output = P::Output;

        fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (P::Output, bool) {
            if job.payload.as_ref() == WORKER {
                self.1.store(job.id, std::sync::atomic::Ordering::SeqCst);
                panic!("test-panic: a job panics on purpose");
            }
            self.0.process(job, decoded)
        }

        // As the wrapped processor does, so that the development build runs the same hot path
        // as the release build. A Python handler goes one job at a time, so a worker killed
        // there takes only its own job with it.
        fn batchable(&self) -> bool {
            self.0.batchable()
        }

        // The hooks go to the real processor: left to their defaults, the development build
        // (where this wrapper is) lost the Python layer's per-thread interpreter state, and
        // every handler call made and freed one, frame stack included (mmap, munmap).
        fn worker(&self, work: &mut (dyn FnMut() + Send)) {
            self.0.worker(work);
        }

        fn batch(&self, work: &mut dyn FnMut()) {
            self.0.batch(work);
        }

        fn unlocked(&self, wait: &mut (dyn FnMut() + Send)) {
            self.0.unlocked(wait);
        }

        fn panicked(&self, job: Job, error: Error) -> P::Output {
            if job.id == self.1.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("test-panic: a worker dies on purpose");
            }
            self.0.panicked(job, error)
        }

        fn passthrough(&self, mode: DecodeMode) -> Option<fn(Job) -> P::Output> {
            self.0.passthrough(mode)
        }
    }
}
