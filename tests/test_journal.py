"""Durable jobs: the SQLite journal of ``consume(..., journal=path)``, its recovery after a
kill -9, status queries, retries, bad files and the ``wspool jobs`` command, each against
wspool.testing.MockServer on 127.0.0.1."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import wspool
from wspool.testing import ConnectionInfo

pytestmark = pytest.mark.timeout(90)


def _wait(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wspool", "jobs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Unserialisable:
    def __repr__(self) -> str:
        return "<Unserialisable>"


# -- what is written ------------------------------------------------------------------------------


def test_every_message_is_written_with_its_outcome(mock_server, tmp_path, threads):
    path = tmp_path / "jobs.db"
    server = mock_server([{"seq": i} for i in range(60)])
    threads.mark()

    def handler(job: wspool.Job):
        seq = job.data["seq"]
        if seq % 3 == 1:
            raise ValueError(f"bad seq {seq}")
        if seq % 3 == 2:
            return Unserialisable()
        return {"seq": seq, "double": seq * 2}

    statuses = {}
    with wspool.consume(server.url, handler, decode="json", workers=3, journal=path) as stream:
        for result in stream:
            # A result delivered is final in the journal already.
            statuses[result.job.id] = stream.status(result.job.id)
    threads.assert_back()
    assert sorted(statuses) == list(range(60))
    assert stream.status(10_000) is None
    with wspool.Journal(path) as journal:
        for job_id, status in statuses.items():
            record = journal.get(job_id)
            assert record is not None and record.status == status
            seq = json.loads(record.payload)["seq"]
            assert record.id == seq and record.attempts == 1 and record.connection == 0
            assert record.type == "text" and record.received_at <= record.finished_at
            if seq % 3 == 0:
                assert status == "done"
                assert (record.value, record.value_format) == (
                    {"seq": seq, "double": 2 * seq},
                    "json",
                )
            elif seq % 3 == 1:
                assert status == "failed"
                assert (record.error_type, record.error_message) == ("ValueError", f"bad seq {seq}")
                assert record.value is None
            else:
                assert (record.value, record.value_format) == ("<Unserialisable>", "repr")
        assert journal.counts() == {
            "received": 0,
            "running": 0,
            "done": 40,
            "failed": 20,
            "total": 60,
            "rerun": 0,
            "duplicates": 0,
        }
        assert [r.id for r in journal.list(status="failed", limit=3)] == [58, 55, 52]
        with pytest.raises(ValueError, match="status must be one of"):
            journal.list(status="lost")


def test_status_moves_received_running_done(mock_server, tmp_path):
    server = mock_server([{"seq": i} for i in range(3)], close_code=None)
    gate = threading.Event()

    def handler(job: wspool.Job) -> int:
        if job.id == 0:
            assert gate.wait(20)
        return job.id

    with wspool.consume(
        server.url, handler, decode="json", workers=1, journal=tmp_path / "j.db"
    ) as stream:
        try:
            assert _wait(lambda: stream.status(2) is not None, 5)
            assert _wait(lambda: stream.status(0) == "running", 5), stream.status(0)
            assert stream.status(1) == "received" and stream.status(2) == "received"
        finally:
            gate.set()
        record = stream.job_record(0)
        assert record is not None and record.attempts == 1 and record.started_at is not None
        gate.set()
        ids = [next(stream).job.id for _ in range(3)]
        assert sorted(ids) == [0, 1, 2]
        assert [stream.status(i) for i in range(3)] == ["done"] * 3
        stream.close()


def test_no_handler_stores_no_value_and_a_decode_error_fails(mock_server, tmp_path):
    server = mock_server(["[1]", "{not json"])
    path = tmp_path / "j.db"
    with wspool.consume(server.url, decode="json", journal=path) as stream:
        results = sorted(stream, key=lambda r: r.job.id)
    assert [r.ok for r in results] == [True, False]
    with wspool.Journal(path) as journal:
        ok, bad = journal.get(0), journal.get(1)
    assert ok is not None and (ok.status, ok.value, ok.value_format) == ("done", None, None)
    assert ok.payload == b"[1]"
    assert bad is not None and bad.status == "failed" and bad.error_type == "DecodeError"


# -- retries --------------------------------------------------------------------------------------


def test_retries_back_off_and_keep_only_the_last_error(mock_server, tmp_path):
    server = mock_server([{"seq": i} for i in range(4)])
    calls: dict[int, list[float]] = {}
    lock = threading.Lock()

    def flaky(job: wspool.Job) -> int:
        with lock:
            times = calls.setdefault(job.id, [])
            times.append(time.monotonic())
            attempt = len(times)
        # Even jobs succeed on the third call; odd ones never do.
        if job.id % 2 == 1 or attempt < 3:
            raise RuntimeError(f"job {job.id} attempt {attempt}")
        return attempt

    path = tmp_path / "j.db"
    with wspool.consume(
        server.url, flaky, decode="json", workers=4, retries=2, journal=path
    ) as stream:
        results = {r.job.id: r for r in stream}
    assert {i: len(t) for i, t in calls.items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    gaps = [b - a for a, b in zip(calls[0], calls[0][1:])]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps  # 0.1 s, then 0.2 s
    assert results[0].value == 3 and results[2].value == 3
    assert str(results[1].error) == "job 1 attempt 3", "only the last failure is kept"
    with wspool.Journal(path) as journal:
        failed = journal.get(3)
        assert failed is not None and failed.status == "failed"
        assert failed.error_message == "job 3 attempt 3" and failed.attempts == 1
        done = journal.get(2)
        assert done is not None and (done.status, done.value) == ("done", 3)
    with pytest.raises(ValueError, match="retries"):
        wspool.consume(server.url, flaky, retries=-1)


# -- recovery -------------------------------------------------------------------------------------


def test_unfinished_jobs_run_first_at_the_next_start_and_ids_go_on(mock_server, tmp_path):
    path = tmp_path / "j.db"
    first = mock_server([{"run": 1, "seq": i} for i in range(40)], close_code=None)
    with wspool.consume(
        first.url, lambda job: time.sleep(0.05), decode="json", workers=1, journal=path
    ) as stream:
        assert _wait(lambda: stream.status(39) is not None, 5)
        stream.cancel()
    with wspool.Journal(path) as journal:
        left = [r.id for r in journal.list(status="received", limit=100)]
        left += [r.id for r in journal.list(status="running", limit=100)]
    assert len(left) > 20, "the cancel left most jobs unfinished"

    second = mock_server([{"run": 2, "seq": i} for i in range(5)])
    order = []
    with wspool.consume(second.url, decode="json", workers=1, journal=path, ordered=True) as stream:
        for result in stream:
            order.append((result.job.id, result.job.data["run"]))
    assert stream.recovered == len(left)
    assert order == [(i, 1) for i in sorted(left)] + [(40 + i, 2) for i in range(5)], (
        "recovered jobs first, then new ones with ids after the largest written"
    )
    with wspool.Journal(path) as journal:
        counts = journal.counts()
    assert (counts["total"], counts["done"]) == (45, 45), "every job finished"


CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    import wspool

    url, path = sys.argv[1], sys.argv[2]

    def resume_from():
        # The server replays from the message after the last one written.
        try:
            journal = wspool.Journal(path)
        except wspool.JournalError:
            return 0
        with journal:
            last = journal.list(limit=1)
        return json.loads(last[0].payload)["seq"] + 1 if last else 0

    def handler(job):
        time.sleep(0.0005)
        return job.data["seq"]

    start = resume_from()
    with wspool.consume(url, handler, decode="json", workers=2, journal=path,
                        subscribe={"from": start}) as stream:
        for result in stream:
            pass
    print(json.dumps({"from": start, "recovered": stream.recovered}), flush=True)
    """
)


def test_kill_9_mid_stream_loses_nothing(mock_server, tmp_path):
    total = 10_000

    def replay(info: ConnectionInfo) -> list[dict]:
        start = json.loads(info.received[0])["from"] if info.received else 0
        return [{"seq": seq, "pad": "x" * 80} for seq in range(start, total)]

    server = mock_server(replay, start_delay=0.2)
    path = tmp_path / "jobs.db"
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), server.url, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def counts() -> dict[str, int]:
        try:
            with wspool.Journal(path) as journal:
                return journal.counts()
        except wspool.JournalError:
            return {}

    proc = start()
    try:
        # A concurrent reader follows the consumer until it is well into the stream.
        assert _wait(lambda: counts().get("done", 0) >= 2000, 30, 0.02), proc.stderr
    finally:
        proc.kill()  # SIGKILL: no cleanup, no final commit
        proc.wait(10)
    with wspool.Journal(path) as journal:
        at_kill = journal.counts()
        running = {r.id for r in journal.list(status="running", limit=total)}
        received = {r.id for r in journal.list(status="received", limit=total)}
        largest = journal.list(limit=1)[0].id
    assert at_kill["done"] < total and running | received, at_kill

    proc = start()
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["recovered"] == len(running | received)
    with wspool.Journal(path) as journal:
        records = journal.list(limit=2 * total)
        final = journal.counts()
    done_seqs = {json.loads(r.payload)["seq"] for r in records if r.status == "done"}
    assert done_seqs == set(range(total)), "every message reached done at least once"
    assert final["received"] == final["running"] == final["failed"] == 0
    by_id = {r.id: r for r in records}
    # Jobs left running at the kill ran again (at-least-once); the others ran once.
    assert {i for i, r in by_id.items() if r.attempts > 1} == running
    assert final["duplicates"] == len(running) == final["rerun"]
    assert min(i for i in by_id if i > largest) == largest + 1, "ids go on across restarts"
    seqs = [json.loads(r.payload)["seq"] for r in records]
    print(
        f"\nkill -9 after {at_kill['done']} done: {len(running)} running and {len(received)} "
        f"received re-run at restart; duplicate runs: {final['duplicates']}; "
        f"messages received twice: {len(seqs) - len(set(seqs))}"
    )


def test_a_burst_is_written_long_before_the_handlers_finish(mock_server, tmp_path):
    """The seed's load test: 1,000 messages at once, each persisted as received within a
    second although every job takes 2 s."""
    server = mock_server([{"seq": i} for i in range(1000)], close_code=None)
    path = tmp_path / "j.db"
    with wspool.consume(
        server.url, lambda job: time.sleep(2), decode="json", workers=4, journal=path
    ) as stream:
        started = time.monotonic()
        with wspool.Journal(path) as journal:
            assert _wait(lambda: journal.counts()["total"] == 1000, 1.0), journal.counts()
            took = time.monotonic() - started
            counts = journal.counts()
            assert counts["done"] == 0 and counts["received"] + counts["running"] == 1000
            assert {r.status for r in journal.list(limit=1000)} <= {"received", "running"}
        stream.cancel()
    assert took < 1.0
    assert stream.stats.cancelled >= 990


# -- bad files ------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_journal_is_refused(mock_server, tmp_path, threads):
    server = mock_server(count=5)
    threads.mark()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x13\x37" * 4096)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text)")
    conn.close()
    for path, why in ((garbage, "not an SQLite database"), (other, "another application")):
        before = path.read_bytes()
        for opener in (lambda p: wspool.consume(server.url, journal=p), wspool.Journal):
            with pytest.raises(wspool.JournalError, match=why) as caught:
                opener(path)
            assert caught.value.path == str(path) and str(path) in str(caught.value)
            assert isinstance(caught.value, wspool.WspoolError)
        assert path.read_bytes() == before, "a refused file is left alone"
    threads.assert_back()
    with pytest.raises(wspool.JournalError, match="no such file"):
        wspool.Journal(tmp_path / "missing.db")


def test_a_journal_from_a_newer_wspool_is_refused(mock_server, tmp_path):
    path = tmp_path / "j.db"
    assert wspool.run(mock_server(count=3).url, journal=path).processed == 3
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(wspool.JournalError, match="newer wspool"):
        wspool.Journal(path)
    with pytest.raises(wspool.JournalError, match="newer wspool"):
        wspool.consume(mock_server(count=1).url, journal=path)


def test_a_journal_needs_the_block_policy(mock_server, tmp_path):
    with pytest.raises(ValueError, match="block"):
        wspool.consume(mock_server(count=1).url, journal=tmp_path / "j.db", overflow="drop_newest")
    with pytest.raises(ValueError, match="journal_sync"):
        wspool.consume(mock_server(count=1).url, journal=tmp_path / "j.db", journal_sync="x")


# -- the command line -----------------------------------------------------------------------------


def test_cli_reads_while_the_consumer_runs_and_retries(mock_server, tmp_path):
    path = tmp_path / "jobs.db"
    server = mock_server([{"seq": i} for i in range(400)])

    def handler(job: wspool.Job) -> int:
        time.sleep(0.005)
        if job.data["seq"] == 7:
            raise KeyError("seven")
        return job.data["seq"]

    snapshots = []
    with wspool.consume(
        server.url, handler, decode="json", workers=2, journal=path, journal_sync="full"
    ) as stream:
        for n, _ in enumerate(stream):
            if n in (50, 200):
                stats = _cli("stats", "--journal", str(path), "--json")
                assert stats.returncode == 0, stats.stderr
                snapshots.append(json.loads(stats.stdout))
                listed = _cli("list", "--journal", str(path), "--status", "done", "--limit", "3")
                assert listed.returncode == 0, listed.stderr
                assert len(listed.stdout.splitlines()) == 4  # header + 3
    assert len(snapshots) == 2
    assert 0 < snapshots[0]["done"] <= snapshots[1]["done"] < 400
    assert snapshots[1]["total"] >= snapshots[1]["done"]

    shown = _cli("show", "--journal", str(path), "7")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["status"], record["error_type"]) == ("failed", "KeyError")
    assert json.loads(record["payload"]) == {"seq": 7}
    listed = _cli("list", "--journal", str(path), "--status", "failed", "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [7]
    retried = _cli("retry", "--journal", str(path), "7")
    assert retried.returncode == 0 and "failed -> received" in retried.stdout
    with wspool.Journal(path) as journal:
        again = journal.get(7)
        assert again is not None and (again.status, again.error_type) == ("received", None)
    stats = _cli("stats", "--journal", str(path))
    assert "received   1" in stats.stdout and "done       399" in stats.stdout
    missing = _cli("show", "--journal", str(path), "4242")
    assert missing.returncode == 1 and "no job 4242" in missing.stderr
    bad = tmp_path / "bad.db"
    bad.write_text("hello")
    refused = _cli("stats", "--journal", str(bad))
    assert refused.returncode == 1 and "JournalError" in refused.stderr
    assert str(bad) in refused.stderr


def test_status_needs_a_journal(mock_server):
    with wspool.consume(mock_server(count=1).url) as stream:
        with pytest.raises(ValueError, match="no journal"):
            stream.status(0)
        assert stream.recovered == 0
        list(stream)


def test_journal_repr_and_records(tmp_path, mock_server):
    path = tmp_path / "j.db"
    wspool.run(mock_server(["héllo"]).url, lambda job: job.data.upper(), journal=Path(path))
    with wspool.Journal(path) as journal:
        assert repr(journal) == f"<wspool.Journal {str(path)!r}>"
        record = journal.get(0)
    assert record is not None and record.text == "héllo" and record.value == "HÉLLO"
    assert record.as_dict()["payload"] == "héllo"
    with pytest.raises(wspool.JournalError, match="closed"):
        journal.counts()
