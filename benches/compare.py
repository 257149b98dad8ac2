"""Side-by-side benchmark: wspool against the WebSocket clients a user would pick instead.

One mock stream server (``stream_server.py``: frames pre-encoded once, sent in large writes)
runs in its own process per scenario. Every client run is a fresh process
(``bench_clients.py``), so its CPU time and peak RSS are its own; the clients alternate inside
each round (the order rotates from round to round), so slow drifts of the machine hit all of
them alike. Every run checks that each message arrived (see ``bench_clients.py``) and its
report is checked here (count, checksum, close code).

Scenarios:
    ref      the issue's reference setup: 200,000 messages of 120 B, received and counted
    count    N messages of 120 B, counted, each message's seq checked
    json     the same, each decoded to a dict and one field summed
    large    50,000 messages of 16 KiB, each seq and size checked
    work     4,000 messages, a handler sleeping 2 ms on a pool of 16 (ratio to N x 2 ms / 16)
    cpu      each message decoded and a small pure computation done on it
    latency  a paced stream (10,000 msgs/s): p50/p99 of send time to result in hand

Usage::

    python benches/compare.py --quick                  # smoke test, under two minutes
    python benches/compare.py                          # full run, writes benches/RESULTS.md
    python benches/compare.py --scenarios count,json --clients wspool,picows --runs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Optional

from bench_clients import CLIENTS, SCENARIOS, expected_checksum
from stream_server import ServerProcess, StreamConfig

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_SCRIPT = os.path.join(HERE, "bench_clients.py")
DEFAULT_CLIENTS = (
    "wspool",
    "wspool-w1",
    "wspool-results",
    "wspool-native",
    "wspool-async",
    "picows",
    "aiohttp",
    "websockets",
    "websocket-client",
    "raw",
    "raw-frames",
)
PEERS = ("picows", "aiohttp", "websockets", "websocket-client")
# What the issue measured on a 2-core machine: 200,000 messages of ~120 B, counted in Python.
REFERENCE = {"raw": 17e6, "picows": 0.77e6, "aiohttp": 0.55e6, "websockets": 0.16e6}
REFERENCE["websocket-client"] = 0.027e6
WORK_SLEEP = 0.002
WORK_POOL = 16
LATENCY_RATE = 10_000.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One scenario's stream and limits.

    Attributes:
        name: scenario name (see the module docstring).
        count: messages per stream.
        size: payload bytes per message.
        rate: messages/s for a paced stream, 0 for as fast as possible.
        caps: per-client message counts for clients too slow to read the whole stream in a
            reasonable time (their figures are rates, so they stay comparable).
        budget: seconds allowed per message before a run is declared hung.
    """

    name: str
    count: int
    size: int = 120
    rate: float = 0.0
    caps: tuple[tuple[str, int], ...] = ()
    budget: float = 50e-6

    def count_for(self, client: str) -> int:
        """Messages ``client`` reads in this scenario."""
        return min([self.count] + [n for name, n in self.caps if name == client])

    def deadline(self, count: int) -> float:
        """Seconds after which a run of ``count`` messages is killed."""
        if self.rate:
            return 60.0 + 1.5 * count / self.rate
        return 60.0 + count * self.budget


def scenarios(n: Optional[int], quick: bool) -> dict[str, Scenario]:
    """The scenarios at full size, or small ones for ``--quick``; ``n`` overrides the message
    count of ``count``, ``json`` and ``cpu``."""
    small = n or (20_000 if quick else 500_000)
    wsc = min(small, 10_000 if quick else 50_000)  # websocket-client: ~25k msgs/s at best
    cpu = n or (20_000 if quick else 200_000)  # a Python handler per message: fewer than count
    large = 2_000 if quick else 50_000
    return {
        "ref": Scenario("ref", 20_000 if quick else 200_000, caps=(("websocket-client", wsc),)),
        "count": Scenario("count", small, caps=(("websocket-client", wsc),)),
        "json": Scenario("json", small, caps=(("websocket-client", wsc),)),
        "large": Scenario(
            "large",
            large,
            size=16 * 1024,
            caps=(("websocket-client", max(500, large // 50)),),  # ~250 msgs/s
            budget=2e-3,
        ),
        "work": Scenario("work", 800 if quick else 4_000, budget=5e-3),
        "cpu": Scenario("cpu", cpu, caps=(("websocket-client", min(cpu, wsc)),)),
        "latency": Scenario("latency", 5_000 if quick else 30_000, rate=LATENCY_RATE),
    }


# -- running one client ---------------------------------------------------------------------------


def run_client(
    client: str, scenario: Scenario, server: ServerProcess, count: int
) -> dict[str, Any]:
    """Runs one client in a fresh process; adds its peak RSS and whole-process CPU time."""
    deadline = scenario.deadline(count)
    args = [
        sys.executable,
        CLIENT_SCRIPT,
        client,
        scenario.name,
        "--url",
        server.url,
        "--count",
        str(count),
        "--size",
        str(scenario.size),
        "--wire-bytes",
        str(server.wire_bytes(count)),
        "--workers",
        str(WORK_POOL),
        "--sleep",
        str(WORK_SLEEP),
        "--deadline",
        str(deadline),
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all).
        status, usage = _wait4(proc.pid, deadline + 10.0)
        proc.returncode = status
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        stderr = err.read().strip()
    report: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if usage is None:
        report["error"] = f"killed after {deadline + 10.0:.0f} s"
    else:
        report["rss_mib"] = usage.ru_maxrss / 1024.0
        report["cpu_total"] = usage.ru_utime + usage.ru_stime
    if status != 0 and "error" not in report:
        report["error"] = f"exit status {status}: {stderr[-500:]}"
    return report


def _wait4(pid: int, timeout: float) -> tuple[int, Any]:
    """Waits for ``pid`` up to ``timeout`` seconds (then kills it); returns its exit status and
    resource usage (None when it had to be killed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), usage
        time.sleep(0.005)
    os.kill(pid, 9)
    _, status, _ = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), None


def check_report(report: dict[str, Any], scenario: Scenario, count: int) -> Optional[str]:
    """Why a run's report is wrong, or None if it is right."""
    if "error" in report:
        return str(report["error"])
    if report.get("count") != count:
        return f"count {report.get('count')} != {count}"
    expected = expected_checksum_cached(scenario.name, count, scenario.size)
    if expected is not None and report.get("checksum") != expected:
        return f"checksum {report.get('checksum')} != {expected}"
    return None


_checksums: dict[tuple[str, int, int], Optional[int]] = {}


def expected_checksum_cached(name: str, count: int, size: int) -> Optional[int]:
    """``expected_checksum`` computed once per (scenario, count, size)."""
    key = (name, count, size)
    if key not in _checksums:
        _checksums[key] = expected_checksum(name, count, size)
    return _checksums[key]


# -- one scenario ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """Every run of every client in one scenario."""

    scenario: Scenario
    runs: dict[str, list[dict[str, Any]]]
    failures: dict[str, list[str]]
    server_encode_s: float
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end


def run_scenario(scenario: Scenario, clients: list[str], runs: int, log: Any) -> Outcome:
    """Runs ``runs`` rounds of every client taking part, alternating, against one server."""
    taking_part = [c for c in clients if scenario.name in CLIENTS[c].scenarios]
    outcome = Outcome(scenario, {c: [] for c in taking_part}, {c: [] for c in taking_part}, 0.0)
    config = StreamConfig(scenario.count, scenario.size, scenario.rate)
    load_start = os.getloadavg()[0]
    server = ServerProcess(config)
    outcome.server_encode_s = server.encode_s
    try:
        for round_no in range(runs):
            shift = round_no % len(taking_part)
            for client in taking_part[shift:] + taking_part[:shift]:
                count = scenario.count_for(client)
                report = run_client(client, scenario, server, count)
                served = server.wait_served(30.0)
                problem = check_report(report, scenario, count)
                if served is None or not served.get("ok"):
                    problem = problem or f"server: {served}"
                    # Start afresh so a stuck connection cannot delay the next client.
                    server.stop()
                    server = ServerProcess(config)
                if problem is None:
                    report["rate"] = count / report["elapsed"]
                    report["n"] = count
                    outcome.runs[client].append(report)
                else:
                    outcome.failures[client].append(problem)
                log(_progress(scenario.name, round_no, client, report, problem))
    finally:
        server.stop()
    outcome.load = (load_start, os.getloadavg()[0])
    return outcome


def _progress(
    name: str, round_no: int, client: str, report: dict[str, Any], problem: Optional[str]
) -> str:
    head = f"  [{name} #{round_no + 1}] {client:<17}"
    if problem is not None:
        return f"{head} FAILED: {problem}"
    line = f"{head} {report['rate']:>12,.0f} msgs/s  cpu {report['cpu']:.2f} s"
    line += f"  rss {report.get('rss_mib', 0):.0f} MiB"
    if "latency_ms" in report:
        lat = report["latency_ms"]
        line += f"  p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms"
    return line


# -- tables ---------------------------------------------------------------------------------------


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value / 1e3:.1f}k"


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(outcome: Outcome) -> str:
    """The markdown table of one scenario."""
    scenario = outcome.scenario
    # The wspool variant the ratios are taken from: the native processor where it takes part.
    lead = "wspool-native" if outcome.runs.get("wspool-native") else "wspool"
    wspool_runs = outcome.runs.get(lead) or []
    wspool_rate = _median(wspool_runs, "rate") if wspool_runs else None
    raw_runs = outcome.runs.get("raw") or []
    header = ["client", "N", "msgs/s (median)", "min-max", "CPU s", "peak RSS MiB"]
    if scenario.name == "large":
        header.append("MB/s")
        header.append("% of raw ceiling")
    if scenario.name == "work":
        header.append("time / ideal")
    if scenario.name == "latency":
        header += ["p50 ms", "p99 ms", "p99.9 ms", "max ms"]
    if scenario.name == "ref":
        header.append("issue's reference")
    ratio = scenario.name != "latency"  # at a fixed rate, msgs/s ratios say nothing
    if ratio:
        header.append(f"{lead} / client")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for client, runs in outcome.runs.items():
        failures = outcome.failures[client]
        if not runs:
            rows.append(f"| {client} | FAILED: {failures[0] if failures else 'no run'} |")
            continue
        rate = _median(runs, "rate")
        rates = [r["rate"] for r in runs]
        cells = [
            client + (f" ({len(failures)} failed)" if failures else ""),
            f"{runs[0]['n']:,}",
            f"**{_rate(rate)}**",
            f"{_rate(min(rates))}-{_rate(max(rates))}",
            f"{_median(runs, 'cpu'):.2f}",
            f"{max(r.get('rss_mib', 0) for r in runs):.0f}",
        ]
        if scenario.name == "large":
            cells.append(f"{rate * scenario.size / 1e6:,.0f}")
            cells.append(f"{100 * rate / _median(raw_runs, 'rate'):.1f}%" if raw_runs else "-")
        if scenario.name == "work":
            ideal = runs[0]["n"] * WORK_SLEEP / WORK_POOL
            cells.append(f"{_median(runs, 'elapsed') / ideal:.2f}x")
        if scenario.name == "latency":
            for key in ("p50", "p99", "p999"):
                cells.append(f"{statistics.median(r['latency_ms'][key] for r in runs):.3f}")
            cells.append(f"{max(r['latency_ms']['max'] for r in runs):.1f}")
        if scenario.name == "ref":
            ref = REFERENCE.get(client)
            cells.append(_rate(ref) if ref else "-")
        if not ratio:
            pass
        elif wspool_rate is None or client == lead:
            cells.append("-")
        else:
            cells.append(f"{wspool_rate / rate:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- machine and report ---------------------------------------------------------------------------


def machine() -> list[str]:
    """Lines describing the machine, Python and the libraries."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for dist in ("wspool", "picows", "aiohttp", "websockets", "websocket-client"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        from wspool import _native

        features = ", ".join(_native.__features__) or "none"
        build = f"- wspool build: cargo features beyond the default: {features}"
        if "test-panic" in _native.__features__:
            build += " (a development build, `make dev`: use `make install` to measure)"
    except ImportError:
        build = "- wspool build: not importable here"
    return [
        build,
        f"- cores: {os.cpu_count()} (`os.cpu_count()`), CPU: {model}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
        f"- libraries: {', '.join(versions)}",
        f"- load average when the run ended: {load}",
    ]


def server_push_line(outcomes: list[Outcome]) -> Optional[str]:
    """The server's push rate into the discarding raw reader, from the ``count`` (or ``ref``)
    scenario."""
    for name in ("count", "ref", "large"):
        for outcome in outcomes:
            runs = outcome.runs.get("raw") or []
            if outcome.scenario.name == name and runs:
                rate = _median(runs, "rate")
                size = outcome.scenario.size
                return (
                    f"Server push rate into a client that discards bytes (`raw`, {name}, "
                    f"{size} B messages): **{rate / 1e6:.1f}M msgs/s** "
                    f"({rate * (size + 2) / 1e9:.2f} GB/s on the wire), median of {len(runs)}."
                )
    return None


NOTES = """\
How to read this:

- msgs/s = messages / elapsed, where elapsed runs from the connect call to the end of the
  stream (close handshake included), measured inside the client process, which is a fresh
  process per run; median over the runs, with min-max. **wspool / client** is the ratio of
  medians from the same run (above 1: wspool is faster).
- CPU s = user + system seconds of the client process (all its threads) over that window;
  peak RSS = `ru_maxrss` of that process (from `os.wait4`), interpreter and imports included.
- Checks: each message's `seq` is checked against the next expected one (`count`, `large`:
  `int(msg[7:msg.index(",", 7)])`, ~0.4 µs per message on this machine, paid by every client,
  which is why `count` is slower than `ref`; `json`, `cpu`, `latency`: `doc["seq"]`). wspool's
  handler-less scenarios and `wspool-native` take values in receipt order and are checked the
  same way; where wspool hands `Result`s over in completion order (the `cpu` Python handler,
  `wspool-results`), each seq is checked against `result.id` (wspool's receipt order) and a
  bitmap checks that the set of seqs is complete, without duplicates. `work` checks
  completeness only. Counts and checksums are checked again by the driver. `ref` checks only
  the count and the close code, like the issue's reference figures.
- Peers are used the way their docs show: websockets `async for message in ws` (asyncio
  client, keepalive pings off), aiohttp `async for msg in ws`, picows a `WSListener` taking
  `get_payload_as_bytes()` in `ref`/`count`/`large` (measured ~5% faster than
  `get_payload_as_ascii_text()`, used elsewhere), websocket-client `ws.recv()` with its defaults
  (its pure-Python UTF-8 validation makes it slow: its N is capped, see the N column; its rate
  is steady, so the figure stays comparable). All asyncio clients run on the default asyncio
  loop (no uvloop).
- The `ref` table's reference column holds the issue's figures for the same setup. aiohttp,
  websockets and websocket-client land close to theirs; picows runs at two to three times its
  0.77M (1.8-2.3M in our runs, picows 2.3.1). Its harness above is the plain one its docs
  show, so every ratio against picows here is against a faster picows than the issue's.
- wspool: `wspool.consume(url, handler, decode=...)` drained a list at a time. Without a
  handler (`ref`/`count`/`large` with `decode="bytes"`, `json`/`latency` with
  `decode="json"`) it takes plain values, `stream.batches(values=True)`, in receipt order: one
  worker (the default for bytes without a handler) or `ordered=True` (json: two workers), each
  value checked exactly as the peers check their messages. `cpu` runs a Python handler with
  `decode="json"`, and `wspool-native` the native processor `wspool.Select("seq", "v", "pad")`
  (JSON decoded and fields picked on the workers without the GIL; the arithmetic in Python on
  the values, `ordered=True`); `work` a Python handler with `workers=16`. Diagnostic variants:
  `wspool-w1` the same with `workers=1`, `wspool-results` the handler-less scenarios consumed
  as `Result` objects (`stream.batches()`, completion order, each seq checked against
  `result.id`), `wspool-async` the handler-less scenarios as asyncio code would take them
  (`async with`, `async for batch in stream.batches(values=True)`).
- `work`: peers on asyncio run 16 worker tasks fed by an `asyncio.Queue` (`await
  asyncio.sleep(0.002)`); websocket-client a `ThreadPoolExecutor(16)` (`time.sleep`); ideal
  time = N x 2 ms / 16.
- `latency`: the server stamps `time.time_ns()` into each message right before writing it, at
  10,000 msgs/s; the client computes `time.time_ns() - t` once the decoded dict is in hand.
- The machine has 2 cores shared by the server, the client and whatever else runs (another
  engineer was compiling at times): absolute figures are noisy; the ratios measured in the
  same run are what count.
"""


def write_results(
    path: str, command: str, outcomes: list[Outcome], runs: int, started: float, finished: float
) -> None:
    """Writes the markdown report."""
    date = datetime.datetime.fromtimestamp(started, datetime.timezone.utc)
    lines = [
        "# wspool vs other Python WebSocket clients",
        "",
        f"Command: `{command}`  ",
        f"Date: {date:%Y-%m-%d %H:%M} UTC, {finished - started:.0f} s, {runs} run(s) per client",
        "",
        *machine(),
        "",
    ]
    push = server_push_line(outcomes)
    if push:
        lines += [push, ""]
    for outcome in outcomes:
        lines += [f"## {outcome.scenario.name}", "", DESCRIPTIONS[outcome.scenario.name]]
        lines += [
            "",
            f"Load average (1 min) at the start / end of this scenario: "
            f"{outcome.load[0]:.2f} / {outcome.load[1]:.2f}.",
            "",
        ]
        lines += [table(outcome), ""]
        for client, problems in outcome.failures.items():
            for problem in problems:
                lines.append(f"- {client} failed a run: {problem}")
        if any(outcome.failures.values()):
            lines.append("")
    lines.append(NOTES)
    with open(path, "w") as out:
        out.write("\n".join(lines))


DESCRIPTIONS = {
    "ref": "The issue's reference setup: 120 B messages received and counted, nothing else.",
    "count": "120 B JSON messages, received and counted in Python, each one's seq checked.",
    "json": "120 B JSON messages, each decoded to a dict, `v` summed, seq checked.",
    "large": "16 KiB messages, each one's seq and size checked.",
    "work": (
        "Each message handled by a function that sleeps 2 ms (I/O-bound), pool of 16; "
        "ideal = N x 2 ms / 16."
    ),
    "cpu": (
        "Each message decoded and `seq % 7 * v + len(pad)` computed and summed. `wspool` runs "
        'this in a Python handler on its pool (`decode="json"`); `wspool-native` has '
        '`wspool.Select("seq", "v", "pad")` decode and pick natively, then does the arithmetic.'
    ),
    "latency": (
        "Paced at 10,000 msgs/s; latency = server send stamp to decoded dict in the client's hand."
    ),
}


def main(argv: Optional[list[str]] = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(
        description="wspool vs other Python WebSocket clients, side by side."
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--clients", default=",".join(DEFAULT_CLIENTS), help="comma list")
    parser.add_argument("--runs", type=int, default=None, help="rounds (default 5, quick 2)")
    parser.add_argument("--n", type=int, default=None, help="messages for count/json/cpu")
    parser.add_argument("--quick", action="store_true", help="small N: a smoke test")
    parser.add_argument(
        "--output",
        default=None,
        help="markdown report (default benches/RESULTS.md; with --quick, none unless given)",
    )
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    all_scenarios = scenarios(args.n, args.quick)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    for name in names:
        if name not in all_scenarios:
            parser.error(f"unknown scenario {name!r}")
    for client in clients:
        if client not in CLIENTS:
            parser.error(f"unknown client {client!r}; known: {', '.join(CLIENTS)}")
    output = args.output or (None if args.quick else os.path.join(HERE, "RESULTS.md"))
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benches/compare.py", *(argv or sys.argv[1:])]
    )

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.time()
    outcomes = []
    for name in names:
        scenario = all_scenarios[name]
        log(f"{name}: {scenario.count:,} messages of {scenario.size} B")
        outcome = run_scenario(scenario, clients, runs, log)
        outcomes.append(outcome)
        log("")
        log(table(outcome))
        log(f"load average {outcome.load[0]:.2f} -> {outcome.load[1]:.2f}")
        log("")
    finished = time.time()
    push = server_push_line(outcomes)
    if push:
        log(push)
    if output:
        write_results(output, command, outcomes, runs, started, finished)
        log(f"written to {output}")
    log(f"total {finished - started:.0f} s")
    failed = sum(len(p) for o in outcomes for p in o.failures.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
