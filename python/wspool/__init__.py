"""wspool: consume WebSocket streams from Python with a native read loop and worker pool.

A Rust core (tokio + tokio-tungstenite) reads the socket and turns every message into a
:class:`Job`; a pool of native threads decodes it and runs your handler; :class:`Result` objects
come back to Python in batches. See :func:`consume` and :func:`run`.
"""

from __future__ import annotations

from ._native import Job, Result, Select, Stats, __version__
from ._stream import Batches, Event, Reconnect, Stream, Values, consume, run
from .exceptions import (
    ConnectError,
    ConnectionClosed,
    DecodeError,
    HandshakeError,
    InternalError,
    JobFailed,
    JournalError,
    MessageTooBig,
    Overflow,
    ProtocolError,
    Timeout,
    WspoolError,
)
from .journal import JobRecord, Journal

__all__ = [
    "Batches",
    "ConnectError",
    "ConnectionClosed",
    "DecodeError",
    "Event",
    "HandshakeError",
    "InternalError",
    "Job",
    "JobFailed",
    "JobRecord",
    "Journal",
    "JournalError",
    "MessageTooBig",
    "Overflow",
    "ProtocolError",
    "Reconnect",
    "Result",
    "Select",
    "Stats",
    "Stream",
    "Timeout",
    "Values",
    "WspoolError",
    "__version__",
    "consume",
    "run",
]
