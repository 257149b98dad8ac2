//! The WebSocket side: URL checks, connect + handshake (rustls for wss://), and the read loop
//! that turns every data message into a [`Job`] on the bounded job queue. No PyO3 here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::errors::Error;
use crate::frames::{Event, FrameError, FrameReader, Tap};
use crate::job::{extract_key, Job};
use crate::queue::{JobQueue, Key, Push};
use crate::state::{unix_now, Shared};

pub use tokio_tungstenite::tungstenite::handshake::client::Request;

/// tungstenite does the handshake and sends; [`FrameReader`] reads (see `frames`).
pub type WsStream = WebSocketStream<Tap<MaybeTlsStream<TcpStream>>>;

/// What the owner of a stream asks of its read loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    /// Stop reading, send a close frame, let queued jobs finish.
    Close,
    /// Stop reading, send a close frame, drop queued jobs.
    Cancel,
}

/// A message sent to the server (subscriptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
}

impl Outgoing {
    fn into_message(self) -> Message {
        match self {
            Outgoing::Text(t) => Message::text(t),
            Outgoing::Binary(b) => Message::binary(b),
        }
    }
}

/// No connection is open for replies.
const NO_CONNECTION: u64 = u64::MAX;

/// Replies (`reply=True`): messages the processing side sends back on the connection a job came
/// from. A bounded channel from the workers to the read loop, which sends them while it reads.
/// A reply whose connection has ended (closed, dropped, replaced by a reconnect) is dropped and
/// counted, never sent on another connection.
#[derive(Clone)]
pub struct Replies {
    tx: flume::Sender<(u32, Outgoing)>,
    rx: flume::Receiver<(u32, Outgoing)>,
    state: Arc<ReplyState>,
}

struct ReplyState {
    /// The connection whose read loop is taking replies, or NO_CONNECTION.
    current: std::sync::atomic::AtomicU64,
    sent: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Replies(sent={}, dropped={})",
            self.sent(),
            self.dropped()
        )
    }
}

impl Replies {
    /// At most `capacity` replies wait for the read loop; more block the worker sending them.
    pub fn new(capacity: usize) -> Self {
        use std::sync::atomic::AtomicU64;
        let (tx, rx) = flume::bounded(capacity.max(1));
        Replies {
            tx,
            rx,
            state: Arc::new(ReplyState {
                current: AtomicU64::new(NO_CONNECTION),
                sent: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Queues a reply for `connection` (blocks while the channel is full, as long as that
    /// connection is open). False when it was dropped because the connection has ended.
    /// Call it without the GIL: it may wait for the socket.
    pub fn send(&self, connection: u32, message: Outgoing) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let mut item = (connection, message);
        while self.state.current.load(SeqCst) == u64::from(connection) {
            match self.tx.send_timeout(item, Duration::from_millis(50)) {
                Ok(()) => return true,
                Err(flume::SendTimeoutError::Timeout(back)) => item = back,
                Err(flume::SendTimeoutError::Disconnected(_)) => break,
            }
        }
        self.state.dropped.fetch_add(1, SeqCst);
        false
    }

    /// Replies written to a socket.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replies dropped because their connection had ended.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connection `connection` takes replies from now on; those still waiting for an older one
    /// are dropped.
    fn open(&self, connection: u32) {
        self.state
            .current
            .store(u64::from(connection), std::sync::atomic::Ordering::SeqCst);
        self.discard_stale(connection);
    }

    /// No connection takes replies: waiting ones are dropped, new ones are refused.
    fn close(&self) {
        self.state
            .current
            .store(NO_CONNECTION, std::sync::atomic::Ordering::SeqCst);
        self.discard_stale(u32::MAX);
    }

    fn discard_stale(&self, connection: u32) {
        let stale = self.rx.drain().filter(|(c, _)| *c != connection).count();
        self.state
            .dropped
            .fetch_add(stale as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Checks a URL and extra headers and builds the handshake request, before any thread starts.
pub fn prepare_request(url: &str, headers: &[(String, String)]) -> Result<Request, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "ws" | "wss") {
        return Err(invalid(format!(
            "the scheme must be ws or wss, not {:?}",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    let mut request = parsed
        .as_str()
        .into_client_request()
        .map_err(|e| invalid(e.to_string()))?;
    for (name, value) in headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Error::InvalidArgument(format!("invalid header name {name:?}: {e}")))?;
        let value = HeaderValue::from_str(value).map_err(|e| {
            Error::InvalidArgument(format!("invalid value for header {name:?}: {e}"))
        })?;
        request.headers_mut().append(header, value);
    }
    Ok(request)
}

/// A URL as errors show it (normalised, without credentials).
pub fn display_url(url: &str) -> String {
    prepare_request(url, &[]).map_or_else(|_| url.to_string(), |r| redacted(r.uri()))
}

/// The URL as errors show it: without `user:password@`.
fn redacted(uri: &tokio_tungstenite::tungstenite::http::Uri) -> String {
    let text = uri.to_string();
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => {
            let host = a.as_str().rsplit('@').next().unwrap_or_default();
            text.replacen(a.as_str(), host, 1)
        }
        _ => text,
    }
}

/// The TLS settings of `wss://` connections: the root certificates to trust.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// A PEM bundle of CA certificates trusted instead of the built-in web roots (webpki-roots),
    /// e.g. a private CA or a self-signed server certificate.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Builds the rustls client configuration; an unreadable or empty CA bundle is an
/// `InvalidArgument`, reported before any thread starts.
pub fn tls_config(options: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let bad = |why: String| {
                Error::InvalidArgument(format!("ca={:?}: {why}", path.display().to_string()))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("cannot read a PEM file: {e}")))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not a PEM certificate bundle: {e}")))?;
            if certs.is_empty() {
                return Err(bad("no certificate in the file".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("unusable CA certificate: {e}")))?;
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects and completes the opening handshake within `open_timeout`: TCP, then TLS for
/// `wss://` (with `tls`), then the HTTP upgrade, each failure named as such. Frames and
/// messages larger than `max_message_size` are refused from their header, before they are read.
pub async fn connect(
    request: Request,
    open_timeout: Duration,
    max_message_size: usize,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<WsStream, Error> {
    let url = redacted(request.uri());
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size));
    let attempt = async {
        let wss = request.uri().scheme_str() == Some("wss");
        let host = request.uri().host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if wss { 443 } else { 80 });
        let failed = |cause: String| Error::Connect {
            url: url.clone(),
            cause,
        };
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| failed(e.to_string()))?;
        // Small messages (replies, pongs) go out at once.
        let _ = tcp.set_nodelay(true);
        let stream = if wss {
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| failed(format!("TLS: invalid server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| failed(tls_cause(&e)))?;
            MaybeTlsStream::Rustls(tls)
        } else {
            MaybeTlsStream::Plain(tcp)
        };
        tokio_tungstenite::client_async_with_config(request, Tap::new(stream), Some(config))
            .await
            .map_err(|e| connect_error(&url, e, wss))
    };
    match tokio::time::timeout(open_timeout, attempt).await {
        Err(_) => Err(Error::Timeout {
            url,
            after: open_timeout,
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok((ws, _response))) => Ok(ws),
    }
}

/// Why the TLS handshake failed, as rustls says it ("invalid peer certificate: UnknownIssuer"),
/// with a hint when the server does not seem to speak TLS at all.
fn tls_cause(e: &std::io::Error) -> String {
    let text = e.to_string();
    let plain = text.contains("corrupt message")
        || text.contains("InvalidContentType")
        || e.kind() == std::io::ErrorKind::UnexpectedEof
        || e.kind() == std::io::ErrorKind::ConnectionReset;
    if plain {
        format!("TLS handshake failed: {text} (does the server speak TLS? for a plain server use ws://)")
    } else {
        format!("TLS handshake failed: {text}")
    }
}

fn connect_error(url: &str, e: WsError, wss: bool) -> Error {
    let url = url.to_string();
    // A TLS server answers a plain HTTP request with a TLS alert (not HTTP) or by hanging up.
    let hint = if wss {
        ""
    } else {
        " (is it a TLS server? then use wss://)"
    };
    match e {
        WsError::Http(response) => Error::Handshake {
            url,
            status: response.status().as_u16(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned())
                .unwrap_or_default(),
        },
        WsError::Io(io) => Error::Connect {
            url,
            cause: format!("the handshake failed: {io}{hint}"),
        },
        WsError::Tls(tls) => Error::Connect {
            url,
            cause: format!("TLS: {tls}"),
        },
        WsError::Url(u) => Error::InvalidUrl {
            url,
            reason: u.to_string(),
        },
        WsError::HttpFormat(_)
        | WsError::Protocol(ProtocolError::HandshakeIncomplete)
        | WsError::Protocol(ProtocolError::HttparseError(_)) => Error::Connect {
            url,
            cause: format!("the server's answer to the handshake is not HTTP: {e}{hint}"),
        },
        other => Error::Connect {
            url,
            cause: format!("handshake failed: {other}"),
        },
    }
}

/// Sends the subscription messages, in order, right after the handshake.
pub async fn subscribe(ws: &mut WsStream, messages: &[Outgoing]) -> Result<(), Error> {
    for m in messages {
        ws.feed(m.clone().into_message())
            .await
            .map_err(send_error)?;
    }
    ws.flush().await.map_err(send_error)
}

/// Maps an error of the protocol layer, met while the connection is open. tungstenite only
/// sends (the frame reader reads and checks what the server sends, see `frames`), so these are
/// errors of sending: a dropped connection, a socket error, or a message over the limit.
fn send_error(e: WsError) -> Error {
    match e {
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed => dropped("the connection was dropped without a close frame"),
        WsError::Io(io) => lost(&io),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            Error::MessageTooBig {
                size,
                limit: max_size,
            }
        }
        other => Error::Protocol(other.to_string()),
    }
}

fn ended() -> Error {
    dropped("the connection ended without a close frame")
}

fn dropped(reason: &str) -> Error {
    Error::Closed {
        code: 1006,
        reason: reason.to_string(),
    }
}

/// How long a cancel keeps reading (and discarding) after its close frame, so that the server
/// gets the frame rather than a reset; short, because Ctrl-C waits for it.
const CANCEL_LINGER: Duration = Duration::from_millis(100);

/// Why reading stopped.
enum Stop {
    Asked(Control),
    Deadline,
    /// The server's close frame: its code and reason, if any.
    ServerClosed(Option<(u16, String)>),
    Failed(Error),
    /// The server broke the protocol: fail the connection with this close code.
    Violated(u16, Error),
}

/// Why reading stopped on a frame the server should not have sent.
fn frame_failed(e: FrameError) -> Stop {
    match e {
        FrameError::Violation(code, what) => {
            Stop::Violated(code, Error::Protocol(format!("{what}; closed with {code}")))
        }
        FrameError::TooBig { size, limit } => Stop::Failed(Error::MessageTooBig { size, limit }),
    }
}

/// A failed read or write on the socket.
fn lost(e: &std::io::Error) -> Error {
    dropped(&format!("the connection was lost: {e}"))
}

/// How a connection ended, for the loop that may reconnect.
#[derive(Debug)]
pub enum Ended {
    /// Asked to stop, the deadline, or a normal close by the server: the stream is over.
    Finished,
    /// A drop, an abnormal close or an error; the connection is gone.
    Failed(Error),
}

/// Keepalive: a ping after `interval` of silence, and the connection declared dead when
/// `timeout` more passes without any frame. Only time spent waiting on the socket counts, so a
/// consumer that stops reading on purpose (backpressure) never blames the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heartbeat {
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
}

/// Most messages the read loop takes from the socket's buffer before queueing them together
/// (never more than the queue holds, so reading still stops at the same bound).
const READ_BATCH: usize = 64;

/// The read loop. One per stream: it serves each connection in turn, so job ids keep
/// increasing across reconnects.
pub struct Reader {
    pub queue: Arc<JobQueue>,
    /// The JSON field whose value keys each message (conflation, per-key order).
    pub key: Option<String>,
    pub control: watch::Receiver<Control>,
    pub shared: Arc<Shared>,
    pub deadline: Option<tokio::time::Instant>,
    pub close_timeout: Duration,
    pub heartbeat: Heartbeat,
    pub connection: u32,
    pub next_id: u64,
    /// With `reply=True`: what the workers send back.
    pub replies: Option<Replies>,
    /// With a journal: its writer takes each job and queues it once written.
    pub journal: Option<crate::journal::Inserts>,
    /// The largest message accepted (bytes, fragments together).
    pub max_message_size: usize,
}

/// At most this many waiting replies are written before one flush.
const REPLY_BATCH: usize = 64;

/// Resolves with what the owner asks once it is no longer `Run` (Cancel if the owner is gone).
async fn asked(control: &mut watch::Receiver<Control>) -> Control {
    loop {
        if control.changed().await.is_err() {
            return Control::Cancel;
        }
        let asked = *control.borrow_and_update();
        if asked != Control::Run {
            return asked;
        }
    }
}

/// Resolves with the next reply; never without replies.
async fn next_reply(replies: Option<&Replies>) -> Option<(u32, Outgoing)> {
    match replies {
        Some(r) => r.rx.recv_async().await.ok(),
        None => std::future::pending().await,
    }
}

impl Reader {
    /// Reads one connection until asked to stop, the deadline, a close frame or an error, then
    /// closes it as the cause requires. Every message read has been queued when this returns.
    pub async fn run(&mut self, mut ws: WsStream) -> Ended {
        if let Some(r) = &self.replies {
            r.open(self.connection);
        }
        let mut frames = FrameReader::new(self.max_message_size);
        let stop = self.read(&mut ws, &mut frames).await;
        if matches!(stop, Stop::Violated(..)) {
            // The messages before the violation are processed anyway: their replies go out
            // before the connection is failed, so a peer sees every answer it was owed.
            self.flush_owed_replies(&mut ws).await;
        }
        if let Some(r) = &self.replies {
            r.close();
        }
        let close_timeout = self.close_timeout;
        match stop {
            Stop::Asked(Control::Close) | Stop::Asked(Control::Run) | Stop::Deadline => {
                close(&mut ws, CloseCode::Normal, close_timeout, Some(&mut frames)).await;
                Ended::Finished
            }
            Stop::Asked(Control::Cancel) => {
                // 1001 when the consumer is going away (Ctrl-C, exit, dropped unclosed).
                let code = if self.shared.going_away() {
                    CloseCode::Away
                } else {
                    CloseCode::Normal
                };
                close(&mut ws, code, close_timeout, None).await;
                // Closing the socket with unread data in it sends a reset, which can make the
                // server lose our close frame (it does under a flood): read what is still
                // coming, raw and discarded, for a short while or until the server closes.
                discard_until_closed(&mut ws, close_timeout.min(CANCEL_LINGER)).await;
                Ended::Finished
            }
            Stop::ServerClosed(frame) => {
                // Our half of the closing handshake: the server's code echoed (RFC 6455 5.5.1).
                let reply = frame.as_ref().map(|&(code, _)| CloseFrame {
                    code: CloseCode::from(code),
                    reason: "".into(),
                });
                let _ = tokio::time::timeout(close_timeout, ws.close(reply)).await;
                let (code, reason) = frame.unwrap_or((1005, String::new()));
                // 1000 is a normal close; 1005 means the server sent a close frame with no code.
                if code == 1000 || code == 1005 {
                    Ended::Finished
                } else {
                    Ended::Failed(Error::Closed { code, reason })
                }
            }
            Stop::Failed(e) => {
                // Tell the server why, when the connection can still carry a close frame.
                match e {
                    Error::Overflow { .. } => {
                        close(&mut ws, CloseCode::Policy, close_timeout, Some(&mut frames)).await;
                    }
                    Error::MessageTooBig { .. } => {
                        // The protocol layer would now read the refused message whole: read
                        // the rest raw, in small pieces, until the server closes (bounded),
                        // so it gets our close frame rather than a reset.
                        close(&mut ws, CloseCode::Size, close_timeout, None).await;
                        discard_until_closed(&mut ws, close_timeout).await;
                    }
                    _ => {}
                }
                Ended::Failed(e)
            }
            Stop::Violated(code, e) => {
                // Fail the connection (RFC 6455 7.1.7): our close frame with the code, then a
                // bounded wait for the server to hang up. The protocol layer cannot read past
                // the bad frame, so what follows is discarded raw.
                close(&mut ws, CloseCode::from(code), close_timeout, None).await;
                discard_until_closed(&mut ws, close_timeout).await;
                Ended::Failed(e)
            }
        }
    }

    async fn read(&mut self, ws: &mut WsStream, frames: &mut FrameReader) -> Stop {
        let mut batch = Vec::with_capacity(READ_BATCH);
        let stop = self.read_into(ws, frames, &mut batch).await;
        // Whatever ended the reading, every message read is queued.
        match self.enqueue_all(ws, &mut batch).await {
            Ok(()) => stop,
            Err(queue_stop) => queue_stop,
        }
    }

    /// The read loop proper. Messages already buffered are read in a run and queued together
    /// (one lock, one wake-up) when the socket has nothing more at once or `READ_BATCH` are
    /// waiting; the caller queues what is left in `batch` when this returns.
    async fn read_into(
        &mut self,
        ws: &mut WsStream,
        frames: &mut FrameReader,
        batch: &mut Vec<(Job, Option<Key>)>,
    ) -> Stop {
        let Heartbeat { interval, timeout } = self.heartbeat;
        // Time spent waiting on the socket since the last frame, and its value when our ping
        // went out.
        let mut idle = Duration::ZERO;
        let mut pinged_at: Option<Duration> = None;
        let mut stamp: Option<f64> = None;
        loop {
            // Once per run of messages: the stop request, the deadline and the receipt time
            // (the messages of one run came out of the socket together).
            if batch.is_empty() {
                let asked = *self.control.borrow_and_update();
                if asked != Control::Run {
                    return Stop::Asked(asked);
                }
                if self
                    .deadline
                    .is_some_and(|d| tokio::time::Instant::now() >= d)
                {
                    return Stop::Deadline;
                }
                stamp = None;
            }
            if let Err(stop) = self.send_replies(ws, None).await {
                return stop;
            }
            let wake = match pinged_at {
                None => interval,
                Some(at) => timeout.map(|t| at + t),
            };
            // A frame already read is taken without arming any timer, and so is what the
            // socket has ready (the busy path).
            let next = match frames.next_event() {
                Err(e) => return frame_failed(e),
                Ok(Some(event)) => event,
                Ok(None) => {
                    match frames.fill(ws.get_mut()).now_or_never() {
                        Some(Ok(0)) => return Stop::Failed(ended()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Stop::Failed(lost(&e)),
                        None if !batch.is_empty() => {
                            // Nothing more at once: hand the run to the workers before waiting.
                            if let Err(stop) = self.enqueue_all(ws, batch).await {
                                return stop;
                            }
                            continue;
                        }
                        None => {}
                    }
                    let waiting = tokio::time::Instant::now();
                    tokio::select! {
                        biased;
                        changed = self.control.changed() => {
                            if changed.is_err() {
                                return Stop::Asked(Control::Cancel);
                            }
                        }
                        _ = sleep_until(self.deadline) => return Stop::Deadline,
                        Some(reply) = next_reply(self.replies.as_ref()) => {
                            idle += waiting.elapsed();
                            if let Err(stop) = self.send_replies(ws, Some(reply)).await {
                                return stop;
                            }
                            continue;
                        }
                        _ = sleep_for(wake.map(|w| w.saturating_sub(idle))) => {
                            idle += waiting.elapsed();
                            if pinged_at.is_some() {
                                return Stop::Failed(no_pong(timeout));
                            }
                            let ping = ws.send(Message::Ping(Bytes::new()));
                            match tokio::time::timeout(timeout.unwrap_or(self.close_timeout), ping).await {
                                Ok(Ok(())) => pinged_at = Some(idle),
                                Ok(Err(e)) => return Stop::Failed(send_error(e)),
                                Err(_) => return Stop::Failed(no_pong(timeout)),
                            }
                            continue;
                        }
                        read = frames.fill(ws.get_mut()) => match read {
                            Ok(0) => return Stop::Failed(ended()),
                            Ok(_) => {
                                // Bytes show the server is alive.
                                idle = Duration::ZERO;
                                pinged_at = None;
                                continue;
                            }
                            Err(e) => return Stop::Failed(lost(&e)),
                        },
                    }
                    idle += waiting.elapsed();
                    continue;
                }
            };
            // Any frame shows the server is alive.
            idle = Duration::ZERO;
            pinged_at = None;
            let (kind, payload) = match next {
                Event::Message(kind, payload) => (kind, payload),
                Event::Close(frame) => return Stop::ServerClosed(frame),
                Event::Ping(payload) => {
                    // Answered at once, as the RFC asks; a server that does not read them
                    // stalls us only up to close_timeout.
                    let pong = ws.send(Message::Pong(payload));
                    match tokio::time::timeout(self.close_timeout, pong).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return Stop::Failed(send_error(e)),
                        Err(_) => {
                            return Stop::Failed(dropped(
                                "a pong could not be sent within close_timeout: the server \
                                 does not read",
                            ))
                        }
                    }
                }
                Event::Pong => continue,
            };
            let key = match &self.key {
                Some(field) => extract_key(&payload, field),
                None => None,
            };
            let job = Job {
                id: self.next_id,
                kind,
                payload,
                received_at: *stamp.get_or_insert_with(unix_now),
                connection: self.connection,
            };
            self.next_id += 1;
            batch.push((job, key));
            if batch.len() >= READ_BATCH.min(self.queue.capacity()) {
                if let Err(stop) = self.enqueue_all(ws, batch).await {
                    return stop;
                }
            }
        }
    }

    /// Queues a run of messages under one lock, then (if the queue filled up) the rest one by
    /// one as [`Reader::enqueue`] does. `batch` is empty when this returns.
    async fn enqueue_all(
        &mut self,
        ws: &mut WsStream,
        batch: &mut Vec<(Job, Option<Key>)>,
    ) -> Result<(), Stop> {
        // Counted per run, before any of it can be taken: one update of the shared counters
        // rather than one per message.
        let bytes = batch.iter().map(|(job, _)| job.payload.len()).sum();
        self.shared.on_received_n(batch.len() as u64, bytes);
        if let Some(journal) = &self.journal {
            if batch.is_empty() {
                return Ok(());
            }
            // Not interruptible on purpose: a message read must be written. The writer only
            // waits for the pool (or nothing, once cancelled), as a full queue would.
            let jobs = std::mem::replace(batch, Vec::with_capacity(READ_BATCH));
            let run = crate::journal::Received::new(jobs, self.shared.clone());
            return journal.send_async(run).await.map_err(|_unsent| {
                // The writer is gone (it failed): the run, dropped here, counts its jobs as
                // cancelled (they were counted as received, never run).
                Stop::Failed(self.shared.error().unwrap_or_else(|| {
                    Error::Internal("the journal writer ended before the read loop".into())
                }))
            });
        }
        let mut rest = batch.drain(..);
        let mut dropped = 0;
        let mut full = None;
        {
            let mut pusher = self.queue.pusher();
            for (job, key) in rest.by_ref() {
                match pusher.try_push(job, key) {
                    Push::Done { dropped: d } => dropped += d,
                    Push::Overflow => {
                        full = Some(Err(()));
                        break;
                    }
                    Push::Full(job, key) => {
                        full = Some(Ok((job, key)));
                        break;
                    }
                }
            }
        }
        if dropped > 0 {
            self.shared.on_dropped(dropped);
        }
        match full {
            None => Ok(()),
            Some(Err(())) => {
                // The overflowing message is dropped; the ones read after it are not queued
                // either: the stream ends here with the overflow error.
                let left = rest.len() as u64;
                drop(rest);
                self.shared.on_dropped(1 + left);
                Err(Stop::Failed(Error::Overflow {
                    capacity: self.queue.capacity(),
                    job_id: self.next_id - 1 - left,
                }))
            }
            Some(Ok((job, key))) => {
                let mut waiting: Vec<_> = std::iter::once((job, key)).chain(rest).collect();
                let mut it = waiting.drain(..);
                while let Some((job, key)) = it.next() {
                    if let Err(stop) = self.enqueue(ws, job, key).await {
                        // Asked to stop or the deadline: `enqueue` queued the message it held;
                        // the others read before the stop are queued too.
                        let mut pusher = self.queue.pusher();
                        for (job, key) in it {
                            pusher.force_push(job, key);
                        }
                        return Err(stop);
                    }
                }
                Ok(())
            }
        }
    }

    /// Queues a received message under the overflow policy. While the queue is full (policy
    /// "block"), nothing is read and TCP pushes back on the server; a stop asked meanwhile
    /// still queues the message (one over capacity) so that nothing read is lost, then stops.
    async fn enqueue(
        &mut self,
        ws: &mut WsStream,
        mut job: Job,
        mut key: Option<Key>,
    ) -> Result<(), Stop> {
        loop {
            match self.queue.try_push(job, key) {
                Push::Done { dropped } => {
                    if dropped > 0 {
                        self.shared.on_dropped(dropped);
                    }
                    return Ok(());
                }
                Push::Overflow => {
                    self.shared.on_dropped(1);
                    return Err(Stop::Failed(Error::Overflow {
                        capacity: self.queue.capacity(),
                        job_id: self.next_id - 1,
                    }));
                }
                Push::Full(j, k) => (job, key) = (j, k),
            }
            tokio::select! {
                biased;
                changed = self.control.changed() => {
                    let asked = if changed.is_err() {
                        Control::Cancel
                    } else {
                        *self.control.borrow_and_update()
                    };
                    if asked != Control::Run {
                        self.queue.force_push(job, key);
                        return Err(Stop::Asked(asked));
                    }
                }
                _ = sleep_until(self.deadline) => {
                    self.queue.force_push(job, key);
                    return Err(Stop::Deadline);
                }
                _ = self.queue.space() => {}
                // The workers may be waiting to hand over a reply: keep sending them.
                Some(reply) = next_reply(self.replies.as_ref()) => {
                    if let Err(stop) = self.send_replies(ws, Some(reply)).await {
                        self.queue.force_push(job, key);
                        return Err(stop);
                    }
                }
            }
        }
    }

    /// With replies: waits (up to `close_timeout`) for the jobs received so far to finish,
    /// sending their replies.
    async fn flush_owed_replies(&mut self, ws: &mut WsStream) {
        if self.replies.is_none() {
            return;
        }
        let until = tokio::time::Instant::now() + self.close_timeout;
        loop {
            let done = self.shared.snapshot().in_flight == 0;
            if self.send_replies(ws, None).await.is_err() || done {
                return;
            }
            tokio::select! {
                biased;
                Some(reply) = next_reply(self.replies.as_ref()) => {
                    if self.send_replies(ws, Some(reply)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }

    /// Writes `first` and the replies already waiting (up to a batch), then flushes. A reply for
    /// an older connection is dropped. While the server does not read them, this waits (TCP
    /// pushes back) but still obeys close, cancel and the deadline.
    async fn send_replies(
        &mut self,
        ws: &mut WsStream,
        first: Option<(u32, Outgoing)>,
    ) -> Result<(), Stop> {
        let Some(replies) = &self.replies else {
            return Ok(());
        };
        let waiting = first
            .into_iter()
            .chain(replies.rx.try_iter().take(REPLY_BATCH));
        let mut batch = Vec::new();
        for (connection, message) in waiting {
            if connection == self.connection {
                batch.push(message.into_message());
            } else {
                replies
                    .state
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let count = batch.len() as u64;
        let sending = async {
            for message in batch {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        tokio::select! {
            biased;
            sent = sending => match sent {
                Ok(()) => {
                    replies.state.sent.fetch_add(count, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                }
                Err(e) => Err(Stop::Failed(send_error(e))),
            },
            asked = asked(&mut self.control) => Err(Stop::Asked(asked)),
            _ = sleep_until(self.deadline) => Err(Stop::Deadline),
        }
    }
}

fn no_pong(timeout: Option<Duration>) -> Error {
    let after = timeout.unwrap_or_default().as_secs_f64();
    dropped(&format!(
        "no answer to a ping within {after:.1} s (ping_timeout): the server or the network is gone"
    ))
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves at `deadline`; never without one.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends our close frame; with `frames`, also waits (bounded) for the server's reply so the
/// closing handshake completes, discarding data that was already in flight.
async fn close(
    ws: &mut WsStream,
    code: CloseCode,
    close_timeout: Duration,
    frames: Option<&mut FrameReader>,
) {
    let frame = CloseFrame {
        code,
        reason: "".into(),
    };
    let sent = tokio::time::timeout(close_timeout, ws.close(Some(frame))).await;
    if let (Some(frames), Ok(Ok(()))) = (frames, sent) {
        let _ = tokio::time::timeout(close_timeout, async {
            loop {
                match frames.next_event() {
                    Ok(Some(Event::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        if !matches!(frames.fill(ws.get_mut()).await, Ok(1..)) {
                            return;
                        }
                    }
                }
            }
        })
        .await;
    }
}

async fn discard_until_closed(ws: &mut WsStream, close_timeout: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(close_timeout, async {
        while let Ok(1..) = ws.get_mut().read(&mut buf).await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> String {
        match prepare_request(url, &[]) {
            Err(Error::InvalidUrl { reason, .. }) => reason,
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_urls_before_connecting() {
        assert!(reason("http://x").contains("scheme must be ws or wss"));
        assert!(reason("not a url").contains("relative URL"));
        assert!(reason("ws://127.0.0.1:99999/").contains("invalid port"));
        assert!(!reason("ws://").is_empty());
    }

    #[test]
    fn errors_do_not_show_credentials() {
        let r = prepare_request("ws://user:secret@h:1/p", &[]).unwrap();
        assert_eq!(redacted(r.uri()), "ws://h:1/p");
        let r = prepare_request("wss://h/p?q=1", &[]).unwrap();
        assert_eq!(redacted(r.uri()), "wss://h/p?q=1");
    }

    #[test]
    fn send_errors_say_what_happened_to_the_connection() {
        // A drop is reported as code 1006, without a close frame.
        assert!(matches!(
            send_error(WsError::ConnectionClosed),
            Error::Closed { code: 1006, .. }
        ));
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe");
        assert!(
            matches!(send_error(WsError::Io(io)), Error::Closed { code: 1006, reason } if reason.contains("pipe"))
        );
        let too_long = CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        };
        assert!(matches!(
            send_error(WsError::Capacity(too_long)),
            Error::MessageTooBig { size: 10, limit: 5 }
        ));
    }

    #[test]
    fn replies_for_an_ended_connection_are_dropped_and_counted() {
        let r = Replies::new(2);
        // No connection open: refused at once, never blocking the worker.
        assert!(!r.send(0, Outgoing::Text("a".into())));
        r.open(1);
        assert!(r.send(1, Outgoing::Text("b".into())));
        assert!(!r.send(0, Outgoing::Text("old".into())));
        // Reconnected: what waited for connection 1 is dropped, not sent on connection 2.
        r.open(2);
        assert_eq!(r.rx.len(), 0);
        assert!(r.send(2, Outgoing::Binary(vec![1])));
        r.close();
        assert_eq!((r.sent(), r.dropped()), (0, 4));
    }

    #[test]
    fn a_missing_or_empty_ca_bundle_is_an_invalid_argument() {
        let missing = TlsOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        assert!(
            matches!(tls_config(&missing), Err(Error::InvalidArgument(m)) if m.contains("cannot read"))
        );
        assert!(tls_config(&TlsOptions::default()).is_ok());
    }

    #[test]
    fn adds_headers_and_rejects_bad_ones() {
        let ok = prepare_request("ws://h:1/p?q=1", &[("X-Token".into(), "abc".into())]).unwrap();
        assert_eq!(ok.headers()["x-token"], "abc");
        assert_eq!(ok.uri().to_string(), "ws://h:1/p?q=1");
        let bad = prepare_request("wss://h/", &[("bad name".into(), "v".into())]);
        assert!(matches!(bad, Err(Error::InvalidArgument(m)) if m.contains("bad name")));
    }
}
