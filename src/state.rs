//! State shared by the read loop, the workers and the consumer: counters, the cancel flag and how
//! the stream ended. Every stage counts what passes through it here, so `stats` needs no second
//! bookkeeping path.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::errors::Error;

/// Counters and lifecycle flags of one stream.
#[derive(Debug)]
pub struct Shared {
    received: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
    bytes: AtomicU64,
    threads: AtomicUsize,
    cancel: AtomicBool,
    started: Instant,
    ended: Mutex<Option<Instant>>,
    outcome: Mutex<Option<Error>>,
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
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Received, not yet processed, failed, cancelled or dropped.
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
            received: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            threads: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
            started: Instant::now(),
            ended: Mutex::new(None),
            outcome: Mutex::new(None),
        }
    }

    pub fn on_received(&self, bytes: usize) {
        self.received.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn on_finished(&self, ok: bool) {
        if ok {
            self.processed.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    pub fn on_cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    pub fn on_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
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
        let received = self.received.load(Relaxed);
        let end = lock(&self.ended).unwrap_or_else(Instant::now);
        StatsSnapshot {
            received,
            processed,
            failed,
            cancelled,
            dropped,
            reconnects: self.reconnects.load(Relaxed),
            in_flight: received.saturating_sub(processed + failed + cancelled + dropped),
            bytes: self.bytes.load(Relaxed),
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

/// Decrements the live-thread count when the thread that holds it ends (even by panic).
pub struct ThreadGuard(std::sync::Arc<Shared>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.0.threads.fetch_sub(1, Relaxed);
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
