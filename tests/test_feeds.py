"""Real feeds: flow control, ordering, reconnects, heartbeats, size limits and asyncio, each
against wspool.testing.MockServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest

import wspool

pytestmark = pytest.mark.timeout(60)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _slow(seconds: float):
    def handler(job: wspool.Job) -> int:
        time.sleep(seconds)
        return job.id

    return handler


# -- flow control -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_drop_policies_count_every_dropped_message(mock_server, policy):
    server = mock_server(count=2000)
    with wspool.consume(
        server.url, _slow(0.001), workers=1, queue_size=8, overflow=policy
    ) as stream:
        ids = [r.value for r in stream]
    stats = stream.stats
    assert stats.received == 2000
    assert stats.dropped > 0
    assert len(ids) + stats.dropped == 2000
    assert stats.processed == len(ids) and stats.in_flight == 0
    assert ids == sorted(ids)
    if policy == "drop_oldest":
        assert ids[-1] == 1999, "the newest message survives drop_oldest"
    else:
        assert ids[:8] == list(range(8)), "the first messages survive drop_newest"


def test_overflow_error_raises_after_the_results_before_it(mock_server):
    server = mock_server(count=2000)
    ids = []
    with pytest.raises(wspool.Overflow) as caught:
        with wspool.consume(
            server.url, _slow(0.002), workers=1, queue_size=4, overflow="error"
        ) as stream:
            for result in stream:
                ids.append(result.value)
    error = caught.value
    assert error.capacity == 4
    assert ids == list(range(error.job_id)), "every message before the overflow was delivered"
    stats = stream.stats
    # The overflowing message and those read in the same run after it are dropped.
    assert stats.dropped >= 1 and stats.received == stats.processed + stats.dropped
    assert "queue_size" in str(error)
    assert server.wait_for(lambda s: s.close_codes == [1008])


def test_conflate_keeps_the_newest_message_per_key(mock_server):
    symbols = ["BTC", "ETH", "SOL"]
    messages = [{"sym": symbols[i % 3], "seq": i} for i in range(3000)]
    server = mock_server(messages)
    seen: dict[str, list[int]] = {s: [] for s in symbols}
    with wspool.consume(
        server.url,
        _slow(0.001),
        workers=1,
        queue_size=4,
        decode="json",
        key="sym",
        overflow="conflate",
    ) as stream:
        for result in stream:
            seen[result.job.data["sym"]].append(result.job.data["seq"])
    stats = stream.stats
    assert stats.dropped > 1000, "a slow consumer sees mostly the latest prices"
    assert sum(map(len, seen.values())) + stats.dropped == 3000
    for i, sym in enumerate(symbols):
        assert seen[sym] == sorted(seen[sym])
        assert seen[sym][-1] == 2997 + i, "the newest message of every key is delivered"


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest", "conflate", "error"])
def test_overflow_policies_hold_for_bytes_taken_without_a_worker(mock_server, policy):
    # Bytes without a handler run no worker: the consuming thread takes them from the queue
    # itself, so here the slow one is the consumer. Every policy must act as with workers.
    symbols = ["BTC", "ETH", "SOL"]
    server = mock_server([{"sym": symbols[i % 3], "seq": i} for i in range(3000)])
    seqs: list[int] = []
    keyed = {"key": "sym"} if policy == "conflate" else {}
    stream = wspool.consume(server.url, decode="bytes", queue_size=4, overflow=policy, **keyed)
    assert stream.stats.workers == 1
    try:
        with stream:
            for result in stream:
                seqs.append(json.loads(result.value)["seq"])
                time.sleep(0.0005)
    except wspool.Overflow as error:
        assert policy == "error"
        assert error.capacity == 4 and seqs == list(range(error.job_id))
    stats = stream.stats
    assert stats.dropped > 0, stats
    assert stats.received == stats.processed + stats.dropped and stats.in_flight == 0, stats
    assert stats.processed == len(seqs)
    # In order (conflation: within each key; a key keeps its first place in the queue).
    for k in range(3) if policy == "conflate" else [None]:
        mine = [s for s in seqs if k is None or s % 3 == k]
        assert mine == sorted(mine)
    if policy == "drop_newest":
        assert seqs[:4] == list(range(4))
    elif policy == "drop_oldest":
        assert seqs[-1] == 2999
    elif policy == "conflate":
        # The newest message of every key is delivered.
        assert [max(s for s in seqs if s % 3 == k) for k in range(3)] == [2997, 2998, 2999]


def test_key_order_holds_for_bytes_taken_without_a_worker(mock_server):
    server = mock_server([{"sym": "ABC"[i % 3], "seq": i} for i in range(3000)])
    with wspool.consume(
        server.url, decode="bytes", queue_size=8, key="sym", ordered="key"
    ) as stream:
        seqs = [json.loads(v)["seq"] for v in stream.values()]
    # One consumer takes them: receipt order, which is also each key's order.
    assert seqs == list(range(3000))
    assert stream.stats.processed == 3000 and stream.stats.in_flight == 0


def test_conflate_and_key_order_need_a_key():
    with pytest.raises(ValueError, match="need key="):
        wspool.consume("ws://127.0.0.1:9/", overflow="conflate")
    with pytest.raises(ValueError, match="need key="):
        wspool.consume("ws://127.0.0.1:9/", ordered="key")
    with pytest.raises(ValueError, match="overflow must be"):
        wspool.consume("ws://127.0.0.1:9/", overflow="spill")
    with pytest.raises(ValueError, match="ordered must be"):
        wspool.consume("ws://127.0.0.1:9/", ordered="yes")


def test_memory_stays_bounded_under_a_slow_handler(mock_server):
    # 4 KiB messages pushed as fast as the server can, into 2 workers sleeping 1 ms each: the
    # stream reads ~2,000 msgs/s; without backpressure it would buffer ~100 MB per second.
    size, queue_size, workers = 4096, 64, 2
    server = mock_server(lambda: ("x" * size for _ in range(200_000)))
    before = _rss_bytes()
    peak = before
    with wspool.consume(
        server.url, _slow(0.001), workers=workers, queue_size=queue_size, timeout=2.0
    ) as stream:
        for i, _ in enumerate(stream):
            if i % 100 == 0:
                peak = max(peak, _rss_bytes())
    # The documented bound: (3 * queue_size + workers) messages in wspool's queues, plus the
    # socket and frame buffers; 32 MiB of slack covers allocator noise and both servers' sides.
    bound = (3 * queue_size + workers) * (size + 400) + 32 * 2**20
    assert peak - before < bound, f"RSS grew {(peak - before) / 2**20:.1f} MiB"
    assert stream.stats.received < 20_000
    assert server.sent < 40_000, "the server could not run ahead: TCP pushed back"
    assert server.stalls > 0, "the server saw backpressure"


def test_ordered_yields_receipt_order_despite_random_handler_times(mock_server):
    server = mock_server(count=600)
    rng = random.Random(7)

    def handler(job: wspool.Job) -> int:
        time.sleep(rng.random() * 0.002)
        return job.id

    with wspool.consume(server.url, handler, workers=4, queue_size=16, ordered=True) as stream:
        ids = [r.value for r in stream]
    assert ids == list(range(600))


def test_ordered_by_key_keeps_order_within_each_key(mock_server):
    messages = [{"k": f"k{i % 5}", "seq": i} for i in range(500)]
    server = mock_server(messages)
    rng = random.Random(3)
    running: dict[str, int] = {}
    overlap = []
    lock = threading.Lock()

    def handler(job: wspool.Job) -> int:
        key = job.data["k"]
        with lock:
            running[key] = running.get(key, 0) + 1
            overlap.append(sum(1 for v in running.values() if v))
            assert running[key] == 1, "two jobs of one key ran at once"
        time.sleep(rng.random() * 0.002)
        with lock:
            running[key] -= 1
        return job.data["seq"]

    with wspool.consume(
        server.url, handler, workers=4, decode="json", key="k", ordered="key"
    ) as stream:
        results = list(stream)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
    for k in range(5):
        seqs = [r.value for r in results if r.job.data["k"] == f"k{k}"]
        assert seqs == list(range(k, 500, 5))
    assert max(overlap) > 1, "different keys ran in parallel"


# -- connection lifecycle -----------------------------------------------------------------------


def test_reconnects_across_five_drops_delivering_every_message(mock_server):
    server = mock_server(count=50, drop_after=50, drop_connections=5)
    events: list[wspool.Event] = []
    with wspool.consume(
        server.url,
        reconnect=wspool.Reconnect(initial=0.01, maximum=0.05),
        on_event=events.append,
        decode="json",
    ) as stream:
        results = list(stream)
    by_connection: dict[int, list[int]] = {}
    for r in results:
        by_connection.setdefault(r.job.connection, []).append(r.value["seq"])
    assert sorted(by_connection) == [0, 1, 2, 3, 4, 5]
    for seqs in by_connection.values():
        assert sorted(seqs) == list(range(50)), "every message before each drop"
    assert sorted(r.job.id for r in results) == list(range(300))
    assert stream.stats.reconnects == 5
    kinds = [e.kind for e in events]
    assert kinds.count("connected") == 6 and kinds.count("retrying") == 5
    drop = next(e for e in events if e.kind == "disconnected")
    assert isinstance(drop.cause, wspool.ConnectionClosed) and drop.cause.code == 1006
    retry = next(e for e in events if e.kind == "retrying")
    assert retry.attempt == 1 and 0.005 <= retry.delay <= 0.01
    assert events[-1] == wspool.Event("disconnected", 5)


def test_resume_asks_the_server_to_replay_from_the_last_delivered(mock_server):
    def replay(info):
        asked = [json.loads(m) for m in info.received]
        start = asked[-1]["resume_from"] if asked else 0
        return [{"seq": i} for i in range(start, 100)]

    server = mock_server(replay, drop_after=20, drop_connections=3, start_delay=0.1)

    def subscribe(last):
        return {"resume_from": 0 if last is None else last.data["seq"] + 1}

    with wspool.consume(
        server.url,
        workers=1,
        decode="json",
        subscribe=subscribe,
        reconnect=wspool.Reconnect(initial=0.01, maximum=0.02),
    ) as stream:
        seqs = [r.value["seq"] for r in stream]
    assert sorted(set(seqs)) == list(range(100)), "no gap across 3 drops"
    assert server.connections == 4
    assert json.loads(server.received[0]) == {"resume_from": 0}
    assert json.loads(server.received[1])["resume_from"] > 0


def test_a_failing_subscribe_callable_ends_the_stream_with_its_exception(mock_server):
    server = mock_server(count=5)

    def subscribe(last):
        raise KeyError("no cursor")

    with pytest.raises(wspool.WspoolError, match="subscribe callable raised") as caught:
        wspool.consume(server.url, subscribe=subscribe)
    assert isinstance(caught.value.__cause__, KeyError)


def test_handshake_errors_retry_only_when_worth_it(mock_server):
    events: list[wspool.Event] = []
    unavailable = mock_server(reject=503)
    started = time.monotonic()
    with pytest.raises(wspool.HandshakeError) as caught:
        wspool.consume(
            unavailable.url,
            reconnect=wspool.Reconnect(max_attempts=2, initial=0.01, maximum=0.02),
            on_event=events.append,
        )
    assert caught.value.status == 503
    assert [e.attempt for e in events if e.kind == "retrying"] == [1, 2]
    assert time.monotonic() - started < 2.0

    events.clear()
    forbidden = mock_server(reject=403)
    with pytest.raises(wspool.HandshakeError) as caught:
        wspool.consume(forbidden.url, reconnect=True, on_event=events.append)
    assert caught.value.status == 403
    assert events == []


def test_a_frozen_server_is_detected_within_ping_interval_plus_timeout(mock_server):
    server = mock_server(count=100, freeze_after=5)
    ids = []
    started = None
    with pytest.raises(wspool.ConnectionClosed) as caught:
        with wspool.consume(server.url, ping_interval=0.2, ping_timeout=0.2) as stream:
            for result in stream:
                ids.append(result.job.id)
                started = time.monotonic()
    took = time.monotonic() - started
    assert sorted(ids) == list(range(5)), "results come in completion order"
    assert caught.value.code == 1006 and "ping_timeout" in str(caught.value)
    assert 0.35 <= took < 1.2, f"detected after {took:.2f} s; bound 0.4 s"


def test_server_pings_are_answered(mock_server):
    server = mock_server(count=3, close_code=None, ping_interval=0.05, ping_timeout=0.1)
    with wspool.consume(server.url, timeout=0.8, ping_interval=None) as stream:
        assert len(list(stream)) == 3
    assert stream.error is None
    assert server.wait_for(lambda s: s.close_codes == [1000])


def test_an_oversize_message_raises_message_too_big(mock_server):
    server = mock_server(["first", "x" * (2 << 20), "never"])
    results = []
    with pytest.raises(wspool.MessageTooBig) as caught:
        with wspool.consume(server.url, max_message_size=1 << 20) as stream:
            results.extend(stream)
    assert [r.value for r in results] == ["first"]
    assert caught.value.code == 1009 and caught.value.limit == 1 << 20
    assert "max_message_size" in str(caught.value)
    assert server.wait_for(lambda s: s.close_codes == [1009])


def test_close_during_backpressure_sends_the_close_frame_at_once(mock_server):
    server = mock_server(count=100_000, close_code=None)
    with wspool.consume(server.url, _slow(0.3), workers=1, queue_size=1) as stream:
        next(stream)
        started = time.monotonic()
        stream._native.close()
        assert server.wait_for(lambda s: s.close_codes == [1000], timeout=2.0)
        closed_after = time.monotonic() - started
    assert closed_after < 0.25, f"the close frame waited {closed_after:.2f} s for a worker"


# -- asyncio ------------------------------------------------------------------------------------


def test_async_iteration_never_blocks_the_event_loop(mock_server):
    server = mock_server(count=4000, rate=4000)

    async def main() -> tuple[list[int], list[float]]:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        ids = []
        async with wspool.consume(server.url, workers=2) as stream:
            async for result in stream:
                ids.append(result.job.id)
        done.set()
        await task
        return ids, gaps

    ids, gaps = asyncio.run(main())
    assert sorted(ids) == list(range(4000))
    assert len(gaps) > 50
    assert max(gaps) < 0.06, f"the loop was blocked {max(gaps) * 1000:.0f} ms"


def test_async_with_reports_connection_errors(closed_port):
    async def main() -> None:
        async with wspool.consume(f"ws://127.0.0.1:{closed_port}/"):
            pass

    with pytest.raises(wspool.ConnectError):
        asyncio.run(main())


def test_async_handlers_run_concurrently(mock_server):
    server = mock_server(count=500)

    async def handler(job: wspool.Job) -> int:
        await asyncio.sleep(0.1)
        return job.id

    started = time.monotonic()
    with wspool.consume(server.url, handler, workers=50) as stream:
        values = sorted(r.value for r in stream)
    took = time.monotonic() - started
    assert values == list(range(500))
    assert 0.95 <= took < 2.0, f"500 jobs of 100 ms on 50 took {took:.2f} s (ideal 1 s)"


def test_async_handler_errors_become_results(mock_server):
    server = mock_server(count=3)

    async def handler(job: wspool.Job) -> int:
        if job.id == 1:
            raise ValueError("bad job")
        return job.id

    with wspool.consume(server.url, handler, workers=2) as stream:
        results = sorted(stream, key=lambda r: r.job.id)
    assert [r.value for r in results] == [0, None, 2]
    assert isinstance(results[1].error, ValueError)


# -- stopping from another thread ---------------------------------------------------------------


def test_close_from_another_thread_drains_every_received_message(mock_server):
    server = mock_server(count=100_000, rate=2000, close_code=None)
    with wspool.consume(server.url, _slow(0.001), workers=2) as stream:
        closer = threading.Timer(0.3, stream.close)
        closer.start()
        ids = [r.value for r in stream]
        closer.join()
    stats = stream.stats
    assert 0 < len(ids) < 100_000
    assert sorted(ids) == list(range(stats.received)), "every received message was delivered"
    assert stats.cancelled == 0 and stats.threads == 0
    assert server.wait_for(lambda s: s.close_codes == [1000])


def test_cancel_from_another_thread_accounts_for_every_job(mock_server):
    server = mock_server(count=100_000, close_code=None)
    with wspool.consume(server.url, _slow(0.002), workers=2, queue_size=64) as stream:
        threading.Timer(0.3, stream.cancel).start()
        delivered = sum(1 for _ in stream)
    stats = stream.stats
    assert delivered > 0
    assert stats.cancelled > 0
    assert stats.processed + stats.failed + stats.cancelled + stats.dropped == stats.received
    assert stats.threads == 0
