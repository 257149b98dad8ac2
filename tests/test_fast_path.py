"""The fast paths of issue 6: Stream.batches(), JSON built from the native tape, lazy results and
the native Select processor. Each checks the value a user gets, not the speed."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("fields", [(), ("a..b",), ("",), (".a",)])
def test_select_refuses_bad_fields(fields):
    with pytest.raises(ValueError):
        wspool.Select(*fields)
