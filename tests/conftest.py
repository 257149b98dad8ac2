"""Shared fixtures. The `mock_server` factory fixture comes from wspool's own pytest plugin
(registered through the `pytest11` entry point), exactly as users get it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest


def native_thread_count() -> int:
    """OS threads of this process (native ones included), from /proc."""
    return len(os.listdir("/proc/self/task"))


class ThreadCounter:
    """Remembers the process's threads (Python ones and OS ones) at `mark()`, and asserts with
    `assert_back()` that no more are left, waiting a little for stragglers. (Fewer OS threads
    is fine: a thread of an earlier test may still have been exiting at `mark()`.)"""

    def __init__(self) -> None:
        self.mark()

    def mark(self) -> None:
        self.python = threading.active_count()
        self.native = native_thread_count()

    def assert_back(self) -> None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if threading.active_count() == self.python and native_thread_count() <= self.native:
                return
            time.sleep(0.01)
        assert threading.active_count() == self.python
        assert native_thread_count() <= self.native


@pytest.fixture
def threads() -> ThreadCounter:
    """A ThreadCounter marked at the start of the test; call `mark()` again after starting a
    mock server (its thread is not the stream's)."""
    return ThreadCounter()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (connecting is refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def silent_url():
    """A ws:// URL whose listener accepts TCP but never answers the handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield f"ws://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., subprocess.Popen]:
    """Starts `python -c <code>` in a subprocess with pipes; killed at teardown if still alive."""
    procs: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        script = tmp_path / f"script{len(procs)}.py"
        script.write_text(code)
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
