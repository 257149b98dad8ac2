"""Faults: every job accounted for, never a hang. Hung handlers, native panics, servers that
drop mid-frame, get killed or stopped, many connect/close cycles, and streams dropped without
close() from any thread. Where a crash or a hang must be observable, the consumer runs in a
subprocess; every test has a watchdog (pytest-timeout, and timeouts on every wait)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import wspool
from wspool import _native

# What must never appear on a consumer's stderr.
BAD_OUTPUT = ("Fatal Python error", "Cannot drop a runtime", "Aborted", "core dumped")


def assert_accounted(stats: wspool.Stats) -> None:
    """Every received job ended in exactly one of the final counters."""
    s = stats.as_dict()
    assert s["in_flight"] == 0, s
    total = s["processed"] + s["failed"] + s["cancelled"] + s["dropped"] + s["abandoned"]
    assert total == s["received"], s


def assert_clean(err: str) -> None:
    for bad in BAD_OUTPUT:
        assert bad not in err, err


# -- a handler that hangs -----------------------------------------------------------------------

HUNG = """
import json, sys, threading, time, wspool

url = sys.argv[1]
forever = threading.Event()

def handler(job):
    if job.id == 3:
        forever.wait()          # hangs forever
    return job.id

stream = wspool.consume(url, handler, workers=2, close_timeout=1.0)
seen = 0
for result in stream:
    seen += 1
    if seen == 19:
        break
start = time.monotonic()
stream.close()
took = time.monotonic() - start
print(json.dumps({"close": took, "stats": stream.stats.as_dict()}), flush=True)
print("exiting at", time.monotonic(), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_hung_handler_is_abandoned_close_returns_and_the_process_exits(mock_server):
    server = mock_server(count=20, close_code=None)
    proc = subprocess.Popen(
        [sys.executable, "-c", HUNG, server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    lines = out.splitlines()
    assert len(lines) == 2, (out, err)
    report = json.loads(lines[0])
    exiting = float(lines[1].split()[-1])
    ended = time.monotonic()
    # close() gave up after close_timeout (1 s) without a result, not much later.
    print(f"hung handler: close() returned after {report['close']:.3f} s (close_timeout 1 s)")
    assert 0.9 <= report["close"] < 2.5, report
    stats = report["stats"]
    assert stats["received"] == 20 and stats["processed"] == 19, stats
    assert stats["abandoned"] == 1 and stats["in_flight"] == 0, stats
    total = sum(stats[k] for k in ("processed", "failed", "cancelled", "dropped", "abandoned"))
    assert total == stats["received"]
    # The exit hook waited close_timeout for the stuck handler, then left without finalizing.
    assert proc.returncode == 0, err
    assert ended - exiting < 5.0
    assert "abandoning them" in err
    assert_clean(err)


def test_every_job_is_accounted_for_when_close_gives_up(mock_server, threads):
    """In-process, with a handler that hangs until the test releases it: the counters add up
    while it is stuck (abandoned, queued ones cancelled) and stay so after it returns."""
    release = threading.Event()
    server = mock_server(count=50, close_code=None)
    threads.mark()

    def handler(job):
        if job.id < 2:
            release.wait(30)  # both workers stuck
        return job.id

    stream = wspool.consume(server.url, handler, workers=2, queue_size=64, close_timeout=0.5)
    assert server.wait_for(lambda s: s.sent == 50)
    deadline = time.monotonic() + 5
    while stream.stats.received < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 2.0
    stats = stream.stats
    assert (stats.received, stats.abandoned, stats.processed) == (50, 2, 0), stats
    assert stats.cancelled == 48, stats
    assert_accounted(stats)
    assert "abandoned=2" in repr(stats)
    release.set()
    deadline = time.monotonic() + 5
    while stream.stats.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    # The handlers returned late: still counted once, as abandoned.
    assert stream.stats.threads == 0
    assert stream.stats.abandoned == 2 and stream.stats.processed == 0
    assert_accounted(stream.stats)
    threads.assert_back()


@pytest.mark.parametrize("how", ["cancel", "interrupt", "drops"])
def test_counts_add_up_to_received(mock_server, how):
    if how == "drops":
        server = mock_server(count=3000, close_code=1000)
        stats = wspool.run(
            server.url,
            lambda job: time.sleep(0.0005),
            workers=2,
            queue_size=8,
            overflow="drop_newest",
        )
        assert stats.dropped > 0
        assert_accounted(stats)
        return
    server = mock_server(count=10_000_000, rate=20_000, close_code=None)
    stream = wspool.consume(server.url, lambda job: time.sleep(0.002), workers=2, queue_size=64)
    for i, _ in enumerate(stream):
        if i == 100:
            break
    if how == "cancel":
        stream.cancel()
    else:
        stream.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    deadline = time.monotonic() + 5
    while stream.stats.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.stats.cancelled > 0
    assert_accounted(stream.stats)


# -- panics on native threads (cargo feature test-panic) ----------------------------------------

needs_test_panic = pytest.mark.skipif(
    "test-panic" not in _native.__features__,
    reason="the extension was built without the test-panic feature (use `make dev`)",
)

PANIC = """
import json, sys, wspool
url = sys.argv[1]
results = 0
try:
    with wspool.consume(url, lambda job: job.data, workers=2, close_timeout=2.0) as stream:
        for result in stream:
            results += 1
except wspool.WspoolError as e:
    print(json.dumps({"type": type(e).__name__, "exception": isinstance(e, Exception),
                      "message": str(e), "results": results,
                      "stats": stream.stats.as_dict()}), flush=True)
"""


@needs_test_panic
@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["io", "worker"])
def test_a_native_panic_surfaces_as_internal_error_and_ends_the_stream(mock_server, where):
    if where == "io":
        server = mock_server(count=10_000_000, rate=1000, close_code=None)
        url = server.url + "?wspool_test_panic=io"
    else:
        messages = [f"m{i}" for i in range(10)]
        messages[5] = "wspool_test_panic=worker"
        server = mock_server(messages=messages, close_code=None)
        url = server.url
    proc = subprocess.run(
        [sys.executable, "-c", PANIC, url], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["type"] == "InternalError" and report["exception"], report
    assert "panic" in report["message"], report
    stats = report["stats"]
    assert stats["threads"] == 0, stats
    assert stats["in_flight"] == 0, stats
    total = sum(stats[k] for k in ("processed", "failed", "cancelled", "dropped", "abandoned"))
    assert total == stats["received"], stats
    if where == "worker":
        # The dead worker's job is abandoned; the other messages still gave results.
        assert stats["abandoned"] == 1, stats
        assert report["results"] >= 5, report
    assert "on purpose" in proc.stderr  # the panic message itself went to stderr
    assert_clean(proc.stderr)


def test_internal_error_is_a_wspool_error_not_a_base_exception():
    assert issubclass(wspool.InternalError, wspool.WspoolError)
    assert issubclass(wspool.InternalError, Exception)


# -- servers that misbehave ---------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


class HalfFrameServer:
    """A raw WebSocket server: handshake, `full` whole text frames, then the first bytes of a
    100-byte frame, then the socket is closed (no close frame)."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        conn.sendall(b"".join(_frame(f"msg {i}".encode()) for i in range(self.full)))
        conn.sendall(bytes([0x81, 100]) + b"only ten b")
        time.sleep(0.2)
        conn.close()
        self.listener.close()


@pytest.mark.timeout(30)
def test_a_drop_in_the_middle_of_a_frame_is_connection_closed_1006(threads):
    server = HalfFrameServer(full=3)
    results = []
    with pytest.raises(wspool.ConnectionClosed) as info:
        with wspool.consume(server.url, workers=2) as stream:
            for result in stream:
                results.append(result.value)
    assert info.value.code == 1006
    assert sorted(results) == ["msg 0", "msg 1", "msg 2"]
    assert_accounted(stream.stats)
    server.thread.join(5)
    threads.assert_back()


@pytest.fixture
def server_process():
    """Starts `python -m wspool.testing` in a subprocess; yields (process, url)."""
    procs = []

    def start(*args: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wspool.testing", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        url = proc.stdout.readline().strip()
        assert url.startswith("ws://"), url
        return proc, url

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(5)


def _fail_after(stream, act, after: int = 20):
    """Iterates; after `after` results calls `act()`; returns (seconds from act to the
    exception, the exception, results)."""
    acted = None
    n = 0
    with pytest.raises(wspool.WspoolError) as info:
        for _ in stream:
            n += 1
            if n == after:
                act()
                acted = time.monotonic()
    assert acted is not None
    return time.monotonic() - acted, info.value, n


@pytest.mark.timeout(30)
def test_a_server_killed_with_sigkill_is_connection_closed_at_once(server_process, threads):
    proc, url = server_process("--count", "100000000", "--rate", "2000", "--close-code", "0")
    threads.mark()
    stream = wspool.consume(url, workers=2)
    took, error, _n = _fail_after(stream, lambda: os.kill(proc.pid, signal.SIGKILL))
    assert isinstance(error, wspool.ConnectionClosed) and error.code == 1006, error
    print(f"SIGKILL: ConnectionClosed {took:.3f} s after the kill")
    assert took < 1.0, took
    assert stream.finished and stream.stats.threads == 0
    assert_accounted(stream.stats)
    threads.assert_back()


@pytest.mark.timeout(30)
def test_a_server_stopped_with_sigstop_is_found_by_the_heartbeat(server_process, threads):
    proc, url = server_process("--count", "100000000", "--rate", "2000", "--close-code", "0")
    threads.mark()
    stream = wspool.consume(url, workers=2, ping_interval=0.5, ping_timeout=0.5)
    took, error, _n = _fail_after(stream, lambda: os.kill(proc.pid, signal.SIGSTOP))
    assert isinstance(error, wspool.ConnectionClosed) and error.code == 1006, error
    assert "ping" in str(error)
    print(f"SIGSTOP: ConnectionClosed {took:.3f} s after the stop")
    # The README's bound: ping_interval + ping_timeout (1 s), plus scheduling slack.
    assert 0.9 <= took < 2.0, took
    assert stream.stats.threads == 0
    assert_accounted(stream.stats)
    threads.assert_back()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.timeout(90)
def test_a_thousand_connect_close_cycles_leak_no_fd_and_no_thread(server_process):
    _proc, url = server_process("--count", "0", "--close-code", "0")
    # One cycle first, so one-time allocations (e.g. the certificate store) are not counted.
    wspool.consume(url, workers=1).close()
    fds, tasks, pythreads = _fds(), _tasks(), threading.active_count()
    start = time.monotonic()
    for _ in range(1000):
        stream = wspool.consume(url, workers=1)
        stream.close()
        assert stream.stats.threads == 0
    took = time.monotonic() - start
    deadline = time.monotonic() + 5
    while (_fds(), _tasks()) != (fds, tasks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (_fds(), _tasks(), threading.active_count()) == (fds, tasks, pythreads)
    print(f"1,000 connect/close cycles in {took:.1f} s")
    assert took < 60, took


DROPS = """
import gc, os, sys, threading, time, wspool

url = sys.argv[1]
base = len(os.listdir("/proc/self/task"))

def make():
    stream = wspool.consume(url, lambda job: time.sleep(0.001), workers=2)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    return stream

# 1. `del` on another thread than the one that made it.
box = [make()]
t = threading.Thread(target=box.clear)
t.start(); t.join()

# 2. made on a thread, collected as part of a reference cycle by gc on another thread.
def cyclic():
    s = make()
    s.cycle = s
t = threading.Thread(target=cyclic)
t.start(); t.join()
t = threading.Thread(target=gc.collect)
t.start(); t.join()

# 3. the last reference goes away on one of the stream's own worker threads.
holder = []
def handler(job):
    # Early enough that nobody needs to take results for it to run (they wait in batches).
    if job.id == 10 and holder:
        holder.clear()
    time.sleep(0.001)
holder.append(wspool.consume(url, handler, workers=2))
deadline = time.monotonic() + 5
while holder and time.monotonic() < deadline:
    time.sleep(0.01)

# 4. plain `del` in the main thread.
s = make()
del s
gc.collect()

deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) > base and time.monotonic() < deadline:
    time.sleep(0.02)
print("threads", base, len(os.listdir("/proc/self/task")), flush=True)
"""


@pytest.mark.timeout(60)
def test_streams_dropped_without_close_from_any_thread(server_process):
    _proc, url = server_process("--count", "100000000", "--rate", "5000", "--close-code", "0")
    proc = subprocess.run(
        [sys.executable, "-c", DROPS, url], capture_output=True, text=True, timeout=45
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "threads" and words[1] == words[2], proc.stdout
    assert "panicked" not in proc.stderr
    assert_clean(proc.stderr)


def test_aclose_gives_up_on_a_hung_handler_too(mock_server):
    release = threading.Event()
    server = mock_server(count=10, close_code=None)

    def handler(job):
        if job.id == 0:
            release.wait(30)
        return job.id

    async def main() -> tuple[float, wspool.Stats]:
        async with wspool.consume(server.url, handler, workers=2, close_timeout=0.5) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 9:
                    break
            start = time.monotonic()
            await stream.aclose()
            return time.monotonic() - start, stream.stats

    took, stats = asyncio.run(main())
    release.set()
    assert 0.4 <= took < 2.0, took
    assert stats.abandoned == 1 and stats.processed == 9, stats
    assert_accounted(stats)
