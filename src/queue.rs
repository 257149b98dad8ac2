//! The bounded job queue between the read loop and the workers, with the overflow policies and
//! the two keyed modes (conflation, per-key order). One mutex guards it; workers wait on a
//! condition variable, the read loop (async) on a `Notify`. No PyO3 here.
//!
//! Plain mode is a FIFO of jobs. When messages carry a key (`key=` with `overflow="conflate"`
//! or `ordered="key"`), keyed jobs wait in one FIFO per key and the run queue holds the key
//! instead; a job without the key is queued on its own, as in plain mode.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::bell::Bell;
use crate::job::Job;

/// What to do with a message that arrives while `queue_size` jobs are already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Stop reading until a job is taken; TCP then pushes back on the server.
    Block,
    /// Drop the job that has waited longest, queue the new one.
    DropOldest,
    /// Drop the new message.
    DropNewest,
    /// End the stream with an overflow error.
    Error,
    /// Keep only the newest waiting message per key (needs a key); a full queue of distinct
    /// keys blocks.
    Conflate,
}

impl std::str::FromStr for Overflow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "block" => Overflow::Block,
            "drop_oldest" => Overflow::DropOldest,
            "drop_newest" => Overflow::DropNewest,
            "error" => Overflow::Error,
            "conflate" => Overflow::Conflate,
            other => {
                return Err(format!(
                    "overflow must be \"block\", \"drop_oldest\", \"drop_newest\", \"error\" \
                     or \"conflate\", not {other:?}"
                ))
            }
        })
    }
}

/// The order results come out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// As jobs finish (fastest).
    Completion,
    /// Receipt order, through a bounded reorder window.
    Receipt,
    /// Receipt order within each key; different keys run in parallel.
    Key,
}

pub type Key = Box<str>;

enum Entry {
    Job(Job),
    /// The front job of this key's FIFO is ready to run.
    Key(Key),
}

#[derive(Default)]
struct State {
    runnable: VecDeque<Entry>,
    groups: HashMap<Key, VecDeque<Job>>,
    /// Keys with a job running (per-key order only).
    busy: HashSet<Key>,
    len: usize,
    closed: bool,
    next_slot: u64,
    /// Workers waiting on `ready`: a push wakes one only when there is one (a condvar notify
    /// is a system call even with nobody waiting).
    idle: usize,
}

/// A job handed to a worker.
pub struct Popped {
    pub job: Job,
    /// 0, 1, 2... in the order jobs leave the queue, which is receipt order for the jobs that
    /// were not dropped: the reorder window sorts results by it.
    pub slot: u64,
    /// With per-key order, the key to release with [`JobQueue::done`] once the result is out.
    pub key: Option<Key>,
}

/// What [`JobQueue::pop_within`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Took {
    /// One or more jobs.
    Jobs,
    /// None within the wait; the queue is still open.
    Nothing,
    /// The queue is closed and empty: no job will come.
    Closed,
}

/// What [`JobQueue::try_push`] did.
#[derive(Debug)]
pub enum Push {
    /// Queued; `dropped` waiting jobs (or the new one) were dropped by the policy (0 or 1).
    Done { dropped: u64 },
    /// Full and the policy blocks: wait for [`JobQueue::space`], then try again.
    Full(Job, Option<Key>),
    /// Full with `Overflow::Error`.
    Overflow,
}

pub struct JobQueue {
    state: Mutex<State>,
    ready: Condvar,
    space: Notify,
    capacity: usize,
    /// The read loop, once the queue was full, is woken when this many slots are free again,
    /// not for every single one (which would make it and the workers take turns per job).
    low_water: usize,
    /// How many workers share the queue: [`JobQueue::pop_many`] takes a fair share of it.
    consumers: usize,
    overflow: Overflow,
    per_key: bool,
    /// Rung after each push and at the close, for a consumer that takes jobs itself and may
    /// wait outside [`JobQueue::pop_within`] (see [`crate::bell`]).
    bell: Option<Arc<Bell>>,
}

/// Pushes several jobs under one lock; the waiting workers are woken once, when it is dropped.
pub struct Pusher<'a> {
    queue: &'a JobQueue,
    st: MutexGuard<'a, State>,
    pushed: usize,
}

impl Pusher<'_> {
    /// Queues a job under the overflow policy, without waiting. `key` only matters when the
    /// queue is keyed (conflation or per-key order).
    pub fn try_push(&mut self, job: Job, key: Option<Key>) -> Push {
        let q = self.queue;
        let st = &mut *self.st;
        if q.overflow == Overflow::Conflate {
            if let Some(pending) = key
                .as_ref()
                .and_then(|k| st.groups.get_mut(k))
                .and_then(|g| g.front_mut())
            {
                // At most one job waits per key: the newest replaces it in place.
                *pending = job;
                return Push::Done { dropped: 1 };
            }
        }
        let mut dropped = 0;
        if st.len >= q.capacity {
            match q.overflow {
                Overflow::Block | Overflow::Conflate => return Push::Full(job, key),
                Overflow::DropNewest => return Push::Done { dropped: 1 },
                Overflow::Error => return Push::Overflow,
                Overflow::DropOldest => {
                    if !remove_oldest(st) {
                        // Every waiting job belongs to a key that is running: keep them.
                        return Push::Done { dropped: 1 };
                    }
                    dropped = 1;
                }
            }
        }
        q.insert(st, job, key);
        self.pushed += 1;
        Push::Done { dropped }
    }

    /// Queues a job even when the queue is full (by one at most per call): for a message that
    /// was read just before the stream was asked to stop, which must not be lost.
    pub fn force_push(&mut self, job: Job, key: Option<Key>) {
        self.queue.insert(&mut self.st, job, key);
        self.pushed += 1;
    }
}

impl Drop for Pusher<'_> {
    fn drop(&mut self) {
        if let Some(bell) = self.queue.bell.as_ref().filter(|_| self.pushed > 0) {
            bell.ring();
        }
        let wake = self.pushed.min(self.st.idle);
        if wake == 0 {
            return;
        }
        if wake == self.st.idle {
            self.queue.ready.notify_all();
        } else {
            (0..wake).for_each(|_| self.queue.ready.notify_one());
        }
    }
}

impl JobQueue {
    pub fn new(capacity: usize, overflow: Overflow, order: Order) -> Self {
        let capacity = capacity.max(1);
        JobQueue {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            space: Notify::new(),
            capacity,
            low_water: (capacity / 8).max(1),
            consumers: 1,
            overflow,
            per_key: order == Order::Key,
            bell: None,
        }
    }

    /// Rings `bell` after each push and at the close (for a consumer that takes the jobs
    /// itself).
    pub fn with_bell(mut self, bell: Arc<Bell>) -> Self {
        self.bell = Some(bell);
        self
    }

    /// Says how many workers take jobs (for the share [`JobQueue::pop_many`] takes).
    pub fn with_consumers(mut self, consumers: usize) -> Self {
        self.consumers = consumers.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting (not yet taken by a worker).
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts pushing one or more jobs under one lock.
    pub fn pusher(&self) -> Pusher<'_> {
        Pusher {
            queue: self,
            st: self.lock(),
            pushed: 0,
        }
    }

    /// Queues one job under the overflow policy, without waiting (see [`Pusher::try_push`]).
    pub fn try_push(&self, job: Job, key: Option<Key>) -> Push {
        self.pusher().try_push(job, key)
    }

    /// Queues one job even when the queue is full (see [`Pusher::force_push`]).
    pub fn force_push(&self, job: Job, key: Option<Key>) {
        self.pusher().force_push(job, key);
    }

    fn insert(&self, st: &mut State, job: Job, key: Option<Key>) {
        st.len += 1;
        match key {
            Some(k) if self.overflow == Overflow::Conflate || self.per_key => {
                let group = st.groups.entry(k.clone()).or_default();
                group.push_back(job);
                if group.len() == 1 && !st.busy.contains(&k) {
                    st.runnable.push_back(Entry::Key(k));
                }
            }
            _ => st.runnable.push_back(Entry::Job(job)),
        }
    }

    /// Resolves once the queue may have room again since the last call (a stored permit makes
    /// it resolve at once): the read loop waits on it while the queue is full. Workers signal
    /// it when at least an eighth of the queue is free, so a full queue is refilled in runs.
    pub async fn space(&self) {
        self.space.notified().await;
    }

    /// Takes the next runnable job, waiting for one. None once the queue is closed and empty.
    pub fn pop(&self) -> Option<Popped> {
        let mut one = Vec::with_capacity(1);
        self.pop_many(1, &mut one).then(|| one.pop()).flatten()
    }

    /// Takes up to `max` runnable jobs into `out` (at least one, waiting for it): this
    /// worker's share of what waits, so that a burst is spread over the workers while a flood
    /// costs one lock per batch. False once the queue is closed and empty.
    pub fn pop_many(&self, max: usize, out: &mut Vec<Popped>) -> bool {
        let mut st = self.lock();
        loop {
            let share = st.len.div_ceil(self.consumers).clamp(1, max.max(1));
            self.take_up_to(&mut st, share, usize::MAX, out);
            if !out.is_empty() {
                self.taken(st);
                return true;
            }
            if st.closed && st.len == 0 {
                return false;
            }
            // Closed but jobs wait behind running keys: `done` wakes us.
            st.idle += 1;
            st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.idle -= 1;
        }
    }

    /// Takes the next runnable job if there is one, without waiting: a worker going on from
    /// one job to the next without letting go of what its jobs need (the GIL).
    pub fn try_pop(&self) -> Option<Popped> {
        let mut st = self.lock();
        let mut one = Vec::with_capacity(1);
        self.take_up_to(&mut st, 1, usize::MAX, &mut one);
        let popped = one.pop()?;
        self.taken(st);
        Some(popped)
    }

    /// Takes up to `max` runnable jobs into `out` (at least one), stopping early once their
    /// payloads hold `max_bytes`; waits up to `wait` for the first. For an owner that takes the
    /// jobs itself, with no worker, and must be back within `wait` (to check for Ctrl-C).
    pub fn pop_within(
        &self,
        max: usize,
        max_bytes: usize,
        wait: Duration,
        out: &mut Vec<Popped>,
    ) -> Took {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            self.take_up_to(&mut st, max.max(1), max_bytes, out);
            if !out.is_empty() {
                self.taken(st);
                return Took::Jobs;
            }
            if st.closed && st.len == 0 {
                return Took::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Took::Nothing;
            }
            st.idle += 1;
            st = self
                .ready
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.idle -= 1;
        }
    }

    /// Moves up to `n` runnable jobs into `out`, fewer once their payloads hold `max_bytes`
    /// (one at least, whatever its size).
    fn take_up_to(&self, st: &mut State, n: usize, max_bytes: usize, out: &mut Vec<Popped>) {
        let mut bytes = 0usize;
        while out.len() < n && (out.is_empty() || bytes < max_bytes) {
            let Some(entry) = st.runnable.pop_front() else {
                break;
            };
            if let Some(popped) = self.take(st, entry) {
                bytes = bytes.saturating_add(popped.job.payload.len());
                out.push(popped);
            }
        }
    }

    /// After jobs were taken: lets the lock go and wakes the read loop if it waits for room.
    fn taken(&self, st: MutexGuard<'_, State>) {
        let wake_reader = st.len + self.low_water <= self.capacity;
        drop(st);
        if wake_reader {
            self.space.notify_one();
        }
    }

    fn take(&self, st: &mut State, entry: Entry) -> Option<Popped> {
        let (job, key) = match entry {
            Entry::Job(job) => (job, None),
            Entry::Key(k) => {
                let group = st.groups.get_mut(&k);
                let (job, rest) = match group {
                    Some(g) => (g.pop_front(), g.len()),
                    None => (None, 0),
                };
                // A key is runnable only while its FIFO has a job; skip it otherwise.
                let job = job?;
                if rest == 0 {
                    st.groups.remove(&k);
                }
                if self.per_key {
                    st.busy.insert(k.clone());
                    (job, Some(k))
                } else {
                    if rest > 0 {
                        st.runnable.push_back(Entry::Key(k));
                    }
                    (job, None)
                }
            }
        };
        st.len -= 1;
        let slot = st.next_slot;
        st.next_slot += 1;
        Some(Popped { job, slot, key })
    }

    /// With per-key order: the job of `key` has finished and its result is out; the next job
    /// of that key may run.
    pub fn done(&self, key: Key) {
        let mut st = self.lock();
        st.busy.remove(&key);
        if st.groups.contains_key(&key) {
            st.runnable.push_back(Entry::Key(key));
            if st.idle > 0 {
                drop(st);
                self.ready.notify_one();
            }
        } else if st.closed && st.len == 0 {
            drop(st);
            self.ready.notify_all();
        }
    }

    /// Removes every waiting job (not the running ones) and returns how many there were: when
    /// the owner gives up on a stream whose workers are stuck, so that those jobs are counted
    /// as cancelled rather than left in flight.
    pub fn discard_all(&self) -> u64 {
        let mut st = self.lock();
        let n = st.len as u64;
        st.runnable.clear();
        st.groups.clear();
        st.len = 0;
        drop(st);
        self.ready.notify_all();
        self.space.notify_one();
        n
    }

    /// No more jobs will come: workers end once the waiting ones are taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        if let Some(bell) = &self.bell {
            bell.ring();
        }
    }

    /// Jobs wait, or no more will come: a consumer taking jobs itself has something to do.
    pub fn has_jobs_or_closed(&self) -> bool {
        let st = self.lock();
        st.len > 0 || st.closed
    }
}

/// Drops the job that has waited longest among the runnable ones; false if none is.
fn remove_oldest(st: &mut State) -> bool {
    match st.runnable.front() {
        None => false,
        Some(Entry::Job(_)) => {
            st.runnable.pop_front();
            st.len -= 1;
            true
        }
        Some(Entry::Key(k)) => {
            let k = k.clone();
            let now_empty = st.groups.get_mut(&k).is_none_or(|g| {
                g.pop_front();
                g.is_empty()
            });
            if now_empty {
                st.groups.remove(&k);
                st.runnable.pop_front();
            }
            st.len -= 1;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Kind;
    use bytes::Bytes;

    fn job(id: u64) -> Job {
        Job {
            id,
            kind: Kind::Text,
            payload: Bytes::new(),
            received_at: 0.0,
            connection: 0,
        }
    }

    fn key(k: &str) -> Option<Key> {
        Some(k.into())
    }

    fn drain(q: &JobQueue) -> Vec<u64> {
        q.close();
        std::iter::from_fn(|| q.pop().map(|p| p.job.id)).collect()
    }

    fn push_all(q: &JobQueue, jobs: impl IntoIterator<Item = (u64, Option<Key>)>) -> u64 {
        let mut dropped = 0;
        for (id, k) in jobs {
            match q.try_push(job(id), k) {
                Push::Done { dropped: d } => dropped += d,
                other => panic!("job {id}: {other:?}"),
            }
        }
        dropped
    }

    #[test]
    fn try_pop_takes_a_ready_job_and_never_waits() {
        let q = JobQueue::new(4, Overflow::Block, Order::Key);
        assert!(q.try_pop().is_none());
        push_all(&q, [(0, key("a")), (1, key("a")), (2, key("b"))]);
        let first = q.try_pop().expect("a ready job");
        assert_eq!((first.job.id, first.slot), (0, 0));
        // Key "a" is busy until done: "b" is the only one ready.
        assert_eq!(q.try_pop().map(|p| (p.job.id, p.slot)), Some((2, 1)));
        assert!(q.try_pop().is_none());
        q.done("a".into());
        assert_eq!(q.try_pop().map(|p| p.job.id), Some(1));
        q.close();
        assert!(q.try_pop().is_none());
    }

    #[test]
    fn pop_within_stops_at_the_byte_budget_waits_at_most_its_time_and_sees_the_end() {
        let q = JobQueue::new(8, Overflow::Block, Order::Completion);
        let mut out = Vec::new();
        let started = Instant::now();
        assert_eq!(
            q.pop_within(4, usize::MAX, Duration::from_millis(30), &mut out),
            Took::Nothing
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
        for id in 0..7 {
            let mut j = job(id);
            j.payload = Bytes::from(vec![b'x'; 100]);
            assert!(matches!(q.try_push(j, None), Push::Done { dropped: 0 }));
        }
        // 250 bytes: the third job (300 in all) is the last one taken.
        assert_eq!(q.pop_within(8, 250, Duration::ZERO, &mut out), Took::Jobs);
        assert_eq!(out.iter().map(|p| p.job.id).collect::<Vec<_>>(), [0, 1, 2]);
        out.clear();
        // A budget below one job still takes one; so does none at all.
        assert_eq!(q.pop_within(8, 1, Duration::ZERO, &mut out), Took::Jobs);
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(q.pop_within(8, 0, Duration::ZERO, &mut out), Took::Jobs);
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(
            q.pop_within(1, usize::MAX, Duration::ZERO, &mut out),
            Took::Jobs
        );
        assert_eq!(out[0].job.id, 5);
        out.clear();
        assert_eq!(
            q.pop_within(8, usize::MAX, Duration::ZERO, &mut out),
            Took::Jobs
        );
        assert_eq!(out[0].job.id, 6);
        out.clear();
        // Closed while the owner waits: it is told at once, not after its wait.
        let started = Instant::now();
        let took = std::thread::scope(|s| {
            let taker = s.spawn(|| {
                let mut got = Vec::new();
                q.pop_within(8, usize::MAX, Duration::from_secs(10), &mut got)
            });
            std::thread::sleep(Duration::from_millis(20));
            q.close();
            taker.join().expect("no panic")
        });
        assert_eq!(took, Took::Closed);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn pop_within_is_woken_by_a_push() {
        let q = JobQueue::new(8, Overflow::Block, Order::Completion);
        let started = Instant::now();
        let got = std::thread::scope(|s| {
            let taker = s.spawn(|| {
                let mut got = Vec::new();
                let took = q.pop_within(8, usize::MAX, Duration::from_secs(10), &mut got);
                (took, got.iter().map(|p| p.job.id).collect::<Vec<_>>())
            });
            std::thread::sleep(Duration::from_millis(20));
            push_all(&q, [(7, None)]);
            taker.join().expect("no panic")
        });
        assert_eq!(got, (Took::Jobs, vec![7]));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn block_reports_full_and_keeps_the_job() {
        let q = JobQueue::new(2, Overflow::Block, Order::Completion);
        assert_eq!(push_all(&q, [(0, None), (1, None)]), 0);
        match q.try_push(job(2), None) {
            Push::Full(j, None) => assert_eq!(j.id, 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.pop().map(|p| (p.job.id, p.slot)), Some((0, 0)));
        assert_eq!(push_all(&q, [(2, None)]), 0);
        assert_eq!(drain(&q), vec![1, 2]);
    }

    #[test]
    fn drop_policies_count_exactly() {
        let q = JobQueue::new(3, Overflow::DropNewest, Order::Completion);
        assert_eq!(push_all(&q, (0..10).map(|i| (i, None))), 7);
        assert_eq!(drain(&q), vec![0, 1, 2]);

        let q = JobQueue::new(3, Overflow::DropOldest, Order::Completion);
        assert_eq!(push_all(&q, (0..10).map(|i| (i, None))), 7);
        assert_eq!(drain(&q), vec![7, 8, 9]);

        let q = JobQueue::new(1, Overflow::Error, Order::Completion);
        assert_eq!(push_all(&q, [(0, None)]), 0);
        assert!(matches!(q.try_push(job(1), None), Push::Overflow));
    }

    #[test]
    fn conflate_keeps_the_newest_per_key_in_first_arrival_order() {
        let q = JobQueue::new(2, Overflow::Conflate, Order::Completion);
        let dropped = push_all(
            &q,
            [(0, key("a")), (1, key("b")), (2, key("a")), (3, key("a"))],
        );
        assert_eq!(dropped, 2);
        // A third key does not fit; messages without the key are never conflated.
        assert!(matches!(q.try_push(job(4), key("c")), Push::Full(..)));
        assert_eq!(q.pop().map(|p| p.job.id), Some(3));
        assert_eq!(push_all(&q, [(5, None)]), 0);
        assert_eq!(drain(&q), vec![1, 5]);
    }

    #[test]
    fn per_key_order_runs_one_job_per_key_at_a_time() {
        let q = JobQueue::new(10, Overflow::Block, Order::Key);
        push_all(
            &q,
            [
                (0, key("a")),
                (1, key("a")),
                (2, key("b")),
                (3, None),
                (4, key("a")),
            ],
        );
        let first = q.pop().expect("a0");
        assert_eq!((first.job.id, first.key.as_deref()), (0, Some("a")));
        // "a" is busy: b, then the unkeyed job, then nothing runnable.
        assert_eq!(q.pop().map(|p| p.job.id), Some(2));
        assert_eq!(q.pop().map(|p| p.job.id), Some(3));
        assert_eq!(q.len(), 2);
        q.done(first.key.expect("key"));
        let next = q.pop().expect("a1");
        assert_eq!(next.job.id, 1);
        q.close();
        // Closed, but a2 waits behind a1: a worker waiting now is woken by done().
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| q.pop().map(|p| p.job.id));
            std::thread::sleep(std::time::Duration::from_millis(20));
            q.done(next.key.expect("key"));
            h.join().expect("waiter")
        });
        assert_eq!(waiter, Some(4));
        assert!(q.pop().is_none());
    }

    #[test]
    fn drop_oldest_spares_jobs_behind_a_running_key() {
        let q = JobQueue::new(2, Overflow::DropOldest, Order::Key);
        push_all(&q, [(0, key("a")), (1, key("a"))]);
        let running = q.pop().expect("a0");
        push_all(&q, [(2, key("a"))]);
        // Full (a1, a2), both behind the running a0: the new message is the one dropped.
        assert_eq!(push_all(&q, [(3, key("a"))]), 1);
        q.done(running.key.expect("key"));
        let mut ids = Vec::new();
        q.close();
        while let Some(p) = q.pop() {
            ids.push(p.job.id);
            if let Some(k) = p.key {
                q.done(k);
            }
        }
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn parses_overflow_names() {
        assert_eq!("drop_oldest".parse::<Overflow>(), Ok(Overflow::DropOldest));
        assert!("spill"
            .parse::<Overflow>()
            .unwrap_err()
            .contains("\"spill\""));
    }
}
