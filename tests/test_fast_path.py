"""The fast paths of issue 6: Stream.batches(), JSON built from the native tape, lazy results and
the native Select processor. Each checks the value a user gets, not the speed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Callable

import pytest

import wspool

DOCS = [
    {"seq": 0, "s": "plain", "e": 'tab\there "quoted" \\ é ☃ 😀', "n": None, "t": True},
    {"big": 2**64 - 1, "neg": -(2**63), "f": 0.1, "exp": 1e300, "small": -2.5e-10},
    {"nested": {"a": [1, [2, [3, {"b": []}]], {}], "": "empty key"}, "list": []},
    [1, "two", {"three": 3}],
    "just a string",
    {"dup": 2},
]


def _raw(doc: object) -> str:
    text = json.dumps(doc, ensure_ascii=False)
    # A duplicate key, as some feeds send: the last one wins, as with json.loads.
    return text.replace('{"dup": 2}', '{"dup": 1, "dup": 2}')


def test_json_values_match_json_loads(mock_server):
    raws = [_raw(d) for d in DOCS]
    server = mock_server(messages=raws)
    with wspool.consume(server.url, decode="json", workers=2, ordered=True) as stream:
        values = [r.value for r in stream]
    assert values == [json.loads(r) for r in raws]
    # Keys come from a per-stream cache: equal keys are one object, and never mixed up.
    first, second = (v for v in values[:2])
    assert list(first) == ["seq", "s", "e", "n", "t"]
    assert list(second) == ["big", "neg", "f", "exp", "small"]


def test_integers_beyond_64_bits_become_floats(mock_server):
    server = mock_server(messages=["12345678901234567890123", "-9223372036854775809"])
    with wspool.consume(server.url, decode="json", ordered=True) as stream:
        values = [r.value for r in stream]
    assert values == [1.2345678901234568e22, -9.223372036854776e18]
    assert all(isinstance(v, float) for v in values)


def test_cached_keys_never_leak_between_documents(mock_server):
    raws = [json.dumps({f"k{i % 7}": i, "x": {f"k{(i + 1) % 7}": -i}}) for i in range(500)]
    server = mock_server(messages=raws)
    with wspool.consume(server.url, decode="json", ordered=True) as stream:
        values = [r.value for r in stream]
    assert values == [json.loads(r) for r in raws]


def test_batches_yield_every_result_once_in_lists(mock_server):
    n = 5000
    server = mock_server(count=n)
    seen = []
    with wspool.consume(server.url, decode="json") as stream:
        for batch in stream.batches():
            assert isinstance(batch, list) and 1 <= len(batch) <= 1024
            seen.extend(r.value["seq"] for r in batch)
    assert sorted(seen) == list(range(n))
    assert stream.stats.processed == n


def test_batches_raise_the_error_that_ended_the_stream(mock_server):
    server = mock_server(count=50, close_code=1011, close_reason="boom")
    got = 0
    with pytest.raises(wspool.ConnectionClosed) as caught:
        with wspool.consume(server.url) as stream:
            for batch in stream.batches():
                got += len(batch)
    assert got == 50 and caught.value.code == 1011


def test_iteration_resumes_after_a_break_without_losing_results(mock_server):
    server = mock_server(count=3000)
    with wspool.consume(server.url, decode="json") as stream:
        ids = []
        for result in stream:
            ids.append(result.job.id)
            if len(ids) == 10:
                break
        ids.extend(r.job.id for r in stream)
    assert sorted(ids) == list(range(3000))


def test_lazy_results_are_consistent(mock_server):
    server = mock_server(count=20)
    with wspool.consume(server.url, decode="json") as stream:
        results = list(stream)
    for r in results:
        assert r.job is r.job, "one Job object per result"
        assert r.value is r.job.data, "without a handler the value is the job's data"
        assert r.value["seq"] == r.job.id


def test_select_picks_fields_natively(mock_server):
    docs = [
        {"seq": 1, "px": {"bid": 1.5, "ask": 2}, "sym": "BTC"},
        {"seq": 2, "px": 7, "sym": "ETH"},
        {"seq": 3},
    ]
    server = mock_server(messages=[json.dumps(d) for d in docs])
    select = wspool.Select("seq", "px.bid", "sym")
    assert select.fields == ["seq", "px.bid", "sym"]
    assert repr(select) == 'Select("seq", "px.bid", "sym")'
    with wspool.consume(server.url, select, decode="json", ordered=True) as stream:
        results = list(stream)
    assert [r.value for r in results] == [(1, 1.5, "BTC"), (2, None, "ETH"), (3, None, None)]
    assert all(r.ok for r in results)
    # job.data is still the whole document, and the Python fallback agrees.
    assert [r.job.data for r in results] == docs
    assert [select(r.job) for r in results] == [r.value for r in results]


def test_select_one_field_is_the_bare_value_and_works_on_bytes(mock_server):
    server = mock_server(messages=['{"v": [1, 2]}', "not json", b'{"v": "bin"}'])
    with wspool.consume(server.url, wspool.Select("v"), decode="bytes", ordered=True) as stream:
        results = list(stream)
    assert results[0].value == [1, 2] and results[0].job.data == b'{"v": [1, 2]}'
    assert not results[1].ok and isinstance(results[1].error, wspool.DecodeError)
    assert results[1].error.payload == b"not json" and results[1].error.job_id == 1
    assert results[2].value == "bin"
    assert stream.stats.failed == 1


SELECT_DOCS = [
    {"s": "plain", "e": 'tab\t"q" é 😀', "n": None, "t": False, "i": -7, "f": 0.5, "o": {"k": [1]}},
    {"s": "é☃", "e": "\\", "n": 1, "t": True, "i": 2**64 - 1, "f": -1e300, "o": []},
    {"s": "", "t": None, "i": -(2**63), "o": {"k": {"deep": "x"}}},
    [1, 2],
]


def _pick(doc: object, field: str) -> object:
    for name in field.split("."):
        if not isinstance(doc, dict) or name not in doc:
            return None
        doc = doc[name]
    return doc


@pytest.mark.parametrize(
    "fields",
    [
        ("s", "n", "t", "missing"),  # leaves only: strings, null, bools, an absent field
        ("i", "f"),  # ints beyond i64 either way, floats
        ("s",),  # one field: the bare value
        ("e", "s"),  # a string with escapes
        ("o", "s"),  # a container
        ("o.k", "o.k.deep"),  # nested paths, through a list or not
        ("s", "n", "t", "i", "f"),  # more fields than are kept as leaves
    ],
)
@pytest.mark.parametrize("decode", ["json", "bytes", "text"])
def test_select_values_match_json_loads_for_every_kind_of_field(mock_server, fields, decode):
    raws = [json.dumps(d, ensure_ascii=False) for d in SELECT_DOCS]
    server = mock_server(messages=raws * 2)
    expected = []
    for doc in SELECT_DOCS:
        picked = tuple(_pick(doc, f) for f in fields)
        expected.append(picked[0] if len(fields) == 1 else picked)
    select = wspool.Select(*fields)
    with wspool.consume(server.url, select, decode=decode, ordered=True) as stream:
        results = [next(stream) for _ in SELECT_DOCS]
        values = list(stream.values())
    assert [r.value for r in results] == expected
    assert values == expected
    if decode == "json":  # the Python fallback reads job.data, a dict only then
        assert [select(r.job) for r in results] == expected
    if len(fields) > 1:
        assert all(type(v) is tuple for v in values)


def test_the_journal_stores_select_values_as_json(mock_server, tmp_path):
    raws = [json.dumps(d, ensure_ascii=False) for d in SELECT_DOCS]
    server = mock_server(messages=raws)
    path = tmp_path / "j.db"
    for fields in [("s", "n", "t", "i"), ("e", "o", "f")]:
        select = wspool.Select(*fields)
        with wspool.consume(server.url, select, decode="bytes", journal=path) as stream:
            results = sorted(stream, key=lambda r: r.job.id)
        with wspool.Journal(path) as journal:
            for r in results:
                record = journal.get(r.job.id)
                assert record is not None and record.status == "done"
                assert record.value_format == "json"
                assert record.value == [_pick(SELECT_DOCS[r.job.id % 4], f) for f in fields]
        path.unlink()
        for extra in ("-wal", "-shm"):
            tmp_path.joinpath("j.db" + extra).unlink(missing_ok=True)


@pytest.mark.parametrize("fields", [(), ("a..b",), ("",), (".a",)])
def test_select_refuses_bad_fields(fields):
    with pytest.raises(ValueError):
        wspool.Select(*fields)


# -- values without Result objects ------------------------------------------------------------


def test_values_are_the_payloads_in_receipt_order(mock_server):
    n = 5000
    server = mock_server(count=n)
    with wspool.consume(server.url, decode="bytes") as stream:
        values = list(stream.values())
    # No handler and bytes: one worker by default, so receipt order.
    assert stream.stats.workers == 1
    assert [json.loads(v)["seq"] for v in values] == list(range(n))
    assert all(isinstance(v, bytes) for v in values)
    assert stream.stats.processed == n


def _native_thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return [n for n in names if n.startswith("wspool-")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_bytes_without_a_handler_run_on_the_consumer_with_no_worker_thread(mock_server):
    n = 3000
    server = mock_server(count=n, rate=20_000)
    with wspool.consume(server.url, decode="bytes") as stream:
        first = next(stream)
        # The one worker is the consuming thread: only the read loop runs natively.
        assert _native_thread_names() == ["wspool-io"]
        assert stream.stats.workers == 1 and stream.stats.threads == 1
        rest = list(stream)
    results = [first, *rest]
    assert [r.id for r in results] == list(range(n))
    assert all(r.ok and isinstance(r.value, bytes) for r in results)
    assert [json.loads(r.value)["seq"] for r in results] == list(range(n))
    stats = stream.stats
    assert (stats.processed, stats.in_flight, stats.threads) == (n, 0, 0)
    # With a handler, or several workers asked for, the workers run.
    with wspool.consume(mock_server(count=10).url, decode="bytes", workers=2) as stream:
        assert len(list(stream)) == 10
        assert stream.stats.processed == 10


def test_bytes_without_a_handler_async_and_cancel_account_for_every_message(mock_server):
    n = 2000
    server = mock_server(count=n)

    async def main() -> list[bytes]:
        async with wspool.consume(server.url, decode="bytes") as stream:
            return [r.value async for r in stream]

    values = asyncio.run(main())
    assert [json.loads(v)["seq"] for v in values] == list(range(n))
    # Cancelled with jobs queued (a small queue, a server far ahead): each is counted once.
    stream = wspool.consume(mock_server(count=100_000).url, decode="bytes", queue_size=16)
    taken = [next(stream) for _ in range(5)]
    time.sleep(0.1)
    stream.cancel()
    stats = stream.stats
    assert [r.id for r in taken] == list(range(5))
    assert stats.cancelled > 0 and stats.in_flight == 0 and stats.threads == 0
    assert stats.received == stats.processed + stats.cancelled
    assert list(stream) == []


# Run in a child process: a deadlock holds the GIL, so no timeout inside this process could
# fire; the child is killed instead.
GC_DURING_DECODE = """
import gc, json, sys, weakref, wspool
url, workers = sys.argv[1], int(sys.argv[2])
kept = []  # weak references that outlive their objects, so their callbacks run in collections


class Node:
    pass


def churn():
    a, b = Node(), Node()
    a.b, b.a = b, a  # a cycle, freed only by the garbage collector
    kept.append(weakref.ref(b, lambda _: sum(range(20))))  # Python code inside a collection
    del kept[:-100]


def handler(job):
    churn()
    return sum(len(item) for item in job.data["items"])  # dicts built while collections run


sys.setswitchinterval(1e-6)  # let the GIL go at the first chance
gc.set_threshold(20)
with wspool.consume(url, handler, decode="json", workers=workers) as stream:
    total = sum(r.value for r in stream)
print(json.dumps({"total": total, "processed": stream.stats.processed}), flush=True)
"""


def test_objects_built_on_several_threads_while_collections_run_python_code(mock_server):
    # Regression: a worker that held the JSON key cache while building a dict could, in a
    # garbage collection that ran Python code, let the GIL go to a second worker, which then
    # waited for the cache with the GIL held: both waited for good.
    n = 3000
    doc = {"items": [{"a": i, "b": [i, {"c": i}], "d": str(i)} for i in range(8)]}
    server = mock_server(messages=[json.dumps(doc)] * n)
    proc = subprocess.run(
        [sys.executable, "-c", GC_DURING_DECODE, server.url, "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"total": n * 8 * 3, "processed": n}


def test_value_batches_hold_handler_values_and_json(mock_server):
    n = 3000
    server = mock_server(count=n)
    with wspool.consume(server.url, lambda job: job.data["seq"] * 3, decode="json") as stream:
        got = []
        for batch in stream.batches(values=True):
            assert isinstance(batch, list) and 1 <= len(batch) <= 1024
            got.extend(batch)
    assert sorted(got) == [3 * i for i in range(n)]
    with wspool.consume(mock_server(count=100).url, decode="json") as stream:
        docs = [doc for batch in stream.batches(values=True) for doc in batch]
    assert sorted(d["seq"] for d in docs) == list(range(100))


def test_a_failed_job_raises_job_failed_and_iteration_goes_on_after_it(mock_server):
    server = mock_server(count=400)

    def handler(job: wspool.Job) -> int:
        if job.data["seq"] % 100 == 7:
            raise KeyError(f"no {job.id}")
        return job.data["seq"]

    got: list[int] = []
    failures: list[wspool.JobFailed] = []
    with wspool.consume(server.url, handler, decode="json", workers=1) as stream:
        while True:
            try:
                got.extend(stream.values())
                break
            except wspool.JobFailed as failed:
                failures.append(failed)
    assert got == [i for i in range(400) if i % 100 != 7]
    assert [f.job_id for f in failures] == [7, 107, 207, 307]
    first = failures[0]
    assert isinstance(first.__cause__, KeyError) and first.__cause__ is first.result.error
    assert first.result.id == 7 and not first.result.ok
    assert "job 7 failed: KeyError" in str(first) and "no 7" in str(first)
    assert isinstance(first, wspool.WspoolError)


def test_skipped_failures_are_counted_and_decode_errors_fail_the_job(mock_server):
    server = mock_server(messages=['{"a": 1}', "{not json", '{"a": 3}', "[", '{"a": 5}'])
    with wspool.consume(server.url, decode="json", workers=1) as stream:
        got = list(stream.values(failed="skip"))
    assert got == [{"a": 1}, {"a": 3}, {"a": 5}]
    assert stream.stats.failed == 2
    with wspool.consume(server.url, decode="json", workers=1) as stream:
        with pytest.raises(wspool.JobFailed) as caught:
            for batch in stream.batches(values=True):
                assert batch == [{"a": 1}], "the values before a failure come first"
        assert isinstance(caught.value.__cause__, wspool.DecodeError)
        assert caught.value.job_id == 1
        assert list(stream.values(failed="skip")) == [{"a": 3}, {"a": 5}]


def test_values_lose_nothing_across_a_break_or_a_switch_from_results(mock_server):
    n = 3000
    server = mock_server(count=n)
    with wspool.consume(server.url, decode="json", workers=2) as stream:
        seqs = [next(iter(stream)).value["seq"]]
        for doc in stream.values():
            seqs.append(doc["seq"])
            if len(seqs) == 10:
                break
        for batch in stream.batches(values=True):
            seqs.extend(doc["seq"] for doc in batch)
            break
        seqs.extend(r.value["seq"] for r in stream)
    assert sorted(seqs) == list(range(n))


def test_values_with_on_result_still_pass_every_result_to_it(mock_server):
    n = 1000
    server = mock_server(count=n)
    seen: list[int] = []
    with wspool.consume(server.url, decode="json", on_result=lambda r: seen.append(r.id)) as stream:
        values = list(stream.values())
    assert sorted(seen) == list(range(n))
    assert sorted(v["seq"] for v in values) == list(range(n))


def test_values_raise_the_error_that_ended_the_stream(mock_server):
    server = mock_server(count=50, close_code=1011, close_reason="boom")
    got = []
    with pytest.raises(wspool.ConnectionClosed) as caught:
        with wspool.consume(server.url) as stream:
            got.extend(stream.values())
    assert len(got) == 50 and caught.value.code == 1011


@pytest.mark.parametrize("failed", ["ignore", None, ""])
def test_values_refuse_an_unknown_failed_policy(mock_server, failed):
    with wspool.consume(mock_server(count=1).url) as stream:
        with pytest.raises(ValueError, match="failed must be"):
            stream.values(failed=failed)
        with pytest.raises(ValueError, match="failed must be"):
            stream.batches(values=True, failed=failed)


def seq_or_failure_at(bad: int) -> Callable[[wspool.Job], int]:
    """A handler returning each JSON message's seq, and raising ValueError for seq ``bad``."""

    def handler(job: wspool.Job) -> int:
        if job.data["seq"] == bad:
            raise ValueError(f"bad {bad}")
        return job.data["seq"]

    return handler


def test_async_values_wait_without_blocking_and_raise_job_failed(mock_server):
    n = 2000
    server = mock_server(count=n)

    handler = seq_or_failure_at(500)

    async def main() -> tuple[list[int], list[wspool.JobFailed]]:
        got: list[int] = []
        failures: list[wspool.JobFailed] = []
        async with wspool.consume(server.url, handler, decode="json", workers=2) as stream:
            while True:
                try:
                    async for value in stream.values():
                        got.append(value)
                    break
                except wspool.JobFailed as failed:
                    failures.append(failed)
            # Nothing after the end.
            assert [v async for v in stream.values(failed="skip")] == []
        return got, failures

    got, failures = asyncio.run(main())
    assert sorted(got) == [i for i in range(n) if i != 500]
    assert [f.job_id for f in failures] == [500]
    assert isinstance(failures[0].__cause__, ValueError)


def test_values_is_an_iterator_and_skips_failures_in_async_code(mock_server):
    server = mock_server(messages=['{"a": 1}', "{bad", '{"a": 3}'])
    with wspool.consume(server.url, decode="json", workers=1) as stream:
        values = stream.values(failed="skip")
        assert iter(values) is values
        assert next(values) == {"a": 1}
        assert list(values) == [{"a": 3}]

    async def main() -> list[object]:
        async with wspool.consume(server.url, decode="json", workers=1) as stream:
            return [v async for v in stream.values(failed="skip")]

    assert asyncio.run(main()) == [{"a": 1}, {"a": 3}]


def test_async_batches_take_every_message_and_let_other_tasks_run(mock_server):
    n = 20_000
    server = mock_server(count=n)

    async def main() -> tuple[list[list[bytes]], int, int]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        # Every message queued before the iteration starts: results never run out, so only the
        # iterator's own yield lets the ticker run.
        async with wspool.consume(server.url, decode="bytes", queue_size=n) as stream:
            while stream.stats.received < n:
                await asyncio.sleep(0.01)
            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            before = ticks
            batches = [batch async for batch in stream.batches(values=True)]
            during = ticks - before
        done = True
        await task
        return batches, during, stream.stats.processed

    batches, ticks, processed = asyncio.run(main())
    assert all(isinstance(b, list) and 1 <= len(b) <= 1024 for b in batches)
    assert [int(m[7 : m.index(b",", 7)]) for b in batches for m in b] == list(range(n))
    assert processed == n
    assert ticks >= len(batches) - 1, (ticks, len(batches))


def test_async_batches_of_results_and_values_lose_nothing_when_left_early(mock_server):
    n = 3000
    server = mock_server(count=n)

    handler = seq_or_failure_at(1700)

    async def main() -> tuple[list[int], list[int], list[int]]:
        async with wspool.consume(
            server.url, handler, decode="json", workers=2, ordered=True
        ) as stream:
            results: list[int] = []
            async for batch in stream.batches():
                assert all(isinstance(r, wspool.Result) for r in batch)
                results.extend(r.value for r in batch)
                if len(results) >= 500:
                    break
            # Per value, leaving the loop after each of the next 100.
            one_by_one: list[int] = []
            while len(one_by_one) < 100:
                async for value in stream.values():
                    one_by_one.append(value)
                    break
            values: list[int] = []
            with pytest.raises(wspool.JobFailed) as failed:
                async for batch in stream.batches(values=True):
                    values.extend(batch)
            assert failed.value.job_id == 1700
            values.extend([v for b in [b async for b in stream.batches(values=True)] for v in b])
        return results, one_by_one, values

    results, one_by_one, values = asyncio.run(main())
    assert results + one_by_one + values == [i for i in range(n) if i != 1700]


def test_two_tasks_share_an_async_stream_and_one_leaving_early_stalls_nothing(mock_server):
    n = 1500
    server = mock_server(count=n, rate=3000)

    async def main() -> tuple[list[int], list[int]]:
        async with wspool.consume(server.url, decode="json", workers=2) as stream:
            early: list[int] = []

            async def leaves_early() -> None:
                batches = stream.batches()
                for _ in range(3):
                    early.extend(r.id for r in await batches.__anext__())

            async def stays() -> list[int]:
                return [r.id async for batch in stream.batches() for r in batch]

            stayed, _ = await asyncio.wait_for(asyncio.gather(stays(), leaves_early()), 30)
        return early, stayed

    early, stayed = asyncio.run(main())
    assert len(early) >= 3
    assert sorted(early + stayed) == list(range(n))


def test_sync_batches_go_on_after_a_failed_job_and_close(mock_server):
    server = mock_server(count=300)
    with wspool.consume(server.url, seq_or_failure_at(100), decode="json", workers=1) as stream:
        batches = stream.batches(values=True)
        got: list[int] = []
        with pytest.raises(wspool.JobFailed) as failed:
            for batch in batches:
                got.extend(batch)
        assert failed.value.job_id == 100
        got.extend(next(batches))  # the same object goes on after the failed job
        batches.close()
        assert next(batches, None) is None  # closed, as a generator would be
        got.extend(v for b in stream.batches(values=True) for v in b)  # the rest stayed
    assert got == [i for i in range(300) if i != 100]


def test_an_async_stream_goes_on_in_a_new_event_loop_while_a_stopped_one_still_waits(
    mock_server,
):
    n = 20
    server = mock_server(count=n, rate=40)  # a message every 25 ms
    stream = wspool.consume(server.url, decode="json", workers=1)
    before: list[int] = []

    async def take(into: list[int]) -> None:
        async for batch in stream.batches(values=True):
            into.extend(d["seq"] for d in batch)

    first = asyncio.new_event_loop()
    try:
        # A task of the first loop takes the first messages and waits for the next; that loop
        # then stops with the task still waiting.
        waiting = first.create_task(take(before))
        first.run_until_complete(asyncio.sleep(0.1))
        assert before and not waiting.done()
        after: list[int] = []
        asyncio.run(asyncio.wait_for(take(after), 20))
        waiting.cancel()
        first.run_until_complete(asyncio.gather(waiting, return_exceptions=True))
    finally:
        first.close()
        stream.close()
    assert before + after == list(range(n))
