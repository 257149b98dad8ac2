//! State shared by the read loop, the workers and the consumer: counters, the cancel flag and how
//! the stream ended. Every stage counts what passes through it here, so `stats` needs no second
//! bookkeeping path.

use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::errors::Error;

/// The flag bit of `Shared::running`: the owner gave up waiting for the running jobs.
const GAVE_UP: u64 = 1 << 63;

/// Counters and lifecycle flags of one stream.
#[derive(Debug)]
pub struct Shared {
    /// Counted by the read loop alone, on every run of messages.
    intake: Intake,
    processed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    dropped: AtomicU64,
    abandoned: AtomicU64,
    /// Jobs whose processing has started and not finished, with [`GAVE_UP`] set once the
    /// owner stopped waiting for them: one word, so that each job is counted exactly once,
    /// either as processed/failed (it finished first) or as abandoned (the owner gave up first).
    running: AtomicU64,
    /// Leaving by interrupt, at interpreter exit or on drop: the close frame says 1001.
    going_away: AtomicBool,
    /// A native thread died of a panic that nothing else caught.
    fatal: AtomicBool,
    reconnects: AtomicU64,
    threads: AtomicUsize,
    cancel: AtomicBool,
    started: Instant,
    ended: Mutex<Option<Instant>>,
    outcome: Mutex<Option<Error>>,
    /// Rung when results are handed over, a thread ends or the stream is cancelled.
    pub bell: std::sync::Arc<crate::bell::Bell>,
}

/// The read loop's counters, on a cache line of their own: beside the counters the workers
/// update for every job, each update by one side took the line away from the other's core.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Intake {
    received: AtomicU64,
    bytes: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatsSnapshot {
    /// Messages read from the socket and turned into jobs.
    pub received: u64,
    /// Jobs whose result is a value.
    pub processed: u64,
    /// Jobs whose result is an error (handler exception or decode error).
    pub failed: u64,
    /// Jobs dropped unprocessed by `cancel()`.
    pub cancelled: u64,
    /// Messages dropped by the overflow policy (drop_oldest, drop_newest, conflate).
    pub dropped: u64,
    /// Jobs whose handler was still running when the owner gave up waiting for it (close,
    /// cancel or interpreter exit after `close_timeout`); their result is never delivered.
    pub abandoned: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Received, not yet processed, failed, cancelled, dropped or abandoned.
    pub in_flight: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Native threads of this stream still running (read loop and workers).
    pub threads: usize,
    /// Seconds from start to the end of the stream (or to now, while it runs).
    pub elapsed: f64,
    /// With `reply=True`: replies written to the socket, and replies dropped because their
    /// connection had ended (filled in by `Stream::stats`).
    pub replies: u64,
    pub replies_dropped: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain assignments).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            intake: Intake::default(),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            running: AtomicU64::new(0),
            going_away: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            threads: AtomicUsize::new(0),
            bell: Default::default(),
            cancel: AtomicBool::new(false),
            started: Instant::now(),
            ended: Mutex::new(None),
            outcome: Mutex::new(None),
        }
    }

    pub fn on_received(&self, bytes: usize) {
        self.on_received_n(1, bytes);
    }

    /// `n` messages of `bytes` in all; nothing to count when `n` is 0.
    pub fn on_received_n(&self, n: u64, bytes: usize) {
        if n > 0 {
            self.intake.received.fetch_add(n, Relaxed);
            self.intake.bytes.fetch_add(bytes as u64, Relaxed);
        }
    }

    /// A worker starts processing a job (decode and handler); [`Shared::on_finished`] follows.
    pub fn on_started(&self) {
        if self.running.fetch_add(1, SeqCst) & GAVE_UP != 0 {
            // Started after the owner gave up: nobody will take its result.
            self.abandoned.fetch_add(1, Relaxed);
        }
    }

    /// A job's processing ended (after [`Shared::on_started`]): a value (`ok`) or an error.
    /// Not counted again when it was counted as abandoned already.
    pub fn on_finished(&self, ok: bool) {
        let before = self.running.fetch_sub(1, SeqCst);
        if before & !GAVE_UP == 0 {
            // Not started through `on_started` (a caller that does not track running jobs):
            // undo, and count it as finished.
            self.running.fetch_add(1, SeqCst);
        } else if before & GAVE_UP != 0 {
            return;
        }
        if ok {
            self.processed.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    /// A batch of `n` jobs starts (counted as running together, one update for the batch);
    /// [`Shared::on_batch_done`] follows. Started after the owner gave up: abandoned.
    pub fn on_batch_started(&self, n: u64) {
        if n > 0 && self.running.fetch_add(n, SeqCst) & GAVE_UP != 0 {
            self.abandoned.fetch_add(n, Relaxed);
        }
    }

    /// How the `n` jobs of a batch (after [`Shared::on_batch_started`]) ended: `ok` values,
    /// `failed` errors, `cancelled` not run, `lost` run but their results lost (a worker that
    /// died of a bug). Not counted again when the owner gave up meanwhile (they were counted
    /// as abandoned then).
    pub fn on_batch_done(&self, n: u64, ok: u64, failed: u64, cancelled: u64, lost: u64) {
        if n == 0 || self.running.fetch_sub(n, SeqCst) & GAVE_UP != 0 {
            return;
        }
        for (counter, k) in [
            (&self.processed, ok),
            (&self.failed, failed),
            (&self.cancelled, cancelled),
            (&self.abandoned, lost),
        ] {
            if k > 0 {
                counter.fetch_add(k, Relaxed);
            }
        }
    }

    /// `n` jobs that needed nothing run (see `pool::Processor::passthrough`): processed as
    /// they are handed out.
    pub fn on_passed(&self, n: u64) {
        self.processed.fetch_add(n, Relaxed);
    }

    pub fn on_cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    pub fn on_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }

    /// The owner stops waiting for the jobs still running: each is counted as abandoned, now
    /// (and those that start later, when they start). Returns how many were running.
    pub fn abandon(&self) -> u64 {
        let before = self.running.fetch_or(GAVE_UP, SeqCst);
        if before & GAVE_UP != 0 {
            return 0;
        }
        let running = before & !GAVE_UP;
        self.abandoned.fetch_add(running, Relaxed);
        running
    }

    /// Whether [`Shared::abandon`] was called.
    pub fn gave_up(&self) -> bool {
        self.running.load(SeqCst) & GAVE_UP != 0
    }

    /// Counts `n` queued jobs dropped unprocessed.
    pub fn on_cancelled_n(&self, n: u64) {
        self.cancelled.fetch_add(n, Relaxed);
    }

    /// The close frame of a cancel says 1001 (going away) instead of 1000.
    pub fn set_going_away(&self) {
        self.going_away.store(true, Relaxed);
    }

    pub fn going_away(&self) -> bool {
        self.going_away.load(Relaxed)
    }

    /// True once a native thread died of an uncaught panic (recorded as an internal error).
    pub fn is_fatal(&self) -> bool {
        self.fatal.load(Relaxed)
    }

    pub fn on_reconnected(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// Asks the workers to drop the jobs still queued.
    pub fn set_cancelled(&self) {
        self.cancel.store(true, Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Relaxed)
    }

    /// Records why the stream ended; the first error wins.
    pub fn set_error(&self, error: Error) {
        let mut slot = lock(&self.outcome);
        if slot.is_none() {
            *slot = Some(error);
        }
    }

    pub fn error(&self) -> Option<Error> {
        lock(&self.outcome).clone()
    }

    /// Freezes `elapsed`; called once the last result has been handed over.
    pub fn mark_ended(&self) {
        lock(&self.ended).get_or_insert_with(Instant::now);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        // Read the completion counters before `received` so in_flight never goes negative.
        let processed = self.processed.load(Relaxed);
        let failed = self.failed.load(Relaxed);
        let cancelled = self.cancelled.load(Relaxed);
        let dropped = self.dropped.load(Relaxed);
        let abandoned = self.abandoned.load(Relaxed);
        let received = self.intake.received.load(Relaxed);
        let end = lock(&self.ended).unwrap_or_else(Instant::now);
        StatsSnapshot {
            received,
            processed,
            failed,
            cancelled,
            dropped,
            abandoned,
            reconnects: self.reconnects.load(Relaxed),
            in_flight: received
                .saturating_sub(processed + failed + cancelled + dropped + abandoned),
            bytes: self.intake.bytes.load(Relaxed),
            threads: self.threads.load(Relaxed),
            elapsed: end.duration_since(self.started).as_secs_f64(),
            replies: 0,
            replies_dropped: 0,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads.load(Relaxed)
    }

    /// Counts a native thread for as long as the returned guard lives.
    pub fn thread_guard(self: &std::sync::Arc<Self>) -> ThreadGuard {
        self.threads.fetch_add(1, Relaxed);
        ThreadGuard(self.clone())
    }
}

/// Decrements the live-thread count when the thread that holds it ends (even by panic). A
/// thread that ends by a panic nothing caught (a bug: jobs and the read loop catch theirs)
/// records an internal error and marks the stream fatal, so that the consumer ends the stream
/// and raises it instead of waiting on a pool that lost a worker.
pub struct ThreadGuard(std::sync::Arc<Shared>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let name = std::thread::current()
                .name()
                .unwrap_or("a native thread")
                .to_string();
            self.0.set_error(Error::Internal(format!(
                "{name} died of a panic (its message is on stderr)"
            )));
            self.0.fatal.store(true, SeqCst);
        }
        self.0.threads.fetch_sub(1, Relaxed);
        // The end of a thread may end the results (a consumer waiting for them must look).
        self.0.bell.ring();
    }
}

/// Seconds since the Unix epoch, as `time.time()` gives them.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn in_flight_is_what_is_not_finished() {
        let s = Shared::new();
        for _ in 0..5 {
            s.on_received(10);
        }
        s.on_finished(true);
        s.on_finished(false);
        s.on_cancelled();
        s.on_dropped(1);
        let snap = s.snapshot();
        assert_eq!((snap.received, snap.processed, snap.failed), (5, 1, 1));
        assert_eq!((snap.cancelled, snap.dropped), (1, 1));
        assert_eq!((snap.in_flight, snap.bytes), (1, 50));
    }

    #[test]
    fn a_batch_is_counted_once_whether_the_owner_gives_up_before_during_or_after_it() {
        // Runs to its end: each outcome where it belongs.
        let s = Shared::new();
        s.on_received_n(10, 100);
        s.on_batch_started(10);
        assert_eq!(s.snapshot().in_flight, 10);
        s.on_batch_done(10, 6, 2, 1, 1);
        let snap = s.snapshot();
        assert_eq!(
            (snap.processed, snap.failed, snap.cancelled, snap.abandoned),
            (6, 2, 1, 1)
        );
        assert_eq!((snap.in_flight, snap.bytes), (0, 100));
        // The owner gives up while it runs: all of it is abandoned then, once.
        let s = Shared::new();
        s.on_received_n(4, 0);
        s.on_batch_started(4);
        assert_eq!(s.abandon(), 4);
        s.on_batch_done(4, 4, 0, 0, 0);
        let snap = s.snapshot();
        assert_eq!((snap.processed, snap.abandoned, snap.in_flight), (0, 4, 0));
        // Started after the owner gave up: abandoned at the start, not again at the end.
        s.on_received_n(3, 0);
        s.on_batch_started(3);
        s.on_batch_done(3, 3, 0, 0, 0);
        let snap = s.snapshot();
        assert_eq!((snap.processed, snap.abandoned, snap.in_flight), (0, 7, 0));
    }

    #[test]
    fn each_job_is_finished_or_abandoned_never_both() {
        let s = Shared::new();
        for _ in 0..4 {
            s.on_received(1);
            s.on_started();
        }
        s.on_finished(true);
        // Two still running when the owner gives up; a fourth starts after it did.
        s.on_finished(false);
        assert_eq!(s.abandon(), 2);
        assert_eq!(s.abandon(), 0);
        s.on_received(1);
        s.on_started();
        let snap = s.snapshot();
        assert_eq!((snap.processed, snap.failed, snap.abandoned), (1, 1, 3));
        assert_eq!(snap.in_flight, 0);
        // Abandoned handlers that return later are not counted again.
        for _ in 0..3 {
            s.on_finished(true);
        }
        let snap = s.snapshot();
        assert_eq!((snap.processed, snap.abandoned, snap.in_flight), (1, 3, 0));
        assert!(s.gave_up());
    }

    #[test]
    fn a_thread_that_dies_of_a_panic_is_reported() {
        let s = Arc::new(Shared::new());
        let guard = s.thread_guard();
        let t = std::thread::Builder::new()
            .name("wspool-worker-9".into())
            .spawn(move || {
                let _guard = guard;
                panic!("test: a worker dies");
            })
            .unwrap();
        assert!(t.join().is_err());
        assert!(s.is_fatal());
        assert_eq!(s.threads(), 0);
        match s.error() {
            Some(Error::Internal(m)) => assert!(m.contains("wspool-worker-9 died"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_error_wins_and_threads_are_counted() {
        let s = Arc::new(Shared::new());
        s.set_error(Error::Protocol("a".into()));
        s.set_error(Error::Protocol("b".into()));
        assert_eq!(s.error(), Some(Error::Protocol("a".into())));
        let g = s.thread_guard();
        assert_eq!(s.threads(), 1);
        drop(g);
        assert_eq!(s.threads(), 0);
    }
}
