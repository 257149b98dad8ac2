//! One stream: a read-loop thread running its own single-threaded tokio runtime, N workers, and
//! the bounded queues between them. The owner (the Python layer, or a Rust caller) waits for the
//! connection, pulls result batches, and closes, cancels or joins. Every wait here takes a
//! timeout, so the Python layer can wait in slices and check for Ctrl-C in between.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::errors::Error;
use crate::job::{DecodeMode, Job};
use crate::pool::{self, Processor};
use crate::state::{Shared, StatsSnapshot};
use crate::ws::{self, Control, Outgoing, Reader};

/// How to open and run a stream.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// Sent in order right after the handshake.
    pub subscribe: Vec<Outgoing>,
    pub workers: usize,
    /// Capacity of the job queue and of the result queue (messages).
    pub queue_size: usize,
    pub decode: DecodeMode,
    /// Overall deadline, then a graceful close.
    pub timeout: Option<Duration>,
    pub open_timeout: Duration,
    pub close_timeout: Duration,
}

impl Config {
    pub fn new(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            headers: Vec::new(),
            subscribe: Vec::new(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            queue_size: 1024,
            decode: DecodeMode::Text,
            timeout: None,
            open_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
        }
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

/// A running stream. Dropping it cancels it; its threads then end on their own.
pub struct Stream<O> {
    shared: Arc<Shared>,
    control: watch::Sender<Control>,
    connected: flume::Receiver<Result<(), Error>>,
    /// Set once the handshake has succeeded, so later waits keep saying so.
    was_connected: std::sync::atomic::AtomicBool,
    results: Mutex<Option<flume::Receiver<O>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    workers: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<O: Send + 'static> Stream<O> {
    /// Checks the configuration, then starts the workers and the read-loop thread, which
    /// connects in the background: see [`Stream::wait_connected`].
    pub fn start<P: Processor<Output = O>>(config: Config, processor: P) -> Result<Self, Error> {
        let request = ws::prepare_request(&config.url, &config.headers)?;
        if config.workers == 0 || config.queue_size == 0 {
            return Err(Error::InvalidArgument(
                "workers and queue_size must be at least 1".into(),
            ));
        }
        let workers = config.workers;
        let shared = Arc::new(Shared::new());
        let (jobs_tx, jobs_rx) = flume::bounded::<Job>(config.queue_size);
        let (results_tx, results_rx) = flume::bounded::<O>(config.queue_size);
        let (control, control_rx) = watch::channel(Control::Run);
        let (connected_tx, connected) = flume::bounded(1);

        let mut threads = pool::spawn(
            config.workers,
            Arc::new(processor),
            config.decode,
            jobs_rx,
            results_tx,
            shared.clone(),
        )?;
        let io_shared = shared.clone();
        let guard = shared.thread_guard();
        let io = std::thread::Builder::new()
            .name(format!("{THREAD_PREFIX}io"))
            .spawn(move || {
                let _guard = guard;
                let shared = io_shared.clone();
                // A panic here must not leave the consumer believing the stream ended normally.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    io_main(
                        request,
                        config,
                        jobs_tx,
                        control_rx,
                        io_shared,
                        connected_tx,
                    )
                }));
                if let Err(payload) = ran {
                    let msg = crate::errors::panic_message(payload.as_ref());
                    shared.set_error(Error::Internal(format!("the I/O thread panicked: {msg}")));
                }
            });
        match io {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                // The workers see the job queue closed and end.
                return Err(Error::Internal(format!("cannot start the I/O thread: {e}")));
            }
        }
        Ok(Stream {
            shared,
            control,
            connected,
            was_connected: std::sync::atomic::AtomicBool::new(false),
            results: Mutex::new(Some(results_rx)),
            threads: Mutex::new(threads),
            workers,
        })
    }

    /// Waits up to `wait` for the handshake. `None`: still connecting. `Some(Ok)`: connected
    /// (and stays `Some(Ok)` on later calls). `Some(Err)`: the connection could not be opened.
    pub fn wait_connected(&self, wait: Duration) -> Option<Result<(), Error>> {
        use std::sync::atomic::Ordering::SeqCst;
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
        let max = max.max(1);
        let Some(rx) = lock(&self.results).clone() else {
            return self.end();
        };
        match rx.recv_timeout(wait) {
            Ok(first) => {
                let mut items = Vec::with_capacity(max.min(rx.len() + 1));
                items.push(first);
                items.extend(rx.try_iter().take(max.saturating_sub(1)));
                Batch::Items(items)
            }
            Err(flume::RecvTimeoutError::Timeout) => Batch::Pending,
            Err(flume::RecvTimeoutError::Disconnected) => self.end(),
        }
    }

    fn end(&self) -> Batch<O> {
        self.shared.mark_ended();
        Batch::End(self.shared.error())
    }

    /// Graceful close: stop reading, send a close frame; queued and running jobs still finish
    /// and their results stay available through `next_batch`. Returns at once.
    pub fn close(&self) {
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
        self.shared.set_cancelled();
        self.control.send_replace(Control::Cancel);
        lock(&self.results).take();
        self.shared.mark_ended();
    }

    /// Waits up to `wait` for every thread of the stream to end; true when they all have.
    pub fn join(&self, wait: Duration) -> bool {
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
        self.shared.snapshot()
    }

    pub fn workers(&self) -> usize {
        self.workers
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

impl<O> Drop for Stream<O> {
    fn drop(&mut self) {
        self.shared.set_cancelled();
        self.control.send_replace(Control::Cancel);
    }
}

/// Body of the I/O thread: one single-threaded runtime for this stream's connection.
fn io_main(
    request: ws::Request,
    config: Config,
    jobs: flume::Sender<Job>,
    control: watch::Receiver<Control>,
    shared: Arc<Shared>,
    connected: flume::Sender<Result<(), Error>>,
) {
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
    let reader = Reader {
        jobs,
        control,
        shared,
        deadline,
        close_timeout: config.close_timeout,
        connection: 0,
        next_id: 0,
    };
    runtime.block_on(open_and_read(request, config, reader, connected));
}

async fn open_and_read(
    request: ws::Request,
    config: Config,
    mut reader: Reader,
    connected: flume::Sender<Result<(), Error>>,
) {
    let opened = tokio::select! {
        biased;
        _ = wait_while_running(&mut reader.control) => return,
        opened = open(request, &config) => opened,
    };
    match opened {
        Ok(ws) => {
            let _ = connected.send(Ok(()));
            drop(connected);
            reader.run(ws).await;
        }
        Err(e) => {
            reader.shared.set_error(e.clone());
            let _ = connected.send(Err(e));
        }
    }
}

async fn open(request: ws::Request, config: &Config) -> Result<ws::WsStream, Error> {
    // The overall deadline bounds the opening too.
    let open_timeout = match config.timeout {
        Some(t) => t.min(config.open_timeout),
        None => config.open_timeout,
    };
    let mut ws = ws::connect(request, open_timeout).await?;
    ws::subscribe(&mut ws, &config.subscribe).await?;
    Ok(ws)
}

async fn wait_while_running(control: &mut watch::Receiver<Control>) {
    while *control.borrow_and_update() == Control::Run {
        if control.changed().await.is_err() {
            return;
        }
    }
}
