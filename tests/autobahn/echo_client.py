"""An Autobahn|Testsuite echo client built on wspool's production configuration: every message
the fuzzingserver sends is handed to a worker and sent back on the same connection with
`reply=True` (text as text, binary as binary). One worker, so replies keep receipt order.

    python tests/autobahn/echo_client.py ws://127.0.0.1:9001 [agent]

Runs every case the server offers (getCaseCount, runCase, updateReports), then exits 0; a case's
own outcome is judged by the server and read from its report, not here.
"""

from __future__ import annotations

import sys
import time
from typing import Union

import wspool

AGENT = "wspool"


def echo(job: wspool.Job) -> Union[str, bytes]:
    # decode="bytes": the payload as received; a text frame is valid UTF-8 already.
    return job.data.decode() if job.type == "text" else job.data


def case_count(base: str) -> int:
    with wspool.consume(f"{base}/getCaseCount", open_timeout=10) as stream:
        return int(next(iter(stream)).value)


def run_case(base: str, case: int, agent: str) -> None:
    url = f"{base}/runCase?case={case}&agent={agent}"
    try:
        with wspool.consume(
            url,
            echo,
            decode="bytes",
            workers=1,
            reply=True,
            open_timeout=10,
            close_timeout=2,
            timeout=60,
        ) as stream:
            for _ in stream:
                pass
    except wspool.WspoolError:
        # Protocol violations the case provoked on purpose end here; the report judges them.
        pass


def main() -> int:
    base = sys.argv[1].rstrip("/")
    agent = sys.argv[2] if len(sys.argv) > 2 else AGENT
    count = case_count(base)
    started = time.monotonic()
    for case in range(1, count + 1):
        run_case(base, case, agent)
        if case % 50 == 0:
            print(f"{case}/{count} cases, {time.monotonic() - started:.0f} s", flush=True)
    with wspool.consume(f"{base}/updateReports?agent={agent}") as stream:
        for _ in stream:
            pass
    print(f"{count} cases in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
