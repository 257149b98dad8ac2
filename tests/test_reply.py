"""reply=True: each result's value goes back on the connection its message came from."""

from __future__ import annotations

import time

import pytest
from evil_server import wait_for

import wspool
from wspool.testing import MockServer


def test_values_go_back_as_text_or_binary_and_none_sends_nothing():
    def handler(job: wspool.Job):
        if job.type == "binary":
            return job.data[::-1]
        return None if job.data == "skip" else f"ack {job.data}"

    with MockServer(messages=["a", "skip", "c", b"\x01\x02"], close_code=None) as server:
        with wspool.consume(server.url, handler, decode="text", reply=True) as stream:
            assert wait_for(lambda: len(server.received) == 3), server.received
            stream.close()
            results = list(stream)
        assert sorted(map(repr, server.received)) == sorted(
            map(repr, ["ack a", "ack c", "\x02\x01"])
        )
    assert len(results) == 4 and all(r.ok for r in results)
    assert stream.stats.replies == 3 and stream.stats.replies_dropped == 0


def test_bytes_values_are_sent_as_binary():
    with MockServer(messages=[b"\x00\xff"], close_code=None) as server:
        with wspool.consume(server.url, lambda job: job.data, decode="bytes", reply=True) as s:
            assert wait_for(lambda: len(server.received) == 1)
            s.close()
    assert server.received == [b"\x00\xff"]


def test_without_a_handler_the_decoded_payload_is_echoed():
    messages = ['{"b": 1, "a": [1, 2]}', "plain"]
    with MockServer(messages=[messages[0]], close_code=None) as server:
        with wspool.consume(server.url, decode="json", reply=True) as stream:
            assert wait_for(lambda: len(server.received) == 1)
            stream.close()
    assert server.received == [messages[0]]
    with MockServer(messages=[messages[1]], close_code=None) as server:
        with wspool.consume(server.url, reply=True) as stream:
            assert wait_for(lambda: len(server.received) == 1)
            stream.close()
    assert server.received == ["plain"]


def test_a_value_that_cannot_be_sent_fails_that_job():
    with MockServer(messages=["x", "y"], close_code=None) as server:
        handler = lambda job: 42 if job.data == "x" else "fine"  # noqa: E731
        with wspool.consume(server.url, handler, reply=True) as stream:
            assert wait_for(lambda: len(server.received) == 1)
            stream.close()
            results = {r.job.data: r for r in stream}
    assert server.received == ["fine"]
    error = results["x"].error
    assert isinstance(error, TypeError)
    assert "reply=True: the handler returned int" in str(error)
    assert results["x"].value is None and results["y"].value == "fine"


def test_replies_whose_connection_ended_are_dropped_and_counted():
    def slow(job: wspool.Job) -> str:
        time.sleep(0.5)
        return "too late"

    with MockServer(messages=["x"], close_code=1000) as server:
        with wspool.consume(server.url, slow, reply=True) as stream:
            values = [r.value for r in stream]
    assert values == ["too late"]
    assert stream.stats.replies == 0 and stream.stats.replies_dropped == 1
    assert server.received == []


def test_replies_flow_while_the_job_queue_is_full():
    # A tiny job queue and reply channel: the read loop waits for queue space while the
    # workers wait to hand over replies; it must keep sending them, or both would wait forever.
    n = 3000
    with MockServer(count=n, close_code=None) as server:
        with wspool.consume(
            server.url, lambda job: str(job.id), workers=2, queue_size=4, reply=True
        ) as stream:
            for got, _ in enumerate(stream, 1):
                if got == n:
                    break
            # Each reply is queued before its result is handed over.
            assert wait_for(lambda: len(server.received) == n, timeout=30), len(server.received)
    assert sorted(server.received, key=int) == [str(i) for i in range(n)]
    assert stream.stats.replies == n


def test_reply_must_be_a_bool():
    with pytest.raises(ValueError, match="reply must be True or False"):
        wspool.consume("ws://127.0.0.1:1/", reply="yes")  # type: ignore[arg-type]


def test_replies_owed_before_a_protocol_violation_go_out_before_the_close():
    from evil_server import CLOSE, TEXT, EvilServer, frame

    def slow_echo(job: wspool.Job) -> str:
        time.sleep(0.2)
        return job.data

    with EvilServer([frame(b"first"), frame(b"second"), frame(b"x", rsv=4), 5.0]) as server:
        with pytest.raises(wspool.ProtocolError, match="RSV"):
            with wspool.consume(server.url, slow_echo, workers=1, reply=True) as stream:
                for _ in stream:
                    pass
        assert server.wait_done()
    assert server.frames == [(TEXT, b"first"), (TEXT, b"second"), (CLOSE, b"\x03\xea")]
