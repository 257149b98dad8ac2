"""Tests of wspool.testing.MockServer and of the mock_server pytest fixture.

The client is websockets' plain synchronous client, so these tests do not need wspool's native
module. The fixture comes from the wspool pytest plugin: it is loaded through the package's
``pytest11`` entry point once wspool is installed; from a source tree, run pytest with
``-p wspool.pytest_plugin``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from wspool.testing import MockServer, generate_messages

RECV_TIMEOUT = 3.0  # seconds any single recv() may wait
THREAD_NAME = "wspool-mock-server"


def open_client(url, **kwargs):
    """Connect with bounded timeouts."""
    kwargs.setdefault("open_timeout", 3.0)
    kwargs.setdefault("close_timeout", 2.0)
    return connect(url, **kwargs)


def recv_until_closed(ws, limit=100_000):
    """Receive every message until the connection closes; return (messages, exception)."""
    messages = []
    for _ in range(limit):
        try:
            messages.append(ws.recv(timeout=RECV_TIMEOUT))
        except ConnectionClosed as exc:
            return messages, exc
    raise AssertionError(f"more than {limit} messages")


def mock_threads():
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_generate_messages_shape():
    messages = list(generate_messages(30))
    assert len(messages) == 30
    ids = set()
    for seq, text in enumerate(messages):
        data = json.loads(text)
        assert list(data) == ["seq", "id", "type", "price", "qty"]
        assert data["seq"] == seq
        assert uuid.UUID(data["id"]).version == 4
        ids.add(data["id"])
        assert data["type"] == seq % 3 + 1
        assert isinstance(data["price"], float) and isinstance(data["qty"], float)
        assert 50 <= len(text.encode()) <= 150
    assert len(ids) == 30
    # price and qty depend on seq only
    again = [json.loads(m) for m in generate_messages(30)]
    first = [json.loads(m) for m in messages]
    assert [(m["price"], m["qty"]) for m in again] == [(m["price"], m["qty"]) for m in first]
    assert list(generate_messages(0)) == []
    with pytest.raises(ValueError):
        generate_messages(-1)
    with pytest.raises(TypeError):
        generate_messages(1.5)


def test_count_messages_arrive_in_order_on_every_connection():
    with MockServer(count=500) as server:
        for _ in range(2):
            with open_client(server.url) as ws:
                messages, closed = recv_until_closed(ws)
            assert all(isinstance(m, str) for m in messages)
            assert [json.loads(m)["seq"] for m in messages] == list(range(500))
            assert closed.rcvd.code == 1000
            assert closed.rcvd.reason == "stream is over"
        assert server.connections == 2
        assert server.sent == 1000
        assert server.wait_for(lambda s: len(s.close_codes) == 2)
        assert server.close_codes == [1000, 1000]
        assert server.errors == []


def test_list_keeps_frame_types_and_is_resent_per_connection():
    items = ["text", b"\x00\x01binary", {"k": 1}, [1, "two"], bytearray(b"ba")]
    with MockServer(items) as server:
        for _ in range(2):
            with open_client(server.url) as ws:
                messages, closed = recv_until_closed(ws)
            assert messages == ["text", b"\x00\x01binary", '{"k": 1}', '[1, "two"]', b"ba"]
            assert type(messages[0]) is str and type(messages[1]) is bytes
            assert closed.rcvd.code == 1000


def test_callable_gives_each_connection_a_fresh_stream():
    calls = []

    def stream():
        calls.append(1)
        return iter(["a", "b"])

    with MockServer(stream) as server:
        for _ in range(2):
            with open_client(server.url) as ws:
                assert recv_until_closed(ws)[0] == ["a", "b"]
    assert len(calls) == 2


def test_generator_object_is_consumed_once():
    with MockServer(m for m in ["a", "b"]) as server:
        with open_client(server.url) as ws:
            assert recv_until_closed(ws)[0] == ["a", "b"]
        with open_client(server.url) as ws:
            assert recv_until_closed(ws)[0] == []


def test_empty_stream_closes_at_once():
    with MockServer() as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
    assert messages == []
    assert closed.rcvd.code == 1000


def test_configured_close_code_and_reason():
    with MockServer(["x"], close_code=4001, close_reason="custom bye") as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
        assert messages == ["x"]
        assert closed.rcvd.code == 4001
        assert closed.rcvd.reason == "custom bye"
        assert server.wait_for(lambda s: s.close_codes == [4001])


@pytest.mark.parametrize("status", [403, 503, 499])
def test_reject_fails_the_handshake(status):
    with MockServer(count=5, reject=status) as server:
        with pytest.raises(InvalidStatus) as info:
            open_client(server.url)
        assert info.value.response.status_code == status
        assert server.connections == 0
        assert server.sent == 0


def test_drop_after_aborts_without_close_frame():
    with MockServer(count=100, drop_after=5) as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
        assert [json.loads(m)["seq"] for m in messages] == [0, 1, 2, 3, 4]
        assert isinstance(closed, ConnectionClosedError)
        assert closed.rcvd is None
        assert server.wait_for(lambda s: s.close_codes == [None])
        assert server.sent == 5


def test_drop_after_zero_sends_nothing():
    with MockServer(["a"], drop_after=0) as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
    assert messages == []
    assert closed.rcvd is None


def test_drop_after_larger_than_stream_closes_normally():
    with MockServer(["a", "b"], drop_after=10) as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
    assert messages == ["a", "b"]
    assert closed.rcvd.code == 1000


def test_echo_sends_messages_back_and_records_them():
    with MockServer(echo=True, close_code=None) as server:
        with open_client(server.url) as ws:
            ws.send("hello")
            assert ws.recv(timeout=RECV_TIMEOUT) == "hello"
            ws.send(b"\x01\x02")
            echoed = ws.recv(timeout=RECV_TIMEOUT)
            assert echoed == b"\x01\x02" and isinstance(echoed, bytes)
        assert server.received == ["hello", b"\x01\x02"]
        assert server.sent == 2


def test_echo_interleaves_with_the_stream():
    with MockServer(["s1", "s2"], echo=True, close_code=None, start_delay=0.3) as server:
        with open_client(server.url) as ws:
            ws.send("ping")
            got = [ws.recv(timeout=RECV_TIMEOUT) for _ in range(3)]
        assert got == ["ping", "s1", "s2"]


def test_received_is_recorded_without_echo():
    with MockServer(close_code=None) as server:
        with open_client(server.url) as ws:
            ws.send("one")
            ws.send(b"two")
            assert server.wait_for(lambda s: len(s.received) >= 2, timeout=RECV_TIMEOUT)
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.2)
        assert server.received == ["one", b"two"]
        assert server.sent == 0


def test_start_delay_lets_subscribe_arrive_first():
    with MockServer(["data"], start_delay=0.3) as server:
        with open_client(server.url) as ws:
            ws.send('{"op": "subscribe"}')
            assert ws.recv(timeout=RECV_TIMEOUT) == "data"
            assert server.received == ['{"op": "subscribe"}']


def test_rate_paces_the_stream():
    with MockServer(count=40, rate=200) as server:
        with open_client(server.url) as ws:
            started = time.monotonic()
            messages, closed = recv_until_closed(ws)
            elapsed = time.monotonic() - started
    assert len(messages) == 40
    assert closed.rcvd.code == 1000
    assert 0.1 <= elapsed <= 1.5, elapsed


def test_fast_stream_throughput():
    with MockServer(count=20_000) as server:
        with open_client(server.url) as ws:
            started = time.monotonic()
            assert server.wait_for(lambda s: s.sent == 20_000, timeout=10.0)
            elapsed = time.monotonic() - started
            messages, closed = recv_until_closed(ws, limit=20_001)
    assert len(messages) == 20_000
    assert json.loads(messages[-1])["seq"] == 19_999
    assert closed.rcvd.code == 1000
    assert elapsed < 2.0, elapsed


def test_close_code_none_keeps_connection_open_and_records_client_code():
    with MockServer(["only"], close_code=None) as server:
        with open_client(server.url) as ws:
            assert ws.recv(timeout=RECV_TIMEOUT) == "only"
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.3)
            ws.close(code=4000, reason="client done")
        assert server.wait_for(lambda s: s.close_codes == [4000])
        with open_client(server.url) as ws:
            assert ws.recv(timeout=RECV_TIMEOUT) == "only"
        assert server.wait_for(lambda s: s.close_codes == [4000, 1000])


def test_stop_closes_open_connections_promptly():
    server = MockServer(close_code=None).start()
    with open_client(server.url) as ws:
        try:
            assert server.wait_for(lambda s: s.connections == 1)
        finally:
            started = time.monotonic()
            server.stop()
        assert time.monotonic() - started < 4.0
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=RECV_TIMEOUT)
        assert info.value.rcvd.code == 1001
    assert server.close_codes == [1001]
    assert not mock_threads()


def test_thread_is_gone_after_stop_and_stop_is_idempotent():
    server = MockServer(count=3)
    server.stop()  # never started: nothing to do
    assert server.start() is server
    assert server.start() is server  # already running: nothing to do
    assert server.running
    threads = mock_threads()
    assert len(threads) == 1 and threads[0].daemon
    with open_client(server.url) as ws:
        assert len(recv_until_closed(ws)[0]) == 3
    server.stop()
    server.stop()
    assert not server.running
    assert not mock_threads()


def test_url_port_and_restart_on_the_same_port():
    server = MockServer(count=1)
    with pytest.raises(RuntimeError):
        _ = server.url
    with server:
        port = server.port
        assert port != 0
        assert server.host == "127.0.0.1"
        assert server.url == f"ws://127.0.0.1:{port}/"
    with server:  # started again: same port, so the same URL
        assert server.port == port
        with open_client(server.url) as ws:
            assert len(recv_until_closed(ws)[0]) == 1
    assert server.connections == 1
    assert not mock_threads()


def test_start_fails_clearly_when_port_is_taken():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = MockServer(port=port)
        with pytest.raises(RuntimeError, match=str(port)) as info:
            server.start()
        assert isinstance(info.value.__cause__, OSError)
    assert not server.running
    assert not mock_threads()


def test_wait_for_times_out():
    with MockServer() as server:
        started = time.monotonic()
        assert server.wait_for(lambda s: s.connections > 0, timeout=0.1) is False
        assert time.monotonic() - started < 1.0


def test_bad_item_from_a_stream_closes_with_1011_and_is_recorded():
    def stream():
        yield "good"
        yield 42

    with MockServer(stream) as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
        assert messages == ["good"]
        assert closed.rcvd.code == 1011
        assert server.wait_for(lambda s: len(s.errors) == 1)
        assert isinstance(server.errors[0], TypeError)


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        ((["a"],), {"count": 3}, ValueError),
        (("a single string",), {}, TypeError),
        (([object()],), {}, TypeError),
        ((42,), {}, TypeError),
        ((), {"count": -1}, ValueError),
        ((), {"rate": 0}, ValueError),
        ((), {"close_code": 1006}, ValueError),
        ((), {"close_reason": "x" * 124}, ValueError),
        ((), {"reject": 101}, ValueError),
        ((), {"drop_after": -1}, ValueError),
        ((), {"port": 70000}, ValueError),
        ((), {"start_delay": -1}, ValueError),
    ],
)
def test_bad_arguments_are_refused(args, kwargs, error):
    with pytest.raises(error):
        MockServer(*args, **kwargs)


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_serve_forever_stops_on_ctrl_c():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "wspool.testing", "--count", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("ws://127.0.0.1:"), proc.stderr.read()
        with open_client(url) as ws:
            assert len(recv_until_closed(ws)[0]) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def check_stopped_afterwards():
    """Set up before mock_server, so torn down after it: checks its servers were stopped."""
    servers = []
    yield servers
    assert servers
    assert not any(server.running for server in servers)
    assert not mock_threads()


def test_mock_server_fixture(check_stopped_afterwards, mock_server):
    first = mock_server(count=10)
    second = mock_server(["x"], close_code=None)
    check_stopped_afterwards.extend([first, second])
    assert first.running and second.running
    assert first.port != second.port
    with open_client(first.url) as ws:
        assert len(recv_until_closed(ws)[0]) == 10
    with open_client(second.url) as ws:
        assert ws.recv(timeout=RECV_TIMEOUT) == "x"
