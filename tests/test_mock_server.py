"""Tests of wspool.testing.MockServer and of the mock_server pytest fixture.

The client is websockets' plain synchronous client, so these tests do not need wspool's native
module. The fixture comes from the wspool pytest plugin: it is loaded through the package's
``pytest11`` entry point once wspool is installed; from a source tree, run pytest with
``-p wspool.pytest_plugin``.
"""

from __future__ import annotations

import asyncio
import base64
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
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from wspool.testing import ConnectionInfo, MockServer, generate_messages, main

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


def raw_handshake(server):
    """Open a WebSocket connection on a bare socket, which never answers pings by itself.

    Returns the socket (with a RECV_TIMEOUT timeout) and whatever came after the handshake.
    """
    sock = socket.create_connection((server.host, server.port), timeout=RECV_TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed during the handshake: {response!r}"
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


def parse_frames(data):
    """Split unmasked (server-to-client) WebSocket frames into (opcode, payload) pairs."""
    frames = []
    while data:
        opcode, length, start = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        assert len(data) >= start + length, "truncated frame"
        frames.append((opcode, data[start : start + length]))
        data = data[start + length :]
    return frames


def recv_or_quiet(ws, quiet=0.2):
    """Receive until the connection closes or stays quiet for `quiet` s.

    Returns (messages, the close code received, or None without one, or "quiet").
    """
    messages = []
    while True:
        try:
            messages.append(ws.recv(timeout=quiet))
        except TimeoutError:
            return messages, "quiet"
        except ConnectionClosed as exc:
            return messages, exc.rcvd.code if exc.rcvd is not None else None


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


def test_drop_connections_drops_only_the_first_connections():
    with MockServer(count=10, drop_after=3, drop_connections=2) as server:
        results = []
        for _ in range(3):
            with open_client(server.url) as ws:
                messages, closed = recv_until_closed(ws)
            results.append((len(messages), None if closed.rcvd is None else closed.rcvd.code))
        assert results == [(3, None), (3, None), (10, 1000)]
        assert server.wait_for(lambda s: len(s.close_codes) == 3)
        assert server.close_codes == [None, None, 1000]
        assert server.server_close_codes == [None, None, 1000]
        assert server.sent == 16


def test_drop_connections_with_drop_after_zero():
    with MockServer(["a"], drop_after=0, drop_connections=1) as server:
        with open_client(server.url) as ws:
            assert recv_until_closed(ws)[0] == []
        with open_client(server.url) as ws:
            assert recv_until_closed(ws)[0] == ["a"]


def test_messages_callable_with_one_argument_gets_connection_info():
    infos = []

    def resume(info):
        infos.append(info)
        start = json.loads(info.received[0])["resume_from"] if info.received else 0
        return [{"seq": seq} for seq in range(start, start + 3)]

    with MockServer(resume, start_delay=0.2) as server:
        url = server.url + "feed?from=1"
        with open_client(url, additional_headers={"X-Client": "t1"}) as ws:
            ws.send(json.dumps({"resume_from": 1234}))
            ws.send(b"\x00")
            messages, closed = recv_until_closed(ws)
        assert [json.loads(m)["seq"] for m in messages] == [1234, 1235, 1236]
        assert closed.rcvd.code == 1000
        with open_client(server.url) as ws:  # a new connection: nothing received on it yet
            assert [json.loads(m)["seq"] for m in recv_until_closed(ws)[0]] == [0, 1, 2]
        assert server.received == ['{"resume_from": 1234}', b"\x00"]
    first, second = infos
    assert isinstance(first, ConnectionInfo)
    assert (first.index, second.index) == (0, 1)
    assert first.received == ['{"resume_from": 1234}', b"\x00"]
    assert second.received == []
    assert first.request_headers["X-Client"] == "t1"
    assert "X-Client" not in second.request_headers
    assert (first.path, second.path) == ("/feed?from=1", "/")


def test_messages_callable_signature_decides_how_it_is_called():
    calls = []

    def with_default(arg="default"):
        calls.append(arg)
        return ["d"]

    class Feed:
        def stream(self, info):
            calls.append(info.index)
            return ["m"]

    def var_args(*args):
        calls.append(args)
        return ["v"]

    for messages, expected in [(with_default, "d"), (Feed().stream, "m"), (var_args, "v")]:
        with MockServer(messages) as server:
            with open_client(server.url) as ws:
                assert recv_until_closed(ws)[0] == [expected]
    assert calls == ["default", 0, ()]
    with pytest.raises(TypeError, match="ConnectionInfo"):
        MockServer(lambda info, other: [])
    with pytest.raises(TypeError, match="ConnectionInfo"):
        MockServer(lambda *, key: [])


def test_messages_callable_that_raises_closes_with_1011():
    def broken(info):
        raise LookupError("no such feed")

    with MockServer(broken) as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
        assert messages == []
        assert closed.rcvd.code == 1011
        assert server.wait_for(lambda s: len(s.errors) == 1)
        assert isinstance(server.errors[0], LookupError)
        assert server.wait_for(lambda s: s.server_close_codes == [1011])


def test_freeze_after_stops_sending_and_reading_but_keeps_tcp_open():
    with MockServer(
        ["a", "b", "c"], freeze_after=2, freeze_connections=1, close_code=None
    ) as server:
        with open_client(server.url, close_timeout=0.2) as ws:
            assert [ws.recv(timeout=RECV_TIMEOUT) for _ in range(2)] == ["a", "b"]
            assert server.wait_for(lambda s: s.frozen == 1)
            ws.send("unread")
            assert not ws.ping().wait(0.3)  # no pong: the server reads nothing
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.05)  # and sends nothing, but the connection is open
            assert server.close_codes == []
        # The client gave up on its close frame and closed the TCP connection: noticed.
        assert server.wait_for(lambda s: s.close_codes == [None], timeout=2.0)
        assert server.server_close_codes == [None]
        assert server.received == []
        assert server.sent == 2
        # Only the first connection freezes.
        with open_client(server.url) as ws:
            assert [ws.recv(timeout=RECV_TIMEOUT) for _ in range(3)] == ["a", "b", "c"]
            assert ws.ping().wait(RECV_TIMEOUT)
            ws.send("read")
            assert server.wait_for(lambda s: s.received == ["read"])
        assert server.wait_for(lambda s: s.close_codes == [None, 1000])
        assert server.frozen == 1
        assert server.errors == []


def test_client_heartbeat_detects_a_frozen_server():
    async def consume(url):
        async with async_connect(
            url, ping_interval=0.05, ping_timeout=0.1, close_timeout=0.1, open_timeout=3.0
        ) as ws:
            assert await ws.recv() == "a"
            started = time.monotonic()
            with pytest.raises(ConnectionClosedError) as info:
                await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
            return time.monotonic() - started, info.value

    with MockServer(["a", "b"], freeze_after=1) as server:
        elapsed, closed = asyncio.run(consume(server.url))
        assert elapsed < 0.6, elapsed  # ping_interval + ping_timeout + close_timeout = 0.25
        assert closed.sent.code == 1011  # the client's keepalive ping timed out
        assert closed.rcvd is None
        assert server.wait_for(lambda s: s.close_codes == [None], timeout=2.0)
        assert server.server_close_codes == [None]
        assert server.received == []


def test_freeze_stops_server_pings_too():
    with MockServer(["a"], freeze_after=1, ping_interval=0.05, ping_timeout=0.1) as server:
        sock, data = raw_handshake(server)
        with sock:
            assert server.wait_for(lambda s: s.frozen == 1)
            sock.settimeout(0.4)
            with pytest.raises(socket.timeout):
                while True:
                    chunk = sock.recv(65536)
                    assert chunk, "the frozen server closed the connection"
                    data += chunk
        assert parse_frames(data) == [(0x1, b"a")]  # no ping, no close frame
        assert server.wait_for(lambda s: s.close_codes == [None])
        assert server.server_close_codes == [None]


def test_stop_aborts_frozen_connections_promptly():
    server = MockServer(["a", "b"], freeze_after=1).start()
    with open_client(server.url, close_timeout=0.2) as ws:
        try:
            assert ws.recv(timeout=RECV_TIMEOUT) == "a"
            assert server.wait_for(lambda s: s.frozen == 1)
        finally:
            started = time.monotonic()
            server.stop()
        assert time.monotonic() - started < 0.5
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=RECV_TIMEOUT)
        assert info.value.rcvd is None  # aborted: no close frame
    assert server.close_codes == [None]
    assert server.server_close_codes == [None]
    assert not mock_threads()


def test_freeze_after_zero_and_larger_than_the_stream():
    with MockServer(["a"], freeze_after=0) as server:
        with open_client(server.url, close_timeout=0.1) as ws:
            assert server.wait_for(lambda s: s.frozen == 1)
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.1)
    with MockServer(["a"], freeze_after=5) as server:
        with open_client(server.url) as ws:
            messages, closed = recv_until_closed(ws)
        assert messages == ["a"]
        assert closed.rcvd.code == 1000
        assert server.frozen == 0


def test_server_pings_are_answered_by_a_live_client():
    with MockServer(close_code=None, ping_interval=0.05, ping_timeout=0.1) as server:
        with open_client(server.url) as ws:
            # Some 8 pings come meanwhile; the client's background thread answers them.
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.4)
        assert server.wait_for(lambda s: len(s.close_codes) == 1)
        assert server.close_codes == [1000]
        assert server.server_close_codes == [1000]  # the server echoed the client's close


def test_server_closes_with_1011_when_pings_go_unanswered():
    with MockServer(close_code=None, ping_interval=0.05, ping_timeout=0.1) as server:
        sock, data = raw_handshake(server)
        with sock:
            started = time.monotonic()
            while True:  # until the server ends the TCP connection
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            elapsed = time.monotonic() - started
        frames = parse_frames(data)
        assert [opcode for opcode, _ in frames] == [0x9, 0x8]  # a ping, then a close frame
        assert int.from_bytes(frames[1][1][:2], "big") == 1011
        assert frames[1][1][2:] == b"keepalive ping timeout"
        assert elapsed < 0.6, elapsed
        assert server.wait_for(lambda s: s.server_close_codes == [1011])
        assert server.close_codes == [None]


def test_server_close_codes_say_how_the_server_ended_each_connection():
    server = MockServer(["x"], close_code=None).start()
    with open_client(server.url) as ws:
        assert ws.recv(timeout=RECV_TIMEOUT) == "x"
        ws.close(code=4000, reason="client done")
    assert server.wait_for(lambda s: len(s.server_close_codes) == 1)
    with open_client(server.url) as ws:
        assert ws.recv(timeout=RECV_TIMEOUT) == "x"
        ws.close()  # 1000 by default
    assert server.wait_for(lambda s: len(s.server_close_codes) == 2)
    with open_client(server.url, close_timeout=0.5) as ws:
        try:
            assert ws.recv(timeout=RECV_TIMEOUT) == "x"
        finally:
            server.stop()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=RECV_TIMEOUT)
    assert server.server_close_codes == [4000, 1000, 1001]
    assert server.close_codes == [4000, 1000, 1001]
    assert all(type(code) is int for code in server.server_close_codes + server.close_codes)


def test_a_client_that_does_not_read_makes_the_server_stall():
    payload = "x" * 65536
    with MockServer([payload] * 128) as server:  # 8 MiB, more than the socket buffers hold
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no receive autotuning
        sock.settimeout(RECV_TIMEOUT)
        sock.connect((server.host, server.port))
        with open_client(server.url, sock=sock, max_queue=1) as ws:
            assert server.wait_for(lambda s: s.stalls >= 1, timeout=2.0)
            time.sleep(0.2)  # the server is waiting for the client all this time
            assert server.sent < 128
            messages = [ws.recv(timeout=RECV_TIMEOUT) for _ in range(128)]
        assert messages == [payload] * 128
        assert server.stalled_seconds >= 0.15
        assert server.wait_for(lambda s: s.sent == 128)


def test_a_client_that_keeps_up_causes_no_stall():
    with MockServer(count=200) as server:
        with open_client(server.url) as ws:
            assert len(recv_until_closed(ws)[0]) == 200
        assert server.stalls == 0
        assert server.stalled_seconds == 0.0


def test_two_mib_text_message_goes_out_intact():
    big = "x" * (2 << 20)
    with MockServer([big, "after"]) as server:
        with open_client(server.url, max_size=None) as ws:
            messages, closed = recv_until_closed(ws)
        assert len(messages) == 2 and messages[0] == big and messages[1] == "after"
        assert closed.rcvd.code == 1000
        # websockets' default max_size (1 MiB) refuses it: the client fails with 1009.
        with open_client(server.url) as ws:
            with pytest.raises(ConnectionClosedError) as info:
                ws.recv(timeout=RECV_TIMEOUT)
        assert info.value.sent.code == 1009
        assert server.wait_for(lambda s: s.close_codes == [1000, 1009])


@pytest.mark.parametrize(
    "options, expected",
    [
        ("--count 3 --drop-after 1 --drop-connections 1", [(1, None), (3, 1000)]),
        (
            "--count 3 --freeze-after 1 --freeze-connections 1 --ping-interval 5 --ping-timeout 5",
            [(1, "quiet"), (3, 1000)],
        ),
    ],
)
def test_cli_passes_the_new_options(monkeypatch, capsys, options, expected):
    results = []

    def serve_forever(server):
        try:
            for _ in range(2):
                with open_client(server.url, close_timeout=0.1) as ws:
                    messages, code = recv_or_quiet(ws)
                results.append((len(messages), code))
        finally:
            server.stop()

    monkeypatch.setattr(MockServer, "serve_forever", serve_forever)
    main(options.split())
    assert results == expected
    assert capsys.readouterr().out.startswith("ws://127.0.0.1:")


@pytest.mark.parametrize(
    "options",
    [["--drop-connections", "1"], ["--freeze-connections", "1"], ["--ping-timeout", "1"]],
)
def test_cli_refuses_options_missing_their_partner(capsys, options):
    with pytest.raises(SystemExit) as info:
        main(options)
    assert info.value.code == 2
    assert "needs" in capsys.readouterr().err


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
        ((), {"drop_after": 1, "drop_connections": -1}, ValueError),
        ((), {"drop_after": 1, "drop_connections": True}, TypeError),
        ((), {"drop_connections": 1}, ValueError),
        ((), {"freeze_after": -1}, ValueError),
        ((), {"freeze_after": "1"}, TypeError),
        ((), {"freeze_after": 1, "drop_after": 1}, ValueError),
        ((), {"freeze_after": 1, "freeze_connections": 1.5}, TypeError),
        ((), {"freeze_connections": 1}, ValueError),
        ((), {"ping_interval": 0}, ValueError),
        ((), {"ping_interval": "1"}, TypeError),
        ((), {"ping_interval": float("inf")}, ValueError),
        ((), {"ping_interval": 1, "ping_timeout": -1}, ValueError),
        ((), {"ping_timeout": 1}, ValueError),
        ((lambda info, other: [],), {}, TypeError),
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
