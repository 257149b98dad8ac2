"""The Python half of a stream: argument checks, the result iterator, the callback hook and the
context manager. Everything that waits runs in the native core with the GIL released."""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Callable, Optional, Union

from . import _native
from ._native import Job, Result, Stats
from .exceptions import WspoolError

__all__ = ["Stream", "consume", "run"]

Handler = Callable[[Job], Any]
OnResult = Callable[[Result], Any]
SubscribeItem = Union[str, bytes, Mapping[str, Any], list]
Subscribe = Union[SubscribeItem, Iterable[SubscribeItem], None]
Headers = Union[Mapping[str, str], Iterable["tuple[str, str]"], None]

_DECODES = ("bytes", "text", "json")
# How long leaving a stream by KeyboardInterrupt waits for running jobs.
_INTERRUPT_WAIT = 0.2


def _subscribe_messages(subscribe: Subscribe) -> list[Union[str, bytes]]:
    if subscribe is None:
        return []
    items: Iterable[Any]
    if isinstance(subscribe, (str, bytes, bytearray, memoryview, Mapping)):
        items = [subscribe]
    else:
        items = subscribe
    messages: list[Union[str, bytes]] = []
    for item in items:
        if isinstance(item, str):
            messages.append(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            messages.append(bytes(item))
        elif isinstance(item, (Mapping, list)):
            messages.append(json.dumps(item, separators=(",", ":")))
        else:
            raise ValueError(
                f"subscribe takes str, bytes, dict or a list of them, not {type(item).__name__}"
            )
    return messages


def _header_pairs(headers: Headers) -> list[tuple[str, str]]:
    if headers is None:
        return []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for pair in pairs:
        name, value = pair
        out.append((str(name), str(value)))
    return out


# Streams whose threads may still run. At interpreter exit they are cancelled and their threads
# joined before finalization starts: a native worker returning from a Python handler while the
# interpreter finalizes would abort the process, so the exit waits for running handlers.
_live: weakref.WeakSet[Stream] = weakref.WeakSet()


@atexit.register
def _cancel_live_streams() -> None:
    streams = list(_live)
    for stream in streams:
        stream._native.cancel()
    try:
        for stream in streams:
            if stream._native.join(stream._close_timeout):
                continue
            print(
                "wspool: waiting at exit for handlers that are still running (Ctrl-C to quit now)",
                file=sys.stderr,
                flush=True,
            )
            stream._native.join(None)
    except KeyboardInterrupt:
        # Finalizing now would crash when those handlers return: leave without it.
        for out in (sys.stdout, sys.stderr):
            try:
                out.flush()
            except Exception:
                pass
        os._exit(130)


class Stream:
    """A running stream of results; made by :func:`consume`.

    Iterate it (``for result in stream``) to get one :class:`Result` per received message, in
    completion order. ``on_result``, when given, is called once per result, in the thread that
    consumes results (the iterating thread, or the one in :meth:`close` / ``with`` exit), never
    concurrently. The iteration ends after the last result when the server closes normally (code
    1000), when :meth:`close` was called or when ``timeout`` ran out; it raises
    :class:`ConnectionClosed`, :class:`ProtocolError`... after the last result when the
    connection ended abnormally.

    As a context manager, leaving the ``with`` block closes gracefully: reading stops, a close
    frame is sent, the jobs already received finish and their results go to ``on_result``, and
    every native thread ends before ``__exit__`` returns (a handler still running after
    ``close_timeout`` finishes in the background; interpreter exit waits for it). Leaving it by
    KeyboardInterrupt or another BaseException cancels instead, without waiting more than
    0.2 s: queued jobs are dropped and counted in ``stats.cancelled``; handlers already running
    finish in the background.
    """

    def __init__(
        self,
        native: _native.NativeStream,
        on_result: Optional[OnResult],
        close_timeout: float,
        batch_size: int = 1024,
    ) -> None:
        self._native = native
        self._on_result = on_result
        self._close_timeout = close_timeout
        self._batch_size = batch_size
        self._buffer: collections.deque[Result] = collections.deque()
        # Results not yet passed to on_result (if it raised, the rest wait here).
        self._undelivered: collections.deque[Result] = collections.deque()
        self._lock = threading.RLock()
        self._delivering = False
        self._finished = False
        self._error: Optional[BaseException] = None
        self._error_raised = False
        _live.add(self)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Result]:
        return self

    def __next__(self) -> Result:
        buffer = self._buffer
        while not buffer:
            if not self._fill():
                if self._error is not None and not self._error_raised:
                    self._error_raised = True
                    raise self._error
                raise StopIteration
        return buffer.popleft()

    def _fill(self) -> bool:
        """Moves one batch from the native side into the buffer and passes each result to
        ``on_result``. False once the stream is over."""
        with self._lock:
            self._deliver()
            if self._finished:
                return False
            try:
                batch = self._native.next_batch(self._batch_size)
            except WspoolError as error:
                self._finish(error)
                return False
            if batch is None:
                self._finish(None)
                return False
            # Buffered first: if on_result raises, the batch is still there for the iterator,
            # and the results it has not seen yet are passed to it on the next fill or close.
            self._buffer.extend(batch)
            if self._on_result is not None:
                self._undelivered.extend(batch)
                self._deliver()
            return True

    def _deliver(self) -> None:
        on_result, pending = self._on_result, self._undelivered
        if on_result is None or not pending:
            return
        self._delivering = True
        try:
            while pending:
                on_result(pending.popleft())
        finally:
            self._delivering = False

    def _finish(self, error: Optional[BaseException]) -> None:
        self._finished = True
        self._error = error
        self._join(self._close_timeout)

    def _join(self, timeout: float) -> None:
        # Threads still inside a handler after `timeout` end when it returns; the exit hook
        # waits for them.
        if self._native.join(timeout):
            _live.discard(self)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Closes gracefully: stop reading, send a close frame, let the jobs already received
        finish, deliver their results (to ``on_result`` now; to the iterator, which yields them
        and then stops) and end the native threads.

        Called from a handler, from inside ``on_result`` or while another thread iterates, it
        only asks for the close and returns; the iteration in progress delivers the rest. An
        error that ended the connection is not raised here; the iterator raises it after the
        buffered results.
        """
        self._native.close()
        if self._delivering or _native.on_stream_thread():
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            while self._fill():
                pass
        except BaseException:
            # on_result raised, or Ctrl-C during the drain: the stream still ends, abruptly.
            self._abort(self._close_timeout)
            raise
        finally:
            self._lock.release()

    def cancel(self) -> None:
        """Aborts: stop reading, send a close frame, drop the queued jobs (counted in
        ``stats.cancelled``) and the results not yet delivered. Jobs already running finish
        (threads cannot be interrupted); this waits up to ``close_timeout`` for them. Called
        from a handler, it only asks; the consuming thread ends the stream."""
        if _native.on_stream_thread():
            self._native.cancel()
            return
        self._abort(self._close_timeout)

    def _abort(self, wait: float) -> None:
        self._native.cancel()
        self._buffer.clear()
        self._undelivered.clear()
        self._finished = True
        self._join(wait)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            self.close()
        else:
            # Ctrl-C (or SystemExit) must not wait for a slow handler: give running jobs a
            # moment, then leave; those still running end in the background.
            self._abort(min(self._close_timeout, _INTERRUPT_WAIT))

    # -- state -------------------------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters: received, processed, failed, cancelled, in_flight, bytes,
        elapsed, workers, threads."""
        return self._native.stats

    @property
    def error(self) -> Optional[BaseException]:
        """The exception that ended the stream abnormally, once it is over; else None."""
        return self._error

    @property
    def finished(self) -> bool:
        """True once every result has been handed over and the native threads have ended."""
        return self._finished

    def __repr__(self) -> str:
        state = "finished" if self._finished else "running"
        return f"<wspool.Stream {state} {self.stats!r}>"


def consume(
    url: str,
    handler: Optional[Handler] = None,
    *,
    workers: Optional[int] = None,
    decode: str = "text",
    subscribe: Subscribe = None,
    headers: Headers = None,
    on_result: Optional[OnResult] = None,
    timeout: Optional[float] = None,
    queue_size: int = 1024,
    open_timeout: float = 10.0,
    close_timeout: float = 5.0,
) -> Stream:
    """Connects to ``url`` and processes every message on a native worker pool.

    Returns a :class:`Stream` once the handshake is done; use it as a context manager and
    iterate it for results.

    Args:
        url: ``ws://`` or ``wss://`` URL (wss uses rustls with the webpki root certificates).
        handler: called as ``handler(job)`` on a pool thread for each message; its return value
            becomes ``result.value`` and an exception it raises becomes ``result.error`` (the
            stream goes on). ``None``: the value is the decoded payload.
        workers: size of the pool; default ``os.cpu_count()``.
        decode: ``"bytes"``, ``"text"`` (default) or ``"json"``; done on the workers without the
            GIL. A payload that does not decode gives a result whose error is a DecodeError.
        subscribe: a str, bytes, dict (sent as JSON) or a list of them, sent in order right
            after connecting.
        headers: extra handshake headers, as a dict or (name, value) pairs.
        on_result: called once per result, never concurrently, in the consuming thread.
        timeout: overall deadline in seconds; then the stream closes gracefully.
        queue_size: capacity of the job queue and of the result queue. When both are full,
            reading stops and TCP pushes back on the server; memory stays bounded by about
            ``2 * queue_size + workers`` messages.
        open_timeout: seconds allowed for TCP + TLS + handshake.
        close_timeout: seconds allowed for the closing handshake and for threads to end.

    Raises:
        ValueError: an unusable URL or argument (before any thread starts).
        ConnectError: refused, DNS or TLS failure. HandshakeError: the server refused the
        upgrade (``.status``). Timeout: ``open_timeout`` ran out.
    """
    if handler is not None and not callable(handler):
        raise ValueError(f"handler must be callable or None, not {type(handler).__name__}")
    if on_result is not None and not callable(on_result):
        raise ValueError(f"on_result must be callable or None, not {type(on_result).__name__}")
    if decode not in _DECODES:
        raise ValueError(f'decode must be "bytes", "text" or "json", not {decode!r}')
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, not {workers!r}")
    if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
        raise ValueError(f"queue_size must be a positive int, not {queue_size!r}")
    native = _native.NativeStream(
        url,
        handler,
        workers=workers,
        decode=decode,
        subscribe=_subscribe_messages(subscribe),
        headers=_header_pairs(headers),
        timeout=None if timeout is None else float(timeout),
        queue_size=queue_size,
        open_timeout=float(open_timeout),
        close_timeout=float(close_timeout),
    )
    try:
        native.wait_connected()
    except BaseException:
        native.cancel()
        native.join(close_timeout)
        raise
    return Stream(native, on_result, close_timeout)


def run(
    url: str,
    handler: Optional[Handler] = None,
    *,
    on_result: Optional[OnResult] = None,
    **options: Any,
) -> Stats:
    """Consumes ``url`` until the stream ends and returns its final :class:`Stats`.

    Takes the same arguments as :func:`consume`. Results go to ``on_result`` (if given) and
    are otherwise discarded. Raises what the iteration raises (ConnectionClosed...), and
    KeyboardInterrupt promptly on Ctrl-C.
    """
    with consume(url, handler, on_result=on_result, **options) as stream:
        for _ in stream:
            pass
    return stream.stats
