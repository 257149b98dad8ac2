"""The `wspool` command: demo, consume and mock."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def test_demo_exits_zero_and_summarises():
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "wspool", "demo", "--count", "200", "--rate", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 15
    assert "200 messages: 198 ok, 2 failed, 0 cancelled" in proc.stdout
    assert proc.stdout.count("ERROR  RuntimeError: simulated failure") == 2
    # The status line was printed (stderr is not a terminal here: plain lines).
    assert "received     200" in proc.stderr


def test_default_demo_finishes_in_time():
    started = time.monotonic()
    proc = subprocess.run(["wspool", "demo", "--quiet"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 15
    assert "600 messages" in proc.stdout


def test_consume_writes_json_lines(mock_server, tmp_path):
    server = mock_server(count=25)
    (tmp_path / "myhandlers.py").write_text("def double(job):\n    return job.data['seq'] * 2\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wspool",
            "consume",
            server.url,
            "--decode",
            "json",
            "--handler",
            "myhandlers:double",
            "--workers",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(line["id"] for line in lines) == list(range(25))
    assert all(line["ok"] and line["value"] == 2 * line["id"] for line in lines)


def test_consume_reconnects_in_receipt_order(mock_server):
    server = mock_server(count=20, drop_after=20, drop_connections=2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wspool",
            "consume",
            server.url,
            "--reconnect",
            "--ordered",
            "receipt",
            "--workers",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["id"] for line in lines] == list(range(60))
    assert [line["connection"] for line in lines] == [i // 20 for i in range(60)]
    assert "reconnected (connection 2)" in proc.stderr


def test_consume_reports_connection_errors(mock_server):
    server = mock_server(reject=403)
    proc = subprocess.run(
        [sys.executable, "-m", "wspool", "consume", server.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "HandshakeError" in proc.stderr and "403" in proc.stderr


def test_mock_serves_until_interrupted():
    import signal

    from websockets.sync.client import connect

    proc = subprocess.Popen(
        [sys.executable, "-m", "wspool", "mock", "--count", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("ws://127.0.0.1:")
        with connect(url, open_timeout=5) as ws:
            messages = [json.loads(ws.recv(timeout=5)) for _ in range(5)]
        assert [m["seq"] for m in messages] == list(range(5))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
