//! Helpers for the integration tests: a one-connection server on its own tokio runtime and
//! thread, a recording `Processor`, and bounded waits on the client side. Every wait here has a
//! limit, so a broken stream fails a test instead of hanging it.
// Each test crate uses some of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wspool::{Batch, Config, Data, DecodeError, DecodeMode, Error, Job, Kind, Processor, Stream};

pub type ServerWs = WebSocketStream<TcpStream>;

/// No server task lives longer than this, whatever the client does.
pub const SERVER_LIMIT: Duration = Duration::from_secs(10);

/// A server that accepts one TCP connection on 127.0.0.1 and runs a handler on it, on a
/// current-thread runtime in a thread of its own.
pub struct Server<T> {
    pub port: u16,
    thread: JoinHandle<Option<T>>,
}

impl<T> Server<T> {
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// What the handler returned. Bounded: the handler is cut off after `SERVER_LIMIT`.
    pub fn finish(self) -> T {
        self.thread
            .join()
            .expect("the server thread panicked")
            .expect("the server did not finish within SERVER_LIMIT")
    }
}

/// Runs `handler` on the first TCP connection accepted.
pub fn serve_tcp<F, Fut, T>(handler: F) -> Server<T>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    serve_listener(move |listener| async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        handler(tcp).await
    })
}

/// Accepts `n` WebSocket connections in turn on one port and runs `handler(index, ws)` on
/// each (the next is accepted once the handler returns); returns what the handlers returned.
pub fn serve_ws_many<F, Fut, T>(n: usize, handler: F) -> Server<Vec<T>>
where
    F: Fn(usize, ServerWs) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    serve_listener(move |listener| async move {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (tcp, _) = listener.accept().await.expect("accept");
            let ws = tokio_tungstenite::accept_async(tcp)
                .await
                .expect("server side of the handshake");
            out.push(handler(i, ws).await);
        }
        out
    })
}

/// Runs `handler` with a listener on 127.0.0.1, on a current-thread runtime in a thread of
/// its own, for at most `SERVER_LIMIT`.
pub fn serve_listener<F, Fut, T>(handler: F) -> Server<T>
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("test-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let port = listener.local_addr().expect("local address").port();
                port_tx.send(port).expect("send the port");
                tokio::time::timeout(SERVER_LIMIT, handler(listener))
                    .await
                    .ok()
            })
        })
        .expect("spawn the server thread");
    let port = port_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the server did not start");
    Server { port, thread }
}

/// Runs `handler` on the first WebSocket connection (server side of the handshake done).
pub fn serve_ws<F, Fut, T>(handler: F) -> Server<T>
where
    F: FnOnce(ServerWs) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    serve_tcp(move |tcp| async move {
        let ws = tokio_tungstenite::accept_async(tcp)
            .await
            .expect("server side of the handshake");
        handler(ws).await
    })
}

/// The text payload of message `seq`.
pub fn text_payload(seq: u64) -> String {
    format!("{{\"seq\":{seq},\"text\":\"m{seq}\"}}")
}

/// Sends `text_payload(seq)` for each seq, flushing every 256 messages and at the end.
pub async fn send_texts(ws: &mut ServerWs, seqs: Range<u64>) -> Result<(), WsError> {
    for seq in seqs {
        ws.feed(Message::text(text_payload(seq))).await?;
        if seq % 256 == 255 {
            ws.flush().await?;
        }
    }
    ws.flush().await
}

/// Reads and discards what the client still sends until it goes away (bounded), so close
/// replies go out and the TCP connection ends in order. Returns the code of any close frame.
pub async fn drain(ws: &mut ServerWs) -> Option<u16> {
    let mut code = None;
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                code = Some(frame.map_or(1005, |f| u16::from(f.code)));
            }
        }
    })
    .await;
    code
}

/// Sends a close frame with `code` and `reason`, then drains; returns the client's reply code.
pub async fn close_with(ws: &mut ServerWs, code: u16, reason: &str) -> Option<u16> {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    ws.close(Some(frame)).await.expect("send the close frame");
    drain(ws).await
}

/// What a never-ending server saw.
#[derive(Debug, Default)]
pub struct Saw {
    /// Data messages sent.
    pub sent: u64,
    /// The code of the client's close frame, if one arrived.
    pub close: Option<u16>,
    /// Why sending or reading failed, if it did.
    pub error: Option<String>,
}

/// Sends `burst` messages every `every` until the client closes or goes away.
pub async fn stream_until_closed(mut ws: ServerWs, burst: u64, every: Duration) -> Saw {
    let mut saw = Saw::default();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(frame))) => {
                    saw.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    saw.error = Some(e.to_string());
                    return saw;
                }
                None => return saw,
            },
            _ = tick.tick() => {
                for _ in 0..burst {
                    if let Err(e) = ws.feed(Message::text(text_payload(saw.sent))).await {
                        saw.error = Some(e.to_string());
                        return saw;
                    }
                    saw.sent += 1;
                }
                if let Err(e) = ws.flush().await {
                    saw.error = Some(e.to_string());
                    return saw;
                }
            }
        }
    }
    // Let our close reply go out, then wait for the client to go.
    drain(&mut ws).await;
    saw
}

/// A config with short waits for tests.
pub fn config(url: &str, decode: DecodeMode, workers: usize, queue_size: usize) -> Config {
    let mut config = Config::new(url);
    config.decode = decode;
    config.workers = workers;
    config.queue_size = queue_size;
    config.open_timeout = Duration::from_secs(3);
    config.close_timeout = Duration::from_secs(2);
    config
}

/// One result of [`Recorder`].
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub id: u64,
    pub kind: Kind,
    pub connection: u32,
    /// The decoded payload, or the decode error (or panic) message.
    pub data: Result<Data, String>,
}

/// Returns each job with its decoded payload; success is `decoded.is_ok()`. Sleeps
/// `delay_us` microseconds per job first (adjustable while the stream runs), and panics on the
/// payload `panic`.
#[derive(Clone, Default)]
pub struct Recorder {
    pub delay_us: Arc<AtomicU64>,
}

impl Recorder {
    pub fn sleeping(delay: Duration) -> Self {
        let recorder = Recorder::default();
        recorder.set_delay(delay);
        recorder
    }

    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delay_us.store(us, Relaxed);
    }
}

impl Processor for Recorder {
    type Output = Out;

    fn process(&self, job: Job, decoded: Result<Data, DecodeError>) -> (Out, bool) {
        let us = self.delay_us.load(Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
        if job.payload.as_ref() == b"panic" {
            panic!("deliberate panic from the test processor (job {})", job.id);
        }
        let data = decoded.map_err(|e| e.message);
        let ok = data.is_ok();
        let out = Out {
            id: job.id,
            kind: job.kind,
            connection: job.connection,
            data,
        };
        (out, ok)
    }

    fn panicked(&self, job: Job, error: Error) -> Out {
        Out {
            id: job.id,
            kind: job.kind,
            connection: job.connection,
            data: Err(error.to_string()),
        }
    }
}

/// Waits (bounded) for the handshake and panics unless it succeeded.
pub fn connected<O: Send + 'static>(stream: &Stream<O>) {
    match stream.wait_connected(Duration::from_secs(5)) {
        Some(Ok(())) => {}
        other => panic!("expected a connection, got {other:?}"),
    }
}

/// Waits (bounded) for the handshake and returns its error; panics if it succeeded.
pub fn connect_error<O: Send + 'static>(stream: &Stream<O>) -> Error {
    match stream.wait_connected(Duration::from_secs(5)) {
        Some(Err(e)) => e,
        other => panic!("expected a connection error, got {other:?}"),
    }
}

/// Pulls results until the end of the stream; panics after `limit`.
pub fn collect<O: Send + 'static>(stream: &Stream<O>, limit: Duration) -> (Vec<O>, Option<Error>) {
    let mut out = Vec::new();
    let end = pull_until(stream, &mut out, limit, |_| false);
    (
        out,
        end.expect("pull_until ends only at the end of the stream here"),
    )
}

/// Pulls results into `out` until `stop(out)` holds (returns `None`) or the stream ends
/// (returns `Some(error)`); panics after `limit`.
pub fn pull_until<O: Send + 'static>(
    stream: &Stream<O>,
    out: &mut Vec<O>,
    limit: Duration,
    stop: impl Fn(&[O]) -> bool,
) -> Option<Option<Error>> {
    let deadline = Instant::now() + limit;
    loop {
        if stop(out) {
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not end within {limit:?} ({} results so far, stats {:?})",
            out.len(),
            stream.stats()
        );
        match stream.next_batch(512, Duration::from_millis(50)) {
            Batch::Items(items) => out.extend(items),
            Batch::Pending => {}
            Batch::End(e) => return Some(e),
        }
    }
}

/// Joins the stream's threads (bounded) and checks none is left.
pub fn joined<O: Send + 'static>(stream: &Stream<O>) {
    assert!(
        stream.join(Duration::from_secs(3)),
        "threads still running: {:?}",
        stream.stats()
    );
    assert_eq!(stream.stats().threads, 0);
}
