"""The Python half of a stream: argument checks, the result iterator, the callback hook and the
context manager. Everything that waits runs in the native core with the GIL released."""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import inspect
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Union

from . import _native
from ._native import Job, Result, Select, Stats
from .exceptions import JobFailed, WspoolError
from .journal import JobRecord

__all__ = ["Batches", "Event", "Reconnect", "Stream", "Values", "consume", "run"]

_log = logging.getLogger("wspool")

Handler = Callable[[Job], Any]
OnResult = Callable[[Result], Any]
SubscribeItem = Union[str, bytes, Mapping[str, Any], list]
SubscribeMessages = Union[SubscribeItem, Iterable[SubscribeItem], None]
Subscribe = Union[SubscribeMessages, Callable[[Optional[Job]], SubscribeMessages]]
Headers = Union[Mapping[str, str], Iterable["tuple[str, str]"], None]

_DECODES = ("bytes", "text", "json")
# How long leaving a stream by KeyboardInterrupt waits for running jobs.
_INTERRUPT_WAIT = 0.2


def _subscribe_messages(subscribe: SubscribeMessages) -> list[Union[str, bytes]]:
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


@dataclass(frozen=True)
class Reconnect:
    """Reconnect policy for :func:`consume` (``reconnect=Reconnect(...)`` or ``reconnect=True``).

    On a drop, an abnormal close that can be temporary (any code but 1000, 1002, 1003, 1007,
    1008, 1009, 1010), a refused or timed-out connection, or a handshake answered with HTTP 5xx
    or 429, wspool waits and connects again, then re-sends ``subscribe``. Other failures (TLS,
    other 4xx, protocol violations, ``MessageTooBig``, ``Overflow``) end the stream as without
    a policy. The wait before attempt n is ``min(maximum, initial * 2 ** (n - 1))`` seconds,
    times a random factor from 0.5 to 1 with ``jitter``.

    Args:
        max_attempts: failed attempts in a row before giving up (the last error is raised);
            None never gives up. A successful connection resets the count.
        initial: seconds before the first attempt.
        maximum: the longest wait, in seconds.
        jitter: randomise each wait so that many clients do not reconnect in step.
    """

    max_attempts: Optional[int] = None
    initial: float = 0.1
    maximum: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 0
        ):
            raise ValueError(f"max_attempts must be None or an int >= 0, not {self.max_attempts!r}")
        if not 0 < self.initial <= self.maximum < float("inf"):
            raise ValueError(
                f"Reconnect needs 0 < initial <= maximum < inf, got initial={self.initial!r}, "
                f"maximum={self.maximum!r}"
            )


@dataclass(frozen=True)
class Event:
    """What ``on_event`` receives about the connection.

    Attributes:
        kind: ``"connected"``, ``"disconnected"`` or ``"retrying"``.
        connection: the connection's number (0 for the first; for ``"retrying"``, the number
            the next connection will get). ``job.connection`` carries the same numbers, so a
            change of number marks where messages may have been missed.
        attempt: for ``"retrying"``, the attempt about to be made (1, 2, ...); else 0.
        delay: for ``"retrying"``, the seconds waited before it; else None.
        cause: the exception that ended the connection or failed the attempt; None for a
            normal end and for ``"connected"``.
    """

    kind: str
    connection: int
    attempt: int = 0
    delay: Optional[float] = None
    cause: Optional[BaseException] = None


OnEvent = Callable[[Event], Any]


def _log_event(event: Event) -> None:
    """The default ``on_event`` with a reconnect policy: say what happens on the "wspool"
    logger."""
    if event.kind == "retrying":
        _log.warning(
            "connection lost (%s); reconnecting in %.2f s (attempt %d)",
            event.cause,
            event.delay,
            event.attempt,
        )
    elif event.kind == "connected" and event.connection > 0:
        _log.warning("reconnected (connection %d)", event.connection)


def _reconnect_args(
    reconnect: Union[bool, Reconnect, None],
) -> Optional[tuple[Optional[int], float, float, bool]]:
    if reconnect is None or reconnect is False:
        return None
    if reconnect is True:
        reconnect = Reconnect()
    if not isinstance(reconnect, Reconnect):
        raise ValueError(
            f"reconnect must be a bool, None or wspool.Reconnect, not {type(reconnect).__name__}"
        )
    return (
        reconnect.max_attempts,
        float(reconnect.initial),
        float(reconnect.maximum),
        bool(reconnect.jitter),
    )


class _Resume:
    """What a subscribe callable needs: the last job delivered, and its own exception."""

    def __init__(self, make: Callable[[Optional[Job]], SubscribeMessages]) -> None:
        self.make = make
        self.last: Optional[Job] = None
        self.error: Optional[BaseException] = None

    def __call__(self, connection: int) -> list[Union[str, bytes]]:
        try:
            return _subscribe_messages(self.make(self.last))
        except BaseException as exc:
            self.error = exc
            raise


class _AsyncHandlers:
    """Runs an ``async def`` handler's coroutines on one event loop in a dedicated thread; each
    pool worker waits (GIL released) for the one it submitted, so at most ``workers`` run at
    once."""

    def __init__(self, handler: Callable[[Job], Awaitable[Any]]) -> None:
        self.handler = handler
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="wspool-async-handlers", daemon=True
        )
        self.thread.start()

    def __call__(self, job: Job) -> Any:
        coroutine = self.handler(job)
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(1.0)
        if not self.thread.is_alive():
            self.loop.close()


# Waits between the attempts of a failing handler with retries=N: 0.1 s, 0.2 s, 0.4 s... at most
# _RETRY_MAX seconds.
_RETRY_FIRST = 0.1
_RETRY_MAX = 5.0


def _retry_delay(attempt: int) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...)."""
    return min(_RETRY_MAX, _RETRY_FIRST * 2 ** (attempt - 1))


class _Retrying:
    """Calls the handler again when it raises an Exception, up to ``retries`` more times, waiting
    :func:`_retry_delay` between attempts (GIL released); the last exception is the result."""

    def __init__(self, handler: Callable[[Job], Any], retries: int) -> None:
        self.handler = handler
        self.retries = retries

    def __call__(self, job: Job) -> Any:
        attempt = 0
        while True:
            try:
                return self.handler(job)
            except Exception:
                if attempt >= self.retries:
                    raise
            attempt += 1
            time.sleep(_retry_delay(attempt))


def _is_async(handler: Any) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    call = type(handler).__dict__.get("__call__") if not inspect.isroutine(handler) else None
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


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
# interpreter finalizes would abort the process, so the exit waits for running handlers, up to
# close_timeout; handlers still running then are abandoned and the process leaves without
# finalizing (os._exit), so that it neither hangs nor crashes.
_live: weakref.WeakSet[Stream] = weakref.WeakSet()


def _flush_std() -> None:
    for out in (sys.stdout, sys.stderr):
        try:
            out.flush()
        except Exception:
            pass


def _exit_status() -> int:
    """The status the interpreter would most likely have exited with: 1 after an uncaught
    exception (130 for KeyboardInterrupt), else 0. (A ``sys.exit(n)`` code is not visible to
    exit hooks.)"""
    last = getattr(sys, "last_value", None)
    if isinstance(last, KeyboardInterrupt):
        return 130
    return 0 if last is None else 1


@atexit.register
def _cancel_live_streams() -> None:
    streams = list(_live)
    for stream in streams:
        stream._native.cancel(going_away=True)
    deadline = time.monotonic() + max((s._close_timeout for s in streams), default=0.0)
    try:
        stuck = [s for s in streams if not s._native.join(max(0.0, deadline - time.monotonic()))]
    except KeyboardInterrupt:
        # Finalizing now would crash when those handlers return: leave without it.
        _flush_std()
        os._exit(130)
    if not stuck:
        return
    for stream in stuck:
        stream._native.abandon()
    running = sum(s._native.stats.threads for s in stuck)
    print(
        f"wspool: {running} native thread(s) still inside a handler at exit after close_timeout; "
        "abandoning them and exiting without finalizing the interpreter",
        file=sys.stderr,
    )
    _flush_std()
    os._exit(_exit_status())


def _after_fork_in_child() -> None:
    """In a child made by ``os.fork()``: the parent's streams have no threads, runtime or
    connection here. Forget them at exit, and give each a fresh lock (a parent thread may have
    held it at the fork); using one raises WspoolError, closing or cancelling it does nothing.
    Results it had buffered stay the parent's (handing them out here too would process them
    twice). New streams work normally."""
    for stream in list(_live):
        stream._lock = threading.RLock()
        stream._buffer.clear()
        stream._undelivered.clear()
        stream._executor = None
        stream._pending = None
        stream._bell_waiters = {}
        stream._async_handlers = None
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _skip_failed(failed: str) -> bool:
    """Checks the ``failed=`` policy of the value iterators: True for "skip"."""
    if failed not in ("raise", "skip"):
        raise ValueError(f'failed must be "raise" or "skip", not {failed!r}')
    return failed == "skip"


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _nothing(got: Any) -> bool:
    """Whether a ``next_batch`` / ``next_values`` call found nothing within its timeout."""
    return got == [] or got == ([], None)


class _Stalled(Exception):
    """No result arrived for close_timeout while a close was draining the stream."""


class Stream:
    """A running stream of results; made by :func:`consume`.

    Iterate it (``for result in stream``, or ``async for`` inside ``async with``) to get one
    :class:`Result` per received message (dropped ones excepted, see ``overflow``), in
    completion order unless ``ordered`` asked otherwise. ``on_result``, when given, is called
    once per result, in the thread that consumes results (the iterating thread, or the one in
    :meth:`close` / ``with`` exit), never concurrently. The iteration ends after the last result
    when the server closes normally (code 1000), when :meth:`close` was called or when
    ``timeout`` ran out; it raises
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
        *,
        connected: bool = True,
        resume: Optional[_Resume] = None,
        async_handlers: Optional[_AsyncHandlers] = None,
    ) -> None:
        self._native = native
        self._on_result = on_result
        self._close_timeout = close_timeout
        self._batch_size = batch_size
        self._connected = connected
        self._resume = resume
        self._async_handlers = async_handlers
        # The thread that hands batches to an event loop (async iteration), made on first use,
        # and the batch it is fetching (kept across a cancelled await, so nothing is lost).
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # ("batch" or "values", its future): what was asked for, since a fetch left pending
        # by a cancelled await is what the next async call gets, whatever that one asks for.
        self._pending: Optional[tuple[str, concurrent.futures.Future[Any]]] = None
        # The native bell's file descriptor (None before first use, -1 where there is none),
        # and the async fetches waiting for it to ring, per event loop.
        self._bell: Optional[int] = None
        self._bell_waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self._yielded = False
        self._buffer: collections.deque[Result] = collections.deque()
        # Values taken for `values()` and not yet yielded.
        self._values: collections.deque[Any] = collections.deque()
        # Results not yet passed to on_result (if it raised, the rest wait here).
        self._undelivered: collections.deque[Result] = collections.deque()
        self._lock = threading.RLock()
        self._delivering = False
        self._finished = False
        self._joined = False
        self._error: Optional[BaseException] = None
        self._error_raised = False
        self._journal = native.journal()
        _live.add(self)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Result]:
        # A generator rather than __next__: one resumption per result instead of a Python
        # method call. The results stay in the stream's buffer, so breaking out of the loop
        # and iterating again loses nothing.
        buffer = self._buffer
        take = buffer.popleft
        resume = self._resume
        while self._wait_buffered():
            if resume is None:
                while buffer:
                    yield take()
            else:
                while buffer:
                    result = take()
                    resume.last = result.job
                    yield result

    def __next__(self) -> Result:
        if not self._wait_buffered():
            raise StopIteration
        result = self._buffer.popleft()
        if self._resume is not None:
            self._resume.last = result.job
        return result

    def batches(self, values: bool = False, *, failed: str = "raise") -> Batches:
        """Yields the results in lists, each holding what had arrived (at most ``batch_size``),
        waiting for at least one: the fastest way to consume a busy stream, since the
        per-result cost of iteration is paid once per list. Iterate it with ``for``, or with
        ``async for`` inside ``async with`` (the lists are then awaited without blocking the
        event loop: the fastest path for asyncio code too). Ends, or raises the error that
        ended the stream, as iteration does; ``on_result`` still sees every result.

        With ``values=True`` the lists hold each result's ``value`` instead of the
        :class:`Result` (as :meth:`values` does): no ``Result`` object is made for them,
        which is the fastest path when the ids and jobs are not needed. ``failed`` says what
        a failed job does then: ``"raise"`` (default) raises :class:`JobFailed` once the
        values before it are yielded; ``"skip"`` leaves it out (it is still counted in
        ``stats.failed`` and passed to ``on_result``).
        """
        return Batches(self, values, _skip_failed(failed))

    def values(self, *, failed: str = "raise") -> Values:
        """Each result's ``value`` (the decoded payload without a handler), without making
        :class:`Result` objects: for streams where the job ids and errors are not wanted one by
        one. Iterate it with ``for``, or with ``async for`` inside ``async with`` (which waits
        without blocking the event loop, taking results as ``async for result in stream``
        does). A failed job raises :class:`JobFailed` (``failed="raise"``, the default;
        iterating again goes on after it) or is left out (``failed="skip"``; it is still
        counted in ``stats.failed``)."""
        return Values(self, _skip_failed(failed))

    async def _anext_value(self, skip: bool) -> Any:
        """The next value for ``anext()`` on :meth:`values`."""
        while not self._values:
            batch = await self._anext_values(skip)
            if batch is None:
                raise StopAsyncIteration
            self._values.extend(batch)
        return self._values.popleft()

    async def _avalues(self, skip: bool) -> AsyncIterator[Any]:
        """``async for value in stream.values()``: a generator rather than ``__anext__``, one
        resumption per value instead of two coroutines. Values taken and not yet yielded wait
        in ``_values``, so breaking out of the loop and iterating again loses nothing."""
        pending = self._values
        take = pending.popleft
        while True:
            while pending:
                yield take()
            batch = await self._anext_values(skip)
            if batch is None:
                return
            pending.extend(batch)

    async def _anext_values(self, skip: bool) -> Optional[list[Any]]:
        """The async ``_value_batches``: the next list of values, None once the stream is over
        (after raising, once, the error that ended it)."""
        while True:
            out = self._buffered_values(skip)
            if out:
                return out
            if self._on_result is not None or self._resume is not None:
                if not await self._await_buffered():
                    return None
                continue
            got = await self._afetch("values")
            if got is None:
                self._raise_error()
                return None
            kind, what = got
            if kind == "values":
                batch = self._keep_values(what)
                if batch:
                    return batch
            else:
                self._keep(kind, what)

    def _value_iter(self, skip: bool) -> Iterator[Any]:
        # Values taken but not yet yielded wait in `_values`, so breaking out of the loop and
        # iterating again loses nothing.
        pending = self._values
        take = pending.popleft
        batches = self._value_batches(skip)
        while True:
            while pending:
                yield take()
            batch = next(batches, None)
            if batch is None:
                return
            pending.extend(batch)

    def _result_batches(self) -> Generator[list[Result], None, None]:
        while self._wait_buffered():
            yield self._take_buffered()

    def _take_buffered(self) -> list[Result]:
        batch = list(self._buffer)
        self._buffer.clear()
        if self._resume is not None:
            self._resume.last = batch[-1].job
        return batch

    def _value_batches(self, skip: bool) -> Generator[list[Any], None, None]:
        while True:
            out = self._buffered_values(skip)
            if out:
                yield out
            elif self._on_result is not None or self._resume is not None:
                if not self._wait_buffered():
                    return
            else:
                got = self._fetch(self._native.next_values)
                if got is None:
                    self._raise_error()
                    return
                batch = self._keep_values(got)
                if batch:
                    yield batch

    def _buffered_values(self, skip: bool) -> list[Any]:
        """The values already taken: those left by value iteration, else the results already
        made (left by iteration, or the rest of a batch after a failed one) unwrapped; empty
        when there are none. The rest come from the native side as plain values, unless
        on_result or a subscribe callable needs every Result."""
        if self._values:
            out = list(self._values)
            self._values.clear()
            return out
        buffer, resume = self._buffer, self._resume
        out = []
        while buffer:
            result = buffer.popleft()
            if resume is not None:
                resume.last = result.job
            if result.ok:
                out.append(result.value)
            elif skip:
                continue
            elif out:
                # Yield what came before it first; it raises on the next round.
                buffer.appendleft(result)
                break
            else:
                raise JobFailed(result) from result.error
        return out

    def _keep_values(self, got: tuple[list[Any], Optional[list[Result]]]) -> list[Any]:
        """What ``next_values`` returned: the values, and the results from the first failed
        one on (buffered, for the next round)."""
        batch, rest = got
        if rest is not None:
            self._buffer.extend(rest)
        return batch

    def _wait_buffered(self) -> bool:
        """Fills the buffer until it holds a result: True then; False once the stream is over
        (after raising, once, the error that ended it)."""
        while not self._buffer:
            if not self._fill():
                self._raise_error()
                return False
        return True

    def _raise_error(self) -> None:
        """Raises, once, the error that ended the stream, if any."""
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def _ensure_connected(self) -> None:
        # consume() inside a running event loop does not wait for the handshake; a synchronous
        # use of that stream waits here (GIL released) and raises what the opening raised.
        if self._connected:
            return
        try:
            self._native.wait_connected()
        except WspoolError as error:
            self._abort(self._close_timeout)
            raise self._chain(error) from error.__cause__
        self._connected = True

    def _chain(self, error: BaseException) -> BaseException:
        """Attaches the exception of the subscribe callable to the error it caused."""
        resume_error = self._resume.error if self._resume is not None else None
        if resume_error is not None and error.__cause__ is None:
            error.__cause__ = resume_error
        return error

    def _fill(self, stall_timeout: Optional[float] = None) -> bool:
        """Moves one batch from the native side into the buffer and passes each result to
        ``on_result``. False once the stream is over. Raises _Stalled when ``stall_timeout``
        seconds pass without a result."""
        batch = self._fetch(self._native.next_batch, stall_timeout)
        if batch is None:
            return False
        if batch == []:
            raise _Stalled
        return self._take(batch)

    def _fetch(self, fetch: Callable[[int, Optional[float]], Any], timeout: Any = None) -> Any:
        """One batch from the native side through ``fetch`` (``next_batch`` or
        ``next_values``), after delivering what ``on_result`` has not seen yet; None once the
        stream is over (its error, if any, kept for ``_raise_error``)."""
        with self._lock:
            self._deliver()
            if self._finished:
                # Ended by another thread (cancel): its threads must be gone here too.
                if not self._joined:
                    self._join(self._close_timeout)
                return None
            self._ensure_connected()
            try:
                batch = fetch(self._batch_size, timeout)
            except WspoolError as error:
                self._finish(error)
                return None
            if batch is None:
                self._finish(None)
            return batch

    def _take(self, batch: list[Result]) -> bool:
        # Buffered first: if on_result raises, the batch is still there for the iterator, and
        # the results it has not seen yet are passed to it on the next fill or close.
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
                result = pending.popleft()
                if self._resume is not None:
                    self._resume.last = result.job
                on_result(result)
        finally:
            self._delivering = False

    def _finish(self, error: Optional[BaseException]) -> None:
        self._set_end(error)
        self._join(self._close_timeout)

    def _set_end(self, error: Optional[BaseException]) -> None:
        self._finished = True
        self._error = None if error is None else self._chain(error)

    def _join(self, timeout: float) -> None:
        # Threads still inside a handler after `timeout` end when it returns; their jobs are
        # counted as abandoned, and the exit hook waits (bounded) for them.
        if self._native.join(timeout):
            self._on_joined()
        else:
            self._native.abandon()

    def _on_joined(self) -> None:
        """Every native thread has ended: forget the stream at exit, end the helper threads."""
        self._joined = True
        _live.discard(self)
        self._release()

    def _release(self) -> None:
        """Ends the helper threads once the native ones have ended."""
        if self._async_handlers is not None:
            self._async_handlers.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # -- asyncio -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Result]:
        # A generator rather than __anext__ (which stays, for anext()): one resumption per
        # result instead of a coroutine. The results stay in the stream's buffer, so breaking
        # out of the loop and iterating again loses nothing.
        return self._aresults()

    async def _aresults(self) -> AsyncIterator[Result]:
        buffer = self._buffer
        take = buffer.popleft
        while await self._await_buffered():
            while buffer:
                result = take()
                if self._resume is not None:
                    self._resume.last = result.job
                yield result

    async def __anext__(self) -> Result:
        if not await self._await_buffered():
            raise StopAsyncIteration
        result = self._buffer.popleft()
        if self._resume is not None:
            self._resume.last = result.job
        return result

    async def _await_buffered(self) -> bool:
        """The async ``_wait_buffered``."""
        while not self._buffer:
            if not await self._afill():
                self._raise_error()
                return False
        return True

    async def _anext_results(self) -> Optional[list[Result]]:
        """The next list for ``async for batch in stream.batches()``; None once over."""
        if not await self._await_buffered():
            return None
        return self._take_buffered()

    def _run_in_thread(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="wspool-async"
            )
        return self._executor.submit(fn)

    async def _afill(self, stall_timeout: Optional[float] = None) -> bool:
        """The async `_fill`."""
        got = await self._afetch("batch", stall_timeout)
        if got is None:
            return False
        return self._keep(*got)

    def _keep(self, kind: str, what: Any) -> bool:
        """Keeps what an async fetch of ``kind`` brought: results in the buffer (raising
        _Stalled for none), values (left by a cancelled ``values()`` await) in ``_values``."""
        if kind == "values":
            self._values.extend(self._keep_values(what))
            return True
        if what == []:
            raise _Stalled
        return self._take(what)

    async def _afetch(
        self, kind: str, timeout: Optional[float] = None
    ) -> Optional[tuple[str, Any]]:
        """The async `_fetch`: what is already there is taken at once; otherwise a helper
        thread waits for it (GIL released) and the event loop is woken through its thread-safe
        call when it is there; the loop never blocks. ``kind`` is "batch" (``next_batch``) or
        "values" (``next_values``); returns the kind that came and what it brought, None once
        the stream is over."""
        self._deliver()
        if self._pending is None and not self._finished and not self._yielded:
            # The loop's other tasks run once per batch, even when results never run out
            # (after a wait for the bell they just did).
            await asyncio.sleep(0)
        self._yielded = False
        if self._finished:
            if not self._joined:
                await self._ajoin(self._close_timeout)
            return None
        try:
            if self._pending is None:
                fetch = self._native.next_batch if kind == "batch" else self._native.next_values
                size = self._batch_size
                # Without waiting: the helper thread's round trip (a thread switch there and a
                # wake-up of the loop back) is only paid when nothing is ready.
                got = fetch(size, 0.0)
                if _nothing(got):
                    fd = self._bell_fd()
                    if fd < 0:
                        self._pending = (kind, self._run_in_thread(lambda: fetch(size, timeout)))
                    else:
                        got = await self._await_bell(fd, lambda: fetch(size, 0.0), timeout)
            if self._pending is not None:
                kind, pending = self._pending
                got = await asyncio.wrap_future(pending)
                # Only now: if the await was cancelled, the fetch stays pending for the next call.
                self._pending = None
        except WspoolError as error:
            self._pending = None
            await self._afinish(error)
            return None
        if got is None:
            await self._afinish(None)
            return None
        return kind, got

    def _bell_fd(self) -> int:
        if self._bell is None:
            fd = self._native.bell_fd()
            self._bell = -1 if fd is None else fd
        return self._bell

    async def _await_bell(self, fd: int, take: Callable[[], Any], timeout: Optional[float]) -> Any:
        """Waits, on the event loop itself, for the native side to ring (results came, or the
        stream ended: one wake-up of the loop, no helper thread), then returns what ``take``
        takes; what it took last (nothing) when ``timeout`` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._native.arm():
                waiter = loop.create_future()
                waiters = self._bell_waiters.setdefault(loop, [])
                if not waiters:
                    loop.add_reader(fd, self._on_bell, fd)
                waiters.append(waiter)
                try:
                    if deadline is None:
                        await waiter
                    else:
                        await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    pass
                finally:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._bell_waiters[loop]
                        loop.remove_reader(fd)
                self._yielded = True
            got = take()
            if not _nothing(got) or (deadline is not None and loop.time() >= deadline):
                return got

    def _on_bell(self, fd: int) -> None:
        # One byte per ring: one read empties it (a ring that finds it full adds nothing).
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up read already
            os.read(fd, 4096)
        # Waiters on other loops (the stream used from several threads) may not see the byte
        # this loop took: woken through their own loop.
        here = asyncio.get_running_loop()
        for loop, waiters in list(self._bell_waiters.items()):
            if loop is here:
                _wake(waiters)
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_wake, waiters)

    async def _afinish(self, error: Optional[BaseException]) -> None:
        self._set_end(error)
        await self._ajoin(self._close_timeout)

    async def _ajoin(self, timeout: float) -> None:
        joined = await asyncio.wrap_future(self._run_in_thread(lambda: self._native.join(timeout)))
        if joined:
            self._on_joined()
        else:
            self._native.abandon()

    async def __aenter__(self) -> Stream:
        if not self._connected:
            try:
                await asyncio.wrap_future(self._run_in_thread(self._native.wait_connected))
            except BaseException as error:
                self._drop()
                await self._ajoin(self._close_timeout)
                raise self._chain(error) from error.__cause__
            self._connected = True
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            await self.aclose()
        else:
            # Cancelled or interrupted: do not wait for running handlers more than a moment.
            self._drop(going_away=True)
            await self._ajoin(min(self._close_timeout, _INTERRUPT_WAIT))

    async def aclose(self) -> None:
        """The async :meth:`close`: stop reading, let the received jobs finish and deliver
        their results (to ``on_result`` now; to the async iterator, which yields them and then
        stops), without blocking the event loop."""
        self._native.close()
        if self._delivering or _native.on_stream_thread():
            return
        try:
            while await self._afill(self._close_timeout):
                pass
        except _Stalled:
            # No result for close_timeout (a handler hangs): give up, as close() does.
            self._drop()
            await self._ajoin(0.0)
        except BaseException:
            # on_result raised, or the task was cancelled during the drain: end abruptly, as
            # close() does.
            self._drop()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Closes gracefully: stop reading, send a close frame, let the jobs already received
        finish, deliver their results (to ``on_result`` now; to the iterator, which yields them
        and then stops) and end the native threads.

        Called from a handler, from inside ``on_result`` or while another thread iterates, it
        only asks for the close and returns; the iteration in progress delivers the rest. An
        error that ended the connection is not raised here; the iterator raises it after the
        buffered results.

        The drain goes on while results keep coming; once ``close_timeout`` seconds pass without
        any (a handler that hangs), it gives up: jobs still queued are counted in
        ``stats.cancelled`` and the ones still running in ``stats.abandoned``.
        """
        self._native.close()
        if self._delivering or _native.on_stream_thread():
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            while self._fill(self._close_timeout):
                pass
        except _Stalled:
            self._abort(0.0)
        except BaseException as exc:
            # on_result raised, or Ctrl-C during the drain: the stream still ends, abruptly.
            if isinstance(exc, Exception):
                self._abort(self._close_timeout)
            else:
                self._abort(min(self._close_timeout, _INTERRUPT_WAIT), going_away=True)
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

    def _abort(self, wait: float, going_away: bool = False) -> None:
        self._drop(going_away)
        self._join(wait)

    def _drop(self, going_away: bool = False) -> None:
        """Cancels natively and forgets every result not yet delivered; the stream is over.
        ``going_away``: the server gets close code 1001 (interrupted, exiting) instead of
        1000."""
        self._native.cancel(going_away=going_away)
        self._pending = None
        self._buffer.clear()
        self._undelivered.clear()
        self._finished = True

    def __enter__(self) -> Stream:
        self._ensure_connected()
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
            # moment, then leave; those still running end in the background (abandoned). The
            # server gets close code 1001 (going away).
            self._abort(min(self._close_timeout, _INTERRUPT_WAIT), going_away=True)

    # -- state -------------------------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters: received, processed, failed, cancelled, dropped,
        abandoned, in_flight, bytes, elapsed, workers, threads."""
        return self._native.stats

    def status(self, job_id: int) -> Optional[str]:
        """The journal status of job ``job_id``: ``"received"``, ``"running"``, ``"done"`` or
        ``"failed"``; None if the journal has no such job. Sees every status change made so far
        (a result already delivered is ``"done"`` or ``"failed"``). Needs ``journal=``."""
        return self._journal_view().status(job_id)

    def job_record(self, job_id: int) -> Optional[JobRecord]:
        """The journal's :class:`JobRecord` of job ``job_id`` (None if unknown), as
        :meth:`status` sees it. Needs ``journal=``."""
        row = self._journal_view().get(job_id)
        return None if row is None else JobRecord._from_native(row)

    @property
    def recovered(self) -> int:
        """Jobs left unfinished in the journal by an earlier run that this stream re-ran
        (handed to the pool) before any new message; 0 without a journal."""
        return 0 if self._journal is None else self._journal.recovered

    def _journal_view(self) -> _native.StreamJournal:
        if self._journal is None:
            raise ValueError("this stream has no journal: pass journal=path to consume()")
        return self._journal

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


class Values:
    """What :meth:`Stream.values` returns: an iterator of values for ``for``, and an async
    iterator for ``async for``. Values taken from the stream and not yet yielded stay with the
    stream, so breaking out of the loop and iterating again loses nothing."""

    def __init__(self, stream: Stream, skip: bool) -> None:
        self._stream = stream
        self._skip = skip
        self._sync: Optional[Iterator[Any]] = None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._sync is None:
            self._sync = self._stream._value_iter(self._skip)
        return next(self._sync)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._stream._avalues(self._skip)

    async def __anext__(self) -> Any:
        return await self._stream._anext_value(self._skip)


class Batches:
    """What :meth:`Stream.batches` returns: an iterator of lists (of results, or of values with
    ``values=True``) for ``for``, and an async iterator of them for ``async for``."""

    def __init__(self, stream: Stream, values: bool, skip: bool) -> None:
        self._stream = stream
        self._values = values
        self._skip = skip
        self._sync: Optional[Generator[list[Any], None, None]] = None

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        if self._sync is None:
            stream = self._stream
            self._sync = (
                stream._value_batches(self._skip) if self._values else stream._result_batches()
            )
        try:
            return next(self._sync)
        except JobFailed:
            # Iterating again goes on after the failed job, as with async for.
            self._sync = None
            raise

    def close(self) -> None:
        """Ends this iteration (the results not yet taken stay with the stream)."""
        if self._sync is not None:
            self._sync.close()

    def __aiter__(self) -> AsyncIterator[list[Any]]:
        return self

    async def __anext__(self) -> list[Any]:
        stream = self._stream
        if self._values:
            batch = await stream._anext_values(self._skip)
        else:
            batch = await stream._anext_results()
        if batch is None:
            raise StopAsyncIteration
        return batch


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
    overflow: str = "block",
    key: Optional[str] = None,
    ordered: Union[bool, str] = False,
    reconnect: Union[bool, Reconnect, None] = None,
    on_event: Optional[OnEvent] = None,
    ping_interval: Optional[float] = 20.0,
    ping_timeout: Optional[float] = 20.0,
    max_message_size: int = 16 * 1024 * 1024,
    open_timeout: float = 10.0,
    close_timeout: float = 5.0,
    ca: Union[str, os.PathLike[str], None] = None,
    reply: bool = False,
    journal: Union[str, os.PathLike[str], None] = None,
    journal_sync: str = "normal",
    retries: int = 0,
) -> Stream:
    """Connects to ``url`` and processes every message on a native worker pool.

    Returns a :class:`Stream` once the handshake is done; use it as a context manager and
    iterate it for results. Inside a running asyncio event loop it returns at once instead:
    use ``async with consume(...) as stream: async for result in stream``, which waits for the
    handshake and for results without blocking the loop.

    Args:
        url: ``ws://`` or ``wss://`` URL (wss uses rustls with the webpki root certificates).
        handler: called as ``handler(job)`` on a pool thread for each message; its return value
            becomes ``result.value`` and an exception it raises becomes ``result.error`` (the
            stream goes on). An ``async def`` handler runs on one event loop in a dedicated
            thread, at most ``workers`` at once. ``None``: the value is the decoded payload.
        workers: size of the pool; default ``os.cpu_count()``, except for a stream with no
            handler and ``decode="bytes"`` or ``"text"``, which has nothing for several workers
            to share: one, so its results also come in receipt order. For bytes that one is
            the consuming thread: no worker thread starts, the payloads come straight from the
            job queue.
        decode: ``"bytes"``, ``"text"`` (default) or ``"json"``; done on the workers without the
            GIL. A payload that does not decode gives a result whose error is a DecodeError.
        subscribe: a str, bytes, dict (sent as JSON) or a list of them, sent in order right
            after each connect; or a callable that receives the last job delivered to you (None
            at first) and returns them, e.g. to ask the server to replay from a sequence number
            after a reconnect (called on the I/O thread: keep it quick).
        headers: extra handshake headers, as a dict or (name, value) pairs.
        on_result: called once per result, never concurrently, in the consuming thread.
        timeout: overall deadline in seconds; then the stream closes gracefully.
        queue_size: jobs that may wait for a worker; also the size of the result queue and of
            the reorder window. Memory stays bounded by about ``(3 * queue_size + workers)``
            messages (``4 * queue_size + workers`` with ``ordered=True``); see the README.
        overflow: what a message does when ``queue_size`` jobs wait: ``"block"`` (default:
            stop reading, so TCP pushes back on the server), ``"drop_oldest"``,
            ``"drop_newest"``, ``"error"`` (the iterator raises :class:`Overflow`), or
            ``"conflate"`` (with ``key``: keep only the newest waiting message per key).
            Dropped messages are counted in ``stats.dropped``.
        key: a top-level JSON field whose value keys each message (read natively), for
            ``overflow="conflate"`` and ``ordered="key"``. Messages without it are never
            conflated and not ordered.
        ordered: ``False`` (default): results in completion order. ``True``: in receipt order,
            through a bounded reorder window (a slow job holds back the ones behind it).
            ``"key"``: receipt order within each key, different keys in parallel.
        reconnect: ``True`` or a :class:`Reconnect` policy: reconnect after drops with
            backoff. ``job.connection`` numbers the connections; ``stats.reconnects`` counts
            them.
        on_event: called with an :class:`Event` on connected / disconnected / retrying, on the
            I/O thread (keep it quick). Default with ``reconnect``: log on the "wspool" logger.
        ping_interval: seconds of silence before a ping is sent; None: no pings.
        ping_timeout: seconds after that ping without any frame before the connection is
            declared dead (a drop, code 1006); None: never. Only time spent waiting on the
            socket counts, so a consumer that pauses reading (backpressure) never blames the
            server.
        max_message_size: bytes; a larger message ends the connection with
            :class:`MessageTooBig` (close code 1009), refused before it is read whole.
        open_timeout: seconds allowed for TCP + TLS + handshake.
        close_timeout: seconds allowed for the closing handshake and for threads to end.
        ca: path to a PEM bundle of CA certificates to trust for ``wss://`` instead of the
            built-in web roots (a private CA, or a self-signed server certificate itself).
        reply: send each result's value back on the connection its message came from: str as
            a text message, bytes as a binary one, None sends nothing (another type makes that
            job fail with a TypeError). Without a handler the decoded payload is sent back (an
            echo; JSON as the text it came in). Replies go out in completion order (one worker
            keeps receipt order); one whose connection ended first is dropped and counted in
            ``stats.replies_dropped``; ``stats.replies`` counts the sent ones.
        journal: path of an SQLite journal (created if missing). Every message is written there
            with its job id, connection, receipt time and payload before a worker sees it, and
            its status moves ``received`` -> ``running`` -> ``done`` | ``failed`` (with the
            handler's value as JSON, or its repr, or the error's type and message). At start,
            the jobs an earlier run left ``received`` or ``running`` (a crash, a kill, a cancel)
            run again first (at-least-once), and job ids go on from the largest written. See
            :meth:`Stream.status` and :class:`wspool.Journal`. Needs ``overflow="block"``.
        journal_sync: ``"normal"`` (default: a commit survives the process being killed, not
            a power loss) or ``"full"`` (every commit is fsynced: survives a power loss too, at a
            cost in throughput).
        retries: when the handler raises an Exception, call it again up to this many times,
            waiting 0.1 s, 0.2 s, 0.4 s... (doubling, at most 5 s) in between on its worker; only
            the last exception becomes ``result.error`` (and the journal's error).

    Raises:
        ValueError: an unusable URL or argument (before any thread starts).
        ConnectError: refused, DNS or TLS failure. HandshakeError: the server refused the
        upgrade (``.status``). Timeout: ``open_timeout`` ran out. JournalError: ``journal`` is
        not a wspool journal or was written by a newer wspool (``.path``).
    """
    if handler is not None and not callable(handler):
        raise ValueError(f"handler must be callable or None, not {type(handler).__name__}")
    if on_result is not None and not callable(on_result):
        raise ValueError(f"on_result must be callable or None, not {type(on_result).__name__}")
    if on_event is not None and not callable(on_event):
        raise ValueError(f"on_event must be callable or None, not {type(on_event).__name__}")
    if decode not in _DECODES:
        raise ValueError(f'decode must be "bytes", "text" or "json", not {decode!r}')
    if workers is None:
        # Without a handler, the workers of a bytes or text stream only hand payloads on: one
        # is enough (more only contend for the cores with the reading thread and yours).
        workers = 1 if handler is None and decode != "json" else os.cpu_count() or 1
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, not {retries!r}")
    if journal_sync not in ("normal", "full"):
        raise ValueError(f'journal_sync must be "normal" or "full", not {journal_sync!r}')
    for name, value in (
        ("workers", workers),
        ("queue_size", queue_size),
        ("max_message_size", max_message_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, not {value!r}")
    if ordered is False:
        order = "completion"
    elif ordered is True:
        order = "receipt"
    elif ordered == "key":
        order = "key"
    else:
        raise ValueError(f'ordered must be False, True or "key", not {ordered!r}')
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError(f"key must be a non-empty str (a JSON field name), not {key!r}")
    if not isinstance(reply, bool):
        raise ValueError(f"reply must be True or False, not {reply!r}")
    if ca is not None and not isinstance(ca, (str, os.PathLike)):
        raise ValueError(f"ca must be a path to a PEM file or None, not {type(ca).__name__}")
    reconnect_args = _reconnect_args(reconnect)
    if on_event is None and reconnect_args is not None:
        on_event = _log_event
    native_on_event = None
    if on_event is not None:
        user_on_event = on_event

        def native_on_event(
            kind: str,
            connection: int,
            attempt: int,
            delay: Optional[float],
            cause: Optional[BaseException],
        ) -> None:
            user_on_event(Event(kind, connection, attempt, delay, cause))

    resume = None
    native_subscribe: Any
    if callable(subscribe):
        resume = _Resume(subscribe)
        native_subscribe = resume
    else:
        native_subscribe = _subscribe_messages(subscribe)
    async_handlers = None
    if handler is not None and _is_async(handler):
        async_handlers = _AsyncHandlers(handler)
        handler = async_handlers
    # A native Select never raises (a payload that is not JSON is a DecodeError): no retries.
    if handler is not None and retries > 0 and not isinstance(handler, Select):
        handler = _Retrying(handler, retries)
    try:
        native = _native.NativeStream(
            url,
            handler,
            workers=workers,
            decode=decode,
            subscribe=native_subscribe,
            headers=_header_pairs(headers),
            timeout=None if timeout is None else float(timeout),
            queue_size=queue_size,
            open_timeout=float(open_timeout),
            close_timeout=float(close_timeout),
            overflow=overflow,
            key=key,
            ordered=order,
            ping_interval=None if ping_interval is None else float(ping_interval),
            ping_timeout=None if ping_timeout is None else float(ping_timeout),
            max_message_size=max_message_size,
            reconnect=reconnect_args,
            on_event=native_on_event,
            ca=None if ca is None else os.fspath(ca),
            reply=reply,
            journal=None if journal is None else os.fspath(journal),
            journal_sync=journal_sync,
        )
    except BaseException:
        if async_handlers is not None:
            async_handlers.stop()
        raise
    stream = Stream(
        native,
        on_result,
        close_timeout,
        connected=False,
        resume=resume,
        async_handlers=async_handlers,
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # No event loop here: wait for the handshake now, so errors surface from consume().
        stream._ensure_connected()
    return stream


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
