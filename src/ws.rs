//! The WebSocket side: URL checks, connect + handshake (rustls for wss://), and the read loop
//! that turns every data message into a [`Job`] on the bounded job queue. No PyO3 here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::errors::Error;
use crate::job::{Job, Kind};
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

/// Connects and completes the opening handshake within `open_timeout`.
pub async fn connect(request: Request, open_timeout: Duration) -> Result<WsStream, Error> {
    let url = redacted(request.uri());
    let connector = if request.uri().scheme_str() == Some("wss") {
        Some(tls_connector()?)
    } else {
        None
    };
    let config = WebSocketConfig::default();
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
        WsError::Capacity(c) => Error::Protocol(format!("message too big: {c}")),
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

/// The read loop of one connection.
pub struct Reader {
    pub jobs: flume::Sender<Job>,
    pub control: watch::Receiver<Control>,
    pub shared: Arc<Shared>,
    pub deadline: Option<tokio::time::Instant>,
    pub close_timeout: Duration,
    pub connection: u32,
    pub next_id: u64,
}

impl Reader {
    /// Reads until asked to stop, the deadline, a close frame or an error; then closes the
    /// connection as the cause requires and records an abnormal end in `Shared`. The job queue
    /// is closed as soon as reading stops, so the workers drain it while the close handshake runs.
    pub async fn run(mut self, mut ws: WsStream) {
        let stop = self.read(&mut ws).await;
        // Record an abnormal end before closing the job queue: the consumer learns that the
        // stream is over when the workers finish, and must find the error already there.
        match &stop {
            Stop::ServerClosed(frame) => {
                let (code, reason) = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                // 1000 is a normal close; 1005 means the server sent a close frame with no code.
                if code != 1000 && code != 1005 {
                    self.shared.set_error(Error::Closed { code, reason });
                }
            }
            Stop::Failed(e) => self.shared.set_error(e.clone()),
            Stop::Asked(_) | Stop::Deadline => {}
        }
        let Reader {
            jobs,
            close_timeout,
            ..
        } = self;
        drop(jobs);
        match stop {
            Stop::Asked(Control::Close) | Stop::Asked(Control::Run) | Stop::Deadline => {
                close(&mut ws, close_timeout, true).await;
            }
            Stop::Asked(Control::Cancel) => close(&mut ws, close_timeout, false).await,
            Stop::ServerClosed(_) => finish_handshake(&mut ws, close_timeout).await,
            Stop::Failed(_) => {}
        }
    }

    async fn read(&mut self, ws: &mut WsStream) -> Stop {
        loop {
            let asked = *self.control.borrow_and_update();
            if asked != Control::Run {
                return Stop::Asked(asked);
            }
            let next = tokio::select! {
                biased;
                changed = self.control.changed() => {
                    if changed.is_err() {
                        return Stop::Asked(Control::Cancel);
                    }
                    continue;
                }
                _ = sleep_until(self.deadline) => return Stop::Deadline,
                next = ws.next() => next,
            };
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
            let job = Job {
                id: self.next_id,
                kind,
                payload,
                received_at: unix_now(),
                connection: self.connection,
            };
            self.next_id += 1;
            // A received message is always handed to the pool, even during a graceful close
            // or a cancel (the workers then count it as cancelled): this send is never raced
            // against anything, so a job is never both delivered and dropped. While the queue is
            // full, nothing is read and TCP pushes back on the server.
            if self.jobs.send_async(job).await.is_err() {
                // Every worker is gone (they only end once this loop has stopped): defensive.
                self.shared.on_cancelled();
                return Stop::Asked(Control::Cancel);
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends our close frame; when `wait`, also waits (bounded) for the server's reply so the
/// closing handshake completes, discarding data that was already in flight.
async fn close(ws: &mut WsStream, close_timeout: Duration, wait: bool) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let sent = tokio::time::timeout(close_timeout, ws.close(Some(frame))).await;
    if wait && matches!(sent, Ok(Ok(()))) {
        finish_handshake(ws, close_timeout).await;
    }
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
