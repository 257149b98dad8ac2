"""A scriptable WebSocket server for testing WebSocket consumers.

:class:`MockServer` runs a real WebSocket server (built on the ``websockets`` package) on the
loopback interface, in its own asyncio event loop on a background daemon thread. Every connection
it accepts gets a scripted stream of messages, followed by a scripted ending: a close frame with a
chosen code and reason, an abrupt TCP drop, or nothing at all (the connection stays open until the
client closes it). It can also refuse the opening handshake with an HTTP status, echo what clients
send, pace the stream at a given rate, drop only the first few connections, freeze (stop sending and
reading while keeping the TCP connection open, like a half-open connection), send keepalive pings,
and build each connection's stream from what its client sent (see :class:`ConnectionInfo`).

It is meant for testing wspool itself and for testing your own consumers built on wspool (or on
anything else that speaks WebSocket) without a network service::

    from wspool.testing import MockServer

    with MockServer(count=1000, rate=500) as server:
        run_my_consumer(server.url)  # "ws://127.0.0.1:PORT/"
        assert server.wait_for(lambda s: s.close_codes == [1000])

Everything the server sees is recorded and can be read from any thread: ``received`` (messages
from clients), ``connections``, ``close_codes`` (the codes clients closed with),
``server_close_codes`` (the codes the server closed with), ``sent``, ``frozen``, and ``stalls`` and
``stalled_seconds`` (how often and how long writes waited for a client that did not read).

With pytest, the ``mock_server`` fixture from :mod:`wspool.pytest_plugin` makes servers and stops
them at teardown. The module can also be run from the command line for manual testing::

    python -m wspool.testing --count 100000 --rate 1000 --port 8765

This module needs the ``websockets`` package, version 13 or later (``pip install
'websockets>=13'``); it does not depend on the rest of wspool.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import http
import inspect
import ipaddress
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

try:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.datastructures import Headers
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request, Response
    from websockets.protocol import State
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "wspool.testing needs the 'websockets' package, version 13 or later "
        "(pip install 'websockets>=13')"
    ) from _exc

__all__ = ["ConnectionInfo", "MockServer", "generate_messages", "main"]

#: A message the server can send: ``str`` goes out as a text frame, ``bytes`` as a binary frame.
Message = Union[str, bytes]

_THREAD_NAME = "wspool-mock-server"
_START_TIMEOUT = 5.0  # seconds start() waits for the server to listen
_CLOSE_TIMEOUT = 2.0  # seconds a closing handshake may take before the TCP connection is dropped
_SHUTDOWN_TIMEOUT = 1.0  # seconds stop() lets connections close, twice (see _run)
_JOIN_TIMEOUT = 5.0  # seconds stop() waits for the thread on top of those
_FLUSH_TIMEOUT = 2.0  # seconds drop_after waits for sent data to leave the write buffer
_BATCH_SIZE = 256  # most messages handed to the socket in one write
_POLL_INTERVAL = 0.01  # seconds between two looks at the predicate in wait_for()
_FREEZE_POLL_INTERVAL = 0.02  # seconds between two looks at a frozen connection's socket

# Close codes an endpoint may put in a close frame (RFC 6455, section 7.4).
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012})
_SENDABLE_CLOSE_CODES |= frozenset({1013, 1014})


def generate_messages(count: int) -> Iterator[str]:
    """Yield ``count`` JSON text messages shaped like a market-data feed.

    Message ``seq`` (0 to ``count - 1``) looks like::

        {"seq": 17, "id": "8f2a...-uuid4", "type": 3, "price": 101.25, "qty": 0.5}

    ``type`` cycles through 1, 2, 3 (``seq % 3 + 1``); ``price`` (100.0 to 102.75) and ``qty``
    (0.25 to 2.0) are multiples of 0.25 that depend only on ``seq``, so they print exactly; ``id``
    is a fresh random UUID4 string. Each message is about 90 bytes of UTF-8.

    Args:
        count: how many messages to yield.

    Raises:
        TypeError: ``count`` is not an int.
        ValueError: ``count`` is negative.
    """
    _check_count(count, "count")
    return _generate(count)


def _generate(count: int) -> Iterator[str]:
    uuid4 = uuid.uuid4
    for seq in range(count):
        price = 100.0 + (seq % 12) * 0.25
        qty = (seq % 8 + 1) * 0.25
        yield (
            f'{{"seq": {seq}, "id": "{uuid4()}", "type": {seq % 3 + 1}, '
            f'"price": {price!r}, "qty": {qty!r}}}'
        )


def _check_count(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _wants_info(func: Callable[..., Any]) -> bool:
    """Whether a ``messages`` callable is to be called with a :class:`ConnectionInfo`.

    True if it has exactly one required positional parameter, False if it has none (it is then
    called with no arguments, as before ConnectionInfo existed).
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to read (some builtins): call it bare
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p for p in signature.parameters.values() if p.default is p.empty and p.kind in positional
    ]
    keyword_only = [
        p
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    if len(required) > 1 or keyword_only:
        raise TypeError(
            "a messages callable must take no arguments, or one positional argument (a "
            f"ConnectionInfo); this one takes {signature}"
        )
    return len(required) == 1


def _peer_closed(fd: int) -> bool:
    """Whether the peer closed or reset the TCP connection on socket ``fd``, without reading.

    On Linux this sees a FIN even behind unread data (``POLLRDHUP``). Elsewhere it peeks: a FIN
    is seen only once no unread data is left before it, a reset always.
    """
    rdhup = getattr(select, "POLLRDHUP", 0)
    if rdhup and hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, rdhup)  # POLLHUP, POLLERR and POLLNVAL are always reported
        return bool(poller.poll(0))
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        sock.detach()  # the fd belongs to the transport: do not close it


def _close_code(close: Any) -> Optional[int]:
    """The code of a close frame, as a plain int; None for no frame, or one without a code."""
    if close is None or close.code == 1005:
        return None
    return int(close.code)


def _write_paused(connection: Any, transport: Any) -> bool:
    """Whether writing to a connection is paused, so that drain() will wait for the client."""
    paused = getattr(connection, "paused", None)  # websockets' flow-control flag
    if isinstance(paused, bool):
        return paused
    return bool(transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1])


def _to_message(item: Any) -> Message:
    """Turn one item of a message stream into what goes on the wire."""
    if isinstance(item, (str, bytes)):
        return item
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (dict, list)):
        return json.dumps(item)
    raise TypeError(
        "a message must be str (text frame), bytes (binary frame), or a dict or list "
        f"(sent as JSON text), not {type(item).__name__}"
    )


def _quiet_logger() -> logging.Logger:
    # A logger that is not registered with the logging module, so it neither changes nor is
    # changed by the application's logging configuration, and that lets nothing through:
    # websockets reports every client that drops or fails its handshake, which is expected here.
    logger = logging.Logger("wspool.testing.MockServer", level=logging.CRITICAL + 10)
    logger.propagate = False
    logger.disabled = True
    return logger


@dataclass(frozen=True)
class ConnectionInfo:
    """What a ``messages`` callable taking one argument is told about its connection.

    :class:`MockServer` calls such a callable once per accepted connection, after
    ``start_delay``, to get that connection's stream: it can answer what the client asked for,
    e.g. resume from the sequence number in the client's first message::

        def resume(info: ConnectionInfo) -> list[dict]:
            start = json.loads(info.received[0])["resume_from"] if info.received else 0
            return [{"seq": seq} for seq in range(start, start + 100)]

        MockServer(resume, start_delay=0.2)

    Attributes:
        index: the number of this connection among those the server accepted, from 0 (the
            count goes on across restarts, as :attr:`MockServer.connections` does).
        received: a snapshot of the messages this client sent on this connection before the
            call (``str`` for text, ``bytes`` for binary), in order. Sent by a client right
            after connecting, a message is here if ``start_delay`` gave it time to arrive.
        request_headers: the handshake request headers of this connection.
        path: the request target of the handshake, e.g. ``"/"`` or ``"/feed?from=12"``.
    """

    index: int
    received: list[Message]
    request_headers: dict[str, str]
    path: str


class _Session:
    """One accepted connection, inside the server thread."""

    __slots__ = ("connection", "index", "path", "reader", "received", "request_headers")

    def __init__(
        self, connection: ServerConnection, index: int, path: str, headers: dict[str, str]
    ) -> None:
        self.connection = connection
        self.index = index
        self.path = path
        self.request_headers = headers
        self.received: list[Message] = []
        self.reader: Optional[asyncio.Future[None]] = None

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(
            index=self.index,
            received=list(self.received),
            request_headers=dict(self.request_headers),
            path=self.path,
        )


class MockServer:
    """A scriptable WebSocket server on a background thread, for tests.

    Every accepted connection gets the same script: wait ``start_delay``, send the messages (all
    of them; or ``drop_after`` of them and then drop the TCP connection; or ``freeze_after`` of
    them and then freeze), then close with ``close_code`` and ``close_reason``, or keep the
    connection open if ``close_code`` is None. ``drop_connections`` and ``freeze_connections``
    limit the drop and the freeze to the first connections, and a ``messages`` callable can
    give each connection its own stream. What clients send is recorded in :attr:`received` and,
    with ``echo=True``, sent back.

    Use it as a context manager (``with MockServer(count=10) as server:``), or call
    :meth:`start` and :meth:`stop`. A stopped server can be started again; it listens on the same
    port, so its :attr:`url` does not change, and its records keep growing.

    Args:
        messages: what to send on each connection. An iterable of ``str`` (each sent as a text
            frame), ``bytes``, ``bytearray`` or ``memoryview`` (binary frames), or ``dict`` or
            ``list`` (sent as JSON text); or a callable that returns such an iterable, called
            once per connection (after ``start_delay``, in the server thread) so that each
            connection gets a fresh stream. A callable with one required positional parameter
            is called with a :class:`ConnectionInfo` (the connection's number, what its client
            has sent so far, its request headers and path), so that the stream can depend on
            what the client asked for; one with no required parameter is called with no
            arguments. A list or tuple is sent in full on every connection; a generator or other
            iterator can be consumed only once, so only the first connection gets its messages
            (pass ``lambda: my_generator()`` to get a fresh one each time). Items of a
            callable's or iterator's stream are checked when they are sent: a bad one, or an
            exception from the callable, ends that connection with close code 1011 and is
            recorded in :attr:`errors`.
        count: instead of ``messages``, send ``count`` generated JSON messages, ``seq`` 0 to
            ``count - 1`` on each connection (see :func:`generate_messages`). With neither
            ``messages`` nor ``count`` the stream is empty.
        rate: messages per second to pace the stream at (on average, by sleeping; a late
            message is sent at once, so the average holds). None sends as fast as possible.
        close_code: the close code sent after the last message; None keeps the connection open,
            sending nothing more, until the client closes it (or the server stops).
        close_reason: the close reason sent with ``close_code``; at most 123 bytes of UTF-8.
        reject: an HTTP status code (200 to 599, e.g. 403). The opening handshake of every
            connection is then refused with that status and a short plain-text body.
        drop_after: after sending this many messages (of the stream: echoes do not count),
            wait until they have left the server's buffers and abort the TCP connection,
            without a close frame, as a network drop would. If the stream ends first, the
            connection ends as it would without ``drop_after``.
        drop_connections: with ``drop_after``, drop only the first ``drop_connections``
            connections the server accepts (counted from the start, across restarts); later
            ones get their whole stream and the usual ending. None drops every connection.
        freeze_after: after sending this many messages (of the stream), freeze the connection:
            send nothing more (no data, no pings, no close frame) and stop reading from the
            socket, so that the client's pings are not answered and its messages and close
            frame are neither recorded nor processed, but keep the TCP connection open, as a
            half-open connection (a peer or middlebox gone silent) would. It stays so until the
            client closes the TCP connection (the server notices within about 20 ms and aborts
            its end; on systems other than Linux, only if the client sent nothing after the
            freeze) or until :meth:`stop`, which aborts it at once. Its :attr:`close_codes` and
            :attr:`server_close_codes` entries are None. If the stream ends first, the
            connection ends as it would without ``freeze_after``. Cannot be combined with
            ``drop_after``.
        freeze_connections: with ``freeze_after``, freeze only the first
            ``freeze_connections`` connections (counted as for ``drop_connections``). None
            freezes every connection.
        echo: send every message a client sends back to it (text as text, binary as binary),
            interleaved with the stream.
        host: the address to listen on. Keep it a loopback address; use an IP address rather
            than a name, as a name that resolves to several addresses gets several ports when
            ``port`` is 0 (and :attr:`port` reports the first).
        port: the TCP port; 0 picks a free one (read it from :attr:`port` or :attr:`url`).
        start_delay: seconds to wait after the opening handshake before the stream starts,
            e.g. so that a client's subscribe messages arrive before the data.
        ping_interval: seconds between the keepalive pings the server sends on each connection
            (websockets' keepalive); None sends no pings, so an idle connection stays idle.
        ping_timeout: with ``ping_interval``, seconds the server waits for the pong to a ping.
            A client that does not answer in time has its connection closed by the server with
            code 1011 (reason "keepalive ping timeout"), which shows in
            :attr:`server_close_codes`. None waits for pongs forever.

    Raises:
        TypeError: an argument has the wrong type (including an item of a ``messages`` list,
            and a ``messages`` callable that needs more than one argument).
        ValueError: an argument is out of range, both ``messages`` and ``count`` are given,
            both ``drop_after`` and ``freeze_after`` are given, or ``drop_connections``,
            ``freeze_connections`` or ``ping_timeout`` is given without ``drop_after``,
            ``freeze_after`` or ``ping_interval`` respectively.

    Permessage-deflate compression is off, so frames go out exactly as given.
    """

    def __init__(
        self,
        messages: Union[
            Iterable[Any],
            Callable[[], Iterable[Any]],
            Callable[[ConnectionInfo], Iterable[Any]],
            None,
        ] = None,
        *,
        count: Optional[int] = None,
        rate: Optional[float] = None,
        close_code: Optional[int] = 1000,
        close_reason: str = "stream is over",
        reject: Optional[int] = None,
        drop_after: Optional[int] = None,
        drop_connections: Optional[int] = None,
        freeze_after: Optional[int] = None,
        freeze_connections: Optional[int] = None,
        echo: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        start_delay: float = 0.0,
        ping_interval: Optional[float] = None,
        ping_timeout: Optional[float] = None,
    ) -> None:
        if messages is not None and count is not None:
            raise ValueError("give either messages or count, not both")
        if isinstance(messages, (str, bytes, bytearray, memoryview, dict)):
            raise TypeError(
                f"messages must be an iterable of messages, not a single {type(messages).__name__}"
                " (wrap it in a list)"
            )
        wants_info = False
        if isinstance(messages, (list, tuple)):
            messages = tuple(_to_message(item) for item in messages)
        elif callable(messages):
            wants_info = _wants_info(messages)
        elif messages is not None:
            try:
                iter(messages)
            except TypeError:
                raise TypeError(
                    "messages must be an iterable or a callable returning one, not "
                    f"{type(messages).__name__}"
                ) from None
        if count is not None:
            _check_count(count, "count")
        if rate is not None:
            _check_positive(rate, "rate")
        if close_code is not None:
            if isinstance(close_code, bool) or not isinstance(close_code, int):
                raise TypeError(f"close_code must be an int or None, not {type(close_code)}")
            if close_code not in _SENDABLE_CLOSE_CODES and not 3000 <= close_code <= 4999:
                raise ValueError(
                    f"close_code {close_code} cannot be sent in a close frame; use 1000-1003, "
                    "1007-1014 or 3000-4999"
                )
        if not isinstance(close_reason, str):
            raise TypeError(f"close_reason must be a str, not {type(close_reason).__name__}")
        if len(close_reason.encode("utf-8")) > 123:
            raise ValueError("close_reason must be at most 123 bytes of UTF-8")
        if reject is not None:
            if isinstance(reject, bool) or not isinstance(reject, int):
                raise TypeError(f"reject must be an int HTTP status, not {type(reject).__name__}")
            if not 200 <= reject <= 599:
                raise ValueError(f"reject must be an HTTP status from 200 to 599, got {reject}")
        if drop_after is not None:
            _check_count(drop_after, "drop_after")
        if drop_connections is not None:
            _check_count(drop_connections, "drop_connections")
            if drop_after is None:
                raise ValueError("drop_connections needs drop_after")
        if freeze_after is not None:
            _check_count(freeze_after, "freeze_after")
            if drop_after is not None:
                raise ValueError("give either drop_after or freeze_after, not both")
        if freeze_connections is not None:
            _check_count(freeze_connections, "freeze_connections")
            if freeze_after is None:
                raise ValueError("freeze_connections needs freeze_after")
        if not isinstance(host, str) or not host:
            raise TypeError("host must be a non-empty str")
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, got {port}")
        if isinstance(start_delay, bool) or not isinstance(start_delay, (int, float)):
            raise TypeError(f"start_delay must be a number, not {type(start_delay).__name__}")
        if not 0 <= start_delay < float("inf"):
            raise ValueError(f"start_delay must be >= 0 and finite, got {start_delay}")
        if ping_interval is not None:
            _check_positive(ping_interval, "ping_interval")
        if ping_timeout is not None:
            _check_positive(ping_timeout, "ping_timeout")
            if ping_interval is None:
                raise ValueError("ping_timeout needs ping_interval (no pings are sent without it)")

        self._messages = messages
        self._messages_want_info = wants_info
        self._count = count
        self._rate = None if rate is None else float(rate)
        self._close_code = close_code
        self._close_reason = close_reason
        self._reject = reject
        self._drop_after = drop_after
        self._drop_connections = drop_connections
        self._freeze_after = freeze_after
        self._freeze_connections = freeze_connections
        self._echo = bool(echo)
        self._host = host
        self._port = port
        self._start_delay = float(start_delay)
        self._ping_interval = None if ping_interval is None else float(ping_interval)
        self._ping_timeout = None if ping_timeout is None else float(ping_timeout)

        self._lock = threading.Lock()
        self._received: list[Message] = []
        self._close_codes: list[Optional[int]] = []
        self._server_close_codes: list[Optional[int]] = []
        self._errors: list[BaseException] = []
        self._connections = 0
        self._request_headers: list[dict[str, str]] = []
        self._sent = 0
        self._frozen = 0
        self._stalls = 0
        self._stalled_seconds = 0.0

        # Lifecycle, guarded by _life_lock so that start() and stop() may come from any thread.
        self._life_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._logger = _quiet_logger()
        self._open: set[ServerConnection] = set()  # used in the server thread only
        self._frozen_open: set[ServerConnection] = set()  # likewise: frozen and not yet closed

    # ----------------------------------------------------------------------------------------
    # What the server has seen. Each property returns a snapshot, safe to read from any thread.

    @property
    def host(self) -> str:
        """The address the server listens on, as given to the constructor."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port: the one bound once started (a free one if ``port=0`` was given)."""
        return self._port

    @property
    def url(self) -> str:
        """The URL clients connect to, ``ws://HOST:PORT/``.

        Raises:
            RuntimeError: the server was made with ``port=0`` and has not been started yet, so
                it has no port.
        """
        if self._port == 0:
            raise RuntimeError("MockServer has no port yet: start() it first")
        host = self._host
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"ws://{host}:{self._port}/"

    @property
    def received(self) -> list[Message]:
        """A copy of every message received from clients, all connections, in arrival order.

        Text messages are ``str``, binary ones ``bytes``. Recorded whether or not ``echo`` is on.
        """
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        """How many WebSocket connections have been accepted (rejected handshakes not counted)."""
        with self._lock:
            return self._connections

    @property
    def request_headers(self) -> list[dict[str, str]]:
        """A copy of the handshake request headers of each accepted connection, in order."""
        with self._lock:
            return [dict(h) for h in self._request_headers]

    @property
    def close_codes(self) -> list[Optional[int]]:
        """A copy of the close codes clients sent, one per finished connection, in finish order.

        An entry is None when the client sent no close code: it closed the TCP connection
        without a close frame, its close frame had no code, the server dropped the connection
        (``drop_after``), or the connection was frozen (``freeze_after``: the client's close
        frame is not read). When the server closes first, a client's reply normally echoes the
        server's code. A connection still open has no entry yet.
        """
        with self._lock:
            return list(self._close_codes)

    @property
    def server_close_codes(self) -> list[Optional[int]]:
        """A copy of the close codes the server sent, one per finished connection.

        Entry ``i`` belongs to the same connection as entry ``i`` of :attr:`close_codes`. It is
        the code of the close frame the server sent: ``close_code`` at the end of the stream,
        1001 from :meth:`stop`, 1011 after a keepalive ping went unanswered for
        ``ping_timeout`` (or after a bad stream item), or, when the client closed first, the
        client's code echoed back. None when the server sent no close frame (a drop, a freeze,
        the client closing the TCP connection first, or a client close frame without a code).
        """
        with self._lock:
            return list(self._server_close_codes)

    @property
    def sent(self) -> int:
        """How many data messages the server has sent, all connections, echoes included."""
        with self._lock:
            return self._sent

    @property
    def frozen(self) -> int:
        """How many connections have been frozen (``freeze_after``), including finished ones."""
        with self._lock:
            return self._frozen

    @property
    def stalls(self) -> int:
        """How many writes to a client had to wait because the client was not reading.

        A write of the stream (or of an echo) goes into the connection's write buffer; when
        the buffer is above its high-water mark (32 KiB, once the kernel's socket buffers are
        full), the server waits for it to drain before it writes more: TCP backpressure from a
        slow client. Each such wait counts once, as soon as it starts, all connections
        together; a client that keeps up causes none.
        """
        with self._lock:
            return self._stalls

    @property
    def stalled_seconds(self) -> float:
        """The total time, in seconds, the waits counted by :attr:`stalls` lasted.

        A wait adds its time when it ends, so one still under way is not in this total yet.
        """
        with self._lock:
            return self._stalled_seconds

    @property
    def errors(self) -> list[BaseException]:
        """A copy of the unexpected errors raised inside the server thread.

        For instance a ``TypeError`` for a stream item that is not a valid message. Empty when
        all went well; tests may assert so.
        """
        with self._lock:
            return list(self._errors)

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and the next :meth:`stop`."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._ready.is_set()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MockServer {state} {self._host}:{self._port}>"

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> MockServer:
        """Start the server thread and return once the server is listening.

        Does nothing if the server is already running. After :meth:`stop`, starts it again on
        the same port.

        Returns:
            The server itself, so that ``server = MockServer(count=10).start()`` works.

        Raises:
            RuntimeError: the server could not listen (the message names the cause, e.g. the
                port is in use; the ``OSError`` is chained) or did not start within 5 s.
        """
        with self._life_lock:
            if self._thread is not None:
                if self._thread.is_alive():
                    return self
                self._thread = None
            self._ready.clear()
            self._start_error = None
            self._loop = None
            self._stop_event = None
            thread = threading.Thread(target=self._thread_main, name=_THREAD_NAME, daemon=True)
            self._thread = thread
            thread.start()
            started = self._ready.wait(_START_TIMEOUT)
            error = self._start_error
        if error is not None:
            thread.join(_JOIN_TIMEOUT)
            with self._life_lock:
                if self._thread is thread:
                    self._thread = None
            raise RuntimeError(
                f"MockServer could not listen on {self._host}:{self._port}: {error}"
            ) from error
        if not started:
            self.stop()
            raise RuntimeError(
                f"MockServer did not start listening on {self._host}:{self._port} "
                f"within {_START_TIMEOUT:g} s"
            )
        return self

    def stop(self) -> None:
        """Stop the server: close every connection, stop the event loop and join the thread.

        Open connections are closed with code 1001 (going away); whatever has not finished
        within a few seconds is cancelled. Safe to call more than once, and on a server that
        was never started.

        Raises:
            RuntimeError: called from the server's own thread (e.g. from a message callable),
                or the thread did not end in time (a bug; the daemon thread is then left behind).
        """
        with self._life_lock:
            thread = self._thread
            if thread is None:
                return
            if thread is threading.current_thread():
                raise RuntimeError("MockServer.stop() cannot be called from the server thread")
            loop, stop_event = self._loop, self._stop_event
            if loop is not None and stop_event is not None:
                try:
                    loop.call_soon_threadsafe(stop_event.set)
                except RuntimeError:  # the loop has closed already: the thread is ending
                    pass
            thread.join(2 * _SHUTDOWN_TIMEOUT + _JOIN_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("MockServer thread did not stop in time")
            self._thread = None
            self._loop = None
            self._stop_event = None

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_for(self, predicate: Callable[[MockServer], Any], timeout: float = 5.0) -> bool:
        """Wait until ``predicate(server)`` is true, looking every 10 ms.

        Example: ``server.wait_for(lambda s: len(s.received) >= 2)``.

        Args:
            predicate: called with this server; any truthy result ends the wait.
            timeout: seconds to wait at most.

        Returns:
            True as soon as the predicate is true, False if it is still false after ``timeout``.

        Raises:
            Whatever the predicate raises.
        """
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(_POLL_INTERVAL, remaining))

    def serve_forever(self) -> None:
        """Start the server if needed and block until Ctrl-C (KeyboardInterrupt), then stop.

        For command-line use. Waits in short slices on the calling thread, so Ctrl-C is handled
        promptly; the KeyboardInterrupt is not re-raised. Also returns if the server thread ends
        by itself.

        Raises:
            RuntimeError: as :meth:`start` does.
        """
        self.start()
        try:
            while True:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    break
                thread.join(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # ----------------------------------------------------------------------------------------
    # Inside the server thread

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._run())
        except BaseException as exc:  # reported through start() or errors
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                self._record_error(exc)
        finally:
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException) and not isinstance(exc, (ConnectionClosed, OSError)):
            self._record_error(exc)

    async def _run(self) -> None:
        self._stop_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            server = await serve(
                self._handle,
                self._host,
                self._port,
                process_request=self._process_request if self._reject is not None else None,
                compression=None,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                close_timeout=_CLOSE_TIMEOUT,
                logger=self._logger,
            )
        except BaseException as exc:  # handed to start()
            self._start_error = exc
            self._ready.set()
            return
        sockets = list(server.sockets)
        if self._port == 0 and sockets:
            self._port = sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            # A frozen connection sends no close frame: abort it. Close every other connection
            # with 1001 (going away). A client that does not read cannot take the close frame:
            # after a grace period its TCP connection is aborted instead.
            for connection in list(self._frozen_open):
                connection.transport.abort()
            server.close()
            if not await _wait_closed(server, _SHUTDOWN_TIMEOUT):
                for connection in list(self._open):
                    connection.transport.abort()
                await _wait_closed(server, _SHUTDOWN_TIMEOUT)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response:
        status = int(self._reject)  # type: ignore[arg-type]
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Rejected"
        body = f"{status} {phrase}: rejected by wspool MockServer\n".encode()
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", "text/plain; charset=utf-8"),
            ]
        )
        return Response(status, phrase, headers, body)

    async def _handle(self, connection: ServerConnection) -> None:
        self._open.add(connection)
        request = connection.request
        headers = {} if request is None else dict(request.headers.raw_items())
        with self._lock:
            index = self._connections
            self._connections += 1
            self._request_headers.append(headers)
        session = _Session(connection, index, "/" if request is None else request.path, headers)
        reader = session.reader = asyncio.ensure_future(self._read(session))
        try:
            await self._script(session)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bad stream item or a bug: record it
            self._record_error(exc)
            try:
                await connection.close(1011, f"MockServer error: {type(exc).__name__}")
            except Exception:
                pass
        finally:
            try:
                # The connection is closed or closing by now, except when stop() cancelled us.
                await asyncio.wait_for(asyncio.shield(reader), _CLOSE_TIMEOUT + 1.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                reader.cancel()
            with self._lock:
                self._close_codes.append(_close_code(connection.protocol.close_rcvd))
                self._server_close_codes.append(_close_code(connection.protocol.close_sent))
            self._open.discard(connection)

    async def _script(self, session: _Session) -> None:
        connection = session.connection
        if self._start_delay > 0:
            await asyncio.sleep(self._start_delay)
        stream = self._stream(session)
        # How the stream may be cut short on this connection: after `limit` messages, `cut`.
        limit: Optional[int] = None
        cut = self._drop
        if self._drop_after is not None and (
            self._drop_connections is None or session.index < self._drop_connections
        ):
            limit = self._drop_after
        elif self._freeze_after is not None and (
            self._freeze_connections is None or session.index < self._freeze_connections
        ):
            limit, cut = self._freeze_after, self._freeze
        if limit == 0:
            await cut(session)
            return
        rate = self._rate
        loop = asyncio.get_running_loop()
        started = loop.time()
        batch: list[Message] = []
        index = 0  # messages of the stream taken so far
        try:
            for item in stream:
                message = _to_message(item)
                if rate is not None:
                    delay = started + index / rate - loop.time()
                    if delay > 0:
                        if batch:
                            await self._send_batch(connection, batch)
                            batch = []
                        await asyncio.sleep(delay)
                batch.append(message)
                index += 1
                if limit is not None and index >= limit:
                    await self._send_batch(connection, batch)
                    await cut(session)
                    return
                if len(batch) >= _BATCH_SIZE:
                    await self._send_batch(connection, batch)
                    batch = []
        except ConnectionClosed:
            raise
        except Exception:
            # A bad item, or the stream itself raised: send what came before it, then report.
            if batch:
                try:
                    await self._send_batch(connection, batch)
                except ConnectionClosed:
                    pass
            raise
        if batch:
            await self._send_batch(connection, batch)
        if self._close_code is None:
            await connection.wait_closed()
        else:
            await connection.close(self._close_code, self._close_reason)

    async def _send_batch(self, connection: ServerConnection, batch: list[Message]) -> None:
        """Send messages in order; raise ConnectionClosed if the connection is not open."""
        protocol: Any = getattr(connection, "protocol", None)
        transport: Any = getattr(connection, "transport", None)
        drain: Any = getattr(connection, "drain", None)
        if (
            drain is not None
            and transport is not None
            and getattr(protocol, "state", None) is State.OPEN
        ):
            # Fast path: frame every message with websockets' Sans-I/O protocol (as send() does)
            # and hand them all to the transport in one write, then honour flow control once.
            # connection.send() would make one write, hence one system call, per message, and
            # would hide whether flow control made it wait.
            for message in batch:
                if isinstance(message, str):
                    protocol.send_text(message.encode())
                else:
                    protocol.send_binary(message)
            transport.writelines(protocol.data_to_send())
            if _write_paused(connection, transport):
                # The client is not keeping up: drain() waits until it has read enough.
                with self._lock:
                    self._stalls += 1
                waited_from = time.monotonic()
                try:
                    await drain()
                finally:
                    waited = time.monotonic() - waited_from
                    with self._lock:
                        self._stalled_seconds += waited
            else:
                await drain()
            with self._lock:
                self._sent += len(batch)
        else:
            # The public API: one message at a time. Also raises the right ConnectionClosed
            # when the connection is closing or closed.
            for message in batch:
                await connection.send(message)
                with self._lock:
                    self._sent += 1
        # drain() only waits when the socket's buffers are full; while a fast client keeps up it
        # never does, and the loop must still get a turn (for reads, echoes and stop()).
        await asyncio.sleep(0)

    def _stream(self, session: _Session) -> Iterator[Any]:
        messages = self._messages
        if messages is None:
            if self._count is None:
                return iter(())
            return _generate(self._count)
        if callable(messages):
            make: Callable[..., Iterable[Any]] = messages
            messages = make(session.info()) if self._messages_want_info else make()
        return iter(messages)

    async def _drop(self, session: _Session) -> None:
        connection = session.connection
        transport = connection.transport
        # abort() throws away what is still buffered: let the messages sent so far go out first.
        deadline = time.monotonic() + _FLUSH_TIMEOUT
        while transport.get_write_buffer_size() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        transport.abort()
        await connection.wait_closed()

    async def _freeze(self, session: _Session) -> None:
        connection = session.connection
        transport = connection.transport
        # Stop reading: incoming frames (pings, close, data) stay unread in the socket. The
        # reader task goes too, so that nothing resumes reading (websockets resumes it when its
        # queue of received messages empties) and nothing is echoed. What was sent before
        # still goes out: the transport keeps writing its buffer.
        transport.pause_reading()
        if session.reader is not None:
            session.reader.cancel()
        keepalive: Any = getattr(connection, "keepalive_task", None)
        if keepalive is not None:  # send no more pings either
            keepalive.cancel()
        with self._lock:
            self._frozen += 1
        self._frozen_open.add(connection)
        try:
            sock = transport.get_extra_info("socket")
            fd = -1 if sock is None else sock.fileno()
            # Until stop() aborts it, or the client goes away: look at the socket now and then.
            while not transport.is_closing():
                if fd >= 0 and _peer_closed(fd):
                    transport.abort()
                    break
                await asyncio.sleep(_FREEZE_POLL_INTERVAL)
            await connection.wait_closed()
        finally:
            self._frozen_open.discard(connection)

    async def _read(self, session: _Session) -> None:
        connection = session.connection
        try:
            async for message in connection:
                with self._lock:
                    self._received.append(message)
                session.received.append(message)
                if self._echo:
                    await self._send_batch(connection, [message])
        except ConnectionClosed:
            pass

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)


async def _wait_closed(server: Any, timeout: float) -> bool:
    """Wait until a websockets server is closed; False if that takes longer than timeout."""
    try:
        await asyncio.wait_for(server.wait_closed(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT))


def main(argv: Optional[list[str]] = None, prog: str = "python -m wspool.testing") -> None:
    """Run a :class:`MockServer` from the command line until Ctrl-C.

    ``python -m wspool.testing --help`` lists the options; they mirror the constructor's.
    Prints the server's URL on standard output once it listens.

    Args:
        argv: the arguments, without the program name; None reads ``sys.argv``.
        prog: the program name shown in the help (``wspool mock`` uses it).

    Raises:
        SystemExit: on bad arguments, or (code 1) if the server cannot start.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a scripted WebSocket stream on the loopback interface until Ctrl-C.",
    )
    parser.add_argument("--count", type=int, default=None, help="generated JSON messages to send")
    parser.add_argument("--rate", type=float, default=None, help="messages per second")
    parser.add_argument("--close-code", type=int, default=1000, help="0 keeps connections open")
    parser.add_argument("--close-reason", default="stream is over")
    parser.add_argument("--reject", type=int, default=None, help="HTTP status to refuse with")
    parser.add_argument("--drop-after", type=int, default=None)
    parser.add_argument(
        "--drop-connections", type=int, default=None, help="drop only the first N connections"
    )
    parser.add_argument(
        "--freeze-after", type=int, default=None, help="go silent, unread, after N messages"
    )
    parser.add_argument(
        "--freeze-connections", type=int, default=None, help="freeze only the first N connections"
    )
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument(
        "--ping-interval", type=float, default=None, help="seconds between keepalive pings"
    )
    parser.add_argument(
        "--ping-timeout", type=float, default=None, help="seconds to wait for each pong"
    )
    args = parser.parse_args(argv)
    try:
        server = MockServer(
            count=args.count,
            rate=args.rate,
            close_code=args.close_code or None,
            close_reason=args.close_reason,
            reject=args.reject,
            drop_after=args.drop_after,
            drop_connections=args.drop_connections,
            freeze_after=args.freeze_after,
            freeze_connections=args.freeze_connections,
            echo=args.echo,
            host=args.host,
            port=args.port,
            start_delay=args.start_delay,
            ping_interval=args.ping_interval,
            ping_timeout=args.ping_timeout,
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        server.start()
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(server.url, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
