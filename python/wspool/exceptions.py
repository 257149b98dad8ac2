"""Exceptions raised by wspool.

Every exception wspool raises on purpose derives from :class:`WspoolError`; bad arguments raise
the builtin :class:`ValueError` before any thread starts. The tree::

    Exception
    └── WspoolError
        ├── ConnectError          TCP connect, DNS or TLS failed        (.url)
        │   └── HandshakeError    the server refused the upgrade        (.url, .status, .body)
        ├── Timeout               connect + handshake took too long     (.url); also a TimeoutError
        ├── ConnectionClosed      abnormal close frame or a drop        (.code, .reason)
        │   └── MessageTooBig     a message over max_message_size; 1009 (.size, .limit)
        ├── Overflow              the job queue was full with overflow="error" (.capacity, .job_id)
        ├── ProtocolError         the server broke RFC 6455
        ├── DecodeError           a payload did not decode              (.job_id, .payload);
        │                         delivered in ``Result.error``, never raised by the iterator;
        │                         also a ValueError
        ├── JobFailed             a job failed while results were taken as plain values
        │                         (``Stream.values()``)                 (.result, .job_id)
        ├── JournalError          the journal is not a wspool journal, is newer, or a write
        │                         failed (a full disk)                  (.path)
        └── InternalError         a bug in wspool (a native panic); the stream goes on or ends
                                  cleanly, never crashes the interpreter

Connection errors are raised from the iterator (or ``run()``) only after every result of the
messages received before the failure has been delivered. A close frame with code 1000 (or one
without a code) is a normal end: the iteration simply stops.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "ConnectError",
    "ConnectionClosed",
    "DecodeError",
    "HandshakeError",
    "InternalError",
    "JobFailed",
    "JournalError",
    "MessageTooBig",
    "Overflow",
    "ProtocolError",
    "Timeout",
    "WspoolError",
]


class WspoolError(Exception):
    """Base class of every error wspool raises on purpose."""


class ConnectError(WspoolError):
    """The connection could not be opened: refused, DNS failure or TLS failure.

    ``url`` is the URL that was dialled; the message names it and the cause.
    """

    def __init__(self, message: str, *, url: Optional[str] = None) -> None:
        super().__init__(message)
        self.url = url


class HandshakeError(ConnectError):
    """The server answered the WebSocket upgrade with an HTTP status other than 101.

    ``status`` is that status (for example 403 or 404), ``body`` the start of the response body.
    """

    def __init__(
        self, message: str, *, url: Optional[str] = None, status: int = 0, body: str = ""
    ) -> None:
        super().__init__(message, url=url)
        self.status = status
        self.body = body


class Timeout(WspoolError, TimeoutError):
    """Opening the connection (TCP, TLS and the handshake) took longer than ``open_timeout``."""

    def __init__(self, message: str, *, url: Optional[str] = None) -> None:
        super().__init__(message)
        self.url = url


class ConnectionClosed(WspoolError):
    """The connection ended abnormally: a close frame with a code other than 1000, or a drop
    without a close frame (``code`` 1006).

    Raised by the iterator after the results of every message received before the close.
    ``code`` and ``reason`` are the close frame's.
    """

    def __init__(self, message: str, *, code: int = 1006, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class MessageTooBig(ConnectionClosed):
    """A message was larger than ``max_message_size``; the connection was closed with 1009.

    Refused from the frame header (or when fragments add up past the limit), before the whole
    message is read. ``size`` is how big the message was known to be when it was refused
    (at least), ``limit`` the limit.
    """

    def __init__(self, message: str, *, size: int = 0, limit: int = 0) -> None:
        super().__init__(message, code=1009, reason="message too big")
        self.size = size
        self.limit = limit


class Overflow(WspoolError):
    """With ``overflow="error"``, a message arrived while ``queue_size`` jobs were waiting.

    Raised by the iterator after the results of the messages before it; the connection was
    closed with 1008. ``capacity`` is the queue size, ``job_id`` the id of the refused message.
    """

    def __init__(self, message: str, *, capacity: int = 0, job_id: int = -1) -> None:
        super().__init__(message)
        self.capacity = capacity
        self.job_id = job_id


class ProtocolError(WspoolError):
    """The server violated the WebSocket protocol; the message names the violation."""


class DecodeError(WspoolError, ValueError):
    """A payload did not decode as ``decode=`` asked (invalid UTF-8 or JSON).

    Found in ``Result.error`` of that job (the handler is not called); the stream goes on.
    ``job_id`` is the job's id and ``payload`` the raw bytes.
    """

    def __init__(self, message: str, *, job_id: int = -1, payload: bytes = b"") -> None:
        super().__init__(message)
        self.job_id = job_id
        self.payload = payload


class JobFailed(WspoolError):
    """A job failed while results were taken as plain values (:meth:`Stream.values`,
    ``Stream.batches(values=True)``), which have nowhere to put an error.

    ``result`` is the failed :class:`Result` and ``job_id`` its job's id; the job's exception
    (the handler's, or a :class:`DecodeError`) is ``__cause__`` and is named in the message.
    Nothing else is lost: iterating again goes on with the next result.
    """

    def __init__(self, result: Any) -> None:
        error = result.error
        super().__init__(f"job {result.id} failed: {type(error).__name__}: {error}")
        self.result = result
        self.job_id: int = result.id


class JournalError(WspoolError):
    """The journal (``consume(..., journal=path)`` or :class:`wspool.Journal`) cannot be used.

    Raised when opening a file that is not a wspool journal (another SQLite database, or not a
    database at all), one written by a newer wspool (a schema this version does not know), or
    a missing file for :class:`wspool.Journal`; and from the iterator, after the results of the
    jobs already written, when a write fails (a full disk): the jobs not written are not run and
    are counted in ``stats.cancelled``, so nothing is lost silently. ``path`` is the journal's
    path, also named in the message.
    """

    def __init__(self, message: str, *, path: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path


class InternalError(WspoolError):
    """A bug in wspool itself, caught before it could crash the interpreter; please report it."""
