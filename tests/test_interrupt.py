"""Ctrl-C: a process blocked in wspool gets KeyboardInterrupt promptly, from iteration, from
run() and while connecting, and leaves no native thread behind."""

from __future__ import annotations

import signal
import time

import pytest

PRELUDE = """
import sys, threading, time, os
import wspool
from wspool.testing import MockServer

server = MockServer(count=10_000_000, rate={rate}).start()
"""

ITERATE = (
    PRELUDE
    + """
try:
    with wspool.consume(server.url, lambda job: time.sleep({job_sleep})) as stream:
        for i, result in enumerate(stream):
            if i == 0:
                print("ready", flush=True)
except KeyboardInterrupt:
    print("interrupted", stream.stats.threads, len(os.listdir("/proc/self/task")), flush=True)
    server.stop()
    raise
"""
)

RUN = (
    PRELUDE
    + """
print("ready", flush=True)
try:
    wspool.run(server.url, lambda job: None)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    raise
"""
)


def _interrupt(proc, wait_ready=True):
    if wait_ready:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=5)
    except Exception:
        proc.kill()
        raise
    return time.monotonic() - sent, out, err


@pytest.mark.parametrize("rate,job_sleep", [(20, 0), (100_000, 0), (1000, 0.05)])
def test_sigint_while_iterating(run_script, rate, job_sleep):
    proc = run_script(ITERATE.format(rate=rate, job_sleep=job_sleep))
    took, out, err = _interrupt(proc)
    assert took < 0.5, (took, err)
    assert "KeyboardInterrupt" in err
    assert proc.returncode != 0
    # Native threads were gone before the exception left the with block: only the main
    # thread and the mock server's remain.
    words = out.split()
    assert words[:2] == ["interrupted", "0"], out
    assert int(words[2]) <= 2, out


def test_sigint_in_run(run_script):
    proc = run_script(RUN.format(rate=50))
    took, out, err = _interrupt(proc)
    assert took < 0.5, (took, err)
    assert "interrupted" in out and "KeyboardInterrupt" in err


def test_sigint_while_connecting(run_script):
    code = """
import socket, wspool
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()   # accepts TCP, never answers the handshake
print("ready", flush=True)
wspool.consume(f"ws://127.0.0.1:{listener.getsockname()[1]}/", open_timeout=60)
"""
    proc = run_script(code)
    took, _out, err = _interrupt(proc)
    assert took < 0.5, (took, err)
    assert "KeyboardInterrupt" in err


UNCLOSED = """
import time, wspool
from wspool.testing import MockServer

server = MockServer(count=10_000_000, rate=5000).start()
stream = wspool.consume(server.url, lambda job: time.sleep(0.001), workers=4)
for i, result in enumerate(stream):
    if i == 50:
        break
{ending}
"""


@pytest.mark.parametrize(
    "ending",
    [
        "print('fell off the end')",
        "import sys; sys.exit(0)",
        "del stream",
        "wspool.run(server.url, lambda job: None, on_result=lambda r: __import__('sys').exit(0))",
    ],
)
def test_interpreter_exits_cleanly_with_a_live_stream(run_script, ending):
    for _ in range(3):
        proc = run_script(UNCLOSED.format(ending=ending))
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Fatal Python error" not in err and "panicked" not in err


SLOW = """
import time, wspool
from wspool.testing import MockServer

server = MockServer(count=10_000_000, rate=50).start()
try:
    with wspool.consume(server.url, lambda job: time.sleep(5), workers=2) as stream:
        print("ready", flush=True)
        for result in stream:
            pass
except KeyboardInterrupt:
    print("interrupted", flush=True)
    raise
"""


def test_sigint_does_not_wait_for_a_slow_handler(run_script):
    proc = run_script(SLOW)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "interrupted"
    assert time.monotonic() - sent < 0.5
    # The exit then waits for the running handlers (finalizing under them would crash);
    # a second Ctrl-C quits at once.
    time.sleep(0.3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=5)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130, err
    assert "Fatal Python error" not in err
