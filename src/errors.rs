//! One error type for the native core. The Python layer maps each variant to one exception class
//! (see `py::errors`), so the cause reaches the user with the URL, status or close code in it.

use std::time::Duration;

/// Everything that can end a stream, or stop it from starting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The URL or another argument is unusable; raised before any thread starts.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// Another argument is unusable (a header, a decode mode...); raised before any thread starts.
    #[error("{0}")]
    InvalidArgument(String),

    /// TCP connect, DNS or TLS failed.
    #[error("cannot connect to {url}: {cause}")]
    Connect { url: String, cause: String },

    /// The server answered the opening handshake with something other than 101.
    #[error("handshake with {url} rejected: HTTP {status}{}", body_suffix(.body))]
    Handshake {
        url: String,
        status: u16,
        body: String,
    },

    /// Connect plus handshake took longer than the open timeout.
    #[error("opening {url} timed out after {:.1} s", .after.as_secs_f64())]
    Timeout { url: String, after: Duration },

    /// The connection ended abnormally: a close frame with a code other than 1000, or a drop
    /// without a close frame (code 1006).
    #[error("connection closed: code {code}{}", reason_suffix(.reason))]
    Closed { code: u16, reason: String },

    /// The server broke RFC 6455.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// A message (one frame, or fragments so far) was larger than `max_message_size`; refused
    /// before it was read whole, and the connection closed with 1009.
    #[error("message too big: {size} bytes or more, the limit is {limit} (max_message_size); closed with 1009")]
    MessageTooBig { size: usize, limit: usize },

    /// The job queue was full with `overflow="error"`; the connection was closed with 1008.
    #[error("job queue overflow: {capacity} jobs were waiting (queue_size) when message {job_id} arrived, with overflow=\"error\"; closed with 1008")]
    Overflow { capacity: usize, job_id: u64 },

    /// A user callback the core calls (the subscribe callable) failed.
    #[error("{0}")]
    Callback(String),

    /// The stream was started by the parent of this (forked) process: its threads and its
    /// connection are not here.
    #[error("this stream was started in process {pid}, before os.fork(); it cannot be used in the child process {child}: start a new stream there")]
    Forked { pid: u32, child: u32 },
    /// The journal (`journal=`) cannot be used: not a wspool journal, a newer schema, or a
    /// write that failed (a full disk). Never retried: a job not written must not be run.
    #[error("journal {path}: {message}")]
    Journal { path: String, message: String },

    /// A bug in wspool itself (a panic caught on a native thread).
    #[error("internal error in wspool: {0}")]
    Internal(String),
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(" ({})", body.trim())
    }
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(", reason {reason:?}")
    }
}

/// Renders a caught panic payload as text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

impl Error {
    /// Whether a reconnect policy should try again after this error: drops, abnormal closes that
    /// can be temporary, refused or timed-out connections, and HTTP 5xx or 429 handshakes. Not a
    /// TLS failure, a 4xx, a protocol violation, a refused message or a user callback's error,
    /// which would only repeat.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { cause, .. } => !cause.starts_with("TLS"),
            Error::Handshake { status, .. } => *status >= 500 || *status == 429,
            Error::Timeout { .. } => true,
            // 1000 ends a stream normally; 1002/1003/1007/1008/1009/1010/1015 say that this
            // client or its messages are unacceptable, which another connection would repeat.
            Error::Closed { code, .. } => {
                !matches!(code, 1000 | 1002 | 1003 | 1007 | 1008 | 1009 | 1010 | 1015)
            }
            Error::InvalidUrl { .. }
            | Error::InvalidArgument(_)
            | Error::Protocol(_)
            | Error::MessageTooBig { .. }
            | Error::Overflow { .. }
            | Error::Callback(_)
            | Error::Forked { .. }
            | Error::Journal { .. }
            | Error::Internal(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_cause() {
        let e = Error::Handshake {
            url: "ws://h/".into(),
            status: 403,
            body: "no\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "handshake with ws://h/ rejected: HTTP 403 (no)"
        );
        let e = Error::Closed {
            code: 1011,
            reason: "boom".into(),
        };
        assert_eq!(
            e.to_string(),
            "connection closed: code 1011, reason \"boom\""
        );
        let e = Error::Closed {
            code: 1006,
            reason: String::new(),
        };
        assert_eq!(e.to_string(), "connection closed: code 1006");
    }

    #[test]
    fn retries_only_what_can_be_temporary() {
        let closed = |code| Error::Closed {
            code,
            reason: String::new(),
        };
        let handshake = |status| Error::Handshake {
            url: "ws://h/".into(),
            status,
            body: String::new(),
        };
        assert!(closed(1006).is_retryable() && closed(1011).is_retryable());
        assert!(closed(1001).is_retryable() && closed(4000).is_retryable());
        assert!(!closed(1008).is_retryable() && !closed(1009).is_retryable());
        assert!(handshake(503).is_retryable() && handshake(429).is_retryable());
        assert!(!handshake(403).is_retryable() && !handshake(404).is_retryable());
        let refused = Error::Connect {
            url: "ws://h/".into(),
            cause: "Connection refused".into(),
        };
        let tls = Error::Connect {
            url: "wss://h/".into(),
            cause: "TLS: invalid peer certificate".into(),
        };
        assert!(refused.is_retryable() && !tls.is_retryable());
        assert!(!Error::Protocol("x".into()).is_retryable());
    }

    #[test]
    fn panic_payloads_render() {
        let p = std::panic::catch_unwind(|| panic!("at {}", 3)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "at 3");
    }
}
