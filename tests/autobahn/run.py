"""Runs the Autobahn|Testsuite fuzzingserver against `echo_client.py` (wspool's production
configuration with `reply=True`), reads the server's JSON report, drops what varies from run to
run (durations, report file names) and compares it with `expected.json`.

    python tests/autobahn/run.py            # exit 0: same results; 1: a difference (listed)
    python tests/autobahn/run.py --update   # accept the current results as the expected ones
    python tests/autobahn/run.py --check    # exit 0 if python2.7 and the suite are available

The suite needs Python 2.7 and the `autobahntestsuite` package installed into a directory with
`pip install --target` (`make autobahn-deps` does both lookups and the install). Found through
WSPOOL_AUTOBAHN_PYTHON / WSPOOL_AUTOBAHN_DIR, else pyenv's 2.7 and build/autobahn.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXPECTED = HERE / "expected.json"
# Nothing is excluded: the whole run, 9.x performance cases included, takes about half a minute.
# 12.x / 13.x (permessage-deflate, which wspool does not negotiate) report UNIMPLEMENTED.
EXCLUDED: list[str] = []
AGENT = "wspool"
# What a case's result is made of, without durations and file names.
FIELDS = ("behavior", "behaviorClose", "remoteCloseCode")


def find_python2() -> Optional[str]:
    explicit = os.environ.get("WSPOOL_AUTOBAHN_PYTHON")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python2.7")))
    if pyenv:
        return pyenv[-1]
    return shutil.which("python2.7")


def find_suite() -> Optional[Path]:
    directory = Path(os.environ.get("WSPOOL_AUTOBAHN_DIR", ROOT / "build" / "autobahn"))
    return directory if (directory / "autobahntestsuite" / "wstest.py").exists() else None


def missing() -> Optional[str]:
    """Why the suite cannot run here, or None."""
    if find_python2() is None:
        return "no Python 2.7 interpreter (pyenv 2.7.x or python2.7 on PATH)"
    if find_suite() is None:
        return "autobahntestsuite is not installed in build/autobahn (run `make autobahn-deps`)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    spec = {
        "url": f"ws://127.0.0.1:{port}",
        "outdir": str(workdir / "reports"),
        "cases": ["*"],
        "exclude-cases": EXCLUDED,
        "exclude-agent-cases": {},
    }
    (workdir / "fuzzingserver.json").write_text(json.dumps(spec))
    # site.addsitedir (not PYTHONPATH) so the .pth files of namespace packages (zope) load.
    code = (
        f"import site, sys; site.addsitedir({str(find_suite())!r}); "
        "sys.argv = ['wstest', '-m', 'fuzzingserver', '-s', 'fuzzingserver.json']; "
        "from autobahntestsuite.wstest import run; run()"
    )
    log = open(workdir / "server.log", "w")  # closed when the process ends
    proc = subprocess.Popen(
        [str(find_python2()), "-c", code], cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the fuzzingserver exited:\n{(workdir / 'server.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the fuzzingserver did not start listening within 60 s")


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case.split("."))


def summarize(index: dict) -> dict[str, dict]:
    cases = index[AGENT]
    return {case: {f: cases[case].get(f) for f in FIELDS} for case in sorted(cases, key=case_key)}


def run_suite() -> tuple[dict[str, dict], float]:
    with tempfile.TemporaryDirectory(prefix="wspool-autobahn-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        server = start_server(workdir, port)
        started = time.monotonic()
        try:
            client = subprocess.run(
                [sys.executable, str(HERE / "echo_client.py"), f"ws://127.0.0.1:{port}", AGENT],
                timeout=1200,
            )
            if client.returncode != 0:
                raise SystemExit(f"the echo client failed with exit status {client.returncode}")
            index_file = workdir / "reports" / "index.json"
            deadline = time.monotonic() + 30
            while not index_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            index = json.loads(index_file.read_text())
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        return summarize(index), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="write expected.json")
    parser.add_argument("--check", action="store_true", help="only say if the suite can run")
    args = parser.parse_args()
    why = missing()
    if args.check:
        print(why or "ok")
        return 0 if why is None else 1
    if why:
        print(f"SKIPPED: Autobahn|Testsuite: {why}")
        return 0
    results, took = run_suite()
    counts = collections.Counter(r["behavior"] for r in results.values())
    excluded = ", ".join(EXCLUDED) or "none"
    print(
        f"Autobahn|Testsuite: {len(results)} cases in {took:.0f} s (excluded: {excluded}): "
        + ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
    )
    for case, r in results.items():
        if r["behavior"] not in ("OK", "UNIMPLEMENTED") or r["behaviorClose"] != "OK":
            print(f"  {case}: {r}")
    if args.update:
        EXPECTED.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {EXPECTED}")
        return 0
    expected = json.loads(EXPECTED.read_text())
    diffs = [
        f"  {case}: expected {expected.get(case)}, got {results.get(case)}"
        for case in sorted(set(expected) | set(results), key=case_key)
        if expected.get(case) != results.get(case)
    ]
    if diffs:
        print(f"{len(diffs)} case(s) differ from {EXPECTED.name}:", *diffs, sep="\n")
        print("(an improvement? accept it with: python tests/autobahn/run.py --update)")
        return 1
    print(f"same results as {EXPECTED.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
