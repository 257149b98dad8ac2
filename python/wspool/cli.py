"""The ``wspool`` command (also ``python -m wspool``).

- ``wspool demo``: starts a MockServer and consumes it on a pool sized to the cores, each job a
  fake piece of work of fixed duration, logging every result under a live progress line.
- ``wspool consume URL``: consumes a stream and writes one JSON line per result.
- ``wspool mock``: serves a mock stream until Ctrl-C.
- ``wspool jobs list|show|retry|stats --journal FILE``: reads a journal (also while a consumer
  writes to it) and puts jobs back to run again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional, TextIO

from . import __version__
from ._native import Job, Result, Stats
from ._stream import consume
from .exceptions import WspoolError
from .journal import STATUSES, JobRecord, Journal

__all__ = ["main"]


class Progress:
    """A status line on stderr: redrawn in place on a terminal (at most 10 times a second),
    printed as a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.out = stream
        self.tty = stream.isatty()
        self.interval = 0.1 if self.tty else 2.0
        self.last = 0.0
        self.shown = False

    def update(self, stats: Stats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = stats.received / stats.elapsed if stats.elapsed > 0 else 0.0
        line = (
            f"received {stats.received:>7}  done {stats.processed:>7}  errors {stats.failed:>5}"
            f"  in flight {stats.in_flight:>5}  {rate:>9.0f} msg/s  {stats.elapsed:6.1f} s"
        )
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            self.shown = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def clear(self) -> None:
        """Erases the status line so a log line can be printed on a clean row."""
        if self.tty and self.shown:
            self.out.write("\r\x1b[2K")
            self.out.flush()
            self.shown = False

    def done(self) -> None:
        if self.tty and self.shown:
            self.out.write("\n")
            self.out.flush()


def _fake_job(duration: float, fail_every: int) -> Callable[[Job], dict]:
    def work(job: Job) -> dict:
        started = time.perf_counter()
        time.sleep(duration)  # stands for I/O: a database write, an HTTP call
        message = job.data
        if fail_every and message["seq"] % fail_every == fail_every - 1:
            raise RuntimeError(f"simulated failure on seq {message['seq']}")
        return {
            "seq": message["seq"],
            "notional": round(message["price"] * message["qty"], 4),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }

    return work


def _demo(args: argparse.Namespace) -> int:
    from .testing import MockServer

    workers = args.workers or os.cpu_count() or 1
    duration = args.job_ms / 1000.0
    out = sys.stdout
    progress = Progress()

    def log(result: Result) -> None:
        progress.clear()
        job = result.job
        if result.ok:
            v = result.value
            out.write(
                f"job {job.id:>5}  ok     seq={v['seq']:<5} notional={v['notional']:<9}"
                f" took {v['ms']} ms\n"
            )
        else:
            out.write(f"job {job.id:>5}  ERROR  {type(result.error).__name__}: {result.error}\n")

    print(
        f"wspool {__version__} demo: {args.count} messages at {args.rate:g}/s, "
        f"each job sleeps {args.job_ms:g} ms, {workers} workers",
        flush=True,
    )
    with MockServer(count=args.count, rate=args.rate or None) as server:
        started = time.monotonic()
        with consume(
            server.url,
            _fake_job(duration, args.fail_every),
            workers=workers,
            decode="json",
            timeout=args.timeout,
        ) as stream:
            for result in stream:
                if not args.quiet:
                    log(result)
                progress.update(stream.stats)
        took = time.monotonic() - started
    stats = stream.stats
    progress.update(stats, force=True)
    progress.done()
    serial = stats.received * duration
    print(
        f"\n{stats.received} messages: {stats.processed} ok, {stats.failed} failed, "
        f"{stats.cancelled} cancelled in {took:.2f} s "
        f"({stats.received / took if took else 0:.0f} msg/s) on {workers} workers; "
        f"one worker would need at least {serial:.2f} s."
    )
    return 0


def _load_handler(spec: Optional[str]) -> Optional[Callable[[Job], Any]]:
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"wspool: --handler takes module:function, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"wspool: cannot load handler {spec!r}: {exc}") from None
    if not callable(target):
        raise SystemExit(f"wspool: handler {spec!r} is not callable")
    return target


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def _consume(args: argparse.Namespace) -> int:
    handler = _load_handler(args.handler)
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"wspool: --header takes NAME:VALUE, not {item!r}")
        headers.append((name.strip(), value.strip()))
    progress = Progress() if args.progress else None
    out = sys.stdout
    with consume(
        args.url,
        handler,
        workers=args.workers,
        decode=args.decode,
        subscribe=args.subscribe or None,
        headers=headers,
        timeout=args.timeout,
        queue_size=args.queue_size,
        overflow=args.overflow,
        key=args.key,
        ordered="key" if args.ordered == "key" else args.ordered == "receipt",
        reconnect=args.reconnect,
        journal=args.journal,
        retries=args.retries,
    ) as stream:
        for result in stream:
            job = result.job
            line = {
                "id": job.id,
                "type": job.type,
                "connection": job.connection,
                "received_at": job.received_at,
                "ok": result.ok,
                "value": _jsonable(result.value),
                "error": None if result.ok else f"{type(result.error).__name__}: {result.error}",
            }
            out.write(json.dumps(line, default=repr) + "\n")
            if progress:
                progress.update(stream.stats)
    if progress:
        progress.update(stream.stats, force=True)
        progress.done()
    return 0


def _record_line(record: JobRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.received_at))
    detail = ""
    if record.status == "failed":
        detail = f"{record.error_type}: {record.error_message}"
    elif record.value_format is not None:
        detail = json.dumps(record.value, default=repr)
    if len(detail) > 60:
        detail = detail[:57] + "..."
    return (
        f"{record.id:>8}  {record.status:<8}  {record.attempts:>3}  {when}  "
        f"{len(record.payload):>7}  {detail}"
    )


def _jobs(args: argparse.Namespace) -> int:
    out = sys.stdout
    with Journal(args.journal) as journal:
        if args.action == "list":
            records = journal.list(status=args.status, limit=args.limit)
            if args.json:
                for record in records:
                    out.write(json.dumps(record.as_dict(), default=repr) + "\n")
            else:
                out.write(f"{'id':>8}  {'status':<8}  {'try':>3}  {'received':<19}  {'bytes':>7}\n")
                for record in records:
                    out.write(_record_line(record) + "\n")
            return 0
        if args.action == "stats":
            counts = journal.counts()
            if args.json:
                out.write(json.dumps(counts) + "\n")
            else:
                for name, value in counts.items():
                    out.write(f"{name:<11}{value}\n")
            return 0
        missing = []
        for job_id in args.ids:
            if args.action == "show":
                found = journal.get(job_id)
                if found is None:
                    missing.append(job_id)
                else:
                    out.write(json.dumps(found.as_dict(), default=repr, indent=2) + "\n")
            else:
                before = journal.retry(job_id)
                if before is None:
                    missing.append(job_id)
                else:
                    out.write(f"job {job_id}: {before} -> received (runs at the next start)\n")
        if missing:
            print(
                f"wspool: no job {', '.join(map(str, missing))} in {args.journal}", file=sys.stderr
            )
            return 1
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wspool", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wspool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="consume a bundled mock stream, with live progress")
    demo.add_argument("--count", type=int, default=600, help="messages (default 600)")
    demo.add_argument(
        "--rate",
        type=float,
        default=400.0,
        help="messages per second the server sends (default 400; 0: no limit)",
    )
    demo.add_argument(
        "--job-ms", type=float, default=20.0, help="duration of each fake job in ms (default 20)"
    )
    demo.add_argument("--workers", type=int, default=None, help="pool size (default: cores)")
    demo.add_argument(
        "--fail-every",
        type=int,
        default=97,
        help="make every Nth job fail, to show errors (default 97; 0: never)",
    )
    demo.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    demo.add_argument("--quiet", action="store_true", help="do not log every result")

    cons = sub.add_parser("consume", help="consume URL and write one JSON line per result")
    cons.add_argument("url")
    cons.add_argument("--handler", help="module:function called with each wspool.Job")
    cons.add_argument("--decode", choices=["bytes", "text", "json"], default="text")
    cons.add_argument("--workers", type=int, default=None, help="pool size (default: cores)")
    cons.add_argument(
        "--subscribe",
        action="append",
        default=[],
        help="message to send after connecting (repeatable)",
    )
    cons.add_argument("--header", action="append", default=[], help="NAME:VALUE (repeatable)")
    cons.add_argument("--timeout", type=float, default=None, help="stop after SECONDS")
    cons.add_argument("--queue-size", type=int, default=1024)
    cons.add_argument(
        "--overflow",
        choices=["block", "drop_oldest", "drop_newest", "error", "conflate"],
        default="block",
        help="what a message does when the queue is full (default: block, TCP pushes back)",
    )
    cons.add_argument("--key", default=None, help="JSON field keying messages (conflate, key)")
    cons.add_argument(
        "--ordered",
        choices=["completion", "receipt", "key"],
        default="completion",
        help="result order (default: completion)",
    )
    cons.add_argument("--reconnect", action="store_true", help="reconnect with backoff after drops")
    cons.add_argument("--progress", action="store_true", help="show a status line on stderr")
    cons.add_argument("--journal", default=None, help="SQLite journal of durable jobs (FILE)")
    cons.add_argument(
        "--retries", type=int, default=0, help="retries of a failing handler (with backoff)"
    )

    jobs = sub.add_parser("jobs", help="read a journal of durable jobs, retry jobs")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--journal", required=True, help="the journal file (consume --journal)")
    lst = actions.add_parser("list", parents=[common], help="the newest jobs, largest id first")
    lst.add_argument("--status", choices=STATUSES, default=None)
    lst.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", parents=[common], help="jobs as JSON, payload included")
    show.add_argument("ids", type=int, nargs="+", metavar="ID")
    retry = actions.add_parser(
        "retry", parents=[common], help="put jobs back to received: the next start runs them"
    )
    retry.add_argument("ids", type=int, nargs="+", metavar="ID")
    stats = actions.add_parser("stats", parents=[common], help="jobs per status, duplicates")
    stats.add_argument("--json", action="store_true", help="one JSON object")

    sub.add_parser(
        "mock", help="serve a mock stream until Ctrl-C (see `wspool mock --help`)", add_help=False
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``wspool`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "mock":
        from .testing import main as mock_main

        try:
            mock_main(argv[1:], prog="wspool mock")
        except KeyboardInterrupt:
            return 130
        return 0
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "jobs":
            return _jobs(args)
        return _consume(args)
    except WspoolError as exc:
        print(f"wspool: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"wspool: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wspool: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
