//! The WebSocket side: URL checks, connect + handshake (rustls for wss://), and the read loop
//! that turns every data message into a [`Job`] on the bounded job queue. No PyO3 here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::errors::Error;
use crate::job::{extract_key, Job, Kind};
use crate::queue::{JobQueue, Key, Push};
use crate::state::{unix_now, Shared};

pub use tokio_tungstenite::tungstenite::handshake::client::Request;

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

fn tls_connector() -> Result<Connector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

/// Connects and completes the opening handshake within `open_timeout`. Frames and messages
/// larger than `max_message_size` are refused from their header, before they are read.
pub async fn connect(
    request: Request,
    open_timeout: Duration,
    max_message_size: usize,
) -> Result<WsStream, Error> {
    let url = redacted(request.uri());
    let connector = if request.uri().scheme_str() == Some("wss") {
        Some(tls_connector()?)
    } else {
        None
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size));
    let attempt =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector);
    match tokio::time::timeout(open_timeout, attempt).await {
        Err(_) => Err(Error::Timeout {
            url,
            after: open_timeout,
        }),
        Ok(Err(e)) => Err(connect_error(&url, e)),
        Ok(Ok((ws, _response))) => Ok(ws),
    }
}

fn connect_error(url: &str, e: WsError) -> Error {
    let url = url.to_string();
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
            cause: io.to_string(),
        },
        WsError::Tls(tls) => Error::Connect {
            url,
            cause: format!("TLS: {tls}"),
        },
        WsError::Url(u) => Error::InvalidUrl {
            url,
            reason: u.to_string(),
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
        let msg = match m {
            Outgoing::Text(t) => Message::text(t.clone()),
            Outgoing::Binary(b) => Message::binary(b.clone()),
        };
        ws.feed(msg).await.map_err(read_error)?;
    }
    ws.flush().await.map_err(read_error)
}

/// Maps an error met while the connection is open.
fn read_error(e: WsError) -> Error {
    match e {
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed => dropped("the connection was dropped without a close frame"),
        WsError::Io(io) => dropped(&format!("the connection was lost: {io}")),
        WsError::Protocol(p) => Error::Protocol(p.to_string()),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            Error::MessageTooBig {
                size,
                limit: max_size,
            }
        }
        WsError::Capacity(c) => Error::Protocol(c.to_string()),
        WsError::Utf8(s) => Error::Protocol(format!("invalid UTF-8 in a text message: {s}")),
        other => Error::Protocol(other.to_string()),
    }
}

fn dropped(reason: &str) -> Error {
    Error::Closed {
        code: 1006,
        reason: reason.to_string(),
    }
}

/// Why reading stopped.
enum Stop {
    Asked(Control),
    Deadline,
    ServerClosed(Option<CloseFrame>),
    Failed(Error),
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
    /// With a journal: its writer takes each job and queues it once written.
    pub journal: Option<crate::journal::Inserts>,
}

impl Reader {
    /// Reads one connection until asked to stop, the deadline, a close frame or an error, then
    /// closes it as the cause requires. Every message read has been queued when this returns.
    pub async fn run(&mut self, mut ws: WsStream) -> Ended {
        let stop = self.read(&mut ws).await;
        let close_timeout = self.close_timeout;
        match stop {
            Stop::Asked(Control::Close) | Stop::Asked(Control::Run) | Stop::Deadline => {
                close(&mut ws, CloseCode::Normal, close_timeout, true).await;
                Ended::Finished
            }
            Stop::Asked(Control::Cancel) => {
                close(&mut ws, CloseCode::Normal, close_timeout, false).await;
                Ended::Finished
            }
            Stop::ServerClosed(frame) => {
                finish_handshake(&mut ws, close_timeout).await;
                let (code, reason) = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
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
                        close(&mut ws, CloseCode::Policy, close_timeout, true).await;
                    }
                    Error::MessageTooBig { .. } => {
                        // The protocol layer would now read the refused message whole: read
                        // the rest raw, in small pieces, until the server closes (bounded),
                        // so it gets our close frame rather than a reset.
                        close(&mut ws, CloseCode::Size, close_timeout, false).await;
                        discard_until_closed(&mut ws, close_timeout).await;
                    }
                    _ => {}
                }
                Ended::Failed(e)
            }
        }
    }

    async fn read(&mut self, ws: &mut WsStream) -> Stop {
        let Heartbeat { interval, timeout } = self.heartbeat;
        // Time spent waiting on the socket since the last frame, and its value when our ping
        // went out.
        let mut idle = Duration::ZERO;
        let mut pinged_at: Option<Duration> = None;
        loop {
            let asked = *self.control.borrow_and_update();
            if asked != Control::Run {
                return Stop::Asked(asked);
            }
            let wake = match pinged_at {
                None => interval,
                Some(at) => timeout.map(|t| at + t),
            };
            // A frame already buffered is taken without arming any timer (the busy path).
            if self
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                return Stop::Deadline;
            }
            let next = match ws.next().now_or_never() {
                Some(next) => next,
                None => {
                    let waiting = tokio::time::Instant::now();
                    tokio::select! {
                        biased;
                        changed = self.control.changed() => {
                            if changed.is_err() {
                                return Stop::Asked(Control::Cancel);
                            }
                            idle += waiting.elapsed();
                            continue;
                        }
                        _ = sleep_until(self.deadline) => return Stop::Deadline,
                        _ = sleep_for(wake.map(|w| w.saturating_sub(idle))) => {
                            idle += waiting.elapsed();
                            if pinged_at.is_some() {
                                return Stop::Failed(no_pong(timeout));
                            }
                            let ping = ws.send(Message::Ping(Bytes::new()));
                            match tokio::time::timeout(timeout.unwrap_or(self.close_timeout), ping).await {
                                Ok(Ok(())) => pinged_at = Some(idle),
                                Ok(Err(e)) => return Stop::Failed(read_error(e)),
                                Err(_) => return Stop::Failed(no_pong(timeout)),
                            }
                            continue;
                        }
                        next = ws.next() => next,
                    }
                }
            };
            // Any frame shows the server is alive.
            idle = Duration::ZERO;
            pinged_at = None;
            let (kind, payload) = match next {
                Some(Ok(Message::Text(t))) => (Kind::Text, Bytes::from(t)),
                Some(Ok(Message::Binary(b))) => (Kind::Binary, b),
                Some(Ok(Message::Close(frame))) => return Stop::ServerClosed(frame),
                // Pings are answered by the protocol layer; pongs and raw frames carry no job.
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Stop::Failed(read_error(e)),
                None => return Stop::Failed(dropped("the connection ended without a close frame")),
            };
            self.shared.on_received(payload.len());
            let key = match &self.key {
                Some(field) => extract_key(&payload, field),
                None => None,
            };
            let job = Job {
                id: self.next_id,
                kind,
                payload,
                received_at: unix_now(),
                connection: self.connection,
            };
            self.next_id += 1;
            if let Err(stop) = self.enqueue(job, key).await {
                return stop;
            }
        }
    }

    /// Queues a received message under the overflow policy. While the queue is full (policy
    /// "block"), nothing is read and TCP pushes back on the server; a stop asked meanwhile
    /// still queues the message (one over capacity) so that nothing read is lost, then stops.
    async fn enqueue(&mut self, mut job: Job, mut key: Option<Key>) -> Result<(), Stop> {
        if let Some(journal) = &self.journal {
            // Not interruptible on purpose: a message read must be written. The writer only
            // waits for the pool (or nothing, once cancelled), as a full queue would.
            return journal.send_async((job, key)).await.map_err(|_| {
                Stop::Failed(self.shared.error().unwrap_or_else(|| {
                    Error::Internal("the journal writer ended before the read loop".into())
                }))
            });
        }
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
            }
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

/// Sends our close frame; when `wait`, also waits (bounded) for the server's reply so the
/// closing handshake completes, discarding data that was already in flight.
async fn close(ws: &mut WsStream, code: CloseCode, close_timeout: Duration, wait: bool) {
    let frame = CloseFrame {
        code,
        reason: "".into(),
    };
    let sent = tokio::time::timeout(close_timeout, ws.close(Some(frame))).await;
    if wait && matches!(sent, Ok(Ok(()))) {
        finish_handshake(ws, close_timeout).await;
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

async fn finish_handshake(ws: &mut WsStream, close_timeout: Duration) {
    let _ = tokio::time::timeout(close_timeout, async {
        while let Some(Ok(_)) = ws.next().await {}
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
    fn adds_headers_and_rejects_bad_ones() {
        let ok = prepare_request("ws://h:1/p?q=1", &[("X-Token".into(), "abc".into())]).unwrap();
        assert_eq!(ok.headers()["x-token"], "abc");
        assert_eq!(ok.uri().to_string(), "ws://h:1/p?q=1");
        let bad = prepare_request("wss://h/", &[("bad name".into(), "v".into())]);
        assert!(matches!(bad, Err(Error::InvalidArgument(m)) if m.contains("bad name")));
    }
}
