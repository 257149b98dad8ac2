"""One client run of the comparison benchmark, meant to run in a fresh process.

``python benches/bench_clients.py CLIENT SCENARIO --url URL --count N --size S`` connects to a
``stream_server.py`` stream, does the scenario's work on every message, checks that every message
arrived, and prints one JSON line: ``count``, ``checksum``, ``elapsed`` (connect to the end of the
stream, close included), ``cpu`` (user + system seconds of this process in that window, all
threads) and, for ``latency``, percentiles of send-to-result times. It exits 1 with ``error``
set when a check fails.

Checks: peers deliver messages in order, so each message's ``seq`` is checked against the next
expected one. So is wspool's without a handler (``ref``, ``count``, ``large``, ``json``,
``latency``), which takes the payloads as plain values in receipt order. With a handler
(``cpu``, ``work``) wspool hands results over in completion order from several workers: there,
each ``seq`` is checked against ``result.id`` (the job id: wspool's receipt order), and a bitmap
checks that the set of seqs is complete with no duplicate.

Clients are registered in ``CLIENTS``; a new variant (e.g. wspool with a native processor for
``cpu``) is one more runner function and one more entry there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import dataclasses
import importlib
import json
import os
import socket
import sys
import time
from array import array
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from stream_server import CLOSE_FRAME, accept_key, message_body

SCENARIOS = ("ref", "count", "json", "large", "work", "cpu", "latency")
# Scenarios where wspool and picows take payloads as bytes (their fastest access); websockets
# and aiohttp yield str for text frames whatever the scenario.
BINARY_SCENARIOS = ("ref", "count", "large")
# Scenarios where wspool has no handler: it hands over plain values (``batches(values=True)``).
VALUE_SCENARIOS = ("ref", "count", "large", "json", "latency")
OnMessage = Callable[[Any], None]


class CheckError(Exception):
    """A message is missing, duplicated, out of order or not what the server sent."""


@dataclasses.dataclass
class Job:
    """What one client run is asked to do."""

    scenario: str
    url: str
    count: int
    size: int
    wire_bytes: int
    workers: int
    sleep: float
    deadline: float


# -- the scenarios' per-message work --------------------------------------------------------------


def compute(doc: dict[str, Any]) -> int:
    """The ``cpu`` scenario's small pure computation: field extraction and arithmetic."""
    return doc["seq"] % 7 * doc["v"] + len(doc["pad"])


def expected_checksum(scenario: str, count: int, size: int) -> Optional[int]:
    """The checksum a correct client reports for the first ``count`` messages of a stream."""
    if scenario in ("json", "latency"):
        return sum(seq % 100 for seq in range(count))
    if scenario == "work":
        return count * (count - 1) // 2
    if scenario == "cpu":
        total = 0
        for seq in range(count):
            doc = json.loads(message_body(seq, size))
            total += compute(doc)
        return total
    return None


def _as_is(doc: Any) -> Any:
    return doc


class Sink:
    """Per-message work and checks for clients that deliver messages in order.

    ``feed(message)`` takes a message (str, or bytes when ``binary``) and raises CheckError on a
    wrong one; ``summary()`` gives what the run reports. With ``parsed``, the ``json`` and
    ``latency`` messages come already decoded to a dict (wspool decodes natively), so the feed
    skips ``json.loads``; the checks are the same.
    """

    def __init__(
        self, scenario: str, size: int, count: int, binary: bool = False, parsed: bool = False
    ) -> None:
        self.scenario = scenario
        self.comma: Any = b"," if binary else ","
        self.loads: Callable[[Any], Any] = _as_is if parsed else json.loads
        self._summary: Callable[[], dict[str, Any]]
        self.feed: OnMessage = getattr(self, f"_make_{scenario}")(size, count)

    def summary(self) -> dict[str, Any]:
        """count, checksum and, for ``latency``, the latency percentiles."""
        return self._summary()

    def _make_ref(self, size: int, count: int) -> OnMessage:
        # The reference setup: received and counted, nothing else per message.
        counted = 0

        def feed(message: str) -> None:
            nonlocal counted
            counted += 1

        self._summary = lambda: {"count": counted, "checksum": None}
        return feed

    def _make_count(self, size: int, count: int) -> OnMessage:
        expected = 0
        comma = self.comma

        def feed(message: Any) -> None:
            nonlocal expected
            if int(message[7 : message.index(comma, 7)]) != expected:
                raise CheckError(f"expected seq {expected}, got {message[:40]!r}")
            expected += 1

        self._summary = lambda: {"count": expected, "checksum": None}
        return feed

    def _make_large(self, size: int, count: int) -> OnMessage:
        expected = 0
        comma = self.comma

        def feed(message: Any) -> None:
            nonlocal expected
            if int(message[7 : message.index(comma, 7)]) != expected or len(message) != size:
                raise CheckError(f"expected seq {expected} of {size} B, got {message[:40]!r}")
            expected += 1

        self._summary = lambda: {"count": expected, "checksum": None}
        return feed

    def _make_json(self, size: int, count: int) -> OnMessage:
        expected = 0
        total = 0
        loads = self.loads
        if loads is _as_is:
            return self._make_parsed_json()

        def feed(message: str) -> None:
            nonlocal expected, total
            doc = loads(message)
            if doc["seq"] != expected:
                raise CheckError(f"expected seq {expected}, got {doc['seq']}")
            total += doc["v"]
            expected += 1

        self._summary = lambda: {"count": expected, "checksum": total}
        return feed

    def _make_parsed_json(self) -> OnMessage:
        # _make_json's feed for dicts (no call to make one from the message).
        expected = 0
        total = 0

        def feed(doc: dict[str, Any]) -> None:
            nonlocal expected, total
            if doc["seq"] != expected:
                raise CheckError(f"expected seq {expected}, got {doc['seq']}")
            total += doc["v"]
            expected += 1

        self._summary = lambda: {"count": expected, "checksum": total}
        return feed

    def _make_cpu(self, size: int, count: int) -> OnMessage:
        expected = 0
        total = 0
        loads = json.loads

        def feed(message: str) -> None:
            nonlocal expected, total
            doc = loads(message)
            if doc["seq"] != expected:
                raise CheckError(f"expected seq {expected}, got {doc['seq']}")
            total += compute(doc)
            expected += 1

        self._summary = lambda: {"count": expected, "checksum": total}
        return feed

    def _make_latency(self, size: int, count: int) -> OnMessage:
        expected = 0
        total = 0
        loads = self.loads
        now_ns = time.time_ns
        latencies = array("q", bytes(8 * count))

        def feed(message: str) -> None:
            nonlocal expected, total
            doc = loads(message)
            latencies[expected] = now_ns() - doc["t"]
            if doc["seq"] != expected:
                raise CheckError(f"expected seq {expected}, got {doc['seq']}")
            total += doc["v"]
            expected += 1

        self._summary = lambda: {
            "count": expected,
            "checksum": total,
            "latency_ms": percentiles(latencies[:expected]),
        }
        return feed


def percentiles(latencies_ns: array) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of nanosecond latencies, in milliseconds."""
    ordered = sorted(latencies_ns)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 4)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999), "max": at(1.0)}


class Completion:
    """Marks seqs done in any order; ``check()`` raises unless each of 0..count-1 came once."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = bytearray(count)
        self.done = 0
        self.total = 0

    def mark(self, seq: int) -> None:
        """Records ``seq`` (raises CheckError on a duplicate or an out-of-range seq)."""
        if not 0 <= seq < self.count or self.seen[seq]:
            raise CheckError(f"seq {seq} duplicated or out of range")
        self.seen[seq] = 1
        self.done += 1
        self.total += seq

    def check(self) -> None:
        """Raises CheckError if a seq is missing."""
        if self.done != self.count or 0 in self.seen:
            raise CheckError(
                f"{self.done} of {self.count} seqs done; first missing: {self.seen.find(0)}"
            )


# -- wspool ---------------------------------------------------------------------------------------


def _drain(stream: Any, feed: Callable[[Any], None]) -> None:
    """Hands every result to ``feed``, taking them a list at a time (``Stream.batches()``)."""
    for batch in stream.batches():
        for result in batch:
            feed(result)


def _wspool_feed(scenario: str, count: int) -> tuple[Callable[[Any], None], Any]:
    """The per-result work for wspool's handler scenarios (``cpu``, ``work``; results come in
    completion order, so each is checked against its job id), and its summary."""
    done = Completion(count)
    seen = done.seen
    total = 0

    def failed(result: Any) -> CheckError:
        return CheckError(f"job {result.id} failed: {result.error!r}")

    if scenario == "cpu":

        def feed(result: Any) -> None:
            nonlocal total
            if not result.ok:
                raise failed(result)
            seq = result.job.data["seq"]
            if seq != result.id or seen[seq]:
                raise CheckError(f"job {result.id}: got seq {seq}")
            seen[seq] = 1
            total += result.value

    elif scenario == "work":

        def feed(result: Any) -> None:
            if not result.ok:
                raise failed(result)
            seq = result.value
            if seq != result.id:
                raise CheckError(f"job {result.id}: got seq {seq}")
            done.mark(seq)

    else:
        raise ValueError(scenario)

    def summary() -> dict[str, Any]:
        if scenario == "cpu":
            done.done = count - seen.count(0)
        done.check()
        return {"count": done.done, "checksum": total if scenario == "cpu" else done.total}

    return feed, summary


def run_wspool_results(job: Job) -> dict[str, Any]:
    """Diagnostic: wspool without a handler consumed as ``Result`` objects (``batches()``, each
    result's ``value`` and ``id`` read), the path before ``values=True``; default workers, so
    ``json`` comes in completion order: each seq is checked against ``result.id`` and marked in a
    bitmap."""
    import wspool

    binary = job.scenario in BINARY_SCENARIOS
    done = Completion(job.count)
    seen = done.seen
    total = 0
    with wspool.consume(
        _with_count(job.url, job.count),
        decode="bytes" if binary else "json",
        timeout=job.deadline,
    ) as stream:
        for batch in stream.batches():
            for result in batch:
                value = result.value
                seq = int(value[7 : value.index(b",", 7)]) if binary else value["seq"]
                if not result.ok or seq != result.id or seen[seq]:
                    raise CheckError(f"job {result.id}: got {result!r}")
                seen[seq] = 1
                if not binary:
                    total += value["v"]
    if stream.error is not None:
        raise stream.error
    done.done = job.count - seen.count(0)
    done.check()
    return {
        "count": done.done,
        "checksum": None if binary else total,
        "note": f"workers={stream.stats.workers}, Result objects",
    }


def _sleep_handler(seconds: float) -> Callable[[Any], int]:
    def handler(job: Any) -> int:
        time.sleep(seconds)
        return job.data["seq"]

    return handler


def _cpu_handler(job: Any) -> int:
    return compute(job.data)


def run_wspool(job: Job, workers: Optional[int] = None) -> dict[str, Any]:
    """wspool with a Python handler where the scenario has one (``work``, ``cpu``); ``workers``
    None is wspool's default (one per core, one for bytes without a handler)."""
    if job.scenario in VALUE_SCENARIOS:
        return _run_wspool_values(job, workers)
    import wspool

    handler: Optional[Callable[[Any], Any]] = None
    if job.scenario == "work":
        handler, workers = _sleep_handler(job.sleep), job.workers
    elif job.scenario == "cpu":
        handler = _cpu_handler
    feed, summary = _wspool_feed(job.scenario, job.count)
    with wspool.consume(
        _with_count(job.url, job.count),
        handler,
        decode="json",
        workers=workers,
        timeout=job.deadline,
    ) as stream:
        _drain(stream, feed)
    if stream.error is not None:
        raise stream.error
    if stream.stats.failed:
        raise CheckError(f"{stream.stats.failed} jobs failed")
    result = summary()
    result["note"] = f"workers={stream.stats.workers}, results in completion order"
    return result


def _run_wspool_values(
    job: Job, workers: Optional[int], asynchronous: bool = False
) -> dict[str, Any]:
    """The scenarios without a handler: the payloads (bytes, or dicts for json) come as plain
    values, ``Stream.batches(values=True)``, in receipt order: naturally with one worker (the
    default for bytes without a handler), through ``ordered=True`` with more. Each goes
    through the same ``Sink`` check as the peers' messages (``seq`` against the next
    expected)."""
    import wspool

    binary = job.scenario in BINARY_SCENARIOS
    decode = "bytes" if binary else "json"
    sink = Sink(job.scenario, job.size, job.count, binary, parsed=not binary)
    feed = sink.feed
    ref = job.scenario == "ref"
    counted = 0

    def take(batch: list[Any]) -> None:
        nonlocal counted
        if ref:
            counted += len(batch)
        else:
            for value in batch:
                feed(value)

    def open_stream() -> Any:
        return wspool.consume(
            _with_count(job.url, job.count),
            decode=decode,
            workers=workers,
            ordered=workers != 1 and not binary,
            timeout=job.deadline,
        )

    if asynchronous:

        async def main() -> Any:
            async with open_stream() as stream:
                async for batch in stream.batches(values=True):
                    take(batch)
            return stream

        stream = asyncio.run(main())
    else:
        with open_stream() as stream:
            for batch in stream.batches(values=True):
                take(batch)
    if stream.error is not None:
        raise stream.error
    result = sink.summary()
    if job.scenario == "ref":
        result["count"] = counted
    order = "one worker" if stream.stats.workers == 1 else "ordered=True"
    how = ", async for" if asynchronous else ""
    result["note"] = f"workers={stream.stats.workers}, values in receipt order ({order}){how}"
    return result


def run_wspool_native(job: Job) -> dict[str, Any]:
    """``cpu`` with wspool's native processor: ``Select`` decodes each message and picks
    ``seq``, ``v`` and ``pad`` on the workers without the GIL; Python does the arithmetic on
    the plain values (``batches(values=True)``), which come in receipt order
    (``ordered=True``), each ``seq`` checked against the next expected."""
    import wspool

    expected = 0
    total = 0
    with wspool.consume(
        _with_count(job.url, job.count),
        wspool.Select("seq", "v", "pad"),
        decode="bytes",
        ordered=True,
        timeout=job.deadline,
    ) as stream:
        for batch in stream.batches(values=True):
            for seq, v, pad in batch:
                if seq != expected:
                    raise CheckError(f"expected seq {expected}, got {seq}")
                total += seq % 7 * v + len(pad)
                expected += 1
    if stream.error is not None:
        raise stream.error
    if expected != job.count:
        raise CheckError(f"{expected} of {job.count} messages arrived")
    return {
        "count": expected,
        "checksum": total,
        "note": f"workers={stream.stats.workers}, native Select, values in receipt order, "
        "arithmetic in Python",
    }


# -- peers ----------------------------------------------------------------------------------------


async def _websockets_receive(url: str, on_message: OnMessage, binary: bool) -> Optional[int]:
    from websockets.asyncio.client import connect

    # No keepalive pings: the mock server does not answer them (and runs are short).
    async with connect(url, ping_interval=None) as ws:
        async for message in ws:
            on_message(message)
    return ws.close_code


async def _aiohttp_receive(url: str, on_message: OnMessage, binary: bool) -> Optional[int]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise CheckError(f"unexpected {message.type!r}: {message.data!r}")
            on_message(message.data)
    return ws.close_code


async def _picows_receive(url: str, on_message: OnMessage, binary: bool) -> Optional[int]:
    from picows import WSFrame, WSListener, WSMsgType, ws_connect

    errors: list[BaseException] = []
    close_code: list[int] = []
    text = WSMsgType.TEXT
    payload = WSFrame.get_payload_as_bytes if binary else WSFrame.get_payload_as_ascii_text

    class Listener(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == text:
                try:
                    on_message(payload(frame))
                except BaseException as error:
                    errors.append(error)
                    transport.disconnect()
            elif frame.msg_type == WSMsgType.CLOSE:
                close_code.append(int(frame.get_close_code().value))
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    transport, _ = await ws_connect(Listener, url)
    await transport.wait_disconnected()
    if errors:
        raise errors[0]
    return close_code[0] if close_code else None


# Each takes (url, on_message, binary): binary asks for bytes payloads where the library has
# them (picows); the others always pass str for text frames.
ASYNC_PEERS: dict[str, Callable[[str, OnMessage, bool], Any]] = {
    "websockets": _websockets_receive,
    "aiohttp": _aiohttp_receive,
    "picows": _picows_receive,
}


async def _async_work(receive: Callable[[str, OnMessage, bool], Any], job: Job) -> Completion:
    """The ``work`` scenario with asyncio: the reader queues messages, ``workers`` tasks decode
    each one and await a ``sleep``-second coroutine (the I/O-bound handler)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    done = Completion(job.count)

    async def worker() -> None:
        while True:
            message = await queue.get()
            try:
                doc = json.loads(message)
                await asyncio.sleep(job.sleep)
                done.mark(doc["seq"])
            finally:
                queue.task_done()

    tasks = [asyncio.ensure_future(worker()) for _ in range(job.workers)]
    try:
        url = _with_count(job.url, job.count)
        await _expect_1000(await receive(url, queue.put_nowait, False))
        await queue.join()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


async def _expect_1000(code: Optional[int]) -> None:
    if code != 1000:
        raise CheckError(f"the stream ended with close code {code}, not 1000")


def run_async_peer(name: str, job: Job) -> dict[str, Any]:
    """websockets (asyncio), aiohttp or picows on the default asyncio event loop."""
    receive = ASYNC_PEERS[name]

    async def main() -> dict[str, Any]:
        if job.scenario == "work":
            done = await _async_work(receive, job)
            done.check()
            return {"count": done.done, "checksum": done.total}
        binary = name == "picows" and job.scenario in BINARY_SCENARIOS
        sink = Sink(job.scenario, job.size, job.count, binary)
        await _expect_1000(await receive(_with_count(job.url, job.count), sink.feed, binary))
        return sink.summary()

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(main(), job.deadline)

    return asyncio.run(bounded())


def _work_message(seconds: float) -> Callable[[str], int]:
    def work(message: str) -> int:
        doc = json.loads(message)
        time.sleep(seconds)
        return doc["seq"]

    return work


def run_websocket_client(job: Job) -> dict[str, Any]:
    """websocket-client (synchronous), with its defaults (pure-Python UTF-8 validation)."""
    import websocket

    ws = websocket.create_connection(_with_count(job.url, job.count), timeout=job.deadline)
    try:
        if job.scenario == "work":
            done = Completion(job.count)
            work = _work_message(job.sleep)
            with concurrent.futures.ThreadPoolExecutor(job.workers) as pool:
                futures = []
                for _ in range(job.count + 1):
                    message = ws.recv()
                    if not message:  # "" is what recv() returns for the close frame
                        break
                    futures.append(pool.submit(work, message))
                for future in futures:
                    done.mark(future.result(timeout=job.deadline))
            done.check()
            return {"count": done.done, "checksum": done.total}
        sink = Sink(job.scenario, job.size, job.count)
        feed = sink.feed
        recv = ws.recv
        for _ in range(job.count + 1):
            message = recv()
            if not message:
                break
            feed(message)
        return sink.summary()
    finally:
        ws.shutdown()


# -- raw loopback ceilings ------------------------------------------------------------------------


def _raw_connect(url: str, timeout: float) -> tuple[socket.socket, bytes]:
    """TCP connect and a hand-made upgrade; returns the socket and bytes read past the 101."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode("ascii")
    )
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise CheckError("EOF during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101") or accept_key(key).encode() not in head:
        raise CheckError(f"bad handshake answer: {head[:200]!r}")
    return sock, rest


def _raw_close(sock: socket.socket) -> None:
    # Masked close frame 1000 with a zero mask.
    sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
    sock.close()


def run_raw(job: Job) -> dict[str, Any]:
    """Reads the stream's bytes and discards them: the loopback ceiling. Messages are not
    parsed: the count is derived from the byte count, and the last bytes must be the close."""
    sock, rest = _raw_connect(_with_count(job.url, job.count), job.deadline)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    received = len(rest)
    tail = rest[-4:]
    recv_into = sock.recv_into
    for _ in range(job.wire_bytes // 4096 + 10_000):
        if received >= job.wire_bytes:
            break
        n = recv_into(view)
        if not n:
            raise CheckError(f"EOF after {received} of {job.wire_bytes} bytes")
        received += n
        if received >= job.wire_bytes:
            tail = bytes(view[max(0, n - 4) : n])
    if received != job.wire_bytes or tail != CLOSE_FRAME:
        raise CheckError(f"got {received} bytes ending {tail!r}, expected {job.wire_bytes}")
    _raw_close(sock)
    return {"count": job.count, "checksum": None, "note": "count derived from bytes"}


def run_raw_frames(job: Job) -> dict[str, Any]:
    """Reads the stream and walks the frame headers in Python to count messages (payloads are
    skipped, not looked at): the ceiling for anything that touches each message in Python."""
    sock, rest = _raw_connect(_with_count(job.url, job.count), job.deadline)
    buf = bytearray(rest)
    pos = 0
    count = 0
    closed = False
    size = job.size
    for _ in range(job.wire_bytes // 4096 + 10_000):
        end = len(buf)
        while end - pos >= 2:
            second = buf[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if end - pos < head + length:
                break
            first = buf[pos]
            if first == 0x81 and length == size:
                count += 1
            elif first == 0x88:
                closed = True
                pos += head + length
                break
            else:
                raise CheckError(f"unexpected frame {first:#x} of {length} B after {count}")
            pos += head + length
        if closed:
            break
        del buf[:pos]
        pos = 0
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise CheckError(f"EOF after {count} messages")
        buf += chunk
    if not closed or count != job.count:
        raise CheckError(f"{count} messages, closed={closed}")
    _raw_close(sock)
    return {"count": count, "checksum": None, "note": "frame headers parsed in Python"}


# -- registry and command line --------------------------------------------------------------------


def _with_count(url: str, count: int) -> str:
    """The stream URL asking for its first ``count`` messages."""
    return f"{url.split('?', 1)[0]}?count={count}"


@dataclasses.dataclass(frozen=True)
class Client:
    """A benchmark client: how to run it and which scenarios it takes part in."""

    run: Callable[[Job], dict[str, Any]]
    modules: tuple[str, ...] = ()  # imported before the clock starts
    scenarios: tuple[str, ...] = SCENARIOS
    kind: str = "peer"  # "wspool", "peer" or "ceiling"


def _async(name: str) -> Callable[[Job], dict[str, Any]]:
    return lambda job: run_async_peer(name, job)


CLIENTS: dict[str, Client] = {
    "wspool": Client(run_wspool, ("wspool",), kind="wspool"),
    # Diagnostic variants: one worker where the default is more (bytes streams without a
    # handler already have one); Result objects instead of plain values.
    "wspool-w1": Client(
        lambda job: run_wspool(job, workers=1),
        ("wspool",),
        ("json", "cpu", "latency"),
        kind="wspool",
    ),
    "wspool-results": Client(
        run_wspool_results, ("wspool",), ("count", "json", "large"), kind="wspool"
    ),
    "wspool-native": Client(run_wspool_native, ("wspool",), ("cpu",), kind="wspool"),
    # asyncio code: `async with` and `async for batch in stream.batches(values=True)`.
    "wspool-async": Client(
        lambda job: _run_wspool_values(job, None, asynchronous=True),
        ("wspool",),
        ("count", "json", "large", "latency"),
        kind="wspool",
    ),
    "picows": Client(_async("picows"), ("picows",)),
    "aiohttp": Client(_async("aiohttp"), ("aiohttp",)),
    "websockets": Client(_async("websockets"), ("websockets.asyncio.client",)),
    "websocket-client": Client(run_websocket_client, ("websocket",)),
    "raw": Client(run_raw, scenarios=("ref", "count", "large"), kind="ceiling"),
    "raw-frames": Client(run_raw_frames, scenarios=("ref", "count", "large"), kind="ceiling"),
}


def main(argv: Optional[list[str]] = None) -> int:
    """Runs one client on one scenario and prints its JSON report line."""
    parser = argparse.ArgumentParser(description="One run of one benchmark client.")
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--size", type=int, default=120)
    parser.add_argument("--wire-bytes", type=int, default=0, help="for the raw readers")
    parser.add_argument("--workers", type=int, default=16, help="pool size for 'work'")
    parser.add_argument("--sleep", type=float, default=0.002, help="handler sleep for 'work'")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds, then fail")
    args = parser.parse_args(argv)
    job = Job(
        args.scenario,
        args.url,
        args.count,
        args.size,
        args.wire_bytes,
        args.workers,
        args.sleep,
        args.deadline,
    )
    report: dict[str, Any] = {"client": args.client, "scenario": args.scenario}
    for module in CLIENTS[args.client].modules:
        importlib.import_module(module)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        report.update(CLIENTS[args.client].run(job))
        status = 0
    except Exception as error:
        report["error"] = f"{type(error).__name__}: {error}"
        status = 1
    report["elapsed"] = time.perf_counter() - t0
    report["cpu"] = time.process_time() - cpu0
    print(json.dumps(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
