"""The core promises of wspool.consume / wspool.run against the bundled MockServer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import wspool


def test_n_messages_give_n_results_with_exact_ids(mock_server):
    n = 20_000
    server = mock_server(count=n)
    with wspool.consume(server.url, decode="json") as stream:
        results = list(stream)
    assert len(results) == n
    assert sorted(r.job.id for r in results) == list(range(n))
    for r in results:
        assert r.ok and r.error is None
        # The server numbers its messages with seq; ids follow receipt order.
        assert r.value["seq"] == r.job.id == r.id
        assert r.job.data is r.value
        assert r.job.type == "text"
        assert r.job.connection == 0
    stats = stream.stats
    assert (stats.received, stats.processed, stats.failed, stats.in_flight) == (n, n, 0, 0)
    assert stats.bytes == sum(r.job.metadata["size"] for r in results)
    assert stats.threads == 0


def test_handler_values_come_back(mock_server):
    server = mock_server(count=500)

    def handler(job: wspool.Job) -> int:
        return job.data["seq"] * 2

    with wspool.consume(server.url, handler, decode="json", workers=3) as stream:
        values = {r.job.id: r.value for r in stream}
    assert values == {i: 2 * i for i in range(500)}


def test_handler_exceptions_become_result_errors(mock_server):
    server = mock_server(count=300)

    class Boom(Exception):
        pass

    def handler(job: wspool.Job) -> str:
        if job.data["seq"] % 7 == 0:
            raise Boom(f"bad {job.id}")
        return "fine"

    with wspool.consume(server.url, handler, decode="json") as stream:
        results = list(stream)
    assert len(results) == 300
    failed = [r for r in results if not r.ok]
    assert sorted(r.job.id for r in failed) == list(range(0, 300, 7))
    for r in failed:
        assert isinstance(r.error, Boom)
        assert str(r.error) == f"bad {r.job.id}"
        assert r.value is None
        # The traceback reaches into the handler.
        assert r.error.__traceback__ is not None
        assert r.error.__traceback__.tb_frame.f_code.co_name in ("handler", "<module>") or any(
            True for _ in [r.error.__traceback__]
        )
    tb = failed[0].error.__traceback__
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "handler" in names
    assert all(r.value == "fine" for r in results if r.ok)
    assert stream.stats.failed == len(failed)
    assert stream.stats.processed == 300 - len(failed)


def test_decode_modes_and_frame_types(mock_server):
    server = mock_server(messages=[b"\xff\x01raw", "héllo", b"caf\xc3\xa9"])
    with wspool.consume(server.url, decode="bytes", workers=1) as stream:
        by_id = {r.job.id: r for r in stream}
    assert by_id[0].value == b"\xff\x01raw" and by_id[0].job.type == "binary"
    assert by_id[1].value == "héllo".encode() and by_id[1].job.type == "text"
    assert by_id[1].job.metadata == {"size": len("héllo".encode())}
    assert all(r.ok and r.error is None and r.job.data is r.value for r in by_id.values())

    with wspool.consume(server.url, decode="text", workers=1) as stream:
        by_id = {r.job.id: r for r in stream}
    assert isinstance(by_id[0].error, wspool.DecodeError)
    assert by_id[0].job.data == b"\xff\x01raw"
    assert by_id[1].value == "héllo"
    assert by_id[2].value == "café"


def test_bad_json_is_a_decode_error_and_the_stream_goes_on(mock_server):
    server = mock_server(messages=['{"a": 1}', "{not json", '{"a": 3}'])
    calls = []
    with wspool.consume(server.url, calls.append, decode="json", workers=1) as stream:
        by_id = {r.job.id: r for r in stream}
    assert by_id[0].ok and by_id[2].ok
    error = by_id[1].error
    assert isinstance(error, wspool.DecodeError) and isinstance(error, ValueError)
    assert error.job_id == 1 and error.payload == b"{not json"
    assert "not valid JSON" in str(error)
    # The handler never sees a payload that did not decode.
    assert sorted(job.id for job in calls) == [0, 2]


def test_refused_port_is_a_connect_error(threads, closed_port):
    url = f"ws://127.0.0.1:{closed_port}/feed"
    with pytest.raises(wspool.ConnectError) as info:
        wspool.consume(url)
    assert url in str(info.value)
    assert info.value.url == url
    assert not isinstance(info.value, wspool.HandshakeError)
    threads.assert_back()


@pytest.mark.parametrize("status", [403, 404])
def test_rejected_handshake_is_a_handshake_error(mock_server, status):
    server = mock_server(reject=status)
    with pytest.raises(wspool.HandshakeError) as info:
        wspool.consume(server.url)
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    assert isinstance(info.value, wspool.ConnectError)


@pytest.mark.parametrize("url", ["http://x", "ws://", "ws://127.0.0.1:99999/", "not a url"])
def test_bad_urls_raise_value_error_before_any_thread(url, threads):
    with pytest.raises(ValueError) as info:
        wspool.consume(url)
    assert url in str(info.value)
    threads.assert_back()


@pytest.mark.parametrize(
    "kwargs",
    [{"decode": "xml"}, {"workers": 0}, {"queue_size": 0}, {"subscribe": [3.5]}, {"timeout": -1}],
)
def test_bad_arguments_raise_value_error(mock_server, kwargs):
    server = mock_server(count=1)
    with pytest.raises(ValueError):
        wspool.consume(server.url, **kwargs)


def test_drop_mid_stream_raises_after_every_result(mock_server):
    server = mock_server(count=1000, drop_after=400)
    seen = []
    with pytest.raises(wspool.ConnectionClosed) as info:
        with wspool.consume(server.url, decode="json") as stream:
            for r in stream:
                seen.append(r.job.id)
    assert sorted(seen) == list(range(400))
    assert info.value.code == 1006
    assert stream.stats.received == 400


def test_abnormal_close_code_is_raised_with_code_and_reason(mock_server):
    server = mock_server(count=50, close_code=1011, close_reason="upstream failed")
    results = []
    with pytest.raises(wspool.ConnectionClosed) as info:
        for r in wspool.consume(server.url):
            results.append(r)
    assert len(results) == 50
    assert (info.value.code, info.value.reason) == (1011, "upstream failed")
    assert "1011" in str(info.value) and "upstream failed" in str(info.value)


def test_normal_close_ends_iteration_quietly(mock_server):
    server = mock_server(count=10)
    stream = wspool.consume(server.url)
    assert len(list(stream)) == 10
    assert stream.error is None and stream.finished
    assert list(stream) == []


def test_subscribe_messages_reach_the_server(mock_server):
    server = mock_server(count=3, echo=True, start_delay=0.3)
    subscribe = ["hello", b"\x01bin", {"op": "subscribe", "channel": "trades"}]
    with wspool.consume(server.url, subscribe=subscribe) as stream:
        results = list(stream)
    assert server.received == ["hello", b"\x01bin", '{"op":"subscribe","channel":"trades"}']
    echoed = [r.job.data for r in sorted(results, key=lambda r: r.job.id) if r.job.id < 3]
    assert echoed == ["hello", "\x01bin", '{"op":"subscribe","channel":"trades"}']


def test_headers_are_sent(mock_server):
    server = mock_server(count=1)
    with wspool.consume(server.url, headers={"X-Api-Key": "k123"}) as stream:
        list(stream)
    headers = {name.lower(): value for name, value in server.request_headers[0].items()}
    assert headers["x-api-key"] == "k123"


def test_on_result_runs_once_per_result_never_concurrently(mock_server):
    server = mock_server(count=2000)
    busy = threading.Lock()
    calls = []
    threads = set()

    def on_result(result: wspool.Result) -> None:
        assert busy.acquire(blocking=False), "on_result ran concurrently"
        try:
            calls.append(result.job.id)
            threads.add(threading.get_ident())
        finally:
            busy.release()

    stats = wspool.run(server.url, lambda job: None, on_result=on_result, workers=4)
    assert sorted(calls) == list(range(2000))
    assert threads == {threading.get_ident()}
    assert stats.processed == 2000


def test_default_workers_is_cpu_count_unless_there_is_nothing_to_share(mock_server):
    server = mock_server(count=1)
    for handler, decode, workers in [
        (lambda job: None, "text", os.cpu_count()),
        (None, "json", os.cpu_count()),
        (None, "text", 1),
        (None, "bytes", 1),
    ]:
        with wspool.consume(server.url, handler, decode=decode) as stream:
            assert stream.stats.workers == workers, (handler, decode)
            list(stream)


def test_early_exit_finishes_started_jobs_and_leaves_no_thread(mock_server, threads):
    server = mock_server(count=100_000)
    threads.mark()
    delivered = []

    def slow(job: wspool.Job) -> int:
        time.sleep(0.01)
        return job.id

    with wspool.consume(
        server.url, slow, workers=4, queue_size=16, on_result=delivered.append
    ) as stream:
        for i, _ in enumerate(stream):
            if i == 5:
                break
    stats = stream.stats
    # Everything received was processed and handed to on_result; nothing cancelled or lost.
    assert stats.cancelled == 0 and stats.in_flight == 0
    assert stats.received == stats.processed == len(delivered)
    assert stats.received < 1000  # reading stopped: the queues are bounded
    assert stats.threads == 0
    threads.assert_back()
    # The server saw a normal close frame from us.
    assert server.wait_for(lambda s: s.close_codes == [1000])


def test_close_inside_on_result_ends_the_stream(mock_server):
    server = mock_server(count=100_000, rate=2000)

    def on_result(result):
        if result.job.id == 20:
            stream.close()

    stream = wspool.consume(server.url, on_result=on_result)
    with stream:
        results = list(stream)
    assert 21 <= len(results) == stream.stats.received < 2000
    assert stream.error is None


def test_cancel_drops_queued_jobs(mock_server, threads):
    server = mock_server(count=10_000)
    threads.mark()

    def slow(job):
        time.sleep(0.02)

    stream = wspool.consume(server.url, slow, workers=2, queue_size=64)
    first = next(stream)
    assert first.ok
    stream.cancel()
    stats = stream.stats
    assert stats.cancelled > 0
    assert stats.threads == 0 and stats.in_flight == 0
    assert stats.received == stats.processed + stats.failed + stats.cancelled
    assert list(stream) == []
    threads.assert_back()


def test_timeout_ends_a_never_ending_stream(mock_server):
    server = mock_server(count=10_000_000, rate=200)
    start = time.monotonic()
    with wspool.consume(server.url, timeout=0.5) as stream:
        n = sum(1 for _ in stream)
    took = time.monotonic() - start
    assert 0.45 <= took < 3.0
    assert n == stream.stats.received > 10
    assert stream.error is None
    assert server.wait_for(lambda s: s.close_codes == [1000])


def test_seed_parity_sleeping_jobs_run_in_parallel(mock_server):
    server = mock_server(count=24)
    start = time.monotonic()
    stats = wspool.run(server.url, lambda job: time.sleep(0.5), workers=12)
    took = time.monotonic() - start
    assert stats.processed == 24
    # 24 jobs of 0.5 s on 12 workers: about 1 s (12 s if they ran one by one).
    assert 0.95 <= took < 2.0


def test_a_worker_keeps_its_thread_locals_from_job_to_job(mock_server):
    # Each worker keeps one Python thread state for its life, so a handler's threading.local
    # (a per-thread cache, a connection) lasts across its jobs instead of starting over at
    # every call (a new thread state each time, frame stack mapped and unmapped: slow).
    server = mock_server(count=2_000)
    local = threading.local()

    def handler(job: wspool.Job) -> tuple[int, int]:
        local.calls = getattr(local, "calls", 0) + 1
        return threading.get_ident(), local.calls

    with wspool.consume(server.url, handler, workers=2) as stream:
        seen = [r.value for r in stream]
    assert len(seen) == 2_000
    by_thread: dict[int, list[int]] = {}
    for ident, calls in seen:
        by_thread.setdefault(ident, []).append(calls)
    assert len(by_thread) <= 2
    for calls in by_thread.values():
        assert sorted(calls) == list(range(1, len(calls) + 1))


def test_run_returns_final_stats(mock_server):
    server = mock_server(count=1234)
    stats = wspool.run(server.url, decode="json")
    assert isinstance(stats, wspool.Stats)
    assert stats.received == stats.processed == 1234
    assert stats.as_dict()["received"] == 1234
    assert "received=1234" in repr(stats)


def test_results_and_jobs_repr(mock_server):
    server = mock_server(messages=[json.dumps({"k": "v"})])
    (result,) = list(wspool.consume(server.url, decode="json"))
    assert repr(result) == "Result(id=0, value={'k': 'v'})"
    assert repr(result.job).startswith('Job(id=0, type="text", connection=0, size=10')


def test_silent_listener_is_a_timeout(threads, silent_url):
    url = silent_url
    start = time.monotonic()
    with pytest.raises(wspool.Timeout) as info:
        wspool.consume(url, open_timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 2.0
    assert url in str(info.value) and isinstance(info.value, TimeoutError)
    threads.assert_back()


def test_wss_to_a_plain_server_is_a_connect_error(mock_server):
    server = mock_server(count=1)
    url = server.url.replace("ws://", "wss://")
    with pytest.raises(wspool.ConnectError) as info:
        wspool.consume(url, open_timeout=5)
    assert url in str(info.value)


def test_close_in_the_loop_yields_the_rest_then_stops(mock_server):
    server = mock_server(count=1_000_000, rate=5000)
    ids = []
    with wspool.consume(server.url, lambda job: time.sleep(0.001), workers=2) as stream:
        for result in stream:
            ids.append(result.job.id)
            if len(ids) == 10:
                stream.close()
    # Every message received before the close has its result, none twice.
    assert len(ids) == len(set(ids)) == stream.stats.received
    assert stream.stats.cancelled == 0 and stream.stats.threads == 0


def test_an_exception_in_the_block_still_closes_gracefully(mock_server):
    server = mock_server(count=1_000_000, rate=5000)
    delivered = []
    with pytest.raises(LookupError):
        with wspool.consume(server.url, on_result=delivered.append) as stream:
            for result in stream:
                if result.job.id >= 5:
                    raise LookupError("stop here")
    stats = stream.stats
    assert stats.cancelled == 0 and stats.in_flight == 0 and stats.threads == 0
    assert len(delivered) == stats.received


def test_close_from_a_handler_ends_the_stream(mock_server, threads):
    server = mock_server(count=1_000_000, rate=2000)
    threads.mark()
    holder = {}

    def handler(job):
        if job.id == 30:
            holder["stream"].close()  # on a pool thread: only asks
        return job.id

    start = time.monotonic()
    with wspool.consume(server.url, handler, workers=2) as stream:
        holder["stream"] = stream
        results = list(stream)
    assert time.monotonic() - start < 3
    assert len(results) == stream.stats.received >= 31
    threads.assert_back()


def test_cancel_from_a_handler_ends_the_stream(mock_server, threads):
    server = mock_server(count=1_000_000, rate=2000)
    threads.mark()
    holder = {}

    def handler(job):
        if job.id == 30:
            holder["stream"].cancel()

    start = time.monotonic()
    with wspool.consume(server.url, handler, workers=2) as stream:
        holder["stream"] = stream
        for _ in stream:
            pass
    assert time.monotonic() - start < 3
    stats = stream.stats
    assert stats.threads == 0 and stats.in_flight == 0
    threads.assert_back()


DEL_CALLS_BACK = """
import json, sys, time, wspool
url, n = sys.argv[1], int(sys.argv[2])
stream = None
calls = 0


class CallsBack:
    def __del__(self):
        global calls
        calls += 1
        stream.cancel()  # back into the stream that is freeing it


with wspool.consume(url, lambda job: CallsBack(), decode="bytes", queue_size=4096) as stream:
    while stream.stats.processed < n or stream.stats.threads:
        time.sleep(0.005)
    first = next(stream)  # the rest wait: some taken into the iterator, the others in Rust
    stream.cancel()
    freed_by_cancel = calls
    del first
print(json.dumps({"freed": freed_by_cancel, "calls": calls, **stream.stats.as_dict()}))
"""


def test_results_freed_by_cancel_may_call_back_into_the_stream(mock_server):
    # Regression: cancel() freed the results not yet taken while it held the stream's locks;
    # a result whose __del__ called back into the stream then waited for them with the GIL.
    n = 3000
    server = mock_server(count=n)
    proc = subprocess.run(
        [sys.executable, "-c", DEL_CALLS_BACK, server.url, str(n)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    got = json.loads(proc.stdout)
    assert got["freed"] == n - 1 and got["calls"] == n, got
    assert got["processed"] == n and got["in_flight"] == 0, got


def test_on_result_that_raises_once_still_sees_every_result(mock_server):
    server = mock_server(count=2000)
    seen = []

    def on_result(result):
        seen.append(result.job.id)
        if len(seen) == 3:
            raise RuntimeError("on_result failed once")

    stream = wspool.consume(server.url, on_result=on_result)
    with pytest.raises(RuntimeError):
        with stream:
            for _ in stream:
                pass
    assert sorted(seen) == list(range(stream.stats.received))
    assert stream.stats.threads == 0


def test_elapsed_stops_when_the_stream_is_cancelled(mock_server):
    server = mock_server(count=1_000_000, rate=1000)
    stream = wspool.consume(server.url)
    next(stream)
    stream.cancel()
    first = stream.stats.elapsed
    time.sleep(0.2)
    assert stream.stats.elapsed == first


def test_huge_or_bad_durations(mock_server):
    server = mock_server(count=100)
    # Far beyond any clock: no deadline at all, every message still arrives.
    assert wspool.run(server.url, timeout=sys.maxsize).processed == 100
    for kwargs in ({"timeout": 1e20}, {"close_timeout": float("inf")}, {"open_timeout": -1}):
        with pytest.raises(ValueError):
            wspool.consume(server.url, **kwargs)


def test_timeout_bounds_the_opening_too(silent_url):
    start = time.monotonic()
    with pytest.raises(wspool.Timeout):
        wspool.consume(silent_url, timeout=0.3)
    assert time.monotonic() - start < 2.0


def test_errors_do_not_show_credentials(closed_port):
    with pytest.raises(wspool.ConnectError) as info:
        wspool.consume(f"ws://user:s3cret@127.0.0.1:{closed_port}/")
    assert "s3cret" not in str(info.value) and "s3cret" not in info.value.url
