"""Type stubs for wspool's native module (Rust, built by maturin)."""

from typing import Any, Callable, Optional, Union, final

__version__: str
__features__: tuple[str, ...]

@final
class Job:
    """One received message: what the handler gets and what ``Result.job`` holds."""

    @property
    def id(self) -> int:
        """Position of the message in the stream: 0, 1, 2, ... in receipt order."""
    @property
    def type(self) -> str:
        """The frame type the message arrived in: "text" or "binary"."""
    @property
    def data(self) -> Any:
        """The payload after decoding: bytes, str or a JSON value (raw bytes if it failed)."""
    @property
    def received_at(self) -> float:
        """``time.time()`` when the message was read from the socket."""
    @property
    def connection(self) -> int:
        """Which connection of the stream delivered the message (0 for the first)."""
    @property
    def metadata(self) -> dict[str, Any]:
        """A dict about the message: "size" (payload bytes as received)."""

@final
class Result:
    """The outcome of one job: ``value`` or ``error``."""

    @property
    def job(self) -> Job:
        """The job this result belongs to."""
    @property
    def id(self) -> int:
        """The job's id: ``result.job.id`` without making the ``Job`` object."""
    @property
    def value(self) -> Any:
        """What the handler returned (the decoded payload without a handler); None on error."""
    @property
    def error(self) -> Optional[BaseException]:
        """The exception object (traceback kept) when the job failed, else None."""
    @property
    def ok(self) -> bool:
        """True when the job produced a value, False when it failed."""

@final
class Stats:
    """A snapshot of a stream's counters."""

    @property
    def received(self) -> int:
        """Messages read from the socket (each became a job)."""
    @property
    def processed(self) -> int:
        """Jobs whose result is a value."""
    @property
    def failed(self) -> int:
        """Jobs whose result is an error."""
    @property
    def cancelled(self) -> int:
        """Jobs dropped unprocessed by ``cancel()``."""
    @property
    def dropped(self) -> int:
        """Messages dropped by the overflow policy."""
    @property
    def abandoned(self) -> int:
        """Jobs whose handler was still running when close(), cancel() or exit gave up."""
    @property
    def reconnects(self) -> int:
        """Successful reconnections (connections after the first)."""
    @property
    def in_flight(self) -> int:
        """Jobs received but not finished (nor dropped) yet."""
    @property
    def bytes(self) -> int:
        """Payload bytes received."""
    @property
    def elapsed(self) -> float:
        """Seconds since the stream started, frozen when it ends."""
    @property
    def workers(self) -> int:
        """Size of the worker pool."""
    @property
    def threads(self) -> int:
        """Native threads of the stream still running (0 once it is closed)."""
    @property
    def replies(self) -> int:
        """With ``reply=True``: replies sent back to the server."""
    @property
    def replies_dropped(self) -> int:
        """With ``reply=True``: replies dropped because their connection had ended first."""
    def as_dict(self) -> dict[str, Union[int, float]]:
        """The counters as a dict."""

@final
class Select:
    """A native processor: pass it as the handler to pick fields out of each JSON message on
    the worker threads, without the GIL. ``Select("sym", "px.bid")`` makes each result's value
    ``(msg["sym"], msg["px"]["bid"])``; with one field, the value is that field alone. An absent
    field gives None; a payload that is not JSON gives a ``DecodeError``."""

    def __new__(cls, *fields: str) -> Select: ...
    @property
    def fields(self) -> list[str]:
        """The fields, as given."""
    def __call__(self, job: Job) -> Any:
        """The same selection in Python, on ``job.data``."""

def on_stream_thread() -> bool:
    """True when called on one of a stream's native threads (a worker running a handler)."""

@final
class NativeStream:
    """The native half of ``wspool.Stream``; use ``wspool.consume()`` instead."""

    def __new__(
        cls,
        url: str,
        handler: Optional[Callable[[Job], Any]],
        *,
        workers: int,
        decode: str,
        subscribe: Union[list[Union[str, bytes]], Callable[[int], list[Union[str, bytes]]], None],
        headers: list[tuple[str, str]],
        timeout: Optional[float],
        queue_size: int,
        open_timeout: float,
        close_timeout: float,
        overflow: str,
        key: Optional[str],
        ordered: str,
        ping_interval: Optional[float],
        ping_timeout: Optional[float],
        max_message_size: int,
        reconnect: Optional[tuple[Optional[int], float, float, bool]],
        on_event: Optional[
            Callable[[str, int, int, Optional[float], Optional[BaseException]], Any]
        ],
        ca: Optional[str],
        reply: bool,
        journal: Optional[str] = None,
        journal_sync: str = "normal",
    ) -> NativeStream: ...
    def wait_connected(self) -> None:
        """Blocks until the handshake is done; raises ConnectError, HandshakeError or Timeout."""
    def next_batch(
        self, max: int = 1024, timeout: Optional[float] = None
    ) -> Optional[list[Result]]:
        """Up to ``max`` results, waiting for the first; None when the stream is over; an
        empty list when ``timeout`` seconds passed without one."""
    def next_values(
        self, max: int = 1024, timeout: Optional[float] = None
    ) -> Optional[tuple[list[Any], Optional[list[Result]]]]:
        """Up to ``max`` results as ``(values, rest)``: the values of the leading successful
        ones and, from the first failed one on, the rest as Results (None if none failed);
        ``([], None)`` when ``timeout`` seconds passed without one; None when the stream is
        over."""
    def close(self) -> None:
        """Stop reading and send a close frame; queued jobs still finish."""
    def cancel(self, going_away: bool = False) -> None:
        """Stop reading, send a close frame (1001 with ``going_away``), drop queued jobs and
        undelivered results."""
    def abandon(self) -> int:
        """Stop waiting: queued jobs count as cancelled, running ones as abandoned."""
    def bell_fd(self) -> Optional[int]:
        """A file descriptor that becomes readable when, after ``arm()``, results may have come
        or the stream may have ended; read it empty after each wake-up. None where there is
        none (not Unix)."""
    def arm(self) -> bool:
        """After finding nothing: True if the caller should wait for ``bell_fd``, False if
        results (or the end) are there already."""
    def join(self, timeout: Optional[float] = None) -> bool:
        """Waits for every native thread to end; True if they did within ``timeout``."""
    def journal(self) -> Optional[StreamJournal]:
        """The stream's journal (status queries, recovered jobs); None without ``journal=``."""
    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""

@final
class Journal:
    """An existing wspool journal, opened to read and retry its jobs (use ``wspool.Journal``)."""

    def __new__(cls, path: str) -> Journal: ...
    @property
    def path(self) -> str:
        """The journal's path."""
    def get(self, id: int) -> Optional[dict[str, Any]]:
        """The job ``id`` as a dict, or None if the journal has no such job."""
    def list(self, status: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs (largest id first) as dicts, of one status or of all."""
    def retry(self, id: int) -> Optional[str]:
        """Puts job ``id`` back to "received"; returns the status it had, or None."""
    def counts(self) -> dict[str, int]:
        """Jobs per status, "total", "rerun" and "duplicates"."""
    def close(self) -> None:
        """Closes the file; later calls raise JournalError."""

@final
class StreamJournal:
    """A running stream's view of its journal (from ``NativeStream.journal()``)."""

    @property
    def path(self) -> str:
        """The journal's path."""
    @property
    def to_recover(self) -> int:
        """Jobs an earlier run left unfinished, that this stream runs first."""
    @property
    def recovered(self) -> int:
        """Of those, the ones already handed to the pool."""
    def get(self, id: int) -> Optional[dict[str, Any]]:
        """The job ``id`` as a dict, including every status change made so far; None if unknown."""
    def status(self, id: int) -> Optional[str]:
        """The status of job ``id``; None if unknown."""
