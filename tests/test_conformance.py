"""Autobahn|Testsuite conformance: the fuzzingserver against an echo client built on wspool's
production configuration (tests/autobahn/echo_client.py); the results must match the committed
tests/autobahn/expected.json. Needs Python 2.7 and `make autobahn-deps`; skipped (with the
reason) otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).parent / "autobahn" / "run.py"


def _missing() -> str:
    check = subprocess.run(
        [sys.executable, str(RUNNER), "--check"], capture_output=True, text=True, timeout=60
    )
    return "" if check.returncode == 0 else check.stdout.strip()


@pytest.mark.timeout(900)
def test_autobahn_fuzzingserver_results_match_the_expected_ones():
    why = _missing()
    if why:
        pytest.skip(f"Autobahn|Testsuite not run: {why}")
    run = subprocess.run([sys.executable, str(RUNNER)], capture_output=True, text=True, timeout=880)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
